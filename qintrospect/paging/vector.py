"""numpy twins of the scalar x86 walkers, for whole address spaces and large address batches.

leaf_arrays() lists exactly what iter_mappings() lists, and walk_array() answers for every
address of a batch what walk() answers, as numpy arrays instead of one Python object per leaf
or address. Both ask the same entry formats (X86Format: reserved masks, address masks, page
sizes, the PSE-36 frame and the PAE PDPTE rights) that the scalar walkers ask, so they share
their semantics by construction; the property tests hold them to it.

The work is done a level at a time: every table needed at a level is read once (one
read_phys(table, size) call per distinct table and call, cached by address), the tables are
stacked in a 2-D array, and present / leaf / reserved / rights / frame are computed for all
entries (leaf_arrays) or all addresses (walk_array) of that level at once. Python loops only
over distinct tables. walk_second_level_array() is walk_ept()/walk_npt() for a batch of
guest-physical addresses, with the same level loop.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MemoryReadError
from ..record import record
from .formats import (EPT_BAD_MEMORY_TYPES, EPT_PS, EPT_R, EPT_W, EPT_XU, PS, RW, US, XD,
                      EptFormat, X86Format)
from .model import (
    ACCESS_FLAG, ADDRESS_SIZE, EPT_MISCONFIGURATION, EPT_VIOLATION, MISALIGNED_SUPERPAGE, NO_LEAF,
    NON_CANONICAL, NOT_PRESENT, PAGING_DISABLED, PERMISSION, RESERVED_BIT, TRANSLATION,
    UNREADABLE, CpuState, Mapping, PagingMode, ReadPhys, Walk,
)
from .modes import paging_mode
from .riscv_format import RiscvState
from .x86 import FLAG_BITS, raw_bounds, cr3_root, pdpte_registers, walk, x86_format

__all__ = [
    "LeafArrays", "BatchWalk", "leaf_arrays", "walk_array", "FAULT_REASONS",
    "FAULT_NONE", "FAULT_NOT_PRESENT", "FAULT_RESERVED_BIT", "FAULT_NON_CANONICAL",
    "FAULT_UNREADABLE", "FAULT_PAGING_DISABLED", "FAULT_EPT_VIOLATION",
    "FAULT_EPT_MISCONFIGURATION", "walk_second_level_array", "all_faulted",
    "FAULT_TRANSLATION", "FAULT_ACCESS_FLAG", "FAULT_ADDRESS_SIZE", "FAULT_PERMISSION",
    "FAULT_MISALIGNED_SUPERPAGE", "FAULT_NO_LEAF",
]

U64 = np.uint64   # every entry and address is uint64; constants too (no int64/float promotion)

#: BatchWalk.fault_reason codes; FAULT_REASONS[code] is the scalar Fault.reason (None for 0).
FAULT_NONE, FAULT_NOT_PRESENT, FAULT_RESERVED_BIT, FAULT_NON_CANONICAL = 0, 1, 2, 3
FAULT_UNREADABLE, FAULT_PAGING_DISABLED = 4, 5
FAULT_EPT_VIOLATION, FAULT_EPT_MISCONFIGURATION = 6, 7
# AArch64 stage 1 (arm64_vector.py; a permission denial is never a walk's fault, the code is
# there for completeness)
FAULT_TRANSLATION, FAULT_ACCESS_FLAG, FAULT_ADDRESS_SIZE, FAULT_PERMISSION = 8, 9, 10, 11
# RISC-V (riscv_vector.py; it uses NOT_PRESENT, RESERVED_BIT, NON_CANONICAL, ACCESS_FLAG too)
FAULT_MISALIGNED_SUPERPAGE, FAULT_NO_LEAF = 12, 13
FAULT_REASONS = (None, NOT_PRESENT, RESERVED_BIT, NON_CANONICAL, UNREADABLE, PAGING_DISABLED,
                 EPT_VIOLATION, EPT_MISCONFIGURATION, TRANSLATION, ACCESS_FLAG, ADDRESS_SIZE,
                 PERMISSION, MISALIGNED_SUPERPAGE, NO_LEAF)

OnUnreadable = Callable[[str, int, Exception], None]


def _other_arch(cpu):
    """The numpy walkers of a state that is not x86's: riscv_vector's or arm64_vector's
    (imported on first use, as the scalar walkers are)."""
    if isinstance(cpu, RiscvState):
        from . import riscv_vector
        return riscv_vector.walk_array_riscv, riscv_vector.leaf_arrays_riscv
    from . import arm64_vector
    return arm64_vector.walk_array_arm64, arm64_vector.leaf_arrays_arm64


class _Level:
    """One level's rules as numpy constants, all taken from the entry format."""

    not_present, invalid = FAULT_NOT_PRESENT, FAULT_RESERVED_BIT
    large_bit = U64(PS)          # where a large-page level says its entry is a leaf

    def __init__(self, mode: PagingMode, fmt: X86Format, i: int):
        spec = mode.levels[i]
        self.name = spec.name
        self.shift = U64(spec.shift)
        self.count = 1 << spec.index_bits
        self.last = i == fmt.last
        self.large = bool(fmt.large[i]) and not self.last   # no 1 GiB pages: never a leaf
        self.table_mask = U64(fmt.reserved_mask(i, False))
        self.leaf_mask = U64(fmt.reserved_mask(i, True))
        self.table_addr = U64(fmt.table_addr[i])
        self.leaf_addr = U64(fmt.leaf_addr[i])
        self.page_size = fmt.page_size(i, True) or 0    # 0: entries here are never leaves
        kind = getattr(fmt, "kind", None)
        self.pse36 = kind == "32-bit" and i == 0    # X86Format.frame's special case
        self.no_rights = kind == "pae" and i == 0   # PDPTEs: no R/W, U/S or XD
        self.xd = U64(XD if getattr(fmt, "nxe", False) else 0)

    @staticmethod
    def present(e: np.ndarray) -> np.ndarray:
        return (e & U64(1)) != 0

    def is_leaf(self, e: np.ndarray) -> np.ndarray:
        if self.last:
            return np.ones(e.shape, bool)
        if self.large:
            return (e & self.large_bit) != 0
        return np.zeros(e.shape, bool)

    def valid(self, e: np.ndarray, leaf: np.ndarray) -> np.ndarray:
        if self.table_mask == self.leaf_mask:
            return (e & self.leaf_mask) == 0
        return (e & np.where(leaf, self.leaf_mask, self.table_mask)) == 0

    def frame(self, e: np.ndarray) -> np.ndarray:
        """The page frame of leaf entries."""
        if self.pse36:   # a 4 MiB PDE keeps physical bits 39:32 in bits 20:13
            return (e & U64(0xFFC00000)) | ((e >> U64(13)) & U64(0xFF)) << U64(32)
        return e & self.leaf_addr

    def rights(self, e: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(R/W, U/S, XD) of each entry, as X86Format.rights."""
        if self.no_rights:
            return np.ones(e.shape, bool), np.ones(e.shape, bool), np.zeros(e.shape, bool)
        return (e & U64(RW)) != 0, (e & U64(US)) != 0, (e & self.xd) != 0

    def allowed(self, e: np.ndarray) -> Tuple[np.ndarray, ...]:
        """What each entry allows: (write, user, execute); a walk allows what all its levels do."""
        rw, us, xd = self.rights(e)
        return rw, us, ~xd


class _Tables:
    """Tables read whole, once per call: (address, entry count) -> uint64 entries or None."""

    def __init__(self, read_phys: ReadPhys, entry_size: int, mode: PagingMode, root: int,
                 root_entries: Optional[Tuple[int, ...]] = None):
        self.read_phys = read_phys
        self.size = entry_size
        self.dtype = np.dtype("<u4" if entry_size == 4 else "<u8")
        self.cache: Dict[Tuple[int, int], Optional[np.ndarray]] = {}
        self.errors: Dict[Tuple[int, int], Exception] = {}
        if root_entries is not None:
            # the PAE PDPTE registers stand for the PDPT, as in walk_tables/iter_leaves; keyed by
            # (address, entry count), so lower tables and single-entry reads never hit it
            self.cache[(root, 1 << mode.levels[0].index_bits)] = np.array(root_entries, U64)

    def get(self, addr: int, count: int) -> Optional[np.ndarray]:
        key = (addr, count)
        if key not in self.cache:
            n = count * self.size
            try:
                data = self.read_phys(addr, n)
                if len(data) != n:
                    raise MemoryReadError(f"read returned {len(data)} bytes, not {n}", addr)
                self.cache[key] = np.frombuffer(data, self.dtype).astype(U64)
            except MemoryReadError as exc:
                self.cache[key] = None
                self.errors[key] = exc
        return self.cache[key]

    def stack(self, addrs: np.ndarray, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The distinct tables among `addrs`: (their entries, one row per table; the row of each
        address; whether each row could be read -- unreadable rows are zeros)."""
        uniq, row = np.unique(addrs, return_inverse=True)
        loaded = [self.get(a, count) for a in uniq.tolist()]
        readable = np.array([t is not None for t in loaded], bool)
        blank = np.zeros(count, U64)
        rows = np.stack([blank if t is None else t for t in loaded])
        return rows, row.reshape(-1), readable

    def entries(self, tables: np.ndarray, index: np.ndarray, count: int
                ) -> Tuple[np.ndarray, np.ndarray]:
        """Entry `index` of table `tables` for each element, and whether it could be read."""
        rows, row, readable = self.stack(tables, count)
        e = rows[row, index.astype(np.intp)]
        ok = readable[row]
        bad = np.nonzero(~ok)[0]
        if len(bad):
            # walk() reads single entries: where a whole table would not read, read just the
            # entries needed, so that a partly readable table answers as it does there
            where = tables[bad] + index[bad] * U64(self.size)
            uniq, back = np.unique(where, return_inverse=True)
            got = [self.get(a, 1) for a in uniq.tolist()]
            values = np.array([0 if g is None else g[0] for g in got], U64)
            read = np.array([g is not None for g in got], bool)
            e[bad] = values[back.reshape(-1)]
            ok[bad] = read[back.reshape(-1)]
        return e, ok


# ---------------------------------------------------------------- whole address spaces

@record(eq=False)
class LeafArrays:
    """Every present, valid leaf of an address space (what iter_mappings yields, same order),
    one array element per leaf. Rights are effective across the levels."""

    va: np.ndarray          # uint64, canonical (sign-extended in 4/5-level paging)
    pa: np.ndarray          # uint64 page frame
    size: np.ndarray        # uint64 page size
    entry: np.ndarray       # uint64 raw leaf entry
    writable: np.ndarray    # bool
    user: np.ndarray        # bool
    executable: np.ndarray  # bool
    level: np.ndarray       # int8, index of the leaf's level in mode.levels
    path: np.ndarray        # uint64 (N, depth): raw entries root first, zeros past `level`
    mode: Optional[PagingMode]
    format: Optional[X86Format] = None

    def __len__(self) -> int:
        return len(self.va)

    def mappings(self) -> Iterator[Mapping]:
        """The leaves as paging.Mapping objects, equal to iter_mappings' ones."""
        flags_of: Dict[Tuple[int, int], Tuple[str, ...]] = {}   # leaves repeat a few flag sets
        mask = getattr(self.format, "flag_bits", FLAG_BITS)     # the bits flags() reads
        columns = (self.va, self.pa, self.size, self.writable, self.user, self.executable,
                   self.level, self.entry, self.path)
        for va, pa, size, w, u, x, i, e, path in zip(*(c.tolist() for c in columns)):
            key = (i, e & mask)
            flags = flags_of.get(key)
            if flags is None:
                flags = flags_of[key] = self.format.flags(i, e, True)
            yield Mapping(va, pa, size, w, u, x, tuple(path[:i + 1]), flags)


def _no_leaves(mode: Optional[PagingMode], fmt: Optional[X86Format]) -> LeafArrays:
    depth = len(mode.levels) if mode else 0
    u64, flag = np.zeros(0, U64), np.zeros(0, bool)
    return LeafArrays(u64, u64.copy(), u64.copy(), u64.copy(), flag, flag.copy(), flag.copy(),
                      np.zeros(0, np.int8), np.zeros((0, depth), U64), mode, fmt)


def leaf_arrays(read_phys: ReadPhys, cpu: CpuState, start: int = 0, end: Optional[int] = None,
                on_unreadable: Optional[OnUnreadable] = None) -> LeafArrays:
    """Every present, valid leaf overlapping [start, end) (canonical addresses, end exclusive,
    None = to the top), in address order, as arrays; what iter_mappings yields. Each table is
    read once with one read_phys(table, 4096) call (32 bytes for the PAE PDPT); unreadable
    tables are skipped and passed to on_unreadable(level name, address, error), in the order
    iter_mappings would; the PAE PDPT is not read when cpu.pdptes holds the PDPTE registers.
    Nothing when CR0.PG=0. An AArch64 state (arm64.Arm64State) goes to
    arm64_vector.leaf_arrays_arm64, a RISC-V one (riscv_format.RiscvState) to
    riscv_vector.leaf_arrays_riscv."""
    if not isinstance(cpu, CpuState):
        return _other_arch(cpu)[1](read_phys, cpu, start, end, on_unreadable)
    mode = paging_mode(cpu)
    if mode is None:
        return _no_leaves(None, None)
    fmt = x86_format(cpu, mode)
    root, _ = cr3_root(cpu, mode)
    lo, hi = raw_bounds(mode, start, end)
    depth = len(mode.levels)
    whole = lo == 0 and hi == 1 << mode.va_bits     # no range test needed
    tables = _Tables(read_phys, mode.entry_size, mode, root, pdpte_registers(cpu, mode))

    # The table visits of the current level (the same table may be visited through several
    # entries): table address, raw VA of its entry 0, rights of the entries above, the entries.
    addr = np.array([root] if lo < hi else [], U64)
    base = np.zeros(len(addr), U64)
    rw, us, xd = np.ones(len(addr), bool), np.ones(len(addr), bool), np.zeros(len(addr), bool)
    path = np.zeros((len(addr), depth), U64)
    leaves: List[tuple] = []
    lost: List[tuple] = []          # unreadable visits: (base, level, address)

    for i in range(depth):
        if not len(addr):
            break
        lv = _Level(mode, fmt, i)
        rows, row, readable = tables.stack(addr, lv.count)
        gone = ~readable[row]
        if gone.any():
            lost.append((base[gone], np.full(int(gone.sum()), i), addr[gone]))
            keep = ~gone
            row, base, rw, us, xd, path = (a[keep] for a in (row, base, rw, us, xd, path))

        e = rows[row]                                    # (visits, count)
        leaf = lv.is_leaf(e)
        use = ((e & U64(1)) != 0) & lv.valid(e, leaf)    # present and no reserved bit set
        if not whole:                                    # entries overlapping [lo, hi) only
            starts = base[:, None] + (np.arange(lv.count, dtype=U64) << lv.shift)
            use &= (starts < U64(hi)) & (starts + (U64(1) << lv.shift) > U64(lo))
        v, k = np.nonzero(use)                           # row-major: address order per visit
        e, leaf = e[v, k], leaf[v, k]
        va = base[v] + (k.astype(U64) << lv.shift)
        r_rw, r_us, r_xd = lv.rights(e)
        rw, us, xd = rw[v] & r_rw, us[v] & r_us, xd[v] | r_xd
        path = path[v]
        path[:, i] = e

        found = int(leaf.sum())
        if found:
            leaves.append((va[leaf], lv.frame(e[leaf]), np.full(found, lv.page_size, U64),
                           e[leaf], rw[leaf], us[leaf], ~xd[leaf], np.full(found, i, np.int8),
                           path[leaf]))
        down = ~leaf
        addr, base = e[down] & lv.table_addr, va[down]
        rw, us, xd, path = rw[down], us[down], xd[down], path[down]

    if on_unreadable is not None and lost:
        _report_unreadable(mode, tables, lost, on_unreadable)
    if not leaves:
        return _no_leaves(mode, fmt)

    cols = [np.concatenate(c) for c in zip(*leaves)]
    order = np.argsort(cols[0], kind="stable")   # raw VAs are distinct: leaves never overlap
    raw, pa, size, entry, w, u, x, level, path = (c[order] for c in cols)
    va = raw
    if mode.va_bits > 32:                        # the upper half, sign-extended
        n = mode.va_bits
        upper = (raw >> U64(n - 1)) != 0
        va = np.where(upper, raw + U64((1 << 64) - (1 << n)), raw)
    return LeafArrays(va, pa, size, entry, w, u, x, level, path, mode, fmt)


def _report_unreadable(mode: PagingMode, tables: _Tables, lost: List[tuple],
                       on_unreadable: OnUnreadable) -> None:
    """Report each unreadable table once, at its first visit in iter_mappings' depth-first
    order: by raw VA of the visit, the shallower level first."""
    base, level, addr = (np.concatenate(c) for c in zip(*lost))
    seen = set()
    for k in np.lexsort((level, base)).tolist():
        i, a = int(level[k]), int(addr[k])
        key = (a, 1 << mode.levels[i].index_bits)
        if key not in seen:
            seen.add(key)
            on_unreadable(mode.levels[i].name, a, tables.errors[key])


# ---------------------------------------------------------------- address batches

@record(eq=False)
class BatchWalk:
    """walk() for every address of a batch, as arrays of length N. Where ok is False, pa and
    page_size are 0 and the rights False; fault_reason is a code (FAULT_REASONS[code] is the
    scalar Fault.reason) and fault_level the index of the level in mode.levels where the walk
    stopped (-1 when none, non-canonical or paging disabled)."""

    va: np.ndarray            # uint64
    ok: np.ndarray            # bool
    pa: np.ndarray            # uint64
    page_size: np.ndarray     # uint64
    writable: np.ndarray      # bool, effective across the levels
    user: np.ndarray          # bool
    executable: np.ndarray    # bool
    fault_reason: np.ndarray  # uint8 code
    fault_level: np.ndarray   # int8
    mode: Optional[PagingMode]
    root: int
    # what each level read: the entry and the table it came from, (N, depth), zeros past the
    # level where the walk ended; and that level's index for the elements that translated
    entries: Optional[np.ndarray] = None
    tables: Optional[np.ndarray] = None
    leaf_level: Optional[np.ndarray] = None   # int8, -1 where not ok
    # an EPT walk's (read, write, execute, user-execute), each allowed by every level
    ept_rights: Optional[Tuple[np.ndarray, ...]] = None

    def __len__(self) -> int:
        return len(self.va)

    def reason(self, i: int) -> Optional[str]:
        """Element i's fault reason as walk() spells it, None when it translated."""
        return FAULT_REASONS[int(self.fault_reason[i])]

    def level_name(self, i: int) -> Optional[str]:
        """Name of the level where element i's walk stopped, as Fault.level."""
        k = int(self.fault_level[i])
        return None if k < 0 or self.mode is None else self.mode.levels[k].name

    def walk(self, i: int, read_phys: ReadPhys, cpu: CpuState,
             access: str = "supervisor-read") -> Walk:
        """The full scalar walk of element i (levels, access table, messages)."""
        return walk(read_phys, cpu, int(self.va[i]), access)


def _addresses(vas: Union[np.ndarray, Sequence[int]]) -> np.ndarray:
    """The batch as a uint64 array, refusing what is not an integer 0 .. 2**64-1."""
    arr = vas if isinstance(vas, np.ndarray) else None
    if arr is None or arr.dtype.kind == "O":
        # not np.asarray: it turns a list mixing small and >= 2**63 ints into float64
        values = vas if isinstance(vas, list) else list(vas)
        if not set(map(type, values)) <= {int}:     # (checking is cheaper than converting)
            values = [operator.index(v) for v in values]
        if values and (min(values) < 0 or max(values) >= 1 << 64):
            raise ValueError("addresses must be integers 0 .. 2**64-1")
        return np.array(values, U64)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "ui"):
        raise ValueError(f"addresses must be a 1-D array of integers, not {arr.dtype} "
                         f"of shape {arr.shape}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError("addresses must be integers 0 .. 2**64-1, not negative")
    return arr.astype(U64)


def _canonical(mode: PagingMode, va: np.ndarray) -> np.ndarray:
    """What x86._canonical_fault accepts."""
    if mode.name in ("32-bit", "pae"):
        return (va >> U64(32)) == 0
    top = va >> U64(mode.va_bits - 1)           # bits 63:n-1 all equal
    return (top == 0) | (top == U64((1 << (65 - mode.va_bits)) - 1))


def walk_array(read_phys: ReadPhys, cpu: CpuState,
               vas: Union[np.ndarray, Sequence[int]]) -> BatchWalk:
    """Translate every address of `vas` (integers 0 .. 2**64-1) as walk() would, level by level
    for the whole batch. Each distinct table is read once per call, whole; where a whole table
    does not read, the needed entries are read one by one, as walk() reads them. Never raises
    for what it reads. What walk() adds per address (the levels, the per-access table with
    SMEP/SMAP/protection keys and #PF error codes, messages, notes) is left to BatchWalk.walk.
    An AArch64 state (arm64.Arm64State) goes to arm64_vector.walk_array_arm64, a RISC-V one
    (riscv_format.RiscvState) to riscv_vector.walk_array_riscv."""
    if not isinstance(cpu, CpuState):
        return _other_arch(cpu)[0](read_phys, cpu, vas)
    va = _addresses(vas)
    mode = paging_mode(cpu)
    if mode is None:
        return all_faulted(va, FAULT_PAGING_DISABLED)
    root, _ = cr3_root(cpu, mode)
    fmt = x86_format(cpu, mode)
    tables = _Tables(read_phys, mode.entry_size, mode, root, pdpte_registers(cpu, mode))
    levels = [_Level(mode, fmt, i) for i in range(len(mode.levels))]
    w = _walk_levels(tables, mode, levels, root, va, _canonical(mode, va), FAULT_NON_CANONICAL)
    writable, user, executable = w.rights
    return BatchWalk(va, w.ok, w.pa, w.page_size, writable, user, executable, w.reason,
                     w.level, mode, root, w.entries, w.tables_read, w.leaf_level)


def all_faulted(addresses, code: int, mode: Optional[PagingMode] = None,
                root: int = 0) -> BatchWalk:
    """A batch every element of which faults with `code` before any level (CR0.PG=0, an
    invalid EPTP)."""
    va = _addresses(addresses)
    n = len(va)
    return BatchWalk(va, np.zeros(n, bool), np.zeros(n, U64), np.zeros(n, U64),
                     np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool),
                     np.full(n, code, np.uint8), np.full(n, -1, np.int8), mode, root)


