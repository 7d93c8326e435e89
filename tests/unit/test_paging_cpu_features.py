"""What the CPU has and holds beyond CR0/CR3/CR4/EFER, and what the walkers do when it is
unknown (issue 11): 1 GiB pages (CPUID Page1GB, EPT capability, host Page1GB for NPT),
supervisor protection keys (CR4.PKS, IA32_PKRS), unknown PKRU/PKRS in AccessResult.unknown,
and the PAE PDPTE registers."""

import json
from qintrospect.record import replace

import pytest

from qintrospect.paging import (
    CpuState, iter_mappings, leaf_arrays, walk, walk_array, walk_ept, walk_npt,
)
from qintrospect.paging import modes
from tests.unit.test_paging import (
    CR4_PKE, E_ID, E_P, E_PK, E_RSVD, E_U, E_W, FRAME, GIB1, MIB2, P, PS, RW, T, US,
    VA, Mem, chain, codes, cpu64, cpupae, ept_chain, idx, pae_chain, pae_va,
)

NO_1G = "PS in a PDPTE: this CPU has no 1-GByte pages (CPUID.80000001H:EDX.Page1GB=0)"
UNKNOWN_1G = "CPUID Page1GB unknown: the 1 GiB page was accepted"
R, W, X, WB = 1, 2, 4, 6 << 3
CR4_PKS = 1 << 24
EPTP = 0x1000 | 6 | (3 << 3)

VA_1G = idx(0, 1, 0, 0, 0x1234)


def one_gib(mem=None, leaf_flags=P | RW, extra=None, levels=4):
    mem = mem or Mem()
    va = VA_1G if levels == 4 else idx(0, 0, 1, 0, 0, 0x1234)
    chain(mem, va, levels, levels - 3, 0xC0000000, leaf_flags=leaf_flags, extra=extra)
    return mem, va


def tcg_noted(w):
    return any("TCG" in n and "1 GiB page" in n and "#PF with RSVD" in n for n in w.notes)


# ------------------------------------------------------------------ 1 GiB pages, guest paging

@pytest.mark.parametrize("five", [False, True])
def test_1g_page_without_page1gb_is_a_reserved_bit_fault(five):
    mem, va = one_gib(levels=5 if five else 4)
    cpu = replace(cpu64(la57=five), page1gb=False)
    w = walk(mem, cpu, va)
    assert (w.fault.level, w.fault.reason) == ("PDPT", "reserved-bit")
    assert "bit(s) 7 set" in w.fault.message and NO_1G in w.fault.message
    assert w.fault.error_code == E_P | E_RSVD
    assert codes(w)["user-write"] == (False, E_P | E_RSVD | E_U | E_W)
    assert codes(w)["supervisor-execute"] == (False, E_P | E_RSVD | E_ID)
    step = w.levels[-1]
    assert step.name == "PDPT" and not step.leaf and step.page_size is None and "PS" in step.flags
    # QEMU's TCG would map it: the walk says its answer is the hardware's
    assert tcg_noted(w) and not any(UNKNOWN_1G in n for n in w.notes)
    d = json.loads(json.dumps(w.to_dict()))
    assert d["fault"]["error_code"] == hex(E_P | E_RSVD)


def test_1g_page_without_page1gb_no_tcg_note_when_tcg_faults_too():
    # bit 13 set: reserved in a 1 GiB page entry, so TCG faults as well -- no TCG note
    mem, va = one_gib(extra={1: 1 << 13})
    w = walk(mem, replace(cpu64(), page1gb=False), va)
    assert w.fault.reason == "reserved-bit" and not tcg_noted(w)
    # a not-present PDPTE with PS: not-present, whatever Page1GB says, and no note
    mem, va = one_gib(leaf_flags=RW)
    w = walk(mem, replace(cpu64(), page1gb=False), va)
    assert w.fault.reason == "not-present" and not tcg_noted(w)
    assert not any("Page1GB" in n for n in w.notes)


