"""`qintrospect shell` without a VM: the lines parsed by the command line's own subparsers, the
attach options refused per command, the run state around each command (a fake monitor records
what is sent), exit statuses, the prompt only on a terminal, completion and the history file."""

import io
import os
import signal
import stat
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from qintrospect import shell
from qintrospect.frontend import lines
from qintrospect.machine.cpu import Vcpu
from qintrospect.errors import UsageError
from qintrospect.connect.runguard import RunGuard
from qintrospect.commands.read import MemoryPiece


class FakeMonitor:
    """QMP as the shell's run-state guard sees it: commands recorded, and STOP/RESUME told to
    every listener as QEMU tells every monitor (`owner_*`: someone else's monitor)."""

    def __init__(self, running=True):
        self.running = running
        self.sent = []
        self.listeners = []
        self.fail_cont = None

    def command(self, name, **arguments):
        self.sent.append(name)
        if name == "query-status":
            return {"status": "running" if self.running else "paused", "running": self.running}
        if name == "stop":
            self._set(False)
        elif name == "cont":
            if self.fail_cont is not None:
                raise self.fail_cont
            self._set(True)
        return {}

    def _set(self, running):
        was, self.running = self.running, running
        if was != running:
            for listener in list(self.listeners):
                listener("RESUME" if running else "STOP")

    def owner_resumes(self):
        self._set(True)

    def owner_pauses(self):
        self._set(False)

    def poll(self):
        pass

    def close(self):
        pass


class FakeGuard(RunGuard):
    """The real guard over the fake monitor, its lock recorded instead of taken."""

    def __init__(self, monitor, held=False):
        super().__init__(lambda: monitor, "fake-vm", None, 1.0, [])
        self._listen(monitor)
        self.found = {"status": "running" if monitor.running else "paused",
                      "running": monitor.running}
        if held and monitor.running:             # as `shell` attaches: paused, ours
            monitor.running = False
            self.ours = True

    def take_lock(self):
        self.monitor.sent.append("lock")

    def release_lock(self):
        self.monitor.sent.append("unlock")


class FakeSession:
    """What the command functions and the shell use of a Session."""

    def __init__(self, running=True, vcpus=2, gdb=None, held=False):
        self.qmp = FakeMonitor(running)
        self.guard = FakeGuard(self.qmp, held)
        self.gdb = gdb
        self.vcpu = 0
        self.found_status = self.guard.found
        self._vcpus = [Vcpu(i, 100 + i, None, 0x80050033, 0x1000 * (i + 1), 0x20, 0xd01, 0x10)
                       for i in range(vcpus)]
        self.refreshed = 0
        self.read_calls = []
        self.explode = None          # an exception the next registers read raises
        self.live = False
        self.process = None
        self.warnings = []
        from qintrospect import paging      # the registers last read (Session.cpu): x86 here
        self.cpu = paging.CpuState(0x80050033, 0x1000, 0x20, 0xd01)

    @property
    def vcpu_info(self):
        if self.explode is not None:
            exc, self.explode = self.explode, None
            raise exc
        self.qmp.sent.append(f"registers of vCPU {self.vcpu}")
        return self._vcpus

    def refresh(self):
        self.refreshed += 1
        self.qmp.sent.append("refresh")

    def own_registers(self):
        """(Session.own_registers: after every command; nothing to put back here.)"""

    def select_vcpu(self, index):
        if not 0 <= index < len(self._vcpus):
            raise UsageError(f"vCPU {index}: this VM has {len(self._vcpus)} vCPU(s)")
        self.qmp.sent.append(f"select {index}")
        self.vcpu = index

    def check_live(self, final=False):
        self.guard.check(sync=False)

    def read_pieces(self, address, length, physical=False, cr3=None):
        self.read_calls.append((address, length, physical, cr3))
        yield MemoryPiece(address, length, None if physical else address, b"\x01" * length)

    def describe(self):
        return {"qmp": "/x/qmp.sock", "gdb": None, "gdb_note": None, "status_found":
                self.found_status["status"], "vcpu": self.vcpu, "vcpus": len(self._vcpus),
                "memory_path": "direct"}


