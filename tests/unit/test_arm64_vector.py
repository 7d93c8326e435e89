"""The AArch64 numpy walkers against the scalar ones: walk_array_arm64() must answer what
walk_arm64() answers (an EL1 read) for every address, and leaf_arrays_arm64() must list what
iter_mappings_arm64() lists, element by element.

Property tests draw table memory in 64 KiB slots (a table of any granule fits one) with a few
descriptors per table: tables with APTable/XNTable/NSTable bits and high output-address bits,
blocks and pages with random attributes, AF=0, invalid and random words; and register states
with every granule and VA size in each range independently (and reserved TGn, TnSZ out of
bounds, DS with and without FEAT_LPA2, 64K with FEAT_LPA, every IPS and PARange, ID registers
unknown, HA/HD, HPD, TBI, EPD, WXN, big-endian descriptors, the MMU off). Addresses mostly
follow the descriptors in memory, so that many walks go deep and many translate.
"""

import time

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from .budget import examples

from qintrospect import paging
from qintrospect.commands import vmmap
from qintrospect.commands.batch import BatchTranslation
from qintrospect.errors import MemoryReadError
from qintrospect.paging.arm64 import Arm64State, iter_mappings_arm64, walk_arm64
from qintrospect.paging.arm64_format import arm64_format, range_params, ttbr_base
from qintrospect.paging.arm64_vector import (
    LEVEL_NAMES, Arm64BatchWalk, Arm64LeafArrays, leaf_arrays_arm64, walk_array_arm64,
)
from qintrospect.paging.vector import (
    FAULT_ACCESS_FLAG, FAULT_ADDRESS_SIZE, FAULT_PAGING_DISABLED, FAULT_REASONS,
    FAULT_TRANSLATION, leaf_arrays, walk_array,
)
from qintrospect.present.brieflines import brief_lines
from qintrospect.present.render import json_line
from tests.unit.test_arm64_walk import (
    AF, AP, APT, ATTR, BLOCK, CONT, DBM, GEOMETRY, LEAF, NG, NST, PXN, PXNT, R48, ROOT0,
    ROOT1, SCTLR_EE, SCTLR_M, SCTLR_WXN, SH, TBL, UXN, UXNT, VA, G, K, M, Mem, build,
    geometry_state, mmfr0, mmfr1, mmfr2, small_space, state, tcr, va_from,
)

TOP = 1 << 64
SLOT = 64 * K                 # one slot holds a table of any granule
SLOTS = 12
MEMORY = SLOT * SLOTS

SPACE = examples(250)   # tests/unit/budget.py: QI_FUZZ_SCALE draws more


class Reads:
    """Physical memory over a bytearray that remembers every read; reads beyond it fail, as
    do reads touching the pages of `holes`; pages in `picky` refuse reads longer than 8 bytes
    (whole tables) but give single descriptors."""

    def __init__(self, buf, holes=(), picky=()):
        self.buf = buf
        self.holes = set(holes)
        self.picky = set(picky)
        self.reads = []

    def __call__(self, addr, length):
        self.reads.append((addr, length))
        pages = set(range(addr >> 12, (addr + length - 1 >> 12) + 1))
        if addr < 0 or addr + length > len(self.buf) or pages & self.holes:
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        if length > 8 and pages & self.picky:
            raise MemoryReadError(f"page {addr:#x} reads only in small pieces", addr)
        return bytes(self.buf[addr:addr + length])


class Buf(bytearray):
    """Physical memory whose repr (in hypothesis' reports) lists only the non-zero words."""

    def __repr__(self):
        words = np.frombuffer(bytes(self), "<u8")
        return "{" + ", ".join(f"{8 * a:#x}: {int(words[a]):#x}"
                               for a in np.flatnonzero(words).tolist()) + "}"


# ---------------------------------------------------------------- random spaces

# where TTBRs and stray tables point: slot starts (any granule), 4 KiB / 16 KiB steps in slots
PLACES = st.one_of(st.integers(0, SLOTS - 1).map(lambda s: s * SLOT),
                   st.tuples(st.integers(0, SLOTS - 1), st.integers(0, 15)).map(
                       lambda t: t[0] * SLOT + t[1] * 4 * K),
                   st.tuples(st.integers(0, SLOTS - 1), st.integers(0, 3)).map(
                       lambda t: t[0] * SLOT + t[1] * 16 * K))
INDEXES = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 63, 255, 511, 1023, 2047, 8191]),
                    st.integers(0, 8191))
# high output-address bits now and then: OA[51:50] (DS), OA[51:48] (64K LPA), beyond IPS
HIGH = st.sampled_from([0] * 30 + [1 << 8, 3 << 8, 1 << 12, 0xF << 12, 1 << 40, 1 << 44,
                                   1 << 47, 1 << 48, 1 << 51])
