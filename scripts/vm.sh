#!/usr/bin/env bash
# scripts/vm.sh [--timeout SECONDS] COMMAND...
#
# Runs COMMAND as root, in the current directory, inside a throw-away qemu VM that boots the
# kernel Debian's linux-image-amd64 points to now. Exists so that kernel WireGuard (and
# other kernel modules) can be tested on a host whose own kernel lacks them.
#
# * The kernel .deb is fetched with `apt-get download` and unpacked into .cache/vm/ of this
#   checkout; nothing is installed into the host's /boot or /lib/modules.
# * The host's / is shared read-only over virtio-9p, the checkout read-write at its own path;
#   /tmp, /run and /var/tmp are fresh tmpfs in the VM. No network device: the VM cannot
#   reach anything outside itself; tests build namespaces inside it.
# * wireguard, tun, veth, bridge and nf_tables are loaded before COMMAND starts; any other
#   module the kernel asks for loads from the unpacked tree on demand (busybox modprobe).
# * The exit status is COMMAND's; 124 when it ran out of time (default 1800 s,
#   VM_TIMEOUT or --timeout); 125 when the VM could not run it.
# * TCG (software emulation), 1 vCPU, VM_MEMORY MiB (default 1536, at most 2048).
set -euo pipefail

timeout_s=${VM_TIMEOUT:-1800}
if [[ ${1:-} == --timeout ]]; then
  timeout_s=$2
  shift 2
