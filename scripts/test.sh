#!/usr/bin/env bash
# Set everything up, then run the whole test suite (what CI runs through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TINKER_TELEMETRY=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
