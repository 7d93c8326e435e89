"""The pure page-table walkers on tables built in a bytearray: every mode, page size, fault and
access rule, with the exact #PF error codes a CPU would push (SDM Vol 3, 4.7)."""

import json

import pytest

from qintrospect.errors import MemoryReadError
from qintrospect.paging import (
    CpuState, decode_eptp, iter_mappings, paging_mode, walk, walk_ept, walk_npt,
)

# x86 entry bits
P, RW, US, PWT, PCD, A, D, PS, G = (1 << n for n in range(9))
PAT_4K, PAT_LARGE = 1 << 7, 1 << 12
NX = 1 << 63
# #PF error code bits
E_P, E_W, E_U, E_RSVD, E_ID, E_PK = 1, 2, 4, 8, 16, 32
# control bits
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57, CR4_PCIDE = 1 << 4, 1 << 5, 1 << 12, 1 << 17
CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 20, 1 << 21, 1 << 22
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11

KIB4, MIB2, MIB4, GIB1 = 1 << 12, 1 << 21, 1 << 22, 1 << 30
T = P | RW | US          # a table entry that restricts nothing


class Mem:
    """Physical memory in a bytearray; reads beyond it or in `holes` raise MemoryReadError.
    Remembers every read (address, length)."""

    def __init__(self, size=0x100000):
        self.buf = bytearray(size)
        self.holes = set()
        self.reads = []

    def put(self, addr, value, size=8):
        self.buf[addr:addr + size] = value.to_bytes(size, "little")

    def __call__(self, addr, length):
        self.reads.append((addr, length))
        if addr < 0 or addr + length > len(self.buf) or (addr & ~0xFFF) in self.holes:
            raise MemoryReadError(f"no RAM at {addr:#x}", addr)
        return bytes(self.buf[addr:addr + length])


def idx(*parts, shift=12, bits=9):
    """Address from indexes, highest level first, then the page offset."""
    *indexes, offset = parts
    va = offset
    for k, i in enumerate(reversed(indexes)):
        va |= i << (shift + bits * k)
    return va


def chain(mem, va, levels, leaf_level, frame, leaf_flags=P | RW | US, table_flags=T,
          base=0x1000, entry_size=8, shifts=None, extra=None):
    """Lay out one path for `va`: the table of level k at base + k*4 KiB, each entry pointing
    at the next table, the entry at leaf_level mapping `frame` (with PS when it is not the
    last level). extra[k] is ORed into level k's entry. Returns the table addresses."""
    shifts = shifts or [12 + 9 * (levels - 1 - k) for k in range(levels)]
    nbits = 10 if entry_size == 4 else 9
    tables = [base + k * 0x1000 for k in range(leaf_level + 1)]
    for k in range(leaf_level + 1):
        i = (va >> shifts[k]) & ((1 << nbits) - 1)
        if k < leaf_level:
            e = tables[k + 1] | table_flags
        else:
            e = frame | leaf_flags | (PS if k < levels - 1 else 0)
        e |= (extra or {}).get(k, 0)
        mem.put(tables[k] + i * entry_size, e, entry_size)
    return tables


def cpu64(cr3=0x1000, *, wp=True, nxe=True, la57=False, smep=False, smap=False, pke=False,
          pcide=False, pkru=None, maxphyaddr=52):
    cr4 = (CR4_PAE | (CR4_LA57 if la57 else 0) | (CR4_SMEP if smep else 0)
           | (CR4_SMAP if smap else 0) | (CR4_PKE if pke else 0) | (CR4_PCIDE if pcide else 0))
    return CpuState(cr0=CR0_PG | CR0_PE | (CR0_WP if wp else 0), cr3=cr3, cr4=cr4,
                    efer=EFER_LME | EFER_LMA | (EFER_NXE if nxe else 0),
                    maxphyaddr=maxphyaddr, pkru=pkru)


def cpu32(cr3=0x1000, *, pse=True, smep=False, nxe=False, maxphyaddr=52):
    cr4 = (CR4_PSE if pse else 0) | (CR4_SMEP if smep else 0)
    return CpuState(cr0=CR0_PG | CR0_PE | CR0_WP, cr3=cr3, cr4=cr4,
                    efer=EFER_NXE if nxe else 0, maxphyaddr=maxphyaddr)


def cpupae(cr3=0x1000, *, nxe=True, maxphyaddr=52):
    return CpuState(cr0=CR0_PG | CR0_PE | CR0_WP, cr3=cr3, cr4=CR4_PAE,
                    efer=EFER_NXE if nxe else 0, maxphyaddr=maxphyaddr)


def codes(w):
    return {k: (r.allowed, r.error_code) for k, r in w.access.items()}


VA = idx(3, 5, 7, 9, 0xABC)          # 4-level indexes 3/5/7/9
FRAME = 0x12345000


# ------------------------------------------------------------------ mode selection

@pytest.mark.parametrize("cpu, name", [
    (CpuState(cr0=CR0_PE, cr3=0, cr4=0, efer=0), None),
    (cpu32(pse=False), "32-bit"),
    (cpu32(pse=True), "32-bit"),
    (cpupae(), "pae"),
    (cpu64(), "4-level"),
    (cpu64(la57=True), "5-level"),
    # LME with PG and PAE means LMA, even when a register dump leaves LMA out
    (CpuState(cr0=CR0_PG | CR0_PE, cr3=0, cr4=CR4_PAE, efer=EFER_LME), "4-level"),
    # LA57 without long mode is ignored: PAE paging
    (CpuState(cr0=CR0_PG | CR0_PE, cr3=0, cr4=CR4_PAE | CR4_LA57, efer=0), "pae"),
])
def test_paging_mode(cpu, name):
    mode = paging_mode(cpu)
    assert (mode.name if mode else None) == name


def test_mode_level_names():
    assert [(l.name, l.linux_name) for l in paging_mode(cpu64()).levels] == [
        ("PML4", "pgd"), ("PDPT", "pud"), ("PD", "pmd"), ("PT", "pte")]
    assert [(l.name, l.linux_name) for l in paging_mode(cpu64(la57=True)).levels] == [
        ("PML5", "pgd"), ("PML4", "p4d"), ("PDPT", "pud"), ("PD", "pmd"), ("PT", "pte")]
    assert [l.name for l in paging_mode(cpupae()).levels] == ["PDPT", "PD", "PT"]
    assert [l.name for l in paging_mode(cpu32()).levels] == ["PD", "PT"]
    assert paging_mode(cpu32(pse=True)).levels[0].large_page == MIB4
    assert paging_mode(cpu32(pse=False)).levels[0].large_page is None


