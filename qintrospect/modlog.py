"""The in-guest and host kernel modules' page-walk logs: parse them, check them, compare them.

Two formats, both from the seed lab report (and our own vm/module/gpt_dump.c, which prints the
same lines plus hex ones so nothing is lost):

* gpt_dump: a guest page walk, GVA -> GPA, printed inside the guest
  (``Value at GVA: N``, `` GPT PGD index: N``, `` GVA <9> <9> <9> <9> <12>``,
  `` NEXT_LVL_GPA(CR3)  =  <40 binary digits>  +  64 * idx``, `` 284: PGD <12> <40> <12>`` ...);
* ept_dump: an EPT walk, GPA -> HPA, printed on the host (the same layout with EPT/HPA, and for a
  2 MiB leaf a block of 12/40/12 lines: PMD, Mask1, HFN, GPA, Mask2, Offset, HPA).

Real logs are damaged text: dmesg timestamps, other messages in between, CRLF, and lines cut at
the console width (80 columns), sometimes wrapped onto the next line. The parser therefore keeps,
for every number, the mask of the bits that were actually printed (``*_known_mask``); every
check and comparison works on the bits both sides know and names the ones it could not see.

Bit layout of the binary fields (as the modules print them): an entry or address split 12/40/12
is bits 63..52, 51..12, 11..0; a NEXT_LVL value is the 40 bits 51..12 (a frame number); an
address split 9/9/9/9/12 is bits 47..0 (9/9/9/9/9/12: 56..0 with five levels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from .errors import ParseError, UsageError

U64 = (1 << 64) - 1
ADDR_BITS = 0x000F_FFFF_FFFF_F000   # bits 51..12: the address in an entry or NEXT_LVL value
PAGE_SIZES = {"PTE": 1 << 12, "PMD": 1 << 21, "PUD": 1 << 30}
LEVELS_4 = ("PGD", "PUD", "PMD", "PTE")
LEVELS_5 = ("PGD", "P4D", "PUD", "PMD", "PTE")
KINDS = ("gpt_dump", "ept_dump")

# The walked address and the final address are called differently in the two logs.
_ADDR_NAME = {"gpt_dump": "GVA", "ept_dump": "GPA"}
_FINAL_NAME = {"gpt_dump": "GPA", "ept_dump": "HPA"}

# Names of entry bits, for saying which field of an entry differs (SDM Vol 3, 4.5 and 29.3.2).
_X86_BITS = {0: "P", 1: "RW", 2: "US", 3: "PWT", 4: "PCD", 5: "A", 6: "D", 7: "PS/PAT", 8: "G",
             9: "AVL", 10: "AVL", 11: "AVL", 63: "XD"}
_EPT_BITS = {0: "R", 1: "W", 2: "X", 3: "MT", 4: "MT", 5: "MT", 6: "IPAT", 7: "PS", 8: "A",
             9: "D", 10: "XU", 11: "IGN", 63: "SVE"}


def bit_name(bit: int, kind: str = "gpt_dump") -> str:
    """The field an entry bit belongs to: P, RW, US, A, D, PS, PFN, PK, XD (EPT: R, W, X, MT...)."""
    names = _EPT_BITS if kind == "ept_dump" else _X86_BITS
    if bit in names:
        return names[bit]
    if 12 <= bit <= 51:
        return "PFN"
    if kind != "ept_dump" and 59 <= bit <= 62:
        return "PK"
    return "AVL" if kind != "ept_dump" else "IGN"


def bit_ranges(mask: int) -> str:
    """'63..52, 7' for a mask: the set bits as ranges, highest first ('none' for 0)."""
    parts = []
    bit = 63
    while bit >= 0:
        if mask >> bit & 1:
            top = bit
            while bit >= 0 and mask >> bit & 1:
                bit -= 1
            low = bit + 1
            parts.append(str(top) if top == low else f"{top}..{low}")
        else:
            bit -= 1
    return ", ".join(parts) if parts else "none"


def _h(value: Optional[int]) -> Optional[str]:
    return None if value is None else hex(value)


def _merge(val: int, mask: int, more_val: int, more_mask: int) -> Tuple[int, int]:
    """Add the bits another printing knows to the ones known already (first one wins)."""
    new = more_mask & ~mask
    return val | (more_val & new), mask | new


# ----------------------------------------------------------------------------------- the values

@dataclass(frozen=True)
class LogLevel:
    """One level of the walk as the log printed it.

    ``index`` is as printed (None if no line gives it); ``entry``/``next_addr``/``table_addr``
    come with the mask of the bits printed. ``table_addr`` is the table this level's entry is
    read from: the previous level's NEXT_LVL value (or the root). ``page_size`` is set at a leaf.
    """

    name: str
    index: Optional[int]
    entry: Optional[int]
    entry_known_mask: int
    next_addr: Optional[int]
    next_known_mask: int
    table_addr: Optional[int]
    table_known_mask: int
    page_size: Optional[int]
    present: Optional[bool] = None  # False when the log says the entry is not present

    @property
    def linux_name(self) -> str:
        return self.name.lower()

    def to_dict(self) -> dict:
        return {
            "name": self.name, "index": self.index,
            "entry": _h(self.entry), "entry_known_mask": hex(self.entry_known_mask),
            "next_addr": _h(self.next_addr), "next_known_mask": hex(self.next_known_mask),
            "table_addr": _h(self.table_addr), "table_known_mask": hex(self.table_known_mask),
            "page_size": self.page_size, "present": self.present,
        }


@dataclass(frozen=True)
class Printed:
    """One number as one line printed it: what it is, for which level, which bits were shown."""

    what: str             # address index root entry next final value mask1 hfn mask2 offset
    level: Optional[str]  # PGD..PTE where it belongs to a level
    value: int
    mask: int
    line: int             # 1-based line number in the text given to parse_log
    source: str           # which kind of line: "index line", "binary line", "hex line", ...


@dataclass(frozen=True)
class ModLog:
    """One run of gpt_dump or ept_dump, as far as the text shows it.

    For a gpt_dump the address bits above the printed ones are filled in by sign extension
    (a GVA walked by the CPU is canonical); ``address_bits_known`` still says what was printed.
    """

    kind: str
    address: Optional[int]
    address_bits_known: int
    root: Optional[int]
    root_known_mask: int
    levels: Tuple[LogLevel, ...]
    final_address: Optional[int]
    final_known_mask: int
    value: Optional[int]
    warnings: Tuple[str, ...]
    printed: Tuple[Printed, ...] = ()
    pid: Optional[int] = None
    paging_levels: int = 4    # 4 or 5 (a P4D level)
    page_offset_base: Optional[int] = None   # the guest's direct-map base, when printed

    @property
    def address_name(self) -> str:
        return _ADDR_NAME[self.kind]

    @property
    def final_name(self) -> str:
        return _FINAL_NAME[self.kind]

    def level(self, name: str) -> Optional[LogLevel]:
        for lvl in self.levels:
            if lvl.name == name.upper():
                return lvl
        return None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "address": _h(self.address), "address_bits_known": hex(self.address_bits_known),
            "root": _h(self.root), "root_known_mask": hex(self.root_known_mask),
            "levels": [lvl.to_dict() for lvl in self.levels],
            "final_address": _h(self.final_address),
            "final_known_mask": hex(self.final_known_mask),
            "value": _h(self.value),
            "value_decimal": None if self.value is None else str(self.value),
            "pid": self.pid,
            "paging_levels": self.paging_levels,
            "page_offset_base": _h(self.page_offset_base),
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------------------- line cleaning

# What dmesg, /dev/kmsg, syslog and journalctl put before a kernel message.
_LINE_PREFIX = re.compile(
    r"^(?:<\d{1,3}>)?"                                                   # printk level
    r"(?:[A-Z][a-z]{2} {1,2}\d{1,2} \d\d:\d\d:\d\d \S{1,64} kernel: ?)?"  # syslog, journal
    r"(?:\[ *\d{1,12}\.\d{1,9}\] ?"                                        # [  384.573240]
    r"|\[[A-Z][a-z]{2} [^\]]{1,40}\d\] ?)?",                              # dmesg -T
    re.ASCII)
_TIMESTAMP = re.compile(r"^(?:<\d{1,3}>)?\[ *\d{1,12}\.\d{1,9}\]", re.ASCII)
_MODULE_PREFIX = re.compile(r"^([a-z][a-z0-9_]{0,30}_dump): ?", re.ASCII)


@dataclass
class _Line:
    no: int          # 1-based line number of its first physical line
    text: str        # the message, stripped of timestamp, module prefix and outer blanks
    cut: bool        # the physical line reached the console width: its end may be lost
    module: str      # "gpt_dump" / "ept_dump" / "" from a "xxx_dump: " prefix


def _split_lines(text: str, width: Optional[int]) -> List[_Line]:
    raw = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: List[_Line] = []
    i = 0
    while i < len(raw):
        line, no = raw[i], i + 1
        last = line      # the last physical piece: if it fills the console, text may be lost
        i += 1
        # A line that filled the console and is followed by a bare line that is not a message
        # of its own was wrapped: join the two (the seed's "... - ta" / "inting kernel").
        while (width and len(last) == width and i < len(raw) and raw[i].strip()
               and not _TIMESTAMP.match(raw[i]) and not _looks_like_message(raw[i])):
            last = raw[i]
            line += last
            i += 1
        body = line[_LINE_PREFIX.match(line).end():]
        module = ""
        m = _MODULE_PREFIX.match(body)
        if m:
            module, body = m.group(1), body[m.end():]
        # Only a line exactly as wide as the console can have been cut by it.
        out.append(_Line(no, body.strip(), bool(width) and len(last) == width, module))
    return out


def _looks_like_message(raw: str) -> bool:
    """Would this bare line be read as a line of its own (so it is not a wrapped tail)?"""
    body = raw[_LINE_PREFIX.match(raw).end():]
    if _MODULE_PREFIX.match(body) or raw[:1] == " ":
        return True   # the modules' own lines start with a blank or their prefix
    return any(p.match(body.strip()) for p in _ALL_PATTERNS)


# ------------------------------------------------------------------------------- line patterns

_LVL = r"(PGD|P4D|PUD|PMD|PTE)"
_END = r"(?![0-9a-zA-Z])"     # a number ends here: no more digits glued to it
_P_VALUE = re.compile(r"^Value at (GVA|GPA|HPA)\s*(\(hex[^)]{0,20}\))?\s*:\s*"
                      r"(-?(?:0x[0-9a-fA-F]{1,16}|\d{1,20}))" + _END + r"(.*)$", re.A)
_P_INDEX = re.compile(r"^(GPT|EPT)\s+" + _LVL + r"\s+index\s*:\s*(\d{1,6})" + _END + r"(.*)$",
                      re.A)
_P_COLUMNS = re.compile(r"^\d{1,3}(?:\s+\d{1,3}){2,5}$", re.A)
_P_HEADER = re.compile(r"^(GVA|GPA)\s+((?:\[\s*\w{3} IDX\s*\]\s*){1,6})", re.A)
_P_NEXT = re.compile(r"^NEXT_LVL_(GPA|HPA)\(\s*(CR3|EPTP|PGD|P4D|PUD|PMD|PTE)\s*\)\s*=\s*"
                     r"([01]*)(.*)$", re.A)
_P_ENTRY = re.compile(r"^(\d{1,3})\s*:\s*" + _LVL + r"(?:\s+(.*))?$", re.A)
_P_SPLIT = re.compile(r"^(GVA|GPA|HPA|PGD|P4D|PUD|PMD|PTE|Mask1|Mask2|HFN|Offset)\s+"
                      r"([01]+" + _END + r".*)$", re.A)
_P_HEX = re.compile(r"^(GVA|GPA|HPA|CR3|EPTP)\b[^:=]{0,40}[:=]\s*0x([0-9a-fA-F]{1,16})" + _END
                    + r"(.*)$", re.A)
_P_ENTRY_HEX = re.compile(r"^" + _LVL + r" entry\b[^:]{0,40}:\s*0x([0-9a-fA-F]{1,16})" + _END
                          + r"(.*)$", re.A)
_P_HUGE = re.compile(r"^Huge Page \((\d{1,4})\s*([KMG])i?B?\) at level (\w{1,5})", re.A)
_P_NOT_PRESENT = re.compile(r"^" + _LVL + r"\b.{0,40}\bnot present", re.A)
_P_EPT_MARK = re.compile(r"^This is EPT\b", re.A)
_P_BEGIN = re.compile(r"^begin\b(.*)$", re.A)
_P_BASE = re.compile(r"^page_offset_base\s*:\s*0x([0-9a-fA-F]{16})\s*$", re.A)
_ALL_PATTERNS = (_P_VALUE, _P_INDEX, _P_HEADER, _P_NEXT, _P_ENTRY, _P_SPLIT, _P_HEX,
                 _P_ENTRY_HEX, _P_HUGE, _P_NOT_PRESENT, _P_EPT_MARK)

# Field widths (and the lowest bit each covers) of the 12/40/12 and 9/.../12 binary lines.
_ENTRY_FIELDS = ((12, 52), (40, 12), (12, 0))


def _binary_prefix(token: str) -> str:
    m = re.match(r"[01]*", token)
    return m.group(0)


def _fields(tokens: List[str], layout) -> Tuple[int, int, bool, List[str]]:
    """Read binary tokens into (value, mask, complete, problems) following layout [(width, low)].

    A token may be cut (fewer digits, or followed by non-binary text); the bits it shows are
    its highest ones. Reading stops at the first incomplete token.
    """
    value = mask = 0
    problems: List[str] = []
    for idx, (width, low) in enumerate(layout):
        if idx >= len(tokens):
            return value, mask, False, problems
        digits = _binary_prefix(tokens[idx])
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


# ---------------------------------------------------------------------------------- the parser

@dataclass
class _Run:
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
    levels_hint: Optional[int] = None
    pid: Optional[int] = None
    page_offset_base: Optional[int] = None
    seen: set = field(default_factory=set)
    warnings: List[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.items or self.addr_split or self.next_index or self.huge
                    or self.not_present)


def parse_log(text: str, width: Optional[int] = 80) -> ModLog:
    """Parse one gpt_dump or ept_dump log out of `text` (a dmesg capture, a copied report...).

    `width` is the console width lines may have been cut or wrapped at (None: never). When the
    text holds several runs, the last one is returned and a warning says so (parse_logs gives
    all). Raises ParseError when no run of either module can be found.
    """
    logs = parse_logs(text, width)
    last = logs[-1]
    if len(logs) > 1:
        note = (f"the text holds {len(logs)} runs of the module; this is the last one "
                f"(parse_logs returns all)")
        last = replace(last, warnings=(note,) + last.warnings)
    return last


def parse_log_file(path, width: Optional[int] = 80) -> ModLog:
    """parse_log on a file's text (bytes that are not UTF-8 are replaced, not fatal)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ParseError(f"cannot read module log {path}: {e.strerror or e}") from None
    return parse_log(data.decode("utf-8", errors="replace"), width)


