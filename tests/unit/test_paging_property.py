"""Property tests: random page-table memory, random addresses, every mode.

The walkers are compared with reference translations written here independently: each mode is
unrolled by hand, finds its entries by slicing the address straight into byte offsets
(`(va >> 36) & 0xFF8` is the PML4 entry's offset) and forms the final address in one expression.
Memory is a small physical space whose entries hypothesis draws lazily, on first read, from a
mix of pointers into that space (so tables point at themselves and each other), large-page
frames, reserved bits and raw noise; pages past the end are unreadable.
"""

import bisect
import random

from hypothesis import event, given, settings, strategies as st

from .budget import examples

from qintrospect.errors import MemoryReadError
from qintrospect.paging import CpuState, iter_mappings, walk, walk_ept, walk_npt

BUDGET = examples(800)   # tests/unit/budget.py: QI_FUZZ_SCALE draws more
PAGES = 8                                  # readable physical memory: 32 KiB
ADDR = 0x000FFFFFFFFFF000

CR0 = (1 << 31) | (1 << 16) | 1            # PG, WP, PE
PSE, PAE, LA57 = 1 << 4, 1 << 5, 1 << 12
LME, LMA, NXE = 1 << 8, 1 << 10, 1 << 11


class Stop(Exception):
    """The reference's fault: (level name or None, reason)."""


# ---------------------------------------------------------------- random entries

BIG8 = [1 << 21, 5 << 21, 1 << 29, 1 << 30, 3 << 30, 7 << 29, (1 << 39) | (1 << 30)]
BIG4 = [1 << 22, 0xAC000000, 0xFFC00000]
EXTRA8 = [1 << 63, 1 << 62, 1 << 58, 0xF << 59, 1 << 51, 1 << 47, 1 << 45, 1 << 40, 1 << 39,
          1 << 29, 1 << 21, 1 << 20, 1 << 13, 1 << 12]
EXTRA4 = [1 << 21, 1 << 20, 1 << 17, 1 << 13, 0xA5 << 13, 0xFF << 13, 1 << 12]
EPT_TYPES = [6, 6, 0, 4, 1, 5, 2, 3, 7]


def make_entry(rnd, size, ept=False):
    """One entry from rnd(n) -> 0..n-1 (hypothesis draws, or a seeded Random): mostly present
    pointers into the small memory, sometimes a large-page frame, PS, a reserved or ignored
    high bit, not present, or raw noise. rnd() == 0 always picks the common case, since
    hypothesis leans towards 0."""
    if rnd(100) >= 97:
        return rnd(1 << (8 * size))
    big, extras = (BIG4, EXTRA4) if size == 4 else (BIG8, EXTRA8)
    frame = rnd(PAGES + 1) << 12 if rnd(5) < 4 else big[rnd(len(big))]
    extra = extras[rnd(len(extras))] if rnd(7) >= 5 else 0
    ps = 0x80 if rnd(5) >= (4 if ept else 3) else 0   # EPT: PS above PDPT is misconfigured
    if ept:
        rights = 7 if rnd(4) < 3 else rnd(8)    # 0: not present; 2, 6: W without R
        leafish = ps or rnd(8) == 7             # memory type and IPAT mostly where leaves are
        mt = EPT_TYPES[rnd(len(EPT_TYPES))] << 3 | rnd(2) << 6 if leafish else 0
        low = rights | mt | ps | rnd(4) << 8 | rnd(2) << 10
    else:
        present = 0 if rnd(12) == 11 else 1
        low = present | (rnd(0x80) & ~1) | ps | rnd(2) << 8
    return frame | low | extra


def make_pdpte(rnd):
    """A PAE PDPTE: the pointer of make_entry, with (mostly) only the bits a PDPTE may have."""
    e = make_entry(rnd, 8)
    return e if rnd(4) == 3 else e & ~0x1E6


def entries(size, ept=False):
    @st.composite
    def entry(draw):
        return make_entry(lambda n: draw(st.integers(0, n - 1)), size, ept)
    return entry()