def test_1g_page_with_page1gb_unknown_is_accepted_with_a_note():
    mem, va = one_gib()
    w = walk(mem, cpu64(), va)                       # page1gb=None
    assert w.ok and w.page_size == GIB1 and w.pa == 0xC0000000 | (va & (GIB1 - 1))
    assert UNKNOWN_1G in w.notes
    w = walk(mem, replace(cpu64(), page1gb=True), va)
    assert w.ok and w.page_size == GIB1 and UNKNOWN_1G not in w.notes
    assert not tcg_noted(w)


def test_page1gb_unknown_note_only_where_a_1g_leaf_is_met():
    mem = Mem()
    chain(mem, VA, 4, 2, 0x40000000, leaf_flags=P | RW)          # a 2 MiB page
    w = walk(mem, cpu64(), VA)
    assert w.ok and w.page_size == MIB2 and UNKNOWN_1G not in w.notes
    chain(mem, VA, 4, 3, FRAME)                                   # a 4 KiB page
    assert UNKNOWN_1G not in walk(mem, cpu64(), VA).notes
    assert UNKNOWN_1G not in walk(Mem(), cpu64(), VA).notes      # not present
    # 2 MiB pages are fine without Page1GB
    mem = Mem()
    chain(mem, VA, 4, 2, 0x40000000, leaf_flags=P | RW)
    w = walk(mem, replace(cpu64(), page1gb=False), VA)
    assert w.ok and w.page_size == MIB2 and not w.notes


def test_page1gb_does_not_touch_pae_or_32bit():
    mem = Mem()
    va = pae_va(1, 3, 9, 0x321)
    pae_chain(mem, va, leaf_level=1, frame=0x600000, leaf_flags=P)
    for page1gb in (None, False, True):
        w = walk(mem, replace(cpupae(cr3=0x1020), page1gb=page1gb), va)
        assert w.ok and w.page_size == MIB2
        assert not any("Page1GB" in n for n in w.notes)


def test_format_cache_is_keyed_on_page1gb():
    # the same mode and MAXPHYADDR, walked with each answer in turn: no stale format
    mem, va = one_gib()
    for page1gb in (True, False, None, False, True):
        w = walk(mem, replace(cpu64(), page1gb=page1gb), va)
        assert w.ok == (page1gb is not False)


def test_whole_space_maps_and_batches_treat_no_page1gb_as_walk_does():
    mem, va = one_gib()
    va2 = idx(0, 2, 3, 0, 0)                               # and a 2 MiB page beside it
    mem.put(0x2000 + 8 * 2, 0x5000 | T)
    mem.put(0x5000 + 8 * 3, 0x40000000 | P | RW | PS)
    for page1gb, sizes in ((None, [GIB1, MIB2]), (True, [GIB1, MIB2]), (False, [MIB2])):
        cpu = replace(cpu64(), page1gb=page1gb)
        maps = list(iter_mappings(mem, cpu))
        assert sorted(m.size for m in maps) == sorted(sizes)
        la = leaf_arrays(mem, cpu)
        assert list(la.mappings()) == maps
        out = walk_array(mem, cpu, [va, va2])
        w = walk(mem, cpu, va)
        assert bool(out.ok[0]) == w.ok
        assert out.reason(0) == (w.fault.reason if w.fault else None)
        assert out.level_name(0) == (w.fault.level if w.fault else None)
        assert out.page_size.tolist() == [GIB1 if w.ok else 0, MIB2]
    out = walk_array(mem, replace(cpu64(), page1gb=False), [va])
    assert out.reason(0) == "reserved-bit" and out.level_name(0) == "PDPT"


# ------------------------------------------------------------------ 1 GiB pages, EPT and NPT

