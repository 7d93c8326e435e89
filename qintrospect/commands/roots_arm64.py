"""Find an aarch64 guest's TTBR0_EL1 roots in guest RAM without symbols.

On aarch64 the kernel has a table of its own (TTBR1_EL1), so a process's first table shares
nothing with the others: x86's fingerprint (one kernel half in every root) does not exist.
What every root has instead is its shape: a table aligned to its size whose entries are all
empty or table descriptors pointing into RAM, that no other table points to, and whose tree
below holds only descriptors and reaches at least one valid leaf. Linux fills a table it hands
out with zeros and writes only valid descriptors into the upper levels (swap and PROT_NONE
entries live at the last level only), so live roots pass; freed ones whose content survives
pass too, as the x86 finder's stale copies do: `--gva`/`--expect` tell them apart.
"""

from __future__ import annotations

from typing import List

import numpy as np

from .. import paging
from ..errors import MemoryReadError, UsageError
from ..paging.arm64_format import SCTLR_M, Arm64State, arm64_format, range_params, ttbr_base

U64 = np.uint64
TABLE_MAX = 4096          # tables read per candidate at most (a bound on crafted trees)


def _ttbr0_params(state: Arm64State):
    if not state.sctlr & SCTLR_M:
        raise UsageError("find-cr3 needs the MMU on (SCTLR_EL1.M=0: no translation tables)")
    p = range_params(state, 0)
    if p.epd or p.tsz_fault:
        why = "TCR_EL1.EPD0=1" if p.epd else p.tsz_fault
        raise UsageError(f"find-cr3 looks for TTBR0_EL1 tables, and this vCPU has no TTBR0 "
                         f"walks ({why})")
    return p


def _in_ram(addresses: np.ndarray, ram: List[tuple]) -> np.ndarray:
    starts = np.array([s for s, _ in ram], U64)
    ends = np.array([e for _, e in ram], U64)
    k = np.searchsorted(starts, addresses, side="right") - 1
    ok = k >= 0
    k = np.maximum(k, 0)
    return ok & (addresses < ends[k])


class _Shape:
    """The descriptor questions the scan asks of whole arrays of entries, in TTBR0's format."""

    def __init__(self, p, fmt, ram: List[tuple]):
        self.p, self.fmt, self.ram = p, fmt, ram
        self.table_mask = U64(fmt.table_mask)
        # bits a table descriptor Linux writes keeps clear: between the flags [1:0] and the
        # address, and between the address and the table attributes [63:59]
        low = (1 << p.granule) - 1 & ~3
        if p.ds:
            low &= ~(3 << 8)                 # OA[51:50]
        elif p.lpa:
            low &= ~(0xF << 12)              # OA[51:48]
        high = ((1 << 59) - 1) & ~((1 << (50 if p.ds else 48)) - 1)
        self.clear = U64(low | high)

    def next_tables(self, e: np.ndarray) -> np.ndarray:
        oa = e & self.table_mask
        if self.p.ds:
            oa |= ((e >> U64(8)) & U64(3)) << U64(50)
        elif self.p.lpa:
            oa |= ((e >> U64(12)) & U64(0xF)) << U64(48)
        return oa

    def root_like(self, rows: np.ndarray) -> np.ndarray:
        """Per row (one table): every entry empty or a clean table descriptor into RAM, and
        at least one of them."""
        table = (rows & U64(3)) == U64(3)
        clean = table & ((rows & self.clear) == U64(0))
        into_ram = np.zeros(rows.shape, bool)
        if clean.any():
            into_ram[clean] = _in_ram(self.next_tables(rows[clean]), self.ram)
        return ((rows == U64(0)) | into_ram).all(axis=1) & table.any(axis=1)

    def descriptor_like(self, rows: np.ndarray) -> np.ndarray:
        """Per row: could be an upper-level table (entries empty, blocks or tables)."""
        return ((rows == U64(0)) | ((rows & U64(1)) == U64(1))).all(axis=1)


def scan(memory, ram_map, state: Arm64State, progress=None, not_roots=()) -> list:
    """finder.Candidate for every TTBR0_EL1 root found in the VM's RAM, the current one
    marked; TTBR1_EL1's own table is left out (it is the kernel's), and so are `not_roots`
    (KVM's stage 2 first level: table descriptors into RAM, unreferenced, as a root is)."""
    from .finder import Candidate
    p = _ttbr0_params(state)
    granule = 1 << p.granule
    roots = unreferenced_tables(memory, ram_map, state, progress)
    if len(not_roots):
        roots = roots[~np.isin(roots & ~U64(granule - 1), np.array(sorted(not_roots), U64))]
    current = ttbr_base(p)
    kernel = ttbr_base(range_params(state, 1))
    out = [Candidate(current, f"the current TTBR0{state.register_suffix}'s table",
                     is_current=True)]
    for root in roots.tolist():
        if root in (current, kernel):
            continue
        leaves = _tree_leaves(memory.read, state, root)
        if leaves:
            out.append(Candidate(root, "a table no other table points to, whose tree maps "
                                 + ("EL0 pages" if leaves == EL0 else
                                    "EL1 pages only (a boot or stale table, not a process's)")))
    return sorted(out, key=lambda c: c.root)