entries8, entries4, ept_entries = entries(8), entries(4), entries(8, ept=True)
pdpt_entries = st.composite(lambda draw: make_pdpte(lambda n: draw(st.integers(0, n - 1))))()


class LazyMem:
    """PAGES pages of physical memory whose aligned words are drawn on first read.
    Calling it is the walker's read_phys (counted); `word` is the reference's own reader."""

    def __init__(self, data, strategy, size, special=None):
        self.data, self.strategy, self.size = data, strategy, size
        self.special = special or {}         # {address: strategy} for particular words
        self.words = {}
        self.reads = 0

    def word(self, addr):
        if addr < 0 or addr + self.size > PAGES * 4096:
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        assert addr % self.size == 0
        if addr not in self.words:
            strategy = self.special.get(addr, self.strategy)
            self.words[addr] = self.data.draw(strategy, label=f"word {addr:#x}")
        return self.words[addr]

    def __call__(self, addr, length):
        self.reads += 1
        assert length == self.size
        return self.word(addr).to_bytes(length, "little")


# ---------------------------------------------------------------- reference translations

def reader(mem):
    def rd(level, addr):
        try:
            return mem.word(addr)
        except MemoryReadError:
            raise Stop(level, "unreadable")
    return rd


def need(e, level, reserved):
    if not e & 1:
        raise Stop(level, "not-present")
    if e & reserved:
        raise Stop(level, "reserved-bit")


def done(entries, pa, size, nxe):
    return (pa, size, all(e & 2 for e in entries), all(e & 4 for e in entries),
            not (nxe and any(e >> 63 for e in entries)))


def ref_long(mem, root, va, m, nxe, five, gpa=False, page1gb=None):
    """4-level or 5-level (and NPT, where a guest-physical address is not sign-extended):
    entry offsets sliced straight out of the address. page1gb=False: PS in a PDPTE is reserved."""
    rd = reader(mem)
    top = 56 if five else 47
    if gpa and va >> (top + 1):
        raise Stop(None, "non-canonical")
    if not gpa and va >> top not in (0, (1 << (64 - top)) - 1):
        raise Stop(None, "non-canonical")
    r = ((1 << 52) - (1 << m)) | (0 if nxe else 1 << 63)
    path = []
    table = root & ADDR
    if five:
        e = rd("PML5", table | ((va >> 45) & 0xFF8))
        need(e, "PML5", r | 0x80)
        path.append(e)
        table = e & ADDR
    pml4e = rd("PML4", table | ((va >> 36) & 0xFF8))
    need(pml4e, "PML4", r | 0x80)
    pdpte = rd("PDPT", (pml4e & ADDR) | ((va >> 27) & 0xFF8))
    if pdpte & 0x81 == 0x81 and page1gb is not False:
        need(pdpte, "PDPT", r | 0x3FFFE000)
        return done(path + [pml4e, pdpte],
                    (pdpte & 0x000FFFFFC0000000) | (va & 0x3FFFFFFF), 1 << 30, nxe)
    need(pdpte, "PDPT", r | (0x80 if page1gb is False else 0))
    pde = rd("PD", (pdpte & ADDR) | ((va >> 18) & 0xFF8))
    if pde & 0x81 == 0x81:
        need(pde, "PD", r | 0x1FE000)
        return done(path + [pml4e, pdpte, pde],
                    (pde & 0x000FFFFFFFE00000) | (va & 0x1FFFFF), 1 << 21, nxe)
    need(pde, "PD", r)
    pte = rd("PT", (pde & ADDR) | ((va >> 9) & 0xFF8))
    need(pte, "PT", r)
    return done(path + [pml4e, pdpte, pde, pte], (pte & ADDR) | (va & 0xFFF), 1 << 12, nxe)