# ------------------------------------------------------------------ 4-level

def test_4level_4k_page():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW | US | A | D | G)
    w = walk(mem, cpu64(), VA)
    assert w.ok and w.fault is None
    assert w.pa == FRAME | 0xABC and w.page_size == KIB4
    assert w.mode.name == "4-level" and w.root == 0x1000 and w.pcid is None
    assert [(s.name, s.linux_name, s.index) for s in w.levels] == [
        ("PML4", "pgd", 3), ("PDPT", "pud", 5), ("PD", "pmd", 7), ("PT", "pte", 9)]
    assert [s.table_addr for s in w.levels] == [0x1000, 0x2000, 0x3000, 0x4000]
    assert [s.entry_addr for s in w.levels] == [0x1018, 0x2028, 0x3038, 0x4048]
    assert [s.next_addr for s in w.levels] == [0x2000, 0x3000, 0x4000, FRAME]
    assert [s.leaf for s in w.levels] == [False, False, False, True]
    assert w.levels[-1].flags == ("P", "RW", "US", "A", "D", "G")
    assert w.levels[0].flags == ("P", "RW", "US")
    assert (w.writable, w.user, w.executable) == (True, True, True)
    assert not w.assumed_maxphyaddr and w.maxphyaddr == 52
    assert len(mem.reads) == 4 and all(n == 8 for _, n in mem.reads)


def test_to_dict_is_json_with_hex_strings():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME)
    d = walk(mem, cpu64(), VA).to_dict()
    json.dumps(d)
    assert d["va"] == hex(VA) and d["pa"] == hex(FRAME | 0xABC) and d["root"] == "0x1000"
    assert d["mode"] == "4-level" and d["fault"] is None and d["page_size"] == 4096
    assert d["levels"][1] == {"name": "PDPT", "linux_name": "pud", "index": 5,
                              "table_addr": "0x2000", "entry_addr": "0x2028",
                              "entry": hex(0x3000 | T), "flags": ["P", "RW", "US"],
                              "next_addr": "0x3000", "leaf": False, "page_size": None}
    assert set(d["access"]) == {"supervisor-read", "supervisor-write", "supervisor-execute",
                                "user-read", "user-write", "user-execute"}
    assert d["access"]["user-read"] == {"allowed": True, "error_code": None, "reason": "",
                                        "unknown": None}
    assert d["maxphyaddr"] == 52 and d["assumed_maxphyaddr"] is False
    mem2 = Mem()
    fd = walk(mem2, cpu64(), VA).to_dict()["fault"]
    assert fd["level"] == "PML4" and fd["reason"] == "not-present" and fd["error_code"] == "0x0"


def test_4level_2m_page_and_pat_bit_12():
    mem = Mem()
    frame = 0x40000000 + 3 * MIB2
    chain(mem, VA, 4, 2, frame, leaf_flags=P | RW | PAT_LARGE)
    w = walk(mem, cpu64(), VA)
    assert w.pa == frame | (VA & (MIB2 - 1)) and w.page_size == MIB2
    assert w.levels[-1].name == "PD" and w.levels[-1].leaf and w.levels[-1].page_size == MIB2
    assert "PS" in w.levels[-1].flags and "PAT" in w.levels[-1].flags
    assert len(w.levels) == 3


@pytest.mark.parametrize("bit", [13, 16, 20])
def test_4level_2m_page_bits_20_13_reserved(bit):
    mem = Mem()
    chain(mem, VA, 4, 2, 0x40000000, extra={2: 1 << bit})
    w = walk(mem, cpu64(), VA)
    assert w.fault.reason == "reserved-bit" and w.fault.level == "PD"
    assert f"bit(s) {bit} set" in w.fault.message and "2 MiB" in w.fault.message
    assert w.fault.error_code == E_P | E_RSVD
    assert w.pa is None and w.writable is None


def test_4level_1g_page():
    mem = Mem()
    chain(mem, VA, 4, 1, 0xC0000000, leaf_flags=P | PAT_LARGE)
    w = walk(mem, cpu64(), VA)
    assert w.pa == 0xC0000000 | (VA & (GIB1 - 1)) and w.page_size == GIB1
    assert w.levels[-1].name == "PDPT" and w.writable is False
    assert "PAT" in w.levels[-1].flags


@pytest.mark.parametrize("bit", [13, 21, 29])
def test_4level_1g_page_bits_29_13_reserved(bit):
    mem = Mem()
    chain(mem, VA, 4, 1, 0xC0000000, extra={1: 1 << bit})
    w = walk(mem, cpu64(), VA)
    assert (w.fault.level, w.fault.reason) == ("PDPT", "reserved-bit")
    assert f"bit(s) {bit} set" in w.fault.message


def test_pte_bit_7_is_pat_not_ps():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | PAT_4K)
    w = walk(mem, cpu64(), VA)
    assert w.ok and w.page_size == KIB4 and w.levels[-1].flags == ("P", "PAT")


def test_ps_in_pml4_is_reserved():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, extra={0: PS})
    w = walk(mem, cpu64(), VA)
    assert (w.fault.level, w.fault.reason) == ("PML4", "reserved-bit")
    assert "bit(s) 7 set (PS is reserved in a PML4 entry)" in w.fault.message


@pytest.mark.parametrize("level, name", [(0, "PML4"), (1, "PDPT"), (2, "PD"), (3, "PT")])
def test_4level_not_present_at_each_level(level, name):
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME)
    tables = [0x1000, 0x2000, 0x3000, 0x4000]
    i = (VA >> (39 - 9 * level)) & 511
    mem.put(tables[level] + 8 * i, 0x5000 | RW | US)      # everything but P
    w = walk(mem, cpu64(), VA)
    assert (w.fault.level, w.fault.reason) == (name, "not-present")
    assert w.fault.error_code == 0
    assert len(w.levels) == level + 1 and w.levels[-1].next_addr is None
    assert "not present" in w.fault.message
    assert codes(w) == {"supervisor-read": (False, 0), "supervisor-write": (False, E_W),
                        "supervisor-execute": (False, E_ID), "user-read": (False, E_U),
                        "user-write": (False, E_U | E_W), "user-execute": (False, E_U | E_ID)}
    assert walk(mem, cpu64(), VA, access="user-write").fault.error_code == E_U | E_W
    assert not w.ok


