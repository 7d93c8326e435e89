"""Many addresses at once, the whole chain, as arrays: GVA -> GPA -> HVA -> HPA + value.

translate() builds a Translation with every level, flag and access rule for one address.
For 100,000 addresses that detail costs more than the answer, so a batch walks with
paging.walk_array and finishes on the host with arrays too: the RAM region of every GPA by
one searchsorted, the host pagemap of each RAM region read once, and the 8 bytes at every
address gathered from the pages they lie in, read once each in runs. BatchTranslation.walk(i)
gives the full scalar walk of any one element when its levels are wanted.
"""

import itertools
import json
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from . import paging
from .errors import MemoryReadError
from .host import (HOST_NOT_PRESENT, HOST_PFN_HIDDEN, HOST_PRESENT, HOST_STATUS, HOST_UNKNOWN,
                   PAGE, pagemap_arrays)
from .memory import DirectMemory
from .paging.walker import present_step
from .paging.x86 import cr3_root, x86_format

VALUE_SIZE = 8
RUN_PAGES = 1024   # data pages read per call: bounded memory (4 MiB) whatever the batch
GAP_PAGES = 64     # pages apart that are still read in one call
U64 = np.uint64


@dataclass
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

    def __len__(self) -> int:
        return len(self.walk_result)

    @property
    def ok(self) -> np.ndarray:
        return self.walk_result.ok

    @property
    def gpa(self) -> np.ndarray:
        return self.walk_result.pa

    def to_dicts(self) -> Iterator[dict]:
        """One JSON-ready dict per address: the chain's summary keys (no levels), or the
        fault. Addresses and values are "0x..." strings."""
        w = self.walk_result
        h = lambda v: f"{int(v):#x}"  # noqa: E731
        for i in range(len(w)):
            if not w.ok[i]:
                yield {"gva": h(w.va[i]), "fault": {"level": w.level_name(i),
                                                     "reason": w.reason(i)}}
                continue
            status = HOST_STATUS[self.host_status[i]] or None
            yield {"gva": h(w.va[i]), "gpa": h(w.pa[i]), "page_size": int(w.page_size[i]),
                   "ram_block": self.ram_blocks[self.region[i]] if self.region[i] >= 0 else None,
                   "hva": h(self.hva[i]) if self.has_hva[i] else None,
                   "hpa": h(self.hpa[i]) if status == "present" else None,
                   "host": status,
                   "writable": bool(w.writable[i]), "user": bool(w.user[i]),
                   "executable": bool(w.executable[i]),
                   "value": h(self.value[i]) if self.has_value[i] else None}

    def walk(self, i: int, session) -> paging.Walk:
        """The full scalar walk (levels, flags, access rules) of element i."""
        return paging.walk(session.memory.read, session.cpu_state(self.cr3),
                           int(self.walk_result.va[i]))

    cr3: Optional[int] = None   # the root asked for (None: the vCPU's)


def translate_batch(session, addresses, cr3: Optional[int] = None) -> BatchTranslation:
    cpu = session.cpu_state(cr3)
    # walk_array reads each table it needs once per call: no page cache needed in front
    w = paging.walk_array(session.memory.read, cpu, addresses)
    ram = session.ram_map.ram
    n = len(w)
    region = np.full(n, -1, dtype=np.int32)
    hva = np.zeros(n, dtype=U64)
    has_hva = np.zeros(n, dtype=bool)
    hpa = np.zeros(n, dtype=U64)
    status = np.zeros(n, dtype=np.uint8)
    value = np.zeros(n, dtype=U64)
    has_value = np.zeros(n, dtype=bool)

    if ram and n:
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
                    status[sel], hpa[sel] = pagemap_arrays(session.process, hva[sel])
                except OSError:
                    status[sel] = HOST_UNKNOWN
        if isinstance(session.memory, DirectMemory):
            _values_direct(session, w, region, hva, status, value, has_value, cr3)
        else:
            _values(session, session.memory, w, region, value, has_value, cr3)
    return BatchTranslation(w, region, hva, has_hva, hpa, status, value, has_value,
                            tuple(r.block for r in ram), cr3)


