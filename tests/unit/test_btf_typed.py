"""The typed reader and its walkers (Linux lists, xarrays, maple trees) over memory a test
lays out, with each structure's layout taken from BTF: a synthetic BTF written here, and,
when present, the bundled guest's 6.1 BTF and this machine's own. The nodes are built as
include/linux/xarray.h and maple_tree.h describe them; hostile variants (loops, NULLs, dead
nodes, bad shifts and pivots, unreadable memory) must end with a reason, never hang."""

import os
import struct

import pytest

from qintrospect.btf import Btf, BtfError, BtfLookupError
from qintrospect.btf.maple import MapleTree
from qintrospect.btf.typed import Obj, XArray, container_of, list_for_each
from qintrospect.errors import MemoryReadError
from tests import kernel_image
from tests.btf_encoder import BtfBuilder

ULONG_MAX = (1 << 64) - 1


def synthetic_kernel_btf():
    """list_head, xarray/xa_node and the maple tree's structs with Linux 6.1's x86-64 layout,
    plus a test struct with every kind of member."""
    b = BtfBuilder()
    u8 = b.int_("unsigned char", 1)
    s8 = b.int_("signed char", 1, signed=True)
    u16 = b.int_("short unsigned int", 2)
    s32 = b.int_("int", 4, signed=True)
    u32 = b.int_("unsigned int", 4)
    ulong = b.int_("long unsigned int", 8)
    s64 = b.int_("long long int", 8, signed=True)
    boolean = b.int_("_Bool", 1, bool_=True)
    char = b.int_("char", 1, signed=True, char=True)
    void_p = b.ptr(0)
    lh = b.struct("list_head", 16, [("next", b.next_id + 1, 0), ("prev", b.next_id + 1, 64)])
    b.ptr(lh)
    xa = b.struct("xarray", 16, [("xa_lock", u32, 0), ("xa_flags", u32, 32),
                                 ("xa_head", void_p, 64)])
    slots64 = b.array(void_p, 64)
    node = b.next_id
    b.struct("xa_node", 576, [("shift", u8, 0), ("offset", u8, 8), ("count", u8, 16),
                              ("nr_values", u8, 24), ("parent", b.next_id + 1, 64),
                              ("array", b.next_id + 2, 128), ("private_list", lh, 192),
                              ("slots", slots64, 320)])
    b.ptr(node)
    b.ptr(xa)
    b.struct("maple_tree", 16, [("ma_lock", u32, 0), ("ma_flags", u32, 32),
                                ("ma_root", void_p, 64)])
    meta = b.struct("maple_metadata", 2, [("end", u8, 0), ("gap", u8, 8)])
    piv15, slot16, pad15 = b.array(ulong, 15), b.array(void_p, 16), b.array(void_p, 15)
    padmeta = b.struct("", 128, [("pad", pad15, 0), ("meta", meta, 960)])
    slots_u = b.union("", 128, [("slot", slot16, 0), ("", padmeta, 0)])
    r64 = b.struct("maple_range_64", 256, [("parent", void_p, 0), ("pivot", piv15, 64),
                                           ("", slots_u, 1024)])
    piv9, slot10, gap10 = b.array(ulong, 9), b.array(void_p, 10), b.array(ulong, 10)
    a64 = b.struct("maple_arange_64", 248, [("parent", void_p, 0), ("pivot", piv9, 64),
                                            ("slot", slot10, 640), ("gap", gap10, 1280),
                                            ("meta", meta, 1920)])
    slot31 = b.array(void_p, 31)
    dense = b.struct("", 256, [("parent", void_p, 0), ("slot", slot31, 64)])
    nu = b.union("", 256, [("", dense, 0), ("mr64", r64, 0), ("ma64", a64, 0)])
    b.struct("maple_node", 256, [("", nu, 0)])
    b.enum("maple_type", [("maple_dense", 0), ("maple_leaf_64", 1), ("maple_range_64", 2),
                          ("maple_arange_64", 3)])
    color = b.enum("color", [("RED", 0), ("MINUS", -2)], signed=True)
    comm = b.array(char, 16)
    item = b.next_id
    b.struct("item", 80, [
        ("link", lh, 0), ("s8", s8, 128), ("u16", u16, 144), ("s32", s32, 160),
        ("s64", s64, 192), ("ok", boolean, 256), ("col", color, 288),
        ("neg", s32, 320, 5), ("pos", u32, 325, 11),             # bitfields across a byte
        ("comm", comm, 384), ("self", b.next_id + 1, 512), ("name", b.next_id + 2, 576),
        ("opaque", void_p, 576 + 64)])
    b.ptr(item)
    b.ptr(char)
    return Btf.parse(b.blob(), name="synthetic")


