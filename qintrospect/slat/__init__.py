"""The second-level table: EPT (Intel) or NPT (AMD), the map a hypervisor builds from its
guest's physical addresses to its own. Walked, and found without being told.

KVM names the table's root nowhere a user can read it. But the table lies in the host's
physical memory, and its walk of a guest-physical address must end at the host page that
already holds that address's bytes, which the pagemap path names (RAM block, HVA, pagemap).
So the root is found the way find-cr3 finds a process's table, keyed by value: one pass over
host memory takes, from every page, the entries at the index each level would use for the
first probe address; tables that lead down to the probe's host frame are chained bottom-up
to their roots (numpy joins, no per-page Python), and every candidate root is then walked for
all the probes. The walks themselves are paging.walk_npt / walk_ept.
"""

from __future__ import annotations

import time
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .. import paging
from ..errors import UsageError
from ..paging.formats import ADDR_51_12, MEMORY_TYPES
from ..record import record

PAGE = 4096
U64 = np.uint64
SHIFTS = (48, 39, 30, 21, 12)              # PML5 .. PT
FORMATS = ("npt", "ept")
EPT_WB_4LEVEL = 6 | (3 << 3)               # EPTP low bits KVM uses: WB, walk length 4
EPT_LEVEL_NAMES = {"PML5": "PML5E", "PML4": "PML4E", "PDPT": "PDPTE", "PD": "PDE", "PT": "PTE"}

Probe = Tuple[int, int]                    # (guest-physical address, host address holding it)


@record(frozen=True)
class SlatSpec:
    """What --slat says: find the table (auto: from KVM's own vCPUs, else by a scan; or
    only one of the two ways: `source`), or walk this one (format, root, depth)."""
    format: Optional[str] = None           # "npt" | "ept" | None (to be found)
    root: Optional[int] = None             # nCR3 / EPT root (table base)
    depth: int = 4
    eptp: Optional[int] = None             # the EPTP (ept only)
    source: str = "auto"                   # to find it: "auto" (kvm, then scan), "kvm", "scan"

    @property
    def auto(self) -> bool:
        return self.root is None


SOURCES = ("auto", "kvm", "scan")


def parse_slat(text: str) -> SlatSpec:
    """'auto' (KVM's own vCPUs, else a scan), 'kvm' or 'scan' (only that way), 'npt:HEX'
    (nCR3: the table's base; 5-level with npt5:HEX) or 'ept:HEX' (an EPTP, whose bits 5:3
    give the walk length; a bare page address means WB, 4 levels)."""
    text = (text or "").strip().lower()
    if text in SOURCES:
        return SlatSpec(source=text)
    kind, sep, value = text.partition(":")
    if not sep or kind not in ("npt", "npt5", "ept") or not value.startswith("0x"):
        raise UsageError(f"--slat {text[:64]!r}: expected auto, kvm, scan, npt:0xROOT, "
                         "npt5:0xROOT or ept:0xEPTP")
    try:
        number = int(value, 16)
    except ValueError:
        raise UsageError(f"--slat {text!r}: {value!r} is not a hex number") from None
    if kind == "ept":
        eptp = number if number & 0xFFF else number | EPT_WB_4LEVEL
        info = paging.decode_eptp(eptp)
        if not info["valid"]:
            raise UsageError(f"--slat {text!r}: not a valid EPTP: {'; '.join(info['problems'])}")
        return SlatSpec("ept", info["root"], info["walk_length"], eptp)
    if number & ~ADDR_51_12:
        raise UsageError(f"--slat {text!r}: an nCR3 is a page address (bits 11:0 and 63:52 "
                         "clear)")
    return SlatSpec("npt", number, 5 if kind == "npt5" else 4)


def walk(read_phys, spec: SlatSpec, gpa: int, maxphyaddr: int = 52,
         page1gb: Optional[bool] = None) -> paging.Walk:
    """The second-level walk of one guest-physical address."""
    if spec.format == "ept":
        return paging.walk_ept(read_phys, spec.eptp, gpa, maxphyaddr, page1gb=page1gb)
    return paging.walk_npt(read_phys, spec.root, gpa, spec.depth, maxphyaddr, page1gb=page1gb)


