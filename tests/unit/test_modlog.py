"""The module-log parser, checker and comparisons (qintrospect/modlog/).

Data: tests/data/seed_*.log are the two appendix logs of the seed lab report, copied verbatim;
tests/data/guest_gpt_dump*.log are real dmesg captures of vm/module/gpt_dump.ko in the test
guest (Debian 6.1 cloud kernel under TCG), taken with vm/guest.py: insmod with the probe's pid
and region GVA, then dmesg. The probe's own report of that boot (its /proc/self/pagemap) is
PROBE_MAX / PROBE_QEMU64 below.
"""

import json
import re
from pathlib import Path

import pytest

from qintrospect.errors import ParseError, UsageError
from qintrospect.modlog import (
    ADDR_BITS, U64, bit_name, bit_ranges, chain, check_log, compare, explain_direct_map,
    explain_shared_bits, implied_final, parse_log, parse_log_file, parse_logs,
)
from qintrospect.paging import CpuState, walk, walk_ept

DATA = Path(__file__).resolve().parent.parent / "data"
SEED_GPT = (DATA / "seed_gpt_dump.log").read_text()
SEED_EPT = (DATA / "seed_ept_dump.log").read_text()

# What the probe printed in the boots the guest logs come from (gva, gpa by pagemap, value).
PROBE_MAX = {     # -cpu max: 5-level paging
    "heap": (0x5D786D0, 0x9FD86D0, 0x51494E54524F0001),
    "thp": (0x7F09B23233E8, 0x85233E8, 0x51494E54524F0004),
    "untouched": (0x7F09B212A000, None, 0),
}
PROBE_QEMU64_HEAP_GPA = 0xA9D66D0   # -cpu qemu64: the kernel log walks its direct-map alias

CR0_PG_PE = (1 << 31) | 1
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12
EFER_LME_LMA_NXE = (1 << 8) | (1 << 10) | (1 << 11)


def nonfalse(findings):
    return [f for f in findings if f.agree is False]


# ------------------------------------------------------------------------------ the seed logs

def test_seed_gpt_dump_parses():
    log = parse_log(SEED_GPT)
    assert log.kind == "gpt_dump"
    assert log.paging_levels == 4
    # The binary GVA line gives bits 47..0; the rest is the canonical sign extension.
    assert log.address_bits_known == (1 << 48) - 1
    assert log.address == 0xFFFF8E2876653BE8
    assert log.root == 0x62F9C000 and log.root_known_mask == ADDR_BITS
    assert [lvl.name for lvl in log.levels] == ["PGD", "PUD", "PMD", "PTE"]
    assert [lvl.index for lvl in log.levels] == [284, 161, 435, 83]
    assert [hex(lvl.entry) for lvl in log.levels[:3]] == ["0x4819f067", "0x481a0067",
                                                         "0x366a2063"]
    assert all(lvl.entry_known_mask == U64 for lvl in log.levels[:3])
    assert [hex(lvl.next_addr) for lvl in log.levels[:3]] == ["0x4819f000", "0x481a0000",
                                                             "0x366a2000"]
    pte = log.levels[3]
    assert pte.entry is None and pte.entry_known_mask == 0    # the log stops before it
    assert pte.table_addr == 0x366A2000
    assert log.final_address is None and log.final_known_mask == 0
    assert log.value == 1772334                               # printed in decimal
    assert any("PTE entry" in w for w in log.warnings)


def test_seed_gpt_dump_indexes_and_offset_come_from_its_gva_bits():
    log = parse_log(SEED_GPT)
    gva = log.address
    assert [gva >> s & 0x1FF for s in (39, 30, 21, 12)] == [284, 161, 435, 83]
    assert gva & 0xFFF == 0xBE8
    index_findings = [f for f in check_log(log) if f.check == "index"]
    # index lines, column line, entry lines, "+ 64 * idx" tails: 4 + 4 + 3 + 4
    assert len(index_findings) == 15
    assert all(f.agree is True for f in index_findings)


def test_seed_gpt_dump_recomputes_what_it_prints():
    findings = check_log(parse_log(SEED_GPT))
    assert nonfalse(findings) == []
    nexts = [f for f in findings if f.check == "next_addr"]
    assert [(f.level, f.agree) for f in nexts] == [("PGD", True), ("PUD", True), ("PMD", True)]
    final = [f for f in findings if f.check == "final"]
    assert len(final) == 1 and final[0].agree is None
    # Only the page offset (from the GVA) and the zero bits 63..52 are known of the GPA.
    assert final[0].computed == 0xBE8
    assert "PTE entry is not printed" in final[0].message


