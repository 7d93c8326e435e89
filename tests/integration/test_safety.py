"""Issue: never harm the VM, never fall over.

Read-only proven (RAM and registers hashed around every command; a recording proxy on the
gdbstub and QMP sockets), run state kept through errors and signals, and the faults of the
world answered with exit 3 within seconds.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from qintrospect.connect.qmp import check_allowed
from qintrospect.machine.monitor_text import parse_gpa2hva, parse_mtree_flat

from .conftest import REPO, attach_args, boot, booted, run_cli, run_json
from .test_translate_chain import stop_on_probe

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def g():
    with booted("max") as guest:
        yield guest


def every_command(g, extra=()):
    """Each qintrospect command that talks to a VM, with typical arguments."""
    r = g.probe["regions"]
    a = list(attach_args(g)) + list(extra)
    return [
        ["translate", *a, hex(r["heap"]["gva"]), hex(r["untouched"]["gva"]), "0xffff800000000000"],
        ["translate", *a, "--via", "gdb", hex(r["thp"]["gva"])],
        ["translate", *a, "--json", "--find-cr3", "--expect", hex(r["heap"]["value"]),
         hex(r["heap"]["gva"])],
        ["cpus", *a],
        ["find-cr3", *a, "--gva", hex(r["heap"]["gva"])],
        ["vmmap", *a, "--hpa"],
        ["vmmap", *a, "--leaf", "--json", "--user"],
        ["read", *a, hex(r["stack"]["gva"] & ~0xFFF), "8192"],
        ["read", *a, "--phys", "0xfed00000", "64"],
        ["read", *a, "--phys", "0x100000", "4096", "--via", "gdb"],
    ]


def ram_and_registers_digest(g):
    """Hash of all guest RAM (read from the QEMU process at the HVAs QEMU names) and of every
    vCPU's registers, taken by the test itself."""
    h = hashlib.sha256()
    regions = [r for r in parse_mtree_flat(g.hmp("info mtree -f")) if r.kind == "ram"]
    with open(f"/proc/{g.pid}/mem", "rb") as mem:
        for r in regions:
            _, _, hva = parse_gpa2hva(g.hmp(f"gpa2hva {r.start:#x}"))
            mem.seek(hva)
            left = r.size
            while left:
                chunk = mem.read(min(left, 8 << 20))
                h.update(chunk)
                left -= len(chunk)
    for cpu in g.qmp("query-cpus-fast"):
        h.update(g.qmp("human-monitor-command", **{"command-line": "info registers",
                                                   "cpu-index": cpu["cpu-index"]}).encode())
    return h.hexdigest()


def test_every_command_leaves_ram_and_registers_unchanged(g):
    stop_on_probe(g)
    try:
        before = ram_and_registers_digest(g)
        for argv in every_command(g):
            rc, out, err = run_cli(*argv)
            assert rc in (0, 1), (argv, err)
            assert "Traceback" not in err
            assert g.qmp("query-status")["status"] == "paused", argv
        assert ram_and_registers_digest(g) == before
    finally:
        g.qmp("cont")


# ---- a recording proxy between qintrospect and QEMU's sockets ---------------------------------

