"""The RISC-V walker (qintrospect.paging.riscv) on page tables built in memory here.

Every expected value is written from the RISC-V privileged spec, version 1.12: the satp
encodings (4.1.11), the PTE format and RWX encodings (4.3.1, 4.4.1), the translation process
(4.3.2, steps 1-8), the Sv39/Sv48/Sv57 geometry (4.4-4.6), mstatus.SUM and MXR (3.1.6.3),
menvcfg.PBMTE (3.1.18), and the Svnapot and Svpbmt chapters; the page-fault exception codes of
scause (table 4.2: 12 instruction, 13 load, 15 store/AMO). The access rules are written out once
below (`spec_allows`), not taken from the code.
"""

import json

import pytest

from qintrospect.errors import MemoryReadError
from qintrospect.paging.model import (
    ACCESS_FLAG, MISALIGNED_SUPERPAGE, NO_LEAF, NON_CANONICAL, NOT_PRESENT, PAGING_DISABLED,
    RESERVED_BIT, UNREADABLE,
)
from qintrospect.paging.riscv import (
    RISCV_ACCESS_KINDS, RiscvState, iter_mappings_riscv, riscv_mode, satp_asid, satp_root,
    walk_riscv,
)

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
TOP = 1 << 64

# PTE bits (4.3.1 figure "Sv32 page table entry", 4.4.1 "Sv39 page table entry").
V, R, W, X, U, GL, A, D = (1 << n for n in range(8))
NAPOT = 1 << 63


def PBMT(x):
    return x << 61


def RSW(x):
    return x << 8


def pte(frame, bits):
    """A PTE for physical address `frame` (its PPN in bits 53:10)."""
    return (frame >> 12) << 10 | bits


SUM, MXR, MPRV = 1 << 18, 1 << 19, 1 << 17
PBMTE = 1 << 62
LEVELS = {39: 3, 48: 4, 57: 5}
MODE_BITS = {39: 8, 48: 9, 57: 10}
ROOT = 0x80000000
LEAF = V | R | W | A | D                  # an ordinary kernel data page
SCAUSE = {"read": 13, "write": 15, "execute": 12}


def state(va_bits=39, root=ROOT, asid=0, **kw):
    kw.setdefault("svpbmt", True)
    kw.setdefault("svnapot", True)
    kw.setdefault("menvcfg", PBMTE)
    return RiscvState(satp=MODE_BITS[va_bits] << 60 | asid << 44 | root >> 12, **kw)


class Mem:
    """Sparse physical memory of 64-bit words (zero where nothing was put); reads touching a
    page in `holes` raise MemoryReadError. Remembers every read."""

    def __init__(self):
        self.q = {}
        self.holes = set()
        self.reads = []

    def put(self, addr, value):
        self.q[addr] = value

    def __call__(self, addr, length):
        self.reads.append((addr, length))
        if {addr >> 12, (addr + length - 1) >> 12} & self.holes:
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        return b"".join(self.q.get(a, 0).to_bytes(8, "little")
                        for a in range(addr, addr + length, 8))


def index(va, level):
    """VPN[level] of va: 9 bits from bit 12 + 9*level (4.4.1 "Sv39 virtual address")."""
    return va >> (12 + 9 * level) & 511


def build(mem, va, leaf, va_bits=39, leaf_level=0, root=ROOT, pointer=V, extra=None, at=None):
    """One path for va: a table per level from the root down to leaf_level, the table of
    level L below the root at (at or root) + (top - L) * 0x1000, each pointing at the next
    with `pointer`, and the PTE `leaf` at leaf_level. extra[L] is ORed into level L's PTE.
    Returns the tables."""
    top = LEVELS[va_bits] - 1
    at = root if at is None else at
    tables = [root] + [at + (top - lv) * 0x1000 for lv in range(top - 1, leaf_level - 1, -1)]
    for k, lv in enumerate(range(top, leaf_level - 1, -1)):
        e = leaf if lv == leaf_level else pte(tables[k + 1], pointer)
        mem.put(tables[k] + 8 * index(va, lv), e | (extra or {}).get(lv, 0))
    return tables


