"""The AArch64 oracle guest (vm/oracle_arm64) against the Arm ARM, in every scenario.

For each scenario the guest builds known page tables, turns the MMU on and asks its own CPU how
each probe VA translates: AT S1E1R/S1E1W/S1E0R/S1E0W (and S1E1RP/S1E1WP with FEAT_PAN2), and,
for probes whose frame holds `svc #0`, an instruction fetch at EL1 and at EL0. Each answer is
checked against what vm/oracle_arm64/layout.py states by hand from the Arm ARM; where QEMU 7.2
differs, the probe's `qemu` field says what QEMU gives (a finding, with a comment there), so the
test also fails the day QEMU changes.

QEMU's debug translation (HMP `gva2gpa`, an EL1 data read with the CPU's PSTATE.PAN) must agree
with AT S1E1R (AT S1E1RP in the `pan` scenario), except that it does not check the access flag:
for an AF=0 leaf it shows the address the leaf names, where the CPU takes an Access flag fault.

Scenarios whose CPU feature QEMU lacks are skipped (the guest checks its ID registers itself).
"""

import dataclasses

import pytest

from vm.oracle_arm64 import boot, image
from vm.oracle_arm64.boot import FeatureMissing, OracleArm64VM
from vm.oracle_arm64.boot import OracleArm64Error
from vm.oracle_arm64.layout import AT_KINDS, EXEC_KINDS, KINDS, SCENARIOS, Requirement

pytestmark = pytest.mark.vm

# (no skip when QEMU is missing: scripts/setup installs qemu-system-arm; the boot says so)

@pytest.fixture(scope="module", params=list(SCENARIOS))
def vm(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"a64-{request.param}")
    try:
        vm = OracleArm64VM(request.param, str(workdir)).start()
    except FeatureMissing as e:
        pytest.skip(str(e))
    try:
        yield vm
    finally:
        vm.close()


def test_guest_ran_at_el1_with_the_scenario_registers(vm):
    s, h = vm.scenario, vm.header
    assert h["currentel"] == 1 << 2, "the guest must run at EL1"
    assert h["sctlr_el1"] & s.sctlr == s.sctlr, f"SCTLR_EL1 {h['sctlr_el1']:#x}"
    assert h["tcr_el1"] == s.tcr
    assert h["mair_el1"] == s.mair
    built = image.build_tables(s)
    assert (h["ttbr0_el1"], h["ttbr1_el1"]) == (built.ttbr0, built.ttbr1)
    assert h["pan"] == (1 << 22 if s.pan else 0)
    assert h["nprobes"] == len(vm.probes)
    assert vm.boot_seconds < 5, f"{vm.name} took {vm.boot_seconds:.2f}s to finish its probes"


def test_every_probe_has_every_kind(vm):
    got = {(r.name, r.short) for r in vm.results}
    want = set()
    for p in vm.probes:
        kinds = [k for k in AT_KINDS if k not in ("RP", "WP") or vm.pan2]
        kinds += list(EXEC_KINDS) if p.exec else []
        want |= {(p.name, k) for k in kinds}
    assert got == want


def test_at_answers_match_the_arm_arm(vm):
    """Every answer of the CPU equals the hand-written expectation (QEMU's, where a finding
    says QEMU differs from the Arm ARM)."""
    pan = bool(vm.scenario.pan)
    bad = []
    for r in vm.results:
        p = vm.probe(r.name)
        want = p.qemu_expected(r.short, pan)
        if r.outcome != want:
            bad.append(f"{r.name} {r.va:#x} {r.kind}: CPU {r.outcome} (raw {r.raw:#x}), "
                       f"expected {want} (Arm ARM: {p.expected(r.short, pan)})")
            continue
        if not r.ok or r.pa is None:          # fetch probes report no address
            continue
        for field, got in (("pa", r.pa), ("attr", r.attr), ("sh", r.sh)):
            exp = p.qemu_field(field)
            if exp is not None and got != exp:
                bad.append(f"{r.name} {r.va:#x} {r.kind}: {field} {got:#x}, expected {exp:#x}")
    assert not bad, f"{vm.name}:\n" + "\n".join(bad)


def test_fault_records_are_well_formed(vm):
    for r in vm.results:
        if r.ok:
            assert r.fst is None and r.fault_kind is None
            if r.short in AT_KINDS:
                assert r.raw & 1 == 0 and r.raw >> 11 & 1 == 1      # F=0; bit 11 is RES1
        else:
            assert r.fault_kind in ("translation", "address-size", "access-flag", "permission")
            if r.short in AT_KINDS:
                assert r.raw & 1 and not r.ptw and not r.s          # stage 1, no stage 2
            else:
                assert r.raw >> 26 == (boot.EC_IABT_CUR if r.short == "X" else boot.EC_IABT_LOWER)


