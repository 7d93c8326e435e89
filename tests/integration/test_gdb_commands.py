"""Issue 13, item 3: `qi` inside a gdb that is already attached to QEMU's gdbstub.

A real gdb (`gdb -batch`, ended with `disconnect`: gdb's quit path would detach and resume the
VM) sources qintrospect/gdb.py and runs qi commands; their JSON is held to the command line's
own output for the same addresses and to QEMU's `gva2gpa`, the packets gdb sent for them are
read back from gdb's remote log (reads, allowlisted monitor lines and the memory mode only),
and the stub's memory mode and the VM's run state are as found afterwards.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from qintrospect.connect.qmp import check_allowed
from qintrospect.machine.monitor_text import parse_gva2gpa

from .conftest import REPO, booted, run_json
from .test_safety import READ_ONLY_PACKET, Proxy, rsp_packets
from .test_translate_chain import kernel_addresses, stop_on_probe

pytestmark = pytest.mark.vm

GDB_PY = os.path.join(REPO, "qintrospect", "gdb.py")
MARK = "@@qi-test "


@pytest.fixture(scope="module")
def g():
    with booted("max") as guest:
        yield guest


def gdb_batch(g, *commands, load=None, timeout=180):
    """gdb -batch attached to the guest's stub, `qi` loaded, the commands, then `disconnect`
    (never quit while attached). {label: stdout of that command}, stderr, exit status. A
    command given as (label, text) gets its output under label."""
    load = load or [f"source {GDB_PY}"]
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set width 0",
            "-ex", f"target remote {g.gdb_address}"]
    for line in load:
        argv += ["-ex", line]
    for i, c in enumerate(commands):
        label, text = c if isinstance(c, tuple) else (str(i), c)
        argv += ["-ex", f"echo {MARK}{label}\\n", "-ex", text]
    argv += ["-ex", f"echo {MARK}end\\n", "-ex", "disconnect"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    parts, label = {}, None
    for line in proc.stdout.splitlines(keepends=True):
        if line.startswith(MARK):
            label = line[len(MARK):].strip()
            parts[label] = ""
        elif label is not None:
            parts[label] += line
    assert "end" in parts, (proc.stdout[-2000:], proc.stderr[-2000:])
    return parts, proc.stderr, proc.returncode


def monitor(line: str) -> str:
    """The test's own monitor line, its answer on stdout (gdb prints a target's monitor output
    on stderr)."""
    return f'python print(gdb.execute("monitor {line}", to_string=True), end="")'


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def received(text):
    m = re.search(r'received: "(.*)"', text)
    return m.group(1) if m else None


@pytest.fixture
def paused_on_probe(g):
    """The VM paused (through QMP) while vCPU 0 runs the probe; running again afterwards."""
    cr3 = stop_on_probe(g)
    try:
        yield cr3
    finally:
        g.qmp("cont")


def test_qi_translate_matches_the_command_line_and_gva2gpa(g, paused_on_probe):
    r = g.probe["regions"]
    addrs = [r[n]["gva"] for n in ("heap", "thp", "text", "stack", "untouched")]
    addrs += kernel_addresses(g)[:3]
    hexes = " ".join(hex(a) for a in addrs)
    rc, cli, err = run_json("translate", "--qmp", g.qmp_path, *map(hex, addrs))
    assert rc == 1, err                                   # untouched faults
    commands = [(f"gva2gpa {a:#x}", monitor(f"gva2gpa {a:#x}")) for a in addrs]
    commands += [
        ("mode before", "maint packet qqemu.PhyMemMode"),
        ("qmp", f"qi set qmp {g.qmp_path}"),
        ("with qmp", f"qi translate --json {hexes}"),
        ("status with qmp", "p $qi_status"),
        ("no qmp", "qi set qmp none"),
        ("bare", f"qi translate --json {hexes}"),
        ("via gdb", "qi set via gdb"),
        ("through the stub", f"qi translate --json {hexes}"),
        ("text", f"qi translate --no-bits {r['heap']['gva']:#x}"),
        ("mode after", "maint packet qqemu.PhyMemMode"),
        ("run state", monitor("info status")),     # the test's own line, not qi's
    ]
    parts, err, rc = gdb_batch(g, *commands)
    assert "Traceback" not in err and "internal error" not in err, err
    assert received(parts["mode before"]) == received(parts["mode after"]) == "0"
    assert "paused" in parts["run state"]             # qi never continued the VM
    assert parts["status with qmp"].strip().endswith("= 1")
    with_qmp = json_lines(parts["with qmp"])
    assert with_qmp == cli                            # the same objects, key for key
    for a, t in zip(addrs, with_qmp):
        want = parse_gva2gpa(parts[f"gva2gpa {a:#x}"])
        assert (int(t["gpa"], 16) if "gpa" in t else None) == want, hex(a)
    chain = ("gva", "cr3", "mode", "levels", "gpa", "ram_block", "hva", "hpa", "value",
             "value_at_hva", "fault", "page_size", "writable", "user", "executable")
    for label, path in (("bare", "direct"), ("through the stub", "gdb")):
        objs = json_lines(parts[label])
        assert len(objs) == len(cli), label
        for mine, theirs in zip(objs, cli):
            assert {k: mine.get(k) for k in chain} == {k: theirs.get(k) for k in chain}, label
            assert mine["memory_path"] == path
            if "gpa" in mine:     # without QMP no phys-bits: assumed 52, and said
                assert mine["assumed_maxphyaddr"] is True
    assert re.search(r"GPA\s+0x0*%x" % r["heap"]["gpa"], parts["text"])


def test_qi_vmmap_find_cr3_read_match_the_command_line(g, paused_on_probe):
    r = g.probe["regions"]
    heap = r["heap"]
    stack = r["stack"]["gva"] & ~0xF
    specs = {
        "vmmap": ["vmmap", "--user"],
        "vmmap leaf": ["vmmap", "--leaf", "--range",
                       f"{heap['gva'] & ~0xFFF:#x}-{(heap['gva'] & ~0xFFF) + 0x3000:#x}"],
        "find-cr3": ["find-cr3", "--gva", hex(heap["gva"]), "--expect", hex(heap["value"])],
        "read": ["read", hex(stack), "100"],
        "read phys": ["read", "--phys", hex(heap["gpa"]), "64"],
    }
    cli = {}
    for label, words in specs.items():
        rc, out, err = run_json(*words, "--qmp", g.qmp_path)
        assert rc == 0, (label, err)
        cli[label] = out
    parts, err, rc = gdb_batch(
        g, ("qmp", f"qi set qmp {g.qmp_path}"),
        *[(label, "qi " + " ".join(words) + " --json") for label, words in specs.items()],
        ("via gdb", "qi set via gdb"),
        ("read phys gdb", f"qi read --phys {heap['gpa']:#x} 64 --json"),
        ("mmio", "qi read --phys 0xfed00000 16"),
        ("mmio status", "p $qi_status"),
        ("usage", "qi read 0x1"),
        ("usage status", "p $qi_status"),
        ("vcpu", "qi translate --vcpu 1 0x1000"),
        ("attach option", "qi cpus"),
        ("mode after", "maint packet qqemu.PhyMemMode"))
    for label in cli:
        assert json_lines(parts[label]) == cli[label], label
    assert json_lines(parts["read phys gdb"]) == cli["read phys"]
    assert "not RAM" in parts["mmio"] and "hpet" in parts["mmio"]
    assert parts["mmio status"].strip().endswith("= 1")
    assert parts["usage status"].strip().endswith("= 2")
    assert "the selected thread" in err and "qi cpus: unknown" in err
    assert received(parts["mode after"]) == "0"


def test_qi_sends_only_reads_and_puts_a_physical_mode_back(g, paused_on_probe):
    """gdb reaches the stub through a recording proxy: every packet gdb sent while it ran qi
    commands is a read or a query, and every monitor line one the allowlist lets through. The
    proxy is the stub's socket peer here, not QEMU: qi finds that out (its memory does not
    hold this VM's RAM) and reads through the stub."""
    heap = g.probe["regions"]["heap"]
    host, port = g.gdb_address.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = Proxy(listener, lambda: socket.create_connection((host, int(port))))
    page = heap["gva"] & ~0xFFF
    try:
        proxied = type("G", (), {"gdb_address": f"127.0.0.1:{listener.getsockname()[1]}"})
        parts, err, rc = gdb_batch(
            proxied, ("found 1", "maint packet Qqemu.PhyMemMode:1"),
            ("translate", f"qi translate --json {heap['gva']:#x}"),
            ("vmmap", f"qi vmmap --range {page:#x}-{page + 0x1000:#x}"),
            ("read", f"qi read {heap['gva']:#x} 16"),
            ("pid", f"qi set pid {g.pid}"),
            ("with pid", f"qi translate --json {heap['gva']:#x}"),
            ("mode after", "maint packet qqemu.PhyMemMode"),
            ("put back", "maint packet Qqemu.PhyMemMode:0"))
    finally:
        proxy.close()
    assert received(parts["mode after"]) == "1"       # found physical: left physical
    t = json_lines(parts["translate"])[0]
    assert t["gpa"] == f"{heap['gpa']:#x}" and t["memory_path"] == "gdb" and t["hpa"] is None
    assert t["value"] == f"{heap['value']:#x}"
    t = json_lines(parts["with pid"])[0]
    assert t["memory_path"] == "direct" and t["qemu_pid"] == g.pid and t["hpa"]
    packets = [p for conn in proxy.sent for p in rsp_packets(bytes(conn))]
    assert any(p.startswith("m") for p in packets)
    monitor_lines = [bytes.fromhex(p[6:]).decode() for p in packets if p.startswith("qRcmd,")]
    assert "info mtree -f" in monitor_lines, "the RAM map came through the stub's monitor"
    for line in monitor_lines:
        check_allowed("human-monitor-command", {"command-line": line})
    bad = sorted({p for p in packets if not p.startswith(READ_ONLY_PACKET + ("qRcmd,",))})
    assert not bad, f"packets that are not reads: {bad}"


