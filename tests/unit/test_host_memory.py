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

from qintrospect.memory.host import (PAGE, HOST_NOT_PRESENT, HOST_PRESENT, HostProcess, Vma, _holes,
                              pagemap_arrays)
from qintrospect.memory.smaps import parse_smaps as _parse_smaps
from qintrospect.memory.guest import DirectMemory
from qintrospect.machine.rammap import RamMap
from qintrospect.machine.monitor_text import Region

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


@pytest.fixture
def sparse_file(tmp_path):
    """A file of PAGES pages, all holes but page 5 (0x42 bytes), mapped shared."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(PAGES * PAGE)
        f.seek(5 * PAGE)
        f.write(b"\x42" * PAGE)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), PAGES * PAGE, flags=mmap.MAP_SHARED)
    yield m
    m.close()


def test_file_holes_are_proven_zero(proc, sparse_file):
    hva = address_of(sparse_file)
    zero = proc.absent_zero(hva, np.zeros(PAGES, np.uint64))
    assert zero.tolist() == [i != 5 for i in range(PAGES)]
    got = proc.read_range(hva, PAGES * PAGE)
    assert got[5 * PAGE:6 * PAGE] == b"\x42" * PAGE and got.count(0) == (PAGES - 1) * PAGE


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


def test_zero_if_absent_judges_each_page_by_its_own_mapping(proc, shared_file, sparse_file):
    """The batch's rule for absent pages, pages of several mappings mixed and shuffled (as a
    batch's are): zero in private anonymous memory and in a file's holes, not zero where a
    file holds data (a shared file, a library's code) or where nothing is mapped."""
    m_file, _, _ = shared_file
    m_sparse = sparse_file
    m_anon = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        want = {}
        for m, zero in ((m_file, lambda i: False), (m_sparse, lambda i: i != 5),
                        (m_anon, lambda i: True)):
            first = address_of(m) // PAGE
            want.update({first + i: zero(i) for i in range(PAGES)})
        want.update({i: False for i in range(1, PAGES)})     # below mmap_min_addr: unmapped
        proc._vmas = None                 # this process's mappings as they are now
        libc = next(v for v in proc.vmas() if "libc" in v.path and "x" in v.perms)
        want.update({libc.start // PAGE + i: False for i in range(4)})
        pages = np.array(sorted(want), np.int64)
        np.random.default_rng(7).shuffle(pages)
        assert proc.zero_if_absent(pages).tolist() == [want[p] for p in pages.tolist()]
        assert proc.zero_if_absent(np.zeros(0, np.int64)).tolist() == []
    finally:
        m_anon.close()


def test_read_many_puts_each_piece_in_its_place_whatever_the_order(proc, shared_file):
    """read_many reads in address order; each piece still lands where its HVA was asked."""
    m, data, _ = shared_file
    other = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        other[:] = pattern(PAGES, seed=0x7777)
        rng = np.random.default_rng(3)
        offsets = rng.integers(0, PAGES * PAGE - 8, 3000)
        which = rng.integers(0, 2, 3000)
        bases = np.array([address_of(m), address_of(other)], np.uint64)
        hvas = bases[which] + offsets.astype(np.uint64)
        got = proc.read_many(hvas, 8)
        sources = (data, bytes(other))
        want = b"".join(sources[k][o:o + 8] for k, o in zip(which.tolist(), offsets.tolist()))
        assert bytes(got) == want
    finally:
        other.close()


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


def test_pagemap_is_read_in_runs_not_across_a_gap(tmp_path, monkeypatch):
    """Two HVAs 64 GiB apart: two small reads of the table, not 16 M entries."""
    import os
    import struct

    from qintrospect.memory import host
    first, second = 0x7f0000000000 // PAGE, (0x7f0000000000 + (64 << 30) + 0x10) // PAGE
    table = tmp_path / "pagemap"          # sparse: only the two entries written
    with open(table, "wb") as f:
        for page in (first, second):
            f.seek(page * 8)
            f.write(struct.pack("<Q", (1 << 63) | page))
    reads = []
    real_pread = os.pread

    def pread(fd, n, offset):
        reads.append(n)
        return real_pread(fd, n, offset)

    class Process:
        _pagemap = os.open(table, os.O_RDONLY)
        pid = "test"
        pagemap_of_pages = HostProcess.pagemap_of_pages

    monkeypatch.setattr(host.os, "pread", pread)
    hvas = np.array([0x7f0000000000, 0x7f0000000000 + (64 << 30) + 0x10], np.uint64)
    try:
        status, hpa = pagemap_arrays(Process(), hvas)
    finally:
        os.close(Process._pagemap)
    assert reads == [8, 8] and status.tolist() == [HOST_PRESENT] * 2
    assert hpa.tolist() == [0x7f0000000000, 0x7f0000000000 + (64 << 30) + 0x10]
    assert HOST_NOT_PRESENT != HOST_PRESENT


def test_page_forms_describe_each_page_as_host_page_does(proc, shared_file):
    """page_forms (the many-address JSON's host pages) against host_page, page by page, on
    this process's own memory: private pages touched and untouched, a shared file's pages
    never touched, a page touched in it, and pages of the Python heap and of a library."""
    anon = mmap.mmap(-1, PAGES * PAGE)
    try:
        for k in range(0, PAGES, 3):
            anon[k * PAGE] = 1                    # some touched, some never
        m, _, _ = shared_file
        _ = m[5 * PAGE]                           # one read fault in the shared file
        heap = ctypes.addressof(ctypes.create_string_buffer(64 * 1024))
        library = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value
        hvas = [address_of(anon) + k * PAGE for k in range(PAGES)]
        hvas += [address_of(m) + k * PAGE for k in range(PAGES)]
        hvas += [heap // PAGE * PAGE + k * PAGE for k in range(8)]
        hvas += [library // PAGE * PAGE]
        pages = np.array([h // PAGE for h in hvas], np.int64)
        form, frame, hosts = proc.page_forms(pages)
        for i, hva in enumerate(hvas):
            one = proc.host_page(hva).to_dict()
            many = hosts[form[i]].to_dict()
            hpa = None if not frame[i] else f"{int(frame[i]) * PAGE:#x}"
            assert dict(many, hpa=hpa) == one, hex(hva)
        assert len(hosts) >= 2                    # present and absent pages differ
    finally:
        anon.close()


def _smaps_line_by_line(text):
    """smaps read a line at a time: the reference _parse_smaps is held to."""
    vmas, head, page_size, flags = [], None, PAGE, frozenset()
    for line in text.splitlines() + ["0-0 x 0 0 0"]:
        first = line.split(None, 1)[0] if line.strip() else ""
        if "-" in first and not first.endswith(":"):
            if head is not None:
                vmas.append(Vma(*head, flags=flags, kernel_page_size=page_size))
            parts = line.split(None, 5)
            a, b = parts[0].split("-")
            head = (int(a, 16), int(b, 16), parts[1], int(parts[2], 16), int(parts[4]),
                    parts[5].strip() if len(parts) > 5 else "")
            page_size, flags = PAGE, frozenset()
        elif first == "KernelPageSize:":
            page_size = int(line.split()[1]) * 1024
        elif first == "VmFlags:":
            flags = frozenset(line.split()[1:])
    return vmas


def test_smaps_parser_reads_real_smaps_as_line_by_line():
    """This process's own smaps (hundreds of mappings: files, anonymous, [heap], [stack],
    [vsyscall]) and a mapping whose path has spaces, parsed as a line-by-line reader does."""
    import mmap
    import tempfile
    with tempfile.NamedTemporaryFile(prefix="a b  c ") as f:
        f.write(b"x" * PAGE)
        f.flush()
        m = mmap.mmap(f.fileno(), PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            with open("/proc/self/smaps") as smaps:
                text = smaps.read()
        finally:
            m.close()
    got = _parse_smaps(text)
    assert got == _smaps_line_by_line(text)
    assert len(got) > 20 and any(v.path.endswith(os.path.basename(f.name)) for v in got)
    assert any(v.path == "[stack]" for v in got) and any(v.flags for v in got)


def test_page_size_needs_smaps_only_where_kpageflags_cannot_tell():
    """A frame kpageflags describes, neither THP nor hugetlb, is 4 KiB without reading smaps
    (a walk of all QEMU's page tables in the kernel); hugetlb sizes, unreadable flags and
    frames with no struct page (KPF_NOPAGE: device DAX) ask the mapping."""
    from qintrospect.memory.host import KPF_HUGE, KPF_NOPAGE, KPF_THP
    proc = HostProcess(os.getpid())
    read = []
    proc._vmas = [Vma(0x200000, 0x600000, "rw-s", 0, 7, "/dev/hugepages/ram",
                      kernel_page_size=2 << 20)]
    proc._vma_starts = [0x200000]
    real_vmas = proc.vmas
    proc.vmas = lambda: read.append(1) or real_vmas()
    assert proc._page_size(0x201000, 0) == (PAGE, "4k") and not read
    assert proc._page_size(0x201000, 1 << KPF_THP) == (2 << 20, "thp") and not read
    assert proc._page_size(0x201000, 1 << KPF_HUGE) == (2 << 20, "hugetlb") and read
    for kflags in (None, 1 << KPF_NOPAGE):
        read.clear()
        assert proc._page_size(0x201000, kflags) == (2 << 20, "hugetlb") and read
    assert proc._page_size(0x801000, None) == (PAGE, "4k")


def test_forget_mappings_forgets_the_files_behind_them(tmp_path):
    """After QEMU's mappings changed, a mapping at an old one's addresses is not read through
    the old one's file: forget_mappings closes and drops the files kept by address range."""
    proc = HostProcess(os.getpid())
    path = tmp_path / "ram"
    path.write_bytes(b"x" * PAGE)
    fd = os.open(path, os.O_RDONLY)
    proc._files[(0x1000, 0x2000)] = fd
    proc._vmas, proc._vma_starts = [], []
    proc.forget_mappings()
    assert proc._files == {} and proc._vmas is None
    with pytest.raises(OSError):
        os.fstat(fd)                   # closed
    proc.close()
