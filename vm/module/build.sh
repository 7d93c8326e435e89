#!/bin/bash
# Build the kernel modules of vm/module/ for kernel release KREL; copy the .ko files to OUTDIR:
#   gpt_dump.ko   the guest's page walk of one GVA (in the guest)
#   slat_dump.ko  the hypervisor's NPT/EPT walk of one GPA (on the KVM host: the rig's L1)
# vm/build.sh puts OUTDIR/*.ko into the bundled guest's initramfs at /modules/; vm/kvm/rig.py
# puts them on L1's per-start disk at /qi/modules/ (L1 runs the same kernel release).
#
#   vm/module/build.sh 6.1.0-56-cloud-amd64 OUTDIR
#
# Installs linux-headers-KREL with apt-get when /lib/modules/KREL/build is missing. Builds in
# a scratch copy (the source tree stays free of .o/.cmd files) and skips the build when the
# sources and KREL are unchanged since the .ko in OUTDIR was made.
set -euo pipefail

die() { echo "vm/module/build.sh: error: $*" >&2; exit 1; }
say() { echo "vm/module/build.sh: $*"; }

[[ $# -eq 2 ]] || die "usage: $0 KREL OUTDIR"
KREL=$1
OUTDIR=$2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KDIR=/lib/modules/$KREL/build
MODULES=(gpt_dump slat_dump)

mkdir -p "$OUTDIR"
STAMP="$OUTDIR/.gpt_dump.stamp"
HASH=$( (echo "$KREL"; cat "$HERE"/*.c "$HERE"/Kbuild) | sha256sum | cut -d' ' -f1)
up_to_date() {
    [[ -f $STAMP && $(cat "$STAMP") == "$HASH" ]] || return 1
    for m in "${MODULES[@]}"; do [[ -s $OUTDIR/$m.ko ]] || return 1; done
}
if up_to_date; then
    say "up to date for $KREL"
    exit 0
fi

if [[ ! -e $KDIR/Makefile ]]; then
    PKG=linux-headers-$KREL
    command -v apt-get >/dev/null || die "$KDIR is missing and there is no apt-get to install $PKG"
    say "installing $PKG (for $KDIR)"
    if ! apt-get install -y -q "$PKG" >/dev/null 2>&1; then
        # An old or empty package list does not know the package yet.
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt-get install -y -q "$PKG" >/dev/null || die "cannot install $PKG"
    fi
    [[ -e $KDIR/Makefile ]] || die "$PKG is installed but $KDIR/Makefile is missing"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp "$HERE"/*.c "$HERE"/Kbuild "$WORK/"
LOG=$WORK/make.log
if ! make -C "$KDIR" M="$WORK" modules >"$LOG" 2>&1; then
    cat "$LOG" >&2
    die "the module build failed for $KREL"
fi
# Our sources must build cleanly: a warning in them is a bug (or a kernel API change).
if grep -E "\.c:[0-9]+:[0-9]+: (warning|error):" "$LOG" >&2; then
    die "the module build printed warnings (above)"
fi
for m in "${MODULES[@]}"; do
    cp "$WORK/$m.ko" "$OUTDIR/$m.ko"
    say "$m.ko -> $OUTDIR/ ($(stat -c %s "$OUTDIR/$m.ko") bytes, for $KREL)"
done
echo "$HASH" > "$STAMP"
