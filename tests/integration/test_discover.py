"""Finding the VMs on this host, with the bundled guest in a real QEMU: `list` (the guest's pid,
name, RAM, accelerator, QMP and gdbstub, run state), and attaching without naming sockets
(`--pid`, `--name`), which must give what `--qmp ... --gdb ...` gives.

Other VMs may run on this host (other users' tests): every check picks our guest by pid, and
names are made unique per test run.
"""

import os
import socket
import time

import pytest

from qintrospect.machine.monitor_text import parse_gva2gpa

from .conftest import attach_args, booted, run_cli, run_json

pytestmark = pytest.mark.vm

REGIONS = ("heap", "stack", "text")


def unique(tag):
    return f"qi-find-{tag}-{os.getpid()}"


@pytest.fixture(scope="module")
def guest():
    name = unique("a")
    with booted("qemu64", extra_args=["-name", name]) as g:   # a later -name wins
        g.unique_name = name
        yield g


def mine(vms, g):
    found = [v for v in vms if v["pid"] == g.pid]
    assert len(found) == 1, vms
    return found[0]


def test_list_finds_the_guest(guest):
    g = guest
    rc, vms, err = run_json("list", "--no-libvirt")
    assert rc == 0, err
    vm = mine(vms, g)
    assert vm["name"] == g.unique_name and vm["ram"] == 256 << 20
    assert vm["accel"] == "tcg" and vm["accel_requested"] == ["tcg"]
    assert vm["state"] == "running" and vm["user"] == __import__("pwd").getpwuid(
        os.getuid()).pw_name
    (qmp,) = vm["qmp"]
    assert qmp["address"] == f"unix:{g.qmp_path}" and qmp["state"] == "answers"
    assert qmp["detail"].startswith("QEMU ") and qmp["run_state"] == "running"
    assert qmp["kvm"] is False
    assert vm["gdb"]["address"] == g.gdb_address and vm["gdb"]["state"] == "listening"
    assert vm["attach"] == f"--pid {g.pid}" and vm["libvirt"] is None
    rc, out, err = run_cli("list", "--no-libvirt")
    assert rc == 0, err
    (row,) = [line for line in out.splitlines() if line.split()[0] == str(g.pid)]
    assert g.unique_name in row and "256 MiB" in row and "running" in row
    assert f"unix:{g.qmp_path} (answers)" in row and f"tcp:{g.gdb_address} (listening)" in row


def test_list_leaves_a_busy_monitor_and_the_gdbstub_alone(guest):
    """A QMP socket someone holds is "in use" (QEMU serves one client); the gdbstub is never
    connected to: the holder sees no STOP event (a debugger connecting stops the VM)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    g = guest
    holder = QEMUMonitorProtocol(g.qmp_path)
    holder.connect()
    try:
        holder.settimeout(10)
        rc, vms, err = run_json("list", "--no-libvirt")
        assert rc == 0, err
        vm = mine(vms, g)
        assert vm["qmp"][0]["state"] == "in use" and vm["gdb"]["state"] == "listening"
        assert vm["state"] is None and vm["attach"] is None
        rc, out, err = run_cli("translate", "--pid", g.pid, "0x1000")
        assert rc == 3 and "in use" in err, err
        time.sleep(0.3)
        events = [e["event"] for e in holder.get_events(wait=False)]
        assert "STOP" not in events, events
        assert holder.cmd("query-status")["status"] == "running"
    finally:
        holder.close()


def paused_on_probe(g, tries=40):
    """Pause the VM while vCPU 0 runs the probe (it spins), so that user addresses translate
    the same way in every run below."""
    heap = g.probe["regions"]["heap"]
    for _ in range(tries):
        g.qmp("stop")
        if parse_gva2gpa(g.hmp(f"gva2gpa {heap['gva']:#x}")) == heap["gpa"]:
            return
        g.qmp("cont")
        time.sleep(0.05)
    pytest.fail("vCPU 0 never ran the probe's address space")


def test_pid_and_name_attach_as_the_sockets_do(guest):
    g = guest
    addresses = [hex(g.probe["regions"][r]["gva"]) for r in REGIONS] + ["0xffffffff81000000"]
    paused_on_probe(g)
    try:
        rc, explicit, err = run_json("translate", *attach_args(g), *addresses)
        assert rc in (0, 1), err
        rc, by_pid, err = run_json("translate", "-v", "--pid", g.pid, *addresses)
        assert rc in (0, 1), err
        assert f"QMP {g.qmp_path}" in err, err
        rc, by_name, err = run_json("translate", "--name", g.unique_name, *addresses)
        assert rc in (0, 1), err
        # the gdbstub --pid found, used for memory: the same answers through it
        rc, via_gdb, err = run_json("translate", "-v", "--via", "gdb", "--pid", g.pid,
                                    *addresses)
        assert rc in (0, 1), err
        assert f"gdb {g.gdb_address}" in err, err
        assert g.qmp("query-status")["status"] == "paused", "a paused VM must stay paused"
    finally:
        g.qmp("cont")
    assert by_pid == explicit and by_name == explicit
    for a, b in zip(via_gdb, explicit):
        assert dict(a, memory_path=None) == dict(b, memory_path=None)
        assert a["memory_path"] == "gdb"
    for r, t in zip(REGIONS, explicit):
        assert int(t["gpa"], 16) == g.probe["regions"][r]["gpa"]
        assert t["qemu_pid"] == g.pid
    assert g.qmp("query-status")["status"] == "running"


def test_cpus_by_pid_and_freeze(guest):
    g = guest
    rc, out, err = run_json("cpus", "--pid", g.pid)
    assert rc == 0, err
    assert len(out) == 1 and out[0]["mode"] == "4-level"
    rc, out, err = run_json("cpus", "-v", "--freeze", "--pid", g.pid)
    assert rc == 0, err
    assert "gdb (none" in err, err        # --freeze: no gdbstub taken from the command line
    assert g.qmp("query-status")["status"] == "running"


def test_a_busy_gdbstub_is_left_for_qmp(guest):
    """A debugger holds the gdbstub (connecting stopped the VM): --pid says so and reads the
    registers through QMP; the VM stays as found (paused)."""
    g = guest
    host, port = g.gdb_address.rsplit(":", 1)
    debugger = socket.create_connection((host, int(port)))
    try:
        for _ in range(100):
            if g.qmp("query-status")["status"] != "running":
                break
            time.sleep(0.05)
        rc, vms, err = run_json("list", "--no-libvirt")
        assert mine(vms, g)["gdb"]["state"] == "in use"
        rc, out, err = run_json("translate", "-v", "--pid", g.pid, "0xffffffff81000000")
        assert rc in (0, 1), err
        assert "in use" in err and "gdb (none" in err, err
        assert g.qmp("query-status")["running"] is False
    finally:
        debugger.close()
        g.qmp("cont")


def test_two_vms_with_one_name_make_name_ambiguous(guest):
    g = guest
    with booted("qemu64", probe=None, extra_args=["-name", g.unique_name]) as twin:
        rc, out, err = run_cli("translate", "--name", g.unique_name, "0x1000")
        assert rc == 2, err
        assert "2 QEMU processes" in err and str(g.pid) in err and str(twin.pid) in err
        rc, vms, err = run_json("list", "--no-libvirt")
        assert sorted(v["pid"] for v in vms if v["name"] == g.unique_name) == \
            sorted([g.pid, twin.pid])
    rc, out, err = run_cli("translate", "--name", unique("nobody"), "0x1000")
    assert rc == 2 and "no QEMU process" in err