def parse_logs(text: str, width: Optional[int] = 80) -> List[ModLog]:
    """Every run of gpt_dump/ept_dump in `text`, in order. Raises ParseError if there is none."""
    if not isinstance(text, str):
        raise ParseError(f"module log must be text (str), not {type(text).__name__}")
    lines = _split_lines(text, width)
    reader = _Reader()
    for line in lines:
        if line.text:
            reader.read(line)
    logs = [_build(run) for run in reader.runs if _is_log(run)]
    if not logs:
        first = next((ln for ln in lines if ln.text), None)
        seen = f"; line {first.no} reads {first.text[:60]!r}" if first else " (the text is empty)"
        raise ParseError(
            f"no gpt_dump or ept_dump log found in {len(lines)} line(s): expected lines such as "
            f"'Value at GVA: N', ' GPT PGD index: N', ' NEXT_LVL_GPA(CR3)  =  <40 binary digits>' "
            f"or ' 284: PGD <12> <40> <12 binary digits>'{seen}")
    return logs


def _is_log(run: _Run) -> bool:
    """A run is a log when a line only these modules print was seen (not just a row of numbers)."""
    return bool(run.kind_votes) or any(
        it.mask and it.what in ("entry", "next", "root", "mask1", "hfn") for it in run.items)


class _Reader:
    """Reads message lines one by one into runs; a second printing of a thing starts a new run."""

    def __init__(self):
        self.runs: List[_Run] = [_Run()]
        self.line: Optional[_Line] = None

    @property
    def run(self) -> _Run:
        return self.runs[-1]

    def once(self, key) -> None:
        """Note that `key` was printed; if it was already, the module ran again: new run."""
        if key in self.run.seen:
            self.runs.append(_Run())
        self.run.seen.add(key)

    def vote(self, kind: str) -> None:
        self.run.kind_votes[kind] = self.run.kind_votes.get(kind, 0) + 1

    def add(self, what, level, value, mask, source) -> None:
        self.once((what, level, source))
        self.run.items.append(Printed(what, level, value, mask, self.line.no, source))

    def warn(self, message: str) -> None:
        self.run.warnings.append(f"line {self.line.no}: {message}")

    def cut_number(self, rest: str) -> bool:
        """A number that ends where a cut line ends may have lost digits."""
        return self.line.cut and not rest.strip()

    def read(self, line: _Line) -> None:
        self.line = line
        t = line.text
        if line.module in KINDS:
            m = _P_BEGIN.match(t)
            if m:
                if not self.run.empty():
                    self.runs.append(_Run())
                self.vote(line.module)
                self.begin(m.group(1))
                return
        for pattern, method in self.dispatch:
            m = pattern.match(t)
            if m:
                method(self, m)
                return

    def begin(self, rest: str) -> None:
        """Our module's first line: 'begin pid=N comm=X gva=0x... levels=N'."""
        fields = dict(re.findall(r"(\w{1,10})=(\S{1,40})", rest, re.A))
        try:
            if "pid" in fields:
                self.run.pid = int(fields["pid"], 0)
            if fields.get("levels") in ("4", "5"):
                self.run.levels_hint = int(fields["levels"])
            for key in ("gva", "gpa"):
                if key in fields:
                    self.add("hex:" + key.upper(), None, int(fields[key], 0) & U64, U64,
                             "begin line")
        except ValueError:
            self.warn(f"begin line not understood: {rest[:60]!r}")

    def value(self, m) -> None:
        where, is_hex, number, rest = m.groups()
        self.vote("ept_dump" if where == "HPA" else "gpt_dump")
        source = "value hex line" if is_hex else "value line"
        if self.cut_number(rest) and not (is_hex and len(number.lstrip("-")) == 18):
            self.once(("value", None, source))
            self.warn(f"the value may be cut at the console width ({number!r}); not used")
            return
        digits = number.lstrip("-")
        value = int(digits, 16) if digits.startswith("0x") else int(digits)
        if value > U64:
            self.once(("value", None, source))
            self.warn(f"the value {number} does not fit in 64 bits; not used")
            return
        if number.startswith("-"):
            value = -value & U64    # a signed print of the same 64 bits
        self.add("value", None, value, U64, source)

    def index(self, m) -> None:
        self.vote("ept_dump" if m.group(1) == "EPT" else "gpt_dump")
        level, number, rest = m.group(2), m.group(3), m.group(4)
        if self.cut_number(rest):
            self.once(("index", level, "index line"))
            self.warn(f"{level} index may be cut at the console width ({number!r}); not used")
            return
        self.add("index", level, int(number), 0x1FF, "index line")

    def header(self, m) -> None:
        self.run.header = re.findall(r"\[\s*(\w{3}) IDX\s*\]", m.group(2))
        self.run.header_line = self.line.no

    def columns(self, m) -> None:
        # A bare row of numbers is weak evidence (other messages can look like it): it is only
        # a candidate, chosen in _build by where it stands, and never starts a new run.
        numbers = [int(x) for x in m.group(0).split()]
        if self.line.cut:
            numbers = numbers[:-1]     # the last one may have lost digits
        self.run.columns.append((self.line.no, numbers))

    def next_lvl(self, m) -> None:
        """NEXT_LVL_GPA(PGD)  =  <40 bits>  +  64 * idx (ept_dump: NEXT_LVL_HPA, no '+')."""
        space, level, digits, rest = m.groups()
        self.vote("ept_dump" if space == "HPA" else "gpt_dump")
        label = f"NEXT_LVL_{space}({level})"
        # Text glued to the digits (no blank between) means the digits are not all there.
        glued = rest[:1] if rest[:1] and not rest[:1].isspace() else ""
        value, mask, complete, problems = _fields([digits + glued] if digits else [], ((40, 12),))
        if problems:
            self.warn(f"{label}: {'; '.join(problems)}")
            return
        if level in ("CR3", "EPTP"):
            self.add("root", None, value, mask, "NEXT_LVL line")
        else:
            self.add("next", level, value, mask, "NEXT_LVL line")
        if not complete:
            self.run.warnings.append(_cut_message(self.line, label, mask, ADDR_BITS))
            return
        tail = re.match(r"^\s*\+\s*64\s*\*\s*(\d{1,4})(\s*)$", rest, re.A)
        if tail and not self.cut_number(tail.group(2)):
            self.run.next_index.append((level, int(tail.group(1)), self.line.no))
        elif rest.strip():
            why = "cut at the console width" if self.line.cut else "not understood"
            self.warn(f"text after the {label} value {why}: {rest.strip()[:30]!r}")

    def entry(self, m) -> None:
        """ 284: PGD <12> <40> <12>."""
        index, level, rest = int(m.group(1)), m.group(2), m.group(3) or ""
        self.add("index", level, index, 0x1FF, "entry line")
        self.fields_line("entry", level, rest.split(), f"{level} entry", "entry line")

    def split(self, m) -> None:
        """A 12/40/12 line (PMD, Mask1, HFN, GPA, Mask2, Offset, HPA) or a 9/../12 address."""
        name, rest = m.groups()
        tokens = rest.split()
        if name in ("GVA", "GPA") and len(_binary_prefix(tokens[0])) <= 9 and len(tokens) > 1:
            self.once(("address split",))
            self.run.addr_split = (self.line.no, tokens, self.line.cut)
            return
        what = {"Mask1": "mask1", "Mask2": "mask2", "HFN": "hfn", "Offset": "offset"}.get(name)
        level = None
        if name in ("GVA", "GPA", "HPA"):
            what = "hex:" + name     # address or final address: decided by the kind in _build
        elif what is None:
            what, level = "entry", name
        self.fields_line(what, level, tokens, f"{name} line", "split line")

    def fields_line(self, what, level, tokens, label, source) -> None:
        value, mask, complete, problems = _fields(tokens, _ENTRY_FIELDS)
        if problems:
            self.warn(f"{label}: {'; '.join(problems)}")
            return
        self.add(what, level, value, mask, source)
        if not complete:
            self.run.warnings.append(_cut_message(self.line, label, mask))

    def entry_hex(self, m) -> None:
        value, mask = self.hex_number(m.group(2), m.group(3))
        self.add("entry", m.group(1), value, mask, "entry hex line")

    def hex_line(self, m) -> None:
        name = m.group(1)
        value, mask = self.hex_number(m.group(2), m.group(3))
        if name in ("CR3", "EPTP"):
            self.vote("gpt_dump" if name == "CR3" else "ept_dump")
            self.add("root", None, value & ADDR_BITS, mask & ADDR_BITS, "root hex line")
        else:
            self.add("hex:" + name, None, value, mask, "hex line")

    def hex_number(self, digits: str, rest: str) -> Tuple[int, int]:
        """A hex number; one cut at the line's end is the first digits of 16 (our %016lx)."""
        value = int(digits, 16)
        if self.cut_number(rest) and len(digits) < 16:
            shift = 4 * (16 - len(digits))
            mask = (U64 >> shift) << shift
            self.run.warnings.append(_cut_message(self.line, "hex number", mask))
            return value << shift, mask
        return value, U64

    def huge(self, m) -> None:
        size = int(m.group(1)) << {"K": 10, "M": 20, "G": 30}[m.group(2)]
        self.once(("huge",))
        self.run.huge.append((m.group(3), size, self.line.no))

    def not_present(self, m) -> None:
        self.once(("not present",))
        self.run.not_present.append((m.group(1), self.line.no))

    def ept_mark(self, m) -> None:
        self.vote("ept_dump")

    def base(self, m) -> None:
        self.once(("page_offset_base",))
        self.run.page_offset_base = int(m.group(1), 16)

    dispatch = ()   # filled below, once the methods exist


