"""An aarch64 vCPU's translation regime as its registers choose it (machine.arm64.Arm64Vcpu:
EL1&0, a VHE host's EL2&0, EL2's own; the stage 2 of a guest that runs) and the two-stage
walk translate makes of it (commands.translate._walk over memory.stage2.Stage2Memory): the
guest's stage 1 tables are at IPAs, read through stage 2, and the IPA goes through stage 2.
Tables built here; the expected values follow the Arm ARM (D8.1 regimes, HCR_EL2.{VM,TGE,E2H})."""

import pytest

from qintrospect import paging
from qintrospect.commands.translate import Translation, _walk
from qintrospect.errors import UsageError
from qintrospect.machine.arm64 import Arm64Vcpu

from .test_arm64_walk import AF, TBL, Mem, mmfr0, mmfr1, mmfr2, tcr

HCR_VM, HCR_TGE, HCR_E2H = 1 << 0, 1 << 27, 1 << 34
GUEST_HCR = HCR_VM | HCR_E2H | 1 << 31           # KVM's guest HCR (VHE host): VM, RW, E2H
HOST_HCR = HCR_E2H | HCR_TGE | 1 << 31           # a VHE host's own
VTCR = 24 | 1 << 6 | 0b101 << 16 | 1 << 31       # 40-bit IPA, 4K, start level 1, 48-bit PA
S2_ROOT = 0x80000                                # two concatenated level 1 tables (8 KiB)
S2_LEAF = AF | 3 << 8 | 0xF << 2 | 3 << 6 | TBL  # a page: AF, inner, Normal WB, S2AP RW
IPA_BASE, PA_BASE = 0x40000000, 0x7000000        # the guest's RAM, and where L1 keeps it


def cpsr(el):
    return 0x3c0 | el << 2 | 1


def vcpu(el=1, hcr=GUEST_HCR, **kw):
    regs = dict(ttbr0=0x11000, ttbr1=0x12000, tcr=tcr(), sctlr=1, mair=0xff, cpsr=cpsr(el),
                id_aa64mmfr0=mmfr0(), id_aa64mmfr1=mmfr1(), id_aa64mmfr2=mmfr2(st=1),
                hcr=hcr, vttbr=1 << 48 | S2_ROOT, vtcr=VTCR, ttbr0_el2=0x21000,
                ttbr1_el2=0x22000, tcr_el2=tcr(), sctlr_el2=1, mair_el2=0xff)
    regs.update(kw)
    return Arm64Vcpu(0, None, None, **regs)


@pytest.mark.parametrize("el, hcr, regime, stage2", [
    (1, GUEST_HCR, "EL1&0", True),          # KVM's guest running
    (0, GUEST_HCR, "EL1&0", True),          # ... its user space
    (2, HOST_HCR, "EL2&0", False),          # a VHE host's kernel
    (0, HOST_HCR, "EL2&0", False),          # a VHE host's process (TGE routes EL0 there)
    (2, 1 << 31, "EL2", False),             # a non-VHE hypervisor at EL2
    (3, GUEST_HCR, "EL3", False),           # the secure monitor's own regime
    (1, 1 << 31, "EL1&0", False),           # EL2 present, no guest (VM=0)
    (1, GUEST_HCR | HCR_TGE, "EL1&0", False),   # TGE: stage 2 off for EL1&0
    (1, None, "EL1&0", False),              # no EL2 shown
])
def test_the_regime_and_a_live_stage2_from_cpsr_and_hcr(el, hcr, regime, stage2):
    v = vcpu(el, hcr)
    assert v.regime == regime
    assert (v.stage2 is not None) == stage2
    state = v.state
    if regime == "EL2&0":       # the VHE host's own registers are walked
        assert (state.ttbr0, state.ttbr1, state.regime) == (0x21000, 0x22000, "EL2&0")
        assert paging.root_register_name(state, 0) == "TTBR0_EL2" and v.cr3 == 0x21000
    else:
        assert (state.ttbr0, state.ttbr1) == (0x11000, 0x12000)
        assert paging.root_register_name(state, 0xffff << 48) == "TTBR1_EL1"
    if regime in ("EL2", "EL3"):
        with pytest.raises(UsageError, match=f"at {regime}"):
            paging.require_walkable(state)
        assert "not walked" in v.mode
    else:
        paging.require_walkable(state)