def codes(w):
    return {k: (r.allowed, r.error_code) for k, r in w.access.items()}


def spec_allows(kind, e, mstatus):
    """4.3.1 and 3.1.6.3, written out: U-mode needs U=1; S-mode may load and store U=1 pages
    only with SUM=1 and never fetch from them; loads need R=1, or X=1 with MXR=1; stores
    need W=1; fetches need X=1."""
    priv, op = kind.split("-")
    if priv == "u" and not e & U:
        return False
    if priv == "s" and e & U and (op == "execute" or not mstatus & SUM):
        return False
    return {"read": bool(e & R or (mstatus & MXR and e & X)), "write": bool(e & W),
            "execute": bool(e & X)}[op]


VA39 = 3 << 30 | 5 << 21 | 7 << 12 | 0xABC
FRAME = 0x12345000


# ------------------------------------------------------------------ modes and geometry

@pytest.mark.parametrize("va_bits", [39, 48, 57])
def test_modes(va_bits):
    """4.4-4.6: satp.MODE 8/9/10; 3/4/5 levels of 9 VPN bits above the 12-bit offset; any
    level but 0 may be a leaf (megapages 2 MiB, gigapages 1 GiB, terapages 512 GiB,
    petapages 256 TiB)."""
    mode = riscv_mode(state(va_bits))
    n = LEVELS[va_bits]
    assert mode.name == f"sv{va_bits}" and mode.va_bits == va_bits and mode.entry_size == 8
    assert [l.name for l in mode.levels] == [f"L{lv}" for lv in range(n - 1, -1, -1)]
    assert [(l.shift, l.index_bits) for l in mode.levels] == [
        (12 + 9 * lv, 9) for lv in range(n - 1, -1, -1)]
    sizes = {1: 2 * M, 2: G, 3: 512 * G, 4: 256 * T}
    assert [l.large_page for l in mode.levels] == [sizes.get(lv) for lv in range(n - 1, -1, -1)]
    assert [l.linux_name for l in mode.levels] == {
        3: ["pgd", "pmd", "pte"], 4: ["pgd", "pud", "pmd", "pte"],
        5: ["pgd", "p4d", "pud", "pmd", "pte"]}[n]


def test_satp_fields_and_bad_arguments():
    """4.1.11: satp = MODE[63:60] ASID[59:44] PPN[43:0]."""
    satp = 9 << 60 | 0xBEEF << 44 | 0xFFFFFFFFFFF
    assert satp_root(satp) == 0xFFFFFFFFFFF000 and satp_asid(satp) == 0xBEEF
    with pytest.raises(ValueError, match="access"):
        walk_riscv(Mem(), state(), 0, "el1-read")
    with pytest.raises(ValueError):
        walk_riscv(Mem(), state(), TOP)


@pytest.mark.parametrize("va_bits", [39, 48, 57])
def test_4k_page_in_each_mode(va_bits):
    """4.3.2: one PTE per level from satp.PPN * 4096, a leaf at level 0."""
    n = LEVELS[va_bits]
    va = sum((lv * 37 + 1) % 512 << (12 + 9 * lv) for lv in range(n)) | 0x123
    mem = Mem()
    tables = build(mem, va, pte(FRAME, LEAF), va_bits)
    w = walk_riscv(mem, state(va_bits, asid=7), va)
    assert w.ok and w.fault is None
    assert w.pa == FRAME | 0x123 and w.page_size == 4 * K
    assert w.mode.name == f"sv{va_bits}" and w.root == ROOT and w.pcid is None
    assert [s.table_addr for s in w.levels] == tables
    assert [s.index for s in w.levels] == [index(va, lv) for lv in range(n - 1, -1, -1)]
    assert [s.leaf for s in w.levels] == [False] * (n - 1) + [True]
    assert w.levels[-1].next_addr == FRAME and w.maxphyaddr == 56
    assert (w.writable, w.user, w.executable) == (True, False, False)
    assert mem.reads == [(s.entry_addr, 8) for s in w.levels]
    assert w.notes[0] == "ASID 0x7 (satp[59:44])"
    json.dumps(w.to_dict())


