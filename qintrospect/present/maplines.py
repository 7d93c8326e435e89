"""vmmap --json's lines made from the map's columns: json_line(row.to_dict(leaf)) for every
row, byte for byte. Rows alike in page size, rights (readable too), host status and (with
--leaf) the leaf's flags share one %-format, filled with each row's start, end, size, GPA, HPA
and leaf count (rowlines); a row that reaches the top of the address space (its end is 2**64)
is made from its own MapRow."""

import numpy as np

from ..arrays import group_rows
from ..commands.vmmap import iter_rows
from ..paging.x86 import FLAG_BITS
from .render import json_line
from .rowlines import fill_rows, parse_templates, row_template, with_rows_made_alone

PLACES = (("start", "x"), ("end", "x"), ("size", "d"), ("gpa", "x"), ("hpa", "x"),
          ("leaves", "d"))


def map_lines(rows, fmt=None, leaf: bool = False) -> list:
    """The JSON lines (ASCII bytes, each ending in a newline) of vmmap.Rows `rows`; fmt names
    the leaves' flags (with leaf)."""
    n = len(rows)
    if not n:
        return []
    u64 = np.uint64
    end = rows.start + rows.size
    key = [rows.page_size, rows.readable, rows.writable, rows.user, rows.executable, rows.host]
    if leaf:
        key += [rows.level, rows.entry & u64(getattr(fmt, "flag_bits", FLAG_BITS))]
    first, group = group_rows(key)

    def row(r):
        return next(iter_rows(rows.take(slice(r, r + 1)), fmt))

    templates = [row_template(row(r).to_dict(leaf=leaf), PLACES) for r in first.tolist()]
    which = np.array([-1 if t is None else k for k, t in enumerate(templates)], np.int64)[group]
    which[end < rows.start] = -1        # the end wrapped: 2**64 does not fit in 64 bits
    which[(end == u64(0)) & (rows.size > u64(0))] = -1
    numbers = (rows.start, end, rows.size, rows.gpa, rows.hpa, rows.leaves.astype(u64))
    chosen = which >= 0
    return with_rows_made_alone(
        fill_rows(templates, parse_templates(templates), which, numbers,
                  np.flatnonzero(chosen)), 0, np.flatnonzero(~chosen).tolist(),
        lambda r: (json_line(row(r).to_dict(leaf=leaf)) + "\n").encode())
