"""RISC-V (RV64) supervisor address translation: the registers, the satp modes and the PTE format.

References are to the RISC-V privileged architecture, version 1.12: 4.1.11 (satp), 4.3 (Sv32,
whose PTE bits 9:0 and translation process Sv39/48/57 share), 4.4-4.6 (Sv39, Sv48, Sv57),
3.1.6 (mstatus SUM, MXR, MPRV, MPP), 3.1.18 (menvcfg.PBMTE) and the Svnapot and Svpbmt
chapters. Level names follow the spec's level i of the translation process: "L2" is the root of
Sv39 (it indexes VPN[2]), "L0" always the 4 KiB level.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

from ..record import record
from .formats import bits, size_name
from .model import LevelSpec, PagingMode

# PTE fields (4.3.1, 4.4.1, Svpbmt, Svnapot).
V, R, W, X, U, G, A, D = (1 << n for n in range(8))
RWX = R | W | X
PPN_SHIFT = 10
PPN_MASK = bits(53, 10)
RESERVED = bits(60, 54)
PBMT_SHIFT = 61
PBMT = 3 << PBMT_SHIFT
N = 1 << 63
FLAG_BITS = bits(9, 0) | bits(63, 54)          # every bit flags() reads
PBMT_NAMES = ("PMA", "NC", "IO", "reserved")
NAPOT_SIZE = 64 << 10                          # the one NAPOT size defined (ppn[3:0] = 1000)
PA_BITS = 56                                   # 44-bit PPNs

# CSR fields.
MSTATUS_MPP_SHIFT = 11
MSTATUS_MPRV = 1 << 17
MSTATUS_SUM = 1 << 18
MSTATUS_MXR = 1 << 19
MENVCFG_PBMTE = 1 << 62
SATP_MODE_SHIFT = 60
SATP_ASID_SHIFT = 44
SATP_PPN = (1 << 44) - 1

PRIV_NAMES = {0: "U", 1: "S", 3: "M"}
#: scause exception codes of the page faults, by operation.
PAGE_FAULT_CODES = {"execute": 12, "read": 13, "write": 15}

LINUX_NAMES = {3: ("pgd", "pmd", "pte"), 4: ("pgd", "pud", "pmd", "pte"),
               5: ("pgd", "p4d", "pud", "pmd", "pte")}


@record(frozen=True)
class RiscvState:
    """The registers that govern supervisor address translation, as QEMU's gdbstub gives
    them, and what the hart implements (None = unknown: implemented, said in a note)."""

    satp: int
    priv: int = 1                        # the gdbstub's "priv": 0 U, 1 S, 3 M
    mstatus: int = 0
    menvcfg: Optional[int] = None        # PBMTE[62]; None = unknown (PBMTE taken as 1)
    svpbmt: Optional[bool] = None
    svnapot: Optional[bool] = None
    # True: the hart sets A and D itself (Svadu; QEMU 7.2's TCG does); False: A=0, or D=0 on a
    # store, takes a page fault (Svade); None = unknown, taken as True
    hardware_ad: Optional[bool] = None


def _make_mode(depth: int) -> PagingMode:
    levels = tuple(LevelSpec(f"L{lv}", LINUX_NAMES[depth][k], 12 + 9 * lv, 9,
                             1 << (12 + 9 * lv) if lv else None)
                   for k, lv in enumerate(range(depth - 1, -1, -1)))
    return PagingMode(f"sv{12 + 9 * depth}", levels, 8, 12 + 9 * depth)


MODE_SV39, MODE_SV48, MODE_SV57 = (_make_mode(n) for n in (3, 4, 5))
#: satp.MODE -> mode (0 is Bare; the rest are reserved or Sv32's, which RV64 lacks).
SATP_MODES = {8: MODE_SV39, 9: MODE_SV48, 10: MODE_SV57}
RISCV_MODES = (MODE_SV39, MODE_SV48, MODE_SV57)


def satp_mode_field(satp: int) -> int:
    return satp >> SATP_MODE_SHIFT & 0xF


def satp_root(satp: int) -> int:
    """The root table's physical address: satp.PPN << 12."""
    return (satp & SATP_PPN) << 12


def satp_asid(satp: int) -> int:
    return satp >> SATP_ASID_SHIFT & 0xFFFF


def riscv_mode(state: RiscvState) -> Optional[PagingMode]:
    """Sv39, Sv48 or Sv57 as satp.MODE says; None for Bare (and MODE values an RV64 hart
    never holds: a write of an unsupported MODE leaves satp unchanged)."""
    return SATP_MODES.get(satp_mode_field(state.satp))


def pte_ppn(e: int) -> int:
    return (e & PPN_MASK) >> PPN_SHIFT


def pbmt_use(state: RiscvState) -> Tuple[bool, str]:
    """(PBMT may be nonzero in a leaf, why not when it may not)."""
    if state.svpbmt is False:
        return False, "this hart has no Svpbmt"
    if state.menvcfg is not None and not state.menvcfg & MENVCFG_PBMTE:
        return False, "menvcfg.PBMTE=0 turns Svpbmt off for S and U mode"
    return True, ""


