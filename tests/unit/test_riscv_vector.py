"""The RISC-V numpy walkers against the scalar ones: walk_array_riscv() must answer what
walk_riscv() answers (an S-mode read) for every address, and leaf_arrays_riscv() must list what
iter_mappings_riscv() lists, element by element.

Property tests draw table memory in 4 KiB slots with a few PTEs per table: pointers (now and
then with G, RSW or a bit reserved in a pointer), leaves of every level with random rights,
A/D, PBMT, misaligned frames, NAPOT runs (good and bad encodings), W-without-R, reserved bits
60:54, and noise; and states with every mode (Bare and reserved MODE values too), Svpbmt and
Svnapot known or not, menvcfg.PBMTE on, off or unknown, and either A/D scheme. Addresses mostly
follow the PTEs in memory, so that many walks go deep and many translate.
"""

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from .budget import examples

from qintrospect import paging
from qintrospect.commands import vmmap
from qintrospect.errors import MemoryReadError, UsageError
from qintrospect.paging.riscv import iter_mappings_riscv, walk_riscv
from qintrospect.paging.riscv_format import RiscvState, riscv_mode, satp_root
from qintrospect.paging.riscv_vector import (
    RiscvBatchWalk, RiscvLeafArrays, leaf_arrays_riscv, walk_array_riscv,
)
from qintrospect.paging.vector import FAULT_PAGING_DISABLED, FAULT_REASONS
from tests.unit.test_riscv_walk import (
    FRAME, LEAF, NAPOT, PBMT, PBMTE, ROOT, RSW, VA39, A, D, GL, M, Mem, R, U, V, W, X, build,
    pte, state,
)

TOP = 1 << 64
SLOTS = 16
MEMORY = SLOTS * 4096

SPACE = examples(200)   # tests/unit/budget.py: QI_FUZZ_SCALE draws more


class Reads:
    """Physical memory over a bytearray that remembers every read; reads beyond it fail, as
    do reads touching the pages of `holes`; pages in `picky` refuse reads longer than 8 bytes
    (whole tables) but give single PTEs."""

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

SLOT_ADDRS = st.integers(0, SLOTS - 1).map(lambda s: s * 4096)
# a pointer's extra bits: mostly none; G, RSW; bits reserved in a pointer now and then
POINTER_BITS = st.sampled_from([0] * 36 + [GL] * 4 + [RSW(3)] * 2
                               + [D, A, U, NAPOT, PBMT(1), 1 << 54])
RIGHTS = st.sampled_from([R, R | W, X, R | X, R | W | X] * 4 + [W, W | X])
LEAF_EXTRA = st.sampled_from([0] * 24 + [PBMT(1), PBMT(1), PBMT(2), PBMT(3), 1 << 58, RSW(1),
                                        NAPOT])
NOISE = st.one_of(st.sampled_from([0, R | W, 0x3FF & ~V]), st.integers(0, TOP - 1))
STATES_MODE = st.sampled_from([8] * 12 + [9] * 10 + [10] * 10 + [0, 11])


@st.composite
def states(draw):
    root = draw(st.sampled_from([k * 4096 for k in range(SLOTS)] * 2 + [1 << 40]))
    return RiscvState(
        satp=draw(STATES_MODE) << 60 | draw(st.sampled_from([0, 0x1234])) << 44 | root >> 12,
        priv=draw(st.sampled_from([0, 1, 1, 3])),
        mstatus=draw(st.sampled_from([0, 1 << 18, 1 << 19, 3 << 18])),
        menvcfg=draw(st.sampled_from([None, 0, PBMTE, PBMTE])),
        svpbmt=draw(st.sampled_from([None, True, True, False])),
        svnapot=draw(st.sampled_from([None, True, True, False])),
        hardware_ad=draw(st.sampled_from([None, True, False])))


