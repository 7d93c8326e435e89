"""A fake QMP monitor for the hostile tests: a real Unix socket server that answers like QEMU
7.2 (enough for `qintrospect cpus`), except where a play says otherwise.

Two ways to run it:
- in the test process: FakeQmp(path, play) serves from a thread, one client at a time;
- as a process that calls itself QEMU: `python fakeqmp.py ... -qmp unix:PATH,server=on,...`
  run through a link (or a copy of the interpreter) named qemu-system-x86_64; QI_FAKE_PLAY
  names the play. It listens on PATH itself (as QEMU holds its monitor's socket), prints
  READY and serves until killed. The rest of its command line (-name, -m ...) is for `list`.

Standard library only: the script runs under a bare interpreter, without the venv.
"""

import json
import os
import socket
import sys
import threading

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "qemu")
GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22},
                                "package": "Debian 1:7.2+dfsg-7 (fake)"},
                    "capabilities": ["oob"]}}
DEEP = b"[" * 100_000 + b"]" * 100_000          # 100k levels of nesting, well-formed


def line(obj) -> bytes:
    """One message as QEMU sends it (CRLF)."""
    return json.dumps(obj).encode() + b"\r\n"


def _data(name: str) -> str:
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def good_return(cmd: dict, status: str = "running"):
    """What QEMU 7.2 answers to the commands qintrospect sends (a 256 MiB pc guest, 1 vCPU)."""
    name = cmd.get("execute")
    args = cmd.get("arguments") or {}
    if name == "query-status":
        return {"status": status, "running": status == "running", "singlestep": False}
    if name == "query-kvm":
        return {"enabled": False, "present": True}
    if name == "query-cpus-fast":
        return [{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                 "thread-id": os.getpid(), "target": "x86_64",
                 "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0}}]
    if name == "query-memory-size-summary":
        return {"base-memory": 256 << 20, "plugged-memory": 0}
    if name == "query-stats":
        return []
    if name == "qom-get":
        return 40 if args.get("property") == "phys-bits" else False
    if name == "human-monitor-command":
        text = args.get("command-line", "")
        if text == "info mtree -f":
            return _data("mtree_f_pc_7.2.txt")
        if text == "info registers":
            return _data("info_registers_7.2.txt")
        if text.startswith("gpa2hva "):
            gpa = int(text.split()[1], 16)
            return f"Host virtual address for {gpa:#x} (pc.ram) is {0x7f0000000000 + gpa:#x}\r\n"
        if text.startswith("xp "):
            start = int(text.split()[-1], 16)
            count = int(text.split()[1][1:-2])
            return "".join(f"{start + 16 * i:016x}: 0x{0:016x} 0x{0:016x}\r\n"
                           for i in range((count + 1) // 2))
        return ""
    return {}


class Peer:
    """One client: its commands in, bytes out."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.file = conn.makefile("rb")
        self.commands = []

    def command(self):
        """The client's next command, or None when it left (or sent something else)."""
        try:
            text = self.file.readline()
        except OSError:
            return None
        if not text:
            return None
        try:
            cmd = json.loads(text)
        except ValueError:
            return None
        self.commands.append(cmd)
        return cmd

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def answer(self, cmd: dict, status: str = "running") -> None:
        self.send(line({"return": good_return(cmd, status), "id": cmd.get("id")}))

    def reply(self, cmd: dict, **fields) -> None:
        self.send(line(dict(fields, id=cmd.get("id"))))

    def hold(self) -> None:
        """Say nothing more; keep the connection until the client leaves."""
        while self.command() is not None:
            pass


def standard(peer: Peer, greet=GREETING, tweak=None, status="running") -> None:
    """QEMU's way: greet (greet=None: no greeting, a serial line greeted long ago; bytes: sent
    as they are), then answer each command, unless tweak(peer, cmd) answers it (True)."""
    if greet is not None:
        peer.send(greet if isinstance(greet, bytes) else line(greet))
    while True:
        cmd = peer.command()
        if cmd is None:
            return
        if tweak is not None and tweak(peer, cmd):
            continue
        peer.answer(cmd, status)


def on(command: str, act):
    """A tweak: act(peer, cmd) for `command` (every time), QEMU's answer for the others."""
    def tweak(peer, cmd):
        if cmd.get("execute") != command:
            return False
        act(peer, cmd)
        return True
    return tweak


def closing(data: bytes):
    """An act: send these bytes, then close the connection."""
    def act(peer, cmd):
        peer.send(data)
        peer.conn.shutdown(socket.SHUT_RDWR)
    return act


def stalling(data: bytes):
    """An act: send these bytes, then nothing more."""
    def act(peer, cmd):
        peer.send(data)
        peer.hold()
    return act


def _events_then_answer(peer, cmd):
    peer.send(line({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}))
    peer.send(line({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1,
                                                                 "microseconds": 3}}))
    peer.send(line({"event": "VNC_CONNECTED", "data": {"server": {}, "client": {}}}))
    peer.answer(cmd)


def _flood_then_answer(peer, cmd):
    peer.send(line({"event": "BALLOON_CHANGE", "data": {"actual": 1}}) * 20000)
    peer.answer(cmd)


def _wrong_ids_first(peer, cmd):
    peer.send(line({"return": {"status": "bogus", "running": "?"}, "id": "not-yours"}))
    peer.send(line({"return": 5, "id": f"{cmd.get('id')}0"}))
    peer.send(line({"error": "boom"}))                   # no id: nobody's
    peer.answer(cmd)


def _stale_error_first(peer, cmd):
    # behind a serial line: an earlier client's leftovers come before our answer
    peer.send(line({"error": {"class": "GenericError", "desc": "JSON parse error, stray"}}))
    peer.answer(cmd)


def _answer_then(data: bytes):
    """An act: QEMU's answer, then these bytes (events that come between two commands)."""
    def act(peer, cmd):
        peer.answer(cmd)
        peer.send(data)
    return act


def _silent(peer):
    peer.hold()


def _close_at_once(peer):
    peer.conn.shutdown(socket.SHUT_RDWR)


PWNED = "\x1b]0;pwned\x07\x9b2J"       # retitle the terminal, then CSI (C1) clear the screen


def plays():
    """Every play by name: a function of one Peer."""
    bad = lambda **fields: (lambda peer, cmd: peer.reply(cmd, **fields))   # noqa: E731
    raw = lambda data: (lambda peer, cmd: peer.send(data))                 # noqa: E731
    return {
        "good": lambda p: standard(p),
        "paused": lambda p: standard(p, status="paused"),
        # what the review found
        "deep-greeting": lambda p: standard(p, greet=DEEP + b"\r\n"),
        "deep-reply": lambda p: standard(p, tweak=on("query-status", raw(DEEP + b"\r\n"))),
        "deep-unclosed": lambda p: standard(p, tweak=on("query-status",
                                                        raw(b"[" * 100_000 + b"\r\n"))),
        "greeting-qmp-text": lambda p: standard(p, greet=b'{"QMP":"x"}\r\n'),
        "greeting-version-text": lambda p: standard(p, greet=line(
            {"QMP": {"version": "7.2", "capabilities": []}})),
        "greeting-major-text": lambda p: standard(p, greet=line(
            {"QMP": {"version": {"qemu": {"major": "7", "minor": 2, "micro": 0}}}})),
        "greeting-array": lambda p: standard(p, greet=b'["QMP"]\r\n'),
        "return-5": lambda p: standard(p, tweak=on("query-status", bad(**{"return": 5}))),
        "status-number": lambda p: standard(p, tweak=on("query-status", bad(
            **{"return": {"status": 7, "running": True}}))),
        "kvm-enabled-text": lambda p: standard(p, tweak=on("query-kvm", bad(
            **{"return": {"enabled": "yes", "present": True}}))),
        "cpus-item-number": lambda p: standard(p, tweak=on("query-cpus-fast", bad(
            **{"return": [5]}))),
        "cpus-index-text": lambda p: standard(p, tweak=on("query-cpus-fast", bad(
            **{"return": [{"cpu-index": "0", "qom-path": "/x"}]}))),
        "hmp-object": lambda p: standard(p, tweak=on("human-monitor-command", bad(
            **{"return": {"text": "CR0=0"}}))),
        "capabilities-error-text": lambda p: standard(p, tweak=on("qmp_capabilities", bad(
            error="boom"))),
        "error-desc-number": lambda p: standard(p, tweak=on("query-status", bad(
            error={"desc": 7}))),
        "error-array": lambda p: standard(p, tweak=on("query-status", bad(error=["x"]))),
        "no-return": lambda p: standard(p, tweak=on("query-status", bad())),
        "reply-not-object": lambda p: standard(p, tweak=on("query-status", raw(b"[]\r\n"))),
        "escape-in-error": lambda p: standard(p, tweak=on("query-status", bad(
            error={"class": "GenericError", "desc": PWNED}))),
        "escape-in-capabilities-error": lambda p: standard(p, tweak=on(
            "qmp_capabilities", bad(error={"class": "GenericError", "desc": PWNED}))),
        "escape-in-status": lambda p: standard(p, tweak=on("query-status", bad(
            **{"return": {"status": PWNED + "\ud800", "running": False}}))),
        # lines
        "huge-line": lambda p: standard(p, tweak=on("query-status", stalling(
            b'{"return": "' + b"x" * ((64 << 20) + 1)))),
        "huge-greeting": lambda p: standard(p, greet=b'{"QMP": "' + b"x" * (2 << 20)),
        "partial-then-eof": lambda p: standard(p, tweak=on("query-status", closing(
            b'{"return": {"status": "run'))),
        "eof-in-greeting": lambda p: standard(p, greet=b'{"QMP": {"version"', tweak=on(
            "qmp_capabilities", closing(b""))),
        "closes-at-once": _close_at_once,
        "non-utf8": lambda p: standard(p, tweak=on("query-status", raw(
            b'{"return": {"status": "\xff\xfe", "running": true}, "id": "qi-2"}\r\n'))),
        "non-utf8-greeting": lambda p: standard(p, greet=b'{"QMP": {"x": "\xc3\x28"}}\r\n'),
        "not-json": lambda p: standard(p, tweak=on("query-status", raw(b"hello\r\n"))),
        "blank-line": lambda p: standard(p, tweak=on("query-status", raw(b"\r\n"))),
        "long-number": lambda p: standard(p, tweak=on("query-status", raw(
            b'{"return": {"n": ' + b"9" * 5000 + b'}, "id": "x"}\r\n'))),
        # events
        "events-between": lambda p: standard(p, tweak=_events_then_answer_all),
        "event-flood": lambda p: standard(p, tweak=on("query-status", _flood_then_answer)),
        "event-not-object": lambda p: standard(p, tweak=on("query-status", raw(b"5\r\n"))),
        "event-name-number": lambda p: standard(p, tweak=on("query-status", raw(
            line({"event": 5, "data": {}})))),
        "event-name-missing": lambda p: standard(p, tweak=on("query-status", raw(
            line({"event": None})))),
        "event-data-text": lambda p: standard(p, tweak=on("query-status", raw(
            line({"event": "STOP", "data": "x"})))),
        "trailing-events": lambda p: standard(p, tweak=on("query-status", _answer_then(
            line({"event": "STOP"}) + line({"event": "RESET", "data": {"guest": True}})))),
        "trailing-bad-event": lambda p: standard(p, tweak=on("query-status", _answer_then(
            line({"event": ["RESET"]})))),
        # ids and greetings
        "wrong-id-first": lambda p: standard(p, tweak=_wrong_ids_first_all),
        "no-greeting": lambda p: standard(p, greet=None),
        "no-greeting-stale-error": lambda p: standard(p, greet=None, tweak=on(
            "qmp_capabilities", _stale_error_first)),
        "silent": _silent,
    }


def _events_then_answer_all(peer, cmd):
    _events_then_answer(peer, cmd)
    return True


def _wrong_ids_first_all(peer, cmd):
    _wrong_ids_first(peer, cmd)
    return True


class FakeQmp:
    """A fake QMP server on a Unix socket, in a thread: one client at a time, each served the
    play from the start (as a fresh QEMU monitor would). `clients`: the Peer of each."""

    def __init__(self, path: str, play, listener: socket.socket = None):
        self.path = path
        self.play = plays()[play] if isinstance(play, str) else play
        self.clients = []
        if listener is None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(4)
        self.server = listener
        self._conns = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._conns.append(conn)
            peer = Peer(conn)
            self.clients.append(peer)
            try:
                self.play(peer)
            except OSError:
                pass
            finally:
                try:
                    peer.file.close()
                    conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _qmp_path(argv):
    """The path of `-qmp unix:PATH,...` in a command line."""
    for opt, value in zip(argv, argv[1:]):
        if opt == "-qmp" and value.startswith("unix:"):
            return value[5:].split(",")[0]
    return None


def main(argv) -> int:
    """A process that calls itself QEMU: serve the play QI_FAKE_PLAY on its -qmp socket."""
    path = _qmp_path(argv)
    server = None
    if path:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        server = FakeQmp(path, os.environ.get("QI_FAKE_PLAY", "good"), listener)
    print("READY", flush=True)
    try:
        sys.stdin.read()           # until the test closes our stdin (or kills us)
    except KeyboardInterrupt:
        pass
    if server is not None:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
