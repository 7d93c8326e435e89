"""A reader of BTF, the BPF Type Format the Linux kernel carries about its own types.

The format (the kernel's Documentation/bpf/btf.rst and include/uapi/linux/btf.h): a header
(magic 0xEB9F, version 1, hdr_len, then the type and string sections' offsets and lengths,
relative to the header's end), a type section of variable-length records (12 bytes of
name_off/info/size-or-type, then kind-specific words), and a string section of NUL-terminated
names. Type ids start at 1 (0 is void). Split BTF (a module's, on top of vmlinux's) continues
the base's type ids and string offsets.

Blobs can be hostile (read from a guest's memory): every offset and length is checked, every
type id a record names is checked when that record is decoded, chains of typedef/const/...
and of arrays are bounded and cycles reported, and nothing recurses without a bound. What is
wrong raises BtfError, naming the type id and the byte offset.

Parsing is lazy: Btf.parse() walks the records once to find where each starts (a 5 MiB
vmlinux BTF takes about a tenth of a second); a type is decoded when first asked for, and the
name index is built on the first lookup by name.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from typing import Dict, Iterator, List, Optional, Tuple, Union

from .elf import elf_section, is_elf
from .errors import BtfError, BtfLookupError
from .layout import Layout
from .types import (  # noqa: F401  (the kinds and limits are part of this module's API)
    ARRAY, CONST, DATASEC, DECL_TAG, ENUM, ENUM64, FLOAT, FUNC, FUNC_PROTO, FWD, INT,
    INT_BOOL, INT_CHAR, INT_SIGNED, KIND_NAMES, MAGIC, MAX_BLOB, MAX_CHAIN, MAX_NEST,
    MAX_SIZE, MAX_TYPES, MODIFIERS, PTR, RESTRICT, STRUCT, SYSFS_BTF, TYPE_TAG, TYPEDEF,
    UNION, VAR, VOID, VOLATILE, Field, Member, Type, EXTRA_WORDS, parse_path,
)


class Btf(Layout):
    """Types of one BTF blob (and of its base, for split BTF). Build with parse() or load()."""

    def __init__(self):
        raise TypeError("use Btf.parse(data) or Btf.load(path)")

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes, base: Optional["Btf"] = None, name: str = "BTF") -> "Btf":
        """Check a BTF blob's header and sections and index its type records; for split BTF
        pass the base (vmlinux's). Raises BtfError for anything malformed."""
        self = object.__new__(cls)
        self.name, self.base = name, base
        self._parse(bytes(data))
        return self

    @classmethod
    def load(cls, path: str, base: Optional["Btf"] = None) -> "Btf":
        """BTF from a file: raw BTF (/sys/kernel/btf/*) or an ELF file with a .BTF section
        (vmlinux, a module's .ko). Raises BtfError if unreadable or malformed."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BLOB + 1)
        except OSError as e:
            raise BtfError(f"cannot read BTF from {path}: {e.strerror or e}") from None
        if len(data) > MAX_BLOB and not is_elf(data):
            raise BtfError(f"{path}: larger than {MAX_BLOB >> 20} MiB, not a kernel's BTF")
        if is_elf(data):
            if len(data) > MAX_BLOB:     # a big vmlinux: read it whole to reach its sections
                with open(path, "rb") as f:
                    data = f.read()
            try:
                sec = elf_section(data, ".BTF")
            except ValueError as e:
                raise BtfError(f"{path}: {e}") from None
            if sec is None:
                raise BtfError(f"{path} has no .BTF section (built without "
                               "CONFIG_DEBUG_INFO_BTF?)")
            data = sec
        return cls.parse(data, base=base, name=path)

    @classmethod
    def load_sysfs(cls, module: str = "vmlinux", vmlinux: Optional["Btf"] = None,
                   root: str = SYSFS_BTF) -> "Btf":
        """The running kernel's BTF (/sys/kernel/btf/vmlinux) or a loaded module's, split on
        vmlinux's (given, or loaded here). Raises BtfError if absent or malformed."""
        if module == "vmlinux":
            return cls.load(os.path.join(root, "vmlinux"))
        if vmlinux is None:
            vmlinux = cls.load(os.path.join(root, "vmlinux"))
        path = os.path.join(root, module)
        if not os.path.exists(path):
            raise BtfError(f"{path} does not exist: module {module} is not loaded, is built "
                           "into the kernel (its types are in vmlinux's BTF), or has no BTF")
        return cls.load(path, base=vmlinux)

    def _parse(self, data: bytes) -> None:
        where = self.name
        if len(data) < 24:
            raise BtfError(f"{where}: {len(data)} bytes, shorter than a BTF header (24)")
        if data[0:2] == b"\x9f\xeb":
            end = "<"
        elif data[0:2] == b"\xeb\x9f":
            end = ">"
        else:
            raise BtfError(f"{where}: bad magic {data[0:2].hex()} (BTF starts with 9feb)")
        version, flags, hdr_len = struct.unpack_from(end + "BBI", data, 2)
        if version != 1:
            raise BtfError(f"{where}: BTF version {version}, only version 1 is known")
        if hdr_len < 24 or hdr_len > len(data):
            raise BtfError(f"{where}: header length {hdr_len} is not within 24..{len(data)}")
        type_off, type_len, str_off, str_len = struct.unpack_from(end + "IIII", data, 8)
        layout_off = layout_len = 0
        if hdr_len >= 32:
            layout_off, layout_len = struct.unpack_from(end + "II", data, 24)
        body = len(data) - hdr_len
        secs = [("type", type_off, type_len), ("string", str_off, str_len)]
        if layout_len:
            secs.append(("layout", layout_off, layout_len))
        for what, off, ln in secs:
            if off > body or ln > body - off:
                raise BtfError(f"{where}: {what} section [{off:#x}, +{ln:#x}) runs past the "
                               f"blob's end ({body:#x} bytes after the header)")
        for i, (wa, oa, la) in enumerate(secs):
            for wb, ob, lb in secs[i + 1:]:
                if la and lb and oa < ob + lb and ob < oa + la:
                    raise BtfError(f"{where}: the {wa} and {wb} sections overlap")
        if type_off % 4 or type_len % 4:
            raise BtfError(f"{where}: type section at {type_off:#x} length {type_len:#x} is "
                           "not 4-byte aligned")
        self._endian = end
        base = self.base
        self.first_id = base.last_id + 1 if base is not None else 1
        self.str_base = base.str_base + len(base._strings) if base is not None else 0
        strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        if strings and strings[-1] != 0:
            raise BtfError(f"{where}: the string section does not end with a NUL")
        if base is None and strings and strings[0] != 0:
            raise BtfError(f"{where}: the string section does not start with the empty name")
        self._strings = strings
        self._layout = None
        if layout_len:
            lay = data[hdr_len + layout_off: hdr_len + layout_off + layout_len]
            self._layout = [struct.unpack_from(end + "BBH", lay, i)[:2]
                            for i in range(0, len(lay) - 3, 4)]
        words = array("I")
        if words.itemsize != 4:          # pragma: no cover - every CPython has a 4-byte 'I'
            words = array("L")
        words.frombytes(data[hdr_len + type_off: hdr_len + type_off + type_len])
        if (end == "<") != (sys.byteorder == "little"):
            words.byteswap()
        self._words = words
        self._starts = self._index_records(words, type_off)
        self.last_id = self.first_id + len(self._starts) - 1
        if self.last_id >= MAX_TYPES:
            raise BtfError(f"{where}: {self.last_id} types, more than the {MAX_TYPES} allowed")
        self._cache: Dict[int, Type] = {}
        self._by_name: Dict[str, List[int]] = {}
        self._name_offs: Optional[bytes] = None
        self._enumerators: Optional[Dict[str, List[Tuple[int, int]]]] = None

    def _index_records(self, words, type_off: int) -> array:
        starts = array("I")
        append = starts.append
        extra = EXTRA_WORDS
        layout = self._layout
        kmask, vmask, bad = (0x7F, 0xFFFFFF, 0) if layout else (0x1F, 0xFFFF, 0x60FF0000)
        i, n = 0, len(words)
        while i < n:
            if i + 3 > n:
                raise BtfError(f"{self.name}: type record {self.first_id + len(starts)} at "
                               f"byte {type_off + 4 * i:#x} is cut short by the section's end")
            info = words[i + 1]
            kind = (info >> 24) & kmask
            if info & bad:
                raise BtfError(f"{self.name}: type {self.first_id + len(starts)} at byte "
                               f"{type_off + 4 * i:#x}: unused bits set in info {info:#010x}")
            if 0 < kind < 20:
                fixed, per = extra[kind]
            elif layout and 0 < kind < len(layout) and not (layout[kind][0] | layout[kind][1]) & 3:
                fixed, per = layout[kind][0] >> 2, layout[kind][1] >> 2
            else:
                raise BtfError(f"{self.name}: type {self.first_id + len(starts)} at byte "
                               f"{type_off + 4 * i:#x} has unknown kind {kind}")
            append(i)
            i += 3 + fixed + per * (info & vmask)
            if len(starts) > MAX_TYPES:
                raise BtfError(f"{self.name}: more than {MAX_TYPES} type records")
        if i != n:
            raise BtfError(f"{self.name}: the last type record ({self.first_id + len(starts) - 1}"
                           f") runs past the type section's end by {4 * (i - n)} bytes")
        return starts

    # ---- records -------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of type records in this blob (not counting the base's)."""
        return len(self._starts)

    def ids(self) -> range:
        """This blob's own type ids (the base's are base.ids())."""
        return range(self.first_id, self.last_id + 1)

    def string(self, off: int, what: str = "a name") -> str:
        """The NUL-terminated string at a (split-aware) string offset."""
        if off < self.str_base:
            return self.base.string(off, what)
        rel = off - self.str_base
        if rel >= len(self._strings):
            raise BtfError(f"{self.name}: {what}: string offset {off:#x} is beyond the string "
                           f"section (ends at {self.str_base + len(self._strings):#x})")
        return self._strings[rel:self._strings.index(b"\0", rel)].decode("utf-8", "replace")

    def _ref(self, ref: int, tid: int, what: str) -> int:
        if ref > self.last_id:
            raise BtfError(f"{self.name}: type {tid}: {what} refers to type id {ref}, beyond "
                           f"the last id {self.last_id}")
        return ref

    def type(self, tid: int) -> Type:
        """Decode type `tid` (0 is void). Raises BtfError for an unknown id or a malformed
        record (bad string offset, type id out of range)."""
        if tid == 0:
            return VOID
        if tid < self.first_id:
            if self.base is None or tid < 0:
                raise BtfLookupError(f"{self.name}: no type id {tid}")
            return self.base.type(tid)
        t = self._cache.get(tid)
        if t is not None:
            return t
        idx = tid - self.first_id
        if idx >= len(self._starts):
            raise BtfLookupError(f"{self.name}: no type id {tid} (ids end at {self.last_id})")
        t = self._decode(tid, self._starts[idx])
        self._cache[tid] = t
        return t

    def _decode(self, tid: int, i: int) -> Type:
        w = self._words
        name_off, info, st = w[i], w[i + 1], w[i + 2]
        layout = self._layout is not None
        kind = (info >> 24) & (0x7F if layout else 0x1F)
        vlen = info & (0xFFFFFF if layout else 0xFFFF)
        t = Type(tid, kind, self.string(name_off, f"type {tid}'s name"), info >> 31, vlen)
        j = i + 3
        ref = self._ref
        if kind in (INT, ENUM, STRUCT, UNION, FLOAT, DATASEC, ENUM64):
            t.size = st
        elif kind in (PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR,
                      DECL_TAG, TYPE_TAG):
            t.ref = ref(st, tid, "its type")
        if kind == INT:
            v = w[j]
            t.encoding, t.int_offset, t.bits = (v >> 24) & 0x0F, (v >> 16) & 0xFF, v & 0xFF
            if t.bits > 128 or t.bits + t.int_offset > 8 * st:
                raise BtfError(f"{self.name}: int type {tid} ({t.name}): {t.bits} bits at "
                               f"offset {t.int_offset} do not fit in {st} bytes")
        elif kind == ARRAY:
            t.elem = ref(w[j], tid, "its element type")
            t.index_type = ref(w[j + 1], tid, "its index type")
            t.nelems = w[j + 2]
        elif kind in (STRUCT, UNION):
            mems = []
            for k in range(vlen):
                m = j + 3 * k
                off = w[m + 2]
                bits, boff = (off >> 24, off & 0xFFFFFF) if t.kind_flag else (0, off)
                mems.append(Member(self.string(w[m], f"member {k} of type {tid}"),
                                   ref(w[m + 1], tid, f"member {k}"), boff, bits))
            t.members = tuple(mems)
        elif kind == ENUM:
            vals = []
            for k in range(vlen):
                v = w[j + 2 * k + 1]
                if t.kind_flag and v & 0x80000000:
                    v -= 1 << 32
                vals.append((self.string(w[j + 2 * k], f"enumerator {k} of type {tid}"), v))
            t.values = tuple(vals)
        elif kind == ENUM64:
            vals = []
            for k in range(vlen):
                v = w[j + 3 * k + 1] | (w[j + 3 * k + 2] << 32)
                if t.kind_flag and v >> 63:
                    v -= 1 << 64
                vals.append((self.string(w[j + 3 * k], f"enumerator {k} of type {tid}"), v))
            t.values = tuple(vals)
        elif kind == FUNC_PROTO:
            t.params = tuple((self.string(w[j + 2 * k], f"parameter {k} of type {tid}"),
                              ref(w[j + 2 * k + 1], tid, f"parameter {k}")) for k in range(vlen))
        elif kind == FUNC:
            t.linkage = vlen
        elif kind == VAR:
            t.linkage = w[j]
        elif kind == DATASEC:
            t.vars = tuple((ref(w[j + 3 * k], tid, f"variable {k}"), w[j + 3 * k + 1],
                            w[j + 3 * k + 2]) for k in range(vlen))
        elif kind == DECL_TAG:
            c = w[j]
            t.component_idx = c - (1 << 32) if c & 0x80000000 else c
        return t

    def __iter__(self) -> Iterator[Type]:
        """This blob's own types, in id order."""
        for tid in self.ids():
            yield self.type(tid)

    def validate(self) -> int:
        """Decode every record of this blob and follow every qualifier chain (catching bad
        offsets, ids and cycles up front); returns the number of types. Raises BtfError."""
        for t in self:
            if t.kind in MODIFIERS:
                self.resolve(t.id)
            elif t.kind == ARRAY:
                self._array_chain(t.id)
        return self.count

    # ---- names ---------------------------------------------------------------------------
    def _kind_of(self, tid: int) -> int:
        if tid < self.first_id:
            return self.base._kind_of(tid)
        info = self._words[self._starts[tid - self.first_id] + 1]
        return (info >> 24) & (0x7F if self._layout is not None else 0x1F)

    def _own_ids(self, name: str) -> List[int]:
        """This blob's ids named `name`: the name's offsets in the string section (bytes.find),
        then the records whose name_off is one of them (a search in the packed name_offs)."""
        hit = self._by_name.get(name)
        if hit is not None:
            return hit
        if self._name_offs is None:
            w = self._words
            self._name_offs = array("I", [w[i] for i in self._starts]).tobytes()
        offs = self._string_offsets(name) if name else []
        ids, packed = [], self._name_offs
        for off in offs:
            pat, pos = array("I", [off]).tobytes(), 0
            while True:
                pos = packed.find(pat, pos)
                if pos < 0:
                    break
                if pos % 4 == 0:
                    ids.append(self.first_id + pos // 4)
                pos += 1
        ids.sort()
        if len(self._by_name) < 4096:
            self._by_name[name] = ids
        return ids

    def _string_offsets(self, name: str) -> List[int]:
        """Offsets (split-aware) at which `name` is a whole string, in this blob and its base."""
        offs, key, pos = [], b"\0" + name.encode("utf-8", "replace") + b"\0", 0
        while True:
            pos = self._strings.find(key, pos)
            if pos < 0:
                break
            offs.append(self.str_base + pos + 1)
            pos += 1
        if self.base is not None:
            offs += self.base._string_offsets(name)
        return offs

    def find(self, name: str, kind: Optional[int] = None) -> List[int]:
        """Ids of the types called `name` (of that kind, if given): this blob's first, then
        the base's."""
        ids = list(self._own_ids(name))
        if kind is not None:
            ids = [i for i in ids if self._kind_of(i) == kind]
        if self.base is not None:
            ids += self.base.find(name, kind)
        return ids

    _KIND_WORDS = {"struct": (STRUCT,), "union": (UNION,), "enum": (ENUM, ENUM64),
                   "typedef": (TYPEDEF,)}
    _PLAIN_ORDER = (STRUCT, UNION, TYPEDEF, INT, ENUM, ENUM64, FLOAT, FUNC, VAR, DATASEC)

    def lookup(self, spec: Union[int, str, Type], kind: Optional[int] = None) -> Type:
        """A type by id, by name ('task_struct', 'struct kvm', 'u64'), or a Type itself. A
        name names one type: this blob's own definitions win over the base's; several
        different definitions of one name raise BtfLookupError."""
        if isinstance(spec, Type):
            return spec
        if isinstance(spec, int):
            return self.type(spec)
        words = spec.split()
        if len(words) == 2 and words[0] in self._KIND_WORDS:
            kinds, name = self._KIND_WORDS[words[0]], words[1]
        elif len(words) == 1:
            kinds, name = ((kind,) if kind is not None else self._PLAIN_ORDER), words[0]
        else:
            raise BtfLookupError(f"{spec!r} is not a type name (try 'task_struct' or "
                                 "'struct task_struct')")
        for k in kinds:
            found = self._pick(name, k)
            if found is not None:
                return found
        fwd = self.find(name, FWD)
        hint = " (only a forward declaration: the full type is in another BTF, e.g. a " \
               "module's)" if fwd else ""
        raise BtfLookupError(f"{self.name}: no type {spec!r}{hint}")

    def _pick(self, name: str, kind: int) -> Optional[Type]:
        level: Optional[Btf] = self
        while level is not None:
            own = [i for i in level._own_ids(name) if level._kind_of(i) == kind]
            if own:
                types = [level.type(i) for i in own]
                if kind == INT:      # old-style bitfields add narrow ints of the same name
                    types = [t for t in types if t.bits == 8 * t.size and not t.int_offset] \
                        or types
                first = types[0]
                if any(self._shape(t) != self._shape(first) for t in types[1:]):
                    raise BtfLookupError(
                        f"{level.name}: {len(types)} different {KIND_NAMES[kind]} {name} "
                        f"(ids {', '.join(str(t.id) for t in types[:8])}): pick one by id")
                return first
            level = level.base
        return None

    def _shape(self, t: Type):
        mem = tuple((m.name, m.bit_offset, m.bitfield_size) for m in (t.members or ()))
        return (t.kind, t.size, mem, t.values, t.ref if t.kind == TYPEDEF else None)

    def struct(self, name: str) -> Type:
        """The struct called `name` (BtfLookupError if none, or several that differ)."""
        return self.lookup(name, STRUCT)

    def union(self, name: str) -> Type:
        """The union called `name`."""
        return self.lookup(name, UNION)

    def __repr__(self):
        split = f", split on {self.base.name}" if self.base is not None else ""
        return f"<Btf {self.name}: ids {self.first_id}..{self.last_id}{split}>"
