"""The host side of the chain: GPA -> RAM block -> HVA (QMP), HVA -> HPA (/proc/PID/pagemap).

The RAM map comes from `info mtree -f` (the "memory" address space) plus one `gpa2hva` per RAM
region: QEMU 7.2 prints no host addresses in `info ramblock` (FACTS.md). HPAs come from the QEMU
process's pagemap, page sizes from /proc/kpageflags and smaps. Never HMP `gpa2hpa`: it writes.
"""

import bisect
import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import MemoryReadError, ParseError, VMGoneError
from .qmp import QmpCommandError, Region, parse_gpa2hva, parse_mtree_flat

PAGE = 4096
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_HUGE, KPF_THP = 15, 16, 17, 22


@dataclass(frozen=True)
class RamRegion:
    """A RAM-backed piece of the guest's physical address space and where QEMU keeps it."""
    start: int
    end: int             # inclusive
    kind: str            # "ram" or "rom" ("rom" regions are read-only views of RAM blocks)
    block: str           # RAM block name (pc.ram, pc.bios, vga.vram, ...)
    block_offset: int    # offset of `start` inside the block
    hva: Optional[int]   # host virtual address of `start` in the QEMU process

    def hva_of(self, gpa: int) -> Optional[int]:
        return None if self.hva is None else self.hva + (gpa - self.start)


