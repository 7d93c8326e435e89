"""AArch64 stage 2 (VMSAv8-64, the EL1&0 stage 2 that EL2 sets up with VTTBR_EL2 and VTCR_EL2):
the registers, the walk parameters they select, the paging mode and the descriptor format.

References are to the Arm ARM (DDI 0487): the VTCR_EL2 and VTTBR_EL2 descriptions, chapter D8
and its pseudocode (AArch64.GetS2TTWParams, AArch64.S2StartLevel, AArch64.S2InvalidSL,
AArch64.S2InconsistentSL, AArch64.S2MinTxSZ, AArch64.MaxTxSZ, AArch64.S2TxSZFaults,
AArch64.TTBaseAddress, AArch64.BlockDescSupported, S2AttrDecode). Where QEMU 7.2 decides
otherwise (target/arm/ptw.c check_s2_mmu_setup and get_phys_addr_lpae, helper.c
aa64_va_parameters), a note says so: `qemu72_start_level` restates its start-level check.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

from ..record import record
from .arm64_format import (
    GRANULES, PA_SIZES, SHAREABILITY, DescriptorGeometry, id_field, level_specs,
)
from .formats import bits
from .model import PagingMode

# VTCR_EL2 fields.
VTCR_VS, VTCR_HA, VTCR_HD = 1 << 19, 1 << 21, 1 << 22
VTCR_NSW, VTCR_NSA, VTCR_DS, VTCR_SL2 = 1 << 29, 1 << 30, 1 << 32, 1 << 33
VTCR_TG0 = {0b00: 12, 0b01: 16, 0b10: 14}     # 0b11 reserved
# HCR_EL2 fields.
HCR_VM, HCR_DC, HCR_FWB = 1 << 0, 1 << 12, 1 << 46

# Stage 2 descriptor fields ("Stage 2 translation table descriptor formats"). Stage 2 table
# descriptors carry no attributes: bits[63:59] (NSTable, APTable, UXN/PXNTable at stage 1)
# are RES0 there, so nothing is inherited down the walk (no hierarchical permissions). Bits
# 1:0 (valid, table/page) mean what they mean at stage 1 (arm64_format.DescriptorGeometry).
AF, FNXS, NT = 1 << 10, 1 << 11, 1 << 16
DBM, CONT, XN0, XN1 = 1 << 51, 1 << 52, 1 << 53, 1 << 54
SW_BITS = bits(58, 55)                        # IGNORED, for software (KVM keeps state there)
HI_BITS = bits(62, 59)                        # PBHA with VTCR_EL2.HWU59..62, else IGNORED

ASSUMED_PAMAX = 48
CACHEABILITY = ("Normal NC", "WB RA WA", "WT RA", "WB RA")   # VTCR_EL2.IRGN0 / ORGN0
DEVICE = ("Device-nGnRnE", "Device-nGnRE", "Device-nGRE", "Device-GRE")
# MemAttr with HCR_EL2.FWB=1 (FEAT_S2FWB): what stage 2 does to the stage 1 attributes.
FWB_MEMATTR = {0: "Device-nGnRnE (forced)", 1: "Device-nGnRE (forced)",
               2: "Device-nGRE (forced)", 3: "Device-GRE (forced)",
               5: "Normal NC (a stage 1 Device type is kept)",
               6: "Normal WB (forced, over any stage 1 type)",
               7: "the stage 1 attributes"}


def _nibble(x: int) -> str:
    return ("reserved", "NC", "WT", "WB")[x]


def memattr_name(memattr: int, fwb: Optional[bool]) -> str:
    """Stage 2 MemAttr[3:0] (descriptor bits[5:2]). FWB=0 (S2AttrDecode): [3:2]=00 Device
    ([1:0] the type), else Normal, outer [3:2] / inner [1:0] NC, WT or WB (inner 00 is
    reserved); the result is combined with stage 1, the stricter winning. FWB=1: see
    FWB_MEMATTR (bit[3] is then RES0). fwb None (HCR_EL2 unknown): both readings."""
    if fwb:
        return FWB_MEMATTR.get(memattr, f"reserved {memattr:#06b} with FWB")
    hi, lo = memattr >> 2, memattr & 3
    if hi == 0:
        plain = DEVICE[lo]
    elif lo == 0:
        plain = f"reserved {memattr:#06b}"
    elif hi == lo:
        plain = f"Normal {_nibble(lo)}"
    else:
        plain = f"Normal inner {_nibble(lo)}, outer {_nibble(hi)}"
    if fwb is None:
        return f"{plain} (with HCR_EL2.FWB=1: {memattr_name(memattr, True)})"
    return plain


def memattr_device(memattr: int, fwb: Optional[bool]) -> bool:
    """Stage 2 makes the location Device (forces it: the combination keeps Device)."""
    return (memattr & 4) == 0 if fwb else (memattr & 0xC) == 0


@record(frozen=True)
class S2Params:
    """AArch64.GetS2TTWParams and the checks at the start of AArch64.S2Translate."""

    vtcr: int
    vttbr: int
    t0sz: int
    ia_bits: int              # 64 - T0SZ
    granule: int              # log2: 12, 14, 16
    sl0: int
    sl2: int                  # counts only with DS=1 and the 4K granule
    start: Optional[int]      # start level (-1..3); None when the walk cannot start
    setup_fault: str          # why not (a level 0 translation fault), "" when it can
    ds: bool                  # effective VTCR_EL2.DS (FEAT_LPA2)
    ha: bool                  # hardware Access flag update
    hd: bool                  # hardware dirty state (DBM=1 pages become writable)
    xnx: bool                 # FEAT_XNX: XN[0] splits execution between EL1 and EL0
    fwb: Optional[bool]       # HCR_EL2.FWB; None = unknown
    ps_bits: int              # VTCR_EL2.PS decoded (PAMax for a reserved value)
    oa_bits: int              # output size: min(PS, PAMax), 48 without DS or the 64K granule
    lpa: bool                 # 64K descriptors hold OA[51:48] in bits[15:12] (FEAT_LPA)
    ttb52: bool               # VTTBR_EL2 bits[5:2] hold BADDR[51:48]
    pamax: int
    pamax_assumed: bool
    vmid: int
    vmid_bits: int
    mode: Optional[PagingMode]
    root: int                 # first table's base (AArch64.TTBaseAddress)
    root_tables: int          # how many concatenated tables the first level has
    notes: Tuple[str, ...]


def _s2_granule(mmfr0: Optional[int], g: int) -> Optional[int]:
    """Stage 2 support for granule 2**g: 0 no, 1 yes, 2 with 52-bit addresses (FEAT_LPA2);
    None unknown. TGran{4,64,16}_2 (bits 43:40, 39:36, 35:32): 0 = as the stage 1 field,
    1 = no, 2 = yes, 3 = yes with 52 bits."""
    if mmfr0 is None:
        return None
    two = id_field(mmfr0, {12: 40, 16: 36, 14: 32}[g])
    if two:
        return (two - 1) if g != 16 else min(two - 1, 1)
    one = id_field(mmfr0, {12: 28, 16: 24, 14: 20}[g])
    if g == 14:
        return one
    return 0 if one == 0xF else 1 + (g == 12 and one == 1)


def arm_start_level(g: int, sl0: int, sl2: int, ds: bool, pamax: int, ttst: bool
                    ) -> Tuple[Optional[int], str]:
    """AArch64.S2StartLevel and AArch64.S2InvalidSL: (start level, "") or (None, why)."""
    if g == 12:
        if ds and sl2:
            if sl0:
                return None, f"SL2=1 with SL0={sl0:#04b} is reserved"
            if pamax < 52:
                return None, f"SL2:SL0=0b100 (level -1) needs a 52-bit PAMax, not {pamax}"
            return -1, ""
        start = (2, 1, 0, 3)[sl0]
        if sl0 == 2 and pamax < 44:
            return None, f"SL0=0b10 (level 0) with the 4K granule needs PAMax >= 44, not {pamax}"
        if sl0 == 3 and not ttst:
            return None, "SL0=0b11 (level 3) with the 4K granule needs FEAT_TTST"
        return start, ""
    start = 3 - sl0
    if sl0 == 2 and pamax < (42 if g == 14 else 44):
        return None, (f"SL0=0b10 (level 1) with the {GRANULES[g].upper()} granule needs PAMax "
                      f">= {42 if g == 14 else 44}, not {pamax}")
    if sl0 == 3 and (g == 16 or not ds):
        return None, ("SL0=0b11 is reserved with the 64K granule" if g == 16 else
                      "SL0=0b11 (level 0) with the 16K granule needs VTCR_EL2.DS=1")
    return start, ""


def sl_ia_bounds(g: int, start: int) -> Tuple[int, int]:
    """AArch64.S2InconsistentSL: the IPA sizes a walk from `start` can take: at least one bit
    for the first level, at most a full table's worth plus 16 concatenated tables."""
    stride = g - 3
    low = (3 - start) * stride + g + 1
    return low, low + stride - 1 + 4


