"""Launcher for the riscv64 test guest (built by vm/riscv64/build.sh): Debian 13's riscv64
kernel with a busybox initramfs under qemu-system-riscv64 (`-M virt`, TCG, the OpenSBI QEMU
ships as its firmware)::

    from vm.riscv64.guest import Riscv64Guest
    with Riscv64Guest() as g:
        spinner = g.start_spinner()          # {"pid": N, "maps": [...]}

What it shares with the aarch64 guest is in vm/foreign_guest.py. CLI: ``python -m
vm.riscv64.guest`` boots, starts the spinner and waits for Ctrl-C.
"""

from __future__ import annotations

import sys

from vm.foreign_guest import ForeignGuest


class Riscv64Guest(ForeignGuest):
    ARCH = "riscv64"
    QEMU = "qemu-system-riscv64"
    QEMU_ENV = "QI_QEMU_RISCV64"
    CONSOLE = "ttyS0"
    CPU = "rv64"


if __name__ == "__main__":
    sys.exit(Riscv64Guest.main())
