#!/usr/bin/env bash
# Set everything up, then run the whole test suite (what CI runs through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM's own environment for tests/test_vllm_sampler.py (--sampler vllm); TINSMITH_SKIP_VLLM=1
# skips making it, and those tests then skip (unless TINSMITH_REQUIRE_VLLM=1, as in CI).
[ "${TINSMITH_SKIP_VLLM:-0}" = 1 ] || bash scripts/setup_vllm.sh
export HF_HUB_OFFLINE=1 TINKER_TELEMETRY=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
