"""Lines of many rows made from arrays: rows alike in everything but their numbers share one
%-format, made from one row's own dict; each line is that format filled with the row's
numbers (in C by _rowformat.c where it was built, else by bytes.__mod__: the same bytes). A
row whose format cannot be made is made from its dict, one by one."""

from typing import Optional

from .render import json_line

try:
    from . import _rowformat  # the fast lines made in C (_rowformat.c)
except ImportError:              # not built (no compiler at install): bytes.__mod__, slower
    _rowformat = None

# a place's stand-in in the dict: JSON escapes its NULs, so text from outside prints as one
# only if it holds exactly these characters (then the stand-in is found twice, and refused)
_STAND_IN = "\x00qi-place-%d\x00"
_SPEC = {"x": '"%#x"', "d": "%d"}


def row_template(d: dict, places) -> Optional[bytes]:
    """The %-format that, filled with a row's numbers, prints json_line(that row's dict) and a
    newline. d is one row's dict; places are (key, kind) pairs in the numbers' order: kind
    "x" for a "0x..." string, "d" for an integer. A place whose value is None prints null and
    takes its number unshown (%.0a); an absent one takes it too. Other text keeps its % as %%.
    None when the format cannot be made (text from outside that looks like a stand-in)."""
    marked = _escaped(d)
    for k, (key, _) in enumerate(places):
        if key in d:
            marked[key] = _STAND_IN % k
    text = json_line(marked)
    out, pos, pending = [], 0, ""
    for k, (key, kind) in enumerate(places):
        if key not in d:
            pending += "%.0a"
            continue
        mark = json_line(_STAND_IN % k)
        at = text.find(mark, pos)
        if at < 0 or text.count(mark) != 1:
            return None
        out += [text[pos:at], pending, "null%.0a" if d[key] is None else _SPEC[kind]]
        pos, pending = at + len(mark), ""
    out += [text[pos:], pending, "\n"]
    return "".join(out).encode()


def _escaped(value):
    if isinstance(value, str):
        return value.replace("%", "%%")
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def parse_templates(templates):
    """The %-formats made ready for fill_rows (parsed once in C; None without _rowformat)."""
    return _rowformat.templates(templates) if _rowformat is not None else None


def fill_rows(templates, parsed, which, numbers, picks) -> list:
    """The lines of rows `picks`: each row's template (templates[which[row]]) filled with its
    numbers (numbers: one uint64 column per place), as ASCII bytes."""
    if parsed is not None:
        return _rowformat.rows(parsed, which, numbers, picks)
    # made into Python ints a block at a time: one block's memory serves the next
    return list(map(bytes.__mod__, [templates[k] for k in which[picks].tolist()],
                    zip(*(c[picks].tolist() for c in numbers))))


def with_rows_made_alone(lines: list, start: int, alone, make) -> list:
    """lines (of rows start...) with the rows in `alone` (ascending) inserted where they
    belong, each made by make(row)."""
    for r in alone:
        lines.insert(r - start, make(r))
    return lines