_Reader.dispatch = (
    (_P_VALUE, _Reader.value), (_P_INDEX, _Reader.index), (_P_HEADER, _Reader.header),
    (_P_COLUMNS, _Reader.columns), (_P_NEXT, _Reader.next_lvl), (_P_ENTRY, _Reader.entry),
    (_P_SPLIT, _Reader.split), (_P_ENTRY_HEX, _Reader.entry_hex), (_P_HEX, _Reader.hex_line),
    (_P_HUGE, _Reader.huge), (_P_NOT_PRESENT, _Reader.not_present),
    (_P_EPT_MARK, _Reader.ept_mark), (_P_BASE, _Reader.base),
)


def _cut_message(line: _Line, what: str, mask: int, full: int = U64) -> str:
    why = "the line was cut at the console width" if line.cut else "the line ends early"
    return (f"line {line.no}: {what} incomplete ({why}): bits {bit_ranges(mask)} printed, "
            f"bits {bit_ranges(full & ~mask)} not")


# ------------------------------------------------------------------------- putting a run together

def _build(run: _Run) -> ModLog:
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
        value, mask, complete, problems = _fields(tokens, layout)
        if problems:
            warnings.append(f"line {no}: {_ADDR_NAME[kind]} binary line: {'; '.join(problems)}")
        if mask:
            items.append(Printed("address", None, value, mask, no, "binary line"))
        if not complete:
            warnings.append(_cut_message(_Line(no, "", cut, ""), f"{_ADDR_NAME[kind]} binary line",
                                         mask, U64 >> 16 if n == 4 else U64 >> 7))
    # Hex and 12/40/12 lines name the address or the final address by GVA/GPA/HPA.
    resolved = []
    for it in items:
        if it.what.startswith("hex:"):
            name = it.what[4:]
            what = ("address" if name == _ADDR_NAME[kind]
                    else "final" if name == _FINAL_NAME[kind] else None)
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
        following = names[0] if after in ("CR3", "EPTP") else (
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

    levels = []
    table, table_mask = root, root_mask
    for name in names:
        index = _first(items, "index", name)
        entry, entry_mask = _combine(items, "entry", name)
        nxt, nxt_mask = _combine(items, "next", name)
        size = sizes.get(name)
        if index is None and entry is None and nxt is None and name not in absent and not size:
            if levels:
                later = [lvl for lvl in names[names.index(name) + 1:]
                         if any(it.level == lvl for it in items)]
                if later:
                    warnings.append(f"nothing is printed for the {name} level, so the lines for "
                                    f"{', '.join(later)} after it are not used")
                break     # the log stops here
            table, table_mask = None, 0
            continue
        levels.append(LogLevel(name, index, entry, entry_mask, nxt, nxt_mask, table, table_mask,
                               size, False if name in absent else None))
        table, table_mask = nxt, nxt_mask
        if size or name in absent:
            break
    if levels and levels[-1].entry is None and levels[-1].present is None:
        warnings.append(f"the log stops before the {levels[-1].name} entry: it is not printed")
    if final is None and not absent:
        warnings.append(f"the final {_FINAL_NAME[kind]} is not printed")
    return ModLog(kind, address, address_mask, root, root_mask, tuple(levels), final, final_mask,
                  value if value_mask else None, tuple(warnings), tuple(items), run.pid, n,
                  run.page_offset_base)


def _kind_of(run: _Run) -> str:
    votes = run.kind_votes
    if not votes:
        # Only entry/address lines: an HPA line or a Mask1 block means EPT.
        if any(it.what in ("hex:HPA", "mask1", "hfn") for it in run.items):
            return "ept_dump"
        return "gpt_dump"
    return max(KINDS, key=lambda k: votes.get(k, 0))


def _level_names(run: _Run) -> Tuple[str, ...]:
    if run.levels_hint == 5:
        return LEVELS_5
    named = {it.level for it in run.items if it.level}
    named |= {lvl for lvl, _, _ in run.next_index}
    if "P4D" in named or (run.header and "P4D" in run.header):
        return LEVELS_5
    if run.header and len(run.header) == 5:
        return LEVELS_5
    if run.addr_split:
        lengths = [len(_binary_prefix(t)) for t in run.addr_split[1]]
        if lengths[:6] == [9, 9, 9, 9, 9, 12]:
            return LEVELS_5
    return LEVELS_4


def _column_line(run: _Run, n: int) -> Optional[Tuple[int, List[int]]]:
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
            value, mask = _merge(value, mask, it.value, it.mask)
    return (value, mask) if mask else (None, 0)


def _first(items: Iterable[Printed], what: str, level: str) -> Optional[int]:
    order = ("index line", "entry line", "column line", "NEXT_LVL line")
    found = [it for it in items if it.what == what and it.level == level]
    found.sort(key=lambda it: order.index(it.source) if it.source in order else len(order))
    return found[0].value if found else None


# ----------------------------------------------------------------------------- what a log implies

@dataclass(frozen=True)
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
    """The level whose entry maps the page, with the page size, as far as the log tells."""
    for lvl in log.levels:
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
    return out


def _flag_findings(log: ModLog) -> List[Finding]:
    """Present and page-size bits: what the walk needed them to be, where they were printed."""
    out = []
    leaf = leaf_of(log)
    for lvl in log.levels:
        if lvl.entry is None or lvl.present is False:
            continue
        is_leaf = bool(leaf) and leaf[0].name == lvl.name
        if log.kind == "ept_dump":
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
        if lvl.name in PAGE_SIZES and lvl.name != "PTE":
            ps = lvl.entry >> 7 & 1
            ps_known = lvl.entry_known_mask >> 7 & 1
            agree = None if not ps_known else ps == int(is_leaf)
            text = (f"{lvl.name} entry PS (bit 7) should be {int(is_leaf)} "
                    f"({'a ' + _size(leaf[1]) + ' leaf' if is_leaf else 'not a leaf'}): ")
            text += "not printed" if not ps_known else f"printed {ps}"
            out.append(Finding("flags", lvl.name, lvl.entry, None, 1 << 7 if ps_known else 0,
                               agree, text))
    return out


def _size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and not size & ((1 << shift) - 1):
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _final_findings(log: ModLog, addr_name: str, final_name: str) -> List[Finding]:
    out = []
    absent = next((lvl for lvl in log.levels if lvl.present is False), None)
    if absent is not None:
        # The walk ended at a not-present entry: there is no final address to recompute.
        known = absent.entry_known_mask & 1
        agree = None if not known else not absent.entry & 1
        text = (f"the log says the {absent.name} entry is not present, so the {addr_name} is "
                f"not mapped; P (bit 0) of the entry: "
                + ("not printed" if agree is None else "0, agrees" if agree else "1, DIFFERS"))
        out.append(Finding("flags", absent.name, absent.entry, None, known, agree, text))
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


# --------------------------------------------------------------- the log against an outside walk

@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
            text = _entry_bits_text(d, lvl.entry, step.entry, lvl.name, log.kind)
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


# ------------------------------------------------------------------------- guest log + host log

@dataclass(frozen=True)
class Chain:
    """One experiment's two logs joined: GVA (guest) -> GPA (both) -> HPA (host)."""

    gva: Optional[int]
    gva_known_mask: int
    guest_gpa: Optional[int]          # the guest log's final GPA, printed or recomputed
    guest_gpa_known_mask: int
    host_gpa: Optional[int]           # the address the host log walked
    host_gpa_known_mask: int
    hpa: Optional[int]                # as the host log printed it
    hpa_known_mask: int
    hpa_recomputed: Optional[int]     # from the host log's leaf entry and GPA
    hpa_recomputed_mask: int
    gpa_compared_mask: int
    gpa_agree: Optional[bool]         # None: no GPA bit known on both sides
    guest_value: Optional[int]
    host_value: Optional[int]
    value_agree: Optional[bool]
    notes: Tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "gva": _h(self.gva), "gva_known_mask": hex(self.gva_known_mask),
            "guest_gpa": _h(self.guest_gpa), "guest_gpa_known_mask": hex(self.guest_gpa_known_mask),
            "host_gpa": _h(self.host_gpa), "host_gpa_known_mask": hex(self.host_gpa_known_mask),
            "hpa": _h(self.hpa), "hpa_known_mask": hex(self.hpa_known_mask),
            "hpa_recomputed": _h(self.hpa_recomputed),
            "hpa_recomputed_mask": hex(self.hpa_recomputed_mask),
            "gpa_compared_mask": hex(self.gpa_compared_mask), "gpa_agree": self.gpa_agree,
            "guest_value": _h(self.guest_value), "host_value": _h(self.host_value),
            "value_agree": self.value_agree, "notes": list(self.notes),
        }