def ref_pae(mem, cr3, va, m, nxe, regs=None):
    """PAE; with regs, the PDPTE registers stand for the PDPT in memory."""
    rd = reader(mem)
    if va >> 32:
        raise Stop(None, "non-canonical")
    r = ((1 << 63) - (1 << m)) | (0 if nxe else 1 << 63)
    pdpte = regs[va >> 30] if regs else rd("PDPT", (cr3 & 0xFFFFFFE0) | ((va >> 27) & 0x18))
    need(pdpte, "PDPT", ((1 << 64) - (1 << m)) | 0x1C6)      # A (bit 5): QEMU sets it
    pde = rd("PD", (pdpte & ADDR) | ((va >> 18) & 0xFF8))
    if pde & 0x81 == 0x81:
        need(pde, "PD", r | 0x1FE000)
        return done([pde], (pde & 0x000FFFFFFFE00000) | (va & 0x1FFFFF), 1 << 21, nxe)
    need(pde, "PD", r)
    pte = rd("PT", (pde & ADDR) | ((va >> 9) & 0xFF8))
    need(pte, "PT", r)
    return done([pde, pte], (pte & ADDR) | (va & 0xFFF), 1 << 12, nxe)


def ref_32(mem, cr3, va, m, pse):
    rd = reader(mem)
    if va >> 32:
        raise Stop(None, "non-canonical")
    pde = rd("PD", (cr3 & 0xFFFFF000) | ((va >> 20) & 0xFFC))
    if pse and pde & 0x81 == 0x81:
        mm = max(32, min(m, 40))
        need(pde, "PD", 0x3FE000 & -(1 << (mm - 19)))
        return done([pde], (pde & 0xFFC00000) | ((pde >> 13) & 0xFF) << 32 | (va & 0x3FFFFF),
                    1 << 22, False)
    need(pde, "PD", 0)
    pte = rd("PT", (pde & 0xFFFFF000) | ((va >> 10) & 0xFFC))
    need(pte, "PT", 0)
    return done([pde, pte], (pte & 0xFFFFF000) | (va & 0xFFF), 1 << 12, False)


def ref_ept(mem, eptp, gpa, m, five, page1gb=None):
    """EPT: present = any of R/W/X; misconfigured = reserved bits, W without R, bad leaf type,
    bit 7 of a PDPTE without 1-GByte EPT pages (page1gb=False)."""
    rd = reader(mem)
    if gpa >> (57 if five else 48):
        raise Stop(None, "non-canonical")
    hi = (1 << 52) - (1 << m)

    def ok(e, level, reserved, leaf):
        if not e & 7:
            raise Stop(level, "ept-violation")
        if e & reserved or e & 3 == 2 or (leaf and (e >> 3) & 7 in (2, 3, 7)):
            raise Stop(level, "ept-misconfiguration")

    def result(path, pa, size):
        return (pa, size, all(e & 2 for e in path), all(e & 1 for e in path),
                all(e & 4 for e in path))

    path = []
    table = eptp & ADDR
    if five:
        e = rd("PML5", table | ((gpa >> 45) & 0xFF8))
        ok(e, "PML5", hi | 0xF8, False)
        path.append(e)
        table = e & ADDR
    pml4e = rd("PML4", table | ((gpa >> 36) & 0xFF8))
    ok(pml4e, "PML4", hi | 0xF8, False)
    pdpte = rd("PDPT", (pml4e & ADDR) | ((gpa >> 27) & 0xFF8))
    if pdpte & 7 and pdpte & 0x80 and page1gb is not False:
        ok(pdpte, "PDPT", hi | 0x3FFFF000, True)
        return result(path + [pml4e, pdpte],
                      (pdpte & 0x000FFFFFC0000000) | (gpa & 0x3FFFFFFF), 1 << 30)
    ok(pdpte, "PDPT", hi | 0x78 | (0x80 if page1gb is False else 0), False)
    pde = rd("PD", (pdpte & ADDR) | ((gpa >> 18) & 0xFF8))
    if pde & 7 and pde & 0x80:
        ok(pde, "PD", hi | 0x1FF000, True)
        return result(path + [pml4e, pdpte, pde],
                      (pde & 0x000FFFFFFFE00000) | (gpa & 0x1FFFFF), 1 << 21)
    ok(pde, "PD", hi | 0x78, False)
    pte = rd("PT", (pde & ADDR) | ((gpa >> 9) & 0xFF8))
    ok(pte, "PT", hi, True)
    return result(path + [pml4e, pdpte, pde, pte], (pte & ADDR) | (gpa & 0xFFF), 1 << 12)


