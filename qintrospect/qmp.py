"""QMP access (a small synchronous client) and parsers for the text QEMU's monitor prints.

Everything here is read-only. The monitor commands qintrospect may send are listed once, in
ALLOWED_QMP and ALLOWED_HMP; `QmpMonitor` refuses anything else, so a read-only promise is
enforced by one small table (and a test proves it on the wire). `stop`/`cont` are only ever
sent to hold a running VM still for one command and put it back as it was found, and `cont`
when the user asks `resume`.

HMP `gpa2hpa` must never be sent: in QEMU it does an atomic add on the guest page.
"""

import json
import os
import re
import socket
import time
from typing import Dict, List, Optional, Tuple, Union

from .errors import AttachError, ParseError, UsageError, VMGoneError
from .record import record

# QMP commands qintrospect may send. Nothing here changes guest memory or registers.
ALLOWED_QMP = frozenset({
    "qmp_capabilities", "query-status", "query-cpus-fast", "query-kvm", "query-stats",
    "qom-get", "query-memory-size-summary", "human-monitor-command",
    "stop", "cont",  # only to restore the run state that was found, and for `resume`
})
# HMP command lines allowed through human-monitor-command, whole (no prefix matching: a line
# is one command, and anything after a known command word could be another argument).
_H = r"0x[0-9a-fA-F]{1,16}"
ALLOWED_HMP = (
    re.compile(r"info mtree -f"),
    re.compile(r"info registers"),
    re.compile(rf"gpa2hva {_H}"),
    re.compile(rf"xp /[1-9][0-9]{{0,3}}gx {_H}"),
)


def check_allowed(name: str, arguments: Optional[dict] = None) -> None:
    """Refuse (ValueError) any QMP message not on the read-only allowlist; for HMP, any command
    line that is not one of the allowed commands in full. Every message qintrospect writes to
    a monitor passes through here first."""
    if name not in ALLOWED_QMP:
        raise ValueError(f"QMP command {name!r} is not on qintrospect's read-only allowlist")
    if name == "human-monitor-command":
        line = (arguments or {}).get("command-line")
        if not isinstance(line, str) or not any(p.fullmatch(line) for p in ALLOWED_HMP):
            raise ValueError(f"HMP command {line!r} is not on qintrospect's read-only "
                             "allowlist")

SocketAddress = Union[str, Tuple[str, int]]
# QEMU greets at once on a fresh connection; a greeting that has not come by then never will.
GREETING_TIMEOUT = 1.5
MAX_MESSAGE = 64 << 20     # the largest QMP line accepted (`info tlb` of a big guest is MBs)
MAX_DRAIN = 1 << 20        # events read between exchanges, at most, per look
# Events after which guest memory read before no longer goes with memory read after.
LIFECYCLE_EVENTS = ("RESET", "SHUTDOWN", "POWERDOWN")


def parse_address(text: str, what: str, allow_remote: bool = False) -> SocketAddress:
    """'PATH', 'unix:PATH', 'HOST:PORT' or 'tcp:HOST:PORT' -> a path or a (host, port) pair.

    A TCP address off loopback is refused unless allow_remote: these sockets have no
    authentication, and whoever reaches them owns the VM.
    """
    bad = [c for c in text if ord(c) < 0x20 or ord(c) == 0x7F]
    if bad:
        # these addresses reach gdb's command line: a newline there would start a new command
        raise UsageError(f"{what}: {text!r} contains control character(s) "
                         f"{', '.join(repr(c) for c in sorted(set(bad)))}; give a Unix socket "
                         "path or HOST:PORT")
    text = text.strip()
    if not text:
        raise UsageError(f"{what}: empty address; give a Unix socket path or HOST:PORT")
    if text.startswith("unix:"):
        return text[5:]
    if text.startswith("tcp:"):
        text = text[4:]
    elif "/" in text or ":" not in text:
        return text
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"{what}: bad port in {text!r}; expected HOST:PORT with PORT 1-65535")
    if not allow_remote and not _is_loopback(host):
        raise UsageError(f"{what}: {host} is not a loopback address; the monitor and gdbstub have "
                         "no authentication, so qintrospect refuses remote ones unless you pass "
                         "--allow-remote")
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "::1"):
        return True
    parts = host.split(".")     # 127.x.y.z, the common case, without loading ipaddress
    if len(parts) == 4 and parts[0] == "127" and all(
            p.isascii() and p.isdigit() and str(int(p)) == p and int(p) <= 255 for p in parts):
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_socket_path(path: str, what: str, hint: str) -> None:
    """Say plainly why a Unix socket path cannot be used: missing, or hidden from this user."""
    if os.path.exists(path):
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder) and not os.access(folder, os.X_OK):
        raise AttachError(f"permission denied: {what} {path} is in {folder}, which this user "
                          "cannot enter; run as the user that started QEMU (or root)")
    raise AttachError(f"{what} {path} does not exist; {hint}")


