"""The host side of the chain: the QEMU process. HVA -> HPA from /proc/PID/pagemap, page sizes
from /proc/kpageflags and smaps, and the bytes at an HVA (present pages from the process, absent
ones from the file behind them or proven zero). Never HMP `gpa2hpa`: it writes.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import struct
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..errors import MemoryReadError, VMGoneError

if TYPE_CHECKING:   # numpy is imported where arrays are built: a one-address walk needs none
    import numpy as np
from ..record import record
from .smaps import Vma, parse_smaps

PAGE = 4096
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_HUGE, KPF_NOPAGE, KPF_THP = 15, 16, 17, 20, 22


@record(frozen=True)
class HostPage:
    """What the host's pagemap says about one HVA of the QEMU process."""
    hva: int
    status: str                      # "present", "not-present", "swapped", "pfn-hidden", "unreadable"
    hpa: Optional[int] = None
    page_size: Optional[int] = None  # host page size: 4096, 2 MiB (THP or hugetlbfs), 1 GiB
    page_kind: str = ""              # "4k", "thp", "hugetlb"
    detail: str = ""                 # a sentence for anything but "present"
    flags: tuple = ()                # soft-dirty, exclusive, file/shared

    def to_dict(self) -> dict:
        return {"status": self.status, "hpa": _hex(self.hpa), "page_size": self.page_size,
                "page_kind": self.page_kind or None, "detail": self.detail or None,
                "flags": list(self.flags)}


def _hex(v):
    return None if v is None else f"{v:#x}"


# Host status codes of pagemap_arrays(), named by HOST_STATUS[code].
HOST_STATUS = ("", "present", "not-present", "swapped", "pfn-hidden", "no-ram", "unknown")
(HOST_NONE, HOST_PRESENT, HOST_NOT_PRESENT, HOST_SWAPPED, HOST_PFN_HIDDEN, HOST_NO_RAM,
 HOST_UNKNOWN) = range(len(HOST_STATUS))


PAGEMAP_GAP = 512         # pages between two HVAs still read in one pagemap read
PAGEMAP_CHUNK = 1 << 17   # pagemap entries per read (1 MiB): bounded whatever the span


def _u64_table(fd: int, indexes, what: str):
    """Entries (uint64) at an array of indexes of a table of 8-byte entries (pagemap,
    kpageflags), read in runs of nearby indexes (PAGEMAP_GAP), PAGEMAP_CHUNK at most at a time."""
    import numpy as np
    indexes = np.asarray(indexes, np.int64)
    out = np.zeros(len(indexes), np.uint64)
    if not len(indexes):
        return out
    uniq, back = np.unique(indexes, return_inverse=True)
    found = np.zeros(len(uniq), np.uint64)
    breaks = np.flatnonzero(np.diff(uniq) > PAGEMAP_GAP) + 1
    for group in np.split(np.arange(len(uniq)), breaks):
        lo, hi = int(uniq[group[0]]), int(uniq[group[-1]])
        for first in range(lo, hi + 1, PAGEMAP_CHUNK):
            n = min(PAGEMAP_CHUNK, hi + 1 - first)
            data = os.pread(fd, 8 * n, first * 8)
            if len(data) != 8 * n:
                raise OSError(f"short read from {what}")
            entries = np.frombuffer(data, "<u8")
            k = group[(uniq[group] >= first) & (uniq[group] < first + n)]
            found[k] = entries[uniq[k] - first]
    out[:] = found[back.reshape(-1)]
    return out


