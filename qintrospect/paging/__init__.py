"""Pure x86 page-table walkers over a `read_phys(addr, length) -> bytes` function.

Nothing here knows about QEMU, sockets or files: the same code walks a guest's page tables,
EPT/NPT tables, or tables a test built in a bytearray. A walk never raises for what it finds in
memory (not-present, reserved bits, unreadable tables): it returns a Walk whose `fault` says so.
"""

from .model import (
    EPT_ACCESS_KINDS, X86_ACCESS_KINDS, AccessResult, CpuState, Fault, LevelSpec, LevelStep,
    Mapping, PagingMode, ReadPhys, Walk,
)
from .modes import (
    ALL_MODES, MODE_4LEVEL, MODE_5LEVEL, MODE_32BIT, MODE_32BIT_PSE, MODE_EPT4, MODE_EPT5,
    MODE_NPT4, MODE_NPT5, MODE_PAE, paging_mode,
)
from .x86 import cr3_root, iter_mappings, walk
from .ept import decode_eptp, walk_ept, walk_npt

__all__ = [
    "ReadPhys", "CpuState", "LevelSpec", "PagingMode", "LevelStep", "Fault", "AccessResult",
    "Walk", "Mapping", "X86_ACCESS_KINDS", "EPT_ACCESS_KINDS",
    "paging_mode", "walk", "iter_mappings", "walk_ept", "decode_eptp", "walk_npt", "cr3_root",
    "ALL_MODES", "MODE_32BIT", "MODE_32BIT_PSE", "MODE_PAE", "MODE_4LEVEL", "MODE_5LEVEL",
    "MODE_EPT4", "MODE_EPT5", "MODE_NPT4", "MODE_NPT5",
]

# numpy twins of walk() and iter_mappings() for address batches and whole address spaces,
# loaded on first use (numpy costs a tenth of a second to import)
_VECTOR = ("leaf_arrays", "walk_array", "LeafArrays", "BatchWalk", "FAULT_REASONS")
__all__ += list(_VECTOR)


def __getattr__(name):
    if name in _VECTOR:
        from . import vector
        return getattr(vector, name)
    raise AttributeError(f"module 'qintrospect.paging' has no attribute {name!r}")
