#!/usr/bin/env bash
# The README's test command: set up, then lint, type-check and run every test. The tests
# marked `kernel` need kernel WireGuard, which the host's kernel may lack: they run in a VM
# booting Debian's kernel (scripts/vm.sh), at the same time as the others run here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff";  .venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy";  .venv/bin/mypy

# The emulated VM is CPU-bound for minutes while the host's lab tests mostly wait on the
# network: run it alongside, niced, so it takes the idle CPU and not the host tests' time
# (its own deadlines are minutes). Only the files with kernel tests and only the asyncio
# plugin: every import costs the emulated CPU twenty to forty times what it costs here.
mapfile -t kernel_files < <(grep -rlE --include='test_*.py' 'mark\.kernel' tests | sort)
vm_log=$(mktemp)
vm_pid=
stop_vm() {
  if [[ -n $vm_pid ]] && kill -0 "$vm_pid" 2>/dev/null; then kill "$vm_pid"; wait "$vm_pid" || true; fi
  rm -f "$vm_log"
}
trap stop_vm EXIT
nice -n 10 bash scripts/vm.sh env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
  .venv/bin/pytest -p pytest_asyncio.plugin -p no:cacheprovider -m kernel --durations=0 \
  "${kernel_files[@]}" >"$vm_log" 2>&1 &
vm_pid=$!

echo "== pytest (here; the kernel tests run in the VM meanwhile)"
host_status=0
.venv/bin/pytest -m "not kernel" "$@" || host_status=$?
echo "== pytest -m kernel, in a VM with Debian's kernel (scripts/vm.sh)"
vm_status=0
wait "$vm_pid" || vm_status=$?
vm_pid=
cat "$vm_log"
if ((host_status != 0)); then exit "$host_status"; fi
exit "$vm_status"
