"""vmmap's HPA column is computed a bounded chunk at a time and merges exactly as in one go."""

import numpy as np
from hypothesis import given, settings, strategies as st

from qintrospect.commands import vmmap
from qintrospect.memory.host import HOST_PRESENT
from qintrospect.machine.rammap import RamRegion
from qintrospect.commands.vmmap import U64, Rows

PAGE = 4096


class Ram:
    def __init__(self):
        self.ram = [RamRegion(0, (1 << 40) - 1, "ram", "pc.ram", 0, 0x7F0000000000)]


class Process:
    """pagemap: HVA page p -> frame f(p), contiguous in runs that break every `run` pages."""

    def __init__(self, run):
        self.run = run

    def pagemap_of_pages(self, pages):
        frames = pages + (pages // self.run) * 7          # a jump at every run boundary
        return (np.uint64(1) << np.uint64(63)) | frames.astype(np.uint64)


def rows_of(leaves):
    starts, sizes, gpas = zip(*leaves)
    n = len(leaves)
    size = np.array(sizes, U64)
    return Rows(np.array(starts, U64), size, size, np.ones(n, bool), np.zeros(n, bool),
                np.ones(n, bool), np.array(gpas, U64), np.zeros(n, U64), np.zeros(n, np.uint8),
                np.ones(n, np.int64), np.zeros(n, np.int8), np.zeros(n, U64), np.ones(n, bool))


def flat(chunks):
    return [(r.start, r.size, r.hpa, r.host_status, r.leaves) for c in chunks
            for r in vmmap.iter_rows(c)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 40), st.sampled_from([PAGE, 2 << 20]),
                          st.booleans()), min_size=1, max_size=12),
       st.integers(1, 64), st.integers(1, 700))
def test_chunked_equals_whole(spec, run, budget):
    leaves, va, pa = [], 0x400000, 0x100000
    for count, size, gap in spec:
        for _ in range(count if size == PAGE else 1):
            leaves.append((va, size, pa))
            va += size
            pa += size
        if gap:
            va += PAGE
    whole = flat(vmmap.with_host(rows_of(leaves), Ram(), Process(run), leaf=False,
                                 budget=1 << 30))
    chunked = flat(vmmap.with_host(rows_of(leaves), Ram(), Process(run), leaf=False,
                                   budget=budget))
    assert chunked == whole
    assert sum(r[1] for r in whole) == sum(size for _, size, _ in leaves)
    assert sum(r[4] for r in whole) == len(leaves)
    assert all(r[3] == "present" for r in whole) and HOST_PRESENT


def test_a_huge_range_is_never_cut_into_all_its_pages_at_once():
    """A 64 GiB direct map of 1 GiB pages: at most `budget` 4 KiB pieces are held at once."""
    leaves = [(0xFFFF888000000000 + i * (1 << 30), 1 << 30, i * (1 << 30)) for i in range(64)]
    seen = []
    orig = vmmap._pieces

    def spy(rows, cum, a, b):
        seen.append(b - a)
        return orig(rows, cum, a, b)
    vmmap._pieces = spy
    try:
        out = flat(vmmap.with_host(rows_of(leaves), Ram(), None, leaf=False, budget=1 << 16))
    finally:
        vmmap._pieces = orig
    assert max(seen) <= 1 << 16 and sum(seen) == 64 << 18
    assert len(out) == 1 and out[0][1] == 64 << 30