def walk_batch(read_phys, spec: SlatSpec, gpas, maxphyaddr: int = 52,
               page1gb: Optional[bool] = None) -> "paging.BatchWalk":
    """walk() for many guest-physical addresses at once, as arrays (paging.vector): each
    table read once, whole; the same answers, element by element."""
    from ..paging import vector
    from ..paging.ept import ept_format, npt_format
    if spec.format == "ept":
        info = paging.decode_eptp(spec.eptp, maxphyaddr)
        mode = paging.MODE_EPT5 if info["walk_length"] == 5 else paging.MODE_EPT4
        if info["problems"]:            # walk_ept: VM entry would fail, no level is read
            return vector.all_faulted(gpas, vector.FAULT_EPT_MISCONFIGURATION, mode,
                                      info["root"])
        fmt = ept_format(mode, maxphyaddr, False, page1gb)
        root = info["root"]
    else:
        mode = paging.MODE_NPT5 if spec.depth == 5 else paging.MODE_NPT4
        fmt, root = npt_format(mode, maxphyaddr, True, page1gb), spec.root & ADDR_51_12
    return vector.walk_second_level_array(read_phys, mode, fmt, root, gpas)


# ---- finding the root ----------------------------------------------------------------------

def _present(fmt: str, e: np.ndarray) -> np.ndarray:
    return (e & U64(7 if fmt == "ept" else 1)) != 0


def _large(e: np.ndarray) -> np.ndarray:
    return (e & U64(1 << 7)) != 0


@record
class _Gathered:
    """From every scanned page: its address and its entries at the probe's index per level
    (columns in SHIFTS order); only pages with a non-zero entry at one of them are kept."""
    page: np.ndarray      # uint64 (N,)
    words: np.ndarray     # uint64 (N, 5)


def gather(chunks: Iterable[Tuple[int, bytes]], gpa: int, progress=None) -> _Gathered:
    """One pass over (base address, bytes) chunks of host memory (page-aligned)."""
    slots = np.array([(gpa >> s) & 511 for s in SHIFTS], np.int64)
    pages, words = [], []
    for base, data in chunks:
        q = np.frombuffer(data, "<u8")
        n = len(q) // 512
        if not n:
            continue
        w = q[:n * 512].reshape(n, 512)[:, slots]
        keep = np.flatnonzero(w.any(axis=1))
        if len(keep):
            pages.append(U64(base) + keep.astype(U64) * U64(PAGE))
            words.append(w[keep])
        if progress is not None:
            progress.advance(len(data))
    if not pages:
        return _Gathered(np.zeros(0, U64), np.zeros((0, 5), U64))
    return _Gathered(np.concatenate(pages), np.concatenate(words))


def candidate_roots(g: _Gathered, fmt: str, depth: int, pa: int) -> np.ndarray:
    """Table pages that lead down to host address `pa` through the probe's indexes, chained
    bottom-up; those at the top level are the candidate roots."""
    cols = list(range(5 - depth, 5))           # the columns of this depth, top first
    tables = np.zeros(0, U64)                  # candidates one level down
    for level, col in enumerate(reversed(cols)):
        e = g.words[:, col]
        shift = SHIFTS[col]
        ok = _present(fmt, e)
        if shift == 12:                        # PT: a 4 KiB leaf on pa's frame
            hit = ok & ((e & U64(ADDR_51_12)) == U64(pa & ADDR_51_12))
        else:
            down = ok & ~_large(e) & np.isin(e & U64(ADDR_51_12), tables)
            hit = down
            if shift in (21, 30):              # PD / PDPT: a 2 MiB / 1 GiB leaf on pa
                frame = ADDR_51_12 & ~((1 << shift) - 1)
                hit = down | (ok & _large(e) & ((e & U64(frame)) == U64(pa & frame)))
        tables = np.unique(g.page[hit])
    return tables


@record
class Found:
    """A root the scan proposes, with how well it agrees with the probes."""
    spec: SlatSpec
    agree: int
    probes: int

    def to_dict(self) -> dict:
        return {"format": self.spec.format, "depth": self.spec.depth,
                "root": f"{self.spec.root:#x}", "probes_agreeing": self.agree,
                "probes": self.probes}


