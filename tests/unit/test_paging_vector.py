"""The numpy walkers against the scalar ones: walk_array() must answer what walk() answers for
every address, and leaf_arrays() must list what iter_mappings() lists, element by element.

Property tests draw page-table memory per mode as test_paging_property does (a small physical
space, entries pointing into it and at themselves, large-page frames, reserved bits, PS, NX
with and without NXE, PSE-36, PAE PDPTEs with their extra bits, PDPTE registers that differ
from memory, CPUs with and without 1 GiB pages or not saying) and batches of addresses that
mostly follow the entries put there, so that many walks go deep and many translate.
"""

from qintrospect.record import replace

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from .budget import SCALE, examples

from qintrospect import slat
from qintrospect.errors import MemoryReadError
from qintrospect.paging import (
    FAULT_REASONS, CpuState, iter_mappings, leaf_arrays, paging_mode, walk, walk_array,
)
from qintrospect.paging.vector import FAULT_NOT_PRESENT, FAULT_UNREADABLE
from tests.unit.test_paging import (
    GIB1, KIB4, MIB2, MIB4, NX, P, PS, RW, T, US, Mem, chain, cpu32, cpu64, cpupae, idx,
    small_address_space,
)
from tests.unit.test_paging_property import (
    CR0, LA57, LMA, LME, NXE, PAE, PAGES, PSE, SLOTS4, SLOTS8, ept_entries, entries4, entries8,
    pdpt_entries,
)

SPACE = examples(400)   # tests/unit/budget.py: QI_FUZZ_SCALE draws more


class Reads:
    """Physical memory over a bytearray that remembers every read. Pages in `picky` refuse
    reads longer than 8 bytes (whole tables) but give single entries."""

    def __init__(self, buf, picky=()):
        self.buf = buf
        self.picky = set(picky)
        self.reads = []

    def __call__(self, addr, length):
        self.reads.append((addr, length))
        if addr < 0 or addr + length > len(self.buf):
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        if length > 8 and addr >> 12 in self.picky:
            raise MemoryReadError(f"page {addr:#x} reads only in small pieces", addr)
        return bytes(self.buf[addr:addr + length])


# ---------------------------------------------------------------- random spaces

class Buf(bytearray):
    """Physical memory whose repr (in hypothesis' reports) lists only the non-zero words."""

    def __init__(self, n, size):
        super().__init__(n)
        self.size = size
        self.slots = {}       # page -> the slots where entries were put

    def __repr__(self):
        words = (int.from_bytes(self[a:a + self.size], "little")
                 for a in range(0, len(self), self.size))
        return "{" + ", ".join(f"{a * self.size:#x}: {w:#x}"
                               for a, w in enumerate(words) if w) + "}"


def draw_tables(draw, size, slots, entry=None):
    """PAGES pages, each with 1 to 5 entries at `slots`, drawn like test_paging_property's."""
    entry = entry if entry is not None else entries8 if size == 8 else entries4
    buf = Buf(PAGES * 4096, size)
    for page in range(PAGES):
        buf.slots[page] = draw(st.lists(st.sampled_from(slots), min_size=1, max_size=5,
                                        unique=True))
        for slot in buf.slots[page]:
            at = page * 4096 + slot * size
            buf[at:at + size] = draw(entry).to_bytes(size, "little")
    return buf


