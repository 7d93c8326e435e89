"""Lines made from arrays (present.rowlines; translate --brief's brieflines, vmmap --json's
maplines) are json_line of each row's dict, byte for byte: in C and by the fallback, with text
from outside that holds %-signs, NULs and quotes, faults, nulls, a row ending at 2**64, and
rows that share nothing."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from qintrospect.commands.batch import BatchTranslation
from qintrospect.paging.vector import FAULT_REASONS
from qintrospect.present import brieflines, rowlines
from qintrospect.present.render import json_line
from qintrospect.present.rowlines import row_template

U64 = np.uint64


class _Walk(SimpleNamespace):
    """The columns of a paging.BatchWalk that the lines read."""

    def __len__(self):
        return len(self.ok)


def _batch(n, blocks, seed=3):
    rnd = random.Random(seed)
    reasons = [k for k, r in enumerate(FAULT_REASONS) if r]
    ok = np.array([rnd.random() < 0.8 for _ in range(n)])
    col = lambda f, dt: np.array([f() for _ in range(n)], dt)   # noqa: E731
    levels = ("PGD", "PUD", "PMD", "PTE")
    walk = _Walk(
        ok=ok, va=col(lambda: rnd.getrandbits(64), U64), pa=col(lambda: rnd.getrandbits(52), U64),
        page_size=col(lambda: rnd.choice((4096, 1 << 21, 1 << 30)), U64),
        fault_level=np.where(ok, -1, col(lambda: rnd.randrange(-1, 4), np.int8)),
        fault_reason=np.where(ok, 0, col(lambda: rnd.choice(reasons), np.uint8)),
        writable=col(lambda: rnd.random() < .5, bool), user=col(lambda: rnd.random() < .5, bool),
        executable=col(lambda: rnd.random() < .5, bool))
    walk.level_name = lambda i: None if walk.fault_level[i] < 0 else levels[walk.fault_level[i]]
    walk.reason = lambda i: FAULT_REASONS[int(walk.fault_reason[i])]
    return BatchTranslation(
        walk, col(lambda: rnd.randrange(-1, len(blocks)), np.int32),
        col(lambda: rnd.getrandbits(48), U64), col(lambda: rnd.random() < .9, bool),
        col(lambda: rnd.getrandbits(52), U64), col(lambda: rnd.randrange(0, 7), np.uint8),
        col(lambda: rnd.getrandbits(64), U64), col(lambda: rnd.random() < .7, bool),
        tuple(blocks))


@pytest.mark.parametrize("in_c", [True, False])
def test_the_lines_are_the_dicts_lines(monkeypatch, in_c):
    b = _batch(3000, ["pc.ram", "100% \x00qi-hex\x00 \"x\"\\", "%#x%d%%", "\x00qi-null\x00"])
    if not in_c:
        monkeypatch.setattr(rowlines, "_rowformat", None)
    elif rowlines._rowformat is None:
        pytest.fail("_rowformat.c was not built (scripts/setup builds it)")
    got = [line for block in brieflines.brief_lines(b, size=256) for line in block]
    want = [(json_line(b.row_dict(i)) + "\n").encode() for i in range(len(b))]
    assert got == want


@pytest.mark.parametrize("in_c", [True, False])
def test_the_lines_with_a_second_level_are_the_dicts_lines(monkeypatch, in_c):
    """translate --brief --slat: the slat_* keys (where the walk ends and whether that is the
    host address, or its fault) made from the columns as from each row's dict."""
    if not in_c:
        monkeypatch.setattr(rowlines, "_rowformat", None)
    b = _batch(3000, ["pc.ram", "pc.bios"], seed=5)
    s = _batch(3000, ["-"], seed=6).walk_result       # the second level's walk of each GPA
    same = np.array([k % 3 == 0 for k in range(len(b))])
    s.pa = np.where(same, b.hpa, s.pa)                  # a third end where the pagemap path does
    b.slat = s
    b.slat_marker = ~s.ok & np.array([k % 5 == 0 for k in range(len(b))])
    assert b.slat_agrees.any() and b.slat_disagrees.any()
    got = [line for block in brieflines.brief_lines(b, size=256) for line in block]
    want = [(json_line(b.row_dict(i)) + "\n").encode() for i in range(len(b))]
    assert got == want
    assert any(b'"slat_agrees":true' in line for line in got)
    assert any(b'"slat_fault":{' in line and b'kvm_mmio_marker' not in line for line in got)
    assert any(b'"kvm_mmio_marker":true}' in line for line in got)