@pytest.mark.parametrize("va_bits, level", [(39, 1), (39, 2), (48, 1), (48, 2), (48, 3),
                                            (57, 1), (57, 2), (57, 3), (57, 4)])
def test_superpage_at_each_level(va_bits, level):
    """4.3.2 step 8: a leaf at level i > 0 maps pa.ppn[i-1:0] = va.vpn[i-1:0]."""
    size = 1 << (12 + 9 * level)
    va = (1 << (12 + 9 * level)) * 3 + 0x12345678 % size
    frame = 5 * size if level < 4 else size      # 256 TiB pages: 56-bit PAs hold few
    mem = Mem()
    build(mem, va, pte(frame, V | R | X | A), va_bits, leaf_level=level)
    w = walk_riscv(mem, state(va_bits), va)
    assert w.ok and w.page_size == size and w.pa == frame | (va & (size - 1))
    assert w.levels[-1].name == f"L{level}" and w.levels[-1].page_size == size
    maps = list(iter_mappings_riscv(mem, state(va_bits)))
    assert [(m.va, m.pa, m.size) for m in maps] == [(va & ~(size - 1), frame, size)]


@pytest.mark.parametrize("level", [1, 2])
def test_misaligned_superpage(level):
    """4.3.2 step 6: a leaf at i > 0 with pte.ppn[i-1:0] != 0 is a misaligned superpage."""
    size = 1 << (12 + 9 * level)
    mem = Mem()
    build(mem, VA39, pte(4 * size + 0x1000, V | R | A), leaf_level=level)
    w = walk_riscv(mem, state(), VA39, "s-write")
    assert not w.ok and w.fault.reason == MISALIGNED_SUPERPAGE
    assert w.fault.level == f"L{level}" and w.fault.error_code == 15
    assert "misaligned superpage" in w.fault.message and "0x1" in w.fault.message
    assert codes(w) == {k: (False, SCAUSE[k.split("-")[1]]) for k in RISCV_ACCESS_KINDS}
    assert list(iter_mappings_riscv(mem, state())) == []


# ------------------------------------------------------------------ satp.MODE and the VA

def test_bare_and_unsupported_modes():
    """4.1.11: MODE 0 is Bare (no translation); an RV64 satp never holds another value than
    0, 8, 9, 10 (writes of an unsupported MODE have no effect)."""
    for mode in (0, 1, 11, 15):
        s = RiscvState(satp=mode << 60 | ROOT >> 12)
        w = walk_riscv(Mem(), s, 0x1234)
        assert not w.ok and w.mode is None and w.root == 0
        assert w.fault.reason == PAGING_DISABLED and w.fault.level is None
        assert w.fault.error_code is None
        assert ("Bare" in w.fault.message) == (mode == 0)
        assert all(not r.allowed and r.error_code is None for r in w.access.values())
        assert list(iter_mappings_riscv(Mem(), s)) == []


@pytest.mark.parametrize("va_bits", [39, 48, 57])
def test_sign_extension(va_bits):
    """4.4.1 (and 4.5.1, 4.6.1): bits 63:n must all equal bit n-1, else a page fault."""
    n = va_bits
    mem = Mem()
    high = TOP - (1 << (n - 1)) + 0x5000           # the first upper-half address, +0x5000
    build(mem, high, pte(FRAME, LEAF), va_bits)
    assert walk_riscv(mem, state(va_bits), high).pa == FRAME
    for va in (1 << (n - 1), 1 << n, TOP - (1 << n), 1 << 63, (1 << (n - 1)) | 1 << 63):
        for access in RISCV_ACCESS_KINDS:
            w = walk_riscv(mem, state(va_bits), va, access)
            assert w.fault.reason == NON_CANONICAL and w.fault.level is None
            assert w.fault.error_code == SCAUSE[access.split("-")[1]]
            assert w.levels == ()
    assert walk_riscv(mem, state(va_bits), (1 << (n - 1)) - 1).fault.reason == NOT_PRESENT


