"""Launchers for the guests of other architectures (vm/arm64, vm/riscv64): a Debian kernel
and a busybox initramfs under qemu-system-<arch> (`-M virt`, TCG), with the same console, QMP
and gdbstub arrangement as vm.guest.Guest, whose methods they share. There is no probe binary
(no cross compiler here): the guest's own /proc/PID/pagemap and /proc/PID/mem, read with
busybox dd and od, are the ground truth for user pages.

A subclass names its architecture (ARCH: its folder under vm/ and its cache), QEMU binary
(QEMU, and QEMU_ENV: the variable that overrides it), console device, default CPU and extra
QEMU options.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable, List, Optional, Sequence

from vm.guest import Guest, GuestError, GuestNotBuilt, default_cache_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_FILES = ("vmlinuz", "initramfs.cpio.gz", "kernel-release")


class ForeignGuest(Guest):
    ARCH = ""                   # the folder under vm/ (build.sh, init) and the cache's name
    QEMU = ""
    QEMU_ENV = ""
    CONSOLE = "ttyS0"
    CPU = "max"
    OPTIONS: Sequence[str] = ()     # e.g. -bios default

    def __init__(self, cpu=None, memory="512M", smp=1, machine="virt", **kwargs):
        kwargs.setdefault("cache_dir", self.cache_path())
        kwargs.setdefault("qemu", os.environ.get(self.QEMU_ENV) or self.QEMU)
        super().__init__(cpu=cpu or self.CPU, memory=memory, smp=smp, **kwargs)
        self.machine = machine

    @classmethod
    def cache_path(cls) -> str:
        return os.path.join(default_cache_dir(), cls.ARCH)

    @classmethod
    def build_script(cls) -> str:
        return os.path.join(REPO_ROOT, "vm", cls.ARCH, "build.sh")

    @classmethod
    def check_built(cls, cache_dir=None) -> None:
        cache = os.path.abspath(cache_dir) if cache_dir else cls.cache_path()
        missing = [f for f in CACHE_FILES if not os.path.isfile(os.path.join(cache, f))]
        if missing:
            raise GuestNotBuilt(f"the {cls.ARCH} test guest is not built: {', '.join(missing)} "
                                f"missing in {cache}. Run `bash {cls.build_script()}` first.")

    def _qemu_argv(self, port: int) -> List[str]:
        argv = super()._qemu_argv(port)
        argv[argv.index("-append") + 1] = argv[argv.index("-append") + 1].replace(
            "console=ttyS0", f"console={self.CONSOLE}")
        argv[argv.index("-name") + 1] = f"qintrospect-test-guest-{self.ARCH}"
        at = argv.index("-accel")
        return argv[:at] + ["-M", self.machine, *self.OPTIONS] + argv[at:]

    def start_spinner(self, timeout=30) -> dict:
        """A busy user process (busybox sh in a loop) in the background: the vCPU is mostly
        in it, so a stop lands in its address space. {"pid", "maps"}. It runs in a session of
        its own, not as a job of the console's shell: that shell, told of its job's end (kill)
        just before the VM is paused and resumed, was seen to exit."""
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

    def stack_word(self, pid: int, timeout=30):
        """(va, its 8 bytes) near the top of the process's stack: its argv and environment,
        placed by ASLR, so no other process holds the same bytes at the same address."""
        (line,) = [m for m in self.proc_maps(pid, timeout) if m.endswith("[stack]")]
        va = int(line.split("-")[1].split()[0], 16) - 0x40
        return va, self.read_user(pid, va, timeout)

    def user_pids(self, timeout=30) -> List[int]:
        """The guest's processes with an address space of their own (kernel threads have
        none: their /proc/PID/maps is empty)."""
        out = self.run("for p in /proc/[0-9]*; do grep -q . $p/maps 2>/dev/null && "
                       "echo PID=${p#/proc/}; done", timeout=timeout)
        return sorted(int(m) for m in re.findall(r"PID=(\d+)", out))

    @classmethod
    def main(cls, argv: Optional[Iterable[str]] = None) -> int:
        """`python -m vm.<arch>.guest`: boot, start the spinner, wait for Ctrl-C."""
        import argparse
        from vm.guest import hold
        ap = argparse.ArgumentParser(prog=f"python -m vm.{cls.ARCH}.guest",
                                     description=f"Boot the {cls.ARCH} test guest and wait "
                                                 "for Ctrl-C.")
        ap.add_argument("--cpu", default=cls.CPU)
        ap.add_argument("--memory", default="512M")
        ap.add_argument("--interact", action="store_true", help="this terminal as the console")
        args = ap.parse_args(argv)
        with cls(cpu=args.cpu, memory=args.memory) as g:
            spin = g.start_spinner()
            print(f"booted in {g.boot_seconds:.1f} s; spinner pid {spin['pid']}")
            print(f"  --qmp {g.qmp_path} --gdb {g.gdb_address}   (QEMU pid {g.pid})")
            hold(g, args.interact, f"the {cls.ARCH} guest's console")
        return 0

