"""Each safety guard, attacked with a crafted input (issue 11, items 5-8 and the run-state file).

The monitor allowlist is enforced where a message is written, whatever door the message came
through; socket addresses cannot smuggle a second gdb command; only real RAM counts as
readable; the run-state marker is never written through a symlink or into a folder that is not
this user's own; a killed session's gdbstub memory mode is put back to the one found first.
"""

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from qintrospect.connect import runstate
from qintrospect.errors import UsageError
from qintrospect.connect.gdbstub import GdbStub, one_line
from qintrospect.machine.rammap import RamMap
from qintrospect.connect.qmp import QmpMonitor, check_allowed, parse_address
from qintrospect.machine.monitor_text import Region


# ---- the monitor allowlist ---------------------------------------------------------------

@pytest.mark.parametrize("name,args", [
    ("query-status", None), ("query-cpus-fast", None), ("stop", None), ("cont", None),
    ("qom-get", {"path": "/machine/unattached/device[0]", "property": "phys-bits"}),
    ("human-monitor-command", {"command-line": "info mtree -f"}),
    ("human-monitor-command", {"command-line": "info registers", "cpu-index": 1}),
    ("human-monitor-command", {"command-line": "gpa2hva 0x100000"}),
    ("human-monitor-command", {"command-line": "xp /512gx 0x0"}),
])
def test_what_qintrospect_sends_is_allowed(name, args):
    check_allowed(name, args)


@pytest.mark.parametrize("name,args", [
    ("system_reset", None), ("quit", None), ("human-monitor-command", None),
    ("human-monitor-command", {"command-line": "system_reset"}),
    ("human-monitor-command", {"command-line": "gpa2hpa 0x1000"}),       # writes the page
    ("human-monitor-command", {"command-line": "gpa2hva 0x1000 ; quit"}),
    ("human-monitor-command", {"command-line": "gpa2hva 0x1000\nsystem_reset"}),
    ("human-monitor-command", {"command-line": "xp /1gx 0x1000 extra"}),
    ("human-monitor-command", {"command-line": "info registers\n"}),
    ("human-monitor-command", {"command-line": "info mtree"}),
    ("human-monitor-command", {"command-line": "x /1gx 0x1000"}),
    ("human-monitor-command", {"command-line": ["info", "registers"]}),
    ("x-query-ramblock", None), ("query-version", None),   # never sent: not allowed either
])
def test_everything_else_is_refused(name, args):
    with pytest.raises(ValueError, match="allowlist"):
        check_allowed(name, args)


def test_the_allowlist_holds_for_direct_command_calls():
    """command("human-monitor-command", ...) once bypassed the HMP check in hmp(): the check
    now sits before the socket, so nothing reaches the (absent) connection."""
    mon = QmpMonitor("/nonexistent")
    try:
        with pytest.raises(ValueError, match="allowlist"):
            mon.command("human-monitor-command", **{"command-line": "system_reset"})
        with pytest.raises(ValueError, match="allowlist"):
            mon.hmp("system_reset")
        with pytest.raises(ValueError, match="allowlist"):
            mon.command("system_reset")
    finally:
        mon.close()


# ---- socket addresses and gdb's input ----------------------------------------------------

@pytest.mark.parametrize("text", [
    "127.0.0.1:1234\n-interpreter-exec console \"shell touch /tmp/owned\"",
    "/tmp/gdb.sock\r\nshell id", "127.0.0.1:12\x0034", "a\x1bb:1", "/tmp/x\x7f",
])
def test_control_characters_in_addresses_are_refused(text):
    with pytest.raises(UsageError, match="control character"):
        parse_address(text, "--gdb")


def test_gdb_never_gets_a_second_line():
    assert one_line("-target-select remote /tmp/a b.sock") == "-target-select remote /tmp/a b.sock"
    with pytest.raises(ValueError):
        one_line('-target-select remote x\n-interpreter-exec console "shell id"')


