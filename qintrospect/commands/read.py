"""read: guest memory, virtual (walked with the vCPU's or a given root) or physical, in pieces
that end at page boundaries: each piece read, or saying why not (unmapped, not RAM). MMIO is
never read."""

from __future__ import annotations

from typing import Optional

from .. import paging
from ..errors import MemoryReadError
from ..record import record

PAGE = 4096


def _hex(v):
    return None if v is None else f"{v:#x}"


@record
class MemoryPiece:
    """Up to one page of a `read`: the bytes, or why there are none."""
    address: int
    length: int
    gpa: Optional[int]          # for virtual reads
    data: Optional[bytes]
    note: str = ""

    def to_dict(self) -> dict:
        return {"address": _hex(self.address), "length": self.length, "gpa": _hex(self.gpa),
                "data": self.data.hex() if self.data is not None else None,
                "note": self.note or None}


def read_pieces(vm, address: int, length: int, physical: bool = False,
                cr3: Optional[int] = None):
    """MemoryPieces of [address, address + length), lazily."""
    from .translate import physical as walk_to
    vm.check_open()
    memory = vm.cached_memory()
    cpu = vm.cpu_state(cr3)
    if not physical:
        paging.require_walkable(cpu)
    end = address + length
    while address < end:
        n = min(end - address, PAGE - address % PAGE)
        gpa, note = address, ""
        if not physical:
            gpa, why = walk_to(vm, cpu, address, memory)
            if gpa is None:
                note = f"unmapped: {why}"
        data = None
        if gpa is not None:
            try:
                data = memory.read(gpa, n)
            except MemoryReadError as exc:
                note = str(exc)
        yield MemoryPiece(address, n, None if physical else gpa, data, note)
        address += n