@st.composite
def spaces(draw):
    """(memory, cpu, index bits per level root first) for a random mode."""
    kind = draw(st.sampled_from(["4-level", "5-level", "pae", "32-bit"]))
    nxe = draw(st.booleans())
    if kind == "32-bit":
        buf = draw_tables(draw, 4, SLOTS4)
        m = draw(st.sampled_from([None, 32, 36, 40, 52]))
        cpu = CpuState(cr0=CR0, cr3=draw(st.integers(0, PAGES)) << 12 | draw(st.integers(0, 0xFFF)),
                       cr4=PSE if draw(st.booleans()) else 0, efer=NXE if nxe else 0,
                       maxphyaddr=m)
        return buf, cpu, [10, 10]
    buf = draw_tables(draw, 8, SLOTS8)
    m = draw(st.sampled_from([None, 36, 40, 46, 52]))
    if kind == "pae":
        cr3 = draw(st.integers(0, PAGES)) << 12 | draw(st.integers(0, 127)) << 5
        for k in range(4):               # the four PDPTEs at CR3[31:5], if inside memory
            if cr3 + 8 * k < len(buf):
                buf[cr3 + 8 * k:cr3 + 8 * k + 8] = draw(pdpt_entries).to_bytes(8, "little")
        # sometimes the PDPTE registers, which walks use instead of memory at CR3
        regs = draw(st.one_of(st.none(), st.tuples(*[pdpt_entries] * 4)), label="pdptes")
        cpu = CpuState(cr0=CR0, cr3=cr3, cr4=PAE, efer=NXE if nxe else 0, maxphyaddr=m,
                       pdptes=regs)
        return buf, cpu, [2, 9, 9]
    five = kind == "5-level"
    cpu = CpuState(cr0=CR0, cr3=draw(st.integers(0, PAGES)) << 12 | draw(st.integers(0, 0xFFF)),
                   cr4=PAE | (LA57 if five else 0), efer=LME | LMA | (NXE if nxe else 0),
                   maxphyaddr=m, page1gb=draw(st.sampled_from([None, False, True])))
    return buf, cpu, [9] * (5 if five else 4)


@st.composite
def addresses(draw, buf, cpu, bits):
    """Mostly addresses that follow the entries in memory: each index is, mostly, one of the
    slots used in the table the walk reaches there. Sign-extended in 4/5-level paging (mostly);
    sometimes any 64-bit or 33-bit value."""
    other = draw(st.integers(0, 5))
    if other == 4:
        return draw(st.integers(0, (1 << 64) - 1))
    if other == 5:
        return draw(st.integers(0, (1 << 33) - 1))
    size = buf.size
    frame = 0xFFFFF000 if size == 4 else 0x000FFFFFFFFFF000
    table = cpu.cr3 & (0xFFFFFFE0 if bits[0] == 2 else frame)
    va = 0
    for k, b in enumerate(bits):
        anywhere = st.integers(0, (1 << b) - 1)
        slots = [s for s in (buf.slots.get(table >> 12, []) if table % 4096 == 0 else [])
                 if s < 1 << b]     # a PAE PDPT has 4 slots, not the page's 512
        index = draw(st.one_of(st.sampled_from(slots), anywhere) if slots else anywhere)
        va = va << b | index
        at = table + index * size
        if k == 0 and cpu.pdptes is not None:         # the PDPTE registers, not memory
            table = cpu.pdptes[index] & frame
        else:
            table = int.from_bytes(buf[at:at + size], "little") & frame if at < len(buf) \
                else 1 << 40
    va = va << 12 | draw(st.integers(0, 0xFFF))
    va_bits = 12 + sum(bits)
    if va_bits > 32 and va >> (va_bits - 1) and draw(st.integers(0, 15)):
        va |= (1 << 64) - (1 << va_bits)
    return va


def scalar_answer(w):
    names = [s.name for s in w.mode.levels] if w.mode else []
    level = names.index(w.fault.level) if w.fault and w.fault.level else -1
    return (w.ok, w.pa or 0, w.page_size or 0, bool(w.writable), bool(w.user),
            bool(w.executable), w.fault.reason if w.fault else None, level)


def batch_answer(out, k):
    return (bool(out.ok[k]), int(out.pa[k]), int(out.page_size[k]), bool(out.writable[k]),
            bool(out.user[k]), bool(out.executable[k]), out.reason(k), int(out.fault_level[k]))