def agree(w, ref, depth, mem):
    """The walker's answer equals the reference's; it read at most `depth` entries."""
    assert mem.reads <= depth
    try:
        want = ref()
    except Stop as stop:
        level, reason = stop.args
        event(f"fault: {reason} at {level}")
        assert w.fault is not None, (w.pa, level, reason)
        assert (w.fault.level, w.fault.reason) == (level, reason), w.fault.message
        assert w.pa is None and not w.ok
        assert len(w.levels) == mem.reads - (reason == "unreadable")
        return None
    assert w.fault is None, w.fault.message
    pa, size, *rights = want
    event(f"translated: {size >> 10} KiB page")
    assert (w.pa, w.page_size) == (pa, size)
    assert w.levels[-1].leaf and len(w.levels) == mem.reads
    return rights


# ---------------------------------------------------------------- address strategies

def indexed_address(levels, bits=9):
    """Indexes mostly from the low end of each table (where drawn tables overlap), an offset."""
    index = st.one_of(st.integers(0, 3), st.integers(0, (1 << bits) - 1))
    return st.builds(lambda idx, off: sum(i << (12 + bits * k)
                                          for k, i in enumerate(reversed(idx))) | off,
                     st.lists(index, min_size=levels, max_size=levels),
                     st.integers(0, 0xFFF))


def canonical(va_bits, levels):
    def sign(va, upper, noise, raw):
        if noise:
            return raw
        return va | (((1 << 64) - (1 << va_bits)) if upper else 0) | (upper << (va_bits - 1))
    return st.builds(sign, indexed_address(levels), st.booleans(),
                     st.integers(0, 9).map(lambda n: n == 0), st.integers(0, (1 << 64) - 1))


MAXPHYADDRS = st.sampled_from([None, 36, 40, 46, 52])
PAGE1GB = st.sampled_from([None, False, True])      # CPUID Page1GB: unknown, no, yes


def check_1g_notes(w, page1gb):
    """The 'unknown' note exactly where a 1 GiB page was accepted on an unknown Page1GB."""
    unknown = any("Page1GB unknown" in n for n in w.notes)
    assert unknown == (page1gb is None and w.page_size == 1 << 30), w.notes
    if page1gb is not False:
        assert not any("TCG does not check" in n for n in w.notes)


# ---------------------------------------------------------------- walk() against references

@BUDGET
@given(data=st.data(), va=canonical(48, 4), m=MAXPHYADDRS, nxe=st.booleans(),
       root=st.integers(0, PAGES), pcid=st.integers(0, 0xFFF), page1gb=PAGE1GB)
def test_4level_walk_matches_reference(data, va, m, nxe, root, pcid, page1gb):
    mem = LazyMem(data, entries8, 8)
    cpu = CpuState(cr0=CR0, cr3=root << 12 | pcid, cr4=PAE | (1 << 17),
                   efer=LME | LMA | (NXE if nxe else 0), maxphyaddr=m, page1gb=page1gb)
    w = walk(mem, cpu, va)
    rights = agree(w, lambda: ref_long(mem, cpu.cr3, va, m or 52, nxe, False,
                                       page1gb=page1gb), 4, mem)
    if rights:
        assert [w.writable, w.user, w.executable] == rights
    assert w.pcid == pcid and w.root == root << 12
    check_1g_notes(w, page1gb)


