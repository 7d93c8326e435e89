#!/bin/bash
# Build (once) the arm64 KVM rig (vm/kvm_arm64/rig.py): L1 = the bundled aarch64 guest's kernel
# (vm/arm64: Debian's arm64 cloud kernel, CONFIG_KVM=y) under qemu-system-aarch64
# -M virt,virtualization=on -cpu max (TCG, so L1 boots at EL2 and its KVM runs in VHE mode);
# its initramfs starts a tiny static VMM (vmm.c) that runs L2 (payload.S, raw A64 code) under
# L1's KVM, so L2's memory goes through a real stage-2 table (VTTBR_EL2/VTCR_EL2).
#
# Cached in ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/kvm-arm64/:
#   vmm                 vmm.c, aarch64-linux-gnu-gcc -static -O2 -pthread
#   payload.bin         payload.S, assembled and linked at 0x40000000, .text only (raw code)
#   initramfs.cpio.gz   busybox (arm64, taken from vm/arm64's initramfs), /vmm, /payload.bin,
#                       vm/kvm_arm64/init as /init
#   initramfs.stamp     the hash of every input (rebuilt only when it changes)
# The kernel is vm/arm64's ($CACHE/arm64/vmlinuz; vm/arm64/build.sh runs first if it is missing).
#
# Needs: the cross compiler `aarch64-linux-gnu-gcc` with its static libc (Debian 12:
# `apt-get install gcc-aarch64-linux-gnu`, which brings libc6-dev-arm64-cross and
# binutils-aarch64-linux-gnu); installed here with apt-get when running as root, else an error
# says so. Also cpio, gzip, sha256sum.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM=$(cd "$HERE/.." && pwd)
BASE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}
mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd)
OUT=$BASE/kvm-arm64
ARM64=$BASE/arm64
mkdir -p "$OUT"

say() { echo "vm/kvm_arm64/build.sh: $*" >&2; }
die() { echo "vm/kvm_arm64/build.sh: error: $*" >&2; exit 1; }

for tool in cpio gzip sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found"
done
CC=aarch64-linux-gnu-gcc
OBJCOPY=aarch64-linux-gnu-objcopy
if ! command -v $CC >/dev/null || ! command -v $OBJCOPY >/dev/null ||
   [[ ! -e /usr/aarch64-linux-gnu/lib/libc.a ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing the aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)"
        apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null ||
            { apt-get update -qq >/dev/null &&
              apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null; } ||
            die "apt-get install gcc-aarch64-linux-gnu failed"
    else
        die "'$CC' (with a static libc) not found: apt-get install gcc-aarch64-linux-gnu"
    fi
fi

if [[ ! -s $ARM64/vmlinuz || ! -s $ARM64/initramfs.cpio.gz || ! -s $ARM64/kernel-release ]]; then
    say "the aarch64 guest is not built: running vm/arm64/build.sh"
    bash "$VM/arm64/build.sh" >&2
fi

STAMP_IN=$( { sha256sum "$HERE/vmm.c" "$HERE/payload.S" "$HERE/init" "${BASH_SOURCE[0]}" \
                        "$VM/busybox_initramfs.sh" "$ARM64/initramfs.cpio.gz" | awk '{print $1}'
              $CC --version | head -1; } | sha256sum | cut -d' ' -f1)
if [[ -s $OUT/initramfs.cpio.gz && -s $OUT/vmm && -s $OUT/payload.bin && -f $OUT/initramfs.stamp &&
      $(cat "$OUT/initramfs.stamp") == "$STAMP_IN" ]]; then
    say "up to date ($OUT)"
    echo "$OUT"
    exit 0
fi

WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

$CC -static -O2 -pthread -Wall -Wextra -Werror -o "$WORK/vmm" "$HERE/vmm.c"
$CC -nostdlib -static -no-pie -ffreestanding -Wl,-Ttext=0x40000000 -Wl,--build-id=none \
    -o "$WORK/payload.elf" "$HERE/payload.S"
$OBJCOPY -O binary -j .text "$WORK/payload.elf" "$WORK/payload.bin"
size=$(stat -c %s "$WORK/payload.bin")
(( size > 0 && size <= 0x800 )) || die "payload.bin is $size bytes (must fit below the table at +0x800)"

# busybox: vm/arm64's (busybox-static:arm64), out of its initramfs
mkdir -p "$WORK/bb"
(cd "$WORK/bb" && gzip -dc "$ARM64/initramfs.cpio.gz" | cpio -i -d --quiet bin/busybox)
[[ -s $WORK/bb/bin/busybox ]] || die "no bin/busybox in $ARM64/initramfs.cpio.gz"

# pack_initramfs keeps what is already in WORK/root: the VMM and the payload
mkdir -p "$WORK/root"
install -m 755 "$WORK/vmm" "$WORK/root/vmm"
install -m 644 "$WORK/payload.bin" "$WORK/root/payload.bin"
# shellcheck source=../busybox_initramfs.sh
source "$VM/busybox_initramfs.sh"
CACHE=$OUT pack_initramfs "$WORK/bb/bin/busybox" "$HERE/init" "$WORK"

install -m 755 "$WORK/vmm" "$OUT/vmm"
install -m 644 "$WORK/payload.bin" "$OUT/payload.bin"
echo "$STAMP_IN" > "$OUT/initramfs.stamp"
say "built vmm ($(stat -c %s "$OUT/vmm") B), payload.bin ($size B), initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
echo "$OUT"
