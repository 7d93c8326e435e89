"""numpy twins of the RISC-V walkers (riscv.py), for address batches and whole address spaces:
walk_array_riscv() answers for every address of a batch what walk_riscv() answers for an S-mode
read, leaf_arrays_riscv() lists exactly what iter_mappings_riscv() lists.

Both ask the same format (riscv_format.RiscvFormat: the reserved-bit masks, the extensions in
use, superpage alignment, NAPOT) as the scalar walkers, and work as paging.vector does: a level
at a time, every table needed at a level read once, whole, in one read_phys call
(paging.vector._Tables), the PTEs of all addresses (or all entries) of that level decoded at
once. Python loops only over distinct tables. The property tests
(tests/unit/test_riscv_vector.py) hold them to the scalar walkers.
"""

from __future__ import annotations

from functools import cached_property
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .model import PagingMode, ReadPhys, Walk
from .riscv import walk_riscv
from .riscv_format import (
    A, N, NAPOT_SIZE, PBMT, PPN_MASK, R, RWX, U, V, W, X, RiscvFormat, RiscvState,
    riscv_format, riscv_mode, satp_root,
)
from .vector import (
    FAULT_ACCESS_FLAG, FAULT_MISALIGNED_SUPERPAGE, FAULT_NO_LEAF, FAULT_NONE,
    FAULT_NON_CANONICAL, FAULT_NOT_PRESENT, FAULT_PAGING_DISABLED, FAULT_RESERVED_BIT,
    FAULT_UNREADABLE, BatchWalk, LeafArrays, OnUnreadable, _addresses, _canonical,
    _report_unreadable, _Tables,
)
from .x86 import raw_bounds

__all__ = ["walk_array_riscv", "leaf_arrays_riscv", "RiscvBatchWalk", "RiscvLeafArrays"]

U64 = np.uint64
COUNT = 512                     # PTEs per table at every level


class _Level:
    """One level's rules as numpy constants, from the RiscvFormat the scalar walk asks."""

    def __init__(self, fmt: RiscvFormat, i: int):
        self.shift = U64(fmt.mode.levels[i].shift)
        self.last = i == fmt.last
        self.size = fmt.sizes[i]
        self.leaf_bad, self.table_bad = U64(fmt.leaf_bad), U64(fmt.table_bad)
        self.align = U64(fmt.align[i])

    @staticmethod
    def is_leaf(e: np.ndarray) -> np.ndarray:
        return (e & U64(RWX)) != 0

    def reserved(self, e: np.ndarray, leaf: np.ndarray) -> np.ndarray:
        """RiscvFormat.problems is not empty (4.3.2 step 3)."""
        rwx = e & U64(RWX)
        bad_leaf = (((e & self.leaf_bad) != 0) | (rwx == U64(W)) | (rwx == U64(W | X))
                    | ((e & U64(PBMT)) == U64(PBMT)))
        napot = (e & U64(N)) != 0
        if self.last:       # only 1000 in ppn[3:0] (64 KiB) is a NAPOT encoding
            bad_leaf |= napot & (((e >> U64(10)) & U64(0xF)) != U64(8))
        else:
            bad_leaf |= napot
        return np.where(leaf, bad_leaf, (e & self.table_bad) != 0)

    def fault(self, e: np.ndarray, readable: np.ndarray, leaf: np.ndarray,
              access_flag: bool) -> np.ndarray:
        """The fault code of each PTE read here, as _walk_tables (and walk_riscv's A check)
        find them, in their order."""
        code = np.full(e.shape, FAULT_NONE, np.uint8)
        checks = [(~readable, FAULT_UNREADABLE), ((e & U64(V)) == 0, FAULT_NOT_PRESENT),
                  (self.reserved(e, leaf), FAULT_RESERVED_BIT)]
        if self.last:
            checks.append((~leaf, FAULT_NO_LEAF))
        checks.append((leaf & (((e >> U64(10)) & self.align) != 0), FAULT_MISALIGNED_SUPERPAGE))
        if access_flag:
            checks.append((leaf & ((e & U64(A)) == 0), FAULT_ACCESS_FLAG))
        for bad, reason in reversed(checks):       # the first check that fails wins
            code[bad] = reason
        return code


def _frame(e: np.ndarray) -> np.ndarray:
    return (e & U64(PPN_MASK)) << U64(2)          # (ppn >> 10) << 12


