"""A module log set against an outside walk of the same address (or the host's own HPA).

compare: a log against a paging.Walk of the same address (a guest's page tables, or, for a
second-level log, the NPT/EPT: compare_second_level adds where each side stopped);
compare_host: an ept_dump log's HPA against the host's pagemap answer for its GPA.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..record import record, replace
from .model import ADDR_BITS, SAME_STOP, U64, ModLog, bit_name, bit_ranges
from .model import hex_or_none as _h

# --------------------------------------------------------------- the log against an outside walk

@record(frozen=True)
class Row:
    """One number of the log set against the same number from an outside walk."""

    field: str               # address, root, index, table, entry, next, page_size, final, value
    level: Optional[str]
    log: Optional[int]
    outside: Optional[int]
    known_mask: int          # the bits of the log's number that were printed
    agree: Optional[bool]    # None: the log did not print it (or the walk has no such number)
    reason: str              # why they differ, or what could not be compared; "" when plain

    def to_dict(self) -> dict:
        plain = self.field in ("index", "page_size")
        conv = (lambda v: v) if plain else _h
        return {"field": self.field, "level": self.level, "log": conv(self.log),
                "outside": conv(self.outside), "known_mask": hex(self.known_mask),
                "agree": self.agree, "reason": self.reason}


@record(frozen=True)
class Comparison:
    rows: Tuple[Row, ...]

    @property
    def agree(self) -> bool:
        """No row disagrees (rows the log could not show do not count against it)."""
        return not any(r.agree is False for r in self.rows)

    def differences(self) -> List[Row]:
        return [r for r in self.rows if r.agree is False]

    def to_dict(self) -> dict:
        return {"agree": self.agree, "rows": [r.to_dict() for r in self.rows]}


def _entry_bits_text(diff: int, log_entry: int, outside: int, level: str, kind: str) -> str:
    """'bit 5 (A) of the PTE entry differs (log 0, outside 1)', PFN bits grouped."""
    parts = []
    pfn = diff & ADDR_BITS
    for bit in range(63, -1, -1):
        if diff >> bit & 1 and not pfn >> bit & 1:
            parts.append(f"bit {bit} ({bit_name(bit, kind)}) of the {level} entry differs "
                         f"(log {log_entry >> bit & 1}, outside {outside >> bit & 1})")
    if pfn:
        parts.insert(0, f"bit(s) {bit_ranges(pfn)} (PFN) of the {level} entry differ "
                        f"(log frame {hex(log_entry & ADDR_BITS)}, outside "
                        f"{hex(outside & ADDR_BITS)})")
    return "; ".join(parts)


def compare(log: ModLog, walk, value: Optional[int] = None) -> Comparison:
    """Set a module log against an outside walk (a qintrospect.paging.Walk) of the same address.

    Levels are matched by Linux name (pgd/p4d/pud/pmd/pte). Only the bits the log printed are
    compared; `value` is the 8 bytes the outside read at walk.pa, compared with the log's value.
    A reason says why a number differs: another boot or process (root), the page moved (same
    indexes, another leaf frame), which bit of which entry (P, RW, US, A, D, PFN...).
    """
    rows: List[Row] = []

    def row(fld, level, mine, mask, theirs, reason_if_differ, full=U64):
        if mine is None or not mask & full:
            rows.append(Row(fld, level, mine, theirs, mask, None, "not printed in the log"))
            return None
        if theirs is None:
            rows.append(Row(fld, level, mine, None, mask, None, "the outside walk has no value"))
            return None
        both = mask & full
        diff = (mine ^ theirs) & both
        reason = "" if not diff else reason_if_differ(diff)
        if full & ~mask:
            note = f"bits {bit_ranges(full & ~mask)} not printed in the log"
            reason = f"{reason}; {note}" if reason else note
        rows.append(Row(fld, level, mine, theirs, mask, not diff, reason))
        return not diff

    row("address", None, log.address, log.address_bits_known, walk.va,
        lambda d: f"the log walked another address (bits {bit_ranges(d)} differ)")
    root_agree = row("root", None, log.root, log.root_known_mask, walk.root,
                     lambda d: _root_reason(log, walk), ADDR_BITS)
    other_space = root_agree is False and not _pti_pair(log, walk)
    if root_agree is False and _pti_pair(log, walk):
        rows[-1] = replace(rows[-1], agree=True)   # same address space, the PTI user copy

    steps = {s.linux_name: s for s in walk.levels}
    indexes_agree = True
    walk_leaf = next((s for s in walk.levels if s.leaf), None)
    for lvl in log.levels:
        step = steps.get(lvl.linux_name)
        if step is None:
            where = (f"at the {walk.fault.level} entry: {walk.fault.message}" if walk.fault
                     else f"at a {walk_leaf.linux_name} leaf" if walk_leaf else "earlier")
            rows.append(Row("level", lvl.name, lvl.entry, None, lvl.entry_known_mask,
                            False if lvl.entry is not None else None,
                            f"the outside walk stopped {where}"))
            continue
        if lvl.index is not None:
            ok = lvl.index == step.index
            indexes_agree &= ok
            rows.append(Row("index", lvl.name, lvl.index, step.index, 0x1FF, ok,
                            "" if ok else "the log walked another address"))
        prefix = "the log is from another boot / another process (root differs); " \
            if other_space else ""
        row("table", lvl.name, lvl.table_addr, lvl.table_known_mask, step.table_addr,
            lambda d: prefix + "another page table is in use at this level", ADDR_BITS)
        is_leaf = step.leaf

        def entry_reason(d, lvl=lvl, step=step, is_leaf=is_leaf):
            text = _entry_bits_text(d, lvl.entry, step.entry, lvl.name, log.bits_kind)
            if d & ADDR_BITS:
                if is_leaf and indexes_agree and not other_space:
                    text = "the page moved: " + text
                elif not other_space:
                    text = "a page table moved: " + text
            return prefix + text
        row("entry", lvl.name, lvl.entry, lvl.entry_known_mask, step.entry, entry_reason)
        if lvl.next_addr is not None:
            row("next", lvl.name, lvl.next_addr, lvl.next_known_mask, step.next_addr,
                lambda d: prefix + f"bits {bit_ranges(d)} of the next address differ", ADDR_BITS)
        if lvl.page_size:
            ok = lvl.page_size == step.page_size
            rows.append(Row("page_size", lvl.name, lvl.page_size, step.page_size, U64, ok,
                            "" if ok else "the mapping changed size (split or collapsed)"))
    printed_levels = {lvl.linux_name for lvl in log.levels}
    for step in walk.levels:
        if step.linux_name not in printed_levels:
            rows.append(Row("level", step.linux_name.upper(), None, step.entry, 0, None,
                            "not printed in the log"))

    def final_reason(d):
        if other_space:
            return "the log is from another boot / another process (root differs)"
        if walk.pa is None:
            return "the outside walk faulted: " + (walk.fault.message if walk.fault else "?")
        if indexes_agree and d & ADDR_BITS:
            return f"the page moved (bits {bit_ranges(d)} differ)"
        return f"bits {bit_ranges(d)} differ"
    if walk.pa is None and log.final_address is not None:
        rows.append(Row("final", None, log.final_address, None, log.final_known_mask, False,
                        final_reason(0)))
    else:
        row("final", None, log.final_address, log.final_known_mask, walk.pa, final_reason)
    if value is not None and log.value is not None:
        ok = value == log.value
        reason = ""
        if not ok:
            reason = "the value changed since the log was taken (or it is another page)"
            if log.value < 1 << 32 and value & 0xFFFFFFFF == log.value:
                reason = "the low 4 bytes agree: the log may print a 4-byte value"
        rows.append(Row("value", None, log.value, value, U64, ok, reason))
    return Comparison(tuple(rows))




def compare_second_level(log: ModLog, walk, value: Optional[int] = None) -> Comparison:
    """A second-level log (ept_dump, slat_dump: GPA -> HPA through an NPT or EPT) against the
    live walk of the same table for the same GPA (slat.walk with the root the log prints, over
    the host's memory), row by row: compare()'s rows (the GPA, the root, each level's index,
    table, entry and next address, the leaf's page size, the HPA, the 8 bytes there), and a
    "stop" row when either side stopped before a leaf (not present, reserved bit, EPT
    misconfiguration, a GPA beyond the table's reach)."""
    rows = list(compare(log, walk, value).rows)
    stop = _stop_row(log, walk)
    if stop is not None:
        rows.append(stop)
    return Comparison(tuple(rows))


def _stop_row(log: ModLog, walk) -> Optional[Row]:
    stop, fault = log.stop, walk.fault
    if stop is None and fault is None and not log.stopped:
        return None
    names = {spec.name: spec.linux_name.upper() for spec in walk.mode.levels} if walk.mode \
        else {}
    where = names.get(fault.level, fault.level) if fault is not None else None
    outside = (f"the outside walk stops at the {where} entry: {fault.reason} ({fault.message})"
               if fault is not None and where else
               f"the outside walk stops: {fault.reason} ({fault.message})" if fault is not None
               else f"the outside walk reaches a leaf ({walk.pa:#x})")
    if log.stopped:
        ok = fault is not None and fault.level is None
        return Row("stop", None, None, None, 0, ok,
                   f"the module did not walk ({log.stopped}); {outside}")
    if stop is None:
        leaf = next((lvl for lvl in log.levels if lvl.page_size), None) or \
            (log.levels[-1] if log.levels else None)
        why = ("the table is not in this memory (the log is from another host or boot?)"
               if fault.reason == "unreadable" else "the table changed since the log was taken")
        return Row("stop", where, None, None, 0, False,
                   f"the log goes on to a leaf{' at ' + leaf.name if leaf else ''}; {outside}: "
                   + why)
    if fault is None:
        return Row("stop", stop.name, stop.entry, None, stop.entry_known_mask, False,
                   f"the log stops at the {stop.name} entry ({stop.fault}); {outside}: the "
                   "hypervisor mapped the page since the log was taken")
    ok = where == stop.name and fault.reason in SAME_STOP.get(stop.fault, ())
    text = (f"both stop at the {stop.name} entry: the log says {stop.fault}, the outside walk "
            f"{fault.reason}" if ok else
            f"the log stops at the {stop.name} entry ({stop.fault}); {outside}")
    return Row("stop", stop.name, stop.entry, None, stop.entry_known_mask, ok, text)


def compare_host(log: ModLog, hpa: Optional[int], value: Optional[int] = None,
                 why_no_hpa: str = "") -> Comparison:
    """Set an ept_dump log (GPA -> HPA) against the host's own answer for the same GPA: the
    HPA from the QEMU process's pagemap, and the 8 bytes read there."""
    rows: List[Row] = []
    if log.final_address is None or not log.final_known_mask:
        rows.append(Row("final", None, log.final_address, hpa, 0, None, "not printed in the log"))
    elif hpa is None:
        rows.append(Row("final", None, log.final_address, None, log.final_known_mask, None,
                        why_no_hpa or "the host gave no HPA"))
    else:
        diff = (log.final_address ^ hpa) & log.final_known_mask
        reason = "" if not diff else (f"bits {bit_ranges(diff)} differ: the log is from another "
                                      "boot, or the host moved the page since")
        unknown = U64 & ~log.final_known_mask
        if unknown:
            note = f"bits {bit_ranges(unknown)} not printed in the log"
            reason = f"{reason}; {note}" if reason else note
        rows.append(Row("final", None, log.final_address, hpa, log.final_known_mask, not diff,
                        reason))
    if value is not None and log.value is not None:
        ok = value == log.value
        rows.append(Row("value", None, log.value, value, U64, ok,
                        "" if ok else "the value changed since the log was taken"))
    return Comparison(tuple(rows))


def _pti_pair(log: ModLog, walk) -> bool:
    """Kernel and user copy of one PTI page table: the user copy is the kernel one + 4 KiB."""
    if log.root is None or walk.root is None:
        return False
    return (walk.root ^ log.root) & log.root_known_mask == 0x1000 & log.root_known_mask \
        and walk.root & 0x1000 and not log.root & 0x1000


def _root_reason(log: ModLog, walk) -> str:
    if _pti_pair(log, walk):
        return ("same address space: the outside root is the PTI user copy of the log's "
                "page table (log root + 4 KiB)")
    return "the log is from another boot / another process (root differs)"
