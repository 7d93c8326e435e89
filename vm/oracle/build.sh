#!/bin/sh
# Build the oracle guest (multiboot v1, ELF32) with the system's gcc and binutils.
#   vm/oracle/build.sh [OUTDIR]
# Default OUTDIR: ${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/oracle. Prints the path of
# oracle.elf. Rebuilds only when a source file is newer than the output.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-${QI_VM_CACHE:-$HOME/.cache/qintrospect/vm}/oracle}
CC=${CC:-gcc}
mkdir -p "$OUT"
ELF="$OUT/oracle.elf"

stale=0
[ -f "$ELF" ] || stale=1
for f in "$HERE/boot.S" "$HERE/oracle.c" "$HERE/link.ld" "$HERE/build.sh"; do
    [ "$f" -nt "$ELF" ] && stale=1
done
if [ "$stale" = 0 ]; then
    echo "$ELF"
    exit 0
fi

CFLAGS="-m32 -march=i686 -ffreestanding -nostdlib -fno-pic -fno-pie -fno-stack-protector
        -fcf-protection=none -fno-asynchronous-unwind-tables -mno-sse -mno-mmx -mno-80387
        -mgeneral-regs-only -O2 -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers"
TMP=$(mktemp -d "$OUT/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# shellcheck disable=SC2086
$CC $CFLAGS -c "$HERE/boot.S" -o "$TMP/boot.o"
# shellcheck disable=SC2086
$CC $CFLAGS -c "$HERE/oracle.c" -o "$TMP/oracle.o"
${LD:-ld} -m elf_i386 -nostdlib -static --build-id=none -z noexecstack -z max-page-size=0x1000 --no-warn-rwx-segments \
    -T "$HERE/link.ld" -o "$TMP/oracle.elf" "$TMP/boot.o" "$TMP/oracle.o"
mv "$TMP/oracle.elf" "$ELF"
echo "$ELF"