TABLE_BITS = st.sampled_from([0] * 8 + [APT(1), APT(2), APT(3), PXNT, UXNT, NST,
                                        PXNT | UXNT | APT(3), 1 << 52 | AF])
LEAF_BITS = st.builds(
    lambda af, ap, sh, attr, more: (AF if af else 0) | AP(ap) | SH(sh) | ATTR(attr) | more,
    st.integers(0, 5).map(bool), st.integers(0, 3), st.integers(0, 3), st.integers(0, 7),
    st.sampled_from([0, 0, 0, NG, PXN, UXN, PXN | UXN, DBM, DBM | NG, CONT, 1 << 5, 1 << 50]))
FRAMES = st.one_of(st.integers(0, SLOTS - 1).map(lambda s: s * SLOT),
                   st.integers(0, (1 << 36) - 1).map(lambda f: f & ~0xFFF),
                   st.sampled_from([1 << 21, 5 << 21, 1 << 30, 3 << 30, 1 << 39, 1 << 42]))
NOISE = st.one_of(st.sampled_from([0, 2, 0x700 | AF, 1 | AF]),      # invalid; 01 (reserved
                  st.integers(0, TOP - 1))                           # at L3); anything
DESCRIPTORS = st.one_of(
    st.builds(lambda a, t, h: a | TBL | t | h, PLACES, TABLE_BITS, HIGH),
    st.builds(lambda f, t, bits, h: f | t | bits | h,
              FRAMES, st.sampled_from([BLOCK, TBL]), LEAF_BITS, HIGH),
    NOISE)

GRANULES = ["4k", "16k", "64k"]
GBITS_NAME = {12: "4k", 14: "16k", 16: "64k"}
# TnSZ: mostly within bounds for every granule and CPU; now and then 12 (52-bit VAs: valid only
# with FEAT_LVA or DS), above 39 (FEAT_TTST), anything
TSZ = st.sampled_from([16] * 8 + [25] * 6 + [21, 28, 33, 36, 39] * 3 + [12, 13, 42, 47, 48]
                      + [0, 8, 63])


@st.composite
def states(draw):
    """Register states: each range with its own granule and VA size."""
    g0, g1 = draw(st.sampled_from(GRANULES)), draw(st.sampled_from(GRANULES))
    t0 = {"4k": 0b00, "64k": 0b01, "16k": 0b10}[g0]
    t1 = {"16k": 0b01, "4k": 0b10, "64k": 0b11}[g1]
    if draw(st.integers(0, 19)) == 0:
        t0, t1 = 0b11, 0b00                                          # reserved encodings
    t = (draw(TSZ) | t0 << 14 | draw(TSZ) << 16 | t1 << 30 | draw(st.integers(0, 7)) << 32
         | draw(st.integers(0, 3)) << 12 | draw(st.integers(0, 3)) << 28)
    for bit, chance in ((7, 16), (23, 16), (37, 3), (38, 3), (39, 2), (40, 2), (41, 3),
                        (42, 3), (59, 5), (22, 2), (36, 2)):
        if draw(st.integers(0, chance - 1)) == 0:                    # EPD, TBI, HA, HD, HPD, DS
            t |= 1 << bit
    mm0 = draw(st.one_of(st.none(), st.builds(
        lambda pa, t4, t16, t64: mmfr0(pa, t4, t16, t64 if t4 != 0xF or t16 else 0),
        st.integers(0, 7), st.sampled_from([0, 0, 1, 0xF]), st.sampled_from([1, 1, 2, 0]),
        st.sampled_from([0, 0, 0xF]))))
    mm1 = draw(st.one_of(st.none(), st.builds(mmfr1, st.integers(0, 2))))
    mm2 = draw(st.one_of(st.none(), st.builds(mmfr2, st.integers(0, 1),
                                              st.sampled_from([1, 1, 1, 0]))))
    if draw(st.integers(0, 4)) == 0:         # 52-bit VAs and PAs in one or both ranges
        for shift in draw(st.sampled_from([(0,), (16,), (0, 16)])):
            t = t & ~(0x3F << shift) | 12 << shift
        t = t & ~(7 << 32) | 0b110 << 32 | 1 << 59                  # IPS 52 bits, DS
        mm0 = mmfr0(parange=0b0110, tgran4=0b0001, tgran16=0b0010)  # FEAT_LPA2 (and LPA)
        mm2 = mmfr2(varange=1, st=1)                                 # FEAT_LVA
    sctlr = SCTLR_M if draw(st.integers(0, 24)) else 0
    sctlr |= SCTLR_WXN if draw(st.booleans()) else 0
    sctlr |= SCTLR_EE if draw(st.integers(0, 7)) == 0 else 0
    ttbr = st.builds(lambda a, asid, low: a | asid << 48 | low, PLACES,
                     st.sampled_from([0, 0, 0x1234]),
                     st.sampled_from([0] * 6 + [1, 0x3C, 0x4]))   # CnP, BADDR[51:48]
    return Arm64State(ttbr0=draw(ttbr), ttbr1=draw(ttbr), tcr=t, sctlr=sctlr,
                      mair=draw(st.sampled_from([0x000000BB_0444FF00, 0, TOP - 1])),
                      id_aa64mmfr0=mm0, id_aa64mmfr1=mm1, id_aa64mmfr2=mm2)


