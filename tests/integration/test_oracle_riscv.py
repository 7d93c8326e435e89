"""The RISC-V oracle guest (vm/oracle_riscv) against the privileged spec, in every scenario.

For each scenario the guest builds known Sv39/Sv48/Sv57 tables, writes satp and asks its own
hart how each probe VA translates: loads and stores from M-mode with mstatus.MPRV=1 and MPP=S
or U (SUM/MXR as the kind says), and fetches by `mret` to the VA in S or U (the frame holds
`ecall`). Each answer is checked against what vm/oracle_riscv/scenarios.py states by hand from
the spec (v1.12 + Svnapot + Svpbmt); where QEMU 7.2 differs, the probe's `qemu` field says
what QEMU gives (a finding, with a comment there), so the test also fails the day QEMU changes.

QEMU's debug translation (HMP `gva2gpa`, after DONE with the hart parked in S-mode) translates
like an S-mode load with SUM=1 (MXR as mstatus says: 0): every page a load from S or U could
read. It is not read-only: QEMU 7.2 sets A in the leaf it walks.
"""

import dataclasses
import shutil
import socket
import subprocess

import pytest

from vm.oracle_arm64.elf import EM_RISCV
from vm.oracle_riscv import image
from vm.oracle_riscv.boot import FeatureMissing, OracleRiscvError, OracleRiscvVM
from vm.oracle_riscv.layout import (ECALL_VA, FRAMES, FRAMES_SIZE, KINDS, PTE_A, PTE_D,
                                    STORE_LOAD)
from vm.oracle_riscv.scenarios import SCENARIOS

pytestmark = pytest.mark.vm

# (no skip when QEMU is missing: qemu-system-misc provides qemu-system-riscv64; the boot says so)


@pytest.fixture(scope="module", params=list(SCENARIOS))
def vm(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"rv-{request.param}")
    try:
        vm = OracleRiscvVM(request.param, str(workdir)).start()
    except FeatureMissing as e:
        pytest.skip(str(e))
    try:
        yield vm
    finally:
        vm.close()


def test_guest_ran_with_the_scenario_registers(vm):
    s, h = vm.scenario, vm.header
    assert h["satp"] == vm.image.built.satp and h["menvcfg"] == s.menvcfg
    assert h["misa"] >> 62 == 2 and h["misa"] & (1 << 18 | 1 << 20) == 1 << 18 | 1 << 20  # S, U
    assert h["mhartid"] == h["a0"] == 0
    assert 0x80000000 <= h["a1"] < 0xC0000000, "a1: the FDT, in RAM"
    assert h["pmpcfg0"] & 0xFF == 0x1F and h["mtvec"] == image.BASE + 0x10
    assert h["nprobes"] == len(vm.probes)
    assert vm.boot_seconds < 5, f"{vm.name} took {vm.boot_seconds:.2f}s to finish its probes"


def test_every_probe_has_every_kind(vm):
    got = {(r.name, r.kind) for r in vm.results}
    want = {(p.name, k) for p in vm.probes for k in vm.scenario.kinds
            if p.exec or KINDS[k].access != "fetch"}
    assert got == want
    assert not [r for r in vm.results if r.outcome == "not-run"]


def test_answers_match_the_spec(vm):
    """Every answer of the hart equals the hand-written expectation (QEMU's, where a finding
    says QEMU differs from the spec), and every load that worked read the word at the expected
    PA (FRAMES words name their own address)."""
    bad = []
    for r in vm.results:
        p = vm.probe(r.name)
        want = p.qemu_expected(r.kind)
        if r.outcome != want:
            bad.append(f"{r.name} {r.va:#x} {r.kind}: hart {r.outcome} (mcause/value "
                       f"{r.raw[0]:#x}, {r.raw[1]:#x}), expected {want} (spec: "
                       f"{p.expected(r.kind)})")
        elif r.ok and r.access == "load":
            pa = p.qemu_pa()
            if FRAMES <= pa < FRAMES + FRAMES_SIZE and r.pa != pa:
                bad.append(f"{r.name} {r.kind}: read PA {r.pa and hex(r.pa)}, expected {pa:#x}")
            elif r.value != vm.image.word(pa):
                bad.append(f"{r.name} {r.kind}: read {r.value:#x}, expected the word at {pa:#x}")
    assert not bad, f"{vm.name}:\n" + "\n".join(bad)