def find_roots(chunks, read_phys, probes: Sequence[Probe], formats=FORMATS,
               progress=None) -> Tuple[List[Found], dict]:
    """The second-level roots in host memory that take probes[0]'s guest-physical address to
    its host address, each walked for every probe; best first (formats: the host CPU's kind
    first, "npt" on AMD, "ept" on Intel). Also how the search went."""
    if not probes:
        raise ValueError("find_roots needs at least one (gpa, host address) probe")
    t0 = time.perf_counter()
    g = gather(chunks, probes[0][0], progress)
    scanned = time.perf_counter() - t0
    found: List[Found] = []
    for fmt in formats:
        roots5 = candidate_roots(g, fmt, 5, probes[0][1])
        # the PML4 table under a 5-level root walks like a 4-level root for every address
        # below 2**48: it is that root's child, not a root of its own
        children = _children(read_phys, roots5, probes[0][0]) if len(roots5) else set()
        for depth, roots in ((4, candidate_roots(g, fmt, 4, probes[0][1])), (5, roots5)):
            for root in roots.tolist():
                if depth == 4 and root in children:
                    continue
                spec = (SlatSpec("ept", root, depth, root | 6 | ((depth - 1) << 3))
                        if fmt == "ept" else SlatSpec("npt", root, depth))
                agree = sum(1 for gpa, pa in probes if _reaches(read_phys, spec, gpa, pa))
                if agree:
                    found.append(Found(spec, agree, len(probes)))
    # Entries with bits 2:0 = 7 and nothing in 5:3 read the same as NPT (P, R/W, U/S) and as
    # EPT (R, W, X, memory type UC): where both fit equally, the host CPU's kind (formats[0])
    # decides, and `how` lists the other
    found.sort(key=lambda f: (-f.agree, formats.index(f.spec.format), f.spec.depth,
                              f.spec.root))
    how = {"pages_with_entries": int(len(g.page)), "scan_seconds": round(scanned, 4),
           "seconds": round(time.perf_counter() - t0, 4),
           "candidates": [f.to_dict() for f in found[:8]]}
    return found, how


def _tied(found: List[Found]) -> List[Found]:
    """The distinct roots that share the best agreement (found is best first). One root read
    both as NPT and as EPT is one table: the format ranked first (the host CPU's) stands."""
    roots, out = set(), []
    for f in found:
        if f.agree != found[0].agree:
            break
        if f.spec.root not in roots:
            roots.add(f.spec.root)
            out.append(f)
    return out


def _children(read_phys, roots5: np.ndarray, gpa: int) -> set:
    """The PML4 tables the PML5 entries used for gpa point to."""
    out = set()
    for root in roots5.tolist():
        e = int.from_bytes(read_phys(root + 8 * ((gpa >> 48) & 511), 8), "little")
        out.add(e & ADDR_51_12)
    return out


def _reaches(read_phys, spec: SlatSpec, gpa: int, pa: int) -> bool:
    w = walk(read_phys, spec, gpa)
    return w.ok and w.pa == pa


def agreement(read_phys, spec: SlatSpec, probes: Sequence[Probe]) -> Tuple[int, int]:
    """(probes the table takes to the pagemap path's host address, probes it takes
    elsewhere): a root read from KVM is held to the same evidence as one found by the scan."""
    agree = disagree = 0
    for gpa, pa in probes:
        if pa is None:
            continue
        w = walk(read_phys, spec, gpa)
        if w.ok:
            agree += w.pa == pa
            disagree += w.pa != pa
    return agree, disagree


def found_how(how: dict) -> str:
    """How the root came to be, in words, for a view's heading."""
    method, seconds = how.get("method"), how.get("seconds")
    took = f" in {seconds:.2f} s" if isinstance(seconds, (int, float)) else ""
    if method == "kvm-vcpu":
        return f", read from KVM's vCPU {how.get('vcpu')}{took}"
    if method == "scan":
        fell = " (KVM's vCPUs could not be read)" if how.get("fell_back") else ""
        return f", found by a scan of host memory{took}{fell}"
    return " (given)"


