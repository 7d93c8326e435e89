"""Issue: find any process's page tables, and map whole address spaces.

Checked against QEMU's own `info tlb` / `info mem` / `info registers` and the guest's pagemap.
"""

import re

import pytest

from qintrospect.machine.monitor_text import parse_gva2gpa, parse_info_tlb, parse_registers

from .conftest import attach_args, boot, booted, run_cli, run_json
from .test_translate_chain import stop_on_probe

pytestmark = pytest.mark.vm


def test_vmmap_leaf_equals_info_tlb(guest):
    g = guest
    stop_on_probe(g)
    try:
        tlb = parse_info_tlb(g.hmp("info tlb"))
        rc, rows, err = run_json("vmmap", "--leaf", *attach_args(g))
        assert rc == 0, err
    finally:
        g.qmp("cont")
    assert len(tlb) > 1000
    ours = {int(r["start"], 16): r for r in rows}
    assert len(ours) == len(rows)
    assert sorted(ours) == [t.va for t in tlb]
    for t in tlb:
        r = ours[t.va]
        # QEMU prints the leaf entry's own bits: X = NX set, P = large page, U, W
        assert int(r["gpa"], 16) == t.pa, hex(t.va)
        assert ("NX" in r["flags"]) == ("X" in t.flags), hex(t.va)
        assert ("US" in r["flags"]) == ("U" in t.flags), hex(t.va)
        assert ("RW" in r["flags"]) == ("W" in t.flags), hex(t.va)
        assert (r["page_size"] > 4096) == ("P" in t.flags), hex(t.va)
        assert (r["user"] is True) <= ("U" in t.flags)
        assert (r["writable"] is True) <= ("W" in t.flags)
    sizes = {r["page_size"] for r in rows}
    assert 4096 in sizes and (2 << 20) in sizes
    regions = g.probe["regions"]
    for name in ("heap", "stack", "rodata", "thp", "text"):
        r = regions[name]
        row = next(x for x in rows
                   if int(x["start"], 16) <= r["gva"] < int(x["start"], 16) + x["page_size"])
        assert int(row["gpa"], 16) + r["gva"] - int(row["start"], 16) == r["gpa"]


def test_merged_vmmap_agrees_with_info_mem():
    """`info mem` (4-level only: QEMU 7.2's prints nothing under LA57) lists ranges of equal
    user/write rights; our merged map, joined on the same rights, gives the same ranges."""
    g = boot("qemu64")
    try:
        stop_on_probe(g)
        try:
            text = g.hmp("info mem")
            rc, rows, err = run_json("vmmap", *attach_args(g))
            assert rc == 0, err
        finally:
            g.qmp("cont")
    finally:
        g.stop()
    mem = []
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ([0-9a-f]+) ([-u])r([-w])$", line.strip())
        if m:
            mem.append((int(m.group(1), 16), int(m.group(2), 16), m.group(4) == "u",
                        m.group(5) == "w"))
    assert len(mem) > 5
    joined = []
    for r in rows:
        start, end = int(r["start"], 16), int(r["end"], 16)
        key = (r["user"], r["writable"])
        if joined and joined[-1][1] == start and joined[-1][2:] == key:
            joined[-1] = (joined[-1][0], end) + key
        else:
            joined.append((start, end) + key)
    assert joined == mem


