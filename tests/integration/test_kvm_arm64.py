"""The arm64 KVM rig (vm/kvm_arm64): L1 (Debian's arm64 kernel under qemu-system-aarch64 -M
virt,virtualization=on, TCG) runs KVM at EL2 in VHE mode, and a tiny VMM runs L2 under it, so
L2's memory goes through a real stage 2 table that L1's KVM built. qintrospect attaches to L1's
QEMU from outside. Stopped while the vCPU runs L2, translate walks L2's addresses through both
stages of the vCPU's own regime; every answer is held to QEMU's own gva2gpa on the same paused
vCPU (it walks both stages), to the values L2 wrote, and to L1's own /proc/VMM_PID/pagemap.
Stopped in L1's kernel (the EL2&0 regime of a VHE host), the VMM's own address of the same
bytes leads to the same physical page through L1's tables."""

import json
import re

import pytest

from vm.kvm_arm64.rig import KvmArm64Rig

from .conftest import run_cli, run_json

CODE_IPA = 0x40000000          # the payload's code (the VMM maps it executable)


@pytest.fixture(scope="module")
def rig():
    r = KvmArm64Rig()
    r.check_built()                 # fails (not skips) when vm/kvm_arm64/build.sh was not run
    with r:
        # L1's own view, read while it runs: the physical page behind each marker's HVA
        r.l1_pas = {ipa: r.l1_pa_of_ipa(ipa) for ipa in r.ready["markers"]}
        # VTTBR_EL2/VTCR_EL2 while L2 runs: L2's VM's. Stopped in L1 they usually keep the
        # last guest's, but were seen 0 too: a test that stops in L1 compares with these.
        r.live_el2 = stop_in(r, "EL1&0", True)["el2"]
        r.qmp("cont")
        r.live_vttbr = int(r.live_el2["vttbr_el2"], 16)
        yield r


def attach_args(r):
    return ("--qmp", r.qmp_path, "--gdb", r.gdb_address)


def stop_in(r, regime, stage2, mmu=None, tries=80):
    """Pause L1 (QMP stop) at a moment its vCPU is in `regime` with stage 2 live or not (and
    inside L2, on the L2 vCPU whose MMU is off, vCPU 0, or on, vCPU 1, when `mmu` says); the
    cpus row of that moment. The vCPU moves between L2's two vCPUs and L1's kernel all the
    time."""
    for _ in range(tries):
        r.qmp("stop")
        rc, cpus, err = run_json("cpus", *attach_args(r))
        assert rc == 0, err
        (cpu,) = cpus
        if cpu["regime"] == regime and cpu["el2"]["stage2_live"] == stage2 and \
                (mmu is None or ("M" in cpu["sctlr_bits"]) == mmu):
            return cpu
        r.qmp("cont")
    pytest.fail(f"the vCPU was never stopped in {regime} (stage 2 live: {stage2}, MMU {mmu})")


def stop_in_l1_settled(r, spec, tries=40):
    """Pause L1 in its kernel at a moment KVM's vCPU `spec` (PID:N) is not being loaded: KVM
    marks a vCPU loaded before it writes its registers into the CPU, and qintrospect says so
    when the CPU's and KVM's saved copy differ there; such a stop is tried again."""
    for _ in range(tries):
        stop_in(r, "EL2&0", False)
        rc, out, err = run_cli("translate", *attach_args(r), "--kvm-vcpu", spec, "-v",
                               hex(CODE_IPA))
        if rc == 0 and "saved copy differ" not in err:
            return
        r.qmp("cont")
    pytest.fail(f"never stopped in L1 with KVM's vCPU {spec} settled")


def qemu_gva2gpa(r, va):
    out = r.hmp(f"gva2gpa {va:#x}")
    m = re.search(r"gpa: (0x[0-9a-f]+)", out)
    return int(m.group(1), 16) if m else None


@pytest.fixture
def in_l2(rig):
    cpu = stop_in(rig, "EL1&0", True, mmu=False)
    yield cpu
    rig.qmp("cont")


