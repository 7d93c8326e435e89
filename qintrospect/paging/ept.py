"""Second-level translation: Intel EPT (SDM Vol 3, ch. 29) and AMD NPT (APM Vol 2, 15.25).

Both walk guest-physical addresses with the 4/5-level geometry. EPT entries carry R/W/X rights,
a memory type at leaves and can be misconfigured; NPT entries are ordinary long-mode entries,
and every nested access counts as a user access.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Tuple

from ..record import replace
from .formats import ADDR_51_12, EPT_PS, MEMORY_TYPES, PS, EptFormat, X86Format, bits
from .model import (
    EPT_ACCESS_KINDS, EPT_MISCONFIGURATION, NON_CANONICAL, NOT_PRESENT, PF_ID, PF_P, PF_RSVD,
    PF_US, PF_WR, RESERVED_BIT, AccessResult, Fault, LevelStep, PagingMode, ReadPhys, Walk,
)
from .modes import GIB1, MODE_EPT4, MODE_EPT5, MODE_NPT4, MODE_NPT5
from .walker import walk_tables

__all__ = ["decode_eptp", "walk_ept", "walk_npt"]

EPT_PAGE1GB_UNKNOWN_NOTE = ("IA32_VMX_EPT_VPID_CAP unknown (bit 17: 1-GByte EPT pages): the "
                            "1 GiB EPT page was accepted")
NPT_PAGE1GB_UNKNOWN_NOTE = "host CPUID Page1GB unknown: the 1 GiB NPT page was accepted"
# Said when an NPT PDPTE with PS=1 faults only because the host CPU has no 1 GiB pages.
NPT_PAGE1GB_TCG_NOTE = ("QEMU's TCG does not check CPUID Page1GB and would map this 1 GiB page "
                        "anyway (its SVM emulation walks nested tables with the same "
                        "mmu_translate, which tests only the reserved-bit mask at the PDPT "
                        "level), while a real CPU without 1-GByte pages raises #NPF with RSVD: "
                        "this answer is the hardware's, not QEMU's")


@lru_cache(maxsize=16)
def ept_format(mode: PagingMode, maxphyaddr: int, mbec: bool,
                page1gb: Optional[bool] = None) -> EptFormat:
    return EptFormat(mode, maxphyaddr, mbec, page1gb)


@lru_cache(maxsize=16)
def npt_format(mode: PagingMode, maxphyaddr: int, nxe: bool,
                page1gb: Optional[bool] = None) -> X86Format:
    return X86Format(mode, maxphyaddr, nxe, page1gb=page1gb)


def _meets_1g(mode: PagingMode, steps: Tuple[LevelStep, ...], ps: int) -> Optional[int]:
    """The index of the PDPT step of this walk when its entry has PS (bit 7) set, else None."""
    k = next(i for i, spec in enumerate(mode.levels) if spec.large_page == GIB1)
    return k if len(steps) > k and steps[k].entry & ps else None


def decode_eptp(eptp: int, maxphyaddr: int = 52) -> dict:
    """The fields of an EPT pointer (SDM 25.6.11): memory type, walk length, A/D, root; and
    `problems`, the reasons VM entry would refuse it (empty when valid)."""
    mt = eptp & 7
    length = ((eptp >> 3) & 7) + 1
    problems = []
    if mt not in (0, 6):
        problems.append(f"memory type {mt} is neither UC (0) nor WB (6)")
    if length not in (4, 5):
        problems.append(f"walk length {length} is neither 4 nor 5")
    if eptp & bits(11, 8):
        problems.append(f"reserved bits 11:8 are {(eptp >> 8) & 0xF:#x}")
    if eptp & bits(63, maxphyaddr):
        problems.append(f"bits above MAXPHYADDR {maxphyaddr} are set")
    return {
        "root": eptp & ADDR_51_12,
        "memory_type": mt,
        "memory_type_name": MEMORY_TYPES.get(mt, "reserved"),
        "walk_length": length,
        "ad_enabled": bool(eptp >> 6 & 1),
        "supervisor_shadow_stack": bool(eptp >> 7 & 1),
        "valid": not problems,
        "problems": problems,
    }


def _range_fault(mode: PagingMode, gpa: int, what: str) -> Optional[Fault]:
    if 0 <= gpa < 1 << mode.va_bits:
        return None
    return Fault(None, NON_CANONICAL, f"GPA {gpa:#x} is beyond the {mode.va_bits} bits that "
                                      f"{what} translates")


def _first(steps: Tuple[LevelStep, ...], test) -> str:
    return next((s.name for s in steps if test(s.entry)), "?")


def walk_ept(read_phys: ReadPhys, eptp: int, gpa: int, maxphyaddr: int = 52,
             mbec: bool = False, page1gb: Optional[bool] = None) -> Walk:
    """Translate guest-physical `gpa` through the EPT that `eptp` points to. Access keys are
    "read", "write", "execute" (and "user-execute" with mode-based execute control, mbec).
    page1gb is IA32_VMX_EPT_VPID_CAP bit 17 (1-GByte EPT pages): False makes bit 7 of a PDPTE
    an EPT misconfiguration; None (unknown) accepts 1 GiB pages and says so when it meets one."""
    info = decode_eptp(eptp, maxphyaddr)
    mode = MODE_EPT5 if info["walk_length"] == 5 else MODE_EPT4
    kinds = EPT_ACCESS_KINDS + (("user-execute",) if mbec else ())
    root = info["root"]

    def failed(fault: Fault, steps: Tuple[LevelStep, ...] = ()) -> Walk:
        denied = AccessResult(False, None, f"{fault.reason}" + (f" at {fault.level}"
                                                                  if fault.level else ""))
        return Walk(gpa, mode, root, None, steps, None, None, None, None, None, fault,
                    {k: denied for k in kinds}, False, maxphyaddr)

    if info["problems"]:
        return failed(Fault(None, EPT_MISCONFIGURATION, f"EPTP {eptp:#x} is invalid (VM entry "
                                                        f"fails): {'; '.join(info['problems'])}"))
    bad = _range_fault(mode, gpa, f"{info['walk_length']}-level EPT")
    if bad:
        return failed(bad)
    fmt = ept_format(mode, maxphyaddr, mbec, page1gb)
    steps, fault = walk_tables(read_phys, mode, fmt, root, gpa)
    if fault:
        return failed(fault, steps)
    big = _meets_1g(mode, steps, EPT_PS)
    notes = (EPT_PAGE1GB_UNKNOWN_NOTE,) if page1gb is None and big is not None else ()

    rights = [fmt.rights(s.entry) for s in steps]
    r, w, x, xu = (all(rr[k] for rr in rights) for k in range(4))
    names = {"read": (r, 1, "R"), "write": (w, 2, "W"), "execute": (x, 4, "X"),
             "user-execute": (xu, 1 << 10, "XU")}
    access: Dict[str, AccessResult] = {}
    for kind in kinds:
        ok, bit, name = names[kind]
        access[kind] = AccessResult(True, None, "") if ok else AccessResult(
            False, None, f"EPT violation: {name}=0 in the "
                         f"{_first(steps, lambda e, b=bit: not e & b)} entry")
    leaf = steps[-1]
    pa = leaf.next_addr | (gpa & (leaf.page_size - 1))
    return Walk(gpa, mode, root, None, steps, pa, leaf.page_size, w, None, x, None, access,
                False, maxphyaddr, notes)


def walk_npt(read_phys: ReadPhys, ncr3: int, gpa: int, levels: int = 4, maxphyaddr: int = 52,
             nxe: bool = True, page1gb: Optional[bool] = None) -> Walk:
    """Translate guest-physical `gpa` through AMD nested page tables rooted at nCR3. Access keys
    are "read", "write", "execute"; error codes are the #NPF EXITINFO1 low bits (the #PF bits
    with U/S always 1, since nested accesses are user accesses). page1gb is the host CPU's
    CPUID Page1GB (NPT uses the long-mode format): False makes PS in a PDPTE a reserved bit
    (#NPF with RSVD); None (unknown) accepts 1 GiB pages and says so when it meets one."""
    if levels not in (4, 5):
        raise ValueError(f"NPT has 4 or 5 levels, not {levels}")
    mode = MODE_NPT5 if levels == 5 else MODE_NPT4
    root = ncr3 & ADDR_51_12
    id_bit = PF_ID if nxe else 0
    kind_bits = {"read": PF_US, "write": PF_US | PF_WR, "execute": PF_US | id_bit}

    def failed(fault: Fault, steps: Tuple[LevelStep, ...] = (), notes: Tuple[str, ...] = ()
               ) -> Walk:
        if fault.reason in (NOT_PRESENT, RESERVED_BIT):
            base = 0 if fault.reason == NOT_PRESENT else PF_P | PF_RSVD
            table = {k: AccessResult(False, base | b, f"#NPF: {fault.reason} {fault.level} entry")
                     for k, b in kind_bits.items()}
        else:
            table = {k: AccessResult(False, None, f"no translation: {fault.reason}")
                     for k in kind_bits}
        fault = replace(fault, error_code=table["read"].error_code)
        return Walk(gpa, mode, root, None, steps, None, None, None, None, None, fault, table,
                    False, maxphyaddr, notes)

    bad = _range_fault(mode, gpa, f"{levels}-level NPT")
    if bad:
        return failed(bad)
    fmt = npt_format(mode, maxphyaddr, nxe, page1gb)
    steps, fault = walk_tables(read_phys, mode, fmt, root, gpa)
    big = _meets_1g(mode, steps, PS)
    if fault:
        notes: Tuple[str, ...] = ()
        if big is not None and page1gb is False and fault.reason == RESERVED_BIT \
                and fault.level == steps[big].name \
                and not npt_format(mode, maxphyaddr, nxe, True).problems(
                    big, steps[big].entry, True):
            notes = (NPT_PAGE1GB_TCG_NOTE,)   # valid as a 1 GiB page: TCG would map it
        return failed(fault, steps, notes)

    rights = [fmt.rights(i, s.entry) for i, s in enumerate(steps)]
    w = all(r[0] for r in rights)
    u = all(r[1] for r in rights)
    x = not any(r[2] for r in rights)
    reasons = {
        "read": "",
        "write": "" if w else f"write to read-only page (R/W=0 in the "
                              f"{_first(steps, lambda e: not e & 2)} entry)",
        "execute": "" if x else f"fetch from no-execute page (XD=1 in the "
                                f"{_first(steps, lambda e: e >> 63)} entry)",
    }
    access = {}
    for kind, b in kind_bits.items():
        reason = reasons[kind]
        if not u:
            reason = (f"nested accesses are user accesses: U/S=0 in the "
                      f"{_first(steps, lambda e: not e & 4)} entry")
        access[kind] = (AccessResult(False, PF_P | b, reason) if reason
                        else AccessResult(True, None, ""))
    leaf = steps[-1]
    pa = leaf.next_addr | (gpa & (leaf.page_size - 1))
    notes = (NPT_PAGE1GB_UNKNOWN_NOTE,) if page1gb is None and big is not None else ()
    return Walk(gpa, mode, root, None, steps, pa, leaf.page_size, w, u, x, None, access,
                False, maxphyaddr, notes)
