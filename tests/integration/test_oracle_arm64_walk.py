"""qintrospect's aarch64 walker held to the CPU's own answers on the oracle guest
(vm/oracle_arm64): for every probe of every scenario, what each access would do (AT S1E1R/W,
S1E0R/W, S1E1RP/WP, and instruction fetches at EL1 and EL0) as translate reports it through the
real attach path (QMP + the gdbstub's system registers + guest memory), against the Arm ARM's
answer written by hand in the scenario and against QEMU's CPU wherever QEMU follows the Arm ARM
(the scenario's `qemu` findings are where it does not: there the walk gives the Arm ARM's answer
and says what QEMU does)."""

import pytest

import qintrospect
from qintrospect import paging
from qintrospect.record import replace
from vm.oracle_arm64.boot import OracleArm64VM, decode_fault
from vm.oracle_arm64.layout import AT_KINDS, EXEC_KINDS, SCENARIOS

pytestmark = pytest.mark.vm

PAN = 1 << 22
# the oracle's short kinds -> the walk's access kinds (RP/WP: an EL1 access that honours PAN)
ACCESS = {"R": "el1-read", "W": "el1-write", "r": "el0-read", "w": "el0-write",
          "RP": "el1-read", "WP": "el1-write", "X": "el1-execute", "x": "el0-execute"}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def oracle(request, tmp_path_factory):
    with OracleArm64VM(request.param, str(tmp_path_factory.mktemp(request.param))) as vm:
        with qintrospect.attach(qmp=vm.qmp_path, gdb=vm.gdb_address) as session:
            yield vm, session


def outcome(walk, kind: str) -> str:
    result = walk.access[kind]
    if result.allowed:
        return "ok"
    fault_kind, level = decode_fault(result.error_code)
    return f"{fault_kind}@{level}"


def test_the_registers_come_from_the_gdbstub(oracle):
    vm, session = oracle
    h = vm.header
    cpu = session.cpu
    assert (cpu.ttbr0, cpu.ttbr1, cpu.tcr, cpu.mair) == \
        (h["ttbr0_el1"], h["ttbr1_el1"], h["tcr_el1"], h["mair_el1"])
    assert cpu.cpsr >> 2 & 3 == 1 and bool(cpu.cpsr & PAN) == bool(vm.scenario.pan)
    assert cpu.id_aa64mmfr0 == h["id_aa64mmfr0_el1"]


def test_every_access_matches_the_arm_arm_and_the_cpu(oracle):
    vm, session = oracle
    pan = bool(vm.scenario.pan)
    # AT S1E1R/W ignore PSTATE.PAN; S1E1RP/WP (and gva2gpa) use it
    without_pan = replace(session.cpu, cpsr=session.cpu.cpsr & ~PAN)
    bad, compared = [], 0
    for p in vm.probes:
        t = session.translate(p.va)
        plain = paging.walk(session.memory.read, without_pan, p.va)
        kinds = [k for k in AT_KINDS if k not in ("RP", "WP") or vm.pan2]
        kinds += list(EXEC_KINDS) if p.exec else []
        for k in kinds:
            walk = plain if k in ("R", "W") else t.walk
            ours = outcome(walk, ACCESS[k])
            arm = p.expected(k, pan)
            cpu = vm.result(p.name, k)
            compared += 1
            if ours != arm:
                bad.append(f"{p.name} {p.va:#x} {k}: walk {ours}, Arm ARM {arm}, CPU "
                           f"{cpu.outcome}")
            elif p.qemu_expected(k, pan) == arm and cpu.outcome != ours:
                bad.append(f"{p.name} {p.va:#x} {k}: walk {ours}, CPU {cpu.outcome} (no "
                           f"finding recorded)")
            if ours == "ok" and cpu.ok and cpu.pa is not None and "pa" not in p.qemu:
                if walk.pa != cpu.pa:
                    bad.append(f"{p.name} {p.va:#x} {k}: walk pa {walk.pa:#x}, "
                               f"CPU {cpu.pa:#x}")
    assert compared and not bad, f"{vm.name}:\n" + "\n".join(bad)


def test_translate_names_the_memory_attributes_the_cpu_reports(oracle):
    """PAR_EL1.ATTR is the MAIR byte the leaf's AttrIndx selects: the walk's leaf names it."""
    vm, session = oracle
    for p in vm.probes:
        at = vm.result(p.name, "R")
        t = session.translate(p.va)
        if not (at.ok and t.ok) or "attr" in p.qemu:
            continue
        index = t.walk.levels[-1].entry >> 2 & 7
        assert session.cpu.mair >> (8 * index) & 0xFF == at.attr, p.name
        assert any(f.startswith(f"Attr{index}=") for f in t.walk.levels[-1].flags), \
            t.walk.levels[-1].flags


def test_vmmap_lists_what_translates(oracle):
    """Every leaf the whole-space listing gives is what the one-address walk gives there."""
    vm, session = oracle
    leaves = list(paging.iter_mappings(session.memory.read, session.cpu))
    assert leaves
    for m in leaves[:: max(1, len(leaves) // 64)]:
        w = session.translate(m.va).walk
        if w.fault is None:
            assert (w.pa, w.page_size) == (m.pa, m.size), hex(m.va)
        else:                       # listed leaves include AF=0 ones, which fault
            assert w.fault.reason == "access-flag", (hex(m.va), w.fault)
