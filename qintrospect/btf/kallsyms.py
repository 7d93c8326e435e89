"""Kernel symbols: /proc/kallsyms text, or the compressed tables inside a kernel's memory.

The text (`ADDRESS TYPE NAME` and, for a module's symbols, `\\t[MODULE]`) is what a host's
kernel shows. The tables (built by the kernel's scripts/kallsyms.c, read by kernel/kallsyms.c)
are what a guest kernel holds, and since Linux 6.0 its vmcoreinfo note gives their addresses:

- kallsyms_num_syms: u32, the number of symbols.
- kallsyms_names: per symbol, a length (one byte; since 6.1 two bytes when the first has bit 7
  set: (b0 & 0x7f) | b1 << 7), then that many token codes. The expanded tokens are the type
  letter followed by the name.
- kallsyms_token_table: 256 NUL-terminated tokens; kallsyms_token_index: 256 u16 offsets of
  each token in the table.
- addresses, in one of four layouts (MODES):
  * "absolute": kallsyms_addresses[], one unsigned long each (kernels without
    KALLSYMS_BASE_RELATIVE; the option went away after 6.9);
  * "absolute_percpu": kallsyms_offsets[] s32 and kallsyms_relative_base: a value >= 0 is the
    address itself (x86-64 SMP per-CPU symbols, shown as type 'A'), a negative one means
    relative_base - 1 - value (x86-64 until per-CPU symbols became ordinary, around 6.15;
    Debian's 6.1 and 6.12);
  * "relative": relative_base + (u32)value (other architectures; x86-64 after that);
  * "pc_relative": the address of the entry plus its s32 value, and no relative_base
    (proposed in 2026).
  The versions named here come from reading the patches, not from kernels at hand: "auto"
  does not rely on them, it tries the plausible layouts and keeps the one that decodes in
  address order and agrees with the `check` symbols.
  Order and padding of these tables in memory differ between versions (6.1 puts the offsets
  first, later kernels the count and names), and 6.2 (and late 6.1 stable kernels, Debian's
  included) add kallsyms_seqs_of_names; decoding needs only the addresses vmcoreinfo gives,
  so those differences do not matter here.

Tables from a guest are untrusted: counts, lengths and indexes are bounded and checked, and
a decode that disagrees with vmcoreinfo's own SYMBOL() values is refused.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from array import array
from typing import (
    Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple,
)

from .errors import AmbiguousSymbol, KallsymsError, KallsymsRestricted, SymbolNotFound

Read = Callable[[int, int], bytes]

PROC_KALLSYMS = "/proc/kallsyms"
MODES = ("absolute", "absolute_percpu", "relative", "pc_relative")
MAX_SYMS = 1 << 22          # Linux has ~2e5 core symbols; 4M is far beyond any kernel
MAX_NAME = 1024             # KSYM_NAME_LEN is 512 (128 before 6.1)
MAX_TOKEN_TABLE = 1 << 16
MAX_NAMES_BYTES = 64 << 20
CHUNK = 64 << 10
TABLES = ("kallsyms_num_syms", "kallsyms_names", "kallsyms_token_table",
          "kallsyms_token_index")
CORE = "vmlinux"            # module name that selects the kernel's own symbols
_NONZERO = re.compile(r"^0*[1-9a-fA-F][0-9a-fA-F]* ", re.M)


class Symbol(NamedTuple):
    address: int
    type: str               # nm-style letter: T/t text, D/d data, B/b bss, R/r rodata, A ...
    name: str
    module: Optional[str]   # None for the kernel's own symbols

    def __str__(self):
        mod = f" [{self.module}]" if self.module else ""
        return f"{self.address:#x} {self.type} {self.name}{mod}"


class Kallsyms:
    """A symbol table: by name (with duplicates kept) and by address."""

    def __init__(self, symbols: List[Symbol], source: str, mode: Optional[str] = None):
        self.symbols, self.source, self.mode = symbols, source, mode
        self._names: Optional[Dict[str, List[Symbol]]] = None
        self._sorted: Optional[Tuple[List[int], List[Symbol]]] = None

    @property
    def _by_name(self) -> Dict[str, List[Symbol]]:
        if self._names is None:
            names: Dict[str, List[Symbol]] = {}
            for s in self.symbols:
                lst = names.get(s.name)
                if lst is None:
                    names[s.name] = [s]
                else:
                    lst.append(s)
            self._names = names
        return self._names

    # ---- text ----------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, source: str = PROC_KALLSYMS, allow_restricted: bool = False,
              names: Optional[Iterable[str]] = None) -> "Kallsyms":
        """Symbols from /proc/kallsyms text (only those called one of `names`, if given: a
        fast search instead of reading every line). Raises KallsymsError for a malformed
        line, KallsymsRestricted if every address is zero (kptr_restrict), unless allowed."""
        if names is not None:
            return cls._parse_some(text, source, allow_restricted, names)
        syms = _fast_lines(text)
        if syms is None:                 # something odd: the careful pass says what and where
            syms = _careful_lines(text, source)
        if syms and not allow_restricted and not any(s.address for s in syms):
            raise KallsymsRestricted(restricted_message(source))
        return cls(syms, source)

    @classmethod
    def _parse_some(cls, text, source, allow_restricted, names) -> "Kallsyms":
        lines = []
        for name in set(names):
            key, pos = " " + name, 0
            while True:
                pos = text.find(key, pos)
                if pos < 0:
                    break
                end = pos + len(key)
                pos = end
                if end < len(text) and text[end] not in "\n\t ":
                    continue
                start = text.rfind("\n", 0, end) + 1
                stop = text.find("\n", end)
                line = text[start:stop if stop >= 0 else len(text)]
                parts = line.split()
                if len(parts) in (3, 4) and parts[2] == name:
                    lines.append(line)
        syms = cls.parse("\n".join(lines), source, allow_restricted=True).symbols
        if text.strip() and not allow_restricted and not _NONZERO.search(text):
            raise KallsymsRestricted(restricted_message(source))
        syms.sort(key=lambda s: s.address)
        return cls(syms, source)

    @classmethod
    def read(cls, path: str = PROC_KALLSYMS, allow_restricted: bool = False,
             names: Optional[Iterable[str]] = None) -> "Kallsyms":
        """Parse a kallsyms file (default /proc/kallsyms), all of it or only `names`. Raises
        KallsymsError if unreadable, KallsymsRestricted if the kernel hides the addresses."""
        try:
            with open(path, "r", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise KallsymsError(f"cannot read {path}: {e.strerror or e}") from None
        return cls.parse(text, path, allow_restricted, names)

    # ---- lookups -------------------------------------------------------------------------
    def lookup(self, name: str, module: Optional[str] = None) -> List[Symbol]:
        """Every symbol called `name`; module=None: any, 'vmlinux': the kernel's own only,
        'kvm': that module's only."""
        syms = self._by_name.get(name, [])
        if module is None:
            return list(syms)
        want = None if module == CORE else module
        return [s for s in syms if s.module == want]

    def address(self, name: str, module: Optional[str] = None) -> int:
        """The address of `name`. Raises SymbolNotFound if absent, AmbiguousSymbol if several
        symbols of that name lie at different addresses (pass module=, or use lookup())."""
        syms = self.lookup(name, module)
        if not syms:
            where = f" in module {module}" if module and module != CORE else \
                " in the kernel itself" if module == CORE else ""
            others = self.lookup(name)
            hint = (" (there is one in " + ", ".join(sorted({s.module or CORE for s in others}))
                    + ")") if others else ""
            raise SymbolNotFound(f"{self.source}: no symbol {name!r}{where}{hint}")
        addrs = {s.address for s in syms}
        if len(addrs) > 1:
            raise AmbiguousSymbol(f"{self.source}: {len(syms)} symbols called {name!r} at "
                                  "different addresses: " + "; ".join(map(str, syms[:6]))
                                  + ("; ..." if len(syms) > 6 else "") +
                                  " (static symbols of several files or modules)")
        return syms[0].address

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.symbols)

    def __iter__(self) -> Iterator[Symbol]:
        return iter(self.symbols)

    def symbolize(self, address: int) -> Optional[Tuple[Symbol, int]]:
        """The nearest symbol at or below `address` and the offset from it, or None."""
        if self._sorted is None:
            ordered = sorted(self.symbols, key=lambda s: s.address)
            self._sorted = ([s.address for s in ordered], ordered)
        keys, ordered = self._sorted
        i = bisect.bisect_right(keys, address) - 1
        if i < 0:
            return None
        return ordered[i], address - keys[i]

    # ---- compressed tables in memory -------------------------------------------------
    @classmethod
    def from_tables(cls, read: Read, symbols: Mapping[str, int], *, mode: str = "auto",
                    check: Optional[Mapping[str, int]] = None, ptr_size: int = 8,
                    byteorder: str = "little", max_syms: int = MAX_SYMS) -> "Kallsyms":
        """Decode the kernel's compressed kallsyms tables through read(addr, n) -> bytes, given
        the tables' addresses (vmcoreinfo's SYMBOL(kallsyms_*) values). mode is one of MODES
        or "auto"; `check` ({name: address}, e.g. vmcoreinfo's other SYMBOL()s) must agree
        with the decode, and in "auto" picks among layouts. Raises KallsymsError."""
        return decode_tables(read, symbols, mode=mode, check=check, ptr_size=ptr_size,
                             byteorder=byteorder, max_syms=max_syms)


