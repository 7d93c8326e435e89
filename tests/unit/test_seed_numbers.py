"""The walkers reproduce the numbers of the seed lab report (/work/shared/seeds/*.txt, appendix).

The report's in-guest modules printed two walks, entries in binary:
  gpt_dump (in L2): a 4-level guest page walk of one GVA, PGD/PUD/PMD entries and next-level GPAs;
  ept_dump (in L1): an EPT walk of one GPA ending in a 2 MiB page, and the HPA.
The numbers are transcribed here (the log parser lives in qintrospect/modlog.py, not here); the
bit strings are copied verbatim so each can be compared with the log by eye. Entries are written
into a bytearray at the table addresses the logs print, and the walkers must land on the same
indexes, table addresses and final address.

What the logs do NOT show, and what we therefore supply (and cannot check):
  * gpt_dump stops at "NEXT_LVL_GPA(PMD) = ... + 64 * 83": the PTE and the final GPA are not
    printed, so the guest walk is checked up to the PT entry's address and ends not-present.
  * ept_dump's lines are cut at column 80: of each entry's low 12 bits only bit 11 is printed
    (bits 11:10 for the 2 MiB entry in the breakdown block). The R/W/X bits, the memory type,
    PS and the EPTP's low bits are not shown; we use what KVM writes (RWX, WB, PS on the
    2 MiB entry -- "Huge Page (2M) at level 2 detected!" -- and EPTP = root | WB | 4-level | A/D).
  * The HPA line shows bits 63:12 and then "10110": the first two characters are bits 11:10
    (the breakdown lines above it print bits 11:10 and then ")", and those two characters
    match their values, checked below), but the next three ("110") do not match bits 9:7 of the
    page offset 0xbe8 the same log prints in its GPA lines (they are "111"): that group is not a
    plain bit field, so HPA bits 9:0 cannot be checked from the log.
"""

import pytest

from qintrospect.errors import MemoryReadError
from qintrospect.paging import CpuState, decode_eptp, walk, walk_ept

# Width of the fields as the modules print them: [63:52] [51:12] [11:0].


def b(bits: str) -> int:
    return int(bits.replace(" ", ""), 2)


def entry(high: str, frame: str, low: str) -> int:
    """An entry from the log's three groups (low may be cut short: pass what is printed)."""
    assert len(high) == 12 and len(frame) == 40
    return b(high) << 52 | b(frame) << 12 | b(low)


class Mem:
    """Sparse physical memory: {address: 8 bytes}; anything else reads as zero, except pages
    never written to, which are unreadable (so a walk that wanders off says so)."""

    def __init__(self):
        self.words = {}
        self.reads = 0

    def put(self, addr, value):
        self.words[addr] = value

    def __call__(self, addr, length):
        self.reads += 1
        if not any(a & ~0xFFF == addr & ~0xFFF for a in self.words):
            raise MemoryReadError(f"page {addr:#x} not in the transcript", addr)
        return self.words.get(addr, 0).to_bytes(8, "little")[:length]


# ---------------------------------------------------------------- gpt_dump (L2 guest walk)
#  GVA [PGD IDX] [PUD IDX] [PMD IDX] [PTE IDX] [  Offset  ]
GVA_BITS = "100011100 010100001 110110011 001010011 101111101000"
GPT_INDEXES = (284, 161, 435, 83)
GPT_OFFSET = 0xBE8
#  NEXT_LVL_GPA(CR3)  =  0000000000000000000001100010111110011100  +  64 * 284
CR3_FRAME = "0000000000000000000001100010111110011100"
#  (index, level, entry printed as [63:52] [51:12] [11:0], NEXT_LVL_GPA printed after it)
GPT_ENTRIES = [
    (284, "PGD", ("000000000000", "0000000000000000000001001000000110011111", "000001100111"),
     "0000000000000000000001001000000110011111"),
    (161, "PUD", ("000000000000", "0000000000000000000001001000000110100000", "000001100111"),
     "0000000000000000000001001000000110100000"),
    (435, "PMD", ("000000000000", "0000000000000000000000110110011010100010", "000001100011"),
     "0000000000000000000000110110011010100010"),
]


