"""translate --brief for many addresses: each address's summary line (json_line of
BatchTranslation.row_dict, byte for byte), made from the batch's arrays: rows alike in page
size, RAM block, host status, rights (readable too, on riscv64) and which values exist (or a
fault's level and reason) share one %-format, filled with each row's GVA, GPA, HVA, HPA and
value (rowlines)."""

import numpy as np

from ..arrays import group_rows
from .render import json_line
from .rowlines import fill_rows, parse_templates, row_template, with_rows_made_alone

PLACES = (("gva", "x"), ("gpa", "x"), ("hva", "x"), ("hpa", "x"), ("value", "x"))
SLAT_PLACES = (("slat_out", "x"),)


def brief_lines(b, size: int = 4096):
    """Blocks of lines (ASCII bytes, each ending in a newline) of BatchTranslation b, in
    order: the same bytes as json_line(b.row_dict(i)) + "\\n" for every row."""
    w = b.walk_result
    n = len(w)
    if not n:
        return
    keys = [w.ok, np.where(w.ok, w.page_size, w.fault_level.astype(np.int64)),
            np.where(w.ok, b.region, w.fault_reason.astype(np.int64)), b.has_hva, b.host_status,
            w.writable, w.user, w.executable, b.has_value]
    readable = getattr(w, "readable", None)       # riscv64 only (as row_dict)
    if readable is not None:
        keys.append(readable)
    places, numbers = PLACES, (w.va, w.pa, b.hva, b.hpa, b.value)
    s = b.slat
    if s is not None:     # the second level's answer: where it ends and if that agrees, or why not
        keys += [w.ok & s.ok, np.where(w.ok & s.ok, s.page_size, s.fault_level.astype(np.int64)),
                 np.where(w.ok & s.ok, b.slat_agrees, s.fault_reason.astype(np.int64))]
        if b.slat_marker is not None:
            keys.append(b.slat_marker)
        places, numbers = PLACES + SLAT_PLACES, numbers + (s.pa,)
    first, group = group_rows(keys)
    templates = [row_template(b.row_dict(int(r)), places) for r in first.tolist()]
    which = np.array([-1 if t is None else k for k, t in enumerate(templates)], np.int64)[group]
    parsed = parse_templates(templates)
    for start in range(0, n, size):
        chosen = which[start:start + size] >= 0
        yield with_rows_made_alone(
            fill_rows(templates, parsed, which, numbers, np.flatnonzero(chosen) + start), start,
            (np.flatnonzero(~chosen) + start).tolist(),
            lambda r: (json_line(b.row_dict(r)) + "\n").encode())