def _values_direct(session, w, region, hva, status, value, has_value, cr3) -> None:
    """The direct path: exactly the 8 bytes of each address, IOV_MAX of them per
    process_vm_readv call, for pages present in QEMU's page table. An absent page is zeros
    only where that is proven (HostProcess.zero_if_absent); every other address (swapped or
    file-backed pages, values that run into the next virtual page, an unreadable pagemap)
    takes the exact one-address path, which reads the bytes wherever they are."""
    offset_all = (hva % U64(PAGE)).astype(np.int64)
    within = (region >= 0) & (offset_all <= PAGE - VALUE_SIZE)
    absent = np.flatnonzero(within & (status == HOST_NOT_PRESENT))
    if len(absent):
        zero = session.process.zero_if_absent((hva[absent] // U64(PAGE)).astype(np.int64))
        value[absent[zero]] = 0
        has_value[absent[zero]] = True
    sel = np.flatnonzero(within & ((status == HOST_PRESENT) | (status == HOST_PFN_HIDDEN)))
    if len(sel):
        value[sel] = np.frombuffer(session.process.read_many(hva[sel], VALUE_SIZE), "<u8")
        has_value[sel] = True
    for i in np.flatnonzero((region >= 0) & ~has_value).tolist():
        t = session.translate(int(w.va[i]), cr3)
        if t.value is not None and len(t.value) == VALUE_SIZE:
            value[i] = int.from_bytes(t.value, "little")
            has_value[i] = True


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


# ---- translate --json for many addresses -------------------------------------------------

JSON_CHUNK = 65536
JSON_MIN = 32


def json_lines(session, addresses, cr3: Optional[int] = None,
               kvm: Optional[dict] = None) -> Iterator[Tuple[bool, str]]:
    """(translated?, line) for each address: exactly the line the one-address path prints,
    json_line(session.translate(a, cr3).to_dict()) (every level, flag and access rule), made
    from the vectorized walk and the batch's host columns. What repeats across addresses is made
    once: a level's entry, and an access table with its notes per "shape" (the rights and key
    bits on the path), taken from a scalar walk of the first address with that shape. Addresses
    the arrays do not cover exactly (faults, GPAs outside RAM, values across pages, memory
    read through gdb or QMP) take the one-address path."""
    from .render import json_line
    it = iter(addresses)
    while True:
        chunk = list(itertools.islice(it, JSON_CHUNK))
        if not chunk:
            return
        if len(chunk) < JSON_MIN:    # a few addresses: arrays would cost more than they save
            for va in chunk:
                t = session.translate(va, cr3)
                t.kvm = kvm
                yield t.ok, json_line(t.to_dict())
            continue
        yield from _json_chunk(session, chunk, cr3, kvm, json_line)


def _json_chunk(session, chunk, cr3, kvm, json_line):
    def scalar(va):
        t = session.translate(va, cr3)
        t.kvm = kvm
        return t.ok, json_line(t.to_dict())

    cpu = session.cpu_state(cr3)
    mode = paging.paging_mode(cpu)
    if mode is None or not isinstance(session.memory, DirectMemory) or session.process is None:
        for va in chunk:
            yield scalar(va)
        return
    b = translate_batch(session, chunk, cr3)
    w = b.walk_result
    fmt = x86_format(cpu, mode)
    root, pcid = cr3_root(cpu, mode)
    # The line is assembled from pieces serialized once each (json_line's compact form, keys in
    # Translation.to_dict's order): the test holds it to json_line(translate(a).to_dict()).
    head = _frag({"vcpu": session.vcpu, "cr3": _hex(cpu.cr3),
                  "cr3_source": "vcpu" if cr3 is None else "given", "root": _hex(root),
                  "pcid": _hex(pcid), "mode": mode.name})
    tail = ',"memory_path":' + json.dumps(session.memory.name)
    kvm_part = ',"kvm":' + json_line(kvm) if kvm is not None else ""
    pid = json.dumps(session.process.pid)
    shape_mask = RW_US_PS_XD_PK | (1 << 5 if mode.name == "pae" else 0)
    steps: Dict[tuple, str] = {}
    shapes: Dict[tuple, Optional[tuple]] = {}
    pages: Dict[int, tuple] = {}
    blocks: Dict[int, str] = {}
    ram = session.ram_map.ram
    columns = (w.va, w.ok, w.pa, w.page_size, w.writable, w.user, w.executable, w.leaf_level,
               b.region, b.hva, b.host_status, b.value, b.has_value)
    entries, tables = w.entries.tolist(), w.tables.tolist()
    for i, (va, ok, pa, psize, wr, us, ex, leaf, reg, hva, status, value, has_value) in \
            enumerate(zip(*(c.tolist() for c in columns))):
        if not ok or reg < 0 or not has_value or hva % PAGE > PAGE - VALUE_SIZE \
                or ram[reg].hva is None:
            yield scalar(va)
            continue
        path = entries[i][:leaf + 1]
        key = (leaf, tuple(e & shape_mask for e in path),
               (va >> 30) & 3 if mode.name == "pae" else None)
        shape = shapes.get(key, ())
        if shape == ():
            shape = shapes[key] = _shape(session, cpu, va, pa)
        if shape is None:                     # the scalar walk disagrees: take it whole
            yield scalar(va)
            continue
        levels = []
        for k in range(leaf + 1):
            table, entry = tables[i][k], path[k]
            index = (va >> mode.levels[k].shift) & ((1 << mode.levels[k].index_bits) - 1)
            sk = (k, table, index, entry)
            step = steps.get(sk)
            if step is None:
                step = steps[sk] = json_line(
                    present_step(mode, fmt, k, table, index, entry).to_dict())
            levels.append(step)
        block = blocks.get(reg)
        if block is None:
            block = blocks[reg] = json.dumps(ram[reg].block)
        region = ram[reg]
        hpa, host = _host(session.process, pages, hva)
        present = HOST_STATUS[status] in ("present", "pfn-hidden")
        v = f'"{value:#x}"'
        psz = str(psize)
        yield True, "".join((
            '{"gva":"', f"{va:#x}", '",', head, ',"levels":[', ",".join(levels),
            '],"page_size":', psz, ',"gpa":"', f"{pa:#x}", '","ram_block":', block,
            ',"ram_block_offset":"', f"{region.block_offset + (pa - region.start):#x}",
            '","gpa_note":null,"hva":"', f"{hva:#x}", '","qemu_pid":', pid,
            ',"hpa":', hpa, host, ',"writable":', _BOOL[wr], ',"user":', _BOOL[us],
            ',"executable":', _BOOL[ex], ',"access":', shape[0],
            ',"value":', v, ',"value_bytes":"', value.to_bytes(VALUE_SIZE, "little").hex(),
            '","value_at_hva":', v if present else "null",
            ',"value_matches":', "true" if present else "null", ',"value_note":null',
            shape[1], tail, ',"guest_page_size":', psz, ',"slat_page_size":null',
            kvm_part, "}"))


_BOOL = {True: "true", False: "false"}


def _frag(d: dict) -> str:
    """A dict's members as json_line writes them, without the braces."""
    from .render import json_line
    return json_line(d)[1:-1]


RW_US_PS_XD_PK = 0x2 | 0x4 | 0x80 | (1 << 63) | (0xF << 59)


def _shape(session, cpu, va, pa):
    """The serialized access table and (MAXPHYADDR, assumed?, notes) members of the scalar walk
    of va, shared by every address whose path has the same rights and key bits; None if that
    walk does not agree."""
    from .render import json_line
    walk = paging.walk(session.memory.read, cpu, va)
    if not walk.ok or walk.pa != pa:
        return None
    access = json_line({k: r.to_dict() for k, r in walk.access.items()})
    rest = "," + _frag({"maxphyaddr": walk.maxphyaddr,
                        "assumed_maxphyaddr": walk.assumed_maxphyaddr,
                        "notes": list(walk.notes)})
    return access, rest


def _host(process, pages, hva):
    """(the "hpa" value, the rest: host_page_size and host) of hva's HostPage, serialized; the
    pagemap and page size are read once per host page, and pages alike but for their frame
    share one serialized form."""
    base = hva - hva % PAGE
    page = pages.get(base)
    if page is None:
        hp = process.host_page(base)
        form = (hp.status, hp.page_size, hp.page_kind, hp.detail, hp.flags)
        parts = pages.get(form)
        if parts is None:
            d = hp.to_dict()
            parts = pages[form] = (
                ',"host_page_size":' + json.dumps(d["page_size"]) + ',"host":{"status":'
                + json.dumps(d["status"]) + ',"hpa":',
                "," + _frag({k: d[k] for k in ("page_size", "page_kind", "detail", "flags")})
                + "}")
        page = pages[base] = (hp.hpa, parts[0], parts[1])
    hpa, before, after = page
    text = "null" if hpa is None else f'"{hpa + hva % PAGE:#x}"'
    return text, before + text + after


def _hex(v):
    return None if v is None else f"{v:#x}"
