"""qintrospect's riscv64 walker held to the hart's own answers on the oracle guest
(vm/oracle_riscv): for every probe of every scenario, what each access would do (loads and
stores as S and U through MPRV, fetches in S and U, with SUM and MXR as the kind says) as
translate reports it through the real attach path (QMP + the gdbstub's CSRs + QOM's extension
flags + guest memory), against the spec's answer written by hand in the scenario and against
the hart wherever QEMU follows the spec (the scenario's `qemu` findings are where it does not:
there the walk gives the spec's answer and says what QEMU does)."""

import pytest

import qintrospect
from qintrospect import paging
from qintrospect.paging.riscv_format import MSTATUS_MXR, MSTATUS_SUM
from qintrospect.record import replace
from vm.oracle_riscv.boot import FeatureMissing, OracleRiscvVM
from vm.oracle_riscv.layout import KINDS
from vm.oracle_riscv.scenarios import SCENARIOS

pytestmark = pytest.mark.vm

ACCESS = {"load": "read", "store": "write", "fetch": "execute"}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def oracle(request, tmp_path_factory):
    try:
        vm = OracleRiscvVM(request.param, str(tmp_path_factory.mktemp(request.param))).start()
    except FeatureMissing as e:
        pytest.fail(f"QEMU 7.2 runs every scenario: {e}")
    try:
        with qintrospect.attach(qmp=vm.qmp_path, gdb=vm.gdb_address) as session:
            yield vm, session
    finally:
        vm.close()


def outcome(walk, kind: str) -> str:
    k = KINDS[kind]
    result = walk.access[f"{k.mode.lower()}-{ACCESS[k.access]}"]
    if result.allowed:
        return "ok"
    assert result.error_code == k.page_fault, (kind, result)
    return "page-fault"


def test_the_registers_come_from_the_gdbstub_and_qom(oracle):
    vm, session = oracle
    cpu = session.cpu
    assert cpu.satp == vm.header["satp"] and cpu.priv == 1      # parked in S-mode
    assert cpu.menvcfg == vm.header["menvcfg"]
    cpu_option = vm.scenario.cpu
    assert cpu.svnapot is ("svnapot=on" in cpu_option)
    assert cpu.svpbmt is ("svpbmt=on" in cpu_option)


def test_every_access_matches_the_spec_and_the_hart(oracle):
    vm, session = oracle
    bad, compared = [], 0
    for p in vm.probes:
        walks = {}
        for kind in vm.scenario.kinds:
            k = KINDS[kind]
            if k.access == "fetch" and not p.exec:
                continue
            bits = (MSTATUS_SUM if k.sum else 0) | (MSTATUS_MXR if k.mxr else 0)
            if bits not in walks:
                state = replace(session.cpu,
                                mstatus=session.cpu.mstatus & ~(MSTATUS_SUM | MSTATUS_MXR) | bits)
                walks[bits] = paging.walk(session.memory.read, state, p.va)
            walk = walks[bits]
            ours, spec = outcome(walk, kind), p.expected(kind)
            hart = vm.result(p.name, kind)
            compared += 1
            if ours != spec:
                bad.append(f"{p.name} {p.va:#x} {kind}: walk {ours}, spec {spec}, hart "
                           f"{hart.outcome}")
            elif p.qemu_expected(kind) == spec and hart.outcome != ours:
                bad.append(f"{p.name} {p.va:#x} {kind}: walk {ours}, hart {hart.outcome} (no "
                           f"finding recorded)")
            if ours == "ok" and hart.ok and hart.pa is not None and "pa" not in p.qemu:
                if walk.pa != hart.pa:
                    bad.append(f"{p.name} {p.va:#x} {kind}: walk pa {walk.pa:#x}, hart "
                               f"{hart.pa:#x}")
    assert compared and not bad, f"{vm.name}:\n" + "\n".join(bad)


def test_translate_says_the_leaf_and_the_faults(oracle):
    """translate (the session's full path) agrees with the plain walk, and every denied access
    carries the scause a hart would report."""
    vm, session = oracle
    for p in vm.probes:
        t = session.translate(p.va)
        plain = paging.walk(session.memory.read, session.cpu, p.va)
        assert (t.walk.pa, t.walk.page_size, t.walk.fault) == \
            (plain.pa, plain.page_size, plain.fault), p.name
        for kind, result in t.walk.access.items():
            if not result.allowed:
                op = kind.split("-")[1]
                assert result.error_code == {"read": 13, "write": 15, "execute": 12}[op]


def test_vmmap_lists_what_translates(oracle):
    """Every leaf the whole-space listing gives is what the one-address walk gives there."""
    vm, session = oracle
    leaves = list(paging.iter_mappings(session.memory.read, session.cpu))
    assert leaves
    assert [(m.va, m.pa, m.size) for m in session.mappings()] == \
        [(m.va, m.pa, m.size) for m in leaves]
    for m in leaves:
        w = session.translate(m.va).walk
        if w.fault is None:
            assert w.pa == m.pa, hex(m.va)