def test_a_name_that_prints_as_a_stand_in_is_made_one_by_one():
    """A RAM block named exactly like a stand-in would be taken for a number's place: such a
    row's format is refused, and its line made from its dict."""
    d = {"gva": "0x1", "gpa": "0x2", "page_size": 4096, "ram_block": "\x00qi-place-0\x00",
         "hva": None, "hpa": None, "host": None, "writable": True, "user": False,
         "executable": False, "value": "0x3"}
    assert row_template(d, brieflines.PLACES) is None
    d["ram_block"] = "%s 100%"
    assert row_template(d, brieflines.PLACES) % (1, 2, 3, 4, 5) == (json_line(
        dict(d, gva="0x1", gpa="0x2", value="0x5")) + "\n").encode()


def test_absent_and_null_places_take_their_numbers_where_they_are():
    d = {"a": "0x0", "n": 7, "c": None, "e": [1, "%"]}
    places = (("a", "x"), ("b", "x"), ("n", "d"), ("c", "x"), ("z", "d"))
    assert row_template(d, places) % (10, 11, 12, 13, 14) == \
        (json_line({"a": "0xa", "n": 12, "c": None, "e": [1, "%"]}) + "\n").encode()


@pytest.mark.parametrize("leaf", [False, True])
@pytest.mark.parametrize("in_c", [True, False])
def test_the_map_lines_are_the_rows_lines(monkeypatch, leaf, in_c):
    """vmmap --json's lines made from columns (present.maplines) are json_line of each
    MapRow's dict, with and without --leaf, the host columns, and a row that ends at 2**64."""
    from qintrospect.commands.vmmap import Rows, iter_rows
    from qintrospect.present.maplines import map_lines
    if not in_c:
        monkeypatch.setattr(rowlines, "_rowformat", None)
    rnd = random.Random(11)
    n = 2000
    col = lambda f, dt: np.array([f() for _ in range(n)], dt)   # noqa: E731
    size = col(lambda: rnd.choice((4096, 8192, 1 << 21, 3 << 21, 1 << 30)), U64)
    start = col(lambda: rnd.getrandbits(47) << 12, U64)
    start[-1] = U64((1 << 64) - 4096)
    size[-1] = U64(4096)
    start[-2] = U64((1 << 64) - (2 << 21))
    size[-2] = U64(2 << 21)
    rows = Rows(start, size, col(lambda: rnd.choice((4096, 1 << 21)), U64),
                col(lambda: rnd.random() < .5, bool), col(lambda: rnd.random() < .5, bool),
                col(lambda: rnd.random() < .5, bool), col(lambda: rnd.getrandbits(40), U64),
                col(lambda: rnd.getrandbits(40), U64), col(lambda: rnd.randrange(0, 7), np.uint8),
                col(lambda: rnd.randrange(1, 600), np.int64), col(lambda: rnd.randrange(0, 4), np.int8),
                col(lambda: rnd.getrandbits(64), U64), col(lambda: rnd.random() < .8, bool))
    fmt = _FlagNames() if leaf else None
    got = map_lines(rows, fmt, leaf)
    want = [(json_line(r.to_dict(leaf=leaf)) + "\n").encode() for r in iter_rows(rows, fmt)]
    assert got == want


class _FlagNames:
    """An entry format's flags(): a name per bit set among those that name flags (FLAG_BITS,
    as the x86 formats' are), a %-sign in each."""

    def flags(self, level, entry, leaf):
        from qintrospect.paging.x86 import FLAG_BITS
        return (f"L{level}",) + tuple(f"b{k}%" for k in range(64) if (FLAG_BITS & entry) >> k & 1)