def pagemap_arrays(process, hvas):
    """(status codes, HPAs) for a numpy uint64 array of HVAs of one process (the vectorized
    twin of host_page; HPA 0 where not present). The pagemap is read in runs of nearby pages,
    never across the gap between two far-apart addresses."""
    import numpy as np
    entries = process.pagemap_of_pages((hvas // np.uint64(PAGE)).astype(np.int64))
    return pagemap_columns(entries, hvas)


def pagemap_columns(entries, hvas):
    """(status codes, HPAs) of HVAs from their pagemap entries, already read."""
    import numpy as np
    u64 = np.uint64
    present = (entries >> u64(63)) & u64(1) == 1
    swapped = (entries >> u64(62)) & u64(1) == 1
    pfn = entries & u64((1 << 55) - 1)
    status = np.where(swapped, HOST_SWAPPED,
                      np.where(~present, HOST_NOT_PRESENT,
                               np.where(pfn == 0, HOST_PFN_HIDDEN, HOST_PRESENT))).astype(np.uint8)
    hpa = np.where(status == HOST_PRESENT, pfn * u64(PAGE) + hvas % u64(PAGE), u64(0))
    return status, hpa


class HostProcess:
    """The QEMU process as seen from the host: pagemap, kpageflags, smaps, and its memory."""

    def __init__(self, pid: int):
        self.pid = pid
        self._pagemap = None
        self._mem = None
        self._kpageflags = None
        self._vmas: Optional[List[Vma]] = None
        self._vma_starts: List[int] = []
        self._files: Dict[Tuple[int, int], Optional[int]] = {}   # VMA -> its backing file

    def forget_mappings(self) -> None:
        """Read smaps again when next asked (QEMU mapped or unmapped memory since), and the
        files behind mappings (kept by address range: a new mapping may take an old one's)."""
        self._vmas, self._vma_starts = None, []
        self._close_files()

    def _close_files(self) -> None:
        for f in self._files.values():
            if f is not None:
                os.close(f)
        self._files = {}

    def close(self) -> None:
        for f in (self._pagemap, self._mem, self._kpageflags):
            if f is not None:
                os.close(f)
        self._pagemap = self._mem = self._kpageflags = None
        self._close_files()

    def _open(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pagemap_entry(self, hva: int) -> int:
        if self._pagemap is None:
            self._pagemap = self._open(f"/proc/{self.pid}/pagemap")
        data = os.pread(self._pagemap, 8, (hva // PAGE) * 8)
        if len(data) != 8:
            raise OSError(f"short read from /proc/{self.pid}/pagemap")
        return struct.unpack("<Q", data)[0]

    def pagemap_entries(self, hva: int, count: int) -> Tuple[int, ...]:
        """The pagemap entries of `count` pages from the page holding hva, in one read."""
        if self._pagemap is None:
            self._pagemap = self._open(f"/proc/{self.pid}/pagemap")
        data = os.pread(self._pagemap, 8 * count, (hva // PAGE) * 8)
        if len(data) != 8 * count:
            raise OSError(f"short read from /proc/{self.pid}/pagemap")
        return struct.unpack(f"<{count}Q", data)

    def pagemap_of_pages(self, pages: np.ndarray) -> np.ndarray:
        """The pagemap entries (uint64) of an array of page numbers, read in runs of nearby
        pages (PAGEMAP_GAP) and at most PAGEMAP_CHUNK entries at a time."""
        if self._pagemap is None:
            self._pagemap = self._open(f"/proc/{self.pid}/pagemap")
        return _u64_table(self._pagemap, pages, f"/proc/{self.pid}/pagemap")

    def kpageflags_of(self, pfns: np.ndarray):
        """(flags, known) for an array of frame numbers: kpageflags() of each, read in runs;
        known is False where /proc/kpageflags cannot be read (kpageflags() gives None)."""
        import numpy as np
        try:
            if self._kpageflags is None:
                self._kpageflags = self._open("/proc/kpageflags")
            return _u64_table(self._kpageflags, pfns, "/proc/kpageflags"), \
                np.ones(len(pfns), bool)
        except OSError:     # frame by frame, exactly as kpageflags() answers each
            each = [self.kpageflags(int(p)) for p in pfns]
            return np.array([f or 0 for f in each], np.uint64), \
                np.array([f is not None for f in each], bool)

    def page_forms(self, pages: np.ndarray, entries: Optional[np.ndarray] = None):
        """Host pages that host_page() describes alike but for their frame, for an array of
        page numbers (HVA // 4096) and their pagemap entries (read here when not given):
        (form id of each page, frame number of each page, the HostPage of each form's first
        page, made from the same reads). The id holds all host_page() reads: the pagemap
        entry's flag and status bits, whether the frame is hidden, the THP, huge and no-page
        bits of kpageflags (and whether it was readable), the mapping (VMA) holding the page; a
        swapped page is a form of its own (its sentence names its swap slot)."""
        import numpy as np
        u64 = np.uint64
        pages = np.asarray(pages, np.int64)
        if not len(pages):
            return np.zeros(0, np.int64), np.zeros(0, u64), []
        if entries is None:
            entries = self.pagemap_of_pages(pages)
        pfn = entries & u64((1 << 55) - 1)
        swapped = (entries >> u64(62)) & u64(1) == 1
        framed = ((entries >> u64(63)) & u64(1) == 1) & ~swapped & (pfn != 0)
        kflags, known = np.zeros(len(pages), u64), np.zeros(len(pages), bool)
        if framed.any():
            kflags[framed], known[framed] = self.kpageflags_of(pfn[framed])
        self.vmas()
        starts = np.array(self._vma_starts or [0], u64)    # [vsyscall] is above 2**63
        ends = np.array([v.end for v in self._vmas] or [0], u64)
        hvas = pages.astype(u64) * u64(PAGE)
        vma = np.searchsorted(starts, hvas, side="right").astype(np.int64) - 1
        vma = np.where((vma >= 0) & (hvas < ends[np.maximum(vma, 0)]), vma, -1)
        from ..arrays import group_rows
        first, form = group_rows([entries >> u64(55), pfn == 0, (kflags >> u64(KPF_THP)) & u64(1),
                                  (kflags >> u64(KPF_HUGE)) & u64(1),
                                  (kflags >> u64(KPF_NOPAGE)) & u64(1), known, vma,
                                  np.where(swapped, entries, u64(0))])
        hosts = [self._host_page_of(int(pages[k]) * PAGE, int(entries[k]),
                                    int(kflags[k]) if known[k] else None)
                 for k in first.tolist()]
        return form, np.where(framed, pfn, u64(0)), hosts

    # ---- mappings and their backing -------------------------------------------------------

    def vmas(self) -> List[Vma]:
        """The process's mappings from /proc/PID/smaps (read once)."""
        if self._vmas is None:
            try:
                with open(f"/proc/{self.pid}/smaps") as f:
                    self._vmas = parse_smaps(f.read())
            except (OSError, ValueError, IndexError):
                self._vmas = []
            self._vma_starts = [v.start for v in self._vmas]
        return self._vmas

    def vma_at(self, hva: int) -> Optional[Vma]:
        vmas = self.vmas()
        i = bisect.bisect_right(self._vma_starts, hva) - 1
        if i >= 0 and vmas[i].start <= hva < vmas[i].end:
            return vmas[i]
        return None

    def backing_file(self, vma: Vma) -> Optional[int]:
        """A read-only fd of the file behind a file mapping (memory-backend-file, memfd,
        hugetlbfs, shared anonymous memory), or None: /proc/PID/map_files (root), else the
        descriptor QEMU keeps open on it, else its path, each checked to be the same inode."""
        key = (vma.start, vma.end)
        if key in self._files:
            return self._files[key]
        fd = None
        if vma.inode:
            candidates = [f"/proc/{self.pid}/map_files/{vma.start:x}-{vma.end:x}"]
            try:
                candidates += [f"/proc/{self.pid}/fd/{n}"
                               for n in os.listdir(f"/proc/{self.pid}/fd")]
            except OSError:
                pass
            if vma.path.startswith("/") and not vma.path.endswith("(deleted)"):
                candidates.append(vma.path)
            for path in candidates:
                # look before opening: opening a device QEMU holds (a tty, vhost, sound...)
                # can do something; only the regular file with the mapping's inode is opened
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if st.st_ino != vma.inode or not stat.S_ISREG(st.st_mode):
                    continue
                try:
                    f = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
                except OSError:
                    continue
                st = os.fstat(f)
                if st.st_ino == vma.inode and stat.S_ISREG(st.st_mode):
                    fd = f
                    break
                os.close(f)
        self._files[key] = fd
        return fd

    def _segments(self, hva: int, end: int):
        """(vma, lo, hi) pieces of [hva, end) by mapping; MemoryReadError for a hole."""
        while hva < end:
            vma = self.vma_at(hva)
            if vma is None:
                raise MemoryReadError(f"HVA {hva:#x} is not mapped in QEMU's process "
                                      f"{self.pid}", hva)
            hi = min(end, vma.end)
            yield vma, hva, hi
            hva = hi

    def absent_zero(self, hva: int, entries: np.ndarray) -> np.ndarray:
        """For the pages from the page holding hva (one pagemap entry each): True where the
        page holds zeros that can be known without reading it: absent from QEMU's page table
        (neither present nor swapped) and either private anonymous memory (never touched, or
        discarded) or a hole of the file behind a file mapping. Only such pages may be skipped
        or given as zeros; every other absent page holds data that must really be read."""
        import numpy as np
        absent = (entries >> np.uint64(62)) == 0
        zero = np.zeros(len(entries), bool)
        if absent.any():
            pages = hva // PAGE + np.flatnonzero(absent)
            zero[absent] = self.zero_if_absent(pages)
        return zero

    def zero_if_absent(self, pages: np.ndarray) -> np.ndarray:
        """For page numbers (HVA // 4096) that pagemap shows absent: True where such a page
        reads as zeros (see absent_zero); False where it holds data elsewhere, or is not
        mapped at all."""
        import numpy as np
        pages = np.asarray(pages, np.int64)
        zero = np.zeros(len(pages), bool)
        if not len(pages):
            return zero
        vmas = self.vmas()
        if not vmas:
            return zero
        # each page's mapping (smaps lists them in address order, without overlaps)
        which = np.searchsorted(np.array([v.start // PAGE for v in vmas], np.int64), pages,
                                side="right") - 1
        which[(which >= 0) &
              (pages >= np.array([v.end // PAGE for v in vmas], np.int64)[which])] = -1
        for j in np.flatnonzero(np.bincount(which[which >= 0], minlength=len(vmas))).tolist():
            vma, inside = vmas[j], which == j
            if vma.absent_reads_zero:
                zero[inside] = True
            elif vma.inode and self.backing_file(vma) is not None:
                fd = self.backing_file(vma)
                for i in np.flatnonzero(inside).tolist():
                    hva = int(pages[i]) * PAGE
                    zero[i] = bool(_holes(fd, vma.offset + (hva - vma.start), 1, 0)[0])
        return zero

    def read_range(self, hva: int, length: int, zeros: Optional[list] = None) -> bytes:
        """[hva, hva+length) of QEMU's memory, as the guest sees it; bytes are never invented.
        Pages present (or swapped out) in QEMU's page table are read from the process. A page
        that is absent there is read from the file behind its mapping (memory-backend-file,
        memfd, hugetlbfs: pread, which reads holes as zeros without allocating), or, when that
        file cannot be opened, through the process (which faults it in read-only); absent pages
        of private anonymous memory are zeros, proven without a read (see absent_zero). With
        `zeros` (a list), the (start, end) offsets of those proven-zero runs are added to it,
        and the buffer read into is given as it is (a bytearray, not copied to bytes: a
        search reads hundreds of MiB)."""
        first = hva // PAGE
        count = (hva + length - 1) // PAGE - first + 1
        try:
            entries = self.pagemap_entries(hva, count)
        except OSError as exc:
            if not process_exists(self.pid):
                raise VMGoneError(f"the QEMU process {self.pid} is gone") from None
            raise MemoryReadError(f"cannot read QEMU's pagemap at HVA {hva:#x}: {exc}",
                                  hva) from None
        if count == 1:      # the hot paths (a table entry, a value), with no numpy import
            if entries[0] >> 62:                  # one page in RAM
                return self.read(hva, length)
            vma = self.vma_at(hva)
            if vma is not None and vma.absent_reads_zero:
                if zeros is not None:
                    zeros.append((0, length))
                return bytes(length)              # proven zeros, as below
        import numpy as np
        entries = np.array(entries, np.uint64)
        out = bytearray(length)
        mapped = (entries >> np.uint64(62)) != 0
        for vma, lo, hi in self._segments(hva, hva + length):
            i, j = lo // PAGE - first, (hi - 1) // PAGE - first + 1
            take = mapped[i:j].copy()              # read from the process
            absent = ~take
            if absent.any():
                if vma.absent_reads_zero:          # zeros: out is zero already
                    if zeros is not None:
                        zeros.extend((a - hva, b - hva)
                                     for a, b in self._page_runs(lo, hi, first + i, absent))
                elif vma.inode and self.backing_file(vma) is not None:
                    self._read_file_pages(vma, lo, hi, first + i, absent, out, hva)
                else:
                    take[:] = True                 # no other way: fault it in, read-only
            self._read_pages(lo, hi, first + i, take, out, hva)
        return out if zeros is not None else bytes(out)

    def _page_runs(self, lo: int, hi: int, first_page: int, sel: np.ndarray):
        """[a, b) byte ranges of [lo, hi) covering the runs of selected pages."""
        import numpy as np
        edges = np.flatnonzero(np.diff(np.concatenate(([False], sel, [False]))))
        for s0, s1 in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            yield max(lo, (first_page + s0) * PAGE), min(hi, (first_page + s1) * PAGE)

    def _read_pages(self, lo, hi, first_page, sel, out, base) -> None:
        import numpy as np
        runs = list(self._page_runs(lo, hi, first_page, sel))
        if runs:
            a = np.array([r[0] for r in runs], np.uint64)
            b = np.array([r[1] for r in runs], np.uint64)
            self.readv(out, a - np.uint64(base), a, b - a)

    def _read_file_pages(self, vma, lo, hi, first_page, sel, out, base) -> None:
        fd = self.backing_file(vma)
        for a, b in self._page_runs(lo, hi, first_page, sel):
            try:
                data = os.pread(fd, b - a, vma.offset + (a - vma.start))
            except OSError as exc:
                raise MemoryReadError(f"cannot read the file behind HVA {a:#x} "
                                      f"({vma.describe()}): {exc.strerror or exc}", a) from None
            if len(data) != b - a:
                raise MemoryReadError(f"short read of the file behind HVA {a:#x} "
                                      f"({vma.describe()})", a)
            out[a - base:b - base] = data

    def kpageflags(self, pfn: int) -> Optional[int]:
        try:
            if self._kpageflags is None:
                self._kpageflags = self._open("/proc/kpageflags")
            data = os.pread(self._kpageflags, 8, pfn * 8)
            return struct.unpack("<Q", data)[0] if len(data) == 8 else None
        except OSError:
            return None

    def host_page(self, hva: int) -> HostPage:
        """HVA -> HPA through pagemap, never guessing: absent, swapped or hidden PFNs are said so."""
        try:
            entry = self.pagemap_entry(hva)
        except OSError as exc:
            return HostPage(hva, "unreadable", detail=f"cannot read /proc/{self.pid}/pagemap: "
                            f"{exc.strerror or exc}; reading it needs the same user as QEMU "
                            "(and root or CAP_SYS_ADMIN for the frame numbers)")
        pfn = entry & ((1 << 55) - 1)
        framed = entry >> 63 & 1 and not entry >> 62 & 1 and pfn
        return self._host_page_of(hva, entry, self.kpageflags(pfn) if framed else None)

    def _host_page_of(self, hva: int, entry: int, kflags: Optional[int]) -> HostPage:
        """host_page() from the pagemap entry and the frame's kpageflags (None: unknown)."""
        flags = tuple(name for bit, name in ((55, "soft-dirty"), (56, "exclusive"),
                                             (61, "file/shared")) if entry >> bit & 1)
        if entry >> 62 & 1:
            return HostPage(hva, "swapped", flags=flags,
                            detail=f"the host page is swapped out (swap type {entry & 0x1f}, "
                                   f"offset {entry >> 5 & ((1 << 50) - 1):#x}); it has no HPA now")
        if not entry >> 63 & 1:
            vma = self.vma_at(hva)
            if vma is None or vma.absent_reads_zero:
                why = ("QEMU has not touched it (the guest never wrote it, or it was "
                       "discarded): it reads as zeros")
            else:
                why = (f"it is not mapped in QEMU's page table; its data is in the file "
                       f"behind the mapping ({vma.describe()}), in the page cache or on disk")
            return HostPage(hva, "not-present", flags=flags,
                            detail=f"the host page is not present: {why}, so it has no HPA "
                                   "in this process now")
        pfn = entry & ((1 << 55) - 1)
        if pfn == 0:
            return HostPage(hva, "pfn-hidden", flags=flags,
                            detail="the page is present but the kernel hides frame numbers from "
                                   "this user; run as root (or with CAP_SYS_ADMIN) to see the HPA")
        size, kind = self._page_size(hva, kflags)
        return HostPage(hva, "present", pfn * PAGE + (hva % PAGE), size, kind, flags=flags)

    def _page_size(self, hva: int, kflags: Optional[int]):
        if kflags is not None and kflags >> KPF_THP & 1:
            return 2 << 20, "thp"
        if kflags is not None and kflags >> KPF_HUGE & 1:
            return self._hugetlb_size(hva) or (2 << 20), "hugetlb"
        if kflags is not None and not kflags >> KPF_NOPAGE & 1:
            # a page the kernel knows, neither THP nor hugetlb (every page of a hugetlb
            # mapping is KPF_HUGE): 4 KiB without reading smaps, which costs a page-table
            # walk of all QEMU's memory (24 ms at 2 GiB resident). A frame with no struct
            # page (device DAX) still asks its mapping.
            return PAGE, "4k"
        size = self._hugetlb_size(hva)
        if size:
            return size, "hugetlb"
        return PAGE, "4k"

    def _hugetlb_size(self, hva: int) -> Optional[int]:
        """KernelPageSize of the mapping holding hva, when it is larger than 4 KiB."""
        vma = self.vma_at(hva)
        return vma.kernel_page_size if vma and vma.kernel_page_size > PAGE else None

    def read(self, hva: int, length: int) -> bytes:
        """Read the QEMU process's memory as it is mapped (a page absent from QEMU's page table
        is faulted in by the read; read_range decides when that is the right way)."""
        buf = bytearray(length)
        self.readinto(hva, buf)
        return bytes(buf)

    def readinto(self, hva: int, buf) -> None:
        """Fill buf (a bytearray or a writable memoryview) from hva (same rules as read). One
        piece: one pread of /proc/PID/mem (the hot path of a walk: a few bytes per level;
        a fifth of what process_vm_readv costs through ctypes for one piece)."""
        try:
            if self._mem is None:
                self._mem = self._open(f"/proc/{self.pid}/mem")
            got = os.preadv(self._mem, [buf], hva)
        except OSError:
            got = -1
        if got != len(buf):
            buf[:] = self._pread(hva, len(buf))    # says why it does not read

    def read_many(self, hvas, size: int) -> bytearray:
        """`size` bytes at each of many HVAs, one after the other in the result. They are
        read in address order (the kernel pins each piece's page: about a quarter faster
        than in a shuffled order), each into its own place."""
        import numpy as np
        buf = bytearray(len(hvas) * size)
        if len(hvas):
            hvas = np.asarray(hvas, np.uint64)
            order = np.argsort(hvas, kind="stable")
            self.readv(buf, order.astype(np.uint64) * np.uint64(size), hvas[order],
                       np.full(len(hvas), size, np.uint64))
        return buf

    def readv(self, buf, offsets, hvas, lengths) -> None:
        """The one way memory is read: piece i of buf (at offsets[i], lengths[i] bytes) from
        hvas[i], many per process_vm_readv call (memory.vmreadv); pieces a call could not
        read are read one by one through /proc/PID/mem, which says why when it fails too."""
        from .vmreadv import read_pieces
        read_pieces(self.pid, buf, offsets, hvas, lengths, self._pread)

    def _pread(self, hva: int, length: int) -> bytes:
        try:
            if self._mem is None:
                self._mem = self._open(f"/proc/{self.pid}/mem")
            data = os.pread(self._mem, length, hva)
        except OSError as exc:
            if not process_exists(self.pid):
                raise VMGoneError(f"the QEMU process {self.pid} is gone") from None
            raise MemoryReadError(f"cannot read QEMU's memory at HVA {hva:#x} "
                                  f"(/proc/{self.pid}/mem): {exc.strerror or exc}", hva) from None
        if len(data) != length:
            raise MemoryReadError(f"short read of QEMU's memory at HVA {hva:#x}", hva)
        return data

    def describe(self) -> str:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                exe = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            exe = "?"
        return f"pid {self.pid} ({os.path.basename(exe)})"


def _holes(fd: int, offset: int, pages: int, skew: int) -> np.ndarray:
    """For `pages` pages of a file from `offset` (`skew` bytes into the first page): True
    where the page lies wholly in a hole (SEEK_HOLE/SEEK_DATA), which reads as zeros. A file
    system without them reports no holes."""
    import numpy as np
    out = np.zeros(pages, bool)
    start, end = offset - skew, offset - skew + pages * PAGE
    pos = start
    try:
        while pos < end:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            if data > pos:   # [pos, data) is a hole
                a, b = -(-(pos - start) // PAGE), min(pages, (data - start) // PAGE)
                out[a:b] = True
            if data >= end:
                break
            pos = os.lseek(fd, data, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno == errno.ENXIO:        # no data after pos: the rest is a hole
            a = -(-(pos - start) // PAGE)
            out[a:] = True
        # EINVAL and the like: no hole information; nothing proven
    return out


def process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def process_start_time(pid: int) -> Optional[int]:
    """When the process started (clock ticks since boot, /proc/PID/stat field 22): with the
    pid, a name for one process's whole life (pids are reused, start times are not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return int(text[text.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None