def describe_address(address: SocketAddress) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


class QmpCommandError(AttachError):
    """QEMU answered a QMP command with an error."""

    exit_status = 1


class Monitor:
    """What a session asks of a monitor, however it is reached: command(name, **arguments),
    which passes check_allowed first; hmp() is human-monitor-command on top of it."""

    def command(self, name: str, **arguments) -> object:
        raise NotImplementedError

    def hmp(self, command_line: str, cpu_index: Optional[int] = None) -> str:
        """Run one allowlisted HMP command through QMP and return what it prints."""
        args = {"command-line": command_line}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        return self.command("human-monitor-command", **args)


class QmpMonitor(Monitor):
    """A synchronous QMP client over a Unix or TCP socket, with a timeout on every exchange.

    QMP is one JSON object a line: a greeting, then replies that carry the id of their command,
    and asynchronous events. No event loop, nothing to import but sockets and json (a command
    line that attaches once pays for nothing more). Every message passes check_allowed first.
    """

    def __init__(self, address: SocketAddress, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._sock: Optional[socket.socket] = None
        self._buffer = b""
        self._id = 0
        self._lifecycle: List[str] = []      # lifecycle events seen since the last check
        self._events = 0                     # events of any kind seen since mark()
        self.watch_lifecycle = False
        self.greeting: Optional[dict] = None

    def connect(self) -> "QmpMonitor":
        """Connect and negotiate. A QMP endpoint behind a guest's serial line (nested rigs)
        sent its greeting long before anyone listened: when no greeting comes, negotiate
        anyway ("already complete" is fine too)."""
        where = describe_address(self.address)
        if isinstance(self.address, str):
            check_socket_path(self.address, "QMP socket",
                              f"is QEMU running with -qmp unix:{where},server=on,wait=off ?")
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        if not isinstance(self.address, str) and ":" in self.address[0]:
            family = socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
        except PermissionError:
            sock.close()
            raise AttachError(f"permission denied opening the QMP socket {where}; run as the "
                              "user that owns it (or root)") from None
        except OSError as exc:
            sock.close()
            raise AttachError(f"could not connect to QMP at {where}: "
                              f"{exc.strerror or exc}") from None
        self._sock = sock
        try:
            self._negotiate(where)
        except BaseException:
            self.close()
            raise
        return self

    def _negotiate(self, where: str) -> None:
        try:
            first = self._message(min(self.timeout, GREETING_TIMEOUT))
        except socket.timeout:
            first = None                       # no greeting: a serial line, greeted long ago
        if first is not None and "QMP" not in first:
            raise AttachError(f"{where} is not a QMP socket: it greeted with "
                              f"{json.dumps(first)[:80]}")
        self.greeting = first
        check_allowed("qmp_capabilities")
        try:
            reply = self._exchange("qmp_capabilities", None)
        except socket.timeout:
            raise AttachError(f"QMP at {where} did not answer within {self.timeout:g} s; is it "
                              "a QMP socket (not HMP or a serial console), and is nobody else "
                              "connected to it?") from None
        error = reply.get("error")
        if error and "already complete" not in error.get("desc", ""):
            raise AttachError(f"QMP at {where} refused qmp_capabilities: "
                              f"{error.get('desc', error)}")

    def _message(self, timeout: float) -> dict:
        """The next message (raises socket.timeout after `timeout` seconds of nothing, or
        AttachError for text that is not QMP's JSON)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU closed the QMP connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_MESSAGE:
                raise AttachError(f"QMP at {describe_address(self.address)} sent more than "
                                  f"{MAX_MESSAGE >> 20} MiB without a line end: not QMP")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise AttachError(f"{describe_address(self.address)} is not QMP: it sent "
                              f"{line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise AttachError(f"{describe_address(self.address)} is not QMP: it sent {line[:80]!r}")
        return msg

    def _exchange(self, name: str, arguments: Optional[dict]) -> dict:
        """Send one command and return its reply (the message with its id); events met on the
        way are kept for check_lifecycle, stale replies of other ids skipped."""
        self._id += 1
        ident = f"qi-{self._id}"
        msg = {"execute": name, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        self._sock.settimeout(self.timeout)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(max(0.0, deadline - time.monotonic()))
            if "event" in reply:
                self._note_event(reply)
                continue
            if reply.get("id") == ident:
                return reply

    def _note_event(self, msg: dict) -> None:
        self._events += 1
        if msg["event"] in LIFECYCLE_EVENTS:
            self._lifecycle.append(msg["event"])

    def mark(self) -> None:
        """Start counting QEMU's events afresh (see events_since_mark)."""
        self._drain()
        self._events = 0

    def events_since_mark(self) -> int:
        """How many events QEMU sent since mark(), read without waiting. QEMU tells every QMP
        monitor of each change of run state (RESUME, STOP, RESET, SHUTDOWN, ...): none since
        a paused VM's registers were read means they still hold."""
        self._drain()
        return self._events

    def _drain(self) -> None:
        """Take in what QEMU sent since the last exchange (events), without waiting: at most
        MAX_DRAIN bytes a call (a monitor that never stops talking cannot hold us here; the
        rest is read at the next exchange), and no line longer than MAX_MESSAGE."""
        if self._sock is None:
            raise VMGoneError("QMP is not connected")
        self._sock.setblocking(False)
        taken = 0
        try:
            while taken < MAX_DRAIN:
                try:
                    chunk = self._sock.recv(min(65536, MAX_DRAIN - taken))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    raise VMGoneError(f"QMP connection lost: {exc.strerror or exc}") from None
                if not chunk:
                    raise VMGoneError("QEMU closed the QMP connection")
                taken += len(chunk)
                self._buffer += chunk
                while b"\n" in self._buffer:
                    msg = self._message(0)
                    if "event" in msg:   # anything else is a stale reply: nobody waits for it
                        self._note_event(msg)
                if len(self._buffer) > MAX_MESSAGE:
                    raise AttachError(f"QMP at {describe_address(self.address)} sent more "
                                      f"than {MAX_MESSAGE >> 20} MiB without a line end: "
                                      "not QMP")
        finally:
            self._sock.settimeout(self.timeout)

    def check_lifecycle(self) -> None:
        """Raise VMGoneError if the guest reset or shut down since the last check. Only a VM
        that runs while we read (no gdb, no --freeze) can: watch_lifecycle says to look."""
        if not self.watch_lifecycle or not self._lifecycle:
            return
        event = self._lifecycle[-1]
        self._lifecycle.clear()
        what = {"RESET": "reset (rebooted)", "SHUTDOWN": "shut down",
                "POWERDOWN": "was asked to power down"}.get(event, event)
        raise VMGoneError(f"the guest {what} while qintrospect was reading it, so what was read "
                          "mixes memory from before and after; run the command again, or attach "
                          "with --gdb or --freeze for one consistent view")

    def command(self, name: str, **arguments) -> object:
        """Run one allowlisted QMP command and return its 'return' value."""
        check_allowed(name, arguments)
        if self._sock is None:
            raise VMGoneError("QMP is not connected")
        try:
            reply = self._exchange(name, arguments or None)
        except socket.timeout:
            raise VMGoneError(f"QMP {name} got no answer within {self.timeout:g} s; "
                              "QEMU may be hung or gone") from None
        except OSError as exc:
            raise VMGoneError(f"QMP connection lost during {name}: "
                              f"{exc.strerror or exc}") from None
        if "error" in reply:
            error = reply["error"]
            raise QmpCommandError(f"QEMU refused QMP {name}: "
                                  f"{error.get('desc', error) if isinstance(error, dict) else error}")
        self.check_lifecycle()
        return reply.get("return")

    def peer_pid(self) -> Optional[int]:
        """The pid of the process at the other end of a Unix socket monitor (SO_PEERCRED), or
        None (TCP, or not known)."""
        if self._sock is None or self._sock.family != socket.AF_UNIX:
            return None
        import struct
        try:
            creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                          struct.calcsize("3i"))
        except OSError:
            return None
        return struct.unpack("3i", creds)[0] or None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


