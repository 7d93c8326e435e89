"""AArch64 stage 2 walks: the EL1&0 stage 2 translation (VMSAv8-64) that a hypervisor at EL2
sets up with VTTBR_EL2 and VTCR_EL2, taking an intermediate physical address (IPA, the guest's
physical address) to a physical address: the arm64 counterpart of ept.walk_ept / walk_npt.

walk_stage2() translates one IPA as AArch64.S2Translate would and says what each kind of
access would do there; iter_mappings_stage2() lists every valid leaf in IPA order, reading each
table once. Both return the records of model.py, so every renderer shows them as it shows an
EPT walk. decode_vtcr() and decode_vttbr() give the registers' fields (as decode_eptp does).
The parameters and the descriptor format are in arm64_stage2_format.py.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

from ..errors import MemoryReadError
from .arm64 import descriptor_walk, fault_status
from .arm64_format import GRANULES, SHAREABILITY, contiguous_entries
from .arm64_stage2_format import (
    AF, CACHEABILITY, CONT, DBM, HCR_DC, HCR_VM, VTCR_DS, VTCR_HA, VTCR_HD, VTCR_NSA,
    VTCR_NSW, VTCR_VS, S2Params, memattr_device, qemu72_root, s2_params, stage2_format,
)
from .formats import bits, size_name
from .walker import iter_leaves
from .model import (
    ACCESS_FLAG, ADDRESS_SIZE, PAGING_DISABLED, PERMISSION, TRANSLATION,
    AccessResult, Fault, LevelStep, Mapping, ReadPhys, Walk,
)

__all__ = ["STAGE2_ACCESS_KINDS", "decode_vtcr", "decode_vttbr", "walk_stage2",
           "iter_mappings_stage2"]

#: The keys of Walk.access for stage 2 walks: data reads and writes (stage 2 gives EL0 and
#: EL1 the same data permissions), and instruction fetches whose stage 1 ran at EL1 or EL0
#: (FEAT_XNX gives them separate execute-never bits).
STAGE2_ACCESS_KINDS = ("read", "write", "execute-el1", "execute-el0")

FLAG_BITS = bits(11, 2) | bits(16, 16) | bits(63, 50)    # what flags() and _rights() read
S2AP_NAMES = ("no access", "read-only", "write-only", "read/write")


def decode_vtcr(vtcr: int, id_aa64mmfr0: Optional[int] = None,
                id_aa64mmfr1: Optional[int] = None, id_aa64mmfr2: Optional[int] = None
                ) -> dict:
    """The fields of VTCR_EL2, what they select (granule, IPA and output sizes, start level,
    concatenated first-level tables), and `problems`: why a walk cannot start (empty when it
    can). IRGN0/ORGN0/SH0 (the walk's own memory attributes) are decoded as text only."""
    p = s2_params(vtcr, 0, id_aa64mmfr0, id_aa64mmfr1, id_aa64mmfr2)
    g = p.granule
    return {
        "t0sz": p.t0sz, "ia_bits": p.ia_bits, "tg0": (vtcr >> 14) & 3,
        "granule": GRANULES[g], "sl0": p.sl0, "sl2": p.sl2, "start_level": p.start,
        "levels": [s.name for s in p.mode.levels] if p.mode else [],
        "root_tables": p.root_tables,
        "irgn0": CACHEABILITY[(vtcr >> 8) & 3], "orgn0": CACHEABILITY[(vtcr >> 10) & 3],
        "sh0": SHAREABILITY[(vtcr >> 12) & 3],
        "ps": (vtcr >> 16) & 7, "ps_bits": p.ps_bits, "oa_bits": p.oa_bits,
        "pamax": p.pamax, "pamax_assumed": p.pamax_assumed,
        "vs": bool(vtcr & VTCR_VS), "vmid_bits": p.vmid_bits,
        "ha": bool(vtcr & VTCR_HA), "hd": bool(vtcr & VTCR_HD),
        "hardware_af": p.ha, "hardware_dirty": p.hd,
        "hwu": (vtcr >> 25) & 0xF, "nsw": bool(vtcr & VTCR_NSW), "nsa": bool(vtcr & VTCR_NSA),
        "ds": bool(vtcr & VTCR_DS), "lpa2": p.ds,
        "valid": not p.setup_fault,
        "problems": [p.setup_fault] if p.setup_fault else [],
        "notes": list(p.notes),
    }


def decode_vttbr(vttbr: int, vtcr: int, id_aa64mmfr0: Optional[int] = None,
                 id_aa64mmfr1: Optional[int] = None, id_aa64mmfr2: Optional[int] = None
                 ) -> dict:
    """The fields of VTTBR_EL2 under this VTCR_EL2: BADDR (bits[47:1], and BADDR[51:48] in
    bits[5:2] with 52-bit addresses), the first table's base it gives (aligned to the whole
    concatenated first level, at least 64 bytes with 52-bit addresses: AArch64.TTBaseAddress),
    the VMID (bits[63:48] with VTCR_EL2.VS=1 and 16-bit VMIDs, else [55:48]) and CnP (bit 0);
    `problems` lists the base's misalignment (CONSTRAINED UNPREDICTABLE: the low bits are
    taken as 0) and an address beyond the output size."""
    p = s2_params(vtcr, vttbr, id_aa64mmfr0, id_aa64mmfr1, id_aa64mmfr2)
    if p.ttb52:
        baddr = (vttbr & bits(47, 6)) | (vttbr & bits(5, 2)) << 46
        low = bits(5, 1)
    else:
        baddr, low = vttbr & bits(47, 1), 0
    problems = []
    align = 0
    if p.mode is not None:
        align = 1 << max(p.mode.levels[0].index_bits + 3, 6 if p.ttb52 else 0)
        stray = vttbr & bits(47, 1) & (align - 1) & ~low
        if stray:
            problems.append(f"BADDR is not aligned to the {size_name(align)} first level "
                            f"({p.root_tables} concatenated table(s)): bit(s) set below it, "
                            f"taken as 0")
        if p.root >> p.oa_bits:
            problems.append(f"the base {p.root:#x} is beyond the {p.oa_bits}-bit output size")
    return {
        "baddr": baddr, "root": p.root if p.mode else None, "alignment": align,
        "root_tables": p.root_tables, "vmid": p.vmid, "vmid_bits": p.vmid_bits,
        "cnp": bool(vttbr & 1), "valid": not problems, "problems": problems,
    }


def _walk_tables(read: ReadPhys, p: S2Params, ipa: int, notes: List[str]
                 ) -> Tuple[Tuple[LevelStep, ...], Optional[Fault]]:
    """AArch64.S2Walk (arm64.descriptor_walk with VTCR_EL2's sizes)."""
    def high_bits_note(i: int, e: int, leaf: bool) -> Optional[str]:
        seen_by_qemu = e & bits(49 if p.ds else 47, p.granule)
        if (p.ds or p.lpa) and p.oa_bits <= 48 and not seen_by_qemu >> p.oa_bits:
            return (f"QEMU 7.2 reads OA[51:48] from descriptor bits "
                    f"{'[9:8]' if p.ds else '[15:12]'} only with a 52-bit output size and "
                    f"would ignore them here (and not fault)")
        return None

    return descriptor_walk(read, p.mode, stage2_format(p), p.granule, p.oa_bits, p.root, ipa,
                           notes, stage="stage 2 ", high_bits_note=high_bits_note,
                           oa_why=_oa_why(p))


def _oa_why(p: S2Params) -> str:
    return (f"VTCR_EL2.PS={(p.vtcr >> 16) & 7:#05b}, PARange {p.pamax} bits"
            f"{' assumed' if p.pamax_assumed else ''}"
            + ("; 48 without VTCR_EL2.DS or the 64K granule" if p.oa_bits == 48 else ""))


XN_NAMES = ("executable at EL1 and EL0", "not executable at EL1", "not executable at all",
            "not executable at EL0")       # XN[1:0] with FEAT_XNX (XN[1] alone without)


def descriptor_words(entry: int, leaf: bool) -> str:
    """A stage 2 descriptor's rights in words (its flags name the bits): S2AP, XN, AF."""
    if not entry & 1:
        return "invalid (bit 0 = 0): no mapping"
    if not leaf:
        return "table descriptor: no attributes at stage 2 (nothing is inherited)"
    ap, xn = (entry >> 6) & 3, (entry >> 53) & 3
    return (f"S2AP={ap:02b} {S2AP_NAMES[ap]}; XN={xn:02b} {XN_NAMES[xn]}; "
            f"AF={entry >> 10 & 1}; software bits 58:55 = {entry >> 55 & 0xF:#x}")


def _rights(p: S2Params, e: int) -> Dict[str, bool]:
    """S2AP[0] reads, S2AP[1] writes (or DBM=1 with hardware dirty state); XN[1:0]: with
    FEAT_XNX 00 both ELs execute, 01 not EL1, 10 neither, 11 not EL0; without it XN[1] alone
    (AArch64.S2DirectBasePermissions). Execution does not need S2AP read permission."""
    ap, xn = (e >> 6) & 3, (e >> 53) & 3
    if not p.xnx:
        xn &= 2
    return {"read": bool(ap & 1), "write": bool(ap & 2 or (p.hd and e & DBM)),
            "execute-el1": xn in (0, 3), "execute-el0": xn in (0, 1)}


def _denial(kind: str, e: int, name: str, p: S2Params) -> str:
    ap, xn = (e >> 6) & 3, (e >> 53) & 3
    if kind in ("read", "write"):
        dbm = (" (DBM=1, but hardware dirty state is off: VTCR_EL2.HD=0 or no FEAT_HAFDBS)"
               if kind == "write" and e & DBM else "")
        return f"S2AP={ap:02b} ({S2AP_NAMES[ap]}) in the {name} descriptor{dbm}"
    el = kind[-3:].upper()
    if not p.xnx:
        return (f"XN[1]=1 in the {name} descriptor (execute-never at stage 2; without "
                f"FEAT_XNX XN[0] is ignored)")
    what = {1: "not executable at EL1", 2: "not executable at EL1 or EL0",
            3: "not executable at EL0"}[xn]
    return f"XN={xn:02b} in the {name} descriptor ({what}, FEAT_XNX): no {el} fetch"


def walk_stage2(read_phys: ReadPhys, vttbr: int, vtcr: int, ipa: int, *,
                id_aa64mmfr0: Optional[int] = None, id_aa64mmfr1: Optional[int] = None,
                id_aa64mmfr2: Optional[int] = None, hcr: Optional[int] = None) -> Walk:
    """Translate `ipa` through the stage 2 tables VTTBR_EL2 points to, as VTCR_EL2 shapes
    them; never raises for what it reads or for register values. The ID registers (None =
    unknown: PARange 48 assumed, FEAT_LPA2/HAFDBS/XNX/TTST/VMID16 taken as present when a
    register asks for them, each said in a note) and HCR_EL2 (VM/DC: stage 2 on; FWB: how
    MemAttr reads; None = on, both readings given) are optional. Access keys are
    STAGE2_ACCESS_KINDS; fault error codes are ESR_EL2 DFSC/IFSC values (fault_status)."""
    if not 0 <= ipa < 1 << 64:
        raise ValueError(f"{ipa:#x} is not a 64-bit intermediate physical address")
    p = s2_params(vtcr, vttbr, id_aa64mmfr0, id_aa64mmfr1, id_aa64mmfr2, hcr)
    notes: List[str] = list(p.notes)
    notes.append(f"VMID {p.vmid:#x} (VTTBR_EL2[{47 + p.vmid_bits}:48], {p.vmid_bits}-bit "
                 f"VMIDs)")
    mode, root = p.mode, p.root

    def failed(fault: Fault, steps: Tuple[LevelStep, ...] = ()) -> Walk:
        if fault.reason in (TRANSLATION, ADDRESS_SIZE, ACCESS_FLAG):
            denied = AccessResult(False, fault.error_code, f"stage 2 {fault.reason} fault at "
                                                           f"{fault.level}")
        else:
            denied = AccessResult(False, None, f"no translation: {fault.reason}")
        return Walk(ipa, mode, root, None, steps, None, None, None, None, None, fault,
                    {k: denied for k in STAGE2_ACCESS_KINDS}, p.pamax_assumed, p.oa_bits,
                    tuple(notes))

    level0 = fault_status(TRANSLATION, 0)
    if hcr is not None and not hcr & (HCR_VM | HCR_DC):
        return failed(Fault(None, PAGING_DISABLED, "HCR_EL2.VM=0 (and DC=0): stage 2 "
                                                   "translation is off, so the IPA is the PA"))
    if p.setup_fault:
        return failed(Fault("L0", TRANSLATION, f"{p.setup_fault}, so every access takes a "
                                               f"stage 2 translation fault at level 0", level0))
    if ipa >> p.ia_bits:
        return failed(Fault("L0", TRANSLATION,
                            f"IPA {ipa:#x} is beyond the {p.ia_bits} bits that VTCR_EL2.T0SZ="
                            f"{p.t0sz} gives (AArch64.IPAIsOutOfRange), so a translation fault "
                            f"at level 0", level0))
    if root >> p.oa_bits:
        return failed(Fault("L0", ADDRESS_SIZE,
                            f"VTTBR_EL2 base {root:#x} is beyond the {p.oa_bits}-bit output "
                            f"size ({_oa_why(p)})", fault_status(ADDRESS_SIZE, 0)))
    first = mode.levels[0]
    if p.root_tables > 1:
        lo = first.shift + p.granule - 3
        notes.append(f"the first level ({first.name}) is {p.root_tables} concatenated tables: "
                     f"IPA bit{'s' if p.root_tables > 2 else ''} "
                     f"{p.ia_bits - 1}{'' if p.root_tables == 2 else f':{lo}'} "
                     f"pick{'s' if p.root_tables == 2 else ''} table {ipa >> lo}")
    info = decode_vttbr(vttbr, vtcr, id_aa64mmfr0, id_aa64mmfr1, id_aa64mmfr2)
    for problem in info["problems"]:
        notes.append(f"VTTBR_EL2 {vttbr:#x}: {problem} (CONSTRAINED UNPREDICTABLE; "
                     f"AArch64.TTBaseAddress clears them), so the walk starts at {root:#x}")
    qemu_root = qemu72_root(p)
    if qemu_root != root:
        notes.append(f"QEMU 7.2 takes VTTBR_EL2 bits[5:2] as BADDR[51:48] only with a 52-bit "
                     f"output size and aligns the base to the first level alone (no 64-byte "
                     f"minimum): it would walk from {qemu_root:#x}")
    steps, fault = _walk_tables(read_phys, p, ipa, notes)
    if fault:
        return failed(fault, steps)
    leaf = steps[-1]
    e = leaf.entry
    level = p.start + len(steps) - 1
    if not e & AF:
        if not p.ha:
            return failed(Fault(leaf.name, ACCESS_FLAG,
                                f"stage 2 {leaf.name} descriptor {e:#x} has AF=0: an access "
                                f"takes an Access flag fault (VTCR_EL2.HA=0 or no "
                                f"FEAT_HAFDBS)", fault_status(ACCESS_FLAG, level)), steps)
        notes.append(f"AF=0 in the {leaf.name} descriptor: with VTCR_EL2.HA=1 the CPU sets it "
                     f"on this access instead of faulting")
    rights = _rights(p, e)
    code = fault_status(PERMISSION, level)
    access = {k: AccessResult(True, None, "") if rights[k] else
              AccessResult(False, code, f"stage 2 permission fault: "
                                        f"{_denial(k, e, leaf.name, p)}")
              for k in STAGE2_ACCESS_KINDS}
    if e & DBM and not (e >> 7) & 1 and p.hd:
        notes.append(f"DBM=1 in the {leaf.name} descriptor with VTCR_EL2.HD=1: a write to this "
                     f"writable-clean page sets S2AP[1] (hardware dirty state) instead of "
                     f"faulting")
    if not p.xnx and (e >> 53) & 1:
        notes.append(f"XN[0]=1 in the {leaf.name} descriptor is ignored: no FEAT_XNX "
                     f"(ID_AA64MMFR1_EL1.XNX=0)")
    elif id_aa64mmfr1 is None and (e >> 53) & 1:
        notes.append("ID_AA64MMFR1_EL1 unknown: XN[0] read with FEAT_XNX (without it, only "
                     "XN[1] counts and both ELs are treated alike)")
    if e & CONT:
        n = contiguous_entries(p.granule, level)
        run = n * leaf.page_size
        lo = ipa & ~(run - 1)
        notes.append(f"contiguous hint: part of a {n}-entry run of {size_name(leaf.page_size)} "
                     f"{'pages' if level == 3 else 'blocks'} ({size_name(run)}, IPA {lo:#x}-"
                     f"{lo + run - 1:#x}) that a TLB may cache as one entry; the page size "
                     f"shown is the descriptor's")
    memattr = (e >> 2) & 0xF
    executable = rights["execute-el1"] or rights["execute-el0"]
    if executable and memattr_device(memattr, p.fwb):
        notes.append("stage 2 makes this Device memory: instruction fetches from it are "
                     "CONSTRAINED UNPREDICTABLE (a permission fault, or fetched as Normal)")
    pa = leaf.next_addr | (ipa & (leaf.page_size - 1))
    return Walk(ipa, mode, root, None, steps, pa, leaf.page_size, rights["write"], None,
                executable, None, access, p.pamax_assumed, p.oa_bits, tuple(notes))


def iter_mappings_stage2(read_phys: ReadPhys, vttbr: int, vtcr: int, start: int = 0,
                         end: Optional[int] = None, *, id_aa64mmfr0: Optional[int] = None,
                         id_aa64mmfr1: Optional[int] = None, id_aa64mmfr2: Optional[int] = None,
                         hcr: Optional[int] = None,
                         on_unreadable: Optional[Callable[[str, int, Exception], None]] = None,
                         on_repeat: Optional[Callable[[str, int, int], None]] = None
                         ) -> Iterator[Mapping]:
    """Every valid leaf overlapping [start, end) of the IPA space (end exclusive, None = the
    whole space), in IPA order, lazily, as Mapping(IPA, output address, size, writable,
    user=True (stage 2 gives EL0 and EL1 the same data permissions), executable (at EL1 or
    EL0), path, flags). Leaves with AF=0 are listed (they map; an access faults or sets AF).

    Each table is read once, whole, with one read_phys call (the first level: all its
    concatenated tables at once), and walked once: a table met again at the same level (a
    table shared by two entries, or one pointing at itself) is not listed twice, but passed to
    on_repeat(level name, table address, IPA it was met at), so hostile tables cost at most
    one pass over each distinct table. Unreadable tables are skipped and passed to
    on_unreadable(level name, address, error). Nothing when the walk cannot start (VTCR_EL2
    invalid, base beyond the output size, HCR_EL2.VM=DC=0)."""
    p = s2_params(vtcr, vttbr, id_aa64mmfr0, id_aa64mmfr1, id_aa64mmfr2, hcr)
    if p.setup_fault or p.root >> p.oa_bits or (hcr is not None
                                                and not hcr & (HCR_VM | HCR_DC)):
        return
    lo, hi = max(start, 0), min(1 << p.ia_bits, (1 << 64) if end is None else end)
    if lo >= hi:
        return
    fmt = stage2_format(p)
    known: Dict[Tuple[int, int], tuple] = {}
    for ipa, i, path in iter_leaves(read_phys, p.mode, fmt, p.root, lo, hi, on_unreadable,
                                    on_repeat=on_repeat or (lambda *_: None)):
        e = path[-1]
        key = (i, e & FLAG_BITS)
        got = known.get(key)
        if got is None:
            r = _rights(p, e)
            got = known[key] = (r["write"], r["execute-el1"] or r["execute-el0"],
                                fmt.flags(i, e, True))
        yield Mapping(ipa, fmt.frame(i, e, True), fmt.sizes[i], got[0], True, got[1], path,
                      got[2])