fi
if (($# == 0)); then
  echo "usage: scripts/vm.sh [--timeout SECONDS] COMMAND..." >&2
  exit 2
fi
memory=${VM_MEMORY:-1536}
if ((memory > 2048)); then
  echo "vm.sh: VM_MEMORY=$memory is above the 2048 MiB this script allows" >&2
  exit 2
fi

checkout=$(cd "$(dirname "$0")/.." && pwd -P)
cache=$checkout/.cache/vm
workdir=$(pwd -P)
mkdir -p "$cache"
# Several runs may start at once (scripts/test.sh boots one VM per kernel test file): the
# first prepares the kernel and the initramfs, the others wait for it here.
exec 9>"$cache/.prepare.lock"
flock 9

need_setup=0
for tool in qemu-system-x86_64 busybox cpio; do
  command -v "$tool" >/dev/null || need_setup=1
done
if ((need_setup)); then
  bash "$checkout/scripts/setup.sh" >&2
fi
busybox=$(command -v busybox)
if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked' && [[ -x /bin/busybox ]]; then
  busybox=/bin/busybox
fi

# --- the kernel ------------------------------------------------------------------------------

# The image package the metapackage depends on now, e.g. linux-image-6.1.0-57-amd64; apt's
# local lists answer, so this costs no download.
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/^ *Depends: linux-image-/ {print $2; exit}'
}

package=$(kernel_package)
if [[ -z $package ]] && [[ $EUID -eq 0 ]]; then
  echo "vm.sh: apt does not know linux-image-amd64; running apt-get update" >&2
  apt-get -o DPkg::Lock::Timeout=900 update -qq >&2
  package=$(kernel_package)
fi
if [[ -z $package ]]; then
  echo "vm.sh: cannot resolve linux-image-amd64 (run apt-get update as root)" >&2
  exit 125
fi
kdir=$cache/$package
if [[ ! -f $kdir/.complete ]]; then
  echo "vm.sh: fetching $package into $kdir" >&2
  rm -rf "$kdir" "$cache"/download
  mkdir -p "$cache/download"
  # Download as the caller (root: unsandboxed, as _apt cannot write into the checkout).
  (cd "$cache/download" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$package" >&2)
  mkdir -p "$kdir.tmp"
  dpkg-deb -x "$cache"/download/"$package"_*.deb "$kdir.tmp"
  rm -rf "$cache/download"
  release=$(basename "$kdir.tmp"/lib/modules/*)
  # Debian's postinst runs depmod; the host may have no kmod, busybox has one.
  "$busybox" depmod -b "$kdir.tmp" "$release"
  mv "$kdir.tmp" "$kdir"
  touch "$kdir/.complete"
  # Earlier kernels are no longer what the metapackage points to.
  find "$cache" -mindepth 1 -maxdepth 1 -name 'linux-image-*' ! -name "$package" -exec rm -rf {} +
fi
release=$(basename "$kdir"/lib/modules/*)
vmlinuz=$kdir/boot/vmlinuz-$release
# Unpacking the xz-compressed image takes TCG about 5 s per boot and the host 1 s once: boot
# the plain ELF instead, which qemu starts through its PVH entry (Debian sets CONFIG_PVH).
if [[ ! -f $kdir/vmlinux ]] && grep -q '^CONFIG_PVH=y' "$kdir/boot/config-$release"; then
  python3 - "$vmlinuz" "$kdir/vmlinux" <<'PY'
import lzma, sys
image = open(sys.argv[1], "rb").read()
start = image.find(b"\xfd7zXZ\x00")
if start >= 0:
    with open(sys.argv[2] + ".tmp", "wb") as out:
        out.write(lzma.LZMADecompressor().decompress(image[start:]))
PY
  if [[ -f $kdir/vmlinux.tmp ]]; then mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"; fi
fi
if [[ -f $kdir/vmlinux ]]; then vmlinuz=$kdir/vmlinux; fi

# --- the initramfs ---------------------------------------------------------------------------

# Rebuilt whenever this script, busybox or the kernel changes.
stamp=$(cat "$0" "$busybox" <(echo "$release") | sha256sum | cut -c1-16)
initrd=$cache/initramfs-$stamp.cpio
if [[ ! -f $initrd ]]; then
  rm -f "$cache"/initramfs-*.cpio
  staging=$(mktemp -d "$cache/initramfs.XXXXXX")
  mkdir -p "$staging"/{bin,sbin,proc,sys,dev,tmp,root,mnt/run,lib/modules/"$release"}
  cp "$busybox" "$staging/bin/busybox"
  for applet in sh mount umount mkdir insmod modprobe chroot poweroff cat sleep stty ln; do
    ln -s busybox "$staging/bin/$applet"
  done
  # The kernel's module loader (request_module) runs /sbin/modprobe in this root filesystem,
  # even while COMMAND runs chrooted into the host's.
  ln -s ../bin/busybox "$staging/sbin/modprobe"
  # Only what it takes to mount the 9p shares; the rest loads from the checkout's copy.
  modules=$kdir/lib/modules/$release
  for module in kernel/drivers/virtio/virtio_pci.ko kernel/net/9p/9pnet_virtio.ko \
                kernel/fs/9p/9p.ko; do
    for dep in $(awk -v m="$module:" '$1 == m {for (i = NF; i > 1; i--) print $i}' \
                 "$modules/modules.dep") "$module"; do
      mkdir -p "$(dirname "$staging/lib/modules/$release/$dep")"
      cp "$modules/$dep" "$staging/lib/modules/$release/$dep"
      echo "$dep" >>"$staging/boot-modules"
    done
  done
  cat >"$staging/init" <<'INIT'
#!/bin/sh
# PID 1 of the VM: mount the host read-only and the checkout read-write, load modules,
# run the command chrooted into the host's root, record its status, power off.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/null >/dev/ttyS0 2>&1
stty -F /dev/ttyS0 -opost  # no \n -> \r\n: COMMAND's output stays as written
release=$(cat /proc/sys/kernel/osrelease)
for module in $(cat /boot-modules); do
  insmod "/lib/modules/$release/$module" 2>/dev/null  # "exists": loaded as a dependency
done
for arg in $(cat /proc/cmdline); do
  case $arg in vm.checkout=*) checkout=${arg#vm.checkout=} ;; vm.run=*) run=${arg#vm.run=} ;; esac
done
r=/mnt/root
mkdir -p $r
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot $r
# Cached too: nothing changes the files a run reads while it runs, and the virtualenv's
# thousands of small files read uncached made every import twice as slow. `sync` below
# writes back what COMMAND wrote.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose checkout "$r$checkout"
# The full module tree, for modprobe here and for the kernel's on-demand loading.
mount --bind "$r$checkout/.cache/vm/$(cat /package)/lib/modules/$release" "/lib/modules/$release"
for module in wireguard tun veth bridge nf_tables; do
  modprobe "$module" || echo "vm: cannot load $module" >&2
done
mount -t proc proc $r/proc
mount -t sysfs sys $r/sys
mount -t devtmpfs dev $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts devpts $r/dev/pts
mount -t tmpfs tmpfs $r/dev/shm
for dir in /tmp /run /var/tmp; do
  mount -t tmpfs -o mode=1777 tmpfs "$r$dir"
done
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup 2>/dev/null
# What udev would add: tools read keys from /dev/stdin (wg set ... private-key /dev/stdin).
ln -s /proc/self/fd $r/dev/fd
ln -s /proc/self/fd/0 $r/dev/stdin
ln -s /proc/self/fd/1 $r/dev/stdout
ln -s /proc/self/fd/2 $r/dev/stderr
chroot $r /bin/sh "$run/command" </dev/null
echo $? >"$r$run/status"
sync
poweroff -f
INIT
  chmod +x "$staging/init"
  echo "$package" >"$staging/package"
  (cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) >"$initrd.tmp"
  rm -rf "$staging"
  mv "$initrd.tmp" "$initrd"
fi

flock -u 9
exec 9>&-

# --- the run ---------------------------------------------------------------------------------

run=$(mktemp -d "$cache/run.XXXXXX")
qemu_pid=
cleanup() {
  if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

{
  echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  echo "export HOME=/root LANG=C.UTF-8 TERM=dumb"
  printf 'cd %q || exit 125\n' "$workdir"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$run/command"

# The kernel's own messages only with VM_DEBUG=1: otherwise the serial port carries COMMAND's
# output alone (init writes it there, and the kernel's console is the absent screen).
console="console=tty0 quiet"
if [[ -n ${VM_DEBUG:-} ]]; then
  console="console=ttyS0 loglevel=7"
fi
# timeout(1) stops a guest that hangs from out here (124): nothing inside need cooperate.
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg -cpu max -smp 1 -m "$memory" \
  -nodefaults -no-user-config -display none -nic none -no-reboot \
  -chardev stdio,id=console,signal=off -serial chardev:console \
  -kernel "$vmlinuz" -initrd "$initrd" \
  -append "$console panic=-1 mitigations=off vm.checkout=$checkout vm.run=$run" \
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev local,id=checkout,path="$checkout",security_model=none \
  -device virtio-9p-pci,fsdev=checkout,mount_tag=checkout \
  </dev/null &
qemu_pid=$!
status=0
wait "$qemu_pid" || status=$?
qemu_pid=
if ((status == 124 || status == 137)); then
  echo "vm.sh: timed out after ${timeout_s} s" >&2
  exit 124
fi
if [[ ! -s $run/status ]]; then
  echo "vm.sh: the VM stopped without running the command to its end" >&2
  exit 125
fi
exit "$(cat "$run/status")"