# ---- parsers for what QEMU prints ------------------------------------------------------------

@record(frozen=True)
class Region:
    """One line of `info mtree -f` for the system address space."""
    start: int
    end: int            # inclusive, as QEMU prints it
    kind: str           # "ram", "rom", "romd", "ramd", "i/o", "container", ...
    name: str
    offset: int         # offset inside the RAM block (the "@..." part), 0 when absent
    priority: int

    @property
    def is_ram(self) -> bool:
        """Plain RAM (or a read-only view of it): safe to read, and has a host address. Not
        "ramd" (RAM devices: VFIO BARs mapped into QEMU, reading them is a device access),
        not "romd" (ROM devices such as flash, whose reads go to the device outside ROMD
        mode), not "i/o" or "container". "nv-" marks non-volatile RAM (NVDIMM)."""
        kind = self.kind[3:] if self.kind.startswith("nv-") else self.kind
        return kind in ("ram", "rom")

    @property
    def size(self) -> int:
        return self.end - self.start + 1


_MTREE_LINE = re.compile(
    r"^\s+([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio (-?\d+), ([^)]+)\): (.*?)(?: @([0-9a-fA-F]+))?"
    r"(?: KVM)?\s*$")


def parse_mtree_flat(text: str) -> List[Region]:
    """The regions of the FlatView that serves the "memory" address space in `info mtree -f`."""
    if not isinstance(text, str):
        raise ParseError("info mtree -f: expected text")
    views = re.split(r"^FlatView #\d+\s*$", text, flags=re.M)
    for view in views[1:]:
        if not re.search(r'^\s*AS "memory"', view, flags=re.M):
            continue
        regions = []
        for line in view.splitlines():
            m = _MTREE_LINE.match(line)
            if not m:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if end < start:
                raise ParseError(f"info mtree -f: region end before start in {line.strip()!r}")
            regions.append(Region(start, end, m.group(4).strip(), m.group(5).strip(),
                                  int(m.group(6), 16) if m.group(6) else 0, int(m.group(3))))
        if not regions:
            raise ParseError('info mtree -f: the "memory" address space has no regions')
        return regions
    raise ParseError('info mtree -f: no FlatView for the "memory" address space found; '
                     "is this QEMU's `info mtree -f` output?")


