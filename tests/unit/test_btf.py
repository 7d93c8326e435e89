"""The BTF reader on blobs built by tests/btf_encoder.py: every kind, lookups, member paths
through anonymous members and arrays, bitfields of both encodings, enums, split BTF, byte
order, the layout section, and loading from raw and ELF files."""

import struct

import pytest

from qintrospect.btf import Btf, BtfError, BtfLookupError, parse_path
from qintrospect.btf import btf as B
from qintrospect.errors import ParseError
from tests.btf_encoder import BtfBuilder


def kitchen_sink():
    """Every kind, with a struct that exercises member paths. Returns (builder, ids)."""
    b, t = BtfBuilder(), {}
    t["u8"] = b.int_("unsigned char", 1)
    t["int"] = b.int_("int", 4, signed=True)
    t["u32"] = b.int_("unsigned int", 4)
    t["u64"] = b.int_("long long unsigned int", 8)
    t["ulong"] = b.int_("long unsigned int", 8)
    t["bool"] = b.int_("_Bool", 1, bool_=True)
    t["char"] = b.int_("char", 1, signed=True, char=True)
    t["int4"] = b.int_("int", 4, signed=True, bits=4)          # an old-style bitfield int
    t["u64t"] = b.typedef("u64", t["u64"])
    t["cu64"] = b.const(t["u64t"])
    t["vcu64"] = b.volatile(t["cu64"])
    t["rptr"] = b.restrict(b.ptr(t["u8"]))
    t["hpa_t"] = b.typedef("hpa_t", t["u64t"])
    t["list_head"] = b.next_id
    b.struct("list_head", 16, [("next", b.next_id + 1, 0), ("prev", b.next_id + 1, 64)])
    t["lh_ptr"] = b.ptr(t["list_head"])
    t["inner"] = b.struct("inner", 8, [("a", t["u32"], 0), ("b", t["u32"], 32, 3),
                                       ("c", t["u32"], 35, 5), ("d", t["int"], 40, 4)])
    t["old"] = b.struct("old_bits", 4, [("lo", t["int4"], 0), ("hi", t["int4"], 4)], kflag=0)
    t["color"] = b.enum("color", [("RED", 0), ("GREEN", 1), ("MINUS_ONE", -1)], signed=True)
    t["flags"] = b.enum("flags", [("F_BIG", 0xFFFFFFFF)])
    t["big"] = b.enum64("big", [("HUGE", 1 << 40), ("MINUS_FIVE", -5)], signed=True)
    t["ubig"] = b.enum64("ubig", [("TOP", (1 << 64) - 1)])
    hilo = b.struct("", 8, [("lo", t["u32"], 0), ("hi", t["u32"], 32)])
    t["anon_u"] = b.union("", 8, [("x", t["u64t"], 0), ("", hilo, 0)])
    arr4 = b.array(t["u64t"], 4, t["u32"])
    row = b.array(t["inner"], 3)
    t["grid"] = b.array(row, 2)
    comm = b.array(t["char"], 16)
    flex = b.array(t["u32"], 0)
    t["outer"] = b.next_id
    b.struct("outer", 160, [
        ("link", t["list_head"], 0), ("", t["anon_u"], 128), ("in", t["inner"], 192),
        ("arr", arr4, 256), ("comm", comm, 512), ("self", b.next_id + 1, 640),
        ("col", t["color"], 704), ("hpa", t["hpa_t"], 768), ("v", t["vcu64"], 832),
        ("grid", t["grid"], 896), ("tail", flex, 1280)])
    t["outer_ptr"] = b.ptr(t["outer"])
    assert t["outer_ptr"] == t["outer"] + 1
    t["fwd"] = b.fwd("kvm")
    t["fwd_u"] = b.fwd("maybe", union=True)
    t["proto"] = b.func_proto(t["int"], [("a", t["int"]), ("", 0)])
    t["func"] = b.func("do_it", t["proto"])
    t["var"] = b.var("my_var", t["u64t"])
    t["datasec"] = b.datasec(".data..percpu", 64, [(t["var"], 16, 8)])
    t["double"] = b.float_("double", 8)
    t["decl_tag"] = b.decl_tag("user", t["outer"], 2)
    t["type_tag"] = b.type_tag("percpu", t["u64"])
    t["tagged_ptr"] = b.ptr(t["type_tag"])
    return b, t