# ------------------------------------------------------------------ step 3: invalid PTEs

@pytest.mark.parametrize("level", [2, 1, 0])
def test_invalid_pte(level):
    """4.3.2 step 3: pte.v = 0 is a page fault of the original access type."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, R | W | X), leaf_level=level)   # V=0: the rest is software's
    for access in RISCV_ACCESS_KINDS:
        w = walk_riscv(mem, state(), VA39, access)
        assert w.fault.reason == NOT_PRESENT and w.fault.level == f"L{level}"
        assert w.fault.error_code == SCAUSE[access.split("-")[1]]
        assert "V=0" in w.fault.message
        assert w.levels[-1].flags == ("invalid",) and w.levels[-1].next_addr is None


@pytest.mark.parametrize("rwx", [W, W | X])
def test_write_without_read_is_reserved(rwx):
    """4.3.1 table "Encoding of PTE R/W/X fields": 010 and 110 are reserved; step 3."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, V | rwx | A | D))
    w = walk_riscv(mem, state(), VA39, "u-execute")
    assert w.fault.reason == RESERVED_BIT and w.fault.level == "L0"
    assert w.fault.error_code == 12 and "W=1 without R" in w.fault.message
    assert list(iter_mappings_riscv(mem, state())) == []


def test_reserved_bits_60_54():
    """4.4.1: bits 60:54 are reserved for future standard use; set, they fault (step 3).
    QEMU 7.2 tests them only on a CPU with neither Svpbmt nor Svnapot: a note says so."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF) | 1 << 57)
    w = walk_riscv(mem, state(), VA39)
    assert w.fault.reason == RESERVED_BIT and "60:54 = 0x8" in w.fault.message
    assert any("QEMU 7.2" in n and "bits 60:54" in n for n in w.notes)
    assert w.levels[-1].flags[-1] == "reserved[60:54]=0x8"
    w = walk_riscv(mem, state(svpbmt=False, svnapot=False), VA39)
    assert w.fault.reason == RESERVED_BIT and not any("QEMU" in n for n in w.notes)
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF), extra={2: 1 << 54})            # in a pointer too
    assert walk_riscv(mem, state(), VA39).fault.level == "L2"


@pytest.mark.parametrize("bit, name", [(D, "D"), (A, "A"), (U, "U"), (NAPOT, "N"),
                                       (PBMT(1), "PBMT")])
def test_non_leaf_reserved_bits(bit, name):
    """4.3.1: in a non-leaf PTE D, A and U are reserved; Svnapot and Svpbmt: so are N and
    PBMT. Step 3 faults (QEMU 7.2 agrees)."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF), extra={1: bit})
    w = walk_riscv(mem, state(), VA39, "s-write")
    assert w.fault.reason == RESERVED_BIT and w.fault.level == "L1"
    assert w.fault.error_code == 15 and f"{name}=" in w.fault.message
    assert not any("QEMU" in n for n in w.notes)
    assert list(iter_mappings_riscv(mem, state())) == []


def test_pointer_at_level_0():
    """4.3.2 step 4: a pointer (R=W=X=0) when i = 0 makes i < 0: a page fault."""
    mem = Mem()
    build(mem, VA39, pte(ROOT, V))
    w = walk_riscv(mem, state(), VA39, "u-read")
    assert w.fault.reason == NO_LEAF and w.fault.level == "L0" and w.fault.error_code == 13
    assert not w.levels[-1].leaf
    assert list(iter_mappings_riscv(mem, state())) == []


# ------------------------------------------------------------------ Svpbmt

