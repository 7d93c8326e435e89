"""Typed reads of kernel memory: a BTF type at an address, over read(addr, n) -> bytes.

Obj(btf, "task_struct", addr, read).member("mm").pointer().member("pgd") reads what BTF says is
there, and nothing is written down in code: offsets, sizes, signedness and bitfields all come
from the BTF. The walkers (list_for_each, the xarray) are bounded: a maximum count, a seen
set for loops, and a Walk that says why it stopped early. Errors of the read function
propagate from Obj; the walkers catch them and report them as the reason they stopped.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple, Union

from ..errors import QIError
from .btf import ARRAY, ENUM, ENUM64, INT, PTR, Btf, Type
from .errors import BtfError, BtfLookupError

Read = Callable[[int, int], bytes]
MAX_WALK = 1 << 16          # default bound on list and tree walks
MAX_READ = 1 << 24          # one typed read larger than this is junk


class Walk(list):
    """A list of what a walk found; `cut` is None when the walk ended normally, else the
    reason it stopped early (a loop, the bound, a NULL or unreadable pointer)."""

    cut: Optional[str] = None

    @property
    def complete(self) -> bool:
        return self.cut is None


class Obj:
    """A value of a BTF type at an address. member()/pointer()/index() give further Objs
    (or ints for integer members); reads happen only when a value is asked for."""

    __slots__ = ("btf", "type", "address", "read")

    def __init__(self, btf: Btf, type_spec: Union[str, int, Type], address: int, read: Read):
        self.btf, self.address, self.read = btf, address, read
        self.type = btf.lookup(type_spec)

    @property
    def resolved(self) -> Type:
        return self.btf.resolve(self.type.id)

    @property
    def size(self) -> int:
        return self.btf.sizeof(self.type.id)

    def _bytes(self, addr: int, n: int) -> bytes:
        if not 0 < n <= MAX_READ:
            raise BtfError(f"refusing a {n}-byte read of {self.btf.describe(self.type.id)}")
        data = self.read(addr, n)
        if data is None or len(data) < n:
            raise BtfError(f"read of {n} bytes at {addr:#x} returned "
                           f"{len(data or b'')}")
        return bytes(data[:n])

    def raw(self) -> bytes:
        """The object's bytes."""
        return self._bytes(self.address, self.size)

    def value(self) -> int:
        """An int, enum, pointer or bool as a Python int (signed per its BTF encoding)."""
        r = self.resolved
        if r.kind not in (INT, ENUM, ENUM64, PTR):
            raise BtfLookupError(f"{self.btf.describe(self.type.id)} at {self.address:#x} is "
                                 f"a {r.kind_name}, not a number")
        return int.from_bytes(self._bytes(self.address, self.size), "little",
                              signed=r.signed and r.kind != PTR)

    def __int__(self) -> int:
        return self.value()

    def member(self, path: str) -> Union["Obj", int]:
        """The member at `path` ('arch.mmu', 'comm', 'vcpus[2]'): an int for integer, enum and
        bitfield members (sign and width from BTF), else an Obj (pointers too: .pointer()
        follows them, int() gives their value)."""
        f = self.btf.member(self.type, path)
        if f.is_bitfield:
            first = f.bit_offset // 8
            nbytes = (f.bit_offset % 8 + f.bit_size + 7) // 8
            raw = int.from_bytes(self._bytes(self.address + first, nbytes), "little")
            v = (raw >> (f.bit_offset % 8)) & ((1 << f.bit_size) - 1)
            if f.resolved.signed and v >> (f.bit_size - 1):
                v -= 1 << f.bit_size
            return v
        obj = Obj(self.btf, f.type, self.address + f.offset, self.read)
        if f.resolved.kind in (INT, ENUM, ENUM64):
            return obj.value()
        return obj

    def address_of(self, path: str) -> int:
        """The address of a member (not of a bitfield)."""
        return self.address + self.btf.offsetof(self.type, path)

    def pointer(self) -> Optional["Obj"]:
        """Follow a pointer: the pointee as an Obj, or None for NULL. A void pointer needs a
        type: use cast(value, ...)."""
        r = self.resolved
        if r.kind != PTR:
            raise BtfLookupError(f"{self.btf.describe(self.type.id)} is not a pointer")
        target = self.value()
        if target == 0:
            return None
        pointee = self.btf.type(r.ref)
        if self.btf.resolve(pointee.id).kind == 0:
            raise BtfLookupError(f"{self.btf.describe(self.type.id)} at {self.address:#x} is a "
                                 "void pointer: say what it points to with .cast()")
        return Obj(self.btf, pointee, target, self.read)

    def cast(self, type_spec, address: Optional[int] = None) -> "Obj":
        """Another type at this address (or at `address`: for a void pointer, its value)."""
        return Obj(self.btf, type_spec, self.address if address is None else address, self.read)

    def index(self, i: int) -> Union["Obj", int]:
        """Element i of an array (an int for integer elements)."""
        r = self.resolved
        if r.kind != ARRAY:
            raise BtfLookupError(f"{self.btf.describe(self.type.id)} is not an array")
        if r.nelems and not 0 <= i < r.nelems:
            raise BtfLookupError(f"index {i} beyond {self.btf.describe(self.type.id)}")
        obj = Obj(self.btf, r.elem, self.address + i * self.btf.sizeof(r.elem), self.read)
        return obj.value() if self.btf.resolve(r.elem).kind in (INT, ENUM, ENUM64) else obj

    def string(self, limit: int = 4096) -> str:
        """A char array (task_struct.comm) or char pointer's text, up to its NUL."""
        r = self.resolved
        if r.kind == ARRAY:
            data = self._bytes(self.address, min(self.size, limit))
        elif r.kind == PTR:
            addr, data = self.value(), b""
            while addr and len(data) < limit and b"\0" not in data:
                n = min(limit - len(data), 4096 - (addr + len(data)) % 4096)
                data += self._bytes(addr + len(data), n)      # page by page, to the NUL
        else:
            raise BtfLookupError(f"{self.btf.describe(self.type.id)} is not text")
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")

    def container_of(self, type_spec, member: str) -> "Obj":
        """The `type_spec` that holds this object as its `member` (Linux's container_of)."""
        return Obj(self.btf, type_spec, self.address - self.btf.offsetof(type_spec, member),
                   self.read)

    def __repr__(self):
        return f"<{self.btf.describe(self.type.id)} at {self.address:#x}>"