def make(vm=None, hold=False, **kw):
    vm = vm or FakeSession(held=hold)
    out, err = io.StringIO(), io.StringIO()
    sh = shell.Shell(vm, hold, stdin=io.StringIO(kw.pop("text", "")), stdout=out, stderr=err,
                     interactive=kw.pop("interactive", False), **kw)
    return sh, vm, out, err


def run_lines(sh, monkeypatch, out):
    monkeypatch.setattr(sys, "stdout", out)      # the command functions print to sys.stdout
    return sh.run()


# ---- parsing --------------------------------------------------------------------------------

def test_every_shell_command_comes_from_the_command_line_parser():
    parsers = lines.command_parsers(shell.COMMANDS)
    assert list(parsers) == list(shell.COMMANDS)
    args = lines.parse_command(parsers, ["translate", "--json", "--cr3", "0x1000", "0x5"])
    assert args.json and args.cr3 == "0x1000" and args.addresses == ["0x5"]
    assert args.vcpu is None and args.verbose is False
    assert args.func.__name__ == "cmd_translate"
    args = lines.parse_command(parsers, ["vmmap", "--user", "--vcpu", "1"])
    assert args.user and args.vcpu == 1


@pytest.mark.parametrize("words", [
    ["translate", "--qmp", "/x", "0x1"], ["vmmap", "--gdb", "127.0.0.1:1"],
    ["read", "--freeze", "0x1", "8"], ["cpus", "--pid", "5"], ["cpus", "--via", "gdb"],
    ["kvm", "--timeout", "3"], ["cpus", "--allow-remote"], ["cpus", "--fre"],   # abbreviated
    ["cpus", "--name", "vm1"], ["cpus", "--domain", "d"],
])
def test_attach_options_are_the_shells_own(words):
    with pytest.raises(UsageError, match="the shell's own option"):
        lines.parse_command(lines.command_parsers(shell.COMMANDS), words)


@pytest.mark.parametrize("words,why", [
    (["translate", "-"], "stdin"), (["translate", "--outer", "qmp=/x", "0x1"], "--outer"),
    (["resume"], "unknown command"), (["report", "0x1"], "unknown command"),
])
def test_lines_the_shell_cannot_run(words, why):
    with pytest.raises(UsageError, match=why):
        lines.parse_command(lines.command_parsers(shell.COMMANDS), words)


def test_argparse_errors_exit_2_as_on_the_command_line():
    with pytest.raises(SystemExit) as e:
        lines.parse_command(lines.command_parsers(shell.COMMANDS), ["read", "0x1"])
    assert e.value.code == 2


# ---- completion -----------------------------------------------------------------------------

def test_completion_of_commands_options_and_files(tmp_path):
    parsers = lines.command_parsers(shell.COMMANDS)
    assert shell.completions(parsers, "", 0, "") == sorted(shell.COMMANDS + shell.BUILTINS)
    assert shell.completions(parsers, "tr", 0, "tr") == ["translate"]
    assert shell.completions(parsers, "translate --j", 10, "--j") == ["--json"]
    opts = shell.completions(parsers, "translate --", 10, "--")
    assert "--find-cr3" in opts and "--qmp" not in opts and "--gdb" not in opts
    assert "--vcpu" in opts                      # a command may still pick its vCPU
    assert shell.completions(parsers, "cr3 ", 4, "") == ["comm", "pid", "vcpu"]
    assert shell.completions(parsers, "help f", 5, "f") == ["find-cr3"]
    (tmp_path / "gpt.log").write_text("x")
    line = f"compare --log {tmp_path}/gp"
    assert shell.completions(parsers, line, line.index(str(tmp_path)), f"{tmp_path}/gp") == \
        [f"{tmp_path}/gpt.log"]


# ---- the run state around each command ------------------------------------------------------

