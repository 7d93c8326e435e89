"""AArch64 guest page walks: VMSAv8-64 stage 1 in the EL1&0 regime (Arm ARM DDI 0487, ch. D8).

walk_arm64() translates one VA as AArch64.S1Translate would and says what each kind of access
would do there; iter_mappings_arm64() lists every valid leaf of both VA ranges, reading each
table once. Both return the records of model.py, so every renderer works unchanged. The walk
parameters, modes and descriptor format are in arm64_format.py.
"""

from __future__ import annotations

import array
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import MemoryReadError
from .arm64_format import (
    AF, CONT, CPSR_PAN, DBM, FLAG_BITS, GRANULES, NG, PXN, PXN_TABLE, SCTLR_EE, SCTLR_EPAN,
    SCTLR_M, SCTLR_SPAN, SCTLR_WXN, TCR_A1, TCR_AS, UXN, UXN_TABLE, Arm64Format, Arm64State,
    RangeParams, arm64_format, contiguous_note, id_field, pamax, permissions, range_params,
    range_window, table_attrs, ttbr_base,
)
from .formats import bits, size_name
from .model import (
    ACCESS_FLAG, ADDRESS_SIZE, PAGING_DISABLED, PERMISSION, TRANSLATION, UNREADABLE,
    AccessResult, Fault, LevelStep, Mapping, PagingMode, ReadPhys, Walk,
)
from .walker import iter_leaves

__all__ = ["Arm64State", "arm64_mode", "walk_arm64", "iter_mappings_arm64",
           "ARM64_ACCESS_KINDS", "TRANSLATION", "ACCESS_FLAG", "ADDRESS_SIZE", "PERMISSION",
           "fault_status"]

#: The keys of Walk.access for AArch64 walks.
ARM64_ACCESS_KINDS = ("el1-read", "el1-write", "el1-execute", "el0-read", "el0-write",
                      "el0-execute")

#: Fault reasons: the Arm ARM's fault types (model.TRANSLATION, ACCESS_FLAG, ADDRESS_SIZE,
#: PERMISSION, imported above), and model.UNREADABLE and PAGING_DISABLED.

# ESR_EL1.ISS DFSC/IFSC (Data/Instruction Abort): 0bTTTTLL with LL the level; level -1 has
# its own codes (FEAT_LPA2) and never holds a leaf, so no Access flag or Permission fault.
_FSC = {ADDRESS_SIZE: 0b000000, TRANSLATION: 0b000100, ACCESS_FLAG: 0b001000,
        PERMISSION: 0b001100}
_FSC_LEVEL_M1 = {ADDRESS_SIZE: 0b101001, TRANSLATION: 0b101011}

ASSUMED_PAMAX_NOTE = "ID_AA64MMFR0_EL1 unknown: PARange assumed 48 bits"


def fault_status(reason: str, level: int) -> Optional[int]:
    """The 6-bit fault status code (DFSC/IFSC) of a stage 1 fault at this level."""
    if level == -1:
        return _FSC_LEVEL_M1.get(reason)
    base = _FSC.get(reason)
    return None if base is None else base | level


def arm64_mode(state: Arm64State, va: int) -> Optional[PagingMode]:
    """The mode of the VA range holding `va` (bit 55 selects TTBR0/TTBR1), None if the MMU is
    off. A TnSZ out of bounds gives the clamped geometry (the walk itself faults)."""
    if not state.sctlr & SCTLR_M:
        return None
    return range_params(state, (va >> 55) & 1).mode


def _reader(read_phys: ReadPhys, state: Arm64State) -> ReadPhys:
    """SCTLR_EL1.EE=1: the walk reads big-endian descriptors; give the walkers little-endian."""
    if not state.sctlr & SCTLR_EE:
        return read_phys

    def swapped(addr: int, length: int) -> bytes:
        data = read_phys(addr, length)
        if len(data) % 8:
            return data                      # the caller's length check reports it
        words = array.array("Q", data)
        words.byteswap()
        return words.tobytes()
    return swapped


def _out_of_range(p: RangeParams, va: int, fetch: bool) -> bool:
    """AArch64.VAIsOutOfRange: bits[top:64-TnSZ] all 0 (TTBR0) or all 1 (TTBR1); top is 55
    with TBI, 63 without, and 63 for fetches with TBID (AArch64.AddrTop)."""
    top = 55 if p.tbi and not (fetch and p.tbid) else 63
    low = 64 - p.tsz
    field = (va >> low) & ((1 << (top + 1 - low)) - 1)
    return field != (0 if p.select == 0 else (1 << (top + 1 - low)) - 1)


