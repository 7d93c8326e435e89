"""vmcoreinfo: the facts a Linux kernel writes about itself for crash tools.

It is text, one `KEY=VALUE` a line (kernel/vmcore_info.c, crash_core.c before 6.9):
`OSRELEASE=6.1.0-..`, `BUILD-ID=<hex>`, `PAGESIZE=4096`, `SYMBOL(name)=<hex>`,
`SIZE(name)=<dec>`, `OFFSET(struct.member)=<dec>`, `LENGTH(name)=<dec>`, `NUMBER(name)=<dec>`
(arm64 writes a few as 0x<hex>), `CONFIG_X=y`, `KERNELOFFSET=<hex>`, `CRASHTIME=<dec>`. The
kernel keeps it in an ELF note named "VMCOREINFO" (type 0) whose descriptor is the text; since
Linux 6.0 it names the kallsyms tables (SYMBOL(kallsyms_names) and the rest), which with the
kernel's BTF is enough to read the kernel without symbol files.

parse() reads the text, find_note() finds the note in a buffer of bytes (scanning guest RAM
for it is the caller's job). Both take hostile input: bounded, and failing with
VmcoreinfoError.
"""

from __future__ import annotations

import re
import struct
from typing import Callable, Dict, List, NamedTuple, Optional, Set

from .errors import VmcoreinfoError

NOTE_NAME = b"VMCOREINFO\0"
MAX_TEXT = 64 << 10         # the kernel's is one page at most
# SYMBOL()s whose value is not the symbol's address: VMCOREINFO_SYMBOL_ARRAY(mem_section)
# writes the pointer mem_section holds (an allocated array, with SPARSEMEM_EXTREME)
VALUE_SYMBOLS = frozenset({"mem_section"})
_LINE = re.compile(r"(SYMBOL|SIZE|OFFSET|LENGTH|NUMBER)\(([^()=\s]+)\)=(.*)")
_KEY = re.compile(r"[A-Z][A-Z0-9_\-]*")


