"""Maple trees (lib/maple_tree.c, include/linux/maple_tree.h): mm_struct.mm_mt holds a
process's VMAs since Linux 6.1.

A tree's ma_root is NULL (empty), a plain entry (the tree holds only index 0), or an encoded
node: the node's address (nodes are 256-byte aligned) | its type << 3 | 4 (MAPLE_ENODE_NULL)
| 2 (MAPLE_ROOT_NODE, on the root only). Types (enum maple_type): 0 dense (slots only), 1
leaf_64 and 2 range_64 (pivots and slots: struct maple_range_64), 3 arange_64 (pivots, slots,
gaps: struct maple_arange_64). Slot i of a range node covers [pivot[i-1] + 1, pivot[i]]
(the first from the node's min, the last up to its max); the last slot in use comes from the
node's metadata (maple_metadata.end) when the last pivot is 0, as ma_data_end() says. Every
offset and array length here is read from BTF; the walk is bounded and loop-checked.
"""

from __future__ import annotations

from typing import Optional

from ..errors import QIError
from .btf import Btf
from .errors import BtfError, BtfLookupError
from .typed import MAX_WALK, Read, Walk, xa_is_internal, xa_is_node

NODE_MASK = 0xFF
TYPE_SHIFT, TYPE_MASK = 3, 0xF
MAX_HEIGHT = 31             # MAPLE_HEIGHT_MAX