def _pan(state: Arm64State, notes: List[str]) -> Tuple[bool, bool]:
    """(PAN applies to EL1 data accesses, PAN3: it also covers EL0-executable pages)."""
    el = (state.cpsr >> 2) & 3
    feature = id_field(state.id_aa64mmfr1, 20)
    pan = bool(state.cpsr & CPSR_PAN)
    if state.cpsr & 0x10:
        notes.append("cpsr M[4]=1: the CPU is in AArch32 state; this is the AArch64 EL1&0 "
                     "regime EL1 would use")
    if feature == 0:
        if pan:
            notes.append("cpsr PAN=1 ignored: ID_AA64MMFR1_EL1 says there is no FEAT_PAN")
        return False, False
    if el == 0:
        if not state.sctlr & SCTLR_SPAN:
            pan = True                       # AArch64.TakeException sets PAN when SPAN=0
            notes.append("the CPU is at EL0: el1-* accesses are judged with PSTATE.PAN=1, "
                         "which taking an exception to EL1 sets (SCTLR_EL1.SPAN=0)")
        else:
            notes.append(f"the CPU is at EL0: el1-* accesses are judged with PSTATE.PAN={pan:d} "
                         f"as it is now (SCTLR_EL1.SPAN=1 keeps it on exception entry)")
    elif el >= 2:
        notes.append(f"the CPU is at EL{el}: this is the EL1&0 regime, judged with "
                     f"PSTATE.PAN={pan:d} as it is now")
    pan3 = bool(state.sctlr & SCTLR_EPAN) and feature is not None and feature >= 3
    if feature is None and state.sctlr & SCTLR_EPAN:
        notes.append("ID_AA64MMFR1_EL1 unknown: SCTLR_EL1.EPAN ignored (FEAT_PAN3 not assumed)")
    return pan, pan3


def _asid_note(state: Arm64State) -> str:
    """TCR_EL1.A1 picks the TTBR holding the ASID, TCR_EL1.AS (with ASIDBits = 16) its width."""
    a1, wide = bool(state.tcr & TCR_A1), bool(state.tcr & TCR_AS)
    wide = wide and id_field(state.id_aa64mmfr0, 4) in (None, 2)
    reg = state.ttbr1 if a1 else state.ttbr0
    asid = reg >> 48 if wide else (reg >> 48) & 0xFF
    return (f"ASID {asid:#x} (TTBR{a1:d}_EL1[{63 if wide else 55}:48]: TCR_EL1.A1={a1:d}, "
            f"{16 if wide else 8}-bit ASIDs)")


def _oa_why(p: RangeParams, state: Arm64State) -> str:
    ips = (state.tcr >> 32) & 7
    assumed = " assumed" if p.pamax_assumed else ""
    return (f"TCR_EL1.IPS={ips:#05b}, PARange {p.pamax} bits{assumed}"
            + ("; 48 without TCR_EL1.DS or the 64K granule" if p.oa_bits == 48 else ""))


def _qemu_high_bits_note(what: str, low_only: int, p: RangeParams) -> Optional[str]:
    """QEMU 7.2 takes OA[51:48] from TTBR[5:2] / descriptor bits[15:12] or [9:8] only with a
    52-bit output size; the Arm ARM takes them whenever the layout has them."""
    if p.oa_bits <= 48 and not low_only >> p.oa_bits:
        return (f"QEMU 7.2 reads OA[51:48] from the {what} only when the output size is 52 bits "
                f"and would ignore them here (and not fault)")
    return None


def _qemu_ttbr_base(p: RangeParams) -> int:
    """The first table's base as QEMU 7.2 computes it: TTBR[47:0], with TTBR[5:2] as
    BADDR[51:48] only for a 52-bit output size, aligned to the table's size alone."""
    base = p.ttbr & bits(47, 0)
    if p.oa_bits > 48:
        base |= ((p.ttbr >> 2) & 0xF) << 48
    return base & ~((1 << (p.mode.levels[0].index_bits + 3)) - 1)