@record(eq=False)
class _Walked:
    ok: np.ndarray
    pa: np.ndarray
    page_size: np.ndarray
    rights: Tuple[np.ndarray, ...]   # each right allowed by every level, as the levels say
    reason: np.ndarray
    level: np.ndarray
    entries: np.ndarray
    tables_read: np.ndarray
    leaf_level: np.ndarray


def _walk_levels(tables: _Tables, mode: PagingMode, levels, root: int, va: np.ndarray,
                 in_range: np.ndarray, out_of_range: int) -> _Walked:
    """The level loop shared by the guest's and the second-level walks: levels[i] says what an
    entry at level i means (present, leaf, valid, frame, rights and the fault codes)."""
    n, depth = len(va), len(mode.levels)
    ok, pa, page_size = np.zeros(n, bool), np.zeros(n, U64), np.zeros(n, U64)
    reason, level = np.zeros(n, np.uint8), np.full(n, -1, np.int8)
    reason[~in_range] = out_of_range
    entries, tables_read = np.zeros((n, depth), U64), np.zeros((n, depth), U64)
    leaf_level = np.full(n, -1, np.int8)
    todo = np.nonzero(in_range)[0]             # the elements still walking
    table = np.full(len(todo), root, U64)      # and the table each reads at this level
    kinds = len(levels[0].allowed(np.zeros(0, U64)))
    allowed = [np.ones(len(todo), bool) for _ in range(kinds)]
    rights = [np.zeros(n, bool) for _ in range(kinds)]
    for i, lv in enumerate(levels):
        if not len(todo):
            break
        index = (va[todo] >> lv.shift) & U64(lv.count - 1)
        e, readable = tables.entries(table, index, lv.count)
        entries[todo, i], tables_read[todo, i] = e, table
        present = lv.present(e)
        leaf = lv.is_leaf(e)
        valid = lv.valid(e, leaf)

        code = np.where(~readable, FAULT_UNREADABLE,
                        np.where(~present, lv.not_present,
                                 np.where(~valid, lv.invalid, FAULT_NONE)))
        stop = code != FAULT_NONE
        reason[todo[stop]] = code[stop]
        level[todo[stop]] = i

        allowed = [a & r for a, r in zip(allowed, lv.allowed(e))]
        done = ~stop & leaf
        if done.any():
            k = todo[done]
            ok[k] = True
            pa[k] = lv.frame(e[done]) | (va[k] & U64(lv.page_size - 1))
            page_size[k] = lv.page_size
            leaf_level[k] = i
            for r, a in zip(rights, allowed):
                r[k] = a[done]
        down = ~stop & ~leaf
        todo, table = todo[down], e[down] & lv.table_addr
        allowed = [a[down] for a in allowed]
    return _Walked(ok, pa, page_size, tuple(rights), reason, level, entries, tables_read,
                   leaf_level)


