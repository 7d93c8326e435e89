"""Pure x86 page-table walkers over a `read_phys(addr, length) -> bytes` function.

Nothing here knows about QEMU, sockets or files: the same code walks a guest's page tables,
EPT/NPT tables, or tables a test built in a bytearray. A walk never raises for what it finds in
memory (not-present, reserved bits, unreadable tables): it returns a Walk whose `fault` says so.
"""

from .model import (
    EPT_ACCESS_KINDS, X86_ACCESS_KINDS, AccessResult, CpuState, Fault, LevelSpec, LevelStep,
    Mapping, PagingMode, ReadPhys, Walk,
)
from .x86 import iter_mappings, paging_mode, walk
from .ept import decode_eptp, walk_ept, walk_npt

__all__ = [
    "ReadPhys", "CpuState", "LevelSpec", "PagingMode", "LevelStep", "Fault", "AccessResult",
    "Walk", "Mapping", "X86_ACCESS_KINDS", "EPT_ACCESS_KINDS",
    "paging_mode", "walk", "iter_mappings", "walk_ept", "decode_eptp", "walk_npt",
]
