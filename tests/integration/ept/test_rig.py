"""The Intel EPT rig (vm/ept): qintrospect inside L1 against an L2 that L1's own KVM runs on EPT.

L0 = Bochs (Debian's build emulates Intel VT-x with EPT), L1 = the bundled cloud kernel with
its own kvm + kvm-intel modules, Python, numpy, gdb and QEMU; L2 = the bundled Linux guest (its
probe spinning) under ``-accel kvm -cpu host`` inside L1: L2's memory goes through a real EPT
that L1's KVM builds. qintrospect runs in L1 exactly as a user runs it on an Intel KVM host.

The seed's scenario end to end on real EPT: a process in L2 with a known value; `translate
--slat auto` finds the EPT, walks GVA -> GPA -> (EPT) -> L1 physical, and the value there is
L2's; the text view is the seed's ept_dump view; the root it found is the one KVM loads (a
kprobe on vmx_load_mmu_pgd says so).

One L1 boot for the whole folder (conftest.py). These tests FAIL (not skip) when the rig is not
built: run vm/ept/build.sh first.
"""

import json
import re

import pytest

from qintrospect.slat.kvm import text as kvm_text
from vm.ept.rig import EptRig, EptRigNotBuilt

from ..conftest import kernel_half_roots
from .conftest import QI_TIMEOUT, MiB, inside, kprobe_roots, l1_phys_u64

pytestmark = pytest.mark.vm

REGIONS = ("heap", "thp")


def test_l1_runs_kvm_intel_with_ept_and_l2_is_a_kvm_guest(rig):
    r = rig.l1_ready
    assert (r["kvm"], r["vmx"], r["ept"]) == ("yes", "yes", "Y"), r
    assert r["cpus"] == "1" and r["qi"] == "yes", r
    params = rig.run_l1("cd /sys/module/kvm_intel/parameters && grep . ept nested unrestricted_guest")
    assert "ept:Y" in params.split(), params
    # L2's QEMU is a process in L1 ...
    assert rig.run_l1(f"cat /proc/{rig.l2_qemu_pid_in_l1}/comm").strip() == "qemu-system-x86"
    assert "-accel kvm" in " ".join(rig.l2_argv)
    # ... whose QMP (its Unix socket inside L1, through L1's own Python) says KVM ...
    out = rig.run_l1(
        "python3 -c \"import json; from qemu.qmp.legacy import QEMUMonitorProtocol as M; "
        f"m = M('{rig.l2_qmp_in_l1}'); m.connect(); print(json.dumps(m.cmd('query-kvm'))); m.close()\"",
        timeout=180)
    assert rig.last_status == 0, out
    assert json.loads(out.strip().splitlines()[-1]) == {"enabled": True, "present": True}
    # ... and L1's KVM made a VM for it: /sys/kernel/debug/kvm/PID-FD with its MMU stats.
    dirs = rig.kvm_debugfs_dirs()
    assert len(dirs) == 1, dirs
    stats = rig.run_l1(f"cd /sys/kernel/debug/kvm/{dirs[0]} && grep . pages_4k pages_2m pages_1g")
    values = {k: int(v) for k, v in (line.split(":", 1) for line in stats.split())}
    assert values["pages_4k"] + values["pages_2m"] + values["pages_1g"] > 0, stats
    # L2 knows it is a KVM guest.
    assert "Hypervisor detected: KVM" in rig.l2_run("dmesg | grep -i 'hypervisor detected'")
    print(f"\nL1: {r}; debugfs {dirs[0]}: {values}")


