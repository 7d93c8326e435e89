"""A small BTF writer for tests: build blobs of every kind, split blobs, and broken ones.

Written from the format (Documentation/bpf/btf.rst, include/uapi/linux/btf.h), independently
of qintrospect.btf's reader. Type ids are handed out in the order records are added
(`next_id` tells the next one, so forward references and cycles can be built).
"""

from __future__ import annotations

import struct
from typing import Iterable, List, Optional, Sequence, Tuple

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)


class BtfBuilder:
    def __init__(self, base: Optional["BtfBuilder"] = None):
        self.base = base
        self.first_id = base.next_id if base else 1
        self.str_base = base.str_base + len(base.strings) if base else 0
        self.strings = bytearray() if base else bytearray(b"\0")
        self._str_at = {} if base else {"": 0}
        self.records: List[bytes] = []

    @property
    def next_id(self) -> int:
        return self.first_id + len(self.records)

    # ---- strings and raw records ----------------------------------------------------
    def s(self, text: str) -> int:
        """Offset of `text` (added once); names already in the base are reused."""
        if text == "" and self.base:
            return 0
        b = self.base
        while b is not None:
            if text in b._str_at:
                return b._str_at[text]
            b = b.base
        if text not in self._str_at:
            self._str_at[text] = self.str_base + len(self.strings)
            self.strings += text.encode() + b"\0"
        return self._str_at[text]

    def raw(self, name_off: int, info: int, size_or_type: int, extra: Sequence[int] = ()) -> int:
        self.records.append(struct.pack("<III", name_off, info, size_or_type)
                            + struct.pack(f"<{len(extra)}I", *[x & 0xFFFFFFFF for x in extra]))
        return self.next_id - 1

    def rec(self, kind: int, name: str, size_or_type: int, vlen: int = 0, kflag: int = 0,
            extra: Sequence[int] = ()) -> int:
        return self.raw(self.s(name), (kflag << 31) | (kind << 24) | vlen, size_or_type, extra)

    # ---- kinds -------------------------------------------------------------------------
    def int_(self, name: str, size: int, signed: bool = False, bits: Optional[int] = None,
             offset: int = 0, char: bool = False, bool_: bool = False) -> int:
        enc = (1 if signed else 0) | (2 if char else 0) | (4 if bool_ else 0)
        bits = 8 * size if bits is None else bits
        return self.rec(INT, name, size, extra=[(enc << 24) | (offset << 16) | bits])

    def ptr(self, to: int) -> int:
        return self.rec(PTR, "", to)

    def array(self, elem: int, nelems: int, index_type: int = 0) -> int:
        return self.rec(ARRAY, "", 0, extra=[elem, index_type, nelems])

    def _members(self, kind, name, size, members, kflag):
        if kflag is None:
            kflag = int(any(len(m) > 3 and m[3] for m in members))
        extra = []
        for m in members:
            mname, mtype, boff = m[0], m[1], m[2]
            bsize = m[3] if len(m) > 3 else 0
            extra += [self.s(mname), mtype, (bsize << 24) | boff if kflag else boff]
        return self.rec(kind, name, size, len(members), kflag, extra)

    def struct(self, name: str, size: int, members: Iterable[Tuple], kflag=None) -> int:
        """members: (name, type id, bit offset[, bitfield size])."""
        return self._members(STRUCT, name, size, list(members), kflag)

    def union(self, name: str, size: int, members: Iterable[Tuple], kflag=None) -> int:
        return self._members(UNION, name, size, list(members), kflag)

    def enum(self, name: str, values: Sequence[Tuple[str, int]], size: int = 4,
             signed: bool = False) -> int:
        extra = []
        for n, v in values:
            extra += [self.s(n), v & 0xFFFFFFFF]
        return self.rec(ENUM, name, size, len(values), int(signed), extra)

    def enum64(self, name: str, values: Sequence[Tuple[str, int]], size: int = 8,
               signed: bool = False) -> int:
        extra = []
        for n, v in values:
            v &= (1 << 64) - 1
            extra += [self.s(n), v & 0xFFFFFFFF, v >> 32]
        return self.rec(ENUM64, name, size, len(values), int(signed), extra)

    def fwd(self, name: str, union: bool = False) -> int:
        return self.rec(FWD, name, 0, kflag=int(union))

    def typedef(self, name: str, to: int) -> int:
        return self.rec(TYPEDEF, name, to)

    def volatile(self, to: int) -> int:
        return self.rec(VOLATILE, "", to)

    def const(self, to: int) -> int:
        return self.rec(CONST, "", to)

    def restrict(self, to: int) -> int:
        return self.rec(RESTRICT, "", to)

    def func_proto(self, ret: int, params: Sequence[Tuple[str, int]]) -> int:
        extra = []
        for n, t in params:
            extra += [self.s(n), t]
        return self.rec(FUNC_PROTO, "", ret, len(params), extra=extra)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self.rec(FUNC, name, proto, vlen=linkage)

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self.rec(VAR, name, type_id, extra=[linkage])

    def datasec(self, name: str, size: int, vars_: Sequence[Tuple[int, int, int]]) -> int:
        extra = []
        for t, off, sz in vars_:
            extra += [t, off, sz]
        return self.rec(DATASEC, name, size, len(vars_), extra=extra)

    def float_(self, name: str, size: int) -> int:
        return self.rec(FLOAT, name, size)

    def decl_tag(self, name: str, to: int, component_idx: int = -1) -> int:
        return self.rec(DECL_TAG, name, to, extra=[component_idx])

    def type_tag(self, name: str, to: int) -> int:
        return self.rec(TYPE_TAG, name, to)

    # ---- the blob ----------------------------------------------------------------------
    def types_bytes(self) -> bytes:
        return b"".join(self.records)

    def blob(self, endian: str = "<", layout: Optional[Sequence[Tuple[int, int]]] = None,
             hdr_len: Optional[int] = None, types: Optional[bytes] = None,
             strings: Optional[bytes] = None, version: int = 1, magic: int = 0xEB9F,
             gap: int = 0) -> bytes:
        """The BTF blob: header, type section, (gap bytes,) string section (, layout).
        `layout` [(info_sz, elem_sz)] per kind adds the layout section and a 32-byte header."""
        t = self.types_bytes() if types is None else types
        if endian == ">" and types is None:
            t = b"".join(self._swap(r) for r in self.records)
        st = bytes(self.strings) if strings is None else strings
        lay = b"".join(struct.pack(endian + "BBH", a, b, 0) for a, b in layout) if layout \
            else b""
        hl = hdr_len if hdr_len is not None else (32 if layout else 24)
        head = struct.pack(endian + "HBBIIIII", magic, version, 0, hl, 0, len(t),
                           len(t) + gap, len(st))
        if hl >= 32:
            head += struct.pack(endian + "II", len(t) + gap + len(st) if lay else 0, len(lay))
        head += b"\0" * max(0, hl - len(head))
        return head + t + b"\0" * gap + st + lay

    @staticmethod
    def _swap(rec: bytes) -> bytes:
        n = len(rec) // 4
        return struct.pack(f">{n}I", *struct.unpack(f"<{n}I", rec))
