#!/usr/bin/env bash
# Print the path of a working llama-server binary, building it once when missing.
#
# Order: $LLAMA_SERVER (an existing binary wins), then the per-user cache
# ${XDG_CACHE_HOME:-~/.cache}/olla/llama-server/<version>/llama-server, built from
# the llama-cpp-python sdist on PyPI (it vendors llama.cpp with tools/server).
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

if [[ -n "${LLAMA_SERVER:-}" ]]; then
  if [[ -x "$LLAMA_SERVER" ]]; then echo "$LLAMA_SERVER"; exit 0; fi
  echo "LLAMA_SERVER=$LLAMA_SERVER is not an executable file" >&2
  exit 1
fi

cache="${XDG_CACHE_HOME:-$HOME/.cache}/olla/llama-server/$version"
binary="$cache/llama-server"
if [[ -x "$binary" ]] && "$binary" --version >/dev/null 2>&1; then
  echo "$binary"; exit 0
fi

for tool in cmake make cc c++; do
  command -v "$tool" >/dev/null || { echo "building llama-server needs $tool" >&2; exit 1; }
done

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # two test sessions on one machine build once
if [[ -x "$binary" ]]; then echo "$binary"; exit 0; fi

work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "building llama-server from llama-cpp-python==$version (about 6 minutes on 2 cores)" >&2
python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2
install -m 0755 "$work/build/bin/llama-server" "$binary.tmp"
mv "$binary.tmp" "$binary"
"$binary" --version >&2
echo "$binary"