def test_traps_are_well_formed(vm):
    """A fault reports the VA in mtval; a working fetch is the frame's ecall (mtval 0)."""
    for r in vm.results:
        if r.outcome == "page-fault":
            assert r.tval == r.va, r
        elif r.ok and r.access == "fetch":
            assert r.cause == (9 if r.mode == "S" else 8) and r.tval == 0, r


def test_stores_write_back_what_their_load_read(vm):
    """No store changed memory: each wrote its load's value (a store that works where its
    load faulted would write image.MARKER: a finding, none so far)."""
    for r in vm.results:
        if r.access == "store" and r.ok:
            load = vm.result(r.name, STORE_LOAD[r.kind])
            assert load.ok and r.value == load.value != image.MARKER, (r, load)
            pa = vm.probe(r.name).qemu_pa()
            assert vm.read_phys(pa, 8) == vm.image.word(pa).to_bytes(8, "little"), r


def test_findings_are_still_findings(vm):
    """Each `qemu` override names something QEMU 7.2 really does differently from the spec."""
    for p in vm.probes:
        for key, value in p.qemu.items():
            assert value != (p.expected(key) if key in KINDS else p.pa), (p.name, key)


def test_accessed_and_dirty_follow_the_accesses_that_worked(vm):
    """QEMU sets A and D in hardware (the second scheme of v1.12 4.3.1): after the probes a
    leaf has A if any access through it worked, D if a store did, and nothing else changed."""
    groups = {}
    for p in vm.probes:
        c = vm.pte(p.name)
        assert c.before == vm.image.word(c.address) if c.address else c.before == 0
        if c.address:
            groups.setdefault(c.address, []).append(p.name)
    for addr, names in groups.items():
        rs = [r for r in vm.results if r.name in names]
        c = vm.pte(names[0])
        want = c.before | (PTE_A if any(r.ok for r in rs) else 0) | (
            PTE_D if any(r.ok and r.access == "store" for r in rs) else 0)
        assert c.after == want, f"{names} @{addr:#x}: {c.before:#x} -> {c.after:#x}"
    for p in vm.probes:
        if p.ad is not None:
            assert vm.pte(p.name).ad == p.ad, p.name


def test_gva2gpa_translates_like_an_s_mode_load_with_sum(vm):
    """HMP gva2gpa walks as a load at the hart's privilege (S after DONE) with SUM forced on:
    a VA translates if an S-mode (R) or U-mode (r) load of it worked. Run after the PTE checks
    of each scenario: it sets A bits (below)."""
    bad = []
    for p in vm.probes:
        loads = [vm.result(p.name, k) for k in ("R", "r")]
        want = p.qemu_pa() if any(r.ok for r in loads) else None
        got = vm.gva2gpa(p.va)
        if "R+sum" in vm.scenario.kinds:
            assert (got is not None) == vm.result(p.name, "R+sum").ok, p.name
        if got != want:
            bad.append(f"{p.name} {p.va:#x}: gva2gpa {got and hex(got)}, expected "
                       f"{want and hex(want)} (R {loads[0].outcome}, r {loads[1].outcome})")
    assert not bad, f"{vm.name}:\n" + "\n".join(bad)


@pytest.mark.parametrize("vm", ["sv39"], indirect=True)
def test_gva2gpa_sets_the_accessed_bit(vm):
    """QEMU 7.2's debug walk updates the guest's PTE: gva2gpa of a never-touched A=0 D=0 page
    sets A (not D)."""
    va = vm.scenario.unprobed[0]
    addr = vm.image.built.pte_address(va)
    vm.forget()
    before = int.from_bytes(vm.read_phys(addr, 8), "little")
    assert before & (PTE_A | PTE_D) == 0
    assert vm.gva2gpa(va) == vm.image.built.walk(va)[-1][2] >> 10 << 12
    vm.forget()
    assert int.from_bytes(vm.read_phys(addr, 8), "little") == before | PTE_A


@pytest.mark.parametrize("vm", ["sv39"], indirect=True)
def test_info_mem_lists_leaves_without_checking_them(vm):
    """HMP `info mem` dumps the leaves as it finds them: reserved encodings (W without R),
    reserved bits in the PA, misaligned superpages and leaves under pointers with U/A/D are
    listed, though the hart faults on every one."""
    rows = {va: (pa, size, attrs) for va, pa, size, attrs in vm.info_mem()}
    assert rows[0x80000000] == (0x80000000, 0x10000, "r-x--ad")         # the identity code
    assert rows[0x40005000][2] == "-w---ad"                              # s-w: reserved
    assert rows[0x40014000][0] == 0x0100000080114000                     # bit 54 in the PA
    assert rows[0x40600000] == (0x80101000, 0x200000, "rw---ad")         # misaligned 2 MiB
    assert 0x40800000 in rows                                            # pointer with U
    assert 0x40018000 not in rows and 0x40017000 not in rows             # pointer, V=0


