"""gdb/MI's lines as qintrospect reads them from its gdb: lines split across reads, many in one
read, a line of many MiB read in linear time, one past the cap refused, gdb gone."""

import os
import threading
import time
from types import SimpleNamespace

import pytest

from qintrospect.connect import gdbstub
from qintrospect.errors import VMGoneError


def reader(chunks, close=True):
    r, w = os.pipe()

    def feed():
        try:
            for c in chunks:
                os.write(w, c)
        except BrokenPipeError:       # the reader gave up (the cap): nothing more to say
            pass
        if close:
            os.close(w)
    threading.Thread(target=feed, daemon=True).start()
    stub = gdbstub.GdbStub.__new__(gdbstub.GdbStub)
    stub._proc = SimpleNamespace(stdout=os.fdopen(r, "rb", buffering=0))
    stub._buffer = bytearray()
    stub.timeout = 5
    return stub


def test_lines_split_and_joined_across_reads():
    stub = reader([b"^done,a=", b"1\r\n*stopped\n(gdb) \n^done", b"\n"])
    got = [stub._readline(time.monotonic() + 5, "x") for _ in range(4)]
    assert got == ["^done,a=1", "*stopped", "(gdb) ", "^done"]


def test_a_line_of_many_mib_is_read_whole():
    big = b"^done,memory=[{contents=\"" + b"ab" * (8 << 20) + b"\"}]\n"
    stub = reader([big[i:i + 4096] for i in range(0, len(big), 4096)])
    t = time.monotonic()
    line = stub._readline(time.monotonic() + 60, "-data-read-memory-bytes")
    assert len(line) == len(big) - 1
    print(f"16 MiB line in 4 KiB pieces: {time.monotonic() - t:.2f} s")


def test_a_line_past_the_cap_is_refused(monkeypatch):
    monkeypatch.setattr(gdbstub, "MAX_LINE", 1 << 20)
    stub = reader([b"x" * (64 << 10)] * 20, close=False)
    with pytest.raises(VMGoneError, match="longer than 1 MiB"):
        stub._readline(time.monotonic() + 10, "-data-read-memory-bytes 0 1")


def test_gdb_gone_mid_line():
    stub = reader([b"^done,partial"])
    with pytest.raises(VMGoneError, match="gdb exited"):
        stub._readline(time.monotonic() + 5, "x")