def test_ept_1g_page_and_the_capability():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    ept_chain(mem, gpa, 1, 0x40000000)
    w = walk_ept(mem, EPTP, gpa)                                  # capability unknown
    assert w.ok and w.page_size == GIB1
    assert any("IA32_VMX_EPT_VPID_CAP" in n and "1 GiB" in n for n in w.notes)
    w = walk_ept(mem, EPTP, gpa, page1gb=True)
    assert w.ok and w.page_size == GIB1 and not w.notes
    mem = Mem()
    ept_chain(mem, gpa, 1, 0x40000000, leaf=R | W | X)            # no memory type bits
    assert walk_ept(mem, EPTP, gpa).ok
    w = walk_ept(mem, EPTP, gpa, page1gb=False)
    assert (w.fault.level, w.fault.reason) == ("PDPT", "ept-misconfiguration")
    assert "misconfigured: bit(s) 7 set" in w.fault.message
    assert "no 1-GByte EPT pages (IA32_VMX_EPT_VPID_CAP bit 17 = 0)" in w.fault.message
    assert not w.levels[-1].leaf
    # a 2 MiB EPT page needs no capability, and gets no note
    mem = Mem()
    ept_chain(mem, gpa, 2, 0x10800000)
    for cap in (None, False, True):
        w = walk_ept(mem, EPTP, gpa, page1gb=cap)
        assert w.ok and w.page_size == MIB2 and not w.notes


def test_npt_1g_page_and_host_page1gb():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    chain(mem, gpa, 4, 1, 0x40000000, leaf_flags=T)
    w = walk_npt(mem, 0x1000, gpa)
    assert w.ok and w.page_size == GIB1
    assert any("Page1GB unknown" in n for n in w.notes)
    w = walk_npt(mem, 0x1000, gpa, page1gb=True)
    assert w.ok and not w.notes
    w = walk_npt(mem, 0x1000, gpa, page1gb=False)
    assert (w.fault.level, w.fault.reason) == ("PDPT", "reserved-bit")
    assert NO_1G in w.fault.message
    assert (w.fault.error_code, codes(w)["write"]) == (E_P | E_RSVD | E_U,
                                                       (False, E_P | E_RSVD | E_U | E_W))
    assert any("TCG" in n and "#NPF with RSVD" in n for n in w.notes)
    # positional callers keep working
    assert walk_npt(mem, 0x1000, gpa, 4, 52, True).ok


# ------------------------------------------------------------------ CR4.PKS and IA32_PKRS

def pks_cpu(pkrs, *, wp=True, pke=False, pkru=None):
    cpu = cpu64(pke=pke, pkru=pkru, wp=wp)
    return replace(cpu, cr4=cpu.cr4 | CR4_PKS, pkrs=pkrs)


def test_pks_access_disable_on_a_supervisor_page():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW | (3 << 59))    # supervisor page, key 3
    w = walk(mem, pks_cpu(1 << (2 * 3)), VA)                       # PKRS.AD3
    assert "PK=3" in w.levels[-1].flags
    assert codes(w) == {
        "supervisor-read": (False, E_P | E_PK),
        "supervisor-write": (False, E_P | E_W | E_PK),
        "supervisor-execute": (True, None),                        # fetches never checked
        "user-read": (False, E_P | E_U | E_PK),                    # U/S=0 denies; PK joins
        "user-write": (False, E_P | E_U | E_W | E_PK),
        "user-execute": (False, E_P | E_U | E_ID),
    }
    assert w.access["supervisor-read"].reason == "protection key 3: IA32_PKRS.AD3=1"
    assert "U/S=0" in w.access["user-read"].reason


def test_pks_write_disable_needs_cr0_wp():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW | (5 << 59))
    w = walk(mem, pks_cpu(2 << (2 * 5)), VA)                       # PKRS.WD5, WP=1
    assert codes(w)["supervisor-read"] == (True, None)
    assert codes(w)["supervisor-write"] == (False, E_P | E_W | E_PK)
    assert w.access["supervisor-write"].reason == "protection key 5: IA32_PKRS.WD5=1"
    w0 = walk(mem, pks_cpu(2 << (2 * 5), wp=False), VA)
    assert codes(w0)["supervisor-write"] == (True, None)
    assert codes(w0)["user-write"] == (False, E_P | E_U | E_W)     # WD without WP: no PK


