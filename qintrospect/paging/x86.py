"""x86 guest page walks: 32-bit, PAE, 4-level and 5-level paging (Intel SDM Vol 3, ch. 4)."""

from __future__ import annotations

from typing import Iterator, Optional

from .model import CpuState, Mapping, PagingMode, ReadPhys, Walk


def paging_mode(cpu: CpuState) -> Optional[PagingMode]:
    raise NotImplementedError


def walk(read_phys: ReadPhys, cpu: CpuState, va: int) -> Walk:
    raise NotImplementedError


def iter_mappings(read_phys: ReadPhys, cpu: CpuState, start: int = 0,
                  end: Optional[int] = None) -> Iterator[Mapping]:
    raise NotImplementedError
