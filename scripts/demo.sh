#!/usr/bin/env bash
# Start the router in front of emulated llama.cpp servers: a virtualenv with olla
# from PyPI's packages, then `olla serve --demo` on http://localhost:40114.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[fast]'
exec .venv/bin/olla serve --demo "$@"
