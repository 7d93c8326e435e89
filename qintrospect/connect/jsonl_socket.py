"""JSON messages, one a line, read from a stream socket: with a deadline, and a cap on a line.

The one reader behind the QMP client (qmp.QmpMonitor: lines up to 64 MiB, deadlines of the
command's --timeout) and discovery's QMP probe (discover._probe_qmp: 1 MiB, a fraction of a
second). It knows lines and JSON, nothing of QMP: what the messages must look like is checked by
qmp.py (check_greeting, await_reply).

The peer may be hostile: a QMP monitor behind a guest's serial line (the nested rigs) is
driven by the guest, and any process may call itself QEMU. Every way a line can be wrong is a
ProtocolError (an AttachError: exit status 3) naming the peer and what was wrong, never another
exception: a line over the cap (refused as soon as the cap is passed, before the line ends),
bytes that are not UTF-8, text that is not JSON, JSON nested too deeply for the parser
(RecursionError). The peer closing the connection is a PeerClosed (a VMGoneError: exit 3).

The line end is searched for only in bytes not searched before, and bytes are appended to one
bytearray (a line that comes in many pieces costs time in proportion to its length, not to its
length squared).
"""

import json
import socket
import time

from ..errors import AttachError, VMGoneError
from ..paging.formats import size_name

CHUNK = 65536           # bytes asked of the socket a recv


class ProtocolError(AttachError):
    """The peer broke the protocol. `problem` says what, without naming the peer (for a caller
    that shows the peer itself, e.g. a table row); `sample` is a printable piece of what it sent
    ("" when none); str() is the whole sentence."""

    def __init__(self, where: str, problem: str, sample: str = ""):
        self.where, self.problem, self.sample = where, problem, sample
        super().__init__(f"{where}: {problem}" + (f": {sample}" if sample else ""))


class PeerClosed(VMGoneError):
    """The peer closed the connection (before a message, or in the middle of one)."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem, self.sample = where, problem, ""
        super().__init__(f"{where}: {problem}")


def sample_bytes(data, limit: int = 60) -> str:
    """A printable piece of raw bytes: Python's bytes repr (every byte outside printable ASCII
    escaped), cut to `limit` bytes."""
    piece = bytes(data[:limit])
    return repr(piece) + ("..." if len(data) > limit else "")


class JsonLines:
    """JSON messages, one a line (`\\n`; a `\\r` before it is JSON whitespace), from `sock`.

    max_line: the longest line taken, in bytes (a longer one is a ProtocolError as soon as it
    passes the cap); where: names the peer in errors ("QMP at /run/vm.sock"). Messages are any
    JSON value: the caller checks their shape.
    """

    __slots__ = ("sock", "max_line", "where", "buf", "_searched")

    def __init__(self, sock: socket.socket, max_line: int, where: str):
        self.sock = sock
        self.max_line = max_line
        self.where = where
        self.buf = bytearray()
        self._searched = 0        # the first bytes of buf, known to hold no line end

    def read(self, deadline: float) -> object:
        """The next message. socket.timeout when none is whole by `deadline` (a
        time.monotonic() value: a deadline already past still takes a message that is
        waiting in the buffer); PeerClosed at end of stream; OSError as the socket raises it."""
        line = self._line()
        while line is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(CHUNK)
            if not chunk:
                raise self._closed()
            self.buf += chunk
            line = self._line()
        return self.decode(line)

    def fill(self, max_bytes: int) -> int:
        """Take in what the peer has sent, without waiting: at most `max_bytes` (a peer that
        never stops talking cannot hold the caller). Returns the bytes taken; the messages are
        then had with ready(). The socket's timeout is put back as found."""
        sock = self.sock
        before = sock.gettimeout()
        sock.setblocking(False)
        taken = 0
        try:
            while taken < max_bytes:
                try:
                    chunk = sock.recv(min(CHUNK, max_bytes - taken))
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    raise self._closed()
                taken += len(chunk)
                self.buf += chunk
        finally:
            sock.settimeout(before)
        return taken

    def ready(self):
        """The messages whole in the buffer, in order, as an iterator (reads nothing)."""
        while True:
            line = self._line()
            if line is None:
                return
            yield self.decode(line)

    def discard(self) -> None:
        """Forget what is buffered."""
        del self.buf[:]
        self._searched = 0

    def _line(self):
        """The next whole line out of the buffer (a bytearray, without its `\\n`), or None."""
        buf = self.buf
        end = buf.find(b"\n", self._searched)
        if end < 0:
            self._searched = len(buf)
            if len(buf) > self.max_line:
                raise ProtocolError(self.where, f"more than {size_name(self.max_line)} without "
                                    "a line end", sample_bytes(buf))
            return None
        if end > self.max_line:
            raise ProtocolError(self.where, f"a line longer than {size_name(self.max_line)}",
                                sample_bytes(buf))
        line = buf[:end]          # (one copy; a bytearray decodes as bytes do)
        del buf[:end + 1]
        self._searched = 0
        return line

    def decode(self, line) -> object:
        """One line's JSON value; ProtocolError for anything that is not JSON in UTF-8."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(self.where, f"bytes that are not UTF-8 (at byte {exc.start} of "
                                "a line)", sample_bytes(line)) from None
        try:
            return json.loads(text)
        except RecursionError:
            raise ProtocolError(self.where, "JSON nested too deeply to read",
                                sample_bytes(line)) from None
        except ValueError as exc:     # JSONDecodeError; an integer of too many digits
            raise ProtocolError(self.where, f"a line that is not JSON ({exc})",
                                sample_bytes(line)) from None

    def _closed(self) -> PeerClosed:
        if self.buf:
            return PeerClosed(self.where, "closed the connection in the middle of a message "
                              f"({len(self.buf)} bytes without a line end)")
        return PeerClosed(self.where, "closed the connection")