def unreferenced_tables(memory, ram_map, state: Arm64State, progress=None) -> np.ndarray:
    """Every slot of RAM shaped like a first-level table (TTBR0's size, aligned to it): all
    entries empty or table descriptors into RAM, at least one, that no other table (of the
    kernel's tree, or any table-shaped page) points to. Process roots, and KVM's stage 2
    first levels (of the same granule), are such tables."""
    from .finder import ram_chunks
    p = _ttbr0_params(state)
    fmt = arm64_format(p, state.mair)
    ram = sorted((r.start, r.end + 1) for r in ram_map.ram if r.kind == "ram")
    if not ram:
        raise UsageError("found no RAM in QEMU's memory map to scan")
    shape = _Shape(p, fmt, ram)
    granule = 1 << p.granule
    first = 1 << p.mode.levels[0].index_bits               # entries in the first table
    # The kernel's tables point at every page of RAM (its linear map, with 4 KiB pages under
    # rodata=full): what they point to says nothing about roots, so they are left out
    kernel_tables = np.array(sorted(_kernel_tables(memory.read, state)), U64)
    found: List[np.ndarray] = []
    referenced: List[np.ndarray] = []
    for gpa, data in ram_chunks(memory, ram_map, progress):
        words = np.frombuffer(data, "<u8")
        words = words[:len(words) - len(words) % (granule // 8)]
        tables = words.reshape(-1, granule // 8)
        upper = shape.descriptor_like(tables) & (tables != U64(0)).any(axis=1)
        if kernel_tables.size:
            pages = U64(gpa) + np.arange(len(tables), dtype=U64) * U64(granule)
            upper &= ~np.isin(pages, kernel_tables)
        if upper.any():
            e = tables[upper]
            referenced.append(np.unique(shape.next_tables(e[(e & U64(3)) == U64(3)])))
        slots = words.reshape(-1, first) if first * 8 < granule else tables
        hits = np.flatnonzero(shape.root_like(slots)).astype(U64)
        found.append(U64(gpa) + hits * U64(first * 8))
    roots = np.concatenate(found) if found else np.zeros(0, U64)
    if referenced:
        pointed = np.unique(np.concatenate(referenced))
        roots = roots[~np.isin(roots & ~U64(granule - 1), pointed)]
    return roots[~np.isin(roots & ~U64(granule - 1), kernel_tables)]


def _kernel_tables(read, state: Arm64State) -> set:
    """Every table of TTBR1_EL1's tree (the kernel's), first table included."""
    p = range_params(state, 1)
    if p.epd or p.tsz_fault:
        return set()
    fmt = arm64_format(p, state.mair)
    out, todo = set(), [(0, ttbr_base(p))]
    while todo:
        level, addr = todo.pop()
        if addr in out:
            continue
        try:
            entries = np.frombuffer(read(addr, 8 << p.mode.levels[level].index_bits), "<u8")
        except MemoryReadError:
            continue
        out.add(addr)
        if level == fmt.last:
            continue
        for e in entries[(entries & U64(3)) == U64(3)].tolist():
            if fmt.valid(level, e, False):
                todo.append((level + 1, fmt.frame(level, e, False)))
    return out


EL1, EL0 = 1, 2
AP_EL0 = U64(1 << 6)        # a leaf's AP[1]: EL0 may access it


def _tree_leaves(read, state: Arm64State, root: int) -> int:
    """Walked as TTBR0's first table through tables that look like tables (empty, block or
    table entries above the last level): 0 if it reaches no valid leaf or meets something
    else, EL0 if a leaf EL0 may access, else EL1."""
    p = range_params(paging.with_root(state, root), 0)
    fmt = arm64_format(p, state.mair)
    todo = [(0, root)]
    seen, found, visited = 0, 0, set()
    while todo and seen < TABLE_MAX:
        level, addr = todo.pop()
        if (level, addr) in visited:        # a crafted tree may point back at itself
            continue
        visited.add((level, addr))
        try:
            entries = np.frombuffer(read(addr, 8 << p.mode.levels[level].index_bits), "<u8")
        except MemoryReadError:
            return 0
        seen += 1
        if level == fmt.last:
            pages = entries[(entries & U64(3)) == U64(3)]
            if pages.size:
                found = max(found, EL0 if (pages & AP_EL0).any() else EL1)
            continue
        if not ((entries == U64(0)) | ((entries & U64(1)) == U64(1))).all():
            return 0
        for e in entries[entries != U64(0)].tolist():
            if fmt.valid(level, e, fmt.is_leaf(level, e)):
                if fmt.is_leaf(level, e):
                    found = max(found, EL0 if e & int(AP_EL0) else EL1)
                else:
                    todo.append((level + 1, fmt.frame(level, e, False)))
        if found == EL0:
            return EL0
    return found