def chain(guest_log: ModLog, host_log: ModLog) -> Chain:
    """Join a gpt_dump (guest) and an ept_dump (host) log of one experiment.

    The guest's GPA is its printed final address, completed with what its leaf entry and
    GVA imply (at least the page offset); it is compared with the host log's GPA on the bits
    both know. Raises UsageError when the logs are not one gpt_dump and one ept_dump.
    """
    if guest_log.kind != "gpt_dump" or host_log.kind != "ept_dump":
        raise UsageError(f"chain() needs a gpt_dump log and an ept_dump log, in that order; "
                         f"got {guest_log.kind} and {host_log.kind}")
    notes = []
    gpa, gmask = implied_final(guest_log)
    if guest_log.final_address is not None:
        gpa, gmask = _merge(guest_log.final_address, guest_log.final_known_mask, gpa, gmask)
    else:
        notes.append(f"the guest log does not print its GPA; known from its own entries and "
                     f"GVA: bits {bit_ranges(gmask)}")
    hgpa, hmask = host_log.address, host_log.address_bits_known
    both = gmask & hmask
    agree = None
    if hgpa is not None and both:
        differ = (gpa ^ hgpa) & both
        agree = not differ
        notes.append("guest GPA and host GPA: " + (
            f"agree on bits {bit_ranges(both)}" if agree else
            f"DIFFER at bit(s) {bit_ranges(differ)}: not the same page, or not one experiment"))
    hpa_c, hpa_cmask = implied_final(host_log)
    if guest_log.value is not None and host_log.value is not None:
        value_agree = guest_log.value == host_log.value
        notes.append(f"value {guest_log.value} at the GVA and {host_log.value} at the HPA: "
                     + ("the same" if value_agree else "DIFFERENT"))
    else:
        value_agree = None
    low48 = (1 << 48) - 1
    if guest_log.address is not None and hgpa is not None and hmask & low48 == low48:
        text = explain_direct_map(guest_log.address, hgpa)
        if text:
            notes.append(text)
        base = guest_log.page_offset_base
        if base is not None:
            same = (guest_log.address - hgpa) & U64 == base
            notes.append(f"the guest log prints page_offset_base {hex(base)}: GVA - host GPA "
                         + ("equals it" if same else "does not equal it"))
    if hgpa is not None and hpa_cmask == U64:
        text = explain_shared_bits(hgpa, hpa_c, "GPA", "HPA")
        if text:
            notes.append(text)
    return Chain(guest_log.address, guest_log.address_bits_known, gpa, gmask, hgpa, hmask,
                 host_log.final_address, host_log.final_known_mask, hpa_c, hpa_cmask, both,
                 agree, guest_log.value, host_log.value, value_agree, tuple(notes))


