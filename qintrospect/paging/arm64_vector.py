"""numpy twins of the AArch64 stage 1 walkers (arm64.py), for address batches and whole address
spaces: walk_array_arm64() answers for every address of a batch what walk_arm64() answers for an
EL1 read, leaf_arrays_arm64() lists exactly what iter_mappings_arm64() lists.

Both ask the same walk parameters (arm64_format.range_params: granule, VA size, TBI, EPD, DS,
FEAT_LPA, output size, HPD, HA/HD) and descriptor masks (Arm64Format) as the scalar walkers, and
work as paging.vector does: a level at a time, for one VA range at a time (TTBR0_EL1 and
TTBR1_EL1 may differ in granule and VA size), every table needed at a level read once, whole, in
one read_phys call (paging.vector._Tables, shared by both ranges), the descriptors of all
addresses (or all entries) of that level decoded at once. Python loops only over distinct
tables. The property tests (tests/unit/test_arm64_vector.py) hold them to the scalar walkers.

Levels in a batch walk: the two ranges may start at different levels, and a walk that cannot
start (VA out of range, EPDn, TnSZ out of bounds, TTBRn beyond the output size) faults "at
level 0" even where the range's first level is L1 or L-1. So Arm64BatchWalk.fault_level and
leaf_level are codes into LEVEL_NAMES ("L-1" .. "L3", code = Arm level + 1), the same in both
ranges, and entries/tables have one column per code; not indexes into BatchWalk.mode.levels
as for x86. A leaf list's `level` is, as x86's, the index into its own range's mode (what
iter_mappings_arm64's Mapping.levels_entries says); its `select` column names the range.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .arm64 import _reader, walk_arm64
from .arm64_format import (
    AF, DBM, FLAG_BITS, PXN, PXN_TABLE, SCTLR_M, SCTLR_WXN, TABLE, UXN, UXN_TABLE,
    Arm64Format, Arm64State, RangeParams, arm64_format, bits, range_params, range_window,
    ttbr_base,
)
from .model import Mapping, PagingMode, ReadPhys, Walk
from .vector import (
    FAULT_ACCESS_FLAG, FAULT_ADDRESS_SIZE, FAULT_NONE, FAULT_PAGING_DISABLED, FAULT_TRANSLATION,
    FAULT_UNREADABLE, BatchWalk, LeafArrays, OnUnreadable, _addresses, _report_unreadable,
    _Tables,
)

__all__ = ["walk_array_arm64", "leaf_arrays_arm64", "Arm64BatchWalk", "Arm64LeafArrays",
           "Arm64Formats", "LEVEL_NAMES"]

U64 = np.uint64
#: The level names of AArch64 walks; Arm64BatchWalk.fault_level / leaf_level index them.
LEVEL_NAMES = ("L-1", "L0", "L1", "L2", "L3")
L0 = LEVEL_NAMES.index("L0")
TABLE_ATTRS = bits(62, 59)          # APTable, UXNTable, PXNTable (what table_attrs keeps)
APTABLE0, APTABLE1 = 1 << 61, 1 << 62


class _Range:
    """One VA range's walk as numpy constants, from its RangeParams and Arm64Format."""

    def __init__(self, p: RangeParams, mair: int):
        root = ttbr_base(p)
        # what stops every walk of the range before its first read (after the range check)
        start_fault = (FAULT_TRANSLATION if p.epd or p.tsz_fault else
                       FAULT_ADDRESS_SIZE if root >> p.oa_bits else FAULT_NONE)
        self._set(p, arm64_format(p, mair), root, start_fault, 0 if p.hpd else TABLE_ATTRS)

    def _set(self, p, fmt, root: int, start_fault: int, table_attrs: int) -> None:
        self.p = p
        self.mode = p.mode
        self.fmt = fmt
        self.depth = len(p.mode.levels)
        self.first = len(LEVEL_NAMES) - self.depth     # the code of mode.levels[0]
        self.root = root
        self.start_fault = start_fault
        self.table_mask = U64(fmt.table_mask)
        self.oa_bits = U64(p.oa_bits)
        self.tattr_mask = U64(table_attrs)

    def level(self, i: int):
        """(shift, entry count, last?, blocks allowed?, leaf OA mask, page size) of level i."""
        spec = self.mode.levels[i]
        last = i == self.depth - 1
        return (U64(spec.shift), 1 << spec.index_bits, last,
                last or self.fmt.sizes[i] is not None, U64(self.fmt.masks[i]),
                self.fmt.sizes[i] or 0)

    def out_of_range(self, va: np.ndarray) -> np.ndarray:
        """arm64._out_of_range for a data access: bits[top:64-TnSZ] not all `select`."""
        p = self.p
        top = 55 if p.tbi else 63
        low = 64 - p.tsz
        ones = (1 << (top + 1 - low)) - 1
        field = (va >> U64(low)) & U64(ones)
        return field != U64(ones if p.select else 0)

    def frame(self, e: np.ndarray, mask) -> np.ndarray:
        """Arm64Format.frame: the masked OA, with OA[51:50] from bits[9:8] (DS) or OA[51:48]
        from bits[15:12] (64K, FEAT_LPA)."""
        oa = e & mask
        if self.p.ds:
            oa |= ((e >> U64(8)) & U64(3)) << U64(50)
        elif self.p.lpa:
            oa |= ((e >> U64(12)) & U64(0xF)) << U64(48)
        return oa


