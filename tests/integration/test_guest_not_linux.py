"""Issue 22: a guest that is not Linux. The oracle (vm/oracle: a freestanding guest that builds
page tables and halts) has no vmcoreinfo note: `ps` and `--guest-pid` say so, exit 3, and
never guess; the VM is left as found."""

import shutil

import pytest

from vm.oracle import boot
from vm.oracle.boot import OracleVM

from .conftest import run_cli

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    assert shutil.which(boot.QEMU), f"{boot.QEMU} is not installed; run scripts/setup"
    elf = boot.build()
    with OracleVM("4level", str(tmp_path_factory.mktemp("not-linux")), cpu="qemu64",
                  elf=elf) as v:
        v.wait_halted()
        yield v


def test_ps_on_a_guest_that_is_not_linux_says_so(oracle):
    attach = ["--qmp", oracle.qmp_path, "--gdb", oracle.gdb_address]
    rc, out, err = run_cli("ps", *attach)
    assert rc == 3, (out, err)
    assert "no vmcoreinfo note of the running kernel" in err and "not running Linux" in err
    assert "--cr3" in err and "Traceback" not in err
    rc, out, err = run_cli("translate", *attach, "--guest-pid", "1", "0x1000")
    assert rc == 3 and "not running Linux" in err, (out, err)
    mapped = oracle.gva2gpa(oracle.info_tlb()[0].va)   # a GPA it maps: who-maps names users
    rc, out, err = run_cli("who-maps", *attach, "--gpa", hex(mapped), "--json")
    assert rc == 0 and "processes not named" in out, (out, err)
