"""Issue 13, item 2: `qintrospect shell` on a real QEMU guest.

The guest has a second QMP monitor that only the tests use: through it the run state is seen
while the shell holds the first one, between commands and in the middle of one. Scripted
shells print what the command line prints; interactive ones (a pty) have a banner, a prompt,
completion and a 0600 history; Ctrl-C and SIGTERM leave the VM as found. The last test prints
(asserts nothing about) one shell `translate` against one HMP `gva2gpa` round trip.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from qintrospect.machine.monitor_text import parse_gva2gpa
from vm.guest import qmp_once

from .conftest import REPO, booted, run_cli
from .test_safety import rsp_query
from .test_translate_chain import stop_on_probe

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    observer = str(tmp_path_factory.mktemp("observer") / "qmp2.sock")
    with booted("max", extra_args=["-qmp", f"unix:{observer},server=on,wait=off"]) as guest:
        guest.observer = observer
        yield guest


def observe(g, command="query-status", **arguments):
    """One QMP command on the tests' own monitor (free while the shell holds the other)."""
    return qmp_once(g.observer, command, **arguments)


def status(g) -> str:
    return observe(g)["status"]


def shell_cmd(g, *extra):
    return [sys.executable, "-m", "qintrospect", "shell", "--qmp", g.qmp_path, *extra]


def regions(g):
    return g.probe["regions"]


# ---- scripted: `qintrospect shell < commands.txt` ---------------------------------------------