# --------------------------------------------------------------------- why indexes may be equal

GIB = 1 << 30
# Where KASLR may put page_offset_base (arch/x86/mm/kaslr.c): from __PAGE_OFFSET_BASE_L4/L5 up
# to CPU_ENTRY_AREA_BASE, in 1 GiB steps (512 GiB steps with 5-level paging).
DIRECT_MAP_START_L4 = 0xFFFF_8880_0000_0000
DIRECT_MAP_START_L5 = 0xFF11_0000_0000_0000
DIRECT_MAP_END = 0xFFFF_FE00_0000_0000


def _index_names(a: int, b: int) -> List[str]:
    """Which of PMD index, PTE index and page offset two addresses share."""
    same = []
    if (a ^ b) >> 21 & 0x1FF == 0:
        same.append("PMD index")
    if (a ^ b) >> 12 & 0x1FF == 0:
        same.append("PTE index")
    if (a ^ b) & 0xFFF == 0:
        same.append("offset")
    return same


def _the(names: List[str], verb_one: str, verb_many: str) -> str:
    """'the PTE index and the offset are' / 'the offset is'."""
    items = [f"the {n}" for n in names]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{text} {verb_one if len(items) == 1 else verb_many}"


def explain_shared_bits(a: int, b: int, a_name: str = "GPA", b_name: str = "HPA") -> Optional[str]:
    """Why two addresses share their PMD/PTE indexes or offset: shared low bits, or chance."""
    same = _index_names(a, b)
    if not same:
        return None
    x = (a ^ b) & U64
    low = 64 if not x else (x & -x).bit_length() - 1     # bits low-1..0 are equal
    text = (f"{a_name} {hex(a)} and {b_name} {hex(b)} share bits {low - 1}..0" if low
            else f"{a_name} {hex(a)} and {b_name} {hex(b)} differ in bit 0")
    by_bits = [n for n in same if {"offset": 12, "PTE index": 21, "PMD index": 30}[n] <= low]
    chance = [n for n in same if n not in by_bits]
    if low >= 30:
        text += " (a 1 GiB mapping, or the same 1 GiB region)"
    elif low >= 21:
        text += " (as a 2 MiB page maps them: its frame keeps the low 21 bits)"
    elif low >= 12:
        text += " (as any page keeps the 12-bit offset)"
    if by_bits:
        text += f": so {_the(by_bits, 'is', 'are')} equal by construction"
    if chance:
        text += f"; {_the(chance, 'is', 'are')} equal only by chance"
    others = [n for n in ("PMD index", "PTE index", "offset") if n not in same]
    if others:
        text += f"; {_the(others, 'differs', 'differ')}"
    return text + "."


