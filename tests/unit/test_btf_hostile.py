"""Hostile BTF (as a guest's memory could hold): truncated, bad offsets, bad ids, cycles,
huge counts. Every failure is a BtfError naming what was wrong; nothing else escapes, and
nothing loops or recurses without a bound."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qintrospect.btf import Btf, BtfError
from qintrospect.btf import btf as B
from qintrospect.errors import QIError
from tests.btf_encoder import BtfBuilder
from tests.unit.test_btf import kitchen_sink

GOOD = kitchen_sink()[0].blob()
PATHS = ["link.next", "lo", "in.c", "grid[1][2].a", "arr[3]", "self", "tail[7]", "hpa", "nope"]


def exercise(btf: Btf) -> None:
    """Everything a caller might do with a parsed blob."""
    btf.validate()
    for name in ("outer", "inner", "list_head", "u64", "color", "int", "kvm"):
        for kind in (None, B.STRUCT, B.TYPEDEF):
            try:
                t = btf.lookup(name, kind)
            except BtfError:
                continue
            btf.describe(t.id)
            try:
                btf.sizeof(t.id)
            except BtfError:
                pass
            for path in PATHS:
                try:
                    btf.member(t.id, path)
                except BtfError:
                    pass
    for name in ("RED", "HUGE"):
        try:
            btf.enum_value(name)
        except BtfError:
            pass
    btf.variables(".data..percpu")


def only_btf_errors(data: bytes) -> None:
    try:
        btf = Btf.parse(data, name="fuzz")
        exercise(btf)
    except BtfError:
        pass


def header(**kw):
    f = dict(magic=0xEB9F, version=1, flags=0, hdr_len=24, type_off=0, type_len=0, str_off=0,
             str_len=1)
    f.update(kw)
    return struct.pack("<HBBIIIII", *f.values())


@pytest.mark.parametrize("data, message", [
    (b"", "shorter than a BTF header"),
    (GOOD[:23], "shorter than a BTF header"),
    (b"\x00\x00" + GOOD[2:], "bad magic 0000"),
    (header(version=2) + b"\0", "version 2"),
    (header(hdr_len=20) + b"\0", "header length 20"),
    (header(hdr_len=4096) + b"\0", "header length 4096"),
    (header(type_len=8, str_off=8) + b"\0", "type section .* runs past"),
    (header(str_off=0, str_len=100) + b"\0", "string section .* runs past"),
    (header(type_off=0, type_len=12, str_off=8, str_len=8) + b"\0" * 20, "overlap"),
    (header(type_off=2, type_len=12, str_off=14) + b"\0" * 15, "not 4-byte aligned"),
    (header(type_len=6, str_off=8) + b"\0" * 9, "not 4-byte aligned"),
    (header(str_len=2) + b"\0x", "does not end with a NUL"),
    (header(str_len=2) + b"x\0", "does not start with the empty name"),
])
def test_malformed_headers(data, message):
    with pytest.raises(BtfError, match=message):
        Btf.parse(data)


def test_every_truncation_is_a_btf_error():
    for n in range(len(GOOD)):
        with pytest.raises(BtfError):
            Btf.parse(GOOD[:n])


def blob_of(records, strings=b"\0"):
    types = b"".join(records)
    return header(type_len=len(types), str_off=len(types), str_len=len(strings)) + types + \
        strings


def rec(name_off, kind, vlen, size_or_type, *extra, kflag=0):
    return struct.pack("<III", name_off, (kflag << 31) | (kind << 24) | vlen, size_or_type) + \
        struct.pack(f"<{len(extra)}I", *extra)


def test_record_cut_short_and_vlen_past_the_end():
    with pytest.raises(BtfError, match="type record 1 at byte 0x0 is cut short"):
        Btf.parse(blob_of([rec(0, B.INT, 0, 4)[:8]]))
    with pytest.raises(BtfError, match="last type record \\(1\\) runs past .* by 4 bytes"):
        Btf.parse(blob_of([rec(0, B.INT, 0, 4)]))                 # INT lacks its extra word
    with pytest.raises(BtfError, match="runs past"):
        Btf.parse(blob_of([rec(0, B.STRUCT, 0xFFFF, 8)]))        # 65535 members claimed


def test_unknown_kind_and_unused_bits():
    with pytest.raises(BtfError, match="type 1 at byte 0x0 has unknown kind 25"):
        Btf.parse(blob_of([rec(0, 25, 0, 0)]))
    with pytest.raises(BtfError, match="has unknown kind 0"):
        Btf.parse(blob_of([rec(0, 0, 0, 0)]))
    with pytest.raises(BtfError, match="unused bits set in info 0x02ff0000"):
        Btf.parse(blob_of([struct.pack("<III", 0, 0x02FF0000, 1)]))


def test_bad_name_offset_is_reported_with_the_type():
    btf = Btf.parse(blob_of([rec(500, B.INT, 0, 4, 32)]))
    with pytest.raises(BtfError, match="type 1's name: string offset 0x1f4 is beyond"):
        btf.type(1)
    with pytest.raises(BtfError):
        btf.validate()


def test_type_id_out_of_range():
    b = BtfBuilder()
    b.struct("s", 8, [("m", 77, 0)])
    btf = Btf.parse(b.blob())
    with pytest.raises(BtfError, match="type 1: member 0 refers to type id 77, beyond the last"):
        btf.struct("s")
    b = BtfBuilder()
    b.ptr(1000)
    with pytest.raises(BtfError, match="its type refers to type id 1000"):
        Btf.parse(b.blob()).validate()
    b = BtfBuilder()
    b.array(5, 1, 9)
    with pytest.raises(BtfError, match="element type refers to type id 5"):
        Btf.parse(b.blob()).validate()


def test_typedef_cycles_are_found():
    b = BtfBuilder()
    a = b.typedef("A", b.next_id + 1)
    b.const(b.next_id + 1)
    b.typedef("C", a)                              # A -> const -> C -> A
    self_ref = b.volatile(b.next_id)               # volatile of itself
    u = b.int_("unsigned int", 4)
    b.struct("holder", 8, [("m", a, 0), ("k", u, 32)])
    btf = Btf.parse(b.blob())
    for spec in ("A", a, "C", self_ref):
        with pytest.raises(BtfError, match="reference cycle"):
            btf.sizeof(spec)
    with pytest.raises(BtfError, match="reference cycle"):
        btf.validate()
    with pytest.raises(BtfError, match="reference cycle"):
        btf.member("holder", "m.x")
    assert btf.offsetof("holder", "k") == 4       # the rest stays usable
    assert btf.describe(a) == "A" and btf.describe(self_ref).endswith("...")


def test_array_cycles_and_long_chains():
    b = BtfBuilder()
    loop = b.array(b.next_id, 2)                   # an array of itself
    u = b.int_("unsigned int", 4)
    prev = u
    for _ in range(B.MAX_CHAIN + 5):
        prev = b.array(prev, 1)
    btf = Btf.parse(b.blob())
    with pytest.raises(BtfError, match="nests into itself"):
        btf.sizeof(loop)
    with pytest.raises(BtfError, match="nests into itself"):
        btf.sizeof(prev)


def test_huge_sizes_are_refused():
    b = BtfBuilder()
    u = b.int_("long unsigned int", 8)
    a1 = b.array(u, 0xFFFFFFFF)
    a2 = b.array(a1, 0xFFFFFFFF)
    b.struct("s", 8, [("big", a2, 0)])
    btf = Btf.parse(b.blob())
    assert btf.sizeof(a1) == 8 * 0xFFFFFFFF
    with pytest.raises(BtfError, match="not plausible"):
        btf.sizeof(a2)
    assert btf.member("s", "big[2][3]").offset == 8 * (2 * 0xFFFFFFFF + 3)


def test_int_with_impossible_bits():
    with pytest.raises(BtfError, match="200 bits at offset 0 do not fit in 4 bytes"):
        Btf.parse(blob_of([rec(0, B.INT, 0, 4, 200)])).type(1)
    with pytest.raises(BtfError, match="do not fit"):
        Btf.parse(blob_of([rec(0, B.INT, 0, 4, (8 << 16) | 32)])).type(1)


def test_anonymous_members_that_contain_themselves_end():
    b = BtfBuilder()
    u = b.int_("unsigned int", 4)
    s = b.next_id
    b.struct("loop", 8, [("", s, 0), ("x", u, 32), ("", b.next_id, 0)])
    b.union("", 8, [("", s, 0)])
    btf = Btf.parse(b.blob())
    assert btf.offsetof("loop", "x") == 4
    with pytest.raises(BtfError, match="has no member 'nope'"):
        btf.member("loop", "nope")


def test_deep_anonymous_nesting_is_bounded():
    b = BtfBuilder()
    u = b.int_("unsigned int", 4)
    inner = b.struct("", 4, [("deep", u, 0)])
    for _ in range(B.MAX_NEST + 3):
        inner = b.struct("", 4, [("", inner, 0)])
    b.struct("top", 4, [("", inner, 0)])
    btf = Btf.parse(b.blob())
    with pytest.raises(BtfError, match="nest deeper than"):
        btf.member("top", "deep")


def test_member_of_void_type():
    b = BtfBuilder()
    b.struct("s", 8, [("v", 0, 0)])
    btf = Btf.parse(b.blob())
    with pytest.raises(BtfError, match="member v of type 1 is void"):
        btf.member("s", "v")


def test_layout_section_with_misaligned_sizes_is_refused():
    b = BtfBuilder()
    b.raw(0, 25 << 24, 0)
    with pytest.raises(BtfError, match="unknown kind 25"):
        Btf.parse(b.blob(layout=[(0, 0)] * 25 + [(3, 0)]))


def test_errors_are_qi_errors_with_exit_status_2():
    with pytest.raises(QIError) as e:
        Btf.parse(b"junk" * 10)
    assert e.value.exit_status == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_random_byte_changes_never_escape(changes):
    data = bytearray(GOOD)
    for pos, value in changes:
        data[pos] = value
    only_btf_errors(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 2))
def test_random_type_sections_never_escape(types, pad):
    types = types[:len(types) // 4 * 4]
    strings = b"\0outer\0inner\0x\0"
    only_btf_errors(header(type_len=len(types), str_off=len(types) + 4 * pad,
                           str_len=len(strings)) + types + b"\0" * (4 * pad) + strings)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0xFFFFFFFF), min_size=6, max_size=6))
def test_random_headers_never_escape(fields):
    data = struct.pack("<HBBI", 0xEB9F, 1, 0, 24) + struct.pack("<4I", *fields[:4]) + \
        GOOD[24:]
    only_btf_errors(data)
