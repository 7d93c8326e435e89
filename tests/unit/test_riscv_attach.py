"""A riscv64 vCPU as the gdbstub and QOM give it: the decode of satp, priv and mstatus, and
the state the walker takes from it."""

from qintrospect import paging
from qintrospect.machine import riscv
from qintrospect.machine.riscv import RiscvVcpu

SV39 = 8 << 60 | 0x5 << 44 | 0x80200


def test_the_registers_decode():
    v = RiscvVcpu(0, 11, "/machine/cpu", satp=SV39, priv=1, mstatus=1 << 18 | 0xa00000000,
                  menvcfg=1 << 62, svnapot=True, svpbmt=False)
    assert (v.mode, v.cpl, v.pcid, v.root, v.cr3) == ("sv39", 1, 5, 0x80200000, SV39)
    d = v.to_dict()
    assert d["privilege"] == "S" and d["mstatus_bits"] == ["SUM"]
    assert d["satp"] == d["cr3"] == hex(SV39) and d["root"] == "0x80200000"
    state = v.state
    assert paging.arch_of(state) == "riscv64" and state.svnapot and state.svpbmt is False
    assert paging.process_root(state) == 0x80200000


def test_bare_and_machine_mode():
    v = RiscvVcpu(0, None, None, satp=0, priv=3, mstatus=0)
    assert v.mode == "bare" and v.to_dict()["privilege"] == "M"


class FakeStub:
    """A gdbstub that has some registers (pure logic: what the attach asks of it)."""

    def __init__(self, values):
        self.values = values

    def has_register(self, name):
        return name in self.values

    def select_vcpu(self, i):
        pass

    def registers(self, names):
        return {n: self.values[n] for n in names}


def test_the_registers_come_by_name_and_missing_ones_are_named():
    import pytest
    from qintrospect.errors import AttachError
    from qintrospect.machine.vcpus import Vcpus

    class Monitor:
        def command(self, name, **args):
            return {"svnapot": True, "svpbmt": "odd"}[args["property"]]

    listing = [{"cpu-index": 0, "target": "riscv64", "thread-id": 7, "qom-path": "/cpu0"}]
    vcpus = Vcpus(Monitor(), listing)
    (v,) = vcpus.from_gdbstub(FakeStub({"satp": SV39, "priv": 1, "mstatus": 0}), 0)
    assert (v.satp, v.priv, v.menvcfg, v.thread_id) == (SV39, 1, None, 7)
    assert v.svnapot is True and v.svpbmt is None          # not a bool: unknown
    with pytest.raises(AttachError, match="does not expose satp.*riscv64"):
        vcpus.from_gdbstub(FakeStub({"priv": 1, "mstatus": 0}), 0)


def test_commands_that_read_other_structures_say_so():
    import pytest
    from qintrospect.errors import UsageError
    state = RiscvVcpu(0, None, None, satp=SV39, priv=1, mstatus=0).state
    with pytest.raises(UsageError, match="this guest is riscv64"):
        paging.require(state, "find-cr3", "x86_64", "aarch64")
    paging.require(state, "translate", "x86_64", "riscv64")
