"""search's pure parts: the pattern as the user types it, and the finder over pieces of an
address space (matches across the joins of contiguous pieces, never across a gap; overlapping
matches; alignment; the limit), held to a plain scan of the same bytes."""

import random

import pytest

from qintrospect.commands.search import _Finder, pattern_bytes
from qintrospect.errors import UsageError


def test_patterns_as_typed():
    assert pattern_bytes("QINT") == b"QINT"
    assert pattern_bytes("de ad BE ef", "hex") == b"\xde\xad\xbe\xef"
    assert pattern_bytes("0xdeadbeef", "hex") == b"\xde\xad\xbe\xef"
    assert pattern_bytes("0x51494e54524f0001", "u64") == bytes.fromhex("01004f52544e4951")
    assert pattern_bytes("258", "u16") == b"\x02\x01"
    for text, kind, says in (("", "text", "empty"), ("xyz", "hex", "hex bytes"),
                             ("0x10000", "u16", "does not fit"), ("-1", "u32", "does not fit"),
                             ("ten", "u64", "an integer"), ("a" * 5000, "text", "at most")):
        with pytest.raises(UsageError, match=says):
            pattern_bytes(text, kind)


def plain(pieces, pattern, align=1):
    """Every match, by a plain scan of each run of contiguous pieces joined."""
    runs, out = [], []
    for address, data in pieces:
        if runs and runs[-1][0] + len(runs[-1][1]) == address:
            runs[-1] = (runs[-1][0], runs[-1][1] + data)
        else:
            runs.append((address, data))
    for address, data in runs:
        out += [address + i for i in range(len(data) - len(pattern) + 1)
                if data[i:i + len(pattern)] == pattern and (address + i) % align == 0]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_the_finder_is_a_plain_scan(seed):
    rnd = random.Random(seed)
    pattern = bytes(rnd.choice(b"ab") for _ in range(rnd.randint(1, 6)))
    pieces, address = [], 0x1000
    for _ in range(rnd.randint(1, 12)):
        data = bytes(rnd.choice(b"abc") for _ in range(rnd.randint(1, 40)))
        pieces.append((address, data))
        address += len(data) + (rnd.choice((0, 0, 7)))     # sometimes a gap: no joining
    align = rnd.choice((1, 1, 2, 4))
    f = _Finder(pattern, align, 10 ** 6)
    for address, data in pieces:
        f.feed(address, data, None)
    assert [where for where, *_ in f.found] == plain(pieces, pattern, align)


def test_a_match_across_a_join_and_its_context():
    f = _Finder(b"WXYZ", 1, 100)
    f.feed(0x1000, b"....WX", "a")
    f.feed(0x1006, b"YZ..", "b")
    f.feed(0x2000, b"Z", "c")                # not contiguous: "YZ.." does not carry here
    assert [(where, tag, ctx) for where, tag, _, ctx in f.found] == [(0x1004, "b", b"WXYZ..")]


def test_the_limit_stops_the_finder():
    f = _Finder(b"a", 1, 3)
    f.feed(0, b"aaaaaa", None)
    assert len(f.found) == 3 and f.full
