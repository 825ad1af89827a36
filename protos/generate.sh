#!/usr/bin/env bash
# Regenerate the committed Python stubs from protos/**/*.proto (see protos/generate.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m protos.generate "$@"