def test_cpus_shows_the_live_stage2_and_its_layout(rig, in_l2):
    el2 = in_l2["el2"]
    assert "VM" in el2["hcr_bits"] and "E2H" in el2["hcr_bits"] and "TGE" not in el2["hcr_bits"]
    s2 = el2["stage2"]
    v = s2["vtcr"]
    # KVM's default VM: a 40-bit IPA, 4 KiB granule, two concatenated level 1 tables
    assert (v["ia_bits"], v["granule"], v["start_level"], v["root_tables"]) == (40, "4k", 1, 2)
    assert v["valid"] and not s2["vttbr_problems"] and s2["vmid"] >= 1
    rc, text, err = run_cli("cpus", *attach_args(rig))
    assert rc == 0 and "stage 2 live" in text and "40-bit IPA" in text, err + text


def test_l2s_addresses_through_both_stages_agree_with_qemu_l1_and_the_bytes(rig, in_l2):
    markers = rig.ready["markers"]
    rc, rows, err = run_json("translate", *attach_args(rig), *map(hex, markers))
    assert rc == 0, err
    for row in rows:
        ipa = int(row["gva"], 16)          # L2 runs with its MMU off: its VA is its IPA
        assert row["stage2"]["stage1_off"] and row["ipa"] == row["gva"]
        pa = int(row["gpa"], 16)
        assert pa == qemu_gva2gpa(rig, ipa), row["gva"]          # QEMU: both stages
        assert pa == rig.l1_pas[ipa], row["gva"]                 # L1's own pagemap
        assert int(row["value"], 16) == markers[ipa]             # the bytes L2 wrote
        assert row["value_matches"]
        slot = next(s for s in rig.ready["slots"] if s["ipa"] <= ipa < s["ipa"] + s["size"])
        # slot 0 is 4 KiB pages in L1 (MADV_NOHUGEPAGE), slot 1 a THP: KVM maps them so
        assert row["stage2"]["page_size"] == (4096 if slot["backing"] == "4k" else 2 << 20)
        assert row["writable"] and not row["executable"]   # data: XN=0b10 at stage 2


def test_the_code_page_is_executable_and_an_unmapped_ipa_is_a_stage2_fault(rig, in_l2):
    rc, (row,), err = run_json("translate", *attach_args(rig), hex(CODE_IPA))
    assert rc == 0 and row["executable"], err
    assert row["stage2"]["access"]["execute-el1"]["allowed"]
    untouched = rig.ready["untouched"][0]       # present in L1, never touched by L2
    rc, (row,), err = run_json("translate", *attach_args(rig), hex(untouched))
    assert rc == 1, err
    assert row["fault"]["stage"] == 2 and row["fault"]["reason"] == "translation"
    assert qemu_gva2gpa(rig, untouched) is None
    rc, text, err = run_cli("translate", *attach_args(rig), hex(untouched))
    assert rc == 1 and "stage 2 translation fault" in text, err + text


def test_read_goes_through_both_stages(rig, in_l2):
    ipa, value = next(iter(rig.ready["markers"].items()))
    rc, pieces, err = run_json("read", *attach_args(rig), hex(ipa), "8")
    assert rc == 0, err
    assert int.from_bytes(bytes.fromhex(pieces[0]["data"]), "little") == value
    assert int(pieces[0]["gpa"], 16) == rig.l1_pas[ipa]


def test_one_stage_commands_say_why_not(rig, in_l2):
    for args in (("who-maps", "--gpa", "0x40000000"), ("translate", "--brief", hex(CODE_IPA)),
                 ("find-cr3",), ("translate", "--slat", "auto", hex(CODE_IPA)),
                 ("translate", "--guest-pid", str(rig.vmm_pid), hex(CODE_IPA))):
        rc, out, err = run_cli(*args, *attach_args(rig))
        assert rc == 2 and "stage 2" in err and "Traceback" not in err, (args, err)
    rc, out, err = run_cli("find-stage2", *attach_args(rig))
    assert rc == 2 and "VTTBR_EL2's" in err and in_l2["el2"]["stage2"]["root"] in err, err
    rc, out, err = run_cli("translate", "--mermaid", hex(CODE_IPA), *attach_args(rig))
    assert rc == 2 and "two-stage" in err and "Traceback" not in err, err


