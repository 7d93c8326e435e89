"""RISC-V (RV64) guest page walks: Sv39, Sv48 and Sv57 as the privileged spec 1.12 translates
(4.3.2 "Virtual Address Translation Process", with Svnapot and Svpbmt).

walk_riscv() translates one VA and says what each kind of access would do there;
iter_mappings_riscv() lists every valid leaf of both halves of the address space, reading each
table once. Both return the records of model.py, so every renderer works unchanged. The state,
modes and PTE format are in riscv_format.py.

Where QEMU 7.2 (target/riscv/cpu_helper.c get_physical_address) answers otherwise than the spec,
the walk gives the spec's answer and a note says what QEMU would do. A and D bits: the spec lets
a hart either fault or set them; QEMU 7.2 sets them, and so the walk allows such accesses
unless RiscvState.hardware_ad is False, with a note naming both behaviours.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import MemoryReadError
from .formats import bit_list, size_name
from .model import (
    ACCESS_FLAG, MISALIGNED_SUPERPAGE, NO_LEAF, NON_CANONICAL, NOT_PRESENT, PAGING_DISABLED,
    RESERVED_BIT, UNREADABLE, AccessResult, Fault, LevelStep, Mapping, ReadPhys, Walk,
)
from .riscv_format import (
    A, D, FLAG_BITS, G, MSTATUS_MPP_SHIFT, MSTATUS_MPRV, MSTATUS_MXR, MSTATUS_SUM, N,
    NAPOT_SIZE, PA_BITS, PAGE_FAULT_CODES, PBMT, PBMT_SHIFT, PRIV_NAMES, R, RESERVED, U, W, X,
    RiscvFormat, RiscvState, pte_ppn, riscv_format, riscv_mode, satp_asid, satp_mode_field,
    satp_root,
)
from .walker import iter_leaves
from .x86 import raw_bounds

__all__ = ["RiscvState", "riscv_mode", "walk_riscv", "iter_mappings_riscv",
           "RISCV_ACCESS_KINDS", "satp_root", "satp_asid", "page_fault_code"]

#: The keys of Walk.access for RISC-V walks.
RISCV_ACCESS_KINDS = ("s-read", "s-write", "s-execute", "u-read", "u-write", "u-execute")


def page_fault_code(access: str) -> int:
    """The scause a denied access reports: 12 instruction, 13 load, 15 store/AMO page fault."""
    return PAGE_FAULT_CODES[access.split("-")[1]]


def _mode_notes(state: RiscvState) -> List[str]:
    priv = state.priv
    if priv == 3:
        mpp = PRIV_NAMES.get(state.mstatus >> MSTATUS_MPP_SHIFT & 3, "reserved")
        mprv = (f"; with mstatus.MPRV=1 its loads and stores translate as {mpp}-mode's"
                if state.mstatus & MSTATUS_MPRV else "")
        return [f"the hart is in M-mode, whose own accesses are not translated{mprv}: s-* and "
                f"u-* are the accesses of S- and U-mode"]
    if priv not in PRIV_NAMES:
        return [f"priv={priv} is not a privilege mode (0 U, 1 S, 3 M)"]
    return []


def _qemu_notes(fmt: RiscvFormat, state: RiscvState, e: int, leaf: bool) -> List[str]:
    """What QEMU 7.2 does with the reserved bits this PTE sets, where it differs from the
    spec: it tests bits 63:54 only on a CPU with neither Svpbmt nor Svnapot (else it masks
    them off), ignores menvcfg.PBMTE and accepts PBMT=3."""
    notes = []
    either = state.svpbmt is not False or state.svnapot is not False
    masked = "masks bits 63:54 off on a CPU with Svpbmt or Svnapot"
    if e & RESERVED and either:
        notes.append(f"QEMU 7.2 {masked} and would ignore bits 60:54")
    if leaf and e & N and not fmt.napot and state.svpbmt is not False:
        notes.append(f"QEMU 7.2 {masked} and would ignore N here (no Svnapot)")
    if leaf and e & PBMT and state.svpbmt is not False:
        if not fmt.pbmt:
            notes.append(f"QEMU 7.2 ignores menvcfg.PBMTE (it asks only whether the CPU has "
                         f"Svpbmt) and would accept PBMT={e >> PBMT_SHIFT & 3}")
        elif e & PBMT == PBMT:
            notes.append("QEMU 7.2 does not reject PBMT=3 (reserved)")
    return notes


def _assumed_notes(state: RiscvState, fmt: RiscvFormat, steps) -> List[str]:
    """Extensions taken as implemented because the state does not say, where the leaf used
    them (elsewhere N and PBMT are reserved whatever the hart has)."""
    leaf = steps[-1].entry if steps and steps[-1].leaf else 0
    notes = []
    if leaf & PBMT and state.svpbmt is None:
        notes.append("Svpbmt unknown: taken as implemented (PBMT read as a memory type)")
    if leaf & PBMT and fmt.pbmt and state.menvcfg is None:
        notes.append("menvcfg unknown: PBMTE taken as 1")
    if leaf & N and state.svnapot is None:
        notes.append("Svnapot unknown: taken as implemented (N=1 read as a NAPOT page)")
    return notes


def _walk_tables(read_phys: ReadPhys, fmt: RiscvFormat, state: RiscvState, root: int, va: int,
                 code: int, notes: List[str]
                 ) -> Tuple[Tuple[LevelStep, ...], Optional[Fault]]:
    """4.3.2 steps 2-6: one PTE per level, one read each, until a leaf or a page fault."""
    steps: List[LevelStep] = []
    table = root
    mode = fmt.mode
    for i, spec in enumerate(mode.levels):
        index = (va >> spec.shift) & 511
        entry_addr = table + 8 * index
        try:
            raw = read_phys(entry_addr, 8)
            if len(raw) != 8:
                raise MemoryReadError(f"read returned {len(raw)} bytes, not 8", entry_addr)
        except MemoryReadError as exc:
            return tuple(steps), Fault(spec.name, UNREADABLE,
                                       f"cannot read the {spec.name} PTE (index {index}) at "
                                       f"{entry_addr:#x}: {exc}")
        e = int.from_bytes(raw, "little")
        head = f"{spec.name} PTE {e:#x} (index {index} at {entry_addr:#x})"
        if not fmt.present(e):
            steps.append(LevelStep(spec.name, spec.linux_name, index, table, entry_addr, e,
                                   fmt.flags(i, e, False), None, False, None))
            return tuple(steps), Fault(spec.name, NOT_PRESENT, f"{head} is invalid (V=0)", code)
        leaf = fmt.is_leaf(i, e)
        steps.append(LevelStep(spec.name, spec.linux_name, index, table, entry_addr, e,
                               fmt.flags(i, e, leaf), fmt.frame(i, e, leaf), leaf,
                               fmt.size(i, e) if leaf else None))
        problems = fmt.problems(i, e, leaf)
        if problems:
            notes += _qemu_notes(fmt, state, e, leaf)
            why = "; ".join(f"{bit_list(m)}: {w}" for m, w in problems)
            return tuple(steps), Fault(spec.name, RESERVED_BIT,
                                       f"{head} sets reserved bits or encodings ({why})", code)
        if not leaf:
            if i == fmt.last:
                return tuple(steps), Fault(spec.name, NO_LEAF,
                                           f"{head} points to a further table (R=W=X=0) at the "
                                           f"last level", code)
            table = fmt.frame(i, e, False)
            continue
        extra = fmt.misaligned(i, e)
        if extra:
            lv = fmt.last - i
            fields = "pte.ppn[0]" if lv == 1 else f"pte.ppn[{lv - 1}:0]"
            return tuple(steps), Fault(spec.name, MISALIGNED_SUPERPAGE,
                                       f"{head} maps a {size_name(fmt.sizes[i])} page but "
                                       f"{fields} = {extra:#x}, not 0: a misaligned superpage",
                                       code)
        return tuple(steps), None
    raise AssertionError("the last level always ends the walk")  # pragma: no cover


def _denial(kind: str, e: int, name: str, state: RiscvState) -> str:
    """Why `kind` is denied by the leaf PTE `e` ("" when allowed): 4.3.1 and 3.1.6.3."""
    priv, op = kind.split("-")
    sum_, mxr = state.mstatus & MSTATUS_SUM, state.mstatus & MSTATUS_MXR
    if priv == "u" and not e & U:
        return f"U=0 in the {name} PTE: U-mode may not access a supervisor page"
    if priv == "s" and e & U:
        if op == "execute":
            return f"U=1 in the {name} PTE: S-mode never executes from a user page"
        if not sum_:
            return (f"U=1 in the {name} PTE and mstatus.SUM=0: S-mode may not load or store "
                    f"to a user page")
    if op == "read" and not (e & R or (mxr and e & X)):
        if e & X:
            return f"R=0 in the {name} PTE (X=1, but mstatus.MXR=0)"
        return f"R=0 and X=0 in the {name} PTE" if mxr else f"R=0 in the {name} PTE"
    if op == "write":
        if not e & W:
            return f"W=0 in the {name} PTE"
        if not e & D and state.hardware_ad is False:
            return f"D=0 in the {name} PTE and this hart does not set it (Svade)"
    if op == "execute" and not e & X:
        return f"X=0 in the {name} PTE"
    return ""


def _ad_notes(state: RiscvState, e: int, name: str) -> List[str]:
    """A=0, or D=0 on a writable page: the spec lets a hart fault (Svade) or set the bit
    itself (Svadu); QEMU 7.2 sets it."""
    missing = [(bit, when) for bit, mask, when, need in (("A", A, "first access", True),
                                                         ("D", D, "first store", bool(e & W)))
               if need and not e & mask]
    if not missing or state.hardware_ad is False:
        return []
    which = " and ".join(f"{bit}=0" for bit, _ in missing)
    sets = " and ".join(f"the {when} sets {bit}" for bit, when in missing)
    it = "them" if len(missing) > 1 else "it"
    if state.hardware_ad:
        return [f"{which} in the {name} PTE: this hart sets {it} itself (Svadu): {sets}; a "
                f"Svade hart would take a page fault instead"]
    return [f"{which} in the {name} PTE: a hart either takes a page fault (Svade) or sets {it} "
            f"itself (Svadu), as QEMU 7.2 does and as assumed here: {sets}"]


def _access_table(e: int, name: str, state: RiscvState) -> Dict[str, AccessResult]:
    table = {}
    for kind in RISCV_ACCESS_KINDS:
        why = _denial(kind, e, name, state)
        table[kind] = AccessResult(False, page_fault_code(kind), f"page fault: {why}") if why \
            else AccessResult(True, None, "")
    return table


def _global_path(steps) -> Optional[str]:
    """The first PTE on the path with G=1 (a global pointer makes all below it global)."""
    return next((s.name for s in steps if s.entry & G), None)


def walk_riscv(read_phys: ReadPhys, state: RiscvState, va: int, access: str = "s-read") -> Walk:
    """Translate `va` as a hart with these registers would for S- and U-mode accesses; never
    raises for what it reads. `access` is the kind whose scause a fault reports
    (Fault.error_code: 12, 13 or 15)."""
    if access not in RISCV_ACCESS_KINDS:
        raise ValueError(f"access must be one of {', '.join(RISCV_ACCESS_KINDS)}, "
                         f"not {access!r}")
    if not 0 <= va < 1 << 64:
        raise ValueError(f"{va:#x} is not a 64-bit virtual address")
    code = page_fault_code(access)
    mode = riscv_mode(state)
    root = satp_root(state.satp) if mode else 0
    notes: List[str] = _mode_notes(state)

    def failed(fault: Fault, steps: Tuple[LevelStep, ...] = ()) -> Walk:
        if fault.reason in (UNREADABLE, PAGING_DISABLED):
            table = {k: AccessResult(False, None, f"no translation: {fault.reason}")
                     for k in RISCV_ACCESS_KINDS}
        else:
            at = f" at {fault.level}" if fault.level else ""
            table = {k: AccessResult(False, page_fault_code(k), f"page fault ({fault.reason}){at}")
                     for k in RISCV_ACCESS_KINDS}
        return Walk(va, mode, root, None, steps, None, None, None, None, None, fault, table,
                    False, PA_BITS, tuple(notes))

    if mode is None:
        value = satp_mode_field(state.satp)
        why = ("satp.MODE=0 (Bare): no translation, the VA is the PA" if value == 0 else
               f"satp.MODE={value} is not an RV64 translation mode (8 Sv39, 9 Sv48, 10 Sv57): "
               f"a hart never holds it (a write of an unsupported MODE has no effect)")
        return failed(Fault(None, PAGING_DISABLED, why))
    asid_at = len(notes)
    notes.append(f"ASID {satp_asid(state.satp):#x} (satp[59:44])")
    n = mode.va_bits
    top = va >> (n - 1)
    if top not in (0, (1 << (65 - n)) - 1):
        return failed(Fault(None, NON_CANONICAL,
                            f"{va:#x} is not sign-extended: in {mode.name.capitalize()} bits "
                            f"63:{n} must all equal bit {n - 1}, else a page fault", code))
    fmt = riscv_format(state, mode)
    steps, fault = _walk_tables(read_phys, fmt, state, root, va, code, notes)
    notes += _assumed_notes(state, fmt, steps)
    if fault:
        return failed(fault, steps)
    leaf = steps[-1]
    e = leaf.entry
    glob = _global_path(steps)
    if glob:
        notes[asid_at] += f"; this page is global (G=1 in the {glob} PTE), so no ASID tags it"
    if not e & A and state.hardware_ad is False:
        return failed(Fault(leaf.name, ACCESS_FLAG,
                            f"{leaf.name} PTE {e:#x} has A=0 and this hart does not set it "
                            f"(Svade): every access takes a page fault", code), steps)
    notes += _ad_notes(state, e, leaf.name)
    if e & N:
        notes.append(f"NAPOT: one of the 16 PTEs of a 64 KiB page (Svnapot); this PTE maps "
                     f"VA {va & ~0xFFF:#x} to {leaf.next_addr | (va & 0xF000):#x}")
    pa = leaf.next_addr | (va & (leaf.page_size - 1))
    return Walk(va, mode, root, None, steps, pa, leaf.page_size, bool(e & W), bool(e & U),
                bool(e & X), None, _access_table(e, leaf.name, state), False, PA_BITS,
                tuple(notes))


def iter_mappings_riscv(read_phys: ReadPhys, state: RiscvState, start: int = 0,
                        end: Optional[int] = None,
                        on_unreadable: Optional[Callable[[str, int, Exception], None]] = None
                        ) -> Iterator[Mapping]:
    """Every valid leaf overlapping [start, end) (sign-extended addresses, end exclusive, None =
    to 2**64), in address order; lazily. Each table is read once, whole, with one
    read_phys(table, 4096) call; unreadable tables are skipped and passed to
    on_unreadable(level name, address, error). Leaves with A=0 or D=0 are listed (they map; an
    access sets the bit or faults). A NAPOT PTE maps its own 4 KiB of its 64 KiB page, and is
    listed so (leaves never overlap). Nothing with satp.MODE Bare."""
    mode = riscv_mode(state)
    if mode is None:
        return
    fmt = riscv_format(state, mode)
    lo, hi = raw_bounds(mode, start, end)
    n = mode.va_bits
    sign = (1 << 64) - (1 << n)
    flags_of: Dict[Tuple[int, int], Tuple[str, ...]] = {}   # leaves repeat a few flag sets
    for raw, i, path in iter_leaves(read_phys, mode, fmt, satp_root(state.satp), lo, hi,
                                    on_unreadable):
        e = path[-1]
        key = (i, e & FLAG_BITS)
        flags = flags_of.get(key)
        if flags is None:
            flags = flags_of[key] = fmt.flags(i, e, True)
        pa = pte_ppn(e) << 12
        if e & N:                                 # the 4 KiB of the NAPOT page this PTE maps
            pa = (pa & ~(NAPOT_SIZE - 1)) | (raw & 0xF000)
        va = raw + sign if raw >> (n - 1) else raw
        yield Mapping(va, pa, fmt.sizes[i], bool(e & W), bool(e & U), bool(e & X), path, flags)
