"""The values the page-table walkers take and return.

Everything here is a frozen record (record.py): a paging mode is data (a tuple of levels plus an entry
size), and a walk is a value that every renderer reads without recomputing anything.
"""

from __future__ import annotations

from typing import Callable, Mapping as MappingT, Optional, Tuple

from ..record import field, record

#: Reads `length` bytes of physical memory at `addr`; raises qintrospect.errors.MemoryReadError.
ReadPhys = Callable[[int, int], bytes]

#: The keys of Walk.access for x86 walks, and for EPT walks (arm64.py and riscv.py have theirs).
X86_ACCESS_KINDS = (
    "supervisor-read", "supervisor-write", "supervisor-execute",
    "user-read", "user-write", "user-execute",
)
EPT_ACCESS_KINDS = ("read", "write", "execute")

#: Fault reasons.
NOT_PRESENT = "not-present"
RESERVED_BIT = "reserved-bit"
NON_CANONICAL = "non-canonical"
UNREADABLE = "unreadable"
PAGING_DISABLED = "paging-disabled"
EPT_VIOLATION = "ept-violation"
EPT_MISCONFIGURATION = "ept-misconfiguration"
# AArch64 stage 1 (the Arm ARM's fault types; arm64.py)
TRANSLATION = "translation"
ACCESS_FLAG = "access-flag"
ADDRESS_SIZE = "address-size"
PERMISSION = "permission"
# RISC-V page faults with no x86 or Arm name (riscv.py): a leaf whose PPN is not aligned to its
# superpage size, and a pointer PTE (R=W=X=0) at level 0
MISALIGNED_SUPERPAGE = "misaligned-superpage"
NO_LEAF = "no-leaf"

#: #PF error-code bits (Intel SDM Vol 3, 4.7).
PF_P = 1 << 0
PF_WR = 1 << 1
PF_US = 1 << 2
PF_RSVD = 1 << 3
PF_ID = 1 << 4
PF_PK = 1 << 5


def _hex(value: Optional[int]) -> Optional[str]:
    return None if value is None else hex(value)