def descriptor_walk(read: ReadPhys, mode: PagingMode, fmt, granule: int, oa_bits: int,
                    root: int, address: int, notes: List[str], *, stage: str = "",
                    block_need: Callable[[int], str] = lambda level: "",
                    high_bits_note: Callable[[int, int, bool], Optional[str]]
                    = lambda i, e, leaf: None, oa_why: str = "") -> Tuple[Tuple[LevelStep, ...], Optional[Fault]]:
    """AArch64.S1Walk / S2Walk: one descriptor per level, one read each, until a leaf or a
    fault. `fmt` is the stage's descriptor format (level, kind, flags, frame, page_size);
    `stage` prefixes the messages ("stage 2 "); block_need(level) says what a block at that
    level would need, high_bits_note(i, entry, leaf) what QEMU 7.2 makes of OA[51:48]."""
    steps: List[LevelStep] = []
    table = root
    for i, spec in enumerate(mode.levels):
        level = fmt.level(i)
        index = (address >> spec.shift) & ((1 << spec.index_bits) - 1)
        entry_addr = table + 8 * index
        try:
            raw = read(entry_addr, 8)
            if len(raw) != 8:
                raise MemoryReadError(f"read returned {len(raw)} bytes, not 8", entry_addr)
        except MemoryReadError as exc:
            return tuple(steps), Fault(spec.name, UNREADABLE,
                                       f"cannot read the {spec.name} descriptor (index {index}) "
                                       f"at {entry_addr:#x}: {exc}")
        e = int.from_bytes(raw, "little")
        kind = fmt.kind(i, e)
        head = f"{stage}{spec.name} descriptor {e:#x} (index {index} at {entry_addr:#x})"
        if kind in ("invalid", "reserved", "block!"):
            steps.append(LevelStep(spec.name, spec.linux_name, index, table, entry_addr, e,
                                   fmt.flags(i, e, False), None, False, None))
            if kind == "invalid":
                why = "is invalid (bit 0 = 0)"
            elif kind == "reserved":
                why = "has bits[1:0] = 01, reserved at level 3 (AArch64.DecodeDescriptorType)"
            else:
                g = GRANULES[granule].upper()
                why = (f"is a block descriptor (bits[1:0] = 01) at level {level}, where the {g} "
                       f"granule has no blocks{block_need(level)} (AArch64.BlockDescSupported)")
                notes.append(f"QEMU 7.2 does not check the level of a block descriptor and "
                             f"would map a {size_name(1 << spec.shift)} block here")
            return tuple(steps), Fault(spec.name, TRANSLATION, f"{head} {why}",
                                       fault_status(TRANSLATION, level))
        leaf = kind != "table"
        addr = fmt.frame(i, e, leaf)
        steps.append(LevelStep(spec.name, spec.linux_name, index, table, entry_addr, e,
                               fmt.flags(i, e, leaf), addr, leaf, fmt.page_size(i, leaf)))
        if addr >> oa_bits:
            what = "output" if leaf else "next-table"
            note = high_bits_note(i, e, leaf)
            if note:
                notes.append(note)
            return tuple(steps), Fault(spec.name, ADDRESS_SIZE,
                                       f"{head} gives {what} address {addr:#x}, beyond the "
                                       f"{oa_bits}-bit output address size ({oa_why})",
                                       fault_status(ADDRESS_SIZE, level))
        if leaf:
            return tuple(steps), None
        table = addr
    raise AssertionError("the last level always ends the walk")  # pragma: no cover


def _walk_tables(read: ReadPhys, p: RangeParams, fmt: Arm64Format, state: Arm64State,
                 root: int, va: int, notes: List[str]
                 ) -> Tuple[Tuple[LevelStep, ...], Optional[Fault]]:
    """Stage 1's walk (descriptor_walk with TCR_EL1's sizes)."""
    def block_need(level: int) -> str:
        return {12: " without TCR_EL1.DS=1", 14: " without TCR_EL1.DS=1",
                16: " unless PARange is 52 bits"}[p.granule] if level >= 0 else ""

    def high_bits_note(i: int, e: int, leaf: bool) -> Optional[str]:
        hi = ("descriptor bits[9:8]" if p.ds else "descriptor bits[15:12]" if p.lpa else None)
        return hi and _qemu_high_bits_note(hi, e & (fmt.masks[i] if leaf else fmt.table_mask),
                                           p)

    return descriptor_walk(read, p.mode, fmt, p.granule, p.oa_bits, root, va, notes,
                           block_need=block_need, high_bits_note=high_bits_note,
                           oa_why=_oa_why(p, state))