def test_seed_ept_dump_parses():
    log = parse_log(SEED_EPT)
    assert log.kind == "ept_dump"
    assert log.address == 0x36653BE8 and log.address_bits_known == U64
    assert log.root == 0xF782000
    assert [(lvl.name, lvl.index) for lvl in log.levels] == [("PGD", 0), ("PUD", 0), ("PMD", 435)]
    pmd = log.levels[2]
    assert pmd.page_size == 2 << 20
    # "435: PMD ... 1" shows bits 63..11; the split "PMD ... 11)" adds bit 10 (the breakdown
    # lines print bits 11..10 and then ")": reading stops there).
    assert pmd.entry_known_mask == U64 & ~0x3FF and pmd.entry == 0x10800C00
    assert log.levels[0].next_addr == 0xF781000 and log.levels[1].next_addr == 0xAE56000
    assert log.value == 1772334
    # The HPA line is cut after 5 of its 12 low bits: bits 11..7 printed, 6..0 not.
    assert log.final_known_mask == U64 & ~0x7F
    assert log.final_address >> 12 == 0b10000100001010011
    assert any("line 29" in w and "6..0" in w for w in log.warnings)
    assert any("line 16" in w and "'5'" in w for w in log.warnings)


def test_seed_ept_dump_recomputes_its_hpa():
    log = parse_log(SEED_EPT)
    findings = check_log(log)
    by = {f.check: f for f in findings if f.check in ("mask1", "hfn", "mask2", "offset")}
    assert set(by) == {"mask1", "hfn", "mask2", "offset"}
    assert all(f.agree is True for f in by.values())
    hpa, hmask = implied_final(log)
    assert (hpa, hmask) == (0x10853BE8, U64)      # HFN & Mask1 | GPA & Mask2
    final = [f for f in findings if f.check == "final"]
    assert len(final) == 1
    f = final[0]
    assert f.computed == 0x10853BE8 and f.printed >> 12 == 0x10853
    # Bits 63..8 agree. The HPA line is a plain 12/40/12 split cut at column 80 after 5 of its
    # low bits: "10110" is bits 11..7 (its 6-column label "HPA   " leaves two more characters
    # than the breakdown lines' 8-column labels, which show bits 11..10 and then ")"; see
    # tests/unit/test_seed_numbers.py). Bit 7 is 0 where 0xbe8 has 1 (a slip in the report's
    # copy, or in the module); bits 6..0 are cut.
    assert f.compared_mask == U64 & ~0x7F
    assert (f.printed ^ f.computed) & f.compared_mask == 1 << 7
    assert f.agree is False
    assert "bit(s) 7" in f.message and "bits 6..0 not printed" in f.message
    # Nothing else in the log disagrees.
    assert nonfalse(findings) == [f]


def test_seed_chain_guest_and_host():
    ch = chain(parse_log(SEED_GPT), parse_log(SEED_EPT))
    assert ch.gva == 0xFFFF8E2876653BE8
    assert ch.host_gpa == 0x36653BE8
    assert ch.hpa_recomputed == 0x10853BE8
    # The guest log never prints its GPA: only the offset (and the zero top bits) compare.
    assert ch.gpa_compared_mask & 0xFFFFFFFFFFFFF == 0xFFF
    assert ch.gpa_agree is True
    assert ch.value_agree is True and ch.guest_value == ch.host_value == 1772334
    notes = " ".join(ch.notes)
    assert "direct-map alias" in notes and "0xffff8e2840000000" in notes
    assert "2 MiB page" in notes
    json.dumps(ch.to_dict())


def test_chain_wants_a_guest_log_then_a_host_log():
    with pytest.raises(UsageError):
        chain(parse_log(SEED_EPT), parse_log(SEED_GPT))


# ------------------------------------------------------------------------ why indexes agree

def test_direct_map_explains_the_seeds_equal_indexes():
    text = explain_direct_map(0xFFFF8E2876653BE8, 0x36653BE8)
    assert "direct-map alias" in text and "page_offset_base = 0xffff8e2840000000" in text
    assert "by construction" in text and "PMD index (435)" in text and "PTE index (83)" in text


