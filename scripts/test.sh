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
echo "== pytest -m kernel, in VMs with Debian's kernel (scripts/vm.sh)"
# Not alongside the host's tests: on two cores the emulated CPU starves them and they it.
# One VM (1 vCPU each) per file with kernel tests, as many at once as there are cores: the
# agent lab alone keeps one emulated CPU busy for minutes. Only the asyncio plugin: every
# import costs the emulated CPU twenty to forty times what it costs here.
mapfile -t kernel_files < <(grep -rlE --include='test_*.py' 'mark\.kernel' tests | sort)
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
run_in_vm() {  # FILE: its kernel tests in a VM of their own; output in $logs, status kept
  local name=${1//\//_}
  bash scripts/vm.sh env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
    .venv/bin/pytest -p pytest_asyncio.plugin -p no:cacheprovider -m kernel --durations=0 "$1" \
    >"$logs/$name.out" 2>&1
  echo $? >"$logs/$name.status"
}
export -f run_in_vm
export logs
printf '%s\0' "${kernel_files[@]}" | xargs -0 -n 1 -P "$(nproc)" bash -c 'run_in_vm "$1"' _
failed=0
for file in "${kernel_files[@]}"; do
  name=${file//\//_}
  echo "-- $file (exit status $(cat "$logs/$name.status"))"
  cat "$logs/$name.out"
  [[ $(cat "$logs/$name.status") == 0 ]] || failed=1
done
exit "$failed"