def test_reserved_bits_above_maxphyaddr():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, extra={2: 1 << 51})
    w = walk(mem, cpu64(maxphyaddr=40), VA)
    assert (w.fault.level, w.fault.reason) == ("PD", "reserved-bit")
    assert w.fault.message == ("PD entry 0x8000000004007 (index 7 at 0x3038) has reserved bit(s) "
                               "51 set (above MAXPHYADDR 40)")
    assert w.fault.error_code == E_P | E_RSVD
    assert codes(w)["user-write"] == (False, E_P | E_RSVD | E_U | E_W)
    # With MAXPHYADDR 52 bit 51 is an address bit: the walk goes on (and reads elsewhere).
    w52 = walk(mem, cpu64(maxphyaddr=52), VA)
    assert w52.levels[2].next_addr == (1 << 51) | 0x4000
    assert (w52.fault.level, w52.fault.reason) == ("PT", "unreadable")


def test_maxphyaddr_unknown_is_assumed_52_and_said():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME | (1 << 45))
    w = walk(mem, cpu64(maxphyaddr=None), VA)
    assert w.ok and w.assumed_maxphyaddr and w.maxphyaddr == 52
    assert any("MAXPHYADDR" in n for n in w.notes)
    w40 = walk(mem, cpu64(maxphyaddr=40), VA)
    assert w40.fault.reason == "reserved-bit" and "bit(s) 45 set" in w40.fault.message


def test_bits_62_52_are_ignored_in_4level():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, extra={1: 0x7FF << 52, 3: 1 << 58})
    w = walk(mem, cpu64(maxphyaddr=40), VA)
    assert w.ok and w.pa == FRAME | 0xABC


def test_several_reserved_reasons_in_one_message():
    mem = Mem()
    chain(mem, VA, 4, 2, 0x40000000, extra={2: NX | (1 << 14) | (1 << 47)})
    w = walk(mem, cpu64(nxe=False, maxphyaddr=46), VA)
    assert w.fault.reason == "reserved-bit"
    assert "reserved bit(s) 63, 47, 14 set" in w.fault.message
    assert "above MAXPHYADDR 46" in w.fault.message and "EFER.NXE=0" in w.fault.message


def test_nx_with_nxe():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, extra={1: NX})
    w = walk(mem, cpu64(nxe=True), VA)
    assert w.ok and w.executable is False and "NX" in w.levels[1].flags
    assert codes(w)["supervisor-execute"] == (False, E_P | E_ID)
    assert codes(w)["user-execute"] == (False, E_P | E_U | E_ID)
    assert "XD=1 in the PDPT entry" in w.access["user-execute"].reason
    assert codes(w)["user-read"] == (True, None)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_nx_without_nxe_is_reserved(level):
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, extra={level: NX})
    w = walk(mem, cpu64(nxe=False), VA)
    assert w.fault.reason == "reserved-bit" and w.fault.level == w.levels[level].name
    assert "63" in w.fault.message and w.fault.error_code == E_P | E_RSVD


def test_id_bit_only_with_nxe_or_smep():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW)        # supervisor page
    assert codes(walk(mem, cpu64(nxe=False), VA))["user-execute"] == (False, E_P | E_U)
    assert codes(walk(mem, cpu64(nxe=True), VA))["user-execute"] == (False, E_P | E_U | E_ID)
    assert codes(walk(mem, cpu64(nxe=False, smep=True), VA))["user-execute"] == (
        False, E_P | E_U | E_ID)


def test_effective_rights_are_anded_over_levels():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, table_flags=T, extra={})
    mem.put(0x2000 + 5 * 8, 0x3000 | P | US)         # PDPT entry read-only
    mem.put(0x3000 + 7 * 8, 0x4000 | P | RW)         # PD entry supervisor-only
    w = walk(mem, cpu64(), VA)
    assert (w.writable, w.user, w.executable) == (False, False, True)
    assert "U/S=0 in the PD entry" in w.access["user-read"].reason
    assert codes(w) == {
        "supervisor-read": (True, None),
        "supervisor-write": (False, E_P | E_W),
        "supervisor-execute": (True, None),
        "user-read": (False, E_P | E_U),
        "user-write": (False, E_P | E_U | E_W),
        "user-execute": (False, E_P | E_U | E_ID),
    }


def test_cr0_wp():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | US)        # read-only user page
    w = walk(mem, cpu64(wp=True), VA)
    assert codes(w)["supervisor-write"] == (False, E_P | E_W)
    assert w.access["supervisor-write"].reason == (
        "write to read-only page (R/W=0 in the PT entry, CR0.WP=1)")
    w0 = walk(mem, cpu64(wp=False), VA)
    assert codes(w0)["supervisor-write"] == (True, None)
    assert codes(w0)["user-write"] == (False, E_P | E_U | E_W)   # WP never helps user mode


def test_smep():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME)                            # user page
    w = walk(mem, cpu64(smep=True), VA)
    assert codes(w)["supervisor-execute"] == (False, E_P | E_ID)
    assert w.access["supervisor-execute"].reason == "SMEP: supervisor fetch from user page"
    assert codes(w)["user-execute"] == (True, None)
    assert codes(w)["supervisor-read"] == (True, None)
    assert codes(walk(mem, cpu64(smep=False), VA))["supervisor-execute"] == (True, None)
    # SMEP reports I/D even without NXE
    assert codes(walk(mem, cpu64(smep=True, nxe=False), VA))["supervisor-execute"] == (
        False, E_P | E_ID)


def test_smap():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME)                            # user page
    w = walk(mem, cpu64(smap=True), VA)
    assert codes(w)["supervisor-read"] == (False, E_P)
    assert codes(w)["supervisor-write"] == (False, E_P | E_W)
    assert "SMAP" in w.access["supervisor-read"].reason
    assert "EFLAGS.AC=0" in w.access["supervisor-read"].reason
    assert codes(w)["supervisor-execute"] == (True, None)   # SMAP is for data only
    assert codes(w)["user-read"] == (True, None)
    # SMAP does not touch supervisor pages
    mem2 = Mem()
    chain(mem2, VA, 4, 3, FRAME, leaf_flags=P | RW)
    assert codes(walk(mem2, cpu64(smap=True), VA))["supervisor-read"] == (True, None)


def pk_leaf(key):
    return P | RW | US | (key << 59)


