#!/bin/bash
# Build (once) the KVM rig (vm/kvm/rig.py): L1 = the bundled cloud kernel under TCG -cpu max,
# which loads its own kvm + kvm-amd modules (QEMU's TCG emulates AMD SVM with nested paging)
# and runs L2 with QEMU -accel kvm; qintrospect runs inside L1 against L2.
#
# Cached in ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/kvm/:
#   modules/*.ko, modules/order   from linux-image-KREL's .deb (KREL = $CACHE/kernel-release):
#                                 virtio (pci, blk), overlay, irqbypass, kvm, kvm-amd
#   root.ext4                     L1's root file system, read-only (a tmpfs overlay goes on top):
#                                 Debian 12 packages (python3, python3-numpy, gdb,
#                                 qemu-system-x86 and their dependencies, no recommends) unpacked
#                                 with dpkg-deb -x (no maintainer scripts), docs/man/locales
#                                 dropped, busybox for everything else, pygdbmi and qemu.qmp
#                                 copied from the repo's .venv, bytecode compiled, the
#                                 `qintrospect` command; made with mke2fs -d (no loop device)
#   initramfs.cpio.gz             busybox, the modules, vm/kvm/init as /init: loads the modules,
#                                 mounts root.ext4 + tmpfs overlay and the per-start disk, then
#                                 switch_root
#   python-magic                  the image's importlib MAGIC_NUMBER (hex): the rig precompiles
#                                 the checkout's qintrospect/ for L1 when its own Python matches
# qintrospect itself is NOT in the image: rig.py puts the checkout's qintrospect/, the L2
# images (vmlinuz, initramfs.cpio.gz, oracle.elf) and vm/module/'s .ko files (built here with
# vm/module/build.sh into $CACHE/modules) on a second small ext4 disk at every start.
#
# Idempotent: each part is rebuilt only when the hash of its inputs changes (*.stamp); the root
# image's inputs include the exact package versions apt would pick, so a Debian point release
# rebuilds it. Runs vm/build.sh and vm/oracle/build.sh first (both idempotent).
# Needs: apt-get/apt-cache/dpkg-deb (Debian), busybox-static, cpio, gzip, e2fsprogs (mke2fs),
# and root for the chroot check (skipped, with a warning, otherwise).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM=$(cd "$HERE/.." && pwd)
REPO=$(cd "$VM/.." && pwd)
CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=$CACHE/kvm
mkdir -p "$OUT"
T0=$(date +%s.%N)

say() { echo "vm/kvm/build.sh: $*" >&2; }
die() { echo "vm/kvm/build.sh: error: $*" >&2; exit 1; }
elapsed() { awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $1 }"; }

for tool in busybox cpio gzip dpkg-deb apt-get apt-cache sha256sum mke2fs; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt-get install busybox-static cpio e2fsprogs)"
done
# shellcheck source=../busybox.sh
source "$VM/busybox.sh"

# The packages of L1's root (apt resolves their dependencies, without recommends).
PACKAGES="python3 python3-numpy gdb qemu-system-x86"
# Python packages qintrospect needs that Debian 12 does not ship, copied from the .venv.
PYPKGS="pygdbmi qemu.qmp"
# Modules, in load order (each after what it depends on; checked against the .ko's depends=).
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk overlay irqbypass kvm kvm-amd"

# ---------------------------------------------------------------------------------- inputs
if [[ ! -s $CACHE/vmlinuz || ! -s $CACHE/initramfs.cpio.gz || ! -s $CACHE/kernel-release ]]; then
    say "the bundled guest is not built: running vm/build.sh"
    bash "$VM/build.sh" >&2 || die "vm/build.sh failed"
