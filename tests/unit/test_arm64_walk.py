"""The AArch64 stage 1 walker (qintrospect.paging.arm64) on tables built in memory here.

Every expected value is written from the Arm ARM (DDI 0487, chapter D8): the level geometry of
the translation process (which VA bits each level indexes, per granule and VA size), the
descriptor formats, the fault status codes of ESR_EL1 (0b0000LL address size, 0b0001LL
translation, 0b0010LL access flag, 0b0011LL permission; 0b101001 and 0b101011 at level -1),
the AP/APTable/XN rules of "Memory access control" (written out once below as `arm_rights`, not
taken from the code).
"""

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qintrospect.errors import MemoryReadError
from qintrospect.paging.arm64 import (
    ACCESS_FLAG, ADDRESS_SIZE, ARM64_ACCESS_KINDS, PERMISSION, TRANSLATION, Arm64State,
    arm64_mode, fault_status, iter_mappings_arm64, walk_arm64,
)
from qintrospect.paging.arm64_format import mair_name
from qintrospect.paging.model import PAGING_DISABLED, UNREADABLE

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
TOP = 1 << 64

# Descriptor fields ("Translation table descriptor formats").
INVALID = 0
BLOCK = 0b01            # bits[1:0] above the last level
TBL = 0b11              # table above the last level, page at it
NS, AF, NG = 1 << 5, 1 << 10, 1 << 11
GP, DBM, CONT, PXN, UXN = 1 << 50, 1 << 51, 1 << 52, 1 << 53, 1 << 54
PXNT, UXNT, NST = 1 << 59, 1 << 60, 1 << 63


def AP(x):
    return x << 6


def SH(x):
    return x << 8


def ATTR(i):
    return i << 2


def APT(x):
    return x << 61


LEAF = AF | SH(3) | ATTR(1)       # an ordinary accessed, inner-shareable, Normal WB leaf
LEAF_DS = AF | ATTR(1)            # the same with TCR_EL1.DS=1, where bits[9:8] are OA[51:50]

# TCR_EL1 (its register description).
TG0 = {"4k": 0b00, "64k": 0b01, "16k": 0b10}
TG1 = {"16k": 0b01, "4k": 0b10, "64k": 0b11}
GBITS = {"4k": 12, "16k": 14, "64k": 16}
SCTLR_M, SCTLR_WXN, SCTLR_SPAN, SCTLR_EE = 1, 1 << 19, 1 << 23, 1 << 25
SCTLR_EPAN = 1 << 57
PAN_BIT = 1 << 22
# MAIR: Attr0 Device-nGnRnE, Attr1 Normal WB RW-alloc, Attr2 Normal NC, Attr3 Device-nGnRE,
# Attr4 Normal WT RW-alloc
MAIR = 0x000000BB_0444FF00


def tcr(t0sz=16, t1sz=16, tg0="4k", tg1="4k", ips=0b101, *, epd0=False, epd1=False,
        tbi0=False, tbi1=False, tbid0=False, tbid1=False, ha=False, hd=False, hpd0=False,
        hpd1=False, ds=False, a1=False, as16=False, sh0=0b11, sh1=0b11, e0pd1=False):
    return (t0sz | epd0 << 7 | sh0 << 12 | TG0[tg0] << 14 | t1sz << 16 | a1 << 22 | epd1 << 23
            | sh1 << 28 | TG1[tg1] << 30 | ips << 32 | as16 << 36 | tbi0 << 37 | tbi1 << 38
            | ha << 39 | hd << 40 | hpd0 << 41 | hpd1 << 42 | tbid0 << 51 | tbid1 << 52
            | e0pd1 << 56 | ds << 59)


def mmfr0(parange=0b0101, tgran4=0b0000, tgran16=0b0001, tgran64=0b0000, asidbits=0b0010):
    return parange | asidbits << 4 | tgran16 << 20 | tgran64 << 24 | tgran4 << 28


def mmfr1(hafdbs=0, pan=1):
    return hafdbs | pan << 20


def mmfr2(varange=0, st=0, e0pd=0):
    return varange << 16 | st << 28 | e0pd << 60


ROOT0, ROOT1 = 0x100000, 0x200000


def state(tcr_value=None, ttbr0=ROOT0, ttbr1=ROOT1, *, sctlr=SCTLR_M, mair=MAIR,
          cpsr=0x3c5, mm0=mmfr0(), mm1=mmfr1(), mm2=mmfr2(st=1)):
    return Arm64State(ttbr0=ttbr0, ttbr1=ttbr1, tcr=tcr() if tcr_value is None else tcr_value,
                      sctlr=sctlr, mair=mair, cpsr=cpsr, id_aa64mmfr0=mm0, id_aa64mmfr1=mm1,
                      id_aa64mmfr2=mm2)


class Mem:
    """Sparse physical memory of 64-bit words (zero where nothing was put); reads in `holes`
    (page addresses) raise MemoryReadError. Remembers every read."""

    def __init__(self, big_endian=False):
        self.q = {}
        self.holes = set()
        self.reads = []
        self.order = "big" if big_endian else "little"

    def put(self, addr, value):
        self.q[addr] = value

    def __call__(self, addr, length):
        self.reads.append((addr, length))
        if (addr & ~0xFFF) in self.holes:
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        return b"".join(self.q.get(a, 0).to_bytes(8, self.order)
                        for a in range(addr, addr + length, 8))


# The translation process: per granule and VA size, each level's (level, lowest VA bit, index
# bits), root first.
GEOMETRY = {
    ("4k", 48): [(0, 39, 9), (1, 30, 9), (2, 21, 9), (3, 12, 9)],
    ("4k", 47): [(0, 39, 8), (1, 30, 9), (2, 21, 9), (3, 12, 9)],
    ("4k", 42): [(0, 39, 3), (1, 30, 9), (2, 21, 9), (3, 12, 9)],
    ("4k", 39): [(1, 30, 9), (2, 21, 9), (3, 12, 9)],
    ("4k", 52): [(-1, 48, 4), (0, 39, 9), (1, 30, 9), (2, 21, 9), (3, 12, 9)],
    ("16k", 48): [(0, 47, 1), (1, 36, 11), (2, 25, 11), (3, 14, 11)],
    ("16k", 47): [(1, 36, 11), (2, 25, 11), (3, 14, 11)],
    ("16k", 42): [(1, 36, 6), (2, 25, 11), (3, 14, 11)],
    ("16k", 39): [(1, 36, 3), (2, 25, 11), (3, 14, 11)],
    ("16k", 52): [(0, 47, 5), (1, 36, 11), (2, 25, 11), (3, 14, 11)],
    ("64k", 48): [(1, 42, 6), (2, 29, 13), (3, 16, 13)],
    ("64k", 47): [(1, 42, 5), (2, 29, 13), (3, 16, 13)],
    ("64k", 42): [(2, 29, 13), (3, 16, 13)],
    ("64k", 39): [(2, 29, 10), (3, 16, 13)],
    ("64k", 52): [(1, 42, 10), (2, 29, 13), (3, 16, 13)],
}
# The blocks each level may map (4K: L0 only with DS; 16K: L1 only with DS; 64K: L1 only
# with a 52-bit PA, FEAT_LPA).
BLOCKS = {"4k": {0: 512 * G, 1: G, 2: 2 * M}, "16k": {1: 64 * G, 2: 32 * M},
          "64k": {1: 4 * T, 2: 512 * M}}
LINUX = {2: ["pgd", "pte"], 3: ["pgd", "pmd", "pte"], 4: ["pgd", "pud", "pmd", "pte"],
         5: ["pgd", "p4d", "pud", "pmd", "pte"]}


def geometry_state(gran, va_bits, select=0, **kw):
    """A state whose `select` range uses gran/va_bits; 52 bits with DS (4K, 16K, FEAT_LPA2) or
    FEAT_LVA (64K), and PARange 52 so 52-bit output addresses are possible."""
    big = va_bits == 52
    t = tcr(t0sz=64 - va_bits if select == 0 else 16, t1sz=64 - va_bits if select else 16,
            tg0=gran if select == 0 else "4k", tg1=gran if select else "4k",
            ips=0b110 if big else 0b101, ds=big and gran != "64k", **kw)
    mm0 = mmfr0(parange=0b0110 if big else 0b0101, tgran4=0b0001 if big else 0,
                tgran16=0b0010 if big else 0b0001)
    return state(t, mm0=mm0, mm2=mmfr2(varange=1 if big else 0, st=1))


def build(mem, rows, va, frame, leaf_index=None, leaf=LEAF, table=0, extra=None,
          base=0x100000, step=0x10000):
    """Lay out one path for va from `rows` (GEOMETRY rows): the table of row k at
    base + k*step, each pointing at the next, the entry of row leaf_index (default: the last)
    mapping `frame` as a page (last level) or block. extra[k] is ORed into row k's entry.
    Returns the table addresses."""
    last = len(rows) - 1 if leaf_index is None else leaf_index
    tables = [base + k * step for k in range(last + 1)]
    for k in range(last + 1):
        _, shift, nbits = rows[k]
        i = (va >> shift) & ((1 << nbits) - 1)
        if k < last:
            e = tables[k + 1] | TBL | table
        else:
            e = frame | leaf | (TBL if k == len(rows) - 1 else BLOCK)
        e |= (extra or {}).get(k, 0)
        mem.put(tables[k] + 8 * i, e)
    return tables


def va_from(rows, indexes, offset=0):
    va = offset
    for (_, shift, _), i in zip(rows, indexes):
        va |= i << shift
    return va


def codes(w):
    return {k: (r.allowed, r.error_code) for k, r in w.access.items()}


R48 = GEOMETRY[("4k", 48)]
VA = va_from(R48, [3, 5, 7, 9], 0xABC)
FRAME = 0x12345000


# ------------------------------------------------------------------ modes and geometry

@pytest.mark.parametrize("gran, va_bits", sorted(GEOMETRY))
def test_mode_geometry(gran, va_bits):
    rows = GEOMETRY[(gran, va_bits)]
    for select in (0, 1):
        s = geometry_state(gran, va_bits, select)
        mode = arm64_mode(s, TOP - 1 if select else 0)
        assert mode.name == f"aarch64-{gran}-{va_bits}"
        assert mode.va_bits == va_bits and mode.entry_size == 8
        assert [(l.name, l.shift, l.index_bits) for l in mode.levels] == [
            (f"L{lv}", shift, nbits) for lv, shift, nbits in rows]
        assert [l.linux_name for l in mode.levels] == LINUX[len(rows)]
        big = va_bits == 52           # DS (4K/16K) or PARange 52 (64K) in geometry_state
        blocks = {lv: size for lv, size in BLOCKS[gran].items()
                  if not (lv == 0 and gran == "4k" or lv == 1 and gran != "4k") or big}
        assert [l.large_page for l in mode.levels] == [blocks.get(lv) for lv, _, _ in rows]


@pytest.mark.parametrize("gran, va_bits", sorted(GEOMETRY))
@pytest.mark.parametrize("select", [0, 1])
def test_walk_each_geometry(gran, va_bits, select):
    rows = GEOMETRY[(gran, va_bits)]
    g = GBITS[gran]
    raw = va_from(rows, [(k * 5 + 1) & ((1 << n) - 1) for k, (_, _, n) in enumerate(rows)],
                  0x123)
    va = raw + (TOP - (1 << va_bits) if select else 0)
    mem = Mem()
    root = ROOT1 if select else ROOT0
    frame = 0x4567 << g
    ds = va_bits == 52 and gran != "64k"
    tables = build(mem, rows, raw, frame, base=root, leaf=LEAF_DS if ds else LEAF)
    w = walk_arm64(mem, geometry_state(gran, va_bits, select), va)
    assert w.ok, w.fault
    assert w.pa == frame | 0x123 and w.page_size == 1 << g
    assert w.root == root and w.pcid is None
    assert [s.name for s in w.levels] == [f"L{lv}" for lv, _, _ in rows]
    assert [s.table_addr for s in w.levels] == tables
    assert [s.index for s in w.levels] == [(raw >> sh) & ((1 << n) - 1) for _, sh, n in rows]
    assert w.levels[-1].leaf and w.levels[-1].next_addr == frame
    assert w.maxphyaddr == (52 if va_bits == 52 else 48)
    assert codes(w) == {k: (True, None) for k in ARM64_ACCESS_KINDS} | {
        "el0-read": (False, 0x0F), "el0-write": (False, 0x0F), "el0-execute": (True, None),
        "el1-execute": (True, None)}


def test_first_table_read_size():
    # the walk reads one 8-byte descriptor per level
    mem = Mem()
    build(mem, R48, VA, FRAME)
    walk_arm64(mem, state(), VA)
    assert mem.reads == [(a, 8) for a, _ in mem.reads] and len(mem.reads) == 4


# ------------------------------------------------------------------ range selection

def two_ranges():
    mem = Mem()
    build(mem, R48, VA, FRAME)                                  # TTBR0 at 0x100000...
    build(mem, R48, VA, 0x777000, base=ROOT1)                   # TTBR1 at 0x200000...
    return mem


def test_ttbr0_and_ttbr1():
    mem = two_ranges()
    w0 = walk_arm64(mem, state(), VA)
    w1 = walk_arm64(mem, state(), VA | 0xFFFF << 48)
    assert w0.pa == FRAME | 0xABC and w0.root == ROOT0
    assert w1.pa == 0x777ABC and w1.root == ROOT1


def test_tbi_ignores_the_top_byte_and_bit_55_selects():
    mem = two_ranges()
    tagged = VA | 0x5A << 56
    w = walk_arm64(mem, state(tcr(tbi0=True)), tagged)
    assert w.ok and w.pa == FRAME | 0xABC
    assert any("top byte 0x5a ignored" in n for n in w.notes)
    # without TBI0 the top byte must be 0: a translation fault at level 0
    w = walk_arm64(mem, state(), tagged)
    assert w.fault.reason == TRANSLATION and w.fault.level == "L0" and w.fault.error_code == 0x04
    # with TBI1 the top byte of a TTBR1 address is free too
    w = walk_arm64(mem, state(tcr(tbi1=True)), VA | 0x12FF << 48)
    assert w.ok and w.pa == 0x777ABC
    # bit 55 selects TTBR1 even when the top byte is 0; with TBI1=0 bits 63:48 must be all 1
    w = walk_arm64(mem, state(tcr(tbi0=True)), VA | 0x00FF << 48)
    assert w.fault.error_code == 0x04 and "TTBR1_EL1" in w.fault.message


def test_tbid_keeps_the_top_byte_for_fetches():
    mem = two_ranges()
    tagged = VA | 0x5A << 56
    s = state(tcr(tbi0=True, tbid0=True))
    w = walk_arm64(mem, s, tagged)
    assert w.ok
    assert codes(w)["el1-execute"] == (False, 0x04) and codes(w)["el0-execute"] == (False, 0x04)
    assert codes(w)["el1-read"] == (True, None)
    w = walk_arm64(mem, s, tagged, access="el1-execute")
    assert w.fault.reason == TRANSLATION and w.fault.error_code == 0x04
    assert walk_arm64(mem, s, VA, access="el1-execute").ok     # untagged: fine


@pytest.mark.parametrize("select", [0, 1])
def test_out_of_range(select):
    # 39-bit ranges: TTBR0 covers [0, 2**39), TTBR1 [2**64 - 2**39, 2**64)
    s = state(tcr(t0sz=25, t1sz=25))
    rows = GEOMETRY[("4k", 39)]
    mem = Mem()
    inside = (1 << 39) - 0x1000
    build(mem, rows, inside, FRAME, base=ROOT1 if select else ROOT0)
    if select:
        good, bad = TOP - (1 << 39) + inside, TOP - (1 << 39) - 0x1000
    else:
        good, bad = inside, 1 << 39
    assert walk_arm64(mem, s, good).ok
    before = len(mem.reads)
    w = walk_arm64(mem, s, bad)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (TRANSLATION, "L0", 0x04)
    assert w.levels == () and len(mem.reads) == before
    assert all(not r.allowed and r.error_code == 0x04 for r in w.access.values())


def test_epd_disables_one_range():
    mem = two_ranges()
    for s, dead, alive in ((state(tcr(epd0=True)), VA, VA | 0xFFFF << 48),
                           (state(tcr(epd1=True)), VA | 0xFFFF << 48, VA)):
        w = walk_arm64(mem, s, dead)
        assert (w.fault.reason, w.fault.level, w.fault.error_code) == (TRANSLATION, "L0", 0x04)
        assert "EPD" in w.fault.message and w.levels == ()
        assert walk_arm64(mem, s, alive).ok


def test_e0pd_faults_el0_accesses_only():
    mem = two_ranges()
    kernel = VA | 0xFFFF << 48
    mem.put(ROOT1 + 0x30000 + 8 * 9, 0x777000 | LEAF | AP(1) | TBL)      # EL0 RW
    s = state(tcr(e0pd1=True), mm2=mmfr2(st=1, e0pd=1))
    w = walk_arm64(mem, s, kernel)
    assert w.ok and codes(w) == {"el1-read": (True, None), "el1-write": (True, None),
                                 "el1-execute": (False, 0x0F), "el0-read": (False, 0x04),
                                 "el0-write": (False, 0x04), "el0-execute": (False, 0x04)}
    w = walk_arm64(mem, s, kernel, access="el0-read")
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (TRANSLATION, "L0", 0x04)
    assert "E0PD1" in w.fault.message
    assert codes(walk_arm64(mem, s, VA))["el0-execute"] == (True, None)     # TTBR0: no E0PD0
    # without FEAT_E0PD the bit is RES0
    w = walk_arm64(mem, state(tcr(e0pd1=True), mm2=mmfr2(st=1, e0pd=0)), kernel)
    assert codes(w)["el0-read"] == (True, None)


# ------------------------------------------------------------------ descriptor kinds

@pytest.mark.parametrize("level_index, fsc", [(0, 0x04), (1, 0x05), (2, 0x06), (3, 0x07)])
def test_invalid_descriptor_at_each_level(level_index, fsc):
    mem = Mem()
    tables = build(mem, R48, VA, FRAME)
    _, shift, _ = R48[level_index]
    mem.put(tables[level_index] + 8 * ((VA >> shift) & 511), 0xFFFF_FFFF_FFFF_FFFE)  # bit 0 = 0
    w = walk_arm64(mem, state(), VA, access="el0-write")
    assert w.fault.reason == TRANSLATION and w.fault.error_code == fsc
    assert w.fault.level == f"L{level_index}" and len(w.levels) == level_index + 1
    assert w.levels[-1].flags == ("invalid",) and w.levels[-1].next_addr is None
    assert all(r.error_code == fsc for r in w.access.values())


def test_level_minus_one_faults_have_their_own_codes():
    rows = GEOMETRY[("4k", 52)]
    s = geometry_state("4k", 52)
    va = va_from(rows, [5, 1, 2, 3, 4])
    mem = Mem()
    w = walk_arm64(mem, s, va)                                  # L-1 descriptor 5: invalid
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (TRANSLATION, "L-1", 0b101011)
    build(mem, rows, va, 1 << 48, leaf_index=0)                 # a block at level -1: never
    w = walk_arm64(mem, s, va)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (TRANSLATION, "L-1", 0b101011)
    # a table at OA[51:50] = 0b11 (bits[9:8] with DS) is within 52 bits
    mem.put(ROOT0 + 8 * 5, 0b11 << 8 | 0x10000 | TBL)
    w = walk_arm64(mem, s, va)
    assert w.levels[0].next_addr == (3 << 50) | 0x10000 and w.fault.level == "L0"
    # ... and beyond a 48-bit output size: an address size fault at level -1
    s48 = state(tcr(t0sz=12, ips=0b101, ds=True), mm0=mmfr0(parange=0b0110, tgran4=1))
    w = walk_arm64(mem, s48, va)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (ADDRESS_SIZE, "L-1", 0b101001)
    assert any("QEMU 7.2 reads OA[51:48]" in n for n in w.notes)


def test_reserved_page_descriptor_at_level_3():
    mem = Mem()
    build(mem, R48, VA, FRAME, leaf=LEAF | AP(1))
    mem.put(0x100000 + 3 * 0x10000 + 8 * 9, FRAME | LEAF | BLOCK)   # bits[1:0] = 01 at L3
    w = walk_arm64(mem, state(), VA)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (TRANSLATION, "L3", 0x07)
    assert w.levels[-1].flags == ("reserved",)


@pytest.mark.parametrize("gran, va_bits, leaf_index, fsc, mm0", [
    ("4k", 48, 0, 0x04, mmfr0()),                    # 4K level 0 needs DS
    ("16k", 47, 0, 0x05, mmfr0()),                   # 16K level 1 needs DS
    ("64k", 48, 0, 0x05, mmfr0(parange=0b0101)),     # 64K level 1 needs PARange 52
    ("64k", 42, 1, 0x07, mmfr0()),                   # a "block" at level 3 is reserved
])
def test_block_where_the_granule_has_none(gran, va_bits, leaf_index, fsc, mm0):
    rows = GEOMETRY[(gran, va_bits)]
    va = va_from(rows, [1] * len(rows))
    mem = Mem()
    tables = build(mem, rows, va, 0, leaf_index=leaf_index)
    if leaf_index == len(rows) - 1:
        mem.put(tables[-1] + 8, LEAF | BLOCK)
    s = state(tcr(t0sz=64 - va_bits, tg0=gran), mm0=mm0)
    w = walk_arm64(mem, s, va)
    assert w.fault.reason == TRANSLATION and w.fault.error_code == fsc
    if leaf_index < len(rows) - 1:
        assert w.levels[-1].flags[0] == "block"
        assert any("QEMU 7.2 does not check the level of a block" in n for n in w.notes)


@pytest.mark.parametrize("gran, va_bits, leaf_index, size", [
    ("4k", 48, 1, G), ("4k", 48, 2, 2 * M), ("4k", 39, 0, G), ("4k", 52, 1, 512 * G),
    ("16k", 47, 1, 32 * M), ("16k", 52, 1, 64 * G),
    ("64k", 42, 0, 512 * M), ("64k", 52, 0, 4 * T),
])
def test_blocks_at_each_allowed_level(gran, va_bits, leaf_index, size):
    rows = GEOMETRY[(gran, va_bits)]
    offset = (size >> 1) + 0x5678                      # deep inside the block
    va = va_from(rows, [1] * (leaf_index + 1), offset)
    frame = 3 * size
    mem = Mem()
    ds = va_bits == 52 and gran != "64k"
    build(mem, rows, va, frame, leaf_index=leaf_index, leaf=LEAF_DS if ds else LEAF)
    w = walk_arm64(mem, geometry_state(gran, va_bits), va, access="el1-write")
    assert w.ok, w.fault
    assert w.page_size == size and w.pa == frame + offset
    assert w.levels[-1].flags[0] == "block" and w.levels[-1].page_size == size


# ------------------------------------------------------------------ 52-bit output addresses

def test_64k_lpa_output_address_in_bits_15_12():
    # FEAT_LPA: PARange 0b0110, IPS 0b110; OA[51:48] in bits[15:12] of table and page
    # descriptors, BADDR[51:48] in TTBR bits[5:2]
    rows = GEOMETRY[("64k", 42)]
    va = va_from(rows, [7, 9], 0x4321)
    root = (0xC << 48) | 0x30000
    l3 = (0xB << 48) | 0x50000
    ttbr = 0x30000 | 0xC << 2 | 1                           # CnP set: ignored
    mem = Mem()
    mem.put(root + 8 * 7, 0x50000 | 0xB << 12 | TBL)
    mem.put(l3 + 8 * 9, 0x1234_5678_0000 | 0xA << 12 | LEAF | TBL)
    s = state(tcr(t0sz=22, tg0="64k", ips=0b110), ttbr0=ttbr, mm0=mmfr0(parange=0b0110))
    w = walk_arm64(mem, s, va)
    assert w.ok, w.fault
    assert w.root == root and w.levels[1].table_addr == l3
    assert w.pa == 0x000A_1234_5678_4321 and w.maxphyaddr == 52


@pytest.mark.parametrize("gran", ["4k", "16k"])
def test_ds_output_address_in_bits_9_8(gran):
    rows = GEOMETRY[(gran, 48)]
    g = GBITS[gran]
    va = va_from(rows, [1] * len(rows), 0x321)
    mem = Mem()
    tables = build(mem, rows, va, 0)
    # OA[51:50] = bits[9:8] = 0b11, OA[49:48] = bits[49:48] = 0b10
    leaf = (0b10 << 48) | (0x77 << g) | 0b11 << 8 | AF | ATTR(1) | TBL
    mem.put(tables[-1] + 8, leaf)
    s = state(tcr(tg0=gran, ips=0b110, ds=True, sh0=0b10),
              mm0=mmfr0(parange=0b0110, tgran4=1, tgran16=2))
    w = walk_arm64(mem, s, va)
    assert w.ok, w.fault
    assert w.pa == 0x000E_0000_0000_0000 | (0x77 << g) | 0x321
    assert "SH=outer" in w.levels[-1].flags         # SH comes from TCR_EL1.SH0 with DS


def test_ds_is_ignored_without_lpa2():
    mem = Mem()
    build(mem, R48, VA, FRAME | 0b11 << 8)          # bits[9:8] are SH here
    s = state(tcr(ips=0b110, ds=True), mm0=mmfr0(parange=0b0110, tgran4=0))
    w = walk_arm64(mem, s, VA)
    assert w.ok and w.pa == FRAME | 0xABC and w.maxphyaddr == 48
    assert "SH=inner" in w.levels[-1].flags
    assert any("DS=1 ignored" in n for n in w.notes)


# ------------------------------------------------------------------ address size faults

def test_address_size_faults():
    s40 = state(tcr(ips=0b010))                     # 40-bit output addresses
    mem = Mem()
    tables = build(mem, R48, VA, FRAME)
    assert walk_arm64(mem, s40, VA).maxphyaddr == 40
    # a table descriptor beyond 40 bits: address size fault at its own level
    mem.put(tables[1] + 8 * 5, (1 << 40) | TBL)
    w = walk_arm64(mem, s40, VA)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (ADDRESS_SIZE, "L1", 0x01)
    assert len(w.levels) == 2 and w.levels[-1].next_addr == 1 << 40
    # a leaf beyond it
    build(mem, R48, VA, 1 << 41)
    w = walk_arm64(mem, s40, VA, access="el0-execute")
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (ADDRESS_SIZE, "L3", 0x03)
    # the TTBR beyond it: level 0
    w = walk_arm64(mem, state(tcr(ips=0b010), ttbr0=1 << 42), VA)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (ADDRESS_SIZE, "L0", 0x00)
    assert w.levels == ()
    # PARange below IPS wins: 36 bits
    build(mem, R48, VA, 1 << 37)
    w = walk_arm64(mem, state(mm0=mmfr0(parange=0b0001)), VA)
    assert w.fault.reason == ADDRESS_SIZE and w.maxphyaddr == 36
    # a 2 MiB block beyond it
    build(mem, R48, VA, 1 << 45, leaf_index=2)
    w = walk_arm64(mem, s40, VA)
    assert (w.fault.reason, w.fault.error_code) == (ADDRESS_SIZE, 0x02)


def test_parange_unknown_is_assumed_48():
    mem = Mem()
    build(mem, R48, VA, FRAME)
    w = walk_arm64(mem, state(tcr(ips=0b110), mm0=None), VA)
    assert w.ok and w.assumed_maxphyaddr and w.maxphyaddr == 48
    assert any("PARange assumed 48" in n for n in w.notes)
    assert not walk_arm64(mem, state(), VA).assumed_maxphyaddr


# ------------------------------------------------------------------ access flag

@pytest.mark.parametrize("leaf_index, fsc", [(3, 0x0B), (2, 0x0A), (1, 0x09)])
def test_access_flag_fault(leaf_index, fsc):
    mem = Mem()
    build(mem, R48, VA, FRAME if leaf_index == 3 else 0, leaf_index=leaf_index,
          leaf=SH(3) | ATTR(1))
    w = walk_arm64(mem, state(), VA, access="el0-read")
    assert (w.fault.reason, w.fault.error_code) == (ACCESS_FLAG, fsc)
    assert w.pa is None and len(w.levels) == leaf_index + 1
    assert all(r.error_code == fsc for r in w.access.values())


def test_access_flag_fault_at_level_0():
    rows = GEOMETRY[("4k", 52)]
    va = va_from(rows, [0, 1])
    mem = Mem()
    build(mem, rows, va, 0, leaf_index=1, leaf=ATTR(1))
    w = walk_arm64(mem, geometry_state("4k", 52), va)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (ACCESS_FLAG, "L0", 0x08)


def test_hardware_access_flag():
    mem = Mem()
    build(mem, R48, VA, FRAME, leaf=SH(3) | ATTR(1))
    w = walk_arm64(mem, state(tcr(ha=True), mm1=mmfr1(hafdbs=1)), VA)
    assert w.ok and any("sets it on this access" in n for n in w.notes)
    # HA without FEAT_HAFDBS does nothing
    w = walk_arm64(mem, state(tcr(ha=True), mm1=mmfr1(hafdbs=0)), VA)
    assert w.fault.reason == ACCESS_FLAG
    # unknown: taken at face value, said so
    w = walk_arm64(mem, state(tcr(ha=True), mm1=None), VA)
    assert w.ok and any("FEAT_HAFDBS assumed" in n for n in w.notes)


# ------------------------------------------------------------------ permissions

# Data access permissions: AP[2:1] -> EL1 and EL0 data access.
AP_TABLE = {0b00: ("RW", "none"), 0b01: ("RW", "RW"), 0b10: ("RO", "none"), 0b11: ("RO", "RO")}


def arm_rights(ap, aptable=0, pxn=0, uxn=0, pxnt=0, uxnt=0, hpd=False, pan=False, wxn=False):
    """The Arm ARM's rules, one sentence each:
    - APTable (hierarchical permissions): bit 0 set: no EL0 access below; bit 1 set: no write access
      below, at any EL; PXNTable/UXNTable make everything below PXN/UXN. HPD=1 ignores all three.
    - instruction execution permissions: EL1 cannot execute a location EL0 can write; EL0
      execution depends on UXN only (no EL0 read permission needed).
    - SCTLR_EL1.WXN: a location writable at an EL is execute-never at that EL.
    - PSTATE.PAN=1: EL1 data accesses to locations EL0 can access fault; fetches unaffected."""
    el1, el0 = AP_TABLE[ap]
    r = {"el1-read": True, "el1-write": el1 == "RW", "el0-read": el0 != "none",
         "el0-write": el0 == "RW"}
    if not hpd:
        if aptable & 1:
            r["el0-read"] = r["el0-write"] = False
        if aptable & 2:
            r["el1-write"] = r["el0-write"] = False
        pxn, uxn = pxn or pxnt, uxn or uxnt
    r["el1-execute"] = not pxn and not r["el0-write"] and not (wxn and r["el1-write"])
    r["el0-execute"] = not uxn and not (wxn and r["el0-write"])
    if pan and r["el0-read"]:
        r["el1-read"] = r["el1-write"] = False
    return r


def perm_walk(mem, ap, aptable, pxn, uxn, pxnt, uxnt, hpd, pan, wxn, leaf_index=3):
    build(mem, R48, VA, FRAME if leaf_index == 3 else 0, leaf_index=leaf_index,
          leaf=LEAF | AP(ap) | (PXN if pxn else 0) | (UXN if uxn else 0),
          table=APT(aptable) | (PXNT if pxnt else 0) | (UXNT if uxnt else 0))
    s = state(tcr(hpd0=hpd), sctlr=SCTLR_M | (SCTLR_WXN if wxn else 0),
              cpsr=0x3c5 | (PAN_BIT if pan else 0))
    return walk_arm64(mem, s, VA)


@pytest.mark.parametrize("ap", [0, 1, 2, 3])
@pytest.mark.parametrize("hpd", [False, True])
def test_permission_matrix(ap, hpd):
    mem = Mem()
    for aptable in range(4):
        for pxn, uxn, pxnt, uxnt, pan, wxn in ((a >> 5 & 1, a >> 4 & 1, a >> 3 & 1, a >> 2 & 1,
                                                a >> 1 & 1, a & 1) for a in range(64)):
            w = perm_walk(mem, ap, aptable, pxn, uxn, pxnt, uxnt, hpd, pan, wxn)
            want = arm_rights(ap, aptable, pxn, uxn, pxnt, uxnt, hpd, pan, wxn)
            got = {k: r.allowed for k, r in w.access.items()}
            assert got == want, (ap, aptable, pxn, uxn, pxnt, uxnt, hpd, pan, wxn)
            for k, r in w.access.items():
                assert r.error_code == (None if r.allowed else 0x0F)
                assert bool(r.reason) != r.allowed
            assert w.user == want["el0-read"]
            plain = arm_rights(ap, aptable, pxn, uxn, pxnt, uxnt, hpd, False, wxn)
            assert w.writable == (plain["el1-write"] or plain["el0-write"])   # PAN aside
            owner = "el0" if want["el0-read"] or want["el0-execute"] else "el1"
            assert w.executable == want[f"{owner}-execute"]


def test_permission_spot_checks():
    mem = Mem()
    # AP=00: EL1 only
    w = perm_walk(mem, 0b00, 0, 0, 1, 0, 0, False, False, False)
    assert codes(w) == {"el1-read": (True, None), "el1-write": (True, None),
                        "el1-execute": (True, None), "el0-read": (False, 0x0F),
                        "el0-write": (False, 0x0F), "el0-execute": (False, 0x0F)}
    assert w.access["el0-read"].reason == "permission fault: EL0 has no access: AP=00 in the " \
                                          "L3 descriptor"
    assert w.access["el0-execute"].reason == "permission fault: UXN=1 in the L3 descriptor"
    # AP=01 with PAN: EL1 data accesses fault, and EL1 never executes EL0-writable memory
    w = perm_walk(mem, 0b01, 0, 0, 0, 0, 0, False, True, False)
    assert codes(w)["el1-read"] == (False, 0x0F) and "PAN" in w.access["el1-read"].reason
    assert codes(w)["el1-execute"] == (False, 0x0F)
    assert "EL0 may write this page" in w.access["el1-execute"].reason
    assert codes(w)["el0-write"] == (True, None)
    # EL0 fetches need no EL0 read permission: AP=00, UXN=0 executes at EL0
    w = perm_walk(mem, 0b00, 0, 1, 0, 0, 0, False, False, False)
    assert codes(w)["el0-execute"] == (True, None) and codes(w)["el0-read"] == (False, 0x0F)
    assert w.executable                    # an execute-only user page
    # APTable=01 (no EL0 below) named at the first level that sets it
    w = perm_walk(mem, 0b01, 0b01, 0, 0, 0, 0, False, False, False)
    assert w.access["el0-read"].reason == ("permission fault: APTable[0]=1 in the L0 "
                                           "descriptor: no EL0 access below it")
    assert w.levels[0].flags == ("table", "APTable=01")
    # WXN: EL1-writable memory does not execute at EL1
    w = perm_walk(mem, 0b00, 0, 0, 1, 0, 0, False, False, True)
    assert w.access["el1-execute"].reason == ("permission fault: SCTLR_EL1.WXN=1 and EL1 may "
                                              "write this page")
    # PXNTable
    w = perm_walk(mem, 0b10, 0, 0, 1, 1, 0, False, False, False)
    assert w.access["el1-execute"].reason == "permission fault: PXNTable=1 in the L0 descriptor"


@pytest.mark.parametrize("leaf_index, fsc", [(3, 0x0F), (2, 0x0E), (1, 0x0D)])
def test_permission_fault_codes_by_level(leaf_index, fsc):
    w = perm_walk(Mem(), 0b11, 0, 1, 1, 0, 0, False, False, False, leaf_index=leaf_index)
    assert codes(w) == {"el1-read": (True, None), "el1-write": (False, fsc),
                        "el1-execute": (False, fsc), "el0-read": (True, None),
                        "el0-write": (False, fsc), "el0-execute": (False, fsc)}


def test_pan_when_stopped_at_el0():
    mem = Mem()
    build(mem, R48, VA, FRAME, leaf=LEAF | AP(1) | PXN)
    # at EL0 with SCTLR_EL1.SPAN=0 an exception to EL1 sets PAN: EL1 data accesses fault
    w = walk_arm64(mem, state(cpsr=0x0), VA)
    assert codes(w)["el1-read"] == (False, 0x0F)
    assert any("the CPU is at EL0" in n for n in w.notes)
    # SPAN=1 keeps the current PAN (0 here)
    w = walk_arm64(mem, state(cpsr=0x0, sctlr=SCTLR_M | SCTLR_SPAN), VA)
    assert codes(w)["el1-read"] == (True, None)
    # no FEAT_PAN: PSTATE.PAN means nothing
    w = walk_arm64(mem, state(cpsr=0x3c5 | PAN_BIT, mm1=mmfr1(pan=0)), VA)
    assert codes(w)["el1-read"] == (True, None)


def test_pan3_covers_execute_only_user_pages():
    mem = Mem()
    build(mem, R48, VA, FRAME, leaf=LEAF | AP(0b10) | PXN)     # EL1 RO, EL0 execute-only
    pan = 0x3c5 | PAN_BIT
    w = walk_arm64(mem, state(cpsr=pan, mm1=mmfr1(pan=3)), VA)
    assert codes(w)["el1-read"] == (True, None)               # EPAN=0: plain PAN
    w = walk_arm64(mem, state(cpsr=pan, mm1=mmfr1(pan=3), sctlr=SCTLR_M | SCTLR_EPAN), VA)
    assert codes(w)["el1-read"] == (False, 0x0F)


def test_dirty_bit_modifier():
    mem = Mem()
    tables = build(mem, R48, VA, FRAME, leaf=LEAF | AP(0b11) | DBM)   # writable-clean
    hd = tcr(ha=True, hd=True)
    w = walk_arm64(mem, state(hd, mm1=mmfr1(hafdbs=2)), VA)
    assert codes(w)["el0-write"] == (True, None) and codes(w)["el1-write"] == (True, None)
    assert w.writable and any("writable-clean" in n for n in w.notes)
    # the fetch side still sees AP[2]=1: EL0 cannot write it yet, so EL1 may execute
    assert codes(w)["el1-execute"] == (True, None)
    # HAFDBS=1 (AF only): the write faults, and the reason says why DBM did not help
    w = walk_arm64(mem, state(hd, mm1=mmfr1(hafdbs=1)), VA)
    assert codes(w)["el0-write"] == (False, 0x0F) and "DBM=1" in w.access["el0-write"].reason
    assert not w.writable
    # APTable[1] still forbids the write
    mem.put(tables[0] + 8 * 3, tables[1] | TBL | APT(0b10))
    w = walk_arm64(mem, state(hd, mm1=mmfr1(hafdbs=2)), VA)
    assert codes(w)["el1-write"] == (False, 0x0F) and "APTable[1]" in w.access["el1-write"].reason


# ------------------------------------------------------------------ register decoding

def test_mmu_off():
    mem = Mem()
    s = state(sctlr=0)
    w = walk_arm64(mem, s, VA, access="el0-write")
    assert w.fault.reason == PAGING_DISABLED and w.fault.level is None
    assert w.mode is None and arm64_mode(s, VA) is None and mem.reads == []
    assert not any(r.allowed for r in w.access.values())
    assert list(iter_mappings_arm64(mem, s)) == []


def test_txsz_out_of_bounds_faults_like_qemu():
    mem = Mem()
    build(mem, R48, VA, FRAME)
    s = state(tcr(t0sz=10))                   # below 16 with 4K and no DS
    w = walk_arm64(mem, s, VA)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (TRANSLATION, "L0", 0x04)
    assert "QEMU 7.2 faults" in w.fault.message
    assert arm64_mode(s, VA).name == "aarch64-4k-48" and w.mode.name == "aarch64-4k-48"
    assert any("clamped to 16" in n for n in w.notes)
    assert list(iter_mappings_arm64(mem, s, 0, 1 << 48)) == []
    # above the maximum: 39 without FEAT_TTST, 48 with it
    assert walk_arm64(mem, state(tcr(t0sz=45), mm2=mmfr2(st=0)), 0x1000).fault.error_code == 4
    rows = [(3, 12, 7)]                       # T0SZ=45: 19-bit VAs, one level (L3)
    m2 = Mem()
    build(m2, rows, 0x7F123, 0x99000)
    w = walk_arm64(m2, state(tcr(t0sz=45), mm2=mmfr2(st=1)), 0x7F123)
    assert w.ok and w.pa == 0x99123 and [s.name for s in w.levels] == ["L3"]
    assert w.levels[0].linux_name == "pte"


@pytest.mark.parametrize("t, mm0, select, name, why", [
    (tcr(tg0="4k") | 0b11 << 14, mmfr0(), 0, "aarch64-4k-48", "reserved"),
    (tcr() & ~(0b11 << 30), mmfr0(), 1, "aarch64-4k-48", "reserved"),
    (tcr(tg0="16k"), mmfr0(tgran16=0), 0, "aarch64-4k-48", "not implemented"),
    (tcr(tg0="64k"), mmfr0(tgran64=0xF), 0, "aarch64-4k-48", "not implemented"),
    (tcr(tg1="16k"), mmfr0(), 1, "aarch64-16k-48", None),
    (tcr(tg1="64k"), mmfr0(), 1, "aarch64-64k-48", None),
])
def test_granule_encodings(t, mm0, select, name, why):
    s = state(t, mm0=mm0)
    va = TOP - 0x1000 if select else 0x1000
    assert arm64_mode(s, va).name == name
    notes = walk_arm64(Mem(), s, va).notes
    assert any(why in n and "TG" in n for n in notes) if why else not any("TG" in n for n in notes)


def test_big_endian_descriptors():
    mem = Mem(big_endian=True)
    build(mem, R48, VA, FRAME)
    w = walk_arm64(mem, state(sctlr=SCTLR_M | SCTLR_EE), VA)
    assert w.ok and w.pa == FRAME | 0xABC and any("big-endian" in n for n in w.notes)
    maps = list(iter_mappings_arm64(mem, state(sctlr=SCTLR_M | SCTLR_EE)))
    assert [(m.va, m.pa) for m in maps] == [(VA & ~0xFFF, FRAME)]


def test_asid_note():
    mem = Mem()
    build(mem, R48, VA, FRAME, leaf=LEAF | NG)
    w = walk_arm64(mem, state(ttbr0=0x3412 << 48 | ROOT0, ttbr1=0xBEEF << 48 | ROOT1), VA)
    assert "ASID 0x12 (TTBR0_EL1[55:48]" in " ".join(w.notes) and w.pcid is None
    w = walk_arm64(mem, state(tcr(as16=True), ttbr0=0x3412 << 48 | ROOT0), VA)
    assert "ASID 0x3412" in " ".join(w.notes)
    w = walk_arm64(mem, state(tcr(a1=True, as16=True), ttbr1=0xBEEF << 48 | ROOT1), VA)
    assert "ASID 0xbeef (TTBR1_EL1[63:48]" in " ".join(w.notes)
    build(mem, R48, VA, FRAME)                                 # nG=0: global
    assert "global" in " ".join(walk_arm64(mem, state(), VA).notes)


@pytest.mark.parametrize("gran, va_bits, n, run", [
    ("4k", 48, 16, 64 * K), ("16k", 47, 128, 2 * M), ("64k", 42, 32, 2 * M)])
def test_contiguous_hint(gran, va_bits, n, run):
    rows = GEOMETRY[(gran, va_bits)]
    va = va_from(rows, [1] * len(rows), 0x10)
    mem = Mem()
    build(mem, rows, va, 0x40 << GBITS[gran], leaf=LEAF | CONT)
    w = walk_arm64(mem, geometry_state(gran, va_bits), va)
    assert w.ok and w.page_size == 1 << GBITS[gran] and "Cont" in w.levels[-1].flags
    note = next(x for x in w.notes if x.startswith("contiguous hint"))
    lo = va & ~(run - 1)
    assert f"{n}-entry run" in note and f"VA {lo:#x}-{lo + run - 1:#x}" in note


def test_flags():
    mem = Mem()
    leaf = AF | NG | AP(1) | SH(3) | ATTR(1) | PXN | UXN | CONT | TBL
    tables = build(mem, R48, VA, FRAME, leaf=leaf - TBL, table=PXNT | UXNT | APT(2) | NST)
    w = walk_arm64(mem, state(), VA)
    assert w.levels[-1].flags == ("page", "AF", "nG", "AP=01", "SH=inner",
                                  "Attr1=Normal WB RW-alloc", "PXN", "UXN", "Cont")
    assert w.levels[0].flags == ("table", "PXNTable", "UXNTable", "APTable=10", "NSTable")
    assert w.levels[0].next_addr == tables[1] and not w.levels[0].leaf
    # HPD: bits 62:59 are not permissions, NSTable still is
    w = walk_arm64(mem, state(tcr(hpd0=True)), VA)
    assert w.levels[0].flags == ("table", "NSTable")
    build(mem, R48, VA, FRAME, leaf=AF | SH(2) | ATTR(0) | NS | GP | DBM | AP(3), leaf_index=2)
    w = walk_arm64(mem, state(), VA)
    assert w.levels[-1].flags == ("block", "AF", "AP=11", "SH=outer", "Attr0=Device-nGnRnE",
                                  "NS", "GP", "DBM")
    assert any("Device memory" in n for n in w.notes)


@pytest.mark.parametrize("attr, name", [
    (0x00, "Device-nGnRnE"), (0x04, "Device-nGnRE"), (0x08, "Device-nGRE"), (0x0C, "Device-GRE"),
    (0x44, "Normal NC"), (0xFF, "Normal WB RW-alloc"), (0xBB, "Normal WT RW-alloc"),
    (0xEE, "Normal WB R-alloc"), (0xAA, "Normal WT R-alloc"),
    (0x77, "Normal WB RW-alloc transient"),
    (0x4F, "Normal inner WB RW-alloc, outer NC"), (0xF0, "Normal Tagged WB RW-alloc"),
    (0xCC, "Normal WB no-alloc"), (0x30, "reserved 0x30"),
])
def test_mair_names(attr, name):
    assert mair_name(attr) == name


def test_fault_status_codes():
    # ESR_ELx ISS, DFSC/IFSC
    assert [fault_status(ADDRESS_SIZE, lv) for lv in (-1, 0, 1, 2, 3)] == [
        0b101001, 0b000000, 0b000001, 0b000010, 0b000011]
    assert [fault_status(TRANSLATION, lv) for lv in (-1, 0, 1, 2, 3)] == [
        0b101011, 0b000100, 0b000101, 0b000110, 0b000111]
    assert [fault_status(ACCESS_FLAG, lv) for lv in (0, 1, 2, 3)] == [
        0b001000, 0b001001, 0b001010, 0b001011]
    assert [fault_status(PERMISSION, lv) for lv in (0, 1, 2, 3)] == [
        0b001100, 0b001101, 0b001110, 0b001111]
    assert fault_status(UNREADABLE, 1) is None


def test_small_first_table_with_52_bit_ttbr():
    # 4K, DS, 49-bit VAs: level -1 has 2 entries (16 bytes), but a TTBR in the 52-bit layout
    # aligns the table to at least 64 bytes (AArch64.TTBaseAddress); QEMU 7.2 does not
    ttbr = ROOT0 | 0b1100 << 2                       # BADDR[51:48] = 0b1100
    s = state(tcr(t0sz=15, ips=0b110, ds=True), ttbr0=ttbr,
              mm0=mmfr0(parange=0b0110, tgran4=1))
    assert [l.name for l in arm64_mode(s, 0).levels] == ["L-1", "L0", "L1", "L2", "L3"]
    w = walk_arm64(Mem(), s, 0x1000)
    assert w.root == 0xC << 48 | ROOT0 and w.fault.level == "L-1"
    assert any(f"would walk from {0xC << 48 | ROOT0 | 0x30:#x}" in n for n in w.notes)


def test_unreadable_table():
    mem = Mem()
    tables = build(mem, R48, VA, FRAME)
    mem.holes.add(tables[2])
    w = walk_arm64(mem, state(), VA)
    assert (w.fault.reason, w.fault.level, w.fault.error_code) == (UNREADABLE, "L2", None)
    assert len(w.levels) == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        walk_arm64(Mem(), state(), VA, access="supervisor-read")
    with pytest.raises(ValueError):
        walk_arm64(Mem(), state(), 1 << 64)


def test_to_dict_is_json():
    mem = Mem()
    build(mem, R48, VA, FRAME, leaf=LEAF | CONT)
    for w in (walk_arm64(mem, state(), VA), walk_arm64(mem, state(), 1 << 50),
              walk_arm64(mem, state(sctlr=0), VA)):
        json.dumps(w.to_dict())
    for m in iter_mappings_arm64(mem, state()):
        json.dumps(m.to_dict())


# ------------------------------------------------------------------ whole address spaces

def small_space():
    """TTBR0: a 4 KiB page at VA, a 2 MiB block next to it; TTBR1: a 1 GiB block at the top."""
    mem = two_ranges()
    mem.put(ROOT0 + 0x20000 + 8 * 8, (5 << 21) | LEAF | AP(1) | UXN | BLOCK)  # L2 index 8
    mem.put(ROOT1 + 8 * 511, 0x260000 | TBL)
    mem.put(0x260000 + 8 * 511, (2 << 30) | LEAF | PXN | UXN | BLOCK)
    return mem