@pytest.mark.parametrize("region", REGIONS)
def test_the_seed_scenario_on_real_ept(rig, seed, region):
    """GVA -> GPA (L2's page table) -> L1 physical (KVM's EPT, found by qintrospect): the bytes
    at the end of the EPT walk are the probe's value, read by L1's kernel independently."""
    probe = rig.probe["regions"][region]
    t = seed[region]
    s = t["slat"]
    assert s["format"] == "ept" and s["depth"] == 4, s
    assert s["agrees"] is True and s["fault"] is None, s
    assert int(t["gpa"], 16) == probe["gpa"]              # the probe's own pagemap in L2
    assert int(t["value"], 16) == probe["value"] and t["value_matches"] is True
    # the EPT walk ends where L1's pagemap of L2's QEMU says the bytes are ...
    assert s["out"] == s["expected"] == t["hpa"]
    # ... and L1's kernel finds L2's value at that L1-physical address
    out = int(s["out"], 16)
    assert l1_phys_u64(rig, out)[out] == probe["value"]
    # the EPTP: write-back tables (bits 2:0 = 6), walk length 4 (bits 5:3 = 3), the root
    eptp = int(s["eptp"], 16)
    assert eptp & ~0xFFF == int(s["root"], 16) and eptp & 7 == 6 and (eptp >> 3) & 7 == 3, s["eptp"]
    # page sizes on three layers; the EPT leaf is 2 MiB where L1 backs L2's RAM with a THP
    assert t["guest_page_size"] == probe["size"]
    assert t["slat_page_size"] == s["page_size"] in (4096, 2 * MiB)
    if t["host_page_size"] == 2 * MiB:
        assert s["page_size"] == 2 * MiB
    print(f"\n{region}: GVA {t['gva']} -> GPA {t['gpa']} -> EPT root {s['root']} ({s['how']['method']}) "
          f"-> L1 {s['out']} = {t['value']}; guest {t['guest_page_size']} / EPT {s['page_size']} / "
          f"host {t['host_page_size']}")


def test_the_thp_region_is_2m_on_every_layer(rig, seed):
    """With 1 GiB in L1, QEMU's RAM there is THP-backed and KVM maps it with 2 MiB EPT leaves:
    the probe's THP region is a 2 MiB page in L2, in the EPT and in L1."""
    t = seed["thp"]
    assert rig.probe["regions"]["thp"]["thp"] is True
    assert (t["guest_page_size"], t["slat_page_size"], t["host_page_size"]) == (2 * MiB,) * 3, t
    leaf = t["slat"]["levels"][-1]
    assert leaf["name"] == "PD" and "PS" in leaf["flags"], leaf


def test_the_root_found_is_the_one_kvm_loads(rig, seed):
    """The root `--slat auto` found is one KVM loaded with vmx_load_mmu_pgd (the kprobe armed
    in L1 before L2 existed)."""
    roots = kprobe_roots(rig)
    for region in REGIONS:
        s = seed[region]["slat"]
        assert (int(s["root"], 16), s["depth"]) in roots, (region, s["root"], roots)
        assert s["how"]["method"] == "kvm-vcpu", s["how"]     # read from KVM, not scanned
    print(f"\nkprobe roots {sorted(hex(r) for r, _ in roots)}; found {seed['heap']['slat']['root']}"
          f" by {seed['heap']['slat']['how']['method']}")


def _bits(value, width):
    return format(value, f"0{width}b")


def test_the_text_view_is_the_seeds_ept_dump_view(rig, seed):
    """`translate --slat auto` as text (QMP only): the EPT walk of each address as the seed
    report's ept_dump prints it: the GPA's index fields (9/9/9/9 bits and the 12-bit offset),
    each level's entry in 12/40/12 bits, and the huge-page line where the leaf is 2 MiB."""
    regions = rig.probe["regions"]
    r = rig.run_qi("translate", *inside(rig, gdb=False), "--slat", "auto",
                   *[hex(regions[n]["gva"]) for n in REGIONS])
    print(f"\ntranslate --slat auto (text, heap + thp) in L1: {r.seconds:.1f} s")
    assert r.rc == 0, r.stderr
    sections = r.stdout.split("EPT (the hypervisor's second-level table), root ")
    assert len(sections) == 1 + len(REGIONS), r.stdout
    for region, section in zip(REGIONS, sections[1:]):
        text = section.split("page sizes:")[0]            # this walk's EPT part only
        s = seed[region]["slat"]
        gpa = int(seed[region]["gpa"], 16)
        assert text.startswith(f"{s['root']}, 4 levels"), text[:200]
        lines = [ln.strip() for ln in text.splitlines()]
        # the index fields, as numbers and as bits
        idx = [(gpa >> shift) & 0x1FF for shift in (39, 30, 21, 12)]
        assert lines[1].split() == [str(i) for i in idx] + [hex(gpa & 0xFFF)], lines[1]
        assert lines[2].split() == ["[PML4", "IDX]", "[PDPT", "IDX]", "[PD", "IDX]", "[PT", "IDX]",
                                    "[", "Offset", "]"], lines[2]
        assert lines[3].split() == [_bits(i, 9) for i in idx] + [_bits(gpa & 0xFFF, 12)], lines[3]
        # each level: its entry, then the entry in 12/40/12 bits
        for level in s["levels"]:
            entry = int(level["entry"], 16)
            at = next(i for i, ln in enumerate(lines)
                      if re.match(rf"{level['index']}: {level['name']} +entry 0x0*{entry:x} ", ln))
            assert lines[at + 1].split() == [_bits(entry >> 52, 12), _bits((entry >> 12) & (2**40 - 1), 40),
                                             _bits(entry & 0xFFF, 12)], lines[at:at + 2]
            # ... and in words: the rights KVM gave (RAM: read, write, execute), and on the
            # leaf the memory type KVM chose for RAM (write-back)
            assert lines[at + 2].startswith(f"R={entry & 1} W={entry >> 1 & 1} X={entry >> 2 & 1} "), lines[at + 2]
            assert entry & 7 == 7, (region, level)
            if level is s["levels"][-1]:
                assert "memtype=6 (WB)" in lines[at + 2], lines[at + 2]
        assert "agrees with the pagemap path" in text
        if s["page_size"] == 2 * MiB:
            # the seed's ept_dump: "Huge Page (2M) at level 2 detected!" and the huge-page block
            assert "(2 MiB leaf)" in text and "Huge Page (2M) at level 2" in text, text


