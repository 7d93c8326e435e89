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


@pytest.mark.parametrize("seed", range(60))
def test_skipping_known_zeros_finds_what_a_plain_scan_finds(seed):
    """feed_sparse (runs known to be zeros searched only at their edges) finds the same
    addresses with the same context as feed over every byte: patterns with zeros at either
    end, matches just before, just after and across a run, pieces joined or not, a run at a
    piece's start or end, all-zero patterns (searched everywhere)."""
    rnd = random.Random(seed)
    pattern = bytes(rnd.choice(b"a\0\0") for _ in range(rnd.randint(1, 6)))
    pieces, address = [], 0x1000
    for _ in range(rnd.randint(1, 6)):
        data, zeros = bytearray(), []
        for _ in range(rnd.randint(1, 6)):
            if rnd.random() < 0.5:
                n = rnd.choice((1, 5, 17, 40, 90))
                zeros.append((len(data), len(data) + n))
                data += bytes(n)
            else:
                data += bytes(rnd.choice(b"a\0b") for _ in range(rnd.randint(1, 30)))
        pieces.append((address, bytes(data), zeros))
        address += len(data) + rnd.choice((0, 0, 7))
    align = rnd.choice((1, 1, 2))
    plain_f, sparse_f = _Finder(pattern, align, 10 ** 6), _Finder(pattern, align, 10 ** 6)
    for address, data, zeros in pieces:
        plain_f.feed(address, data, None)
        sparse_f.feed_sparse(address, data, zeros, None)
    assert [(w, ctx) for w, _, _, ctx in sparse_f.found] == \
        [(w, ctx) for w, _, _, ctx in plain_f.found]
    assert [w for w, *_ in plain_f.found] == plain([(a, d) for a, d, _ in pieces], pattern,
                                                   align)


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


def _runs(pieces):
    """(va, gpa, length) pieces with neighbours contiguous in both joined."""
    out = []
    for v, g, n in pieces:
        if out and out[-1][0] + out[-1][2] == v and out[-1][1] + out[-1][2] == g:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((v, g, n))
    return out


def _plain_pieces(leaves, kept, ram, start, end):
    """The byte ranges the pieces must cover: every kept leaf clipped to [start, end), the
    ones wholly in one RAM region (a plain loop, one leaf at a time)."""
    out, not_ram = [], 0
    stop = (1 << 64) if end is None else end
    for i in kept.tolist():
        va, pa, size = int(leaves.va[i]), int(leaves.pa[i]), int(leaves.size[i])
        lo, hi = max(va, start), min(va + size, stop)
        if lo >= hi:
            continue
        gpa = pa + (lo - va)
        if not any(r.start <= gpa and gpa + (hi - lo) - 1 <= r.end for r in ram):
            not_ram += 1
            continue
        out.append((i, lo, gpa, hi - lo))
    return out, not_ram