# ---- what an entry says --------------------------------------------------------------------

# Bits the CPU ignores that KVM keeps for itself in its own tables (arch/x86/kvm/mmu/spte.h,
# Linux 5.13 to 6.x): named for a reader, never used to decide anything.
KVM_SOFTWARE_BITS = {"ept": {11: "MMU-present", 57: "host-writable", 58: "MMU-writable"},
                     "npt": {9: "host-writable", 10: "MMU-writable", 11: "MMU-present"}}
KVM_EPT_AD = {1: "A/D off (KVM tracks accesses by faults)", 2: "write-tracked by faults"}


def entry_fields(fmt: str, entry: int, leaf: bool) -> str:
    """An EPT or NPT entry's fields in words: the rights, memory type and A/D the CPU reads,
    then the bits KVM keeps for itself."""
    bit = lambda n: entry >> n & 1                                    # noqa: E731
    if fmt == "ept":
        words = [f"R={bit(0)} W={bit(1)} X={bit(2)} user-X={bit(10)}"]
        if leaf:
            mt = entry >> 3 & 7
            words.append(f"memtype={mt} ({MEMORY_TYPES.get(mt, 'reserved')}) "
                         f"ignore-PAT={bit(6)}")
        words.append(f"A={bit(8)}" + (f" D={bit(9)}" if leaf else ""))
        ad = KVM_EPT_AD.get(entry >> 52 & 3) if leaf else None
    else:
        words = [f"P={bit(0)} RW={bit(1)} US={bit(2)} PWT={bit(3)} PCD={bit(4)} A={bit(5)}"
                 + (f" D={bit(6)} G={bit(8)}" if leaf else "") + f" NX={bit(63)}"]
        ad = None
    kvm = [f"{name} ({n})" for n, name in KVM_SOFTWARE_BITS[fmt].items() if bit(n)]
    if ad:
        kvm.append(ad)
    if kvm:
        words.append("KVM: " + ", ".join(kvm))
    return "; ".join(words)


# KVM's MMIO markers: the fault each stops a walk with, and what it is in words
_MARKER_FAULT = {"ept": "ept-misconfiguration", "npt": "reserved-bit"}


def _marker_bits(fmt: str, e, maxphyaddr: int):
    """Whether entry e (an int, or a uint64 array) has a marker's bits. EPT: write and execute
    without read (KVM's value 110b under the RWX mask). NPT: present with bit 51 set where it
    is reserved (MAXPHYADDR below 52): KVM's value since Linux 5.13 is BIT(51) | present;
    before, and with SME, every bit from MAXPHYADDR (or the C-bit) to 51, which holds bit 51."""
    if fmt == "ept":
        return (e & 7) == 6
    return ((e & 1) == 1) & ((e >> 51 & 1) == 1) & (maxphyaddr < 52)


def kvm_mmio_marker(spec: "SlatSpec", w: paging.Walk, maxphyaddr: int) -> Optional[str]:
    """Why the entry that stopped walk w is one of KVM's MMIO markers (an entry KVM makes
    invalid on purpose, so that a guest access to an emulated device exits to it), or None."""
    if w.ok or not w.levels or w.fault is None or w.fault.reason != _MARKER_FAULT[spec.format] \
            or not _marker_bits(spec.format, w.levels[-1].entry, maxphyaddr):
        return None
    if spec.format == "ept":
        return "W=1 X=1 with R=0: an EPT misconfiguration"
    return f"present with bit 51 set, reserved above MAXPHYADDR {maxphyaddr}"


def kvm_mmio_markers(spec: "SlatSpec", w: "paging.BatchWalk", maxphyaddr: int) -> np.ndarray:
    """kvm_mmio_marker() for every element of a batch walk (walk_batch) at once: where the
    entry that stopped the walk is one of KVM's MMIO markers."""
    from ..paging import vector
    n = len(w)
    if w.entries is None:                   # stopped before any level (an invalid EPTP)
        return np.zeros(n, bool)
    level = w.fault_level.astype(np.int64)
    stopped = ~w.ok & (level >= 0)
    e = np.zeros(n, np.uint64)
    at = np.nonzero(stopped)[0]
    e[at] = w.entries[at, level[at]]
    fault = vector.FAULT_REASONS.index(_MARKER_FAULT[spec.format])
    return stopped & (w.fault_reason == fault) & _marker_bits(spec.format, e, maxphyaddr)