def _rights(e: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (e & U64(W)) != 0, (e & U64(U)) != 0, (e & U64(X)) != 0


# ---------------------------------------------------------------- address batches

class RiscvBatchWalk(BatchWalk):
    """BatchWalk of a RISC-V batch: fault_level and leaf_level index mode.levels, as x86's;
    with readable, which an x86 or aarch64 BatchWalk has not (a page they map is readable)."""

    @cached_property
    def readable(self) -> np.ndarray:
        """R=1 in the leaf, as RiscvLeafArrays.readable: a load works (an execute-only page,
        R=0 X=1, needs mstatus.MXR); False where the address did not translate."""
        n = len(self.va)
        if self.entries is None or not n or not self.ok.any():
            return np.zeros(n, bool)
        leaf = self.entries[np.arange(n), np.maximum(self.leaf_level, 0)]
        return self.ok & ((leaf & U64(R)) != 0)

    def walk(self, i: int, read_phys: ReadPhys, cpu: RiscvState,  # type: ignore[override]
             access: str = "s-read") -> Walk:
        """The full scalar walk of element i (levels, access table, messages, notes)."""
        return walk_riscv(read_phys, cpu, int(self.va[i]), access)


def walk_array_riscv(read_phys: ReadPhys, state: RiscvState,
                     vas: Union[np.ndarray, Sequence[int]]) -> RiscvBatchWalk:
    """Translate every address of `vas` (integers 0 .. 2**64-1) as walk_riscv(read_phys, state,
    va) would for an S-mode read, for the whole batch at once. Each distinct table is read once
    per call, whole; where a whole table does not read, the needed PTEs are read one by one, as
    walk_riscv reads them. Never raises for what it reads. Permission denials are not faults
    (as there); what walk_riscv adds per address (levels, access table, scause codes, messages,
    notes) is left to RiscvBatchWalk.walk."""
    va = _addresses(vas)
    n = len(va)
    mode = riscv_mode(state)
    if mode is None:
        return RiscvBatchWalk(va, np.zeros(n, bool), np.zeros(n, U64), np.zeros(n, U64),
                              np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool),
                              np.full(n, FAULT_PAGING_DISABLED, np.uint8),
                              np.full(n, -1, np.int8), None, 0)
    fmt = riscv_format(state, mode)
    root = satp_root(state.satp)
    depth = len(mode.levels)
    tables = _Tables(read_phys, 8, mode, root)
    ok, pa, page_size = np.zeros(n, bool), np.zeros(n, U64), np.zeros(n, U64)
    writable, user, executable = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    reason, level = np.zeros(n, np.uint8), np.full(n, -1, np.int8)
    leaf_level = np.full(n, -1, np.int8)
    entries, tables_read = np.zeros((n, depth), U64), np.zeros((n, depth), U64)
    canonical = _canonical(mode, va)
    reason[~canonical] = FAULT_NON_CANONICAL
    todo = np.flatnonzero(canonical)
    table = np.full(len(todo), root, U64)
    access_flag = state.hardware_ad is False
    for i in range(depth):
        if not len(todo):
            break
        lv = _Level(fmt, i)
        v = va[todo]
        e, readable = tables.entries(table, (v >> lv.shift) & U64(COUNT - 1), COUNT)
        entries[todo, i], tables_read[todo, i] = e, table
        leaf = lv.is_leaf(e)
        code = lv.fault(e, readable, leaf, access_flag)
        stop = code != FAULT_NONE
        reason[todo[stop]] = code[stop]
        level[todo[stop]] = i
        done = ~stop & leaf
        if done.any():
            k, d = todo[done], e[done]
            napot = (d & U64(N)) != 0                  # valid here: the checks passed
            size = np.where(napot, U64(NAPOT_SIZE), U64(lv.size))
            frame = np.where(napot, _frame(d) & ~U64(NAPOT_SIZE - 1), _frame(d))
            ok[k] = True
            pa[k] = frame | (va[k] & (size - U64(1)))
            page_size[k] = size
            leaf_level[k] = i
            writable[k], user[k], executable[k] = _rights(d)
        down = ~stop & ~leaf
        todo, table = todo[down], _frame(e[down])
    return RiscvBatchWalk(va, ok, pa, page_size, writable, user, executable, reason, level,
                          mode, root, entries, tables_read, leaf_level)


# ---------------------------------------------------------------- whole address spaces