def test_a_stale_vttbr_is_shown_but_not_used():
    """VTTBR_EL2 keeps the last guest's root after the guest stops running."""
    v = vcpu(2, HOST_HCR)
    d = v.to_dict()["el2"]
    assert d["vttbr_el2"] == hex(1 << 48 | S2_ROOT) and not d["stage2_live"] and v.stage2 is None


class FakeVm:
    def __init__(self, mem, regs):
        self.memory = type("M", (), {"read": staticmethod(mem), "name": "test"})()
        self.stage2 = regs


def stage2_map(mem, ipa, pa):
    """One 4 KiB stage 2 page IPA -> PA (level 1 at S2_ROOT, tables below 0x90000)."""
    l1 = S2_ROOT + 8 * (ipa >> 30 & 0x3FF)        # 10 bits: two concatenated tables
    l2_table = 0x90000 + (ipa >> 30 & 0x3FF) * 0x2000
    l3_table = l2_table + 0x1000
    mem.put(l1, l2_table | TBL)
    mem.put(l2_table + 8 * (ipa >> 21 & 0x1FF), l3_table | TBL)   # one L3 per L1 entry
    mem.put(l3_table + 8 * (ipa >> 12 & 0x1FF), pa | S2_LEAF)


def two_stage_tables():
    """A guest whose stage 1 (4 KiB, 48-bit) maps VA 0x1000 to IPA 0x40005000; its tables are
    at IPAs 0x40001000.. (root at 0x40001000), each IPA page at PA_BASE + (IPA - IPA_BASE)."""
    mem = Mem()
    for k in range(8):
        stage2_map(mem, IPA_BASE + k * 0x1000, PA_BASE + k * 0x1000)
    pa = lambda ipa: PA_BASE + ipa - IPA_BASE      # noqa: E731
    s1 = [0x40001000, 0x40002000, 0x40003000, 0x40004000]       # L0..L3 tables, at IPAs
    for level, table in enumerate(s1[:-1]):
        mem.put(pa(table), s1[level + 1] | TBL)                 # index 0 at each level
    mem.put(pa(s1[3]) + 8, 0x40005000 | AF | TBL | 3 << 8)      # L3 index 1: VA 0x1000
    mem.put(pa(0x40005000) + 0x10, 0x1234)
    return mem, s1[0]


def test_stage1_tables_are_read_through_stage2_and_the_ipa_walked_through_it():
    mem, root = two_stage_tables()
    v = vcpu(1, GUEST_HCR, ttbr0=root)
    walk, s2 = _walk(FakeVm(mem, v.stage2), v.state, 0x1010)
    assert walk.ok and walk.pa == 0x40005010                   # stage 1: the IPA
    assert [s.entry_addr for s in walk.levels] == [0x40001000, 0x40002000, 0x40003000,
                                                   0x40004008]  # the tables' IPAs
    assert s2.ipa == 0x40005010 and s2.walk.ok and s2.walk.pa == PA_BASE + 0x5010
    t = Translation(gva=0x1010, vcpu=0, cr3=root, walk=walk, stage2=s2)
    assert t.ok and t.gpa == PA_BASE + 0x5010 and t.page_size == 4096 and t.writable
    # every table read was a PA that stage 2 gave (never an IPA read as a PA)
    assert not [a for a, _ in mem.reads if IPA_BASE <= a < IPA_BASE + (1 << 30)]