@pytest.fixture(scope="module")
def sink():
    b, t = kitchen_sink()
    return Btf.parse(b.blob(), name="sink"), t


def test_every_kind_decodes(sink):
    btf, t = sink
    assert btf.validate() == btf.last_id == len(t) + 6   # + the unnamed helper types
    u32 = btf.type(t["u32"])
    assert (u32.kind, u32.size, u32.bits, u32.signed) == (B.INT, 4, 32, False)
    assert btf.type(t["int"]).signed and btf.type(t["bool"]).encoding == B.INT_BOOL
    assert btf.type(t["char"]).encoding == B.INT_SIGNED | B.INT_CHAR
    assert btf.type(t["lh_ptr"]).ref == t["list_head"]
    grid = btf.type(t["grid"])
    assert (grid.kind, grid.nelems) == (B.ARRAY, 2)
    assert btf.type(t["fwd"]).kind == B.FWD and btf.type(t["fwd_u"]).kind_flag == 1
    proto = btf.type(t["proto"])
    assert proto.ref == t["int"] and proto.params == (("a", t["int"]), ("", 0))
    func = btf.type(t["func"])
    assert (func.name, func.ref, func.linkage) == ("do_it", t["proto"], 1)
    assert btf.type(t["var"]).linkage == 1 and btf.type(t["var"]).ref == t["u64t"]
    assert btf.type(t["datasec"]).vars == ((t["var"], 16, 8),)
    assert btf.type(t["double"]).kind_name == "float" and btf.sizeof("double") == 8
    tag = btf.type(t["decl_tag"])
    assert (tag.kind_name, tag.ref, tag.component_idx) == ("decl_tag", t["outer"], 2)
    assert btf.type(t["type_tag"]).kind_name == "type_tag"
    assert btf.type(0).kind_name == "void"
    assert [ty.id for ty in btf][:3] == [1, 2, 3]


def test_lookup_by_name_kind_and_id(sink):
    btf, t = sink
    assert btf.struct("outer").id == t["outer"]
    assert btf.lookup("struct outer").id == btf.lookup("outer").id == t["outer"]
    assert btf.lookup("u64").kind == B.TYPEDEF
    assert btf.lookup("enum color").id == t["color"]
    assert btf.lookup("enum big").id == t["big"]
    assert btf.lookup(t["inner"]).name == "inner"
    assert btf.lookup("int").id == t["int"]            # the full-width one, not the 4-bit
    assert btf.find("int") == [t["int"], t["int4"]]
    assert btf.find("int", B.INT) == [t["int"], t["int4"]]
    assert btf.find("nothing") == []
    with pytest.raises(BtfLookupError, match="no type 'nope'"):
        btf.struct("nope")
    with pytest.raises(BtfLookupError, match="forward declaration"):
        btf.struct("kvm")
    with pytest.raises(BtfLookupError, match="not a type name"):
        btf.lookup("struct a b")


def test_sizes_through_typedefs_qualifiers_and_arrays(sink):
    btf, t = sink
    assert btf.sizeof("u64") == btf.sizeof(t["vcu64"]) == btf.sizeof("hpa_t") == 8
    assert btf.sizeof(t["grid"]) == 2 * 3 * 8
    assert btf.sizeof(t["outer_ptr"]) == btf.ptr_size == 8
    assert btf.sizeof("outer") == 160 and btf.sizeof(t["var"]) == 8
    for no_size in (t["fwd"], t["func"], t["proto"], 0):
        with pytest.raises(BtfError, match="has no size"):
            btf.sizeof(no_size)
    assert btf.resolve(t["vcu64"]).id == t["u64"]
    assert btf.resolve(t["tagged_ptr"]).kind == B.PTR


