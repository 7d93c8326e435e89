"""Putting one run of gpt_dump / ept_dump together: the pieces the reader found on its lines
(binary fields, indexes, entries, huge-page and fault lines) become one ModLog, with a warning
for each piece that does not fit."""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

from ..record import field, record
from .model import (
    ADDR_NAME, FINAL_NAME, KINDS, LEVELS_4, LEVELS_5, U64, Line, LogLevel, ModLog, Printed,
    bit_ranges, merge,
)

# A root register's name in the NEXT_LVL and hex lines: which log and which table it means.
ROOT_NAMES = {"CR3": ("gpt_dump", None), "EPTP": ("ept_dump", "ept"),
               "nCR3": ("ept_dump", "npt"), "NCR3": ("ept_dump", "npt")}

# Field widths (and the lowest bit each covers) of the 12/40/12 and 9/.../12 binary lines.
ENTRY_FIELDS = ((12, 52), (40, 12), (12, 0))


def binary_prefix(token: str) -> str:
    m = re.match(r"[01]*", token)
    return m.group(0)


def read_fields(tokens: List[str], layout) -> Tuple[int, int, bool, List[str]]:
    """Read binary tokens into (value, mask, complete, problems) following layout [(width, low)].

    A token may be cut (fewer digits, or followed by non-binary text); the bits it shows are
    its highest ones. Reading stops at the first incomplete token.
    """
    value = mask = 0
    problems: List[str] = []
    for idx, (width, low) in enumerate(layout):
        if idx >= len(tokens):
            return value, mask, False, problems
        digits = binary_prefix(tokens[idx])
        if len(digits) > width:
            problems.append(f"field {idx + 1} has {len(digits)} binary digits, expected {width}")
            return value, mask, False, problems
        shift = low + width - len(digits)
        if digits:
            value |= int(digits, 2) << shift
            mask |= ((1 << len(digits)) - 1) << shift
        if len(digits) < width or len(digits) < len(tokens[idx]):
            return value, mask, False, problems
    return value, mask, True, problems


@record
class Run:
    """What one run of a module printed, line by line, before it is put together."""

    kind_votes: Dict[str, int] = field(default_factory=dict)
    items: List[Printed] = field(default_factory=list)
    columns: List[Tuple[int, List[int]]] = field(default_factory=list)  # candidate (line, numbers)
    header_line: Optional[int] = None
    addr_split: Optional[Tuple[int, List[str], bool]] = None  # (line, tokens, cut)
    header: Optional[List[str]] = None
    next_index: List[Tuple[str, int, int]] = field(default_factory=list)  # (after level, idx, line)
    huge: List[Tuple[str, int, int]] = field(default_factory=list)        # (level, size, line)
    not_present: List[Tuple[str, int]] = field(default_factory=list)
    faults: List[Tuple[str, str, int]] = field(default_factory=list)      # (level, reason, line)
    format_votes: Dict[str, int] = field(default_factory=dict)            # "npt" / "ept"
    module: Optional[str] = None
    maxphyaddr: Optional[int] = None
    stopped: Optional[str] = None
    levels_hint: Optional[int] = None
    pid: Optional[int] = None
    page_offset_base: Optional[int] = None
    seen: set = field(default_factory=set)
    warnings: List[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.items or self.addr_split or self.next_index or self.huge
                    or self.not_present or self.faults or self.stopped)


def cut_message(line: Line, what: str, mask: int, full: int = U64) -> str:
    why = "the line was cut at the console width" if line.cut else "the line ends early"
    return (f"line {line.no}: {what} incomplete ({why}): bits {bit_ranges(mask)} printed, "
            f"bits {bit_ranges(full & ~mask)} not")


# ------------------------------------------------------------------------- putting a run together