def check_batch(read, cpu, vas):
    """walk_array answers for each address what walk() answers, reading nothing twice."""
    before = len(getattr(read, "reads", ()))
    out = walk_array(read, cpu, np.array(vas, dtype=np.uint64))
    reads = getattr(read, "reads", [])[before:]
    assert len(set(reads)) == len(reads)
    assert len(out) == len(vas) and out.va.tolist() == list(vas)
    for k, va in enumerate(vas):
        w = walk(read, cpu, va)
        assert batch_answer(out, k) == scalar_answer(w), (hex(va), w.fault)
        if w.fault and "Page1GB=0" in w.fault.message:
            event("some element: PS in a PDPTE of a CPU without 1 GiB pages")
        if cpu.pdptes is not None and w.levels:
            event("some element walked with the PDPTE registers")
        assert out.level_name(k) == (w.fault.level if w.fault else None)
        assert (out.mode, out.root) == (w.mode, w.root)
    return out


def check_leaves(buf, cpu, start=0, end=None):
    """leaf_arrays equals iter_mappings: mappings, arrays, reads and unreadable reports."""
    want_seen, got_seen = [], []
    want_mem, got_mem = Reads(buf), Reads(buf)
    want = list(iter_mappings(want_mem, cpu, start, end,
                              on_unreadable=lambda lvl, a, e: want_seen.append((lvl, a))))
    got = leaf_arrays(got_mem, cpu, start, end,
                      on_unreadable=lambda lvl, a, e: got_seen.append((lvl, a, type(e))))
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
    assert [(lvl, a) for lvl, a, _ in got_seen] == want_seen
    assert all(t is MemoryReadError for _, _, t in got_seen)
    # each table read once, whole; the same tables as iter_mappings
    assert len(set(got_mem.reads)) == len(got_mem.reads)
    assert set(got_mem.reads) == set(want_mem.reads)
    assert got.mode == paging_mode(cpu)
    return want


# ---------------------------------------------------------------- properties

@SPACE
@given(data=st.data(), space=spaces())
def test_walk_array_matches_walk(data, space):
    buf, cpu, bits = space
    vas = data.draw(st.lists(addresses(buf, cpu, bits), min_size=1, max_size=48), label="vas")
    picky = data.draw(st.sets(st.integers(0, PAGES - 1), max_size=2), label="picky pages")
    out = check_batch(Reads(buf, picky), cpu, vas)
    for code in set(out.fault_reason.tolist()):
        event(f"some element: {FAULT_REASONS[code] or 'translated'}")
    for size in set(out.page_size[out.ok].tolist()):
        event(f"some element translated by a {size >> 10} KiB page")


@SPACE
@given(data=st.data(), space=spaces())
def test_leaf_arrays_matches_iter_mappings(data, space):
    buf, cpu, bits = space
    maps = check_leaves(buf, cpu)
    event("mappings: " + ("0" if not maps else "1-9" if len(maps) < 10 else "10+"))
    for size in {m.size for m in maps}:
        event(f"some leaf of {size >> 10} KiB")
    seen = []
    list(iter_mappings(Reads(buf), cpu, on_unreadable=lambda *a: seen.append(a)))
    event("unreadable tables: " + ("0" if not seen else "1" if len(seen) == 1 else "2+"))
    # sub-ranges: around leaf starts, in the non-canonical hole, anywhere
    edge = st.one_of(st.sampled_from([m.va for m in maps] or [0]).flatmap(
        lambda va: st.sampled_from([va, va + 1, va + 0x1000, va - 1, va + MIB2]).map(
            lambda a: a % (1 << 64))),
        st.integers(0, (1 << 64) - 1), st.sampled_from([0, 1 << 47, 1 << 56, 1 << 32]))
    start = data.draw(edge, label="start")
    end = data.draw(st.one_of(st.none(), edge), label="end")
    sub = check_leaves(buf, cpu, start, end)
    top = end if end is not None else 1 << 64
    assert sub == [m for m in maps if m.va < top and m.va + m.size > start and start < top]


