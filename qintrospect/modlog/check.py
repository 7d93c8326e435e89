"""What a module log implies about itself: recompute its numbers from its other numbers.

Indexes from the address bits, each NEXT_LVL address from its entry, the final address from the
leaf entry and the address (for a huge page also Mask1/HFN/Mask2/Offset), and several printings
of one number against each other; only the bits both sides know are compared. A second-level
log (ept_dump, slat_dump) whose entries are printed whole is also replayed: its own entries
walked again by qintrospect's NPT/EPT walker, which must stop, or reach a leaf, where the log
says the module did.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..errors import MemoryReadError
from ..paging.formats import size_name
from ..record import record
from .model import (
    ADDR_BITS, LEVELS_4, LEVELS_5, PAGE_SIZES, SAME_STOP, U64, LogLevel, ModLog, bit_ranges,
)
from .model import hex_or_none as _h

# ----------------------------------------------------------------------------- what a log implies

@record(frozen=True)
class Finding:
    """One number the log printed, set against what the log's other numbers imply."""

    check: str               # address, index, next_addr, entry, flags, final, mask1, hfn, mask2...
    level: Optional[str]
    printed: Optional[int]
    computed: Optional[int]
    compared_mask: int       # the bits both the printing and the recomputation know
    agree: Optional[bool]    # None: not one bit to compare
    message: str
    line: Optional[int] = None

    def to_dict(self) -> dict:
        return {"check": self.check, "level": self.level, "printed": _h(self.printed),
                "computed": _h(self.computed), "compared_mask": hex(self.compared_mask),
                "agree": self.agree, "message": self.message, "line": self.line}


def _shift(log: ModLog, name: str) -> int:
    names = LEVELS_5 if log.paging_levels == 5 else LEVELS_4
    return 12 + 9 * (len(names) - 1 - names.index(name))


def _set_against(label: str, printed: int, pmask: int, computed: int, cmask: int,
                 full: int = U64, fmt=hex, other: str = "recomputed"
                 ) -> Tuple[Optional[bool], int, str]:
    """(agree, compared mask, sentence) for a printed number against a recomputed one."""
    both = pmask & cmask & full
    differ = (printed ^ computed) & both
    agree = None if not both else not differ
    text = f"{label}: printed {fmt(printed & full)}, {other} {fmt(computed & full)}"
    if agree is None:
        text += ": no bit known on both sides"
    elif agree:
        text += f": agree on bits {bit_ranges(both)}"
    else:
        text += f": DIFFER at bit(s) {bit_ranges(differ)}"
    if full & ~pmask:
        text += f"; bits {bit_ranges(full & ~pmask)} not printed"
    if full & pmask & ~cmask:
        text += f"; bits {bit_ranges(full & pmask & ~cmask)} unknown to the {other} side"
    return agree, both, text


def leaf_of(log: ModLog) -> Optional[Tuple[LogLevel, int]]:
    """The level whose entry maps the page, with the page size, as far as the log tells (None
    when the log says the walk stopped before a leaf)."""
    for lvl in log.levels:
        if lvl.fault:
            return None
        if lvl.page_size:
            return lvl, lvl.page_size
        if lvl.name == "PTE":
            return lvl, 1 << 12
        ps_known = lvl.entry is not None and lvl.entry_known_mask >> 7 & 1
        if ps_known and lvl.entry >> 7 & 1 and lvl.name in PAGE_SIZES:
            return lvl, PAGE_SIZES[lvl.name]
    return None


def implied_final(log: ModLog) -> Tuple[int, int]:
    """The final address the log's leaf entry and address imply: (value, mask of known bits).

    Bits 63..52 of a physical address are zero; the page offset comes from the walked address;
    the frame from the leaf entry (for a 2 MiB leaf: entry & Mask1 | address & Mask2).
    """
    value, mask = 0, U64 & ~((1 << 52) - 1)
    address = log.address or 0
    leaf = leaf_of(log)
    size = leaf[1] if leaf else 1 << 12   # any page is at least 4 KiB: the offset is known
    low = size - 1
    value, mask = value | (address & low), mask | (log.address_bits_known & low)
    if leaf and leaf[0].entry is not None:
        frame = ADDR_BITS & ~low
        value |= leaf[0].entry & frame
        mask |= leaf[0].entry_known_mask & frame
    return value, mask


