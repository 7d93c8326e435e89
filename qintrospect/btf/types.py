"""The values the BTF reader hands out: kinds, one decoded type record (Type), a struct
member (Member), where a member path lands (Field), and member paths ('arch.mmu', 'a[3].b')."""

from __future__ import annotations

import re
from typing import List, Union

from .errors import BtfLookupError

MAGIC = 0xEB9F
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
KIND_NAMES = {0: "void", INT: "int", PTR: "ptr", ARRAY: "array", STRUCT: "struct",
              UNION: "union", ENUM: "enum", FWD: "fwd", TYPEDEF: "typedef",
              VOLATILE: "volatile", CONST: "const", RESTRICT: "restrict", FUNC: "func",
              FUNC_PROTO: "func_proto", VAR: "var", DATASEC: "datasec", FLOAT: "float",
              DECL_TAG: "decl_tag", TYPE_TAG: "type_tag", ENUM64: "enum64"}
# words (4 bytes) after the 12-byte common part: (fixed, per vlen item), by kind
EXTRA_WORDS = (None, (1, 0), (0, 0), (3, 0), (0, 3), (0, 3), (0, 2), (0, 0), (0, 0), (0, 0),
          (0, 0), (0, 0), (0, 0), (0, 2), (1, 0), (0, 3), (0, 0), (1, 0), (0, 0), (0, 3))
MODIFIERS = frozenset((TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG))
INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4

MAX_BLOB = 256 << 20      # no kernel's BTF is near this
MAX_TYPES = 1 << 22       # the format allows 2^20 per blob; split chains add up
MAX_CHAIN = 64            # typedef/const/array chains longer than this are cycles or junk
MAX_NEST = 32             # anonymous struct/union nesting
MAX_SIZE = 1 << 48        # larger computed sizes are junk
SYSFS_BTF = "/sys/kernel/btf"


class Member:
    """One struct/union member: its name ("" when anonymous), type id, bit offset from the
    start of its struct, and bitfield size in bits (0: not a kind_flag bitfield)."""

    __slots__ = ("name", "type_id", "bit_offset", "bitfield_size")

    def __init__(self, name: str, type_id: int, bit_offset: int, bitfield_size: int):
        self.name, self.type_id = name, type_id
        self.bit_offset, self.bitfield_size = bit_offset, bitfield_size

    def __repr__(self):
        bf = f":{self.bitfield_size}" if self.bitfield_size else ""
        return f"Member({self.name!r}, type={self.type_id}, bit={self.bit_offset}{bf})"


class Type:
    """One decoded BTF record. `kind` is an int (INT, STRUCT, ...; kind_name says it in
    words); the fields that do not apply to a kind are None."""

    __slots__ = ("id", "kind", "name", "kind_flag", "vlen", "size", "ref", "encoding",
                 "int_offset", "bits", "elem", "index_type", "nelems", "members", "values",
                 "params", "linkage", "vars", "component_idx")

    def __init__(self, tid: int, kind: int, name: str, kind_flag: int, vlen: int):
        self.id, self.kind, self.name, self.kind_flag, self.vlen = tid, kind, name, kind_flag, vlen
        self.size = self.ref = self.encoding = self.int_offset = self.bits = None
        self.elem = self.index_type = self.nelems = self.members = self.values = None
        self.params = self.linkage = self.vars = self.component_idx = None

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind {self.kind}")

    @property
    def signed(self) -> bool:
        """For INT: the encoding's SIGNED bit; for ENUM/ENUM64: kind_flag (Linux 6.0+)."""
        if self.kind == INT:
            return bool(self.encoding & INT_SIGNED)
        return bool(self.kind_flag) if self.kind in (ENUM, ENUM64) else False

    def __repr__(self):
        return f"Type({self.id}, {self.kind_name}, {self.name!r})"


VOID = Type(0, 0, "void", 0, 0)


class Field:
    """Where a member path lands inside a type: bit_offset from the outer type's start,
    bit_size (None unless a bitfield), and the member's declared type (type_id, type) with
    `resolved` (typedefs and qualifiers stripped) so a caller sees pointer vs int vs struct."""

    __slots__ = ("path", "type_id", "type", "resolved", "bit_offset", "bit_size", "size")

    def __init__(self, path, type_id, type_, resolved, bit_offset, bit_size, size):
        self.path, self.type_id, self.type, self.resolved = path, type_id, type_, resolved
        self.bit_offset, self.bit_size, self.size = bit_offset, bit_size, size

    @property
    def offset(self) -> int:
        """Byte offset of the member (of the byte holding a bitfield's first bit)."""
        return self.bit_offset // 8

    @property
    def is_bitfield(self) -> bool:
        return self.bit_size is not None

    @property
    def kind(self) -> str:
        return self.resolved.kind_name

    def __repr__(self):
        bf = f", bits {self.bit_size}" if self.is_bitfield else ""
        return f"Field({self.path!r}, offset {self.bit_offset / 8:g}{bf}, {self.type!r})"


_PIECE_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)?\s*((?:\[\s*(?:0x[0-9a-fA-F]+|\d+)\s*\]\s*)*)")
_INDEX_RE = re.compile(r"\[\s*(0x[0-9a-fA-F]+|\d+)\s*\]")


def parse_path(path: str) -> List[Union[str, int]]:
    """'arch.mmu', 'vcpus[3]', 'a.b[2][1].c' -> ['arch', 'mmu'], ['vcpus', 3], ...:
    member names as str, array indexes as int. Raises BtfLookupError if malformed."""
    out: List[Union[str, int]] = []
    for n, piece in enumerate(path.strip().split(".")):
        m = _PIECE_RE.fullmatch(piece.strip())
        if not m or not (m.group(1) or (n == 0 and m.group(2))):
            raise BtfLookupError(f"member path {path!r}: cannot read {piece!r} (expected "
                                 "names joined by '.', array indexes as [N])")
        if m.group(1):
            out.append(m.group(1))
        out.extend(int(x, 0) for x in _INDEX_RE.findall(m.group(2)))
    return out
