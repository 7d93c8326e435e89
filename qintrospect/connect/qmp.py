"""QMP access: a small synchronous client, its read-only allowlist and its checks of every reply.
(What the monitor's text says is read by machine/monitor_text.py.)

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
from typing import Callable, Dict, List, Optional, Tuple, Union

from ..errors import AttachError, UsageError, VMGoneError
from .jsonl_socket import JsonLines, ProtocolError
from ..present.textsafe import printable

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


# ---- what QMP's messages must look like -------------------------------------------------------
# A monitor's messages come from QEMU, or from whatever answers on its socket: behind a guest's
# serial line (the nested rigs) the guest writes them, and any process may call itself QEMU.
# Every field qintrospect reads is checked before it is read; one that is wrong is a
# ProtocolError (an AttachError: exit 3) naming the socket, what was wrong and a piece of the
# message. Lines, UTF-8 and JSON are checked by the reader (jsonl_socket.JsonLines).

QmpProtocolError = ProtocolError       # the name callers of this module know it by

_KIND = {dict: "an object", list: "an array", str: "a string", int: "an integer",
         bool: "true or false"}

# What each allowed command's "return" must be: (its type, the fields its objects may have with
# their types (of each item, for an array), the fields they must have). None: any JSON value.
_RETURNS: Dict[str, tuple] = {
    "qmp_capabilities": (dict, {}, ()),
    "stop": (dict, {}, ()),
    "cont": (dict, {}, ()),
    "query-status": (dict, {"status": str, "running": bool}, ("status", "running")),
    "query-kvm": (dict, {"enabled": bool, "present": bool}, ("enabled", "present")),
    "query-cpus-fast": (list, {"cpu-index": int, "qom-path": str, "thread-id": int,
                               "target": str}, ("cpu-index",)),
    "query-stats": (list, {}, ()),
    "query-memory-size-summary": (dict, {"base-memory": int, "plugged-memory": int},
                                  ("base-memory",)),
    "human-monitor-command": (str, None, ()),
    "qom-get": (None, None, ()),
}


def sample(value) -> str:
    """A short printable rendering of a message (JSON, non-ASCII escaped), for errors."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return f"({type(value).__name__})"
    return text if len(text) <= 80 else text[:77] + "..."


def _malformed(where: str, what: str, why: str, value) -> ProtocolError:
    return ProtocolError(where, f"malformed {what} ({why})", sample(value))


def check_greeting(msg: dict, where: str) -> dict:
    """The "QMP" object of a greeting, every field of it checked: {"QMP": {"version":
    {"qemu": {"major", "minor", "micro": integers}, "package": text}, "capabilities":
    [text...]}} (version and capabilities may be missing; when there, they are right)."""
    if "QMP" not in msg:
        raise ProtocolError(where, "not a QMP greeting", sample(msg))
    qmp = msg["QMP"]
    if type(qmp) is not dict:
        raise _malformed(where, "greeting", '"QMP" is not an object', msg)
    if "version" in qmp:
        version = qmp["version"]
        if type(version) is not dict:
            raise _malformed(where, "greeting", '"version" is not an object', msg)
        if "qemu" in version:
            qemu = version["qemu"]
            if type(qemu) is not dict:
                raise _malformed(where, "greeting", '"qemu" is not an object', msg)
            for key in ("major", "minor", "micro"):
                if type(qemu.get(key)) is not int:
                    raise _malformed(where, "greeting", f'"qemu" "{key}" is not an integer', msg)
        if "package" in version and type(version["package"]) is not str:
            raise _malformed(where, "greeting", '"package" is not a string', msg)
    if "capabilities" in qmp:
        caps = qmp["capabilities"]
        if type(caps) is not list or any(type(c) is not str for c in caps):
            raise _malformed(where, "greeting", '"capabilities" is not an array of strings', msg)
    return qmp


def greeting_version(qmp: dict) -> Optional[str]:
    """"7.2.22" from a greeting's checked "QMP" object, or None when it does not say."""
    qemu = qmp.get("version", {}).get("qemu")
    return "{major}.{minor}.{micro}".format(**qemu) if qemu else None


def check_event(msg: dict, where: str) -> str:
    """An event's name: "event" must be text, "data" (when there) an object."""
    name = msg["event"]
    if type(name) is not str:
        raise _malformed(where, "event", '"event" is not a string', msg)
    if "data" in msg and type(msg["data"]) is not dict:
        raise _malformed(where, "event", '"data" is not an object', msg)
    return name