def test_cpus_two_vcpus_match_info_registers():
    g = boot("max", smp=2, probe=None)
    try:
        g.qmp("stop")
        try:
            rc, cpus, err = run_json("cpus", *attach_args(g))
            assert rc == 0, err
            expected = [parse_registers(g.qmp("human-monitor-command", **{
                "command-line": "info registers", "cpu-index": i})) for i in range(2)]
            threads = [c["thread-id"] for c in g.qmp("query-cpus-fast")]
            # translate with the second vCPU's registers: its CR3, and QEMU's own answer
            kernel = next(t.va for t in parse_info_tlb(g.qmp(
                "human-monitor-command", **{"command-line": "info tlb", "cpu-index": 1}))
                if t.va >> 63)
            rc, out1, err = run_json("translate", *attach_args(g), "--vcpu", "1", hex(kernel))
            assert rc == 0, err
            assert out1[0]["vcpu"] == 1 and int(out1[0]["cr3"], 16) == expected[1]["CR3"]
            assert int(out1[0]["gpa"], 16) == parse_gva2gpa(g.qmp(
                "human-monitor-command", **{"command-line": f"gva2gpa {kernel:#x}",
                                           "cpu-index": 1}))
        finally:
            g.qmp("cont")
        rc, out, err = run_cli("cpus", *attach_args(g))
    finally:
        g.stop()
    assert [c["index"] for c in cpus] == [0, 1]
    for c, regs, tid in zip(cpus, expected, threads):
        assert int(c["cr3"], 16) == regs["CR3"]
        assert int(c["cr0"], 16) == regs["CR0"] and int(c["cr4"], 16) == regs["CR4"]
        assert int(c["efer"], 16) == regs["EFER"]
        assert c["thread_id"] == tid and c["cpl"] == regs["CPL"]
        assert c["mode"] == "5-level" and "LA57" in c["cr4_bits"] and "NXE" in c["efer_bits"]
    assert rc == 0 and "vCPU 1" in out and "LA57" in out


@pytest.fixture(scope="module")
def sleeping():
    """A guest whose probe sleeps: the vCPU's CR3 is whoever ran last, not the probe."""
    with booted("max", probe="sleep") as g:
        yield g


def test_find_cr3_finds_a_sleeping_process(sleeping):
    g = sleeping
    heap = g.probe["regions"]["heap"]
    rc, found, err = run_json("find-cr3", *attach_args(g), "--gva", hex(heap["gva"]),
                              "--expect", hex(heap["value"]))
    assert rc == 0, err
    best = found[0]
    assert best["value_matches"] is True and int(best["gpa"], 16) == heap["gpa"]
    # translate with that root agrees with the guest's own pagemap, for every region
    regions = g.probe["regions"]
    names = ["heap", "stack", "rodata", "thp", "text"]
    rc, out, err = run_json("translate", *attach_args(g), "--cr3", best["cr3"],
                            *[hex(regions[n]["gva"]) for n in names])
    assert rc == 0, err
    for name, t in zip(names, out):
        assert int(t["gpa"], 16) == regions[name]["gpa"], name
        assert int(t["value"], 16) == regions[name]["value"], name
        assert t["cr3_source"] == "given"
    # and in one go
    rc, out, err = run_json("translate", *attach_args(g), "--find-cr3", "--expect",
                            hex(heap["value"]), hex(heap["gva"]))
    assert rc == 0, err
    assert int(out[0]["gpa"], 16) == heap["gpa"]
    # without filters every root is listed, the current one among them
    rc, allroots, err = run_json("find-cr3", *attach_args(g))
    assert rc == 0 and any(c["is_current"] for c in allroots)
    assert best["cr3"] in [c["cr3"] for c in allroots]
    # a value nobody holds: nothing found, exit 1
    rc, none, err = run_json("find-cr3", *attach_args(g), "--gva", hex(heap["gva"]),
                             "--expect", "0x1234")
    assert rc == 1 and none == []
    assert g.qmp("query-status")["running"]


def test_read_virtual_and_physical(sleeping):
    g = sleeping
    heap = g.probe["regions"]["heap"]
    rc, found, err = run_json("find-cr3", *attach_args(g), "--gva", hex(heap["gva"]),
                              "--expect", hex(heap["value"]))
    cr3 = found[0]["cr3"]
    rc, pieces, err = run_json("read", *attach_args(g), "--cr3", cr3, hex(heap["gva"]), "16")
    assert rc == 0, err
    data = bytes.fromhex("".join(p["data"] for p in pieces))
    assert data[:8] == heap["value"].to_bytes(8, "little")
    rc, pieces, err = run_json("read", *attach_args(g), "--phys", hex(heap["gpa"]), "8")
    assert rc == 0 and bytes.fromhex(pieces[0]["data"]) == heap["value"].to_bytes(8, "little")
    # an unmapped page is marked, not read; an MMIO range is refused, never read
    untouched = g.probe["regions"]["untouched"]
    rc, pieces, err = run_json("read", *attach_args(g), "--cr3", cr3,
                               hex(untouched["gva"] - 16), "32")
    assert rc == 1
    assert pieces[0]["data"] is not None or "unmapped" in pieces[0]["note"]
    assert pieces[-1]["data"] is None and "unmapped" in pieces[-1]["note"]
    rc, pieces, err = run_json("read", *attach_args(g), "--phys", "0xfed00000", "8")
    assert rc == 1 and pieces[0]["data"] is None and "hpet" in pieces[0]["note"]
    rc, out, err = run_cli("read", *attach_args(g), "--phys", "0x0", str(1 << 40))
    assert rc == 2 and "length" in err


