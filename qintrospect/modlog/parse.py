"""Reading gpt_dump / ept_dump text into ModLog values.

Real logs are damaged text: dmesg timestamps, other messages in between, CRLF, and lines cut at
the console width (80 columns), sometimes wrapped onto the next line. Every number is kept with
the mask of the bits actually printed; a cut binary group keeps its highest bits (the modules
print bits high to low), and reading a group stops at its first character that is not a binary
digit.

The seed's ept_dump shows both: its 2 MiB block lines (" PMD    ", " Mask1  ", ... an 8-column
label) print bits 11..10 and then ")" where the 80-column cut falls, so bits 11..10 are read;
its HPA line ("HPA   ", a 6-column label, a plain 12/40/12 split) keeps 5 low characters, bits
11..7.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import ParseError
from ..record import field, record, replace
from .model import (
    ADDR_BITS, ADDR_NAME, FINAL_NAME, KINDS, LEVELS_4, LEVELS_5, U64, LogLevel, ModLog, Printed,
    bit_ranges, merge,
)

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


@record
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
_P_INDEX = re.compile(r"^(GPT|EPT|NPT)\s+" + _LVL + r"\s+index\s*:\s*(\d{1,6})" + _END + r"(.*)$",
                      re.A)
_P_COLUMNS = re.compile(r"^\d{1,3}(?:\s+\d{1,3}){2,5}$", re.A)
_P_HEADER = re.compile(r"^(GVA|GPA)\s+((?:\[\s*\w{3} IDX\s*\]\s*){1,6})", re.A)
_P_NEXT = re.compile(r"^NEXT_LVL_(GPA|HPA)\(\s*(CR3|EPTP|nCR3|NCR3|PGD|P4D|PUD|PMD|PTE)\s*\)"
                     r"\s*=\s*([01]*)(.*)$", re.A)
_P_ENTRY = re.compile(r"^(\d{1,3})\s*:\s*" + _LVL + r"(?:\s+(.*))?$", re.A)
_P_SPLIT = re.compile(r"^(GVA|GPA|HPA|PGD|P4D|PUD|PMD|PTE|Mask1|Mask2|HFN|Offset)\s+"
                      r"([01]+" + _END + r".*)$", re.A)
_P_HEX = re.compile(r"^(GVA|GPA|HPA|CR3|EPTP|nCR3|NCR3)\b[^:=]{0,40}[:=]\s*"
                    r"0x([0-9a-fA-F]{1,16})" + _END + r"(.*)$", re.A)
_P_ENTRY_HEX = re.compile(r"^" + _LVL + r" entry\b[^:]{0,40}:\s*0x([0-9a-fA-F]{1,16})" + _END
                          + r"(.*)$", re.A)
_P_HUGE = re.compile(r"^Huge Page \((\d{1,4})\s*([KMG])i?B?\) at level (\w{1,5})", re.A)
_P_NOT_PRESENT = re.compile(r"^" + _LVL + r"\b.{0,40}\bnot present", re.A)
# slat_dump: an entry the hardware refuses (NPT: a reserved bit, #NPF with RSVD; EPT: a
# misconfiguration) ends the walk
_P_FAULT = re.compile(r"^" + _LVL + r"\b.{0,20}\b(reserved bits? set|misconfigured)\b", re.A)
_P_EPT_MARK = re.compile(r"^This is (EPT|NPT)\b", re.A)
_P_EXPECT = re.compile(r"^Value check\s*:\s*expect\s*=\s*(0x[0-9a-fA-F]{1,16}|\d{1,20})" + _END
                       + r"(.*)$", re.A)
_P_BEYOND = re.compile(r"^GPA\s+0x[0-9a-fA-F]{1,16}\s+is beyond\b.{0,80}$", re.A)
_P_BEGIN = re.compile(r"^begin\b(.*)$", re.A)
_P_BASE = re.compile(r"^page_offset_base\s*:\s*0x([0-9a-fA-F]{16})\s*$", re.A)
_ALL_PATTERNS = (_P_VALUE, _P_INDEX, _P_HEADER, _P_NEXT, _P_ENTRY, _P_SPLIT, _P_HEX,
                 _P_ENTRY_HEX, _P_HUGE, _P_NOT_PRESENT, _P_FAULT, _P_EPT_MARK, _P_EXPECT,
                 _P_BEYOND)
# The modules whose "name: " prefix and "begin" line we know, and the kind of log each prints:
# slat_dump (vm/module/slat_dump.c) prints the seed's ept_dump layout, for NPT or EPT.
_MODULE_KIND = {"gpt_dump": "gpt_dump", "ept_dump": "ept_dump", "slat_dump": "ept_dump"}
# A root register's name in the NEXT_LVL and hex lines: which log and which table it means.
_ROOT_NAMES = {"CR3": ("gpt_dump", None), "EPTP": ("ept_dump", "ept"),
               "nCR3": ("ept_dump", "npt"), "NCR3": ("ept_dump", "npt")}

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

@record
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


MAX_LOG_BYTES = 16 << 20   # a module log is a few KiB; a whole dmesg is well under this


def parse_log_file(path, width: Optional[int] = 80) -> ModLog:
    """parse_log on a file's text (bytes that are not UTF-8 are replaced, not fatal). Reads at
    most MAX_LOG_BYTES: a device (/dev/zero) or a huge file is refused, not read to the end."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LOG_BYTES + 1)
    except OSError as e:
        raise ParseError(f"cannot read module log {path}: {e.strerror or e}") from None
    if len(data) > MAX_LOG_BYTES:
        raise ParseError(f"{path} is larger than {MAX_LOG_BYTES >> 20} MiB: not a module log "
                         "(give the gpt_dump/ept_dump lines, e.g. from dmesg)")
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

    def vote(self, kind: str, fmt: Optional[str] = None) -> None:
        self.run.kind_votes[kind] = self.run.kind_votes.get(kind, 0) + 1
        if fmt:
            self.run.format_votes[fmt] = self.run.format_votes.get(fmt, 0) + 1

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
        if line.module in _MODULE_KIND:
            m = _P_BEGIN.match(t)
            if m:
                if not self.run.empty():
                    self.runs.append(_Run())
                self.vote(_MODULE_KIND[line.module])
                self.run.module = line.module
                self.begin(m.group(1))
                return
        for pattern, method in self.dispatch:
            m = pattern.match(t)
            if m:
                method(self, m)
                return

    def begin(self, rest: str) -> None:
        """Our module's first line: 'begin pid=N comm=X gva=0x... levels=N'."""
        found = list(re.finditer(r"(\w{1,10})=(\S{1,40})", rest, re.A))
        fields = {m.group(1): m.group(2) for m in found}
        # The last value of a line cut at the console width may have lost its last digits.
        cut = found[-1].group(1) if found and self.cut_number(rest[found[-1].end():]) else None
        try:
            if "pid" in fields and cut != "pid":
                self.run.pid = int(fields["pid"], 0)
            if fields.get("levels") in ("4", "5") and cut != "levels":
                self.run.levels_hint = int(fields["levels"])
            if fields.get("format") in ("npt", "ept") and cut != "format":
                self.vote("ept_dump", fields["format"])
            if "maxphyaddr" in fields and cut != "maxphyaddr":
                self.run.maxphyaddr = int(fields["maxphyaddr"], 10)
            if "root" in fields and cut != "root":
                # slat_dump's root= as given: the table address (an EPTP's low bits are its
                # memory type and walk length, not address bits)
                value = int(fields["root"], 0) & U64
                self.add("root", None, value & ADDR_BITS, ADDR_BITS, "begin line")
            for key in ("gva", "gpa"):
                if key not in fields:
                    continue
                text = fields[key]
                if key != cut:
                    value, mask = int(text, 0) & U64, U64
                elif text[:2] == "0x" and len(text) > 2:
                    value, mask = self.hex_number(text[2:], "")   # 0x%016lx, cut short
                    value &= U64
                else:
                    self.warn(f"{key}= is cut at the console width ({text!r}); not used")
                    continue
                self.add("hex:" + key.upper(), None, value, mask, "begin line")
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
        table = m.group(1)
        self.vote("gpt_dump" if table == "GPT" else "ept_dump",
                  {"EPT": "ept", "NPT": "npt"}.get(table))
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
        self.vote("ept_dump" if space == "HPA" else "gpt_dump",
                  _ROOT_NAMES.get(level, (None, None))[1])
        label = f"NEXT_LVL_{space}({level})"
        # Text glued to the digits (no blank between) means the digits are not all there.
        glued = rest[:1] if rest[:1] and not rest[:1].isspace() else ""
        value, mask, complete, problems = _fields([digits + glued] if digits else [], ((40, 12),))
        if problems:
            self.warn(f"{label}: {'; '.join(problems)}")
            return
        if level in _ROOT_NAMES:
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
        if name in _ROOT_NAMES:
            self.vote(*_ROOT_NAMES[name])
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

    def fault(self, m) -> None:
        self.once(("fault",))
        reason = "reserved-bit" if m.group(2).startswith("reserved") else "ept-misconfiguration"
        self.run.faults.append((m.group(1), reason, self.line.no))

    def ept_mark(self, m) -> None:
        self.vote("ept_dump", m.group(1).lower())

    def expect(self, m) -> None:
        number, rest = m.groups()
        if self.cut_number(rest) and not (number.startswith("0x") and len(number) == 18):
            self.warn(f"the expected value may be cut at the console width ({number!r}); "
                      "not used")
            return
        value = int(number, 0)
        if value > U64:
            self.warn(f"the expected value {number} does not fit in 64 bits; not used")
            return
        self.add("expect", None, value, U64, "value check line")

    def beyond(self, m) -> None:
        self.once(("stopped",))
        self.run.stopped = m.group(0)

    def base(self, m) -> None:
        self.once(("page_offset_base",))
        self.run.page_offset_base = int(m.group(1), 16)

    dispatch = ()   # filled below, once the methods exist


