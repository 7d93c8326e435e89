"""The nested rig: L0 = this machine, L1 = a Linux guest running QEMU, L2 = the oracle guest.

vm/nested/build.sh builds L1's initramfs (busybox, qemu-system-x86_64 with its libraries,
SeaBIOS, the ROMs, the TCG module, vm/nested/init and the oracle). ``NestedRig`` boots L1 at L0
under TCG (``-cpu max -m 1G``); L1's /init starts the L2 QEMU (TCG in TCG) on the oracle in
mode 4level and keeps a busybox shell on L1's console::

    from vm.nested.rig import NestedRig, SerialQMP
    with NestedRig() as rig:                 # boots L1, waits for L2's ORACLE READY
        rig.l1_qmp_path, rig.l1_gdb_address, rig.l1_pid       # L1's QEMU at L0
        rig.l2_qmp_path, rig.l2_gdb_path, rig.l2_console_path # L2's monitors via L1's serial
        rig.l2_qemu_pid_in_l1, rig.l2_maps, rig.l2_ready      # L2 QEMU's pid in L1, oracle output
        rig.run_l1("cat /proc/%d/maps" % rig.l2_qemu_pid_in_l1)
        with SerialQMP(rig.l2_qmp_path) as q:                 # L2's QMP, raw JSON, timeouts
            q.hmp("gva2gpa 0x10000000")

L1's serial ports, each a Unix socket at L0 (``-serial unix:PATH,server=on,wait=off``):
ttyS0 console (pexpect, ``rig.console``), ttyS1 = L2's QMP (``-chardev serial`` + ``-mon``),
ttyS2 = L2's gdbstub (``-gdb /dev/ttyS2``), ttyS3 = L2's serial console. The rig keeps the
ttyS3 socket connected (a thread reads it: ``rig.l2_console_text()``); the L2 QMP and gdb
sockets are left free for the code under test (one client at a time each).

What the code consuming the rig must know (measured; see vm/nested/README.md):
- L2's QMP greeting goes by once, when L2's QEMU starts; a client at L0 never sees it. The
  rig reads it (``rig.l2_qmp_greeting``) and disconnects. Speak first: ``qmp_capabilities``;
  and since the monitor's session outlives L0 connections (the serial line never "closes"),
  a second client's ``qmp_capabilities`` gets "Capabilities negotiation is already complete"
  (CommandNotFound) -- harmless. Use ``SerialQMP``, which resyncs and matches replies by id.
- Output sent on a serial line while nobody at L0 is connected is dropped by L1's QEMU.
- L2's gdbstub over a serial line never sees a connect or disconnect. The first byte it gets
  while L2 runs stops L2 and is thrown away (gdb's initial '+' is that byte; a raw client must
  send one too: ``SerialRSP.wake()``), followed by an unsolicited ``T02`` stop reply. ``detach``
  resumes L2 but leaves no process attached, and the next gdb's ``?`` then crashes L2's QEMU
  7.2 (SIGSEGV) now and then: end sessions with ``disconnect`` (L2 stays paused; resume it with
  QMP ``cont``), as qintrospect does.
- While L1 is paused (L1 QMP ``stop``), L2 and its monitors are frozen too.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from typing import List, Optional

from vm.guest import Guest, GuestError, GuestNotBuilt, default_cache_dir, hold
from vm.oracle.boot import MapLine, OracleOutput, parse_output

__all__ = ["NestedRig", "NestedShells", "NestedError", "NestedNotBuilt", "SerialQMP", "SerialQMPError",
           "SerialRSP", "SerialRSPError", "drain_socket", "nested_cache_dir", "BUILD_SCRIPT"]

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SCRIPT = os.path.join(HERE, "build.sh")

_L2_PID_RE = re.compile(r"NESTED L2-QEMU pid=(\d+)")
_L2_EXIT_RE = re.compile(r"NESTED L2-QEMU exited status=(\d+)")


class NestedError(GuestError):
    """The nested rig could not be started or did not answer as expected."""


class NestedNotBuilt(NestedError, GuestNotBuilt):
    """The L1 initramfs (or the L1 kernel) is missing: run vm/nested/build.sh."""


def nested_cache_dir(cache_dir: Optional[str] = None) -> str:
    return os.path.join(os.path.abspath(cache_dir) if cache_dir else default_cache_dir(), "nested")


def _connect_unix(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


def drain_socket(sock: socket.socket, quiet: float = 0.2, limit: float = 5.0) -> bytes:
    """Read and return whatever arrives until ``quiet`` seconds pass with nothing (at most
    ``limit`` seconds in all). Restores the socket's timeout."""
    old = sock.gettimeout()
    out = bytearray()
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            sock.settimeout(min(quiet, max(0.001, deadline - time.monotonic())))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
    finally:
        sock.settimeout(old)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# L2's QMP over L1's serial line