def test_direct_map_5level_range():
    # A -cpu max guest (LA57): page_offset_base 0xff3b2440c0000000 from the real log.
    text = explain_direct_map(0xFF3B2440C0000000 + 0x9FD86D0, 0x9FD86D0)
    assert "direct-map alias" in text


def test_not_a_direct_map_alias():
    # Same low 21 bits (a 2 MiB page), base not 1 GiB-aligned: shared bits, not the direct map.
    text = explain_direct_map(0xFFFF8E2876653BE8 + (5 << 21), 0x36653BE8)
    assert "not a direct-map alias" in text and "PTE index" in text
    # A user address: outside the direct-map range.
    text = explain_direct_map(0x7F0000053BE8, 0x53BE8)
    assert "not a direct-map alias" in text
    assert explain_direct_map(0x7F0000001000, 0x5432008) is None     # nothing in common


def test_gpa_hpa_share_bits_below_21_and_pmd_differs():
    text = explain_shared_bits(0x36653BE8, 0x10853BE8)
    assert "share bits 20..0" in text and "2 MiB page" in text
    assert "the PTE index and the offset are equal by construction" in text
    assert "the PMD index differs" in text
    # PMD index equal without the PTE index: chance.
    text = explain_shared_bits((435 << 21) | (1 << 12), (7 << 30) | (435 << 21) | (2 << 12))
    assert "the PMD index is equal only by chance" in text


# ---------------------------------------------------------------- damaged text: real-log noise

def stamp(text, t0=384.0):
    return "\n".join(f"[{t0 + i / 1e4:12.6f}] {line}" for i, line in enumerate(text.split("\n")))


def same_numbers(a, b):
    """Two logs carry the same numbers (warnings and line numbers may differ)."""
    keys = ("kind", "address", "address_bits_known", "root", "root_known_mask", "levels",
            "final_address", "final_known_mask", "value")
    da, db = a.to_dict(), b.to_dict()
    return {k: da[k] for k in keys} == {k: db[k] for k in keys}


def unstamp(text):
    return re.sub(r"(?m)^\[ *[0-9.]+\] ", "", text)


NOISE = ["random: crng init done", "GPT:Primary header thinks Alt. header is not at the end",
         "virtio_net virtio0 eth0: renamed", "1 2 3 4", "Value at: nothing", "PGD",
         "EXT4-fs (vda1): mounted filesystem", "audit: type=1400 audit(0.0:2): apparmor",
         "NEXT_LVL", "This is not EPT", " 12: XYZ 0101", "Mask1 is a word"]


def interleave(text):
    out = []
    for i, line in enumerate(text.split("\n")):
        out += [line, NOISE[i % len(NOISE)]]
    return "\n".join(out)


@pytest.mark.parametrize("text", [SEED_GPT, SEED_EPT])
def test_timestamps_crlf_and_interleaved_messages_change_nothing(text):
    base = parse_log(text)
    bare = unstamp(text)
    assert same_numbers(base, parse_log(stamp(bare)))
    assert same_numbers(base, parse_log(text.replace("\n", "\r\n")))
    assert same_numbers(base, parse_log(interleave(bare)))
    # dmesg as it is: every line stamped, other drivers' messages in between, CRLF.
    assert same_numbers(base, parse_log(stamp(interleave(bare)).replace("\n", "\r\n")))


def test_syslog_and_printk_level_prefixes():
    log = parse_log("\n".join(f"Mar  5 10:00:01 guest kernel: [  384.5] {l}"
                              for l in SEED_GPT.split("\n")))
    assert same_numbers(log, parse_log(SEED_GPT))
    log = parse_log("\n".join(f"<6>[  384.5] {l}" for l in SEED_GPT.split("\n")))
    assert same_numbers(log, parse_log(SEED_GPT))


def test_lines_cut_shorter_keep_the_bits_they_show():
    cut = "\n".join(line[:60] for line in SEED_GPT.split("\n"))
    log = parse_log(cut, width=60)
    pgd = log.level("PGD")
    # " 284: PGD " is 10 characters, then 12 + 1 + 37 of the 40 address digits.
    assert pgd.entry_known_mask == U64 & ~((1 << 15) - 1)
    assert pgd.entry == 0x4819F067 & pgd.entry_known_mask
    assert log.address_bits_known == (1 << 48) - 1
    assert any("PGD entry incomplete" in w and "14..0" in w for w in log.warnings)
    assert nonfalse(check_log(log)) == []