def test_qi_through_python_import(g, paused_on_probe):
    """`python import qintrospect.gdb` when gdb's Python can import qintrospect (here: the
    repository and its .venv put on sys.path by hand)."""
    heap = g.probe["regions"]["heap"]
    site = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    load = [f"python import sys; sys.path[:0] = [{REPO!r}]; sys.path += {site!r}",
            "python import qintrospect.gdb"]
    parts, err, rc = gdb_batch(g, ("t", f"qi translate --brief {heap['gva']:#x}"), load=load)
    assert json_lines(parts["t"])[0]["gpa"] == f"{heap['gpa']:#x}", err


def test_qi_without_a_target_says_so_and_completes():
    proc = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"source {GDB_PY}",
                           "-ex", "qi translate 0x1000", "-ex", "qi help", "-ex",
                           "qi set via sideways", "-ex", "qi show",
                           "-ex", "complete qi find-c", "-ex", "complete qi translate --j",
                           "-ex", "complete qi set via g", "-ex", "complete qi vmmap --q"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "not attached to a gdbstub" in proc.stderr
    assert "qi translate ADDR" in proc.stdout and "via auto" in proc.stdout
    assert "qi set via sideways" in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    for want in ("qi find-cr3", "qi translate --json", "qi set via gdb"):
        assert want in lines, want
    assert not [line for line in lines if "--qmp" in line]     # attach options are not qi's