def container_of(btf: Btf, read: Read, address: int, type_spec, member: str) -> Obj:
    """The `type_spec` whose `member` lies at `address`."""
    return Obj(btf, type_spec, address - btf.offsetof(type_spec, member), read)


def _u64(read: Read, addr: int) -> int:
    data = read(addr, 8)
    if data is None or len(data) < 8:
        raise BtfError(f"short read at {addr:#x}")
    return int.from_bytes(bytes(data[:8]), "little")


def list_for_each(btf: Btf, read: Read, head: int, container: Union[str, Type], member: str,
                  max_count: int = MAX_WALK) -> Walk:
    """The containers on a Linux list (struct list_head at `head`, each linked through
    `container.member`), in order, as Objs. Stops at the head, at max_count, at a loop, a
    NULL or an unreadable link: Walk.cut says which."""
    nxt_off = btf.offsetof("list_head", "next")
    link_off = btf.offsetof(container, member)
    out, seen = Walk(), {head}
    try:
        node = _u64(read, head + nxt_off)
        while node != head:
            if node == 0:
                out.cut = f"NULL next pointer after {len(out)} entries"
                break
            if node in seen:
                out.cut = f"loop: {node:#x} seen twice (after {len(out)} entries)"
                break
            if len(out) >= max_count:
                out.cut = f"stopped at {max_count} entries"
                break
            seen.add(node)
            following = _u64(read, node + nxt_off)
            out.append(Obj(btf, container, node - link_off, read))
            node = following
    except (QIError, OSError, ValueError) as e:
        out.cut = f"read failed after {len(out)} entries: {e}"
    return out


# ---- xarray (lib/xarray.c, include/linux/xarray.h) ----------------------------------------
# An entry whose low two bits are 10 is internal: a node pointer (+2) when above 4096, a
# sibling (slot number << 2 | 2) below the chunk size, retry (256) and zero (257) markers.
# Low bit 1: a value entry (integer << 1 | 1). A head that is not a node is index 0's entry.
def xa_is_internal(e: int) -> bool:
    return e & 3 == 2