def test_a_cut_number_is_not_trusted():
    text = "Value at GVA: 17723\n GPT PGD index: 280\n NEXT_LVL_GPA(CR3)  =  " + "0" * 40
    log = parse_log(text, width=19)   # the first two lines are exactly 19 wide: cut
    assert log.value is None
    assert log.level("PGD") is None or log.level("PGD").index is None
    assert any("value may be cut" in w for w in log.warnings)


def test_a_cut_begin_line_keeps_only_the_digits_it_shows():
    # Found by the fuzz (test_modlog_fuzz.py): our module's first line cut inside gva= gave the
    # short number as the whole 64-bit address. The digits shown are the high ones of %016lx.
    real = (DATA / "guest_gpt_dump.log").read_text().split("\n")
    width = real[2].index("gva=0x") + 6 + 12
    begin = real[2][:width]
    assert begin.endswith("gva=0x0000000005d7")
    log = parse_log("\n".join([begin] + real[3:]), width=width)
    assert [(it.value, it.mask) for it in log.printed if it.source == "begin line"] == \
        [(0x5D70000, U64 & ~0xFFFF)]
    assert log.address == PROBE_MAX["heap"][0] and log.pid == 95
    assert nonfalse(check_log(log)) == []
    # A pid= cut at the line's end is not taken either.
    width = real[2].index("pid=9") + 5
    log = parse_log("\n".join([real[2][:width]] + real[3:]), width=width)
    assert log.pid is None


def test_wrapped_lines_are_joined():
    # The seed's own wrap: "... missing - ta" / "inting kernel" does not disturb anything.
    assert "inting kernel" in SEED_GPT
    real = (DATA / "guest_gpt_dump.log").read_text()
    wrapped = []
    for line in real.split("\n"):
        while len(line) > 80:
            wrapped.append(line[:80])
            line = line[80:]
        wrapped.append(line)
    assert same_numbers(parse_log("\n".join(wrapped)), parse_log(real))


def test_real_log_cut_at_80_columns_keeps_what_the_hex_lines_repeat():
    real = (DATA / "guest_gpt_dump.log").read_text()
    cut = "\n".join(line[:80] for line in real.split("\n"))
    full, log = parse_log(real), parse_log(cut)
    for key in ("address", "address_bits_known", "root", "root_known_mask", "final_address",
                "final_known_mask", "value"):
        assert getattr(log, key) == getattr(full, key), key
    for a, b in zip(full.levels, log.levels):
        assert (a.name, a.index, a.entry, a.entry_known_mask) == \
            (b.name, b.index, b.entry, b.entry_known_mask)
        # The NEXT_LVL lines have no hex twin: their low address bits are lost.
        if a.next_addr is not None:
            assert b.next_known_mask == ADDR_BITS & ~0xFF000
    assert any("NEXT_LVL_GPA(PMD) incomplete" in w and "19..12 not" in w for w in log.warnings)
    assert nonfalse(check_log(log)) == []


def test_several_runs():
    logs = parse_logs(SEED_GPT + "\n" + SEED_GPT.replace("1772334", "42"))
    assert len(logs) == 2 and logs[0].value == 1772334 and logs[1].value == 42
    last = parse_log(SEED_GPT + "\n" + SEED_GPT.replace("1772334", "42"))
    assert last.value == 42 and "2 runs" in last.warnings[0]


@pytest.mark.parametrize("text", ["", "\n\n", "hello world\nthis is not a log",
                                  "1 2 3 4\n5 6 7 8", "GPT:Primary header thinks Alt. header",
                                  "\x00\x01\x02", "[  1.0] random: crng init done"])
def test_no_log_is_a_parse_error_that_says_what_was_expected(text):
    with pytest.raises(ParseError) as e:
        parse_log(text)
    msg = str(e.value)
    assert "no gpt_dump or ept_dump log found" in msg and "Value at GVA" in msg
    if text.strip("\n"):
        assert "line 1 reads" in msg


def test_parse_log_file(tmp_path):
    assert parse_log_file(DATA / "seed_ept_dump.log").kind == "ept_dump"
    with pytest.raises(ParseError):
        parse_log_file(tmp_path / "missing.log")
    p = tmp_path / "latin1.log"
    p.write_bytes(SEED_GPT.encode() + b"\n\xff\xfe garbage")
    assert parse_log_file(p).value == 1772334