@st.composite
def spaces(draw):
    """(memory, state): a state, and from its root a tree of tables in its mode (1 to 4 PTEs
    per table: pointers to fresh slots or, when the slots run out, to tables already there;
    leaves; NAPOT runs; noise), plus a few stray PTEs."""
    s = draw(states())
    buf = Buf(MEMORY)
    mode = riscv_mode(s)
    root = satp_root(s.satp)
    free = [k for k in range(SLOTS) if k * 4096 != root]
    made = [root]

    def put(addr, value):
        if 0 <= addr and addr + 8 <= MEMORY:
            buf[addr:addr + 8] = value.to_bytes(8, "little")

    def leaf(i):
        shift = mode.levels[i].shift
        size = 1 << shift
        frame = draw(st.integers(0, (1 << 44) - 1)) << 12
        if draw(st.integers(0, 5)):
            frame &= ~(size - 1)                      # mostly aligned superpages
        bits = V | draw(RIGHTS) | draw(st.sampled_from([0, U])) | draw(st.sampled_from(
            [A | D] * 4 + [0, A, D])) | draw(st.sampled_from([0, 0, GL])) | draw(LEAF_EXTRA)
        return frame | bits

    def grow(i, table):
        last = i == len(mode.levels) - 1
        for index in draw(st.lists(st.one_of(st.sampled_from([0, 1, 511]),
                                             st.integers(0, 511)),
                                   min_size=1, max_size=4, unique=True)):
            kind = draw(st.sampled_from(["leaf"] * 4 + ["napot"] * 2 + ["noise"] if last else
                                        ["table"] * 6 + ["leaf"] * 2 + ["noise"]))
            at = table + 8 * index
            if kind == "noise":
                put(at, draw(NOISE))
            elif kind == "leaf":
                put(at, leaf(i))
            elif kind == "napot":                     # 16 PTEs, mostly ppn[3:0] = 1000
                e = leaf(i) & ~(0xF << 10) | NAPOT | draw(st.sampled_from([8] * 5 + [0, 1, 4]
                                                                          )) << 10
                first = index & ~15
                for k in range(draw(st.sampled_from([16, 16, 3]))):
                    put(table + 8 * (first + k), e)
            elif free:
                nxt = free.pop(draw(st.integers(0, len(free) - 1))) * 4096
                made.append(nxt)
                put(at, pte(nxt, V | draw(POINTER_BITS)))
                grow(i + 1, nxt)
            else:                                     # shared tables, loops
                put(at, pte(draw(st.sampled_from(made)), V | draw(POINTER_BITS)))

    if mode is not None and root + 8 <= MEMORY:
        grow(0, root)
    for _ in range(draw(st.integers(0, 3), label="stray PTEs")):
        put(draw(SLOT_ADDRS) + 8 * draw(st.integers(0, 511)), draw(st.one_of(
            NOISE, SLOT_ADDRS.map(lambda a: pte(a, V)))))
    return buf, s


def read_pte(buf, addr):
    if addr < 0 or addr + 8 > len(buf):
        return None
    return int.from_bytes(buf[addr:addr + 8], "little")


@st.composite
def addresses(draw, buf, s):
    """Mostly addresses whose every index is one used in the table the walk reaches there
    (sign-extended); some any 64-bit value."""
    mode = riscv_mode(s)
    if mode is None or draw(st.integers(0, 11)) == 0:
        return draw(st.integers(0, TOP - 1))
    table, raw = satp_root(s.satp), 0
    for i, spec in enumerate(mode.levels):
        used = []
        if 0 <= table and table + 4096 <= len(buf):
            words = np.frombuffer(bytes(buf[table:table + 4096]), "<u8")
            used = np.flatnonzero(words).tolist()
        # (one_of would not weigh repeated strategies: it keeps one of each)
        index = draw(st.sampled_from(used) if used and draw(st.integers(0, 9))
                     else st.integers(0, 511))
        raw |= index << spec.shift
        e = read_pte(buf, table + 8 * index)
        if e is None or i == len(mode.levels) - 1 or e & (R | W | X) or not e & V:
            raw |= draw(st.integers(0, (1 << spec.shift) - 1))
            break
        table = (e >> 10 & ((1 << 44) - 1)) << 12
    n = mode.va_bits
    return raw + (TOP - (1 << n) if raw >> (n - 1) else 0)


# ---------------------------------------------------------------- the checks

def scalar_answer(w):
    return (w.ok, w.pa or 0, w.page_size or 0, bool(w.writable), bool(w.user),
            bool(w.executable), w.fault.reason if w.fault else None,
            w.fault.level if w.fault else None)


def batch_answer(out, k):
    return (bool(out.ok[k]), int(out.pa[k]), int(out.page_size[k]), bool(out.writable[k]),
            bool(out.user[k]), bool(out.executable[k]), out.reason(k), out.level_name(k))