@pytest.mark.parametrize("path, offset, kind", [
    ("link", 0, "struct"), ("link.next", 0, "ptr"), ("link.prev", 8, "ptr"),
    ("x", 16, "int"), ("lo", 16, "int"), ("hi", 20, "int"),      # through the anonymous union
    ("in.a", 24, "int"), ("arr", 32, "array"), ("arr[3]", 56, "int"), ("arr [ 0x2 ]", 48, "int"),
    ("comm", 64, "array"), ("comm[15]", 79, "int"), ("self", 80, "ptr"), ("col", 88, "enum"),
    ("hpa", 96, "int"), ("v", 104, "int"), ("grid", 112, "array"), ("grid[1]", 136, "array"),
    ("grid[1][2]", 152, "struct"), ("grid[1][2].a", 152, "int"), ("tail", 160, "array"),
    ("tail[1000]", 4160, "int"),                                 # a flexible array
])
def test_offsetof_paths(sink, path, offset, kind):
    btf, t = sink
    assert btf.offsetof("outer", path) == offset
    f = btf.member("outer", path)
    assert f.kind == kind and f.offset == offset and not f.is_bitfield


def test_member_reports_the_declared_and_resolved_type(sink):
    btf, t = sink
    f = btf.member("outer", "hpa")
    assert f.type.name == "hpa_t" and f.resolved.name == "long long unsigned int"
    assert f.size == 8
    f = btf.member("outer", "self")
    assert f.resolved.kind == B.PTR and btf.describe(f.type_id) == "struct outer *"
    assert btf.member("outer", "grid[1]").size == 24


def test_bitfields_kind_flag(sink):
    btf, t = sink
    b, c, d = (btf.member("outer", f"in.{x}") for x in "bcd")
    assert (b.bit_offset, b.bit_size) == (192 + 32, 3) and b.is_bitfield
    assert (c.bit_offset, c.bit_size, c.offset) == (192 + 35, 5, 28)
    assert (d.bit_offset, d.bit_size, d.resolved.signed) == (192 + 40, 4, True)
    assert b.size is None
    with pytest.raises(BtfLookupError, match="bitfield"):
        btf.offsetof("outer", "in.b")
    with pytest.raises(BtfLookupError, match="bitfield: nothing inside"):
        btf.member("outer", "in.b.x")
    assert not btf.member("outer", "in.a").is_bitfield


def test_bitfields_old_style_int_bits(sink):
    btf, t = sink
    lo, hi = btf.member("old_bits", "lo"), btf.member("old_bits", "hi")
    assert (lo.bit_offset, lo.bit_size) == (0, 4)
    assert (hi.bit_offset, hi.bit_size) == (4, 4)


def test_has_member(sink):
    btf, t = sink
    assert btf.has_member("outer", "grid[1][2].c") and btf.has_member("outer", "hi")
    assert not btf.has_member("outer", "nope") and not btf.has_member("outer", "arr[9]")
    assert not btf.has_member("outer", "self.link")


def test_member_errors_say_what_is_wrong(sink):
    btf, t = sink
    with pytest.raises(BtfLookupError, match=r"has no member 'nope'; its members: link, in, "):
        btf.member("outer", "nope")
    with pytest.raises(BtfLookupError, match="is a pointer .*read the pointer"):
        btf.member("outer", "self.link")
    with pytest.raises(BtfLookupError, match="no \\[1\\] in it"):
        btf.member("outer", "hpa[1]")
    with pytest.raises(BtfLookupError, match="beyond the array's 4 elements"):
        btf.member("outer", "arr[4]")
    with pytest.raises(BtfLookupError, match="no .x in it"):
        btf.member("outer", "col.x")


@pytest.mark.parametrize("path, parts", [
    ("a", ["a"]), ("a.b", ["a", "b"]), ("vcpus[3]", ["vcpus", 3]),
    ("a.b[2][0x10].c", ["a", "b", 2, 16, "c"]), ("[3].x", [3, "x"]), (" a . b ", ["a", "b"]),
])
def test_parse_path(path, parts):
    assert parse_path(path) == parts


@pytest.mark.parametrize("bad", ["", ".", "a.", ".a", "a..b", "a[", "a[-1]", "a[x]", "1a", "a b",
                                 "a.[2]", "a]"])
def test_parse_path_rejects(bad):
    with pytest.raises(BtfLookupError):
        parse_path(bad)


def test_enums(sink):
    btf, t = sink
    assert btf.enum("color") == {"RED": 0, "GREEN": 1, "MINUS_ONE": -1}
    assert btf.enum("flags") == {"F_BIG": 0xFFFFFFFF}            # unsigned: kind_flag 0
    assert btf.enum("big") == {"HUGE": 1 << 40, "MINUS_FIVE": -5}
    assert btf.enum("ubig") == {"TOP": (1 << 64) - 1}
    assert btf.enum_value("GREEN") == 1 and btf.enum_value("HUGE") == 1 << 40
    with pytest.raises(BtfLookupError, match="#define is not in BTF"):
        btf.enum_value("HF_GUEST_MASK")
    assert btf.type(t["color"]).signed and not btf.type(t["flags"]).signed