def btf_sources():
    out = [("synthetic", synthetic_kernel_btf)]
    img_path = os.path.join(kernel_image.cache_dir(), "vmlinuz")
    if os.path.exists(img_path):
        out.append(("guest 6.1", lambda: Btf.parse(kernel_image.vmlinux().section(".BTF"))))
    if os.path.exists("/sys/kernel/btf/vmlinux"):
        out.append(("host", lambda: Btf.load("/sys/kernel/btf/vmlinux")))
    return out


_CACHE = {}


@pytest.fixture(params=[name for name, _ in btf_sources()], scope="module")
def kbtf(request):
    if request.param not in _CACHE:
        _CACHE[request.param] = dict(btf_sources())[request.param]()
    return _CACHE[request.param]


@pytest.fixture(scope="module")
def sbtf():
    return synthetic_kernel_btf()


class Mem:
    """Memory of 4 KiB pages that exist once written; reads elsewhere fail."""

    def __init__(self):
        self.pages = {}

    def put(self, addr, data):
        for i, byte in enumerate(bytes(data)):
            a = addr + i
            page = self.pages.setdefault(a >> 12, bytearray(4096))
            page[a & 0xFFF] = byte

    def u64(self, addr, value):
        self.put(addr, struct.pack("<Q", value & ULONG_MAX))

    def read(self, addr, n):
        out = bytearray()
        while n:
            page = self.pages.get(addr >> 12)
            if page is None:
                raise MemoryReadError(f"nothing at {addr:#x}", addr)
            take = min(n, 4096 - (addr & 0xFFF))
            out += page[addr & 0xFFF:(addr & 0xFFF) + take]
            addr, n = addr + take, n - take
        return bytes(out)


# ---- Obj -----------------------------------------------------------------------------------
def test_obj_reads_members_with_size_sign_and_bitfields(sbtf):
    m, base = Mem(), 0xFFFF888000010000
    off = sbtf.offsetof
    m.put(base, b"\0" * 80)
    m.put(base + off("item", "s8"), b"\xfe")
    m.put(base + off("item", "u16"), struct.pack("<H", 0xBEEF))
    m.put(base + off("item", "s32"), struct.pack("<i", -7))
    m.put(base + off("item", "s64"), struct.pack("<q", -(1 << 40)))
    m.put(base + off("item", "ok"), b"\x01")
    m.put(base + off("item", "col"), struct.pack("<i", -2))
    bits = ((-3 & 0x1F) | (1500 << 5)) << 0                          # neg:5 at bit 0, pos:11
    m.put(base + 40, struct.pack("<H", bits))
    m.put(base + off("item", "comm"), b"swapper/0\0junk")
    m.u64(base + off("item", "self"), base)
    m.u64(base + off("item", "name"), base + 0x800)
    m.put(base + 0x800, b"a name\0")
    it = Obj(sbtf, "item", base, m.read)
    assert (it.member("s8"), it.member("u16"), it.member("s32")) == (-2, 0xBEEF, -7)
    assert it.member("s64") == -(1 << 40) and it.member("ok") == 1 and it.member("col") == -2
    assert it.member("neg") == -3 and it.member("pos") == 1500
    assert it.member("comm").string() == "swapper/0" and it.member("name").string() == "a name"
    me = it.member("self")
    assert int(me) == base and me.pointer().address == base
    assert me.pointer().member("s32") == -7
    assert it.member("comm").index(1) == ord("w")
    assert it.address_of("s64") == base + 24 and len(it.raw()) == 80
    assert it.member("link").container_of("item", "link").address == base
    assert container_of(sbtf, m.read, base + 16, "item", "s8").address == base
    assert it.cast("list_head").member("next").value() == 0
    assert it.member("opaque").pointer() is None