def test_ctrl_c_in_qi_puts_the_memory_mode_back(g, paused_on_probe):
    import pexpect
    heap = g.probe["regions"]["heap"]
    p = pexpect.spawn("gdb", ["-nx", "-q", "-ex", f"target remote {g.gdb_address}",
                              "-ex", f"source {GDB_PY}"], cwd=REPO, encoding="utf-8",
                      timeout=60, env=dict(os.environ, TERM="dumb"))
    try:
        p.expect(r"\(gdb\) ")
        p.sendline("qi set via gdb")
        p.expect(r"\(gdb\) ")
        p.sendline(f"qi find-cr3 --gva {heap['gva']:#x}")     # ~30 s through the stub
        time.sleep(3)
        p.sendintr()
        p.expect(r"\(gdb\) ")
        p.sendline("maint packet qqemu.PhyMemMode")
        p.expect(r"\(gdb\) ")
        assert received(p.before) == "0"
        p.sendline("p $qi_status")
        p.expect(r"\(gdb\) ")
        assert "= 130" in p.before
        p.sendline(f"qi translate --brief {heap['gva']:#x}")
        p.expect(r"\(gdb\) ")
        assert f'"gpa":"{heap["gpa"]:#x}"' in p.before
        p.sendline("disconnect")             # then killed: gdb never quits while attached
        p.expect(r"\(gdb\) ")
    finally:
        p.kill(signal.SIGKILL)
        p.close(force=True)
    assert g.qmp("query-status")["status"] == "paused"