def test_hart_parked_in_s_mode_with_the_tables_on(vm):
    """After DONE the hart loops on `wfi` in S-mode (it stored DONE through the identity map):
    QEMU's debug walks translate (in M-mode they would not)."""
    regs = vm.registers()
    assert regs["satp"] == vm.header["satp"]
    assert image.BASE < regs["pc"] < image.BASE + 0x100
    assert vm.gva2gpa(ECALL_VA) == ECALL_VA
    assert vm.gva2gpa(vm.probes[0].va) == (vm.probes[0].qemu_pa() if any(
        r.ok for r in vm.results if r.name == vm.probes[0].name and r.access == "load") else None)


@pytest.mark.skipif(shutil.which("gdb-multiarch") is None, reason="gdb-multiarch not installed")
@pytest.mark.parametrize("vm", ["sv48"], indirect=True)
def test_a_debugger_sees_priv_s_and_the_scenario_satp(vm):
    out = subprocess.run(
        ["gdb-multiarch", "-nx", "-batch", "-ex", "set architecture riscv:rv64",
         "-ex", f"target remote {vm.gdb_address}", "-ex", "p $priv", "-ex", "p/x $satp",
         "-ex", "x/gx 0x40000000", "-ex", "detach"],
        capture_output=True, text=True, timeout=60)
    assert "$1 = 1\n" in out.stdout, out.stdout + out.stderr                 # S
    assert f"$2 = {vm.header['satp']:#x}" in out.stdout
    assert "0x40000000:\t0x8010000000000073" in out.stdout                 # through the tables


def test_read_phys_sees_the_tables(vm):
    root = vm.image.built.root.pa
    assert vm.read_phys(root, 64) == vm.image.built.tables[root][:64]


def test_qemu_left_free(vm):
    """The second QMP socket and the gdbstub are there for the tool under test."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(vm.qmp_path)
        assert b"QMP" in s.recv(4096)
    host, port = vm.gdb_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        pass
    assert vm.pid and vm.pid == vm.proc.pid


# ---------------------------------------------------------------------------------------------
# The guest's other endings

def test_refused_cpu_property_is_feature_missing(tmp_path):
    vm = OracleRiscvVM("napot", str(tmp_path), cpu="rv64,svnosuch=on")
    with pytest.raises(FeatureMissing, match="refuses -cpu rv64,svnosuch=on"):
        vm.start()
    assert vm.proc is None


def test_dropped_menvcfg_is_feature_missing(tmp_path):
    """A value the hart does not take (menvcfg bit 40 is WPRI): the guest stops with SKIP
    before it writes satp."""
    s = dataclasses.replace(SCENARIOS["pbmt"], name="menvcfg-bit-40", menvcfg=1 << 40)
    vm = OracleRiscvVM(s, str(tmp_path))
    with pytest.raises(FeatureMissing, match=r"menvcfg = 0x10000000000 \(reads back 0x0\)"):
        vm.start()
    assert vm.proc is None


def test_unexpected_trap_is_reported_with_mcause(tmp_path):
    """A trap outside an access in flight: the handler records mcause/mepc/mtval. The image is
    sv48's with `ecall` (from M: mcause 11) in place of the probe loop's first load."""
    img = image.build(SCENARIOS["sv48"])
    n = next(i for i, insn in enumerate(img.program) if insn.text == "ld s5, 0(s0)")
    data = bytearray(img.data)
    data[4 * n:4 * n + 4] = image.A.ECALL.word.to_bytes(4, "little")
    elf = str(tmp_path / "broken.elf")
    image.write_elf(elf, image.BASE, image.BASE, bytes(data), EM_RISCV)
    vm = OracleRiscvVM("sv48", str(tmp_path), elf=elf)
    with pytest.raises(OracleRiscvError,
                       match=f"probe 0 slot 0: mcause=0xb mepc={image.BASE + 4 * n:#x}"):
        vm.start()
    assert vm.proc is None