fi
KREL=$(cat "$CACHE/kernel-release")
# Our kernel modules for that release (idempotent): rig.py puts them on L1's per-start disk at
# /qi/modules (slat_dump.ko walks L2's NPT inside L1).
bash "$VM/module/build.sh" "$KREL" "$CACHE/modules" >&2 || die "vm/module/build.sh failed"
ORACLE=$(bash "$VM/oracle/build.sh" "$CACHE/oracle" | tail -1) || die "vm/oracle/build.sh failed"
[[ -s $ORACLE ]] || die "vm/oracle/build.sh did not produce oracle.elf"

rm -rf "$OUT"/.build.*   # left by a killed run
SCRATCH=
cleanup() { [[ -n $SCRATCH ]] && rm -rf "$SCRATCH"; return 0; }
trap cleanup EXIT
# One scratch folder for the whole run (call `scratch` in this shell, not in $(...)): S=$SCRATCH.
scratch() {
    if [[ -z $SCRATCH ]]; then
        SCRATCH=$(mktemp -d "$OUT/.build.XXXXXX")
        chmod 755 "$SCRATCH"   # lets apt's _apt user write there (no "unsandboxed" warning)
    fi
}

# ---------------------------------------------------------------------------------- modules
MODDIR=$OUT/modules
MOD_STAMP_IN=$(echo "$KREL $MODULES" | sha256sum | cut -d' ' -f1)
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
        # Every dependency (the .modinfo "depends=" string) must come earlier in MODULES.
        deps=$( (tr '\0' '\n' < "$f" || true) | grep -a -m1 '^depends=' | cut -d= -f2 | tr ',' ' ' || true)
        for d in $deps; do
            [[ $loaded == *" ${d//_/-} "* || $loaded == *" ${d//-/_} "* ]] ||
                die "module $m depends on $d, which is not loaded before it (MODULES in vm/kvm/build.sh)"
        done
        loaded+="$m "
        cp "$f" "$MODDIR.new/$m.ko"
    done
    echo "$MODULES" | tr ' ' '\n' > "$MODDIR.new/order"
    echo "$KREL" > "$MODDIR.new/kernel-release"
    echo "$MOD_STAMP_IN" > "$MODDIR.new/stamp"
    rm -rf "$MODDIR" && mv "$MODDIR.new" "$MODDIR"
    rm -rf "$S/k" "$DEB"
    say "modules: $(ls "$MODDIR"/*.ko | wc -l) from linux-image-$KREL in $(elapsed "$T") s"
fi

# ---------------------------------------------------------------------------------- root image
# apt resolves the package set as if on an empty system (its own status file), so the result
# does not depend on what this machine has installed. That takes apt a few seconds, so it is
# skipped while apt's package lists, this script, busybox and the .venv's packages are unchanged.
APTDIR=$OUT/apt
mkdir -p "$APTDIR"
[[ -f $APTDIR/status ]] || : > "$APTDIR/status"
APT_OPTS=(-o "Dir::State::status=$APTDIR/status" -o "Dir::Cache::pkgcache="
          -o "Dir::Cache::srcpkgcache=" -o APT::Install-Recommends=false
          -o APT::Install-Suggests=false -o Debug::NoLocking=1)
resolve() {
    # shellcheck disable=SC2086
    apt-get -s -q "${APT_OPTS[@]}" install $PACKAGES 2>/dev/null | awk '/^Inst /{ print $2, $3 }' | tr -d '('
}
SITE=$(ls -d "$REPO"/.venv/lib/python3*/site-packages 2>/dev/null | head -1 || true)
PYDIST=
if [[ -n $SITE ]]; then
    PYDIST=$(cd "$SITE" && ls -d pygdbmi-*.dist-info qemu_qmp-*.dist-info 2>/dev/null | sort | tr '\n' ' ' || true)
fi
OWN_INPUTS=$( { echo "$PACKAGES pydist $PYDIST"
                sha256sum "${BASH_SOURCE[0]}" "$BUSYBOX" "$VM/busybox.sh" | awk '{print $1}'; } |
              sha256sum | cut -d' ' -f1 )
QUICK=$( { echo "$OWN_INPUTS"
           ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null | grep -e '_Packages' -e 'Release' || true; } |
         sha256sum | cut -d' ' -f1 )