def test_a_running_vm_is_paused_only_while_a_command_runs(monkeypatch):
    sh, vm, out, err = make(text="cpus\ncpus\n")
    assert run_lines(sh, monkeypatch, out) == 0
    one = ["lock", "query-status", "stop", "refresh", "registers of vCPU 0", "cont", "unlock"]
    assert vm.qmp.sent == one + one
    assert vm.qmp.running
    assert out.getvalue().count("vCPU 0  host thread 100") == 2


def test_a_paused_vm_is_not_resumed(monkeypatch):
    vm = FakeSession(running=False)
    sh, vm, out, err = make(vm, text="cpus\n")
    assert run_lines(sh, monkeypatch, out) == 0
    assert vm.qmp.sent == ["lock", "query-status", "refresh", "registers of vCPU 0", "unlock"]
    assert "stop" not in vm.qmp.sent and "cont" not in vm.qmp.sent
    assert vm.found_status["running"] is False     # what close() puts back


def test_held_vm_sees_no_run_state_traffic(monkeypatch):
    sh, vm, out, err = make(hold=True, text="cpus\ncpus --json\n")
    assert run_lines(sh, monkeypatch, out) == 0
    assert vm.qmp.sent == ["registers of vCPU 0"] * 2


def test_ctrl_c_in_a_command_undoes_its_pause_and_the_shell_goes_on(monkeypatch):
    sh, vm, out, err = make(text="cpus\ncpus\n")
    vm.explode = KeyboardInterrupt()
    assert run_lines(sh, monkeypatch, out) == 130
    assert vm.qmp.sent[:6] == ["lock", "query-status", "stop", "refresh", "cont", "unlock"]
    assert "interrupted" in err.getvalue()
    assert out.getvalue().count("host thread 100") == 1      # the next command ran
    assert vm.qmp.running


def test_sigterm_in_a_command_undoes_its_pause_and_ends_the_shell(monkeypatch):
    sh, vm, out, err = make(text="cpus\ncpus\n")
    vm.explode = shell.Terminate()
    assert run_lines(sh, monkeypatch, out) == shell.EXIT_TERMINATED
    assert vm.qmp.sent == ["lock", "query-status", "stop", "refresh", "cont", "unlock"]
    assert "terminated" in err.getvalue() and vm.qmp.running


def test_a_vm_its_owner_resumed_is_never_paused_again_on_leaving(monkeypatch):
    """Found paused, resumed by its owner between two commands, then quit: the shell sends no
    `stop` (before, close() put back "found paused" and paused a VM its owner had resumed)."""
    vm = FakeSession(running=False)
    sh, vm, out, err = make(vm, text="cpus\n")
    assert run_lines(sh, monkeypatch, out) == 0
    vm.qmp.owner_resumes()
    sh.stdin = io.StringIO("cpus\n")
    assert sh.run() == 0                       # the next command pauses it, as a running VM
    assert vm.qmp.sent[-7:] == ["lock", "query-status", "stop", "refresh",
                                "registers of vCPU 0", "cont", "unlock"]
    vm.guard.leave()                           # quit
    assert vm.qmp.running and vm.qmp.sent.count("stop") == 1
    assert vm.qmp.sent.count("cont") == 1      # only the one that undid its own stop


def test_a_held_vm_its_owner_resumes_is_theirs_from_then_on(monkeypatch):
    """--freeze (or gdb) holds a running VM paused for the whole shell; if its owner resumes
    it, the shell pauses it per command from then on, and leaving sends nothing."""
    sh, vm, out, err = make(hold=True, text="cpus\n")
    assert run_lines(sh, monkeypatch, out) == 0 and vm.qmp.sent == ["registers of vCPU 0"]
    vm.qmp.owner_resumes()
    assert not vm.guard.ours
    sh.stdin = io.StringIO("cpus\n")
    assert sh.run() == 0
    assert vm.qmp.sent[1:] == ["lock", "query-status", "stop", "refresh",
                               "registers of vCPU 0", "cont", "unlock"]
    vm.guard.leave()
    assert vm.qmp.running and vm.qmp.sent.count("stop") == 1