class _EptLevel(_Level):
    """One EPT level's rules (EptFormat's): present is any of R/W/X (and XU with mode-based
    execute control); W without R, or a reserved memory type at a leaf, is a misconfiguration."""

    not_present, invalid = FAULT_EPT_VIOLATION, FAULT_EPT_MISCONFIGURATION
    large_bit = U64(EPT_PS)

    def __init__(self, mode: PagingMode, fmt: EptFormat, i: int):
        super().__init__(mode, fmt, i)
        self.mbec = fmt.mbec

    def present(self, e: np.ndarray) -> np.ndarray:
        return (e & U64(7 | (EPT_XU if self.mbec else 0))) != 0

    def valid(self, e: np.ndarray, leaf: np.ndarray) -> np.ndarray:
        good = super().valid(e, leaf) & ((e & U64(EPT_R | EPT_W)) != U64(EPT_W))
        memory_type = (e >> U64(3)) & U64(7)
        bad_type = np.isin(memory_type, np.array(EPT_BAD_MEMORY_TYPES, U64))
        return good & ~(leaf & bad_type)

    def frame(self, e: np.ndarray) -> np.ndarray:
        return e & self.leaf_addr

    def allowed(self, e: np.ndarray) -> Tuple[np.ndarray, ...]:
        """(read, write, execute, user-execute) as EptFormat.rights."""
        x = (e & U64(4)) != 0
        return ((e & U64(EPT_R)) != 0, (e & U64(EPT_W)) != 0, x,
                (e & U64(EPT_XU)) != 0 if self.mbec else x)


