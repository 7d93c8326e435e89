"""Logs of our second-level dump module (vm/module/slat_dump.c): parse, check, compare.

Data: real dmesg captures of slat_dump.ko in the KVM rig's L1 (Debian's 6.1 cloud kernel under
TCG -cpu max, kvm-amd, LA57, MAXPHYADDR 40), each a run of `insmod slat_dump.ko root=... gpa=...`:

* tests/data/slat_dump_npt5_rig_*.log: KVM's own 5-level NPT for the L2 guest (the root from
  `qintrospect translate --slat auto` in L1). 2m: the probe's heap (RIG_HEAP: L2 GPA, HPA and
  value; a 2 MiB NPT leaf, QEMU's RAM being THP-backed in L1); thp: the probe's THP region;
  4k: GPA 0x9f008 (the first 2 MiB hold the legacy VGA/BIOS hole, so KVM maps them in 4 KiB
  pages); notpresent: GPA 0x1000 (PTE not present) then GPA 1 TiB (P4D not present); edge: a
  GPA beyond 57 bits (not walked), two refused insmods (root outside RAM, format=foo: error
  lines only, printed twice by busybox's insmod), and the NPT walked with format=ept (its A bit
  is reserved in an EPT PML5E: a misconfiguration).
* tests/data/slat_dump_{ept,npt}{4,5}_tables.log: tables made by vm/module/slat_tables.py in
  L1's memory, five runs each (4 KiB, 2 MiB and 1 GiB leaves on one data page, a not-present
  PDE, and an EPT misconfiguration / an NPT reserved bit); ept4 has a sixth run given a whole
  EPTP (memory type WB, walk length 4, A/D: root=0x...05e).
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from qintrospect import slat
from qintrospect.errors import MemoryReadError, UsageError
from qintrospect.modlog import (
    ADDR_BITS, U64, bit_name, check_log, compare_second_level, parse_log, parse_log_file,
    parse_logs, replay,
)

DATA = Path(__file__).resolve().parent.parent / "data"
RIG_ROOT = 0x7FE9D000
RIG_HEAP = (0x67E76D0, 0xD5E76D0, 0x51494E54524F0001)       # L2 GPA, L1 HPA, value
RIG_THP = (0x4D233E8, 0x1AD233E8, 0x51494E54524F0004)
TABLE_VALUE = 0x5441445F54414C53                             # vm/module/slat_tables.py
MIB2, GIB = 1 << 21, 1 << 30


def rig(name):
    return (DATA / f"slat_dump_npt5_rig_{name}.log").read_text()


def disagreements(log):
    return [f.message for f in check_log(log) if f.agree is False]


def finding(log, check):
    found = [f for f in check_log(log) if f.check == check]
    assert len(found) == 1, (check, found)
    return found[0]


def indexes_of(gpa, levels):
    return [(gpa >> (12 + 9 * (levels - 1 - k))) & 0x1FF for k in range(levels)]


# ------------------------------------------------------------------------ the real NPT of L2

def test_rig_heap_2m_npt_leaf():
    log = parse_log(rig("2m"))
    gpa, hpa, value = RIG_HEAP
    assert (log.kind, log.format, log.module, log.paging_levels, log.maxphyaddr) == \
        ("ept_dump", "npt", "slat_dump", 5, 40)
    assert log.root == RIG_ROOT and log.root_known_mask == ADDR_BITS
    assert log.root_name == "nCR3" and log.bits_kind == "gpt_dump"
    assert log.address == gpa and log.address_bits_known == U64
    assert [lvl.name for lvl in log.levels] == ["PGD", "P4D", "PUD", "PMD"]
    assert [lvl.index for lvl in log.levels] == indexes_of(gpa, 5)[:4]
    pmd = log.level("PMD")
    assert pmd.page_size == MIB2 and pmd.entry & 0x81 == 0x81     # P and PS
    assert pmd.entry & ADDR_BITS & ~(MIB2 - 1) | gpa & (MIB2 - 1) == hpa
    assert log.final_address == hpa and log.final_known_mask == U64
    assert log.value == value and log.warnings == ()
    assert disagreements(log) == []
    walk = finding(log, "walk")
    assert walk.agree and "5-level NPT walker (MAXPHYADDR 40, from the log)" in walk.message
    assert "2 MiB leaf at PMD" in walk.message
    assert finding(log, "value_check").agree is True
    # the huge-page block: Mask1, HFN, Mask2 and Offset recomputed and equal
    checks = {f.check for f in check_log(log) if f.agree}
    assert {"mask1", "hfn", "mask2", "offset", "final", "next_addr", "index"} <= checks


def test_rig_thp_region_and_4k_leaf():
    log = parse_log(rig("thp"))
    assert (log.address, log.final_address, log.value) == RIG_THP
    assert log.levels[-1].page_size == MIB2 and disagreements(log) == []
    log = parse_log(rig("4k"))
    assert log.address == 0x9F008 and log.final_address == 0x889F008
    assert [lvl.name for lvl in log.levels] == ["PGD", "P4D", "PUD", "PMD", "PTE"]
    pte = log.level("PTE")
    assert pte.index == 159 and pte.entry == 0x889FE67 and pte.page_size is None
    assert log.value == 0 and disagreements(log) == []
    assert finding(log, "walk").agree and "4 KiB leaf at PTE" in finding(log, "walk").message


def test_rig_not_present_at_pte_and_at_p4d():
    pte, p4d = parse_logs(rig("notpresent"))
    for log, level, index in ((pte, "PTE", 1), (p4d, "P4D", 2)):
        stop = log.stop
        assert (stop.name, stop.index, stop.entry, stop.present, stop.fault) == \
            (level, index, 0, False, "not-present")
        assert log.levels[-1] is stop and log.final_address is None and log.value is None
        assert log.warnings == ()         # no "final HPA not printed": the walk ended
        assert disagreements(log) == []
        assert "P (bit 0) of the entry: 0, agrees" in " ".join(f.message for f in check_log(log))
        assert finding(log, "walk").agree is True
    assert pte.address == 0x1000 and p4d.address == 1 << 40


def test_rig_edge_cases():
    text = rig("edge")
    # the refused insmods print error lines only: no run of their own
    assert "is refused" in text and "format=foo" in text
    beyond, as_ept = parse_logs(text)
    assert beyond.address == 1 << 57 and beyond.levels == () and beyond.stopped
    assert any("did not walk" in w for w in beyond.warnings)
    assert not any("not printed" in w for w in beyond.warnings)
    walk = finding(beyond, "walk")
    assert walk.agree and "non-canonical" in walk.message
    # KVM's NPT read as an EPT: the PML5E's A bit (5) is reserved in a non-leaf EPT entry
    assert as_ept.format == "ept" and as_ept.root == RIG_ROOT
    assert [(lvl.name, lvl.fault) for lvl in as_ept.levels] == [("PGD", "ept-misconfiguration")]
    assert disagreements(as_ept) == []
    assert "ept-misconfiguration" in finding(as_ept, "walk").message


# ------------------------------------------------------------------ tables made in L1's memory

def table_runs(fmt, levels):
    return parse_logs((DATA / f"slat_dump_{fmt}{levels}_tables.log").read_text())


@pytest.mark.parametrize("fmt,levels", [("ept", 4), ("ept", 5), ("npt", 4), ("npt", 5)])
def test_tables_every_leaf_size_and_both_stops(fmt, levels):
    runs = table_runs(fmt, levels)
    assert len(runs) == (6 if (fmt, levels) == ("ept", 4) else 5)
    four_k, two_m, one_g, absent, invalid = runs[:5]
    for log in runs:
        assert (log.format, log.paging_levels, log.module) == (fmt, levels, "slat_dump")
        assert log.bits_kind == ("ept_dump" if fmt == "ept" else "gpt_dump")
        assert disagreements(log) == [], disagreements(log)
        assert finding(log, "walk").agree is True
    # the three leaves reach one data page: one HPA, one value
    assert [log.levels[-1].name for log in (four_k, two_m, one_g)] == ["PTE", "PMD", "PUD"]
    assert [log.levels[-1].page_size for log in (two_m, one_g)] == [MIB2, GIB]
    assert four_k.final_address == two_m.final_address == one_g.final_address
    assert {log.value for log in (four_k, two_m, one_g)} == {TABLE_VALUE}
    assert all(finding(log, "value_check").agree for log in (four_k, two_m, one_g))
    assert [f.check for f in check_log(one_g) if f.check == "mask1"] == ["mask1"]
    assert absent.stop.name == "PMD" and absent.stop.fault == "not-present"
    bad = "ept-misconfiguration" if fmt == "ept" else "reserved-bit"
    assert invalid.stop.name == "PMD" and invalid.stop.fault == bad
    reason = ("write permission without read" if fmt == "ept"
              else "reserved bit(s) 13 set (must be 0 in a 2 MiB page entry)")
    assert reason in finding(invalid, "walk").message
    # the NPT's reserved-bit PDE has PS=1, but the walk stopped there: not read as a leaf
    assert not any("PS (bit 7)" in f.message and f.level == "PMD"
                   for f in check_log(invalid))


def test_a_whole_eptp_as_root():
    log = table_runs("ept", 4)[5]
    text = (DATA / "slat_dump_ept4_tables.log").read_text()
    assert re.search(r"begin format=ept levels=4 root=0x[0-9a-f]{13}05e ", text)
    begin = next(it for it in log.printed if it.source == "begin line" and it.what == "root")
    assert log.root & 0xFFF == 0 and begin.value == log.root
    hexline = next(it for it in log.printed if it.source == "root hex line")
    assert hexline.value == log.root           # EPTP: 0x...05e, the low bits dropped
    assert log.paging_levels == 4 and disagreements(log) == []


# --------------------------------------------------------------------- the format matters

def as_ept(text):
    return (text.replace("format=npt", "format=ept").replace("NPT", "EPT")
            .replace("nCR3", "EPTP"))


def test_the_same_entries_read_as_ept_are_misconfigured():
    log = parse_log(as_ept(rig("2m")))
    assert log.format == "ept" and log.bits_kind == "ept_dump"
    walk = finding(log, "walk")
    assert walk.agree is False and "ept-misconfiguration" in walk.message
    assert "2 MiB leaf at PMD" in walk.message


def test_a_log_that_says_both_formats_is_warned_about():
    log = parse_log(rig("2m").replace("This is NPT", "This is EPT"))
    assert log.format == "npt"        # begin, index lines, nCR3 lines outvote the one line
    assert any("both NPT" in w for w in log.warnings)


def test_format_from_the_seed_style_lines_alone():
    """Without our begin and hex lines, "This is NPT" / "NPT ... index" still decide."""
    lines = [ln for ln in rig("4k").splitlines()
             if "begin" not in ln and "nCR3" not in ln]
    log = parse_log("\n".join(lines))
    assert log.format == "npt" and log.root is None
    assert replay(log) is None             # no root: nothing to replay
    # an NPT entry is present by its P bit (an EPT one by R/W/X)
    assert "PTE entry P (bit 0) = 1: yes" in [f.message for f in check_log(log)]
    assert disagreements(log) == []


def test_bit_names_follow_the_table_format():
    assert bit_name(1, "npt") == "RW" and bit_name(1, "ept") == "W"
    assert bit_name(6, "npt") == "D" and bit_name(9, "ept_dump") == "D"
    assert bit_name(63, "npt") == "XD" and bit_name(63, "ept") == "SVE"


# --------------------------------------------------------------------- damaged text

def unstamp(text):
    return re.sub(r"(?m)^\[ *[0-9.]+\] ", "", text)


def numbers(log):
    d = log.to_dict()
    return {k: d[k] for k in ("kind", "format", "address", "address_bits_known", "root",
                              "root_known_mask", "levels", "final_address",
                              "final_known_mask", "value", "paging_levels")}


NOISE = ["random: crng init done", "kvm: exiting hardware virtualization", "1 2 3 4",
         "PGD", "NEXT_LVL", "This is not NPT", "virtio_blk virtio1: [vda] 689152 512-byte",
         "Value check", "slat_dump: ", " HPA", "GPA 0x10"]


@pytest.mark.parametrize("name", ["2m", "4k", "notpresent"])
def test_timestamps_prefixes_crlf_and_interleaved_messages_change_nothing(name):
    text = rig(name)
    base = [numbers(log) for log in parse_logs(text)]
    bare = unstamp(text)
    assert [numbers(log) for log in parse_logs(bare)] == base
    assert [numbers(log) for log in parse_logs(text.replace("\n", "\r\n"))] == base
    syslog = "\n".join(f"Nov 29 06:41:01 qi-l1 kernel: {ln}" for ln in text.splitlines())
    assert [numbers(log) for log in parse_logs(syslog)] == base
    dmesg_t = re.sub(r"(?m)^\[ *[0-9.]+\]", "[Sat Nov 29 06:41:01 2025]", text)
    assert [numbers(log) for log in parse_logs(dmesg_t)] == base
    mixed = []
    for i, line in enumerate(text.splitlines()):
        mixed += [line, f"[{99 + i:5}.000000] {NOISE[i % len(NOISE)]}"]
    assert [numbers(log) for log in parse_logs("\n".join(mixed))] == base


@pytest.mark.parametrize("width", [80, 64])
def test_lines_cut_at_the_console_width_keep_what_the_hex_lines_repeat(width):
    text = rig("2m")
    full = parse_log(text)
    cut = parse_log("\n".join(line[:width] for line in text.splitlines()), width=width)
    # every number our module prints in binary it prints in hex too, on a short line
    for key in ("address", "address_bits_known", "root", "final_address", "final_known_mask",
                "value", "format", "paging_levels"):
        assert getattr(cut, key) == getattr(full, key), key
    for a, b in zip(full.levels, cut.levels):
        assert (a.name, a.index, a.entry, a.entry_known_mask, a.page_size) == \
            (b.name, b.index, b.entry, b.entry_known_mask, b.page_size)
    assert any("incomplete" in w for w in cut.warnings)
    assert disagreements(cut) == []
    assert finding(cut, "walk").agree is True


def test_lines_wrapped_at_80_columns_are_joined():
    text = rig("thp")
    wrapped = []
    for line in text.splitlines():
        while len(line) > 80:
            wrapped.append(line[:80])
            line = line[80:]
        wrapped.append(line)
    assert numbers(parse_log("\n".join(wrapped))) == numbers(parse_log(text))


def test_a_log_with_a_changed_number_disagrees_with_itself():
    text = rig("2m")
    log = parse_log(text)
    pmd = log.level("PMD").entry
    # the leaf's hex line says another frame: its binary lines and the HPA disagree with it
    changed = parse_log(text.replace(f"PMD entry: 0x{pmd:016x}",
                                     f"PMD entry: 0x{pmd ^ 1 << 22:016x}"))
    assert any("PMD entry" in m and "DIFFER at bit(s) 22" in m for m in disagreements(changed))
    # the printed HPA moved
    hpa = RIG_HEAP[1]
    changed = parse_log(text.replace(f"HPA: 0x{hpa:016x}", f"HPA: 0x{hpa ^ 0x1000:016x}"))
    assert any(m.startswith("HPA") and "bit(s) 12" in m for m in disagreements(changed))
    # the module's own value check said equal; another expected value is found
    changed = parse_log(re.sub(r"expect=0x[0-9a-f]+", "expect=0x1234", text))
    check = finding(changed, "value_check")
    assert check.agree is False and "DIFFERENT" in check.message
    # a next-level address that is not the entry's frame
    changed = parse_log(text.replace("  +  64 * 0\n", "  +  64 * 0\n", 1)
                        .replace("NEXT_LVL_HPA(PGD)  =  0000000000000000000001111111111010011100",
                                 "NEXT_LVL_HPA(PGD)  =  0000000000000000000001111111111010011110"))
    assert any(m.startswith("NEXT_LVL(PGD)") for m in disagreements(changed))


# ------------------------------------------------------- against a live walk of the same table

class Memory:
    """Physical memory holding only the entries (and the value) we put there."""

    def __init__(self):
        self.words = {}

    def put(self, addr, value):
        self.words[addr] = value

    def read(self, addr, length):
        if length != 8 or addr not in self.words:
            raise MemoryReadError("nothing there", addr)
        return self.words[addr].to_bytes(8, "little")


def memory_of(log):
    """The second-level table as the log shows it, laid out in memory (+ the value)."""
    mem = Memory()
    for lvl in log.levels:
        mem.put(lvl.table_addr + 8 * lvl.index, lvl.entry)
    if log.final_address is not None:
        mem.put(log.final_address, log.value)
    return mem


def spec_of(log):
    n = log.paging_levels
    eptp = log.root | 6 | (n - 1) << 3 if log.format == "ept" else None
    return slat.SlatSpec(log.format, log.root, n, eptp)


def live(log, mem):
    w = slat.walk(mem.read, spec_of(log), log.address)
    value = int.from_bytes(mem.read(w.pa, 8), "little") if w.ok else None
    return compare_second_level(log, w, value)


def rows(cmp):
    return {(r.field, r.level): r for r in cmp.rows}


@pytest.mark.parametrize("path,run", [
    ("slat_dump_npt5_rig_2m.log", 0), ("slat_dump_npt5_rig_4k.log", 0),
    ("slat_dump_npt5_rig_thp.log", 0), ("slat_dump_ept4_tables.log", 0),
    ("slat_dump_ept5_tables.log", 1), ("slat_dump_npt4_tables.log", 2),
    ("slat_dump_ept4_tables.log", 5)])
def test_a_log_against_a_faithful_walk_agrees_at_every_level(path, run):
    log = parse_logs((DATA / path).read_text())[run]
    cmp = live(log, memory_of(log))
    assert cmp.agree, cmp.differences()
    got = rows(cmp)
    for lvl in log.levels:
        assert got[("entry", lvl.name)].agree is True
        assert got[("index", lvl.name)].agree is True
    assert got[("root", None)].agree and got[("final", None)].agree
    assert got[("value", None)].agree and ("stop", None) not in got


@pytest.mark.parametrize("path,run", [
    ("slat_dump_npt5_rig_notpresent.log", 0), ("slat_dump_npt5_rig_notpresent.log", 1),
    ("slat_dump_npt4_tables.log", 4), ("slat_dump_ept5_tables.log", 4),
    ("slat_dump_ept4_tables.log", 3), ("slat_dump_npt5_rig_edge.log", 0)])
def test_both_sides_stop_at_the_same_entry(path, run):
    log = parse_logs((DATA / path).read_text())[run]
    cmp = live(log, memory_of(log))
    assert cmp.agree, cmp.differences()
    stop = [r for r in cmp.rows if r.field == "stop"]
    assert len(stop) == 1 and stop[0].agree is True
    assert stop[0].reason.startswith("both stop at the") or "did not walk" in stop[0].reason


@pytest.mark.parametrize("fmt,bit,name", [("npt", 6, "D"), ("npt", 1, "RW"), ("npt", 63, "XD"),
                                          ("ept", 9, "D"), ("ept", 1, "W"), ("ept", 8, "A")])
def test_a_changed_flag_is_named_in_the_tables_format(fmt, bit, name):
    log = table_runs(fmt, 4)[1]                   # the 2 MiB leaf
    mem = memory_of(log)
    pmd = log.level("PMD")
    mem.put(pmd.table_addr + 8 * pmd.index, pmd.entry ^ 1 << bit)
    diffs = live(log, mem).differences()
    assert [(r.field, r.level) for r in diffs] == [("entry", "PMD")]
    assert f"bit {bit} ({name}) of the PMD entry differs" in diffs[0].reason


def test_the_host_page_moved():
    log = parse_log(rig("2m"))
    mem = memory_of(log)
    pmd = log.level("PMD")
    mem.put(pmd.table_addr + 8 * pmd.index, pmd.entry + MIB2)      # KVM remapped the GPA
    mem.put(log.final_address + MIB2, log.value)
    got = rows(live(log, mem))
    assert got[("entry", "PMD")].reason.startswith("the page moved")
    assert got[("final", None)].agree is False and "page moved" in got[("final", None)].reason
    assert got[("value", None)].agree is True


def test_the_hypervisor_mapped_the_page_since():
    log = parse_logs(rig("notpresent"))[0]          # GPA 0x1000: PTE not present
    mem = memory_of(log)
    pte = log.level("PTE")
    mem.put(pte.table_addr + 8 * pte.index, 0x1234067)
    mem.put(0x1234000, 7)
    got = rows(live(log, mem))
    assert got[("entry", "PTE")].agree is False and "bit 0 (P)" in got[("entry", "PTE")].reason
    assert got[("stop", "PTE")].agree is False
    assert "mapped the page since" in got[("stop", "PTE")].reason


def test_a_table_that_is_gone():
    log = table_runs("npt", 5)[0]
    mem = memory_of(log)
    mem.put(log.root + 8 * log.levels[0].index, 0)               # the process exited
    cmp = live(log, mem)
    got = rows(cmp)
    assert got[("entry", "PGD")].agree is False
    assert got[("level", "PTE")].agree is False and "stopped" in got[("level", "PTE")].reason
    assert "the table changed" in got[("stop", "PGD")].reason


# ----------------------------------------------------------------- compare --log's host glue

class FakeRegion:
    block = "pc.ram"

    def hva_of(self, gpa):
        return 0x7F0000000000 + gpa


class FakeVM:
    """What compare.compare_host uses of a session: a RAM map, a QEMU process with a pagemap,
    guest-physical reads, and second_level(spec) (here over a Memory)."""

    def __init__(self, log, mem, hpa=None, second_level_error=None, in_ram=True):
        self.log, self.mem, self.error = log, mem, second_level_error
        page = SimpleNamespace(hpa=hpa, detail="", to_dict=lambda: {"status": "present"})
        self.process = SimpleNamespace(host_page=lambda hva: page)
        self.process_note = "local"
        self.ram_map = SimpleNamespace(ram_at=lambda gpa: FakeRegion() if in_ram else None,
                                       describe=lambda gpa: f"{gpa:#x} is unassigned")
        self.specs = []

    def read_phys(self, gpa, length):
        return (self.log.value or 0).to_bytes(8, "little")

    def second_level(self, spec):
        self.specs.append(spec)
        if self.error:
            raise self.error
        return slat.SecondLevel(self.mem, spec, {"method": "given"})


def test_compare_host_adds_the_second_level_rows():
    from qintrospect.commands import compare
    log = parse_log(rig("2m"))
    vm = FakeVM(log, memory_of(log), hpa=RIG_HEAP[1])
    cmp, explain, outside = compare.compare_host(vm, log)
    assert vm.specs == [slat.SlatSpec("npt", RIG_ROOT, 5, None)]
    assert cmp.agree and [r.field for r in cmp.rows[:2]] == ["host_hpa", "host_value"]
    got = rows(cmp)
    assert got[("host_hpa", None)].agree and got[("final", None)].agree
    assert got[("entry", "PMD")].agree and got[("page_size", "PMD")].agree
    assert outside["slat"]["out"] == f"{RIG_HEAP[1]:#x}" and outside["slat"]["agrees"] is True
    assert outside["slat"]["value"] == f"{RIG_HEAP[2]:#x}"
    assert outside["root_found_by"] == "nCR3 printed in the log"
    assert "a 2 MiB page maps them" in explain
    json.dumps(outside)
    # an EPT log: the EPTP the walk uses says WB and the walk length
    log = table_runs("ept", 5)[0]
    vm = FakeVM(log, memory_of(log), in_ram=False)
    cmp, _, _ = compare.compare_host(vm, log)
    assert vm.specs[0].eptp == log.root | 6 | 4 << 3 and vm.specs[0].depth == 5
    assert rows(cmp)[("host_hpa", None)].agree is None and rows(cmp)[("final", None)].agree


def test_compare_host_says_why_the_table_was_not_walked():
    from qintrospect.commands import compare
    log = parse_log(rig("4k"))
    vm = FakeVM(log, memory_of(log), hpa=0x889F008, second_level_error=UsageError(
        "--slat: this VM does not run under KVM (QMP query-kvm)"))
    cmp, _, outside = compare.compare_host(vm, log)
    assert [r.field for r in cmp.rows] == ["host_hpa", "host_value", "slat"]
    assert cmp.rows[2].agree is None and "does not run under KVM" in cmp.rows[2].reason
    assert cmp.agree and outside["slat"]["note"]
    # a root the log prints only in part is not walked
    text = "\n".join(ln for ln in rig("4k").splitlines()
                     if "nCR3:" not in ln and "begin" not in ln)
    text = text.replace("NEXT_LVL_HPA(nCR3) =  0000000000000000000001111111111010011101",
                        "NEXT_LVL_HPA(nCR3) =  00000000000000000000011111111110")
    log = parse_log(text)
    assert log.root is not None and log.root_known_mask != ADDR_BITS
    cmp, _, _ = compare.compare_host(FakeVM(log, Memory(), hpa=0x889F008), log)
    assert "is cut" in rows(cmp)[("slat", None)].reason


def test_the_seed_ept_log_keeps_the_host_row_first():
    """The seed's EPTP is printed whole: the EPT is walked too (here: nothing there)."""
    from qintrospect.commands import compare
    log = parse_log_file(DATA / "seed_ept_dump.log")
    assert log.format == "ept" and log.root == 0xF782000
    vm = FakeVM(log, Memory(), in_ram=False)
    cmp, _, _ = compare.compare_host(vm, log)
    assert cmp.rows[0].field == "host_hpa" and "unassigned" in cmp.rows[0].reason
    got = rows(cmp)
    assert got[("root", None)].agree and got[("level", "PGD")].agree is False
    assert got[("stop", "PGD")].agree is False
    assert "not in this memory" in got[("stop", "PGD")].reason


# ------------------------------------------------------------------------------ the CLI

def test_parse_log_cli_on_real_logs(capsys, tmp_path):
    from qintrospect import cli
    assert cli.main(["parse-log", "--json", str(DATA / "slat_dump_npt5_rig_2m.log")]) == 0
    (obj,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert obj["log"]["format"] == "npt" and obj["log"]["module"] == "slat_dump"
    assert obj["log"]["maxphyaddr"] == 40 and obj["log"]["levels"][-1]["page_size"] == MIB2
    assert any(c["check"] == "walk" and c["agree"] for c in obj["checks"])
    assert cli.main(["parse-log", str(DATA / "slat_dump_npt5_rig_notpresent.log")]) == 0
    out = capsys.readouterr().out
    assert "not present" in out and "walker" in out
    # a log whose value check fails exits 1
    bad = tmp_path / "bad.log"
    bad.write_text(re.sub(r"expect=0x[0-9a-f]+", "expect=0x1", rig("thp")))
    assert cli.main(["parse-log", str(bad)]) == 1
    assert "value check" in capsys.readouterr().out
