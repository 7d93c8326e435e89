#!/bin/bash
# Build (once) the Intel EPT rig (vm/ept/rig.py): L0 = Bochs (Debian's bochs emulates Intel VT-x
# with EPT), L1 = the bundled cloud kernel with its own kvm + kvm-intel modules, Python, gdb and
# QEMU (the KVM rig's root image), L2 = the bundled guest or the oracle under QEMU -accel kvm
# inside L1: L2's memory goes through a real EPT that L1's KVM builds.
#
# Cached in ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/ept/:
#   modules/*.ko, modules/order   from linux-image-KREL's .deb (KREL = $CACHE/kernel-release):
#                                 ATA (Bochs's disks are IDE), overlay, irqbypass, kvm, kvm-intel;
#                                 their signatures stripped (the kernel checks an appended
#                                 signature in software: seconds under Bochs, for nothing here)
#   initramfs.cpio.gz             busybox, the modules, vm/ept/init as /init
#   boot.iso                      isolinux + the bundled vmlinuz + that initramfs: Bochs's BIOS
#                                 boots the ISO (Bochs has no -kernel; isolinux loads the bzImage)
#   root.img                      the KVM rig's root.ext4 (python3, numpy, gdb, qemu), padded to
#                                 a whole number of 16x63 cylinders (Bochs's disk geometry)
# The per-start disk (the checkout's qintrospect/, the L2 images, vm/module/'s .ko files) is
# made by rig.py at every start, as the KVM rig's is.
#
# Idempotent: each part is rebuilt only when the hash of its inputs changes (*.stamp). Runs
# vm/kvm/build.sh first (idempotent; it builds the bundled guest, the oracle, our modules and
# the root image this rig shares).
# Needs: bochs, bochsbios, vgabios, isolinux, syslinux-common, xorriso (scripts/setup installs
# them), apt-get/dpkg-deb, busybox-static, cpio, gzip, python3.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM=$(cd "$HERE/.." && pwd)
CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=$CACHE/ept
mkdir -p "$OUT"
T0=$(date +%s.%N)

say() { echo "vm/ept/build.sh: $*" >&2; }
die() { echo "vm/ept/build.sh: error: $*" >&2; exit 1; }
elapsed() { awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $1 }"; }

for tool in busybox cpio gzip dpkg-deb apt-get sha256sum xorriso python3 bochs-bin; do
    command -v "$tool" >/dev/null ||
        die "'$tool' not found (apt-get install bochs bochsbios vgabios isolinux syslinux-common xorriso busybox-static cpio; scripts/setup does)"
done
ISOLINUX_BIN=/usr/lib/ISOLINUX/isolinux.bin
LDLINUX=/usr/lib/syslinux/modules/bios/ldlinux.c32
for f in "$ISOLINUX_BIN" "$LDLINUX" /usr/share/bochs/BIOS-bochs-latest /usr/share/vgabios/vgabios.bin; do
    [[ -s $f ]] || die "$f missing (apt-get install isolinux syslinux-common bochsbios vgabios)"
done
# shellcheck source=../busybox.sh
source "$VM/busybox.sh"

# Modules, in load order (each after what it depends on; checked against the .ko's depends=).
MODULES="scsi_common scsi_mod libata ata_piix sd_mod overlay irqbypass kvm kvm-intel"
# L1's kernel command line. mitigations=off: no page-table isolation or retpolines to emulate;
# tsc=reliable no_timer_check: under `clock: sync=none` Bochs's time follows its instruction
# count, not the wall clock, and the kernel's TSC and timer checks would misjudge it.
APPEND="console=ttyS0,115200 panic=-1 quiet mitigations=off tsc=reliable no_timer_check"
# Bochs's hard disks are whole cylinders of 16 heads x 63 sectors.
CYLINDER=$((16 * 63 * 512))

# ---------------------------------------------------------------------------------- inputs
bash "$VM/kvm/build.sh" >/dev/null || die "vm/kvm/build.sh failed"
KREL=$(cat "$CACHE/kernel-release")
KVM_ROOT=$CACHE/kvm/root.ext4
[[ -s $KVM_ROOT && -s $CACHE/kvm/root.stamp ]] || die "vm/kvm/build.sh left no $KVM_ROOT"