def test_l1s_own_tables_take_the_vmms_address_to_the_same_page(rig):
    """Stopped in L1's kernel while the VMM's vCPU thread is current (the EL2&0 regime of a
    VHE host: TTBR0_EL2 is the VMM's table), the VMM's HVA of a marker leads through L1's
    own stage 1 to the page stage 2 gave for the marker's IPA."""
    ipa = next(iter(rig.ready["markers"]))
    hva = rig.slot_hva(ipa)
    for _ in range(80):
        stop_in(rig, "EL2&0", False)
        rc, rows, err = run_json("translate", *attach_args(rig), hex(hva))
        rig.qmp("cont")
        if rc == 0 and int(rows[0]["value"], 16) == rig.ready["markers"][ipa]:
            assert rows[0]["root"] and int(rows[0]["gpa"], 16) == rig.l1_pas[ipa]
            assert rows[0]["user"]                       # the VMM's own page, at EL0
            return
    pytest.fail("never stopped in L1 with the VMM's address space current")


def test_in_l1_find_cr3_leaves_kvms_stage2_out_and_who_maps_names_the_vmm(rig):
    """Stopped in L1's kernel: KVM's stage 2 first level (unreferenced table descriptors into
    RAM: a root's shape) is not offered as a process's root; who-maps of the physical page
    behind an L2 marker finds the VMM's own mapping of it, at the slot's HVA, named."""
    stop_in(rig, "EL2&0", False)
    try:
        rc, candidates, err = run_json("find-cr3", *attach_args(rig))
        assert rc == 0, err
        roots = {int(c["cr3"], 16) for c in candidates}
        stage2 = rig.live_vttbr & ((1 << 48) - 1) & ~0xFFF
        assert not {stage2, stage2 + 0x1000} & roots, (hex(stage2), candidates)
        assert any("TTBR0_EL2" in c["how"] for c in candidates if c["is_current"])
        ipa = next(iter(rig.ready["markers"]))
        rc, (w,), err = run_json("who-maps", *attach_args(rig), "--gpa", hex(rig.l1_pas[ipa]))
        assert rc == 0, err
        vmm = [m for m in w["mappings"] if int(m["gva"], 16) == rig.slot_hva(ipa) & ~0xFFF]
        assert vmm and {"pid": rig.vmm_pid, "comm": "vmm"} in vmm[0]["processes"], w
    finally:
        rig.qmp("cont")


def test_ps_inside_l2_reads_l1s_kernel_and_gives_the_vcpu_to_the_vmm_thread(rig, in_l2):
    """Stopped inside L2 (on its vCPU 0), L1's kernel is still read (a VHE host keeps it in
    TTBR1_EL2); the vCPU holds the VMM's table (TTBR0_EL2), and KVM's own structures say
    which VMM thread runs it: the one whose KVM vCPU is loaded there (vCPU 0 runs on the
    VMM's main thread), not L2's SP_EL0."""
    ttbr0_el2 = int(in_l2["el2"]["ttbr0_el2"], 16) & ((1 << 48) - 2)
    rc, tasks, err = run_json("ps", "--threads", *attach_args(rig))
    assert rc == 0, err
    vmm = [t for t in tasks if t["tgid"] == rig.vmm_pid]
    assert len(vmm) == 2 and {int(t["root"], 16) for t in vmm} == {ttbr0_el2}, vmm
    assert [t["pid"] for t in vmm if t["vcpu"] == 0] == [rig.vmm_pid], vmm
    assert not [t for t in tasks if t["vcpu"] == 0 and t["tgid"] != rig.vmm_pid]
    m = re.search(rf"vCPU 0 runs a guest of {rig.vmm_pid} \(vmm\): its KVM vCPU (\d+), on "
                  r"thread (\d+)", err)
    assert m and (m.group(1), int(m.group(2))) == ("0", rig.vmm_pid), err
    rc, tasks, err = run_json("ps", *attach_args(rig))        # the process: its main thread
    assert rc == 0 and [t["vcpu"] for t in tasks if t["pid"] == rig.vmm_pid] == [0], err