_Reader.dispatch = (
    (_P_VALUE, _Reader.value), (_P_INDEX, _Reader.index), (_P_HEADER, _Reader.header),
    (_P_COLUMNS, _Reader.columns), (_P_NEXT, _Reader.next_lvl), (_P_ENTRY, _Reader.entry),
    (_P_SPLIT, _Reader.split), (_P_ENTRY_HEX, _Reader.entry_hex), (_P_HEX, _Reader.hex_line),
    (_P_HUGE, _Reader.huge), (_P_NOT_PRESENT, _Reader.not_present), (_P_FAULT, _Reader.fault),
    (_P_EPT_MARK, _Reader.ept_mark), (_P_BASE, _Reader.base), (_P_EXPECT, _Reader.expect),
    (_P_BEYOND, _Reader.beyond),
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
            warnings.append(f"line {no}: {ADDR_NAME[kind]} binary line: {'; '.join(problems)}")
        if mask:
            items.append(Printed("address", None, value, mask, no, "binary line"))
        if not complete:
            warnings.append(_cut_message(_Line(no, "", cut, ""), f"{ADDR_NAME[kind]} binary line",
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
        following = names[0] if after in _ROOT_NAMES else (
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
            value, mask = merge(value, mask, it.value, it.mask)
    return (value, mask) if mask else (None, 0)


def _first(items: Iterable[Printed], what: str, level: str) -> Optional[int]:
    order = ("index line", "entry line", "column line", "NEXT_LVL line")
    found = [it for it in items if it.what == what and it.level == level]
    found.sort(key=lambda it: order.index(it.source) if it.source in order else len(order))
    return found[0].value if found else None