L1TF_SHIFT = 5       # KVM's SHADOW_NONPRESENT_OR_RSVD_MASK_LEN


def marker_gpa(entry: int, maxphyaddr: int) -> Tuple[int, str]:
    """The guest-physical page KVM keeps in an MMIO marker, and where: bits 12 up to
    MAXPHYADDR; on a host with the L1TF mitigation, KVM also sets the top 5 of those bits in
    every marker and keeps the GFN's own top bits 5 higher, above MAXPHYADDR (so that the
    entry never points at cacheable memory). That layout is read where those 5 bits are all
    set (a GPA of its own there, in the top 1/32 of the space, would read wrong)."""
    frame = entry & ((1 << maxphyaddr) - 1) & ~0xFFF
    low = maxphyaddr - L1TF_SHIFT
    top = ((1 << maxphyaddr) - 1) & ~((1 << low) - 1)
    if maxphyaddr < 52 - L1TF_SHIFT and low > 12 and entry & top == top:
        moved = (entry >> L1TF_SHIFT) & top
        return (frame & ~top) | moved, (f"12-{low - 1} and {maxphyaddr}-{maxphyaddr + 4} "
                                        f"(L1TF: bits {low}-{maxphyaddr - 1} set)")
    return frame, f"12-{maxphyaddr - 1}"


# ---- one address through the table ----------------------------------------------------------

@record
class SlatResult:
    """The second-level step of one address: the walk, where it ends, and whether that agrees
    with the pagemap path's host address."""
    spec: SlatSpec
    how: dict
    walk: Optional[paging.Walk] = None
    expected: Optional[int] = None         # the host address the pagemap path gives
    note: str = ""
    marker: Optional[dict] = None          # the walk stopped at one of KVM's MMIO markers

    @property
    def out(self) -> Optional[int]:
        return self.walk.pa if self.walk is not None and self.walk.ok else None

    @property
    def agrees(self) -> Optional[bool]:
        if self.out is None or self.expected is None:
            return None
        return self.out == self.expected

    def to_dict(self) -> dict:
        w = self.walk
        out = {"format": self.spec.format, "depth": self.spec.depth,
               "root": f"{self.spec.root:#x}" if self.spec.root is not None else None,
               "eptp": f"{self.spec.eptp:#x}" if self.spec.eptp is not None else None,
               "how": self.how,
               "levels": [{"name": s.name, "index": s.index, "entry_addr": f"{s.entry_addr:#x}",
                           "entry": f"{s.entry:#x}", "flags": list(s.flags),
                           "next_addr": None if s.next_addr is None else f"{s.next_addr:#x}",
                           "leaf": s.leaf} for s in (w.levels if w else ())],
               "page_size": w.page_size if w is not None and w.ok else None,
               "out": f"{self.out:#x}" if self.out is not None else None,
               "expected": f"{self.expected:#x}" if self.expected is not None else None,
               "agrees": self.agrees,
               "fault": w.fault.to_dict() if w is not None and w.fault else None,
               "kvm_mmio_marker": self.marker,
               "note": self.note or None}
        return out