class RiscvLeafArrays(LeafArrays):
    """LeafArrays of a RISC-V address space (format: the RiscvFormat, whose flag_bits
    LeafArrays.mappings keys its flag cache on)."""

    @property
    def readable(self) -> np.ndarray:
        """R=1: a load works (execute-only pages, R=0 X=1, need mstatus.MXR)."""
        return (self.entry & U64(R)) != 0


def _no_leaves(mode: Optional[PagingMode], fmt: Optional[RiscvFormat]) -> RiscvLeafArrays:
    depth = len(mode.levels) if mode else 0
    u64, flag = np.zeros(0, U64), np.zeros(0, bool)
    return RiscvLeafArrays(u64, u64.copy(), u64.copy(), u64.copy(), flag, flag.copy(),
                           flag.copy(), np.zeros(0, np.int8), np.zeros((0, depth), U64), mode,
                           fmt)


def leaf_arrays_riscv(read_phys: ReadPhys, state: RiscvState, start: int = 0,
                      end: Optional[int] = None, on_unreadable: Optional[OnUnreadable] = None
                      ) -> RiscvLeafArrays:
    """Every valid leaf overlapping [start, end) (sign-extended addresses, end exclusive, None =
    to 2**64), in address order, as arrays: what iter_mappings_riscv yields (leaves with A=0
    included; a NAPOT PTE as its own 4 KiB). Each table is read once, whole, with one
    read_phys(table, 4096) call; unreadable tables are skipped and passed to
    on_unreadable(level name, address, error) in the order iter_mappings_riscv would. Nothing
    with satp.MODE Bare."""
    mode = riscv_mode(state)
    if mode is None:
        return _no_leaves(None, None)
    fmt = riscv_format(state, mode)
    root = satp_root(state.satp)
    lo, hi = raw_bounds(mode, start, end)
    depth = len(mode.levels)
    whole = lo == 0 and hi == 1 << mode.va_bits
    tables = _Tables(read_phys, 8, mode, root)
    # the table visits of the current level: table address, raw VA of its entry 0, the path
    addr = np.array([root] if lo < hi else [], U64)
    base = np.zeros(len(addr), U64)
    path = np.zeros((len(addr), depth), U64)
    leaves: List[tuple] = []
    lost: List[tuple] = []                      # unreadable visits: (base, level, address)
    for i in range(depth):
        if not len(addr):
            break
        lv = _Level(fmt, i)
        rows, row, readable = tables.stack(addr, COUNT)
        gone = ~readable[row]
        if gone.any():
            lost.append((base[gone], np.full(int(gone.sum()), i), addr[gone]))
            keep = ~gone
            row, base, path = row[keep], base[keep], path[keep]
        e = rows[row]                                            # (visits, 512)
        leaf = lv.is_leaf(e)
        use = lv.fault(e, np.ones(e.shape, bool), leaf, False) == FAULT_NONE
        if not whole:                                            # overlapping [lo, hi) only
            starts = base[:, None] + (np.arange(COUNT, dtype=U64) << lv.shift)
            use &= (starts < U64(hi)) & (starts + (U64(1) << lv.shift) > U64(lo))
        v, k = np.nonzero(use)                     # row-major: address order per visit
        e, leaf = e[v, k], leaf[v, k]
        va = base[v] + (k.astype(U64) << lv.shift)
        path = path[v]
        path[:, i] = e
        found = int(leaf.sum())
        if found:
            le, lva = e[leaf], va[leaf]
            frame = _frame(le)
            napot = (le & U64(N)) != 0               # its own 4 KiB of the 64 KiB page
            frame = np.where(napot, (frame & ~U64(NAPOT_SIZE - 1)) | (lva & U64(0xF000)), frame)
            leaves.append((lva, frame, np.full(found, lv.size, U64), le, *_rights(le),
                           np.full(found, i, np.int8), path[leaf]))
        down = ~leaf
        addr, base, path = _frame(e[down]), va[down], path[down]
    if on_unreadable is not None and lost:
        _report_unreadable(mode, tables, lost, on_unreadable)
    if not leaves:
        return _no_leaves(mode, fmt)
    cols = [np.concatenate(c) for c in zip(*leaves)]
    order = np.argsort(cols[0], kind="stable")   # raw VAs are distinct: leaves never overlap
    raw, pa, size, entry, w, u, x, lvl, path = (c[order] for c in cols)
    n = mode.va_bits
    va = np.where((raw >> U64(n - 1)) != 0, raw + U64((1 << 64) - (1 << n)), raw)
    return RiscvLeafArrays(va, pa, size, entry, w, u, x, lvl, path, mode, fmt)
