#!/usr/bin/env bash
# Create .venv and install moe-serve with its test extras; re-run only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  # torch is pinned to the exact CPU wheel (torch==2.13.0); nothing here may pull another torch.
  .venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
