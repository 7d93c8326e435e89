"""Second-level translation: Intel EPT (SDM Vol 3, ch. 29) and AMD NPT (APM Vol 2, 15.25)."""

from __future__ import annotations

from .model import ReadPhys, Walk


def decode_eptp(eptp: int) -> dict:
    raise NotImplementedError


def walk_ept(read_phys: ReadPhys, eptp: int, gpa: int, maxphyaddr: int = 52,
             mbec: bool = False) -> Walk:
    raise NotImplementedError


def walk_npt(read_phys: ReadPhys, ncr3: int, gpa: int, levels: int = 4, maxphyaddr: int = 52,
             nxe: bool = True) -> Walk:
    raise NotImplementedError