@BUDGET
@given(data=st.data(), va=canonical(57, 5), m=MAXPHYADDRS, nxe=st.booleans(),
       root=st.integers(0, PAGES), page1gb=PAGE1GB)
def test_5level_walk_matches_reference(data, va, m, nxe, root, page1gb):
    mem = LazyMem(data, entries8, 8)
    cpu = CpuState(cr0=CR0, cr3=root << 12, cr4=PAE | LA57,
                   efer=LME | LMA | (NXE if nxe else 0), maxphyaddr=m, page1gb=page1gb)
    w = walk(mem, cpu, va)
    rights = agree(w, lambda: ref_long(mem, cpu.cr3, va, m or 52, nxe, True,
                                       page1gb=page1gb), 5, mem)
    if rights:
        assert [w.writable, w.user, w.executable] == rights
    check_1g_notes(w, page1gb)


@BUDGET
@given(data=st.data(), va=st.one_of(indexed_address(3).map(lambda a: a & 0xFFFFFFFF),
                                    st.integers(0, (1 << 33) - 1)),
       m=MAXPHYADDRS, nxe=st.booleans(), cr3=st.integers(0, PAGES * 128 + 8).map(lambda n: n << 5),
       regs=st.one_of(st.none(), st.tuples(*[pdpt_entries] * 4)), page1gb=PAGE1GB)
def test_pae_walk_matches_reference(data, va, m, nxe, cr3, regs, page1gb):
    # regs: the PDPTE registers, when the source knows them (they stand for memory at CR3)
    mem = LazyMem(data, entries8, 8, {cr3 + 8 * k: pdpt_entries for k in range(4)})
    cpu = CpuState(cr0=CR0, cr3=cr3, cr4=PAE, efer=NXE if nxe else 0, maxphyaddr=m,
                   page1gb=page1gb, pdptes=regs)
    w = walk(mem, cpu, va)
    # with registers, walk() reads memory at the PDPTE only to compare, after the walk
    rights = agree(w, lambda: ref_pae(mem, cr3, va, m or 52, nxe, regs), 3, mem)
    if rights:
        assert [w.writable, w.user, w.executable] == rights
    pae = [n for n in w.notes if n.startswith("PAE: ")]
    assert len(pae) == (0 if va >> 32 else 1)
    if pae and regs is None:
        assert "read from memory" in pae[0]
    elif pae:
        at = cr3 + 8 * (va >> 30)
        held = mem.words.get(at)
        event("PDPTE register " + ("unreadable in memory" if held is None else
                                   "equal to memory" if held == regs[va >> 30] else
                                   "differs from memory"))
        assert f"PDPTE {va >> 30} is the CPU's PDPTE register ({regs[va >> 30]:#x})" in pae[0]
        assert ("could not be read" if held is None else "same value" if held == regs[va >> 30]
                else f"now holds {held:#x}") in pae[0]
    assert not any("Page1GB" in n for n in w.notes)


@BUDGET
@given(data=st.data(), va=st.one_of(indexed_address(2, bits=10), st.integers(0, (1 << 33) - 1)),
       m=MAXPHYADDRS, pse=st.booleans(), root=st.integers(0, PAGES),
       low=st.integers(0, 0xFFF))
def test_32bit_walk_matches_reference(data, va, m, pse, root, low):
    mem = LazyMem(data, entries4, 4)
    cpu = CpuState(cr0=CR0, cr3=root << 12 | low, cr4=PSE if pse else 0, efer=0, maxphyaddr=m)
    w = walk(mem, cpu, va)
    rights = agree(w, lambda: ref_32(mem, cpu.cr3, va, m or 52, pse), 2, mem)
    if rights:
        assert [w.writable, w.user, w.executable] == rights


@BUDGET
@given(data=st.data(), gpa=st.one_of(indexed_address(4), indexed_address(5),
                                     st.integers(0, (1 << 49) - 1)),
       m=st.sampled_from([36, 40, 46, 52]), five=st.booleans(), root=st.integers(0, PAGES),
       ad=st.booleans(), page1gb=PAGE1GB)
