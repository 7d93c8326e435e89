"""`qintrospect list` among processes that call themselves QEMU and are not all honest.

Each fake is a real process named qemu-system-x86_64 (tests/hostile/fakeqmp.py run by a link
to the Python interpreter, or by a copy of it: then its executable is named as QEMU's), with
a -name chosen to drive a terminal (`\\x1b]0;pwned\\x07`, bytes that are not UTF-8) and a QMP
socket it listens on itself, playing a hostile monitor. The table must show every row, with
the escapes replaced; a bad monitor spoils only its own row ("no answer: ..."); a process
whose executable is not QEMU is said to be so; `list --json` stays JSON, and names that are
not UTF-8 survive it.
"""

import json
import os
import select
import shutil
import subprocess
import sys

import pytest

from .conftest import assert_clean, run_qi

FAKEQMP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakeqmp.py")
PWN_NAME = "\x1b]0;pwned\x07"


class FakeQemu:
    """A process that calls itself QEMU: argv[0] and comm qemu-system-x86_64 (a link to the
    interpreter: its executable is Python's), or, with copy=True, an executable of that name
    (a copy of the interpreter)."""

    def __init__(self, folder, n, play, name, copy=False, extra=()):
        bindir = os.path.join(folder, f"bin{n}")
        os.makedirs(bindir)
        program = os.path.join(bindir, "qemu-system-x86_64")
        python = os.path.realpath(sys.executable)
        if copy:
            shutil.copy(python, program)
        else:
            os.symlink(python, program)
        self.sock = os.path.join(folder, f"q{n}.sock")
        argv = [program, FAKEQMP, "-name", name, "-accel", "tcg", "-m", "64M",
                "-qmp", f"unix:{self.sock},server=on,wait=off", *extra]
        env = dict(os.environ, QI_FAKE_PLAY=play, PYTHONHOME=sys.base_prefix)
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        self.pid = self.proc.pid
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready and self.proc.stdout.readline() == b"READY\n", "the fake did not start"

    def stop(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def fakes(folder):
    made = []

    def start(play, name, **kw):
        made.append(FakeQemu(folder, len(made), play, name, **kw))
        return made[-1]
    yield start
    for f in made:
        f.stop()


def rows_of(out, pid):
    """The table line of `pid`, and the note lines under it."""
    lines = out.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.split() and line.split()[0] == str(pid)]
    notes = []
    for line in lines[i + 1:]:
        if not line.startswith("  ^ "):
            break
        notes.append(line)
    return lines[i], notes


def test_list_among_hostile_fakes(fakes, folder):
    honest = f"honest-{os.getpid()}"
    pwn = fakes("deep-greeting", PWN_NAME)
    raw = fakes("greeting-qmp-text", os.fsdecode(b"vm-\xff\xfe-" + str(os.getpid()).encode()))
    bad_status = fakes("escape-in-status", f"status-{os.getpid()}", copy=True)
    bad_return = fakes("return-5", f"return5-{os.getpid()}", copy=True)
    good = fakes("good", honest, copy=True)

    rc, out, err, seconds = run_qi("list", "--no-libvirt", "--timeout", "1", folder=folder)
    assert_clean(rc, out, err)         # (no ESC, BEL or CSI anywhere: the terminal is safe)
    assert rc == 0 and seconds < 20, (rc, err)

    row, notes = rows_of(out, pwn.pid)
    assert r"\x1b]0;pwned\x07" in row
    assert f"unix:{pwn.sock} (no answer: JSON nested too deeply" in row
    assert len(notes) == 1 and "not QEMU? its executable is " in notes[0] and \
        os.path.realpath(sys.executable) in notes[0]
    row, notes = rows_of(out, raw.pid)
    assert r"vm-\xff\xfe-" in row and "(no answer: malformed greeting" in row and notes
    row, notes = rows_of(out, bad_status.pid)
    assert r"\x1b]0;pwned\x07\x9b2J\ud800" in row and "(answers)" in row and not notes
    row, notes = rows_of(out, bad_return.pid)
    assert "no answer: malformed reply to query-status" in row and not notes
    row, notes = rows_of(out, good.pid)
    assert honest in row and "running" in row and "64 MiB" in row and "tcg" in row
    assert f"unix:{good.sock} (answers)" in row and not notes

    # --json: one JSON object a line, ASCII; names that are not UTF-8 kept (surrogateescape)
    rc, out, err, _ = run_qi("list", "--no-libvirt", "--json", "--timeout", "1", folder=folder)
    assert_clean(rc, out, err)
    assert rc == 0 and out.isascii()
    vms = {v["pid"]: v for v in map(json.loads, out.splitlines())}
    assert vms[pwn.pid]["name"] == PWN_NAME
    assert os.fsencode(vms[raw.pid]["name"]).startswith(b"vm-\xff\xfe-")
    assert vms[pwn.pid]["exe_is_qemu"] is False and vms[good.pid]["exe_is_qemu"] is True
    assert any(n.startswith("not QEMU?") for n in vms[pwn.pid]["notes"])
    assert not any(n.startswith("not QEMU?") for n in vms[good.pid]["notes"])
    assert vms[pwn.pid]["qmp"][0]["state"] == "no answer" and vms[pwn.pid]["attach"] is None
    assert vms[bad_status.pid]["state"] == "\x1b]0;pwned\x07\x9b2J\ud800"
    assert vms[good.pid]["state"] == "running" and vms[good.pid]["attach"] == \
        f"--pid {good.pid}"


def test_attach_by_pid_and_name_among_hostile_fakes(fakes, folder):
    """--pid / --name: the honest fake answers `cpus`; a hostile one is a clear exit 3 whose
    message is printable, whatever its name."""
    honest = f"honest-{os.getpid()}"
    good = fakes("good", honest, copy=True)
    pwn = fakes("capabilities-error-text", PWN_NAME)
    rc, out, err, _ = run_qi("cpus", "--name", honest, "--timeout", "2", folder=folder)
    assert_clean(rc, out, err)
    assert rc == 0 and "CR3 0x28f4000" in out, (rc, err)
    rc, out, err, _ = run_qi("cpus", "--pid", pwn.pid, "--timeout", "2", folder=folder)
    assert_clean(rc, out, err)
    assert rc == 3 and r"(\x1b]0;pwned\x07)" in err and '"error" is not an object' in err, err
    rc, out, err, _ = run_qi("cpus", "--pid", good.pid, "--qmp", pwn.sock, "--timeout", "2",
                             folder=folder)
    assert_clean(rc, out, err)
    assert rc == 3 and '"error" is not an object' in err, err