def _fast_lines(text: str) -> Optional[List[Symbol]]:
    """All symbols of well-formed kallsyms text quickly, or None if any line is not."""
    make = tuple.__new__
    out = []
    append = out.append
    try:
        for line in text.splitlines():
            parts = line.split()
            n = len(parts)
            if n == 3 and len(parts[1]) == 1:
                append(make(Symbol, (int(parts[0], 16), parts[1], parts[2], None)))
            elif n == 4 and len(parts[1]) == 1 and parts[3][0] == "[" and \
                    parts[3][-1] == "]" and len(parts[3]) > 2:
                append(make(Symbol, (int(parts[0], 16), parts[1], parts[2], parts[3][1:-1])))
            elif n:
                return None
    except ValueError:
        return None
    return out


def _careful_lines(text: str, source: str) -> List[Symbol]:
    syms: List[Symbol] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (3, 4) or len(parts[1]) != 1:
            raise KallsymsError(f"{source} line {n}: {line[:80]!r} is not 'ADDRESS TYPE "
                                "NAME [MODULE]'")
        try:
            addr = int(parts[0], 16)
        except ValueError:
            raise KallsymsError(f"{source} line {n}: address {parts[0][:40]!r} is not "
                                "hexadecimal") from None
        mod = None
        if len(parts) == 4:
            m = parts[3]
            if not (m.startswith("[") and m.endswith("]")) or len(m) < 3:
                raise KallsymsError(f"{source} line {n}: module {m[:40]!r} is not [NAME]")
            mod = m[1:-1]
        syms.append(Symbol(addr, parts[1], parts[2], mod))
    return syms


