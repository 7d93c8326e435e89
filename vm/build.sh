#!/bin/bash
# Build (once) the bundled test guest: Debian's cloud kernel + a busybox initramfs holding
# vm/init and the ground-truth probe (vm/probe.c). Cached outside the repo in
#   ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/{vmlinuz,initramfs.cpio.gz,kernel-release}
# Idempotent: the kernel is fetched once (delete the cache, or set QI_VM_REFRESH_KERNEL=1, to
# take a newer one); the initramfs is rebuilt only when a hash of its inputs changes.
# Needs: apt (Debian), busybox-static, cpio, gcc (static glibc), gzip, dpkg-deb.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
T0=$(date +%s.%N)

say() { echo "vm/build.sh: $*"; }
die() { echo "vm/build.sh: error: $*" >&2; exit 1; }

for tool in busybox cpio gcc gzip dpkg-deb apt-get apt-cache sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found (scripts/setup installs qemu-system-x86 gdb busybox-static cpio gcc)"
done
# shellcheck source=busybox.sh
source "$HERE/busybox.sh"

# ---------------------------------------------------------------------------------- kernel
resolve_image_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }'
}

if [[ -s $CACHE/vmlinuz && -s $CACHE/kernel-release && ${QI_VM_REFRESH_KERNEL:-0} != 1 ]]; then
    KREL=$(cat "$CACHE/kernel-release")
    say "kernel: cached $KREL"
else
    PKG=$(resolve_image_pkg || true)
    if [[ -z $PKG ]]; then
        say "kernel: apt-cache does not know linux-image-cloud-amd64; running apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        PKG=$(resolve_image_pkg || true)
    fi
    [[ -n $PKG ]] || die "cannot resolve linux-image-cloud-amd64 to a linux-image-6.1.0-N-cloud-amd64 package"
    KREL=${PKG#linux-image-}
    say "kernel: downloading $PKG"
    DL=$(mktemp -d "$CACHE/.dl.XXXXXX")
    trap 'rm -rf "$DL"' EXIT
    chmod 755 "$DL"   # lets apt's _apt user write there (no "unsandboxed" warning)
    (cd "$DL" && apt-get download -q "$PKG" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' || true)
    DEB=$(ls "$DL"/"$PKG"_*.deb 2>/dev/null | head -1)
    if [[ -z $DEB ]]; then
        say "kernel: download failed; running apt-get update and retrying"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        PKG=$(resolve_image_pkg); KREL=${PKG#linux-image-}
        (cd "$DL" && apt-get download -q "$PKG")
        DEB=$(ls "$DL"/"$PKG"_*.deb | head -1)
    fi
    dpkg-deb -x "$DEB" "$DL/x"
    VMLINUZ=$(ls "$DL"/x/boot/vmlinuz-* | head -1)
    [[ -s $VMLINUZ ]] || die "no boot/vmlinuz-* in $DEB"
    KREL=${VMLINUZ##*/vmlinuz-}
    cp "$VMLINUZ" "$CACHE/vmlinuz.new" && mv "$CACHE/vmlinuz.new" "$CACHE/vmlinuz"
    # The guest kernel's config, for reference (Debian's System.map is only a placeholder).
    cp "$DL/x/boot/config-$KREL" "$CACHE/config" 2>/dev/null || true
    echo "$KREL" > "$CACHE/kernel-release"
    rm -rf "$DL"; trap - EXIT
    say "kernel: $KREL -> $CACHE/vmlinuz ($(du -h "$CACHE/vmlinuz" | cut -f1))"
fi

# ---------------------------------------------------------------------------------- modules
mkdir -p "$CACHE/modules"
if [[ -x $HERE/module/build.sh ]]; then
    say "modules: running vm/module/build.sh $KREL $CACHE/modules"
    "$HERE/module/build.sh" "$KREL" "$CACHE/modules" || die "vm/module/build.sh failed"
fi
shopt -s nullglob
MODULES=("$CACHE"/modules/*.ko)
shopt -u nullglob

# ---------------------------------------------------------------------------------- initramfs
STAMP_IN=$(
    {
        echo "krel $KREL"
        sha256sum "$BUSYBOX" "$HERE/init" "$HERE/probe.c" "${BASH_SOURCE[0]}" "$HERE/busybox.sh" | awk '{print $1}'
        gcc --version | head -1
        for m in "${MODULES[@]}"; do echo "${m##*/} $(sha256sum < "$m" | cut -d' ' -f1)"; done
    } | sha256sum | cut -d' ' -f1
)
if [[ -s $CACHE/initramfs.cpio.gz && -f $CACHE/initramfs.stamp && $(cat "$CACHE/initramfs.stamp") == "$STAMP_IN" ]]; then
    say "initramfs: up to date ($CACHE/initramfs.cpio.gz)"
else
    ROOT=$(mktemp -d "$CACHE/.root.XXXXXX")
    trap 'rm -rf "$ROOT"' EXIT
    mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,modules}
    busybox_into "$ROOT"
    install -m 755 "$HERE/init" "$ROOT/init"
    gcc -O2 -static -Wall -o "$ROOT/probe" "$HERE/probe.c" || die "compiling vm/probe.c failed"
    ln -s /probe "$ROOT/bin/probe"
    for m in "${MODULES[@]}"; do cp "$m" "$ROOT/modules/"; done
    echo "$KREL" > "$ROOT/etc/kernel-release"
    # The kernel opens /dev/console before /init runs; init also re-opens ttyS0 itself.
    mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$ROOT/dev/null" c 1 3 2>/dev/null || true
    (cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet | gzip -6 > "$CACHE/initramfs.cpio.gz.new")
    mv "$CACHE/initramfs.cpio.gz.new" "$CACHE/initramfs.cpio.gz"
    echo "$STAMP_IN" > "$CACHE/initramfs.stamp"
    rm -rf "$ROOT"; trap - EXIT
    say "initramfs: built $CACHE/initramfs.cpio.gz ($(du -h "$CACHE/initramfs.cpio.gz" | cut -f1); ${#MODULES[@]} module(s))"
fi

say "done in $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $T0 }") s: $CACHE/{vmlinuz,initramfs.cpio.gz,kernel-release}"