def _summary(p: RangeParams, wxn: bool, path) -> Tuple[tuple, tuple, bool, bool, bool]:
    """(read/fetch view, write view, writable, user, executable) of a leaf and its tables."""
    tattrs = table_attrs(path, p.hpd)
    r = permissions(path[-1], tattrs, wxn, False)
    w = permissions(path[-1], tattrs, wxn, p.hd)
    user = r[2]
    # a user page (EL0 may read or execute) executes at EL0, any other at EL1
    executable = r[5] if (r[2] or r[5]) else r[4]
    return r, w, w[1] or w[3], user, executable


def _first(steps, bit: int) -> str:
    return next((s.name for s in steps[:-1] if s.entry & bit), "?")


def _denial(kind: str, steps, p: RangeParams, view: tuple, pan: bool, pan3: bool) -> str:
    """Why `kind` is denied ("" if allowed), naming the descriptor and bit."""
    _, pw, ur, uw, px, ux = view
    leaf = steps[-1]
    e, name = leaf.entry, leaf.name
    ap = (e >> 6) & 3
    tattrs = table_attrs([s.entry for s in steps], p.hpd)
    el, op = kind.split("-")
    no_el0 = (f"EL0 has no access: AP={ap:02b} in the {name} descriptor" if not ap & 1 else
              f"APTable[0]=1 in the {_first(steps, 1 << 61)} descriptor: no EL0 access below it")
    if op == "write" and not (uw if el == "el0" else pw):
        if el == "el0" and not ur:
            return no_el0
        if ap & 2 and not (p.hd and e & DBM):
            dbm = (" (DBM=1, but hardware dirty state is off: TCR_EL1.HD=0 or no FEAT_HAFDBS)"
                   if e & DBM else "")
            return f"read-only: AP={ap:02b} in the {name} descriptor{dbm}"
        return f"APTable[1]=1 in the {_first(steps, 1 << 62)} descriptor: no writes below it"
    if op == "read" and el == "el0" and not ur:
        return no_el0
    if op == "execute":
        if el == "el0" and not ux:
            if e & UXN:
                return f"UXN=1 in the {name} descriptor"
            if tattrs & UXN_TABLE:
                return f"UXNTable=1 in the {_first(steps, UXN_TABLE)} descriptor"
            return "SCTLR_EL1.WXN=1 and EL0 may write this page"
        if el == "el1" and not px:
            if e & PXN:
                return f"PXN=1 in the {name} descriptor"
            if tattrs & PXN_TABLE:
                return f"PXNTable=1 in the {_first(steps, PXN_TABLE)} descriptor"
            if uw:
                return (f"EL0 may write this page (AP={ap:02b} in the {name} descriptor), so EL1 "
                        f"may not execute it")
            return "SCTLR_EL1.WXN=1 and EL1 may write this page"
        return ""
    if el == "el1" and pan and (ur or uw or (pan3 and ux)):
        what = "read" if ur else "execute"
        return (f"PAN: PSTATE.PAN=1 and EL0 may {what} this page"
                + (" (FEAT_PAN3, SCTLR_EL1.EPAN=1)" if what == "execute" else ""))
    return ""


def _e0pd_message(p: RangeParams) -> str:
    return (f"TCR_EL1.E0PD{p.select}=1: EL0 accesses to the {p.reg} range take a translation "
            f"fault at level 0 (FEAT_E0PD)")


def _access_table(steps, p: RangeParams, level: int, r: tuple, w: tuple, pan: bool,
                  pan3: bool, fetch_oob: bool) -> Dict[str, AccessResult]:
    code = fault_status(PERMISSION, level)
    table = {}
    for kind in ARM64_ACCESS_KINDS:
        if fetch_oob and kind.endswith("execute"):
            table[kind] = AccessResult(False, fault_status(TRANSLATION, 0),
                                       "translation fault at level 0: with TBID the top byte "
                                       "counts for instruction fetches, and it is not the "
                                       "sign extension")
            continue
        if p.e0pd and kind.startswith("el0"):
            table[kind] = AccessResult(False, fault_status(TRANSLATION, 0), _e0pd_message(p))
            continue
        why = _denial(kind, steps, p, w if kind.endswith("write") else r, pan, pan3)
        table[kind] = AccessResult(False, code, f"permission fault: {why}") if why \
            else AccessResult(True, None, "")
    return table