def kvm_vcpu_translate(rig, *extra):
    """translate --kvm-vcpu VMM_PID of every marker IPA, -v: (rows, the source line)."""
    markers = rig.ready["markers"]
    rc, rows, err = run_json("translate", *attach_args(rig), "--kvm-vcpu", str(rig.vmm_pid),
                             "-v", *extra, *map(hex, markers))
    assert rc == 0, err
    return rows, err


def check_kvm_vcpu_rows(rig, rows, vttbr):
    """Each marker through both stages with KVM's own root: L1's pagemap page, the bytes L2
    wrote, the page size its memslot's backing gives, the root the vCPU's VTTBR_EL2 names."""
    markers = rig.ready["markers"]
    for row in rows:
        ipa = int(row["gva"], 16)
        s2 = row["stage2"]
        assert "kvm_s2_mmu.pgd_phys" in s2["source"] and s2["stage1_off"], s2["source"]
        assert row["cr3_source"] == "kvm-vcpu"
        assert int(s2["root"], 16) == vttbr & ((1 << 48) - 2), (s2["root"], hex(vttbr))
        assert int(row["gpa"], 16) == rig.l1_pas[ipa], row["gva"]
        assert int(row["value"], 16) == markers[ipa]
        slot = next(s for s in rig.ready["slots"] if s["ipa"] <= ipa < s["ipa"] + s["size"])
        assert s2["page_size"] == (4096 if slot["backing"] == "4k" else 2 << 20)


def test_kvm_vcpu_from_l1s_memory_inside_l2_and_in_l1(rig):
    """--kvm-vcpu: L2's vCPU and its VM's stage 2 read in L1's memory (the VMM's kvm-vm and
    kvm-vcpu descriptors, struct kvm, kvm_s2_mmu.pgd_phys, at offsets from L1's BTF). Inside
    L2 it must agree with the live VTTBR_EL2 and walk; stopped in L1's kernel, where no
    register names L2's stage 2, it still translates L2's addresses the same way."""
    for regime, live in (("EL1&0", True), ("EL2&0", False)):
        if live:
            stop_in(rig, regime, live)
        else:
            stop_in_l1_settled(rig, f"{rig.vmm_pid}:0")
        try:
            rows, err = kvm_vcpu_translate(rig)
            rc, (fault,), ferr = run_json("translate", *attach_args(rig), "--kvm-vcpu",
                                          f"{rig.vmm_pid}:0", hex(rig.ready["untouched"][0]))
            ipa, value = list(rig.ready["markers"].items())[-1]
            rrc, pieces, rerr = run_json("read", *attach_args(rig), "--kvm-vcpu",
                                         str(rig.vmm_pid), hex(ipa), "8")
        finally:
            rig.qmp("cont")
        check_kvm_vcpu_rows(rig, rows, rig.live_vttbr)
        if live:
            assert "runs this VM now: its VTTBR_EL2" in err and "agrees" in err, err
        assert rc == 1 and fault["fault"]["stage"] == 2, ferr
        assert fault["fault"]["reason"] == "translation"
        assert rrc == 0 and int(pieces[0]["gpa"], 16) == rig.l1_pas[ipa], rerr
        assert int.from_bytes(bytes.fromhex(pieces[0]["data"]), "little") == value
    rc, text, err = run_cli("translate", *attach_args(rig), "--kvm-vcpu", str(rig.vmm_pid),
                            hex(CODE_IPA))
    assert rc == 0 and "from KVM in the guest: VM of process" in text, err + text


