"""Pure page-table walkers over a `read_phys(addr, length) -> bytes` function: x86 (x86.py,
with EPT/NPT in ept.py), aarch64 stage 1 (arm64.py) and riscv64 Sv39/48/57 (riscv.py).

Nothing here knows about QEMU, sockets or files: the same code walks a guest's page tables,
EPT/NPT tables, or tables a test built in a bytearray. A walk never raises for what it finds in
memory (not-present, reserved bits, unreadable tables): it returns a Walk whose `fault` says so.
walk() and iter_mappings() take any architecture's register state (CpuState for x86,
arm64.Arm64State, riscv_format.RiscvState) and dispatch on it.
"""

from typing import Iterator, Optional

from .model import (
    EPT_ACCESS_KINDS, X86_ACCESS_KINDS, AccessResult, CpuState, Fault, LevelSpec, LevelStep,
    Mapping, PagingMode, ReadPhys, Walk,
)
from .modes import (
    ALL_MODES, MODE_4LEVEL, MODE_5LEVEL, MODE_32BIT, MODE_32BIT_PSE, MODE_EPT4, MODE_EPT5,
    MODE_NPT4, MODE_NPT5, MODE_PAE, paging_mode,
)
from . import x86 as _x86
from .x86 import cr3_root
from .ept import decode_eptp, walk_ept, walk_npt

__all__ = [
    "ReadPhys", "CpuState", "LevelSpec", "PagingMode", "LevelStep", "Fault", "AccessResult",
    "Walk", "Mapping", "X86_ACCESS_KINDS", "EPT_ACCESS_KINDS",
    "paging_mode", "walk", "iter_mappings", "is_x86", "arch_of", "require_x86", "require",
    "root_register", "root_register_name", "require_walkable", "process_root", "with_root",
    "walk_ept", "decode_eptp", "walk_npt", "cr3_root",
    "ALL_MODES", "MODE_32BIT", "MODE_32BIT_PSE", "MODE_PAE", "MODE_4LEVEL", "MODE_5LEVEL",
    "MODE_EPT4", "MODE_EPT5", "MODE_NPT4", "MODE_NPT5", "RiscvState",
]

# numpy twins of walk() and iter_mappings() for address batches and whole address spaces,
# loaded on first use (numpy costs a tenth of a second to import)
_VECTOR = ("leaf_arrays", "walk_array", "LeafArrays", "BatchWalk", "FAULT_REASONS")
__all__ += list(_VECTOR)


def __getattr__(name):
    if name in _VECTOR:
        from . import vector
        return getattr(vector, name)
    if name == "RiscvState":          # another architecture's: loaded when asked for
        from .riscv_format import RiscvState
        return RiscvState
    raise AttributeError(f"module 'qintrospect.paging' has no attribute {name!r}")


def is_x86(cpu) -> bool:
    return isinstance(cpu, CpuState)


def arch_of(cpu) -> str:
    """"x86_64", "aarch64" or "riscv64": the architecture whose registers `cpu` holds."""
    if isinstance(cpu, CpuState):
        return "x86_64"
    from .riscv_format import RiscvState
    return "riscv64" if isinstance(cpu, RiscvState) else "aarch64"


# What works on a guest of another architecture so far; the rest reads x86 structures (CR3
# roots, Linux x86-64's task layout, EPT/NPT) and says so.
ARM64_COMMANDS = ("translate, vmmap, read, search, find-cr3, who-maps, cpus and ps (and "
                  "--guest-pid/--guest-comm)")
RISCV64_COMMANDS = "translate, vmmap, read, search, find-cr3, who-maps and cpus"
ARCH_COMMANDS = {"aarch64": ARM64_COMMANDS, "riscv64": RISCV64_COMMANDS}


def require_x86(cpu, what: str) -> None:
    """UsageError (exit 2) for a command that does not read this architecture's guests yet."""
    require(cpu, what, "x86_64")


def require(cpu, what: str, *archs: str) -> None:
    """UsageError (exit 2) unless the guest is of one of `archs`."""
    if cpu is None or arch_of(cpu) in archs:
        return
    from ..errors import UsageError
    arch = arch_of(cpu)
    names = " and ".join(a.replace("x86_64", "x86") for a in archs)
    raise UsageError(f"{what} reads {names} guests only so far; this guest is {arch} "
                     f"({ARCH_COMMANDS[arch]} work on it)")


def process_root(cpu) -> int:
    """The physical base of the per-process table: CR3's, TTBR0_EL1's or satp's."""
    arch = arch_of(cpu)
    if arch == "x86_64":
        return cpu.cr3 & ~0xFFF
    if arch == "riscv64":
        from .riscv_format import satp_root
        return satp_root(cpu.satp)
    from .arm64_format import range_params, ttbr_base
    return ttbr_base(range_params(cpu, 0))