class Vmcoreinfo:
    """A parsed vmcoreinfo text: symbols, offsets, sizes, lengths, numbers, configs and the
    plain keys (osrelease, pagesize, kerneloffset, build_id); `other` keeps unknown keys."""

    def __init__(self, text: str):
        self.text = text
        self.osrelease: Optional[str] = None
        self.build_id: Optional[str] = None
        self.pagesize: Optional[int] = None
        self.kerneloffset: Optional[int] = None
        self.crashtime: Optional[int] = None
        self.symbols: Dict[str, int] = {}
        self.sizes: Dict[str, int] = {}
        self.offsets: Dict[str, int] = {}
        self.lengths: Dict[str, int] = {}
        self.numbers: Dict[str, int] = {}
        self.configs: Set[str] = set()
        self.other: Dict[str, str] = {}

    @classmethod
    def parse(cls, text, source: str = "vmcoreinfo") -> "Vmcoreinfo":
        """Parse vmcoreinfo text (str or bytes; trailing NULs ignored). Raises
        VmcoreinfoError for a malformed value of a known key or text that is not vmcoreinfo."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).split(b"\0", 1)[0].decode("ascii", "replace")
        text = text.split("\0", 1)[0]
        if len(text) > MAX_TEXT:
            raise VmcoreinfoError(f"{source}: {len(text)} bytes, more than vmcoreinfo's "
                                  f"{MAX_TEXT}")
        self = cls(text)
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            self._line(line, n, source)
        if not (self.symbols or self.osrelease or self.offsets):
            raise VmcoreinfoError(f"{source}: no OSRELEASE, SYMBOL() or OFFSET() line: "
                                  "not vmcoreinfo text")
        return self

    def _line(self, line: str, n: int, source: str) -> None:
        def bad(why: str):
            return VmcoreinfoError(f"{source} line {n}: {line[:100]!r}: {why}")

        m = _LINE.fullmatch(line)
        if m:
            kind, name, value = m.groups()
            try:
                if kind == "SYMBOL":
                    v = int(value, 16)
                elif kind == "NUMBER":
                    v = int(value, 16) if value.lower().startswith(("0x", "-0x")) else \
                        int(value, 10)
                else:
                    v = int(value, 10)
            except ValueError:
                raise bad(f"{kind} value is not a number") from None
            if kind == "SYMBOL" and not 0 <= v < 1 << 64:
                raise bad("symbol address out of 64-bit range")
            if kind == "OFFSET" and "." not in name:
                raise bad("OFFSET() names no member (expected struct.member)")
            {"SYMBOL": self.symbols, "SIZE": self.sizes, "OFFSET": self.offsets,
             "LENGTH": self.lengths, "NUMBER": self.numbers}[kind][name] = v
            return
        key, eq, value = line.partition("=")
        if not eq or not _KEY.fullmatch(key):
            raise bad("not KEY=VALUE")
        try:
            if key == "OSRELEASE":
                self.osrelease = value
            elif key == "BUILD-ID":
                self.build_id = value
            elif key == "PAGESIZE":
                self.pagesize = int(value, 10)
            elif key == "KERNELOFFSET":
                self.kerneloffset = int(value, 16)
            elif key == "CRASHTIME":
                self.crashtime = int(value, 10)
            elif key.startswith("CONFIG_") and value == "y":
                self.configs.add(key[len("CONFIG_"):])
            else:
                self.other[key] = value
        except ValueError:
            raise bad(f"{key} value is not a number") from None

    def symbol(self, name: str) -> int:
        """SYMBOL(name)'s address. Raises VmcoreinfoError if the note does not give it."""
        try:
            return self.symbols[name]
        except KeyError:
            raise VmcoreinfoError(f"vmcoreinfo has no SYMBOL({name})"
                                  + (" (kallsyms tables are listed since Linux 6.0)"
                                     if name.startswith("kallsyms_") else "")) from None

    def offset(self, struct_name: str, member: str) -> int:
        """OFFSET(struct.member). Raises VmcoreinfoError if absent."""
        try:
            return self.offsets[f"{struct_name}.{member}"]
        except KeyError:
            raise VmcoreinfoError(f"vmcoreinfo has no OFFSET({struct_name}.{member})") from None

    def kallsyms_tables(self) -> Dict[str, int]:
        """The kallsyms_* SYMBOL()s, as decode_tables() takes them."""
        return {k: v for k, v in self.symbols.items() if k.startswith("kallsyms_")}

    def decode_kallsyms(self, read: Callable[[int, int], bytes], mode: str = "auto"):
        """Decode the kernel's kallsyms through read(addr, n), every other SYMBOL() here
        (but the VALUE_SYMBOLS, which hold a pointer's value) serving as a check of the
        decode. Raises KallsymsError."""
        from .kallsyms import Kallsyms
        check = {k: v for k, v in self.symbols.items()
                 if not k.startswith("kallsyms_") and k not in VALUE_SYMBOLS}
        return Kallsyms.from_tables(read, self.kallsyms_tables(), mode=mode, check=check)

    def __repr__(self):
        return (f"<Vmcoreinfo {self.osrelease}: {len(self.symbols)} symbols, "
                f"{len(self.offsets)} offsets>")


class Note(NamedTuple):
    offset: int         # of the note header in the buffer
    text: str


def find_notes(data: bytes, limit: int = 16) -> List[Note]:
    """Every VMCOREINFO ELF note in `data` (little-endian header: namesz=11, descsz, type 0,
    "VMCOREINFO\\0", padding, then descsz bytes of text that reads as vmcoreinfo)."""
    out: List[Note] = []
    pos = 0
    data = bytes(data)
    while len(out) < limit:
        pos = data.find(NOTE_NAME, pos)
        if pos < 0:
            break
        hdr = pos - 12
        if hdr >= 0:
            namesz, descsz, ntype = struct.unpack_from("<III", data, hdr)
            desc = pos + 12                       # 11 bytes of name, padded to 12
            if namesz == len(NOTE_NAME) and ntype == 0 and 0 < descsz <= MAX_TEXT \
                    and desc + descsz <= len(data):
                raw = data[desc:desc + descsz].split(b"\0", 1)[0]
                if _plausible(raw):
                    out.append(Note(hdr, raw.decode("ascii")))
        pos += 1
    return out


def find_note(data: bytes) -> Optional[Note]:
    """The first VMCOREINFO note in `data`, or None."""
    notes = find_notes(data, limit=1)
    return notes[0] if notes else None


def _plausible(raw: bytes) -> bool:
    if not raw or any(b > 126 or (b < 32 and b not in (9, 10)) for b in raw):
        return False
    first = raw.split(b"\n", 1)[0]
    return b"=" in first and (raw.startswith(b"OSRELEASE=") or b"SYMBOL(" in raw)
