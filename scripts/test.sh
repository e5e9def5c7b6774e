#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: a virtualenv with olla and its
# test dependencies from PyPI, llama-server built once (cached per user), pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,fast]'
scripts/llama-server.sh >/dev/null
exec .venv/bin/python -m pytest "$@"