def check_reply(msg: dict, name: str, where: str) -> dict:
    """The reply to `name`, checked: an "error" object with a text "desc", or a "return" of the
    shape the command returns (see _RETURNS)."""
    what = f"reply to {name}"
    if "error" in msg:
        error = msg["error"]
        if type(error) is not dict:
            raise _malformed(where, what, '"error" is not an object', msg)
        if type(error.get("desc")) is not str:
            raise _malformed(where, what, '"error" "desc" is not a string', msg)
        if "class" in error and type(error["class"]) is not str:
            raise _malformed(where, what, '"error" "class" is not a string', msg)
        return msg
    if "return" not in msg:
        raise _malformed(where, what, 'neither "return" nor "error"', msg)
    kind, fields, required = _RETURNS.get(name, (None, None, ()))
    if kind is None:
        return msg
    value = msg["return"]
    if type(value) is not kind:
        raise _malformed(where, what, f'"return" is not {_KIND[kind]}', msg)
    if fields:
        for n, item in enumerate(value if kind is list else (value,)):
            at = f"item {n}: " if kind is list else ""
            if type(item) is not dict:
                raise _malformed(where, what, f'"return" {at}not an object', msg)
            for key in required:
                if key not in item:
                    raise _malformed(where, what, f'{at}no "{key}"', msg)
            for key, want in fields.items():
                if key in item and type(item[key]) is not want:
                    raise _malformed(where, what, f'{at}"{key}" is not {_KIND[want]}', msg)
    return msg


def await_reply(lines: JsonLines, ident: str, name: str, deadline: float,
                on_event: Optional[Callable[[dict], None]] = None) -> dict:
    """Read until the reply that carries `ident` and return it, checked (check_reply). Events
    met on the way are checked and given to on_event; replies of other ids (an earlier
    client's, a command given up on) are skipped. socket.timeout past `deadline`."""
    where = lines.where
    while True:
        msg = lines.read(deadline)
        if type(msg) is not dict:
            raise ProtocolError(where, "a message that is not a JSON object", sample(msg))
        if "event" in msg:
            check_event(msg, where)
            if on_event is not None:
                on_event(msg)
            continue
        if msg.get("id") == ident:
            return check_reply(msg, name, where)