def restricted_message(source: str) -> str:
    """What to tell a person whose kallsyms shows only zero addresses."""
    try:
        with open("/proc/sys/kernel/kptr_restrict") as f:
            level = f.read().strip()
    except OSError:
        level = "?"
    who = "root" if hasattr(os, "geteuid") and os.geteuid() == 0 else "this user (not root)"
    return (f"{source} shows every address as 0: the kernel hides them from {who} "
            f"(kernel.kptr_restrict={level}). Run qintrospect as root with "
            "`sysctl kernel.kptr_restrict=1` (or 0); at 2 not even root sees them.")


# ---- the table decoder ------------------------------------------------------------------
class _Stream:
    """Bytes of a table whose end is not known, read in chunks on demand and bounded."""

    def __init__(self, read: Read, start: int, limit: int, what: str):
        self.read, self.start, self.limit, self.what = read, start, limit, what
        self.buf = b""

    def need(self, end: int) -> bytes:
        if end > self.limit:
            raise KallsymsError(f"{self.what} would run past {self.limit} bytes: the table is "
                                "corrupt or not a kallsyms table")
        while len(self.buf) < end:
            want = min(max(CHUNK, end - len(self.buf)), self.limit - len(self.buf))
            try:
                got = self.read(self.start + len(self.buf), want)
            except Exception:
                got = None
            if not got or len(got) < end - len(self.buf):     # near an unreadable page
                got = _read(self.read, self.start + len(self.buf), end - len(self.buf),
                            self.what)
            self.buf += bytes(got)
        return self.buf


