"""numpy helpers shared by the batch paths (imported only where arrays are built)."""

import numpy as np


def group_rows(columns):
    """Rows grouped by their values in several 1-D integer columns of one length: (the first
    row of each group, each row's group id). Column by column, as dense codes: np.unique over
    rows (axis=0) sorts bytes and is many times slower."""
    n = len(columns[0]) if columns else 0
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    code = np.zeros(n, np.int64)
    for column in columns:
        values, inverse = np.unique(column, return_inverse=True)
        if len(values) > 1:        # both codes stay below n, so the product fits in int64
            _, code = np.unique(code * len(values) + inverse.reshape(-1), return_inverse=True)
            code = code.reshape(-1)
    _, first = np.unique(code, return_index=True)
    return first, code