def test_a_resume_behind_the_shells_back_during_a_command_is_said(monkeypatch):
    """A VM found paused (its owner's pause) is trusted only while watched: resumed during a
    command, the command ends with exit 3 and says so, and the VM is left running."""
    vm = FakeSession(running=False)
    original = vm.read_pieces

    def resumed_meanwhile(*a, **k):
        vm.qmp.owner_resumes()
        return original(*a, **k)

    vm.read_pieces = resumed_meanwhile
    sh, vm, out, err = make(vm, text="read --phys 0x1000 8\ncpus\n")
    assert run_lines(sh, monkeypatch, out) == 3
    assert "resumed by someone else while qintrospect read it (found paused)" in err.getvalue()
    assert vm.qmp.running and "stop" not in vm.qmp.sent[:vm.qmp.sent.index("refresh")]
    assert out.getvalue().count("host thread 100") == 1       # the shell went on


def test_the_lock_is_let_go_when_cont_fails(monkeypatch):
    """A `cont` that raises still lets go of the VM's lock (before, release_lock was
    skipped)."""
    from qintrospect.errors import VMGoneError
    sh, vm, out, err = make(text="cpus\n")
    vm.qmp.fail_cont = VMGoneError("QMP connection lost during cont")
    assert run_lines(sh, monkeypatch, out) == 3
    sent = vm.qmp.sent
    assert "cont" in sent and "unlock" in sent[sent.index("cont"):]


def test_signals_are_held_back_not_lost_during_a_pause_change():
    import threading
    got = []
    old = signal.signal(signal.SIGINT, lambda *a: got.append("int"))
    try:
        with shell.deferred_signals():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            assert got == []                 # blocked inside: a pause and its resume stay whole
        assert got == ["int"]                # delivered right after
    finally:
        signal.signal(signal.SIGINT, old)


# ---- builtins, statuses, output -------------------------------------------------------------

def test_exit_status_is_the_last_failing_commands(monkeypatch):
    text = "cpus\nbogus\nvcpu 7\ncpus\nread 0x1\ncpus\n"
    sh, vm, out, err = make(text=text)
    assert run_lines(sh, monkeypatch, out) == 2
    assert "unknown command 'bogus'" in err.getvalue()
    assert out.getvalue().count("host thread 100") == 3      # the shell went on each time
    sh, vm, out, err = make(text="cpus\n\n# a comment\ncpus\n")
    assert run_lines(sh, monkeypatch, out) == 0


def test_quit_ends_and_no_prompt_or_banner_when_not_a_terminal(monkeypatch):
    sh, vm, out, err = make(text="cpus\nquit\ncpus\n")
    assert run_lines(sh, monkeypatch, out) == 0
    text = out.getvalue()
    assert text.count("host thread 100") == 1
    assert "qi>" not in text and "qintrospect shell" not in text and err.getvalue() == ""


def test_cr3_and_vcpu_builtins(monkeypatch):
    text = ("cr3 0x5000\nread 0x1000 8\nread --cr3 0x7000 0x1000 8\nread --phys 0x1000 8\n"
            "cr3\ncr3 vcpu\nread 0x1000 8\nvcpu 1\nvcpu\ncpus --vcpu 0\nvcpu\n")
    sh, vm, out, err = make(text=text)
    assert run_lines(sh, monkeypatch, out) == 0, err.getvalue()
    assert vm.read_calls == [(0x1000, 8, False, 0x5000), (0x1000, 8, False, 0x7000),
                             (0x1000, 8, True, None), (0x1000, 8, False, None)]
    assert "root: 0x5000" in out.getvalue() and "root: vCPU 0's CR3" in out.getvalue()
    assert vm.vcpu == 1 and "vCPU 1 of 2" in out.getvalue()
    # `cpus --vcpu 0` ran with vCPU 0 and went back to vCPU 1
    sent = vm.qmp.sent
    i = sent.index("select 0")
    assert sent[i + 2] == "select 1"


@pytest.mark.parametrize("arch, register", [
    ("aarch64", "TTBR0_EL1"), ("aarch64-vhe", "TTBR0_EL2"), ("riscv64", "satp")])