PDPTES_1G = st.one_of(
    st.sampled_from([0, 0x3000 | P | RW | US]),                 # not present; a PD of 2 MiB
    st.builds(lambda frame, flags, extra: frame << 30 | P | PS | flags | extra,
              st.integers(0, 7), st.sampled_from([RW, US, RW | US, RW | US | NX]),
              # nothing, reserved 29:13, PAT (allowed), above MAXPHYADDR 46
              st.sampled_from([0, 0, 0, 1 << 13, 1 << 29, 1 << 12, 1 << 51])))


@SPACE
@given(pdptes=st.lists(PDPTES_1G, min_size=1, max_size=6), page1gb=st.sampled_from(
    [None, False, True]), five=st.booleans(), picks=st.lists(st.integers(0, 5), max_size=12))
def test_1g_pages_as_walk_says_whatever_page1gb(pdptes, page1gb, five, picks):
    """PDPTs full of 1 GiB leaves (valid, with bits 29:13 set, above MAXPHYADDR) and pointers
    to 2 MiB pages, under a CPU with, without, or not saying it has 1 GiB pages: the numpy
    twins answer and list exactly what walk() and iter_mappings() do."""
    mem = Mem(0x5000)
    top = 0x1000
    if five:
        mem.put(0x4000, 0x1000 | T)                                 # PML5 -> PML4
        top = 0x4000
    mem.put(0x1000, 0x2000 | T)                                     # PML4 -> PDPT
    for k, e in enumerate(pdptes):
        mem.put(0x2000 + 8 * k, e)
    mem.put(0x3000 + 8 * 5, 0x40000000 | P | RW | PS)                # the PD's 2 MiB page
    cpu = replace(cpu64(top, la57=five, maxphyaddr=46), page1gb=page1gb)
    check_leaves(mem.buf, cpu)
    vas = [k << 30 | 5 << 21 | 0x777 for k in picks] + [k << 30 for k in range(len(pdptes))]
    out = check_batch(mem, cpu, vas)
    for k in range(len(out)):
        w = walk(mem, cpu, vas[k])
        if w.fault and "Page1GB=0" in w.fault.message:
            event("PS in a PDPTE of a CPU without 1 GiB pages")
        elif w.ok and w.page_size == GIB1:
            event(f"1 GiB page, Page1GB {page1gb}")


# ---------------------------------------------------------------- plain cases

def test_empty_space():
    for cpu in (cpu64(), cpu64(la57=True), cpupae(), cpu32()):
        mem = Mem()
        la = leaf_arrays(mem, cpu)
        assert len(la) == 0 and list(la.mappings()) == []
        assert la.va.dtype == np.uint64 and la.writable.dtype == bool
        out = walk_array(mem, cpu, [0, 0x1234, 0xFFFFF000])
        assert out.ok.tolist() == [False] * 3
        assert out.fault_reason.tolist() == [FAULT_NOT_PRESENT] * 3
        assert out.fault_level.tolist() == [0] * 3
        assert out.pa.tolist() == [0] * 3 and out.page_size.tolist() == [0] * 3
    out = walk_array(Mem(), cpu64(), [])
    assert len(out) == 0 and out.va.dtype == np.uint64


def test_paging_disabled():
    cpu = CpuState(cr0=1, cr3=0x1000, cr4=0, efer=0)
    assert len(leaf_arrays(Mem(), cpu)) == 0
    out = walk_array(Mem(), cpu, [0x1234])
    assert out.reason(0) == "paging-disabled" and out.mode is None
    assert out.fault_level.tolist() == [-1]
    assert FAULT_REASONS[int(out.fault_reason[0])] == walk(Mem(), cpu, 0x1234).fault.reason


def test_one_1gib_page():
    mem = Mem()
    va = idx(0, 1, 0, 0, 0)
    chain(mem, va, 4, 1, 0x80000000, leaf_flags=P | RW)
    cpu = cpu64()
    la = leaf_arrays(mem, cpu)
    assert la.va.tolist() == [GIB1] and la.pa.tolist() == [0x80000000]
    assert la.size.tolist() == [GIB1] and la.level.tolist() == [1]
    assert la.entry.tolist() == [0x80000000 | P | RW | PS]
    assert (la.writable.tolist(), la.user.tolist(), la.executable.tolist()) == (
        [True], [False], [True])
    assert list(la.mappings()) == list(iter_mappings(mem, cpu))
    out = check_batch(mem, cpu, [GIB1 + 0x1234567, GIB1 - 1, 2 * GIB1, 1 << 47])
    assert out.pa.tolist()[0] == 0x81234567 and out.page_size.tolist()[0] == GIB1
    assert out.reason(1) == out.reason(2) == "not-present"
    assert out.reason(3) == "non-canonical" and out.fault_level.tolist()[3] == -1


