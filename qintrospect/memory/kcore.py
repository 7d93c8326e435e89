"""This host's own physical memory, read through /proc/kcore (root only, no module).

/proc/kcore is an ELF core image of the kernel's address space. Its segments for the kernel's
direct map of RAM carry, in p_paddr, the physical address they start at (Linux 4.x and later;
other segments have p_paddr -1, or are the kernel text, whose offset from its physical address
differs from the direct map's). So physical address P of RAM is at file offset
p_offset + (P - p_paddr) of the segment that holds it. qintrospect reads it to walk the
second-level tables KVM keeps in this host's memory for its guests.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from typing import Iterator, List, Sequence, Tuple

from ..errors import AttachError, MemoryReadError

KCORE = "/proc/kcore"
PAGE = 4096
NO_PADDR = (1 << 64) - 1
KERNEL_TEXT = 0xFFFFFFFF80000000


def load_segments(header: bytes, phdrs: bytes) -> List[Tuple[int, int, int, int]]:
    """(file offset, virtual address, physical address, size) of every PT_LOAD segment."""
    if header[:4] != b"\x7fELF" or header[4] != 2:
        raise ValueError("not an ELF64 file")
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    loads = []
    for i in range(phnum):
        p_type, _, offset, vaddr, paddr, _, memsz, _ = struct.unpack_from("<IIQQQQQQ", phdrs,
                                                                         i * phentsize)
        if p_type == 1 and memsz:
            loads.append((offset, vaddr, paddr, memsz))
    return loads


def ram_segments(header: bytes, phdrs: bytes) -> List[Tuple[int, int, int]]:
    """(physical start, physical end exclusive, file offset) of the direct-map RAM segments,
    from an ELF64 header and its program headers."""
    loads = [s for s in load_segments(header, phdrs) if s[2] != NO_PADDR]
    # the kernel text (KCORE_TEXT) also has a physical address, but lives at -2 GiB; the
    # direct map's RAM segments all share one virtual-minus-physical offset below that
    ram = [(o, v, p, m) for o, v, p, m in loads if v < KERNEL_TEXT]
    if not ram:
        return []
    direct, _ = Counter((v - p) & NO_PADDR for _, v, p, _ in ram).most_common(1)[0]
    return sorted((p, p + m, o) for o, v, p, m in ram if (v - p) & NO_PADDR == direct)


class KcoreMemory:
    """Physical memory of this host: read(pa, length), the RAM ranges, and scan_chunks."""

    name = "kcore"

    def __init__(self, path: str = KCORE):
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise AttachError(f"cannot open {path}: reading this host's physical memory (to "
                              "find and walk KVM's second-level tables) needs root "
                              "(CAP_SYS_RAWIO)") from None
        except OSError as exc:
            raise AttachError(f"cannot open {path}: {exc.strerror or exc} (is the kernel built "
                              "with CONFIG_PROC_KCORE?)") from None
        try:
            header = os.pread(self.fd, 64, 0)
            phoff, = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            phdrs = os.pread(self.fd, phentsize * phnum, phoff)
            self.segments = ram_segments(header, phdrs)
            # every segment by virtual address (direct map, vmalloc, modules, kernel text)
            self.virtual = sorted((v, v + m, o) for o, v, _, m in load_segments(header, phdrs))
        except (OSError, ValueError, struct.error) as exc:
            os.close(self.fd)
            raise AttachError(f"{path} is not a readable kernel core image: {exc}") from None
        if not self.segments:
            os.close(self.fd)
            raise AttachError(f"{path} shows no RAM segments with physical addresses")

    def close(self) -> None:
        os.close(self.fd)

    @property
    def ram_bytes(self) -> int:
        return sum(end - start for start, end, _ in self.segments)

    def _segment(self, pa: int, length: int) -> Tuple[int, int, int]:
        for start, end, offset in self.segments:
            if start <= pa and pa + length <= end:
                return start, end, offset
        raise MemoryReadError(f"host physical {pa:#x}+{length} is not RAM this kernel maps "
                              f"({KCORE})", pa)

    def read(self, pa: int, length: int) -> bytes:
        start, _, offset = self._segment(pa, length)
        try:
            data = os.pread(self.fd, length, offset + pa - start)
        except OSError as exc:
            raise MemoryReadError(f"cannot read host physical {pa:#x} through {KCORE}: "
                                  f"{exc.strerror or exc}", pa) from None
        if len(data) != length:
            raise MemoryReadError(f"short read of host physical {pa:#x} through {KCORE}", pa)
        return data

    def read_virtual(self, va: int, length: int) -> bytes:
        """`length` bytes at kernel virtual address va (the direct map, vmalloc space where
        KVM keeps its VMs, the modules' area): MemoryReadError where kcore shows none."""
        for start, end, offset in self.virtual:
            if start <= va and va + length <= end:
                try:
                    data = os.pread(self.fd, length, offset + va - start)
                except OSError as exc:
                    raise MemoryReadError(f"cannot read kernel address {va:#x} through "
                                          f"{KCORE}: {exc.strerror or exc}", va) from None
                if len(data) == length:
                    return data
                break
        raise MemoryReadError(f"kernel address {va:#x}+{length} is in no segment {KCORE} "
                              "shows (the kernel does not include that area)", va)

    def covers(self, va: int) -> bool:
        """Whether kcore shows kernel virtual address va at all."""
        return any(start <= va < end for start, end, _ in self.virtual)

    def scan_chunks(self, chunk: int = 4 << 20, skip: Sequence[Tuple[int, int]] = ()
                    ) -> Iterator[Tuple[int, bytes]]:
        """(physical address, bytes) over all RAM, `chunk` bytes at a time, leaving out the
        page-aligned [start, end) ranges of `skip` (sorted, not overlapping)."""
        for start, end, offset in self.segments:
            first = (start + PAGE - 1) & ~(PAGE - 1)
            for lo, hi in _without(first, end & ~(PAGE - 1), skip):
                pa = lo
                while pa < hi:
                    n = min(chunk, hi - pa)
                    try:
                        yield pa, os.pread(self.fd, n, offset + pa - start)
                    except OSError:
                        pass     # a hole the kernel will not show: nothing to find there
                    pa += n

    def scan_bytes(self, skip: Sequence[Tuple[int, int]] = ()) -> int:
        """How many bytes scan_chunks(skip=skip) reads."""
        return sum(hi - lo for start, end, _ in self.segments
                   for lo, hi in _without((start + PAGE - 1) & ~(PAGE - 1),
                                          end & ~(PAGE - 1), skip))


def _without(lo: int, hi: int, skip: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """[lo, hi) less the sorted, disjoint ranges of `skip`, as ranges."""
    out, at = [], lo
    for a, b in skip:
        if b <= at or a >= hi:
            continue
        if a > at:
            out.append((at, a))
        at = max(at, b)
        if at >= hi:
            break
    if at < hi:
        out.append((at, hi))
    return out
