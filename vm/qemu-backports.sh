#!/usr/bin/env bash
# Installs (once) a private QEMU 10.x from Debian's bookworm-backports suite beside the system's
# QEMU 7.2, which it never touches, so that the tests can run against both (scripts/test).
#
#   $CACHE/qemu-10/qemu-system-x86_64   the wrapper to use (QI_QEMU=...): sets QEMU_MODULE_DIR
#                                      and execs the real binary (QEMU keeps the wrapper's pid)
#   $CACHE/qemu-10/root/                the packages, dpkg-deb -x'ed (usr/bin, usr/lib, usr/share)
#   $CACHE/qemu-10/VERSIONS             "package version" of each, from the .debs themselves
#   $CACHE/qemu-10/apt/                 the private apt setup: its own sources.list (backports
#                                      only), preferences, lists, dpkg status and cache; the
#                                      system's are never read or written (its apt.conf, e.g.
#                                      a proxy, still applies)
#
# $CACHE is ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}. The packages: qemu-system-x86 with
# qemu-system-common and qemu-system-data, the module packages whose modules it may load
# (qemu-system-gui, qemu-system-modules-opengl, qemu-system-modules-spice: with QEMU_MODULE_DIR
# pointing here, no module is ever taken from the system's 7.2 build), and seabios, which
# backports' qemu-system-x86 depends on in a newer version (>> 1.16.3-1~) than Debian 12's
# 1.16.2. The binary's libraries are checked with ldd against this system (Debian 12): a
# missing one stops the script and is named; a module whose library is missing is only
# reported (QEMU loads such a module only when asked for it: -audiodev pipewire, -display gtk).
#
# Idempotent: once root/ is complete, nothing is fetched again (no network); the wrapper is
# rewritten when it differs, and `wrapper --version` must say 10.x. QI_QEMU10_REFRESH=1 fetches
# again (e.g. after a new backports upload). Prints the wrapper's path last.
set -euo pipefail

CACHE=${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=$CACHE/qemu-10
ROOT=$OUT/root
APT=$OUT/apt
WRAPPER=$OUT/qemu-system-x86_64
SUITE=bookworm-backports
MIRROR=http://deb.debian.org/debian
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui
          qemu-system-modules-opengl qemu-system-modules-spice seabios)
MODDIR=usr/lib/x86_64-linux-gnu/qemu

say() { echo "vm/qemu-backports.sh: $*" >&2; }
die() { echo "vm/qemu-backports.sh: error: $*" >&2; exit 1; }

for tool in apt-get dpkg-deb ldd; do
    command -v "$tool" >/dev/null || die "'$tool' not found (this script wants Debian 12)"
done
[[ $(dpkg --print-architecture) == amd64 ]] || die "only amd64 is supported"
[[ -r $KEYRING ]] || die "$KEYRING not found (apt-get install debian-archive-keyring)"