def explain_direct_map(gva: int, gpa: int) -> Optional[str]:
    """Say whether a Linux x86-64 GVA is the direct-map alias of a GPA, and what follows.

    The direct map puts GPA g at page_offset_base + g, a base KASLR places on a 1 GiB boundary:
    if (gva - gpa) is such a base, bits 29..0 of both are equal and so their PMD index, PTE
    index and offset. Otherwise equal indexes come from shared low bits or chance (see
    explain_shared_bits). None when nothing is equal and it is not a direct-map alias.
    """
    gva &= U64
    gpa &= U64
    base = (gva - gpa) & U64
    start = DIRECT_MAP_START_L4 if gva >= DIRECT_MAP_START_L4 else DIRECT_MAP_START_L5
    in_range = start <= gva < DIRECT_MAP_END and start <= base < DIRECT_MAP_END
    if in_range and not base % GIB:
        default = " (the default: memory KASLR is off)" if base == start else \
            " (placed there by KASLR)"
        text = (f"GVA {hex(gva)} = {hex(base)} + GPA {hex(gpa)}: {hex(base)} is 1 GiB-aligned and "
                f"lies in the x86-64 direct-map range [{hex(start)}, {hex(DIRECT_MAP_END)}), so "
                f"the GVA is the kernel's direct-map alias of the GPA, page_offset_base = "
                f"{hex(base)}{default}. Both share bits 29..0: the PMD index "
                f"({gva >> 21 & 0x1FF}), the PTE index ({gva >> 12 & 0x1FF}) and the offset "
                f"({hex(gva & 0xFFF)}) are equal by construction, not by coincidence")
        if not base % (1 << 39):
            text += f"; the base is 512 GiB-aligned too, so the PUD index ({gva >> 30 & 0x1FF}) " \
                    f"is equal as well"
        return text + "."
    why = ("not 1 GiB-aligned" if base % GIB else
           f"outside the direct-map range [{hex(start)}, {hex(DIRECT_MAP_END)})")
    shared = explain_shared_bits(gva, gpa, "GVA", "GPA")
    if shared is None:
        return None
    return f"GVA - GPA = {hex(base)} is {why}: not a direct-map alias. {shared}"