@pytest.mark.parametrize("pbmt, name", [(1, "NC"), (2, "IO")])
def test_pbmt_types(pbmt, name):
    """Svpbmt: PBMT 1 NC, 2 IO in a leaf, with Svpbmt and menvcfg.PBMTE=1."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF) | PBMT(pbmt))
    w = walk_riscv(mem, state(), VA39)
    assert w.ok and f"PBMT={name}" in w.levels[-1].flags and w.pa == FRAME | 0xABC
    assert not any("unknown" in n for n in w.notes)
    w = walk_riscv(mem, state(menvcfg=None), VA39)
    assert w.ok and "menvcfg unknown: PBMTE taken as 1" in w.notes
    w = walk_riscv(mem, state(svpbmt=None, menvcfg=None), VA39)
    assert w.ok and any(n.startswith("Svpbmt unknown") for n in w.notes)


def test_pbmt_reserved_encoding():
    """Svpbmt: PBMT=3 is reserved (step 3). QEMU 7.2 accepts it: a note."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF) | PBMT(3))
    w = walk_riscv(mem, state(), VA39)
    assert w.fault.reason == RESERVED_BIT and "PBMT=3" in w.fault.message
    assert "QEMU 7.2 does not reject PBMT=3 (reserved)" in w.notes


def test_pbmt_without_pbmte_or_svpbmt():
    """3.1.18: with menvcfg.PBMTE=0 the hart behaves as though Svpbmt were not implemented,
    and then bits 62:61 are reserved (4.4.1). QEMU 7.2 ignores PBMTE: a note."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF) | PBMT(1))
    w = walk_riscv(mem, state(menvcfg=0), VA39, "s-execute")
    assert w.fault.reason == RESERVED_BIT and w.fault.error_code == 12
    assert "menvcfg.PBMTE=0" in w.fault.message
    assert any("QEMU 7.2 ignores menvcfg.PBMTE" in n for n in w.notes)
    w = walk_riscv(mem, state(svpbmt=False), VA39)
    assert w.fault.reason == RESERVED_BIT and "no Svpbmt" in w.fault.message
    assert not any("QEMU" in n for n in w.notes)             # QEMU faults there too


# ------------------------------------------------------------------ Svnapot

def napot_space(extra=0):
    """A 64 KiB NAPOT page at VA39's 64 KiB block: 16 PTEs with N=1, ppn[3:0] = 1000."""
    mem = Mem()
    base = VA39 & ~0xFFFF
    build(mem, base, pte(0x12340000 | 0x8000, LEAF | NAPOT | extra))
    table = ROOT + 2 * 0x1000
    for k in range(16):
        mem.put(table + 8 * (index(base, 0) + k), pte(0x12348000, LEAF | NAPOT | extra))
    return mem


def test_napot_64k():
    """Svnapot: N=1 at level 0 with ppn[3:0] = 1000 is a 64 KiB page; the translation takes
    ppn[3:0] from vpn[0][3:0]."""
    mem = napot_space()
    w = walk_riscv(mem, state(), VA39)
    assert w.ok and w.page_size == 64 * K and w.pa == 0x12340000 | (VA39 & 0xFFFF)
    assert w.levels[-1].next_addr == 0x12340000 and "N" in w.levels[-1].flags
    assert any(n.startswith("NAPOT") for n in w.notes)
    maps = list(iter_mappings_riscv(mem, state()))
    base = VA39 & ~0xFFFF
    assert [(m.va, m.pa, m.size) for m in maps] == [
        (base + 0x1000 * k, 0x12340000 + 0x1000 * k, 4 * K) for k in range(16)]
    w = walk_riscv(mem, state(svnapot=None), VA39)
    assert w.ok and any(n.startswith("Svnapot unknown") for n in w.notes)


@pytest.mark.parametrize("low", [0b0000, 0b0001, 0b0010, 0b0100, 0b1100])
def test_napot_reserved_encodings(low):
    """Svnapot table: at level 0 only ppn[3:0] = 1000 is defined; others are reserved."""
    mem = Mem()
    build(mem, VA39, pte(0x12340000 | low << 12, LEAF | NAPOT))
    w = walk_riscv(mem, state(), VA39)
    assert w.fault.reason == RESERVED_BIT and "NAPOT encoding" in w.fault.message