def test_kvm_vcpu_as_kvm_saved_it_when_put(rig):
    """L2's two vCPUs take turns on L1's one CPU: at most one is loaded, the other put (KVM
    saved its EL1 registers in kvm_vcpu.arch.ctxt, kvm_vcpu.cpu = -1). Those are read then,
    and give the same answers."""
    for _ in range(60):
        rig.qmp("stop")
        try:
            rows, err = kvm_vcpu_translate(rig)
        finally:
            rig.qmp("cont")
        if "not loaded: its EL1 registers as KVM saved them" in err:
            check_kvm_vcpu_rows(rig, rows, rig.live_vttbr)
            return
    pytest.fail("never stopped with L2's vCPU 0 put")


def test_ps_kvm_lists_the_vm_the_vmm_holds(rig):
    """ps --kvm: the VMM's VM, its stage 2 root (KVM's pgd_phys, the root VTTBR_EL2 names)
    and vCPU 0, and the command that translates as it."""
    stop_in(rig, "EL2&0", False)
    try:
        rc, vms, err = run_json("ps", "--kvm", "--threads", *attach_args(rig))  # (one VM)
        trc, text, terr = run_cli("ps", "--kvm", *attach_args(rig))
    finally:
        rig.qmp("cont")
    assert rc == 0, err
    (vm,) = vms
    assert vm["pid"] == rig.vmm_pid and vm["comm"] == "vmm" and vm["vmid"] >= 1
    assert int(vm["pgd_phys"], 16) == rig.live_vttbr & ((1 << 48) - 2)
    assert vm["vtcr_el2"] == rig.live_el2["vtcr_el2"]          # what KVM loads for it
    assert [c["vcpu_id"] for c in vm["vcpus"]] == [0, 1]
    assert [c["loaded_on_cpu"] for c in vm["vcpus"]].count(None) >= 1     # one CPU for two
    assert trc == 0 and f"translate --kvm-vcpu {rig.vmm_pid}:0 ADDR" in text, terr + text


def test_vmmap_and_search_of_l2_are_its_stage2_map(rig):
    """L2 runs with its MMU off: its addresses are its IPAs and its whole address space is
    what stage 2 maps. vmmap --leaf lists it (inside L2 from VTTBR_EL2, in L1's kernel with
    --kvm-vcpu from KVM): every marker is in a leaf whose PA is L1's own pagemap page for it,
    the page sizes are the memslots' backings, an IPA L2 never touched is in none, and every
    leaf lies in a memslot. search finds each marker's value at its IPA."""
    markers, slots = rig.ready["markers"], rig.ready["slots"]
    maps = []
    root = hex(rig.live_vttbr & ((1 << 48) - 1) & ~0xFFF)
    for regime, live, extra in (("EL1&0", True, ()),
                                ("EL2&0", False, ("--kvm-vcpu", str(rig.vmm_pid))),
                                ("EL2&0", False, ("--stage2", root))):
        if live:
            stop_in(rig, regime, live, mmu=False)
        elif extra[0] == "--kvm-vcpu":
            stop_in_l1_settled(rig, f"{rig.vmm_pid}:0")
        else:
            stop_in(rig, regime, live)
        try:
            rc, rows, err = run_json("vmmap", "--leaf", *extra, *attach_args(rig))
            src, found, serr = run_json("search", "--u64", hex(markers[0x40001000]), *extra,
                                        *attach_args(rig))
            trc, text, terr = run_cli("vmmap", "--hpa", *extra, *attach_args(rig))
        finally:
            rig.qmp("cont")
        assert rc == 0 and rows, err
        for ipa, value in markers.items():
            hits = [r for r in rows if int(r["start"], 16) <= ipa < int(r["end"], 16)]
            assert len(hits) == 1, (extra, hex(ipa), len(rows), err, rows[:3])
            (row,) = hits
            assert int(row["gpa"], 16) + ipa - int(row["start"], 16) == rig.l1_pas[ipa], row
            slot = next(s for s in slots if s["ipa"] <= ipa < s["ipa"] + s["size"])
            assert row["page_size"] == (4096 if slot["backing"] == "4k" else 2 << 20), row
            assert row["readable"] and row["writable"] and "AF" in row["flags"], row
        for ipa in rig.ready["untouched"]:
            assert not [r for r in rows if int(r["start"], 16) <= ipa < int(r["end"], 16)]
        for r in rows:
            assert any(s["ipa"] <= int(r["start"], 16) and int(r["end"], 16) <= s["ipa"] +
                       s["size"] for s in slots), r
        # the VMM's table (L2 read the markers from it) holds the value too, right after n
        # and the first IPA
        table = rig.ready["table"] + 16
        assert src == 0 and [int(m["gva"], 16) for m in found] == [table, 0x40001000], serr
        assert int(found[1]["gpa"], 16) == rig.l1_pas[0x40001000]
        assert trc == 0 and "hpa" in text.splitlines()[0], terr
        maps.append({(r["start"], r["gpa"], r["page_size"]) for r in rows})
    assert maps[0] == maps[1] == maps[2]    # the register's stage 2, KVM's, the root given


