# Sourced by vm/arm64/build.sh and vm/riscv64/build.sh: the busybox initramfs of a guest of
# another architecture (its static busybox, its /init), written to $CACHE/initramfs.cpio.gz.
# pack_initramfs BUSYBOX INIT WORKDIR
pack_initramfs() {
    local bb=$1 init=$2 root=$3/root a applets
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
    cp "$bb" "$root/bin/busybox"
    # applet links: the host's busybox-static lists them; without it, the few init uses
    applets=$( (busybox --list-full 2>/dev/null) || printf '%s\n' bin/sh bin/mount bin/mkdir bin/cat bin/dd bin/od bin/sleep bin/setsid bin/stty bin/dmesg bin/echo bin/grep)
    for a in $applets; do
        [[ -e $root/$a || -L $root/$a ]] && continue
        mkdir -p "$root/$(dirname "$a")"; ln -s /bin/busybox "$root/$a"
    done
    install -m 755 "$init" "$root/init"
    mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true
    (cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet | gzip -6 > "$CACHE/initramfs.cpio.gz.new")
    mv "$CACHE/initramfs.cpio.gz.new" "$CACHE/initramfs.cpio.gz"
}