def _read(read: Read, addr: int, n: int, what: str) -> bytes:
    try:
        data = read(addr, n)
    except Exception as e:      # the reader's own error, said with what we were reading
        raise KallsymsError(f"cannot read {what} ({n} bytes at {addr:#x}): {e}") from None
    if data is None or len(data) < n:
        raise KallsymsError(f"reading {what} at {addr:#x}: got {len(data or b'')} of {n} "
                            "bytes")
    return bytes(data[:n])


def _tokens(read: Read, table: int, index: int, e: str) -> List[bytes]:
    idx = struct.unpack(e + "256H", _read(read, index, 512, "kallsyms_token_index"))
    top = max(idx)
    st = _Stream(read, table, top + MAX_NAME + 1, "kallsyms_token_table")
    buf = st.need(top + 1)
    while buf.find(b"\0", top) < 0:
        buf = st.need(min(len(buf) + 256, st.limit))
    tokens = []
    for i, off in enumerate(idx):
        end = buf.find(b"\0", off)
        if end < 0 or end - off > MAX_NAME:
            raise KallsymsError(f"kallsyms token {i} at offset {off} is not a short "
                                "NUL-terminated string")
        tokens.append(buf[off:end])
    return tokens


def decode_tables(read: Read, symbols: Mapping[str, int], *, mode: str = "auto",
                  check: Optional[Mapping[str, int]] = None, ptr_size: int = 8,
                  byteorder: str = "little", max_syms: int = MAX_SYMS) -> Kallsyms:
    """See Kallsyms.from_tables."""
    missing = [n for n in TABLES if n not in symbols]
    if "kallsyms_offsets" not in symbols and "kallsyms_addresses" not in symbols:
        missing.append("kallsyms_offsets or kallsyms_addresses")
    if missing:
        raise KallsymsError("the kallsyms tables' addresses are missing: " + ", ".join(missing)
                            + " (vmcoreinfo lists them since Linux 6.0)")
    if mode != "auto" and mode not in MODES:
        raise KallsymsError(f"kallsyms layout {mode!r} unknown (one of {', '.join(MODES)})")
    e = "<" if byteorder == "little" else ">"
    num, = struct.unpack(e + "I", _read(read, symbols["kallsyms_num_syms"], 4,
                                        "kallsyms_num_syms"))
    if not 0 < num <= max_syms:
        raise KallsymsError(f"kallsyms_num_syms is {num}: not a plausible symbol count "
                            f"(1..{max_syms})")
    tokens = _tokens(read, symbols["kallsyms_token_table"], symbols["kallsyms_token_index"], e)
    after = [a for a in symbols.values() if a > symbols["kallsyms_names"]]
    names = _names(read, symbols["kallsyms_names"], num, tokens,
                   min(after) if after else None)
    candidates = _address_candidates(read, symbols, num, mode, e, ptr_size)
    problems = []
    for cand_mode, addrs in candidates:
        make = tuple.__new__            # Symbol(...) without its __new__'s keyword handling
        syms = [make(Symbol, (a, t, n, None)) for a, (t, n) in zip(addrs, names)]
        table = Kallsyms(syms, "kallsyms tables", cand_mode)
        bad = _disagreements(table, check or {})
        unsorted = next((i for i in range(1, num) if addrs[i] < addrs[i - 1]), None)
        if not bad and (unsorted is None or mode != "auto"):
            return table
        if bad:
            problems.append(f"as {cand_mode}: " + "; ".join(bad[:3]))
        else:
            problems.append(f"as {cand_mode}: addresses not in order at symbol {unsorted}")
    raise KallsymsError("the kallsyms tables do not decode consistently (" +
                        " | ".join(problems) + "): not this kernel's tables, or a layout "
                        "this reader does not know")