def check_log(log: ModLog) -> List[Finding]:
    """Recompute from the log what it implies and say, number by number, whether it agrees.

    Indexes from the address bits, each NEXT_LVL address from its entry's address bits, the
    final address from the leaf entry and the address, a huge page's Mask1/HFN/Mask2/Offset,
    and several printings of the same number against each other. Only the bits both sides
    know are compared; each finding names the bits that were not printed.
    """
    out: List[Finding] = []
    addr_name, final_name = log.address_name, log.final_name

    # Several printings of one number (hex line, binary line, 12/40/12 line) must agree.
    for what, level in sorted({(it.what, it.level or "") for it in log.printed}):
        same = [it for it in log.printed if it.what == what and (it.level or "") == level]
        if what == "index" or len(same) < 2:
            continue
        first = same[0]
        for other in same[1:]:
            label = f"{level + ' ' if level else ''}{what} ({other.source}, line {other.line}) " \
                    f"against the {first.source} (line {first.line})"
            agree, both, text = _set_against(label, other.value, other.mask, first.value,
                                             first.mask, other="there")
            out.append(Finding("consistency", level or None, other.value, first.value, both,
                               agree, text, other.line))

    # Indexes: every printing against the address bits.
    for it in log.printed:
        if it.what != "index" or it.level not in LEVELS_5:
            continue
        if it.level == "P4D" and log.paging_levels != 5:
            continue
        shift = _shift(log, it.level)
        computed = (log.address or 0) >> shift & 0x1FF
        cmask = log.address_bits_known >> shift & 0x1FF
        label = (f"{it.level} index ({it.source}, line {it.line}) against {addr_name} bits "
                 f"{shift + 8}..{shift}")
        agree, both, text = _set_against(label, it.value, 0x1FF, computed, cmask, 0x1FF, str)
        out.append(Finding("index", it.level, it.value, computed, both, agree, text, it.line))

    # NEXT_LVL addresses: bits 51..12 of the entry at that level.
    for lvl in log.levels:
        if lvl.next_addr is None:
            continue
        computed = (lvl.entry or 0) & ADDR_BITS
        label = f"NEXT_LVL({lvl.name}) against the {lvl.name} entry's address bits"
        agree, both, text = _set_against(label, lvl.next_addr, lvl.next_known_mask, computed,
                                         lvl.entry_known_mask & ADDR_BITS, ADDR_BITS)
        out.append(Finding("next_addr", lvl.name, lvl.next_addr, computed, both, agree, text))

    out.extend(_flag_findings(log))
    out.extend(_final_findings(log, addr_name, final_name))
    out.extend(_replay_findings(log))
    for it in log.printed:
        if it.what == "expect":
            # the module's own check (insmod ... expect=V): set V against the value it printed
            if log.value is None:
                agree, text = None, "the value at the address is not printed"
            else:
                agree = it.value == log.value
                text = f"value at the {final_name} {log.value:#x}: " + (
                    "equal" if agree else "DIFFERENT")
            out.append(Finding("value_check", None, it.value, log.value,
                               U64 if agree is not None else 0, agree,
                               f"value check (line {it.line}): expected {it.value:#x}, {text}",
                               it.line))
    return out


# ------------------------------------------------------------------ replaying a second-level log