def test_to_dict_is_json_with_hex_strings():
    d = json.loads(json.dumps(parse_log(SEED_EPT).to_dict()))
    assert d["address"] == "0x36653be8" and d["address_bits_known"] == "0xffffffffffffffff"
    assert d["final_known_mask"] == "0xffffffffffffff80"
    assert d["levels"][2]["entry_known_mask"] == "0xfffffffffffffc00"
    assert d["value"] == "0x1b0b2e" and d["value_decimal"] == "1772334"
    for f in check_log(parse_log(SEED_EPT)):
        json.dumps(f.to_dict())


# ------------------------------------------------------------------ our module's real output

def test_real_guest_log_5level_heap():
    gva, gpa, value = PROBE_MAX["heap"]
    log = parse_log_file(DATA / "guest_gpt_dump.log")
    assert log.kind == "gpt_dump" and log.paging_levels == 5 and log.pid == 95
    assert [lvl.name for lvl in log.levels] == ["PGD", "P4D", "PUD", "PMD", "PTE"]
    assert log.address == gva and log.address_bits_known == U64
    assert log.final_address == gpa and log.final_known_mask == U64   # = the guest's pagemap
    assert log.value == value
    assert log.warnings == ()
    findings = check_log(log)
    assert nonfalse(findings) == [] and not [f for f in findings if f.agree is None]


def test_real_guest_log_thp_2m_leaf():
    gva, gpa, value = PROBE_MAX["thp"]
    log = parse_log_file(DATA / "guest_gpt_dump_thp.log")
    pmd = log.levels[-1]
    assert pmd.name == "PMD" and pmd.page_size == 2 << 20
    assert log.address == gva and log.final_address == gpa and log.value == value
    findings = check_log(log)
    assert {f.check for f in findings} >= {"mask1", "hfn", "mask2", "offset", "final"}
    assert nonfalse(findings) == []


def test_real_guest_log_not_present():
    gva, _, _ = PROBE_MAX["untouched"]
    log = parse_log_file(DATA / "guest_gpt_dump_untouched.log")
    assert log.address == gva
    assert log.levels[-1].present is False and log.levels[-1].entry == 0
    assert log.final_address is None and log.value is None
    assert nonfalse(check_log(log)) == []


def test_real_guest_log_kernel_direct_map_like_the_seed():
    log = parse_log_file(DATA / "guest_gpt_dump_kernel.log")
    assert log.paging_levels == 4 and log.final_address == PROBE_QEMU64_HEAP_GPA
    assert log.address - log.final_address == log.page_offset_base
    assert "direct-map alias" in explain_direct_map(log.address, log.final_address)
    assert nonfalse(check_log(log)) == []


# ------------------------------------------------------------- the log against an outside walk

class SparseMem:
    """Physical memory as {address: 8-byte entry}; everything else reads as zeros."""

    def __init__(self):
        self.words = {}

    def put(self, addr, value):
        self.words[addr] = value

    def __call__(self, addr, length):
        out = bytearray()
        for a in range(addr & ~7, addr + length, 8):
            out += self.words.get(a, 0).to_bytes(8, "little")
        skip = addr & 7
        return bytes(out[skip:skip + length])


def tables_from_log(log, leaf_entry=None):
    """The page tables a log shows, laid out in memory (the leaf entry may be given)."""
    mem = SparseMem()
    for lvl in log.levels:
        entry = lvl.entry if lvl.entry is not None else leaf_entry
        mem.put(lvl.table_addr + 8 * lvl.index, entry)
    return mem


def cpu_for(log):
    cr4 = CR4_PAE | (CR4_LA57 if log.paging_levels == 5 else 0)
    return CpuState(cr0=CR0_PG_PE, cr3=log.root, cr4=cr4, efer=EFER_LME_LMA_NXE, maxphyaddr=52)


SEED_PTE = (1 << 63) | 0x36653000 | 0x063     # what the direct map implies for the seed's GVA


def seed_walk(**changes):
    log = parse_log(SEED_GPT)
    mem = tables_from_log(log, SEED_PTE)
    for (table, index), entry in changes.items():
        mem.put(table + 8 * index, entry)
    return walk(mem, cpu_for(log), log.address)