@st.composite
def spaces(draw):
    """(memory, state): a register state, and from each range's root a tree of tables in that
    range's own geometry (1 to 4 descriptors per table: tables in fresh slots or, when the
    slots run out, tables already there, the root too; blocks and pages; noise), plus a few
    stray tables of random descriptors. Descriptors are stored in the state's byte order."""
    s = draw(states())
    buf = Buf(MEMORY)
    order = "big" if s.sctlr & SCTLR_EE else "little"
    roots = [ttbr_base(range_params(s, n)) for n in (0, 1)]
    free = [k for k in range(SLOTS) if k not in {r // SLOT for r in roots}]
    made = [r for r in roots if r + 8 <= MEMORY]

    def put(addr, value):
        if 0 <= addr and addr + 8 <= MEMORY:
            buf[addr:addr + 8] = value.to_bytes(8, order)

    def grow(p, i, table):
        levels = p.mode.levels
        count = 1 << levels[i].index_bits
        last = i == len(levels) - 1
        for index in draw(st.lists(st.one_of(st.sampled_from([0, 1, count - 1]),
                                             st.integers(0, count - 1)),
                                   min_size=1, max_size=4, unique=True)):
            kind = draw(st.sampled_from(["leaf"] * 5 + ["noise"] if last else
                                        ["table"] * 6 + ["leaf"] * 3 + ["noise"]))
            at = table + 8 * index
            if kind == "noise":
                put(at, draw(NOISE))
            elif kind == "leaf":
                bits = draw(LEAF_BITS)
                if p.ds and draw(st.booleans()):
                    bits &= ~SH(3)                   # OA[51:50] with DS: mostly 0
                put(at, draw(FRAMES) | (TBL if last else BLOCK) | bits | draw(HIGH))
            elif free:
                slot = free.pop(draw(st.integers(0, len(free) - 1)))
                step = 1 << p.granule
                nxt = slot * SLOT + draw(st.integers(0, SLOT // step - 1)) * step
                made.append(nxt)
                put(at, nxt | TBL | draw(TABLE_BITS) | draw(HIGH))
                grow(p, i + 1, nxt)
            else:                                    # shared tables, loops
                put(at, draw(st.sampled_from(made)) | TBL | draw(TABLE_BITS))

    if s.sctlr & SCTLR_M:
        for n in (0, 1):
            p = range_params(s, n)
            if roots[n] + 8 <= MEMORY:
                grow(p, 0, roots[n])
    for _ in range(draw(st.integers(0, 3), label="stray tables")):
        at = draw(PLACES)
        for index in draw(st.lists(INDEXES, min_size=1, max_size=4, unique=True)):
            put(at + 8 * index, draw(DESCRIPTORS))
    return buf, s


def descriptor(buf, s, addr):
    if addr < 0 or addr + 8 > len(buf):
        return None
    return int.from_bytes(buf[addr:addr + 8], "big" if s.sctlr & SCTLR_EE else "little")


@st.composite
def addresses(draw, buf, s):
    """Mostly addresses whose every index is one used in the table the walk reaches there,
    in the range's VA size (TTBR1 ones sign-extended); some with a random top byte; some any
    64-bit value."""
    if draw(st.integers(0, 11)) == 0:
        return draw(st.integers(0, TOP - 1))
    select = draw(st.integers(0, 1))
    p = range_params(s, select)
    fmt = arm64_format(p, s.mair)
    table, raw = ttbr_base(p), 0
    levels = p.mode.levels
    for i, spec in enumerate(levels):
        count = 1 << spec.index_bits
        used = []
        if 0 <= table and table + 8 * count <= len(buf):
            words = np.frombuffer(bytes(buf[table:table + 8 * count]), "<u8")
            used = np.flatnonzero(words).tolist()
        anywhere = st.integers(0, count - 1)
        index = draw(st.one_of(*[st.sampled_from(used)] * 9, anywhere) if used else anywhere)
        raw |= index << spec.shift
        e = descriptor(buf, s, table + 8 * index)
        if e is None or i == len(levels) - 1 or e & 3 != 3:
            raw |= draw(st.integers(0, (1 << spec.shift) - 1))
            break
        table = fmt.frame(i, e, False)
    va = raw | (TOP - (1 << p.mode.va_bits) if select else 0)
    if draw(st.integers(0, 5)) == 0:
        va = (va & ((1 << 56) - 1)) | draw(st.integers(0, 255)) << 56
    return va


# ---------------------------------------------------------------- the checks

def scalar_answer(w):
    return (w.ok, w.pa or 0, w.page_size or 0, bool(w.writable), bool(w.user),
            bool(w.executable), w.fault.reason if w.fault else None,
            w.fault.level if w.fault else None)


def batch_answer(out, k):
    return (bool(out.ok[k]), int(out.pa[k]), int(out.page_size[k]), bool(out.writable[k]),
            bool(out.user[k]), bool(out.executable[k]), out.reason(k), out.level_name(k))


def check_batch(read, s, vas):
    """walk_array_arm64 answers for each address what walk_arm64 answers, reading nothing
    twice; its entries and tables columns are the walk's steps."""
    before = len(read.reads)
    out = walk_array_arm64(read, s, np.array(vas, dtype=np.uint64))
    reads = read.reads[before:]
    assert len(set(reads)) == len(reads)
    assert isinstance(out, Arm64BatchWalk)
    assert len(out) == len(vas) and out.va.tolist() == list(vas)
    for k, va in enumerate(vas):
        w = walk_arm64(read, s, va)
        assert batch_answer(out, k) == scalar_answer(w), (hex(va), w.fault)
        assert (out.mode_of(k), out.root_of(k)) == (w.mode, w.root)
        if w.mode is None:
            assert out.select is None or out.modes == (None, None)
            continue
        first = LEVEL_NAMES.index(w.mode.levels[0].name)
        got = [(int(out.entries[k, first + j]), int(out.tables[k, first + j]))
               for j in range(len(w.levels))]
        assert got == [(st.entry, st.table_addr) for st in w.levels]
        if w.ok:
            assert LEVEL_NAMES[out.leaf_level[k]] == w.levels[-1].name
        else:
            assert out.leaf_level[k] == -1
    return out


def check_leaves(buf, s, start=0, end=None, holes=()):
    """leaf_arrays_arm64 equals iter_mappings_arm64: mappings, arrays, reads and unreadable
    reports."""
    want_seen, got_seen = [], []
    want_mem, got_mem = Reads(buf, holes), Reads(buf, holes)
    want = list(iter_mappings_arm64(want_mem, s, start, end,
                                    on_unreadable=lambda lvl, a, e: want_seen.append((lvl, a))))
    got = leaf_arrays_arm64(got_mem, s, start, end,
                            on_unreadable=lambda lvl, a, e: got_seen.append((lvl, a, type(e))))
    assert isinstance(got, Arm64LeafArrays)
    assert list(got.mappings()) == want
    assert len(got) == len(want)
    assert got.va.tolist() == [m.va for m in want]
    assert got.pa.tolist() == [m.pa for m in want]
    assert got.size.tolist() == [m.size for m in want]
    assert got.entry.tolist() == [m.levels_entries[-1] for m in want]
    assert got.level.tolist() == [len(m.levels_entries) - 1 for m in want]
    assert got.writable.tolist() == [m.writable for m in want]
    assert got.user.tolist() == [m.user for m in want]
    assert got.executable.tolist() == [m.executable for m in want]
    assert got.select.tolist() == [m.va >> 63 for m in want]
    width = got.path.shape[1]
    assert got.path.tolist() == [list(m.levels_entries) + [0] * (width - len(m.levels_entries))
                                 for m in want]
    assert [(lvl, a) for lvl, a, _ in got_seen] == want_seen
    assert all(t is MemoryReadError for _, _, t in got_seen)
    # each table read once, whole; the same tables as iter_mappings_arm64
    assert len(set(got_mem.reads)) == len(got_mem.reads)
    assert set(got_mem.reads) == set(want_mem.reads)
    # vmmap's flags (no range given): right wherever the ranges name SH alike
    if s.sctlr & SCTLR_M:
        ps = [range_params(s, n) for n in (0, 1)]
        if len({(p.ds, p.sh if p.ds else None) for p in ps}) == 1:
            rows = vmmap.from_leaves(got)
            assert [r.flags for r in vmmap.iter_rows(rows, got.format)] == [m.flags for m in want]
    return want


# ---------------------------------------------------------------- properties

@SPACE
@given(data=st.data(), space=spaces())
def test_walk_array_matches_walk(data, space):
    buf, s = space
    vas = data.draw(st.lists(addresses(buf, s), min_size=8, max_size=40), label="vas")
    holes = data.draw(st.sets(st.integers(0, MEMORY // 4096 - 1), max_size=2), label="holes")
    picky = data.draw(st.sets(st.integers(0, MEMORY // 4096 - 1), max_size=3), label="picky")
    out = check_batch(Reads(buf, holes, picky), s, vas)
    for code in set(out.fault_reason.tolist()):
        event(f"some element: {FAULT_REASONS[code] or 'translated'}")
    for k in np.flatnonzero(out.ok).tolist():
        p = range_params(s, int(out.select[k]))
        event(f"translated: {GBITS_NAME[p.granule]}, {int(out.page_size[k]) >> 10} KiB")
        for what, there in (("DS", p.ds), ("64K with FEAT_LPA", p.lpa), ("HPD", p.hpd),
                            ("HA", p.ha), ("HD", p.hd), ("WXN", s.sctlr & SCTLR_WXN),
                            ("big-endian", s.sctlr & SCTLR_EE), ("level -1", out.modes[
                                int(out.select[k])].levels[0].name == "L-1"),
                            ("a tagged address", int(out.va[k]) >> 56 not in (0, 0xFF))):
            if there:
                event(f"translated with {what}")
    if out.modes[0] != out.modes[1]:
        event("the two ranges differ in mode")


@SPACE
@given(data=st.data(), space=spaces())
def test_leaf_arrays_matches_iter_mappings(data, space):
    buf, s = space
    holes = data.draw(st.sets(st.integers(0, MEMORY // 4096 - 1), max_size=2), label="holes")
    seen = []
    maps = check_leaves(buf, s, holes=holes)
    list(iter_mappings_arm64(Reads(buf, holes), s, on_unreadable=lambda *a: seen.append(a)))
    event("unreadable tables: " + ("0" if not seen else "1" if len(seen) == 1 else "2+"))
    event("mappings: " + ("0" if not maps else "1-9" if len(maps) < 10 else "10+"))
    for size in {m.size for m in maps}:
        event(f"some leaf of {size >> 10} KiB")
    # sub-ranges: around leaf starts, at the range boundaries, anywhere
    edge = st.one_of(
        st.sampled_from([m.va for m in maps] or [0]).flatmap(
            lambda va: st.sampled_from([va, va + 1, va + 0x1000, va - 1, va + 2 * M]).map(
                lambda a: a % TOP)),
        st.integers(0, TOP - 1),
        st.sampled_from([0, 1 << 39, 1 << 48, 1 << 52, TOP - (1 << 48), TOP - (1 << 39),
                         TOP - 1]))
    start = data.draw(edge, label="start")
    end = data.draw(st.one_of(st.none(), edge), label="end")
    sub = check_leaves(buf, s, start, end, holes)
    top = end if end is not None else TOP
    assert sub == [m for m in maps if m.va < top and m.va + m.size > start and start < top]


# ---------------------------------------------------------------- plain cases

@pytest.mark.parametrize("gran, va_bits", sorted(GEOMETRY))
@pytest.mark.parametrize("select", [0, 1])
def test_each_geometry(gran, va_bits, select):
    """A page and a block (where the granule has one) in every geometry, in either range,
    the other range 4K/48: walks, leaves, names."""
    s = geometry_state(gran, va_bits, select)
    rows = GEOMETRY[(gran, va_bits)]
    mem = Mem()
    base = ROOT1 if select else ROOT0
    ext = TOP - (1 << va_bits) if select else 0
    page = va_from(rows, [1] * len(rows), 0x18)
    leaf = LEAF if va_bits < 52 or gran == "64k" else AF | ATTR(1)
    build(mem, rows, page, 0x7 << 16, base=base, leaf=leaf)
    vas = [ext | page, ext | page + 8, ext | va_from(rows, [1] * len(rows)) ^ (1 << 16 + 5)]
    out = check_batch(mem, s, vas + [0, TOP - 1, 1 << 55, VA])
    assert out.ok[0] and out.pa[0] == 0x7 << 16 | 0x18
    assert out.mode_of(0).name == f"aarch64-{gran}-{va_bits}"
    maps = check_leaves(MemBuf(mem), s)
    assert [m.va for m in maps] == [ext | page & ~((1 << rows[-1][1]) - 1)]


class MemBuf(bytearray):
    """A Mem's words laid out in a bytearray (the leaf checks read through Reads)."""

    def __init__(self, mem):
        top = (max(mem.q) | (SLOT - 1)) + 1 if mem.q else 0    # whole tables readable
        super().__init__(top)
        for a, v in mem.q.items():
            self[a:a + 8] = v.to_bytes(8, "little")


def test_both_ranges_and_dispatch():
    mem = small_space()
    s = state()
    want = list(iter_mappings_arm64(mem, s))
    la = leaf_arrays(mem, s)                            # the x86 entry point dispatches
    assert list(la.mappings()) == want and la.format.flag_bits & 2
    assert list(paging.leaf_arrays(mem, s).mappings()) == want
    assert la.mode is not None and la.mode.name == "aarch64-4k-48"
    vas = [m.va for m in want] + [0, VA, 1 << 60]
    out = walk_array(mem, s, vas)
    assert isinstance(out, Arm64BatchWalk) and out.ok.tolist() == [True] * 4 + [False, True, False]
    assert out.walk(1, mem, s) == walk_arm64(mem, s, vas[1])
    assert out.walk(1, mem, s, "el0-write") == walk_arm64(mem, s, vas[1], "el0-write")
    assert paging.walk_array is walk_array


def test_mmu_off():
    s = state(sctlr=0)
    out = walk_array_arm64(Mem(), s, [0, 0x1234, TOP - 1])
    assert out.ok.tolist() == [False] * 3
    assert out.fault_reason.tolist() == [FAULT_PAGING_DISABLED] * 3
    assert [out.level_name(k) for k in range(3)] == [None] * 3
    assert out.mode is None and out.mode_of(0) is None and out.root_of(0) == 0
    la = leaf_arrays_arm64(Mem(), s)
    assert len(la) == 0 and list(la.mappings()) == [] and la.mode is None
    assert len(walk_array_arm64(Mem(), state(), [])) == 0


def test_level_zero_faults_of_a_range_that_starts_at_level_1():
    """4K/39: the walk starts at L1, yet an address out of range (or EPD) faults at L0; the
    other range 64K/42 starts at L2: one level code per name across both ranges."""
    t = tcr(t0sz=25, t1sz=22, tg1="64k")
    s = state(t)
    mem = Mem()
    out = check_batch(mem, s, [1 << 40, 0x1000, TOP - 0x1000, 1 << 63])
    assert [out.level_name(k) for k in range(4)] == ["L0", "L1", "L2", "L0"]
    assert out.fault_reason.tolist() == [FAULT_TRANSLATION] * 4
    assert out.mode is None and out.modes[0].name == "aarch64-4k-39"
    assert out.modes[1].name == "aarch64-64k-42"
    s = state(tcr(t0sz=25, epd0=True))
    out = check_batch(mem, s, [0x1000])
    assert out.level_name(0) == "L0"


def test_brief_lines_of_mixed_ranges():
    """translate --brief's lines (grouped by fault level and reason) of a batch whose two
    ranges start at different levels are the one-by-one lines."""
    t = tcr(t0sz=25, t1sz=22, tg1="64k")
    s = state(t, ttbr0=0x100000, ttbr1=0x200000)
    mem = Mem()
    mem.put(0x100000 + 8 * 1, 0x300000 | TBL)                # L1[1] -> L2 (4K)
    mem.put(0x200000 + 8 * 2, 0x400000 | TBL)                # L2[2] -> L3 (64K)
    vas = [0x1000, 1 << 30 | 0x1000, TOP - (1 << 42) + (2 << 29) + 0x10000,
           TOP - 0x1000, 1 << 40, 0x2000, TOP - (1 << 42) + (2 << 29)]
    w = walk_array_arm64(mem, s, vas)
    n = len(vas)
    b = BatchTranslation(w, np.full(n, -1, np.int32), np.zeros(n, np.uint64),
                         np.zeros(n, bool), np.zeros(n, np.uint64), np.zeros(n, np.uint8),
                         np.zeros(n, np.uint64), np.zeros(n, bool), ())
    lines = b"".join(line for block in brief_lines(b) for line in block).decode().splitlines()
    assert lines == [json_line(b.row_dict(k)) for k in range(n)]
    assert [b.row_dict(k)["fault"]["level"] for k in range(n)] == [
        walk_arm64(mem, s, va).fault.level for va in vas]
    assert len({b.row_dict(k)["fault"]["level"] for k in range(n)}) == 4


def test_access_flag_and_address_size():
    mem = Mem()
    build(mem, R48, VA, 0x12345000, leaf=LEAF & ~AF)
    out = check_batch(mem, state(), [VA])
    assert out.fault_reason[0] == FAULT_ACCESS_FLAG and out.level_name(0) == "L3"
    out = check_batch(mem, state(tcr(ha=True), mm1=mmfr1(hafdbs=1)), [VA])
    assert out.ok[0]
    mem = Mem()
    build(mem, R48, VA, 1 << 44, leaf_index=2)
    out = check_batch(mem, state(tcr(ips=0b010)), [VA])          # 40-bit output size
    assert out.fault_reason[0] == FAULT_ADDRESS_SIZE and out.level_name(0) == "L2"
    out = check_batch(mem, state(tcr(ips=0b010), ttbr0=1 << 41), [VA])
    assert out.fault_reason[0] == FAULT_ADDRESS_SIZE and out.level_name(0) == "L0"


def test_hierarchical_rights_and_hpd():
    for hpd in (False, True):
        for aptable in range(4):
            mem = Mem()
            build(mem, R48, VA, 0x12345000, leaf=LEAF | AP(1), table=APT(aptable) | PXNT)
            check_batch(mem, state(tcr(hpd0=hpd), sctlr=SCTLR_M | SCTLR_WXN), [VA])
            check_leaves(MemBuf(mem), state(tcr(hpd0=hpd)))


def test_unreadable_and_partly_readable_tables():
    mem = small_space()
    buf = MemBuf(mem)
    s = state()
    check_leaves(buf, s, holes=[0x260000 >> 12])
    maps = list(iter_mappings_arm64(mem, s))
    vas = [m.va for m in maps]
    # whole tables refuse, single descriptors read: answers as walk_arm64's
    read = Reads(buf, picky={a >> 12 for a in range(0, len(buf), 4096)})
    out = check_batch(read, s, vas)
    assert out.ok.all()
    out = check_batch(Reads(buf, holes=[0x260000 >> 12]), s, vas)
    assert out.reason(3) == "unreadable" and out.level_name(3) == "L1"


def test_big_endian_descriptors():
    mem = Mem(big_endian=True)
    build(mem, R48, VA, 0x12345000)
    s = state(sctlr=SCTLR_M | SCTLR_EE)
    out = check_batch(mem, s, [VA])
    assert out.ok[0] and out.pa[0] == 0x12345000 | (VA & 0xFFF)
    la = leaf_arrays_arm64(mem, s)
    assert list(la.mappings()) == list(iter_mappings_arm64(mem, s))


def test_vmmap_flags_use_the_format_bits():
    """vmmap keys its flag cache by the format's flag_bits: leaves that differ only in bits
    x86's FLAG_BITS leaves out (AF, nG, PXN, UXN, ...) keep their own flags."""
    mem = Mem()
    rows = R48
    for k, extra in enumerate([0, NG, PXN, UXN, DBM, CONT]):
        va = va_from(rows, [0, 0, 0, k])
        build(mem, rows, va, (0x100 + k) << 12, leaf=LEAF | extra)
    s = state(tcr(epd1=True))
    la = leaf_arrays_arm64(mem, s)
    got = [r.flags for r in vmmap.iter_rows(vmmap.from_leaves(la), la.format)]
    assert got == [m.flags for m in iter_mappings_arm64(mem, s)]
    assert len(set(got)) == 6


def test_ds_ranges_with_different_shareability():
    """With DS=1 a leaf's SH is TCR_EL1.SHn: mappings() names each range's own."""
    mem = Mem()
    s = state(tcr(ds=True, sh0=0b10, sh1=0b11), mm0=mmfr0(tgran4=0b0001))   # FEAT_LPA2
    build(mem, R48, VA, 0x12345000, leaf=AF | ATTR(1))
    build(mem, R48, VA, 0x22345000, leaf=AF | ATTR(1), base=ROOT1)
    maps = list(iter_mappings_arm64(mem, s))
    la = leaf_arrays_arm64(mem, s)
    assert list(la.mappings()) == maps
    assert [m.flags[3] for m in maps] == ["SH=outer", "SH=inner"]


def test_large_batch_reads_each_table_once():
    mem, s, vas = linux_like_space(np.random.default_rng(1), 20_000)
    buf = MemBuf(mem)
    read = Reads(buf)
    out = walk_array_arm64(read, s, vas)
    assert len(read.reads) == len(set(read.reads)) == len(mem_tables(mem))
    rng = np.random.default_rng(2)
    for k in rng.integers(0, len(vas), 300).tolist():
        assert batch_answer(out, k) == scalar_answer(walk_arm64(read, s, int(vas[k])))
    la = leaf_arrays_arm64(Reads(buf), s)
    assert list(la.mappings()) == list(iter_mappings_arm64(Reads(buf), s))


# ---------------------------------------------------------------- speed (printed)

def linux_like_space(rng, count, pages=4096):
    """A 4K/48-bit space: TTBR0 with `pages` 4 KiB pages under one L2 table, TTBR1 with the
    same number of pages and 2 MiB blocks; `count` addresses over both, nine in ten mapped."""
    mem = Mem()
    tables = 8
    mem.put(ROOT0, 0x110000 | TBL)                              # L0[0] -> L1
    mem.put(0x110000, 0x120000 | TBL)                           # L1[0] -> L2
    mem.put(ROOT1 + 8 * 511, 0x210000 | TBL)
    mem.put(0x210000 + 8 * 511, 0x220000 | TBL)
    per = pages // tables
    for k in range(tables):
        for root_l2, base in ((0x120000, 0x300000), (0x220000, 0x400000)):
            l3 = base + k * 0x1000
            mem.put(root_l2 + 8 * k, l3 | TBL)
            for j in range(per):
                frame = 0x10000000 + (k * 512 + j) * 4096
                mem.put(l3 + 8 * j, frame | LEAF | TBL | AP(1) | UXN)
    for k in range(tables, 64):                                 # TTBR1: 2 MiB blocks
        mem.put(0x220000 + 8 * k, (k << 21) | LEAF | BLOCK | PXN)
    span = tables * 2 * M
    low = rng.integers(0, span * 10 // 9, count // 2, dtype=np.uint64)
    high = np.uint64(TOP - G) + rng.integers(0, 64 * 2 * M * 10 // 9, count - count // 2,
                                             dtype=np.uint64)
    vas = np.concatenate((low, high))
    rng.shuffle(vas)
    return mem, state(), vas


def mem_tables(mem):
    return {a & ~0xFFF for a in mem.q}


def x86_like_space(rng, count, pages=4096):
    """The same shape in x86 4-level paging."""
    from tests.unit.test_paging import Mem as X86Mem, cpu64, P, RW, US, PS
    mem = X86Mem(0x500000)
    mem.put(0x1000, 0x2000 | P | RW | US)
    mem.put(0x2000, 0x3000 | P | RW | US)
    mem.put(0x1000 + 8 * 511, 0x5000 | P | RW)
    mem.put(0x5000 + 8 * 511, 0x6000 | P | RW)
    tables = 8
    per = pages // tables
    for k in range(tables):
        for pd, base in ((0x3000, 0x100000), (0x6000, 0x200000)):
            pt = base + k * 0x1000
            mem.put(pd + 8 * k, pt | P | RW | US)
            for j in range(per):
                mem.put(pt + 8 * j, (0x10000000 + (k * 512 + j) * 4096) | P | RW | US)
    for k in range(tables, 64):
        mem.put(0x6000 + 8 * k, (k << 21) | P | RW | PS)
    span = tables * 2 * M
    low = rng.integers(0, span * 10 // 9, count // 2, dtype=np.uint64)
    high = np.uint64(TOP - G) + rng.integers(0, 64 * 2 * M * 10 // 9, count - count // 2,
                                             dtype=np.uint64)
    vas = np.concatenate((low, high))
    rng.shuffle(vas)
    return mem, cpu64(0x1000), vas


def best(f, repeat=5):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def test_speed_printed(capsys):
    """100,000 random addresses over a 4K/48-bit space of 8192 pages (and 2 MiB blocks):
    walk_array_arm64 against walk_arm64 one by one and against x86's walk_array over the
    same shape. Printed, never asserted."""
    n = 100_000
    mem, s, vas = linux_like_space(np.random.default_rng(7), n)
    read = MemBuf(mem)
    reader = Reads(read)
    out = walk_array_arm64(reader, s, vas)
    assert out.ok.mean() > 0.8
    arm = best(lambda: walk_array_arm64(Reads(read), s, vas))
    xmem, cpu, xvas = x86_like_space(np.random.default_rng(7), n)
    assert walk_array(xmem, cpu, xvas).ok.mean() > 0.8
    x86 = best(lambda: walk_array(xmem, cpu, xvas))
    sample = vas[:10_000].tolist()
    t0 = time.perf_counter()
    for va in sample:
        walk_arm64(reader, s, va)
    scalar = (time.perf_counter() - t0) * (n / len(sample))
    with capsys.disabled():
        print(f"\n[arm64 speed] {n} addresses: walk_array_arm64 {arm * 1e3:.1f} ms, "
              f"x86 walk_array {x86 * 1e3:.1f} ms (ratio {arm / x86:.2f}), walk_arm64 loop "
              f"{scalar:.2f} s (from {len(sample)}; {scalar / arm:.0f}x slower)")
