"""numpy helpers shared by the batch paths (imported only where arrays are built)."""

import numpy as np

_LIMIT = 1 << 62      # codes stay below this: int64 arithmetic, no overflow


def group_rows(columns):
    """Rows grouped by their values in several 1-D integer (or bool) columns of one length:
    (the first row of each group, each row's group id). The columns are folded into one int64
    code, mixed-radix over each column's span; a column too wide for that is replaced by its
    rank among its values first, and the code by its rank when it would overflow. One sort
    in the common case (np.unique over rows, axis=0, sorts bytes and is many times slower)."""
    n = len(columns[0]) if len(columns) else 0
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    code, span = np.zeros(n, np.int64), 1
    for column in columns:
        c = np.asarray(column)
        if c.dtype.kind != "u":
            c = c.astype(np.int64)
        lo, hi = c.min(), c.max()
        width = int(hi) - int(lo) + 1
        if span * width < _LIMIT:
            part = (c - lo).astype(np.int64)
        else:
            values, part = np.unique(c, return_inverse=True)
            part, width = part.reshape(-1), len(values)
            if span * width >= _LIMIT:
                _, code = np.unique(code, return_inverse=True)
                code = code.reshape(-1)
                span = int(code.max()) + 1
        code = code * width + part
        span *= width
    # np.unique(code, return_index=True, return_inverse=True), but with numpy's unstable
    # sort (about twice as fast as the stable one np.unique then takes): the first row of a
    # group is the least of its rows
    order = np.argsort(code)
    ordered = code[order]
    starts = np.empty(n, bool)
    starts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    first = np.minimum.reduceat(order, np.flatnonzero(starts))
    group = np.empty(n, np.int64)
    group[order] = np.cumsum(starts) - 1
    return first, group
