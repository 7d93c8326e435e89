"""Launcher for qintrospect's bundled test guest (built by vm/build.sh).

Boots Debian's cloud kernel with the busybox initramfs under QEMU, with the serial console on
a pexpect pty, QMP on a Unix socket in a private temp dir and the gdbstub on a free loopback TCP
port, and runs the ground-truth probe (vm/probe.c) on demand::

    from vm.guest import Guest
    with Guest(cpu="max") as g:          # start() is called by __enter__ if needed
        probe = g.start_probe("spin")    # {"pid": N, "regions": {"heap": {...}, ...}}
        print(g.qmp_path, g.gdb_address, g.pid)

The launcher never keeps a QMP or gdbstub connection open itself: both are free for the code
under test (QEMU serves one client at a time on each). A gdb attaching stops the VM, as usual.

The QEMU binary is ``qemu=`` or else $QI_QEMU or else the system's ``qemu-system-x86_64``.

CLI: ``python -m vm.guest [--cpu max] [--memory 256M] [--smp N] [--qemu BIN]`` boots, starts
the probe and waits for Ctrl-C.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional

import pexpect

__all__ = ["Guest", "GuestError", "GuestNotBuilt", "default_cache_dir", "default_qemu", "PROMPT"]

PROMPT = "qi# "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_SCRIPT = os.path.join(REPO_ROOT, "vm", "build.sh")
CACHE_FILES = ("vmlinuz", "initramfs.cpio.gz", "kernel-release")

_PROBE_RE = re.compile(
    r"PROBE name=(?P<name>\S+) gva=0x(?P<gva>[0-9a-fA-F]+) value=0x(?P<value>[0-9a-fA-F]+)"
    r" gpa=(?P<gpa>0x[0-9a-fA-F]+|none) size=(?P<size>\d+) thp=(?P<thp>[01])"
)
_READY_RE = re.compile(r"PROBE-READY pid=(\d+)")
_READY_LINE_RE = re.compile(r"PROBE-READY pid=(\d+)\r*\n")


class GuestError(RuntimeError):
    """The guest could not be started or did not answer as expected."""


class GuestNotBuilt(GuestError):
    """The kernel/initramfs are not in the cache: run vm/build.sh."""


def default_cache_dir() -> str:
    """Where vm/build.sh puts the guest: $QI_VM_CACHE or ~/.cache/qintrospect/vm."""
    env = os.environ.get("QI_VM_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "qintrospect", "vm")


def default_qemu() -> str:
    """The QEMU binary to boot: $QI_QEMU (e.g. the private QEMU 10.x wrapper that
    vm/qemu-backports.sh installs) or the system's qemu-system-x86_64."""
    return os.environ.get("QI_QEMU") or "qemu-system-x86_64"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGTERM if the launching thread dies without tearing down."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _Transcript(io.TextIOBase):
    """pexpect logfile_read: keeps the whole console in memory, optionally tees to a file."""

    def __init__(self, tee=None):
        super().__init__()
        self._buf = io.StringIO()
        self._tee = tee

    def write(self, s):
        self._buf.write(s)
        if self._tee is not None:
            self._tee.write(s)
            self._tee.flush()
        return len(s)

    def flush(self):
        pass

    def getvalue(self) -> str:
        return self._buf.getvalue()

    def tail(self, n=2000) -> str:
        return self._buf.getvalue()[-n:]


def parse_probe_output(text: str) -> dict:
    """Parse the probe's lines: {"pid": N|None, "regions": {...}, "lines": [...]}.

    Each region: {"gva": int, "value": int, "gpa": int|None, "size": int, "thp": bool}.
    When the text holds several reports (SIGUSR1), the last one wins.
    """
    regions: Dict[str, dict] = {}
    lines: List[str] = []
    pid = None
    for raw in text.replace("\r", "").split("\n"):
        m = _PROBE_RE.search(raw)
        if m:
            regions[m["name"]] = {
                "gva": int(m["gva"], 16),
                "value": int(m["value"], 16),
                "gpa": None if m["gpa"] == "none" else int(m["gpa"], 16),
                "size": int(m["size"]),
                "thp": m["thp"] == "1",
            }
            lines.append(m.group(0))
            continue
        m = _READY_RE.search(raw)
        if m:
            pid = int(m.group(1))
            lines.append(m.group(0))
    return {"pid": pid, "regions": regions, "lines": lines}