# gva2gpa prints with C's "%#" format, which prints a zero as plain "0" (no 0x); gpa2hva
# prints "0x0". Both spellings are taken everywhere.
_HEX = r"(0x[0-9a-fA-F]+|0)"
_GPA2HVA = re.compile(rf"Host virtual address for {_HEX} \((.*)\) is {_HEX}")


def parse_gpa2hva(text: str) -> Tuple[int, str, int]:
    """`gpa2hva ADDR` output -> (gpa, region name, hva). ParseError for "not RAM" and the like."""
    m = _GPA2HVA.search(text or "")
    if not m:
        raise ParseError(f"gpa2hva: unexpected answer {(text or '').strip()[:120]!r}")
    return int(m.group(1), 16), m.group(2), int(m.group(3), 16)


_REG = re.compile(r"\b([A-Z][A-Z0-9]*)=([0-9a-fA-F]+)\b")


def parse_registers(text: str) -> Dict[str, int]:
    """`info registers` -> {"CR0": ..., "CR3": ..., "EFER": ..., "RIP"/"EIP": ..., "CPL": ...}.

    Only NAME=HEX pairs are taken (segment lines and vector registers are skipped). CPL is
    printed in decimal but is a single digit, so hex reads it the same.
    """
    regs: Dict[str, int] = {}
    width: Dict[str, int] = {}
    for line in (text or "").splitlines():
        if line.startswith(("ES =", "CS =", "SS =", "DS =", "FS =", "GS =", "LDT=", "TR ",
                            "GDT=", "IDT=", "FPR", "XMM", "YMM", "ZMM", "Opmask")):
            continue
        for name, value in _REG.findall(line):
            if name not in regs:
                regs[name], width[name] = int(value, 16), len(value)
    for needed in ("CR0", "CR3", "CR4", "EFER"):
        if needed not in regs:
            raise ParseError(f"info registers: no {needed}= in the output")
        # QEMU prints these with all their digits (%08x, %016x): fewer means a cut line
        digits = width[needed]
        if digits not in (8, 16):
            raise ParseError(f"info registers: {needed}= has {digits} hex digits, not 8 or 16 "
                             "as QEMU prints it: the output is cut or not QEMU's")
    return regs