def test_protection_key_access_disable():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=pk_leaf(3))
    pkru = 1 << (2 * 3)                                    # AD3
    w = walk(mem, cpu64(pke=True, pkru=pkru), VA)
    assert "PK=3" in w.levels[-1].flags
    assert codes(w) == {
        "supervisor-read": (False, E_P | E_PK),
        "supervisor-write": (False, E_P | E_W | E_PK),
        "supervisor-execute": (True, None),              # keys do not govern fetches
        "user-read": (False, E_P | E_U | E_PK),
        "user-write": (False, E_P | E_U | E_W | E_PK),
        "user-execute": (True, None),
    }
    assert w.access["user-read"].reason == "protection key 3: PKRU.AD3=1"


def test_protection_key_write_disable_and_wp():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=pk_leaf(5))
    pkru = 2 << (2 * 5)                                    # WD5
    w = walk(mem, cpu64(pke=True, pkru=pkru, wp=True), VA)
    assert codes(w)["user-read"] == (True, None)
    assert codes(w)["user-write"] == (False, E_P | E_U | E_W | E_PK)
    assert codes(w)["supervisor-write"] == (False, E_P | E_W | E_PK)
    w0 = walk(mem, cpu64(pke=True, pkru=pkru, wp=False), VA)
    assert codes(w0)["supervisor-write"] == (True, None)   # WD binds supervisors only with WP
    assert codes(w0)["user-write"] == (False, E_P | E_U | E_W | E_PK)


def test_protection_key_bit_joins_other_write_faults():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | US | (1 << 59))    # read-only, key 1
    w = walk(mem, cpu64(pke=True, pkru=1 << 2), VA)                # AD1
    assert codes(w)["user-write"] == (False, E_P | E_U | E_W | E_PK)
    assert "read-only" in w.access["user-write"].reason


def test_protection_keys_skip_supervisor_pages_and_unknown_pkru():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME, leaf_flags=P | RW | (2 << 59))    # supervisor page, key 2
    w = walk(mem, cpu64(pke=True, pkru=0xFFFFFFFF), VA)
    assert codes(w)["supervisor-read"] == (True, None)
    mem2 = Mem()
    chain(mem2, VA, 4, 3, FRAME, leaf_flags=pk_leaf(2))
    w2 = walk(mem2, cpu64(pke=True, pkru=None), VA)
    assert codes(w2)["user-write"] == (True, None)
    assert any("PKRU unknown" in n for n in w2.notes)
    # without CR4.PKE bits 62:59 are ignored and not shown
    w3 = walk(mem2, cpu64(pke=False, pkru=0xFFFFFFFF), VA)
    assert codes(w3)["user-write"] == (True, None)
    assert not any(f.startswith("PK=") for f in w3.levels[-1].flags)


def test_pcid_masked_from_cr3():
    mem = Mem()
    chain(mem, VA, 4, 3, FRAME)
    w = walk(mem, cpu64(cr3=0x1000 | 0x123, pcide=True), VA)
    assert w.root == 0x1000 and w.pcid == 0x123 and w.pa == FRAME | 0xABC
    # without PCIDE the low bits are PWT (3) and PCD (4): masked, no PCID
    w2 = walk(mem, cpu64(cr3=0x1000 | PWT | PCD), VA)
    assert w2.root == 0x1000 and w2.pcid is None and w2.ok
    # bit 63 (no-flush on MOV CR3) and LAM bits 62:61 are not part of the root
    w3 = walk(mem, cpu64(cr3=(7 << 61) | 0x1000, pcide=True), VA)
    assert w3.root == 0x1000 and w3.ok


def test_non_canonical_4level():
    mem = Mem()
    w = walk(mem, cpu64(), 0x0000800000000000)
    assert w.fault.level is None and w.fault.reason == "non-canonical"
    assert w.fault.error_code is None and "canonical" in w.fault.message
    assert mem.reads == [] and w.levels == ()
    assert all(not r.allowed and r.error_code is None for r in w.access.values())
    assert walk(mem, cpu64(), 1 << 64).fault.reason == "non-canonical"


def test_upper_half_is_sign_extended():
    mem = Mem()
    va = 0xFFFF800000000000 | idx(0, 1, 2, 3, 0x10)
    chain(mem, va, 4, 3, FRAME)
    w = walk(mem, cpu64(), va)
    assert w.ok and [s.index for s in w.levels] == [256, 1, 2, 3]
    assert w.pa == FRAME | 0x10


# ------------------------------------------------------------------ 5-level

def test_5level_4k_and_canonical():
    mem = Mem()
    va = idx(1, 2, 3, 4, 5, 0x678)
    chain(mem, va, 5, 4, FRAME)
    w = walk(mem, cpu64(la57=True), va)
    assert w.ok and w.pa == FRAME | 0x678 and w.mode.name == "5-level"
    assert [(s.name, s.linux_name, s.index) for s in w.levels] == [
        ("PML5", "pgd", 1), ("PML4", "p4d", 2), ("PDPT", "pud", 3), ("PD", "pmd", 4),
        ("PT", "pte", 5)]
    # canonical in 5-level, not in 4-level
    assert walk(Mem(), cpu64(la57=True), 1 << 47).fault.reason == "not-present"
    assert walk(Mem(), cpu64(la57=True), 1 << 56).fault.reason == "non-canonical"
    assert walk(Mem(), cpu64(la57=True), 0xFF00000000000000).fault.reason == "not-present"


def test_5level_large_pages_and_pml5_ps_reserved():
    mem = Mem()
    va = idx(1, 2, 3, 4, 5, 0x678)
    chain(mem, va, 5, 2, 0x80000000)
    w = walk(mem, cpu64(la57=True), va)
    assert w.page_size == GIB1 and w.pa == 0x80000000 | (va & (GIB1 - 1))
    mem2 = Mem()
    chain(mem2, va, 5, 4, FRAME, extra={0: PS})
    w2 = walk(mem2, cpu64(la57=True), va)
    assert (w2.fault.level, w2.fault.reason) == ("PML5", "reserved-bit")


# ------------------------------------------------------------------ 32-bit

def va32(pd, pt, off):
    return (pd << 22) | (pt << 12) | off


