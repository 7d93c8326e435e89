"""Layout questions answered from BTF (a mixin of Btf): what a typedef is, how big a type is,
where a member path lands, enumerator values, data-section variables, C-like type names.
Chains (typedef/const/array) and anonymous nesting are bounded; cycles raise BtfError."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .errors import BtfError, BtfLookupError
from .types import (
    ARRAY, CONST, DATASEC, ENUM, ENUM64, FLOAT, FUNC_PROTO, FWD, INT, KIND_NAMES, MAX_CHAIN,
    MAX_NEST, MAX_SIZE, MODIFIERS, PTR, RESTRICT, STRUCT, TYPE_TAG, UNION, VAR, VOLATILE,
    Field, Member, Type, parse_path,
)


class Layout:
    """Methods of Btf that work on decoded types (lookup(), type() come from Btf)."""

    def resolve(self, spec) -> Type:
        """The type with typedefs, const, volatile, restrict and type tags stripped. Raises
        BtfError on a cycle (typedef A -> B -> A) or an absurdly long chain."""
        t = self.lookup(spec)
        seen = []
        while t.kind in MODIFIERS:
            seen.append(t.id)
            if len(seen) > MAX_CHAIN or t.ref in seen:
                raise BtfError(f"{self.name}: reference cycle among types "
                               f"{' -> '.join(map(str, seen[-8:]))} -> {t.ref}")
            t = self.type(t.ref)
        return t

    def _array_chain(self, tid: int) -> Tuple[int, Type]:
        mult, t, seen = 1, self.resolve(tid), []
        while t.kind == ARRAY:
            seen.append(t.id)
            if len(seen) > MAX_CHAIN or t.elem in seen:
                raise BtfError(f"{self.name}: array type {seen[0]} nests into itself "
                               f"(ids {' -> '.join(map(str, seen[-8:]))})")
            mult *= t.nelems
            t = self.resolve(t.elem)
        return mult, t

    @property
    def ptr_size(self) -> int:
        """Bytes in a pointer: the size of 'long unsigned int' if the BTF has it, else 8."""
        try:
            return self.lookup("long unsigned int", INT).size or 8
        except BtfLookupError:
            return 8

    def sizeof(self, spec) -> int:
        """Size in bytes of a type (through typedefs/qualifiers; arrays multiply). Raises
        BtfError for types without a size (void, fwd, func) and for absurd sizes."""
        t = self.lookup(spec)
        if t.kind == VAR:
            t = self.type(t.ref)
        mult, t = self._array_chain(t.id)
        if t.kind == PTR:
            size = self.ptr_size
        elif t.kind in (INT, ENUM, ENUM64, FLOAT, STRUCT, UNION, DATASEC):
            size = t.size
        else:
            raise BtfError(f"{self.name}: {self.describe(t.id)} (type {t.id}, "
                           f"{t.kind_name}) has no size")
        total = mult * size
        if total > MAX_SIZE:
            raise BtfError(f"{self.name}: type {spec!r} would be {total} bytes: not plausible")
        return total

    def _find_member(self, st: Type, name: str) -> Optional[Tuple[int, Member, Type]]:
        """(bit offset, member, its direct parent) of `name` in st, looking through anonymous
        struct/union members; iterative, bounded."""
        stack, seen = [(st, 0, 0)], set()
        while stack:
            cur, base_bits, depth = stack.pop(0)
            for m in cur.members:
                if m.name == name:
                    return base_bits + m.bit_offset, m, cur
            for m in cur.members:
                if m.name == "":
                    inner = self.resolve(m.type_id)
                    if inner.kind in (STRUCT, UNION) and inner.id not in seen:
                        if depth + 1 > MAX_NEST:
                            raise BtfError(f"{self.name}: anonymous members of type {st.id} "
                                           f"nest deeper than {MAX_NEST}")
                        seen.add(inner.id)
                        stack.append((inner, base_bits + m.bit_offset, depth + 1))
        return None

    def member(self, spec, path: str) -> Field:
        """Where `path` ('arch.mmu', 'vcpus[3]', 'root.hpa') lands in a struct/union type:
        anonymous members are looked through, [N] indexes arrays. Raises BtfLookupError if a
        name is missing or a step goes through a pointer (read it, then follow)."""
        root = self.lookup(spec)
        cur, bits, bit_size, done = root, 0, None, []
        for comp in parse_path(path):
            where = f"{self.describe(root.id)}.{''.join(done)}".rstrip(".") if done else \
                self.describe(root.id)
            if bit_size is not None:
                raise BtfLookupError(f"{where} is a bitfield: nothing inside it")
            r = self.resolve(cur.id)
            if isinstance(comp, str):
                if r.kind not in (STRUCT, UNION):
                    raise BtfLookupError(self._cannot(where, r, f".{comp}"))
                hit = self._find_member(r, comp)
                if hit is None:
                    names = [m.name for m in r.members if m.name][:24]
                    desc = self.describe(r.id)
                    where = where if where == desc else f"{where} ({desc})"
                    raise BtfLookupError(f"{where} has no member "
                                         f"{comp!r}; its members: {', '.join(names)}"
                                         f"{', ...' if len(r.members) > 24 else ''}")
                off, m, parent = hit
                bits += off
                cur = self.type(m.type_id)
                if m.type_id == 0:
                    raise BtfError(f"{self.name}: member {comp} of type {parent.id} is void")
                if parent.kind_flag and m.bitfield_size:
                    bit_size = m.bitfield_size
                elif not parent.kind_flag:
                    mt = self.resolve(m.type_id)
                    if mt.kind == INT and (mt.int_offset or mt.bits != 8 * mt.size):
                        bits += mt.int_offset
                        bit_size = mt.bits
                done.append(("." if done else "") + comp)
            else:
                if r.kind != ARRAY:
                    raise BtfLookupError(self._cannot(where, r, f"[{comp}]"))
                if r.nelems and comp >= r.nelems:
                    raise BtfLookupError(f"{where}[{comp}]: index beyond the array's "
                                         f"{r.nelems} elements")
                bits += comp * 8 * self.sizeof(r.elem)
                cur = self.type(r.elem)
                done.append(f"[{comp}]")
        resolved = self.resolve(cur.id)
        size = None if bit_size is not None else self._size_or_none(cur.id)
        return Field(path, cur.id, cur, resolved, bits, bit_size, size)

    def _size_or_none(self, tid: int) -> Optional[int]:
        try:
            return self.sizeof(tid)
        except BtfLookupError:
            raise
        except BtfError:
            return None

    def _cannot(self, where: str, r: Type, step: str) -> str:
        if r.kind == PTR:
            return (f"{where} is a pointer ({self.describe(r.id)}): {where}{step} needs a "
                    "memory read; read the pointer and follow it")
        return f"{where} is {self.describe(r.id)} ({r.kind_name}): no {step} in it"

    def has_member(self, spec, path: str) -> bool:
        """Whether `path` exists in the type (e.g. 'root.hpa' in 6.1's kvm_mmu, 'root_hpa'
        before): False for a missing name; malformed BTF still raises BtfError."""
        try:
            self.member(spec, path)
            return True
        except BtfLookupError:
            return False

    def offsetof(self, spec, path: str) -> int:
        """Byte offset of member path in the type. Raises BtfLookupError for a bitfield
        (use member(), which gives bit offset and size)."""
        f = self.member(spec, path)
        if f.is_bitfield:
            raise BtfLookupError(f"{path} in {self.describe(self.lookup(spec).id)} is a "
                                 f"bitfield ({f.bit_size} bits at bit {f.bit_offset}): use "
                                 "member()")
        if f.bit_offset % 8:
            raise BtfError(f"{self.name}: {path} starts at bit {f.bit_offset}, not on a byte")
        return f.bit_offset // 8

    # ---- enums, variables, names for people ----------------------------------------------
    def enum(self, name: str) -> Dict[str, int]:
        """The enumerators of enum `name` as {name: value}."""
        t = self.lookup(f"enum {name}")
        return dict(t.values)

    def enum_value(self, name: str) -> int:
        """The value of enumerator `name`, whichever enum holds it. Only enums are in BTF:
        #define constants (many flags, e.g. KVM's HF_GUEST_MASK) are not."""
        if self._enumerators is None:
            idx: Dict[str, List[Tuple[int, int]]] = {}
            for t in self:
                if t.kind in (ENUM, ENUM64):
                    for n, v in t.values:
                        idx.setdefault(n, []).append((v, t.id))
            self._enumerators = idx
        hits = list(self._enumerators.get(name, ()))
        if not hits and self.base is not None:
            try:
                return self.base.enum_value(name)
            except BtfLookupError:
                pass
        values = {v for v, _ in hits}
        if not values:
            raise BtfLookupError(f"{self.name}: no enumerator {name!r} (a #define is not in "
                                 "BTF; only enum constants are)")
        if len(values) > 1:
            raise BtfLookupError(f"{self.name}: enumerator {name!r} has several values: "
                                 + ", ".join(f"{v} (enum type {tid})" for v, tid in hits[:8]))
        return values.pop()

    def variables(self, section: str) -> Dict[str, Tuple[int, int, int]]:
        """The variables BTF lists in a data section ('.data..percpu' in vmlinux) as
        {name: (offset in section, size, type id)}."""
        out = {}
        for tid in self.find(section, DATASEC):
            for vid, off, size in self.type(tid).vars:
                v = self.type(vid)
                out[v.name] = (off, size, v.ref if v.ref is not None else vid)
        return out

    def describe(self, spec, _depth: int = 0) -> str:
        """A C-like name for a type: 'struct kvm_mmu *', 'u64', 'int[4]'. Bounded."""
        try:
            t = self.lookup(spec)
        except BtfError:
            return f"<bad type {spec}>"
        if _depth > 12:
            return "..."
        k = t.kind
        if k == 0:
            return "void"
        if k in (STRUCT, UNION, ENUM, ENUM64, FWD):
            word = {STRUCT: "struct", UNION: "union", FWD: "union" if t.kind_flag else
                    "struct"}.get(k, "enum")
            return f"{word} {t.name or '(anon)'}"
        if k == PTR:
            return self.describe(t.ref, _depth + 1) + " *"
        if k in (CONST, VOLATILE, RESTRICT):
            return f"{KIND_NAMES[k]} {self.describe(t.ref, _depth + 1)}"
        if k == ARRAY:
            return f"{self.describe(t.elem, _depth + 1)}[{t.nelems}]"
        if k == FUNC_PROTO:
            return f"{self.describe(t.ref, _depth + 1)} (*)({len(t.params)} args)"
        if k == TYPE_TAG:
            return self.describe(t.ref, _depth + 1)
        return t.name or f"({t.kind_name} {t.id})"