def _rights(e: np.ndarray, t: np.ndarray, wxn: bool, hd: bool
            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(writable, user, executable) of leaf entries e under table attributes t (bits 62:59
    ORed over the tables above, 0 with HPD), as arm64._summary and permissions() say."""
    no_el0 = (t & U64(APTABLE0)) != 0
    no_write = (t & U64(APTABLE1)) != 0

    def view(ap):                      # AP[2:1] -> (EL1 write, EL0 read, EL0 write), APTable
        pw = ((ap & U64(2)) == 0) & ~no_write
        ur = ((ap & U64(1)) != 0) & ~no_el0
        uw = (ap == U64(1)) & ~no_el0 & ~no_write
        return pw, ur, uw

    ap = (e >> U64(6)) & U64(3)
    pw, ur, uw = view(ap)
    px = ((e & U64(PXN)) == 0) & ((t & U64(PXN_TABLE)) == 0) & ~uw
    ux = ((e & U64(UXN)) == 0) & ((t & U64(UXN_TABLE)) == 0)
    if wxn:
        px &= ~pw
        ux &= ~uw
    if hd:          # a write with hardware dirty state clears AP[2] of a DBM=1 descriptor
        wpw, _, wuw = view(np.where((e & U64(DBM)) != 0, ap & U64(1), ap))
        writable = wpw | wuw
    else:
        writable = pw | uw
    return writable, ur, np.where(ur | ux, ux, px)


# ---------------------------------------------------------------- address batches

class Arm64BatchWalk(BatchWalk):
    """BatchWalk of an AArch64 batch. fault_level and leaf_level are codes into LEVEL_NAMES
    (Arm level + 1), the same for both ranges; entries and tables have one column per code
    (zeros where the walk read nothing). select is each address's range (VA bit 55), modes and
    roots the two ranges' (what Walk.mode and Walk.root say for an address of that range);
    mode and root are the ranges' common ones (mode None when they differ or the MMU is off)."""

    level_names = LEVEL_NAMES

    def __init__(self, *fields, select: Optional[np.ndarray] = None,
                 modes: Tuple[Optional[PagingMode], Optional[PagingMode]] = (None, None),
                 roots: Tuple[int, int] = (0, 0)):
        super().__init__(*fields)
        self.select = select
        self.modes = modes
        self.roots = roots

    def level_name(self, i: int) -> Optional[str]:
        k = int(self.fault_level[i])
        return None if k < 0 else LEVEL_NAMES[k]

    def mode_of(self, i: int) -> Optional[PagingMode]:
        """Walk.mode of element i (its range's mode; None with the MMU off)."""
        return None if self.select is None else self.modes[int(self.select[i])]

    def root_of(self, i: int) -> int:
        return 0 if self.select is None else self.roots[int(self.select[i])]

    def walk(self, i: int, read_phys: ReadPhys, cpu: Arm64State,  # type: ignore[override]
             access: str = "el1-read") -> Walk:
        """The full scalar walk of element i (levels, access table, messages, notes)."""
        return walk_arm64(read_phys, cpu, int(self.va[i]), access)


def walk_array_arm64(read_phys: ReadPhys, state: Arm64State,
                     vas: Union[np.ndarray, Sequence[int]]) -> Arm64BatchWalk:
    """Translate every address of `vas` (integers 0 .. 2**64-1) as walk_arm64(read_phys,
    state, va) would for an EL1 read, for the whole batch at once. Each distinct table is read
    once per call, whole; where a whole table does not read, the needed descriptors are read
    one by one, as walk_arm64 reads them. Never raises for what it reads. Permission denials
    are not faults (as there); what walk_arm64 adds per address (levels, access table, fault
    status codes, messages, notes) is left to Arm64BatchWalk.walk."""
    va = _addresses(vas)
    n = len(va)
    if not state.sctlr & SCTLR_M:
        return Arm64BatchWalk(
            va, np.zeros(n, bool), np.zeros(n, U64), np.zeros(n, U64), np.zeros(n, bool),
            np.zeros(n, bool), np.zeros(n, bool), np.full(n, FAULT_PAGING_DISABLED, np.uint8),
            np.full(n, -1, np.int8), None, 0)
    ranges = [_Range(range_params(state, s), state.mair) for s in (0, 1)]
    out = _Out(n)
    select = ((va >> U64(55)) & U64(1)).astype(np.uint8)
    tables = _Tables(_reader(read_phys, state), 8, None, 0)
    wxn = bool(state.sctlr & SCTLR_WXN)
    for s, r in enumerate(ranges):
        idx = np.flatnonzero(select == s)
        if not len(idx):
            continue
        outside = r.out_of_range(va[idx])
        if r.start_fault != FAULT_NONE:
            out.reason[idx] = np.where(outside, FAULT_TRANSLATION, r.start_fault)
            out.level[idx] = L0
            continue
        out.reason[idx[outside]] = FAULT_TRANSLATION
        out.level[idx[outside]] = L0
        _walk_range(tables, r, va, idx[~outside], out, wxn)
    modes = (ranges[0].mode, ranges[1].mode)
    roots = (ranges[0].root, ranges[1].root)
    return Arm64BatchWalk(
        va, out.ok, out.pa, out.page_size, out.writable, out.user, out.executable, out.reason,
        out.level, modes[0] if modes[0] == modes[1] else None, roots[0] if roots[0] == roots[1]
        else 0, out.entries, out.tables, out.leaf_level, select=select, modes=modes,
        roots=roots)


class _Out:
    """The batch's columns, filled range by range."""

    def __init__(self, n: int):
        self.ok, self.pa, self.page_size = np.zeros(n, bool), np.zeros(n, U64), np.zeros(n, U64)
        self.writable, self.user = np.zeros(n, bool), np.zeros(n, bool)
        self.executable = np.zeros(n, bool)
        self.reason, self.level = np.zeros(n, np.uint8), np.full(n, -1, np.int8)
        self.leaf_level = np.full(n, -1, np.int8)
        self.entries = np.zeros((n, len(LEVEL_NAMES)), U64)
        self.tables = np.zeros((n, len(LEVEL_NAMES)), U64)


def _walk_range(tables: _Tables, r: _Range, va: np.ndarray, todo: np.ndarray, out: _Out,
                wxn: bool) -> None:
    """AArch64.S1Walk for the elements `todo` of one range, a level at a time: one descriptor
    per element and level until a leaf or a fault (arm64._walk_tables), then the Access flag
    and the rights (walk_arm64, _summary)."""
    table = np.full(len(todo), r.root, U64)
    tattrs = np.zeros(len(todo), U64)          # bits 62:59 ORed over the tables above
    for i in range(r.depth):
        if not len(todo):
            break
        shift, count, last, blocks, leaf_mask, size = r.level(i)
        code = r.first + i
        v = va[todo]
        index = (v >> shift) & U64(count - 1)
        e, readable = tables.entries(table, index, count)
        out.entries[todo, code], out.tables[todo, code] = e, table
        t = (e & U64(TABLE)) != 0
        good = readable & ((e & U64(1)) != 0)
        if last:                               # page (11) or reserved (01)
            good &= t
            leaf = np.ones(len(e), bool)
            oa = r.frame(e, leaf_mask)
        else:                                  # table (11), block (01) where allowed
            if not blocks:
                good &= t
            leaf = ~t
            oa = r.frame(e, np.where(t, r.table_mask, leaf_mask))
        fault = np.where(~readable, FAULT_UNREADABLE,
                         np.where(~good, FAULT_TRANSLATION,
                                  np.where((oa >> r.oa_bits) != 0, FAULT_ADDRESS_SIZE,
                                           FAULT_NONE)))
        if not r.p.ha:                         # AF=0 at a leaf: an Access flag fault
            fault = np.where((fault == FAULT_NONE) & leaf & ((e & U64(AF)) == 0),
                             FAULT_ACCESS_FLAG, fault)
        stop = fault != FAULT_NONE
        if stop.any():
            k = todo[stop]
            out.reason[k] = fault[stop]
            out.level[k] = code
        done = ~stop & leaf
        if done.any():
            k = todo[done]
            out.ok[k] = True
            out.pa[k] = oa[done] | (v[done] & U64(size - 1))
            out.page_size[k] = size
            out.leaf_level[k] = code
            out.writable[k], out.user[k], out.executable[k] = _rights(
                e[done], tattrs[done], wxn, r.p.hd)
        down = ~stop & ~leaf
        todo, table = todo[down], oa[down]
        tattrs = tattrs[down] | (e[down] & r.tattr_mask)


# ---------------------------------------------------------------- whole address spaces

class Arm64Formats:
    """The leaf lists' format: each range's Arm64Format (formats[select]), and flags() /
    flag_bits as LeafArrays.mappings and vmmap ask them. flag_bits are the bits flags() reads
    of a valid leaf (arm64_format.FLAG_BITS and the type bit, which tells a page from a
    block whatever the level). A leaf's flags depend on its range only through SH when
    TCR_EL1.DS=1 (TCR_EL1.SHn, not the descriptor): flags() without `select` picks the range
    whose mode can hold such a leaf at level i, TTBR1's when both can."""

    flag_bits = FLAG_BITS | TABLE

    def __init__(self, formats: Tuple[Optional[Arm64Format], Optional[Arm64Format]]):
        self.formats = formats

    def flags(self, i: int, e: int, leaf: bool, select: Optional[int] = None
              ) -> Tuple[str, ...]:
        if select is None:
            fits = [s for s, f in enumerate(self.formats)
                    if f is not None and i <= f.last
                    and (not leaf or (i == f.last) == bool(e & TABLE))]
            select = fits[-1] if fits else max(
                (s for s, f in enumerate(self.formats) if f is not None),
                key=lambda s: self.formats[s].last)
        return self.formats[select].flags(i, e, leaf)


class Arm64LeafArrays(LeafArrays):
    """LeafArrays of an AArch64 address space, both ranges: level is the index into the leaf's
    own range's mode (modes[select]), path is zero-padded to the deeper range's depth; mode is
    the ranges' common mode (None when they differ), format an Arm64Formats."""

    def __init__(self, *fields, select: np.ndarray,
                 modes: Tuple[Optional[PagingMode], Optional[PagingMode]] = (None, None)):
        super().__init__(*fields)
        self.select = select
        self.modes = modes

    def mappings(self) -> Iterator[Mapping]:
        """The leaves as paging.Mapping objects, equal to iter_mappings_arm64's ones."""
        flags_of: Dict[Tuple[int, int, int], Tuple[str, ...]] = {}
        mask = Arm64Formats.flag_bits
        formats = self.format.formats if self.format is not None else ()
        columns = (self.va, self.pa, self.size, self.writable, self.user, self.executable,
                   self.level, self.entry, self.path, self.select)
        for va, pa, size, w, u, x, i, e, path, s in zip(*(c.tolist() for c in columns)):
            key = (s, i, e & mask)
            flags = flags_of.get(key)
            if flags is None:
                flags = flags_of[key] = formats[s].flags(i, e, True)
            yield Mapping(va, pa, size, w, u, x, tuple(path[:i + 1]), flags)


def _no_leaves(depth: int, modes, fmt) -> Arm64LeafArrays:
    u64, flag = np.zeros(0, U64), np.zeros(0, bool)
    mode = modes[0] if modes[0] == modes[1] else None
    return Arm64LeafArrays(u64, u64.copy(), u64.copy(), u64.copy(), flag, flag.copy(),
                           flag.copy(), np.zeros(0, np.int8), np.zeros((0, depth), U64), mode,
                           fmt, select=np.zeros(0, np.uint8), modes=modes)


def leaf_arrays_arm64(read_phys: ReadPhys, state: Arm64State, start: int = 0,
                      end: Optional[int] = None, on_unreadable: Optional[OnUnreadable] = None
                      ) -> Arm64LeafArrays:
    """Every valid leaf overlapping [start, end) (end exclusive, None = to 2**64) of both VA
    ranges, in VA order, TTBR1 addresses sign-extended, as arrays: what iter_mappings_arm64
    yields (leaves with AF=0 included). Each table is read once, whole, with one read_phys
    call (the granule, or the smaller first table), shared by the two ranges; unreadable
    tables are skipped and passed to on_unreadable(level name, address, error) in the order
    iter_mappings_arm64 would (each range on its own: a table both ranges reach is reported
    for each). Ranges whose walks cannot start (EPDn=1, TnSZ out of bounds, TTBRn beyond the
    output size) are skipped. Nothing when the MMU is off."""
    if not state.sctlr & SCTLR_M:
        return _no_leaves(0, (None, None), None)
    ps = [range_params(state, s) for s in (0, 1)]
    modes = (ps[0].mode, ps[1].mode)
    fmt = Arm64Formats((arm64_format(ps[0], state.mair), arm64_format(ps[1], state.mair)))
    tables = _Tables(_reader(read_phys, state), 8, None, 0)
    wxn = bool(state.sctlr & SCTLR_WXN)
    parts: List[tuple] = []
    for s, p in enumerate(ps):
        r = _Range(p, state.mair)
        window = range_window(p, start, end)
        if r.start_fault != FAULT_NONE or window is None:
            continue
        base, lo, hi = window
        cols, lost = _range_leaves(tables, r, lo, hi,
                                   lambda e, t, hd=p.hd: _rights(e, t, wxn, hd))
        if on_unreadable is not None and lost:
            _report_unreadable(p.mode, tables, lost, on_unreadable)
        if cols is not None:
            parts.append((s, base, r.depth, cols))
    depth = max([r_depth for _, _, r_depth, _ in parts], default=0)
    if not parts:
        return _no_leaves(max(len(m.levels) for m in modes), modes, fmt)
    columns = []
    for s, base, r_depth, (raw, pa, size, entry, w, u, x, level, path) in parts:
        order = np.argsort(raw, kind="stable")    # raw VAs are distinct: leaves never overlap
        if r_depth < depth:
            path = np.concatenate((path, np.zeros((len(path), depth - r_depth), U64)), axis=1)
        columns.append((raw[order] + U64(base), pa[order], size[order], entry[order],
                        w[order], u[order], x[order], level[order], path[order],
                        np.full(len(raw), s, np.uint8)))
    va, pa, size, entry, w, u, x, level, path, select = (np.concatenate(c)
                                                         for c in zip(*columns))
    return Arm64LeafArrays(va, pa, size, entry, w, u, x, level, path,
                           modes[0] if modes[0] == modes[1] else None, fmt, select=select,
                           modes=modes)


def _range_leaves(tables: _Tables, r: _Range, lo: int, hi: int, rights, once: bool = False):
    """The leaves of one range overlapping raw VAs [lo, hi), as iter_leaves finds them with
    the format's present / is_leaf / valid / frame: (columns or None, unreadable visits).
    rights(leaf entries, table attributes above) -> (writable, user, executable). once: a
    table met again at a level is walked at its first visit only (iter_leaves' on_repeat,
    as the stage 2 lister walks)."""
    whole = lo == 0 and hi == 1 << r.mode.va_bits
    addr = np.array([r.root], U64)
    base = np.zeros(1, U64)
    tattrs = np.zeros(1, U64)
    path = np.zeros((1, r.depth), U64)
    leaves: List[tuple] = []
    lost: List[tuple] = []                     # unreadable visits: (base, level, address)
    for i in range(r.depth):
        if not len(addr):
            break
        shift, count, last, blocks, leaf_mask, size = r.level(i)
        if once and len(addr) > 1:              # visits are in address order: keep the first
            first = np.sort(np.unique(addr, return_index=True)[1])
            if len(first) < len(addr):
                addr, base, tattrs, path = addr[first], base[first], tattrs[first], path[first]
        rows, row, readable = tables.stack(addr, count)
        gone = ~readable[row]
        if gone.any():
            lost.append((base[gone], np.full(int(gone.sum()), i), addr[gone]))
            keep = ~gone
            row, base, tattrs, path = row[keep], base[keep], tattrs[keep], path[keep]
        e = rows[row]                                            # (visits, count)
        kind = (e & U64(3)) == U64(3) if last or not blocks else (e & U64(1)) != 0
        v, k = np.nonzero(kind)                  # row-major: address order per visit
        e = e[v, k]
        va = base[v] + (k.astype(U64) << shift)
        keep = np.ones(len(e), bool)
        if not whole:                            # entries overlapping [lo, hi) only
            keep &= (va < U64(hi)) & (va + (U64(1) << shift) > U64(lo))
        t = (e & U64(TABLE)) != 0
        leaf = np.ones(len(e), bool) if last else ~t
        oa = r.frame(e, leaf_mask if last else np.where(t, r.table_mask, leaf_mask))
        keep &= (oa >> r.oa_bits) == 0           # within the output address size
        if not keep.all():
            v, e, va, leaf, oa = v[keep], e[keep], va[keep], leaf[keep], oa[keep]
        above = tattrs[v]
        path = path[v]
        path[:, i] = e
        found = int(leaf.sum())
        if found:
            le = e[leaf]
            wr, us, ex = rights(le, above[leaf])
            leaves.append((va[leaf], oa[leaf], np.full(found, size, U64), le, wr, us, ex,
                           np.full(found, i, np.int8), path[leaf]))
        down = ~leaf
        addr, base, path = oa[down], va[down], path[down]
        tattrs = above[down] | (e[down] & r.tattr_mask)
    if not leaves:
        return None, lost
    return tuple(np.concatenate(c) for c in zip(*leaves)), lost


# ---------------------------------------------------------------- stage 2's map

class Stage2LeafArrays(LeafArrays):
    """LeafArrays of a stage 2 IPA space (format: arm64_stage2_format.Stage2Format)."""

    @property
    def readable(self) -> np.ndarray:
        """S2AP[0]: stage 2 lets data be read (S2AP=00/10 map pages that only fault)."""
        return (self.entry >> np.uint64(6) & np.uint64(1)).astype(bool)


class _Stage2Range(_Range):
    """A stage 2 IPA space as _range_leaves walks it: one range from 0, the (concatenated)
    first level read at once, no table attributes (stage 2 tables carry none), S2AP/XN."""

    def __init__(self, p):
        from .arm64_stage2_format import stage2_format
        self._set(p, stage2_format(p), p.root, FAULT_NONE, 0)   # (the caller checked the start)

    def rights(self, e: np.ndarray, _above) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(writable, user, executable) as arm64_stage2._rights: S2AP[1] (or DBM=1 with
        hardware dirty state), every EL alike, executable at EL1 or EL0 (XN[1:0] != 10;
        without FEAT_XNX XN[1] alone)."""
        xn = (e >> U64(53)) & U64(3 if self.p.xnx else 2)
        writable = (e & U64(1 << 7)) != 0
        if self.p.hd:
            writable |= (e & U64(DBM)) != 0
        return writable, np.ones(len(e), bool), xn != U64(2)


def leaf_arrays_stage2(read_phys: ReadPhys, vttbr: int, vtcr: int, start: int = 0,
                       end: Optional[int] = None, *, id_aa64mmfr0: Optional[int] = None,
                       id_aa64mmfr1: Optional[int] = None, id_aa64mmfr2: Optional[int] = None,
                       hcr: Optional[int] = None,
                       on_unreadable: Optional[OnUnreadable] = None):
    """iter_mappings_stage2's leaves as vector.LeafArrays (va = the IPA), for the commands that
    take a whole address space (vmmap, search): the map of a guest whose stage 1 is off, where
    its addresses are its IPAs. A level at a time, as the stage 1 lister (each table read once,
    whole; a table met again at a level walked once, as iter_mappings_stage2 walks it).
    `user` is True (stage 2 gives EL0 and EL1 the same data rights); `readable` is S2AP[0]."""
    from .arm64_stage2_format import HCR_DC, HCR_VM, s2_params, stage2_format
    p = s2_params(vtcr, vttbr, id_aa64mmfr0, id_aa64mmfr1, id_aa64mmfr2, hcr)
    depth = len(p.mode.levels) if p.mode else 0
    fmt = stage2_format(p) if p.mode else None
    lo = max(start, 0)
    hi = min(1 << p.ia_bits, (1 << 64) if end is None else end) if p.mode else 0
    cols = None
    if not (p.setup_fault or p.root >> p.oa_bits or lo >= hi
            or (hcr is not None and not hcr & (HCR_VM | HCR_DC))):
        tables = _Tables(read_phys, 8, None, 0)
        r = _Stage2Range(p)
        cols, lost = _range_leaves(tables, r, lo, hi, r.rights, once=True)
        if on_unreadable is not None and lost:
            _report_unreadable(p.mode, tables, lost, on_unreadable)
    if cols is None:
        u64, flag = np.zeros(0, U64), np.zeros(0, bool)
        return Stage2LeafArrays(u64, u64.copy(), u64.copy(), u64.copy(), flag, flag.copy(),
                                flag.copy(), np.zeros(0, np.int8), np.zeros((0, depth), U64),
                                p.mode, fmt)
    ipa, pa, size, entry, w, u, x, level, path = cols
    order = np.argsort(ipa, kind="stable")       # leaves never overlap: IPA order
    return Stage2LeafArrays(ipa[order], pa[order], size[order], entry[order], w[order],
                            u[order], x[order], level[order], path[order], p.mode, fmt)


class TwoStageLeafArrays(Arm64LeafArrays):
    """LeafArrays of a guest's address space through both stages (compose_stages): va, pa
    (the machine's physical address), size (the piece both stages map alike), stage 1's
    entry, level, path and format (its flags); `ipa` the IPA of each piece, `readable` what
    both stages let be read."""
    ipa = None
    readable = None


def compose_stages(s1: Arm64LeafArrays, s2: LeafArrays) -> TwoStageLeafArrays:
    """Stage 1's leaves (va -> IPA) through stage 2's (IPA -> PA, in IPA order, as
    leaf_arrays_stage2 gives them): each piece of a stage 1 leaf that one stage 2 leaf maps,
    in VA order, as a leaf va -> PA the size of the piece (the smaller of the two pages,
    where they are aligned as pages are), writable and executable where both stages allow
    it, user as stage 1 says. The parts of a stage 1 leaf stage 2 does not map are left out
    (an access there takes a stage 2 fault)."""
    u64 = np.uint64
    lo = s1.pa.astype(u64)
    hi = lo + s1.size.astype(u64)
    s2_lo = s2.va.astype(u64)
    s2_hi = s2_lo + s2.size.astype(u64)
    first = np.searchsorted(s2_hi, lo, side="right")      # the first stage 2 leaf past lo
    stop = np.searchsorted(s2_lo, hi, side="left")        # ... and the first at or past hi
    count = np.maximum(stop - first, 0)
    i = np.repeat(np.arange(len(s1)), count)              # stage 1 leaf of each piece
    starts = np.cumsum(count) - count
    j = first[i] + (np.arange(int(count.sum())) - starts[i])   # its stage 2 leaf
    piece_lo = np.maximum(lo[i], s2_lo[j])
    piece_hi = np.minimum(hi[i], s2_hi[j])
    s1_readable = getattr(s1, "readable", None)
    s2_readable = getattr(s2, "readable", None)
    readable = np.ones(len(i), bool)
    if s1_readable is not None:
        readable &= np.asarray(s1_readable)[i]
    if s2_readable is not None:
        readable &= np.asarray(s2_readable)[j]
    out = TwoStageLeafArrays(
        s1.va[i] + (piece_lo - lo[i]), s2.pa[j] + (piece_lo - s2_lo[j]), piece_hi - piece_lo,
        s1.entry[i], s1.writable[i] & s2.writable[j], s1.user[i],
        s1.executable[i] & s2.executable[j], s1.level[i], s1.path[i], s1.mode, s1.format,
        select=s1.select[i], modes=s1.modes)
    out.ipa = piece_lo
    out.readable = readable
    return out
