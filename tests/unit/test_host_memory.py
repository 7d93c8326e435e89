"""The direct path reads what the guest would read, never zeros it made up (issue 11, item 1).

These tests use real memory: mappings of this very process, read through /proc/self/pagemap
and /proc/self/mem exactly as qintrospect reads QEMU's. A page that the pagemap shows absent
is zeros only when that is proven (private anonymous memory never touched, a hole of a file);
a shared file's page that this process never touched holds the file's bytes, and is read
from the file without being faulted in.
"""

import ctypes
import mmap
import os

import numpy as np
import pytest

from qintrospect.host import (PAGE, HOST_NOT_PRESENT, HOST_PRESENT, HostProcess, Vma, _holes,
                              _parse_smaps, pagemap_arrays)
from qintrospect.memory import DirectMemory
from qintrospect.host import RamMap
from qintrospect.qmp import Region

PAGES = 16


def address_of(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def pattern(n_pages: int, seed: int = 0x5152) -> bytes:
    words = (np.arange(n_pages * PAGE // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.uint64(seed << 48))
    return words.astype("<u8").tobytes()


def present(proc: HostProcess, hva: int, count: int) -> np.ndarray:
    return np.array(proc.pagemap_entries(hva, count), np.uint64) >> np.uint64(63) == 1


@pytest.fixture
def proc():
    p = HostProcess(os.getpid())
    yield p
    p.close()


@pytest.fixture
def shared_file(tmp_path):
    """A file full of a pattern, mapped shared by this process and never touched through
    the mapping (as QEMU's RAM is after `-object memory-backend-file,share=on` on a
    prefilled file)."""
    path = tmp_path / "ram"
    data = pattern(PAGES)
    path.write_bytes(data)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), PAGES * PAGE, flags=mmap.MAP_SHARED)
    yield m, data, str(path)
    m.close()


def test_untouched_shared_file_pages_read_the_file_not_zeros(proc, shared_file):
    m, data, _ = shared_file
    hva = address_of(m)
    assert not present(proc, hva, PAGES).any()          # as QEMU's untouched RAM
    assert proc.read_range(hva, PAGES * PAGE) == data
    assert proc.read_range(hva + 3 * PAGE + 100, 8) == data[3 * PAGE + 100:3 * PAGE + 108]
    assert not present(proc, hva, PAGES).any()          # read from the file: nothing faulted in
    assert not proc.absent_zero(hva, np.zeros(PAGES, np.uint64)).any()


def test_file_holes_are_proven_zero(proc, tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(PAGES * PAGE)
        f.seek(5 * PAGE)
        f.write(b"\x42" * PAGE)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), PAGES * PAGE, flags=mmap.MAP_SHARED)
    try:
        hva = address_of(m)
        zero = proc.absent_zero(hva, np.zeros(PAGES, np.uint64))
        assert zero.tolist() == [i != 5 for i in range(PAGES)]
        got = proc.read_range(hva, PAGES * PAGE)
        assert got[5 * PAGE:6 * PAGE] == b"\x42" * PAGE and got.count(0) == (PAGES - 1) * PAGE
    finally:
        m.close()


def test_untouched_private_anonymous_pages_are_zero_without_being_read(proc):
    m = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        hva = address_of(m)   # (from_buffer does not touch the pages)
        assert not present(proc, hva, PAGES).any()
        assert proc.absent_zero(hva, np.zeros(PAGES, np.uint64)).all()
        assert proc.read_range(hva, PAGES * PAGE) == bytes(PAGES * PAGE)
        assert not present(proc, hva, PAGES).any()      # proven, not faulted in
        m[7 * PAGE:7 * PAGE + 4] = b"abcd"              # a page with data: read for real
        assert proc.read_range(hva + 7 * PAGE, 4) == b"abcd"
    finally:
        m.close()


def test_shared_anonymous_memory_is_file_backed_not_zero(proc):
    """MAP_SHARED|MAP_ANONYMOUS (QEMU's `share=on` RAM without a file) lives in shmem: a page
    absent from this process's page table may still hold data written through another."""
    m = mmap.mmap(-1, PAGES * PAGE)      # Python's default: shared anonymous
    try:
        hva = address_of(m)
        vma = proc.vma_at(hva)
        assert vma is not None and vma.shared and not vma.absent_reads_zero
        m[2 * PAGE:2 * PAGE + 8] = b"QINTROSP"
        assert proc.read_range(hva + 2 * PAGE, 8) == b"QINTROSP"
    finally:
        m.close()