def walk_second_level_array(read_phys: ReadPhys, mode: PagingMode, fmt, root: int,
                            gpas: Union[np.ndarray, Sequence[int]]) -> BatchWalk:
    """walk_ept / walk_npt for every guest-physical address of `gpas` at once, through the
    table at `root` read in `mode` (MODE_EPT4/5, MODE_NPT4/5) with entry format `fmt`
    (ept.ept_format / npt_format: the same the scalar walks use). A GPA beyond the mode's bits
    faults as non-canonical, as there. Rights: EPT's (read, write, execute, user-execute) in
    BatchWalk.rights; NPT's as a guest walk's (writable, user, executable) columns. Validating
    an EPTP is the caller's (walk_ept refuses an invalid one before any walk)."""
    gpa = _addresses(gpas)
    tables = _Tables(read_phys, mode.entry_size, mode, root)
    ept = isinstance(fmt, EptFormat)
    levels = [(_EptLevel if ept else _Level)(mode, fmt, i) for i in range(len(mode.levels))]
    w = _walk_levels(tables, mode, levels, root, gpa, gpa < U64(1 << mode.va_bits),
                     FAULT_NON_CANONICAL)
    if ept:        # no U/S in EPT: `user` is left False, the four rights are in ept_rights
        _, write, execute, _ = w.rights
        return BatchWalk(gpa, w.ok, w.pa, w.page_size, write, np.zeros(len(gpa), bool),
                         execute, w.reason, w.level, mode, root, w.entries, w.tables_read,
                         w.leaf_level, w.rights)
    writable, user, executable = w.rights
    return BatchWalk(gpa, w.ok, w.pa, w.page_size, writable, user, executable, w.reason,
                     w.level, mode, root, w.entries, w.tables_read, w.leaf_level)