def build(run: Run) -> ModLog:
    warnings = list(run.warnings)
    kind = _kind_of(run)
    names = _level_names(run)
    n = len(names)
    shifts = {name: 12 + 9 * (n - 1 - i) for i, name in enumerate(names)}
    items = list(run.items)

    # The address lines: the 9/9/9/9/12 split becomes address bits.
    if run.addr_split:
        no, tokens, cut = run.addr_split
        layout = [(9, shifts[name]) for name in names] + [(12, 0)]
        value, mask, complete, problems = read_fields(tokens, layout)
        if problems:
            warnings.append(f"line {no}: {ADDR_NAME[kind]} binary line: {'; '.join(problems)}")
        if mask:
            items.append(Printed("address", None, value, mask, no, "binary line"))
        if not complete:
            warnings.append(cut_message(Line(no, "", cut, ""), f"{ADDR_NAME[kind]} binary line",
                                         mask, U64 >> 16 if n == 4 else U64 >> 7))
    # Hex and 12/40/12 lines name the address or the final address by GVA/GPA/HPA.
    resolved = []
    for it in items:
        if it.what.startswith("hex:"):
            name = it.what[4:]
            what = ("address" if name == ADDR_NAME[kind]
                    else "final" if name == FINAL_NAME[kind] else None)
            if what is None:
                warnings.append(f"line {it.line}: a {name} line does not belong in a {kind} log")
                continue
            it = Printed(what, None, it.value, it.mask, it.line, it.source)
        if it.mask or it.what == "index":
            resolved.append(it)
    items = resolved
    # The column line and the "+ 64 * idx" tails are indexes too.
    columns = _column_line(run, n)
    if columns:
        no, numbers = columns
        for name, number in zip(names, numbers):
            items.append(Printed("index", name, number, 0x1FF, no, "column line"))
    for after, index, no in run.next_index:
        following = names[0] if after in ROOT_NAMES else (
            names[names.index(after) + 1] if after in names[:-1] else None)
        if following:
            items.append(Printed("index", following, index, 0x1FF, no, "NEXT_LVL line"))
    for it in items:
        if it.what == "index" and it.value > 0x1FF:
            warnings.append(f"line {it.line}: {it.level} index {it.value} is above 511")

    address, address_mask = _combine(items, "address")
    if address is not None and kind == "gpt_dump":
        top = 12 + 9 * n - 1            # 47 or 56: the highest bit the walk translates
        if address_mask >> top & 1 and address >> top & 1:
            address |= U64 & ~((1 << (top + 1)) - 1)  # canonical sign extension (value only)
    root, root_mask = _combine(items, "root")
    final, final_mask = _combine(items, "final")
    value, value_mask = _combine(items, "value")

    sizes = {}
    for where, size, no in run.huge:
        level = _level_by_name_or_number(where, names)
        if level is None:
            warnings.append(f"line {no}: huge page at level {where!r}: no such level")
        else:
            sizes[level] = size
    absent = {lvl for lvl, _ in run.not_present}
    faults = {lvl: reason for lvl, reason, _ in run.faults if lvl not in absent}

    levels = []
    table, table_mask = root, root_mask
    for name in names:
        index = _first(items, "index", name)
        entry, entry_mask = _combine(items, "entry", name)
        nxt, nxt_mask = _combine(items, "next", name)
        size = sizes.get(name)
        if index is None and entry is None and nxt is None and name not in absent and not size \
                and name not in faults:
            if levels:
                later = [lvl for lvl in names[names.index(name) + 1:]
                         if any(it.level == lvl for it in items)]
                if later:
                    warnings.append(f"nothing is printed for the {name} level, so the lines for "
                                    f"{', '.join(later)} after it are not used")
                break     # the log stops here
            table, table_mask = None, 0
            continue
        fault = "not-present" if name in absent else faults.get(name)
        levels.append(LogLevel(name, index, entry, entry_mask, nxt, nxt_mask, table, table_mask,
                               size, False if name in absent else None, fault))
        table, table_mask = nxt, nxt_mask
        if size or fault:
            break
    if run.stopped:
        warnings.append(f"the module did not walk: {run.stopped}")
        levels = [lvl for lvl in levels if lvl.entry is not None]
    elif levels and levels[-1].entry is None and levels[-1].present is None:
        warnings.append(f"the log stops before the {levels[-1].name} entry: it is not printed")
    if final is None and not absent and not faults and not run.stopped:
        warnings.append(f"the final {FINAL_NAME[kind]} is not printed")
    fmt = None
    if kind == "ept_dump":
        votes = run.format_votes
        if votes.get("npt") and votes.get("ept"):
            warnings.append(f"the log says both NPT ({votes['npt']} line(s)) and EPT "
                            f"({votes['ept']}); read as "
                            + ("NPT" if votes["npt"] > votes["ept"] else "EPT"))
        fmt = "npt" if votes.get("npt", 0) > votes.get("ept", 0) else "ept"
    return ModLog(kind, address, address_mask, root, root_mask, tuple(levels), final, final_mask,
                  value if value_mask else None, tuple(warnings), tuple(items), run.pid, n,
                  run.page_offset_base, fmt, run.maxphyaddr, run.module or None, run.stopped)