def qmp_once(path: str, command: str, **arguments):
    """One QMP command on a short-lived connection to the socket at PATH; its "return".

    A connection made just as another client left, while QEMU was still sending that client
    events (a reboot's), can begin with one of them, which qemu.qmp takes for the answer to
    its capabilities negotiation (NegotiationError, seen once in CI after a guest reboot):
    such a connection is made again, once."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from qemu.qmp.protocol import ConnectError

    for attempt in (1, 2):
        mon = QEMUMonitorProtocol(path)
        try:
            mon.connect()
            break
        except ConnectError:
            mon.close()
            if attempt == 2:
                raise
            time.sleep(0.1)
    try:
        mon.settimeout(30)
        return mon.cmd(command, **arguments)
    finally:
        mon.close()


class Guest:
    """A QEMU VM running the bundled guest. A context manager that always tears down.

    Attributes once started: ``qmp_path`` (Unix socket), ``gdb_address`` ("127.0.0.1:PORT", or
    "unix:PATH" with gdb_unix=True: the gdbstub on a Unix socket in the temp dir),
    ``pid`` (QEMU's pid), ``console`` (the pexpect child on the serial console),
    ``tmpdir``, ``argv`` (QEMU's command line), ``boot_seconds``, ``probe`` (the last
    start_probe() result), ``last_status`` (exit status of the last run()),
    ``transcript`` (everything the console printed so far).
    """

    def __init__(self, cpu="max", memory="256M", smp=1, accel="tcg", extra_args=(),
                 cache_dir=None, start_paused=False, append_extra="",
                 qemu=None, console_log=None, gdb_unix=False, kernel=None):
        """kernel: another kernel's folder (vmlinuz, kernel-release; e.g. the 6.12 one that
        vm/kernel612.sh caches) to boot with the same initramfs; None: the bundled one."""
        self.cpu = cpu
        self.kernel_dir = os.path.abspath(kernel) if kernel else None
        self.memory = str(memory)
        self.smp = int(smp)
        self.accel = accel
        self.extra_args = list(extra_args)
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else default_cache_dir()
        self.start_paused = start_paused
        self.gdb_unix = gdb_unix
        self.append_extra = append_extra
        self.qemu = qemu or default_qemu()
        self.console_log = console_log or os.environ.get("QI_VM_CONSOLE_LOG") or None

        self.qmp_path: Optional[str] = None
        self.gdb_address: Optional[str] = None
        self.gdb_port: Optional[int] = None
        self.pid: Optional[int] = None
        self.console: Optional[pexpect.spawn] = None
        self.tmpdir: Optional[str] = None
        self.argv: List[str] = []
        self.boot_seconds: Optional[float] = None
        self.probe: Optional[dict] = None
        self.last_status: Optional[int] = None
        self._transcript = _Transcript()
        self._log_fh = None
        self._seq = 0
        self._spawned_at = 0.0

    # ------------------------------------------------------------------ files
    @property
    def kernel(self) -> str:
        return os.path.join(self.kernel_dir or self.cache_dir, "vmlinuz")

    @property
    def initrd(self) -> str:
        return os.path.join(self.cache_dir, "initramfs.cpio.gz")

    @property
    def kernel_release(self) -> str:
        with open(os.path.join(self.kernel_dir or self.cache_dir, "kernel-release")) as f:
            return f.read().strip()

    @classmethod
    def check_built(cls, cache_dir=None) -> None:
        """Raise GuestNotBuilt (saying to run vm/build.sh) when the cache is incomplete."""
        cache = os.path.abspath(cache_dir) if cache_dir else default_cache_dir()
        missing = [f for f in CACHE_FILES if not os.path.isfile(os.path.join(cache, f))]
        if missing:
            raise GuestNotBuilt(
                f"the test guest is not built: {', '.join(missing)} missing in {cache}. "
                f"Run {os.path.relpath(BUILD_SCRIPT)} (or `bash {BUILD_SCRIPT}`) first"
                + (" with the same QI_VM_CACHE" if os.environ.get("QI_VM_CACHE") else "")
                + "."
            )

    @property
    def transcript(self) -> str:
        return self._transcript.getvalue()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Guest":
        if self.console is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _qemu_argv(self, port: int) -> List[str]:
        append = "console=ttyS0 panic=-1"
        if self.append_extra:
            append += " " + self.append_extra
        argv = [
            self.qemu,
            "-nodefaults", "-no-user-config",
            "-name", "qintrospect-test-guest",
            "-accel", self.accel,
            "-cpu", self.cpu,
            "-m", self.memory,
            "-smp", str(self.smp),
            "-kernel", self.kernel,
            "-initrd", self.initrd,
            "-append", append,
            "-display", "none",
            "-monitor", "none",
            # -serial stdio, with Ctrl-C going to the guest rather than killing QEMU.
            "-chardev", "stdio,id=qi-serial,signal=off",
            "-serial", "chardev:qi-serial",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-gdb", (f"unix:{self._gdb_path},server=on,wait=off" if self.gdb_unix
                     else f"tcp:127.0.0.1:{port}"),
            "-no-reboot",
        ]
        if self.start_paused:
            argv.append("-S")
        return argv + self.extra_args

    def start(self, timeout=60) -> "Guest":
        """Boot QEMU and wait for the guest's shell prompt (not with start_paused)."""
        if self.console is not None:
            raise GuestError("guest already started")
        self.check_built(self.cache_dir)
        if self.kernel_dir and not os.path.isfile(self.kernel):
            raise GuestNotBuilt(f"no kernel at {self.kernel} (vm/kernel612.sh fetches the "
                                "6.12 one)")
        if shutil.which(self.qemu) is None and not os.path.isfile(self.qemu):
            hint = "apt-get install qemu-system-x86"
            if self.qemu == os.environ.get("QI_QEMU"):
                hint = "it is $QI_QEMU; vm/qemu-backports.sh installs QEMU 10.x's wrapper"
            raise GuestError(f"{self.qemu} not found ({hint})")
        if self.accel.split(",")[0] == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise GuestError("accel='kvm' asked for but /dev/kvm is not usable; use accel='tcg'")
        atexit.register(self.stop)
        try:
            self.tmpdir = tempfile.mkdtemp(prefix="qi-vm-")
            self.qmp_path = os.path.join(self.tmpdir, "qmp.sock")
            if self.console_log:
                self._log_fh = open(self.console_log, "a", encoding="utf-8", errors="replace")
                self._transcript._tee = self._log_fh
            last_error = ""
            for _attempt in range(5):
                port = _free_port()
                if self._spawn(port, timeout):
                    break
                last_error = self._transcript.tail()
                if "ddress already in use" not in last_error and "bind" not in last_error:
                    raise GuestError(f"QEMU exited while starting:\n{last_error}")
            else:
                raise GuestError(f"QEMU could not bind a gdbstub port:\n{last_error}")
            if not self.start_paused:
                self.wait_for_prompt(timeout=max(1.0, timeout - (time.monotonic() - self._spawned_at)))
            return self
        except BaseException:
            self.stop()
            raise

    def _spawn(self, port: int, timeout: float) -> bool:
        """Spawn QEMU; True once its QMP socket exists, False if it died at once."""
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        self.argv = self._qemu_argv(port)
        self._spawned_at = time.monotonic()
        child = pexpect.spawn(
            self.argv[0], self.argv[1:], encoding="utf-8", codec_errors="replace",
            timeout=timeout, echo=False, dimensions=(50, 250), preexec_fn=_die_with_parent,
            env=dict(os.environ, TERM="dumb"),
        )
        child.delayafterterminate = 0.2
        child.delaybeforesend = None  # pexpect's default 50 ms a send is not needed here
        child.logfile_read = self._transcript
        deadline = time.monotonic() + min(timeout, 30)
        while not os.path.exists(self.qmp_path):
            if not child.isalive() or time.monotonic() > deadline:
                try:
                    child.expect(pexpect.EOF, timeout=2)
                except pexpect.TIMEOUT:
                    pass
                child.terminate(force=True)
                child.close(force=True)
                if time.monotonic() > deadline:
                    raise GuestError(f"QEMU did not create its QMP socket:\n{self._transcript.tail()}")
                return False
            try:  # keep the pty drained while waiting
                child.read_nonblocking(65536, timeout=0.01)
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                pass
        self.console = child
        self.pid = child.pid
        self.gdb_port = None if self.gdb_unix else port
        self.gdb_address = f"unix:{self._gdb_path}" if self.gdb_unix else f"127.0.0.1:{port}"
        return True

    @property
    def _gdb_path(self) -> str:
        return os.path.join(self.tmpdir, "gdb.sock")

    def wait_for_prompt(self, timeout=60) -> None:
        """Wait for the first shell prompt, then make the console quiet (stty -echo)."""
        self._expect(PROMPT, timeout, "the guest's shell prompt")
        self.boot_seconds = time.monotonic() - self._spawned_at
        # No echo: busybox ash then reads plain lines, and run() output is just the output.
        self.run("stty -echo", timeout=timeout)

    def _expect(self, pattern, timeout, what) -> None:
        try:
            self.console.expect(pattern, timeout=timeout)
        except pexpect.EOF:
            raise GuestError(f"QEMU exited while waiting for {what}:\n{self._transcript.tail()}") from None
        except pexpect.TIMEOUT:
            hint = ""
            if self.accel.startswith("kvm"):
                hint = " (on this host KVM runs only paravirtual guests: use accel='tcg')"
            raise GuestError(
                f"timed out after {timeout:.0f}s waiting for {what}{hint}; console tail:\n"
                f"{self._transcript.tail()}"
            ) from None

    def stop(self) -> None:
        """Kill QEMU and remove the temp dir. Idempotent; never raises."""
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        child, self.console = self.console, None
        if child is not None:
            try:
                if child.isalive():
                    child.terminate(force=True)
                child.close(force=True)  # closes the pty and reaps QEMU
            except Exception:
                # Whatever happened, leave no QEMU behind (it is still our unreaped child).
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
                except (OSError, ChildProcessError):
                    pass
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
            self._transcript._tee = None

    # ------------------------------------------------------------------ console
    def _require_console(self) -> pexpect.spawn:
        if self.console is None:
            raise GuestError("guest not started")
        return self.console

    def drain(self) -> str:
        """Return (and discard) whatever the console printed that nobody read yet."""
        child = self._require_console()
        out = [child.buffer]
        child.buffer = ""
        while True:
            try:
                out.append(child.read_nonblocking(65536, timeout=0))
            except (pexpect.TIMEOUT, pexpect.EOF):
                break
        return "".join(out)

    def run(self, command: str, timeout=20) -> str:
        """Type a shell command on the serial console; return its output ("\\n" line ends).

        The exit status is left in ``self.last_status``. The command runs in the guest's
        interactive busybox sh as root; a command that reads stdin would eat the end marker.
        """
        child = self._require_console()
        self.drain()
        self._seq += 1
        marker = f"@@QI-DONE-{self._seq}-"
        child.send(f"{command}\necho {marker}$?@@\n")
        self._expect(re.escape(marker) + r"(\d+)@@", timeout, f"the end of {command!r}")
        self.last_status = int(child.match.group(1))
        out = child.before.replace("\r\n", "\n").replace("\r", "")
        self._expect(re.escape(PROMPT), timeout, "the prompt")
        # The prompt of the marker line closes the output.
        if out.endswith(PROMPT):
            out = out[: -len(PROMPT)]
        return out

    def interrupt(self) -> None:
        """Send Ctrl-C to the guest's foreground job."""
        self._require_console().sendcontrol("c")

    # ------------------------------------------------------------------ probe
    def start_probe(self, mode="spin", timeout=30) -> dict:
        """Start ``/probe MODE &`` in the guest; return its parsed report.

        {"pid": N, "regions": {name: {"gva", "value", "gpa" (None if not present), "size",
        "thp"}}, "lines": [the raw PROBE lines]}
        """
        if mode not in ("spin", "sleep", "once"):
            raise ValueError("mode must be 'spin', 'sleep' or 'once'")
        child = self._require_console()
        self.drain()
        child.sendline(f"/probe {mode} &" if mode != "once" else "/probe once")
        self._expect(_READY_LINE_RE, timeout, "the probe's PROBE-READY line")
        report = parse_probe_output(child.before + child.after)
        missing = {"heap", "stack", "rodata", "thp", "untouched", "text"} - set(report["regions"])
        if missing:
            raise GuestError(f"probe output lacks {sorted(missing)}:\n{child.before}")
        self.probe = report
        return report

    def reprobe(self, timeout=30) -> dict:
        """Ask the running probe (SIGUSR1) to print its lines again, re-reading pagemap."""
        if not self.probe:
            raise GuestError("no probe running")
        child = self._require_console()
        self.drain()
        child.sendline(f"kill -USR1 {self.probe['pid']}")
        self._expect(_READY_LINE_RE, timeout, "the probe's PROBE-READY line")
        report = parse_probe_output(child.before + child.after)
        self.probe = report
        return report

    # ------------------------------------------------------------------ the guest's own view
    def proc_status(self, timeout=30, threads=False) -> Dict[int, dict]:
        """Every process as the guest's own /proc shows it now: {pid: {"name", "state",
        "ppid", "uid", "tgid"}} from /proc/PID/status (Name, State's letter, PPid, the real
        Uid, Tgid); with threads, every thread (/proc/PID/task/TID/status), by thread id.
        One `grep` reads them all; it lists itself too, and is gone once this returns (its
        pid: ``self.lister``)."""
        where = "/proc/[0-9]*/task/[0-9]*/status" if threads else "/proc/[0-9]*/status"
        out = self.run(f"grep -E '^(Name|State|Tgid|PPid|Uid):' {where} 2>/dev/null",
                       timeout=timeout)
        procs: Dict[int, dict] = {}
        for line in out.splitlines():
            m = re.match(r"/proc/(?:\d+/task/)?(\d+)/status:(\w+):\s*(.*)$", line)
            if not m:
                continue
            pid, key, value = int(m.group(1)), m.group(2), m.group(3)
            entry = procs.setdefault(pid, {})
            if key == "Name":
                entry["name"] = value
            elif key == "State":
                entry["state"] = value.split()[0]
            elif key == "PPid":
                entry["ppid"] = int(value)
            elif key == "Tgid":
                entry["tgid"] = int(value)
            elif key == "Uid":
                entry["uid"] = int(value.split()[0])
        # the grep that listed them is gone by now: the newest process called grep
        greps = [pid for pid, e in procs.items() if e.get("name") == "grep"]
        self.lister = max(greps) if greps else None
        return procs

    def proc_maps(self, pid: int, timeout=30) -> List[str]:
        """The lines of the guest's own /proc/PID/maps."""
        out = self.run(f"cat /proc/{int(pid)}/maps", timeout=timeout)
        return [line for line in out.splitlines() if line.strip()]

    # ------------------------------------------------------------------ QMP helpers
    def qmp(self, command: str, **arguments):
        """Run one QMP command on a short-lived connection; return its "return" value."""
        if not self.qmp_path:
            raise GuestError("guest not started")
        return qmp_once(self.qmp_path, command, **arguments)

    def hmp(self, command_line: str) -> str:
        """Run one HMP command through QMP's human-monitor-command."""
        return self.qmp("human-monitor-command", **{"command-line": command_line})


