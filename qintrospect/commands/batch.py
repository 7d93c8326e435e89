"""Many addresses at once, the whole chain, as arrays: GVA -> GPA -> HVA -> HPA + value.

translate() builds a Translation with every level, flag and access rule for one address.
For 100,000 addresses that detail costs more than the answer, so a batch walks with
paging.walk_array and finishes on the host with arrays too: the RAM region of every GPA by
one searchsorted, the host pagemap of each RAM region read once, and the 8 bytes at every
address gathered from the pages they lie in, read once each in runs. BatchTranslation.walk(i)
gives the full scalar walk of any one element when its levels are wanted.
"""

from typing import Iterator, Optional

import numpy as np

from .. import paging
from ..errors import MemoryReadError
from ..memory.host import (HOST_NOT_PRESENT, HOST_PFN_HIDDEN, HOST_PRESENT, HOST_STATUS, HOST_UNKNOWN,
                   PAGE, pagemap_columns)
from ..memory.guest import DirectMemory
from ..record import record

VALUE_SIZE = 8
RUN_PAGES = 1024   # data pages read per call: bounded memory (4 MiB) whatever the batch
GAP_PAGES = 64     # pages apart that are still read in one call
U64 = np.uint64


@record
class BatchTranslation:
    walk_result: paging.BatchWalk
    region: np.ndarray        # int32: index into ram_map.ram, -1 where not RAM / no GPA
    hva: np.ndarray           # uint64, 0 where unknown
    has_hva: np.ndarray       # bool
    hpa: np.ndarray           # uint64, 0 where unknown
    host_status: np.ndarray   # uint8 code (HOST_STATUS)
    value: np.ndarray         # uint64
    has_value: np.ndarray     # bool
    ram_blocks: tuple         # block names, indexed by region
    host_entry: Optional[np.ndarray] = None   # uint64 pagemap entry of each HVA, 0 unknown
    # translate --slat: every GPA walked through the hypervisor's second-level table
    # (paging.BatchWalk, same length; an element whose guest walk faulted is not looked at)
    slat: Optional[paging.BatchWalk] = None
    slat_marker: Optional[np.ndarray] = None  # bool: where that walk stopped at a KVM MMIO marker

    def __len__(self) -> int:
        return len(self.walk_result)

    @property
    def ok(self) -> np.ndarray:
        return self.walk_result.ok

    @property
    def gpa(self) -> np.ndarray:
        return self.walk_result.pa

    def to_dicts(self) -> Iterator[dict]:
        """One JSON-ready dict per address: the chain's summary keys (no levels; readable
        only where the walk has it: riscv64), or the fault; with a second-level walk (slat),
        where it ends (slat_out, slat_page_size), whether that is the pagemap path's host
        address (slat_agrees), or its fault (slat_fault). Addresses and values are "0x..."
        strings."""
        return map(self.row_dict, range(len(self.walk_result)))

    def row_dict(self, i: int) -> dict:
        """to_dicts' dict of element i."""
        w = self.walk_result
        h = lambda v: f"{int(v):#x}"  # noqa: E731
        if not w.ok[i]:
            return {"gva": h(w.va[i]), "fault": {"level": w.level_name(i),
                                                  "reason": w.reason(i)}}
        status = HOST_STATUS[self.host_status[i]] or None
        row = {"gva": h(w.va[i]), "gpa": h(w.pa[i]), "page_size": int(w.page_size[i]),
               "ram_block": self.ram_blocks[self.region[i]] if self.region[i] >= 0 else None,
               "hva": h(self.hva[i]) if self.has_hva[i] else None,
               "hpa": h(self.hpa[i]) if status == "present" else None,
               "host": status}
        readable = getattr(w, "readable", None)    # riscv64 only: execute-only pages exist
        if readable is not None:
            row["readable"] = bool(readable[i])
        row.update(writable=bool(w.writable[i]), user=bool(w.user[i]),
                   executable=bool(w.executable[i]),
                   value=h(self.value[i]) if self.has_value[i] else None)
        s = self.slat
        if s is not None:
            ok = bool(s.ok[i])
            row.update({"slat_out": h(s.pa[i]) if ok else None,
                        "slat_page_size": int(s.page_size[i]) if ok else None,
                        "slat_agrees": bool(s.pa[i] == self.hpa[i]) if ok and status == "present"
                        else None,
                        "slat_fault": None if ok else self._slat_fault(i)})
        return row

    def _slat_fault(self, i: int) -> dict:
        s = self.slat
        fault = {"level": s.level_name(i), "reason": s.reason(i)}
        if self.slat_marker is not None and self.slat_marker[i]:
            fault["kvm_mmio_marker"] = True
        return fault

    @property
    def slat_agrees(self) -> np.ndarray:
        """Where the second-level walk ends at the host address the pagemap path gives."""
        return self.slat.ok & (self.host_status == HOST_PRESENT) & (self.slat.pa == self.hpa)

    @property
    def slat_disagrees(self) -> np.ndarray:
        """Where both paths give a host address, and not the same one."""
        return (self.walk_result.ok & self.slat.ok & (self.host_status == HOST_PRESENT)
                & (self.slat.pa != self.hpa))

    def walk(self, i: int, session) -> paging.Walk:
        """The full scalar walk (levels, flags, access rules) of element i."""
        return paging.walk(session.memory.read, session.cpu_state(self.cr3),
                           int(self.walk_result.va[i]))

    cr3: Optional[int] = None   # the root asked for (None: the vCPU's)