def test_32bit_4k_page():
    mem = Mem()
    va = va32(0x301, 0x2A5, 0x123)
    chain(mem, va, 2, 1, 0xABCDE000, leaf_flags=P | RW | US | G, entry_size=4,
          shifts=[22, 12])
    w = walk(mem, cpu32(cr3=0x1000 | PWT | PCD), va)
    assert w.ok and w.mode.name == "32-bit" and w.root == 0x1000
    assert w.pa == 0xABCDE123 and w.page_size == KIB4
    assert [s.entry_addr for s in w.levels] == [0x1000 + 4 * 0x301, 0x2000 + 4 * 0x2A5]
    assert [(s.name, s.linux_name) for s in w.levels] == [("PD", "pgd"), ("PT", "pte")]
    assert w.executable is True                    # no XD bit in 4-byte entries
    assert all(n == 4 for _, n in mem.reads)


def test_32bit_4m_page_with_pse_and_pat_bit_12():
    mem = Mem()
    va = va32(0x301, 0x2A5, 0x123)
    chain(mem, va, 2, 0, 0xAC000000, leaf_flags=P | RW | PAT_LARGE, entry_size=4,
          shifts=[22, 12])
    w = walk(mem, cpu32(pse=True), va)
    assert w.page_size == MIB4 and w.pa == 0xAC000000 | (va & (MIB4 - 1))
    assert "PS" in w.levels[0].flags and "PAT" in w.levels[0].flags
    # PAT (bit 12) is not an address bit
    assert w.levels[0].next_addr == 0xAC000000


def test_32bit_ps_ignored_without_pse():
    mem = Mem()
    va = va32(1, 2, 3)
    mem.put(0x1000 + 4, 0x2000 | P | RW | PS, 4)          # PS=1 but CR4.PSE=0: a table
    mem.put(0x2000 + 8, 0x7000 | P, 4)
    w = walk(mem, cpu32(pse=False), va)
    assert w.ok and w.page_size == KIB4 and w.pa == 0x7003


def test_32bit_pse36_high_bits():
    mem = Mem()
    va = va32(5, 0, 0x42)
    # bits 20:13 of the PDE are physical bits 39:32
    mem.put(0x1000 + 4 * 5, 0x00C00000 | (0xA5 << 13) | P | PS, 4)
    w = walk(mem, cpu32(maxphyaddr=40), va)
    assert w.ok and w.pa == (0xA5 << 32) | 0x00C00042
    assert w.levels[0].next_addr == (0xA5 << 32) | 0x00C00000


def test_32bit_pse36_reserved_bits():
    mem = Mem()
    va = va32(5, 0, 0x42)
    mem.put(0x1000 + 4 * 5, 0x00C00000 | (1 << 21) | P | PS, 4)    # bit 21 always reserved
    w = walk(mem, cpu32(maxphyaddr=52), va)                        # M' = min(52, 40)
    assert (w.fault.level, w.fault.reason) == ("PD", "reserved-bit")
    assert "bit(s) 21 set" in w.fault.message and w.fault.error_code == E_P | E_RSVD
    # MAXPHYADDR 36: only bits 16:13 carry address bits 35:32; 21:17 are reserved
    mem.put(0x1000 + 4 * 5, 0x00C00000 | (1 << 17) | P | PS, 4)
    assert walk(mem, cpu32(maxphyaddr=36), va).fault.reason == "reserved-bit"
    assert walk(mem, cpu32(maxphyaddr=40), va).pa == (0x10 << 32) | 0x00C00042
    mem.put(0x1000 + 4 * 5, 0x00C00000 | (0xF << 13) | P | PS, 4)
    assert walk(mem, cpu32(maxphyaddr=36), va).pa == (0xF << 32) | 0x00C00042


def test_32bit_error_codes_have_no_id_bit_without_smep():
    mem = Mem()
    va = va32(1, 2, 3)
    chain(mem, va, 2, 1, 0x7000, leaf_flags=P | RW, entry_size=4, shifts=[22, 12])
    # EFER.NXE does not matter with CR4.PAE=0
    assert codes(walk(mem, cpu32(nxe=True), va))["user-execute"] == (False, E_P | E_U)
    assert codes(walk(mem, cpu32(smep=True), va))["user-execute"] == (False, E_P | E_U | E_ID)


def test_32bit_address_beyond_32_bits():
    w = walk(Mem(), cpu32(), 1 << 32)
    assert w.fault.reason == "non-canonical" and w.fault.level is None


# ------------------------------------------------------------------ PAE

def pae_va(pdpt, pd, pt, off):
    return (pdpt << 30) | (pd << 21) | (pt << 12) | off


def pae_chain(mem, va, cr3=0x1020, pdpte_extra=0, leaf_level=2, frame=0x7000,
              leaf_flags=P | RW | US, extra=None):
    """PDPT at cr3 (32-byte aligned), PD at 0x2000, PT at 0x3000."""
    mem.put(cr3 + 8 * (va >> 30), 0x2000 | P | pdpte_extra)
    pd_e = (0x3000 | T) if leaf_level == 2 else (frame | leaf_flags | PS)
    mem.put(0x2000 + 8 * ((va >> 21) & 511), pd_e | (extra or {}).get(1, 0))
    if leaf_level == 2:
        mem.put(0x3000 + 8 * ((va >> 12) & 511), frame | leaf_flags | (extra or {}).get(2, 0))


def test_pae_4k_with_pdpt_at_cr3_bits_31_5():
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va, cr3=0x1020)
    w = walk(mem, cpupae(cr3=0x1020 | 0x18), va)       # bits 4:0 of CR3 are ignored
    assert w.ok and w.root == 0x1020 and w.pa == 0x7321 and w.mode.name == "pae"
    assert [(s.name, s.linux_name, s.index) for s in w.levels] == [
        ("PDPT", "pgd", 2), ("PD", "pmd", 7), ("PT", "pte", 9)]
    assert w.levels[0].entry_addr == 0x1030
    # PDPTEs have no R/W or U/S: the page is user-writable
    assert (w.writable, w.user) == (True, True)


def test_pae_2m_page():
    mem = Mem()
    va = pae_va(1, 3, 9, 0x321)
    pae_chain(mem, va, leaf_level=1, frame=0x600000, leaf_flags=P)
    w = walk(mem, cpupae(cr3=0x1020), va)
    assert w.page_size == MIB2 and w.pa == 0x600000 | (va & (MIB2 - 1)) and not w.writable