# ---------------------------------------------------------------------- CLI
def hold(guest: Guest, interact: bool, console_name: str) -> None:
    """The end of each rig's `main`: with --interact this terminal becomes the console
    (Ctrl-] leaves), else wait for Ctrl-C; the caller's `with` then tears everything down."""
    sys.stdout.flush()
    if interact:
        guest.run("stty echo")
        print(f"-- {console_name}; Ctrl-] leaves and tears down --")
        sys.stdout.flush()
        guest.console.logfile_read = None
        guest.console.send("\n")
        guest.console.interact()
    else:
        print("Ctrl-C to stop.")
        while True:
            signal.pause()


def main(argv: Optional[Iterable[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m vm.guest",
        description="Boot qintrospect's test guest, start the probe and wait for Ctrl-C.",
    )
    ap.add_argument("--cpu", default="max")
    ap.add_argument("--memory", "-m", default="256M")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--mode", choices=("spin", "sleep"), default="spin", help="probe mode")
    ap.add_argument("--append", default="", help="extra kernel command line")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--interact", action="store_true",
                    help="after starting the probe, attach this terminal to the guest's "
                         "console (Ctrl-] leaves and tears down)")
    ap.add_argument("--console-log", default=None, help="append the serial console to FILE")
    ap.add_argument("--qemu", default=None,
                    help="the QEMU binary (default: $QI_QEMU, else qemu-system-x86_64)")
    args = ap.parse_args(argv)

    guest = Guest(cpu=args.cpu, memory=args.memory, smp=args.smp, accel=args.accel,
                  cache_dir=args.cache_dir, append_extra=args.append,
                  console_log=args.console_log, qemu=args.qemu)
    # Ctrl-C ends the wait (even if started from a shell that ignores SIGINT for background
    # jobs); SIGTERM/SIGHUP tear down too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        with guest:
            probe = guest.start_probe(args.mode)
            print(f"QEMU pid:    {guest.pid} ({guest.qemu})")
            print(f"QMP socket:  {guest.qmp_path}")
            print(f"gdbstub:     {guest.gdb_address}")
            print(f"kernel:      {guest.kernel_release}  (-cpu {guest.cpu}, -m {guest.memory}, "
                  f"-smp {guest.smp}, booted in {guest.boot_seconds:.1f} s)")
            print(f"probe pid:   {probe['pid']} ({args.mode})")
            for line in probe["lines"]:
                print(line)
            hold(guest, args.interact, "guest console (prompt 'qi# ')")
    except KeyboardInterrupt:
        print("\nstopping")
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