def test_obj_errors(sbtf):
    m, base = Mem(), 0x10000
    m.put(base, b"\0" * 80)
    m.u64(base + sbtf.offsetof("item", "opaque"), 0x5000)
    it = Obj(sbtf, "item", base, m.read)
    with pytest.raises(BtfLookupError, match="void pointer"):
        it.member("opaque").pointer()
    with pytest.raises(BtfLookupError, match="not a number"):
        it.member("link").value()
    with pytest.raises(BtfLookupError, match="not a pointer"):
        it.member("link").pointer()
    with pytest.raises(BtfLookupError, match="not an array"):
        it.member("link").index(0)
    with pytest.raises(BtfLookupError, match="index 16 beyond"):
        it.member("comm").index(16)
    with pytest.raises(BtfLookupError, match="not text"):
        it.member("link").string()
    with pytest.raises(MemoryReadError):
        Obj(sbtf, "item", 0x900000, m.read).member("s32")      # the reader's own error
    with pytest.raises(BtfError, match="returned 2"):
        Obj(sbtf, "item", 0, lambda a, n: b"\0\0").member("s32")


# ---- lists ---------------------------------------------------------------------------------
def link_list(m, btf, head, nodes, link_member="link", container="item"):
    """head <-> nodes[0] <-> ... (addresses of the containers), as list_add_tail builds."""
    nxt, prv = btf.offsetof("list_head", "next"), btf.offsetof("list_head", "prev")
    links = [c + btf.offsetof(container, link_member) for c in nodes]
    chain = [head] + links + [head]
    for i, a in enumerate(chain[:-1]):
        m.u64(a + nxt, chain[i + 1])
        m.u64(chain[i + 1] + prv, a)


def test_list_for_each(kbtf):
    m, head = Mem(), 0x1000
    tasks = [0x10000, 0x30000, 0x20000]
    kind, link = ("task_struct", "tasks") if kbtf.find("task_struct") else ("item", "link")
    for t in tasks:
        m.put(t, b"\0" * kbtf.sizeof(kind))
        m.put(t + kbtf.offsetof(kind, "comm"), f"task{t:x}\0".encode())
    link_list(m, kbtf, head, tasks, link, kind)
    walk = list_for_each(kbtf, m.read, head, kind, link)
    assert [o.address for o in walk] == tasks and walk.complete
    assert [o.member("comm").string() for o in walk] == ["task10000", "task30000", "task20000"]
    m.u64(0x5000, 0x5000)                                       # an empty list
    assert list_for_each(kbtf, m.read, 0x5000, kind, link) == []


def test_list_walks_that_must_be_cut(sbtf):
    link = sbtf.offsetof("item", "link")
    m, head = Mem(), 0x1000
    items = [0x2000, 0x3000, 0x4000]
    link_list(m, sbtf, head, items)
    m.u64(0x4000 + link, 0x3000 + link)                         # the last points back
    walk = list_for_each(sbtf, m.read, head, "item", "link")
    assert len(walk) == 3 and walk.cut.startswith("loop: 0x3000 seen twice")
    m.u64(0x4000 + link, 0)
    assert list_for_each(sbtf, m.read, head, "item", "link").cut == \
        "NULL next pointer after 3 entries"
    m.u64(0x4000 + link, 0x99000)
    walk = list_for_each(sbtf, m.read, head, "item", "link")
    assert len(walk) == 3 and walk.cut.startswith("read failed after 3 entries: nothing at")
    m.u64(0x4000 + link, head)
    walk = list_for_each(sbtf, m.read, head, "item", "link", max_count=2)
    assert len(walk) == 2 and walk.cut == "stopped at 2 entries"
    assert list_for_each(sbtf, m.read, 0x77000, "item", "link").cut.startswith("read failed")


# ---- xarray --------------------------------------------------------------------------------
class XaBuilder:
    """Nodes as lib/xarray.c keeps them: entry of a node = its address + 2."""

    def __init__(self, btf, m):
        self.btf, self.m = btf, m
        self.slots = btf.offsetof("xa_node", "slots")
        self.shift = btf.offsetof("xa_node", "shift")
        self.head = btf.offsetof("xarray", "xa_head")
        self.next = 0x100000

    def node(self, shift, slots):
        addr, self.next = self.next, self.next + 0x1000
        self.m.put(addr, b"\0" * self.btf.sizeof("xa_node"))
        self.m.put(addr + self.shift, bytes([shift]))
        for i, e in slots.items():
            self.m.u64(addr + self.slots + 8 * i, e)
        return addr + 2

    def array(self, head):
        addr, self.next = self.next, self.next + 0x1000
        self.m.put(addr, b"\0" * 16)
        self.m.u64(addr + self.head, head)
        return XArray(self.btf, self.m.read, addr)