def replay(log: ModLog):
    """The log's own entries walked again by qintrospect's walker for the log's table format
    (paging.walk_npt / walk_ept, MAXPHYADDR as the log prints it, else 52), as a paging.Walk;
    None when the log is not a second-level log or does not print its root, its address or
    every bit of the entries it shows. An entry the walker would read but the log does not
    print ends the replay as "unreadable"."""
    from .. import paging
    if log.kind != "ept_dump" or log.root is None or \
            log.root_known_mask & ADDR_BITS != ADDR_BITS or log.address is None:
        return None
    n = log.paging_levels
    walked = (1 << (12 + 9 * n)) - 1
    if log.address_bits_known & walked != walked and not log.stopped:
        return None
    memory = {}
    table = log.root
    for lvl in log.levels:
        if lvl.entry is None or lvl.entry_known_mask != U64:
            return None
        memory[table + 8 * (log.address >> _shift(log, lvl.name) & 0x1FF)] = lvl.entry
        table = lvl.entry & ADDR_BITS

    def read(pa: int, length: int) -> bytes:
        if length == 8 and pa in memory:
            return memory[pa].to_bytes(8, "little")
        raise MemoryReadError("the log does not print this entry", pa)
    maxphyaddr = log.maxphyaddr or 52
    if log.format == "npt":
        return paging.walk_npt(read, log.root, log.address, n, maxphyaddr)
    return paging.walk_ept(read, log.root | 6 | (n - 1) << 3, log.address, maxphyaddr)


def _replay_findings(log: ModLog) -> List[Finding]:
    w = replay(log)
    if w is None:
        return []
    table = "NPT" if log.format == "npt" else "EPT"
    head = (f"the log's entries walked again by qintrospect's {log.paging_levels}-level {table} "
            f"walker (MAXPHYADDR {log.maxphyaddr or 52}"
            f"{', from the log' if log.maxphyaddr else ', assumed'})")
    where = {spec.name: spec.linux_name.upper() for spec in w.mode.levels} if w.mode else {}
    stop = log.stop
    leaf = leaf_of(log)
    if w.fault is not None:
        level = where.get(w.fault.level, w.fault.level)
        said = f"stops at the {level} entry: {w.fault.reason} ({w.fault.message})" if level \
            else f"stops: {w.fault.reason} ({w.fault.message})"
        if log.stopped:
            agree = w.fault.level is None
            expected = "the module did not walk"
        elif stop is not None:
            agree = level == stop.name and w.fault.reason in SAME_STOP.get(stop.fault, ())
            expected = f"the log stops at the {stop.name} entry ({stop.fault})"
        else:
            agree = False
            expected = (f"the log goes on to a {size_name(leaf[1])} leaf at {leaf[0].name}"
                        if leaf else "the log does not say the walk stopped")
    else:
        step = w.levels[-1]
        said = (f"reaches a {size_name(w.page_size)} leaf at {step.linux_name.upper()} "
                f"({w.pa:#x})")
        if stop is not None or log.stopped:
            agree = False
            expected = (f"the log stops at the {stop.name} entry ({stop.fault})" if stop
                        else "the module did not walk")
        else:
            agree = bool(leaf) and leaf[0].name == step.linux_name.upper() \
                and leaf[1] == w.page_size
            expected = (f"the log's leaf is {leaf[0].name} ({size_name(leaf[1])})" if leaf
                        else "the log shows no leaf")
    text = f"{head} {said}: " + ("as the log says" if agree else f"DIFFERS: {expected}")
    return [Finding("walk", stop.name if stop else leaf[0].name if leaf else None,
                    None, w.pa, 0, agree, text)]



def _flag_findings(log: ModLog) -> List[Finding]:
    """Present and page-size bits: what the walk needed them to be, where they were printed."""
    out = []
    leaf = leaf_of(log)
    for lvl in log.levels:
        if lvl.entry is None or lvl.present is False:
            continue
        is_leaf = bool(leaf) and leaf[0].name == lvl.name
        if log.bits_kind == "ept_dump":
            what = "R/W/X (bits 2..0), not all zero"
            known = lvl.entry_known_mask & 0x7
            agree = None if known != 0x7 else bool(lvl.entry & 0x7)
        else:
            what = "P (bit 0) = 1"
            known = lvl.entry_known_mask & 0x1
            agree = None if not known else bool(lvl.entry & 1)
        text = f"{lvl.name} entry {what}: " + (
            "not printed" if agree is None else "yes" if agree else "NO, yet the walk went on")
        out.append(Finding("flags", lvl.name, lvl.entry, None, known, agree, text))
        if lvl.name in PAGE_SIZES and lvl.name != "PTE" and not lvl.fault:
            ps = lvl.entry >> 7 & 1
            ps_known = lvl.entry_known_mask >> 7 & 1
            agree = None if not ps_known else ps == int(is_leaf)
            text = (f"{lvl.name} entry PS (bit 7) should be {int(is_leaf)} "
                    f"({'a ' + size_name(leaf[1]) + ' leaf' if is_leaf else 'not a leaf'}): ")
            text += "not printed" if not ps_known else f"printed {ps}"
            out.append(Finding("flags", lvl.name, lvl.entry, None, 1 << 7 if ps_known else 0,
                               agree, text))
    return out