def test_ept_walk_matches_reference(data, gpa, m, five, root, ad, page1gb):
    mem = LazyMem(data, ept_entries, 8)
    eptp = root << 12 | 6 | ((4 if five else 3) << 3) | (ad << 6)
    w = walk_ept(mem, eptp, gpa, maxphyaddr=m, page1gb=page1gb)
    rights = agree(w, lambda: ref_ept(mem, eptp, gpa, m, five, page1gb), 5 if five else 4, mem)
    noted = any("1 GiB EPT page was accepted" in n for n in w.notes)
    assert noted == (page1gb is None and w.page_size == 1 << 30)
    if rights:
        w_ok, r_ok, x_ok = rights
        assert (w.writable, w.executable) == (w_ok, x_ok)
        assert {k: a.allowed for k, a in w.access.items()} == {
            "read": r_ok, "write": w_ok, "execute": x_ok}


@BUDGET
@given(data=st.data(), gpa=st.one_of(indexed_address(4), st.integers(0, (1 << 50) - 1)),
       m=st.sampled_from([36, 40, 46, 52]), nxe=st.booleans(), root=st.integers(0, PAGES),
       page1gb=PAGE1GB)
def test_npt_walk_matches_reference(data, gpa, m, nxe, root, page1gb):
    mem = LazyMem(data, entries8, 8)
    w = walk_npt(mem, root << 12, gpa, maxphyaddr=m, nxe=nxe, page1gb=page1gb)
    rights = agree(w, lambda: ref_long(mem, root << 12, gpa, m, nxe, False, gpa=True,
                                       page1gb=page1gb), 4, mem)
    check_1g_notes(w, page1gb)
    if rights:
        writable, user, executable = rights
        assert (w.writable, w.user, w.executable) == (writable, user, executable)
        assert w.access["read"].allowed == user
        assert w.access["write"].allowed == (user and writable)


# ---------------------------------------------------------------- iter_mappings against walk()

SLOTS8 = [0, 1, 2, 3, 255, 256, 257, 510, 511]
SLOTS4 = [0, 1, 2, 3, 511, 512, 1022, 1023]


def random_tables(rng, size, slots):
    """PAGES pages, each with 1 to 5 entries at `slots`, made like the lazy ones above."""
    mem = bytearray(PAGES * 4096)
    for page in range(PAGES):
        for slot in rng.sample(slots, rng.randint(1, 5)):
            at = page * 4096 + slot * size
            mem[at:at + size] = make_entry(rng.randrange, size).to_bytes(size, "little")
    return mem


class CountingMem:
    def __init__(self, buf):
        self.buf = buf
        self.reads = []

    def __call__(self, addr, length):
        self.reads.append((addr, length))
        if addr < 0 or addr + length > len(self.buf):
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        return bytes(self.buf[addr:addr + length])