def test_cr3_names_the_root_register_of_the_guest(arch, register):
    """`cr3` on aarch64 and riscv64 names the register `cr3 HEX` stands in for: TTBR0_EL1
    (TTBR0_EL2 on a VHE host at EL2, the EL2&0 regime) or satp, never CR3."""
    from qintrospect.paging.arm64_format import Arm64State
    from qintrospect.paging.riscv_format import RiscvState
    sh, vm, out, err = make()
    vm.cpu = (RiscvState(satp=8 << 60 | 0x80000) if arch == "riscv64" else
              Arm64State(0x41000, 0x42000, 0x35, 1, 0, cpsr=0x3c9 if arch != "aarch64" else
                         0x3c5, regime="EL2&0" if arch != "aarch64" else "EL1&0"))
    for line in ("cr3", "cr3 0x5000", "cr3 vcpu", "cr3"):
        assert sh.execute(line) and sh.status == 0, err.getvalue()
    assert out.getvalue().splitlines() == [
        f"root: vCPU 0's {register}", "root: 0x5000 for translate, vmmap and read without --cr3",
        f"root: vCPU 0's {register}", f"root: vCPU 0's {register}"]
    with pytest.raises(UsageError, match=f"back to the vCPU's {register}$"):
        sh._builtin("cr3", ["a", "b"])


def test_prompt_shows_the_root():
    sh, vm, out, err = make()
    assert sh.prompt() == "qi> "
    sh.execute("cr3 0x2000")
    assert sh.prompt() == "qi cr3=0x2000> "


def test_help_lists_commands_and_shows_a_commands_options():
    sh, vm, out, err = make()
    sh.execute("help")
    text = out.getvalue()
    for name in shell.COMMANDS + ("cr3 HEX", "vcpu N", "quit"):
        assert name in text
    sh.execute("help vmmap")
    assert "--writable" in out.getvalue()


def test_banner_says_how_the_vm_is_held():
    sh, vm, out, err = make()
    assert "paused only while a command runs" in sh.banner()
    sh, vm, out, err = make(hold=True)
    assert "whole shell (--freeze)" in sh.banner()
    sh, vm, out, err = make(FakeSession(gdb=object()), hold=True)
    assert "gdbstub is attached for the whole shell" in sh.banner()


# ---- history --------------------------------------------------------------------------------

class FakeReadline:
    def write_history_file(self, path):
        with open(path, "w") as f:
            f.write("translate 0x1000\n")


def test_history_written_0600_and_never_through_a_symlink(tmp_path):
    path = tmp_path / ".qintrospect_history"
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    os.symlink(target, path)
    old = os.umask(0o022)
    try:
        shell.save_history(FakeReadline(), str(path))
    finally:
        os.umask(old)
    assert target.read_text() == "keep"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert path.read_text() == "translate 0x1000\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".qintrospect_history.")] \
        == []


# ---- the command line ------------------------------------------------------------------------

def test_shell_subcommand_usage():
    proc = subprocess.run([sys.executable, "-m", "qintrospect", "shell", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--freeze" in proc.stdout and "--gdb" in proc.stdout
    env = {k: v for k, v in os.environ.items() if k not in ("QI_QMP", "QI_GDB")}
    proc = subprocess.run([sys.executable, "-m", "qintrospect", "shell"], input="cpus\n",
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "--qmp" in proc.stderr


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from(list("ab-0x ") + ["\t", "\r", "\n", "'", '"', "\\", "#",
                                                  "\x0b", "\x0c", "\xa0", "\u2003", "é"]),
               max_size=16))
def test_a_line_is_split_as_shlex_splits_it(line):
    """The shell's fast split of a plain line gives shlex's words; other lines go to shlex."""
    import shlex
    from qintrospect.shell import split_line
    try:
        want = shlex.split(line, comments=True)
    except ValueError:
        with pytest.raises(ValueError):
            split_line(line)
        return
    assert split_line(line) == want