def _final_findings(log: ModLog, addr_name: str, final_name: str) -> List[Finding]:
    out = []
    if log.stopped:
        return [Finding("final", None, None, None, 0, None,
                        f"the module did not walk, so there is no {final_name}: "
                        f"{log.stopped}")]
    stop = log.stop
    if stop is not None and stop.present is False:
        # The walk ended at a not-present entry: there is no final address to recompute.
        bits, what = ((0x7, "R/W/X (bits 2..0)") if log.bits_kind == "ept_dump"
                      else (0x1, "P (bit 0)"))
        known = stop.entry_known_mask & bits
        agree = None if known != bits else not stop.entry & bits
        text = (f"the log says the {stop.name} entry is not present, so the {addr_name} is "
                f"not mapped; {what} of the entry: "
                + ("not printed" if agree is None else "0, agrees" if agree
                   else f"{stop.entry & bits:#x}, DIFFERS"))
        out.append(Finding("flags", stop.name, stop.entry, None, known, agree, text))
        return out
    if stop is not None:
        # A reserved bit / a misconfiguration: the replay (below) recomputes that verdict.
        out.append(Finding("final", stop.name, None, None, 0, None,
                           f"the log says the {stop.name} entry stops the walk ({stop.fault}), "
                           f"so there is no {final_name}"))
        return out
    leaf = leaf_of(log)
    computed, cmask = implied_final(log)
    size = leaf[1] if leaf else 1 << 12
    if leaf and size > 1 << 12 and leaf[0].entry is not None:
        # The huge-page block of the ept_dump: Mask1 / HFN / Mask2 / Offset.
        mask1, mask2 = ADDR_BITS & ~(size - 1), size - 1
        entry, emask = leaf[0].entry, leaf[0].entry_known_mask
        expect = {
            "mask1": (mask1, U64, f"Mask1 against bits 51..{size.bit_length() - 1}"),
            "hfn": (entry & mask1, (emask & mask1) | ~mask1 & U64,
                    f"HFN against {leaf[0].name} entry & Mask1"),
            "mask2": (mask2, U64, f"Mask2 against bits {size.bit_length() - 2}..0"),
            "offset": ((log.address or 0) & mask2,
                       (log.address_bits_known & mask2) | ~mask2 & U64,
                       f"Offset against {addr_name} & Mask2"),
        }
        for it in log.printed:
            if it.what in expect:
                value, vmask, label = expect[it.what]
                agree, both, text = _set_against(f"{label} (line {it.line})", it.value, it.mask,
                                                 value, vmask)
                out.append(Finding(it.what, leaf[0].name, it.value, value, both, agree, text,
                                   it.line))
    how = (f"{leaf[0].name} entry & Mask1 | {addr_name} & Mask2" if leaf and size > 1 << 12
           else f"{leaf[0].name} entry frame | {addr_name} offset" if leaf
           else f"{addr_name} offset")
    finals = [it for it in log.printed if it.what == "final"]
    for it in finals:
        agree, both, text = _set_against(f"{final_name} (line {it.line}) against {how}",
                                         it.value, it.mask, computed, cmask)
        out.append(Finding("final", leaf[0].name if leaf else None, it.value, computed, both,
                           agree, text, it.line))
    if not finals:
        missing = (f"the {leaf[0].name} entry is not printed either, so only"
                   if leaf and leaf[0].entry is None else "recomputed from " + how + ":")
        out.append(Finding("final", leaf[0].name if leaf else None, None, computed, 0, None,
                           f"the {final_name} is not printed; {missing} bits "
                           f"{bit_ranges(cmask)} are known: {hex(computed)}"))
    return out
