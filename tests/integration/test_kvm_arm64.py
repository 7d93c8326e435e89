"""The arm64 KVM rig (vm/kvm_arm64): L1 (Debian's arm64 kernel under qemu-system-aarch64 -M
virt,virtualization=on, TCG) runs KVM at EL2 in VHE mode, and a tiny VMM runs L2 under it, so
L2's memory goes through a real stage 2 table that L1's KVM built. qintrospect attaches to L1's
QEMU from outside. Stopped while the vCPU runs L2, translate walks L2's addresses through both
stages of the vCPU's own regime; every answer is held to QEMU's own gva2gpa on the same paused
vCPU (it walks both stages), to the values L2 wrote, and to L1's own /proc/VMM_PID/pagemap.
Stopped in L1's kernel (the EL2&0 regime of a VHE host), the VMM's own address of the same
bytes leads to the same physical page through L1's tables."""

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
        yield r


def attach_args(r):
    return ("--qmp", r.qmp_path, "--gdb", r.gdb_address)


def stop_in(r, regime, stage2, tries=80):
    """Pause L1 (QMP stop) at a moment its vCPU is in `regime` with stage 2 live or not; the
    cpus row of that moment. The vCPU moves between L2 and L1's kernel all the time."""
    for _ in range(tries):
        r.qmp("stop")
        rc, cpus, err = run_json("cpus", *attach_args(r))
        assert rc == 0, err
        (cpu,) = cpus
        if cpu["regime"] == regime and cpu["el2"]["stage2_live"] == stage2:
            return cpu
        r.qmp("cont")
    pytest.fail(f"the vCPU was never stopped in {regime} (stage 2 live: {stage2})")


def qemu_gva2gpa(r, va):
    out = r.hmp(f"gva2gpa {va:#x}")
    m = re.search(r"gpa: (0x[0-9a-f]+)", out)
    return int(m.group(1), 16) if m else None


@pytest.fixture
def in_l2(rig):
    cpu = stop_in(rig, "EL1&0", True)
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
    for args in (("vmmap",), ("translate", "--brief", hex(CODE_IPA)), ("find-cr3",),
                 ("translate", "--guest-pid", str(rig.vmm_pid), hex(CODE_IPA))):
        rc, out, err = run_cli(*args, *attach_args(rig))
        assert rc == 2 and "stage 2" in err and "Traceback" not in err, (args, err)
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
    cpu = stop_in(rig, "EL2&0", False)
    try:
        rc, candidates, err = run_json("find-cr3", *attach_args(rig))
        assert rc == 0, err
        roots = {int(c["cr3"], 16) for c in candidates}
        stage2 = int(cpu["el2"]["vttbr_el2"], 16) & ((1 << 48) - 1) & ~0xFFF
        assert not {stage2, stage2 + 0x1000} & roots, (hex(stage2), candidates)
        assert any("TTBR0_EL2" in c["how"] for c in candidates if c["is_current"])
        ipa = next(iter(rig.ready["markers"]))
        rc, (w,), err = run_json("who-maps", *attach_args(rig), "--gpa", hex(rig.l1_pas[ipa]))
        assert rc == 0, err
        vmm = [m for m in w["mappings"] if int(m["gva"], 16) == rig.slot_hva(ipa) & ~0xFFF]
        assert vmm and {"pid": rig.vmm_pid, "comm": "vmm"} in vmm[0]["processes"], w
    finally:
        rig.qmp("cont")