@pytest.mark.parametrize("bit", [1, 2, 6, 7, 8, 63])
def test_pae_pdpte_reserved_bits(bit):
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va, pdpte_extra=1 << bit)
    w = walk(mem, cpupae(cr3=0x1020, nxe=True), va)   # bit 63 is reserved there even with NXE
    assert (w.fault.level, w.fault.reason) == ("PDPT", "reserved-bit")
    assert w.fault.error_code == E_P | E_RSVD


def test_pae_pdpte_accessed_bit_is_tolerated_with_a_note():
    # SDM table 4-8 reserves PDPTE bits 8:5, but QEMU's TCG sets A (bit 5) in every PDPTE it
    # walks (measured by tests/integration/test_oracle_modes.py): no fault, a note instead.
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va, pdpte_extra=A)
    w = walk(mem, cpupae(cr3=0x1020), va)
    assert w.ok and w.pa == 0x7321 and "A" in w.levels[0].flags
    assert any("bit 5 (A)" in n and "QEMU" in n for n in w.notes)
    assert not walk(mem, cpupae(cr3=0x1020), va).fault
    pae_chain(mem, va, pdpte_extra=A | (1 << 6))
    assert walk(mem, cpupae(cr3=0x1020), va).fault.reason == "reserved-bit"


def test_pae_nx_and_reserved_62_m():
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va, extra={2: NX})
    w = walk(mem, cpupae(cr3=0x1020, nxe=True), va)
    assert w.ok and w.executable is False
    assert codes(w)["supervisor-execute"] == (False, E_P | E_ID)
    w2 = walk(mem, cpupae(cr3=0x1020, nxe=False), va)
    assert (w2.fault.level, w2.fault.reason) == ("PT", "reserved-bit")
    # bits 62:52 are reserved in PAE entries (they are ignored in 4-level ones)
    mem2 = Mem()
    pae_chain(mem2, va, extra={1: 1 << 58})
    w3 = walk(mem2, cpupae(cr3=0x1020), va)
    assert (w3.fault.level, w3.fault.reason) == ("PD", "reserved-bit")
    assert "58" in w3.fault.message


def test_pae_2m_bits_20_13_reserved():
    mem = Mem()
    va = pae_va(1, 3, 9, 0x321)
    pae_chain(mem, va, leaf_level=1, frame=0x600000, leaf_flags=P, extra={1: 1 << 13})
    w = walk(mem, cpupae(cr3=0x1020), va)
    assert (w.fault.level, w.fault.reason) == ("PD", "reserved-bit")


# ------------------------------------------------------------------ special states

def test_paging_disabled():
    w = walk(Mem(), CpuState(cr0=CR0_PE, cr3=0x1000, cr4=0, efer=0), 0x1234)
    assert w.fault.reason == "paging-disabled" and w.fault.level is None
    assert w.mode is None and w.pa is None and not w.ok
    assert "physical address" in w.fault.message


def test_unreadable_root_and_middle_never_raise():
    mem = Mem()
    w = walk(mem, cpu64(cr3=0x40000000), VA)        # beyond the bytearray
    assert (w.fault.level, w.fault.reason) == ("PML4", "unreadable")
    assert "0x40000018" in w.fault.message and w.fault.error_code is None
    chain(mem, VA, 4, 3, FRAME)
    mem.holes.add(0x3000)                            # the PD page cannot be read
    w2 = walk(mem, cpu64(), VA)
    assert (w2.fault.level, w2.fault.reason) == ("PD", "unreadable")
    assert "0x3038" in w2.fault.message and len(w2.levels) == 2
    assert all(not r.allowed for r in w2.access.values())


def test_short_read_is_unreadable():
    w = walk(lambda a, n: b"\x01", cpu64(), VA)
    assert w.fault.reason == "unreadable"


def test_unknown_access_kind_is_a_programming_error():
    with pytest.raises(ValueError):
        walk(Mem(), cpu64(), VA, access="sideways")


# ------------------------------------------------------------------ iter_mappings

def small_address_space():
    """PML4 0x1000: [0] -> PDPT 0x2000, [1] not present, [256] -> PDPT 0x5000,
    [510] -> the PML4 itself (recursive, Linux-style), [511] -> PDPT with a reserved bit."""
    mem = Mem()
    mem.put(0x1000 + 0 * 8, 0x2000 | T)
    mem.put(0x1000 + 1 * 8, 0x9000 | RW)                  # not present
    mem.put(0x1000 + 256 * 8, 0x5000 | P | RW)            # supervisor half
    mem.put(0x1000 + 510 * 8, 0x1000 | P | RW)            # self reference
    mem.put(0x1000 + 511 * 8, 0x6000 | P | (1 << 51))     # reserved at MAXPHYADDR 40
    mem.put(0x2000 + 0 * 8, 0x3000 | T)                   # PDPT[0] -> PD
    mem.put(0x2000 + 3 * 8, 0xC0000000 | P | US | PS | NX)  # 1 GiB user NX page
    mem.put(0x3000 + 0 * 8, 0x4000 | T)                   # PD[0] -> PT
    mem.put(0x3000 + 5 * 8, 0x00A00000 | P | RW | US | PS)  # 2 MiB page
    mem.put(0x3000 + 6 * 8, 0x00C00000 | P | PS | (1 << 14))  # reserved bit: skipped
    mem.put(0x4000 + 1 * 8, 0x7000 | P | RW | US)
    mem.put(0x4000 + 2 * 8, 0x8000 | P | US)
    mem.put(0x5000 + 0 * 8, 0x40000000 | P | RW | PS | G)  # kernel 1 GiB page
    return mem


def test_iter_mappings_small_space():
    mem = small_address_space()
    cpu = cpu64(maxphyaddr=40)
    maps = list(iter_mappings(mem, cpu))
    got = [(hex(m.va), hex(m.pa), m.size, m.writable, m.user, m.executable) for m in maps]
    rec = 510 << 39
    upper = 0xFFFF000000000000
    assert got[:4] == [
        ("0x1000", "0x7000", KIB4, True, True, True),
        ("0x2000", "0x8000", KIB4, False, True, True),
        (hex(5 * MIB2), "0xa00000", MIB2, True, True, True),
        (hex(3 * GIB1), "0xc0000000", GIB1, False, True, False),
    ]
    assert (hex(upper | 256 << 39), "0x40000000", GIB1, True, False, True) in got
    # Through PML4[510] the tables themselves appear as pages (bounded by the depth):
    # PML4[510] -> PML4 as PDPT: [0] -> PDPT 0x2000 as PD: [0] -> PD 0x3000 as PT ...
    recursive = [m for m in maps if (m.va >> 39) & 511 == 510]
    assert recursive and all(m.va >= upper | rec for m in recursive)
    assert (hex(upper | rec), "0x4000", KIB4) in [(hex(m.va), hex(m.pa), m.size)
                                                  for m in recursive]
    # VA order, no overlap
    assert all(a.va + a.size <= b.va for a, b in zip(maps, maps[1:]))
    # every leaf agrees with walk()
    for m in maps:
        w = walk(mem, cpu, m.va + m.size - 8)
        assert w.ok and w.pa == m.pa + m.size - 8 and w.page_size == m.size
        assert (w.writable, w.user, w.executable) == (m.writable, m.user, m.executable)
        assert tuple(s.entry for s in w.levels) == m.levels_entries
        assert w.levels[-1].flags == m.flags