def test_a_stage1_table_with_no_stage2_mapping_is_a_fault_that_says_so():
    mem, root = two_stage_tables()
    mem.put(PA_BASE + 0x2000, 0x40900000 | TBL)     # L1 table at an IPA stage 2 lacks
    v = vcpu(1, GUEST_HCR, ttbr0=root)
    walk, s2 = _walk(FakeVm(mem, v.stage2), v.state, 0x1010)
    assert not walk.ok and s2 is None
    assert "no stage 2 translation" in walk.fault.message


def test_stage1_off_makes_the_va_the_ipa():
    mem, _ = two_stage_tables()
    v = vcpu(1, GUEST_HCR, sctlr=0)
    walk, s2 = _walk(FakeVm(mem, v.stage2), v.state, 0x40005010)
    assert not walk.ok and s2.stage1_off and s2.ipa == 0x40005010
    t = Translation(gva=0x40005010, vcpu=0, cr3=0, walk=walk, stage2=s2)
    assert t.ok and t.gpa == PA_BASE + 0x5010 and t.writable
    d = t.to_dict()
    assert d["ipa"] == "0x40005010" and d["stage2"]["stage1_off"] and d["gpa"] == \
        hex(PA_BASE + 0x5010)
    # an IPA stage 2 does not map: a stage 2 fault, said as such
    walk, s2 = _walk(FakeVm(mem, v.stage2), v.state, 0x40900000)
    t = Translation(gva=0x40900000, vcpu=0, cr3=0, walk=walk, stage2=s2)
    assert not t.ok and t.to_dict()["fault"]["stage"] == 2


@pytest.mark.parametrize("vttbr, vtcr", [
    ((1 << 64) - 1, (1 << 64) - 1),          # every bit set
    (0, 0),                                  # T0SZ 0: a 64-bit IPA, SL0 0
    (1 << 48 | 0x7fff_ffff_f000, VTCR),      # a root far beyond RAM
    (1 << 48 | S2_ROOT | 0xff0, VTCR),       # BADDR's low bits set (misaligned)
])
def test_crafted_stage2_registers_give_a_fault_or_an_answer_never_an_exception(vttbr, vtcr):
    from qintrospect.present.render import translation_text
    mem, _ = two_stage_tables()
    v = vcpu(1, GUEST_HCR, sctlr=0, vttbr=vttbr, vtcr=vtcr)
    walk, s2 = _walk(FakeVm(mem, v.stage2), v.state, 0x40005010)
    t = Translation(gva=0x40005010, vcpu=0, cr3=0, walk=walk, stage2=s2,
                    root_name="TTBR0_EL1")
    d = t.to_dict()
    assert d["stage2"]["vttbr_el2"] == hex(vttbr)
    text = translation_text(t)
    assert "stage 2" in text
    if not t.ok:
        assert d["fault"]["stage"] == 2 and "stage 2" in text
    from qintrospect.present.cpus import arm64_cpu_text
    assert "HCR_EL2" in arm64_cpu_text(v)


