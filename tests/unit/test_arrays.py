"""qintrospect.arrays.group_rows against grouping by tuples in a dict."""

import numpy as np
from hypothesis import given, settings, strategies as st

from qintrospect.arrays import group_rows


@given(st.integers(1, 400), st.lists(st.integers(1, 1 << 64), min_size=1, max_size=6),
       st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_rows_alike_share_a_group_and_no_others(n, spans, seed):
    rnd = np.random.default_rng(seed)
    columns = [rnd.integers(0, span, n, dtype=np.uint64, endpoint=False) for span in
               (min(s, 1 << 63) for s in spans)]
    first, group = group_rows(columns)
    rows = list(zip(*(c.tolist() for c in columns)))
    ids = {}
    for i, row in enumerate(rows):
        ids.setdefault(row, i)
    assert len(first) == len(ids)
    for i, row in enumerate(rows):
        assert rows[first[group[i]]] == row          # its group's first row is alike
        assert first[group[i]] == ids[row]           # and is the first such row
    assert sorted(first.tolist()) == sorted(ids.values())


def test_empty_and_mixed_kinds():
    first, group = group_rows([np.zeros(0, np.uint64)])
    assert len(first) == len(group) == 0
    first, group = group_rows([np.array([3, 3, 1], np.int8), np.array([True, True, True]),
                               np.array([2**64 - 1, 2**64 - 1, 0], np.uint64)])
    assert group[0] == group[1] != group[2] and sorted(first.tolist()) == [0, 2]
