#!/bin/bash
# Build (once) the riscv64 test guest: Debian 13's riscv64 kernel (Debian 12 has none) and a
# busybox initramfs (busybox-static:riscv64 and vm/riscv64/init). Both .debs come from
# deb.debian.org's trixie pool, each checked against the SHA256 in trixie's own signed-index
# Packages list for riscv64; nothing is installed and apt's sources are not touched (curl,
# dpkg-deb -x). QEMU boots it through the OpenSBI that qemu-system-misc ships.
# Cached outside the repo in
#   ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/riscv64/{vmlinuz,initramfs.cpio.gz,kernel-release}
# Idempotent: fetched once (QI_VM_REFRESH_KERNEL=1 takes a newer kernel).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/riscv64
MIRROR=${QI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
say() { echo "vm/riscv64/build.sh: $*"; }
die() { echo "vm/riscv64/build.sh: error: $*" >&2; exit 1; }
for tool in cpio gzip dpkg-deb curl xz sha256sum awk; do
    command -v "$tool" >/dev/null || die "'$tool' not found"
done

DL=$(mktemp -d "$CACHE/.dl.XXXXXX")
trap 'rm -rf "$DL"' EXIT

index() {       # trixie's riscv64 package list, fetched once per build
    if [[ ! -s $DL/Packages ]]; then
        curl -fsS --retry 3 "$MIRROR/dists/trixie/main/binary-riscv64/Packages.xz" |
            xz -dc > "$DL/Packages" || die "cannot fetch trixie's riscv64 Packages list"
    fi
}
# fetch PATTERN DIR: the newest package whose name matches PATTERN, checked, unpacked in DIR/x
fetch() {
    local pattern=$1 dir=$2 found name file sum
    index
    found=$(awk -v RS= -v pat="$pattern" '
        { name = ""; file = ""; sum = ""
          n = split($0, line, "\n")
          for (i = 1; i <= n; i++) {
              if (line[i] ~ /^Package: /) name = substr(line[i], 10)
              if (line[i] ~ /^Filename: /) file = substr(line[i], 11)
              if (line[i] ~ /^SHA256: /) sum = substr(line[i], 9)
          }
          if (name ~ pat) print name, file, sum }' "$DL/Packages" | sort -V | tail -1)
    [[ -n $found ]] || die "no package matching $pattern in trixie's riscv64 list"
    read -r name file sum <<<"$found"
    say "downloading $name"
    curl -fsS --retry 3 -o "$dir/pkg.deb" "$MIRROR/$file" || die "cannot fetch $MIRROR/$file"
    echo "$sum  $dir/pkg.deb" | sha256sum -c --quiet - || die "$name: SHA256 differs from the index"
    rm -rf "$dir/x"
    dpkg-deb -x "$dir/pkg.deb" "$dir/x"
    rm -f "$dir/pkg.deb"
}

if [[ -s $CACHE/vmlinuz && -s $CACHE/kernel-release && ${QI_VM_REFRESH_KERNEL:-0} != 1 ]]; then
    say "kernel: cached $(cat "$CACHE/kernel-release")"
else
    fetch '^linux-image-[0-9.]+\+deb13-riscv64$' "$DL"
    IMAGE=$(ls "$DL"/x/boot/vmlinux-* | head -1)
    [[ -s $IMAGE ]] || die "no boot/vmlinux-* in the kernel package"
    KREL=${IMAGE##*/vmlinux-}
    cp "$IMAGE" "$CACHE/vmlinuz.new" && mv "$CACHE/vmlinuz.new" "$CACHE/vmlinuz"
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
    fetch '^busybox-static$' "$DL"
    BB=$DL/x/usr/bin/busybox                  # trixie moved it from /bin (usrmerge)
    [[ -s $BB ]] || BB=$DL/x/bin/busybox
    [[ -s $BB ]] || die "no busybox in busybox-static:riscv64"
    pack_initramfs "$BB" "$HERE/init" "$DL"
    echo "$STAMP_IN" > "$CACHE/initramfs.stamp"
    say "initramfs: built $CACHE/initramfs.cpio.gz ($(du -h "$CACHE/initramfs.cpio.gz" | cut -f1))"
fi