@pytest.mark.parametrize("five", [False, True])
def test_upper_half_is_sign_extended(five):
    mem = Mem()
    levels = 5 if five else 4
    va = (1 << 64) - GIB1                 # the last 1 GiB: index 511 at every level
    chain(mem, va, levels, levels - 3, 0x40000000, leaf_flags=P | RW | NX)
    cpu = cpu64(la57=five)
    la = leaf_arrays(mem, cpu)
    assert la.va.tolist() == [va] and la.executable.tolist() == [False]
    assert list(la.mappings()) == list(iter_mappings(mem, cpu))
    assert len(leaf_arrays(mem, cpu, start=0, end=1 << 47)) == 0
    assert len(leaf_arrays(mem, cpu, start=va + GIB1 - 1)) == 1
    out = check_batch(mem, cpu, [va, va + 0x123, (1 << 64) - 1, va & ((1 << 48) - 1)])
    assert out.ok.tolist() == [True, True, True, False]


def test_unreadable_tables():
    mem = Mem()
    mem.put(0x1000 + 0 * 8, 0x40000000 | T)          # beyond memory, twice
    mem.put(0x1000 + 1 * 8, 0x40000000 | T)
    mem.put(0x1000 + 2 * 8, 0x2000 | T)
    mem.put(0x2000 + 0 * 8, 0x3000 | T)              # a PD in a hole
    mem.holes.add(0x3000)
    cpu = cpu64()
    seen = []
    la = leaf_arrays(mem, cpu, on_unreadable=lambda lvl, a, e: seen.append((lvl, a)))
    assert len(la) == 0 and seen == [("PDPT", 0x40000000), ("PD", 0x3000)]
    check_leaves(mem.buf, cpu)
    out = check_batch(mem, cpu, [idx(0, 0, 0, 0, 0), idx(1, 5, 0, 0, 0), idx(2, 0, 0, 0, 0)])
    assert out.fault_reason.tolist() == [FAULT_UNREADABLE] * 3
    assert out.fault_level.tolist() == [1, 1, 2]
    out = walk_array(Mem(), cpu64(cr3=0x40000000), [0, 1 << 40])
    assert [out.level_name(k) for k in range(2)] == ["PML4", "PML4"]


def test_tables_that_read_only_in_part_answer_as_walk():
    # a read_phys that refuses whole pages: walk_array falls back to the entries walk() reads
    mem = small_address_space()

    def entries_only(addr, length):
        if length > 8:
            raise MemoryReadError("too long", addr)
        return mem(addr, length)

    cpu = cpu64(maxphyaddr=40)
    vas = [m.va + 8 for m in iter_mappings(mem, cpu)] + [0x9000, 1 << 39, 0x1234]
    out = check_batch(entries_only, cpu, vas)
    assert out.ok.sum() == len(vas) - 2
    assert check_leaves(bytearray(), cpu) == []
    # and short reads are unreadable, as in walk()
    short = lambda addr, length: b"\x01"                          # noqa: E731
    out = check_batch(short, cpu, [0, 0x1000])
    assert out.reason(0) == "unreadable"
    assert len(leaf_arrays(short, cpu)) == 0


def test_small_space_and_ranges_match_iter_mappings():
    mem = small_address_space()
    cpu = cpu64(maxphyaddr=40)
    maps = check_leaves(mem.buf, cpu)
    assert len(maps) > 10
    check_leaves(mem.buf, cpu, 0x2000, 6 * MIB2)
    check_leaves(mem.buf, cpu, 3 * GIB1 + 0x1000, 4 * GIB1)
    check_leaves(mem.buf, cpu, 1 << 47)
    check_leaves(mem.buf, cpu, 0xFFFF800000000000, 0xFFFF800000000000 + (1 << 39))


