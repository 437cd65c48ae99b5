#!/usr/bin/env bash
# The README's test command: set up, then lint, type-check and run every test. The tests
# marked `kernel` need kernel WireGuard, which the host's kernel may lack: they run last, in a
# VM booting Debian's kernel (scripts/vm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff";  .venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy";  .venv/bin/mypy
echo "== pytest (all but the kernel tests, which follow in the VM)"
.venv/bin/pytest -m "not kernel" "$@"
echo "== pytest -m kernel, in a VM with Debian's kernel (scripts/vm.sh)"
# Not alongside the host's tests: on two cores the emulated CPU starves them and they it.
# Only the files with kernel tests and only the asyncio plugin: every import costs the
# emulated CPU twenty to forty times what it costs here.
mapfile -t kernel_files < <(grep -rlE --include='test_*.py' 'mark\.kernel' tests | sort)
bash scripts/vm.sh env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
  .venv/bin/pytest -p pytest_asyncio.plugin -p no:cacheprovider -m kernel --durations=0 \
  "${kernel_files[@]}"
