#!/bin/bash
# A second guest kernel for the bundled guest: Debian's 6.12 cloud kernel (bookworm's
# security updates carry linux-image-6.12.*+deb12-cloud-amd64), which boots the same
# initramfs (vm/build.sh's) with another task_struct and mm_struct: what issue 22's
# one-code-path claim is tested on (tests/integration/test_guest_kernels.py).
# Cached beside the bundled guest, never over it:
#   ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/kernel-6.12/{vmlinuz,kernel-release,config}
# Idempotent: fetched once (QI_VM_REFRESH_KERNEL=1 takes a newer one). Needs apt-get, dpkg-deb.
set -euo pipefail

CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}
OUT=$CACHE/kernel-6.12
say() { echo "vm/kernel612.sh: $*"; }
die() { echo "vm/kernel612.sh: error: $*" >&2; exit 1; }

if [[ -s $OUT/vmlinuz && -s $OUT/kernel-release && ${QI_VM_REFRESH_KERNEL:-0} != 1 ]]; then
    say "cached $(cat "$OUT/kernel-release")"
    exit 0
fi
newest() {
    apt-cache pkgnames linux-image-6.12. 2>/dev/null |
        grep -E '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$' | sort -V | tail -1
}
PKG=$(newest || true)
if [[ -z $PKG ]]; then
    say "apt-cache knows no linux-image-6.12.*+deb12-cloud-amd64; running apt-get update"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    PKG=$(newest || true)
fi
[[ -n $PKG ]] || die "no linux-image-6.12.*+deb12-cloud-amd64-unsigned in apt's lists"
mkdir -p "$OUT"
DL=$(mktemp -d "$OUT/.dl.XXXXXX")
trap 'rm -rf "$DL"' EXIT
chmod 755 "$DL"   # lets apt's _apt user write there
say "downloading $PKG"
(cd "$DL" && apt-get download -q "$PKG" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' || true)
DEB=$(ls "$DL"/*.deb 2>/dev/null | head -1)
[[ -n $DEB ]] || die "apt-get download $PKG failed"
dpkg-deb -x "$DEB" "$DL/x"
VMLINUZ=$(ls "$DL"/x/boot/vmlinuz-* | head -1)
[[ -s $VMLINUZ ]] || die "no boot/vmlinuz-* in $DEB"
KREL=${VMLINUZ##*/vmlinuz-}
cp "$VMLINUZ" "$OUT/vmlinuz.new" && mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
cp "$DL/x/boot/config-$KREL" "$OUT/config" 2>/dev/null || true
echo "$KREL" > "$OUT/kernel-release"
say "$KREL -> $OUT/vmlinuz ($(du -h "$OUT/vmlinuz" | cut -f1))"
