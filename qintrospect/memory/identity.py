"""Whether a local QEMU process really holds a VM's RAM, before its memory and pagemap are used
for that VM. The process behind a socket may be another VM's QEMU (a monitor reached through an
outer VM's serial line), or no QEMU at all (--pid): several whole pages that only this VM can
hold (many different byte values and 8-byte words: page tables, code, data, never zeros or a
fill pattern) must read the same through the process and through a reference path (gdbstub
or QMP). One stable page that differs is proof of the contrary."""

from __future__ import annotations

from typing import Iterator, Optional

from ..errors import MemoryReadError

PAGE = 4096
IDENTITY_PAGES = 4       # distinctive pages that must read the same both ways
IDENTITY_SAMPLES = 512   # pages looked at, spread over RAM
IDENTITY_CHUNK = 1 << 17  # pagemap entries read at a time (512 MiB of RAM)


def distinctive(page: bytes) -> bool:
    """A page whose content two VMs would not share by chance: many byte values and many
    different 8-byte words (not zeros, not a pattern, not a mostly empty table)."""
    return len(set(page)) >= 64 and len(set(memoryview(page).cast("Q"))) >= 128


def held_pages(process, ram_map, first: Optional[int] = None) -> Iterator[int]:
    """GPAs of pages QEMU holds (present in its pagemap): `first` (a page the vCPU surely
    touched: its page-table root) when it is RAM, then spread evenly over guest RAM
    (IDENTITY_SAMPLES of them), a chunk of the pagemap at a time."""
    if first is not None:
        region = ram_map.ram_at(first)
        if region is not None and region.hva is not None:
            yield first
    ram = [r for r in ram_map.ram if r.kind == "ram" and r.hva is not None]
    total = sum((r.end + 1 - r.start) // PAGE for r in ram) or 1
    for r in ram:
        pages = (r.end + 1 - r.start) // PAGE
        for start in range(0, pages, IDENTITY_CHUNK):
            n = min(IDENTITY_CHUNK, pages - start)
            try:
                entries = process.pagemap_entries(r.hva + start * PAGE, n)
            except OSError:
                return
            present = [i for i, e in enumerate(entries) if e >> 63]
            want = max(8, IDENTITY_SAMPLES * n // total)
            for i in present[::max(1, len(present) // want)]:
                yield r.start + (start + i) * PAGE


def holds_ram(process, ram_map, reference, root: Optional[int]) -> tuple:
    """(True, "") when the process holds this VM's RAM, as the reference memory reads it;
    else (False, why not)."""
    matched = 0
    for gpa in held_pages(process, ram_map, root):
        hva = ram_map.ram_at(gpa).hva_of(gpa)
        try:
            if not process.pagemap_entry(hva) >> 63 & 1:
                continue          # absent pages hold zeros or file data: no proof
            mine = process.read(hva, PAGE)
            if not distinctive(mine):
                continue
            theirs = reference.read(gpa, PAGE)
            if process.read(hva, PAGE) != mine:
                continue          # changed while we looked (the VM runs): no proof
        except (OSError, MemoryReadError):
            return False, ""
        if theirs != mine:
            return False, ""
        matched += 1
        if matched == IDENTITY_PAGES:
            return True, ""
    return False, (f"only {matched} page(s) distinctive enough to prove it holds this VM's "
                   "RAM were found")
