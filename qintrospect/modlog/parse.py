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
from typing import List, Optional, Tuple

from ..errors import ParseError
from ..record import replace
from .assemble import (
    ENTRY_FIELDS, ROOT_NAMES, Run, binary_prefix, build, cut_message, read_fields,
)
from .model import ADDR_BITS, U64, Line, ModLog, Printed

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


def _split_lines(text: str, width: Optional[int]) -> List[Line]:
    raw = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: List[Line] = []
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
        out.append(Line(no, body.strip(), bool(width) and len(last) == width, module))
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
# ---------------------------------------------------------------------------------- the parser

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
    logs = [build(run) for run in reader.runs if _is_log(run)]
    if not logs:
        first = next((ln for ln in lines if ln.text), None)
        seen = f"; line {first.no} reads {first.text[:60]!r}" if first else " (the text is empty)"
        raise ParseError(
            f"no gpt_dump or ept_dump log found in {len(lines)} line(s): expected lines such as "
            f"'Value at GVA: N', ' GPT PGD index: N', ' NEXT_LVL_GPA(CR3)  =  <40 binary digits>' "
            f"or ' 284: PGD <12> <40> <12 binary digits>'{seen}")
    return logs


def _is_log(run: Run) -> bool:
    """A run is a log when a line only these modules print was seen (not just a row of numbers)."""
    return bool(run.kind_votes) or any(
        it.mask and it.what in ("entry", "next", "root", "mask1", "hfn") for it in run.items)


class _Reader:
    """Reads message lines one by one into runs; a second printing of a thing starts a new run."""

    def __init__(self):
        self.runs: List[Run] = [Run()]
        self.line: Optional[Line] = None

    @property
    def run(self) -> Run:
        return self.runs[-1]

    def once(self, key) -> None:
        """Note that `key` was printed; if it was already, the module ran again: new run."""
        if key in self.run.seen:
            self.runs.append(Run())
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

    def read(self, line: Line) -> None:
        self.line = line
        t = line.text
        if line.module in _MODULE_KIND:
            m = _P_BEGIN.match(t)
            if m:
                if not self.run.empty():
                    self.runs.append(Run())
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
        # a candidate, chosen in build by where it stands, and never starts a new run.
        numbers = [int(x) for x in m.group(0).split()]
        if self.line.cut:
            numbers = numbers[:-1]     # the last one may have lost digits
        self.run.columns.append((self.line.no, numbers))

    def next_lvl(self, m) -> None:
        """NEXT_LVL_GPA(PGD)  =  <40 bits>  +  64 * idx (ept_dump: NEXT_LVL_HPA, no '+')."""
        space, level, digits, rest = m.groups()
        self.vote("ept_dump" if space == "HPA" else "gpt_dump",
                  ROOT_NAMES.get(level, (None, None))[1])
        label = f"NEXT_LVL_{space}({level})"
        # Text glued to the digits (no blank between) means the digits are not all there.
        glued = rest[:1] if rest[:1] and not rest[:1].isspace() else ""
        value, mask, complete, problems = read_fields([digits + glued] if digits else [], ((40, 12),))
        if problems:
            self.warn(f"{label}: {'; '.join(problems)}")
            return
        if level in ROOT_NAMES:
            self.add("root", None, value, mask, "NEXT_LVL line")
        else:
            self.add("next", level, value, mask, "NEXT_LVL line")
        if not complete:
            self.run.warnings.append(cut_message(self.line, label, mask, ADDR_BITS))
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
        if name in ("GVA", "GPA") and len(binary_prefix(tokens[0])) <= 9 and len(tokens) > 1:
            self.once(("address split",))
            self.run.addr_split = (self.line.no, tokens, self.line.cut)
            return
        what = {"Mask1": "mask1", "Mask2": "mask2", "HFN": "hfn", "Offset": "offset"}.get(name)
        level = None
        if name in ("GVA", "GPA", "HPA"):
            what = "hex:" + name     # address or final address: decided by the kind in build
        elif what is None:
            what, level = "entry", name
        self.fields_line(what, level, tokens, f"{name} line", "split line")

    def fields_line(self, what, level, tokens, label, source) -> None:
        value, mask, complete, problems = read_fields(tokens, ENTRY_FIELDS)
        if problems:
            self.warn(f"{label}: {'; '.join(problems)}")
            return
        self.add(what, level, value, mask, source)
        if not complete:
            self.run.warnings.append(cut_message(self.line, label, mask))

    def entry_hex(self, m) -> None:
        value, mask = self.hex_number(m.group(2), m.group(3))
        self.add("entry", m.group(1), value, mask, "entry hex line")

    def hex_line(self, m) -> None:
        name = m.group(1)
        value, mask = self.hex_number(m.group(2), m.group(3))
        if name in ROOT_NAMES:
            self.vote(*ROOT_NAMES[name])
            self.add("root", None, value & ADDR_BITS, mask & ADDR_BITS, "root hex line")
        else:
            self.add("hex:" + name, None, value, mask, "hex line")

    def hex_number(self, digits: str, rest: str) -> Tuple[int, int]:
        """A hex number; one cut at the line's end is the first digits of 16 (our %016lx)."""
        value = int(digits, 16)
        if self.cut_number(rest) and len(digits) < 16:
            shift = 4 * (16 - len(digits))
            mask = (U64 >> shift) << shift
            self.run.warnings.append(cut_message(self.line, "hex number", mask))
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
