#!/usr/bin/env bash
# Set up everything wg-autopeer's demo and tests need on a Debian machine, idempotently:
# Debian packages (as root, only when missing) and a virtualenv in .venv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(wireguard-go wireguard-tools iproute2 nftables iputils-ping iperf3 curl procps
              xvfb trayer systemd
              # The StatusNotifierItem tray tests: real hosts (xfce4-panel's Status
              # Tray plugin with its settings daemon; waybar on headless sway, with grim
              # for screenshots), each its own StatusNotifierWatcher, on a private bus.
              xfce4-panel xfconf dbus-daemon sway waybar grim
              # scripts/vm.sh: the kernel tests boot Debian's kernel under qemu
              qemu-system-x86 busybox-static cpio
              # The shared registry's tests and benchmark start their own PostgreSQL
              # (wg_autopeer.lab.postgres) from /usr/lib/postgresql/*/bin.
              postgresql)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  missing+=(python3-venv)
fi
if ((${#missing[@]})); then
  if [[ $EUID -ne 0 ]]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root (sudo) to install them" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  # No recommends: wireguard-go would otherwise pull a kernel image and initramfs.
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
if [[ ! -f .venv/.installed ]] || [[ pyproject.toml -nt .venv/.installed ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi
