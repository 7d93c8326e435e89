"""The AArch64 stage 2 walker (qintrospect.paging.arm64_stage2) on tables built in memory here.

Every expected value is written from the Arm ARM (DDI 0487): the VTCR_EL2 and VTTBR_EL2
descriptions (T0SZ, SL0/SL2 per granule, TG0, PS, VS, HA/HD, DS; BADDR and VMID), the geometry
of a stage 2 walk (the first level resolves the rest of the IPA, up to 16 concatenated tables:
AArch64.S2InconsistentSL), the stage 2 descriptor format (S2AP[7:6], MemAttr[5:2], SH[9:8],
AF[10], DBM[51], Contiguous[52], XN[54:53]) and the ESR_EL2 fault status codes (0b0000LL
address size, 0b0001LL translation, 0b0010LL access flag, 0b0011LL permission; 0b101001 and
0b101011 at level -1).
"""

import json

import pytest
from hypothesis import given, strategies as st

from qintrospect.errors import MemoryReadError
from qintrospect.paging.arm64_stage2 import (
    STAGE2_ACCESS_KINDS, decode_vtcr, decode_vttbr, iter_mappings_stage2, walk_stage2,
)
from qintrospect.paging.arm64_stage2_format import memattr_name
from qintrospect.paging.model import (
    ACCESS_FLAG, ADDRESS_SIZE, PAGING_DISABLED, TRANSLATION, UNREADABLE,
)

from .budget import examples

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
ONES = (1 << 64) - 1

# Stage 2 descriptor fields.
BLOCK, TBL = 0b01, 0b11
AF, DBM, CONT, XN0, XN1 = 1 << 10, 1 << 51, 1 << 52, 1 << 53, 1 << 54


def S2AP(x):
    return x << 6


def MEMATTR(x):
    return x << 2


def SH(x):
    return x << 8


def XN(x):
    return x << 53


LEAF = AF | SH(3) | MEMATTR(0xF) | S2AP(3)      # KVM's normal RAM: accessed, inner WB, RW
LEAF_DS = AF | MEMATTR(0xF) | S2AP(3)           # with DS=1 bits[9:8] are OA[51:50]
TG0 = {"4k": 0b00, "64k": 0b01, "16k": 0b10}
GBITS = {"4k": 12, "16k": 14, "64k": 16}

# ESR_EL2 DFSC/IFSC
FSC_ADDRESS, FSC_TRANSLATION, FSC_AF, FSC_PERM = 0b000000, 0b000100, 0b001000, 0b001100
FSC_TRANSLATION_M1, FSC_ADDRESS_M1 = 0b101011, 0b101001


def vtcr(t0sz=24, sl0=1, tg0="4k", ps=0b010, *, irgn=1, orgn=1, sh=3, vs=False, ha=False,
         hd=False, ds=False, sl2=False):
    return (t0sz | sl0 << 6 | irgn << 8 | orgn << 10 | sh << 12 | TG0[tg0] << 14 | ps << 16
            | vs << 19 | ha << 21 | hd << 22 | 1 << 31 | ds << 32 | sl2 << 33)


def mmfr0(parange=0b0101, tgran4=0, tgran16=1, tgran64=0, tgran4_2=0, tgran16_2=0,
          tgran64_2=0):
    return (parange | tgran16 << 20 | tgran64 << 24 | tgran4 << 28 | tgran16_2 << 32
            | tgran64_2 << 36 | tgran4_2 << 40)


def mmfr1(hafdbs=0, vmidbits=2, xnx=1):
    return hafdbs | vmidbits << 4 | xnx << 28


def mmfr2(st=0, varange=0):
    return varange << 16 | st << 28


MM0, MM1, MM2 = mmfr0(), mmfr1(), mmfr2()
IDS = dict(id_aa64mmfr0=MM0, id_aa64mmfr1=MM1, id_aa64mmfr2=MM2)
KVM40 = vtcr()                      # T0SZ=24 (40-bit IPA), SL0=1 (level 1), 4K, PS 40 bits
ROOT = 0x100000
VMID = 5


class Mem:
    """Sparse physical memory in 64 KiB chunks (zero where nothing was put); reads touching
    the pages of `holes` raise MemoryReadError. Remembers every read."""

    def __init__(self):
        self.chunks = {}
        self.holes = set()
        self.reads = []

    def put(self, addr, value):
        chunk = self.chunks.setdefault(addr >> 16, bytearray(1 << 16))
        chunk[addr & 0xFFFF:(addr & 0xFFFF) + 8] = value.to_bytes(8, "little")

    def get(self, addr):
        chunk = self.chunks.get(addr >> 16)
        return 0 if chunk is None else int.from_bytes(chunk[addr & 0xFFFF:(addr & 0xFFFF) + 8],
                                                      "little")

    def __call__(self, addr, length):
        self.reads.append((addr, length))
        if any(p in self.holes for p in range(addr >> 12, (addr + length - 1 >> 12) + 1)):
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        out = bytearray()
        a = addr
        while a < addr + length:
            n = min(addr + length - a, (1 << 16) - (a & 0xFFFF))
            chunk = self.chunks.get(a >> 16)
            out += chunk[a & 0xFFFF:(a & 0xFFFF) + n] if chunk else bytes(n)
            a += n
        return bytes(out)


# (level, lowest IPA bit, index bits) per walk, first level first
GEOMETRY = {
    "4k-40-L1": [(1, 30, 10), (2, 21, 9), (3, 12, 9)],               # 2 concatenated
    "4k-39-L1": [(1, 30, 9), (2, 21, 9), (3, 12, 9)],
    "4k-34-L2": [(2, 21, 13), (3, 12, 9)],                           # 16 concatenated
    "4k-48-L0": [(0, 39, 9), (1, 30, 9), (2, 21, 9), (3, 12, 9)],
    "16k-40-L2": [(2, 25, 15), (3, 14, 11)],                         # 16 concatenated
    "16k-36-L2": [(2, 25, 11), (3, 14, 11)],
    "16k-40-L1": [(1, 36, 4), (2, 25, 11), (3, 14, 11)],
    "64k-40-L2": [(2, 29, 11), (3, 16, 13)],
    "64k-48-L1": [(1, 42, 6), (2, 29, 13), (3, 16, 13)],
    "4k-52-L-1": [(-1, 48, 4), (0, 39, 9), (1, 30, 9), (2, 21, 9), (3, 12, 9)],
}
CONFIGS = {   # VTCR_EL2 and ID_AA64MMFR0_EL1 of each
    "4k-40-L1": (vtcr(24, 1), MM0),
    "4k-39-L1": (vtcr(25, 1), MM0),
    "4k-34-L2": (vtcr(30, 0), MM0),
    "4k-48-L0": (vtcr(16, 2, ps=0b101), MM0),
    "16k-40-L2": (vtcr(24, 1, "16k"), MM0),
    "16k-36-L2": (vtcr(28, 1, "16k"), MM0),
    "16k-40-L1": (vtcr(24, 2, "16k"), MM0),
    "64k-40-L2": (vtcr(24, 1, "64k"), MM0),
    "64k-48-L1": (vtcr(16, 2, "64k", ps=0b101), MM0),
    "4k-52-L-1": (vtcr(12, 0, ps=0b110, ds=True, sl2=True), mmfr0(parange=0b0110, tgran4_2=3)),
}
BLOCKS = {"4k": {1: G, 2: 2 * M}, "16k": {2: 32 * M}, "64k": {2: 512 * M}}
LINUX = {2: ["pgd", "pte"], 3: ["pgd", "pmd", "pte"], 4: ["pgd", "pud", "pmd", "pte"],
         5: ["pgd", "p4d", "pud", "pmd", "pte"]}


def ipa_from(rows, indexes, offset=0):
    ipa = offset
    for (_, shift, _), i in zip(rows, indexes):
        ipa |= i << shift
    return ipa


def build(mem, rows, ipa, frame, leaf_index=None, leaf=LEAF, base=ROOT, step=0x100000,
          extra=None):
    """One path for `ipa`: the table of row k at base + k*step, each pointing at the next;
    the entry of row leaf_index (default: the last) maps `frame` as a page or block.
    extra[k] is ORed into row k's entry. Returns the table addresses."""
    last = len(rows) - 1 if leaf_index is None else leaf_index
    tables = [base + k * step for k in range(last + 1)]
    for k in range(last + 1):
        _, shift, nbits = rows[k]
        i = (ipa >> shift) & ((1 << nbits) - 1)
        if k < last:
            e = tables[k + 1] | TBL
        else:
            e = frame | leaf | (TBL if k == len(rows) - 1 else BLOCK)
        mem.put(tables[k] + 8 * i, e | (extra or {}).get(k, 0))
    return tables


def codes(w):
    return {k: (r.allowed, r.error_code) for k, r in w.access.items()}


def walk(mem, ipa, vtcr_value=KVM40, vttbr=ROOT | VMID << 48, **kw):
    ids = dict(IDS)
    ids.update(kw)
    return walk_stage2(mem, vttbr, vtcr_value, ipa, **ids)


R40 = GEOMETRY["4k-40-L1"]
IPA = ipa_from(R40, [0x201, 5, 7], 0xABC)        # bit 39 set: the second root table
FRAME = 0x12345000
ALLOWED = {k: (True, None) for k in STAGE2_ACCESS_KINDS}


# ------------------------------------------------------------------ geometry and concatenation

@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_walk_each_geometry(name):
    rows = GEOMETRY[name]
    reg, mm0 = CONFIGS[name]
    g = GBITS[name.split("-")[0]]
    ipa = ipa_from(rows, [(k * 5 + 3) & ((1 << n) - 1) | 1 << (n - 1)
                          for k, (_, _, n) in enumerate(rows)], 0x123)
    mem = Mem()
    big = name.startswith("4k-52")
    frame = (0x4567 << g) | (3 << 50 if big else 0)
    tables = build(mem, rows, ipa, frame, leaf=LEAF_DS | SH(3) if big else LEAF)
    w = walk(mem, ipa, reg, id_aa64mmfr0=mm0)
    assert w.ok, w.fault
    assert w.pa == frame | 0x123 and w.page_size == 1 << g
    assert w.mode.name == f"aarch64-s2-{name.split('-')[0]}-{name.split('-')[1]}"
    assert [(s.name, s.index, s.table_addr) for s in w.levels] == [
        (f"L{lv}", (ipa >> sh) & ((1 << n) - 1), t) for (lv, sh, n), t in zip(rows, tables)]
    assert [(l.shift, l.index_bits) for l in w.mode.levels] == [(sh, n) for _, sh, n in rows]
    assert [s.linux_name for s in w.levels] == LINUX[len(rows)]
    assert w.root == ROOT and w.pcid is None and w.user is None
    assert w.writable and w.executable and codes(w) == ALLOWED
    assert mem.reads == [(s.entry_addr, 8) for s in w.levels]
    info = decode_vtcr(reg, mm0, MM1, MM2)
    assert info["valid"] and info["start_level"] == rows[0][0]
    assert info["root_tables"] == 1 << max(0, rows[0][2] - (g - 3))
    assert w.maxphyaddr == (52 if big else 48 if "48" in name else 40)


def test_kvm_40_bit_ipa_two_concatenated_level1_tables():
    # 4K granule, start level 1: one table resolves IPA bits 38:30; a 40-bit IPA needs two
    # concatenated tables (8 KiB), and bit 39 picks the second
    mem = Mem()
    build(mem, R40, IPA, FRAME)
    w = walk(mem, IPA)
    assert w.ok and w.pa == FRAME | 0xABC
    assert w.levels[0].index == 0x201
    assert w.levels[0].entry_addr == ROOT + 4096 + 8 * 1          # table 1, entry 1
    assert "IPA bit 39 picks table 1" in " ".join(w.notes)
    assert any(n.startswith("VMID 0x5 (VTTBR_EL2[55:48], 8-bit") for n in w.notes)
    info = decode_vtcr(KVM40)
    assert (info["t0sz"], info["ia_bits"], info["granule"], info["sl0"], info["start_level"],
            info["root_tables"], info["levels"]) == (24, 40, "4k", 1, 1, 2, ["L1", "L2", "L3"])
    assert (info["irgn0"], info["orgn0"], info["sh0"], info["ps_bits"]) == (
        "WB RA WA", "WB RA WA", "inner", 40)


def test_level2_start_with_16_concatenated_tables():
    rows = GEOMETRY["4k-34-L2"]
    ipa = ipa_from(rows, [0x1FFF, 0x1FF], 0xFFF)                  # the very last page
    mem = Mem()
    build(mem, rows, ipa, FRAME)
    w = walk(mem, ipa, vtcr(30, 0))
    assert w.ok and w.levels[0].entry_addr == ROOT + 16 * 4096 - 8
    assert "IPA bits 33:30 pick table 15" in " ".join(w.notes)
    assert decode_vtcr(vtcr(30, 0))["root_tables"] == 16


@pytest.mark.parametrize("t0sz, sl0, ok", [
    (30, 0, True), (29, 0, False),         # level 2: 22..34-bit IPAs
    (42, 0, True), (43, 0, False),
    (24, 1, True), (21, 1, True), (20, 1, False), (33, 1, True), (34, 1, False),  # 31..43
    (16, 2, True), (12 + 4, 2, True),
])
def test_t0sz_sl0_consistency(t0sz, sl0, ok):
    mem = Mem()
    reg = vtcr(t0sz, sl0, ps=0b101)
    w = walk(mem, 0, reg, id_aa64mmfr2=mmfr2(st=1))
    info = decode_vtcr(reg, MM0, MM1, mmfr2(st=1))
    assert info["valid"] == ok
    if ok:
        assert w.fault.reason == TRANSLATION and w.fault.level != "L0" or w.levels
    else:
        assert w.fault.reason == TRANSLATION and w.fault.level == "L0"
        assert w.fault.error_code == FSC_TRANSLATION | 0 and not w.levels
        assert "AArch64.S2InconsistentSL" in w.fault.message
        assert codes(w) == {k: (False, FSC_TRANSLATION) for k in STAGE2_ACCESS_KINDS}
        assert mem.reads == []


def test_t0sz_sl0_mismatch_message():
    w = walk(Mem(), 0, vtcr(24, 0))      # 40-bit IPA from level 2 (at most 34 bits)
    assert w.fault.message.startswith("VTCR_EL2.SL0=0b00 starts the walk at level 2, which "
                                      "takes a 22..34-bit IPA, but T0SZ=24 gives 40 bits")
    assert w.mode is None and not w.ok


@pytest.mark.parametrize("reg, mm0, mm2, why", [
    (vtcr(22, 2, ps=0b011), mmfr0(parange=0b0011), MM2, "needs PAMax >= 44"),  # 4K level 0
    (vtcr(39, 3), MM0, mmfr2(st=0), "needs FEAT_TTST"),                        # 4K level 3
    (vtcr(24, 2, "16k"), mmfr0(parange=0b0010), MM2, "needs PAMax >= 42"),
    (vtcr(16, 3, "16k", ps=0b101), MM0, MM2, "needs VTCR_EL2.DS=1"),
    (vtcr(24, 2, "64k"), mmfr0(parange=0b0011), MM2, "needs PAMax >= 44"),
    (vtcr(24, 3, "64k"), MM0, MM2, "SL0=0b11 is reserved with the 64K granule"),
    (vtcr(12, 1, ps=0b110, ds=True, sl2=True), mmfr0(parange=6, tgran4_2=3), MM2,
     "SL2=1 with SL0=0b01 is reserved"),
])
def test_start_level_the_granule_does_not_allow(reg, mm0, mm2, why):
    w = walk(Mem(), 0, reg, id_aa64mmfr0=mm0, id_aa64mmfr2=mm2)
    assert w.fault.reason == TRANSLATION and w.fault.level == "L0"
    assert why in w.fault.message and "AArch64.S2InvalidSL" in w.fault.message


def test_t0sz_beyond_pamax_and_above_maximum():
    # 48-bit IPA with PARange 40 bits: below S2MinTxSZ (24)
    w = walk(Mem(), 0, vtcr(16, 2, ps=0b010), id_aa64mmfr0=mmfr0(parange=0b0010))
    assert w.fault.level == "L0" and "is below the minimum 24" in w.fault.message
    # T0SZ 40 without FEAT_TTST (max 39)
    w = walk(Mem(), 0, vtcr(40, 0), id_aa64mmfr2=mmfr2(st=0))
    assert w.fault.level == "L0" and "above the maximum 39" in w.fault.message
    # ... with it the 24-bit IPA walks from level 2 (one table of 8 entries)
    mem = Mem()
    mem.put(ROOT + 8 * 3, 0x40_0000 | BLOCK | LEAF)
    w = walk(mem, 3 << 21 | 0x1234, vtcr(40, 0), id_aa64mmfr2=mmfr2(st=1))
    assert w.ok and w.page_size == 2 * M and w.pa == 0x40_1234


def test_ipa_beyond_the_ipa_size():
    w = walk(Mem(), 1 << 40, KVM40)
    assert w.fault.reason == TRANSLATION and w.fault.level == "L0"
    assert w.fault.error_code == FSC_TRANSLATION
    assert "AArch64.IPAIsOutOfRange" in w.fault.message


def test_baddr_misaligned_for_concatenation():
    # two concatenated tables need an 8 KiB aligned base: bit 12 is RES0, taken as 0
    mem = Mem()
    build(mem, R40, IPA, FRAME)
    w = walk(mem, IPA, vttbr=ROOT | 0x1000)
    assert w.ok and w.root == ROOT and w.levels[0].table_addr == ROOT
    assert any("not aligned to the 8 KiB first level (2 concatenated table(s))" in n
               and "walk starts at 0x100000" in n for n in w.notes)
    info = decode_vttbr(ROOT | 0x1000 | 1 | 0xAB << 48, KVM40)
    assert (info["root"], info["alignment"], info["cnp"], info["vmid"], info["valid"]) == (
        ROOT, 8 * K, True, 0xAB, False)


def test_vmid_width():
    reg = ROOT | 0x1234 << 48
    assert decode_vttbr(reg, vtcr(vs=True), MM0, mmfr1(vmidbits=2))["vmid"] == 0x1234
    assert decode_vttbr(reg, vtcr(vs=True), MM0, mmfr1(vmidbits=0))["vmid"] == 0x34
    assert decode_vttbr(reg, vtcr(vs=False))["vmid"] == 0x34
    assert decode_vttbr(reg, vtcr(vs=True))["vmid_bits"] == 16


def test_root_beyond_output_size():
    w = walk(Mem(), 0, KVM40, vttbr=1 << 41)
    assert w.fault.reason == ADDRESS_SIZE and w.fault.level == "L0"
    assert w.fault.error_code == FSC_ADDRESS


# ------------------------------------------------------------------ descriptors

@pytest.mark.parametrize("gran, level, size", [
    ("4k", 1, G), ("4k", 2, 2 * M), ("16k", 2, 32 * M), ("64k", 2, 512 * M)])
def test_blocks(gran, level, size):
    name = {"4k": "4k-40-L1", "16k": "16k-40-L1", "64k": "64k-48-L1"}[gran]
    rows, (reg, mm0) = GEOMETRY[name], CONFIGS[name]
    k = [lv for lv, _, _ in rows].index(level)
    ipa = ipa_from(rows, [1, 2, 3, 4]) | (size - 1) & 0x12345678
    mem = Mem()
    build(mem, rows, ipa, 7 * size, leaf_index=k)
    w = walk(mem, ipa, reg, id_aa64mmfr0=mm0)
    assert w.ok and w.page_size == size and w.pa == 7 * size | ipa & (size - 1)
    assert w.levels[-1].flags[0] == "block" and len(w.levels) == k + 1
    assert BLOCKS[gran][level] == size


@pytest.mark.parametrize("name, level", [("4k-48-L0", 0), ("16k-40-L1", 1),
                                         ("64k-48-L1", 1)])
def test_block_where_blocks_are_not_allowed(name, level):
    rows, (reg, mm0) = GEOMETRY[name], CONFIGS[name]
    k = [lv for lv, _, _ in rows].index(level)
    mem = Mem()
    build(mem, rows, 0, 0, leaf_index=k)
    w = walk(mem, 0, reg, id_aa64mmfr0=mm0)
    assert w.fault.reason == TRANSLATION and w.fault.level == f"L{level}"
    assert w.fault.error_code == FSC_TRANSLATION | level
    assert "AArch64.BlockDescSupported" in w.fault.message
    assert any("QEMU 7.2 does not check the level of a block descriptor" in n for n in w.notes)
    assert w.levels[-1].flags == ("block", "not-allowed-here")


def test_64k_level1_block_with_52_bit_pa():
    rows = GEOMETRY["64k-48-L1"]
    mem = Mem()
    build(mem, rows, 0x123456789, 0, leaf_index=0)
    w = walk(mem, 0x123456789, vtcr(16, 2, "64k", ps=0b110), id_aa64mmfr0=mmfr0(parange=6))
    assert w.ok and w.page_size == 4 * T


@pytest.mark.parametrize("name", ["4k-48-L0", "4k-52-L-1"])
def test_invalid_descriptor_at_each_level(name):
    rows, (reg, mm0) = GEOMETRY[name], CONFIGS[name]
    ipa = ipa_from(rows, [3, 4, 5, 6, 7])
    for k, (level, _, _) in enumerate(rows):
        mem = Mem()
        build(mem, rows, ipa, FRAME, leaf=LEAF_DS if "52" in name else LEAF)
        last = rows[k][2]
        entry = ROOT + k * 0x100000 + 8 * ((ipa >> rows[k][1]) & ((1 << last) - 1))
        mem.put(entry, 0x1234 << 12 | 0x7FC)                       # bit 0 clear
        w = walk(mem, ipa, reg, id_aa64mmfr0=mm0)
        assert w.fault.reason == TRANSLATION and w.fault.level == f"L{level}"
        assert w.fault.error_code == (FSC_TRANSLATION_M1 if level == -1
                                      else FSC_TRANSLATION | level)
        assert "is invalid (bit 0 = 0)" in w.fault.message
        assert len(w.levels) == k + 1 and w.levels[-1].flags == ("invalid",)
        assert codes(w) == {kk: (False, w.fault.error_code) for kk in STAGE2_ACCESS_KINDS}


def test_reserved_encoding_at_level3():
    mem = Mem()
    build(mem, R40, IPA, FRAME)
    mem.put(ROOT + 0x200000 + 8 * 7, FRAME | LEAF | BLOCK)
    w = walk(mem, IPA)
    assert w.fault.reason == TRANSLATION and w.fault.level == "L3"
    assert w.fault.error_code == FSC_TRANSLATION | 3 and "reserved at level 3" in w.fault.message


def test_contiguous_hint():
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=LEAF | CONT)
    w = walk(mem, IPA)
    lo = IPA & ~(64 * K - 1)
    assert w.ok and w.page_size == 4 * K and "Cont" in w.levels[-1].flags
    assert (f"contiguous hint: part of a 16-entry run of 4 KiB pages (64 KiB, IPA {lo:#x}-"
            f"{lo + 64 * K - 1:#x})") in " ".join(w.notes)


@pytest.mark.parametrize("ap", range(4))
def test_every_s2ap(ap):
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=AF | S2AP(ap) | MEMATTR(0xF))
    w = walk(mem, IPA)
    assert w.ok and w.writable == bool(ap & 2)
    perm = FSC_PERM | 3
    assert codes(w) == {"read": (bool(ap & 1), None if ap & 1 else perm),
                        "write": (bool(ap & 2), None if ap & 2 else perm),
                        "execute-el1": (True, None), "execute-el0": (True, None)}
    for kind in ("read", "write"):
        if not w.access[kind].allowed:
            assert w.access[kind].reason.startswith(
                f"stage 2 permission fault: S2AP={ap:02b} (")
            assert "in the L3 descriptor" in w.access[kind].reason


def test_dbm_with_hardware_dirty_state():
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=AF | S2AP(1) | DBM)
    w = walk(mem, IPA, vtcr(ha=True, hd=True), id_aa64mmfr1=mmfr1(hafdbs=2))
    assert w.access["write"].allowed and any("sets S2AP[1]" in n for n in w.notes)
    w = walk(mem, IPA, vtcr(ha=True, hd=True), id_aa64mmfr1=mmfr1(hafdbs=1))
    assert not w.access["write"].allowed and "DBM=1, but hardware dirty state is off" in \
        w.access["write"].reason


@pytest.mark.parametrize("xn, el1, el0", [(0, True, True), (1, False, True), (2, False, False),
                                          (3, True, False)])
def test_xn_with_xnx(xn, el1, el0):
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=LEAF | XN(xn))
    w = walk(mem, IPA, id_aa64mmfr1=mmfr1(xnx=1))
    assert (w.access["execute-el1"].allowed, w.access["execute-el0"].allowed) == (el1, el0)
    assert w.executable == (el1 or el0) and w.access["read"].allowed
    for kind in ("execute-el1", "execute-el0"):
        if not w.access[kind].allowed:
            assert w.access[kind].error_code == FSC_PERM | 3
            assert f"XN={xn:02b} in the L3 descriptor" in w.access[kind].reason


@pytest.mark.parametrize("xn, x", [(0, True), (1, True), (2, False), (3, False)])
def test_xn_without_xnx(xn, x):
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=LEAF | XN(xn))
    w = walk(mem, IPA, id_aa64mmfr1=mmfr1(xnx=0))
    assert (w.access["execute-el1"].allowed, w.access["execute-el0"].allowed) == (x, x)
    assert any("XN[0]=1 in the L3 descriptor is ignored" in n for n in w.notes) == bool(xn & 1)
    if not x:
        assert "XN[1]=1 in the L3 descriptor" in w.access["execute-el0"].reason


def test_xn_unknown_xnx():
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=LEAF | XN(1))
    w = walk_stage2(mem, ROOT, KVM40, IPA)
    assert not w.access["execute-el1"].allowed and w.access["execute-el0"].allowed
    assert any("XN[0] read with FEAT_XNX" in n for n in w.notes)


def test_access_flag():
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=LEAF & ~AF)
    w = walk(mem, IPA)
    assert w.fault.reason == ACCESS_FLAG and w.fault.level == "L3"
    assert w.fault.error_code == FSC_AF | 3 and "AF=0" in w.fault.message
    assert codes(w) == {k: (False, FSC_AF | 3) for k in STAGE2_ACCESS_KINDS}
    w = walk(mem, IPA, vtcr(ha=True), id_aa64mmfr1=mmfr1(hafdbs=1))
    assert w.ok and any("with VTCR_EL2.HA=1 the CPU sets it" in n for n in w.notes)
    w = walk(mem, IPA, vtcr(ha=True), id_aa64mmfr1=mmfr1(hafdbs=0))     # no FEAT_HAFDBS
    assert w.fault.reason == ACCESS_FLAG


def test_output_address_beyond_output_size():
    mem = Mem()
    build(mem, R40, IPA, 1 << 45)
    w = walk(mem, IPA)
    assert w.fault.reason == ADDRESS_SIZE and w.fault.level == "L3"
    assert w.fault.error_code == FSC_ADDRESS | 3 and "40-bit output address size" in w.fault.message


def test_52_bit_output_addresses_with_ds():
    rows = GEOMETRY["4k-52-L-1"]
    reg, mm0 = CONFIGS["4k-52-L-1"]
    ipa = (1 << 51) | 0x1234_5678_9ABC
    mem = Mem()
    high = 0xF << 48
    # every table in the upper half of the 52-bit space: OA[51:50] in bits[9:8]
    tables = [high + ROOT + k * 0x100000 for k in range(5)]
    for k, (_, shift, n) in enumerate(rows):
        i = (ipa >> shift) & ((1 << n) - 1)
        nxt = tables[k + 1] if k < 4 else (3 << 50) | (1 << 49) | FRAME
        e = (nxt & ((1 << 50) - 1)) | (nxt >> 50 & 3) << 8 | TBL
        mem.put(tables[k] + 8 * i, e | (LEAF_DS if k == 4 else 0))
    vttbr = (tables[0] & ((1 << 48) - 1)) | (tables[0] >> 48 & 0xF) << 2
    w = walk_stage2(mem, vttbr, reg, ipa, id_aa64mmfr0=mm0, id_aa64mmfr1=MM1,
                    id_aa64mmfr2=MM2)
    assert w.ok, w.fault
    assert w.root == tables[0] and [s.table_addr for s in w.levels] == tables
    assert w.pa == (3 << 50) | (1 << 49) | FRAME | (ipa & 0xFFF)
    assert w.levels[0].name == "L-1" and w.levels[0].index == 8 and w.maxphyaddr == 52
    assert "SH=inner" in w.levels[-1].flags                        # from VTCR_EL2.SH0
    assert decode_vttbr(vttbr, reg, mm0)["root"] == tables[0]
    # the same descriptors without FEAT_LPA2: DS ignored, and the configuration is invalid
    w = walk_stage2(mem, vttbr, reg, ipa, id_aa64mmfr0=mmfr0(parange=6, tgran4_2=2))
    assert w.fault.level == "L0" and any("DS=1 ignored" in n for n in w.notes)


def test_level_minus1_fault_code():
    reg, mm0 = CONFIGS["4k-52-L-1"]
    w = walk(Mem(), 1 << 50, reg, id_aa64mmfr0=mm0)
    assert w.fault.level == "L-1" and w.fault.error_code == FSC_TRANSLATION_M1


def test_64k_52_bit_output_in_bits_15_12():
    rows = GEOMETRY["64k-48-L1"]
    mem = Mem()
    ipa = 0x1234_5678_9ABC
    build(mem, rows, ipa, (0x7 << 12) | 0x10000, leaf=LEAF)       # OA[51:48] = 7
    w = walk(mem, ipa, vtcr(16, 2, "64k", ps=0b110), id_aa64mmfr0=mmfr0(parange=6))
    assert w.ok and w.pa == (7 << 48) | 0x10000 | (ipa & 0xFFFF)
    w = walk(mem, ipa, vtcr(16, 2, "64k", ps=0b101), id_aa64mmfr0=mmfr0(parange=6))
    assert w.fault.reason == ADDRESS_SIZE and w.fault.level == "L3"
    assert any("QEMU 7.2 reads OA[51:48] from descriptor bits [15:12] only" in n
               for n in w.notes)


# ------------------------------------------------------------------ attributes and registers

@pytest.mark.parametrize("memattr, fwb, name", [
    (0b0000, False, "Device-nGnRnE"), (0b0001, False, "Device-nGnRE"),
    (0b0010, False, "Device-nGRE"), (0b0011, False, "Device-GRE"),
    (0b0101, False, "Normal NC"), (0b1111, False, "Normal WB"), (0b1010, False, "Normal WT"),
    (0b1101, False, "Normal inner NC, outer WB"), (0b0100, False, "reserved 0b0100"),
    (0b0001, True, "Device-nGnRE (forced)"), (0b0101, True,
                                                 "Normal NC (a stage 1 Device type is kept)"),
    (0b0110, True, "Normal WB (forced, over any stage 1 type)"),
    (0b0111, True, "the stage 1 attributes"), (0b0100, True, "reserved 0b0100 with FWB"),
    (0b1111, True, "reserved 0b1111 with FWB"),
])
def test_memattr(memattr, fwb, name):
    assert memattr_name(memattr, fwb) == name


def test_memattr_flags_follow_hcr_fwb():
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=AF | S2AP(3) | MEMATTR(6) | (0x5 << 55))
    flags = walk(mem, IPA, hcr=1 | 1 << 46).levels[-1].flags
    assert "MemAttr=Normal WB (forced, over any stage 1 type)" in flags and "SW=0x5" in flags
    flags = walk(mem, IPA, hcr=1).levels[-1].flags
    assert "MemAttr=Normal inner WT, outer NC" in flags
    flags = walk(mem, IPA).levels[-1].flags
    assert ("MemAttr=Normal inner WT, outer NC (with HCR_EL2.FWB=1: Normal WB (forced, over "
            "any stage 1 type))") in flags
    assert flags[:4] == ("page", "AF", "S2AP=11", "SH=non-shareable")


def test_stage2_off():
    w = walk(Mem(), IPA, hcr=0)
    assert w.fault.reason == PAGING_DISABLED and w.fault.level is None
    assert list(iter_mappings_stage2(Mem(), ROOT, KVM40, hcr=0)) == []


def test_unreadable_table():
    mem = Mem()
    tables = build(mem, R40, IPA, FRAME)
    mem.holes.add(tables[1] >> 12)
    w = walk(mem, IPA)
    assert w.fault.reason == UNREADABLE and w.fault.level == "L2"
    seen = []
    assert list(iter_mappings_stage2(mem, ROOT, KVM40, on_unreadable=lambda *a: seen.append(
        a[:2]))) == []
    assert seen == [("L2", tables[1])]


def test_json():
    mem = Mem()
    build(mem, R40, IPA, FRAME, leaf=LEAF | CONT | XN(2))
    w = walk(mem, IPA)
    d = json.loads(json.dumps(w.to_dict()))
    assert d["mode"] == "aarch64-s2-4k-40" and d["pa"] == hex(FRAME | 0xABC)
    assert list(d["access"]) == list(STAGE2_ACCESS_KINDS)
    assert d["access"]["execute-el1"]["error_code"] == hex(FSC_PERM | 3)
    json.dumps(decode_vtcr(ONES)) and json.dumps(decode_vttbr(ONES, ONES))


def test_qemu_differences_are_noted():
    # 4K level 0 start with PS 40 bits: the Arm ARM checks PAMax (48), QEMU 7.2 the output size
    w = walk(Mem(), 0, vtcr(16, 2, ps=0b010))
    assert w.fault.level == "L0" and w.fault.reason == TRANSLATION       # invalid L0 entry
    assert any("QEMU 7.2 would take a level 0 translation fault here instead" in n
               for n in w.notes)
    # 4K SL0=0b11 without FEAT_TTST: reserved; QEMU 7.2 reads it as level -1 for 52 bits
    w = walk(Mem(), 0, vtcr(12, 3, ps=0b110, ds=True), id_aa64mmfr0=mmfr0(parange=6, tgran4=1),
             id_aa64mmfr2=mmfr2(st=0))
    assert "needs FEAT_TTST" in w.fault.message
    assert any("QEMU 7.2 would not fault here: it walks a 52-bit IPA from level -1" in n
               for n in w.notes)
    # level -1 (DS, SL2=1) with a 51-bit IPA: the Arm ARM takes 49..52 bits, QEMU 7.2 only 52
    reg = vtcr(13, 0, ps=0b110, ds=True, sl2=True)
    w = walk(Mem(), 0, reg, id_aa64mmfr0=mmfr0(parange=6, tgran4_2=3))
    assert w.fault.level == "L-1" and w.mode.levels[0].index_bits == 3
    assert any("QEMU 7.2 would take a level 0 translation fault here instead "
               "(check_s2_mmu_setup: start level -1 below the lowest it allows)" in n
               for n in w.notes)


# ------------------------------------------------------------------ listings

def test_iter_mappings_order_and_window():
    mem = Mem()
    build(mem, R40, IPA, FRAME)
    build(mem, R40, 0x4000_0000, 0, leaf_index=0, base=ROOT)        # 1 GiB block, table 0
    build(mem, R40, 0x20_0000, 0x40_0000, leaf_index=1, base=ROOT, step=0x300000)
    got = list(iter_mappings_stage2(mem, ROOT, KVM40))
    assert [(m.va, m.pa, m.size) for m in got] == [
        (0x20_0000, 0x40_0000, 2 * M), (0x4000_0000, 0, G), (IPA & ~0xFFF, FRAME, 4 * K)]
    assert all(m.user and m.writable and m.executable for m in got)
    assert got[2].levels_entries == tuple(s.entry for s in walk(mem, IPA).levels)
    got = list(iter_mappings_stage2(mem, ROOT, KVM40, 0x4000_0000 + 5, IPA & ~0xFFF))
    assert [m.va for m in got] == [0x4000_0000]
    got = list(iter_mappings_stage2(mem, ROOT, KVM40, IPA, IPA + 1))
    assert [m.va for m in got] == [IPA & ~0xFFF]


def test_iter_reads_each_table_once_whole():
    mem = Mem()
    build(mem, R40, IPA, FRAME)
    list(iter_mappings_stage2(mem, ROOT, KVM40))
    assert mem.reads == [(ROOT, 8 * K), (ROOT + 0x100000, 4 * K), (ROOT + 0x200000, 4 * K)]


# ------------------------------------------------------------------ hostile input

def test_table_pointing_to_itself():
    mem = Mem()
    for i in range(512):
        mem.put(ROOT + 8 * i, ROOT | TBL | LEAF)
    mem.put(ROOT + 4096, ROOT | TBL | LEAF)
    w = walk(mem, 0x7F_FFFF_F000)
    assert w.ok and w.pa == ROOT and [s.table_addr for s in w.levels] == [ROOT] * 3
    repeats = []
    mem.reads.clear()
    got = list(iter_mappings_stage2(mem, ROOT, KVM40,
                                    on_repeat=lambda *a: repeats.append(a)))
    # the root is L1 only; reached as an L2 table once, walked once, as an L3 table once
    assert [m.va for m in got] == [i << 12 for i in range(512)]
    assert all(m.pa == ROOT and m.size == 4 * K for m in got)
    assert len(repeats) == 511 + 511 + 1          # the other L2 and L3 entries, and table 1
    assert mem.reads == [(ROOT, 8 * K), (ROOT, 4 * K)]      # as L1 (2 tables), as L2 and L3


@pytest.mark.parametrize("reg", [vtcr(63, 0), vtcr(0, 0), ONES, 0, vtcr(24, 1) | 3 << 14])
def test_hostile_registers(reg):
    mem = Mem()
    for vttbr in (0, ONES, ROOT):
        for ipa in (0, IPA, ONES):
            for ids in ({}, IDS, {"id_aa64mmfr0": ONES, "id_aa64mmfr1": ONES,
                                  "id_aa64mmfr2": ONES, "hcr": ONES}):
                w = walk_stage2(mem, vttbr, reg, ipa, **ids)
                assert w.fault is not None or w.ok
                json.dumps(w.to_dict())
                list(iter_mappings_stage2(mem, vttbr, reg, **ids))
        decode_vtcr(reg, ONES, ONES, ONES)
        decode_vttbr(ONES, reg)
    w = walk_stage2(mem, ONES, ONES, 0, id_aa64mmfr0=ONES, id_aa64mmfr1=ONES,
                    id_aa64mmfr2=ONES, hcr=ONES)
    assert w.fault.reason == TRANSLATION and w.fault.level == "L0" and w.fault.message


def test_hostile_ipa_type():
    with pytest.raises(ValueError):
        walk_stage2(Mem(), ROOT, KVM40, -1)


# ------------------------------------------------------------------ iter_mappings == walk

NAMES = sorted(GEOMETRY)


@st.composite
def spaces(draw):
    """A configuration and a few leaves (IPA, level index, output frame, attributes)."""
    name = draw(st.sampled_from(NAMES))
    rows = GEOMETRY[name]
    g = GBITS[name.split("-")[0]]
    leaves = []
    for _ in range(draw(st.integers(1, 6))):
        indexes = [draw(st.sampled_from([0, 1, (1 << n) - 1, n * 3])) & ((1 << n) - 1)
                   for _, _, n in rows]
        k = draw(st.sampled_from([len(rows) - 1] + [i for i, (lv, _, _) in enumerate(rows)
                                                    if lv in BLOCKS[name.split("-")[0]]]))
        attrs = (draw(st.sampled_from([AF, AF, 0])) | S2AP(draw(st.integers(0, 3)))
                 | XN(draw(st.integers(0, 3))) | draw(st.sampled_from([0, DBM, CONT, 0x3 << 55]))
                 | MEMATTR(draw(st.integers(0, 15))))
        frame = draw(st.integers(0, (1 << 20) - 1)) << g
        leaves.append((ipa_from(rows, indexes[:k + 1]), k, frame, attrs))
    return name, leaves


@given(spaces())
@examples(60)
def test_iter_mappings_agrees_with_walk(space):
    name, leaves = space
    rows, (reg, mm0) = GEOMETRY[name], CONFIGS[name]
    big = "52" in name
    mem = Mem()
    nxt = [ROOT + (1 << 21)]
    owner = {}               # (level index, table-walk prefix) -> table address

    def table_for(k, ipa):
        key = (k, ipa >> (rows[k - 1][1]))
        if key not in owner:
            owner[key] = nxt[0]
            nxt[0] += 1 << 20
        return owner[key]

    placed = {}
    for ipa, k, frame, attrs in leaves:
        size = 1 << rows[k][1]
        frame &= ~(size - 1) & ((1 << 48) - 1)
        if any(a <= ipa < a + s or ipa <= a < ipa + size for a, (s, _) in placed.items()):
            continue                              # overlaps a leaf already placed
        table = ROOT
        for j in range(k + 1):
            _, shift, n = rows[j]
            slot = table + 8 * ((ipa >> shift) & ((1 << n) - 1))
            if j < k:
                child = table_for(j + 1, ipa)
                mem.put(slot, child | TBL)
                table = child
            else:
                leaf = attrs & ~(SH(3) if big else 0)
                mem.put(slot, frame | leaf | (TBL if j == len(rows) - 1 else BLOCK))
        placed[ipa] = (size, frame)
    got = list(iter_mappings_stage2(mem, ROOT, reg, id_aa64mmfr0=mm0, id_aa64mmfr1=MM1,
                                    id_aa64mmfr2=MM2))
    assert [m.va for m in got] == sorted(placed)
    for m in got:
        assert (m.size, m.pa) == placed[m.va]
        for off in (0, m.size - 1):
            w = walk(mem, m.va + off, reg, id_aa64mmfr0=mm0)
            assert w.levels[-1].entry == m.levels_entries[-1]
            assert [s.entry for s in w.levels] == list(m.levels_entries)
            if w.ok:
                assert (w.pa, w.page_size, w.writable) == (m.pa + off, m.size, m.writable)
                assert w.executable == m.executable
                assert tuple(w.levels[-1].flags) == m.flags
            else:
                assert w.fault.reason == ACCESS_FLAG