def _names(read: Read, start: int, num: int, tokens: List[bytes],
           end: Optional[int] = None) -> List[Tuple[str, str]]:
    """Each symbol's (type, name). The codes of a name are expanded by str.translate (one C
    call per name: a token may be several characters) over the table read as Latin-1. When
    the table's end is known (`end`: the next table's address), it is read in one piece and
    the loop does nothing else; a table that runs past it is read on in chunks."""
    limit = min(MAX_NAMES_BYTES, num * (2 + 0x3FFF))
    st = _Stream(read, start, limit, "kallsyms_names")
    table = {i: tok.decode("latin-1") for i, tok in enumerate(tokens)}
    if end is not None and 0 < end - start <= limit:
        try:
            buf = st.need(end - start)
        except KallsymsError:
            buf = b""
    else:
        buf = b""
    text, pos, out = buf.decode("latin-1"), 0, []
    append = out.append
    size = len(buf)
    for i in range(num):
        if pos + 2 > size:
            buf = st.need(pos + 2)
            text, size = buf.decode("latin-1"), len(buf)
        n = buf[pos]
        pos += 1
        if n & 0x80:
            n = (n & 0x7F) | (buf[pos] << 7)
            pos += 1
        elif not n:
            raise KallsymsError(f"kallsyms symbol {i} has length 0 (at byte {pos - 1} of "
                                "kallsyms_names)")
        if pos + n > size:
            buf = st.need(pos + n)
            text, size = buf.decode("latin-1"), len(buf)
        append(text[pos:pos + n].translate(table))
        pos += n
    for i, full in enumerate(out):
        if not full or len(full) > MAX_NAME:
            raise KallsymsError(f"kallsyms symbol {i} expands to {len(full)} bytes")
    return [(f[0], f[1:]) if f.isascii() else
            (f[0], f.encode("latin-1")[1:].decode("utf-8", "replace")) for f in out]


def _address_candidates(read, symbols, num, mode, e, ptr_size):
    if mode == "absolute" or (mode == "auto" and "kallsyms_offsets" not in symbols):
        if "kallsyms_addresses" not in symbols:
            raise KallsymsError("layout absolute needs kallsyms_addresses")
        raw = _read(read, symbols["kallsyms_addresses"], num * ptr_size, "kallsyms_addresses")
        arr = struct.unpack(f"{e}{num}{'Q' if ptr_size == 8 else 'I'}", raw)
        return [("absolute", list(arr))]
    base_addr = symbols.get("kallsyms_offsets")
    if base_addr is None:
        raise KallsymsError(f"layout {mode} needs kallsyms_offsets")
    offs = array("i", _read(read, base_addr, num * 4, "kallsyms_offsets"))
    if (e == "<") != (struct.pack("=I", 1) == struct.pack("<I", 1)):
        offs.byteswap()
    mask = (1 << (8 * ptr_size)) - 1
    rb = None
    if "kallsyms_relative_base" in symbols:
        rb, = struct.unpack(e + ("Q" if ptr_size == 8 else "I"),
                            _read(read, symbols["kallsyms_relative_base"], ptr_size,
                                  "kallsyms_relative_base"))
    if mode == "auto":
        if rb is None:
            order = ["pc_relative"]
        else:
            negatives = sum(1 for v in offs if v < 0)
            order = ["absolute_percpu", "relative"] if negatives else \
                ["relative", "absolute_percpu"]
    else:
        order = [mode]
    out = []
    for m in order:
        if m in ("absolute_percpu", "relative") and rb is None:
            raise KallsymsError(f"layout {m} needs kallsyms_relative_base")
        if m == "absolute_percpu":
            addrs = [v if v >= 0 else (rb - 1 - v) & mask for v in offs]
        elif m == "relative":
            addrs = [(rb + (v & 0xFFFFFFFF)) & mask for v in offs]
        elif m == "pc_relative":
            addrs = [(base_addr + 4 * i + v) & mask for i, v in enumerate(offs)]
        else:
            raise KallsymsError(f"layout {m} needs kallsyms_addresses")
        out.append((m, addrs))
    return out


def _disagreements(table: Kallsyms, check: Mapping[str, int]) -> List[str]:
    bad = []
    for name, want in check.items():
        got = {s.address for s in table.lookup(name)}
        if got and want not in got:
            bad.append(f"{name} decodes to {', '.join(hex(a) for a in sorted(got))}, "
                       f"expected {want:#x}")
    return bad