def test_a_guest_with_its_mmu_off_maps_what_stage2_maps():
    """vmmap/search of a guest whose stage 1 is off: its addresses are its IPAs, its leaves
    stage 2's (paging.arm64_vector.leaf_arrays_stage2), equal to iter_mappings_stage2's; a
    guest with stage 1 on is still refused (one stage at a time)."""
    from qintrospect.commands.api import Commands
    from qintrospect.commands.vmmap import from_leaves, iter_rows
    from qintrospect.paging.arm64_stage2 import iter_mappings_stage2
    mem, _ = two_stage_tables()
    # IPA 2 GiB: a 1 GiB block, read-only (S2AP=01)
    mem.put(S2_ROOT + 8 * 2, 0x80000000 | (S2_LEAF & ~(3 << 6) & ~3) | 1 << 6 | 1)
    v = vcpu(1, GUEST_HCR, sctlr=0)

    class Vm(Commands):
        vcpu, vcpu_info, cpu = 0, [v], v.state
        memory = type("M", (), {"read": staticmethod(mem), "name": "test"})()

        def check_open(self):
            pass

        def cpu_state(self, cr3=None):
            return self.cpu if cr3 is None else paging.with_root(self.cpu, cr3)
    la = Vm().leaf_arrays()
    want = list(iter_mappings_stage2(mem, v.vttbr, v.vtcr, hcr=v.hcr))
    assert [(m.va, m.pa, m.size, m.writable) for m in la.mappings()] == \
        [(m.va, m.pa, m.size, m.writable) for m in want]
    assert len(la) == 9 and la.va[0] == IPA_BASE and la.pa[0] == PA_BASE
    assert la.readable.all() and not la.writable[-1] and la.size[-1] == 1 << 30
    rows = list(iter_rows(from_leaves(la), la.format))
    assert rows[-1].perms == "r-x" and "S2AP=01" in rows[-1].flags     # XN=00
    assert Vm().leaf_arrays(start=IPA_BASE + 0x3000, end=IPA_BASE + 0x5000).va.tolist() == \
        [IPA_BASE + 0x3000, IPA_BASE + 0x4000]
    # stage 1 on: its leaves (tables at IPAs) through stage 2
    _, root = two_stage_tables()
    on = vcpu(1, GUEST_HCR, ttbr0=root)
    Vm.vcpu_info, Vm.cpu = [on], on.state
    la = Vm().leaf_arrays()
    assert [(m.va, m.pa, m.size) for m in la.mappings()] == [(0x1000, PA_BASE + 0x5000, 4096)]
    assert la.ipa.tolist() == [0x40005000] and la.writable.all()


def test_stage1_pieces_through_stage2_leaves():
    """compose_stages: a 1 GiB stage 1 block over stage 2 pages, a block and holes; a 4 KiB
    stage 1 page inside a 2 MiB stage 2 block; rights as both stages give them."""
    import numpy as np
    from qintrospect.paging.arm64_vector import Arm64LeafArrays, compose_stages
    from qintrospect.paging.vector import LeafArrays
    u64, G, M2 = np.uint64, 1 << 30, 2 << 20

    def arrays(cls, rows, **kw):          # rows: (va, pa, size, writable, executable)
        n = len(rows)
        col = lambda k, t: np.array([r[k] for r in rows], t)      # noqa: E731
        return cls(col(0, u64), col(1, u64), col(2, u64), np.arange(n, dtype=u64),
                   col(3, bool), np.ones(n, bool), col(4, bool), np.zeros(n, np.int8),
                   np.zeros((n, 4), u64), None, None, **kw)
    s1 = arrays(Arm64LeafArrays, [(0x4000_0000, 0x4000_0000, G, True, True),     # identity
                                  (0x1000, 0x4020_3000, 4096, True, False)],    # into a block
                select=np.zeros(2, np.uint8))
    s2 = arrays(LeafArrays, [(0x4000_0000, 0x900_0000, 4096, True, False),
                             (0x4000_2000, 0x900_2000, 4096, False, True),
                             (0x4020_0000, 0xA00_0000, M2, True, True),
                             (0x8000_0000, 0xB00_0000, 4096, True, True)])   # outside both
    c = compose_stages(s1, s2)
    got = list(zip(c.va.tolist(), c.pa.tolist(), c.size.tolist(), c.writable.tolist(),
                   c.executable.tolist(), c.ipa.tolist()))
    assert got == [(0x4000_0000, 0x900_0000, 4096, True, False, 0x4000_0000),
                   (0x4000_2000, 0x900_2000, 4096, False, True, 0x4000_2000),
                   (0x4020_0000, 0xA00_0000, M2, True, True, 0x4020_0000),
                   (0x1000, 0xA00_3000, 4096, True, False, 0x4020_3000)]
    assert c.select.tolist() == [0, 0, 0, 0] and c.entry.tolist() == [0, 0, 0, 1]
    empty = compose_stages(s1, arrays(LeafArrays, []))
    assert len(empty) == 0 and empty.ipa.tolist() == []