def test_findings_are_still_findings(vm):
    """Each `qemu` override names something QEMU 7.2 really does differently from the Arm ARM:
    an override equal to the Arm ARM's answer would hide nothing and must go."""
    pan = bool(vm.scenario.pan)
    for p in vm.probes:
        for key, value in p.qemu.items():
            if key in KINDS:
                assert value != p.expected(key, pan), (p.name, key)
            else:
                assert value != getattr(p, key), (p.name, key)


def test_gva2gpa_agrees_with_at_s1e1r(vm):
    pan = bool(vm.scenario.pan)
    bad = []
    for p in vm.probes:
        at = vm.result(p.name, "RP" if pan and vm.pan2 else "R")
        if at.ok:
            want = at.pa
        elif at.fault_kind == "access-flag":
            want = p.pa                  # QEMU's debug walk does not check AF
        else:
            want = None
        got = vm.gva2gpa(p.va)
        if got != want:
            bad.append(f"{p.name} {p.va:#x}: gva2gpa {got if got is None else hex(got)}, "
                       f"AT {at.kind} {at.outcome}, expected {want if want is None else hex(want)}")
    assert not bad, f"{vm.name}:\n" + "\n".join(bad)


@pytest.mark.parametrize("vm", ["pan"], indirect=True)
def test_pan_follows_pstate_pan_in_gva2gpa(vm):
    """In the `pan` scenario QEMU's gva2gpa refuses EL0-accessible pages (PSTATE.PAN=1 at the
    end), where AT S1E1R (which ignores PAN) translates them."""
    for name in ("ap01", "ap11"):
        p = vm.probe(name)
        assert vm.result(name, "R").ok and not vm.result(name, "RP").ok
        assert vm.gva2gpa(p.va) is None


def test_read_phys_sees_the_tables(vm):
    """The tables are where the builder put them (xp through QMP, read-only)."""
    built = image.build_tables(vm.scenario)
    root = built.ttbr0 & ((1 << 48) - 1) & ~0x3F
    assert vm.read_phys(root, 64) == built.tables[root][:64]


def test_qemu_left_free(vm):
    """The second QMP socket and the gdbstub are there for the tool under test."""
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(vm.qmp_path)
        assert b"QMP" in s.recv(4096)
    host, port = vm.gdb_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        pass
    assert vm.pid and vm.pid == vm.proc.pid


# ---------------------------------------------------------------------------------------------
# The guest's two other endings

def test_missing_feature_is_reported_not_hung(tmp_path):
    """A requirement the CPU fails: the guest stops with SKIP before it touches the MMU and the
    helper raises FeatureMissing naming the field (and leaves no QEMU behind)."""
    s = dataclasses.replace(SCENARIOS["4k-39"], name="needs-no-tgran64", requires=(
        Requirement("id_aa64mmfr0_el1", 24, "eq", 0xF, "TGran64=0b1111 (no 64 KiB granule)"),))
    vm = OracleArm64VM(s, str(tmp_path))
    with pytest.raises(FeatureMissing, match=r"TGran64=0b1111.*\[27:24\] = 0x0"):
        vm.start()
    assert vm.proc is None


def test_unexpected_exception_is_reported_with_esr(tmp_path):
    """An exception outside a fetch probe: the vector records ESR/FAR/ELR and the helper raises
    with them. The image is 4k-39's with `svc #0` in place of the probe loop's first
    instruction (`add x21, x28, #0x100`)."""
    img = image.build(SCENARIOS["4k-39"])
    n = next(i for i, insn in enumerate(img.program) if insn.text == "add x21, x28, #0x100")
    data = bytearray(img.data)
    data[4 * n:4 * n + 4] = image.A.SVC0.word.to_bytes(4, "little")
    elf = str(tmp_path / "broken.elf")
    image.write_elf(elf, image.BASE, image.BASE, bytes(data))
    vm = OracleArm64VM("4k-39", str(tmp_path), elf=elf)
    with pytest.raises(OracleArm64Error,
                       match=f"ESR=0x56000000 \\(EC 0x15\\).*ELR={image.BASE + 4 * n + 4:#x}"):
        vm.start()
    assert vm.proc is None