rm -rf "$OUT"/.build.*   # left by a killed run
SCRATCH=
cleanup() { [[ -n $SCRATCH ]] && rm -rf "$SCRATCH"; return 0; }
trap cleanup EXIT
scratch() {
    if [[ -z $SCRATCH ]]; then
        SCRATCH=$(mktemp -d "$OUT/.build.XXXXXX")
        chmod 755 "$SCRATCH"   # lets apt's _apt user write there (no "unsandboxed" warning)
    fi
}

# strip_signature FILE: drop a module's appended signature (struct module_signature + the
# "~Module signature appended~\n" magic). The kernel then says "module verification failed"
# and loads it (Debian's kernels do not enforce signatures).
strip_signature() {
    python3 - "$1" <<'EOF'
import struct, sys
MAGIC = b"~Module signature appended~\n"
path = sys.argv[1]
data = open(path, "rb").read()
if data.endswith(MAGIC):
    # struct module_signature: 12 bytes, the signature's length big-endian in its last 4
    (sig_len,) = struct.unpack(">I", data[-len(MAGIC) - 4:-len(MAGIC)])
    open(path, "wb").write(data[:len(data) - len(MAGIC) - 12 - sig_len])
EOF
}

# ---------------------------------------------------------------------------------- modules
MODDIR=$OUT/modules
MOD_STAMP_IN=$( { echo "$KREL $MODULES"; sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1; } |
                sha256sum | cut -d' ' -f1)
if [[ -f $MODDIR/stamp && $(cat "$MODDIR/stamp") == "$MOD_STAMP_IN" ]]; then
    say "modules: up to date ($KREL)"