def translate(read_phys, spec: SlatSpec, how: dict, gpa: int, expected: Optional[int],
              page1gb: Optional[bool] = None, maxphyaddr: int = 52,
              device=None) -> SlatResult:
    """Walk gpa through the table and say what that means next to the pagemap path.
    device(gpa): the device region of a GPA that is not RAM (QEMU's memory map), or None."""
    w = walk(read_phys, spec, gpa, maxphyaddr, page1gb)
    r = SlatResult(spec, how, w, expected)
    name = spec.format.upper()
    region = device(gpa) if device is not None else None
    if not w.ok:
        why = kvm_mmio_marker(spec, w, maxphyaddr)
        if why:
            step = w.levels[-1]
            kept, bits = marker_gpa(step.entry, maxphyaddr)
            r.marker = {"level": step.name, "entry": f"{step.entry:#x}", "why": why,
                        "gpa": f"{kept:#x}", "bits": bits, "device": region}
            r.note = (f"KVM's MMIO marker, not a mapping: the {name} {step.name} entry "
                      f"{step.entry:#x} is {why} on purpose, so that a guest access to GPA "
                      f"{gpa:#x} exits to KVM, which hands it to QEMU's device model"
                      + (f" ({region})" if region else ""))
        elif w.fault and w.fault.reason in ("not-present", "ept-violation") and region:
            r.note = (f"GPA {gpa:#x} is not in the {name}: {region}. KVM maps no RAM there; "
                      "a guest access exits to QEMU (and may leave an MMIO marker)")
        elif w.fault and w.fault.reason in ("not-present", "ept-violation"):
            r.note = (f"GPA {gpa:#x} is not in the {name} now ({w.fault.message}): the guest "
                      f"has not touched the page since the hypervisor last built this part of "
                      f"the table, or the hypervisor zapped it (memory pressure, dirty "
                      f"logging, a changed memslot); a guest access would fault into it and "
                      f"map it")
        else:
            r.note = f"the {name} walk of GPA {gpa:#x} stops: {w.fault.message}"
    elif expected is not None and w.pa != expected:
        r.note = (f"the {name} maps GPA {gpa:#x} to {w.pa:#x}, but the pagemap path says "
                  f"{expected:#x}: they disagree (the table is stale for this page, or QEMU's "
                  f"page moved: migration, compaction or KSM since the hypervisor mapped it)")
    return r


# ---- a table for a session ------------------------------------------------------------------

class SecondLevel:
    """The second-level table of one hypervisor for one guest, over the memory that holds it
    (this host's, through /proc/kcore; or an outer VM's RAM, through its session): the root
    given or found once, then a walk per address."""

    def __init__(self, memory, spec: Optional[SlatSpec], how: dict):
        self.memory, self.spec, self.how = memory, spec, how
        # 1 GiB leaves: the host CPU's Page1GB for NPT, the EPT capability for EPT (None:
        # unknown, accepted with a note)
        self.page1gb: Optional[bool] = None
        # the host's physical address width: KVM's NPT MMIO markers set bit 51, reserved above it
        self.maxphyaddr = 52
        self.device = None          # device(gpa): a GPA's device region, when not RAM

    @classmethod
    def resolve(cls, memory, chunks, spec: SlatSpec, probes: Sequence[Probe],
                formats=FORMATS, progress=None, more_probes=None) -> "SecondLevel":
        """The table `spec` names, or (auto) the root the scan of `chunks` finds for the
        probes; spec None when none is found or when roots tie (how["note"] says why).
        Roots that tie are walked for more probes (more_probes(): further (gpa, host address)
        pairs, e.g. pages spread over guest RAM) until one wins; if none does, no root is
        chosen (how["ambiguous"]): two VMs sharing merged pages, or KVM's separate SMM root,
        map the same addresses alike, and picking one would show another table's answers."""
        if not spec.auto:
            return cls(memory, spec, {"method": "given"})
        probes = [p for p in probes if p[1] is not None]
        if not probes:
            return cls(memory, None, {"method": "scan", "note": (
                "no (guest-physical, host) address pair to search with: the pagemap path "
                "gave no host address")})
        found, how = find_roots(chunks, memory.read, probes, formats, progress)
        how = dict(method="scan", probes=[[f"{g:#x}", f"{p:#x}"] for g, p in probes], **how)
        if not found:
            how["note"] = (f"no {' or '.join(f.upper() for f in formats)} root in "
                           f"{getattr(memory, 'name', 'host')} memory maps GPA "
                           f"{probes[0][0]:#x} to {probes[0][1]:#x}")
            return cls(memory, None, how)
        best = found[0]
        tied = _tied(found)
        if len(tied) > 1 and more_probes is not None:
            extra = [p for p in more_probes() if p[1] is not None and p not in probes]
            how["tie_probes"] = [[f"{g:#x}", f"{p:#x}"] for g, p in extra]
            for f in tied:
                f.agree += sum(1 for gpa, pa in extra if _reaches(memory.read, f.spec, gpa, pa))
                f.probes += len(extra)
            tied.sort(key=lambda f: -f.agree)
            best = tied[0]
            tied = [f for f in tied if f.agree == best.agree]
        if len(tied) > 1:
            roots = [f"{f.spec.format}:{f.spec.root:#x}" for f in tied]
            how["ambiguous"] = [f.to_dict() for f in tied]
            how["note"] = (f"ambiguous: roots {', '.join(roots)} each map all "
                           f"{best.agree} of {best.probes} probe addresses as the pagemap path "
                           "does; none is chosen (another VM's table, or KVM's SMM root, maps "
                           "these pages alike). Give the root with --slat FORMAT:ROOT")
            return cls(memory, None, how)
        if best.agree < best.probes:
            how["note"] = (f"the best root maps {best.agree} of {best.probes} probe addresses "
                           "as the pagemap path does (the others are not in the table now)")
        how["chosen"] = best.to_dict()
        return cls(memory, best.spec, how)

    def walk_batch(self, gpas) -> "paging.BatchWalk":
        """Many GPAs through the table at once (walk_batch); the table must be known."""
        return walk_batch(self.memory.read, self.spec, gpas, self.maxphyaddr, self.page1gb)

    def markers(self, w: "paging.BatchWalk") -> np.ndarray:
        """Where each walk of walk_batch stopped at one of KVM's MMIO markers."""
        return kvm_mmio_markers(self.spec, w, self.maxphyaddr)

    def result(self, gpa: int, expected: Optional[int]) -> SlatResult:
        if self.spec is None:
            return SlatResult(SlatSpec(), self.how, None, expected,
                              note=self.how.get("note", "no second-level root"))
        return translate(self.memory.read, self.spec, self.how, gpa, expected, self.page1gb,
                         self.maxphyaddr, self.device)


