"""Just enough ELF to find a section by name (.BTF of a vmlinux or a module's .ko).

32- and 64-bit, either byte order; every header and offset is bounds-checked and anything out
of place raises ValueError with what was wrong (callers turn it into their own error).
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Optional

MAX_SECTIONS = 1 << 16


class Section(NamedTuple):
    name: str
    type: int
    addr: int
    offset: int
    size: int


def is_elf(data: bytes) -> bool:
    """True if data starts with the ELF magic."""
    return data[:4] == b"\x7fELF"


def elf_sections(data: bytes) -> List[Section]:
    """The section headers of an ELF image, with names. Raises ValueError if malformed."""
    if len(data) < 52 or not is_elf(data):
        raise ValueError("not an ELF file")
    cls, order = data[4], data[5]
    if cls not in (1, 2) or order not in (1, 2):
        raise ValueError(f"ELF class {cls} / data encoding {order} unknown")
    e = "<" if order == 1 else ">"
    if cls == 2:
        if len(data) < 64:
            raise ValueError("ELF64 header cut short")
        shoff, = struct.unpack_from(e + "Q", data, 40)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 58)
        fmt, need = e + "IIQQQQ", 40
    else:
        shoff, = struct.unpack_from(e + "I", data, 32)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 46)
        fmt, need = e + "IIIIII", 24
    if shoff == 0 or shnum == 0:
        return []
    if shentsize < need or shnum > MAX_SECTIONS or shoff + shentsize * shnum > len(data):
        raise ValueError(f"section headers at {shoff:#x} ({shnum} x {shentsize} bytes) do not "
                         f"fit in the file's {len(data)} bytes")
    raw = []
    for i in range(shnum):
        name, typ, _flags, addr, off, size = struct.unpack_from(fmt, data, shoff + i * shentsize)
        raw.append((name, typ, addr, off, size))
    if shstrndx >= shnum:
        raise ValueError(f"section name table index {shstrndx} beyond {shnum} sections")
    _, _, _, stroff, strsize = raw[shstrndx]
    if stroff + strsize > len(data):
        raise ValueError("section name table runs past the file's end")
    names = data[stroff:stroff + strsize]
    out = []
    for name_off, typ, addr, off, size in raw:
        if name_off >= len(names):
            raise ValueError(f"section name offset {name_off:#x} beyond the name table")
        end = names.find(b"\0", name_off)
        name = names[name_off:end if end >= 0 else len(names)].decode("latin-1")
        out.append(Section(name, typ, addr, off, size))
    return out


def elf_section(data: bytes, name: str) -> Optional[bytes]:
    """The bytes of the first section called `name`, or None. Raises ValueError if the ELF
    is malformed or the section lies outside the file."""
    for s in elf_sections(data):
        if s.name == name:
            if s.type == 8:          # SHT_NOBITS: occupies no file space
                return b""
            if s.offset + s.size > len(data):
                raise ValueError(f"section {name} [{s.offset:#x}, +{s.size:#x}) runs past "
                                 f"the file's end ({len(data):#x})")
            return data[s.offset:s.offset + s.size]
    return None