def translate_batch(session, addresses, cr3: Optional[int] = None) -> BatchTranslation:
    cpu = session.cpu_state(cr3)
    # walk_array reads each table it needs once per call: no page cache needed in front
    w = paging.walk_array(session.memory.read, cpu, addresses)
    region, hva, has_hva, hpa, status, entry = _host_side(session, w)
    n = len(w)
    value = np.zeros(n, dtype=U64)
    has_value = np.zeros(n, dtype=bool)
    if session.ram_map.ram and n:
        if isinstance(session.memory, DirectMemory):
            _values_direct(session, cpu, w, region, hva, status, value, has_value, cr3)
        else:
            _values(session, session.memory, w, region, value, has_value, cr3)
    return BatchTranslation(w, region, hva, has_hva, hpa, status, value, has_value,
                            tuple(r.block for r in session.ram_map.ram), cr3=cr3,
                            host_entry=entry)


def _host_side(session, w):
    """Each walked address's RAM region (-1: none), HVA, host status and HPA from the QEMU
    process's pagemap, and that pagemap entry: (region, hva, has_hva, hpa, status, entry)."""
    ram = session.ram_map.ram
    n = len(w)
    region = np.full(n, -1, dtype=np.int32)
    hva = np.zeros(n, dtype=U64)
    has_hva = np.zeros(n, dtype=bool)
    hpa = np.zeros(n, dtype=U64)
    status = np.zeros(n, dtype=np.uint8)
    entry = np.zeros(n, dtype=U64)
    if not (ram and n):
        return region, hva, has_hva, hpa, status, entry
    starts = np.array([r.start for r in ram], dtype=U64)
    ends = np.array([r.end for r in ram], dtype=U64)
    k = np.searchsorted(starts, w.pa, side="right").astype(np.int64) - 1
    inside = w.ok & (k >= 0)
    kk = np.where(inside, k, 0)
    inside &= w.pa <= ends[kk]
    region[inside] = kk[inside]
    for j, r in enumerate(ram):
        sel = region == j
        if not sel.any() or r.hva is None:
            continue
        hva[sel] = U64(r.hva) + (w.pa[sel] - U64(r.start))
        has_hva[sel] = True
        if session.process is not None:
            try:
                entry[sel] = session.process.pagemap_of_pages(
                    (hva[sel] // U64(PAGE)).astype(np.int64))
                status[sel], hpa[sel] = pagemap_columns(entry[sel], hva[sel])
            except OSError:
                status[sel] = HOST_UNKNOWN
    return region, hva, has_hva, hpa, status, entry


def _readable(status):
    """Where the process's own page table holds the page (process_vm_readv reads it)."""
    return (status == HOST_PRESENT) | (status == HOST_PFN_HIDDEN)


def _values_direct(session, cpu, w, region, hva, status, value, has_value, cr3) -> None:
    """The direct path: exactly the 8 bytes of each address, IOV_MAX of them per
    process_vm_readv call, for pages present in QEMU's page table. An absent page is zeros
    only where that is proven (HostProcess.zero_if_absent). Values that run into the next
    4 KiB page are read in two pieces, that page walked too (all of them at once). Every other
    address (swapped or file-backed pages, a next page not present or not RAM, an unreadable
    pagemap) takes the exact one-address path, which reads the bytes wherever they are."""
    offset_all = (hva % U64(PAGE)).astype(np.int64)
    within = (region >= 0) & (offset_all <= PAGE - VALUE_SIZE)
    absent = np.flatnonzero(within & (status == HOST_NOT_PRESENT))
    if len(absent):
        zero = session.process.zero_if_absent((hva[absent] // U64(PAGE)).astype(np.int64))
        value[absent[zero]] = 0
        has_value[absent[zero]] = True
    sel = np.flatnonzero(within & _readable(status))
    if len(sel):
        value[sel] = np.frombuffer(session.process.read_many(hva[sel], VALUE_SIZE), "<u8")
        has_value[sel] = True
    settled = _values_across(session, cpu, w, region, hva, status, offset_all, value, has_value)
    for i in np.flatnonzero((region >= 0) & ~has_value & ~settled).tolist():
        t = session.translate(int(w.va[i]), cr3)
        if t.value is not None and len(t.value) == VALUE_SIZE:
            value[i] = int.from_bytes(t.value, "little")
            has_value[i] = True


def _values_across(session, cpu, w, region, hva, status, offset_all, value, has_value):
    """The values that run into the next 4 KiB page, where this page is present in QEMU's
    page table: the next pages walked at once (as the one-address path walks each: the next
    virtual address through the guest's tables), each value read in two pieces where that
    page is present too. Returns where it is settled that there is no value: the next page
    faults (the one-address path shows only the first bytes then)."""
    settled = np.zeros(len(w), dtype=bool)
    cross = np.flatnonzero((region >= 0) & (offset_all > PAGE - VALUE_SIZE) & _readable(status))
    if not len(cross):
        return settled
    head = (PAGE - offset_all[cross]).astype(U64)             # bytes left in this page
    w2 = paging.walk_array(session.memory.read, cpu, w.va[cross] + head)   # wraps as & MASK64
    region2, hva2, _, _, status2, _ = _host_side(session, w2)
    settled[cross[~w2.ok]] = True
    both = np.flatnonzero(w2.ok & (region2 >= 0) & _readable(status2))
    if len(both):
        at = np.arange(len(both), dtype=U64) * U64(VALUE_SIZE)
        head = head[both]
        buf = bytearray(len(both) * VALUE_SIZE)
        session.process.readv(buf, np.concatenate((at, at + head)),
                              np.concatenate((hva[cross[both]], hva2[both])),
                              np.concatenate((head, U64(VALUE_SIZE) - head)))
        value[cross[both]] = np.frombuffer(buf, "<u8")
        has_value[cross[both]] = True
    return settled


def _values(session, memory, w, region, value, has_value, cr3) -> None:
    """The 8 bytes at every translated address that lies in RAM. Data pages are read once
    each, RAM region by region, in spans of nearby pages (bounded: RUN_PAGES at a time); a
    value that runs into the next virtual page takes the exact one-address path."""
    offset_all = (w.pa % U64(PAGE)).astype(np.int64)
    for j in np.unique(region[region >= 0]).tolist():
        sel = np.flatnonzero((region == j) & (offset_all <= PAGE - VALUE_SIZE))
        if len(sel):
            _values_in_region(memory, w.pa[sel], sel, value, has_value)
    for i in np.flatnonzero((region >= 0) & (offset_all > PAGE - VALUE_SIZE)).tolist():
        t = session.translate(int(w.va[i]), cr3)
        if t.value is not None and len(t.value) == VALUE_SIZE:
            value[i] = int.from_bytes(t.value, "little")
            has_value[i] = True


def _values_in_region(memory, gpa, rows, value, has_value) -> None:
    page_of = (gpa // U64(PAGE)).astype(np.int64)
    offset = (gpa % U64(PAGE)).astype(np.int64)
    order = np.argsort(page_of, kind="stable")
    rows, offset, page_of = rows[order], offset[order], page_of[order]
    pages = np.unique(page_of)
    # spans of nearby pages: reading a few pages no address needs is cheaper than a call
    breaks = np.flatnonzero(np.diff(pages) > GAP_PAGES) + 1
    for group in np.split(pages, breaks):
        first, last = int(group[0]), int(group[-1])
        while first <= last:
            count = min(RUN_PAGES, last - first + 1)
            lo, hi = np.searchsorted(page_of, [first, first + count])
            if lo < hi:
                try:
                    data = np.frombuffer(memory.read(first * PAGE, count * PAGE), np.uint8)
                except MemoryReadError:
                    data = None
                if data is not None:
                    base = (page_of[lo:hi] - first) * PAGE + offset[lo:hi]
                    got = data[base[:, None] + np.arange(VALUE_SIZE)]
                    value[rows[lo:hi]] = np.ascontiguousarray(got).view("<u8").ravel()
                    has_value[rows[lo:hi]] = True
            first += count
