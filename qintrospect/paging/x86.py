"""x86 guest page walks: 32-bit, PAE, 4-level and 5-level paging (Intel SDM Vol 3, ch. 4).

walk() translates one linear address and says what each kind of access would do there;
iter_mappings() lists every present leaf of an address space, reading each table once.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Dict, Iterator, Optional, Tuple

from ..errors import MemoryReadError
from ..record import replace
from .formats import ADDR_51_12, PS, X86Format
from .model import (
    NON_CANONICAL, NOT_PRESENT, PAGING_DISABLED, PF_ID, PF_P, PF_PK, PF_RSVD, PF_US, PF_WR,
    RESERVED_BIT, X86_ACCESS_KINDS, AccessResult, CpuState, Fault, LevelStep, Mapping,
    PagingMode, ReadPhys, Walk,
)
from .modes import (
    CR0_WP, CR4_PAE, CR4_PCIDE, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP, EFER_NXE, GIB1,
    paging_mode,
)
from .walker import iter_leaves, walk_tables

__all__ = ["paging_mode", "walk", "iter_mappings", "cr3_root", "x86_format", "pdpte_registers"]

DEFAULT_MAXPHYADDR = 52
FLAG_BITS = 0xF8000000000011FF      # the bits X86Format.flags reads: 8:0, 12, 63:59
PDPTE_ACCESSED_NOTE = ("PAE PDPTE has bit 5 (A) set, which the SDM reserves (MOV CR3 would #GP); "
                       "QEMU's TCG sets it when it walks, so it is not treated as a fault")
PAGE1GB_UNKNOWN_NOTE = "CPUID Page1GB unknown: the 1 GiB page was accepted"
# Said when a PDPTE with PS=1 faults only because the CPU has no 1 GiB pages.
PAGE1GB_TCG_NOTE = ("QEMU's TCG does not check CPUID Page1GB and would map this 1 GiB page "
                    "anyway (its mmu_translate tests only the reserved-bit mask at the PDPT "
                    "level; its debug paths, gva2gpa and `info tlb`, do the same), while a real "
                    "CPU without 1-GByte pages raises #PF with RSVD: this answer is the "
                    "hardware's, not QEMU's")
PAE_MEMORY_NOTE = ("PAE: the PDPTEs are read from memory at CR3[31:5] ({root:#x}); a CPU uses "
                   "the copies it loaded into its PDPTE registers at the last CR3 write, which "
                   "differ if the guest changed the PDPT since. QEMU's TCG reads memory at every "
                   "walk, like this walk; under KVM/VMX the processor's PDPTE registers apply, "
                   "and QEMU does not expose them")
# Why PKRU / IA32_PKRS may be unknown: QEMU shows neither.
KEY_REGISTER_HIDDEN = "QEMU exposes it neither in its gdbstub nor in `info registers`"


def _maxphyaddr(cpu: CpuState) -> Tuple[int, bool]:
    """(MAXPHYADDR to use, whether it was assumed)."""
    if cpu.maxphyaddr is None:
        return DEFAULT_MAXPHYADDR, True
    return cpu.maxphyaddr, False


def cr3_root(cpu: CpuState, mode: PagingMode) -> Tuple[int, Optional[int]]:
    """(first table's physical base, PCID or None) from CR3 in this mode (SDM 4.5, table 4-12)."""
    if mode.name == "32-bit":
        return cpu.cr3 & 0xFFFFF000, None
    if mode.name == "pae":
        return cpu.cr3 & 0xFFFFFFE0, None              # the 32-byte PDPT at CR3[31:5]
    pcid = cpu.cr3 & 0xFFF if cpu.cr4 & CR4_PCIDE else None
    return cpu.cr3 & ADDR_51_12, pcid                  # drops PCID or PWT/PCD, LAM and bit 63


def x86_format(cpu: CpuState, mode: PagingMode) -> X86Format:
    long = mode.name not in ("32-bit", "pae")     # keys and 1 GiB pages exist only in IA-32e
    return _format(mode, _maxphyaddr(cpu)[0], bool(cpu.efer & EFER_NXE),
                   long and bool(cpu.cr4 & CR4_PKE), long and bool(cpu.cr4 & CR4_PKS),
                   cpu.page1gb if long else None)


@lru_cache(maxsize=64)
def _format(mode: PagingMode, m: int, nxe: bool, pke: bool, pks: bool = False,
            page1gb: Optional[bool] = None) -> X86Format:
    # immutable once built: shared between walks
    return X86Format(mode, m, nxe, pke, pks=pks, page1gb=page1gb)


def pdpte_registers(cpu: CpuState, mode: PagingMode) -> Optional[Tuple[int, ...]]:
    """The PAE PDPTE registers to walk with instead of memory, when the state carries them."""
    if mode.name != "pae" or cpu.pdptes is None:
        return None
    regs = tuple(cpu.pdptes)
    if len(regs) != 4 or not all(isinstance(r, int) and 0 <= r < 1 << 64 for r in regs):
        raise ValueError(f"pdptes must be four 64-bit integers, not {cpu.pdptes!r}")
    return regs


def _canonical_fault(mode: PagingMode, va: int) -> Optional[Fault]:
    n = mode.va_bits
    if mode.name in ("32-bit", "pae"):
        if 0 <= va < 1 << 32:
            return None
        return Fault(None, NON_CANONICAL, f"{va:#x} is not a 32-bit linear address, the only "
                                          f"kind {mode.name} paging translates")
    if 0 <= va < 1 << (n - 1) or (1 << 64) - (1 << (n - 1)) <= va < 1 << 64:
        return None
    return Fault(None, NON_CANONICAL, f"{va:#x} is not canonical for {mode.name} paging: bits "
                                      f"63:{n - 1} must all equal bit {n - 1} (a CPU raises #GP)")


def _id_bit(cpu: CpuState) -> int:
    """I/D is reported only with SMEP, or with PAE-format tables and EFER.NXE (SDM 4.7)."""
    if cpu.cr4 & CR4_SMEP or (cpu.cr4 & CR4_PAE and cpu.efer & EFER_NXE):
        return PF_ID
    return 0


def _kind_bits(kind: str, id_bit: int) -> int:
    user, op = kind.split("-")
    return ((PF_US if user == "user" else 0) | (PF_WR if op == "write" else 0)
            | (id_bit if op == "execute" else 0))


def _fault_access(cpu: CpuState, fault: Fault) -> Dict[str, AccessResult]:
    """Every access is denied when there is no translation; #PF codes only for #PF faults."""
    if fault.reason in (NOT_PRESENT, RESERVED_BIT):
        base = 0 if fault.reason == NOT_PRESENT else PF_P | PF_RSVD
        id_bit = _id_bit(cpu)
        reason = f"#PF: {fault.reason} {fault.level} entry"
        return {k: AccessResult(False, base | _kind_bits(k, id_bit), reason)
                for k in X86_ACCESS_KINDS}
    return {k: AccessResult(False, None, f"no translation: {fault.reason}")
            for k in X86_ACCESS_KINDS}


def _first_without(steps: Tuple[LevelStep, ...], fmt: X86Format, which: int) -> str:
    """Name of the first level whose entry lacks R/W (which=0) or U/S (which=1), or sets XD (2)."""
    for i, s in enumerate(steps):
        r = fmt.rights(i, s.entry)
        if (which == 2 and r[2]) or (which != 2 and not r[which]):
            return s.name
    return "?"


def _access_table(cpu: CpuState, fmt: X86Format, steps: Tuple[LevelStep, ...], w: bool, u: bool,
                  x: bool, notes: list) -> Dict[str, AccessResult]:
    """SDM 4.6: what each kind of access does at a translated address."""
    wp = bool(cpu.cr0 & CR0_WP)
    smep, smap = bool(cpu.cr4 & CR4_SMEP), bool(cpu.cr4 & CR4_SMAP)
    id_bit = _id_bit(cpu)
    # SDM 4.6.2: PKRU governs user-mode addresses (CR4.PKE), IA32_PKRS supervisor-mode ones
    # (CR4.PKS); "user-mode" is the effective U/S across the levels.
    if u and fmt.pke:
        register, value, page = "PKRU", cpu.pkru, "user"
    elif not u and fmt.pks:
        register, value, page = "IA32_PKRS", cpu.pkrs, "supervisor"
    else:
        register = value = page = None
    key = fmt.protection_key(steps[-1].entry) if register else None
    ad = wd = False
    unknown = ""
    if key is not None:
        if value is None:
            notes.append(f"{register} unknown: protection key {key} of this {page} page "
                         f"not checked")
            unknown = f"protection key {key} of this {page} page: {register} unknown " \
                      f"({KEY_REGISTER_HIDDEN})"
        else:
            ad, wd = bool(value >> (2 * key) & 1), bool(value >> (2 * key + 1) & 1)
    if smap and u:
        notes.append("SMAP: supervisor data accesses judged with EFLAGS.AC=0")
    ro = f"R/W=0 in the {_first_without(steps, fmt, 0)} entry" if not w else ""
    sup = f"U/S=0 in the {_first_without(steps, fmt, 1)} entry" if not u else ""
    nx = f"XD=1 in the {_first_without(steps, fmt, 2)} entry" if not x else ""

    result = {}
    for kind in X86_ACCESS_KINDS:
        who, op = kind.split("-")
        user = who == "user"
        data = op != "execute"
        # Protection keys (SDM 4.6.2): AD stops data access; WD stops writes when CR0.WP=1,
        # and user writes (to user pages: PKRU) even when WP=0. They count in the error code
        # whenever they apply (SDM 4.7, PK flag).
        pk_denies = data and (ad or (wd and op == "write"
                                     and (wp or (user and register == "PKRU"))))
        reason = ""
        if user:
            if not u:
                reason = f"user access to supervisor page ({sup})"
            elif op == "write" and not w:
                reason = f"user write to read-only page ({ro})"
            elif op == "execute" and not x:
                reason = f"fetch from no-execute page ({nx})"
        else:
            if op == "execute":
                if not x:
                    reason = f"fetch from no-execute page ({nx})"
                elif u and smep:
                    reason = "SMEP: supervisor fetch from user page"
            elif u and smap:
                reason = f"SMAP: supervisor {op} of user page (EFLAGS.AC=0 assumed)"
            elif op == "write" and not w and wp:
                reason = f"write to read-only page ({ro}, CR0.WP=1)"
        if not reason and pk_denies:
            bit = "AD" if ad else "WD"
            reason = f"protection key {key}: {register}.{bit}{key}=1"
        if reason:
            code = PF_P | _kind_bits(kind, id_bit) | (PF_PK if pk_denies else 0)
            result[kind] = AccessResult(False, code, reason)
        else:
            # allowed by the paging bits; an unknown key register could still deny data access
            result[kind] = AccessResult(True, None, "", unknown if data else "")
    return result


def _pae_note(read_phys: ReadPhys, root: int, va: int, regs: Optional[Tuple[int, ...]]) -> str:
    """Where the PDPTE of this PAE walk came from (SDM 4.4.1: a CPU walks with the PDPTE
    registers it loaded at MOV CR3, not with memory)."""
    if regs is None:
        return PAE_MEMORY_NOTE.format(root=root)
    index = (va >> 30) & 3
    addr = root + 8 * index
    reg = regs[index]
    head = (f"PAE: PDPTE {index} is the CPU's PDPTE register ({reg:#x}), loaded at the last "
            f"CR3 write, not memory at {addr:#x}")
    try:
        raw = read_phys(addr, 8)
        if len(raw) != 8:
            raise MemoryReadError(f"read returned {len(raw)} bytes, not 8", addr)
    except MemoryReadError as exc:
        return f"{head}; memory there could not be read to compare ({exc})"
    memory = int.from_bytes(raw, "little")
    if memory == reg:
        return f"{head}; memory there holds the same value"
    return (f"{head}; memory there now holds {memory:#x}, not the register's {reg:#x}: the guest "
            f"changed the PDPT without reloading CR3, and the CPU still uses the register")


def _page1gb_note(mode: PagingMode, fmt: X86Format, steps: Tuple[LevelStep, ...],
                  fault: Optional[Fault]) -> Optional[str]:
    """The note a walk meeting a PDPTE with PS=1 needs, from what CPUID Page1GB is known to be."""
    k = next((i for i, spec in enumerate(mode.levels) if spec.large_page == GIB1), None)
    if k is None or len(steps) <= k or not steps[k].entry & PS:
        return None
    if fmt.page1gb is None and fault is None:
        return PAGE1GB_UNKNOWN_NOTE               # the walk translated through a 1 GiB page
    if fmt.page1gb is False and fault is not None and fault.reason == RESERVED_BIT \
            and fault.level == steps[k].name:
        # TCG maps it when the entry is valid as a 1 GiB page (with Page1GB) -- say so
        with1g = _format(mode, fmt.m, fmt.nxe, fmt.pke, fmt.pks, True)
        if not with1g.problems(k, steps[k].entry, True):
            return PAGE1GB_TCG_NOTE
    return None


def walk(read_phys: ReadPhys, cpu: CpuState, va: int, access: str = "supervisor-read") -> Walk:
    """Translate linear address `va` as the CPU in state `cpu` would; never raises for what it
    reads. `access` is the kind whose #PF error code a fault reports (Fault.error_code)."""
    if access not in X86_ACCESS_KINDS:
        raise ValueError(f"access must be one of {', '.join(X86_ACCESS_KINDS)}, not {access!r}")
    m, assumed = _maxphyaddr(cpu)
    notes = [f"MAXPHYADDR unknown: assumed {m}"] if assumed else []
    mode = paging_mode(cpu)

    def failed(fault: Fault, root: int = 0, pcid: Optional[int] = None,
               steps: Tuple[LevelStep, ...] = ()) -> Walk:
        table = _fault_access(cpu, fault)
        fault = replace(fault, error_code=table[access].error_code)
        return Walk(va, mode, root, pcid, steps, None, None, None, None, None, fault, table,
                    assumed, m, tuple(notes))

    if mode is None:
        return failed(Fault(None, PAGING_DISABLED, "CR0.PG=0: paging is off, so the linear "
                                                   "address is the physical address"))
    root, pcid = cr3_root(cpu, mode)
    bad = _canonical_fault(mode, va)
    if bad:
        return failed(bad, root, pcid)

    fmt = x86_format(cpu, mode)
    regs = pdpte_registers(cpu, mode)
    steps, fault = walk_tables(read_phys, mode, fmt, root, va, regs)
    if mode.name == "pae":
        notes.append(_pae_note(read_phys, root, va, regs))
        if steps and steps[0].entry & 0x21 == 0x21:
            notes.append(PDPTE_ACCESSED_NOTE)
    big = _page1gb_note(mode, fmt, steps, fault)
    if big:
        notes.append(big)
    if fault:
        return failed(fault, root, pcid, steps)

    rights = [fmt.rights(i, s.entry) for i, s in enumerate(steps)]
    w = all(r[0] for r in rights)
    u = all(r[1] for r in rights)
    x = not any(r[2] for r in rights)
    leaf = steps[-1]
    pa = leaf.next_addr | (va & (leaf.page_size - 1))
    table = _access_table(cpu, fmt, steps, w, u, x, notes)
    return Walk(va, mode, root, pcid, steps, pa, leaf.page_size, w, u, x, None, table,
                assumed, m, tuple(notes))


def raw_bounds(mode: PagingMode, start: int, end: Optional[int]) -> Tuple[int, int]:
    """[start, end) in canonical addresses -> the same range without sign extension."""
    n = mode.va_bits
    if mode.name in ("32-bit", "pae"):
        top = 1 << 32
        return min(max(start, 0), top), top if end is None else min(max(end, 0), top)
    half = 1 << (n - 1)

    def raw(a: int) -> int:
        if a < half:
            return max(a, 0)
        if a >= (1 << 64) - half:
            return min(a - ((1 << 64) - (1 << n)), 1 << n)
        return half                       # in the non-canonical hole: its edge

    return raw(start), (1 << n) if end is None else raw(end)


def iter_mappings(read_phys: ReadPhys, cpu: CpuState, start: int = 0, end: Optional[int] = None,
                  on_unreadable: Optional[Callable[[str, int, Exception], None]] = None
                  ) -> Iterator[Mapping]:
    """Every present, valid leaf overlapping [start, end) (canonical addresses, end exclusive,
    None = to the top), in address order; lazily. Each table page is read once with one
    read_phys(table, 4096) call (32 bytes for the PAE PDPT, none when cpu.pdptes holds the
    PDPTE registers). Unreadable tables are skipped and passed to on_unreadable(level name,
    address, error) when given. Nothing when CR0.PG=0."""
    mode = paging_mode(cpu)
    if mode is None:
        return
    fmt = x86_format(cpu, mode)
    root, _ = cr3_root(cpu, mode)
    regs = pdpte_registers(cpu, mode)
    lo, hi = raw_bounds(mode, start, end)
    n = mode.va_bits
    sign = (1 << 64) - (1 << n) if mode.va_bits > 32 else 0
    sizes = [fmt.page_size(i, True) for i in range(len(mode.levels))]
    skip = 1 if mode.name == "pae" else 0          # PAE PDPTEs carry no R/W, U/S or XD
    xd = 1 << 63 if fmt.nxe else 0
    flags_of: Dict[Tuple[int, int], Tuple[str, ...]] = {}   # leaves repeat a few flag sets
    for raw, i, path in iter_leaves(read_phys, mode, fmt, root, lo, hi, on_unreadable, regs):
        leaf = path[-1]
        every, some = -1, 0                        # AND and OR of the entries' bits
        for e in path[skip:]:
            every &= e
            some |= e
        key = (i, leaf & FLAG_BITS)
        flags = flags_of.get(key)
        if flags is None:
            flags = flags_of[key] = fmt.flags(i, leaf, True)
        va = raw + sign if raw >> (n - 1) and sign else raw
        yield Mapping(va, fmt.frame(i, leaf, True), sizes[i], bool(every & 2), bool(every & 4),
                      not some & xd, path, flags)
