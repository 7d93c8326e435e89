"""Where guest-physical memory comes from: one port, several adapters.

Every adapter reads RAM only: the RAM map is consulted before any read, so a page-table entry
pointing at a device (MMIO) or beyond RAM makes a MemoryReadError, never a device access.
All adapters must agree byte for byte (tests/integration say so).

- GdbMemory: the gdbstub in physical mode (works wherever the gdbstub reaches).
- DirectMemory: the QEMU process's own memory at the HVA (/proc/PID/mem): fastest, local only.
- QmpMemory: HMP `xp` through QMP: slow, but an independent path.
- PageCache: keeps whole 4 KiB pages while the VM is stopped, for batches and whole maps.
"""

import re
import struct

from typing import Dict

from ..errors import MemoryReadError, VMGoneError
from .host import PAGE, HostProcess, process_exists
from ..machine.rammap import RamMap


class PhysicalMemory:
    """The port: read `length` bytes of guest-physical memory at `gpa`."""

    name = "?"

    def __init__(self, ram_map: RamMap):
        self.ram_map = ram_map

    def read(self, gpa: int, length: int) -> bytes:
        self.ram_map.check_readable(gpa, length)
        return self._read(gpa, length)

    def read_sparse(self, gpa: int, length: int):
        """(read(gpa, length), [(start, end) offsets of runs known to be zeros without a
        read]): what a search may skip. Only the direct path knows such runs."""
        return self.read(gpa, length), []

    def _read(self, gpa: int, length: int) -> bytes:
        raise NotImplementedError


class GdbMemory(PhysicalMemory):
    name = "gdb"
    # QEMU 7.2 answers at most 2048 bytes per `m` packet; gdb splits for us, but we keep each
    # MI request to a page so one answer stays small.
    CHUNK = PAGE

    def __init__(self, ram_map: RamMap, gdb):
        super().__init__(ram_map)
        self.gdb = gdb

    def _read(self, gpa, length):
        parts = []
        for off in range(0, length, self.CHUNK):
            parts.append(self.gdb.read(gpa + off, min(self.CHUNK, length - off)))
        return b"".join(parts)


class DirectMemory(PhysicalMemory):
    """Reads the QEMU process at the HVA (HostProcess.read_range: present pages from the
    process, absent pages from the file behind them or proven zero, never guessed)."""

    name = "direct"

    def __init__(self, ram_map: RamMap, process: HostProcess):
        super().__init__(ram_map)
        self.process = process

    def _read(self, gpa, length, zeros=None):
        parts, done = [], 0
        while length > 0:
            region = self._region(gpa)
            n = min(length, region.end - gpa + 1)
            runs = None if zeros is None else []
            parts.append(self.process.read_range(region.hva_of(gpa), n, runs))
            if runs:
                zeros.extend((done + a, done + b) for a, b in runs)
            gpa += n
            length -= n
            done += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_sparse(self, gpa: int, length: int):
        """read() and the runs of absent private anonymous pages in it (zeros, not read)."""
        self.ram_map.check_readable(gpa, length)
        zeros: list = []
        return self._read(gpa, length, zeros), zeros

    def _region(self, gpa):
        region = self.ram_map.check_readable(gpa, 1)
        if region.hva is None:
            raise MemoryReadError(f"no host address known for RAM region {region.block!r}", gpa)
        return region

    def scan_chunks(self, start: int, end: int, chunk: int):
        """(gpa, bytes) for every run of RAM pages in [start, end) that may hold something,
        at most `chunk` bytes at a time. Only pages proven to hold zeros are skipped (absent
        from QEMU's page table in private anonymous memory, or in a hole of the backing file:
        HostProcess.absent_zero); every other page is read, wherever its bytes are."""
        import numpy as np
        gpa = start
        while gpa < end:
            region = self._region(gpa)
            n = min(chunk, end - gpa, region.end + 1 - gpa)
            hva = region.hva_of(gpa)
            try:
                entries = np.array(self.process.pagemap_entries(hva, n // PAGE), np.uint64)
            except OSError as exc:
                if not process_exists(self.process.pid):
                    raise VMGoneError(f"the QEMU process {self.process.pid} is gone") from None
                raise MemoryReadError(f"cannot read QEMU's pagemap at HVA {hva:#x}: {exc}",
                                      hva) from None
            keep = ~self.process.absent_zero(hva, entries)
            edges = np.flatnonzero(np.diff(np.concatenate(([False], keep, [False]))))
            for i, j in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                yield gpa + i * PAGE, self.process.read_range(hva + i * PAGE, (j - i) * PAGE)
            gpa += n


class QmpMemory(PhysicalMemory):
    name = "qmp"
    _LINE = re.compile(r"^[0-9a-fA-F]+:((?:\s+0x[0-9a-fA-F]+)+)\s*$")

    def __init__(self, ram_map: RamMap, qmp):
        super().__init__(ram_map)
        self.qmp = qmp

    def _read(self, gpa, length):
        start = gpa & ~7
        count = (gpa + length - start + 7) // 8
        words = []
        for off in range(0, count, 512):
            n = min(512, count - off)
            text = self.qmp.hmp(f"xp /{n}gx {start + off * 8:#x}")
            for line in text.splitlines():
                m = self._LINE.match(line.strip())
                if m:
                    words.extend(int(w, 16) for w in m.group(1).split())
        if len(words) != count:
            raise MemoryReadError(f"xp returned {len(words)} of {count} words at {start:#x}", gpa)
        data = struct.pack(f"<{count}Q", *words)
        return data[gpa - start:gpa - start + length]


class PageCache:
    """Whole-page cache in front of an adapter. Valid only while the VM is stopped: the session
    drops it whenever the VM may have run or the root changes."""

    def __init__(self, inner: PhysicalMemory, max_pages: int = 8192):
        self.inner = inner
        self.name = inner.name
        self.ram_map = inner.ram_map
        self.max_pages = max_pages
        self._pages: Dict[int, bytes] = {}
        self.hits = self.misses = 0

    def read(self, gpa: int, length: int) -> bytes:
        if gpa % PAGE + length <= PAGE:
            try:
                page = self._page(gpa - gpa % PAGE)
            except MemoryReadError:
                # the page does not read whole (not RAM, or RAM only in part): the exact
                # read, so that what is read, or the error and the address it names, is the
                # one an uncached read gives
                return self.inner.read(gpa, length)
            return page[gpa % PAGE:gpa % PAGE + length]
        return self.inner.read(gpa, length)

    def _page(self, base: int) -> bytes:
        page = self._pages.get(base)
        if page is None:
            self.misses += 1
            page = self.inner.read(base, PAGE)
            if len(self._pages) >= self.max_pages:
                self._pages.clear()
            self._pages[base] = page
        else:
            self.hits += 1
        return page