class MapleTree:
    """A maple tree at `address` (struct maple_tree), its layout from BTF."""

    def __init__(self, btf: Optional[Btf], read: Read, address: int,
                 facts: Optional[dict] = None):
        """btf: the kernel's BTF; or facts, what MapleTree.facts(btf) said of the same kernel
        (kept by a caller between commands, so that BTF need not be parsed again)."""
        self.btf, self.read, self.address = btf, read, address
        if facts is None:
            if btf is None:
                raise BtfError("a maple tree needs the kernel's BTF or its facts")
            facts = self.facts(btf)
        try:
            self.root_off = int(facts["root"])
            self.ulong_max = (1 << (8 * int(facts["ptr_size"]))) - 1
            self.parent_off = int(facts["parent"])
            self.types = {str(k): int(v) for k, v in facts["types"].items()}
            self.layout = {int(k): tuple(None if x is None else int(x) for x in v)
                           for k, v in facts["layout"].items()}
            self.leaves = {self.types["maple_dense"], self.types["maple_leaf_64"]}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BtfError(f"maple tree facts are incomplete ({e!r})") from None

    @classmethod
    def facts(cls, btf: Btf) -> dict:
        """What a walk needs of BTF, as plain JSON-able values: offsets, array lengths, the
        node types' numbers."""
        self = object.__new__(cls)
        self.btf = btf
        types = self._types()
        r64 = btf.member("maple_range_64", "pivot")
        a64 = btf.member("maple_arange_64", "pivot")
        dense = btf.member("maple_node", "slot")
        mr_off = btf.offsetof("maple_node", "mr64")
        ma_off = btf.offsetof("maple_node", "ma64")
        # per type: (pivots offset, number of pivots, slots offset, number of slots, meta end)
        layout = {
            types["maple_dense"]: (None, 0, dense.offset, dense.resolved.nelems, None),
            types["maple_leaf_64"]: self._range(mr_off, "maple_range_64", r64),
            types["maple_range_64"]: self._range(mr_off, "maple_range_64", r64),
            types["maple_arange_64"]: self._range(ma_off, "maple_arange_64", a64),
        }
        return {"root": btf.offsetof("maple_tree", "ma_root"), "ptr_size": btf.ptr_size,
                "parent": btf.offsetof("maple_node", "parent"), "types": types,
                "layout": {str(k): list(v) for k, v in layout.items()}}

    def _types(self):
        names = ("maple_dense", "maple_leaf_64", "maple_range_64", "maple_arange_64")
        try:
            values = self.btf.enum("maple_type")
            return {n: values[n] for n in names}
        except (BtfLookupError, KeyError):
            return {n: i for i, n in enumerate(names)}     # the order maple_tree.h gives

    def _range(self, base: int, struct: str, pivots):
        slots = self.btf.member(struct, "slot")
        try:
            meta = base + self.btf.offsetof(struct, "meta.end")
        except BtfLookupError:
            meta = None
        return (base + pivots.offset, pivots.resolved.nelems, base + slots.offset,
                slots.resolved.nelems, meta)

    def _words(self, addr: int, n: int):
        raw = self.read(addr, 8 * n)
        if raw is None or len(raw) < 8 * n:
            raise BtfError(f"short read of {8 * n} bytes at {addr:#x}")
        return [int.from_bytes(raw[i:i + 8], "little") for i in range(0, 8 * n, 8)]

    def items(self, max_entries: int = MAX_WALK, max_nodes: int = 1 << 14) -> Walk:
        """(first, last, entry) of every non-empty range in index order (for mm_mt: a VMA's
        start, end - 1, and its vm_area_struct address). Walk.cut says why it stopped early."""
        out = Walk()
        try:
            root = self._words(self.address + self.root_off, 1)[0]
            if not xa_is_node(root):
                if root and not xa_is_internal(root):
                    out.append((0, 0, root))
                return out
            seen = set()
            stack = [(root & ~2, 0, self.ulong_max, 0)]
            while stack:
                enode, lo, hi, depth = stack.pop()
                node = enode & ~NODE_MASK
                if node in seen:
                    out.cut = f"loop: node {node:#x} seen twice"
                    break
                if len(seen) >= max_nodes:
                    out.cut = f"stopped at {max_nodes} nodes"
                    break
                if depth > MAX_HEIGHT:
                    out.cut = f"deeper than {MAX_HEIGHT} levels at node {node:#x}"
                    break
                seen.add(node)
                ntype = (enode >> TYPE_SHIFT) & TYPE_MASK
                if ntype not in self.layout:
                    out.cut = f"node {node:#x} has unknown type {ntype}"
                    break
                parent = self._words(node + self.parent_off, 1)[0]
                if parent & ~NODE_MASK == node:
                    out.cut = f"node {node:#x} is dead (being replaced): read again"
                    break
                ranges = self._ranges(node, ntype, lo, hi)
                if isinstance(ranges, str):
                    out.cut = ranges
                    break
                if ntype in self.leaves:
                    for first, last, e in ranges:
                        if e and not xa_is_internal(e):
                            if len(out) >= max_entries:
                                out.cut = f"stopped at {max_entries} entries"
                                return out
                            out.append((first, last, e))
                else:
                    stack.extend((e, first, last, depth + 1)
                                 for first, last, e in reversed(ranges) if e)
        except (QIError, OSError, ValueError) as e:
            out.cut = f"stopped after {len(out)} entries: {e}"
        return out

    def _ranges(self, node: int, ntype: int, lo: int, hi: int):
        piv_off, npiv, slot_off, nslots, meta = self.layout[ntype]
        slots = self._words(node + slot_off, nslots)
        if not npiv:                                   # dense: one index per slot
            return [(lo + i, lo + i, e) for i, e in enumerate(slots) if lo + i <= hi]
        pivots = self._words(node + piv_off, npiv)
        end = self._data_end(node, ntype, pivots, hi, meta)
        if end >= nslots:
            return f"node {node:#x}: data end {end} beyond its {nslots} slots"
        out, first = [], lo
        for i in range(end + 1):
            last = pivots[i] if i < npiv else hi
            if i == end and i < npiv and last == 0:
                last = hi
            if last < first or last > hi:
                return f"node {node:#x}: pivot {i} ({last:#x}) outside [{first:#x}, {hi:#x}]"
            out.append((first, last, slots[i]))
            if last == hi:
                break
            first = last + 1
        return out

    def _data_end(self, node: int, ntype: int, pivots, hi: int, meta: Optional[int]) -> int:
        """The last slot in use (ma_data_end)."""
        if ntype == self.types["maple_arange_64"] or not pivots[-1]:
            if meta is None:
                return next((i for i in range(len(pivots) - 1, -1, -1) if pivots[i]), 0)
            return self.read(node + meta, 1)[0]
        if pivots[-1] == hi:
            return len(pivots) - 1
        return len(pivots)

    def __iter__(self):
        return iter(self.items())
