"""The scan for a second-level root leaves out the VM's own RAM (commands.second_level.
guest_frames: its QEMU's present pages, merged into host-physical ranges) and reads the rest
of the host's RAM whole (memory.kcore._without)."""

import types

from qintrospect.commands.second_level import guest_frames
from qintrospect.memory.kcore import _without

P = 4096


def test_ranges_less_the_skipped_ones():
    assert _without(0, 100, []) == [(0, 100)]
    assert _without(0, 100, [(10, 20), (30, 40)]) == [(0, 10), (20, 30), (40, 100)]
    assert _without(0, 100, [(0, 50)]) == [(50, 100)]
    assert _without(0, 100, [(50, 200)]) == [(0, 50)]
    assert _without(0, 100, [(0, 100)]) == []
    assert _without(50, 100, [(0, 10), (60, 70), (120, 130)]) == [(50, 60), (70, 100)]
    assert _without(0, 100, [(10, 30), (20, 40)]) == [(0, 10), (40, 100)]   # (overlapping)


class Process:
    """A QEMU process whose pagemap says: page i of the HVA range is at frame frames[i]
    (None: not present)."""

    def __init__(self, hva, frames):
        self.hva, self.frames = hva, frames

    def pagemap_entries(self, hva, count):
        first = (hva - self.hva) // P
        out = []
        for f in self.frames[first:first + count]:
            out.append(0 if f is None else 1 << 63 | f)
        return tuple(out + [0] * (count - len(out)))


def vm_with(frames, fail=False):
    region = types.SimpleNamespace(kind="ram", hva=0x7f0000000000, start=0,
                                   end=len(frames) * P - 1)
    process = Process(region.hva, frames)
    if fail:
        def broken(hva, count):
            raise OSError("pagemap: permission denied")
        process.pagemap_entries = broken
    mmio = types.SimpleNamespace(kind="io", hva=None, start=0x1000_0000, end=0x1000_0fff)
    return types.SimpleNamespace(ram_map=types.SimpleNamespace(ram=[region, mmio]),
                                 process=process)


def test_the_guests_present_frames_merge_into_ranges():
    # frames 100-102 (in a shuffled order), a hole, 200, a page not present, a hidden one
    vm = vm_with([101, 100, 102, None, 200, 0, 201])
    assert guest_frames(vm) == [(100 * P, 103 * P), (200 * P, 202 * P)]
    assert guest_frames(vm_with([None, None])) == []
    assert guest_frames(vm_with([5, 6], fail=True)) == []        # not root: nothing skipped
