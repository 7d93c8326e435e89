"""The JSON-lines reader shared by the QMP client and discovery (qintrospect/jsonl_socket.py),
on a real socket pair: lines in pieces, the cap to the byte, the line end searched for once,
the deadline, reading without waiting."""

import socket
import time

import pytest

from qintrospect.connect.jsonl_socket import JsonLines, PeerClosed, ProtocolError


@pytest.fixture
def pair():
    mine, theirs = socket.socketpair()
    yield mine, theirs
    mine.close()
    theirs.close()


def test_lines_in_pieces_and_several_in_one(pair):
    mine, theirs = pair
    r = JsonLines(mine, 1000, "QMP at x")
    theirs.sendall(b'{"a"')
    with pytest.raises(socket.timeout):
        r.read(time.monotonic() + 0.05)
    theirs.sendall(b': 1}\r\n[2]\n"three"\r\nnull\n{"b"')
    assert r.read(time.monotonic() + 1) == {"a": 1}
    assert list(r.ready()) == [[2], "three", None]
    assert bytes(r.buf) == b'{"b"'
    # a deadline already past still takes what is waiting
    theirs.sendall(b": 2}\n")
    time.sleep(0.05)
    r.fill(1 << 20)
    assert r.read(time.monotonic() - 1) == {"b": 2}


def test_the_line_end_is_searched_for_once(pair):
    """Bytes searched without a line end are not searched again: a line in n pieces costs
    time in proportion to its length."""
    mine, theirs = pair
    r = JsonLines(mine, 1 << 20, "QMP at x")
    for i in range(1, 50):
        theirs.sendall(b" " * 1000)
        r.fill(1 << 20)
        assert list(r.ready()) == [] and r._searched == len(r.buf) == 1000 * i
    theirs.sendall(b"7\n")
    assert r.read(time.monotonic() + 1) == 7 and r._searched == 0 and not r.buf


@pytest.mark.parametrize("with_end", [True, False])
def test_the_cap_to_the_byte(pair, with_end):
    mine, theirs = pair
    r = JsonLines(mine, 100, "QMP at x")
    theirs.sendall(b"[" + b" " * 98 + b"]\n")                  # 100 bytes: taken
    assert r.read(time.monotonic() + 1) == []
    theirs.sendall(b"[" + b" " * 99 + b"]" + (b"\n" if with_end else b""))     # 101
    words = "a line longer than 100 B" if with_end else \
        "more than 100 B without a line end"
    with pytest.raises(ProtocolError, match=words) as e:
        r.read(time.monotonic() + 1)
    assert e.value.exit_status == 3 and e.value.problem == words
    assert str(e.value).startswith(f"QMP at x: {words}: b'[    ")


@pytest.mark.parametrize("data,words", [
    (b"[" * 100_000 + b"\n", "JSON nested too deeply to read"),
    (b'{"a": "\xff"}\n', r"bytes that are not UTF-8 \(at byte 7 of a line\)"),
    (b'"\xed\xa0\x80"\n', "not UTF-8"),                 # a surrogate encoded: not UTF-8
    (b"{'a': 1}\n", "a line that is not JSON"),
    (b"\n", "a line that is not JSON"),
    (b"1" * 5000 + b"\n", "a line that is not JSON"),   # past int()'s digit limit
])
def test_what_is_not_json_in_utf8(pair, data, words):
    mine, theirs = pair
    theirs.sendall(data)
    with pytest.raises(ProtocolError, match=words):
        JsonLines(mine, 1 << 20, "QMP at x").read(time.monotonic() + 1)


def test_the_end_of_the_stream(pair):
    mine, theirs = pair
    r = JsonLines(mine, 1000, "QMP at x")
    theirs.sendall(b'{"a": 1}\n{"b"')
    theirs.shutdown(socket.SHUT_WR)
    assert r.read(time.monotonic() + 1) == {"a": 1}
    with pytest.raises(PeerClosed, match=r"QMP at x: closed the connection in the middle of "
                                         r"a message \(4 bytes without a line end\)") as e:
        r.read(time.monotonic() + 1)
    assert e.value.exit_status == 3
    with pytest.raises(PeerClosed, match="closed the connection"):
        r.fill(10)


def test_fill_takes_at_most_what_it_is_told_and_never_waits(pair):
    mine, theirs = pair
    mine.settimeout(7.0)
    r = JsonLines(mine, 1 << 20, "QMP at x")
    theirs.sendall(b"1\n" * 10000)
    t0 = time.monotonic()
    assert r.fill(4096) == 4096 and len(r.buf) == 4096
    assert r.fill(1 << 20) == 20000 - 4096
    assert r.fill(1 << 20) == 0 and time.monotonic() - t0 < 1
    assert mine.gettimeout() == 7.0                  # put back as found
    assert sum(1 for _ in r.ready()) == 10000