def qemu72_start_level(g: int, sl0: int, sl2: int, ds: bool, ia_bits: int, oa_bits: int,
                       ttst: bool) -> Tuple[Optional[int], str]:
    """QEMU 7.2's verdict (get_phys_addr_lpae, check_s2_mmu_setup): it reads the 4K SL0=0b11
    as level -1 without FEAT_TTST, takes the output size (VTCR_EL2.PS) where the Arm ARM takes
    PAMax, refuses an IPA wider than the output size, allows level -1 only for a 52-bit IPA,
    and has no 16K level 0."""
    stride = g - 3
    if ds and g == 12 and sl2:
        if sl0:
            return None, "SL2=1 with SL0 != 0"
        start = -1
    elif g == 12:
        start = 2 - sl0
        if ttst:
            start &= 3
    else:
        start = 3 - sl0
    if start < (-1 if ia_bits == 52 and g == 12 else 0):
        return None, f"start level {start} below the lowest it allows"
    left = ia_bits - ((3 - start) * stride + g)
    if left < 1 or left > stride + 4:
        return None, f"a {ia_bits}-bit IPA does not fit a walk from level {start}"
    if start == 0 and g != 12:
        return None, f"level 0 with the {GRANULES[g].upper()} granule"
    if (start == 0 and oa_bits <= 42) or (start == 1 and g != 12 and
                                          oa_bits <= (40 if g == 14 else 42)):
        return None, f"level {start} with a {oa_bits}-bit output size"
    if ia_bits > oa_bits:
        return None, f"the {ia_bits}-bit IPA is wider than the {oa_bits}-bit output size"
    return start, ""