class RamMap:
    """Which guest-physical ranges are RAM (safe to read) and which are devices (never read)."""

    def __init__(self, regions: List[Region], hvas: Dict[int, int]):
        self.regions = sorted(regions, key=lambda r: r.start)
        self._starts = [r.start for r in self.regions]
        self.ram = [RamRegion(r.start, r.end, r.kind, r.name, r.offset, hvas.get(r.start))
                    for r in self.regions if r.is_ram]
        self._ram_starts = [r.start for r in self.ram]

    @classmethod
    def from_qmp(cls, qmp) -> "RamMap":
        regions = parse_mtree_flat(qmp.hmp("info mtree -f"))
        hvas = {}
        for region in regions:
            if region.is_ram:
                try:
                    _, _, hva = parse_gpa2hva(qmp.hmp(f"gpa2hva {region.start:#x}"))
                    hvas[region.start] = hva
                except (ParseError, QmpCommandError):
                    pass  # a RAM region QEMU cannot resolve: readable through gdb, no HVA
        return cls(regions, hvas)

    def ram_at(self, gpa: int) -> Optional[RamRegion]:
        i = bisect.bisect_right(self._ram_starts, gpa) - 1
        if i >= 0 and self.ram[i].start <= gpa <= self.ram[i].end:
            return self.ram[i]
        return None

    def region_at(self, gpa: int) -> Optional[Region]:
        """The topmost region at gpa (the flat view has no overlaps)."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and self.regions[i].start <= gpa <= self.regions[i].end:
            return self.regions[i]
        return None

    def describe(self, gpa: int) -> str:
        region = self.region_at(gpa)
        if region is None:
            return f"{gpa:#x} is unassigned guest-physical space (no RAM or device there)"
        return (f"{gpa:#x} is in device region {region.name!r} ({region.kind}, "
                f"{region.start:#x}-{region.end:#x}), not RAM")

    def check_readable(self, gpa: int, length: int) -> RamRegion:
        """The RAM region holding [gpa, gpa+length), or MemoryReadError: MMIO is never read."""
        if gpa < 0 or length <= 0 or gpa + length - 1 > 0xFFFFFFFFFFFFFFFF:
            raise MemoryReadError(f"bad physical range {gpa:#x}+{length}", gpa)
        region = self.ram_at(gpa)
        if region is None:
            raise MemoryReadError(self.describe(gpa), gpa)
        if gpa + length - 1 > region.end:
            nxt = self.ram_at(region.end + 1)
            if nxt is None or nxt.block != region.block:
                raise MemoryReadError(f"{gpa:#x}+{length} runs past the end of RAM region "
                                      f"{region.block!r} at {region.end:#x}", gpa)
        return region

    @property
    def ram_bytes(self) -> int:
        return sum(r.end - r.start + 1 for r in self.ram if r.kind == "ram")


@dataclass(frozen=True)
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


def pagemap_arrays(process, hvas):
    """(status codes, HPAs) for a numpy uint64 array of HVAs of one process, from one pagemap
    read spanning them all (the vectorized twin of host_page; HPA 0 where not present)."""
    u64 = np.uint64
    pages = (hvas // u64(PAGE)).astype(np.int64)
    lo, hi = int(pages.min()), int(pages.max())
    entries = np.array(process.pagemap_entries(lo * PAGE, hi - lo + 1), dtype=u64)[pages - lo]
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
        self._hugetlb_vmas = None

    def close(self) -> None:
        for f in (self._pagemap, self._mem, self._kpageflags):
            if f is not None:
                os.close(f)
        self._pagemap = self._mem = self._kpageflags = None

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
        flags = tuple(name for bit, name in ((55, "soft-dirty"), (56, "exclusive"),
                                             (61, "file/shared")) if entry >> bit & 1)
        if entry >> 62 & 1:
            return HostPage(hva, "swapped", flags=flags,
                            detail=f"the host page is swapped out (swap type {entry & 0x1f}, "
                                   f"offset {entry >> 5 & ((1 << 50) - 1):#x}); it has no HPA now")
        if not entry >> 63 & 1:
            return HostPage(hva, "not-present", flags=flags,
                            detail="the host page is not present: QEMU has not touched it yet "
                                   "(the guest never wrote it), so it has no HPA now")
        pfn = entry & ((1 << 55) - 1)
        if pfn == 0:
            return HostPage(hva, "pfn-hidden", flags=flags,
                            detail="the page is present but the kernel hides frame numbers from "
                                   "this user; run as root (or with CAP_SYS_ADMIN) to see the HPA")
        size, kind = self._page_size(hva, pfn)
        return HostPage(hva, "present", pfn * PAGE + (hva % PAGE), size, kind, flags=flags)

    def _page_size(self, hva: int, pfn: int):
        kflags = self.kpageflags(pfn)
        if kflags is not None and kflags >> KPF_THP & 1:
            return 2 << 20, "thp"
        if kflags is not None and kflags >> KPF_HUGE & 1:
            return self._hugetlb_size(hva) or (2 << 20), "hugetlb"
        size = self._hugetlb_size(hva)
        if size:
            return size, "hugetlb"
        return PAGE, "4k"

    def _hugetlb_size(self, hva: int) -> Optional[int]:
        """KernelPageSize of the smaps VMA holding hva, when it is larger than 4 KiB."""
        if self._hugetlb_vmas is None:
            self._hugetlb_vmas = []
            try:
                with open(f"/proc/{self.pid}/smaps") as f:
                    start = end = 0
                    for line in f:
                        head = line.split(None, 1)[0]
                        if "-" in head and not head.endswith(":"):
                            a, b = head.split("-")
                            start, end = int(a, 16), int(b, 16)
                        elif head == "KernelPageSize:":
                            kb = int(line.split()[1])
                            if kb > 4:
                                self._hugetlb_vmas.append((start, end, kb * 1024))
            except (OSError, ValueError):
                pass
        for start, end, size in self._hugetlb_vmas:
            if start <= hva < end:
                return size
        return None

    def read(self, hva: int, length: int) -> bytes:
        """Read the QEMU process's memory. Callers check pagemap first: reading a page that is
        not present would fault it in on the host."""
        buf = bytearray(length)
        self.readinto(hva, buf)
        return bytes(buf)

    def readinto(self, hva: int, buf) -> None:
        """Fill buf (a bytearray or a writable memoryview) from hva (same rules as read). One
        piece: one plain iovec each side (the hot path of a walk: a few bytes per level)."""
        view = (ctypes.c_char * len(buf)).from_buffer(buf)
        try:
            local, remote = _Iovec(ctypes.addressof(view), len(buf)), _Iovec(hva, len(buf))
            got = -1 if _libc is None else _libc.process_vm_readv(
                self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        finally:
            del view   # release buf's export
        if got != len(buf):
            buf[:] = self._pread(hva, len(buf))

    def read_many(self, hvas, size: int) -> bytearray:
        """`size` bytes at each of many HVAs, one after the other in the result."""
        buf = bytearray(len(hvas) * size)
        if len(hvas):
            self.readv(buf, np.arange(len(hvas), dtype=np.uint64) * np.uint64(size), hvas,
                       np.full(len(hvas), size, np.uint64))
        return buf

    def readv(self, buf, offsets, hvas, lengths) -> None:
        """The one way memory is read: piece i of buf (at offsets[i], lengths[i] bytes) from
        hvas[i], IOV_MAX pieces per process_vm_readv call, the iovec arrays built by numpy
        (no Python object per piece). Pieces a call could not read are read one by one
        through /proc/PID/mem, which says why when it fails too."""
        offsets = np.asarray(offsets, dtype=np.uint64)
        hvas = np.asarray(hvas, dtype=np.uint64)
        lengths = np.asarray(lengths, dtype=np.uint64)
        view = (ctypes.c_char * len(buf)).from_buffer(buf)
        try:
            base = np.uint64(ctypes.addressof(view))
            for k in range(0, len(hvas), IOV_MAX):
                part = slice(k, k + IOV_MAX)
                n = len(hvas[part])
                local = np.stack([base + offsets[part], lengths[part]], axis=1)
                remote = np.stack([hvas[part], lengths[part]], axis=1)
                got = -1 if _libc is None else _libc.process_vm_readv(
                    self.pid, local.ctypes.data_as(ctypes.POINTER(_Iovec)), n,
                    remote.ctypes.data_as(ctypes.POINTER(_Iovec)), n, 0)
                if got == int(lengths[part].sum()):
                    continue
                for off, hva, length in zip(offsets[part].tolist(), hvas[part].tolist(),
                                            lengths[part].tolist()):
                    buf[off:off + length] = self._pread(hva, length)
        finally:
            del view   # release buf's export

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


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.process_vm_readv.restype = ctypes.c_ssize_t
    _libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                       ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
except (OSError, AttributeError):  # not Linux/glibc: /proc/PID/mem only
    _libc = None


IOV_MAX = 1024   # iovecs per process_vm_readv call (the kernel's UIO_MAXIOV)


def process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