def test_enumerator_with_two_values_is_ambiguous():
    b = BtfBuilder()
    b.enum("a", [("X", 1)])
    b.enum("b", [("X", 2)])
    b.enum("c", [("Y", 3)])
    b.enum("d", [("Y", 3)])
    btf = Btf.parse(b.blob())
    with pytest.raises(BtfLookupError, match="several values"):
        btf.enum_value("X")
    assert btf.enum_value("Y") == 3


def test_variables_of_a_datasec(sink):
    btf, t = sink
    assert btf.variables(".data..percpu") == {"my_var": (16, 8, t["u64t"])}
    assert btf.variables(".nothing") == {}


def test_describe(sink):
    btf, t = sink
    assert btf.describe(t["vcu64"]) == "volatile const u64"
    assert btf.describe(t["grid"]) == "struct inner[3][2]"
    assert btf.describe(t["anon_u"]) == "union (anon)"
    assert btf.describe(t["fwd_u"]) == "union maybe"
    assert btf.describe(t["proto"]) == "int (*)(2 args)"
    assert btf.describe(t["tagged_ptr"]) == "long long unsigned int *"
    assert btf.describe(99999) == "<bad type 99999>"


def test_same_name_different_shapes_is_ambiguous_same_shapes_is_not():
    b = BtfBuilder()
    u = b.int_("unsigned int", 4)
    b.struct("dup", 4, [("a", u, 0)])
    b.struct("dup", 8, [("a", u, 0), ("b", u, 32)])
    b.struct("twin", 4, [("a", u, 0)])
    b.struct("twin", 4, [("a", u, 0)])
    btf = Btf.parse(b.blob())
    with pytest.raises(BtfLookupError, match="2 different struct dup .*pick one by id"):
        btf.struct("dup")
    assert btf.struct("twin").id == 4


def split_pair():
    base = BtfBuilder()
    u64 = base.int_("long long unsigned int", 8)
    ulong = base.int_("long unsigned int", 8)
    lh = base.struct("list_head", 16, [("next", base.next_id + 1, 0),
                                       ("prev", base.next_id + 1, 64)])
    base.ptr(lh)
    base.struct("shared", 8, [("from_base", u64, 0)])
    base.fwd("kvm")
    mod = BtfBuilder(base)
    kvm = mod.struct("kvm", 32, [("vm_list", lh, 0), ("userspace_pid", ulong, 128),
                                 ("module_only", mod.next_id + 1, 192)])
    mod.int_("u8_mod", 1)
    mod.struct("shared", 16, [("from_module", u64, 0), ("more", u64, 64)])
    return base, mod, kvm


def test_split_btf_continues_ids_and_strings():
    base_b, mod_b, kvm_id = split_pair()
    base = Btf.parse(base_b.blob(), name="vmlinux")
    mod = Btf.parse(mod_b.blob(), base=base, name="kvm")
    assert (base.first_id, base.last_id) == (1, 6)
    assert (mod.first_id, mod.last_id, mod.count) == (7, 9, 3) and list(mod.ids()) == [7, 8, 9]
    assert mod.str_base == len(base_b.strings)
    assert kvm_id == 7 and mod.struct("kvm").id == 7
    assert mod.offsetof("kvm", "vm_list.prev") == 8            # a base type inside a module's
    assert mod.offsetof("kvm", "userspace_pid") == 16
    assert mod.lookup("list_head").id == 3 and mod.type(3).name == "list_head"
    assert mod.struct("shared").size == 16                     # the module's own wins
    assert base.struct("shared").size == 8
    assert mod.find("shared") == [9, 5] and mod.find("kvm", B.FWD) == [6]
    assert mod.describe(mod.member("kvm", "module_only").type_id) == "u8_mod"
    # "list_head" in the module's records is the base's string offset: reused, not copied
    assert b"list_head" not in bytes(mod_b.strings)
    assert mod.validate() == 3
    with pytest.raises(BtfLookupError, match="no type id 10"):
        mod.type(10)
    with pytest.raises(BtfLookupError, match="forward declaration"):
        base.struct("kvm")