class Monitor:
    """What a session asks of a monitor, however it is reached: command(name, **arguments),
    which passes check_allowed first; hmp() is human-monitor-command on top of it."""

    def command(self, name: str, **arguments) -> object:
        raise NotImplementedError

    def sync(self) -> None:
        """One round trip: every event QEMU sent before it has then reached the listeners."""
        self.command("query-status")

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
    Every message read is checked (see check_greeting, check_reply, check_event): a monitor
    that breaks the protocol is a ProtocolError (exit 3) naming the socket, never a crash.
    """

    def __init__(self, address: SocketAddress, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._where = f"QMP at {describe_address(address)}"
        self._lines: Optional[JsonLines] = None     # the connection, and what it has sent
        self._broken: Optional[str] = None  # why it was closed: the protocol error it made
        self._id = 0
        # called with each event's name (runguard.RunGuard: resumes, resets), and after each
        # reply (the guard may end a read an event spoiled: VMGoneError)
        self.listeners: List[Callable[[str], None]] = []
        self.after_reply: List[Callable[[], None]] = []
        self.greeting: Optional[dict] = None

    # the connected socket (None when not connected); setting it starts reading it
    @property
    def _sock(self) -> Optional[socket.socket]:
        return self._lines.sock if self._lines is not None else None

    @_sock.setter
    def _sock(self, sock: Optional[socket.socket]) -> None:
        self._lines = JsonLines(sock, MAX_MESSAGE, self._where) if sock is not None else None

    def _reader(self) -> JsonLines:
        lines = self._lines
        if lines is None:
            raise self._not_connected()
        lines.max_line = MAX_MESSAGE         # a module setting, read at each use
        return lines

    def _not_connected(self) -> VMGoneError:
        if self._broken:
            return VMGoneError(f"{self._where}: not talked to since it broke the protocol: "
                               f"{self._broken}")
        return VMGoneError("QMP is not connected")

    def _break(self, exc: ProtocolError) -> None:
        """After a protocol error the monitor is not talked to again (after a line over the
        cap, the rest of it would be read as the next line; and it is not QEMU's)."""
        self._broken = exc.problem + (f": {exc.sample}" if exc.sample else "")
        self.close()

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
        except OSError as exc:               # reset by the peer, and the like
            self.close()
            raise AttachError(f"{self._where}: the connection failed while negotiating: "
                              f"{exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise
        return self

    def _negotiate(self, where: str) -> None:
        try:
            first = self._message(min(self.timeout, GREETING_TIMEOUT))
        except socket.timeout:
            first = None                       # no greeting: a serial line, greeted long ago
        if first is None or "return" in first or "error" in first:
            pass                               # (a serial line's stale reply: skipped)
        elif "event" in first:                 # greeted long ago; an event came first
            check_event(first, self._where)
            self._note_event(first)
        else:
            check_greeting(first, self._where)     # ProtocolError: not QMP, or malformed
            self.greeting = first
        check_allowed("qmp_capabilities")
        try:
            reply = self._exchange("qmp_capabilities", None)
        except socket.timeout:
            raise AttachError(f"QMP at {where} did not answer within {self.timeout:g} s; is it "
                              "a QMP socket (not HMP or a serial console), and is nobody else "
                              "connected to it?") from None
        error = reply.get("error")
        if error is not None and "already complete" not in error["desc"]:
            raise AttachError(f"QMP at {where} refused qmp_capabilities: "
                              f"{printable(error['desc'])}")

    def _message(self, timeout: float) -> dict:
        """The next message, a JSON object (socket.timeout after `timeout` seconds of nothing;
        ProtocolError for anything else)."""
        msg = self._reader().read(time.monotonic() + timeout)
        if type(msg) is not dict:
            raise ProtocolError(self._where, "a message that is not a JSON object", sample(msg))
        return msg

    def _exchange(self, name: str, arguments: Optional[dict]) -> dict:
        """Send one command and return its reply, checked (the message with its id); events
        met on the way go to the listeners, stale replies of other ids are skipped."""
        lines = self._reader()
        self._id += 1
        ident = f"qi-{self._id}"
        msg = {"execute": name, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        sock = lines.sock
        sock.settimeout(self.timeout)
        sock.sendall(json.dumps(msg).encode() + b"\n")
        return await_reply(lines, ident, name, time.monotonic() + self.timeout,
                           self._note_event)

    def _note_event(self, msg: dict) -> None:
        """Tell the listeners of an event (checked by the caller: check_event)."""
        for listener in tuple(self.listeners):
            listener(msg["event"])

    def poll(self) -> None:
        """Take in what QEMU sent since the last exchange (events), without waiting: at most
        MAX_DRAIN bytes a call (a monitor that never stops talking cannot hold us here; the
        rest is read at the next exchange), and no line longer than MAX_MESSAGE."""
        lines = self._reader()
        try:
            lines.fill(MAX_DRAIN)
        except OSError as exc:
            raise VMGoneError(f"QMP connection lost: {exc.strerror or exc}") from None
        try:
            for msg in lines.ready():
                if type(msg) is not dict:
                    raise ProtocolError(self._where, "a message that is not a JSON object",
                                        sample(msg))
                if "event" in msg:   # anything else is a stale reply: nobody waits for it
                    check_event(msg, self._where)
                    self._note_event(msg)
        except ProtocolError as exc:
            self._break(exc)
            raise

    def command(self, name: str, **arguments) -> object:
        """Run one allowlisted QMP command and return its 'return' value, checked: of the
        shape the command returns (_RETURNS), else a ProtocolError."""
        check_allowed(name, arguments)
        if self._lines is None:
            raise self._not_connected()
        try:
            reply = self._exchange(name, arguments or None)
        except socket.timeout:
            raise VMGoneError(f"QMP {name} got no answer within {self.timeout:g} s; "
                              "QEMU may be hung or gone") from None
        except OSError as exc:
            raise VMGoneError(f"QMP connection lost during {name}: "
                              f"{exc.strerror or exc}") from None
        except ProtocolError as exc:
            self._break(exc)
            raise
        if "error" in reply:
            raise QmpCommandError(f"QEMU refused QMP {name}: "
                                  f"{printable(reply['error']['desc'])}")
        for hook in tuple(self.after_reply):
            hook()
        return reply["return"]

    def peer_pid(self) -> Optional[int]:
        """The pid of the process at the other end of this Unix socket connection
        (SO_PEERCRED), or None (TCP, or not known)."""
        from .peers import connected_peer
        return connected_peer(self._sock)

    def close(self) -> None:
        lines, self._lines = self._lines, None
        if lines is not None:
            try:
                lines.sock.close()
            except OSError:
                pass