class RiscvFormat:
    """What a PTE says in one mode: the questions walker.iter_leaves asks (present, is_leaf,
    valid, frame) and those the scalar walk and the renderers ask (problems, flags)."""

    flag_bits = FLAG_BITS

    def __init__(self, mode: PagingMode, pbmt: bool, pbmt_why: str, napot: bool):
        self.mode = mode
        self.last = len(mode.levels) - 1
        self.pbmt, self.pbmt_why, self.napot = pbmt, pbmt_why, napot
        # bits that make a PTE invalid outright: in a leaf, and in a pointer (where D, A, U,
        # N and PBMT are reserved too)
        self.leaf_bad = RESERVED | (0 if pbmt else PBMT) | (0 if napot else N)
        self.table_bad = RESERVED | D | A | U | N | PBMT
        # PPN bits a leaf at level i must have clear (pte.ppn[i-1:0]: a superpage's alignment)
        self.align = [(1 << (9 * (self.last - i))) - 1 for i in range(self.last + 1)]
        self.sizes = [1 << spec.shift for spec in mode.levels]

    def present(self, e: int) -> bool:
        return bool(e & V)

    def is_leaf(self, i: int, e: int) -> bool:
        return bool(e & RWX)

    def is_napot(self, i: int, e: int) -> bool:
        """A valid NAPOT leaf: N=1 at level 0 with ppn[3:0] = 1000 (Svnapot's one encoding)."""
        return bool(e & N) and self.napot and i == self.last and (e >> PPN_SHIFT) & 0xF == 8

    def frame(self, i: int, e: int, leaf: bool) -> int:
        """The next table, or the page's base (a NAPOT page's 64 KiB base)."""
        base = pte_ppn(e) << 12
        return base & ~(NAPOT_SIZE - 1) if leaf and self.is_napot(i, e) else base

    def size(self, i: int, e: int) -> int:
        return NAPOT_SIZE if self.is_napot(i, e) else self.sizes[i]

    def valid(self, i: int, e: int, leaf: bool) -> bool:
        """Translates past this present PTE: nothing reserved set, not a pointer at level 0,
        not a misaligned superpage."""
        if not leaf:
            return i != self.last and not e & self.table_bad
        if e & self.leaf_bad or e & RWX in (W, W | X) or e & PBMT == PBMT:
            return False
        if e & N and (i != self.last or (e >> PPN_SHIFT) & 0xF != 8):
            return False
        return not pte_ppn(e) & self.align[i]

    def problems(self, i: int, e: int, leaf: bool) -> List[Tuple[int, str]]:
        """The reserved bits and encodings this present PTE sets (4.3.2 step 3), each as
        (the bits, why they fault)."""
        out = []
        if not leaf:
            for bit, name in ((D, "D"), (A, "A"), (U, "U")):
                if e & bit:
                    out.append((bit, f"{name}=1 (D, A and U are reserved in a non-leaf PTE)"))
            if e & N:
                out.append((N, "N=1 (reserved in a non-leaf PTE, Svnapot)"))
            if e & PBMT:
                out.append((e & PBMT, f"PBMT={e >> PBMT_SHIFT & 3} (reserved in a non-leaf "
                                      f"PTE, Svpbmt)"))
        elif e & RWX in (W, W | X):
            out.append((W, f"W=1 without R (RWX={e >> 1 & 7:03b} is reserved)"))
        if e & RESERVED:
            out.append((e & RESERVED, f"bits 60:54 = {(e & RESERVED) >> 54:#x} (reserved for "
                                      f"future standard use)"))
        if leaf and e & PBMT:
            if not self.pbmt:
                out.append((e & PBMT, f"PBMT={e >> PBMT_SHIFT & 3} while {self.pbmt_why}"))
            elif e & PBMT == PBMT:
                out.append((PBMT, "PBMT=3 (a reserved encoding)"))
        if leaf and e & N:
            if not self.napot:
                out.append((N, "N=1 while this hart has no Svnapot"))
            elif i != self.last:
                out.append((N, f"N=1 in a {size_name(self.sizes[i])} leaf (only level-0 PTEs "
                               f"may be NAPOT)"))
            elif (e >> PPN_SHIFT) & 0xF != 8:
                out.append((N | bits(13, 10), f"N=1 with ppn[3:0] = {(e >> PPN_SHIFT) & 0xF:04b} "
                                              f"(a reserved NAPOT encoding: only 1000, 64 KiB, "
                                              f"is defined)"))
        return out

    def misaligned(self, i: int, e: int) -> int:
        """The PPN bits that make this leaf a misaligned superpage (0 when aligned)."""
        return pte_ppn(e) & self.align[i]

    def flags(self, i: int, e: int, leaf: bool) -> Tuple[str, ...]:
        if not e & V:
            return ("invalid",)
        names = [n for n, b in (("V", V), ("R", R), ("W", W), ("X", X), ("U", U), ("G", G),
                                ("A", A), ("D", D)) if e & b]
        if e >> 8 & 3:
            names.append(f"RSW={e >> 8 & 3}")
        if e & PBMT:
            names.append(f"PBMT={PBMT_NAMES[e >> PBMT_SHIFT & 3]}")
        if e & N:
            names.append("N")
        if e & RESERVED:
            names.append(f"reserved[60:54]={(e & RESERVED) >> 54:#x}")
        return tuple(names)


@lru_cache(maxsize=64)
def riscv_format(state: RiscvState, mode: PagingMode) -> RiscvFormat:
    pbmt, why = pbmt_use(state)
    return RiscvFormat(mode, pbmt, why, state.svnapot is not False)
