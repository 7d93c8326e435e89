"""The one walker loop, driven by a mode's level list and an entry format.

It reads one entry per level with one read_phys call, so a walk costs at most the mode's depth in
reads, and it never raises for what it finds: not-present, reserved bits or unreadable memory end
the walk with a Fault (without an error code; the caller knows which access it stands for).
"""

from __future__ import annotations

import struct
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import MemoryReadError
from .formats import EntryFormat, bit_list
from .model import RESERVED_BIT, UNREADABLE, Fault, LevelStep, PagingMode, ReadPhys


def describe_problems(name: str, entry: int, index: int, entry_addr: int, problems,
                      misconfigured: bool = False) -> str:
    """'PD entry 0x... (index 3 at 0x1018) has reserved bit(s) 51 set (above MAXPHYADDR 40)'."""
    allbits = 0
    for mask, _ in problems:
        allbits |= mask
    if len(problems) == 1:
        why = problems[0][1]
    else:
        why = "; ".join(f"{bit_list(mask)}: {w}" for mask, w in problems)
    head = f"{name} entry {entry:#x} (index {index} at {entry_addr:#x})"
    if misconfigured:
        return f"{head} is misconfigured: bit(s) {bit_list(allbits)} set ({why})"
    return f"{head} has reserved bit(s) {bit_list(allbits)} set ({why})"


def present_step(mode: PagingMode, fmt: EntryFormat, i: int, table: int, index: int,
                 entry: int) -> LevelStep:
    """The step a walk records for a present entry at level i (the batch paths build the
    same steps from the entries the vectorized walk read)."""
    spec = mode.levels[i]
    leaf = fmt.is_leaf(i, entry)
    return LevelStep(spec.name, spec.linux_name, index, table, table + index * mode.entry_size,
                     entry, fmt.flags(i, entry, leaf), fmt.frame(i, entry, leaf), leaf,
                     fmt.page_size(i, leaf))


def walk_tables(read_phys: ReadPhys, mode: PagingMode, fmt: EntryFormat, root: int,
                addr: int, root_entries: Optional[Sequence[int]] = None
                ) -> Tuple[Tuple[LevelStep, ...], Optional[Fault]]:
    """Walk `addr` from the table at `root`; the steps taken, and the fault if it did not reach
    a leaf (the last step is then the entry that stopped it, unless a read failed).
    root_entries, when given, is the first table itself (the PAE PDPTE registers), not read."""
    steps: List[LevelStep] = []
    table = root
    size = mode.entry_size
    for i, spec in enumerate(mode.levels):
        index = (addr >> spec.shift) & ((1 << spec.index_bits) - 1)
        entry_addr = table + index * size
        if i == 0 and root_entries is not None:
            entry = root_entries[index]
        else:
            try:
                raw = read_phys(entry_addr, size)
                if len(raw) != size:
                    raise MemoryReadError(f"read returned {len(raw)} bytes, not {size}",
                                          entry_addr)
            except MemoryReadError as exc:
                return tuple(steps), Fault(spec.name, UNREADABLE,
                                           f"cannot read the {spec.name} entry (index {index}) "
                                           f"at {entry_addr:#x}: {exc}")
            entry = int.from_bytes(raw, "little")

        if not fmt.present(entry):
            steps.append(LevelStep(spec.name, spec.linux_name, index, table, entry_addr, entry,
                                   fmt.flags(i, entry, False), None, False, None))
            return tuple(steps), Fault(spec.name, fmt.not_present_reason,
                                       f"{spec.name} entry {entry:#x} (index {index} at "
                                       f"{entry_addr:#x}) is not present")
        step = present_step(mode, fmt, i, table, index, entry)
        steps.append(step)
        leaf, next_addr = step.leaf, step.next_addr
        problems = fmt.problems(i, entry, leaf)
        if problems:
            message = describe_problems(spec.name, entry, index, entry_addr, problems,
                                        misconfigured=fmt.invalid_reason != RESERVED_BIT)
            return tuple(steps), Fault(spec.name, fmt.invalid_reason, message)
        if leaf:
            return tuple(steps), None
        table = next_addr
    raise AssertionError("the last level is always a leaf")  # pragma: no cover


def iter_leaves(read_phys: ReadPhys, mode: PagingMode, fmt: EntryFormat, root: int, lo: int,
                hi: int, on_unreadable: Optional[Callable[[str, int, Exception], None]] = None,
                root_entries: Optional[Sequence[int]] = None,
                on_repeat: Optional[Callable[[str, int, int], None]] = None
                ) -> Iterator[Tuple[int, int, Tuple[int, ...]]]:
    """Every valid present leaf overlapping [lo, hi) of the mode's address space (no sign
    extension), in address order, as (address, level index, raw entries root first).

    Each table is read once, whole, with one read_phys call, and decoded with struct; tables
    reached again (self-references, shared tables) come from a cache. Not-present and invalid
    entries are skipped; an unreadable table is skipped and reported to on_unreadable.
    Recursion is bounded by the mode's depth, so tables that point at themselves are fine.
    root_entries, when given, is the first table itself (the PAE PDPTE registers), not read.
    on_repeat, when given, makes each table walked once per level: a table met again there (a
    shared table, or one pointing at itself) is passed to on_repeat(level name, table address,
    address it was met at) and its leaves are not listed again (hostile tables then cost one
    pass over each distinct table, whatever points at what).
    """
    levels = mode.levels
    code = "I" if mode.entry_size == 4 else "Q"
    cache: Dict[Tuple[int, int], Optional[Tuple[int, ...]]] = {}
    if root_entries is not None:
        # keyed by (address, entry count): lower tables (512 or 1024 entries) never hit it
        cache[(root, 1 << levels[0].index_bits)] = tuple(root_entries)
    present, is_leaf, valid, frame = fmt.present, fmt.is_leaf, fmt.valid, fmt.frame

    def table(i: int, addr: int) -> Optional[Tuple[int, ...]]:
        count = 1 << levels[i].index_bits
        key = (addr, count)
        if key not in cache:
            try:
                data = read_phys(addr, count * mode.entry_size)
                cache[key] = struct.unpack(f"<{count}{code}", data)
            except (MemoryReadError, struct.error) as exc:
                cache[key] = None
                if on_unreadable is not None:
                    on_unreadable(levels[i].name, addr, exc)
        return cache[key]

    seen: set = set()

    def visit(i: int, addr: int, base: int, path: Tuple[int, ...]):
        if on_repeat is not None:
            if (i, addr) in seen:
                on_repeat(levels[i].name, addr, base)
                return
            seen.add((i, addr))
        entries = table(i, addr)
        if entries is None:
            return
        shift = levels[i].shift
        first = (lo - base) >> shift if lo > base else 0
        last = min(len(entries) - 1, (hi - 1 - base) >> shift)
        for index in range(first, last + 1):
            e = entries[index]
            if not present(e):
                continue
            leaf = is_leaf(i, e)
            if not valid(i, e, leaf):
                continue
            va = base + (index << shift)
            if leaf:
                yield va, i, path + (e,)
            else:
                yield from visit(i + 1, frame(i, e, False), va, path + (e,))

    if lo < hi:
        yield from visit(0, root, 0, ())