def test_32bit_pse36_and_pae():
    mem = Mem()
    mem.put(0x1000 + 4 * 3, 0x2000 | P | RW | US, 4)
    mem.put(0x2000 + 4 * 7, 0x9000 | P, 4)
    mem.put(0x1000 + 4 * 4, 0x01000000 | P | PS | (0x5 << 13), 4)   # PSE-36: PA bits 34:32
    cpu = cpu32(maxphyaddr=40)
    la = leaf_arrays(mem, cpu)
    assert la.pa.tolist() == [0x9000, 0x5_01000000] and la.size.tolist() == [KIB4, MIB4]
    check_leaves(mem.buf, cpu)
    check_batch(mem, cpu, [(3 << 22) | (7 << 12) | 5, (4 << 22) | 0x3FFFFF, 5 << 22])
    mem = Mem()
    mem.put(0x1020 + 8 * 2, 0x3000 | P | 0x20)     # PDPTE with A (bit 5), as TCG leaves it
    mem.put(0x3000 + 8 * 1, 0x00600000 | P | RW | PS | NX)
    cpu = cpupae(cr3=0x1020)
    la = leaf_arrays(mem, cpu)
    assert la.va.tolist() == [(2 << 30) | (1 << 21)] and la.executable.tolist() == [False]
    check_leaves(mem.buf, cpu)
    check_batch(mem, cpu, [(2 << 30) | (1 << 21) | 77, 3 << 30, 1 << 32])


def test_input_forms():
    mem = small_address_space()
    cpu = cpu64(maxphyaddr=40)
    high = 0xFFFF800000000000
    a = walk_array(mem, cpu, [0x1000, high])
    b = walk_array(mem, cpu, np.array([0x1000, high], dtype=np.uint64))
    c = walk_array(mem, cpu, np.array([0x1000, 0x2000], dtype=np.int64))
    assert a.pa.tolist() == b.pa.tolist() == [0x7000, 0x40000000]
    assert c.pa.tolist() == [0x7000, 0x8000]
    with pytest.raises(ValueError):
        walk_array(mem, cpu, [-1])
    with pytest.raises(ValueError):
        walk_array(mem, cpu, [1 << 64])
    assert a.walk(1, mem, cpu) == walk(mem, cpu, high)
    assert a.walk(0, mem, cpu, "user-write") == walk(mem, cpu, 0x1000, "user-write")


def test_large_batch_reads_each_table_once():
    # four page tables of 4 KiB pages, a PD with 2 MiB pages around them
    mem = Mem(0x400000)
    mem.put(0x1000, 0x2000 | T)
    mem.put(0x2000, 0x3000 | T)
    for k in range(4):
        mem.put(0x3000 + 8 * k, (0x4000 + 0x1000 * k) | T)
        for j in range(512):
            mem.put(0x4000 + 0x1000 * k + 8 * j, (0x100000 + (k * 512 + j) * KIB4) | P | RW)
    for k in range(4, 64):
        mem.put(0x3000 + 8 * k, (k * MIB2) | P | US | PS)
    rng = np.random.default_rng(1)
    vas = rng.integers(0, 70 * MIB2, 200_000, dtype=np.uint64)
    out = walk_array(mem, cpu64(), vas)     # how fast: scripts/bench.py, never asserted here
    assert len(mem.reads) == 2 + 1 + 4                 # every table once
    assert out.ok.sum() == (vas < 64 * MIB2).sum()
    for k in rng.integers(0, len(vas), 300).tolist():
        assert batch_answer(out, k) == scalar_answer(walk(mem, cpu64(), int(vas[k])))
    la = leaf_arrays(mem, cpu64())
    assert len(la) == 4 * 512 + 60
    assert list(la.mappings()) == list(iter_mappings(mem, cpu64()))