def check_iter_against_walk(rng, buf, cpu, va_bits, slots, bits):
    mem = CountingMem(buf)
    maps = list(iter_mappings(mem, cpu))
    event("mappings: " + ("0" if not maps else "1-9" if len(maps) < 10 else "10+"))
    # one read per table, whole tables only
    assert len(mem.reads) == len(set(mem.reads))
    assert all(n in (4096, 32) for _, n in mem.reads)
    # address order, no overlap
    assert all(a.va + a.size <= b.va for a, b in zip(maps, maps[1:]))
    for mp in rng.sample(maps, min(len(maps), 12)):
        off = rng.randrange(mp.size) & ~7
        w = walk(mem, cpu, mp.va + off)
        assert w.ok and (w.pa, w.page_size) == (mp.pa + off, mp.size)
        assert (w.writable, w.user, w.executable) == (mp.writable, mp.user, mp.executable)
        assert tuple(s.entry for s in w.levels) == mp.levels_entries
        assert w.levels[-1].flags == mp.flags
    # the other way: sampled addresses that translate are inside a listed mapping
    starts = [mp.va for mp in maps]
    widths = {(32, 10): [10, 10], (32, 9): [2, 9, 9], (48, 9): [9] * 4, (57, 9): [9] * 5}
    for _ in range(12):
        va, shift = rng.randrange(4096), 12
        for width in reversed(widths[va_bits, bits]):
            va |= (rng.choice(slots) if width == bits else rng.randrange(1 << width)) << shift
            shift += width
        if va_bits > 32 and va >> (va_bits - 1):
            va |= (1 << 64) - (1 << va_bits)
        w = walk(mem, cpu, va)
        k = bisect.bisect_right(starts, va) - 1
        inside = k >= 0 and va < maps[k].va + maps[k].size
        assert w.ok == inside, (hex(va), w.fault)
        if inside:
            assert w.pa == maps[k].pa + va - maps[k].va
    # a sub-range lists exactly the mappings that overlap it
    if maps:
        a, b = sorted(rng.choice(starts) + rng.choice([0, 1, 0x1000]) for _ in range(2))
        sub = list(iter_mappings(CountingMem(buf), cpu, start=a, end=b))
        assert sub == [mp for mp in maps if mp.va < b and mp.va + mp.size > a and a < b]


@BUDGET
@given(seed=st.integers(0, 2 ** 32), five=st.booleans(), nxe=st.booleans(),
       m=st.sampled_from([40, 46, 52]), root=st.integers(0, PAGES - 1), page1gb=PAGE1GB)
def test_iter_mappings_agrees_with_walk_long(seed, five, nxe, m, root, page1gb):
    rng = random.Random(seed)
    buf = random_tables(rng, 8, SLOTS8)
    cpu = CpuState(cr0=CR0, cr3=root << 12, cr4=PAE | (LA57 if five else 0),
                   efer=LME | LMA | (NXE if nxe else 0), maxphyaddr=m, page1gb=page1gb)
    check_iter_against_walk(rng, buf, cpu, 57 if five else 48, SLOTS8, 9)


@BUDGET
@given(seed=st.integers(0, 2 ** 32), pae=st.booleans(), pse=st.booleans(), nxe=st.booleans(),
       root=st.integers(0, PAGES - 1))
def test_iter_mappings_agrees_with_walk_32bit_and_pae(seed, pae, pse, nxe, root):
    rng = random.Random(seed)
    if pae:
        buf = random_tables(rng, 8, SLOTS8)
        cr3 = root << 12 | rng.randrange(0, 128) << 5
        for k in range(4):                 # the PDPT: four PDPTEs at CR3[31:5]
            buf[cr3 + 8 * k:cr3 + 8 * k + 8] = make_pdpte(rng.randrange).to_bytes(8, "little")
        # sometimes PDPTE registers that differ from memory (the guest changed the PDPT since)
        regs = tuple(make_pdpte(rng.randrange) for _ in range(4)) if rng.randrange(3) else None
        cpu = CpuState(cr0=CR0, cr3=cr3, cr4=PAE, efer=NXE if nxe else 0, maxphyaddr=52,
                       pdptes=regs)
        check_iter_against_walk(rng, buf, cpu, 32, SLOTS8, 9)
    else:
        buf = random_tables(rng, 4, SLOTS4)
        cpu = CpuState(cr0=CR0, cr3=root << 12, cr4=PSE if pse else 0, efer=0, maxphyaddr=40)
        check_iter_against_walk(rng, buf, cpu, 32, SLOTS4, 10)


# ---------------------------------------------------------------- the access table

SMEP, SMAP, PKE, PKS = 1 << 20, 1 << 21, 1 << 22, 1 << 24
KINDS = [(who, op) for who in ("supervisor", "user") for op in ("read", "write", "execute")]