def stage1_off_output(state: Arm64State, va: int) -> Optional[int]:
    """With stage 1 off (SCTLR.M=0): the address an access to `va` goes out with
    (AArch64.S1DisabledOutput: the VA itself, top byte dropped where TBI ignores it), or
    None when VA bits above PAMax are set (an address size fault)."""
    top, _ = pamax(state)
    tbi = state.tcr >> (37 + ((va >> 55) & 1)) & 1
    width = 56 if tbi else 64
    if va >> top & ((1 << (width - top)) - 1):
        return None
    return va & ((1 << top) - 1)


def walk_arm64(read_phys: ReadPhys, state: Arm64State, va: int, access: str = "el1-read"
               ) -> Walk:
    """Translate `va` as stage 1 of the EL1&0 regime would; never raises for what it reads.
    `access` is the kind whose fault status code a fault reports (Fault.error_code)."""
    if access not in ARM64_ACCESS_KINDS:
        raise ValueError(f"access must be one of {', '.join(ARM64_ACCESS_KINDS)}, "
                         f"not {access!r}")
    if not 0 <= va < 1 << 64:
        raise ValueError(f"{va:#x} is not a 64-bit virtual address")
    top, assumed = pamax(state)
    notes: List[str] = [ASSUMED_PAMAX_NOTE] if assumed else []
    mode: Optional[PagingMode] = None
    root, oa_bits = 0, top

    def failed(fault: Fault, steps: Tuple[LevelStep, ...] = ()) -> Walk:
        if fault.reason in (TRANSLATION, ADDRESS_SIZE, ACCESS_FLAG):
            denied = AccessResult(False, fault.error_code, f"{fault.reason} fault at {fault.level}")
        else:
            denied = AccessResult(False, None, f"no translation: {fault.reason}")
        return Walk(va, mode, root, None, steps, None, None, None, None, None, fault,
                    {k: denied for k in ARM64_ACCESS_KINDS}, assumed, oa_bits, tuple(notes))

    if not state.sctlr & SCTLR_M:
        extra = ("" if stage1_off_output(state, va) is not None else
                 f"; bits above PAMax ({top}) are set, so an access takes an address size "
                 f"fault at level 0")
        return failed(Fault(None, PAGING_DISABLED, f"SCTLR_EL1.M=0: stage 1 translation is off, "
                                                   f"so the VA is the PA{extra}"))
    p = range_params(state, (va >> 55) & 1)
    notes += p.notes
    mode, root, oa_bits = p.mode, ttbr_base(p), p.oa_bits
    pan, pan3 = _pan(state, notes)
    asid_at = len(notes)
    notes.append(_asid_note(state))
    fetch = access.endswith("execute")
    level0 = fault_status(TRANSLATION, 0)
    if _out_of_range(p, va, fetch):
        tbi = p.tbi and not (fetch and p.tbid)
        return failed(Fault("L0", TRANSLATION,
                            f"{va:#x} is outside the {p.reg} range: bits "
                            f"{55 if tbi else 63}:{64 - p.tsz} must all be {p.select} "
                            f"(T{p.select}SZ={p.tsz}, TBI{p.select}={p.tbi:d}"
                            f"{f', TBID{p.select}=1' if p.tbid else ''}), so a translation "
                            f"fault at level 0", level0))
    if p.tbi and va >> 56 != (0xFF if p.select else 0):
        notes.append(f"top byte {va >> 56:#04x} ignored (TCR_EL1.TBI{p.select}=1)")
    if p.epd:
        return failed(Fault("L0", TRANSLATION, f"TCR_EL1.EPD{p.select}=1: walks of the "
                                               f"{p.reg} range are disabled, so a translation "
                                               f"fault at level 0", level0))
    if p.tsz_fault:
        return failed(Fault("L0", TRANSLATION, p.tsz_fault, level0))
    if p.e0pd and access.startswith("el0"):
        return failed(Fault("L0", TRANSLATION, _e0pd_message(p), level0))
    if root >> p.oa_bits:
        note = p.ttbr52 and _qemu_high_bits_note(f"{p.reg} bits[5:2]", root & bits(47, 0), p)
        if note:
            notes.append(note)
        return failed(Fault("L0", ADDRESS_SIZE,
                            f"{p.reg} base {root:#x} is beyond the {p.oa_bits}-bit output address "
                            f"size ({_oa_why(p, state)})", fault_status(ADDRESS_SIZE, 0)))

    qemu_root = _qemu_ttbr_base(p)
    if qemu_root != root:
        notes.append(f"QEMU 7.2 aligns {p.reg} only to the first table's size, without the "
                     f"64-byte minimum of AArch64.TTBaseAddress, and would walk from "
                     f"{qemu_root:#x}")
    read = _reader(read_phys, state)
    fmt = arm64_format(p, state.mair)
    steps, fault = _walk_tables(read, p, fmt, state, root, va, notes)
    if state.sctlr & SCTLR_EE:
        notes.append("SCTLR_EL1.EE=1: descriptors were read big-endian")
    if fault:
        return failed(fault, steps)
    leaf = steps[-1]
    e = leaf.entry
    level = fmt.level(len(steps) - 1)
    if not e & NG:
        notes[asid_at] += "; this page is global (nG=0), so no ASID tags it"
    if not e & AF:
        if not p.ha:
            return failed(Fault(leaf.name, ACCESS_FLAG,
                                f"{leaf.name} descriptor {e:#x} has AF=0: an access takes an "
                                f"Access flag fault (TCR_EL1.HA=0 or no FEAT_HAFDBS)",
                                fault_status(ACCESS_FLAG, level)), steps)
        notes.append(f"AF=0 in the {leaf.name} descriptor: with TCR_EL1.HA=1 the CPU sets it "
                     f"on this access instead of faulting")
    wxn = bool(state.sctlr & SCTLR_WXN)
    r, w, writable, user, executable = _summary(p, wxn, [s.entry for s in steps])
    table = _access_table(steps, p, level, r, w, pan, pan3, _out_of_range(p, va, True))
    if e & DBM and (e >> 7) & 1 and p.hd and writable:
        notes.append(f"DBM=1 in the {leaf.name} descriptor with TCR_EL1.HD=1: a write to this "
                     f"writable-clean page clears AP[2] (hardware dirty state) instead of "
                     f"faulting")
    if e & CONT:
        notes.append(contiguous_note(p.granule, level, leaf.page_size, va))
    if executable and ((state.mair >> (8 * ((e >> 2) & 7))) & 0xF0) == 0:
        notes.append("instruction fetches from Device memory are CONSTRAINED UNPREDICTABLE "
                     "(AArch64.S1CheckPermissions may raise a permission fault)")
    # a denied `access` is a permission fault in `access`, not Walk.fault (as x86 walks do)
    pa = leaf.next_addr | (va & (leaf.page_size - 1))
    return Walk(va, mode, root, None, steps, pa, leaf.page_size, writable, user, executable,
                None, table, assumed, oa_bits, tuple(notes))


