#!/usr/bin/env bash
# Set everything up, then fine-tune the bundled model through the tinker SDK (tinsmith demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tinsmith demo "$@"