def test_find_stage2_by_scan_names_kvms_table_its_vmm_and_memslots(rig):
    """Stopped in L1's kernel, with no symbol used: the scan of L1's RAM finds KVM's stage 2
    first level (the VTTBR_EL2 read inside L2), confirmed by the VMM's own table (the root ps
    reads in L1's kernel for the VMM's pid), which maps its pages at the memslots' offsets
    (HVA - IPA, as the VMM set them up). --stage2 ROOT then takes each marker's IPA to L1's
    own pagemap page and the value L2 wrote; find-cr3 and who-maps leave the table out by
    this scan alone (no VTTBR, no KVM structures)."""
    import qintrospect
    from qintrospect.commands import finder
    root = rig.live_vttbr & ((1 << 48) - 1) & ~0xFFF
    markers = rig.ready["markers"]
    stop_in(rig, "EL2&0", False)
    try:
        rc, found, err = run_json("find-stage2", *attach_args(rig))
        prc, tasks, perr = run_json("ps", *attach_args(rig))
        trc, rows, terr = run_json("translate", "--stage2", hex(root), *attach_args(rig),
                                   *map(hex, markers), hex(rig.ready["untouched"][0]))
        with qintrospect.attach(qmp=rig.qmp_path, gdb=rig.gdb_address) as vm:
            scanned = finder.scan(vm.memory, vm.ram_map, vm.cpu)      # no roots left out
            kept = {c.root for c in finder.without_stage2(vm, scanned)}
    finally:
        rig.qmp("cont")
    assert rc == 0 and prc == 0, err + perr
    (f,) = [f for f in found if int(f["root"], 16) == root]
    vmm_root = next(int(t["root"], 16) for t in tasks if t["pid"] == rig.vmm_pid)
    assert int(f["vmm_root"], 16) == vmm_root and f["vmm"] == {"pid": rig.vmm_pid,
                                                               "comm": "vmm"}
    assert f["pages_matched"] == f["pages_checked"] > 0
    slots = {s["hva"] - s["ipa"] for s in rig.ready["slots"]}
    assert {int(m["hva_minus_ipa"], 16) for m in f["memslots"]} == slots, f
    assert trc == 1, terr                     # the untouched IPA: a stage 2 fault
    for row, (ipa, value) in zip(rows, markers.items()):
        assert row["cr3_source"] == "stage2" and row["stage2"]["stage1_off"], row
        assert int(row["gpa"], 16) == rig.l1_pas[ipa] and int(row["value"], 16) == value
    assert rows[-1]["fault"]["stage"] == 2 and rows[-1]["fault"]["reason"] == "translation"
    assert root in {c.root for c in scanned} and root not in kept
    assert vmm_root in kept