def iter_mappings_arm64(read_phys: ReadPhys, state: Arm64State, start: int = 0,
                        end: Optional[int] = None,
                        on_unreadable: Optional[Callable[[str, int, Exception], None]] = None
                        ) -> Iterator[Mapping]:
    """Every valid leaf overlapping [start, end) (end exclusive, None = to 2**64) of both VA
    ranges, in VA order, TTBR1 addresses sign-extended; lazily. Each table is read once, whole,
    with one read_phys call (the granule, or the smaller first table). Leaves with AF=0 are
    listed (they map; an access faults or sets AF). Ranges whose walks cannot start (EPDn=1,
    TnSZ out of bounds, TTBRn beyond the output size) are skipped; unreadable tables are
    skipped and passed to on_unreadable(level name, address, error). Nothing when the MMU is
    off."""
    if not state.sctlr & SCTLR_M:
        return
    read = _reader(read_phys, state)
    wxn = bool(state.sctlr & SCTLR_WXN)
    for n in (0, 1):
        p = range_params(state, n)
        root = ttbr_base(p)
        window = range_window(p, start, end)
        if p.epd or p.tsz_fault or root >> p.oa_bits or window is None:
            continue
        base, lo, hi = window
        fmt = arm64_format(p, state.mair)
        known: Dict[tuple, tuple] = {}           # leaves repeat a few attribute sets
        for raw, i, path in iter_leaves(read, p.mode, fmt, root, lo, hi, on_unreadable):
            leaf = path[-1]
            key = (i, leaf & FLAG_BITS, table_attrs(path, p.hpd))
            got = known.get(key)
            if got is None:
                _, _, writable, user, executable = _summary(p, wxn, path)
                got = known[key] = (writable, user, executable, fmt.flags(i, leaf, True))
            yield Mapping(base + raw, fmt.frame(i, leaf, True), fmt.sizes[i], got[0], got[1],
                          got[2], path, got[3])