def test_a_rig_not_built_names_its_build_script(tmp_path):
    """An empty cache: the rig refuses with the command that builds it (the fixture turns this
    into a failure, never a skip)."""
    with pytest.raises(EptRigNotBuilt, match=r"vm/ept/build\.sh"):
        EptRig.check_built(str(tmp_path))


def test_kvm_shows_the_vcpus_ept_root_and_eptp(rig, seed):
    """`qintrospect kvm` reads each vCPU's root from KVM's own structures (kallsyms + BTF of
    L1's kernel and kvm.ko): the root KVM loaded (the kprobe), on root_mmu, and the EPTP KVM
    builds from it (write-back, 4 levels: 0x1e; bit 6 when kvm_intel's eptad is on)."""
    k = rig.run_qi("kvm", "--qmp", rig.l2_qmp_in_l1, "--json", *QI_TIMEOUT)
    assert k.rc == 0, k.stderr
    f = k.json[0]
    assert f["tdp"]["kind"] == "ept" and f["tdp"]["enabled"] is True, f["tdp"]
    roots = f["roots"]
    assert roots["vendor"] == "intel" and roots["pid"] == rig.l2_qemu_pid_in_l1, roots
    v0 = roots["vcpus"][0]
    root = int(v0["root"], 16)
    assert (root, v0["level"]) in kprobe_roots(rig), v0
    assert v0["active_mmu"] == "root_mmu" and v0["guest_mode"] is False and not v0["smm"], v0
    ad = rig.run_l1("cat /sys/module/kvm_intel/parameters/eptad").strip()
    assert int(v0["eptp"], 16) == root | 6 | (4 - 1) << 3 | (0x40 if ad == "Y" else 0), v0
    # the text view of these facts (the command prints slat.kvm.text of them: the KVM rig's
    # test runs it; here a second qintrospect under Bochs would cost ~20 s for the same lines)
    text = kvm_text(f)
    assert f"vCPU 0: EPT root {v0['root']}, 4 levels, EPTP {v0['eptp']}" in text, text


def test_the_scan_finds_the_root_kvm_holds(rig, seed):
    """The second road to the root: a scan of L1's RAM keyed by the pagemap path's answers
    (--slat scan) finds the root read from KVM's vCPU (the seed's run)."""
    heap = hex(rig.probe["regions"]["heap"]["gva"])
    r = rig.run_qi("translate", *inside(rig), "--slat", "scan", "--json", heap)
    assert r.rc == 0, r.stderr
    s = r.json[0]["slat"]
    assert s["how"]["method"] == "scan" and s["agrees"] is True, s["how"]
    assert (s["root"], s["depth"]) == (seed["heap"]["slat"]["root"], seed["heap"]["slat"]["depth"])
    # L2's own RAM (256 MiB, its QEMU's pages in L1) is not read: the EPT is KVM's, not L2's
    assert s["how"]["guest_ram_skipped"] >= 64 << 20, s["how"]
    print(f"\nthe scan found {s['root']} in {s['how'].get('seconds')} s (in L1, under Bochs; "
          f"{s['how']['guest_ram_skipped'] >> 20} MiB of L2's RAM left out)")