def test_xarray_empty_and_single_entry(kbtf):
    x = XaBuilder(kbtf, Mem())
    empty = x.array(0)
    assert empty.items() == [] and empty.load(0) is None
    single = x.array(0xFFFF888012345000)
    assert single.items() == [(0, 0xFFFF888012345000)]
    assert single.load(0) == 0xFFFF888012345000 and single.load(1) is None


def test_xarray_one_and_two_levels(kbtf):
    x = XaBuilder(kbtf, Mem())
    leaf = x.node(0, {0: 0xA000, 5: 0xA500, 63: 0xAF00})
    one = x.array(leaf)
    assert XArray(kbtf, one.read, one.address).chunk == 64
    assert one.items() == [(0, 0xA000), (5, 0xA500), (63, 0xAF00)]
    assert one.load(5) == 0xA500 and one.load(6) is None and one.load(64) is None
    low = x.node(0, {1: 0xB001 - 1, 2: 0xB002 - 2})
    high = x.node(0, {0: 0xC000, 63: 0xC0FF - 0xFF})
    root = x.node(6, {1: low, 63: high, 0: 0x7})                # 0x7: a value entry (3)
    two = x.array(root)
    assert two.items() == [(0, 0x7), (65, 0xB000), (66, 0xB000), (63 * 64, 0xC000),
                           (63 * 64 + 63, 0xC000)]
    assert two.load(66) == 0xB000 and two.load(63 * 64) == 0xC000 and two.load(0) == 0x7
    assert two.load(64 * 64) is None and two.load(100) is None


def test_xarray_siblings_retry_and_zero_entries(kbtf):
    x = XaBuilder(kbtf, Mem())
    sibling_of_4 = (4 << 2) | 2
    leaf = x.node(0, {4: 0xD000, 5: sibling_of_4, 6: sibling_of_4, 7: sibling_of_4,
                      8: (256 << 2) | 2, 9: (257 << 2) | 2, 10: 0xE000})
    xa = x.array(leaf)
    assert xa.items() == [(4, 0xD000), (10, 0xE000)]
    assert xa.load(6) == 0xD000 and xa.load(8) is None and xa.load(9) is None


def test_xarray_hostile_nodes_end_with_a_reason(sbtf):
    x = XaBuilder(sbtf, Mem())
    root_addr = x.next
    root = x.node(6, {0: root_addr + 2})                        # a node that holds itself
    walk = x.array(root).items()
    assert walk == [] and "seen twice" in walk.cut
    child = x.node(6, {})
    walk = x.array(x.node(6, {0: child})).items()
    assert "has shift 6 under a node of shift 6" in walk.cut
    loop_leaf = x.next
    x.node(0, {})
    x.m.put(loop_leaf + x.shift, bytes([0]))
    a = x.node(6, {0: loop_leaf + 2, 1: loop_leaf + 2})
    walk = x.array(a).items()
    assert "seen twice" in walk.cut
    bad = x.node(7, {0: 0xA000})
    assert "has shift 7" in x.array(bad).items().cut
    with pytest.raises(BtfError, match="has shift 7"):
        x.array(bad).load(0)
    gone = x.array(0x999002)
    assert "nothing at 0x999000" in gone.items().cut
    with pytest.raises(MemoryReadError):
        gone.load(3)
    many = x.node(0, {i: 0x1000 * (i + 1) for i in range(64)})
    walk = x.array(many).items(max_entries=10)
    assert len(walk) == 10 and walk.cut == "stopped at 10 entries"


# ---- maple tree ----------------------------------------------------------------------------
class MtBuilder:
    """Maple nodes (256-byte aligned) as lib/maple_tree.c writes them."""
    DENSE, LEAF, RANGE, ARANGE = 0, 1, 2, 3

    def __init__(self, btf, m):
        self.btf, self.m, self.next = btf, m, 0x200000
        self.root = btf.offsetof("maple_tree", "ma_root")

    def node(self, ntype, pivots, slots, end=None, parent=None):
        addr, self.next = self.next, self.next + 0x100
        self.m.put(addr, b"\0" * 256)
        if ntype == self.ARANGE:
            pre, meta = "ma64", "ma64.meta.end"
        else:
            pre, meta = "mr64", "mr64.meta.end"
        off = self.btf.offsetof
        for i, p in enumerate(pivots):
            self.m.u64(addr + off("maple_node", f"{pre}.pivot[{i}]"), p)
        for i, s in enumerate(slots):
            self.m.u64(addr + off("maple_node", f"{pre}.slot[{i}]"), s)
        if end is not None:
            self.m.put(addr + off("maple_node", meta), bytes([end]))
        self.m.u64(addr + off("maple_node", "parent"), parent if parent is not None else 1)
        return addr | (ntype << 3) | 4                          # an encoded node

    def tree(self, root):
        addr, self.next = self.next, self.next + 0x100
        self.m.put(addr, b"\0" * 16)
        self.m.u64(addr + self.root, root)
        return MapleTree(self.btf, self.m.read, addr)