def test_pkrs_governs_supervisor_pages_and_pkru_user_pages():
    sup, user = Mem(), Mem()
    chain(sup, VA, 4, 3, FRAME, leaf_flags=P | RW | (1 << 59))
    chain(user, VA, 4, 3, FRAME, leaf_flags=P | RW | US | (1 << 59))
    cpu = pks_cpu(pkrs=1 << 2, pke=True, pkru=0)                   # PKRS.AD1 only
    assert codes(walk(sup, cpu, VA))["supervisor-read"] == (False, E_P | E_PK)
    assert codes(walk(user, cpu, VA))["user-read"] == (True, None)
    cpu = pks_cpu(pkrs=0, pke=True, pkru=1 << 2)                   # PKRU.AD1 only
    assert codes(walk(sup, cpu, VA))["supervisor-read"] == (True, None)
    assert codes(walk(user, cpu, VA))["user-read"] == (False, E_P | E_U | E_PK)
    # PKS alone leaves user pages alone, and still shows their key
    w = walk(user, pks_cpu(pkrs=0xFFFFFFFF), VA)
    assert all(r.allowed for r in w.access.values()) and "PK=1" in w.levels[-1].flags
    # without CR4.PKS, IA32_PKRS is not consulted
    w = walk(sup, replace(cpu64(), pkrs=0xFFFFFFFF), VA)
    assert codes(w)["supervisor-read"] == (True, None)
    assert not any(f.startswith("PK=") for f in w.levels[-1].flags)


def test_pks_effective_user_bit_decides_which_register():
    # the leaf has U/S=1 but the PD entry has U/S=0: a supervisor-mode address, PKRS applies
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW | US | (2 << 59))
    mem.put(0x3000 + 8 * ((VA >> 21) & 511), 0x4000 | P | RW)    # the PD entry: U/S=0
    w = walk(mem, pks_cpu(1 << 4), VA)                             # PKRS.AD2
    assert w.user is False
    assert codes(w)["supervisor-read"] == (False, E_P | E_PK)


# ------------------------------------------------------------------ unknown PKRU / PKRS

def test_unknown_pkru_is_in_the_access_result():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | US | (3 << 59))     # read-only user page, key 3
    w = walk(mem, cpu64(pke=True, pkru=None, wp=False), VA)       # WP=0: kernel may write
    assert any("PKRU unknown" in n for n in w.notes)               # the note stays
    for kind in ("user-read", "supervisor-read", "supervisor-write"):
        r = w.access[kind]
        assert r.allowed and r.error_code is None and r.reason == ""
        assert r.unknown.startswith("protection key 3 of this user page: PKRU unknown")
        assert "gdbstub" in r.unknown
    # already denied by the paging bits, or not a data access: nothing unknown
    assert not w.access["user-write"].allowed and w.access["user-write"].unknown == ""
    assert w.access["user-execute"].allowed and w.access["user-execute"].unknown == ""
    assert w.access["supervisor-execute"].unknown == ""
    d = json.loads(json.dumps(w.to_dict()))
    assert d["access"]["user-read"]["unknown"] == w.access["user-read"].unknown
    assert d["access"]["user-write"]["unknown"] is None


def test_unknown_pkrs_is_in_the_access_result():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW | (6 << 59))     # supervisor page, key 6
    w = walk(mem, pks_cpu(None), VA)
    assert any("IA32_PKRS unknown" in n for n in w.notes)
    for kind in ("supervisor-read", "supervisor-write"):
        assert w.access[kind].allowed
        assert w.access[kind].unknown.startswith(
            "protection key 6 of this supervisor page: IA32_PKRS unknown")
    assert w.access["supervisor-execute"].unknown == ""
    assert all(not w.access[k].allowed and w.access[k].unknown == ""
               for k in ("user-read", "user-write", "user-execute"))


def test_known_registers_leave_nothing_unknown():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW | US | (3 << 59))
    for cpu in (cpu64(pke=True, pkru=0), cpu64(pke=False), pks_cpu(None)):  # PKS: user page
        w = walk(mem, cpu, VA)
        assert all(r.unknown == "" for r in w.access.values())
        assert not any("unknown: protection key" in n for n in w.notes)


# ------------------------------------------------------------------ PAE PDPTE registers

def pae_notes(w):
    return [n for n in w.notes if n.startswith("PAE: ")]