def test_brief_walks_the_ept_for_every_address_at_once(rig, seed):
    """translate --brief --slat auto: every probe address's GPA walked through KVM's EPT at
    once (slat.walk_batch): the heap and the THP region end where the seed's one-by-one walks
    did; every page the host holds agrees with the pagemap path; the untouched page faults in
    the guest and has no second-level keys. No row ever disagrees."""
    regions = rig.probe["regions"]
    r = rig.run_qi("translate", *inside(rig, gdb=False), "--slat", "auto", "--brief",
                   *[hex(x["gva"]) for x in regions.values()])
    print(f"\ntranslate --brief --slat auto ({len(regions)} addresses) in L1: {r.seconds:.1f} s")
    assert r.rc == 1, r.stderr           # the untouched page faults
    root = seed["heap"]["slat"]["root"]
    assert f"# second level: EPT root {root}, read from KVM's vCPU 0" in r.stderr, r.stderr
    rows = dict(zip(regions, r.json))
    for name in ("heap", "thp"):
        one = seed[name]["slat"]
        assert (rows[name]["slat_out"], rows[name]["slat_page_size"]) == (
            one["out"], one["page_size"]), (name, rows[name], one)
    for name, row in rows.items():
        if regions[name]["gpa"] is None:
            assert "fault" in row and "slat_out" not in row, row
        elif row["slat_out"] is not None:
            assert row["slat_agrees"] is True and row["slat_out"] == row["hpa"], (name, row)
        else:   # not in the EPT now (KVM maps a page at the guest's first touch)
            assert row["slat_fault"]["reason"] == "ept-violation", (name, row)


def test_kvms_mmio_markers_in_the_real_ept_are_named_never_mappings(rig, seed):
    """L2's kernel maps its IOAPIC (a fixmap page) and touched it at boot: KVM left an MMIO
    marker for it in the EPT (W+X without R: a deliberate EPT misconfiguration; Bochs's log
    says `EPT misconfig for guest paddr 0xfec00000`). It is named as that, with the GPA QEMU's
    memory map gives the device, and never as a mapping."""
    gpa = 0xFEC00000
    # the kernel half of the probe's own root maps the fixmap: no scan for other roots
    w = rig.run_qi("who-maps", *inside(rig, gdb=False), "--gpa", hex(gpa),
                   *kernel_half_roots(seed["heap"]["root"]), "--json", "--no-names")
    assert w.rc == 0 and w.json[0]["mappings"], (w.stderr, w.stdout)
    # through the root that maps it (a KPTI user copy does not)
    gva, root = (w.json[0]["mappings"][0][k] for k in ("gva", "root"))
    r = rig.run_qi("translate", *inside(rig, gdb=False), "--cr3", root, "--slat", "auto",
                   "--json", gva)
    assert r.rc == 0, r.stderr
    t, s = r.json[0], r.json[0]["slat"]
    assert t["gpa"] == hex(gpa) and t["hpa"] is None, t
    assert s["root"] == seed["heap"]["slat"]["root"], s
    m = s["kvm_mmio_marker"]
    assert m is not None, f"no MMIO marker at GPA {gpa:#x}: {s['fault']}, {s['note']}"
    assert int(m["entry"], 16) & 7 == 6 and m["gpa"] == hex(gpa) and "ioapic" in m["device"], m
    assert s["fault"]["reason"] == "ept-misconfiguration" and s["out"] is None, s
    b = rig.run_qi("translate", *inside(rig, gdb=False), "--cr3", root, "--slat", "auto",
                   "--brief", gva)                     # the batch walk names it too
    assert b.json[0]["slat_fault"] == {"level": m["level"], "reason": "ept-misconfiguration",
                                       "kvm_mmio_marker": True}, (b.json, b.stderr)
    print(f"\nEPT MMIO marker for the IOAPIC: entry {m['entry']} at {m['level']} ({m['why']})")