def gva() -> int:
    """The printed 48 bits, sign-extended (PGD index 284 >= 256: an upper-half address)."""
    raw = b(GVA_BITS)
    assert raw >> 47 == 1
    return raw | 0xFFFF << 48


def gpt_memory() -> Mem:
    mem = Mem()
    table = b(CR3_FRAME) << 12
    for index, _, fields, next_frame in GPT_ENTRIES:
        e = entry(*fields)
        assert e >> 12 & ((1 << 40) - 1) == b(next_frame)   # the log agrees with itself
        mem.put(table + 8 * index, e)
        table = b(next_frame) << 12
    mem.put(table, 0)   # the PT page exists; its entry 83 was not printed
    return mem


# CR0/CR4/EFER are not in the log: an x86-64 Linux with 4-level paging (the module prints four
# levels; with LA57 Linux would print a p4d too), PAE, PGE, NX on, no PCID.
L2_CPU = CpuState(cr0=0x80050033, cr3=b(CR3_FRAME) << 12, cr4=0x6F0, efer=0xD01)


def test_gpt_dump_gva_indexes():
    assert [int(g, 2) for g in GVA_BITS.split()[:4]] == list(GPT_INDEXES)
    assert gva() & 0xFFF == GPT_OFFSET
    w = walk(gpt_memory(), L2_CPU, gva())
    assert [s.index for s in w.levels] == list(GPT_INDEXES)
    assert [s.linux_name for s in w.levels] == ["pgd", "pud", "pmd", "pte"]


def test_gpt_dump_next_level_addresses():
    w = walk(gpt_memory(), L2_CPU, gva())
    assert w.root == b(CR3_FRAME) << 12 == 0x62F9C000
    for step, (index, _, fields, next_frame) in zip(w.levels, GPT_ENTRIES):
        assert step.entry == entry(*fields)
        assert step.entry_addr == step.table_addr + 8 * index   # the log's "+ 64 * index" is bits
        assert step.next_addr == b(next_frame) << 12
    assert [hex(s.next_addr) for s in w.levels[:3]] == ["0x4819f000", "0x481a0000", "0x366a2000"]
    # Flags as printed: table entries 0x067 and, for the kernel address's PMD, 0x063 (no U/S).
    assert w.levels[0].flags == ("P", "RW", "US", "A")
    assert w.levels[2].flags == ("P", "RW", "A")


def test_gpt_dump_pte_not_in_log_so_walk_stops_at_pt():
    w = walk(gpt_memory(), L2_CPU, gva())
    pt = w.levels[3]
    assert pt.table_addr == b(GPT_ENTRIES[2][3]) << 12
    assert pt.entry_addr == 0x366A2000 + 8 * 83
    assert (w.fault.level, w.fault.reason) == ("PT", "not-present")


# ---------------------------------------------------------------- ept_dump (L1 EPT walk)
#  GPA [PGD IDX] [PUD IDX] [PMD IDX] [PTE IDX] [  Offset  ]
GPA_BITS = "000000000 000000000 110110011 001010011 101111101000"
EPT_INDEXES = (0, 0, 435)
#  NEXT_LVL_HPA(EPTP) =  0000000000000000000000001111011110000010
EPTP_FRAME = "0000000000000000000000001111011110000010"
# (index, printed [63:52], [51:12], low bits as far as the console printed them)
EPT_ENTRIES = [
    (0, "000000000000", "0000000000000000000000001111011110000001", "1"),     # bit 11 only
    (0, "000000000000", "0000000000000000000000001010111001010110", "1"),
    (435, "000000000000", "0000000000000000000000010000100000000000", "11"),  # bits 11:10
]
#  HPA   000000000000 0000000000000000000000010000100001010011 10110   (cut at column 80)
HPA_PRINTED = ("000000000000", "0000000000000000000000010000100001010011", "10110")
#  The breakdown block: (name, [63:52], [51:12], first two low characters before ")")
BREAKDOWN = [
    ("Mask1", "000000000000", "1111111111111111111111111111111000000000", "00"),
    ("GPA", "000000000000", "0000000000000000000000110110011001010011", "10"),
    ("Mask2", "000000000000", "0000000000000000000000000000000111111111", "11"),
    ("Offset", "000000000000", "0000000000000000000000000000000001010011", "10"),
]