def test_script_prints_what_the_command_line_prints(g):
    r = regions(g)
    cr3 = stop_on_probe(g)         # paused on the probe: every run sees the same VM
    try:
        heap, thp, untouched = (hex(r[n]["gva"]) for n in ("heap", "thp", "untouched"))
        lines = [
            ["translate", "--json", heap, thp, untouched],
            ["translate", "--no-bits", heap],
            ["vmmap", "--user"],
            ["read", hex(r["stack"]["gva"] & ~0xF), "64"],
            ["read", "--phys", "0xfed00000", "16"],
            ["cpus", "--json"],
            ["find-cr3", "--gva", heap, "--expect", hex(r["heap"]["value"]), "--json"],
            ["vmmap", "--json", "--range", f"{r['heap']['gva'] & ~0xFFF:#x}-"
                                           f"{(r['heap']['gva'] & ~0xFFF) + 0x1000:#x}",
             "--cr3", hex(cr3)],
        ]
        expected, statuses = [], []
        for words in lines:
            rc, out, err = run_cli(*words, "--qmp", g.qmp_path)
            expected.append(out)
            statuses.append(rc)
        assert statuses == [1, 0, 0, 0, 1, 0, 0, 0], statuses
        script = "".join(" ".join(words) + "\n" for words in lines)
        proc = subprocess.run(shell_cmd(g), input=script, capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert status(g) == "paused", "a VM found paused stays paused"
    finally:
        g.qmp("cont")
    assert proc.stdout == "".join(expected)           # no prompt, no banner, the same bytes
    assert proc.returncode == 1                       # the last failing command's status
    assert "Traceback" not in proc.stderr


def test_exit_status_and_the_shell_goes_on_after_errors(g):
    heap = hex(regions(g)["heap"]["gva"])
    script = (f"translate --brief {heap}\nbogus\nread 0x1\nvcpu 3\n"
              f"translate --cr3 zz {heap}\ntranslate --brief {heap}\n")
    proc = subprocess.run(shell_cmd(g), input=script, capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.count('"gva"') == 2, proc.stdout
    assert "unknown command 'bogus'" in proc.stderr and "vCPU 3" in proc.stderr
    proc = subprocess.run(shell_cmd(g), input=f"cr3\ntranslate --brief {heap}\nquit\nbogus\n",
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "bogus" not in proc.stderr
    assert status(g) == "running"


# ---- the run state, seen from the second monitor ------------------------------------------------

class Piped:
    """A shell on pipes: one line in, its output lines read back."""

    def __init__(self, g, *extra):
        self.proc = subprocess.Popen(shell_cmd(g, *extra), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1, cwd=REPO)

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def ask_done(self, line: str) -> str:
        """ask(), then wait until the command is wholly over: its output comes before the
        VM is resumed, a `cr3` line (no QMP) answers after."""
        out = self.ask(line)
        assert self.ask("cr3").startswith("root:")
        return out

    def close(self) -> int:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.stderr = self.proc.stderr.read()
        return rc


@pytest.mark.parametrize("found", ["running", "paused"])
def test_paused_only_while_a_command_runs(g, found):
    heap = regions(g)["heap"]
    if found == "paused":
        observe(g, "stop")
    try:
        sh = Piped(g)
        try:
            for _ in range(3):
                out = json.loads(sh.ask_done(f"translate --brief {heap['gva']:#x}"))
                assert "gva" in out
                assert status(g) == found              # between commands: as found
        finally:
            rc = sh.close()
        assert rc == 0, sh.stderr
        assert status(g) == found
    finally:
        observe(g, "cont")


def test_a_paused_vm_is_read_again_only_after_an_event(g):
    """A VM found paused stays paused, and its registers are read again only when QEMU said
    something happened since (here: another monitor resumed and stopped it): a command on a
    paused VM costs nothing but its own work, and never uses registers from before a run."""
    import contextlib
    import io
    import qintrospect
    from qintrospect.shell import Shell
    heap = regions(g)["heap"]
    stop_on_probe(g)
    try:
        with qintrospect.attach(qmp=g.qmp_path) as vm:
            reads = []
            refresh = vm.refresh
            vm.refresh = lambda: (reads.append(1), refresh())[1]
            out = io.StringIO()
            sh = Shell(vm, hold=False, stdout=out, stderr=io.StringIO(), interactive=False)
            line = f"translate --brief {heap['gva']:#x}"
            with contextlib.redirect_stdout(out):  # the commands print as on the command line
                for _ in range(3):
                    assert sh.execute(line)
                assert len(reads) == 1 and status(g) == "paused"
                observe(g, "cont")
                observe(g, "stop")                  # RESUME and STOP reach the shell's monitor
                assert sh.execute(line) and sh.execute(line)
            assert len(reads) == 2 and status(g) == "paused"
            answers = [json.loads(x) for x in out.getvalue().splitlines()]
            assert len(answers) == 5 and {a["gpa"] for a in answers} == {f"{heap['gpa']:#x}"}
            assert sh.status == 0
    finally:
        g.qmp("cont")


@pytest.mark.parametrize("found", ["running", "paused"])
@pytest.mark.parametrize("how", ["--freeze", "--gdb"])
def test_held_for_the_whole_shell(g, how, found):
    heap = regions(g)["heap"]
    extra = ["--freeze"] if how == "--freeze" else ["--gdb", g.gdb_address, "--via", "gdb"]
    if found == "paused":
        observe(g, "stop")
    try:
        sh = Piped(g, *extra)
        try:
            for _ in range(2):
                assert "gva" in json.loads(sh.ask_done(f"translate --brief {heap['gva']:#x}"))
                assert status(g) == "paused"
            assert json.loads(sh.ask("cpus --json"))["index"] == 0
            assert sh.ask("vcpu 0").strip() == "vCPU 0"
        finally:
            rc = sh.close()
        assert rc == 0, sh.stderr
        assert status(g) == found
        if how == "--gdb":
            assert rsp_query(g.gdb_address, "qqemu.PhyMemMode") == "0"   # (this stops the VM)
    finally:
        observe(g, "cont")


def test_one_qintrospect_at_a_time_changes_the_run_state(g):
    """While another qintrospect holds the QEMU process's lock (here: this test, as one
    would), a command through the VM's other QMP socket waits for it, then gives up with exit 3
    naming the holder, the VM untouched; let go, the same command runs. A shell on the first
    socket lets go between its commands."""
    from qintrospect.connect import runstate
    heap = regions(g)["heap"]["gva"]
    other = ["--qmp", g.observer, "--gdb", g.gdb_address]
    fd = runstate.lock_file(f"qemu-pid:{g.pid}")
    try:
        runstate.acquire(fd, 1)
        rc, out, err = run_cli("translate", *other, "--timeout", "1", f"{heap:#x}")
        assert rc == 3 and f"another qintrospect (pid {os.getpid()})" in err, err
        assert status(g) == "running" and out == ""
        runstate.let_go(fd)
        rc, out, err = run_cli("translate", *other, f"{heap:#x}")
        assert rc == 0, err
    finally:
        os.close(fd)
    sh = Piped(g)
    try:
        assert "gva" in json.loads(sh.ask_done(f"translate --brief {heap:#x}"))
        rc, out, err = run_cli("translate", *other, "--timeout", "2", f"{heap:#x}")
        assert rc == 0, err                     # between the shell's commands
        assert "gva" in json.loads(sh.ask_done(f"translate --brief {heap:#x}"))
    finally:
        assert sh.close() == 0, sh.stderr
    assert status(g) == "running"


# ---- interactive: a terminal ----------------------------------------------------------------------

def spawn(g, home, *extra):
    import pexpect
    env = dict(os.environ, HOME=str(home), TERM="dumb")
    return pexpect.spawn(sys.executable, ["-m", "qintrospect", "shell", "--qmp", g.qmp_path,
                                          *extra], cwd=REPO, env=env, encoding="utf-8",
                         timeout=60, dimensions=(50, 200))


def test_interactive_banner_completion_ctrl_c_and_history(g, tmp_path):
    import pexpect
    heap = hex(regions(g)["heap"]["gva"])
    p = spawn(g, tmp_path)
    try:
        p.expect("qi> ")
        assert "the VM is paused only while a command runs" in p.before
        assert status(g) == "running"
        p.send("trans\t")
        p.expect("translate ")
        p.send("--bri\t")
        p.expect("--brief ")
        p.sendline(heap)
        p.expect('"gva"')
        p.expect("qi> ")
        p.sendintr()                       # Ctrl-C at the prompt, twice: nothing special
        p.expect("qi> ")
        p.sendintr()
        p.expect("qi> ")
        # a long command: 64 MiB hexdumped into a terminal nobody reads blocks mid-command
        p.sendline("read --phys 0x0 67108864")
        time.sleep(2)
        assert status(g) == "paused"
        p.sendintr()
        p.expect("interrupted; the VM was left as found")
        p.expect("qi> ")
        assert status(g) == "running"
        p.sendline(f"translate --brief {heap}")
        p.expect('"gva"')
        p.expect("qi> ")
        p.sendline("quit")
        p.expect(pexpect.EOF)
    finally:
        p.close(force=True)
    assert p.exitstatus == 130             # the interrupted command was the last to fail
    assert status(g) == "running"
    history = tmp_path / ".qintrospect_history"
    assert os.stat(history).st_mode & 0o777 == 0o600
    assert f"translate --brief {heap}" in history.read_text()


@pytest.mark.parametrize("found", ["running", "paused"])
def test_sigterm_mid_command_leaves_the_vm_as_found(g, tmp_path, found):
    import pexpect
    if found == "paused":
        observe(g, "stop")
    try:
        p = spawn(g, tmp_path)
        try:
            p.expect("qi> ")
            p.sendline("read --phys 0x0 67108864")
            time.sleep(2)
            assert status(g) == "paused"
            p.kill(signal.SIGTERM)
            p.expect(pexpect.EOF)
        finally:
            p.close(force=True)
        assert p.exitstatus == 143
        assert status(g) == found
    finally:
        observe(g, "cont")


# ---- measured, not asserted -------------------------------------------------------------------

def test_measure_shell_translate_against_gva2gpa(g):
    """One `translate` in the shell against one HMP `gva2gpa` round trip on the same VM,
    interleaved, both from this process: the shell's time is from writing the line to reading
    the `-v` timing line it prints after the command's output (in-shell: that line's own
    figure). Printed; the issue's target is <= 1.0x. Nothing is asserted about time."""
    import threading
    from qemu.qmp.legacy import QEMUMonitorProtocol
    heap = regions(g)["heap"]["gva"]
    cr3 = stop_on_probe(g)
    g.qmp("cont")
    mon = QEMUMonitorProtocol(g.observer)
    mon.connect()
    rows = []
    try:
        for label, extra in (("VM running, paused per command", []),
                             ("--freeze (held)", ["--freeze"]),
                             ("--gdb --via gdb (held, memory through gdb)",
                              ["--gdb", g.gdb_address, "--via", "gdb"])):
            sh = Piped(g, "-v", *extra)
            threading.Thread(target=sh.proc.stdout.read, daemon=True).start()   # drained
            try:
                rows += measure(sh, mon, label, cr3, heap)
            finally:
                rc = sh.close()
            assert rc == 0, sh.stderr
            mon.cmd("cont")      # (a --gdb shell leaves the gdbstub's pause: resume it)
    finally:
        mon.close()
    print()
    for label, s, inner, h in rows:
        print(f"shell translate {s * 1000:6.2f} ms (in-shell {inner * 1000:5.2f})   gva2gpa "
              f"{h * 1000:5.2f} ms   ratio {s / h:5.2f}x (in-shell {inner / h:4.2f}x)   {label}")
    assert status(g) == "running"


def measure(sh, mon, label, cr3, heap):
    """[(label, shell seconds, in-shell seconds, gva2gpa seconds)]: medians of 40, for the
    JSON and the text form of one translate, each after a gva2gpa round trip."""
    def timed(line):
        t0 = time.perf_counter()
        sh.proc.stdin.write(line + "\n")
        sh.proc.stdin.flush()
        while True:
            said = sh.proc.stderr.readline()
            if said.startswith("# translate:"):
                assert said.split()[-1] == "0", said
                return time.perf_counter() - t0, float(said.split()[2]) / 1000

    rows = []
    for form in ("--json", "--no-bits"):
        line = f"translate {form} --cr3 {cr3:#x} {heap:#x}"
        timed(line)                                  # warm: imports, first reads
        shell_t, inner_t, hmp_t = [], [], []
        for _ in range(40):
            t0 = time.perf_counter()
            parse_gva2gpa(mon.cmd("human-monitor-command",
                                  **{"command-line": f"gva2gpa {heap:#x}"}))
            hmp_t.append(time.perf_counter() - t0)
            outer, inner = timed(line)
            shell_t.append(outer)
            inner_t.append(inner)
        rows.append((f"{form:9} {label}", statistics.median(shell_t),
                     statistics.median(inner_t), statistics.median(hmp_t)))
    return rows


def test_qemu_gone_ends_the_shell_with_status_3():
    """QEMU exits between two commands: the next one says so and the shell ends (exit 3)."""
    with booted("qemu64", probe=None) as other:
        sh = Piped(other)
        assert json.loads(sh.ask("cpus --json"))["index"] == 0
        assert sh.ask("cr3").startswith("root:")   # (no QMP: the command before is over)
        other.stop()
        try:
            sh.proc.stdin.write("cpus\ncpus\n")
            sh.proc.stdin.flush()
        except BrokenPipeError:
            pass
        rc = sh.close()
    assert rc == 3, sh.stderr
    assert "cannot be reached any more" in sh.stderr and "Traceback" not in sh.stderr
    assert "during cont" not in sh.stderr


def test_memory_plugged_in_between_commands_is_read(tmp_path):
    """A DIMM plugged in (through another monitor) between two commands is read by the next
    one as a new command line reads it: QMP's memory size summary changed, so the shell read
    the RAM map and QEMU's mappings again."""
    observer = str(tmp_path / "qmp2.sock")
    with booted("qemu64", probe=None, memory="256M,slots=2,maxmem=1G",
                extra_args=["-qmp", f"unix:{observer},server=on,wait=off"]) as other:
        sh = Piped(other)
        top = 0x100000000          # where the pc machine puts its first DIMM
        before = json.loads(sh.ask_done(f"read --phys {top:#x} 8 --json"))
        qmp_once(observer, "object-add", **{"qom-type": "memory-backend-ram", "id": "m1",
                                            "size": 128 << 20})
        qmp_once(observer, "device_add", driver="pc-dimm", id="d1", memdev="m1")
        dimm = qmp_once(observer, "query-memory-devices")[0]["data"]["addr"]
        after = json.loads(sh.ask_done(f"read --phys {dimm:#x} 8 --json"))
        assert sh.close() == 1, sh.stderr     # the status of the first read (unassigned)
        rc, out, err = run_cli("read", "--phys", hex(dimm), "8", "--json", "--qmp",
                               other.qmp_path)
    assert dimm == top
    assert before["data"] is None and "unassigned" in before["note"], before
    assert rc == 0 and after == json.loads(out), (after, out, err)
    assert after["data"] == "00" * 8 and after["note"] is None


@pytest.mark.parametrize("how", [[], ["--via", "gdb"]])
def test_vcpu_switches_whose_registers(how):
    """`vcpu 1` and `--vcpu 1`: vCPU 1's CR3 (QEMU's `info registers -c 1`), back to 0 after a
    command's own --vcpu; with gdb held, the thread switch happens in virtual-address mode."""
    from qintrospect.machine.monitor_text import parse_registers
    from .test_translate_chain import kernel_addresses
    with booted("qemu64", smp=2, probe=None) as two:
        two.qmp("stop")
        kernel = kernel_addresses(two)[0]
        extra = ["--gdb", two.gdb_address, *how] if how else []
        script = (f"translate --json {kernel:#x}\ntranslate --json --vcpu 1 {kernel:#x}\n"
                  f"translate --json {kernel:#x}\nvcpu 1\ntranslate --json {kernel:#x}\n")
        proc = subprocess.run(shell_cmd(two, *extra), input=script, capture_output=True,
                              text=True, cwd=REPO, timeout=120)
        cr3 = [parse_registers(two.qmp("human-monitor-command", **{
            "command-line": "info registers", "cpu-index": i}))["CR3"] for i in (0, 1)]
        assert two.qmp("query-status")["status"] == "paused"
        if how:
            assert rsp_query(two.gdb_address, "qqemu.PhyMemMode") == "0"
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [t["vcpu"] for t in out] == [0, 1, 0, 1]
    assert [int(t["cr3"], 16) for t in out] == [cr3[0], cr3[1], cr3[0], cr3[1]]
    assert len({t["gpa"] for t in out}) == 1
