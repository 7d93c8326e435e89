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


def test_the_register_names_a_stub_must_have():
    have = {"satp", "priv", "mstatus"}
    assert riscv.names_in(have.__contains__) == {n: n for n in have}
    assert "satp" not in riscv.names_in({"priv"}.__contains__)


def test_commands_that_read_other_structures_say_so():
    import pytest
    from qintrospect.errors import UsageError
    state = RiscvVcpu(0, None, None, satp=SV39, priv=1, mstatus=0).state
    with pytest.raises(UsageError, match="this guest is riscv64"):
        paging.require(state, "find-cr3", "x86_64", "aarch64")
    paging.require(state, "translate", "x86_64", "riscv64")