IMG=$OUT/root.ext4
SET= ROOT_STAMP_IN=
if [[ -s $IMG && -f $OUT/root.quick && $(cat "$OUT/root.quick") == "$QUICK" ]]; then
    UP_TO_DATE=1
else
    SET=$(resolve || true)
    if [[ -z $SET ]]; then
        say "root: apt cannot resolve '$PACKAGES'; running apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        SET=$(resolve) || true
        [[ -n $SET ]] || die "apt-get cannot resolve $PACKAGES"
    fi
    ROOT_STAMP_IN=$(printf '%s\n%s\n' "$SET" "$OWN_INPUTS" | sha256sum | cut -d' ' -f1)
    UP_TO_DATE=0
    if [[ -s $IMG && -f $OUT/root.stamp && $(cat "$OUT/root.stamp") == "$ROOT_STAMP_IN" ]]; then
        UP_TO_DATE=1
        echo "$QUICK" > "$OUT/root.quick"
    fi
fi
if [[ $UP_TO_DATE == 1 ]]; then
    say "root: up to date ($IMG, $(wc -l < "$OUT/packages.txt") packages)"
else
    T=$(date +%s.%N)
    scratch; S=$SCRATCH
    download() {
        rm -rf "$S/debs" && mkdir -p "$S/debs/partial"
        # shellcheck disable=SC2086
        apt-get install -y -q --download-only "${APT_OPTS[@]}" -o "Dir::Cache::archives=$S/debs" \
            $PACKAGES 2>&1 | grep -E '^(Fetched|E:|W:)' | grep -v unsandboxed >&2 || true
        n=$(ls "$S"/debs/*.deb 2>/dev/null | wc -l)
        [[ $n -eq $(echo "$SET" | wc -l) ]]
    }
    say "root: downloading $(echo "$SET" | wc -l) packages ($PACKAGES and their dependencies)"
    if ! download; then
        say "root: downloaded $n .debs, expected $(echo "$SET" | wc -l); running apt-get update and retrying"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        SET=$(resolve) || true
        [[ -n $SET ]] || die "apt-get cannot resolve $PACKAGES"
        ROOT_STAMP_IN=$(printf '%s\n%s\n' "$SET" "$OWN_INPUTS" | sha256sum | cut -d' ' -f1)
        download || die "downloaded $n .debs, expected $(echo "$SET" | wc -l)"
    fi
    say "root: downloaded $n .debs ($(du -sh "$S/debs" | cut -f1)) in $(elapsed "$T") s; unpacking"
    R=$S/root
    mkdir -p "$R"
    # dpkg-deb -x each package, two at a time (no maintainer scripts run: none is needed here).
    ls "$S"/debs/*.deb | xargs -P 2 -I{} dpkg-deb -x {} "$R"
    # Debian 12's merged /usr: /bin, /sbin, /lib, /lib64 become links into /usr.
    for d in bin sbin lib lib64; do
        if [[ -d $R/$d && ! -L $R/$d ]]; then
            mkdir -p "$R/usr/$d"
            cp -a "$R/$d/." "$R/usr/$d/"
            rm -rf "${R:?}/$d"
        fi
        mkdir -p "$R/usr/$d"
        ln -sfn "usr/$d" "$R/$d"
    done
    # What L1 never needs: documentation, manuals, translations, headers, package state,
    # perl (pulled in by adduser/debconf), QEMU's other binaries, Python's own test suites.
    rm -rf "$R"/usr/share/{doc,doc-base,man,info,locale,lintian,bug,gtk-doc,perl,perl5,iso-codes,menu} \
        "$R"/usr/share/xml/iso-codes "$R"/usr/include "$R"/usr/lib/x86_64-linux-gnu/perl* \
        "$R"/usr/lib/x86_64-linux-gnu/perl5 "$R"/usr/bin/perl* \
        "$R"/usr/bin/qemu-system-x86_64-microvm "$R"/usr/bin/qemu-storage-daemon "$R"/usr/bin/qemu-pr-helper \
        "$R"/usr/lib/python3.11/test "$R"/usr/lib/python3.11/idlelib "$R"/usr/lib/python3.11/lib2to3/tests \
        "$R"/var/cache/* "$R"/var/lib/dpkg
    find "$R/usr/lib/python3/dist-packages/numpy" -depth -type d -name tests -exec rm -rf {} +
    # The BLAS/LAPACK that numpy links (libblas.so.3, liblapack.so.3) are update-alternatives
    # links that only a maintainer script would make.
    for lib in blas/libblas.so.3 lapack/liblapack.so.3; do
        if [[ -e $R/usr/lib/x86_64-linux-gnu/$lib && ! -e $R/usr/lib/x86_64-linux-gnu/${lib#*/} ]]; then
            ln -s "$lib" "$R/usr/lib/x86_64-linux-gnu/${lib#*/}"
        fi
    done
    # busybox for every command the packages do not bring (sh, ls, mount, insmod, ...).
    busybox_into "$R"
    # Python packages Debian 12 does not have.
    PYDEST=$R/usr/local/lib/python3.11/dist-packages
    mkdir -p "$PYDEST"
    if [[ -n $SITE && -n $PYDIST ]]; then
        for p in pygdbmi qemu; do
            [[ -d $SITE/$p ]] || die "$SITE/$p missing (scripts/setup installs the .venv)"
            cp -a "$SITE/$p" "$PYDEST/"
        done
        cp -a "$SITE"/pygdbmi-*.dist-info "$SITE"/qemu_qmp-*.dist-info "$PYDEST/"
    else
        say "root: no .venv in $REPO: installing $PYPKGS from PyPI"
        # shellcheck disable=SC2086
        python3 -m pip install -q --no-deps --no-compile --target "$PYDEST" $PYPKGS >&2 ||
            die "pip could not install $PYPKGS (run scripts/setup first)"
    fi
    find "$PYDEST" -name __pycache__ -prune -exec rm -rf {} +
    # The command a user types: the checkout's qintrospect/ is on the per-start disk at /qi/src.
    mkdir -p "$R/usr/local/bin" "$R/qi" "$R/root" "$R/tmp" "$R/run" "$R/dev" "$R/proc" "$R/sys" "$R/mnt"
    cat > "$R/usr/local/bin/qintrospect" <<'EOF'