def check_batch(read, s, vas):
    """walk_array_riscv answers for each address what walk_riscv answers, reading nothing
    twice; its entries and tables columns are the walk's steps."""
    before = len(read.reads)
    out = walk_array_riscv(read, s, np.array(vas, dtype=np.uint64))
    reads = read.reads[before:]
    assert len(set(reads)) == len(reads)
    assert isinstance(out, RiscvBatchWalk)
    assert len(out) == len(vas) and out.va.tolist() == list(vas)
    for k, va in enumerate(vas):
        w = walk_riscv(read, s, va)
        assert batch_answer(out, k) == scalar_answer(w), (hex(va), w.fault)
        assert (out.mode, out.root) == (w.mode, w.root)
        if w.mode is None:
            continue
        got = [(int(out.entries[k, j]), int(out.tables[k, j])) for j in range(len(w.levels))]
        assert got == [(st.entry, st.table_addr) for st in w.levels]
        if w.ok:
            assert out.leaf_level[k] == len(w.levels) - 1
        else:
            assert out.leaf_level[k] == -1
        # readable: the leaf's R bit (vmmap's readable), False where it did not translate
        assert out.readable[k] == bool(w.ok and w.levels[-1].entry & R)
    return out


def check_leaves(buf, s, start=0, end=None, holes=()):
    """leaf_arrays_riscv equals iter_mappings_riscv: mappings, arrays, reads and unreadable
    reports; and vmmap names the same flags."""
    want_seen, got_seen = [], []
    want_mem, got_mem = Reads(buf, holes), Reads(buf, holes)
    want = list(iter_mappings_riscv(want_mem, s, start, end,
                                    on_unreadable=lambda lvl, a, e: want_seen.append((lvl, a))))
    got = leaf_arrays_riscv(got_mem, s, start, end,
                            on_unreadable=lambda lvl, a, e: got_seen.append((lvl, a, type(e))))
    assert isinstance(got, RiscvLeafArrays)
    assert list(got.mappings()) == want
    assert got.va.tolist() == [m.va for m in want]
    assert got.pa.tolist() == [m.pa for m in want]
    assert got.size.tolist() == [m.size for m in want]
    assert got.entry.tolist() == [m.levels_entries[-1] for m in want]
    assert got.level.tolist() == [len(m.levels_entries) - 1 for m in want]
    assert (got.writable.tolist(), got.user.tolist(), got.executable.tolist()) == (
        [m.writable for m in want], [m.user for m in want], [m.executable for m in want])
    width = got.path.shape[1]
    assert got.path.tolist() == [list(m.levels_entries) + [0] * (width - len(m.levels_entries))
                                 for m in want]
    assert [(lvl, a) for lvl, a, _ in got_seen] == want_seen
    assert all(t is MemoryReadError for _, _, t in got_seen)
    assert len(set(got_mem.reads)) == len(got_mem.reads)          # each table read once
    assert set(got_mem.reads) == set(want_mem.reads)
    rows = vmmap.from_leaves(got)
    assert [r.flags for r in vmmap.iter_rows(rows, got.format)] == [m.flags for m in want]
    return want


# ---------------------------------------------------------------- properties

@SPACE
@given(data=st.data(), space=spaces())
def test_walk_array_matches_walk(data, space):
    buf, s = space
    vas = data.draw(st.lists(addresses(buf, s), min_size=8, max_size=30), label="vas")
    holes = data.draw(st.sets(st.integers(0, SLOTS - 1), max_size=2), label="holes")
    picky = data.draw(st.sets(st.integers(0, SLOTS - 1), max_size=3), label="picky")
    out = check_batch(Reads(buf, holes, picky), s, vas)
    for code in set(out.fault_reason.tolist()):
        event(f"some element: {FAULT_REASONS[code] or 'translated'}")
    for size in set(out.page_size[out.ok].tolist()):
        event(f"translated: a {size >> 10} KiB page")