def test_compare_seed_with_a_faithful_walk():
    log = parse_log(SEED_GPT)
    w = seed_walk()
    assert w.ok and w.pa == 0x36653BE8
    cmp = compare(log, w, value=1772334)
    assert cmp.agree, [r for r in cmp.differences()]
    rows = {(r.field, r.level): r for r in cmp.rows}
    assert rows[("entry", "PTE")].agree is None
    assert rows[("entry", "PTE")].reason == "not printed in the log"
    assert rows[("final", None)].reason == "not printed in the log"
    assert rows[("value", None)].agree is True
    assert rows[("index", "PMD")].agree is True
    json.dumps(cmp.to_dict())


def flip(text, level, bit):
    """The log text with one bit of one printed entry flipped."""
    def swap(m):
        fields = m.group(3).split()
        field, pos = (0, 63 - bit) if bit >= 52 else (1, 51 - bit) if bit >= 12 else (2, 11 - bit)
        s = list(fields[field])
        s[pos] = "1" if s[pos] == "0" else "0"
        fields[field] = "".join(s)
        return f"{m.group(1)}{m.group(2)} {' '.join(fields)}"
    out, n = re.subn(r"(?m)^( *\d+: )(" + level + r") ([01 ]+)$", swap, text)
    assert n == 1
    return out


@pytest.mark.parametrize("level,bit,name", [
    ("PGD", 0, "P"), ("PGD", 2, "US"), ("PUD", 1, "RW"), ("PMD", 5, "A"), ("PMD", 6, "D"),
    ("PUD", 63, "XD"), ("PGD", 60, "PK"), ("PMD", 9, "AVL"),
])
def test_one_flipped_flag_bit_is_named_at_its_level(level, bit, name):
    cmp = compare(parse_log(flip(SEED_GPT, level, bit)), seed_walk())
    assert not cmp.agree
    diffs = cmp.differences()
    assert [(r.field, r.level) for r in diffs] == [("entry", level)]
    assert f"bit {bit} ({name}) of the {level} entry differs" in diffs[0].reason


def test_a_flipped_pfn_bit_is_a_moved_table():
    log = parse_log(flip(SEED_GPT, "PUD", 20))
    # The log now contradicts itself too: NEXT_LVL(PUD) no longer matches the PUD entry.
    assert [(f.check, f.level) for f in nonfalse(check_log(log))] == [("next_addr", "PUD")]
    diffs = compare(log, seed_walk()).differences()
    assert [(r.field, r.level) for r in diffs] == [("entry", "PUD")]
    assert "a page table moved" in diffs[0].reason and "(PFN)" in diffs[0].reason


def test_another_root_is_another_boot_or_process():
    log = parse_log(SEED_GPT)
    mem = tables_from_log(log, SEED_PTE)
    # The same tables under another root page.
    mem.put(0x12345000 + 8 * 284, log.levels[0].entry)
    w = walk(mem, CpuState(cr0=CR0_PG_PE, cr3=0x12345000, cr4=CR4_PAE,
                           efer=EFER_LME_LMA_NXE, maxphyaddr=52), log.address)
    diffs = compare(log, w).differences()
    assert ("root", None) in [(r.field, r.level) for r in diffs]
    assert all("another boot / another process" in r.reason for r in diffs)


def test_the_pti_user_copy_is_the_same_address_space():
    log = parse_log(SEED_GPT)
    mem = tables_from_log(log, SEED_PTE)
    mem.put(log.root + 0x1000 + 8 * 284, log.levels[0].entry)
    w = walk(mem, CpuState(cr0=CR0_PG_PE, cr3=log.root + 0x1000, cr4=CR4_PAE,
                           efer=EFER_LME_LMA_NXE, maxphyaddr=52), log.address)
    cmp = compare(log, w)
    root = [r for r in cmp.rows if r.field == "root"][0]
    assert root.agree is True and "PTI user copy" in root.reason


def ept_tables(pmd_entry):
    mem = SparseMem()
    mem.put(0xF782000 + 8 * 0, 0xF781807)       # bit 11 set: the log prints it as 1
    mem.put(0xF781000 + 8 * 0, 0xAE56807)
    mem.put(0xAE56000 + 8 * 435, pmd_entry)
    return mem


EPT_PMD = 0x10800000 | 0xC00 | 0x80 | (6 << 3) | 0x7    # 2 MiB, WB, RWX, bits 11/10 as printed