class SerialQMPError(NestedError):
    pass


class _SerialClient:
    """A Unix socket to one of L1's serial lines, closed on leaving a `with`."""

    sock: socket.socket

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SerialQMP(_SerialClient):
    """A raw-JSON QMP client for a monitor reached through a serial line (no greeting).

    Every read has a timeout. On connect it drains what is in flight, sends one 0xFF byte
    (QEMU's JSON lexer resets on it and answers with one id-less parse error, which is
    skipped), then ``qmp_capabilities``; "negotiation is already complete" counts as success
    (an earlier client negotiated: the monitor's session outlives L0 connections). Commands
    carry an ``id``; replies with another id or none, and events, are skipped (events are kept
    in ``self.events``). ``self.last_seconds``: the round trip of the last command.
    """

    def __init__(self, path: str, timeout: float = 20.0, drain_quiet: float = 0.2):
        self.path = path
        self.timeout = timeout
        self.sock = _connect_unix(path, timeout)
        self._buf = b""
        self._seq = 0
        self._tag = f"qi{os.getpid()}-{id(self) & 0xffff:x}"
        self.events: List[dict] = []
        self.skipped: List[dict] = []
        self.last_seconds: Optional[float] = None
        try:
            self.drained = drain_socket(self.sock, quiet=drain_quiet)
            self.sock.sendall(b"\xff\n")
            try:
                self.cmd("qmp_capabilities")
                self.negotiated_now = True
            except SerialQMPError as e:
                if "already complete" not in str(e):
                    raise
                self.negotiated_now = False
        except BaseException:
            self.close()
            raise

    def _read_obj(self, deadline: float) -> dict:
        while True:
            line, nl, rest = self._buf.partition(b"\n")
            if nl:
                self._buf = rest
                line = line.strip()
                if not line:
                    continue
                try:
                    return json.loads(line.decode("utf-8", "replace"))
                except ValueError:
                    self.skipped.append({"garbage": line[:200].decode("latin-1")})
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise SerialQMPError(f"QMP over {self.path}: no reply within {self.timeout}s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                raise SerialQMPError(f"QMP over {self.path}: no reply within {self.timeout}s") from None
            if not chunk:
                raise SerialQMPError(f"QMP over {self.path}: connection closed")
            self._buf += chunk

    def cmd(self, name: str, **arguments):
        """Run one QMP command; return its "return" value (SerialQMPError on "error")."""
        self._seq += 1
        ident = f"{self._tag}-{self._seq}"
        msg = {"execute": name, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        t0 = time.monotonic()
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = t0 + self.timeout
        while True:
            obj = self._read_obj(deadline)
            if "event" in obj:
                self.events.append(obj)
                continue
            if obj.get("id") != ident:
                self.skipped.append(obj)
                continue
            self.last_seconds = time.monotonic() - t0
            if "error" in obj:
                raise SerialQMPError(f"QMP {name}: {obj['error'].get('class')}: {obj['error'].get('desc')}")
            return obj.get("return")

    def hmp(self, command_line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": command_line})


# ---------------------------------------------------------------------------------------------
# L2's gdbstub over L1's serial line, raw RSP

class SerialRSPError(NestedError):
    pass


def _rsp_frame(data: str) -> bytes:
    body = data.encode("latin-1")
    return b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF)


class SerialRSP(_SerialClient):
    """A minimal raw GDB remote-protocol client for a gdbstub behind a serial line.

    What is special about QEMU 7.2's gdbstub on a serial chardev (``-gdb /dev/ttyS2``):
    it never sees a connection open or close. While the VM runs, the first byte it receives
    stops the VM (RUN_STATE_PAUSED) and is thrown away; if a gdb "process" is attached the
    stub then sends an unsolicited stop reply ``T02thread:p01.01;``. So ``wake()`` sends a
    sacrificial ``+`` first and swallows that reply; only then are packets understood.
    Every read has a timeout.
    """

    def __init__(self, path: str, timeout: float = 10.0, drain_quiet: float = 0.2):
        self.path = path
        self.timeout = timeout
        self.sock = _connect_unix(path, timeout)
        self._buf = b""
        self.stray: List[str] = []
        try:
            self.drained = drain_socket(self.sock, quiet=drain_quiet)
        except BaseException:
            self.close()
            raise

    def _recv(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SerialRSPError(f"gdbstub over {self.path}: no answer within {self.timeout}s")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise SerialRSPError(f"gdbstub over {self.path}: no answer within {self.timeout}s") from None
        if not chunk:
            raise SerialRSPError(f"gdbstub over {self.path}: connection closed")
        self._buf += chunk

    def _read_packet(self, deadline: float) -> str:
        """The next $...#cs packet (acked with '+'); '+'/'-' and junk before it are skipped."""
        while True:
            start = self._buf.find(b"$")
            if start >= 0:
                end = self._buf.find(b"#", start)
                if end >= 0 and len(self._buf) >= end + 3:
                    body = self._buf[start + 1:end]
                    cs = self._buf[end + 1:end + 3]
                    self._buf = self._buf[end + 3:]
                    if b"%02x" % (sum(body) & 0xFF) != cs.lower():
                        self.sock.sendall(b"-")
                        continue
                    self.sock.sendall(b"+")
                    return _rsp_unescape(body).decode("latin-1")
            else:
                self._buf = b""
            self._recv(deadline)

    def wake(self, settle: float = 0.3) -> List[str]:
        """Send the sacrificial byte (stops L2 if it runs) and swallow the stop reply, if any."""
        self.sock.sendall(b"+")
        got = drain_socket(self.sock, quiet=settle, limit=max(settle, 3.0))
        if b"$" in got:
            self.sock.sendall(b"+")
        self.stray += [got.decode("latin-1")] if got else []
        return self.stray

    def packet(self, data: str, expect_reply: bool = True) -> Optional[str]:
        """Send one packet; return the reply's body (None when expect_reply is False)."""
        deadline = time.monotonic() + self.timeout
        frame = _rsp_frame(data)
        self.sock.sendall(frame)
        # Wait for the ack; resend on '-'.
        while True:
            while not self._buf:
                self._recv(deadline)
            c, self._buf = self._buf[:1], self._buf[1:]
            if c == b"+":
                break
            if c == b"-":
                self.sock.sendall(frame)
                continue
            if c == b"$":                     # a reply without an ack: keep it
                self._buf = c + self._buf
                break
        if not expect_reply:
            return None
        return self._read_packet(deadline)

    def read_memory(self, addr: int, length: int) -> bytes:
        out = b""
        while length > 0:
            n = min(length, 0x800)
            reply = self.packet(f"m{addr:x},{n:x}")
            if not reply or reply.startswith("E"):
                raise SerialRSPError(f"m{addr:x},{n:x}: {reply!r}")
            out += bytes.fromhex(reply)
            addr += n
            length -= n
        return out


def _rsp_unescape(body: bytes) -> bytes:
    if b"}" not in body and b"*" not in body:
        return body
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == 0x7D and i + 1 < len(body):
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif c == 0x2A and out and i + 1 < len(body):   # run-length: repeat last char
            out += bytes([out[-1]]) * (body[i + 1] - 29)
            i += 2
        else:
            out.append(c)
            i += 1
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# What every rig with a shell on L1's console and L2's console at L0 shares

class NestedShells:
    """L1's shell and L2's serial console, whatever runs L1 (QEMU here, Bochs in vm/ept).

    For a class that is also a ``vm.guest.Guest`` (its ``run``, ``console``, ``transcript``):
    L1's shell on its console (``run_l1``), and L2's serial console, which reaches L0 as a
    socket that a thread reads into a buffer from the moment it connects (``l2_console_text``;
    nothing L2 prints is missed). Call ``_init_l2_console()`` in ``__init__``,
    ``_start_l2_console_reader(sock)`` once the socket is connected and
    ``_close_l2_console()`` when tearing down.
    """

    def _init_l2_console(self) -> None:
        self._l2_console_sock: Optional[socket.socket] = None
        self._l2_console_buf = bytearray()
        self._l2_console_lock = threading.Lock()
        self._l2_console_cond = threading.Condition(self._l2_console_lock)
        self._reader: Optional[threading.Thread] = None
        self._stop_reader = threading.Event()

    def _start_l2_console_reader(self, sock: socket.socket) -> None:
        self._l2_console_sock = sock
        self._stop_reader.clear()
        self._reader = threading.Thread(target=self._read_l2_console, name="l2-console", daemon=True)
        self._reader.start()

    def _read_l2_console(self) -> None:
        sock = self._l2_console_sock
        sock.settimeout(0.2)
        while not self._stop_reader.is_set():
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            with self._l2_console_cond:
                if not self._l2_console_buf:
                    self.timings.setdefault("l2_first_output", time.monotonic() - self._spawned_at)
                self._l2_console_buf += chunk
                self._l2_console_cond.notify_all()

    def l2_console_text(self) -> str:
        """Everything L2 printed on its serial port so far."""
        with self._l2_console_lock:
            return self._l2_console_buf.decode("utf-8", "replace")

    def _close_l2_console(self) -> None:
        """Stop the reader and close the socket (the caller then stops L1)."""
        self._stop_reader.set()
        s, self._l2_console_sock = self._l2_console_sock, None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    def _join_l2_console_reader(self) -> None:
        r, self._reader = self._reader, None
        if r is not None:
            r.join(timeout=2)

    def drain_transcript(self) -> str:
        """Read what L1's console printed (without waiting) and return the whole transcript."""
        if self.console is not None:
            try:
                while True:
                    self.console.buffer += self.console.read_nonblocking(65536, timeout=0)
            except Exception:
                pass
        return self.transcript

    def run_l1(self, command: str, timeout: float = 30) -> str:
        """Run a shell command in L1 (busybox sh on L1's console); return its output."""
        return self.run(command, timeout=timeout)

    def l1_pagemap_entry(self, pid: int, va: int) -> int:
        """The 64-bit /proc/PID/pagemap entry of VA in L1, read by L1's own shell."""
        out = self.run_l1(f"dd if=/proc/{pid}/pagemap bs=8 skip={va >> 12} count=1 2>/dev/null"
                          f" | od -A n -t x8")
        if self.last_status != 0 or not out.strip():
            raise NestedError(f"reading L1's /proc/{pid}/pagemap at {va:#x} failed: {out!r}")
        return int(out.split()[0], 16)


# ---------------------------------------------------------------------------------------------
# The rig

class NestedRig(NestedShells, Guest):
    """L1 (Linux + QEMU) at L0 under TCG, L2 (the oracle) inside it. A context manager that
    always tears down (killing L1's QEMU kills L2 with it).

    Attributes once started:
      l1_qmp_path, l1_gdb_address, l1_pid   L1's QMP socket, gdbstub (127.0.0.1:PORT), QEMU pid
      console                               pexpect on L1's ttyS0 (busybox sh, prompt 'qi# ')
      l2_qmp_path, l2_gdb_path, l2_console_path   Unix sockets at L0 for L1's ttyS1/2/3
      l2_qemu_pid_in_l1                     the L2 QEMU's pid inside L1
      l2_output (vm.oracle.boot.OracleOutput), l2_maps (its MapLine list), l2_ready (READY's
      key=value dict), l2_ready_line (the raw line), l2_qmp_greeting (dict or None)
      timings: dict of seconds since L1's QEMU was spawned -- "l1_prompt" (L1's shell prompt,
        printed right after /init started L2's QEMU), "l2_first_output" (first byte from L2 on
        ttyS3), "l2_ready" (ORACLE READY seen at L0); and "l1_uptime_init"/"l1_uptime_l2_start"
        (L1's /proc/uptime when its /init ran and when it started L2's QEMU)
    """

    def __init__(self, l2_mode: str = "4level", l2_cpu: str = "qemu64,+pdpe1gb",
                 l2_memory: str = "64M", cpu: str = "max", memory: str = "1G", smp: int = 1,
                 cache_dir: Optional[str] = None, timeout: float = 180.0, start_l2: bool = True,
                 console_log: Optional[str] = None, extra_args=(), read_greeting: bool = True):
        append = f"quiet qi_l2={1 if start_l2 else 0} qi_l2_mode={l2_mode} qi_l2_cpu={l2_cpu} qi_l2_mem={l2_memory}"
        # the rigs stay on the system's QEMU whatever QI_QEMU says: their inner QEMU is the
        # system's too (copied into L1's image), and scripts/test runs them once
        super().__init__(cpu=cpu, memory=memory, smp=smp, accel="tcg", extra_args=extra_args,
                         cache_dir=cache_dir, append_extra=append, console_log=console_log,
                         qemu="qemu-system-x86_64")
        self.l2_mode = l2_mode
        self.l2_cpu = l2_cpu
        self.l2_memory = l2_memory
        self.start_l2 = start_l2
        self.timeout = timeout
        self.read_greeting = read_greeting
        self.l2_qmp_path: Optional[str] = None
        self.l2_gdb_path: Optional[str] = None
        self.l2_console_path: Optional[str] = None
        self.l2_qemu_pid_in_l1: Optional[int] = None
        self.l2_output: Optional[OracleOutput] = None
        self.l2_maps: List[MapLine] = []
        self.l2_ready: dict = {}
        self.l2_ready_line: Optional[str] = None
        self.l2_qmp_greeting: Optional[dict] = None
        self.timings: dict = {}
        self._greet_sock: Optional[socket.socket] = None
        self._init_l2_console()

    # ------------------------------------------------------------------ names
    @property
    def l1_qmp_path(self) -> Optional[str]:
        return self.qmp_path

    @property
    def l1_gdb_address(self) -> Optional[str]:
        return self.gdb_address

    @property
    def l1_pid(self) -> Optional[int]:
        return self.pid

    @property
    def initrd(self) -> str:
        return os.path.join(nested_cache_dir(self.cache_dir), "initramfs.cpio.gz")

    @classmethod
    def check_built(cls, cache_dir=None) -> None:
        """Raise NestedNotBuilt (saying to run vm/nested/build.sh) when something is missing."""
        cache = os.path.abspath(cache_dir) if cache_dir else default_cache_dir()
        need = [os.path.join(cache, "vmlinuz"), os.path.join(nested_cache_dir(cache), "initramfs.cpio.gz")]
        missing = [p for p in need if not os.path.isfile(p)]
        if missing:
            raise NestedNotBuilt(
                f"the nested rig is not built: {', '.join(missing)} missing. Run "
                f"`bash {os.path.relpath(BUILD_SCRIPT)}` first"
                + (" with the same QI_VM_CACHE" if os.environ.get("QI_VM_CACHE") else "") + ".")

    @staticmethod
    def build() -> str:
        """Run vm/nested/build.sh (idempotent); return the initramfs path."""
        res = subprocess.run(["bash", BUILD_SCRIPT], capture_output=True, text=True)
        if res.returncode != 0:
            raise NestedError(f"vm/nested/build.sh failed ({res.returncode}):\n{res.stderr}")
        return res.stdout.strip().splitlines()[-1]

    # ------------------------------------------------------------------ boot
    def _qemu_argv(self, port: int) -> List[str]:
        argv = super()._qemu_argv(port)
        self.l2_qmp_path = os.path.join(self.tmpdir, "l2-qmp.sock")
        self.l2_gdb_path = os.path.join(self.tmpdir, "l2-gdb.sock")
        self.l2_console_path = os.path.join(self.tmpdir, "l2-console.sock")
        for p in (self.l2_qmp_path, self.l2_gdb_path, self.l2_console_path):
            if os.path.exists(p):
                os.unlink(p)
            argv += ["-serial", f"unix:{p},server=on,wait=off"]
        return argv

    def _spawn(self, port: int, timeout: float) -> bool:
        ok = super()._spawn(port, timeout)
        if ok:
            # L1's QEMU listens on its serial sockets before the guest runs: connect at once,
            # long before L1's /init starts L2, so nothing L2 prints is missed.
            self._connect_l2_console()
        return ok

    def _connect_l2_console(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = _connect_unix(self.l2_console_path, 1.0)
                if self.read_greeting and self.start_l2:
                    try:
                        self._greet_sock = _connect_unix(self.l2_qmp_path, 1.0)
                    except OSError:
                        sock.close()
                        raise
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise NestedError(f"cannot connect to {self.l2_console_path}")
                time.sleep(0.01)
        self._start_l2_console_reader(sock)

    def start(self, timeout: Optional[float] = None) -> "NestedRig":
        timeout = self.timeout if timeout is None else timeout
        try:
            super().start(timeout=timeout)
            self.timings["l1_prompt"] = self.boot_seconds
            if self.start_l2:
                self._wait_l2(timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def _wait_l2(self, timeout: float) -> None:
        deadline = self._spawned_at + timeout
        text = self.transcript
        m = _L2_PID_RE.search(text)
        if not m:
            raise NestedError(f"L1's /init did not print 'NESTED L2-QEMU pid=':\n{self._transcript.tail()}")
        self.l2_qemu_pid_in_l1 = int(m.group(1))
        m = re.search(r"NESTED L1-INIT uptime=([\d.]+)", text)
        if m:
            self.timings["l1_uptime_init"] = float(m.group(1))
        m = re.search(r"NESTED L2-QEMU pid=\d+ uptime=([\d.]+)", text)
        if m:
            self.timings["l1_uptime_l2_start"] = float(m.group(1))
        ready_re = re.compile(r"ORACLE READY [^\r\n]*\r?\n")
        greeting = b""
        while True:
            if self._greet_sock is not None:
                greeting += self._poll_greeting()
            with self._l2_console_cond:
                text = self._l2_console_buf.decode("utf-8", "replace")
                if not ready_re.search(text) and "ORACLE ERROR" not in text:
                    self._l2_console_cond.wait(0.05)
                    text = self._l2_console_buf.decode("utf-8", "replace")
            m = ready_re.search(text)
            if m:
                self.timings["l2_ready"] = time.monotonic() - self._spawned_at
                break
            if "ORACLE ERROR" in text and text.endswith("\n"):
                raise NestedError(f"L2 (the oracle) reported an error:\n{text}")
            died = _L2_EXIT_RE.search(self.drain_transcript())
            if died:
                raise NestedError(f"L2's QEMU exited in L1 before READY:\n{self._transcript.tail()}")
            if time.monotonic() > deadline:
                raise NestedError(
                    f"no ORACLE READY from L2 within {timeout:.0f}s of L1's start; L2 serial so far:\n"
                    f"{text[-2000:]}\nL1 console tail:\n{self._transcript.tail()}")
            if not self._reader.is_alive():
                raise NestedError(f"the L2 console socket closed; L2 serial so far:\n{text}")
        self.l2_output = parse_output(text)
        self.l2_maps = list(self.l2_output.maps)
        self.l2_ready = dict(self.l2_output.ready)
        self.l2_ready_line = m.group(0).strip()
        if self._greet_sock is not None:
            # The greeting left L2's QEMU when it started, before the oracle printed anything.
            greeting += self._poll_greeting(wait=0.5)
            self._greet_sock.close()
            self._greet_sock = None
            for line in greeting.splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if "QMP" in obj:
                    self.l2_qmp_greeting = obj
                    break

    def _poll_greeting(self, wait: float = 0.0) -> bytes:
        out = b""
        self._greet_sock.settimeout(max(wait, 0.001))
        try:
            while True:
                chunk = self._greet_sock.recv(65536)
                if not chunk:
                    break
                out += chunk
                if wait and out.endswith(b"\n"):
                    break
        except (socket.timeout, BlockingIOError):
            pass
        except OSError:
            pass
        return out

    def stop(self) -> None:
        """Kill L1's QEMU (and so L2), close the rig's sockets, remove the temp dir."""
        self._close_l2_console()
        s, self._greet_sock = self._greet_sock, None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass
        super().stop()
        self._join_l2_console_reader()

    # ------------------------------------------------------------------ L1 helpers
    def l2_qmp(self, timeout: float = 20.0) -> SerialQMP:
        """A new SerialQMP connection to L2's QMP (close it, or use `with`)."""
        return SerialQMP(self.l2_qmp_path, timeout=timeout)


def main(argv=None) -> int:
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(prog="python -m vm.nested.rig",
                                 description="Boot the nested rig (L1 Linux+QEMU, L2 oracle) and wait.")
    ap.add_argument("--l2-mode", default="4level")
    ap.add_argument("--console-log", default=None)
    ap.add_argument("--interact", action="store_true", help="attach this terminal to L1's console")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with NestedRig(l2_mode=args.l2_mode, console_log=args.console_log) as rig:
            print(f"L1 QEMU pid {rig.l1_pid}; QMP {rig.l1_qmp_path}; gdb {rig.l1_gdb_address}")
            print(f"L2 QEMU pid in L1 {rig.l2_qemu_pid_in_l1}; QMP {rig.l2_qmp_path}; "
                  f"gdb {rig.l2_gdb_path}; console {rig.l2_console_path}")
            print(f"L2 greeting: {rig.l2_qmp_greeting}")
            print(f"{rig.l2_ready_line}")
            print("timings: " + ", ".join(f"{k}={v:.2f}s" for k, v in rig.timings.items()))
            hold(rig, args.interact, "L1 console (prompt 'qi# ')")
    except KeyboardInterrupt:
        print("\nstopping")
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