class Proxy:
    """Forwards one listening socket to QEMU's and records what the client sends."""

    def __init__(self, listener, connect):
        self.listener, self.connect = listener, connect
        self.sent = []  # bytes from the client, one entry per connection
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = self.connect()
            record = bytearray()
            self.sent.append(record)
            threading.Thread(target=self._pump, args=(client, server, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    @staticmethod
    def _pump(src, dst, record):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._stop = True
        self.listener.close()


def rsp_packets(stream: bytes):
    """The packets ($...#xx) of a gdb remote-protocol byte stream, decoded."""
    out, i = [], 0
    while True:
        start = stream.find(b"$", i)
        if start < 0:
            return out
        end = stream.find(b"#", start)
        if end < 0:
            return out
        out.append(stream[start + 1:end].decode(errors="replace"))
        i = end + 3


# Packets that only read or query: anything else (M/X memory writes, P/G register writes,
# c/s/vCont resumes, Z breakpoints, k kill, D detach -- which resumes the VM...) fails the test.
READ_ONLY_PACKET = ("qSupported", "qXfer:features:read", "qTStatus", "qfThreadInfo",
                    "qsThreadInfo", "qAttached", "qC", "qOffsets", "qSymbol", "qqemu.PhyMemMode",
                    "qqemu.Supported", "qTfV", "qTfP", "qL", "qThreadExtraInfo", "qXfer:threads",
                    "Qqemu.PhyMemMode:", "QStartNoAckMode", "vMustReplyEmpty", "vCont?", "?",
                    "Hg", "Hc", "T", "g", "p", "m")


def test_wire_shows_only_reads_and_allowlisted_monitor_commands(g):
    host, port = g.gdb_address.rsplit(":", 1)
    gdb_listener = socket.create_server(("127.0.0.1", 0))
    gdb_proxy = Proxy(gdb_listener, lambda: socket.create_connection((host, int(port))))
    qmp_path = os.path.join(g.tmpdir, "proxy-qmp.sock")
    qmp_listener = socket.socket(socket.AF_UNIX)
    qmp_listener.bind(qmp_path)
    qmp_listener.listen(4)

    def qmp_connect():
        s = socket.socket(socket.AF_UNIX)
        s.connect(g.qmp_path)
        return s
    qmp_proxy = Proxy(qmp_listener, qmp_connect)
    try:
        proxied = ["--qmp", qmp_path, "--gdb", f"127.0.0.1:{gdb_listener.getsockname()[1]}",
                   "--pid", str(g.pid)]
        for argv in every_command(g):
            argv = [argv[0]] + proxied + argv[len(attach_args(g)) + 1:]
            rc, out, err = run_cli(*argv)
            assert rc in (0, 1), (argv, err)
    finally:
        gdb_proxy.close()
        qmp_proxy.close()
    packets = [p for conn in gdb_proxy.sent for p in rsp_packets(bytes(conn))]
    assert any(p.startswith("m") for p in packets)  # it did read memory through the stub
    bad = sorted({p for p in packets if not p.startswith(READ_ONLY_PACKET)})
    assert not bad, f"packets that are not reads: {bad}"
    assert not [p for p in packets if p[:1] in "MXPGcsCSZzkD"]
    commands, per_connection = [], []
    for conn in qmp_proxy.sent:
        decoder = json.JSONDecoder()
        text = bytes(conn).decode()
        i = 0
        mine = []
        while i < len(text):
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                break
            obj, i = decoder.raw_decode(text, i)
            mine.append(obj["execute"])
            commands.append(obj)
        per_connection.append(mine)
    executed = {c["execute"] for c in commands}
    assert "human-monitor-command" in executed
    for c in commands:   # every message written is one the allowlist lets through
        check_allowed(c["execute"], c.get("arguments"))
    hmp = [c["arguments"]["command-line"] for c in commands
           if c["execute"] == "human-monitor-command"]
    assert not [line for line in hmp if line.startswith("gpa2hpa")]
    # the VM was found running every time: a session that paused it through QMP (one
    # consistent view on the direct path, with no gdb) resumed it afterwards; a session with gdb
    # (whose connection paused it) resumed it with cont
    for names in per_connection:
        if "stop" in names:
            assert names.count("stop") == 1 and "cont" in names[names.index("stop"):], names
    assert g.qmp("query-status")["running"]


# ---- run state through errors and signals ----------------------------------------------------

def start_slow_scan(g, *extra):
    """find-cr3 over the gdbstub (slow: ~30 s for 256 MiB), waiting until it is attached."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qintrospect", "-v", "find-cr3", *attach_args(g), "--via", "gdb",
         *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert line.startswith("# attached"), line
    time.sleep(1.0)  # now scanning
    return proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("found", ["running", "paused"])
def test_signal_mid_scan_restores_run_state(g, signum, found):
    if found == "paused":
        g.qmp("stop")
    try:
        proc = start_slow_scan(g)
        t0 = time.monotonic()
        proc.send_signal(signum)
        rc = proc.wait(timeout=15)
        err = proc.stderr.read()
        assert time.monotonic() - t0 < 10
        assert rc == 130 and "left as found" in err and "Traceback" not in err
        assert g.qmp("query-status")["status"] == found
    finally:
        g.qmp("cont")


def rsp_query(address: str, packet: str) -> str:
    """One query to the gdbstub over a raw connection (no gdb: nothing detaches or resumes;
    connecting stops the VM, which stays stopped). QEMU greets a new connection with a stop
    reply (T...); the answer is the next packet."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        body = packet.encode()
        s.sendall(b"$" + body + b"#" + f"{sum(body) % 256:02x}".encode())
        buf = b""
        while True:
            buf += s.recv(4096)
            while b"$" in buf and b"#" in buf[buf.index(b"$"):]:
                start = buf.index(b"$")
                end = buf.index(b"#", start)
                if len(buf) < end + 3:
                    break
                reply, buf = buf[start + 1:end].decode(), buf[end + 3:]
                s.sendall(b"+")
                if not reply.startswith(("T", "S")):
                    return reply


def test_sigkill_leaves_paused_then_resume(g):
    assert rsp_query(g.gdb_address, "qqemu.PhyMemMode") == "0"
    g.qmp("cont")   # a gdbstub connection stops the VM; this test starts from a running one
    proc = start_slow_scan(g)
    proc.kill()
    proc.wait(timeout=10)
    time.sleep(0.5)
    assert g.qmp("query-status")["status"] == "paused"  # gdb died with it, without detaching
    assert rsp_query(g.gdb_address, "qqemu.PhyMemMode") == "1"   # left as the killed one set it
    r = g.probe["regions"]["heap"]
    rc, out, err = run_cli("translate", *attach_args(g), hex(r["gva"]))
    assert "was killed while attached" in err and "qintrospect resume" in err
    assert g.qmp("query-status")["status"] == "paused"  # still as that command found it
    # the mode put back is the one the killed session found, not the 1 it left behind
    assert rsp_query(g.gdb_address, "qqemu.PhyMemMode") == "0"
    rc, out, err = run_cli("resume", "--qmp", g.qmp_path)
    assert rc == 0 and "resumed" in out
    assert g.qmp("query-status")["running"]
    rc, out, err = run_cli("translate", *attach_args(g), hex(r["gva"]))
    assert "killed" not in err


def test_error_exit_keeps_run_state(g):
    rc, out, err = run_cli("translate", *attach_args(g), "--vcpu", "3", "0x1000")
    assert rc == 2
    rc, out, err = run_cli("vmmap", *attach_args(g), "--range", "0x5000-0x1000")
    assert rc == 2
    assert g.qmp("query-status")["running"]


# ---- faults of the world ---------------------------------------------------------------------

def timed_cli(*args, limit=20):
    t0 = time.monotonic()
    rc, out, err = run_cli(*args, timeout=60)
    assert time.monotonic() - t0 < limit, "took too long"
    assert "Traceback" not in err
    return rc, err


def test_missing_refused_and_wrong_sockets(g, tmp_path):
    rc, err = timed_cli("translate", "--qmp", str(tmp_path / "nope.sock"), "--gdb",
                        g.gdb_address, "0x1000")
    assert rc == 3 and "does not exist" in err
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # a socket file nobody listens on: connection refused
    rc, err = timed_cli("translate", "--qmp", str(tmp_path / "dead.sock"), "--gdb",
                        g.gdb_address, "0x1000")
    assert rc == 3 and "QMP" in err
    # something that is not QMP: it accepts and says nothing / says garbage
    for greeting in (b"", b"hello, I am not QMP\r\n"):
        srv = socket.socket(socket.AF_UNIX)
        path = str(tmp_path / f"other{len(greeting)}.sock")
        srv.bind(path)
        srv.listen(1)

        def serve(srv=srv, greeting=greeting):
            try:
                conn, _ = srv.accept()
                conn.sendall(greeting)
                time.sleep(15)
            except OSError:
                pass
        threading.Thread(target=serve, daemon=True).start()
        rc, err = timed_cli("translate", "--qmp", path, "--gdb", g.gdb_address, "--timeout",
                            "2", "0x1000")
        srv.close()
        assert rc == 3 and "QMP" in err
    # a silent socket given as the gdbstub, where gdb is the way (--via gdb): not a gdbstub
    silent = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: (silent.accept(), time.sleep(15)), daemon=True).start()
    rc, err = timed_cli("translate", *attach_args(g)[:2], "--gdb",
                        f"127.0.0.1:{silent.getsockname()[1]}", "--via", "gdb", "--timeout", "2",
                        "0x1000")
    silent.close()
    assert rc == 3 and "gdbstub" in err
    assert g.qmp("query-status")["running"]


def test_gdbstub_already_taken(g):
    host, port = g.gdb_address.rsplit(":", 1)
    other = socket.create_connection((host, int(port)))  # another debugger holds the stub
    try:
        time.sleep(0.3)
        # where gdb is the way (--via gdb here; a remote QEMU in life), that is exit 3
        rc, err = timed_cli("translate", *attach_args(g), "--via", "gdb", "--timeout", "2",
                            "0x1000")
        assert rc == 3 and "gdbstub" in err
        # a local QEMU needs no gdbstub: the walk goes on while another debugger holds it
        heap = g.probe["regions"]["heap"]
        rc, out, err = run_json("translate", *attach_args(g), hex(heap["gva"]))
        assert rc == 0 and int(out[0]["value"], 16) == heap["value"], err
        assert out[0]["memory_path"] == "direct"
    finally:
        other.close()
    time.sleep(0.5)
    g.qmp("cont")  # the other client's connection stopped the VM; that was not us


def test_pid_is_trusted_only_when_its_memory_proves_it(g):
    """--pid names the QEMU process whose pagemap gives HPAs: another VM's QEMU (same kernel,
    same initramfs) or a process that is no QEMU at all must be refused, this one accepted."""
    heap = g.probe["regions"]["heap"]
    with booted("max", probe=None) as other:
        for pid in (other.pid, os.getpid()):
            rc, out, err = run_json("translate", *attach_args(g), "--pid", str(pid),
                                    hex(heap["gva"]))
            assert rc == 0, err
            t = out[0]
            assert t["hpa"] is None and t["qemu_pid"] is None and t["memory_path"] == "gdb"
            assert "does not hold this VM's RAM" in t["gpa_note"]
            assert int(t["value"], 16) == heap["value"]
    rc, out, err = run_json("translate", *attach_args(g), "--pid", str(g.pid), hex(heap["gva"]))
    assert rc == 0 and out[0]["qemu_pid"] == g.pid and out[0]["hpa"] is not None


def test_a_proof_is_remembered_only_for_the_process_serving_the_socket(g, tmp_path):
    """The proof that the QEMU process holds this VM's RAM is remembered for the process
    serving the QMP socket: the next command does not make it again; a --pid of another
    process is never taken from memory (its proof is made, and fails, each time)."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))      # a fresh marker folder
    heap = hex(g.probe["regions"]["heap"]["gva"])

    def verbose(*extra):
        proc = subprocess.run([sys.executable, "-m", "qintrospect", "-v", "translate",
                               *attach_args(g), *extra, heap], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    assert "proved by an earlier command" not in verbose()
    assert "proved by an earlier command" in verbose()
    with booted("max", probe=None) as other:
        for _ in range(2):
            err = verbose("--pid", str(other.pid))
            assert "does not hold this VM's RAM" in err and "proved by an earlier" not in err


def test_permission_denied_and_hidden_pfns(g, tmp_path):
    # as an unprivileged user the QMP socket cannot be opened
    rc, out, err = run_cli_as(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
                              "translate", *attach_args(g), "0x1000")
    assert rc == 3 and "permission denied" in err.lower(), err
    # root without CAP_SYS_ADMIN sees pagemap with the frame numbers zeroed: said, never HPA 0
    heap = g.probe["regions"]["heap"]
    stop_on_probe(g)
    try:
        rc, out, err = run_cli_as(["setpriv", "--bounding-set=-sys_admin",
                                   "--inh-caps=-sys_admin"],
                                  "translate", *attach_args(g), "--json", hex(heap["gva"]))
    finally:
        g.qmp("cont")
    assert rc == 0, err
    t = json.loads(out)
    assert t["hpa"] is None and t["host"]["status"] == "pfn-hidden"
    assert "CAP_SYS_ADMIN" in t["host"]["detail"]
    assert t["value"] == t["value_at_hva"]


def run_cli_as(prefix, *args):
    proc = subprocess.run(prefix + [sys.executable, "-m", "qintrospect", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def test_qemu_killed_mid_scan():
    g = boot("qemu64")
    try:
        proc = start_slow_scan(g)
        os.kill(g.pid, signal.SIGKILL)
        rc = proc.wait(timeout=20)
        err = proc.stderr.read()
        assert rc == 3, err
        assert "Traceback" not in err and ("gone" in err or "lost" in err)
    finally:
        g.stop()


def test_guest_reboot_mid_scan_without_gdb():
    """Without gdb (and without --freeze) the VM runs while qintrospect reads it: a reboot in
    the middle of a scan is seen (QMP's RESET event) and ends the command with exit 3, instead
    of results that mix memory from before and after."""
    with booted("qemu64", probe="sleep", extra_args=["-action", "reboot=reset"]) as g:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qintrospect", "-v", "find-cr3", "--qmp", g.qmp_path,
             "--via", "qmp"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        assert proc.stderr.readline().startswith("# attached")
        time.sleep(1.0)   # scanning, slowly, through QMP xp
        g.console.sendline("reboot -f")
        t0 = time.monotonic()
        rc = proc.wait(timeout=30)
        err = proc.stderr.read()
        assert time.monotonic() - t0 < 10
        assert rc == 3 and "reset (rebooted)" in err and "Traceback" not in err
        assert g.qmp("query-status")["running"]