def test_napot_above_level_0_and_without_svnapot():
    """Svnapot: N=1 in a superpage leaf is reserved; without Svnapot N is a reserved bit
    (4.4.1). QEMU 7.2 with Svpbmt but no Svnapot masks N off: a note."""
    mem = Mem()
    build(mem, VA39, pte(0x40000000, V | R | A | NAPOT), leaf_level=1)
    w = walk_riscv(mem, state(), VA39)
    assert w.fault.reason == RESERVED_BIT and "only level-0 PTEs" in w.fault.message
    mem = napot_space()
    w = walk_riscv(mem, state(svnapot=False), VA39)
    assert w.fault.reason == RESERVED_BIT and "no Svnapot" in w.fault.message
    assert any("would ignore N" in n for n in w.notes)
    w = walk_riscv(mem, state(svnapot=False, svpbmt=False), VA39)
    assert not any("QEMU" in n for n in w.notes)
    assert list(iter_mappings_riscv(mem, state(svnapot=False))) == []


# ------------------------------------------------------------------ access rights

PERMS = [R, R | W, X, R | X, R | W | X]


@pytest.mark.parametrize("perm", PERMS)
@pytest.mark.parametrize("user", [0, U])
@pytest.mark.parametrize("mstatus", [0, SUM, MXR, SUM | MXR])
def test_access_matrix(perm, user, mstatus):
    """4.3.1 (U, R/W/X) and 3.1.6.3 (SUM, MXR) for every access kind, with the scause of
    each denial: 13 load, 15 store, 12 fetch."""
    e = V | perm | user | A | D
    mem = Mem()
    build(mem, VA39, pte(FRAME, e))
    w = walk_riscv(mem, state(mstatus=mstatus), VA39)
    assert w.ok
    for kind in RISCV_ACCESS_KINDS:
        allowed = spec_allows(kind, e, mstatus)
        r = w.access[kind]
        assert (r.allowed, r.error_code) == (allowed, None if allowed else
                                            SCAUSE[kind.split("-")[1]]), kind
        assert bool(r.reason) != allowed
    assert (w.writable, w.user, w.executable) == (bool(perm & W), bool(user), bool(perm & X))


def test_denial_reasons():
    mem = Mem()
    build(mem, VA39, pte(FRAME, V | X | U | A))
    w = walk_riscv(mem, state(), VA39)
    assert w.access["s-execute"].reason == ("page fault: U=1 in the L0 PTE: S-mode never "
                                            "executes from a user page")
    assert "SUM=0" in w.access["s-read"].reason
    assert w.access["u-read"].reason == "page fault: R=0 in the L0 PTE (X=1, but mstatus.MXR=0)"
    assert w.access["u-write"].reason == "page fault: W=0 in the L0 PTE"
    assert w.access["u-execute"].allowed


# ------------------------------------------------------------------ A and D

