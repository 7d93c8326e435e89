"""Kernel virtual memory of a guest: its page tables walked with qintrospect.paging over a
physical read function, every leaf kept once it is found (a kernel's mappings do not change
while the VM is held still; a running VM's reads are what they are at that moment either way).

KernelMemory(read_phys, cpu).read(va, n) reads n bytes at a kernel virtual address, page by
page across leaves of any size; a fault raises KernelFault (a MemoryReadError naming the
address and why), so the bounded walkers of qintrospect.btf stop with a note instead of
reading nonsense.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from .. import paging
from ..errors import MemoryReadError

ReadPhys = Callable[[int, int], bytes]
PAGE = 4096
MAX_LEAVES = 1 << 16            # leaves kept before the cache starts again


class KernelFault(MemoryReadError):
    """A kernel virtual address that does not translate (not present, non-canonical)."""


class KernelMemory:
    """Reads of kernel virtual addresses through one page-table root (a CpuState)."""

    def __init__(self, read_phys: ReadPhys, cpu: paging.CpuState):
        self.read_phys, self.cpu = read_phys, cpu
        self._leaves: Dict[Tuple[int, int], int] = {}    # (size, va base) -> pa base
        self.walks = 0

    @property
    def root(self) -> int:
        from .arm64 import is_arm64, kernel_root
        if is_arm64(self.cpu):
            return kernel_root(self.cpu)
        mode = paging.paging_mode(self.cpu)
        return paging.cr3_root(self.cpu, mode)[0] if mode else self.cpu.cr3

    def _leaf(self, va: int) -> Tuple[int, int]:
        """(pa of va, bytes left in its leaf page)."""
        for size in (PAGE, 2 << 20, 1 << 30):
            base = va & ~(size - 1)
            pa = self._leaves.get((size, base))
            if pa is not None:
                return pa + (va - base), base + size - va
        walk = paging.walk(self.read_phys, self.cpu, va)
        self.walks += 1
        if not walk.ok:
            why = walk.fault.reason if walk.fault else "no translation"
            raise KernelFault(f"kernel address {va:#x} does not translate through root "
                              f"{walk.root:#x}: {why}", va)
        size = walk.page_size or PAGE
        base = va & ~(size - 1)
        if len(self._leaves) >= MAX_LEAVES:
            self._leaves.clear()
        self._leaves[(size, base)] = walk.pa - (va - base)
        return walk.pa, base + size - va

    def translate(self, va: int) -> int:
        """The guest-physical address of kernel virtual address va. Raises KernelFault."""
        return self._leaf(va)[0]

    def read(self, va: int, length: int) -> bytes:
        """`length` bytes at kernel virtual address va. Raises KernelFault or the physical
        read's MemoryReadError."""
        if length <= 0:
            return b""
        parts = []
        while length > 0:
            pa, left = self._leaf(va)
            n = min(length, left)
            parts.append(self.read_phys(pa, n))
            va += n
            length -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def string(self, va: int, limit: int = 256) -> str:
        """A NUL-terminated string at va (at most `limit` bytes), read up to page ends only."""
        data = b""
        while len(data) < limit:
            n = min(limit - len(data), PAGE - (va + len(data)) % PAGE)
            chunk = self.read(va + len(data), n)
            end = chunk.find(b"\0")
            if end >= 0:
                return (data + chunk[:end]).decode("utf-8", "replace")
            data += chunk
        return data.decode("utf-8", "replace")


def kernel_cpu(cpu: paging.CpuState, root: Optional[int] = None) -> paging.CpuState:
    """A CpuState like `cpu` whose root is `root` (no PCID bits), or `cpu` itself; on
    aarch64 the state with TTBR1 = root (guestos.arm64.kernel_state)."""
    from .arm64 import is_arm64, kernel_state
    if is_arm64(cpu):
        return kernel_state(cpu, root)
    if root is None:
        return cpu
    from ..paging.modes import CR4_PCIDE
    from ..record import replace
    return replace(cpu, cr3=root, cr4=cpu.cr4 & ~CR4_PCIDE, pdptes=None)
