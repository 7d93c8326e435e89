#!/bin/bash
# Build (once) the bundled aarch64 guest: Debian's arm64 cloud kernel and a busybox initramfs
# (busybox-static:arm64 and vm/arm64/init), both from Debian's archive with the arm64
# architecture added to dpkg (nothing is installed: `apt-get download` and dpkg-deb -x only).
# Cached outside the repo in
#   ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/arm64/{vmlinuz,initramfs.cpio.gz,kernel-release}
# Idempotent: fetched once (QI_VM_REFRESH_KERNEL=1 takes a newer kernel).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/arm64
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
say() { echo "vm/arm64/build.sh: $*"; }
die() { echo "vm/arm64/build.sh: error: $*" >&2; exit 1; }
for tool in cpio gzip dpkg dpkg-deb apt-get apt-cache sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found"
done

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    say "adding the arm64 architecture to dpkg (package lists only; nothing is installed)"
    sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd dpkg --add-architecture arm64 || die "dpkg --add-architecture arm64 failed"
    $sudo_cmd apt-get update -qq >/dev/null || die "apt-get update failed"
fi
resolve_kernel() {
    apt-cache depends linux-image-cloud-arm64:arm64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-arm64/ { sub(/:arm64$/, "", $2); print $2; exit }'
}
# download PKG DIR: one .deb of the arm64 archive, unpacked into DIR/x
download() {
    local pkg=$1 dir=$2 deb
    (cd "$dir" && apt-get download -q "$pkg:arm64" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' || true)
    deb=$(ls "$dir"/"${pkg}"_*_arm64.deb 2>/dev/null | head -1)
    if [[ -z $deb ]]; then
        say "$pkg: not downloaded; running apt-get update and retrying"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        (cd "$dir" && apt-get download -q "$pkg:arm64" >/dev/null 2>&1) || true
        deb=$(ls "$dir"/"${pkg}"_*_arm64.deb 2>/dev/null | head -1)
    fi
    [[ -n $deb ]] || die "apt-get download $pkg:arm64 failed"
    dpkg-deb -x "$deb" "$dir/x"
}

DL=$(mktemp -d "$CACHE/.dl.XXXXXX")
trap 'rm -rf "$DL"' EXIT
chmod 755 "$DL"   # lets apt's _apt user write there

if [[ -s $CACHE/vmlinuz && -s $CACHE/kernel-release && ${QI_VM_REFRESH_KERNEL:-0} != 1 ]]; then
    say "kernel: cached $(cat "$CACHE/kernel-release")"
else
    PKG=$(resolve_kernel || true)
    if [[ -z $PKG ]]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
        PKG=$(resolve_kernel || true)
    fi
    [[ -n $PKG ]] || die "cannot resolve linux-image-cloud-arm64:arm64 to a kernel package"
    say "kernel: downloading $PKG:arm64"
    download "$PKG" "$DL"
    VMLINUZ=$(ls "$DL"/x/boot/vmlinuz-* | head -1)
    [[ -s $VMLINUZ ]] || die "no boot/vmlinuz-* in $PKG"
    KREL=${VMLINUZ##*/vmlinuz-}
    cp "$VMLINUZ" "$CACHE/vmlinuz.new" && mv "$CACHE/vmlinuz.new" "$CACHE/vmlinuz"
    cp "$DL/x/boot/config-$KREL" "$CACHE/config" 2>/dev/null || true
    echo "$KREL" > "$CACHE/kernel-release"
    rm -rf "$DL/x"
    say "kernel: $KREL -> $CACHE/vmlinuz ($(du -h "$CACHE/vmlinuz" | cut -f1))"
fi

# shellcheck source=../busybox_initramfs.sh
source "$HERE/../busybox_initramfs.sh"
STAMP_IN=$(sha256sum "$HERE/init" "${BASH_SOURCE[0]}" "$HERE/../busybox_initramfs.sh" | awk '{print $1}' | sha256sum | cut -d' ' -f1)
if [[ -s $CACHE/initramfs.cpio.gz && -f $CACHE/initramfs.stamp && $(cat "$CACHE/initramfs.stamp") == "$STAMP_IN" ]]; then
    say "initramfs: up to date"
else
    download busybox-static "$DL"
    BB=$DL/x/bin/busybox
    [[ -s $BB ]] || die "no bin/busybox in busybox-static:arm64"
    pack_initramfs "$BB" "$HERE/init" "$DL"
    echo "$STAMP_IN" > "$CACHE/initramfs.stamp"
    say "initramfs: built $CACHE/initramfs.cpio.gz ($(du -h "$CACHE/initramfs.cpio.gz" | cut -f1))"
fi
