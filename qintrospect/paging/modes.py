"""Paging modes as data: which levels a mode has, what each level indexes, where pages may be large.

`paging_mode(cpu)` picks the x86 mode from CR0/CR4/EFER exactly as the SDM (Vol 3, 4.1.1) does.
"""

from __future__ import annotations

from typing import Optional

from .model import CpuState, LevelSpec, PagingMode

KIB4 = 1 << 12
MIB2 = 1 << 21
MIB4 = 1 << 22
GIB1 = 1 << 30

# Control-register and EFER bits that select and shape translation.
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_PKS = 1 << 24
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# The 4-level and 5-level tables, shared by guest paging, NPT and (with other entry bits) EPT.
_PML5 = LevelSpec("PML5", "pgd", 48, 9, None)
_PML4_IN_5 = LevelSpec("PML4", "p4d", 39, 9, None)
_PML4 = LevelSpec("PML4", "pgd", 39, 9, None)
_PDPT = LevelSpec("PDPT", "pud", 30, 9, GIB1)
_PD = LevelSpec("PD", "pmd", 21, 9, MIB2)
_PT = LevelSpec("PT", "pte", 12, 9, None)

# Legacy 32-bit paging: two levels of 1024 4-byte entries; Linux folds pud/pmd into pgd.
MODE_32BIT = PagingMode("32-bit", (LevelSpec("PD", "pgd", 22, 10, None),
                                   LevelSpec("PT", "pte", 12, 10, None)), 4, 32)
# The same with CR4.PSE=1, where a PDE with PS=1 maps a 4 MiB page.
MODE_32BIT_PSE = PagingMode("32-bit", (LevelSpec("PD", "pgd", 22, 10, MIB4),
                                       LevelSpec("PT", "pte", 12, 10, None)), 4, 32)
# PAE: 4 PDPTEs (2 index bits) loaded from CR3[31:5], then 512-entry PD and PT; Linux 3-level.
MODE_PAE = PagingMode("pae", (LevelSpec("PDPT", "pgd", 30, 2, None),
                              LevelSpec("PD", "pmd", 21, 9, MIB2),
                              LevelSpec("PT", "pte", 12, 9, None)), 8, 32)
MODE_4LEVEL = PagingMode("4-level", (_PML4, _PDPT, _PD, _PT), 8, 48)
MODE_5LEVEL = PagingMode("5-level", (_PML5, _PML4_IN_5, _PDPT, _PD, _PT), 8, 57)

# Second-level tables translate guest-physical addresses with the same level geometry.
MODE_EPT4 = PagingMode("ept-4", MODE_4LEVEL.levels, 8, 48)
MODE_EPT5 = PagingMode("ept-5", MODE_5LEVEL.levels, 8, 57)
MODE_NPT4 = PagingMode("npt-4", MODE_4LEVEL.levels, 8, 48)
MODE_NPT5 = PagingMode("npt-5", MODE_5LEVEL.levels, 8, 57)

ALL_MODES = (MODE_32BIT, MODE_32BIT_PSE, MODE_PAE, MODE_4LEVEL, MODE_5LEVEL,
             MODE_EPT4, MODE_EPT5, MODE_NPT4, MODE_NPT5)


def long_mode_active(cpu: CpuState) -> bool:
    """EFER.LMA, or what the CPU sets it to: LME with paging and PAE on (some dumps omit LMA)."""
    if cpu.efer & EFER_LMA:
        return True
    return bool(cpu.efer & EFER_LME and cpu.cr0 & CR0_PG and cpu.cr4 & CR4_PAE)


def paging_mode(cpu: CpuState) -> Optional[PagingMode]:
    """The x86 paging mode CR0/CR4/EFER select, or None when CR0.PG=0 (no translation)."""
    if not cpu.cr0 & CR0_PG:
        return None
    if not cpu.cr4 & CR4_PAE:
        return MODE_32BIT_PSE if cpu.cr4 & CR4_PSE else MODE_32BIT
    if not long_mode_active(cpu):
        return MODE_PAE
    return MODE_5LEVEL if cpu.cr4 & CR4_LA57 else MODE_4LEVEL