_TLB_LINE = re.compile(r"^([0-9a-fA-F]+): ([0-9a-fA-F]+) ([-XGPDACTUW]{9})\s*$")


@record(frozen=True)
class TlbLine:
    va: int
    pa: int
    flags: str   # QEMU's 9 letters: X G P D A C T U W (X means NX set)


def parse_info_tlb(text: str) -> List[TlbLine]:
    """`info tlb` -> one TlbLine per leaf (QEMU prints large pages once, at their base)."""
    out = []
    for line in (text or "").splitlines():
        m = _TLB_LINE.match(line.strip())
        if m:
            out.append(TlbLine(int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


_GVA2GPA = re.compile(rf"^gpa: {_HEX}\s*$", re.M)


def parse_gva2gpa(text: str) -> Optional[int]:
    """`gva2gpa ADDR` -> the GPA, or None when QEMU says "Unmapped"."""
    m = _GVA2GPA.search(text or "")
    if m:
        return int(m.group(1), 16)
    if "Unmapped" in (text or ""):
        return None
    raise ParseError(f"gva2gpa: unexpected answer {(text or '').strip()[:120]!r}")


def peer_pid(address: SocketAddress) -> Optional[int]:
    """The pid of the process serving a local socket: SO_PEERCRED for Unix sockets, the owner
    of the listening socket (/proc/net/tcp + /proc/*/fd) for loopback TCP. None if unknown.

    For a socket reached through another VM's serial port this is that VM's QEMU, not the one
    behind the monitor: callers check the process really holds the VM's RAM before using it.
    """
    if isinstance(address, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            # A second client on QEMU's chardev waits in the backlog; SO_PEERCRED is filled in
            # at connect() time all the same, so we can ask and leave at once.
            s.connect(address)
            import struct
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            return pid or None
        except OSError:
            return None
        finally:
            s.close()
    return _tcp_listener_pid(address[1])


def _tcp_listener_pid(port: int) -> Optional[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            continue
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(f"{fd_dir}/{fd}") in inodes:
                    return int(pid)
        except OSError:
            continue
    return None