@lru_cache(maxsize=64)
def make_s2_mode(g: int, ia_bits: int, start: int, ds: bool, pa52: bool) -> PagingMode:
    """Levels start..3 for granule 2**g: each level below the first indexes g - 3 bits, the
    first the rest of the IPA (up to 4 more bits: its concatenated tables)."""
    return PagingMode(f"aarch64-s2-{GRANULES[g]}-{ia_bits}",
                      level_specs(g, ia_bits, start, ds, pa52), 8, ia_bits)


@lru_cache(maxsize=64)
def s2_params(vtcr: int, vttbr: int, mmfr0: Optional[int] = None,
              mmfr1: Optional[int] = None, mmfr2: Optional[int] = None,
              hcr: Optional[int] = None) -> S2Params:
    notes: List[str] = []
    why = ""
    parange = id_field(mmfr0, 0)
    pamax, assumed = (ASSUMED_PAMAX, True) if parange is None else (PA_SIZES[min(parange, 6)],
                                                                   False)
    if assumed:
        notes.append(f"ID_AA64MMFR0_EL1 unknown: PARange assumed {ASSUMED_PAMAX} bits")
    tg = (vtcr >> 14) & 3
    g = VTCR_TG0.get(tg)
    if g is None or _s2_granule(mmfr0, g) == 0:
        # reserved or unimplemented: behaves as an implemented granule (IMPLEMENTATION
        # DEFINED which); QEMU 7.2 (sanitize_gran_size) takes the smallest
        was = "reserved" if g is None else f"{GRANULES[g].upper()}, not implemented at stage 2"
        g = next((x for x in (12, 14, 16) if _s2_granule(mmfr0, x) != 0), 12)
        notes.append(f"VTCR_EL2.TG0={tg:#04b} is {was}: the walk uses the "
                     f"{GRANULES[g].upper()} granule, as QEMU does (the smallest implemented)")
    ds = bool(vtcr & VTCR_DS) and g != 16
    if ds:
        lpa2 = _s2_granule(mmfr0, g)
        if lpa2 is not None and lpa2 < 2:
            ds = False
            notes.append(f"VTCR_EL2.DS=1 ignored: no FEAT_LPA2 for the {GRANULES[g].upper()} "
                         f"granule at stage 2 (ID_AA64MMFR0_EL1)")
        elif lpa2 is None:
            notes.append("ID_AA64MMFR0_EL1 unknown: VTCR_EL2.DS=1 taken to mean 52-bit "
                         "addresses (FEAT_LPA2)")
    t0sz = vtcr & 0x3F
    ia_bits = 64 - t0sz
    st = id_field(mmfr2, 28)
    ttst = st != 0
    # AArch64.S2MinTxSZ (EL1 in AArch64) and AArch64.MaxTxSZ
    min_tsz = 64 - min(pamax, 52 if (g == 16 or ds) else 48)
    max_tsz = (47 if g == 16 else 48) if ttst else 39
    if t0sz < min_tsz:
        why = (f"VTCR_EL2.T0SZ={t0sz} ({ia_bits}-bit IPA) is below the minimum {min_tsz} "
               f"(PAMax {pamax}{' assumed' if assumed else ''}): the Arm ARM faults (with "
               f"FEAT_LPA) or may treat it as {min_tsz} (AArch64.S2TxSZFaults)")
    elif t0sz > max_tsz:
        why = (f"VTCR_EL2.T0SZ={t0sz} is above the maximum {max_tsz}: the Arm ARM lets a CPU "
               f"fault or treat it as {max_tsz} (AArch64.S2TxSZFaults)")
    elif st is None and t0sz > 39:
        notes.append(f"ID_AA64MMFR2_EL1 unknown: T0SZ={t0sz} taken as valid (FEAT_TTST "
                     f"assumed)")
    # QEMU 7.2 bounds T0SZ at stage 2 as at stage 1 (aa64_va_parameters), not by PAMax
    qemu_tsz = (12 if ds or (g == 16 and id_field(mmfr2, 16) != 0) else 16) <= t0sz <= max_tsz
    ps = (vtcr >> 16) & 7
    ps_bits = PA_SIZES[ps] if ps <= 6 else pamax
    if ps > 6:
        notes.append(f"VTCR_EL2.PS={ps:#05b} is reserved: treated as PARange, as QEMU does")
    oa_bits = min(ps_bits, pamax)
    if oa_bits > 48 and g != 16 and not ds:
        oa_bits = 48
    pa52 = pamax == 52 and not assumed
    sl0, sl2 = (vtcr >> 6) & 3, int(bool(vtcr & VTCR_SL2))
    start: Optional[int] = None
    if not why:
        start, why = arm_start_level(g, sl0, sl2, ds, pamax, ttst)
        if why:
            why = f"VTCR_EL2: {why} (AArch64.S2InvalidSL)"
        else:
            low, high = sl_ia_bounds(g, start)
            if not low <= ia_bits <= high:
                why = (f"VTCR_EL2.SL0={sl0:#04b}{' SL2=1' if sl2 and ds else ''} starts the "
                       f"walk at level {start}, which takes a {low}..{min(high, 52)}-bit IPA, "
                       f"but T0SZ={t0sz} gives {ia_bits} bits (AArch64.S2InconsistentSL)")
        if why:
            start = None
    q_start, q_why = qemu72_start_level(g, sl0, sl2, ds, ia_bits, oa_bits, ttst)
    if not qemu_tsz:
        q_start, q_why = None, f"T0SZ={t0sz} is out of its bounds"
    if start is not None and q_start is None:
        notes.append(f"QEMU 7.2 would take a level 0 translation fault here instead "
                     f"(check_s2_mmu_setup: {q_why})")
    elif start is None and q_start is not None:
        notes.append(f"QEMU 7.2 would not fault here: it walks a {ia_bits}-bit IPA from level "
                     f"{q_start} (it bounds T0SZ as at stage 1, and checks SL0 against the "
                     f"output size where the Arm ARM takes PAMax)")
    # VMID: VTTBR_EL2[63:48] with VTCR_EL2.VS=1 and FEAT_VMID16, else [55:48]
    wide = bool(vtcr & VTCR_VS) and id_field(mmfr1, 4) in (None, 2)
    vmid_bits = 16 if wide else 8
    hafdbs = id_field(mmfr1, 0)
    ha = bool(vtcr & VTCR_HA) and (hafdbs is None or hafdbs >= 1)
    hd = ha and bool(vtcr & VTCR_HD) and (hafdbs is None or hafdbs >= 2)
    if hafdbs is None and vtcr & VTCR_HA:
        notes.append(f"ID_AA64MMFR1_EL1 unknown: VTCR_EL2.HA{'/HD' if hd else ''}=1 taken to "
                     f"mean the hardware updates {'AF and S2AP[1]' if hd else 'AF'} "
                     f"(FEAT_HAFDBS assumed)")
    if vtcr & VTCR_HD and not vtcr & VTCR_HA:
        notes.append("VTCR_EL2.HD=1 with HA=0: no hardware dirty state (HD counts only with "
                     "HA); QEMU 7.2 would still make DBM=1 pages writable")
    xnx = id_field(mmfr1, 28) != 0
    fwb = None if hcr is None else bool(hcr & HCR_FWB)
    ttb52 = ds or (g == 16 and pa52 and ps == 6)
    mode, root, tables = None, 0, 0
    if start is not None:
        mode = make_s2_mode(g, ia_bits, start, ds, pa52)
        first = mode.levels[0].index_bits
        tables = 1 << max(0, first - (g - 3))
        tsize = first + 3
        if ttb52:
            tsize = max(tsize, 6)
            root = (vttbr & bits(47, 6)) | ((vttbr >> 2) & 0xF) << 48
        else:
            root = vttbr & bits(47, 1)
        root &= ~((1 << tsize) - 1)
    return S2Params(
        vtcr=vtcr, vttbr=vttbr, t0sz=t0sz, ia_bits=ia_bits, granule=g, sl0=sl0, sl2=sl2,
        start=start, setup_fault=why, ds=ds, ha=ha, hd=hd, xnx=xnx, fwb=fwb, ps_bits=ps_bits,
        oa_bits=oa_bits, lpa=g == 16 and pa52, ttb52=ttb52, pamax=pamax, pamax_assumed=assumed,
        vmid=(vttbr >> 48) & (0xFFFF if wide else 0xFF), vmid_bits=vmid_bits, mode=mode,
        root=root, root_tables=tables, notes=tuple(notes))


