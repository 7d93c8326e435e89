"""The guest-physical address space as QEMU lays it out: which ranges are RAM (safe to read, each
in a RAM block at a host virtual address in the QEMU process) and which are devices (never
read). From `info mtree -f` (the "memory" address space) plus one `gpa2hva` per RAM region:
QEMU 7.2 prints no host addresses in `info ramblock` (FACTS.md)."""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional

from ..connect.qmp import QmpCommandError
from ..errors import MemoryReadError, ParseError
from ..record import record
from .monitor_text import Region, parse_gpa2hva, parse_mtree_flat



@record(frozen=True)
class RamRegion:
    """A RAM-backed piece of the guest's physical address space and where QEMU keeps it."""
    start: int
    end: int             # inclusive
    kind: str            # "ram" or "rom" ("rom" regions are read-only views of RAM blocks)
    block: str           # RAM block name (pc.ram, pc.bios, vga.vram, ...)
    block_offset: int    # offset of `start` inside the block
    hva: Optional[int]   # host virtual address of `start` in the QEMU process

    def hva_of(self, gpa: int) -> Optional[int]:
        return None if self.hva is None else self.hva + (gpa - self.start)


# Guest-physical ranges whose backing the guest itself switches through its chipset: SMRAM
# (VGA or RAM at 0xa0000-0xbffff) and PAM (RAM or the BIOS ROM at 0xc0000-0xfffff).
SWITCHED = (0xA0000, 0x100000)


class RamMap:
    """Which guest-physical ranges are RAM (safe to read) and which are devices (never read).

    A map kept across commands (a shell) sets `before_switched`: called once, then cleared,
    before the first look-up of a GPA in SWITCHED, to read the map again (replace_with)."""

    def __init__(self, regions: List[Region], hvas: Dict[int, int]):
        self.regions = sorted(regions, key=lambda r: r.start)
        self._starts = [r.start for r in self.regions]
        self.ram = [RamRegion(r.start, r.end, r.kind, r.name, r.offset, hvas.get(r.start))
                    for r in self.regions if r.is_ram]
        self._ram_starts = [r.start for r in self.ram]
        self.before_switched = None

    def replace_with(self, other: "RamMap") -> bool:
        """Take `other`'s regions (a map read again) in place, so that every holder of this
        map sees them; whether anything changed."""
        changed = (other.regions, other.ram) != (self.regions, self.ram)
        self.regions, self._starts = other.regions, other._starts
        self.ram, self._ram_starts = other.ram, other._ram_starts
        return changed

    def _look(self, gpa: int) -> None:
        if self.before_switched is not None and SWITCHED[0] <= gpa < SWITCHED[1]:
            hook, self.before_switched = self.before_switched, None
            hook()

    @classmethod
    def from_qmp(cls, qmp) -> "RamMap":
        regions = parse_mtree_flat(qmp.hmp("info mtree -f"))
        hvas = {}
        for region in regions:
            if region.is_ram:
                try:
                    _, _, hva = parse_gpa2hva(qmp.hmp(f"gpa2hva {region.start:#x}"))
                    hvas[region.start] = hva
                except (ParseError, QmpCommandError):
                    pass  # a RAM region QEMU cannot resolve: readable through gdb, no HVA
        return cls(regions, hvas)

    def ram_at(self, gpa: int) -> Optional[RamRegion]:
        if self.before_switched is not None:
            self._look(gpa)
        i = bisect.bisect_right(self._ram_starts, gpa) - 1
        if i >= 0 and self.ram[i].start <= gpa <= self.ram[i].end:
            return self.ram[i]
        return None

    def region_at(self, gpa: int) -> Optional[Region]:
        """The topmost region at gpa (the flat view has no overlaps)."""
        if self.before_switched is not None:
            self._look(gpa)
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and self.regions[i].start <= gpa <= self.regions[i].end:
            return self.regions[i]
        return None

    def describe(self, gpa: int) -> str:
        region = self.region_at(gpa)
        if region is None:
            return f"{gpa:#x} is unassigned guest-physical space (no RAM or device there)"
        return (f"{gpa:#x} is in device region {region.name!r} ({region.kind}, "
                f"{region.start:#x}-{region.end:#x}), not RAM")

    def check_readable(self, gpa: int, length: int) -> RamRegion:
        """The RAM region holding [gpa, gpa+length), or MemoryReadError: MMIO is never read."""
        if gpa < 0 or length <= 0 or gpa + length - 1 > 0xFFFFFFFFFFFFFFFF:
            raise MemoryReadError(f"bad physical range {gpa:#x}+{length}", gpa)
        region = self.ram_at(gpa)
        if region is None:
            raise MemoryReadError(self.describe(gpa), gpa)
        if gpa + length - 1 > region.end:
            nxt = self.ram_at(region.end + 1)
            if nxt is None or nxt.block != region.block:
                raise MemoryReadError(f"{gpa:#x}+{length} runs past the end of RAM region "
                                      f"{region.block!r} at {region.end:#x}", gpa)
        return region

    @property
    def ram_bytes(self) -> int:
        return sum(r.end - r.start + 1 for r in self.ram if r.kind == "ram")