@pytest.mark.parametrize("delay", [0.2, 0.4, 0.7])
def test_ctrl_c_during_the_first_imports_leaves_qi_working(g, paused_on_probe, delay):
    """A Ctrl-C early in the first command lands inside an import (numpy's takes a while):
    the half-imported modules are forgotten, so the next command imports them afresh instead of
    failing with an internal error on a half-built numpy."""
    import pexpect
    heap = g.probe["regions"]["heap"]
    p = pexpect.spawn("gdb", ["-nx", "-q", "-ex", f"target remote {g.gdb_address}",
                              "-ex", f"source {GDB_PY}"], cwd=REPO, encoding="utf-8",
                      timeout=60, env=dict(os.environ, TERM="dumb"))
    try:
        p.expect(r"\(gdb\) ")
        p.sendline(f"qi translate --brief {heap['gva']:#x}")
        time.sleep(delay)
        p.sendintr()
        p.expect(r"\(gdb\) ")
        p.sendline("echo qi-sync\\n")      # gdb may print a second "Quit" and prompt
        p.expect("\r\nqi-sync")
        p.expect(r"\(gdb\) ")
        p.sendline(f"qi translate --brief {heap['gva']:#x}")
        p.expect(r"\(gdb\) ")
        assert "internal error" not in p.before
        assert f'"gpa":"{heap["gpa"]:#x}"' in p.before
        p.sendline("disconnect")
        p.expect(r"\(gdb\) ")
    finally:
        p.kill(signal.SIGKILL)
        p.close(force=True)
    assert g.qmp("query-status")["status"] == "paused"


def test_qi_uses_gdbs_selected_thread_as_the_vcpu():
    from qintrospect.machine.monitor_text import parse_registers
    with booted("qemu64", smp=2, probe=None) as two:
        two.qmp("stop")
        kernel = kernel_addresses(two)[0]
        parts, err, rc = gdb_batch(two, ("t2", "thread 2"),
                                   ("second", f"qi translate --json {kernel:#x}"),
                                   ("t1", "thread 1"),
                                   ("first", f"qi translate --json {kernel:#x}"),
                                   ("mode", "maint packet qqemu.PhyMemMode"))
        cr3 = [parse_registers(two.qmp("human-monitor-command", **{
            "command-line": "info registers", "cpu-index": i}))["CR3"] for i in (0, 1)]
        assert two.qmp("query-status")["status"] == "paused"
    first, second = json_lines(parts["first"])[0], json_lines(parts["second"])[0]
    assert (first["vcpu"], second["vcpu"]) == (0, 1), err
    assert (int(first["cr3"], 16), int(second["cr3"], 16)) == tuple(cr3)
    assert first["gpa"] == second["gpa"]          # a kernel address: any process's table
    assert received(parts["mode"]) == "0"


def test_qi_ps_and_guest_pid_match_the_command_line(g, paused_on_probe):
    """Issue 22 inside gdb: `qi ps` lists what `qintrospect ps` lists, and `qi translate
    --guest-pid` gives the probe's GPAs, on gdb's own connection."""
    r = g.probe["regions"]
    pid = g.probe["pid"]
    rc, cli, err = run_json("ps", "--qmp", g.qmp_path)
    assert rc == 0, err
    parts, err, rc = gdb_batch(
        g, ("qmp", f"qi set qmp {g.qmp_path}"), ("ps", "qi ps --json"),
        ("translate", f"qi translate --json --guest-pid {pid} {r['heap']['gva']:#x} "
                      f"{r['text']['gva']:#x}"),
        ("status", "p $qi_status"), ("mode after", "maint packet qqemu.PhyMemMode"))
    assert "Traceback" not in err and "internal error" not in err, err
    mine = json_lines(parts["ps"])
    keep = ("pid", "ppid", "comm", "uid", "kthread", "root", "user_root")
    assert [{k: t[k] for k in keep} for t in mine] == [{k: t[k] for k in keep} for t in cli]
    heap, text = json_lines(parts["translate"])
    assert int(heap["gpa"], 16) == r["heap"]["gpa"] and int(text["gpa"], 16) == r["text"]["gpa"]
    assert parts["status"].strip().endswith("= 0")
    assert received(parts["mode after"]) == "0"