def ref_access(who, op, rights, cr0, cr4, efer, key, pkru, pkrs):
    """SDM 4.6 for one access kind at a translated address, written out by hand:
    (allowed, #PF error code or None, whether an unknown key register leaves it open)."""
    w, u, x = rights
    wp, smep, smap = cr0 >> 16 & 1, cr4 & SMEP, cr4 & SMAP
    user, write, fetch = who == "user", op == "write", op == "execute"
    if user:
        paging_denies = not u or (write and not w) or (fetch and not x)
    elif fetch:
        paging_denies = not x or (u and smep)
    else:
        paging_denies = (u and smap) or (write and not w and wp)
    # PKRU keys user-mode addresses (CR4.PKE), IA32_PKRS supervisor-mode ones (CR4.PKS)
    applies = (cr4 & PKE) if u else (cr4 & PKS)
    register = pkru if u else pkrs
    pk = open_ = False
    if applies and not fetch:
        if register is None:
            open_ = not paging_denies
        else:
            ad, wd = register >> (2 * key) & 1, register >> (2 * key + 1) & 1
            pk = bool(ad or (wd and write and (wp or (user and u))))
    if not (paging_denies or pk):
        return True, None, open_
    code = 1 | (2 if write else 0) | (4 if user else 0) | (32 if pk else 0)
    if fetch and (smep or efer & NXE):
        code |= 16
    return False, code, open_


@BUDGET
@given(flags=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=4,
                      max_size=4),
       key=st.integers(0, 15), wp=st.booleans(), nxe=st.booleans(),
       cr4=st.sets(st.sampled_from([SMEP, SMAP, PKE, PKS])).map(sum),
       pkru=st.one_of(st.none(), st.integers(0, (1 << 32) - 1)),
       pkrs=st.one_of(st.none(), st.integers(0, (1 << 32) - 1)))
def test_access_table_matches_reference(flags, key, wp, nxe, cr4, pkru, pkrs):
    """R/W, U/S and XD drawn per level of a 4 KiB 4-level path, the leaf's key, every control
    bit and both key registers (None = unknown): each access kind as the SDM says."""
    buf = bytearray(5 * 4096)
    for k, (rw, us, xd) in enumerate(flags):
        e = ((k + 2) << 12) | 1 | (rw << 1) | (us << 2) | ((xd and nxe) << 63)  # XD needs NXE
        e |= key << 59 if k == 3 else 0                      # the leaf's protection key
        buf[(k + 1) * 4096:(k + 1) * 4096 + 8] = e.to_bytes(8, "little")
    cr0 = CR0 if wp else CR0 & ~(1 << 16)
    efer = LME | LMA | (NXE if nxe else 0)
    cpu = CpuState(cr0=cr0, cr3=0x1000, cr4=PAE | cr4, efer=efer, maxphyaddr=52, pkru=pkru,
                   pkrs=pkrs)
    w = walk(lambda a, n: bytes(buf[a:a + n]), cpu, 0x123)
    assert w.ok and w.pa == 0x5123
    rights = (all(f[0] for f in flags), all(f[1] for f in flags),
              not (nxe and any(f[2] for f in flags)))
    assert (w.writable, w.user, w.executable) == rights
    for who, op in KINDS:
        got = w.access[f"{who}-{op}"]
        allowed, code, open_ = ref_access(who, op, rights, cr0, cr4, efer, key, pkru, pkrs)
        assert (got.allowed, got.error_code) == (allowed, code), (who, op, got.reason)
        assert bool(got.reason) == (not allowed)
        assert bool(got.unknown) == open_, (who, op, got.unknown)
        if open_:
            event(f"unknown {'PKRU' if rights[1] else 'IA32_PKRS'} leaves an access open")
            assert f"protection key {key} of this" in got.unknown
        if code and code & 32:
            event("PK in an error code")
    keyed = (cr4 & PKE) if rights[1] else (cr4 & PKS)
    assert any(f == f"PK={key}" for f in w.levels[-1].flags) == bool(cr4 & (PKE | PKS))
    assert any("unknown: protection key" in n for n in w.notes) == bool(
        keyed and (pkru if rights[1] else pkrs) is None)