@SPACE
@given(data=st.data(), space=spaces())
def test_leaf_arrays_matches_iter_mappings(data, space):
    buf, s = space
    holes = data.draw(st.sets(st.integers(0, SLOTS - 1), max_size=2), label="holes")
    maps = check_leaves(buf, s, holes=holes)
    event("mappings: " + ("0" if not maps else "1-9" if len(maps) < 10 else "10+"))
    for size in {m.size for m in maps}:
        event(f"some leaf of {size >> 10} KiB")
    edge = st.one_of(
        st.sampled_from([m.va for m in maps] or [0]).flatmap(
            lambda va: st.sampled_from([va, va + 1, va + 0x1000, va - 1, va + 2 * M]).map(
                lambda a: a % TOP)),
        st.integers(0, TOP - 1),
        st.sampled_from([0, 1 << 38, 1 << 47, 1 << 56, TOP - (1 << 38), TOP - (1 << 47),
                         TOP - 1]))
    start = data.draw(edge, label="start")
    end = data.draw(st.one_of(st.none(), edge), label="end")
    sub = check_leaves(buf, s, start, end, holes)
    top = end if end is not None else TOP
    assert sub == [m for m in maps if m.va < top and m.va + m.size > start and start < top]


# ---------------------------------------------------------------- plain cases

def test_dispatch_and_napot():
    mem = Mem()
    build(mem, VA39, pte(0x12348000, LEAF | NAPOT))
    build(mem, 1 << 30, pte(0x40000000, V | R | X | A | U), leaf_level=1)
    s = state()
    want = list(iter_mappings_riscv(mem, s))
    la = paging.leaf_arrays(mem, s)                       # the x86 entry point dispatches
    assert isinstance(la, RiscvLeafArrays) and list(la.mappings()) == want
    assert la.format.flag_bits >> 63 and la.mode.name == "sv39"
    vas = [VA39, 1 << 30 | 0x1234, 0, 1 << 40]
    out = paging.walk_array(mem, s, vas)
    assert isinstance(out, RiscvBatchWalk)
    assert out.ok.tolist() == [True, True, False, False]
    assert out.page_size.tolist()[:2] == [64 << 10, 2 * M]
    assert out.walk(0, mem, s) == walk_riscv(mem, s, VA39)
    assert out.walk(1, mem, s, "u-write") == walk_riscv(mem, s, vas[1], "u-write")
    check_batch(mem, s, vas)


def test_bare_mode_and_empty_batches():
    s = RiscvState(satp=0)
    out = walk_array_riscv(Mem(), s, [0, 0x1234, TOP - 1])
    assert out.ok.tolist() == [False] * 3
    assert out.fault_reason.tolist() == [FAULT_PAGING_DISABLED] * 3
    assert out.mode is None and [out.level_name(k) for k in range(3)] == [None] * 3
    la = leaf_arrays_riscv(Mem(), s)
    assert len(la) == 0 and list(la.mappings()) == [] and la.mode is None
    assert len(walk_array_riscv(Mem(), state(), [])) == 0
    assert len(leaf_arrays_riscv(Mem(), state())) == 0


@pytest.mark.parametrize("hardware_ad", [None, False])
def test_accessed_bit_fault_code(hardware_ad):
    mem = Mem()
    build(mem, VA39, pte(0x12345000, V | R))
    out = check_batch(mem, state(hardware_ad=hardware_ad), [VA39])
    assert out.reason(0) == (None if hardware_ad is None else "access-flag")