KVM_EPTP_LOW = 0x5E          # WB (6), walk length 4 (3 << 3), A/D enabled (1 << 6): not printed
EPT_RWX = 0b111              # not printed
EPT_LEAF_2M = EPT_RWX | 6 << 3 | 1 << 7     # + WB memory type, PS (the log says 2M page)


def gpa() -> int:
    return b(GPA_BITS)


def ept_memory() -> Mem:
    mem = Mem()
    table = b(EPTP_FRAME) << 12
    for level, (index, high, frame, low) in enumerate(EPT_ENTRIES):
        printed = b(high) << 52 | b(frame) << 12 | b(low) << (12 - len(low))
        e = printed | (EPT_LEAF_2M if level == 2 else EPT_RWX)
        mem.put(table + 8 * index, e)
        table = b(frame) << 12
    return mem


def test_ept_dump_gpa_and_indexes():
    assert gpa() == 0x36653BE8
    assert [int(g, 2) for g in GPA_BITS.split()[:3]] == list(EPT_INDEXES)
    w = walk_ept(ept_memory(), b(EPTP_FRAME) << 12 | KVM_EPTP_LOW, gpa())
    assert [s.index for s in w.levels] == list(EPT_INDEXES)
    assert decode_eptp(b(EPTP_FRAME) << 12 | KVM_EPTP_LOW)["root"] == 0xF782000


def test_ept_dump_next_level_addresses():
    w = walk_ept(ept_memory(), b(EPTP_FRAME) << 12 | KVM_EPTP_LOW, gpa())
    assert [s.table_addr for s in w.levels] == [0xF782000, 0xF781000, 0xAE56000]
    assert [s.next_addr for s in w.levels] == [
        b(EPT_ENTRIES[0][2]) << 12, b(EPT_ENTRIES[1][2]) << 12, 0x10800000]
    assert w.page_size == 2 << 20 and w.levels[-1].name == "PD"


def test_ept_dump_breakdown_lines_print_bits_11_10_first():
    # Why two characters of the low group can be read: in every breakdown line they are bits
    # 11:10 of the value printed in [51:12].
    values = {"Mask1": ((1 << 52) - 1) & ~((1 << 21) - 1), "GPA": gpa(),
              "Mask2": (1 << 21) - 1, "Offset": gpa() & ((1 << 21) - 1)}
    for name, high, frame, low2 in BREAKDOWN:
        v = values[name]
        assert (v >> 52, v >> 12 & ((1 << 40) - 1)) == (b(high), b(frame)), name
        assert v >> 10 & 3 == b(low2), name


def test_ept_dump_hpa_bits_63_to_10_match_bits_9_to_0_not_printed_legibly():
    w = walk_ept(ept_memory(), b(EPTP_FRAME) << 12 | KVM_EPTP_LOW, gpa())
    assert w.ok
    high, frame, low = HPA_PRINTED
    assert w.pa >> 52 == b(high)
    assert w.pa >> 12 & ((1 << 40) - 1) == b(frame)          # ...10000100001010011
    assert w.pa >> 10 & 3 == b(low[:2])                       # "10"
    # Bits 9:0 cannot be checked: the line is cut at column 80 and the characters after bit 10
    # ("110") are not bits 9:7 of the HPA (the log's own GPA offset 0xbe8 gives "111").
    assert w.pa == 0x10853BE8


@pytest.mark.parametrize("line", ["L2 gpt_dump", "L1 ept_dump"])
def test_seed_walks_stay_within_depth(line):
    mem = gpt_memory() if line.startswith("L2") else ept_memory()
    if line.startswith("L2"):
        walk(mem, L2_CPU, gva())
        assert mem.reads == 4
    else:
        walk_ept(mem, b(EPTP_FRAME) << 12 | KVM_EPTP_LOW, gpa())
        assert mem.reads == 3