def test_progress_on_a_terminal_and_silence_in_a_pipe(sleeping):
    import sys

    import pexpect
    from .conftest import REPO
    g = sleeping
    argv = ["-m", "qintrospect", "find-cr3", *attach_args(g)]
    child = pexpect.spawn(sys.executable, argv, cwd=REPO, encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "scanning guest RAM" in child.before and "%" in child.before
    rc, out, err = run_cli("find-cr3", *attach_args(g))
    assert rc == 0 and err == ""


def test_find_cr3_pairs_kpti_copies():
    """With page-table isolation (pti=on) every process has a kernel and a user copy of its
    top-level table: find-cr3 reports them as a pair, and both translate the process's
    addresses to what the guest's own pagemap says."""
    with booted("max", probe="sleep", append_extra="pti=on") as g:
        assert "isolation: enabled" in g.run("dmesg | grep -i 'page tables isolation'")
        heap = g.probe["regions"]["heap"]
        rc, found, err = run_json("find-cr3", *attach_args(g), "--gva", hex(heap["gva"]),
                                  "--expect", hex(heap["value"]))
        assert rc == 0, err
        roots = {int(c["cr3"], 16): c for c in found}
        kernel = [r for r, c in roots.items() if c["kpti_user_copy"]]
        assert kernel, found
        k = kernel[0]
        user = int(roots[k]["kpti_user_copy"], 16)
        assert user == k + 0x1000 and int(roots[user]["kpti_kernel_copy"], 16) == k
        for root in (k, user):
            rc, out, err = run_json("translate", *attach_args(g), "--cr3", hex(root),
                                    hex(heap["gva"]))
            assert rc == 0 and int(out[0]["gpa"], 16) == heap["gpa"]
        # the user copy maps next to nothing of the kernel (entry code only); the kernel copy
        # maps it all
        kernel_bytes = {}
        for root in (k, user):
            rc, rows, err = run_json("vmmap", *attach_args(g), "--cr3", hex(root), "--kernel")
            kernel_bytes[root] = sum(r["size"] for r in rows)
        assert kernel_bytes[user] * 20 < kernel_bytes[k]
        rc, allroots, err = run_json("find-cr3", *attach_args(g))
        assert sum(1 for c in allroots if c["kpti_user_copy"]) >= 3
        # stopped in user mode, CR3 holds a user copy, whose kernel half is not empty (entry
        # code, CPU entry area) but not the kernel's: the finder still keys on the kernel copy
        # below it, so find-cr3 pairs as before and who-maps finds the kernel's own mappings
        # (the IOAPIC's fixmap page; before, it searched user copies only and found none)
        # a session of its own, not a job of the console's shell: that shell, told of its
        # job's end right around a pause, was seen to exit (FACTS.md; vm/foreign_guest.py)
        g.run("setsid sh -c 'echo $$ > /tmp/spin; while :; do :; done' </dev/null >/dev/null "
              "2>&1 & sleep 0.3")
        try:
            for _ in range(20):
                rc, cpus, err = run_json("cpus", *attach_args(g))
                if cpus[0]["cpl"] == 3 and int(cpus[0]["root"], 16) % 0x2000 == 0x1000:
                    break
            else:
                pytest.fail(f"the vCPU never stopped in user mode on a user copy: {cpus[0]}")
            rc, found, err = run_json("find-cr3", *attach_args(g))
            assert rc == 0 and sum(1 for c in found if c["kpti_user_copy"]) >= 3, found
            rc, who, err = run_json("who-maps", *attach_args(g), "--gpa", "0xfec00000",
                                    "--no-names")
            assert rc == 0 and who[0]["mappings"], (err, who)
            assert who[0]["mappings"][0]["half"] == "kernel"
        finally:
            g.run("kill $(cat /tmp/spin)")