#!/bin/sh
# qintrospect from the rig's per-start disk (the checkout's qintrospect/, mounted at /qi).
export PYTHONPATH=/qi/src${PYTHONPATH:+:$PYTHONPATH}
exec python3 -m qintrospect "$@"
EOF
    chmod 755 "$R/usr/local/bin/qintrospect"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
    printf 'root:x:0:\nkvm:x:104:\n' > "$R/etc/group"
    echo qi-l1 > "$R/etc/hostname"
    ldconfig -r "$R" 2>/dev/null || /sbin/ldconfig -r "$R" || say "root: warning: ldconfig -r failed"

    # Check the image's own programs in a chroot (root only), and compile Python's bytecode
    # there with the image's Python, so that L1 (under TCG) does not compile it at every run.
    if [[ $(id -u) == 0 ]] && command -v chroot >/dev/null; then
        mknod -m 666 "$R/dev/null" c 1 3; mknod -m 666 "$R/dev/urandom" c 1 9; mknod -m 666 "$R/dev/zero" c 1 5
        TC=$(date +%s.%N)
        # Two single-process runs side by side (compileall -j needs /dev/shm for its semaphores).
        chroot "$R" /usr/bin/python3 -m compileall -q /usr/lib/python3.11 >"$S/compileall1.log" 2>&1 &
        cpid=$!
        chroot "$R" /usr/bin/python3 -m compileall -q /usr/lib/python3/dist-packages \
            /usr/local/lib/python3.11/dist-packages >"$S/compileall2.log" 2>&1 || true
        wait "$cpid" || true
        grep -h -e Error "$S"/compileall?.log | head -5 >&2 || true
        say "root: bytecode compiled in $(elapsed "$TC") s"
        chroot "$R" /usr/bin/python3 -c 'import importlib.util, numpy, pygdbmi, qemu.qmp; print("python", __import__("sys").version.split()[0], "numpy", numpy.__version__, "magic", importlib.util.MAGIC_NUMBER.hex())' \
            > "$S/py.txt" 2>&1 || die "python3 in the image fails: $(cat "$S/py.txt")"
        say "root: chroot check: $(cat "$S/py.txt")"
        awk '{ print $NF }' "$S/py.txt" > "$S/python-magic"
        chroot "$R" /usr/bin/gdb -nx -batch -ex 'python import sys; print("gdb python", sys.version.split()[0])' \
            > "$S/gdb.txt" 2>&1 || die "gdb in the image fails: $(cat "$S/gdb.txt")"
        say "root: chroot check: $(tail -1 "$S/gdb.txt")"
        # The image's QEMU boots the oracle (TCG here: KVM only inside L1).
        cp "$ORACLE" "$R/tmp/oracle.elf"
        timeout 60 chroot "$R" /usr/bin/qemu-system-x86_64 -nodefaults -no-user-config -display none \
            -no-reboot -accel tcg -m 64M -cpu qemu64,+pdpe1gb -kernel /tmp/oracle.elf -append mode=4level \
            -serial file:/tmp/check.txt -monitor none </dev/null >"$S/qemu-check.log" 2>&1 &
        pid=$!
        out=
        for _ in $(seq 600); do
            out=$(grep -m1 -e 'ORACLE READY' -e 'ORACLE ERROR' "$R/tmp/check.txt" 2>/dev/null || true)
            [[ -n $out ]] && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        [[ $out == *"ORACLE READY"* ]] ||
            die "the image's QEMU did not boot the oracle in a chroot: ${out:-$(cat "$S/qemu-check.log")}"
        say "root: chroot check: $("$R/usr/bin/qemu-system-x86_64" -version 2>/dev/null | head -1 || echo qemu): $out"
        rm -f "$R/tmp/oracle.elf" "$R/tmp/check.txt" "$R"/dev/{null,urandom,zero}
    else
        say "root: warning: not root: no chroot check, no precompiled bytecode (L1's Python will be slower)"
        : > "$S/python-magic"
    fi

    # mke2fs -d: an ext4 image from the folder, no loop device, no root needed. No journal
    # (mounted read-only), inodes for every file, 15 % + 32 MiB of slack.
    files=$(find "$R" | wc -l)
    kib=$(du -sk "$R" | cut -f1)
    size=$(( (kib * 115 / 100 + 32768) / 1024 ))M
    rm -f "$IMG.new"
    mke2fs -q -t ext4 -O ^has_journal -m 0 -N $((files + 4096)) -L qi-kvm-root -E root_owner=0:0 \
        -d "$R" "$IMG.new" "$size" >/dev/null || die "mke2fs -d failed"
    mv "$IMG.new" "$IMG"
    mv "$S/python-magic" "$OUT/python-magic"
    echo "$SET" > "$OUT/packages.txt"
    echo "$ROOT_STAMP_IN" > "$OUT/root.stamp"
    QUICK=$( { echo "$OWN_INPUTS"
               ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null | grep -e '_Packages' -e 'Release' || true; } |
             sha256sum | cut -d' ' -f1 )   # apt-get update may have run above
    echo "$QUICK" > "$OUT/root.quick"
    rm -rf "$R" "$S/debs"
    say "root: built $IMG ($size, $(du -sh "$IMG" | cut -f1) on disk, $files files, $n packages) in $(elapsed "$T") s"
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

say "done in $(elapsed "$T0") s: $OUT/{root.ext4,initramfs.cpio.gz} (L1 kernel $CACHE/vmlinuz, $KREL)"
echo "$OUT"