def qemu72_root(p: S2Params) -> int:
    """The first table's base as QEMU 7.2 takes it: VTTBR[47:0], VTTBR[5:2] as BADDR[51:48]
    only with a 52-bit output size, aligned to the (concatenated) first level alone."""
    base = p.vttbr & bits(47, 0)
    if p.oa_bits > 48:
        base |= ((p.vttbr >> 2) & 0xF) << 48
    return base & ~((1 << (p.mode.levels[0].index_bits + 3)) - 1)


class Stage2Format(DescriptorGeometry):
    """What a stage 2 descriptor says in one walk's mode: its geometry (shared with stage 1)
    and its attributes."""

    def level(self, i: int) -> int:
        return self.p.start + i

    def flags(self, i: int, e: int, leaf: bool) -> Tuple[str, ...]:
        kind = self.kind(i, e)
        if kind in ("invalid", "reserved", "table"):
            return (kind,)
        if kind == "block!":
            return ("block", "not-allowed-here")
        names = [kind] + (["AF"] if e & AF else [])
        names.append(f"S2AP={(e >> 6) & 3:02b}")
        sh = (self.p.vtcr >> 12) & 3 if self.p.ds else (e >> 8) & 3
        names.append(f"SH={SHAREABILITY[sh]}")
        names.append(f"MemAttr={memattr_name((e >> 2) & 0xF, self.p.fwb)}")
        names.append(f"XN={(e >> 53) & 3:02b}")
        names += [n for n, b in (("FnXS", FNXS), ("DBM", DBM), ("Cont", CONT)) if e & b]
        if e & NT and not self.p.lpa:
            names.append("nT")
        if e & SW_BITS:
            names.append(f"SW={(e >> 55) & 0xF:#x}")
        if e & HI_BITS:
            names.append(f"bits62:59={(e >> 59) & 0xF:#x}")
        return tuple(names)


@lru_cache(maxsize=64)
def stage2_format(p: S2Params) -> Stage2Format:
    return Stage2Format(p)