def test_ps_inside_l2_reads_l1s_kernel_and_gives_the_vcpu_to_the_vmm(rig, in_l2):
    """Stopped inside L2, L1's kernel is still read (a VHE host keeps it in TTBR1_EL2) and
    the vCPU is the VMM's (its TTBR0_EL2 holds the VMM's table), not L2's SP_EL0's."""
    rc, tasks, err = run_json("ps", *attach_args(rig))
    assert rc == 0, err
    (vmm,) = [t for t in tasks if t["pid"] == rig.vmm_pid]
    assert vmm["comm"] == "vmm" and vmm["vcpu"] == 0, vmm
    assert int(vmm["root"], 16) == int(in_l2["el2"]["ttbr0_el2"], 16) & ((1 << 48) - 2)


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
        cpu = stop_in(rig, regime, live)
        try:
            rows, err = kvm_vcpu_translate(rig)
            rc, (fault,), ferr = run_json("translate", *attach_args(rig), "--kvm-vcpu",
                                          f"{rig.vmm_pid}:0", hex(rig.ready["untouched"][0]))
            ipa, value = list(rig.ready["markers"].items())[-1]
            rrc, pieces, rerr = run_json("read", *attach_args(rig), "--kvm-vcpu",
                                         str(rig.vmm_pid), hex(ipa), "8")
        finally:
            rig.qmp("cont")
        check_kvm_vcpu_rows(rig, rows, int(cpu["el2"]["vttbr_el2"], 16))
        if live:
            assert "it runs this VM now: its VTTBR_EL2" in err and "agrees" in err, err
        assert rc == 1 and fault["fault"]["stage"] == 2, ferr
        assert fault["fault"]["reason"] == "translation"
        assert rrc == 0 and int(pieces[0]["gpa"], 16) == rig.l1_pas[ipa], rerr
        assert int.from_bytes(bytes.fromhex(pieces[0]["data"]), "little") == value
    rc, text, err = run_cli("translate", *attach_args(rig), "--kvm-vcpu", str(rig.vmm_pid),
                            hex(CODE_IPA))
    assert rc == 0 and "from KVM in the guest: VM of process" in text, err + text


def test_kvm_vcpu_as_kvm_saved_it_when_the_vmm_is_preempted(rig):
    """With a busy process beside the VMM on L1's one CPU, a stop often finds the VMM
    scheduled out: KVM has put its vCPU (kvm_vcpu.cpu = -1) and saved L2's EL1 registers in
    kvm_vcpu.arch.ctxt. Those are read then, and give the same answers."""
    spinner = rig.start_spinner()["pid"]
    try:
        for _ in range(60):
            rig.qmp("stop")
            try:
                rows, err = kvm_vcpu_translate(rig)
                rc, cpus, cerr = run_json("cpus", *attach_args(rig))
            finally:
                rig.qmp("cont")
            if "not loaded: its EL1 registers as KVM saved them" in err:
                assert rc == 0, cerr
                check_kvm_vcpu_rows(rig, rows, int(cpus[0]["el2"]["vttbr_el2"], 16))
                return
        pytest.fail("never stopped with the VMM's vCPU put (the spinner current)")
    finally:
        rig.run(f"kill {spinner}")


def test_ps_kvm_lists_the_vm_the_vmm_holds(rig):
    """ps --kvm: the VMM's VM, its stage 2 root (KVM's pgd_phys, the root VTTBR_EL2 names)
    and vCPU 0, and the command that translates as it."""
    cpu = stop_in(rig, "EL2&0", False)
    try:
        rc, vms, err = run_json("ps", "--kvm", *attach_args(rig))
        trc, text, terr = run_cli("ps", "--kvm", *attach_args(rig))
    finally:
        rig.qmp("cont")
    assert rc == 0, err
    (vm,) = vms
    assert vm["pid"] == rig.vmm_pid and vm["comm"] == "vmm" and vm["vmid"] >= 1
    vttbr = int(cpu["el2"]["vttbr_el2"], 16)
    assert int(vm["pgd_phys"], 16) == vttbr & ((1 << 48) - 2)
    assert vm["vtcr_el2"] == cpu["el2"]["vtcr_el2"]            # what KVM loads for it
    assert [c["vcpu_id"] for c in vm["vcpus"]] == [0]
    assert trc == 0 and f"translate --kvm-vcpu {rig.vmm_pid}:0 ADDR" in text, terr + text


def test_kvm_vcpu_says_what_is_wrong(rig):
    for spec, why in ((f"{rig.vmm_pid}:7", "has no KVM vCPU 7 (VM fd"),
                      ("1", "holds no KVM VM"), ("x:1", "give PID or PID:N")):
        rc, out, err = run_cli("translate", *attach_args(rig), "--kvm-vcpu", spec, "0x40001000")
        assert rc == 2 and why in err and "Traceback" not in err, (spec, err)
    rc, out, err = run_cli("translate", *attach_args(rig), "--kvm-vcpu", str(rig.vmm_pid),
                           "--cr3", "0x1000", "0x40001000")
    assert rc == 2 and "exclude each other" in err, err