def test_accessed_and_dirty_set_by_the_hart():
    """4.3.2 step 7: with A=0 (or D=0 on a store) a hart either faults or sets the bit;
    QEMU 7.2 sets it: allowed, and a note names both."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, V | R | W))
    w = walk_riscv(mem, state(), VA39)
    assert w.ok and all(r.allowed for k, r in w.access.items() if k.startswith("s-r")
                        or k == "s-write")
    note = next(n for n in w.notes if n.startswith("A=0 and D=0 in the L0 PTE"))
    assert "Svade" in note and "Svadu" in note and "QEMU 7.2" in note
    assert "the first access sets A and the first store sets D" in note
    w = walk_riscv(mem, state(hardware_ad=True), VA39)
    assert w.ok and any("this hart sets them itself (Svadu)" in n for n in w.notes)
    mem = Mem()
    build(mem, VA39, pte(FRAME, V | R | A))                  # D=0 on a read-only page: fine
    assert not any("D=0" in n for n in walk_riscv(mem, state(), VA39).notes)


def test_accessed_and_dirty_faulting_hart():
    """4.3.2 step 7, the other choice (Svade): A=0 faults every access; D=0 faults stores."""
    mem = Mem()
    build(mem, VA39, pte(FRAME, V | R | W))
    w = walk_riscv(mem, state(hardware_ad=False), VA39, "u-execute")
    assert w.fault.reason == ACCESS_FLAG and w.fault.level == "L0" and w.fault.error_code == 12
    assert list(iter_mappings_riscv(mem, state(hardware_ad=False)))      # still a mapping
    mem = Mem()
    build(mem, VA39, pte(FRAME, V | R | W | A))
    w = walk_riscv(mem, state(hardware_ad=False), VA39)
    assert w.ok and w.access["s-read"].allowed
    assert codes(w)["s-write"] == (False, 15) and "D=0" in w.access["s-write"].reason


# ------------------------------------------------------------------ notes, flags, reads

def test_asid_global_and_privilege_notes():
    mem = Mem()
    build(mem, VA39, pte(FRAME, LEAF), extra={2: GL})
    w = walk_riscv(mem, state(asid=0x42), VA39)
    assert w.notes[0] == ("ASID 0x42 (satp[59:44]); this page is global (G=1 in the L2 PTE), "
                          "so no ASID tags it")
    w = walk_riscv(mem, state(priv=3, mstatus=MPRV | 1 << 11), VA39)
    assert w.notes[0].startswith("the hart is in M-mode") and "as S-mode's" in w.notes[0]
    assert not walk_riscv(mem, state(priv=0), VA39).notes[0].startswith("the hart")


def test_flags():
    mem = Mem()
    build(mem, VA39, pte(FRAME, V | R | X | U | GL | A | D | RSW(2)) | PBMT(2))
    w = walk_riscv(mem, state(), VA39)
    assert w.levels[-1].flags == ("V", "R", "X", "U", "G", "A", "D", "RSW=2", "PBMT=IO")
    assert w.levels[0].flags == ("V",)


def test_unreadable_table():
    mem = Mem()
    tables = build(mem, VA39, pte(FRAME, LEAF))
    mem.holes.add(tables[1] >> 12)
    w = walk_riscv(mem, state(), VA39, "s-write")
    assert w.fault.reason == UNREADABLE and w.fault.level == "L1"
    assert w.fault.error_code is None and len(w.levels) == 1
    assert all(not r.allowed and r.error_code is None for r in w.access.values())
    seen = []
    assert list(iter_mappings_riscv(mem, state(), on_unreadable=lambda *a: seen.append(a))) == []
    assert [(lvl, a) for lvl, a, _ in seen] == [("L1", tables[1])]


def test_iter_mappings_both_halves_in_order():
    mem = Mem()
    low, high = 0x1000, TOP - 2 * M + 0x3000
    build(mem, low, pte(0x100000, LEAF | U), at=0x81000000)
    build(mem, high, pte(0x200000, LEAF), at=0x82000000)
    build(mem, TOP - G, pte(0x40000000, V | R | X | A), leaf_level=1, at=0x82000000)
    s = state()
    mem.reads.clear()
    maps = list(iter_mappings_riscv(mem, s))
    assert mem.reads == [(ROOT, 4096), (0x81001000, 4096), (0x81002000, 4096),
                         (0x82001000, 4096), (0x82002000, 4096)]      # each table once
    assert [(m.va, m.pa, m.size, m.user) for m in maps] == [
        (low, 0x100000, 4 * K, True), (TOP - G, 0x40000000, 2 * M, False),
        (high, 0x200000, 4 * K, False)]
    assert [m.va for m in iter_mappings_riscv(mem, s, TOP - G + 1, TOP - 2 * M)] == [TOP - G]
    assert [m.va for m in iter_mappings_riscv(mem, s, 0x2000, TOP - G)] == []
    assert maps[0].levels_entries[-1] == pte(0x100000, LEAF | U)
    assert maps[0].flags == ("V", "R", "W", "U", "A", "D")
