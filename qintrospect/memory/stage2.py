"""A guest's own physical memory, read through its hypervisor's stage 2: the layer a stage 1
walk of an aarch64 vCPU that runs a KVM guest reads its tables through (the guest's TTBRs hold
intermediate physical addresses, IPAs). Stacked on the attached machine's physical memory
(memory.guest), as each stage of the CPU's own translation stacks on the one below.

A page whose stage 2 walk faults is a MemoryReadError naming the fault: the access that needs
it is a stage 2 fault on the stage 1 walk (the CPU reports it to EL2, not to the guest)."""

from __future__ import annotations

from typing import Dict

from ..errors import MemoryReadError

PAGE = 4096


class Stage2Memory:
    """read(ipa, length) through the stage 2 of `regs` (machine.arm64.Stage2Regs) over
    `memory` (the attached machine's physical memory). Each 4 KiB page's walk is kept for
    the life of this layer (one translation: the VM is held still meanwhile)."""

    def __init__(self, memory, regs):
        self.memory = memory
        self.regs = regs
        self.name = memory.name
        self._pages: Dict[int, int] = {}

    def physical(self, ipa: int) -> int:
        """The physical address of `ipa`; MemoryReadError when its stage 2 walk faults."""
        page = ipa & ~(PAGE - 1)
        pa = self._pages.get(page)
        if pa is None:
            w = self.regs.walk(self.memory.read, page)
            if not w.ok:
                f = w.fault
                raise MemoryReadError(f"IPA {ipa:#x} has no stage 2 translation ({f.reason} "
                                      f"fault at {f.level}: a stage 2 fault on the stage 1 "
                                      f"walk)", ipa)
            pa = self._pages[page] = w.pa
        return pa | ipa & (PAGE - 1)

    def read(self, ipa: int, length: int) -> bytes:
        out = b""
        while length > 0:
            n = min(length, PAGE - ipa % PAGE)
            out += self.memory.read(self.physical(ipa), n)
            ipa, length = ipa + n, length - n
        return out
