# Sourced by vm/build.sh and vm/nested/build.sh: the static busybox both initramfs images carry.
# Needs die() from the sourcing script.

BUSYBOX=$(command -v busybox)
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked: install busybox-static"
fi

# busybox_into ROOT: /bin/busybox and a symlink per applet (--list-full prints e.g. usr/bin/awk)
busybox_into() {
    local root=$1 applet
    cp "$BUSYBOX" "$root/bin/busybox"
    "$BUSYBOX" --list-full | while read -r applet; do
        [[ -z $applet || -e $root/$applet || -L $root/$applet ]] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -s /bin/busybox "$root/$applet"
    done
}