def test_iter_mappings_reads_each_table_once_whole():
    mem = small_address_space()
    list(iter_mappings(mem, cpu64(maxphyaddr=40)))
    addrs = [a for a, _ in mem.reads]
    assert len(addrs) == len(set(addrs))
    assert all(n == 4096 for _, n in mem.reads)
    assert set(addrs) == {0x1000, 0x2000, 0x3000, 0x4000, 0x5000}


def test_iter_mappings_range_and_laziness():
    mem = small_address_space()
    cpu = cpu64(maxphyaddr=40)
    maps = list(iter_mappings(mem, cpu, start=0x2000, end=6 * MIB2))
    assert [m.va for m in maps] == [0x2000, 5 * MIB2]
    # a large page that starts before `start` is included (it overlaps)
    maps = list(iter_mappings(mem, cpu, start=3 * GIB1 + 0x1000, end=4 * GIB1))
    assert [m.va for m in maps] == [3 * GIB1]
    # PML4 slot 256 only: no other table is read
    mem.reads.clear()
    maps = list(iter_mappings(mem, cpu, start=0xFFFF800000000000,
                              end=0xFFFF800000000000 + (1 << 39)))
    assert [m.va for m in maps] == [0xFFFF800000000000]
    assert sorted(a for a, _ in mem.reads) == [0x1000, 0x5000]
    # a start in the non-canonical hole begins at the upper half
    assert next(iter_mappings(mem, cpu, start=1 << 47)).va == 0xFFFF800000000000
    # lazy: the first mapping costs no more than one path of reads
    mem.reads.clear()
    next(iter(iter_mappings(mem, cpu)))
    assert len(mem.reads) == 4


def test_iter_mappings_unreadable_table_is_reported_and_skipped():
    mem = small_address_space()
    mem.holes.add(0x4000)
    seen = []
    maps = list(iter_mappings(mem, cpu64(maxphyaddr=40),
                              on_unreadable=lambda lvl, a, e: seen.append((lvl, a))))
    assert ("PT", 0x4000) in seen
    assert 0x1000 not in [m.va for m in maps]


def test_iter_mappings_32bit_and_pae():
    mem = Mem()
    mem.put(0x1000 + 4 * 3, 0x2000 | P | RW | US, 4)
    mem.put(0x2000 + 4 * 7, 0x9000 | P, 4)
    mem.put(0x1000 + 4 * 4, 0x01000000 | P | PS, 4)
    maps = list(iter_mappings(mem, cpu32()))
    assert [(m.va, m.pa, m.size) for m in maps] == [
        ((3 << 22) | (7 << 12), 0x9000, KIB4), (4 << 22, 0x01000000, MIB4)]
    assert sorted(mem.reads) == [(0x1000, 4096), (0x2000, 4096)]
    mem = Mem()
    va = pae_va(3, 1, 2, 0)
    pae_chain(mem, va, cr3=0x1020)
    maps = list(iter_mappings(mem, cpupae(cr3=0x1020)))
    assert [(m.va, m.pa) for m in maps] == [(va, 0x7000)]
    assert (0x1020, 32) in mem.reads


def test_iter_mappings_paging_disabled_is_empty():
    assert list(iter_mappings(Mem(), CpuState(cr0=0, cr3=0, cr4=0, efer=0))) == []


# ------------------------------------------------------------------ EPT

R, W, X, XU = 1, 2, 4, 1 << 10
WB = 6 << 3
EPTP = 0x1000 | 6 | (3 << 3)          # WB, 4-level


def ept_chain(mem, gpa, leaf_level, frame, leaf=R | W | X | WB, table=R | W | X, extra=None,
              levels=4):
    return chain(mem, gpa, levels, leaf_level, frame, leaf_flags=leaf, table_flags=table,
                 extra=extra)


def test_decode_eptp():
    d = decode_eptp(0xF782000 | 0x5E)
    assert d == {"root": 0xF782000, "memory_type": 6, "memory_type_name": "WB",
                 "walk_length": 4, "ad_enabled": True, "supervisor_shadow_stack": False,
                 "valid": True, "problems": []}
    assert decode_eptp(0x2000 | (4 << 3))["walk_length"] == 5
    bad = decode_eptp(0x2000 | 3 | (1 << 3))
    assert not bad["valid"] and len(bad["problems"]) == 2


def test_ept_4k_2m_1g():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    ept_chain(mem, gpa, 3, 0x88000000)
    w = walk_ept(mem, EPTP, gpa)
    assert w.ok and w.pa == 0x88000456 and w.page_size == KIB4 and w.mode.name == "ept-4"
    assert w.levels[-1].flags == ("R", "W", "X", "MT=6")
    assert {k: r.allowed for k, r in w.access.items()} == {"read": True, "write": True,
                                                           "execute": True}
    mem = Mem()
    ept_chain(mem, gpa, 2, 0x10800000, leaf=R | X | WB | (1 << 6))
    w = walk_ept(mem, EPTP, gpa)
    assert w.page_size == MIB2 and w.pa == 0x10800000 | (gpa & (MIB2 - 1))
    assert "IPAT" in w.levels[-1].flags and "PS" in w.levels[-1].flags
    assert not w.access["write"].allowed and "W=0 in the PD entry" in w.access["write"].reason
    mem = Mem()
    ept_chain(mem, gpa, 1, 0x40000000)
    assert walk_ept(mem, EPTP, gpa).page_size == GIB1


def test_ept_5level():
    gpa = idx(1, 0, 1, 2, 3, 0x456)
    mem = Mem()
    ept_chain(mem, gpa, 4, 0x88000000, levels=5)
    w = walk_ept(mem, 0x1000 | 6 | (4 << 3), gpa)
    assert w.mode.name == "ept-5" and w.pa == 0x88000456 and len(w.levels) == 5