def test_direct_memory_reads_and_scans_only_what_may_hold_data(proc, shared_file):
    m, data, _ = shared_file
    hva = address_of(m)
    ram = RamMap([Region(0, PAGES * PAGE - 1, "ram", "pc.ram", 0, 0)], {0: hva})
    memory = DirectMemory(ram, proc)
    assert memory.read(0x1ff8, 16) == data[0x1ff8:0x2008]
    chunks = list(memory.scan_chunks(0, PAGES * PAGE, 4 * PAGE))
    assert b"".join(bytes(c) for _, c in chunks) == data    # nothing skipped: all file data
    assert [g for g, _ in chunks] == [0, 4 * PAGE, 8 * PAGE, 12 * PAGE]


def test_scan_skips_proven_zero_pages_only(proc):
    m = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        hva = address_of(m)
        m[3 * PAGE] = 1
        m[9 * PAGE:10 * PAGE] = b"\x07" * PAGE
        ram = RamMap([Region(0, PAGES * PAGE - 1, "ram", "pc.ram", 0, 0)], {0: hva})
        chunks = [(g, bytes(c)) for g, c in DirectMemory(ram, proc).scan_chunks(
            0, PAGES * PAGE, PAGES * PAGE)]
        assert [g for g, _ in chunks] == [3 * PAGE, 9 * PAGE]
        assert chunks[1][1] == b"\x07" * PAGE
    finally:
        m.close()


def test_smaps_parser():
    text = ("7f00aa000000-7f00ba000000 rw-p 00000000 00:00 0 \n"
            "Size:             262144 kB\nKernelPageSize:        4 kB\nVmFlags: rd wr mr mw me ac sd\n"
            "7f00c0000000-7f00d0000000 rw-s 00001000 00:05 4242                       /memfd:mem (deleted)\n"
            "KernelPageSize:        2048 kB\nVmFlags: rd wr sh mr mw me ms sd um\n")
    a, b = _parse_smaps(text)
    assert (a.start, a.end, a.perms, a.inode, a.path) == (0x7f00aa000000, 0x7f00ba000000, "rw-p", 0, "")
    assert a.absent_reads_zero and a.kernel_page_size == PAGE
    assert (b.offset, b.inode, b.path, b.kernel_page_size) == (0x1000, 4242, "/memfd:mem (deleted)",
                                                               2 << 20)
    assert b.shared and "um" in b.flags and not b.absent_reads_zero
    # userfaultfd in charge of missing pages (postcopy): absent is not zero, even when private
    c = Vma(0, PAGE, "rw-p", 0, 0, "", frozenset({"um"}))
    assert not c.absent_reads_zero


def test_holes_on_a_file_without_hole_information_prove_nothing(tmp_path):
    path = tmp_path / "dense"
    path.write_bytes(b"x" * (4 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not _holes(fd, 0, 4, 0).any()
    finally:
        os.close(fd)


def test_pagemap_is_read_in_runs_not_across_a_gap():
    """Two HVAs 64 GiB apart: two small pagemap reads, not 16 M entries."""
    class Recording:
        def __init__(self):
            self.reads = []

        def pagemap_entries(self, hva, count):
            self.reads.append(count)
            return tuple((1 << 63) | (hva // PAGE + k) for k in range(count))

        pagemap_of_pages = HostProcess.pagemap_of_pages

    r = Recording()
    hvas = np.array([0x7f0000000000, 0x7f0000000000 + (64 << 30) + 0x10], np.uint64)
    status, hpa = pagemap_arrays(r, hvas)
    assert sum(r.reads) == 2 and status.tolist() == [HOST_PRESENT] * 2
    assert hpa.tolist() == [0x7f0000000000, 0x7f0000000000 + (64 << 30) + 0x10]
    assert HOST_NOT_PRESENT != HOST_PRESENT