@pytest.mark.parametrize("seed", range(40))
def test_virtual_pieces_cover_what_a_plain_loop_reads(seed):
    import random
    import types
    import numpy as np
    from qintrospect.commands.search import PIECE, _virtual_pieces
    rnd = random.Random(seed)
    va, pa, size = [], [], []
    at, frame = rnd.choice((0, (1 << 64) - (1 << 40))), 0x4000_0000
    for _ in range(rnd.randrange(1, 300)):
        s = rnd.choice((1 << 12, 1 << 12, 1 << 21, 1 << 30 if rnd.random() < .05 else 1 << 12))
        at = (at + s - 1) // s * s + (0 if rnd.random() < .7 else s * rnd.randrange(1, 4))
        frame = (frame + s - 1) // s * s + (0 if rnd.random() < .7 else s)
        if at + s > 1 << 64:
            break
        va.append(at), pa.append(frame), size.append(s)
        at, frame = at + s, frame + s
    u64 = lambda v: np.array(v, np.uint64)  # noqa: E731
    leaves = types.SimpleNamespace(va=u64(va), pa=u64(pa), size=u64(size))
    ram = [types.SimpleNamespace(start=0x4000_0000, end=0x4000_0000 + rnd.choice(
        (1 << 28, 1 << 34)) - 1), types.SimpleNamespace(start=1 << 40, end=(1 << 41) - 1)]
    kept = np.flatnonzero(np.array([rnd.random() < .9 for _ in va], bool))
    start = rnd.choice((0, va[len(va) // 2] + 0x123 if va else 0))
    end = rnd.choice((None, (va[-1] + size[-1] - 0x77) if va else None, 1 << 64))
    pieces, not_ram = _virtual_pieces(leaves, kept, ram, start, end)
    want, want_not_ram = _plain_pieces(leaves, kept, ram, start, end)
    assert not_ram == want_not_ram
    assert _runs((v, g, n) for v, g, n, _ in pieces) == _runs((v, g, n) for _, v, g, n in want)
    for v, g, n, leaf in pieces:
        assert 0 < n <= PIECE
        assert va[leaf] <= v < va[leaf] + size[leaf]


class _RiscvSession:
    """What search_virtual asks of a session, over RISC-V tables in a test_riscv_walk.Mem: the
    leaf arrays (riscv_vector), the batch walk (commands.batch), one RAM region (no host)."""

    def __init__(self, mem, state, ram):
        import types
        self.mem, self.state = mem, state
        self.ram_map = types.SimpleNamespace(ram=[ram])
        self.memory = types.SimpleNamespace(read=mem, name="test")
        self.process = None

    def leaf_arrays(self, cr3, start, end):
        from qintrospect import paging
        return paging.leaf_arrays(self.mem, self.state, start, end)

    def cpu_state(self, cr3=None):
        return self.state

    def translate_batch(self, addresses, cr3=None):
        from qintrospect.commands.batch import translate_batch
        return translate_batch(self, addresses, cr3)

    def check_live(self):
        pass


def test_riscv_execute_only_pages_are_not_readable_in_search():
    """search on riscv64 says read as vmmap does: `-` for an execute-only page (R=0, X=1), in
    the text's prm column and as `readable` in the JSON; the other pages read `r`."""
    import types
    from qintrospect.commands import vmmap
    from qintrospect.commands.search import search_virtual, text
    from tests.unit.test_riscv_walk import A, D, Mem, R, U, V, W, X, build, pte, state
    mem = Mem()
    frames = {0x10000: (0x90001000, V | X | A | U),             # execute-only
              0x11000: (0x90002000, V | R | X | A | U),         # r-x
              0x12000: (0x90003000, V | R | W | A | D | U)}     # rw-
    for va, (frame, bits) in frames.items():
        build(mem, va, pte(frame, bits))
        mem.put(frame + 0x40, int.from_bytes(b"QINTMARK", "little"))
    s = state()
    ram = types.SimpleNamespace(start=0x90000000, end=0x90FFFFFF, kind="ram", hva=None,
                                block="ram")
    session = _RiscvSession(mem, s, ram)
    result = search_virtual(session, b"QINTMARK")
    assert [m.gva for m in result.matches] == [va + 0x40 for va in frames]
    assert [(m.readable, m.writable, m.executable) for m in result.matches] == [
        (False, False, True), (True, False, True), (True, True, False)]
    dicts = [m.to_dict() for m in result.matches]
    assert [d["readable"] for d in dicts] == [False, True, True]
    assert list(dicts[0])[list(dicts[0]).index("page_size") + 1] == "readable"
    rows = text(result).splitlines()[1:4]
    assert [r.split()[3] for r in rows] == ["--x", "r-x", "rw-"]
    # the same rights as vmmap's rows of those pages
    la = session.leaf_arrays(None, 0, None)
    perms = {r.start: r.perms for r in vmmap.iter_rows(vmmap.from_leaves(la), la.format)}
    assert [perms[va] for va in frames] == ["--x", "r-x", "rw-"]