def test_in_the_shell_stage2_and_kvm_vcpu_are_for_one_command(rig):
    """A shell holding the VM (gdb) does not read the registers again between commands: a
    command with --stage2 or --kvm-vcpu must not leave the next one translating as that VM."""
    root = rig.live_vttbr & ((1 << 48) - 1) & ~0xFFF
    ipa = next(iter(rig.ready["markers"]))
    stop_in_l1_settled(rig, f"{rig.vmm_pid}:0")
    script = (f"translate --json --stage2 {root:#x} {ipa:#x}\ntranslate --json {ipa:#x}\n"
              f"translate --json --kvm-vcpu {rig.vmm_pid} {ipa:#x}\ntranslate --json {ipa:#x}\n")
    try:
        rc, out, err = run_cli("shell", *attach_args(rig), input=script)
    finally:
        rig.qmp("cont")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["cr3_source"] for r in rows] == ["stage2", "vcpu", "kvm-vcpu", "vcpu"], err
    assert int(rows[0]["gpa"], 16) == int(rows[2]["gpa"], 16) == rig.l1_pas[ipa]
    own = [(r["cr3"], r.get("gpa"), r.get("fault"), r.get("stage2")) for r in rows[1::2]]
    assert own[0] == own[1] and own[0][3] is None       # L1's own EL2&0 regime, no stage 2


# vCPU 1's stage 1 (vmm.c's s1_tables): the rights of each kind of mapping, as both stages
# give them: (user, writable, executable). Stage 2 keeps every data page XN (KVM maps a page
# executable only once the guest fetches from it): the identity block's stage 1 "rwx" is
# executable on the code page alone.
S1_RIGHTS = {"user-rw": (True, True, False), "user-ro": (True, False, False),
             "kernel-ro": (False, False, False), "kernel-rw": (False, True, False),
             "kernel-rwx": (False, True, False)}


def check_stage1_rows(rig, rows, rc):
    """Each of vCPU 1's mappings (its MMU on: tables at IPAs, read through stage 2): the IPA
    its stage 1 gives, the rights it says, and for a marker's IPA L1's own pagemap page and
    the value L2 wrote; an IPA stage 2 does not map is a stage 2 fault."""
    markers = rig.ready["markers"]
    assert rc == 1                                   # the s2-unmapped one
    for m, row in zip(rig.ready["s1"], rows):
        assert int(row["gva"], 16) == m["va"], row
        if m["kind"] == "s2-unmapped":
            assert row["fault"]["stage"] == 2 and row["fault"]["reason"] == "translation", row
            assert row["ipa"] == hex(m["ipa"])
            continue
        assert not row["stage2"]["stage1_off"] and row["ipa"] == hex(m["ipa"]), row
        assert (row["user"], row["writable"], row["executable"]) == S1_RIGHTS[m["kind"]], \
            (m, row["user"], row["writable"], row["executable"])
        pa = int(row["gpa"], 16)
        page = m["ipa"] & ~0xFFF
        known = {ipa & ~0xFFF: ipa for ipa in markers}
        if page in known:
            assert pa - (m["ipa"] - known[page]) == rig.l1_pas[known[page]], (m, row)
            if m["ipa"] in markers:
                assert int(row["value"], 16) == markers[m["ipa"]], (m, row)


