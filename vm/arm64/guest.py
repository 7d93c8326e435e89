"""Launcher for the bundled aarch64 guest (built by vm/arm64/build.sh): Debian's arm64 cloud
kernel with a busybox initramfs under qemu-system-aarch64 (`-M virt -cpu max`, TCG), the same
console, QMP and gdbstub arrangement as vm.guest.Guest, whose methods it shares::

    from vm.arm64.guest import Arm64Guest
    with Arm64Guest() as g:
        spinner = g.start_spinner()          # {"pid": N, "maps": [...]}
        print(g.qmp_path, g.gdb_address, g.pid)

There is no probe binary (no aarch64 compiler here): the guest's own /proc/PID/pagemap, read
with busybox dd and od, is the ground truth for user pages (pagemap()).

CLI: ``python -m vm.arm64.guest`` boots, starts the spinner and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Dict, Iterable, List, Optional

from vm.guest import Guest, GuestError, GuestNotBuilt, default_cache_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_SCRIPT = os.path.join(REPO_ROOT, "vm", "arm64", "build.sh")
CACHE_FILES = ("vmlinuz", "initramfs.cpio.gz", "kernel-release")
QEMU = "qemu-system-aarch64"


def arm64_cache_dir() -> str:
    return os.path.join(default_cache_dir(), "arm64")


class Arm64Guest(Guest):
    def __init__(self, cpu="max", memory="512M", smp=1, machine="virt", **kwargs):
        kwargs.setdefault("cache_dir", arm64_cache_dir())
        kwargs.setdefault("qemu", os.environ.get("QI_QEMU_AARCH64") or QEMU)
        super().__init__(cpu=cpu, memory=memory, smp=smp, **kwargs)
        self.machine = machine

    @classmethod
    def check_built(cls, cache_dir=None) -> None:
        cache = os.path.abspath(cache_dir) if cache_dir else arm64_cache_dir()
        missing = [f for f in CACHE_FILES if not os.path.isfile(os.path.join(cache, f))]
        if missing:
            raise GuestNotBuilt(f"the aarch64 test guest is not built: {', '.join(missing)} "
                                f"missing in {cache}. Run `bash {BUILD_SCRIPT}` first.")

    def _qemu_argv(self, port: int) -> List[str]:
        argv = super()._qemu_argv(port)
        argv[argv.index("-append") + 1] = argv[argv.index("-append") + 1].replace(
            "console=ttyS0", "console=ttyAMA0")
        argv[argv.index("-name") + 1] = "qintrospect-test-guest-arm64"
        at = argv.index("-accel")
        return argv[:at] + ["-M", self.machine] + argv[at:]

    def start_spinner(self, timeout=30) -> dict:
        """A busy user process (busybox sh in a loop) in the background: the vCPU is mostly
        in it, so a stop lands in its address space (TTBR0). {"pid", "maps"}. It runs in a
        session of its own, not as a job of the console's shell: that shell, told of its job's
        end (kill) just before the VM is paused and resumed, was seen to exit."""
        out = self.run("setsid sh -c 'echo $$ >/tmp/spin.pid; while :; do :; done' "
                       "</dev/null >/dev/null 2>&1 & sleep 0.3; echo SPIN=$(cat /tmp/spin.pid)",
                       timeout=timeout)
        m = re.search(r"SPIN=(\d+)", out)
        if not m:
            raise GuestError(f"the spinner did not start:\n{out}")
        pid = int(m.group(1))
        self.probe = {"pid": pid, "maps": self.proc_maps(pid, timeout)}
        return self.probe

    def pagemap(self, pid: int, va: int, timeout=30) -> int:
        """The guest kernel's own /proc/PID/pagemap entry for `va` (bit 63 present, bits
        54:0 the PFN)."""
        out = self.run(f"dd if=/proc/{int(pid)}/pagemap bs=8 skip={va >> 12} count=1 "
                       f"2>/dev/null | od -A n -t x8", timeout=timeout)
        words = out.split()
        if len(words) != 1:
            raise GuestError(f"pagemap of {pid} at {va:#x}: {out!r}")
        return int(words[0], 16)


    def read_user(self, pid: int, va: int, timeout=30) -> int:
        """The 8 bytes at `va` in process `pid`, as the guest kernel reads them
        (/proc/PID/mem), little-endian."""
        out = self.run(f"dd if=/proc/{int(pid)}/mem bs=8 skip={va // 8} count=1 "
                       f"2>/dev/null | od -A n -t x8", timeout=timeout)
        words = out.split()
        if len(words) != 1 or va % 8:
            raise GuestError(f"/proc/{pid}/mem at {va:#x}: {out!r}")
        return int(words[0], 16)

    def user_pids(self, timeout=30) -> List[int]:
        """The guest's processes with an address space of their own (kernel threads have
        none: their /proc/PID/maps is empty)."""
        out = self.run("for p in /proc/[0-9]*; do grep -q . $p/maps 2>/dev/null && "
                       "echo PID=${p#/proc/}; done", timeout=timeout)
        return sorted(int(m) for m in re.findall(r"PID=(\d+)", out))


def main(argv: Optional[Iterable[str]] = None) -> int:
    import argparse
    from vm.guest import hold
    ap = argparse.ArgumentParser(prog="python -m vm.arm64.guest",
                                 description="Boot the aarch64 test guest and wait for Ctrl-C.")
    ap.add_argument("--cpu", default="max")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--interact", action="store_true", help="this terminal as the console")
    args = ap.parse_args(argv)
    with Arm64Guest(cpu=args.cpu, memory=args.memory) as g:
        spin = g.start_spinner()
        print(f"booted in {g.boot_seconds:.1f} s; spinner pid {spin['pid']}")
        print(f"  --qmp {g.qmp_path} --gdb {g.gdb_address}   (QEMU pid {g.pid})")
        hold(g, args.interact, "the aarch64 guest's console")
    return 0


if __name__ == "__main__":
    sys.exit(main())