else
    T=$(date +%s.%N)
    scratch; S=$SCRATCH
    say "modules: downloading linux-image-$KREL for its modules"
    (cd "$S" && apt-get download -q "linux-image-$KREL" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' >&2) || true
    DEB=$(ls "$S"/linux-image-"$KREL"_*.deb 2>/dev/null | head -1)
    if [[ -z $DEB ]]; then
        say "modules: download failed; running apt-get update and retrying"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        (cd "$S" && apt-get download -q "linux-image-$KREL" >&2) || die "cannot download linux-image-$KREL"
        DEB=$(ls "$S"/linux-image-"$KREL"_*.deb | head -1)
    fi
    dpkg-deb -x "$DEB" "$S/k"
    rm -rf "$MODDIR.new" && mkdir -p "$MODDIR.new"
    loaded=" "
    for m in $MODULES; do
        f=$(find "$S/k/lib/modules/$KREL/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -1 || true)
        [[ -n $f ]] || die "module $m.ko not in linux-image-$KREL"
        [[ $f == *.ko ]] || die "$f is compressed: busybox insmod needs a plain .ko"
        deps=$( (tr '\0' '\n' < "$f" || true) | grep -a -m1 '^depends=' | cut -d= -f2 | tr ',' ' ' || true)
        for d in $deps; do
            [[ $loaded == *" ${d//_/-} "* || $loaded == *" ${d//-/_} "* ]] ||
                die "module $m depends on $d, which is not loaded before it (MODULES in vm/ept/build.sh)"
        done
        loaded+="$m "
        cp "$f" "$MODDIR.new/$m.ko"
        strip_signature "$MODDIR.new/$m.ko"
    done
    echo "$MODULES" | tr ' ' '\n' > "$MODDIR.new/order"
    echo "$KREL" > "$MODDIR.new/kernel-release"
    echo "$MOD_STAMP_IN" > "$MODDIR.new/stamp"
    rm -rf "$MODDIR" && mv "$MODDIR.new" "$MODDIR"
    rm -rf "$S/k" "$DEB"
    say "modules: $(ls "$MODDIR"/*.ko | wc -l) from linux-image-$KREL, signatures stripped, in $(elapsed "$T") s"
fi

# ---------------------------------------------------------------------------------- initramfs
INITRD=$OUT/initramfs.cpio.gz
INIT_STAMP_IN=$(
    {
        cat "$MODDIR/stamp"
        sha256sum "$BUSYBOX" "$HERE/init" "${BASH_SOURCE[0]}" "$VM/busybox.sh" | awk '{print $1}'
    } | sha256sum | cut -d' ' -f1
)
if [[ -s $INITRD && -f $OUT/initramfs.stamp && $(cat "$OUT/initramfs.stamp") == "$INIT_STAMP_IN" ]]; then
    say "initramfs: up to date ($INITRD)"
else
    scratch; S=$SCRATCH
    I=$S/initramfs
    mkdir -p "$I"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,ro,rw,newroot,modules}
    busybox_into "$I"
    install -m 755 "$HERE/init" "$I/init"
    cp "$MODDIR"/*.ko "$MODDIR/order" "$I/modules/"
    mknod -m 600 "$I/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$I/dev/null" c 1 3 2>/dev/null || true
    (cd "$I" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet | gzip -6 > "$INITRD.new")
    mv "$INITRD.new" "$INITRD"
    echo "$INIT_STAMP_IN" > "$OUT/initramfs.stamp"
    rm -rf "$I"
    say "initramfs: built $INITRD ($(du -h "$INITRD" | cut -f1))"
fi

# ---------------------------------------------------------------------------------- boot.iso
ISO=$OUT/boot.iso
ISO_STAMP_IN=$( { echo "$APPEND"; sha256sum "$CACHE/vmlinuz" "$INITRD" "$ISOLINUX_BIN" "$LDLINUX" |
                  awk '{print $1}'; } | sha256sum | cut -d' ' -f1 )
if [[ -s $ISO && -f $OUT/iso.stamp && $(cat "$OUT/iso.stamp") == "$ISO_STAMP_IN" ]]; then
    say "boot.iso: up to date ($ISO)"
else
    scratch; S=$SCRATCH
    D=$S/iso
    mkdir -p "$D/isolinux"
    cp "$ISOLINUX_BIN" "$LDLINUX" "$D/isolinux/"
    cp "$CACHE/vmlinuz" "$D/vmlinuz"
    cp "$INITRD" "$D/initrd.gz"
    # isolinux speaks on the serial port too, and boots at once (no prompt, no timeout).
    cat > "$D/isolinux/isolinux.cfg" <<EOF
serial 0 115200
default l1
prompt 0
timeout 0
label l1
  kernel /vmlinuz
  append initrd=/initrd.gz $APPEND
EOF
    xorriso -as mkisofs -quiet -o "$ISO.new" -b isolinux/isolinux.bin -c isolinux/boot.cat \
        -no-emul-boot -boot-load-size 4 -boot-info-table "$D" 2>"$S/xorriso.log" ||
        die "xorriso failed: $(cat "$S/xorriso.log")"
    mv "$ISO.new" "$ISO"
    echo "$ISO_STAMP_IN" > "$OUT/iso.stamp"
    rm -rf "$D"
    say "boot.iso: built $ISO ($(du -h "$ISO" | cut -f1))"
fi

# ---------------------------------------------------------------------------------- root.img
# The KVM rig's root image, padded: the same file system, rebuilt whenever that one is.
IMG=$OUT/root.img
ROOT_STAMP_IN=$(cat "$CACHE/kvm/root.stamp")
if [[ -s $IMG && -f $OUT/root.stamp && $(cat "$OUT/root.stamp") == "$ROOT_STAMP_IN" ]]; then
    say "root.img: up to date ($IMG)"
else
    T=$(date +%s.%N)
    rm -f "$IMG.new"
    cp --sparse=always --reflink=auto "$KVM_ROOT" "$IMG.new"
    size=$(stat -c %s "$IMG.new")
    truncate -s $(( (size + CYLINDER - 1) / CYLINDER * CYLINDER )) "$IMG.new"
    mv "$IMG.new" "$IMG"
    cp "$CACHE/kvm/python-magic" "$OUT/python-magic"
    echo "$ROOT_STAMP_IN" > "$OUT/root.stamp"
    say "root.img: $KVM_ROOT padded to $(( $(stat -c %s "$IMG") / CYLINDER )) cylinders in $(elapsed "$T") s"
fi

say "done in $(elapsed "$T0") s: $OUT/{boot.iso,root.img} (L1 kernel $CACHE/vmlinuz, $KREL)"
echo "$OUT"
