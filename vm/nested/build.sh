#!/bin/bash
# Build (once) the L1 initramfs of the nested rig (vm/nested/rig.py):
#   L0 = this machine, L1 = the bundled guest's kernel + this initramfs (runs QEMU),
#   L2 = the freestanding oracle guest (vm/oracle) inside L1's QEMU.
# The initramfs holds busybox-static, /usr/bin/qemu-system-x86_64 with every library ldd lists
# (and the dynamic loader), /usr/share/seabios/*, the ROMs QEMU asks for from /usr/share/qemu,
# Debian's TCG accelerator module, vm/nested/init as /init and the oracle as /oracle.elf.
# Cached in ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/nested/initramfs.cpio.gz; the L1 kernel
# is $CACHE/vmlinuz (vm/build.sh is run first when it is missing). Idempotent: rebuilt only
# when the hash of its inputs changes (nested/initramfs.stamp). Prints the initramfs's path last.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM=$(cd "$HERE/.." && pwd)
CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=$CACHE/nested
mkdir -p "$OUT"
T0=$(date +%s.%N)

say() { echo "vm/nested/build.sh: $*" >&2; }
die() { echo "vm/nested/build.sh: error: $*" >&2; exit 1; }

QEMU=/usr/bin/qemu-system-x86_64   # /init runs it from this path
MODDIR=/usr/lib/x86_64-linux-gnu/qemu
# ROMs the L2 QEMU opens for `-nodefaults -kernel oracle.elf` (seen with strace: bios-256k.bin
# from seabios, multiboot_dma.bin and kvmvapic.bin); linuxboot*.bin for a Linux -kernel, pvh.bin
# for a PVH kernel. All small.
ROMS="linuxboot_dma.bin linuxboot.bin multiboot_dma.bin multiboot.bin kvmvapic.bin pvh.bin"

for tool in busybox cpio gzip ldd sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found"
done
[[ -x $QEMU ]] || die "$QEMU not found (apt-get install qemu-system-x86)"
[[ -f $MODDIR/accel-tcg-x86_64.so ]] || die "$MODDIR/accel-tcg-x86_64.so not found (Debian's qemu-system-x86)"
[[ -d /usr/share/seabios ]] || die "/usr/share/seabios not found (apt-get install seabios)"
# shellcheck source=../busybox.sh
source "$HERE/../busybox.sh"

# ---------------------------------------------------------------------------------- inputs
if [[ ! -s $CACHE/vmlinuz ]]; then
    say "no $CACHE/vmlinuz: running vm/build.sh"
    bash "$VM/build.sh" >&2 || die "vm/build.sh failed"
fi
ORACLE=$(bash "$VM/oracle/build.sh" "$CACHE/oracle" | tail -1) || die "vm/oracle/build.sh failed"
[[ -s $ORACLE ]] || die "vm/oracle/build.sh did not produce oracle.elf"

# Everything that goes into the image: "SOURCE" lines (copied to the same path).
FILES=$(
    {
        echo "$QEMU"
        ldd "$QEMU" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(0x/ { print $1 }'
        for d in "$MODDIR/accel-tcg-x86_64.so"; do
            echo "$d"
            ldd "$d" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(0x/ { print $1 }'
        done
        ls -d /usr/share/seabios/*
        for r in $ROMS; do [[ -e /usr/share/qemu/$r ]] && echo "/usr/share/qemu/$r"; done
    } | sort -u
)
grep -q 'ld-linux-x86-64' <<<"$FILES" || die "ldd did not list the dynamic loader"

STAMP_IN=$(
    {
        echo "$FILES"
        # shellcheck disable=SC2086
        sha256sum $(readlink -f $FILES | sort -u) "$BUSYBOX" "$HERE/init" "$ORACLE" \
            "$CACHE/vmlinuz" "${BASH_SOURCE[0]}" "$HERE/../busybox.sh" | awk '{print $1}'
    } | sha256sum | cut -d' ' -f1
)
IMG=$OUT/initramfs.cpio.gz
if [[ -s $IMG && -f $OUT/initramfs.stamp && $(cat "$OUT/initramfs.stamp") == "$STAMP_IN" ]]; then
    say "initramfs: up to date ($IMG)"
    echo "$IMG"
    exit 0
fi

# ---------------------------------------------------------------------------------- image
ROOT=$(mktemp -d "$OUT/.root.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
# Debian 12's merged /usr: /lib and /lib64 are links into /usr, as on the host.
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,usr/lib,usr/lib64,dev,proc,sys,tmp,root,etc,run}
ln -s usr/lib "$ROOT/lib"
ln -s usr/lib64 "$ROOT/lib64"
busybox_into "$ROOT"
while read -r f; do
    [[ -n $f ]] || continue
    dest=$f
    case $dest in /lib/*|/lib64/*) dest=/usr$dest ;; esac
    mkdir -p "$ROOT$(dirname "$dest")"
    cp -L "$f" "$ROOT$dest"
done <<<"$FILES"
install -m 755 "$HERE/init" "$ROOT/init"
cp "$ORACLE" "$ROOT/oracle.elf"
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$ROOT/dev/null" c 1 3 2>/dev/null || true

# Check at L0 that the image's QEMU starts from the image alone (libraries, module, ROMs).
if command -v chroot >/dev/null && [[ $(id -u) == 0 ]]; then
    mkdir -p "$ROOT/dev"
    rm -f "$ROOT/tmp/check.txt"
    QEMU_MODULE_DIR=$MODDIR timeout 30 chroot "$ROOT" /usr/bin/qemu-system-x86_64 \
        -nodefaults -no-user-config -display none -no-reboot -L /usr/share/seabios -L /usr/share/qemu \
        -accel tcg -m 64M -cpu qemu64,+pdpe1gb -kernel /oracle.elf -append mode=4level \
        -serial file:/tmp/check.txt -monitor none </dev/null >"$OUT/chroot-check.log" 2>&1 &
    pid=$!
    out=
    for _ in $(seq 400); do
        out=$(grep -m1 -e 'ORACLE READY' -e 'ORACLE ERROR' "$ROOT/tmp/check.txt" 2>/dev/null || true)
        [[ -n $out ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$ROOT/tmp/check.txt"
    [[ $out == *"ORACLE READY"* ]] ||
        die "the image's QEMU did not boot the oracle in a chroot: ${out:-$(cat "$OUT/chroot-check.log")}"
    say "chroot check: $out"
fi

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet | gzip -6 > "$IMG.new")
mv "$IMG.new" "$IMG"
echo "$STAMP_IN" > "$OUT/initramfs.stamp"
rm -rf "$ROOT"; trap - EXIT
say "initramfs: built $IMG ($(du -h "$IMG" | cut -f1)) in $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $T0 }") s"
echo "$IMG"