def test_split_btf_without_its_base_fails_cleanly():
    _, mod_b, _ = split_pair()
    with pytest.raises(BtfError, match="does not start with the empty name"):
        Btf.parse(mod_b.blob())                    # parsed as if it were a base


def test_big_endian_blob_reads_the_same(sink):
    b, t = kitchen_sink()
    be = Btf.parse(b.blob(endian=">"))
    le, _ = sink
    assert be.validate() == le.validate()
    for path in ("in.c", "grid[1][2].a", "hi", "tail[3]"):
        a, c = be.member("outer", path), le.member("outer", path)
        assert (a.bit_offset, a.bit_size, a.type_id) == (c.bit_offset, c.bit_size, c.type_id)
    assert be.enum("big") == le.enum("big")


def test_layout_section_lets_unknown_kinds_be_skipped():
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    b.raw(b.s("future"), (25 << 24) | 2, 0, [7, 1, 2, 3, 4])    # kind 25: 1 word + 2 x 2 words
    s = b.struct("after", 4, [("a", u32, 0)])
    layout = [(0, 0)] * 20 + [(0, 0)] * 5 + [(4, 8)]
    btf = Btf.parse(b.blob(layout=layout))
    assert btf.struct("after").id == s == 3
    assert btf.type(2).kind == 25 and btf.type(2).kind_name == "kind 25"
    with pytest.raises(BtfError, match="unknown kind 25"):
        Btf.parse(b.blob())


def test_header_longer_than_known_is_accepted():
    b, _ = kitchen_sink()
    btf = Btf.parse(b.blob(hdr_len=40))
    assert btf.struct("outer").size == 160


def test_btf_error_is_a_parse_error_exit_status_2():
    assert issubclass(BtfError, ParseError) and BtfError.exit_status == 2
    assert issubclass(BtfLookupError, BtfError)


def tiny_elf(sections):
    """An ELF64 file holding the given (name, bytes) sections and a section name table."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n, _ in sections) + b".shstrtab\0"
    body, offs, pos = b"", [], 64
    for _, data in sections:
        offs.append(pos + len(body))
        body += data
    shstr_off = pos + len(body)
    body += names
    shoff = pos + len(body)
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    hdr += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
                       len(sections) + 2, len(sections) + 1)
    sh = b"\0" * 64
    name_pos = 1
    for (n, data), off in zip(sections, offs):
        sh += struct.pack("<IIQQQQIIQQ", name_pos, 1, 0, 0, off, len(data), 0, 0, 1, 0)
        name_pos += len(n) + 1
    sh += struct.pack("<IIQQQQIIQQ", name_pos, 3, 0, 0, shstr_off, len(names), 0, 0, 1, 0)
    return hdr + body + sh


def test_load_raw_and_elf_files(tmp_path, sink):
    b, _ = kitchen_sink()
    raw = tmp_path / "vmlinux.btf"
    raw.write_bytes(b.blob())
    elf = tmp_path / "mod.ko"
    elf.write_bytes(tiny_elf([(".text", b"\x90" * 5), (".BTF", b.blob())]))
    noelf = tmp_path / "nobtf.ko"
    noelf.write_bytes(tiny_elf([(".text", b"\x90")]))
    assert Btf.load(str(raw)).struct("outer").size == 160
    assert Btf.load(str(elf)).struct("outer").size == 160
    with pytest.raises(BtfError, match="no .BTF section"):
        Btf.load(str(noelf))
    with pytest.raises(BtfError, match="cannot read BTF"):
        Btf.load(str(tmp_path / "absent"))
    with pytest.raises(BtfError, match="does not exist: module kvm is not loaded"):
        Btf.load_sysfs("kvm", vmlinux=Btf.load(str(raw)), root=str(tmp_path))


def test_load_sysfs_layout(tmp_path):
    base_b, mod_b, _ = split_pair()
    (tmp_path / "vmlinux").write_bytes(base_b.blob())
    (tmp_path / "kvm").write_bytes(mod_b.blob())
    mod = Btf.load_sysfs("kvm", root=str(tmp_path))
    assert mod.offsetof("kvm", "userspace_pid") == 16 and mod.base.name.endswith("vmlinux")