@record(frozen=True)
class CpuState:
    """The registers that govern translation."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    maxphyaddr: Optional[int] = None  # vCPU phys-bits; None = unknown -> assume 52
    pkru: Optional[int] = None        # None = unknown: user-page keys left unchecked, said so
    pkrs: Optional[int] = None        # IA32_PKRS (CR4.PKS keys of supervisor pages); None = unknown
    # CPUID.80000001H:EDX.Page1GB[26]: False makes PS in a PDPTE a reserved bit; None = unknown
    # (1 GiB pages accepted, with a note when a walk meets one)
    page1gb: Optional[bool] = None
    # The PAE PDPTE registers loaded at the last MOV CR3, when a source knows them; None = read
    # the PDPT from memory as TCG does (a note says so)
    pdptes: Optional[Tuple[int, int, int, int]] = None


@record(frozen=True)
class LevelSpec:
    """One level of a paging structure hierarchy."""

    name: str                  # Intel name: "PML5", "PML4", "PDPT", "PD", "PT"
    linux_name: str            # "pgd", "p4d", "pud", "pmd", "pte" in that mode
    shift: int                 # lowest VA bit this level indexes
    index_bits: int
    large_page: Optional[int]  # page size this level may map with PS=1, or None


@record(frozen=True)
class PagingMode:
    name: str  # "32-bit", "pae", "4-level", "5-level", "ept-4", "ept-5", "npt-4", "npt-5"
    levels: Tuple[LevelSpec, ...]
    entry_size: int  # 4 or 8
    va_bits: int     # 32, 48, 57 (for EPT/NPT: the guest-physical bits translated)

    @property
    def depth(self) -> int:
        return len(self.levels)


@record(frozen=True)
class LevelStep:
    name: str
    linux_name: str
    index: int
    table_addr: int            # physical base of the table read at this level
    entry_addr: int            # table_addr + index*entry_size
    entry: int                 # raw value
    flags: Tuple[str, ...]     # names of the set bits
    next_addr: Optional[int]   # next table's base, or the page frame at a leaf; None if not present
    leaf: bool
    page_size: Optional[int]   # at a leaf

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "linux_name": self.linux_name,
            "index": self.index,
            "table_addr": _hex(self.table_addr),
            "entry_addr": _hex(self.entry_addr),
            "entry": _hex(self.entry),
            "flags": list(self.flags),
            "next_addr": _hex(self.next_addr),
            "leaf": self.leaf,
            "page_size": self.page_size,
        }


@record(frozen=True)
class Fault:
    level: Optional[str]   # level name where it stopped; None for non-canonical / paging-disabled
    reason: str            # one of the reason constants above
    message: str           # a sentence: what, which bits/values
    error_code: Optional[int] = None  # #PF error code for the access walked (supervisor read)

    def to_dict(self) -> dict:
        return {"level": self.level, "reason": self.reason, "message": self.message,
                "error_code": _hex(self.error_code)}


@record(frozen=True)
class AccessResult:
    """What one kind of access would do."""

    allowed: bool
    error_code: Optional[int]  # #PF error code when denied (None for EPT)
    reason: str                # "" when allowed
    # What could still deny an access that `allowed` (the paging bits) permits, and why it was
    # not checked: a protection key whose register (PKRU / IA32_PKRS) is unknown. "" = nothing.
    unknown: str = ""

    def to_dict(self) -> dict:
        return {"allowed": self.allowed, "error_code": _hex(self.error_code),
                "reason": self.reason, "unknown": self.unknown or None}


@record(frozen=True)
class Walk:
    va: int
    mode: Optional[PagingMode]
    root: int                       # table base from CR3 / EPTP / nCR3, flags masked off
    pcid: Optional[int]             # CR3[11:0] when CR4.PCIDE, else None
    levels: Tuple[LevelStep, ...]
    pa: Optional[int]
    page_size: Optional[int]
    writable: Optional[bool]
    user: Optional[bool]
    executable: Optional[bool]
    fault: Optional[Fault]
    access: MappingT[str, AccessResult] = field(default_factory=dict)
    assumed_maxphyaddr: bool = False
    maxphyaddr: int = 52
    notes: Tuple[str, ...] = ()     # assumptions made, in sentences ("MAXPHYADDR unknown: ...")

    @property
    def ok(self) -> bool:
        """True when the address translated (some accesses may still be denied: see access)."""
        return self.fault is None and self.pa is not None

    def to_dict(self) -> dict:
        return {
            "va": _hex(self.va),
            "mode": self.mode.name if self.mode else None,
            "root": _hex(self.root),
            "pcid": _hex(self.pcid),
            "levels": [s.to_dict() for s in self.levels],
            "pa": _hex(self.pa),
            "page_size": self.page_size,
            "writable": self.writable,
            "user": self.user,
            "executable": self.executable,
            "fault": self.fault.to_dict() if self.fault else None,
            "access": {k: v.to_dict() for k, v in self.access.items()},
            "maxphyaddr": self.maxphyaddr,
            "assumed_maxphyaddr": self.assumed_maxphyaddr,
            "notes": list(self.notes),
        }


@record(frozen=True)
class Mapping:
    """One present leaf, for whole-address-space maps."""

    va: int
    pa: int
    size: int
    writable: bool
    user: bool
    executable: bool
    levels_entries: Tuple[int, ...]  # raw entries on the path, root first
    flags: Tuple[str, ...]           # leaf entry flags

    def to_dict(self) -> dict:
        return {"va": _hex(self.va), "pa": _hex(self.pa), "size": self.size,
                "writable": self.writable, "user": self.user, "executable": self.executable,
                "levels_entries": [_hex(e) for e in self.levels_entries],
                "flags": list(self.flags)}