def test_large_batch_reads_each_table_once():
    """A Linux-like Sv39 space: 8 tables of 512 pages and 2 MiB kernel pages; 20,000
    addresses over both halves read each table once and agree with a sample of scalar walks."""
    mem = Mem()
    mem.put(ROOT, pte(0x81000000, V))
    mem.put(ROOT + 8 * 511, pte(0x82000000, V | GL))
    for k in range(8):
        l0 = 0x81100000 + k * 0x1000
        mem.put(0x81000000 + 8 * k, pte(l0, V))
        for j in range(512):
            mem.put(l0 + 8 * j, pte(0x10000000 + (k * 512 + j) * 4096, LEAF | U))
    for k in range(8, 64):
        mem.put(0x82000000 + 8 * k, pte(k << 21, V | R | X | A | GL))
    rng = np.random.default_rng(1)
    low = rng.integers(0, 16 * M * 10 // 9, 10_000, dtype=np.uint64)
    high = np.uint64(TOP - (1 << 30)) + rng.integers(0, 128 * M, 10_000, dtype=np.uint64)
    vas = np.concatenate((low, high))
    s = state()
    mem.reads.clear()
    out = walk_array_riscv(mem, s, vas)
    assert len(mem.reads) == len(set(mem.reads)) == 11
    assert out.ok.mean() > 0.8
    for k in rng.integers(0, len(vas), 300).tolist():
        assert batch_answer(out, k) == scalar_answer(walk_riscv(mem, s, int(vas[k])))
    la = leaf_arrays_riscv(mem, s)
    assert list(la.mappings()) == list(iter_mappings_riscv(mem, s))
    assert len(la) == 8 * 512 + 56


def test_scalar_dispatch():
    """paging.walk, iter_mappings, root_register, with_root, arch_of and require_x86 on a
    RISC-V state."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF))
    s = state(asid=3)
    assert paging.arch_of(s) == "riscv64"
    assert paging.walk(mem, s, VA39) == walk_riscv(mem, s, VA39, "s-read")
    assert paging.walk(mem, s, VA39, "u-write") == walk_riscv(mem, s, VA39, "u-write")
    assert list(paging.iter_mappings(mem, s)) == list(iter_mappings_riscv(mem, s))
    assert paging.root_register(s, VA39) == s.satp
    other = paging.with_root(s, 0x90000000)
    assert other.satp == 8 << 60 | 0x90000 and riscv_mode(other).name == "sv39"
    assert paging.with_root(s, 9 << 60 | 0x90000).satp == 9 << 60 | 0x90000
    with pytest.raises(UsageError, match="neither a satp value"):      # exit 2
        paging.with_root(s, 0x90000123)
    with pytest.raises(UsageError, match="this guest is riscv64"):
        paging.require_x86(s, "find-cr3")
    assert paging.arch_of(paging.CpuState(0x80000011, 0x1000, 0x20, 0x500)) == "x86_64"


@pytest.mark.parametrize("in_c", [True, False])
def test_brief_lines_say_readable(monkeypatch, in_c):
    """translate --brief on riscv64: every line that translates has readable (the leaf's R
    bit, between host and writable; false for an execute-only page), the lines made from the
    arrays are json_line(row_dict) byte for byte, and a fault's line has no readable."""
    import json
    import types
    from qintrospect.commands.batch import translate_batch
    from qintrospect.present import brieflines, rowlines
    from qintrospect.present.render import json_line
    if not in_c:
        monkeypatch.setattr(rowlines, "_rowformat", None)
    mem = Mem()
    l0 = ROOT + 0x2000
    mem.put(ROOT, pte(ROOT + 0x1000, V))
    mem.put(ROOT + 0x1000, pte(l0, V))
    rights = (V | X | A | U, V | R | X | A | U, LEAF | U, V | X | A)       # --x r-x rw- --x
    for j in range(512):
        if j % 7:                                   # every 7th page is not present
            mem.put(l0 + 8 * j, pte(0x90000000 + j * 4096, rights[j % 4]))
    s = state()
    ram = types.SimpleNamespace(start=0x90000000, end=0x901FFFFF, kind="ram", hva=None,
                                block="ram")
    session = types.SimpleNamespace(ram_map=types.SimpleNamespace(ram=[ram]), process=None,
                                    memory=types.SimpleNamespace(read=mem, name="test"),
                                    cpu_state=lambda cr3=None: s)
    # (a value that runs into the next page takes the one-address path: none here)
    session.translate = lambda va, cr3=None: types.SimpleNamespace(value=None)
    vas = np.random.default_rng(2).integers(0, 512 * 4096, 5000, dtype=np.uint64)
    b = translate_batch(session, vas)
    assert isinstance(b.walk_result, RiscvBatchWalk)
    got = [line for block in brieflines.brief_lines(b, size=512) for line in block]
    assert got == [(json_line(b.row_dict(i)) + "\n").encode() for i in range(len(b))]
    seen = set()
    for va, line in zip(vas.tolist(), got):
        d = json.loads(line)
        j = va >> 12
        if not j % 7:
            assert "fault" in d and "readable" not in d
            continue
        keys = list(d)
        assert keys[keys.index("host") + 1:keys.index("writable")] == ["readable"]
        assert d["readable"] == bool(rights[j % 4] & R)
        assert d["readable"] == bool(walk_riscv(mem, s, va).levels[-1].entry & R)
        seen.add((d["readable"], d["writable"], d["executable"]))
    assert seen == {(False, False, True), (True, False, True), (True, True, False)}