def test_the_cli_refuses_an_injected_gdb_address(tmp_path):
    marker = tmp_path / "owned"
    env = dict(os.environ, QI_GDB=f'127.0.0.1:1\n-interpreter-exec console "shell touch {marker}"',
               QI_QMP=str(tmp_path / "qmp.sock"))
    out = subprocess.run([sys.executable, "-m", "qintrospect", "cpus"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2 and "control character" in out.stderr
    assert not marker.exists()


def test_a_failed_attach_leaves_no_gdb(tmp_path):
    gdb = GdbStub(str(tmp_path / "missing.sock"), timeout=2)
    with pytest.raises(Exception):
        gdb.connect()
    assert gdb._proc is None


# ---- only RAM is readable ----------------------------------------------------------------

@pytest.mark.parametrize("kind,readable", [
    ("ram", True), ("rom", True), ("nv-ram", True), ("ramd", False), ("romd", False),
    ("i/o", False), ("container", False),
])
def test_only_ram_is_ram(kind, readable):
    r = Region(0x100000, 0x1fffff, kind, "x", 0, 0)
    assert r.is_ram is readable
    assert bool(RamMap([r], {0x100000: 0x7f0000000000}).ram) is readable


# ---- the run-state marker ----------------------------------------------------------------

@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def folder_of(base):
    return base / f"qintrospect-{os.geteuid()}"


def in_folder_lock(key):
    return in_folder(key, suffix=".lock")


def in_folder(key, kind="", suffix=".json"):
    """Where runstate keeps the file of `key` (under the runtime_dir fixture's folder)."""
    return str(folder_of(pathlib.Path(os.environ["XDG_RUNTIME_DIR"]))
               / runstate._name(key, kind, suffix))


def test_marker_folder_is_private(runtime_dir):
    runstate.record("vm", True)
    st = os.stat(folder_of(runtime_dir))
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert runstate.load("vm")["owner"] == os.getpid()


def test_a_folder_open_to_others_is_refused(runtime_dir):
    folder_of(runtime_dir).mkdir(mode=0o777)
    os.chmod(folder_of(runtime_dir), 0o777)
    with pytest.raises(runstate.RunStateError, match="mode 777"):
        runstate.record("vm", True)


def test_a_symlinked_folder_is_refused(runtime_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    os.chmod(elsewhere, 0o700)
    folder_of(runtime_dir).symlink_to(elsewhere)
    with pytest.raises(runstate.RunStateError, match="symlink"):
        runstate.record("vm", True)
    assert not list(elsewhere.iterdir())


def test_a_planted_symlink_is_replaced_not_followed(runtime_dir, tmp_path_factory):
    runstate.record("vm", True)
    victim = tmp_path_factory.mktemp("victim") / "passwd"
    victim.write_text("root:x:0:0\n")
    marker = next(folder_of(runtime_dir).glob("*.json"))
    marker.unlink()
    marker.symlink_to(victim)
    assert runstate.load("vm") is None              # not followed for reading either
    runstate.record("vm", False)
    assert victim.read_text() == "root:x:0:0\n"     # the symlink was replaced, not written through
    assert not marker.is_symlink() and json.loads(marker.read_text())["found_running"] is False


def test_killed_sessions_memory_mode_is_inherited(runtime_dir):
    """A session killed while the stub was in physical mode (1) noted the mode it found (0):
    the next session must put 0 back, not the 1 it finds."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runstate._write("vm", {"qmp": "vm", "owner": dead.pid, "found_running": True,
                           "since": "then", "phys_mode_found": "0"})
    marker = runstate.load("vm")
    assert runstate.phys_mode_left(marker) == "0"
    assert runstate.left_paused(marker, running_now=False) == {"pid": dead.pid, "since": "then"}
    assert runstate.left_paused(marker, running_now=True) is None
    # a live owner's note is its own business
    runstate._write("vm", {"qmp": "vm", "owner": os.getpid(), "phys_mode_found": "0"})
    assert runstate.phys_mode_left(runstate.load("vm")) is None
    # released by a session that never touched the stub: the mode to put back stays noted
    runstate.release("vm", None, "0")
    assert runstate.phys_mode_left(runstate.load("vm")) == "0"
    runstate.release("vm")
    assert runstate.load("vm") is None


# ---- unbounded inputs ----------------------------------------------------------------------

def test_parse_log_of_a_device_is_refused_not_read_forever():
    out = subprocess.run([sys.executable, "-m", "qintrospect", "parse-log", "/dev/zero"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "larger than" in out.stderr and "Traceback" not in out.stderr


def test_a_cut_register_value_is_refused():
    from qintrospect.errors import ParseError
    from qintrospect.machine.monitor_text import parse_registers
    good = ("CR0=80050033 CR2=00007f0000000000 CR3=0000000002946000 CR4=00350ef0\n"
            "EFER=0000000000000d01\n")
    assert parse_registers(good)["CR3"] == 0x2946000
    with pytest.raises(ParseError, match="CR3= has 10 hex digits"):
        parse_registers(good.replace("CR3=0000000002946000", "CR3=0000000002"))


def test_protection_key_registers_are_used_where_qemu_prints_them():
    """QEMU up to 10.0 prints no PKRU; if `info registers` does, the walk uses it."""
    from qintrospect.machine.vcpus import Vcpus

    class Qmp:
        def hmp(self, line, cpu_index=None):
            return ("CR0=80050033 CR2=0000000000000000 CR3=0000000002946000 CR4=00750ef0\n"
                    "EFER=0000000000000d01\nPKRU=55555554\n")

        def command(self, name, **args):
            from qintrospect.errors import QIError
            raise QIError("not here")

    vcpus = Vcpus(Qmp(), [{"cpu-index": 0, "thread-id": 1, "qom-path": "/machine/cpu"}])
    v = vcpus.from_monitor()[0]
    assert v.pkru == 0x55555554 and v.pkrs is None and v.to_dict()["pkru"] == "0x55555554"
    cpu = vcpus.cpu_state(v)
    assert cpu.pkru == 0x55555554 and cpu.pkrs is None


def test_a_remote_qmp_without_gdb_finds_no_process_and_says_so():
    """peer_pid of no gdbstub once raised TypeError (exit 4) for a remote --qmp alone."""
    from qintrospect.connect.session import Session
    s = Session("127.0.0.1:1", None, allow_remote=True)
    s.source.qmp_address = ("192.0.2.1", 4444)     # a remote monitor: no local peer
    s.source._find_process(s)
    assert s.process is None and "not found" in s.process_note


@given(st.one_of(
    st.tuples(*[st.integers(0, 300)] * 4).map(lambda t: ".".join(map(str, t))),
    st.tuples(st.just("127"), st.text("0123456789١", min_size=1, max_size=4),
              st.text("0123456789", min_size=1, max_size=4),
              st.text("0123456789 ", min_size=1, max_size=4)).map(".".join),
    st.sampled_from(["::1", "localhost", "::ffff:127.0.0.1", "0:0:0:0:0:0:0:1", "127.0.0"])))
@settings(max_examples=400, deadline=None)
def test_the_loopback_shortcut_agrees_with_ipaddress(host):
    """QMP/gdb addresses on 127.x.y.z are told loopback without loading ipaddress: the same
    answer ipaddress gives, for any text."""
    import ipaddress
    from qintrospect.connect.qmp import _is_loopback
    try:
        want = ipaddress.ip_address(host).is_loopback
    except ValueError:
        want = host == "localhost"
    assert _is_loopback(host) == want


@pytest.mark.parametrize("env", [{}, {"TMPDIR": "{tmp}"}, {"TMP": "{tmp}"},
                                 {"TMPDIR": "{tmp}/missing", "TEMP": "{tmp}"},
                                 {"TEMP": "{tmp}/sub/.."}])
def test_the_marker_folder_is_where_tempfile_says(env, tmp_path, monkeypatch):
    """The run-state markers live under tempfile.gettempdir() (found without tempfile)."""
    import tempfile
    for name in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "sub").mkdir()
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)       # its cache
    assert runstate._temp_base() == tempfile.gettempdir()


def test_the_vm_lock_waits_then_names_who_holds_it(runtime_dir):
    """One qintrospect at a time relies on or changes a VM's run state: a second waits for
    the first (up to its timeout), then says which process holds the lock."""
    import time
    first, second = runstate.lock_file("vm"), runstate.lock_file("vm")
    try:
        runstate.acquire(first, 1)
        t0 = time.monotonic()
        with pytest.raises(runstate.Busy, match=f"pid {os.getpid()}"):
            runstate.acquire(second, 0.2)
        assert time.monotonic() - t0 >= 0.2
        runstate.let_go(first)
        runstate.acquire(second, 0.2)                  # free now
        st = os.stat(in_folder("vm", suffix=".lock"))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    finally:
        os.close(first)
        os.close(second)
    assert runstate.vm_key("/a/../a/qmp.sock") == os.path.realpath("/a/qmp.sock")
    assert runstate.vm_key(("127.0.0.1", 4444)) == "127.0.0.1:4444"
    assert runstate.vm_key("domain:x", label=True) == "domain:x"


_HOLDER = """
import os, sys, time
from qintrospect.connect import runstate
runstate.lock("vm", 5)
print("held", flush=True)
time.sleep(float(sys.argv[1]))
runstate.unlock("vm")
"""


def test_the_vm_lock_file_goes_with_its_last_holder(runtime_dir):
    """A lock file is removed by the holder that lets go last, so none pile up; counted
    holds of one process keep it until the last."""
    path = in_folder_lock("vm")
    runstate.lock("vm", 1)
    runstate.lock("vm", 1)
    runstate.unlock("vm")
    assert os.path.exists(path)
    runstate.unlock("vm")
    assert not os.path.exists(path) and os.listdir(folder_of(runtime_dir)) == []


def test_a_waiter_whose_lock_file_was_removed_takes_the_new_one(runtime_dir, monkeypatch):
    """The race the removal opens: this process opens the lock file while another holds it;
    that one lets go and removes it; the flock this one then gets is on a file no longer
    there, so it takes the file there now, and a third process still has to wait for it."""
    said = []
    names = runstate._names
    monkeypatch.setattr(runstate, "_names",
                        lambda path, fd: said.append(names(path, fd)) or said[-1])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, "0.5"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        runstate.lock("vm", 10)
        try:
            assert said[0] is False and said[-1] is True      # the old file, then the new
            third = subprocess.run([sys.executable, "-c", _HOLDER.replace('lock("vm", 5)',
                                                                          'lock("vm", 0.2)'),
                                    "0"], capture_output=True, text=True, timeout=30)
            assert third.returncode != 0 and "Busy" in third.stderr, third.stderr
            assert f"another qintrospect (pid {os.getpid()})" in third.stderr   # /proc/locks
        finally:
            runstate.unlock("vm")
    finally:
        holder.wait(timeout=30)
    assert not os.path.exists(in_folder_lock("vm"))


def test_lock_files_no_one_holds_are_pruned(runtime_dir):
    """A killed qintrospect leaves its lock file; the next new fact prunes it, never one that
    is held."""
    os.close(runstate.lock_file("left-by-a-killed-one"))
    held = runstate.lock_file("in-use")
    try:
        runstate.acquire(held, 1)
        runstate.remember("a fact", os.getpid())
        assert not os.path.exists(in_folder_lock("left-by-a-killed-one"))
        assert os.path.exists(in_folder_lock("in-use"))
    finally:
        os.close(held)


def test_the_vm_lock_is_never_a_symlink(runtime_dir):
    runstate.record("vm", True)                       # makes the folder
    target = runtime_dir / "elsewhere"
    os.symlink(target, in_folder("vm", suffix=".lock"))
    with pytest.raises(OSError):
        runstate.lock_file("vm")
    assert not target.exists()


def test_sessions_of_one_process_share_the_lock(runtime_dir):
    """A nested translation holds an inner VM's session while it opens the outer one: within
    one process the lock is counted, and let go when the last holder lets go."""
    runstate.lock("vm", 0.1)
    runstate.lock("vm", 0.1)                 # no wait for ourselves
    other = runstate.lock_file("vm")         # another process's view: a second description
    try:
        runstate.unlock("vm")
        with pytest.raises(runstate.Busy):
            runstate.acquire(other, 0.05)    # still held once
        runstate.unlock("vm")
        runstate.acquire(other, 0.05)        # free
    finally:
        os.close(other)
    runstate.unlock("vm")                    # (more unlocks than locks: nothing)


def test_facts_are_remembered_for_a_live_process_only(runtime_dir):
    """A proof (QEMU holds this VM's RAM) is kept for the life of the process it is about:
    facts of processes gone are forgotten when the next one is kept."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()                                      # a pid that is gone
    runstate.remember("about a dead one", child.pid)
    runstate.remember("about me", os.getpid())        # prunes the dead one's fact
    assert runstate.remembered("about me")
    assert not runstate.remembered("about a dead one")
    assert not runstate.remembered("never said")
    path = in_folder("about me", "fact-")
    os.unlink(path)
    os.symlink(runtime_dir / "elsewhere", path)       # never followed
    assert not runstate.remembered("about me")
    os.symlink("/dev/zero", in_folder("endless", "fact-"))
    runstate.remember("about me", os.getpid())        # its pruning reads no endless file
    assert runstate.remembered("about me")


def test_events_between_commands_are_read_within_bounds(monkeypatch):
    """What a monitor sent between two commands is read without waiting and told to the
    listeners: never more than MAX_DRAIN bytes a look (a monitor that never stops talking
    cannot hold the shell), and a line longer than MAX_MESSAGE is refused as not QMP."""
    import socket
    from qintrospect.connect import qmp
    from qintrospect.errors import AttachError
    mine, theirs = socket.socketpair()
    m = QmpMonitor("/qmp.sock", 1.0)
    m._sock = mine
    seen = []
    m.listeners.append(seen.append)
    try:
        m.poll()
        assert seen == []
        theirs.sendall(b'{"event": "STOP"}\n{"return": {}, "id": "old"}\n{"event": "RESUME"}\n')
        m.poll()
        assert seen == ["STOP", "RESUME"]
        monkeypatch.setattr(qmp, "MAX_DRAIN", 4096)
        theirs.sendall(b'{"event": "X", "data": {}}\n' * 4000)      # ~100 KB waiting
        m.poll()
        assert 2 < len(seen) < 2 + 4096 // 26 + 2
        assert mine.recv(1 << 20, socket.MSG_PEEK)                # the rest left for later
        while True:                                               # (read it all)
            mine.setblocking(False)
            try:
                mine.recv(1 << 20)
            except BlockingIOError:
                break
        monkeypatch.setattr(qmp, "MAX_MESSAGE", 1000)
        monkeypatch.setattr(qmp, "MAX_DRAIN", 1 << 20)
        m._lines.discard()
        theirs.sendall(b"{" * 5000)                               # no line end, ever
        with pytest.raises(AttachError, match="without a line end"):
            m.poll()
    finally:
        mine.close()
        theirs.close()


@pytest.mark.parametrize("reply", [[], None, "x", 7, [{"base-memory": 1}]])
def test_a_memory_size_summary_that_is_not_an_object_says_nothing(reply):
    """query-memory-size-summary's answer is only compared between commands: one that is not
    a JSON object means no baseline (no re-read), never an AttributeError at attach."""
    from qintrospect.connect.session import Session
    from qintrospect.connect.sources import SocketSource

    class Qmp:
        def command(self, name, **args):
            assert name == "query-memory-size-summary"
            return reply

    s = Session("/nonexistent.sock")
    s.qmp = Qmp()
    assert SocketSource._memory_size(s) is None
    s.qmp.command = lambda name, **args: {"base-memory": 1 << 28, "plugged-memory": 0}
    assert SocketSource._memory_size(s) == (1 << 28, 0)
