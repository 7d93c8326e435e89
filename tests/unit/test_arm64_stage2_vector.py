"""The stage 2 leaf lister as arrays (paging.arm64_vector.leaf_arrays_stage2, a level at a time)
held to the scalar one (arm64_stage2.iter_mappings_stage2) on tables drawn at random in every
geometry: leaves, blocks where allowed and where not, reserved encodings, tables shared by
several entries and pointing at themselves, outputs beyond the output size, unreadable tables,
windows of the IPA space. Same leaves, same columns, same unreadable tables reported."""

import numpy as np
from hypothesis import given, strategies as st

from qintrospect.paging.arm64_stage2 import iter_mappings_stage2
from qintrospect.paging.arm64_vector import leaf_arrays_stage2

from .budget import examples
from .test_arm64_stage2 import CONFIGS, GEOMETRY, MM2, ROOT, Mem, mmfr1

NAMES = sorted(GEOMETRY)
TABLES = [ROOT + k * 0x10000 for k in range(1, 5)]     # tables below the first level


@st.composite
def spaces(draw):
    name = draw(st.sampled_from(NAMES))
    rows = GEOMETRY[name]
    mem = Mem()
    first = 8 << rows[0][2]                              # bytes of the first level
    places = [(ROOT, first)] + [(t, 8 << rows[-1][2]) for t in TABLES]
    targets = [ROOT] + TABLES
    for base, size in places:
        for _ in range(draw(st.integers(0, 12))):
            slot = base + 8 * draw(st.integers(0, size // 8 - 1))
            kind = draw(st.sampled_from(["table", "table", "leaf", "leaf", "block", "junk"]))
            attrs = draw(st.integers(0, (1 << 12) - 1)) & ~3 | \
                draw(st.sampled_from([0, 1 << 51, 1 << 53, 2 << 53, 3 << 53, 0xF << 55]))
            if kind == "table":
                e = draw(st.sampled_from(targets)) | 3
            elif kind == "leaf":
                e = draw(st.integers(0, (1 << 36) - 1)) << 12 | attrs | 3
            elif kind == "block":
                e = draw(st.integers(0, (1 << 36) - 1)) << 12 | attrs | 1
            else:
                e = draw(st.integers(0, (1 << 64) - 1))
            mem.put(slot, e)
    if draw(st.booleans()):
        mem.holes.add(draw(st.sampled_from(TABLES)) >> 12)
    ia = 1 << (rows[0][1] + rows[0][2])
    start = draw(st.sampled_from([0, 0, 0x1000, ia // 3]))
    end = draw(st.sampled_from([None, None, ia // 2, ia - 0x1000, start + 1]))
    # FEAT_XNX or not (XN[0] counts or not); hardware dirty state or not (DBM=1 writable)
    xnx, hd = draw(st.integers(0, 1)), draw(st.booleans())
    return name, mem, start, end, mmfr1(hafdbs=2 if hd else 0, xnx=xnx), hd


@given(spaces())
@examples(120)
def test_leaf_arrays_stage2_is_iter_mappings_stage2(space):
    name, mem, start, end, mm1, hd = space
    reg, mm0 = CONFIGS[name]
    reg |= hd << 22 | hd << 21                           # VTCR_EL2.HD (and HA)
    ids = dict(id_aa64mmfr0=mm0, id_aa64mmfr1=mm1, id_aa64mmfr2=MM2)
    lost_scalar, lost_vector = [], []
    want = list(iter_mappings_stage2(mem, ROOT, reg, start, end, **ids,
                                     on_unreadable=lambda *a: lost_scalar.append(a[:2])))
    got = leaf_arrays_stage2(mem, ROOT, reg, start, end, **ids,
                             on_unreadable=lambda *a: lost_vector.append(a[:2]))
    assert got.va.tolist() == [m.va for m in want]
    assert got.pa.tolist() == [m.pa for m in want]
    assert got.size.tolist() == [m.size for m in want]
    assert got.writable.tolist() == [m.writable for m in want]
    assert got.executable.tolist() == [m.executable for m in want]
    assert got.user.all()
    assert got.entry.tolist() == [m.levels_entries[-1] for m in want]
    assert got.level.tolist() == [len(m.levels_entries) - 1 for m in want]
    assert [tuple(p[:lv + 1]) for p, lv in zip(got.path.tolist(), got.level.tolist())] == \
        [m.levels_entries for m in want]
    assert lost_vector == lost_scalar


def test_a_table_that_points_at_itself_is_walked_once_per_level():
    """As iter_mappings_stage2 (test_arm64_stage2.test_table_pointing_to_itself): every entry
    of the root points back at it; the root is read once as the (two-table) first level and
    once as a 4 KiB table, and lists its 512 pages once."""
    reg, _ = CONFIGS["4k-40-L1"]
    mem = Mem()
    for i in range(512):
        mem.put(ROOT + 8 * i, ROOT | 0x7C3)
    got = leaf_arrays_stage2(mem, ROOT, reg)
    assert got.va.tolist() == [i << 12 for i in range(512)] and (got.pa == np.uint64(ROOT)).all()
    assert mem.reads == [(ROOT, 8 << 10), (ROOT, 4096)]