def xa_is_node(e: int) -> bool:
    return e & 3 == 2 and e > 4096


def xa_is_value(e: int) -> bool:
    return bool(e & 1)


class XArray:
    """An xarray at `address` (struct xarray), read through BTF's xarray and xa_node."""

    def __init__(self, btf: Btf, read: Read, address: int):
        self.btf, self.read, self.address = btf, read, address
        self.head_off = btf.offsetof("xarray", "xa_head")
        self.shift_off = btf.offsetof("xa_node", "shift")
        slots = btf.member("xa_node", "slots")
        self.slots_off = slots.offset
        self.chunk = slots.resolved.nelems
        if not self.chunk or self.chunk & (self.chunk - 1) or self.chunk > 1024:
            raise BtfError(f"xa_node.slots has {self.chunk} entries: not a power of two")
        self.chunk_shift = self.chunk.bit_length() - 1

    def _node(self, entry: int) -> Tuple[int, List[int]]:
        node = entry - 2
        shift = self.read(node + self.shift_off, 1)[0]
        raw = self.read(node + self.slots_off, 8 * self.chunk)
        if raw is None or len(raw) < 8 * self.chunk:
            raise BtfError(f"short read of xa_node {node:#x}")
        slots = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, 8 * self.chunk, 8)]
        if shift % self.chunk_shift or shift >= 64:
            raise BtfError(f"xa_node {node:#x} has shift {shift}")
        return shift, slots

    def load(self, index: int) -> Optional[int]:
        """The entry at `index` (a raw pointer or value entry), or None if empty. Raises
        BtfError for a malformed tree, or the read function's error."""
        entry = _u64(self.read, self.address + self.head_off)
        if not xa_is_node(entry):
            return (entry or None) if index == 0 and not xa_is_internal(entry) else None
        top = None
        for _ in range(64 // self.chunk_shift + 2):
            shift, slots = self._node(entry)
            if top is None:
                top = shift
                if index >> shift >= self.chunk:
                    return None
            entry = slots[(index >> shift) & (self.chunk - 1)]
            if xa_is_internal(entry) and entry < ((self.chunk - 1) << 2 | 2):
                entry = slots[entry >> 2]              # a sibling: the canonical slot
            if not xa_is_node(entry):
                return None if entry == 0 or xa_is_internal(entry) else entry
            if shift == 0:
                raise BtfError(f"xarray {self.address:#x}: a node below a leaf node")
        raise BtfError(f"xarray {self.address:#x}: deeper than 64 bits of index")

    def items(self, max_entries: int = MAX_WALK, max_nodes: int = 4096) -> Walk:
        """(index, entry) of every present entry in index order, bounded; Walk.cut says
        why it stopped early (bound, loop, malformed node, failed read)."""
        out = Walk()
        try:
            head = _u64(self.read, self.address + self.head_off)
            if not xa_is_node(head):
                if head and not xa_is_internal(head):
                    out.append((0, head))
                return out
            shift, slots = self._node(head)
            seen = {head}
            stack = [[slots, shift, 0, 0]]          # depth first, slots in order
            while stack:
                frame = stack[-1]
                slots, shift, base, off = frame
                if off >= self.chunk:
                    stack.pop()
                    continue
                frame[3] = off + 1
                e = slots[off]
                if e == 0 or (xa_is_internal(e) and not xa_is_node(e)):
                    continue                         # empty, sibling, retry, zero
                idx = base + (off << shift)
                if not xa_is_node(e):
                    if len(out) >= max_entries:
                        out.cut = f"stopped at {max_entries} entries"
                        break
                    out.append((idx, e))
                    continue
                if e in seen:
                    out.cut = f"loop: node {e - 2:#x} seen twice"
                    break
                if len(seen) >= max_nodes:
                    out.cut = f"stopped at {max_nodes} nodes"
                    break
                seen.add(e)
                cshift, cslots = self._node(e)
                if shift == 0 or cshift != shift - self.chunk_shift:
                    out.cut = (f"node {e - 2:#x} has shift {cshift} under a node of shift "
                               f"{shift}")
                    break
                stack.append([cslots, cshift, idx, 0])
        except (QIError, OSError, ValueError) as e:
            out.cut = f"stopped after {len(out)} entries: {e}"
        return out

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(self.items())
