"""The walkers reproduce the numbers of the seed lab report (/work/shared/seeds/*.txt, appendix).

The report's in-guest modules printed two walks, entries in binary:
  gpt_dump (in L2): a 4-level guest page walk of one GVA, PGD/PUD/PMD entries and next-level GPAs;
  ept_dump (in L1): an EPT walk of one GPA ending in a 2 MiB page, and the HPA.
The numbers are transcribed here (the log parser lives in qintrospect/modlog/, not here); the
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

Which characters of the ept_dump's 2 MiB block are bits, by counting columns (checked on the
verbatim copy tests/data/seed_ept_dump.log below): every stamped line of the block is exactly 80
characters, the capture cut them there ("[  384.573300] " takes 15).
  * The breakdown lines (" PMD    ", " Mask1  ", " HFN    ", " GPA    ", " Mask2  ", " Offset ":
    an 8-column label) have room for 3 characters after the 40-bit group: two bits and ")". The
    two are bits 11:10 of each value (checked below); the ")" is the module's own text, so their
    low group is not a plain 12-bit field and only bits 11:10 are read from it.
  * The HPA line's label "HPA   " is 6 columns (no leading blank), so the same cut leaves it 5
    characters after its 40-bit group: "10110". All five are bit characters -- no ")" in third
    place as in the breakdown lines -- so the HPA line is a plain 12/40/12 split like the
    "435: PMD ..." entry line, and "10110" is HPA bits 11:7 (bits 6:0 are cut). Bits 63:8
    match what the log's own numbers give (HFN 0x10800000 | the GPA's offset in the 2 MiB
    page 0x53be8 = 0x10853be8, bits 11:7 "10111"); bit 7 is printed 0 where they give 1. The
    printed HPA disagrees with the log's own entries at bit 7 (a slip in the module or in the
    report's copy; the text cannot say which). qintrospect.modlog reads the line the same way
    (tests/unit/test_modlog.py: test_seed_ept_dump_recomputes_its_hpa).
"""

from pathlib import Path

import pytest

from qintrospect.errors import MemoryReadError
from qintrospect.paging import CpuState, decode_eptp, walk, walk_ept

DATA = Path(__file__).resolve().parent.parent / "data"

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
#  HPA   000000000000 0000000000000000000000010000100001010011 10110   (cut at column 80:
#  "10110" is bits 11:7, see the docstring)
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


def test_ept_dump_hpa_line_is_bits_63_to_7_and_bit_7_disagrees():
    w = walk_ept(ept_memory(), b(EPTP_FRAME) << 12 | KVM_EPTP_LOW, gpa())
    assert w.ok and w.pa == 0x10853BE8
    high, frame, low = HPA_PRINTED
    assert len(low) == 5                                      # bits 11:7; 6:0 cut at column 80
    printed = b(high) << 52 | b(frame) << 12 | b(low) << 7
    known = ((1 << 64) - 1) & ~0x7F
    assert w.pa >> 52 == b(high)
    assert w.pa >> 12 & ((1 << 40) - 1) == b(frame)          # ...10000100001010011
    assert w.pa >> 7 & 0x1F == 0b10111                        # what the log's numbers give
    # Bits 63:8 agree; bit 7 is printed 0 where the walk (offset 0xbe8) has 1.
    assert (printed ^ w.pa) & known == 1 << 7
    assert w.pa >> 7 & 1 == 1 and printed >> 7 & 1 == 0


def test_ept_dump_columns_hpa_line_is_a_plain_field_breakdown_lines_are_not():
    """The column count behind reading the HPA line's "10110" as bits 11:7 (see the docstring),
    on the verbatim copy of the seed's ept_dump (tests/data/seed_ept_dump.log)."""
    lines = (DATA / "seed_ept_dump.log").read_text().splitlines()
    block = lines[lines.index(next(x for x in lines if "Huge Page (2M)" in x)) + 1:]
    block = [x for x in block if not x.endswith("Value at HPA: 1772334")]
    assert len(block) == 10 and all(len(x) == 80 for x in block)     # all cut at column 80
    stamp = len("[  384.573300] ")
    breakdown = 0
    for line in block:
        body = line[stamp:]
        label = body[:8] if not body.startswith(("HPA", "[e.g]", "-")) else None
        if body.startswith("HPA"):
            assert body[:6] == "HPA   " and body[6:18].isdigit() and body[18] == " "
            assert body[19:59].strip("01") == "" and body[59] == " "
            assert body[60:] == HPA_PRINTED[2] and set(body[60:]) <= {"0", "1"}
        elif label and label.strip() in ("PMD", "Mask1", "HFN", "GPA", "Mask2", "Offset"):
            assert body[8:20].strip("01") == "" and body[20] == " "
            assert body[21:61].strip("01") == "" and body[61] == " "
            assert set(body[62:64]) <= {"0", "1"} and body[64] == ")"   # bits 11:10, then ")"
            breakdown += 1
    assert breakdown == 6


@pytest.mark.parametrize("line", ["L2 gpt_dump", "L1 ept_dump"])
def test_seed_walks_stay_within_depth(line):
    mem = gpt_memory() if line.startswith("L2") else ept_memory()
    if line.startswith("L2"):
        walk(mem, L2_CPU, gva())
        assert mem.reads == 4
    else:
        walk_ept(mem, b(EPTP_FRAME) << 12 | KVM_EPTP_LOW, gpa())
        assert mem.reads == 3
