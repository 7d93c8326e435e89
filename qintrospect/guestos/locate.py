"""Finding the guest kernel's vmcoreinfo note in guest RAM.

Linux keeps the note in a page it allocates at boot (crash_save_vmcoreinfo_init), and the
buddy allocator hands those out from the top of memory: the scan goes from the highest RAM
address down, a window at a time, and stops at the first note that `accept` takes (the
caller checks that it belongs to the kernel running now: a guest's RAM may hold others, a
nested guest's or a stale copy). Pages the host never gave the guest are skipped when the
memory port can tell (DirectMemory.scan_chunks); the scan is bounded by the RAM map.
"""

from __future__ import annotations

import struct
from typing import Callable, List, Optional, Tuple

from ..btf.vmcoreinfo import MAX_TEXT, NOTE_NAME, find_note
from ..errors import MemoryReadError

WINDOW = 4 << 20
PAGE = 4096
MAX_CANDIDATES = 64


class Found:
    """What a scan found: the note (gpa, text) or None, how much it read, what it refused."""

    def __init__(self):
        self.note: Optional[Tuple[int, str]] = None
        self.scanned = 0
        self.rejected: List[str] = []


def _pieces(memory, start: int, end: int):
    # a page cache in front (PageCache.inner) does not hide the adapter's own scan
    scan_chunks = getattr(memory, "scan_chunks", None) or \
        getattr(getattr(memory, "inner", None), "scan_chunks", None)
    if scan_chunks is not None:
        yield from scan_chunks(start, end, end - start)
        return
    try:
        yield start, memory.read(start, end - start)
    except MemoryReadError:
        return


def read_note(read: Callable[[int, int], bytes], gpa: int) -> Optional[str]:
    """The vmcoreinfo text of a note whose header is at `gpa`, or None if there is none."""
    try:
        head = read(gpa, 24)
        namesz, descsz, ntype = struct.unpack_from("<III", head)
        if namesz != len(NOTE_NAME) or ntype != 0 or not 0 < descsz <= MAX_TEXT \
                or head[12:23] != NOTE_NAME:
            return None
        note = find_note(head + read(gpa + 24, descsz))
    except MemoryReadError:
        return None
    return note.text if note is not None and note.offset == 0 else None


def scan(memory, ram_regions, accept: Callable[[int, str], Optional[str]],
         window: int = WINDOW, progress=None) -> Found:
    """The first note, from the top of RAM down, that accept(gpa, text) takes (it returns
    None to take it, else why not). progress: advanced by each window's bytes."""
    found = Found()
    regions = sorted((r for r in ram_regions if r.kind == "ram"), key=lambda r: -r.start)
    for region in regions:
        lo = (region.start + PAGE - 1) & ~(PAGE - 1)
        hi = (region.end + 1) & ~(PAGE - 1)
        top = hi
        while top > lo:
            bottom = max(lo, (top - 1) & ~(window - 1))
            for gpa, data in _pieces(memory, bottom, top):
                found.scanned += len(data)
                pos = data.find(NOTE_NAME)
                while pos >= 0:
                    header = gpa + pos - 12
                    if pos >= 12 or header >= lo:
                        text = read_note(memory.read, header)
                        if text is not None:
                            why = accept(header, text)
                            if why is None:
                                found.note = (header, text)
                                return found
                            if len(found.rejected) < MAX_CANDIDATES:
                                found.rejected.append(f"{header:#x}: {why}")
                    pos = data.find(NOTE_NAME, pos + 1)
            if progress is not None:
                progress.advance(top - bottom)
            top = bottom
    return found
