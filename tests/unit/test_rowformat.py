"""qintrospect.present._rowformat (C) makes translate --json's lines byte for byte as bytes.__mod__
does, refuses what it does not know, and is built by scripts/setup."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qintrospect.present import rowlines


def test_the_c_formatter_is_built_and_used():
    # scripts/setup installs gcc and the Python headers: a CI without the module would time
    # only the fallback
    from qintrospect.present import _rowformat
    assert rowlines._rowformat is _rowformat


CONVERSIONS = ["%#x", "%d", "%016x", "%.0a"]
TEXT = st.text(st.sampled_from('ab{}":,\n%x0#.'), max_size=12).map(
    lambda t: t.replace("%", "%%").encode())
U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def templates_and_rows(draw):
    width = draw(st.integers(0, 6))
    templates = []
    for _ in range(draw(st.integers(1, 4))):
        parts = [draw(TEXT)]
        for _ in range(width):
            parts += [draw(st.sampled_from(CONVERSIONS)).encode(), draw(TEXT)]
        templates.append(b"".join(parts))
    n = draw(st.integers(1, 20))
    columns = [draw(st.lists(st.one_of(U64, st.integers(0, 4096),
                                       st.sampled_from([0, 15, 16, (1 << 64) - 1])),
                             min_size=n, max_size=n)) for _ in range(width)]
    which = draw(st.lists(st.integers(0, len(templates) - 1), min_size=n, max_size=n))
    picks = draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    return templates, which, columns, picks


@settings(max_examples=400, deadline=None)
@given(templates_and_rows())
def test_rows_are_what_bytes_mod_makes(case):
    from qintrospect.present import _rowformat
    templates, which, columns, picks = case
    got = _rowformat.rows(_rowformat.templates(templates), np.array(which, np.int64),
                          [np.array(c, np.uint64) for c in columns], np.array(picks, np.int64))
    assert got == [templates[which[r]] % tuple(c[r] for c in columns) for r in picks]


def test_a_line_template_with_every_number_at_its_widest():
    from qintrospect.present import _rowformat
    template = b'{"gva":"%#x","index":%d,"e":"%#x","b":"%016x","hpa":null%.0a,"p":"100%%"}\n'
    top = (1 << 64) - 1
    columns = [np.array([0, top], np.uint64) for _ in range(5)]
    got = _rowformat.rows(_rowformat.templates([None, template]), np.array([1, 1]), columns,
                          np.array([0, 1, 0]))
    assert got == [template % ((v,) * 5) for v in (0, top, 0)]
    assert got[1] == (b'{"gva":"0xffffffffffffffff","index":18446744073709551615,'
                      b'"e":"0xffffffffffffffff","b":"ffffffffffffffff","hpa":null,'
                      b'"p":"100%"}\n')


@pytest.mark.parametrize("template, why", [
    (b"%s", "unsupported conversion at byte 0"),
    (b"ab%", "unsupported conversion at byte 2"),
    (b"%x", "unsupported conversion at byte 0"),
    (b"%#X", "unsupported conversion at byte 0"),
    (b"%16x", "unsupported conversion at byte 0"),
])
def test_unknown_conversions_are_refused(template, why):
    from qintrospect.present import _rowformat
    with pytest.raises(ValueError, match=why):
        _rowformat.templates([b"ok %d", template])


def test_bad_rows_are_refused_not_read_out_of_bounds():
    from qintrospect.present import _rowformat
    parsed = _rowformat.templates([b"%#x %d\n", None])
    column = np.array([1, 2, 3], np.uint64)
    which = np.array([0, 0, 1], np.int64)
    with pytest.raises(IndexError, match="rows: 3 is outside"):
        _rowformat.rows(parsed, which, [column, column], np.array([3]))
    with pytest.raises(IndexError, match="rows: -1 is outside"):
        _rowformat.rows(parsed, which, [column, column], np.array([-1]))
    with pytest.raises(ValueError, match="template 1 is missing"):
        _rowformat.rows(parsed, which, [column, column], np.array([2]))
    with pytest.raises(ValueError, match="template 5 is missing"):
        _rowformat.rows(parsed, np.array([5, 0, 0]), [column, column], np.array([0]))
    with pytest.raises(ValueError, match="does not take 1 numbers"):
        _rowformat.rows(parsed, which, [column], np.array([0]))
    with pytest.raises(ValueError, match="each as long as which"):
        _rowformat.rows(parsed, which, [column, column[:2]], np.array([0]))
    with pytest.raises(TypeError, match="unsigned"):
        _rowformat.rows(parsed, which, [column, column.astype(np.int64)], np.array([0]))
    with pytest.raises(TypeError, match="8-byte"):
        _rowformat.rows(parsed, which.astype(np.int32), [column, column], np.array([0]))
    with pytest.raises(TypeError, match="8-byte"):
        _rowformat.rows(parsed, which, [column, column], np.array([[0]]))
    with pytest.raises((BufferError, ValueError)):       # a strided view: not read as if whole
        _rowformat.rows(parsed, which, [column, np.arange(6, dtype=np.uint64)[::2]],
                        np.array([0]))
    with pytest.raises(TypeError, match="comes from templates"):
        _rowformat.rows("not templates", which, [column, column], np.array([0]))
    with pytest.raises(TypeError):
        _rowformat.templates(["str, not bytes"])
    assert _rowformat.rows(parsed, which, [column, column], np.array([], np.int64)) == []


def _buffer_with_format(data: bytearray, fmt: bytes):
    """A memoryview of `data` as 8-byte items whose buffer format is `fmt` exactly (a C
    exporter can say anything: PyMemoryView_FromBuffer takes a Py_buffer as it is)."""
    import ctypes

    class Py_buffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                    ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                    ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_char_p), ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
                    ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
                    ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]

    raw = (ctypes.c_char * len(data)).from_buffer(data)
    keep = [raw, ctypes.create_string_buffer(fmt, len(fmt) + 1),
            (ctypes.c_ssize_t * 1)(len(data) // 8), (ctypes.c_ssize_t * 1)(8)]
    view = Py_buffer(ctypes.addressof(raw), None, len(data), 8, 1, 1,
                     ctypes.cast(keep[1], ctypes.c_char_p), keep[2], keep[3], None, None)
    make = ctypes.pythonapi.PyMemoryView_FromBuffer
    make.restype, make.argtypes = ctypes.py_object, [ctypes.POINTER(Py_buffer)]
    return make(ctypes.byref(view)), keep


@pytest.mark.parametrize("fmt", [b"", b"<"])
def test_an_empty_buffer_format_is_refused_not_read_past(fmt):
    """A format of no code at all (or a byte-order mark alone) was taken for one: strchr
    finds the terminator of the allowed codes for '\\0', and the check then read the byte
    after the format's end (here a second NUL, so the buffer was accepted as integers)."""
    from qintrospect.present import _rowformat
    parsed = _rowformat.templates([b"%d\n"])
    data = bytearray(16)
    column, keep = _buffer_with_format(data, fmt + b"\0")
    which = np.zeros(2, np.int64)
    with pytest.raises(TypeError, match="8-byte"):
        _rowformat.rows(parsed, which, [column], np.array([0]))