def _kind_of(run: Run) -> str:
    votes = run.kind_votes
    if not votes:
        # Only entry/address lines: an HPA line or a Mask1 block means EPT.
        if any(it.what in ("hex:HPA", "mask1", "hfn") for it in run.items):
            return "ept_dump"
        return "gpt_dump"
    return max(KINDS, key=lambda k: votes.get(k, 0))


def _level_names(run: Run) -> Tuple[str, ...]:
    if run.levels_hint == 5:
        return LEVELS_5
    named = {it.level for it in run.items if it.level}
    named |= {lvl for lvl, _, _ in run.next_index}
    if "P4D" in named or (run.header and "P4D" in run.header):
        return LEVELS_5
    if run.header and len(run.header) == 5:
        return LEVELS_5
    if run.addr_split:
        lengths = [len(binary_prefix(t)) for t in run.addr_split[1]]
        if lengths[:6] == [9, 9, 9, 9, 9, 12]:
            return LEVELS_5
    return LEVELS_4


def _column_line(run: Run, n: int) -> Optional[Tuple[int, List[int]]]:
    """The row of indexes the modules print between the index lines and the header line."""
    index_lines = [it.line for it in run.items if it.what == "index" and it.source == "index line"]
    first = min(index_lines) if index_lines else 0
    last = run.header_line or (max(index_lines) + 2 if index_lines else 0)
    near = [(no, numbers) for no, numbers in run.columns
            if first < no < last and len(numbers) <= n]
    if len(near) == 1:
        return near[0]
    if len(near) > 1:
        run.warnings.append(f"lines {', '.join(str(no) for no, _ in near)} all look like the "
                            f"row of indexes; none is used")
    return None


def _level_by_name_or_number(where: str, names: Tuple[str, ...]) -> Optional[str]:
    if where.upper() in names:
        return where.upper()
    if where.isdigit() and 1 <= int(where) <= len(names):
        return names[len(names) - int(where)]   # ept_dump counts levels from the bottom: 1 = PTE
    return None


def _combine(items: Iterable[Printed], what: str, level: Optional[str] = None):
    """All printings of one number merged into (value, mask); (None, 0) when none shows a bit."""
    value = mask = 0
    for it in items:
        if it.what == what and it.level == level:
            value, mask = merge(value, mask, it.value, it.mask)
    return (value, mask) if mask else (None, 0)


def _first(items: Iterable[Printed], what: str, level: str) -> Optional[int]:
    order = ("index line", "entry line", "column line", "NEXT_LVL line")
    found = [it for it in items if it.what == what and it.level == level]
    found.sort(key=lambda it: order.index(it.source) if it.source in order else len(order))
    return found[0].value if found else None