def test_l2_vcpu1_stage1_through_stage2_agrees_with_qemu_and_l1(rig):
    """Stopped inside L2 on vCPU 1 (its MMU on), translate walks its stage 1 (tables at IPAs,
    read through stage 2) and then stage 2: every mapping as QEMU's own gva2gpa on the same
    paused vCPU gives it, L1's pagemap, the values L2 wrote, stage 1's rights. Stopped in
    L1's kernel, --kvm-vcpu PID:1 gives the same (vCPU 1's EL1 registers from KVM)."""
    vas = [hex(m["va"]) for m in rig.ready["s1"]]
    stop_in(rig, "EL1&0", True, mmu=True)
    try:
        rc, rows, err = run_json("translate", *attach_args(rig), *vas)
        qemu = [qemu_gva2gpa(rig, m["va"]) for m in rig.ready["s1"]]
    finally:
        rig.qmp("cont")
    check_stage1_rows(rig, rows, rc)
    for m, row, q in zip(rig.ready["s1"], rows, qemu):
        assert q == (None if m["kind"] == "s2-unmapped" else int(row["gpa"], 16)), (m, q, row)
    stop_in_l1_settled(rig, f"{rig.vmm_pid}:1")
    try:
        krc, krows, kerr = run_json("translate", *attach_args(rig), "--kvm-vcpu",
                                    f"{rig.vmm_pid}:1", "-v", *vas)
    finally:
        rig.qmp("cont")
    check_stage1_rows(rig, krows, krc)
    assert [r.get("gpa") for r in krows] == [r.get("gpa") for r in rows], kerr
    assert "vCPU 1" in kerr, kerr


def test_vmmap_and_search_of_vcpu1_compose_both_stages(rig):
    """vmmap --leaf of vCPU 1 (--kvm-vcpu PID:1): each stage 1 leaf cut into the pieces stage
    2 maps, VA -> PA; the piece of a marker's page has L1's pagemap page, an IPA stage 2 does
    not map is in no row, the identity block's pieces are the stage 2 map's own. search
    finds marker 1 twice: through VA 0x1000 and through the identity block."""
    spec = f"{rig.vmm_pid}:1"
    stop_in_l1_settled(rig, spec)
    try:
        rc, rows, err = run_json("vmmap", "--leaf", "--kvm-vcpu", spec, *attach_args(rig))
        src, found, serr = run_json("search", "--u64", hex(rig.ready["markers"][0x40001000]),
                                    "--kvm-vcpu", spec, *attach_args(rig))
    finally:
        rig.qmp("cont")
    assert rc == 0 and rows, err
    by_va = {int(r["start"], 16): r for r in rows}
    for m in rig.ready["s1"]:
        page = m["va"] & ~0xFFF
        row = next((r for r in rows if int(r["start"], 16) <= page < int(r["end"], 16)), None)
        if m["kind"] == "s2-unmapped":
            assert row is None, row
            continue
        assert row is not None, (m, sorted(by_va))
        user, writable, executable = S1_RIGHTS[m["kind"]]
        assert (row["user"], row["writable"], row["executable"]) == (user, writable, executable)
        if m["ipa"] in rig.ready["markers"]:
            pa = int(row["gpa"], 16) + m["va"] - int(row["start"], 16)
            assert pa == rig.l1_pas[m["ipa"]], (m, row)
    code = next(r for r in rows if int(r["start"], 16) == CODE_IPA)   # identity, fetched
    assert code["executable"] and not code["user"], code
    table = rig.ready["table"] + 16               # (the VMM's table holds the value too)
    assert src == 0 and sorted(int(f["gva"], 16) for f in found) == \
        [0x1000, table, 0x40001000], serr
    assert [f["gpa"] for f in found if int(f["gva"], 16) != table] == \
        [hex(rig.l1_pas[0x40001000])] * 2
    assert [f["user"] for f in found] == [True, False, False]


def test_kvm_vcpu_says_what_is_wrong(rig):
    for spec, why in ((f"{rig.vmm_pid}:7", "has no KVM vCPU 7 (VM fd"),
                      ("1", "holds no KVM VM"), ("x:1", "give PID or PID:N")):
        rc, out, err = run_cli("translate", *attach_args(rig), "--kvm-vcpu", spec, "0x40001000")
        assert rc == 2 and why in err and "Traceback" not in err, (spec, err)
    rc, out, err = run_cli("translate", *attach_args(rig), "--kvm-vcpu", str(rig.vmm_pid),
                           "--cr3", "0x1000", "0x40001000")
    assert rc == 2 and "exclude each other" in err, err
