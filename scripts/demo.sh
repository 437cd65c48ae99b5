#!/usr/bin/env bash
# The README's main command: set up, then run the lab demo (needs root for network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/wg-autopeer lab demo "$@"
