"""A VM's owner acting behind qintrospect's back, on a real QEMU: resumed while a shell or a
one-shot command is attached, paused again, a gdb of their own on the gdbstub. Each ends with
the VM as its owner left it (runguard's rules: only qintrospect's own pause is undone, `stop`
is never sent on leaving), and a read spoiled by a resume says so (exit 3).

The guest has a second QMP monitor, the owner's: free while qintrospect holds the first. Its
gdbstub is on a Unix socket, where the old peer lookup connected."""

import json
import os
import subprocess
import sys
import time

import pytest

from qintrospect.errors import VMGoneError
from tests.integration.conftest import REPO, booted
from tests.integration.test_shell import Piped
from tests.integration.test_translate_chain import stop_on_probe
from vm.guest import qmp_once

pytestmark = pytest.mark.vm

GDB_PY = os.path.join(REPO, "qintrospect", "gdb.py")


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    owner = str(tmp_path_factory.mktemp("owner") / "qmp2.sock")
    with booted("max", extra_args=["-qmp", f"unix:{owner},server=on,wait=off"],
                gdb_unix=True) as guest:
        guest.observer = owner
        yield guest


def owner(g, command="query-status"):
    """The owner's own monitor (the second QMP socket)."""
    return qmp_once(g.observer, command)


def status(g) -> str:
    return owner(g)["status"]


@pytest.fixture(autouse=True)
def running_after(g):
    yield
    if status(g) != "running":
        owner(g, "cont")


@pytest.mark.parametrize("extra", [(), ("--freeze",)])
def test_a_vm_resumed_by_its_owner_during_a_shell_stays_running(g, extra):
    """Found paused, a shell attached; its owner resumes it; quit: the VM runs. (Before, the
    shell put back "found paused" on leaving: it sent `stop`.)"""
    heap = g.probe["regions"]["heap"]["gva"]
    owner(g, "stop")
    sh = Piped(g, *extra)
    try:
        assert '"gva"' in sh.ask_done(f"translate --brief {heap:#x}")
        owner(g, "cont")
    finally:
        rc = sh.close()
    assert rc == 0, sh.stderr
    time.sleep(0.2)
    assert status(g) == "running"


def test_a_vm_its_owner_paused_during_a_frozen_shell_stays_paused(g):
    """Found running, held by `shell --freeze`; its owner resumes and pauses it again (their
    pause now); quit: it stays paused (before, the shell resumed it: found running)."""
    heap = g.probe["regions"]["heap"]["gva"]
    sh = Piped(g, "--freeze")
    try:
        assert '"gva"' in sh.ask_done(f"translate --brief {heap:#x}")
        assert status(g) == "paused"
        owner(g, "cont")
        owner(g, "stop")
        assert '"gva"' in sh.ask_done(f"translate --brief {heap:#x}")
    finally:
        rc = sh.close()
    assert rc == 0, sh.stderr
    assert status(g) == "paused"


@pytest.mark.parametrize("how", ["found paused", "paused by gdb", "paused by --freeze"])
def test_a_resume_behind_a_commands_back_is_said_and_left_alone(g, how):
    """A read relies on the VM staying paused; its owner resumes it in the middle: the
    command's last check says so (VMGoneError: exit 3), and leaving sends neither `stop` nor
    `cont` (the VM runs, as its owner left it)."""
    import qintrospect
    heap = g.probe["regions"]["heap"]["gva"]
    options = {}
    if how == "found paused":
        stop_on_probe(g)
    elif how == "paused by gdb":
        options = {"gdb": g.gdb_address, "via": "gdb"}
    else:
        options = {"freeze": True}
    with qintrospect.attach(qmp=g.qmp_path, **options) as vm:
        assert vm.translate(heap).ok
        vm.check_live(final=True)                  # nothing happened yet
        owner(g, "cont")
        with pytest.raises(VMGoneError, match="resumed by someone else .*left running"):
            vm.check_live(final=True)
    time.sleep(0.2)
    assert status(g) == "running"


def test_qi_inside_gdb_never_connects_to_the_gdbstub(g):
    """`qi` in a gdb attached to a Unix gdbstub finds QEMU's process without connecting to
    the stub. (Before, each command queued a connection; once the user's gdb left, QEMU took
    it and paused the VM, and after a few commands host addresses were gone.)"""
    heap = g.probe["regions"]["heap"]["gva"]
    argv = ["gdb", "-nx", "-batch", "-ex", f"target remote {g.gdb_address[5:]}",
            "-ex", f"source {GDB_PY}"]
    for _ in range(4):
        argv += ["-ex", f"qi translate --json {heap:#x}"]
    argv += ["-ex", "disconnect"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO,
                       stdin=subprocess.DEVNULL, start_new_session=True)
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 4, (r.stdout[-2000:], r.stderr[-2000:])
    assert all(a["hpa"] and a["qemu_pid"] == g.pid for a in answers)   # the host side, each
    owner(g, "cont")                     # the user resumes the VM gdb left paused
    time.sleep(1.0)
    assert status(g) == "running"        # and nothing queued pauses it again
    # and nothing waits in the stub's queue: a debugger attaches at once
    r = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"target remote {g.gdb_address[5:]}",
                        "-ex", "disconnect"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, start_new_session=True)
    assert r.returncode == 0, r.stderr


def test_the_shell_finds_qemu_behind_a_unix_gdbstub_without_connecting(g):
    """--gdb unix:PATH on the command line: the process comes from the kernel's socket
    tables; the stub sees one connection (qintrospect's gdb), not two."""
    from qintrospect.connect.peers import socket_owner
    assert socket_owner(g.gdb_address[5:]) == g.pid
    assert socket_owner(g.qmp_path) == g.pid
    heap = g.probe["regions"]["heap"]["gva"]
    r = subprocess.run([sys.executable, "-m", "qintrospect", "translate", "--qmp", g.qmp_path,
                        "--gdb", g.gdb_address, "--via", "gdb", "--json", f"{heap:#x}"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert a["qemu_pid"] == g.pid and a["hpa"]
    time.sleep(0.5)
    assert status(g) == "running"