def test_compare_seed_ept_with_an_ept_walk():
    log = parse_log(SEED_EPT)
    w = walk_ept(ept_tables(EPT_PMD), 0xF782000 | 0x5E, log.address)
    assert w.pa == 0x10853BE8 and w.page_size == 2 << 20
    cmp = compare(log, w, value=1772334)
    # Everything the log printed agrees, except bit 7 of its HPA line (see the check_log test).
    diffs = cmp.differences()
    assert [(r.field, r.level) for r in diffs] == [("final", None)]
    assert "bits 7 differ" in diffs[0].reason and "6..0 not printed" in diffs[0].reason
    assert [r.agree for r in cmp.rows if r.field in ("entry", "next", "index")] == [True] * 8


def test_the_page_moved():
    log = parse_log(SEED_EPT)
    w = walk_ept(ept_tables(EPT_PMD ^ (1 << 28)), 0xF782000 | 0x5E, log.address)
    diffs = {(r.field, r.level): r for r in compare(log, w).differences()}
    assert diffs[("entry", "PMD")].reason.startswith("the page moved")
    assert "bit(s) 28 (PFN) of the PMD entry" in diffs[("entry", "PMD")].reason
    assert diffs[("final", None)].reason.startswith("the page moved")


def test_real_logs_against_walks_of_their_own_tables():
    for name, key in (("guest_gpt_dump.log", "heap"), ("guest_gpt_dump_thp.log", "thp"),
                      ("guest_gpt_dump_untouched.log", "untouched")):
        log = parse_log_file(DATA / name)
        w = walk(tables_from_log(log), cpu_for(log), log.address)
        gva, gpa, value = PROBE_MAX[key]
        assert w.pa == gpa
        cmp = compare(log, w, value=value if gpa else None)
        assert cmp.agree, (name, cmp.differences())


def test_a_walk_that_stops_early():
    log = parse_log_file(DATA / "guest_gpt_dump.log")
    mem = tables_from_log(log)
    pmd = log.level("PMD")
    mem.put(pmd.table_addr + 8 * pmd.index, 0)           # the PMD entry is gone now
    diffs = compare(log, walk(mem, cpu_for(log), log.address)).differences()
    fields = [(r.field, r.level) for r in diffs]
    assert ("entry", "PMD") in fields and ("level", "PTE") in fields and ("final", None) in fields
    level_row = [r for r in diffs if r.field == "level"][0]
    assert "stopped" in level_row.reason


# ---------------------------------------------------------------------------------- helpers

def test_bit_helpers():
    assert bit_ranges(0) == "none"
    assert bit_ranges(U64 & ~0x7F) == "63..7"
    assert bit_ranges(0b1011) == "3, 1..0"
    assert [bit_name(b) for b in (0, 1, 2, 5, 6, 7, 12, 51, 60, 63)] == [
        "P", "RW", "US", "A", "D", "PS/PAT", "PFN", "PFN", "PK", "XD"]
    assert [bit_name(b, "ept_dump") for b in (0, 1, 2, 7, 8, 9, 63)] == [
        "R", "W", "X", "PS", "A", "D", "SVE"]


def test_chain_of_two_different_experiments_disagrees():
    guest = parse_log_file(DATA / "guest_gpt_dump_kernel.log")
    ch = chain(guest, parse_log(SEED_EPT))
    assert ch.gpa_agree is False and ch.value_agree is False
    assert any("not the same page" in n for n in ch.notes)
    assert any("page_offset_base" in n and "does not equal" in n for n in ch.notes)


def test_compare_host_against_the_seed_ept_log():
    """An ept_dump log set against the host's own GPA -> HPA answer (compare --log)."""
    from qintrospect import modlog
    log = modlog.parse_log_file(DATA / "seed_ept_dump.log")
    # the HPA the log's own entries imply, and the value it printed: the printed HPA line
    # keeps bits 63..7, of which bit 7 is 0 in the log
    same = modlog.compare_host(log, 0x10853B68, 1772334)
    assert same.agree and [r.field for r in same.rows] == ["final", "value"]
    assert "6..0 not printed" in same.rows[0].reason
    moved = modlog.compare_host(log, 0x20853B68, 1772334)
    assert not moved.agree and "bits 29" in moved.rows[0].reason
    nothing = modlog.compare_host(log, None, None, "0x36653be8 is unassigned guest-physical space")
    assert nothing.rows[0].agree is None and "unassigned" in nothing.rows[0].reason