# ---------------------------------------------------------------- second-level batches

@st.composite
def second_level_spaces(draw):
    """(memory, SlatSpec, MAXPHYADDR, Page1GB) of a random EPT or NPT, 4 or 5 levels; EPTPs
    mostly valid (WB or UC), sometimes not (reserved memory type, bits 11:8)."""
    ept = draw(st.booleans())
    # half the tables well formed (present, no reserved bit but PS now and then): deep walks
    clean = st.builds(lambda page, ps, low: page << 12 | ps | low, st.integers(0, PAGES - 1),
                      st.sampled_from([0, 0, 0, 0x80]),
                      st.sampled_from([7, 7, 7, 5, 7 | 6 << 3, 7 | 3 << 3]) if ept else
                      st.sampled_from([0x67, 0x65, 0x63, 0x67 | 1 << 63]))
    noisy = ept_entries if ept else entries8
    buf = draw_tables(draw, 8, SLOTS8, draw(st.sampled_from([clean, noisy])))
    five = draw(st.booleans())
    root = draw(st.integers(0, PAGES)) << 12
    if ept:
        low = draw(st.sampled_from([6, 6, 6, 0, 0, 6, 2, 6 | 1 << 8])) | (4 if five else 3) << 3
        spec = slat.SlatSpec("ept", root, 5 if five else 4, root | low | draw(st.booleans()) << 6)
    else:
        spec = slat.SlatSpec("npt", root, 5 if five else 4)
    return (buf, spec, draw(st.sampled_from([36, 46, 52, 52])),
            draw(st.sampled_from([None, False, True])))


@st.composite
def guest_physical(draw, buf, spec):
    """Mostly GPAs whose every index is a slot used in the table the walk reaches there, so
    that walks go deep; sometimes any index, or any address (beyond the table's bits too)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.integers(0, (1 << 64) - 1))
    table, gpa = spec.root, 0
    for _ in range(spec.depth):
        slots = buf.slots.get(table >> 12, []) if table < len(buf) else []
        index = draw(st.sampled_from(slots) if slots and draw(st.integers(0, 7))
                     else st.integers(0, 511))
        gpa = gpa << 9 | index
        at = table + index * 8
        table = int.from_bytes(buf[at:at + 8], "little") & 0x000FFFFFFFFFF000 \
            if at < len(buf) else 1 << 40
    return gpa << 12 | draw(st.integers(0, 0xFFF))


@settings(SPACE, max_examples=200 * SCALE)
@given(data=st.data(), space=second_level_spaces())
def test_second_level_batch_matches_the_scalar_walk(data, space):
    """slat.walk_batch answers for each GPA what slat.walk (walk_ept / walk_npt) answers:
    translated or not, where to, the page size, the fault and its level, every right."""
    buf, spec, m, page1gb = space
    gpas = data.draw(st.lists(guest_physical(buf, spec), min_size=1, max_size=48), label="gpas")
    read = Reads(buf)
    out = slat.walk_batch(read, spec, np.array(gpas, np.uint64), m, page1gb)
    assert len(set(read.reads)) == len(read.reads)          # each table read once
    for k, gpa in enumerate(gpas):
        w = slat.walk(read, spec, gpa, m, page1gb)
        answer = scalar_answer(w)
        if spec.format == "ept":   # no U/S: the four rights are EPT's own
            answer = answer[:4] + (False,) + answer[5:]
            if w.ok:
                assert [bool(r[k]) for r in out.ept_rights[:3]] == [
                    w.access[a].allowed for a in ("read", "write", "execute")]
        assert batch_answer(out, k) == answer, (hex(gpa), w.fault)
        assert out.level_name(k) == (w.fault.level if w.fault else None)
        event(f"some element: {w.fault.reason if w.fault else 'translated'}")
        if w.fault and w.fault.level and "memory type" in w.fault.message:
            event("some element: a leaf of a reserved memory type")
    assert (out.mode, out.root) == (w.mode, w.root)