def test_ept_not_present_is_violation():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    ept_chain(mem, gpa, 3, 0x88000000, extra={2: 0})
    mem.put(0x3000 + 2 * 8, 0x4000)                    # no R, W, X: not present
    w = walk_ept(mem, EPTP, gpa)
    assert (w.fault.level, w.fault.reason) == ("PD", "ept-violation")
    assert all(not r.allowed for r in w.access.values())


@pytest.mark.parametrize("level, bits, leaf, what", [
    (3, W | WB, True, "write permission without read"),
    (1, W | X, False, "write permission without read"),
    (3, R | (2 << 3), True, "memory type 2"),
    (3, R | (3 << 3), True, "memory type 3"),
    (3, R | (7 << 3), True, "memory type 7"),
    (2, R | W | X | (1 << 4), False, "bits 6:3"),
    (0, R | W | X | (1 << 7), False, "bits 7:3"),
])
def test_ept_misconfigurations(level, bits, leaf, what):
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    tables = ept_chain(mem, gpa, 3, 0x88000000)
    i = (gpa >> (39 - 9 * level)) & 511
    nxt = 0x88000000 if leaf else tables[level + 1]
    mem.put(tables[level] + 8 * i, nxt | bits)
    w = walk_ept(mem, EPTP, gpa)
    assert w.fault.reason == "ept-misconfiguration" and w.fault.level == w.levels[level].name
    assert what in w.fault.message and "misconfigured" in w.fault.message


def test_ept_reserved_and_large_page_bits():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    ept_chain(mem, gpa, 2, 0x10800000, extra={2: 1 << 12})    # bits 20:12 of a 2 MiB entry
    assert walk_ept(mem, EPTP, gpa).fault.reason == "ept-misconfiguration"
    mem = Mem()
    ept_chain(mem, gpa, 1, 0x40000000, extra={1: 1 << 29})    # bits 29:12 of a 1 GiB entry
    w = walk_ept(mem, EPTP, gpa)
    assert w.fault.reason == "ept-misconfiguration" and "1 GiB" in w.fault.message
    mem = Mem()
    ept_chain(mem, gpa, 3, 0x88000000, extra={3: 1 << 45})
    w = walk_ept(mem, EPTP, gpa, maxphyaddr=40)
    assert w.fault.reason == "ept-misconfiguration" and "MAXPHYADDR 40" in w.fault.message
    assert walk_ept(mem, EPTP, gpa, maxphyaddr=46).ok


def test_ept_execute_only_and_rights_anded():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    ept_chain(mem, gpa, 3, 0x88000000, extra={1: 0})
    mem.put(0x2000 + 8, 0x3000 | R | X)               # PDPT entry without W
    mem.put(0x4000 + 3 * 8, 0x88000000 | X | WB)      # execute-only page
    w = walk_ept(mem, EPTP, gpa)
    assert w.ok and w.writable is False and w.executable is True
    assert {k: r.allowed for k, r in w.access.items()} == {"read": False, "write": False,
                                                           "execute": True}
    assert "R=0 in the PT entry" in w.access["read"].reason


def test_ept_mbec_user_execute():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    ept_chain(mem, gpa, 3, 0x88000000, leaf=R | XU | WB, table=R | W | X | XU)
    w = walk_ept(mem, EPTP, gpa, mbec=True)
    assert set(w.access) == {"read", "write", "execute", "user-execute"}
    assert w.access["user-execute"].allowed and not w.access["execute"].allowed
    assert "XU" in w.levels[-1].flags
    # XU alone makes an entry present only with MBEC
    mem.put(0x4000 + 3 * 8, 0x88000000 | XU | WB)
    assert walk_ept(mem, EPTP, gpa, mbec=True).ok
    assert walk_ept(mem, EPTP, gpa).fault.reason == "ept-violation"


def test_ept_bad_eptp_and_range_and_unreadable():
    w = walk_ept(Mem(), 0x1000 | 6 | (1 << 3), 0)
    assert w.fault.reason == "ept-misconfiguration" and "walk length 2" in w.fault.message
    assert walk_ept(Mem(), EPTP, 1 << 48).fault.reason == "non-canonical"
    w = walk_ept(Mem(), 0x7000000 | 6 | (3 << 3), 0)
    assert (w.fault.level, w.fault.reason) == ("PML4", "unreadable")


# ------------------------------------------------------------------ NPT

def test_npt_translation_and_user_rule():
    gpa = idx(0, 1, 2, 3, 0x456)
    mem = Mem()
    chain(mem, gpa, 4, 3, 0x88000000, leaf_flags=P | RW | US)
    w = walk_npt(mem, 0x1000 | PWT, gpa)
    assert w.ok and w.pa == 0x88000456 and w.mode.name == "npt-4" and w.root == 0x1000
    assert codes(w) == {"read": (True, None), "write": (True, None), "execute": (True, None)}
    mem.put(0x4000 + 3 * 8, 0x88000000 | P | US | NX)           # read-only, no-execute
    w = walk_npt(mem, 0x1000, gpa)
    assert codes(w) == {"read": (True, None), "write": (False, E_P | E_U | E_W),
                        "execute": (False, E_P | E_U | E_ID)}
    mem.put(0x3000 + 2 * 8, 0x4000 | P | RW)                    # PD entry without U/S
    w = walk_npt(mem, 0x1000, gpa)
    assert w.user is False
    assert codes(w)["read"] == (False, E_P | E_U)
    assert "user accesses" in w.access["read"].reason


def test_npt_faults():
    gpa = idx(0, 1, 2, 3, 0x456)
    w = walk_npt(Mem(), 0x1000, gpa)
    assert (w.fault.reason, w.fault.error_code) == ("not-present", E_U)
    assert codes(w)["write"] == (False, E_U | E_W)
    mem = Mem()
    chain(mem, gpa, 4, 3, 0x88000000, extra={3: NX})
    w = walk_npt(mem, 0x1000, gpa, nxe=False)
    assert (w.fault.reason, w.fault.error_code) == ("reserved-bit", E_P | E_RSVD | E_U)
    mem = Mem()
    chain(mem, gpa, 5, 4, 0x88000000, leaf_flags=T)
    assert walk_npt(mem, 0x1000, gpa, levels=5).pa == 0x88000456