def test_every_pae_walk_says_where_its_pdpte_came_from():
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va)
    cpu = cpupae(cr3=0x1020)
    for addr in (va, pae_va(2, 8, 0, 0), pae_va(3, 0, 0, 0)):     # ok, PD not present, PDPTE
        (note,) = pae_notes(walk(mem, cpu, addr))
        assert "read from memory at CR3[31:5] (0x1020)" in note
        assert "last CR3 write" in note and "TCG" in note and "KVM" in note
    w = walk(Mem(0x1000), cpu, va)                                  # PDPT unreadable
    assert w.fault.reason == "unreadable" and len(pae_notes(w)) == 1
    assert not any(n.startswith("PAE: ") for n in walk(mem, cpu64(), va).notes)


def test_pdpte_registers_are_used_instead_of_memory():
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va)                                   # memory: PDPTE 2 -> PD at 0x2000
    mem.put(0x5000 + 8 * 7, 0x6000 | T)                  # another PD -> PT at 0x6000
    mem.put(0x6000 + 8 * 9, 0x9000 | P | RW | US)
    regs = (0, 0, 0x5000 | P, 0)
    cpu = replace(cpupae(cr3=0x1020), pdptes=regs)
    w = walk(mem, cpu, va)
    assert w.ok and w.pa == 0x9321 and w.levels[0].entry == 0x5000 | P
    assert w.levels[0].entry_addr == 0x1030
    (note,) = pae_notes(w)
    assert "PDPTE 2 is the CPU's PDPTE register (0x5001)" in note
    assert f"memory there now holds {0x2000 | P:#x}, not the register's 0x5001" in note
    # the same value in memory: said so
    mem.put(0x1030, 0x5000 | P)
    (note,) = pae_notes(walk(mem, cpu, va))
    assert "holds the same value" in note
    # a register that is not present faults where memory would not
    mem.put(0x1030, 0x2000 | P)
    w = walk(mem, replace(cpu, pdptes=(0, 0, 0, 0)), va)
    assert (w.fault.level, w.fault.reason) == ("PDPT", "not-present")
    # memory unreadable at CR3: the registers still translate
    w = walk(Mem(0x1000), replace(cpupae(cr3=0x40000020), pdptes=regs), va)
    assert w.levels[0].entry == 0x5001 and "could not be read" in pae_notes(w)[0]


def test_pdpte_registers_in_maps_and_batches():
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va)
    mem.put(0x5000 + 8 * 7, 0x6000 | T)
    mem.put(0x6000 + 8 * 9, 0x9000 | P | RW | US)
    cpu = replace(cpupae(cr3=0x1020), pdptes=(0, 0, 0x5000 | P, 0))
    mem.reads.clear()
    maps = list(iter_mappings(mem, cpu))
    assert [(m.va, m.pa) for m in maps] == [(va & ~0xFFF, 0x9000)]
    assert (0x1020, 32) not in mem.reads                 # the PDPT is not read
    la = leaf_arrays(mem, cpu)
    assert list(la.mappings()) == maps
    out = walk_array(mem, cpu, [va, pae_va(1, 0, 0, 0)])
    assert out.pa.tolist()[0] == 0x9321 and out.reason(1) == "not-present"
    assert out.level_name(1) == "PDPT"
    assert int(out.pa[0]) == walk(mem, cpu, va).pa


def test_pdpte_registers_are_checked_and_ignored_outside_pae():
    with pytest.raises(ValueError):
        walk(Mem(), replace(cpupae(), pdptes=(1, 2, 3)), 0)
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME)
    w = walk(mem, replace(cpu64(), pdptes=(0, 0, 0, 0)), VA)
    assert w.ok and not pae_notes(w)


def test_cpustate_keeps_its_positional_fields():
    cpu = CpuState(1, 2, 3, 4, 40, 5)
    assert (cpu.maxphyaddr, cpu.pkru, cpu.pkrs, cpu.page1gb, cpu.pdptes) == (40, 5, None, None,
                                                                              None)
    assert modes.CR4_PKS == CR4_PKS and modes.CR4_PKE == CR4_PKE