# ---- the reverse: which guest-physical pages reach a host frame ----------------------------

@record
class Reverse:
    """Where a host address sits in a second-level table: the GPAs whose leaf holds it, and
    the table pages it is itself (level names as the walk names them)."""
    maps: List[Tuple[int, int, str]]      # (gpa of the byte, leaf page size, leaf level)
    tables: List[str]                     # levels at which the frame is a table page

    def to_dict(self, spec: "SlatSpec") -> dict:
        return {"format": spec.format, "depth": spec.depth, "root": f"{spec.root:#x}",
                "maps": [{"gpa": f"{g:#x}", "page_size": size, "level": level}
                         for g, size, level in self.maps],
                "page_table_of": self.tables}


def reverse(read_phys, spec: SlatSpec, hpa: int, maxphyaddr: int = 52) -> Reverse:
    """Every leaf of the table that maps host address hpa, and every table page of it that is
    hpa's page: one walk of the whole table, each table page read once."""
    from ..paging.ept import ept_format, npt_format
    from ..paging.modes import MODE_EPT4, MODE_EPT5, MODE_NPT4, MODE_NPT5
    from ..paging.walker import iter_leaves
    if spec.format == "ept":
        mode = MODE_EPT5 if spec.depth == 5 else MODE_EPT4
        fmt = ept_format(mode, maxphyaddr, False, None)
    else:
        mode = MODE_NPT5 if spec.depth == 5 else MODE_NPT4
        fmt = npt_format(mode, maxphyaddr, True, None)
    page = hpa & ~(PAGE - 1)
    tables = [mode.levels[0].name] if spec.root == page else []
    maps = []
    seen_tables = set()
    for gpa, i, path in iter_leaves(read_phys, mode, fmt, spec.root, 0, 1 << mode.va_bits):
        for k in range(i):                    # the tables below the root on this path
            t = fmt.frame(k, path[k], False)
            if t == page and (k + 1) not in seen_tables:
                seen_tables.add(k + 1)
                tables.append(mode.levels[k + 1].name)
        size = fmt.page_size(i, True)
        frame = fmt.frame(i, path[-1], True)
        if frame <= hpa < frame + size:
            maps.append((gpa + (hpa - frame), size, mode.levels[i].name))
    return Reverse(maps, tables)