# ------------------------------------------------------------------------------- fetch
want_stamp=$(printf '%s\n' "$SUITE" "${PACKAGES[@]}")
if [[ -n ${QI_QEMU10_REFRESH:-} || ! -x $ROOT/usr/bin/qemu-system-x86_64 || ! -f $ROOT/.complete \
      || $(cat "$ROOT/.complete") != "$want_stamp" ]]; then
    t0=$(date +%s)
    say "fetching QEMU from $SUITE into $OUT (private apt setup; the system's is untouched)"
    mkdir -p "$APT/etc/sources.list.d" "$APT/etc/preferences.d" "$APT/lists/partial" \
             "$APT/cache/archives/partial" "$OUT"
    echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$APT/etc/sources.list"
    : >"$APT/status"   # an empty dpkg status: the candidates are backports' versions only
    apt_opts=(
        -o "Dir::Etc::SourceList=$APT/etc/sources.list"
        -o "Dir::Etc::SourceParts=$APT/etc/sources.list.d"
        -o "Dir::Etc::Preferences=$APT/etc/preferences"
        -o "Dir::Etc::PreferencesParts=$APT/etc/preferences.d"
        -o "Dir::State=$APT"
        -o "Dir::State::Lists=$APT/lists"
        -o "Dir::State::status=$APT/status"
        -o "Dir::Cache=$APT/cache"
        -o "Dir::Cache::archives=$APT/cache/archives"
        -o "Acquire::Languages=none"
    )
    # As root apt drops to _apt for downloads, which cannot write into a root-owned cache.
    if [[ $(id -u) == 0 ]]; then apt_opts+=(-o "APT::Sandbox::User=root"); fi
    apt-get -qq "${apt_opts[@]}" update >&2 || die "apt-get update of $SUITE failed"
    DEBS=$(mktemp -d "$OUT/.debs.XXXXXX")
    NEW=$(mktemp -d "$OUT/.root.XXXXXX")
    trap 'rm -rf "$DEBS" "$NEW"' EXIT
    (cd "$DEBS" && apt-get -qq "${apt_opts[@]}" download "${PACKAGES[@]/%//$SUITE}" >&2) \
        || die "apt-get download from $SUITE failed (${PACKAGES[*]})"
    : >"$DEBS/VERSIONS"
    for p in "${PACKAGES[@]}"; do
        deb=$(ls "$DEBS"/"${p}"_*.deb 2>/dev/null | head -1)
        [[ -n $deb ]] || die "$p was not downloaded"
        echo "$p $(dpkg-deb -f "$deb" Version)" >>"$DEBS/VERSIONS"
        dpkg-deb -x "$deb" "$NEW"
    done
    # The qemu-* packages must all be of one build (modules refuse another build's binary).
    n=$(grep '^qemu-' "$DEBS/VERSIONS" | awk '{print $2}' | sort -u | wc -l)
    [[ $n == 1 ]] || die "the qemu packages have different versions: $(cat "$DEBS/VERSIONS")"
    [[ -x $NEW/usr/bin/qemu-system-x86_64 ]] || die "no usr/bin/qemu-system-x86_64 in qemu-system-x86"
    [[ -f $NEW/usr/share/seabios/bios-256k.bin ]] || die "no usr/share/seabios/bios-256k.bin in seabios"
    for m in "$NEW/$MODDIR"/*.so; do
        lib=$(ldd "$m" | awk '/not found/ {print $1}' | sort -u)
        [[ -z $lib ]] || say "note: module $(basename "$m") cannot load here ($(echo $lib) missing); QEMU loads it only when asked for it"
    done
    echo "$want_stamp" >"$NEW/.complete"
    rm -rf "$ROOT"
    mv "$NEW" "$ROOT"
    mv "$DEBS/VERSIONS" "$OUT/VERSIONS"
    rm -rf "$DEBS" "$APT/cache/archives"/*.deb
    trap - EXIT
    say "installed in $(( $(date +%s) - t0 )) s: $(tr '\n' ' ' <"$OUT/VERSIONS")"
fi

# ------------------------------------------------------------------------------- check
missing=$(ldd "$ROOT/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}' | sort -u)
[[ -z $missing ]] || die "libraries that $ROOT/usr/bin/qemu-system-x86_64 needs are not on this system: $(echo $missing)"

# ------------------------------------------------------------------------------- wrapper
wrapper_text="#!/bin/sh
# QEMU from Debian's $SUITE ($(awk '$1 == "qemu-system-x86" {print $2}' "$OUT/VERSIONS")), installed privately by
# vm/qemu-backports.sh: its own modules, ROMs and SeaBIOS. exec: QEMU keeps this pid.
R=$(printf %q "$ROOT")
QEMU_MODULE_DIR=\"\$R/$MODDIR\"
export QEMU_MODULE_DIR
exec \"\$R/usr/bin/qemu-system-x86_64\" -L \"\$R/usr/share/qemu\" -L \"\$R/usr/share/seabios\" \"\$@\"
"
if [[ ! -x $WRAPPER || $(cat "$WRAPPER") != "${wrapper_text%$'\n'}" ]]; then
    printf '%s' "$wrapper_text" >"$WRAPPER.tmp"
    chmod 755 "$WRAPPER.tmp"
    mv "$WRAPPER.tmp" "$WRAPPER"
fi
version=$("$WRAPPER" --version | head -1) || die "$WRAPPER --version failed"
[[ $version =~ version\ 10\. ]] || die "$WRAPPER says '$version', not 10.x"
say "$version ($WRAPPER)"
echo "$WRAPPER"