def walk(read_phys: ReadPhys, cpu, va: int, access: Optional[str] = None) -> Walk:
    """Translate `va` as the vCPU in state `cpu` would (x86.walk, arm64.walk_arm64 or
    riscv.walk_riscv); `access` is the kind whose fault code Fault.error_code gives (default:
    a kernel read)."""
    arch = arch_of(cpu)
    if arch == "x86_64":
        return _x86.walk(read_phys, cpu, va, access or "supervisor-read")
    if arch == "riscv64":
        from .riscv import walk_riscv
        return walk_riscv(read_phys, cpu, va, access or "s-read")
    from .arm64 import walk_arm64
    return walk_arm64(read_phys, cpu, va, access or "el1-read")


def iter_mappings(read_phys: ReadPhys, cpu, start: int = 0, end: Optional[int] = None,
                  on_unreadable=None) -> Iterator[Mapping]:
    """Every present, valid leaf overlapping [start, end), in address order (x86's
    iter_mappings, arm64's over both TTBR ranges, or riscv's over both halves)."""
    arch = arch_of(cpu)
    if arch == "x86_64":
        return _x86.iter_mappings(read_phys, cpu, start, end, on_unreadable)
    if arch == "riscv64":
        from .riscv import iter_mappings_riscv
        return iter_mappings_riscv(read_phys, cpu, start, end, on_unreadable)
    from .arm64 import iter_mappings_arm64
    return iter_mappings_arm64(read_phys, cpu, start, end, on_unreadable)


def require_walkable(cpu) -> None:
    """UsageError (exit 2) for a vCPU whose translation regime is not walked: an aarch64 vCPU
    at EL2 without VHE (EL2's own regime: one TTBR0_EL2, TCR_EL2 in its own layout), or at
    EL3."""
    if arch_of(cpu) == "aarch64" and cpu.regime in ("EL2", "EL3"):
        from ..errors import UsageError
        why = ("at EL3" if cpu.regime == "EL3" else
               "at EL2 in the EL2 translation regime (HCR_EL2.E2H=0, or the gdbstub does not "
               "show TTBR0_EL2/TCR_EL2)")
        raise UsageError(f"the vCPU is {why}: qintrospect walks the EL1&0 regime (with its "
                         "stage 2) and a VHE host's EL2&0 one; stop the vCPU elsewhere or "
                         "pick another with --vcpu")


def root_register(cpu, va: int) -> int:
    """The register whose tables translate `va`: CR3; on aarch64 TTBR1_EL1 for the upper
    range (bit 55 selects it, with or without a top byte ignored), else TTBR0_EL1; satp on
    riscv64 (one table for both halves)."""
    arch = arch_of(cpu)
    if arch == "x86_64":
        return cpu.cr3
    if arch == "riscv64":
        return cpu.satp
    return cpu.ttbr1 if va >> 55 & 1 else cpu.ttbr0


def root_register_name(cpu, va: int) -> str:
    """root_register()'s name: CR3, satp, or TTBR0/TTBR1 of the vCPU's regime (_EL1, or
    _EL2 on a VHE host at EL2)."""
    arch = arch_of(cpu)
    if arch != "aarch64":
        return "CR3" if arch == "x86_64" else "satp"
    return ("TTBR1" if va >> 55 & 1 else "TTBR0") + cpu.register_suffix


def with_root(cpu, root: int):
    """The state with another process's root: CR3 (the PAE PDPTE registers belong to the
    vCPU's own CR3 only), TTBR0_EL1 (a process's half; TTBR1_EL1 is the kernel's), or satp:
    `root` is a whole satp value when its MODE field (bits 63:60) is set, else the root
    table's physical address (page-aligned), with the vCPU's own MODE and ASID 0 (a
    process's ASID is not known from its root)."""
    from ..record import replace
    arch = arch_of(cpu)
    if arch == "x86_64":
        return replace(cpu, cr3=root, pdptes=None)
    if arch == "riscv64":
        from .riscv_format import SATP_MODE_SHIFT, SATP_PPN
        if root >> SATP_MODE_SHIFT:
            return replace(cpu, satp=root)
        if root & 0xFFF or root >> 56:
            from ..errors import UsageError
            raise UsageError(f"{root:#x} is neither a satp value (MODE in bits 63:60) nor a "
                             f"page-aligned 56-bit root table address")
        return replace(cpu, satp=(cpu.satp >> SATP_MODE_SHIFT) << SATP_MODE_SHIFT
                       | (root >> 12 & SATP_PPN))
    return replace(cpu, ttbr0=root)
