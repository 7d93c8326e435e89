"""Who maps this frame: from a guest-physical address (or a host one) back to every address
space that reaches it.

Forward translation answers "where does this address go". The reverse is a search: for every
page-table root in the guest (the finder's list, KPTI pairs included, and every vCPU's CR3),
the leaves whose frame holds the address, as numpy columns (paging.leaf_arrays), and the table
pages each root walks through, which tells whether the frame is itself a page table. Every
4/5-level process table shares one kernel half, so that half is mapped once per distinct
kernel half, not once per process. From a host address: which QEMU process holds the frame
(its pagemap, reversed over each RAM region; several processes when KSM merged them), then as
from the GPA.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import finder
from .. import paging
from ..errors import QIError, UsageError
from ..memory.host import PAGE
from ..record import field, record

U64 = np.uint64


def _h(v: Optional[int]) -> Optional[str]:
    return None if v is None else f"{v:#x}"


@record
class Reach:
    """One virtual page that maps the frame."""
    root: int
    gva: int                  # the address of the queried byte in this address space
    page_size: int
    level: str                # the leaf's level (PT, PD, PDPT ...)
    writable: bool
    user: bool
    executable: bool
    half: str                 # "user" / "kernel" half of a 4/5-level space, or "all"
    roots: Tuple[int, ...] = ()   # every root that reaches it this way (a shared kernel half)
    # the guest processes whose roots these are, (pid, comm), when the guest kernel was read
    processes: Optional[Tuple[Tuple[int, str], ...]] = None

    def to_dict(self) -> dict:
        return {"root": _h(self.root), "gva": _h(self.gva), "page_size": self.page_size,
                "level": self.level, "writable": self.writable, "user": self.user,
                "executable": self.executable, "half": self.half,
                "roots": [_h(r) for r in self.roots],
                "processes": None if self.processes is None else
                [{"pid": p, "comm": c} for p, c in self.processes]}


@record
class TableUse:
    """The frame is a page-table page: of which root, at which level."""
    root: int
    level: str
    half: str
    roots: Tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"root": _h(self.root), "level": self.level, "half": self.half,
                "roots": [_h(r) for r in self.roots]}


@record
class Holder:
    """A QEMU process whose memory holds the host frame."""
    pid: int
    hva: int
    this_vm: bool
    gpa: Optional[int] = None
    ram_block: Optional[str] = None
    mapping: str = ""
    gpas: Tuple[int, ...] = ()      # every GPA at which the VM sees that HVA (aliases)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "hva": _h(self.hva), "this_vm": self.this_vm,
                "gpa": _h(self.gpa), "gpas": [_h(g) for g in self.gpas],
                "ram_block": self.ram_block, "mapping": self.mapping or None}


@record
class WhoMaps:
    gpa: Optional[int]
    query: dict
    ram_block: Optional[str] = None
    hva: Optional[int] = None
    hpa: Optional[int] = None
    reaches: List[Reach] = field(default_factory=list)
    tables: List[TableUse] = field(default_factory=list)
    holders: List[Holder] = field(default_factory=list)
    roots: List[int] = field(default_factory=list)
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    slat: Optional[dict] = None     # the hypervisor's second-level table: GPAs reaching the HPA

    @property
    def found(self) -> bool:
        return bool(self.reaches or self.tables or self.holders or (
            self.slat and (self.slat.get("maps") or self.slat.get("page_table_of"))))

    def to_dict(self) -> dict:
        out = {"query": self.query, "gpa": _h(self.gpa), "ram_block": self.ram_block,
               "hva": _h(self.hva), "hpa": _h(self.hpa),
               "mappings": [r.to_dict() for r in self.reaches],
               "page_table_of": [t.to_dict() for t in self.tables],
               "host_holders": [h.to_dict() for h in self.holders],
               "roots": [_h(r) for r in self.roots], "seconds": round(self.seconds, 4),
               "notes": self.notes}
        if self.slat is not None:
            out["slat"] = self.slat
        return out


# ---- the roots ---------------------------------------------------------------------------

def guest_roots(session, progress=None) -> Tuple[List[int], List[str]]:
    """Every page-table root qintrospect can find: each vCPU's, and (4/5-level paging,
    Sv39/48/57, or aarch64's TTBR0_EL1 tables) the finder's scan of guest RAM with KPTI
    copies paired."""
    notes: List[str] = []
    roots = []
    arch = paging.arch_of(session.cpu)
    for v in session.vcpu_info:
        root = v.table(0) if arch == "aarch64" else v.root
        if root not in roots:
            roots.append(root)
    mode = _mode(session.cpu) if arch != "aarch64" else None
    if arch == "aarch64" or (mode is not None and mode.name in SHARED_KERNEL_HALF):
        try:
            for c in finder.without_stage2(session, finder.scan(
                    session.memory, session.ram_map, session.cpu, progress,
                    finder.stage2_roots(session))):
                if c.root not in roots:
                    roots.append(c.root)
        except QIError as exc:
            notes.append(f"the finder could not scan for other roots: {exc}")
    else:
        notes.append(f"{mode.name if mode else 'no'} paging: only the vCPUs' own roots are "
                     "searched (other processes' roots are found in 4/5-level paging)")
    return roots, notes


# ---- guest-physical -> every mapping -------------------------------------------------------

def who_maps_gpa(session, gpa: int, roots: Optional[List[int]] = None,
                 progress=None) -> WhoMaps:
    t0 = time.perf_counter()
    result = WhoMaps(gpa, {"gpa": _h(gpa)})
    region = session.ram_map.ram_at(gpa)
    if region is not None:
        result.ram_block = region.block
        result.hva = region.hva_of(gpa)
        if result.hva is not None and session.process is not None:
            result.hpa = session.process.host_page(result.hva).hpa
    else:
        result.notes.append(session.ram_map.describe(gpa))
    if roots is None:
        roots, notes = guest_roots(session, progress)
        result.notes += notes
    result.roots = roots
    if paging.arch_of(session.cpu) == "aarch64":
        _search_arm64(session, roots, gpa, result)
        result.seconds = time.perf_counter() - t0
        return result
    mode = _mode(session.cpu)
    if mode is None:
        result.notes.append("paging is off: the GPA is the linear address")
        return result
    _search(session, mode, roots, gpa, result)
    result.seconds = time.perf_counter() - t0
    return result


# modes whose every process table holds the kernel's half (Linux copies it in)
SHARED_KERNEL_HALF = ("4-level", "5-level", "sv39", "sv48", "sv57")


def _mode(cpu):
    """The paging mode of an x86 or riscv64 vCPU (None: paging off)."""
    if paging.arch_of(cpu) == "riscv64":
        from ..paging.riscv_format import riscv_mode
        return riscv_mode(cpu)
    return paging.paging_mode(cpu)


def _halves(mode) -> List[Tuple[int, Optional[int], str]]:
    if mode.name in SHARED_KERNEL_HALF:
        half = 1 << (mode.va_bits - 1)
        return [(0, half, "user"), ((1 << 64) - half, None, "kernel")]
    return [(0, None, "all")]


def _search(session, mode, roots: List[int], gpa: int, result: WhoMaps) -> None:
    """Leaves and tables of every root; the kernel half once per distinct kernel half."""
    read = session.memory.read
    seen_kernel: Dict[bytes, int] = {}        # kernel-half entries -> the first root with them
    shared: Dict[int, List[int]] = {}         # that root -> every root sharing its kernel half
    for root in roots:
        for start, end, half in _halves(mode):
            key = None
            if half == "kernel":
                try:
                    key = read(root + 2048, 2048)
                except QIError:
                    key = None
                if key is not None and key in seen_kernel:
                    shared[seen_kernel[key]].append(root)
                    continue
                if key is not None:
                    seen_kernel[key] = root
                    shared[root] = [root]
            cpu = session.cpu_state(root)
            la = paging.leaf_arrays(read, cpu, start, end)
            _collect(la, mode, root, gpa, half, result)
    # a shared kernel half: every root that has it reaches the same pages the same way
    for r in result.reaches + result.tables:
        r.roots = tuple(shared.get(r.root, [r.root])) if r.half == "kernel" else (r.root,)


def _reaches(la, mode, root: int, gpa: int, half: str, result: WhoMaps) -> None:
    """The leaves whose frame holds gpa, as Reach records."""
    hit = np.flatnonzero((la.pa <= U64(gpa)) & (U64(gpa) < la.pa + la.size))
    for i in hit.tolist():
        result.reaches.append(Reach(
            root, int(la.va[i]) + (gpa - int(la.pa[i])), int(la.size[i]),
            mode.levels[int(la.level[i])].name, bool(la.writable[i]), bool(la.user[i]),
            bool(la.executable[i]), half))


def _collect(la, mode, root: int, gpa: int, half: str, result: WhoMaps) -> None:
    page = gpa - gpa % PAGE
    if half != "kernel" and page == root:
        result.tables.append(TableUse(root, mode.levels[0].name, half))
    if not len(la):
        return
    _reaches(la, mode, root, gpa, half, result)
    # the tables below the root: what every non-leaf entry on a leaf's path points to
    fmt = la.format
    for k in range(len(mode.levels) - 1):
        rows = la.level > k
        if not rows.any():
            continue
        if hasattr(fmt, "table_addr"):
            tables = la.path[rows, k] & U64(fmt.table_addr[k])
        else:                                   # riscv64: PPN[53:10] << 12
            tables = ((la.path[rows, k] >> U64(10)) & U64((1 << 44) - 1)) << U64(12)
        if (tables == U64(page)).any():
            result.tables.append(TableUse(root, mode.levels[k + 1].name, half))


def _search_arm64(session, roots: List[int], gpa: int, result: WhoMaps) -> None:
    """aarch64: each root as TTBR0_EL1 (the processes' range), and TTBR1_EL1's range (the
    kernel's, every process's) once."""
    from ..paging.arm64_format import SCTLR_M, range_params, ttbr_base
    cpu = session.cpu
    if not cpu.sctlr & SCTLR_M:
        result.notes.append("the MMU is off (SCTLR_EL1.M=0): the GPA is the virtual address")
        return
    read = session.memory.read
    low, high = range_params(cpu, 0), range_params(cpu, 1)
    kernel = ttbr_base(high)
    la = paging.leaf_arrays(read, cpu, (1 << 64) - (1 << high.mode.va_bits), None)
    _collect_arm64(la, kernel, gpa, "kernel", result)
    for root in roots:
        state = paging.with_root(cpu, root)
        la = paging.leaf_arrays(read, state, 0, 1 << low.mode.va_bits)
        _collect_arm64(la, root, gpa, "user", result)
    for r in result.reaches + result.tables:
        r.roots = (r.root,)


def _collect_arm64(la, root: int, gpa: int, half: str, result: WhoMaps) -> None:
    """Leaves of one range holding gpa, and whether gpa's granule is one of its tables."""
    if la.format is None:
        return
    select = 1 if half == "kernel" else 0
    fmt, mode = la.format.formats[select], la.modes[select]
    if fmt is None:
        return
    granule = 1 << fmt.p.granule
    table = gpa - gpa % granule
    if table == root - root % granule:
        result.tables.append(TableUse(root, mode.levels[0].name, half))
    if not len(la):
        return
    _reaches(la, mode, root, gpa, half, result)
    for k in range(len(mode.levels) - 1):       # the tables below the root
        entries = np.unique(la.path[la.level > k, k]).tolist()
        if any(fmt.frame(k, e, False) == table for e in entries):
            result.tables.append(TableUse(root, mode.levels[k + 1].name, half))


# ---- host-physical -> the QEMU processes and GPAs that hold it -------------------------------

def qemu_pids() -> List[int]:
    """Local processes whose executable is a qemu-system-* binary."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    exe = os.path.basename(f.read().split(b"\0", 1)[0].decode(errors="replace"))
            except OSError:
                continue
        if exe.startswith("qemu-system-"):
            out.append(int(pid))
    return sorted(out)


MIN_RAM_VMA = 16 << 20   # guest RAM mappings are large; QEMU's own heaps and libraries are not


def holders_of(hpa: int, session=None) -> Tuple[List[Holder], List[str]]:
    """Every local QEMU process that maps host frame hpa, with the HVA (and, for the attached
    VM, the GPA and RAM block). Reads each process's pagemap over its large mappings."""
    from ..memory.host import HostProcess
    frame = hpa >> 12
    holders, notes = [], []
    this = session.process.pid if session is not None and session.process else None
    for pid in qemu_pids():
        proc = session.process if pid == this else HostProcess(pid)
        try:
            vmas = [v for v in proc.vmas() if v.end - v.start >= MIN_RAM_VMA]
            for v in vmas:
                for first in range(v.start, v.end, 1 << 30):
                    n = (min(v.end, first + (1 << 30)) - first) // PAGE
                    e = np.array(proc.pagemap_entries(first, n), U64)
                    present = (e >> U64(63)) == 1
                    for k in np.flatnonzero(present & ((e & U64((1 << 55) - 1)) == U64(frame))):
                        hva = first + int(k) * PAGE + hpa % PAGE
                        h = Holder(pid, hva, pid == this, mapping=v.describe())
                        if pid == this:
                            _gpa_of(session, h)
                        holders.append(h)
        except OSError as exc:
            notes.append(f"QEMU pid {pid}: pagemap not readable ({exc.strerror or exc})")
        finally:
            if proc is not (session.process if session is not None else None):
                proc.close()
    if not holders:
        notes.append(f"no local QEMU process maps host frame {frame:#x} now (frame numbers "
                     "need root; a page not present in QEMU's page table has no frame)")
    return holders, notes


def _gpa_of(session, h: Holder) -> None:
    """The GPAs at which the VM sees h's HVA: one RAM block can be mapped at several (the
    BIOS at 0xe0000 as isa-bios and below 4 GiB as pc.bios), each is listed."""
    found = [(r.start + (h.hva - r.hva), r.block) for r in session.ram_map.ram
             if r.hva is not None and r.hva <= h.hva <= r.hva + (r.end - r.start)]
    if found:
        h.gpa, h.ram_block = found[0]
        h.gpas = tuple(g for g, _ in found)


def gpas_of_hva(session, hva: int) -> List[int]:
    """Every GPA of this VM at which QEMU's HVA `hva` appears (UsageError: none)."""
    h = Holder(0, hva, True)
    _gpa_of(session, h)
    if not h.gpas:
        raise UsageError(f"HVA {hva:#x} is in none of this VM's RAM blocks (QEMU pid "
                         f"{session.process.pid if session.process else '?'})")
    return list(h.gpas)


def who_maps(session, gpa: Optional[int] = None, hva: Optional[int] = None,
             hpa: Optional[int] = None, progress=None, slat_spec=None,
             roots: Optional[List[int]] = None) -> List[WhoMaps]:
    """One WhoMaps per guest-physical address the query names (a host frame may be held at
    several GPAs, or by no RAM of this VM). With slat_spec (a KVM host), the second-level
    table too: the GPAs whose leaf holds the host frame, and whether the frame is one of the
    table's own pages. roots: search only these (one guest process's), not every root
    found."""
    session.require_one_stage("who-maps")
    given = [(k, v) for k, v in (("gpa", gpa), ("hva", hva), ("hpa", hpa)) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --gpa, --hva, --hpa")
    kind, address = given[0]
    holders, notes = [], []
    if kind == "hpa":
        holders, notes = holders_of(address, session)
        gpas = sorted({g for h in holders if h.this_vm for g in h.gpas})
    elif kind == "hva":
        gpas = gpas_of_hva(session, address)
    else:
        gpas = [address]
    if roots is None:
        roots, root_notes = guest_roots(session, progress)
    else:
        root_notes = [f"only the roots {', '.join(_h(r) for r in roots)} are searched"]
    results = []
    for g in gpas:
        w = who_maps_gpa(session, g, roots)
        w.notes = root_notes + w.notes
        results.append(w)
    if not results:      # a host frame this VM does not hold
        results.append(WhoMaps(None, {}, roots=roots))
    for w in results:
        w.query = {kind: f"{address:#x}"}
        if kind == "hpa":
            w.hpa, w.holders, w.notes = address, holders, notes + w.notes
    if slat_spec is not None:
        _second_level(session, results, slat_spec, progress)
    return results


def _second_level(session, results: List[WhoMaps], spec, progress) -> None:
    from .. import slat
    second = session.second_level(spec, (), progress)
    for w in results:
        if second.spec is None:
            w.slat = {"root": None, "how": second.how, "note": second.how.get("note")}
            continue
        info = {"how": second.how}
        if w.hpa is None:
            info.update(format=second.spec.format, root=_h(second.spec.root), maps=[],
                        page_table_of=[],
                        note="no host physical address to look for (the page is not present "
                             "on the host, or frame numbers are hidden: run as root)")
        else:
            info.update(slat.reverse(second.memory.read, second.spec, w.hpa)
                        .to_dict(second.spec))
        w.slat = info


def text(w: WhoMaps) -> str:
    lines = []
    head = ", ".join(f"{k} {v}" for k, v in w.query.items())
    lines.append(f"who maps {head}: GPA {_h(w.gpa)} (RAM block {w.ram_block or '-'}, HVA "
                 f"{_h(w.hva) or '-'}, HPA {_h(w.hpa) or '-'})")
    for h in w.holders:
        where = (f"this VM, GPA {', '.join(_h(g) for g in h.gpas) or '-'} ({h.ram_block})"
                 if h.this_vm else "another QEMU (GPA needs that VM's QMP)")
        lines.append(f"  held by QEMU pid {h.pid} at HVA {_h(h.hva)}: {where}; {h.mapping}")
    lines.append(f"  {len(w.reaches)} mapping(s) over {len(w.roots)} page-table root(s), "
                 f"{w.seconds * 1000:.0f} ms")
    for r in w.reaches:
        perms = "r" + ("w" if r.writable else "-") + ("x" if r.executable else "-")
        who = "user" if r.user else "kernel"
        many = f"  (and {len(r.roots) - 1} more root(s) sharing the kernel half)" \
            if len(r.roots) > 1 else ""
        names = ""
        if r.processes:
            shown = ", ".join(f"{p} ({c})" for p, c in r.processes[:8])
            more = f" and {len(r.processes) - 8} more" if len(r.processes) > 8 else ""
            names = f"  pid {shown}{more}"
        lines.append(f"    GVA {r.gva:#018x}  root {r.root:#x}  {r.level:<4} "
                     f"{paging.formats.size_name(r.page_size):>6}  {perms} {who}{many}"
                     f"{names}")
    for t in w.tables:
        many = f" (shared by {len(t.roots)} roots)" if len(t.roots) > 1 else ""
        lines.append(f"  it is a page-table page: {t.level} table of root {t.root:#x}{many}")
    if w.slat is not None:
        s = w.slat
        kind = (s.get("format") or "second-level").upper()
        if s.get("root") is None:
            lines.append(f"  {kind}: no table found ({s.get('note')})")
        else:
            for m in s.get("maps", []):
                lines.append(f"    GPA {int(m['gpa'], 16):#018x}  {kind} root {s['root']}  "
                             f"{m['level']:<4} {paging.formats.size_name(m['page_size']):>6}")
            for level in s.get("page_table_of", []):
                lines.append(f"  it is a page of the {kind} itself: {level} table of root "
                             f"{s['root']}")
            if s.get("note"):
                lines.append(f"  {kind}: {s['note']}")
    lines += [f"  note: {n}" for n in w.notes]
    return "\n".join(lines)
