"""Issue 12, item 1: the KVM rig. qintrospect inside L1 against an L2 that L1's own KVM runs.

L1 = the bundled cloud kernel under TCG ``-cpu max`` (TCG emulates AMD SVM with nested paging),
with its own kvm + kvm-amd modules, Python, numpy, gdb and QEMU (vm/kvm/build.sh). L2 = the
bundled Linux guest (probe + gpt_dump.ko) under ``-accel kvm -cpu host`` inside L1: its memory
goes through a real NPT built by L1's KVM. qintrospect runs in L1 exactly as a user runs it on
a KVM host, and from L0 through L1's serial ports with ``--outer``.

One L1 boot for this whole folder (conftest.py), with a kprobe on KVM's root load armed. These tests FAIL (not skip) when the rig is not built: run
vm/kvm/build.sh first. Every qintrospect in L1 gets ``--timeout 60``: under TCG, gdb alone
takes ~2.5 s to start in L1, and qintrospect's default 5 s per exchange is too short there.
"""

import json
import os
import re
import struct
import subprocess
import sys
import time

import pytest

from vm.nested.rig import SerialQMP

from ..conftest import REPO, kernel_half_roots

pytestmark = pytest.mark.vm

PRESENT, PFN_MASK = 1 << 63, (1 << 55) - 1
QI_TIMEOUT = ["--timeout", "60"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def heap_inside(rig):
    """qintrospect in L1 (QMP + gdbstub) on the probe's heap: the QiResult (one translation)."""
    heap = rig.probe["regions"]["heap"]
    return rig.run_qi("translate", *inside_args(rig), "--json", "-v", hex(heap["gva"]))


def inside_args(rig, gdb=True):
    """What a user on the KVM host (L1) passes: L2's QMP socket, and its gdbstub socket."""
    args = ["--qmp", rig.l2_qmp_in_l1]
    if gdb:
        args += ["--gdb", rig.l2_gdb_in_l1]
    return args + QI_TIMEOUT


def run_l0(*args, timeout=600):
    """qintrospect at L0 (this machine): (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "qintrospect", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def l1_xp(rig, addr):
    """8 bytes at an L1-physical address, read by L1's own QEMU at L0 (HMP xp)."""
    out = rig.hmp(f"xp /1gx {addr:#x}")
    m = re.search(r":\s*(0x[0-9a-f]+)", out)
    assert m, out
    return int(m.group(1), 16)


def l1_pagemap_hpa(rig, va):
    """L1-physical address of VA in L2's QEMU, from L1's own /proc/PID/pagemap (L1's shell)."""
    entry = rig.l1_pagemap_entry(rig.l2_qemu_pid_in_l1, va)
    assert entry & PRESENT, f"{entry:#x}"
    return (entry & PFN_MASK) << 12 | (va & 0xFFF)


# ---------------------------------------------------------------------------------- KVM itself

def test_l1_kvm_really_runs_l2(rig):
    assert rig.l1_ready["kvm"] == "yes" and rig.l1_ready["svm"] == "yes"
    assert rig.l1_ready["npt"] == "Y" and rig.l1_ready["nested"] == "1"
    assert "SVM: kvm: Nested Paging enabled" in rig.kvm_dmesg, rig.kvm_dmesg
    assert "Nested Virtualization enabled" in rig.kvm_dmesg, rig.kvm_dmesg
    rig.run_l1("test -c /dev/kvm")
    assert rig.last_status == 0
    # What later work reads in L1: KVM's debugfs, tracefs with kprobe events, /proc/kcore.
    rig.run_l1("test -e /sys/kernel/tracing/kprobe_events && test -r /proc/kcore"
               " && grep -q '^kvm:kvm_nested_vmenter' /sys/kernel/tracing/available_events")
    assert rig.last_status == 0
    # L2's QEMU is a process in L1 ...
    assert rig.run_l1(f"cat /proc/{rig.l2_qemu_pid_in_l1}/comm").strip() == "qemu-system-x86"
    # ... whose QMP says KVM, at L0 through L1's ttyS1 ...
    with SerialQMP(rig.l2_qmp_path) as q:
        assert q.cmd("query-kvm") == {"enabled": True, "present": True}
    assert rig.l2_qmp_greeting["QMP"]["version"]["qemu"]["major"] >= 7
    # ... and on its Unix socket inside L1 (qemu.qmp of L1's own Python).
    out = rig.run_l1(
        "python3 -c \"import json; from qemu.qmp.legacy import QEMUMonitorProtocol as M; "
        f"m = M('{rig.l2_qmp_in_l1}'); m.connect(); print(json.dumps(m.cmd('query-kvm'))); m.close()\"",
        timeout=120)
    assert rig.last_status == 0, out
    assert json.loads(out.strip().splitlines()[-1]) == {"enabled": True, "present": True}
    # L1's KVM made a VM for that process: /sys/kernel/debug/kvm/PID-FD with its MMU stats.
    dirs = rig.kvm_debugfs_dirs()
    assert len(dirs) == 1, dirs
    # The rig's empty VM (vm/kvm/README.md) is another, so L1 is a host with two VMs.
    every = rig.run_l1("ls /sys/kernel/debug/kvm/").split()
    anchor = [d for d in every if d.startswith(f"{rig.anchor_vm_pid_in_l1}-")]
    assert len(anchor) == 1 and anchor[0] not in dirs, every
    stats = rig.run_l1(f"cd /sys/kernel/debug/kvm/{dirs[0]} && grep . pages_4k pages_2m pages_1g "
                       f"vcpu0/guest_mode")
    values = dict(line.split(":", 1) for line in stats.split())
    assert int(values["pages_4k"]) + int(values["pages_2m"]) + int(values["pages_1g"]) > 0, stats
    # L2 knows it is a KVM guest.
    assert "Hypervisor detected: KVM" in rig.l2_run("dmesg | grep -i 'hypervisor detected'")
    print(f"\nL1: {rig.l1_ready}; debugfs {dirs[0]}: {' '.join(stats.split())}")


# ---------------------------------------------------------------------------------- from L0

def test_outer_chain_from_l0_agrees_with_inside(rig, heap_inside):
    """From L0 through L1's serial ports: the L1 GPA of the value (L2 hop's hpa = L1 hop's gpa)
    is the HPA that qintrospect inside L1 printed; the L0 HPA is this machine's pagemap's.
    (The gdbstub moves to L1's ttyS2 and back: the tests after this one use it inside L1.)"""
    heap = rig.probe["regions"]["heap"]
    inside = heap_inside
    assert inside.rc == 0, inside.stderr
    inside_hpa = int(inside.json[0]["hpa"], 16)

    rig.l2_gdb_to("serial")           # QEMU has one gdbstub: move it to L1's ttyS2
    try:
        t0 = time.monotonic()
        rc, out, err = run_l0("translate", "--qmp", rig.l2_qmp_path, "--gdb", rig.l2_gdb_path,
                              "--outer", f"qmp={rig.l1_qmp_path},gdb={rig.l1_gdb_address}",
                              *QI_TIMEOUT, "--json", hex(heap["gva"]))
        seconds = time.monotonic() - t0
    finally:
        rig.l2_gdb_to("unix")
    assert rc == 0, err
    o = json.loads(out.splitlines()[0])
    l2, l1 = o["hops"]
    print(f"\n--outer from L0 in {seconds:.2f} s: L2 GVA {l2['gva']} -> L2 GPA {l2['gpa']} -> "
          f"HVA {l2['hva']} = L1 GVA {l1['gva']} -> L1 GPA {l1['gpa']} (inside: {inside_hpa:#x}) "
          f"-> L0 HVA {l1['hva']} -> HPA {l1['hpa']}; value {l1['value']}")
    assert int(l2["gpa"], 16) == heap["gpa"]
    assert int(l2["hpa"], 16) == int(l1["gpa"], 16) == inside_hpa
    assert int(l1["gva"], 16) == int(inside.json[0]["hva"], 16)
    assert int(l2["value"], 16) == int(l1["value"], 16) == heap["value"]
    # The last hop ends on this machine's own pagemap of L1's QEMU.
    hva0 = int(l1["hva"], 16)
    with open(f"/proc/{rig.l1_pid}/pagemap", "rb") as f:
        f.seek(hva0 // 4096 * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    assert entry & PRESENT
    if entry & PFN_MASK:
        assert int(o["hpa"], 16) == (entry & PFN_MASK) * 4096 + hva0 % 4096
    # The gdbstub is back on its socket inside L1, and L2 runs.
    with SerialQMP(rig.l2_qmp_path) as q:
        assert q.cmd("query-status")["status"] == "running"
    rig.run_l1(f"test -S {rig.l2_gdb_in_l1}")
    assert rig.last_status == 0


# ---------------------------------------------------------------------------------- inside L1

@pytest.mark.parametrize("with_gdb", [False, True], ids=["qmp-only", "qmp+gdb"])
def test_translate_inside_l1(rig, heap_inside, with_gdb):
    """The probe's heap: GPA = the probe's own pagemap answer, the value, and an HPA (from L1's
    pagemap) that is L1-physical memory holding those bytes (L1's QMP xp at L0 says so)."""
    heap = rig.probe["regions"]["heap"]
    if with_gdb:
        r = heap_inside
    else:
        r = rig.run_qi("translate", *inside_args(rig, False), "--json", "-v", hex(heap["gva"]))
    print(f"\ntranslate in L1 ({'qmp+gdb' if with_gdb else 'qmp only'}): {r.seconds:.2f} s; "
          f"{r.stderr.strip()}")
    assert r.rc == 0, r.stderr
    (j,) = r.json
    assert int(j["gpa"], 16) == heap["gpa"]
    assert int(j["value"], 16) == heap["value"] and j["value_matches"] is True
    assert j["qemu_pid"] == rig.l2_qemu_pid_in_l1
    assert j["host"]["status"] == "present"
    hpa = int(j["hpa"], 16)
    # L1's own kernel agrees (pagemap read by L1's shell) ...
    assert l1_pagemap_hpa(rig, int(j["hva"], 16)) == hpa
    # ... and L1's QEMU at L0 finds the value at that L1-physical address.
    assert l1_xp(rig, hpa) == heap["value"]
    # -cpu host passes TCG's LA57 on to L2, whose kernel then uses 5-level paging.
    la57 = "la57" in rig.l2_run("grep -m1 -o -w la57 /proc/cpuinfo")
    assert j["mode"] == ("5-level" if la57 else "4-level")


def test_vmmap_inside_l1(rig):
    heap = rig.probe["regions"]["heap"]
    gva = heap["gva"]
    r = rig.run_qi("vmmap", *inside_args(rig), "--user", "--hpa", "--json")
    print(f"\nvmmap --user --hpa in L1: {len(r.json or [])} ranges, {r.seconds:.2f} s")
    assert r.rc == 0, r.stderr
    rows = [x for x in r.json if int(x["start"], 16) <= gva < int(x["end"], 16)]
    assert len(rows) == 1, r.stdout
    row = rows[0]
    assert row["user"] is True and row["writable"] is True and row["executable"] is False
    off = gva - int(row["start"], 16)       # --hpa merges only physically linear pieces
    assert int(row["gpa"], 16) + off == heap["gpa"]
    assert l1_xp(rig, int(row["hpa"], 16) + off) == heap["value"]
    # The probe's other places are mapped user pages too.
    for name in ("stack", "thp", "text"):
        va = rig.probe["regions"][name]["gva"]
        assert any(int(x["start"], 16) <= va < int(x["end"], 16) for x in r.json), name


def test_find_cr3_inside_l1(rig):
    heap = rig.probe["regions"]["heap"]
    r = rig.run_qi("find-cr3", *inside_args(rig), "--gva", hex(heap["gva"]),
                   "--expect", hex(heap["value"]), "--json")
    print(f"\nfind-cr3 in L1: {len(r.json or [])} candidate(s), {r.seconds:.2f} s")
    assert r.rc == 0, r.stderr
    best = r.json[0]
    assert best["maps_gva"] is True and best["value_matches"] is True
    assert int(best["gpa"], 16) == heap["gpa"]


def test_compare_module_log_inside_l1(rig):
    """Our gpt_dump module in L2 logs the walk; qintrospect in L1 agrees at every level."""
    heap = rig.probe["regions"]["heap"]
    rig.l2_run("dmesg -c > /dev/null")
    out = rig.l2_run(f"insmod /modules/gpt_dump.ko pid={rig.probe['pid']} gva={heap['gva']:#x}")
    assert rig.l2_last_status == 0, out
    log = rig.l2_run("dmesg")
    rig.l2_run("rmmod gpt_dump")
    assert "gpt_dump: end" in log, log
    rig.l1_write_file("/tmp/gpt_dump.log", log.encode())
    r = rig.run_qi("compare", *inside_args(rig), "--log", "/tmp/gpt_dump.log", "--json")
    print(f"\ncompare in L1: {r.seconds:.2f} s")
    assert r.rc == 0, (r.stderr, r.stdout)
    (result,) = r.json
    assert result["agree"] is True
    assert not [x for x in result["rows"] if x["agree"] is False]
    compared = {(x["field"], x["level"]) for x in result["rows"] if x["agree"] is True}
    assert ("root", None) in compared and ("final", None) in compared and ("value", None) in compared
    levels = re.search(r"levels=(\d)", log).group(1)
    for level in (("PGD", "P4D", "PUD", "PMD", "PTE") if levels == "5" else ("PGD", "PUD", "PMD", "PTE")):
        assert ("entry", level) in compared, level
    assert int(result["outside"]["gpa"], 16) == heap["gpa"]


# ------------------------------------------------------------------ the second-level table (NPT)

def kvm_roots(rig):
    """(root, levels) KVM loaded for its guests, from the kprobe's trace in L1."""
    trace = rig.run_l1("grep qi_npt: /sys/kernel/tracing/trace")
    roots = {(int(r, 16), int(n)) for r, n in re.findall(r"root=(0x[0-9a-f]+) level=(\d+)",
                                                         trace)}
    assert roots, f"the kprobe saw no root load:\n{trace}"
    return roots


@pytest.fixture(scope="module")
def direct_map(rig, probe_slat):
    """L2's kernel direct map, a 2 MiB step over all of its RAM, translated inside L1 through
    the NPT root found for the probe (given: no second scan): pages QEMU has touched and pages
    it has not."""
    heap = rig.probe["regions"]["heap"]
    w = rig.run_qi("who-maps", *inside_args(rig), "--gpa", hex(heap["gpa"]), "--json")
    assert w.rc == 0, w.stderr
    base = next(int(m["gva"], 16) - heap["gpa"] for m in w.json[0]["mappings"]
                if m["half"] == "kernel" and (int(m["gva"], 16) - heap["gpa"]) % (1 << 30) == 0)
    addresses = [hex(base + gpa) for gpa in range(0, 256 * MiB, 2 * MiB)]
    s = probe_slat[1].json[0]["slat"]
    given = f"{'npt5' if s['depth'] == 5 else 'npt'}:{s['root']}"
    return rig.run_qi("translate", *inside_args(rig), "--slat", given, "--json", *addresses)


@pytest.fixture(scope="module")
def probe_slat(rig):
    """Every region of the probe that has a page, with --slat auto, inside L1."""
    names = [n for n, r in rig.probe["regions"].items() if r["gpa"] is not None]
    res = rig.run_qi("translate", *inside_args(rig), "--slat", "auto", "--json",
                     *[hex(rig.probe["regions"][n]["gva"]) for n in names])
    return names, res


def test_npt_root_found_inside_l1_is_the_one_kvm_uses(rig, probe_slat):
    names, res = probe_slat
    assert res.rc == 0, res.stderr
    roots = kvm_roots(rig)
    for name, t in zip(names, res.json):
        s = t["slat"]
        # auto: read from KVM's own vCPU (kallsyms + BTF + /proc/kcore), no scan
        assert s["format"] == "npt" and s["how"]["method"] == "kvm-vcpu", (name, s["how"])
        assert (int(s["root"], 16), s["depth"]) in roots, (name, s["root"], roots)
        # the second-level walk lands where the pagemap path does, on the same bytes
        assert s["agrees"] is True and s["out"] == t["hpa"] and s["expected"] == t["hpa"], name
        assert int(t["value"], 16) == rig.probe["regions"][name]["value"], name
        assert l1_xp(rig, int(s["out"], 16)) == rig.probe["regions"][name]["value"], name
        # page sizes on three layers
        assert t["guest_page_size"] == t["page_size"] == rig.probe["regions"][name]["size"]
        assert t["slat_page_size"] == s["page_size"] and s["page_size"] in (4096, 2 * MiB)
        assert t["host_page_size"] in (4096, 2 * MiB)
    print("\n" + "; ".join(f"{n}: guest {t['guest_page_size']} / NPT {t['slat_page_size']} / "
                           f"host {t['host_page_size']}" for n, t in zip(names, res.json))
          + f"; root read from KVM in {res.json[0]['slat']['how']['seconds']} s")


def test_the_root_read_from_kvms_vcpu_is_the_kprobes_and_the_scans(rig, probe_slat):
    """Three independent ways to the NPT root agree: KVM's own vCPU struct read through BTF
    offsets (--slat kvm), the scan of L1's memory keyed by the pagemap path (--slat scan), and
    the root KVM loaded into the VMCB (a kprobe on svm_load_mmu_pgd). `kvm` shows it too."""
    heap = hex(rig.probe["regions"]["heap"]["gva"])
    found = {}
    for way in ("kvm", "scan"):
        r = rig.run_qi("translate", *inside_args(rig), "--slat", way, "--json", heap)
        assert r.rc == 0, (way, r.stderr)
        s = r.json[0]["slat"]
        assert s["how"]["method"] == {"kvm": "kvm-vcpu", "scan": "scan"}[way], s["how"]
        assert s["agrees"] is True, (way, s)
        found[way] = (int(s["root"], 16), s["depth"])
        if way == "scan":        # L2's own RAM (its QEMU's pages in L1) was not read
            assert s["how"]["guest_ram_skipped"] >= 16 << 20, s["how"]
    assert found["kvm"] == found["scan"] and found["kvm"] in kvm_roots(rig), found
    vm = r.json[0]["slat"]["how"]
    k = rig.run_qi("kvm", "--qmp", rig.l2_qmp_in_l1, "--json", *QI_TIMEOUT)
    assert k.rc == 0, k.stderr
    roots = k.json[0]["roots"]
    assert roots["pid"] == rig.l2_qemu_pid_in_l1 and roots["vendor"] == "amd"
    v0 = roots["vcpus"][0]
    assert (int(v0["root"], 16), v0["level"]) == found["kvm"]
    assert v0["active_mmu"] == "root_mmu" and v0["guest_mode"] is False and not v0["smm"]
    text = rig.run_qi("kvm", "--qmp", rig.l2_qmp_in_l1, *QI_TIMEOUT).stdout
    assert f"vCPU 0: NPT root {v0['root']}, {v0['level']} levels" in text, text
    print(f"\nNPT root {v0['root']}: KVM's vCPU in {roots['seconds']} s; the scan in "
          f"{vm['seconds']} s")


def test_every_present_page_agrees_and_untouched_ones_are_not_in_the_npt(rig, direct_map):
    assert direct_map.rc == 0, direct_map.stderr
    agree = absent = 0
    for t in direct_map.json:
        s = t["slat"]
        if t["host"]["status"] == "present":
            assert s["agrees"] is True and s["out"] == t["hpa"], (t["gpa"], s)
            agree += 1
        else:   # QEMU never touched the page: KVM has nothing to map it to either
            assert s["out"] is None and s["fault"]["reason"] == "not-present", (t["gpa"], s)
            assert "not in the NPT" in s["note"] and s["agrees"] is None
            absent += 1
    assert agree >= 16 and absent >= 1, (agree, absent)
    print(f"\n{agree} present 2 MiB steps agree, {absent} are in neither table")


def test_brief_walks_the_npt_for_all_addresses_at_once_as_one_by_one(rig, probe_slat,
                                                                     direct_map):
    """translate --brief --slat: the same 2 MiB steps, every GPA walked through the NPT at once
    (slat.walk_batch): row by row what the one-by-one walks said (where each ends, its page
    size, whether that is the pagemap path's host address, or the fault)."""
    s = probe_slat[1].json[0]["slat"]
    given = f"{'npt5' if s['depth'] == 5 else 'npt'}:{s['root']}"
    addresses = [t["gva"] for t in direct_map.json]
    r = rig.run_qi("translate", *inside_args(rig), "--slat", given, "--brief", *addresses)
    assert r.rc == 0, r.stderr
    assert f"# second level: NPT root {s['root']} (given)" in r.stderr, r.stderr
    assert len(r.json) == len(direct_map.json)
    for row, t in zip(r.json, direct_map.json):
        one = t["slat"]
        assert (row["gva"], row["gpa"], row["hpa"]) == (t["gva"], t["gpa"], t["hpa"]), row
        assert (row["slat_out"], row["slat_page_size"], row["slat_agrees"]) == (
            one["out"], one["page_size"], one["agrees"]), (row, one)
        want = None if one["fault"] is None else {"level": one["fault"]["level"],
                                                   "reason": one["fault"]["reason"]}
        assert row["slat_fault"] == want, (row, one)
    print(f"\n{len(r.json)} addresses through the NPT with --brief in {r.seconds:.1f} s "
          f"(one by one with --json: {direct_map.seconds:.1f} s)")


def test_kvms_mmio_markers_in_the_real_npt_are_named_never_mappings(rig, probe_slat):
    """L2's kernel maps its IOAPIC and HPET (fixmap pages) and touched them at boot: KVM left
    MMIO markers for them in the NPT (today's value: present with bit 51 set, reserved above
    L1's MAXPHYADDR; the GFN kept in the entry). Each is named as that, with the GPA QEMU's
    memory map gives the device, and never as a mapping: no host address, no flags. (Both
    addresses go through each translate at once: every qintrospect run in L1 costs seconds.)"""
    given = probe_slat[1].json[0]["slat"]
    devices = ((0xFEC00000, "ioapic"), (0xFED00000, "hpet"))
    found = []
    # the kernel half of the probe's own root maps the fixmap: no scan for other roots
    roots = kernel_half_roots(probe_slat[1].json[0]["root"])
    for gpa, device in devices:
        w = rig.run_qi("who-maps", *inside_args(rig), "--gpa", hex(gpa), *roots, "--json",
                       "--no-names")
        assert w.rc == 0 and w.json[0]["mappings"], (gpa, w.stderr, w.stdout)
        # through the root that maps it (a KPTI user copy does not)
        found.append(tuple(w.json[0]["mappings"][0][k] for k in ("gva", "root")))
    roots = {root for _, root in found}
    for root in roots:
        mine = [(gpa, device, gva) for (gpa, device), (gva, r) in zip(devices, found)
                if r == root]
        gvas = [gva for _, _, gva in mine]
        r = rig.run_qi("translate", *inside_args(rig), "--cr3", root, "--slat", "kvm",
                       "--json", *gvas)
        assert r.rc == 0, r.stderr
        for (gpa, device, _), t in zip(mine, r.json):
            s = t["slat"]
            assert t["gpa"] == hex(gpa) and t["hpa"] is None and s["root"] == given["root"], t
            m = s["kvm_mmio_marker"]
            assert m is not None, (f"no MMIO marker for {device} at GPA {gpa:#x}: "
                                   f"{s['fault']}, {s['note']}")
            entry = int(m["entry"], 16)
            assert entry & 1 and entry >> 51 & 1 and m["gpa"] == hex(gpa), m
            assert device in m["device"] and s["out"] is None and s["agrees"] is None, s
            assert s["fault"]["reason"] == "reserved-bit" and \
                s["note"].startswith("KVM's MMIO marker")
            print(f"\nMMIO markers: {device} entry {m['entry']} ({m['why']})")
        text = rig.run_qi("translate", *inside_args(rig), "--cr3", root, "--slat", "kvm",
                          *gvas).stdout
        verdicts = [line for line in text.splitlines() if line.strip().startswith("=>")
                    and line.endswith(": KVM's MMIO marker, not a mapping")]
        assert text.count("-> none: KVM's MMIO marker") == len(gvas) == len(verdicts), text
        # --brief --slat (the batch walk) names them too
        b = rig.run_qi("translate", *inside_args(rig), "--cr3", root, "--slat", "kvm",
                       "--brief", *gvas)
        for t, row in zip(r.json, b.json):
            level = t["slat"]["kvm_mmio_marker"]["level"]
            assert row["slat_fault"] == {"level": level, "reason": "reserved-bit",
                                         "kvm_mmio_marker": True}, (b.json, b.stderr)


def test_three_page_sizes_and_the_walk_in_text(rig, probe_slat):
    """The text view prints the walk as the seed's ept_dump does, and one line of page sizes.
    The root is given this time (no scan): --slat npt5:ROOT."""
    names, res = probe_slat
    s = res.json[names.index("thp")]["slat"]
    kind = "npt5" if s["depth"] == 5 else "npt"
    out = rig.run_qi("translate", *inside_args(rig), "--slat", f"{kind}:{s['root']}",
                     hex(rig.probe["regions"]["thp"]["gva"]))
    assert out.rc == 0, out.stderr
    assert f"NPT (the hypervisor's second-level table), root {s['root']}" in out.stdout
    assert "(given)" in out.stdout and "agrees with the pagemap path" in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if "page sizes:" in ln)
    assert line.strip().startswith("page sizes: guest 2 MiB / NPT ") and "/ host " in line


def test_kvm_facts(rig, heap_inside):
    k = rig.run_qi("kvm", "--qmp", rig.l2_qmp_in_l1, "--json", *QI_TIMEOUT)
    assert k.rc == 0, k.stderr
    f = k.json[0]
    assert f["accelerator"] == "kvm" and f["kvm"] == {"enabled": True, "present": True}
    assert f["tdp"]["kind"] == "npt" and f["tdp"]["enabled"] is True
    # L1 has two VMs (L2's and the rig's empty one): the folder is the one of L2's QEMU.
    assert os.path.basename(f["debugfs"]) == rig.kvm_debugfs_dirs()[0]
    assert f["debugfs"].split("/")[-1].startswith(f"{rig.l2_qemu_pid_in_l1}-")
    for key in ("pages_4k", "pages_2m", "pages_1g", "pf_fixed", "tlb_flush"):
        assert isinstance(f["stats"][key], int), key
    assert f["vcpus"] and f["vcpus"][0]["guest_mode"] in (0, 1)
    stats = {s["name"]: s["value"] for p in f["query_stats"] for s in p["stats"]}
    assert "pages_4k" in stats                    # QEMU's own view of the same counters
    text = rig.run_qi("kvm", "--qmp", rig.l2_qmp_in_l1, *QI_TIMEOUT).stdout
    assert "accelerator: kvm" in text and "pages_2m" in text and "NPT on" in text


def test_npt_root_found_from_l0_in_l1s_ram(rig, probe_slat):
    """From outside (--outer): the same root, found by scanning L1's RAM through L1's QEMU."""
    heap = rig.probe["regions"]["heap"]
    rig.l2_gdb_to("serial")
    try:
        rc, out, err = run_l0("translate", "--qmp", rig.l2_qmp_path, "--gdb", rig.l2_gdb_path,
                              "--outer", f"qmp={rig.l1_qmp_path},gdb={rig.l1_gdb_address}",
                              *QI_TIMEOUT, "--slat", "auto", "--json", hex(heap["gva"]))
    finally:
        rig.l2_gdb_to("unix")
    # (failed once in CI with exit 1 and nothing on stderr, never alone: the hops' notes and
    # the second level's `how` say which part did not answer)
    assert rc == 0, (err, [(h.get("level"), h.get("note"), h.get("fault"), (h.get("slat") or
                                                                        {}).get("how"))
                           for h in json.loads(out.splitlines()[0])["hops"]] if out else out)
    o = json.loads(out.splitlines()[0])
    s = o["hops"][0]["slat"]
    assert s == o["slat"]                     # the innermost hop's keys are at the top
    assert (int(s["root"], 16), s["depth"]) in kvm_roots(rig)
    assert s["agrees"] is True and s["out"] == o["hops"][1]["gpa"] == o["hops"][0]["hpa"]
    print(f"\nNPT root {s['root']} found from L0 in {s['how']['seconds']} s")


def test_a_wrong_npt_root_is_said_so(rig, probe_slat):
    names, res = probe_slat
    s = res.json[0]["slat"]
    wrong = int(s["levels"][1]["entry_addr"], 16) & ~0xFFF     # the root's child, not a root
    out = rig.run_qi("translate", *inside_args(rig), "--slat", f"npt5:{wrong:#x}", "--json",
                     hex(rig.probe["regions"][names[0]]["gva"]))
    assert out.rc in (0, 1) and out.json, out.stderr   # 1 when it disagrees, 0 when it faults
    t = out.json[0]["slat"]
    assert t["agrees"] is not True and t["note"] and t["how"] == {"method": "given"}


def test_who_maps_through_the_npt(rig, probe_slat):
    """who-maps on the KVM host with the NPT: the heap's GPA is the one whose NPT leaf holds its
    host frame, and the NPT's root page is a page of the NPT itself."""
    names, res = probe_slat
    s = res.json[0]["slat"]
    given = f"{'npt5' if s['depth'] == 5 else 'npt'}:{s['root']}"
    heap = rig.probe["regions"]["heap"]
    w = rig.run_qi("who-maps", *inside_args(rig), "--gpa", hex(heap["gpa"]), "--slat", given,
                   "--json")
    assert w.rc == 0, w.stderr
    o = w.json[0]
    assert heap["gpa"] in [int(m["gpa"], 16) for m in o["slat"]["maps"]]
    assert heap["gva"] in [int(m["gva"], 16) for m in o["mappings"]]
    t = rig.run_qi("who-maps", *inside_args(rig), "--hpa", s["root"], "--slat", given, "--json")
    assert t.rc == 0, t.stderr
    top = "PML5" if s["depth"] == 5 else "PML4"
    assert t.json[0]["slat"]["page_table_of"] == [top] and not t.json[0]["host_holders"]