VMA1, VMA2, VMA3 = 0xFFFF888001000000, 0xFFFF888001000100, 0xFFFF888001000200


def test_maple_empty_and_single(kbtf):
    t = MtBuilder(kbtf, Mem())
    assert t.tree(0).items() == []
    assert t.tree(VMA1).items() == [(0, 0, VMA1)]


def test_maple_one_leaf(kbtf):
    t = MtBuilder(kbtf, Mem())
    # [0, 0xfff] empty, [0x1000, 0x1fff] VMA1, [0x2000, 0x3fff] empty, [0x4000, 0x4fff] VMA2,
    # then empty to ULONG_MAX: 5 slots in use, the last pivot 0 -> metadata end = 4
    leaf = t.node(t.LEAF, [0xFFF, 0x1FFF, 0x3FFF, 0x4FFF, ULONG_MAX], [0, VMA1, 0, VMA2, 0],
                  end=4)
    tree = t.tree(leaf | 2)
    assert tree.items() == [(0x1000, 0x1FFF, VMA1), (0x4000, 0x4FFF, VMA2)]


def test_maple_arange_root_over_leaves(kbtf):
    t = MtBuilder(kbtf, Mem())
    left = t.node(t.LEAF, [0x3FFF, 0x4FFF, 0x7FFF], [0, VMA1, 0], end=2)
    full = [0x8000 + 0x1000 * i + 0xFFF for i in range(15)]     # all 16 slots, pivots full
    slots = [VMA2 if i % 2 else 0 for i in range(16)]
    mid = t.node(t.LEAF, full, slots)
    right = t.node(t.LEAF, [ULONG_MAX - 1, ULONG_MAX], [VMA3, 0], end=1)
    root = t.node(t.ARANGE, [0x7FFF, 0x8000 + 0x10000 - 1], [left, mid, right], end=2)
    items = t.tree(root | 2).items()
    expect = [(0x4000, 0x4FFF, VMA1)]
    expect += [(0x8000 + 0x1000 * i, 0x8000 + 0x1000 * i + 0xFFF, VMA2)
               for i in range(1, 15, 2)]
    expect += [(0x8000 + 0x1000 * 15, 0x8000 + 0x10000 - 1, VMA2)]
    expect += [(0x18000, ULONG_MAX - 1, VMA3)]
    assert items == expect and items.complete


def test_maple_hostile_trees_end_with_a_reason(sbtf):
    t = MtBuilder(sbtf, Mem())
    dead_addr = t.next
    dead = t.node(t.LEAF, [ULONG_MAX], [VMA1], parent=dead_addr)  # parent == itself: dead
    assert "is dead" in t.tree(dead | 2).items().cut
    loop_addr = t.next + 0x100
    leaf = t.node(t.LEAF, [0x1000], [VMA1], end=0)
    loop = t.node(t.RANGE, [0x1000, ULONG_MAX], [leaf, loop_addr | (2 << 3) | 4], end=1)
    assert loop & ~0xFF == loop_addr
    walk = t.tree(loop | 2).items()
    assert walk == [(0, 0x1000, VMA1)] and "seen twice" in walk.cut
    bad = t.node(t.LEAF, [0x5000, 0x1000, ULONG_MAX], [VMA1, VMA2, 0], end=2)
    walk = t.tree(bad | 2).items()
    assert "pivot 1 (0x1000) outside" in walk.cut
    odd = t.node(t.LEAF, [ULONG_MAX], [VMA1])
    assert "unknown type 9" in t.tree((odd & ~0xFF) | (9 << 3) | 6).items().cut
    over = t.node(t.LEAF, [0] * 15, [VMA1] * 16, end=200)
    assert "data end 200 beyond its 16 slots" in t.tree(over | 2).items().cut
    assert "nothing at" in t.tree(0x7770000 | (1 << 3) | 6).items().cut
    many = t.node(t.LEAF, list(range(1, 16)), [VMA1] * 16)
    walk = t.tree(many | 2).items(max_entries=3)
    assert len(walk) == 3 and walk.cut == "stopped at 3 entries"
