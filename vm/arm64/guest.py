"""Launcher for the bundled aarch64 guest (built by vm/arm64/build.sh): Debian's arm64 cloud
kernel with a busybox initramfs under qemu-system-aarch64 (`-M virt -cpu max`, TCG)::

    from vm.arm64.guest import Arm64Guest
    with Arm64Guest() as g:
        spinner = g.start_spinner()          # {"pid": N, "maps": [...]}
        print(g.qmp_path, g.gdb_address, g.pid)

What it shares with the riscv64 guest (the spinner, pagemap(), read_user(), user_pids()) is in
vm/foreign_guest.py. CLI: ``python -m vm.arm64.guest`` boots, starts the spinner and waits
for Ctrl-C.
"""

from __future__ import annotations

import sys

from vm.foreign_guest import ForeignGuest


class Arm64Guest(ForeignGuest):
    ARCH = "arm64"
    QEMU = "qemu-system-aarch64"
    QEMU_ENV = "QI_QEMU_AARCH64"
    CONSOLE = "ttyAMA0"
    CPU = "max"


if __name__ == "__main__":
    sys.exit(Arm64Guest.main())