def test_iter_mappings_both_ranges_in_va_order():
    mem = small_space()
    maps = list(iter_mappings_arm64(mem, state()))
    page = VA & ~0xFFF
    block = va_from(R48, [3, 5, 8])
    assert [(m.va, m.pa, m.size) for m in maps] == [
        (page, FRAME, 4 * K), (block, 5 << 21, 2 * M),
        (0xFFFF << 48 | page, 0x777000, 4 * K),
        (TOP - G, 2 << 30, G)]
    assert [(m.writable, m.user, m.executable) for m in maps] == [
        (True, False, True), (True, True, False), (True, False, True), (True, False, False)]
    assert maps[0].levels_entries[-1] & ~0xFFF == FRAME and len(maps[0].levels_entries) == 4
    assert maps[1].flags[:4] == ("block", "AF", "AP=01", "SH=inner")
    assert maps[3].flags[0] == "block" and len(maps[3].levels_entries) == 2


def test_iter_mappings_reads_each_table_once_whole():
    mem = small_space()
    list(iter_mappings_arm64(mem, state()))
    addrs = [a for a, _ in mem.reads]
    assert len(addrs) == len(set(addrs)) == 9
    assert all(n == 4096 for _, n in mem.reads)
    # 64K granule: 64 KiB tables; the first 48-bit table has 64 entries (512 bytes)
    rows = GEOMETRY[("64k", 48)]
    m64 = Mem()
    build(m64, rows, va_from(rows, [1, 2, 3]), 0x70000)
    maps = list(iter_mappings_arm64(m64, state(tcr(tg0="64k", epd1=True))))
    assert len(maps) == 1 and sorted(m64.reads) == [(0x100000, 512), (0x110000, 65536),
                                                    (0x120000, 65536)]


def test_iter_mappings_range_epd_and_unreadable():
    mem = small_space()
    page = VA & ~0xFFF
    assert [m.va for m in iter_mappings_arm64(mem, state(), page, page + 1)] == [page]
    assert [m.va for m in iter_mappings_arm64(mem, state(), TOP - 1)] == [TOP - G]
    assert [m.va for m in iter_mappings_arm64(mem, state(tcr(epd0=True)))] == [
        0xFFFF << 48 | page, TOP - G]
    mem.holes.add(0x260000)
    seen = []
    maps = list(iter_mappings_arm64(mem, state(), on_unreadable=lambda *a: seen.append(a[:2])))
    assert seen == [("L1", 0x260000)] and len(maps) == 3


# ------------------------------------------------------------------ property: iter = walk

PAGES = 8                     # tables live in pages 1..8 (4 KiB); TTBR0 page 1, TTBR1 page 2


def random_space(seed, ips, hpd, ha, wxn):
    rnd = random.Random(seed)
    mem = Mem()
    for page in range(1, PAGES + 1):
        for _ in range(rnd.randrange(1, 12)):
            index = rnd.choice([0, 1, 2, 511, rnd.randrange(512)])
            kind = rnd.random()
            attrs = (rnd.getrandbits(12) & 0xFFC) | rnd.choice([0, 0, PXN, UXN, PXN | UXN, DBM])
            if rnd.random() < 0.3:
                attrs &= ~AF
            else:
                attrs |= AF
            hi = rnd.choice([0] * 6 + [APT(1), APT(2), APT(3), PXNT, UXNT, NST])
            if kind < 0.5:
                e = rnd.randrange(1, PAGES + 1) << 12 | TBL | hi       # table (or page at L3)
                e |= attrs if rnd.random() < 0.5 else 0
            elif kind < 0.8:
                e = rnd.choice([1 << 21, 5 << 30, 3 << 21, 1 << 39, 1 << 41]) | attrs | BLOCK
            elif kind < 0.9:
                e = rnd.choice([1 << 40, 1 << 44]) | TBL               # beyond a 40-bit IPS
            else:
                e = rnd.getrandbits(64)
            mem.put(page << 12 | 8 * index, e)
    s = state(tcr(ips=ips, hpd0=hpd, hpd1=hpd, ha=ha), ttbr0=0x1000, ttbr1=0x2000,
              sctlr=SCTLR_M | (SCTLR_WXN if wxn else 0), mm1=mmfr1(hafdbs=1))
    return mem, s


def reference(mem, root, va, oa_bits):
    """Stage 1 for 4K/48-bit written straight from the descriptor formats: (pa, size,
    entries) or (fault, level). Bits[1:0]: x0 invalid; 11 table (page at level 3); 01 block at
    levels 1-2 only."""
    table, path = root, []
    for level, shift in ((0, 39), (1, 30), (2, 21), (3, 12)):
        e = mem.q.get(table + ((va >> shift) & 511) * 8, 0)
        path.append(e)
        if not e & 1 or (level in (0, 3) and not e & 2):
            return ("translation", level)
        leaf = level == 3 or not e & 2
        out = e & 0x0000_FFFF_FFFF_F000 & ~((1 << shift) - 1 if leaf else 0)
        if out >> oa_bits:
            return ("address-size", level)
        if leaf:
            return out | (va & ((1 << shift) - 1)), 1 << shift, tuple(path)
        table = out
    raise AssertionError


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1 << 32), st.sampled_from([0b010, 0b101]), st.booleans(), st.booleans(),
       st.booleans())
def test_iter_mappings_matches_walk(seed, ips, hpd, ha, wxn):
    mem, s = random_space(seed, ips, hpd, ha, wxn)
    oa_bits = 40 if ips == 0b010 else 48
    maps = list(iter_mappings_arm64(mem, s))
    assert [m.va for m in maps] == sorted(m.va for m in maps)
    for m in maps:
        for va in (m.va, m.va + m.size - 8):
            w = walk_arm64(mem, s, va, access="el0-read")
            root = 0x2000 if va >> 63 else 0x1000
            pa, size, path = reference(mem, root, va & ((1 << 48) - 1), oa_bits)
            assert (pa, size, path) == (m.pa + (va - m.va), m.size, m.levels_entries)
            if not m.levels_entries[-1] & AF and not ha:
                assert w.fault.reason == ACCESS_FLAG and w.fault.error_code == 0b001000 | (
                    len(path) - 1)
                continue
            assert w.ok and (w.pa, w.page_size) == (pa, size)
            assert (w.writable, w.user, w.executable) == (m.writable, m.user, m.executable)
            assert w.levels[-1].flags == m.flags
            leaf, tattr = path[-1], 0
            for e in path[:-1]:
                tattr |= e
            want = arm_rights((leaf >> 6) & 3, (tattr >> 61) & 3, leaf >> 53 & 1,
                              leaf >> 54 & 1, tattr >> 59 & 1, tattr >> 60 & 1, hpd, False, wxn)
            assert {k: r.allowed for k, r in w.access.items()} == want
    # and every address the reference translates is listed (probe along the entries)
    listed = {m.va: m for m in maps}
    rnd = random.Random(seed)
    for _ in range(40):
        raw = sum(rnd.choice([0, 1, 2, 511, rnd.randrange(512)]) << sh for sh in (39, 30, 21, 12))
        va = raw | (0xFFFF << 48 if rnd.random() < 0.5 else 0)
        ref = reference(mem, 0x2000 if va >> 63 else 0x1000, raw, oa_bits)
        w = walk_arm64(mem, s, va)
        if isinstance(ref[0], str):
            assert w.fault is not None and w.fault.reason == ref[0]
            assert w.fault.level == f"L{ref[1]}"
        else:
            base = va & ~(ref[1] - 1)
            assert base in listed and listed[base].pa == ref[0] & ~(ref[1] - 1)
