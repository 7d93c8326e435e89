"""What attaching to an aarch64 guest decides from QEMU's answers, as pure logic: the target
from query-cpus-fast (a hostile or unknown one refused by name), and an aarch64 vCPU's
registers decoded (mode, EL, ASID, the root a RAM proof reads), with the registers Debian's
arm64 kernel really has (read from the bundled aarch64 guest at EL0)."""

import pytest

from qintrospect import paging
from qintrospect.errors import AttachError, UsageError
from qintrospect.machine.arm64 import Arm64Vcpu
from qintrospect.machine.vcpus import target_of

LINUX = dict(ttbr0=0x48069001, ttbr1=0x004200004158F001, tcr=0x015001F5B5503510,
             sctlr=0x02000018FC74791D, mair=0x000000040044FFFF, cpsr=0x80000000,
             id_aa64mmfr0=0x32310201126, id_aa64mmfr1=0x11010211122,
             id_aa64mmfr2=0x1021011010011011)


@pytest.mark.parametrize("listing, arch", [
    ([{"cpu-index": 0, "target": "x86_64"}], "x86_64"),
    ([{"cpu-index": 0, "target": "i386"}], "x86_64"),
    ([{"cpu-index": 0, "target": "aarch64"}, {"cpu-index": 1, "target": "aarch64"}],
     "aarch64"),
    ([{"cpu-index": 0, "target": "riscv64"}], "riscv64"),
    ([{"cpu-index": 0}], "x86_64"),             # before QEMU named targets
    ([], "x86_64"), ("not a list", "x86_64"), ([["odd"]], "x86_64"),
])
def test_the_target_picks_the_walker(listing, arch):
    assert target_of(listing) == arch


@pytest.mark.parametrize("target", ["riscv32", "arm", "\x1b]0;owned\x07", 5])
def test_another_target_is_refused_by_name(target):
    with pytest.raises(AttachError, match="reads x86, aarch64 and riscv64 guests") as e:
        target_of([{"target": target}])
    assert "\x1b" not in str(e.value)


def test_linux_registers_decode():
    v = Arm64Vcpu(0, 123, "/machine/cpu", **LINUX)
    assert v.mode == "aarch64-4k-48"
    assert v.cpl == 0                            # the spinner, at EL0
    assert v.pcid == 0x42                        # TCR_EL1.A1=1: the ASID is TTBR1's
    assert v.root == 0x4158F000                  # the kernel's table (TTBR1), CnP dropped
    d = v.to_dict()
    assert d["cr3"] == "0x48069001" and d["root"] == "0x48069000"
    assert d["sctlr_bits"] == ["M", "C", "I"] and d["pan"] is False
    state = v.state
    assert paging.root_register(state, 0x400000) == LINUX["ttbr0"]
    assert paging.root_register(state, 0xFFFF000000210000) == LINUX["ttbr1"]
    assert paging.with_root(state, 0x1000).ttbr0 == 0x1000
    assert paging.with_root(state, 0x1000).ttbr1 == LINUX["ttbr1"]


def test_mmu_off_and_x86_only_commands():
    off = Arm64Vcpu(0, None, None, **dict(LINUX, sctlr=0))
    assert off.mode == "MMU off"
    with pytest.raises(UsageError, match="aarch64"):
        paging.require_x86(off.state, "find-cr3")
    paging.require_x86(paging.CpuState(0x80000011, 0x1000, 0x20, 0x500), "find-cr3")
