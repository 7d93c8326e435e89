"""AArch64 (VMSAv8-64) stage 1, EL1&0 regime: the registers, the walk parameters they select for
each VA range, the paging modes and the descriptor format.

References are to the Arm ARM (DDI 0487): chapter D8 (the VMSAv8-64 translation system) and its
pseudocode, J1 (AArch64.GetS1TTWParams, AArch64.S1Walk, AArch64.TTBaseAddress,
AArch64.DecodeDescriptorType, AArch64.BlockDescSupported, AArch64.S1MinTxSZ, AArch64.MaxTxSZ,
AArch64.PhysicalAddressSize). Where the Arm ARM leaves a choice to the implementation, the choice
is QEMU 7.2's (target/arm/ptw.c get_phys_addr_lpae, helper.c aa64_va_parameters) and a note
says so.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

from ..record import record
from .formats import bits, size_name
from .model import LevelSpec, PagingMode

# TCR_EL1 and SCTLR_EL1 fields (their register descriptions).
TCR_EPD = (1 << 7, 1 << 23)
TCR_A1 = 1 << 22
TCR_AS = 1 << 36
TCR_TBI = (1 << 37, 1 << 38)
TCR_HA = 1 << 39
TCR_HD = 1 << 40
TCR_HPD = (1 << 41, 1 << 42)
TCR_TBID = (1 << 51, 1 << 52)
TCR_E0PD = (1 << 55, 1 << 56)
TCR_DS = 1 << 59
SCTLR_M = 1 << 0
SCTLR_WXN = 1 << 19
SCTLR_SPAN = 1 << 23
SCTLR_EE = 1 << 25
SCTLR_EPAN = 1 << 57
CPSR_PAN = 1 << 22

# Descriptor fields ("Translation table descriptor formats", VMSAv8-64).
VALID, TABLE = 1 << 0, 1 << 1
NS, AF, NG = 1 << 5, 1 << 10, 1 << 11
GP, DBM, CONT, PXN, UXN = (1 << n for n in range(50, 55))
PXN_TABLE, UXN_TABLE, NS_TABLE = 1 << 59, 1 << 60, 1 << 63
FLAG_BITS = bits(11, 2) | bits(54, 50) | bits(63, 59)   # what flags() reads besides the type

GRANULES = {12: "4k", 14: "16k", 16: "64k"}
TG0 = {0b00: 12, 0b01: 16, 0b10: 14}          # TCR_EL1.TG0 ...
TG1 = {0b01: 14, 0b10: 12, 0b11: 16}          # ... and TG1: the encodings differ
PA_SIZES = (32, 36, 40, 42, 44, 48, 52)       # PARange and IPS encodings 0b000..0b110
ASSUMED_PAMAX = 48
LINUX_NAMES = {1: ("pte",), 2: ("pgd", "pte"), 3: ("pgd", "pmd", "pte"),
               4: ("pgd", "pud", "pmd", "pte"), 5: ("pgd", "p4d", "pud", "pmd", "pte")}
SHAREABILITY = ("non-shareable", "reserved", "outer", "inner")


@record(frozen=True)
class Arm64State:
    """The EL1&0 translation regime's registers, as the gdbstub gives them."""

    ttbr0: int
    ttbr1: int
    tcr: int
    sctlr: int
    mair: int
    cpsr: int = 0x3c5        # PSTATE as gdb's cpsr: M[3:2] = current EL, bit 22 = PAN
    id_aa64mmfr0: Optional[int] = None   # PARange[3:0], TGran16[23:20], TGran64[27:24],
                                         # TGran4[31:28]; None = unknown
    id_aa64mmfr1: Optional[int] = None   # HAFDBS[3:0], PAN[23:20]
    id_aa64mmfr2: Optional[int] = None   # VARange[19:16], ST[31:28], E0PD[63:60]
    # whose registers these are: "EL1&0", or "EL2&0" (a VHE host, HCR_EL2.E2H=1: its
    # TTBR0/1_EL2, TCR_EL2 (TCR_EL1's layout then), SCTLR_EL2, MAIR_EL2, walked the same way);
    # "EL2"/"EL3" for a regime not walked (the EL1 registers are here, unused)
    regime: str = "EL1&0"

    @property
    def register_suffix(self) -> str:
        """"_EL1" or "_EL2": how the registers of this regime are named."""
        return "_EL2" if self.regime == "EL2&0" else "_EL1"


def id_field(reg: Optional[int], shift: int) -> Optional[int]:
    return None if reg is None else (reg >> shift) & 0xF


def pamax(state: Arm64State) -> Tuple[int, bool]:
    """(PAMax in bits, whether it was assumed): ID_AA64MMFR0_EL1.PARange."""
    parange = id_field(state.id_aa64mmfr0, 0)
    if parange is None:
        return ASSUMED_PAMAX, True
    return PA_SIZES[min(parange, 6)], False


def _granule_supported(state: Arm64State, g: int) -> bool:
    """ID_AA64MMFR0_EL1.TGran4/16/64 (unknown: supported). TGran16 counts up from 0 = absent;
    TGran4 and TGran64 use 0b1111 for absent."""
    if g == 14:
        return id_field(state.id_aa64mmfr0, 20) != 0
    return id_field(state.id_aa64mmfr0, 28 if g == 12 else 24) != 0xF


def _lpa2(state: Arm64State, g: int) -> Optional[bool]:
    """FEAT_LPA2 for this granule: TGran4 = 0b0001, TGran16 = 0b0010 (None = unknown)."""
    field = id_field(state.id_aa64mmfr0, 28 if g == 12 else 20)
    if field is None:
        return None
    return field == (1 if g == 12 else 2)


@lru_cache(maxsize=128)
def block_size(g: int, level: int, ds: bool, pa52: bool) -> Optional[int]:
    """The block a descriptor at this level may map (AArch64.BlockDescSupported), or None."""
    stride = g - 3
    allowed = {12: level in (1, 2) or (level == 0 and ds),
               14: level == 2 or (level == 1 and ds),
               16: level == 2 or (level == 1 and pa52)}[g]
    return 1 << (g + stride * (3 - level)) if allowed else None


@lru_cache(maxsize=128)
def make_mode(g: int, va_bits: int, ds: bool = False, pa52: bool = False) -> PagingMode:
    """Levels for granule 2**g and a va_bits-bit range. The walk starts at level
    4 - RoundUp((va_bits - g) / stride) (AArch64.S1StartLevel, stride = g - 3); every level
    below the first indexes `stride` bits, the first the rest."""
    start = 4 - -(-(va_bits - g) // (g - 3))
    return PagingMode(f"aarch64-{GRANULES[g]}-{va_bits}", level_specs(g, va_bits, start, ds,
                                                                      pa52), 8, va_bits)


def level_specs(g: int, in_bits: int, start: int, ds: bool, pa52: bool
                ) -> Tuple[LevelSpec, ...]:
    """Levels start..3 for granule 2**g over an `in_bits`-bit input (stage 1's VA, stage 2's
    IPA): every level below the first indexes g - 3 bits, the first the rest."""
    stride = g - 3
    names = LINUX_NAMES[4 - start]
    levels = []
    for k, level in enumerate(range(start, 4)):
        shift = g + stride * (3 - level)
        width = in_bits - shift if level == start else stride
        levels.append(LevelSpec(f"L{level}", names[k], shift, width,
                                block_size(g, level, ds, pa52) if level < 3 else None))
    return tuple(levels)


def level_number(mode: PagingMode, i: int) -> int:
    """The Arm level (-1..3) of mode.levels[i]: the last level is always 3."""
    return 3 - (len(mode.levels) - 1 - i)


@record(frozen=True)
class RangeParams:
    """AArch64.GetS1TTWParams for one VA range (select 0: TTBR0_EL1, 1: TTBR1_EL1)."""

    select: int
    ttbr: int
    txsz: int            # TnSZ as programmed
    tsz: int             # TnSZ clamped into [min, max] (VAIsOutOfRange uses it)
    tsz_fault: str       # why TnSZ is out of bounds, "" when it is not
    granule: int         # log2: 12, 14, 16
    epd: bool
    e0pd: bool           # FEAT_E0PD: EL0 accesses to this range fault
    hpd: bool
    tbi: bool
    tbid: bool
    ds: bool             # effective TCR_EL1.DS
    ha: bool             # effective hardware Access flag update
    hd: bool             # effective hardware dirty state update
    sh: int              # TCR_EL1.SHn: the shareability of leaves when DS=1
    oa_bits: int         # output address size: min(IPS, PARange), 48 without DS/64K
    lpa: bool            # 64K descriptors hold OA[51:48] in bits[15:12] (FEAT_LPA)
    ttbr52: bool         # TTBRn bits[5:2] hold BADDR[51:48]
    pamax: int
    pamax_assumed: bool
    mode: PagingMode
    notes: Tuple[str, ...]

    @property
    def reg(self) -> str:
        return f"TTBR{self.select}_EL1"


@lru_cache(maxsize=64)
def range_params(state: Arm64State, select: int) -> RangeParams:
    tcr, n = state.tcr, select
    notes: List[str] = []
    txsz = (tcr >> (16 if n else 0)) & 0x3F
    tg = (tcr >> (30 if n else 14)) & 3
    g = (TG1 if n else TG0).get(tg)
    if g is None or not _granule_supported(state, g):
        # TCR_EL1.TGn: a reserved or unimplemented granule behaves as an implemented one
        # (IMPLEMENTATION DEFINED which); QEMU 7.2 (sanitize_gran_size) takes the smallest.
        was = "reserved" if g is None else f"{GRANULES[g].upper()}, not implemented"
        g = next(x for x in (12, 14, 16) if _granule_supported(state, x))
        notes.append(f"TCR_EL1.TG{n}={tg:#04b} is {was}: the walk uses the {GRANULES[g].upper()} "
                     f"granule, as QEMU does (it picks the smallest implemented granule)")
    top, top_assumed = pamax(state)
    ds = bool(tcr & TCR_DS) and g != 16
    if ds:
        lpa2 = _lpa2(state, g)
        if lpa2 is False:
            ds = False
            notes.append(f"TCR_EL1.DS=1 ignored: no FEAT_LPA2 for the {GRANULES[g].upper()} "
                         f"granule (ID_AA64MMFR0_EL1)")
        elif lpa2 is None:
            notes.append("ID_AA64MMFR0_EL1 unknown: TCR_EL1.DS=1 taken to mean 52-bit "
                         "addresses (FEAT_LPA2)")

    # AArch64.S1MinTxSZ and AArch64.MaxTxSZ
    varange, st = id_field(state.id_aa64mmfr2, 16), id_field(state.id_aa64mmfr2, 28)
    lva = g == 16 and varange != 0            # None (unknown) counts as present
    min_tsz = 12 if lva or ds else 16
    max_tsz = (47 if g == 16 else 48) if st != 0 else 39
    tsz, why = txsz, ""
    if txsz < min_tsz or txsz > max_tsz:
        tsz = min(max(txsz, min_tsz), max_tsz)
        bound = "below the minimum" if txsz < min_tsz else "above the maximum"
        why = (f"TCR_EL1.T{n}SZ={txsz} is {bound} {tsz} for this granule and CPU: the Arm "
               f"ARM lets a CPU fault or treat it as {tsz} (AArch64.S1TxSZFaults; below the "
               f"minimum it must fault with FEAT_LVA), and QEMU 7.2 faults at level 0")
        notes.append(f"T{n}SZ={txsz} is out of bounds: the mode shown uses it clamped to {tsz}")
    elif (lva and txsz < 16 and varange is None) or (st is None and txsz > 39):
        notes.append(f"ID_AA64MMFR2_EL1 unknown: T{n}SZ={txsz} taken as valid "
                     f"({'FEAT_LVA' if txsz < 16 else 'FEAT_TTST'} assumed)")

    # AArch64.PhysicalAddressSize: IPS capped by PARange; 52 bits only with 64K or DS
    ips = (tcr >> 32) & 7
    if ips > 6:
        notes.append(f"TCR_EL1.IPS={ips:#05b} is reserved: treated as PARange, as QEMU does")
    oa_bits = min(PA_SIZES[ips] if ips <= 6 else top, top)
    if oa_bits > 48 and g != 16 and not ds:
        oa_bits = 48
    pa52 = top == 52                          # FEAT_LPA (never when PARange is assumed)
    mode = make_mode(g, 64 - tsz, ds, pa52)
    ha = bool(tcr & TCR_HA)
    hd = ha and bool(tcr & TCR_HD)            # HD counts only with HA (TCR_EL1.HD)
    hafdbs = id_field(state.id_aa64mmfr1, 0)
    if hafdbs is not None:
        ha, hd = ha and hafdbs >= 1, hd and hafdbs >= 2
    elif ha:
        notes.append(f"ID_AA64MMFR1_EL1 unknown: TCR_EL1.HA{'/HD' if hd else ''}=1 taken to "
                     f"mean the hardware updates {'AF and AP[2]' if hd else 'AF'} "
                     f"(FEAT_HAFDBS assumed)")
    return RangeParams(
        select=n, ttbr=state.ttbr1 if n else state.ttbr0, txsz=txsz, tsz=tsz, tsz_fault=why,
        granule=g, epd=bool(tcr & TCR_EPD[n]),
        e0pd=bool(tcr & TCR_E0PD[n]) and id_field(state.id_aa64mmfr2, 60) != 0,
        hpd=bool(tcr & TCR_HPD[n]),
        tbi=bool(tcr & TCR_TBI[n]), tbid=bool(tcr & TCR_TBID[n]), ds=ds, ha=ha, hd=hd,
        sh=(tcr >> (28 if n else 12)) & 3, oa_bits=oa_bits, lpa=g == 16 and pa52,
        ttbr52=ds or (g == 16 and pa52 and ips == 6), pamax=top, pamax_assumed=top_assumed,
        mode=mode, notes=tuple(notes))


def range_window(p: RangeParams, start: int, end: Optional[int]
                 ) -> Optional[Tuple[int, int, int]]:
    """(base, lo, hi): where [start, end) (end None = 2**64) meets range p, as offsets [lo, hi)
    from the range's first address `base` (0 for TTBR0, 2**64 - 2**va_bits for TTBR1); None
    when they do not meet."""
    top = 1 << 64
    end = top if end is None else min(end, top)
    span = 1 << p.mode.va_bits
    base = top - span if p.select else 0
    lo, hi = max(start, base) - base, min(end, base + span) - base
    return (base, lo, hi) if lo < hi else None


def ttbr_base(p: RangeParams) -> int:
    """The first table's base (AArch64.TTBaseAddress): BADDR aligned to the table's size, at
    least 64 bytes when bits[5:2] hold BADDR[51:48]; bit 0 (CnP) and the ASID dropped."""
    tsize = p.mode.levels[0].index_bits + 3
    if p.ttbr52:
        tsize = max(tsize, 6)
        base = (p.ttbr & bits(47, 6)) | ((p.ttbr >> 2) & 0xF) << 48
    else:
        base = p.ttbr & bits(47, 1)
    return base & ~((1 << tsize) - 1)


def mair_name(attr: int) -> str:
    """A MAIR_EL1 Attr<n> byte (its register description): 'Device-nGnRnE', 'Normal NC',
    'Normal WB RW-alloc', ..."""
    hi, lo = attr >> 4, attr & 0xF
    if hi == 0:
        kind = ("nGnRnE", "nGnRE", "nGRE", "GRE")[lo >> 2]
        if lo & 3 == 0:
            return f"Device-{kind}"
        return f"Device-{kind} XS=0" if lo & 3 == 1 else f"reserved {attr:#04x}"
    if lo == 0:   # inner 0b0000 is meaningful for Normal memory only in these
        return {0x40: "Normal NC XS=0", 0xA0: "Normal WT XS=0",
                0xF0: "Normal Tagged WB RW-alloc"}.get(attr, f"reserved {attr:#04x}")
    inner, outer = _cache_name(lo), _cache_name(hi)
    return f"Normal {inner}" if inner == outer else f"Normal inner {inner}, outer {outer}"


def _cache_name(x: int) -> str:
    if x == 0b0100:
        return "NC"
    alloc = ("no-alloc", "W-alloc", "R-alloc", "RW-alloc")[x & 3]
    return f"{'WB' if x & 4 else 'WT'} {alloc}" + (" transient" if x < 8 else "")


# AP[2:1] -> (EL1 read, EL1 write, EL0 read, EL0 write) ("Memory access control", data access
# permissions; the "leaf permissions" case of AArch64.S1DirectBasePermissions)
AP_RIGHTS = {0b00: (True, True, False, False), 0b01: (True, True, True, True),
             0b10: (True, False, False, False), 0b11: (True, False, True, False)}


def permissions(leaf: int, tattrs: int, wxn: bool, dbm_write: bool
                ) -> Tuple[bool, bool, bool, bool, bool, bool]:
    """AArch64.S1DirectBasePermissions (no FEAT_S1PIE/S1POE): (pr, pw, ur, uw, px, ux).
    tattrs: bits 62:59 ORed over the table descriptors (0 with HPD). dbm_write: a write with
    hardware dirty state on, which clears AP[2] of a DBM=1 descriptor instead of faulting."""
    ap = (leaf >> 6) & 3
    if dbm_write and leaf & DBM:
        ap &= 0b01
    pr, pw, ur, uw = AP_RIGHTS[ap]
    if tattrs >> 61 & 1:                      # APTable[0]: no EL0 access below
        ur = uw = False
    if tattrs >> 62 & 1:                      # APTable[1]: no writes below
        pw = uw = False
    # an EL1 fetch from EL0-writable memory is execute-never; UXN alone governs EL0 fetches
    px = not (leaf & PXN or tattrs & PXN_TABLE or uw)
    ux = not (leaf & UXN or tattrs & UXN_TABLE)
    if wxn:                                   # SCTLR_EL1.WXN: writable => execute-never
        px, ux = px and not pw, ux and not uw
    return pr, pw, ur, uw, px, ux


def table_attrs(path, hpd: bool) -> int:
    if hpd:                                   # TCR_EL1.HPDn=1: hierarchical bits ignored
        return 0
    acc = 0
    for e in path[:-1]:
        acc |= e
    return acc & bits(62, 59)


class DescriptorGeometry:
    """What any VMSAv8-64 descriptor's type and output address are, stage 1 or stage 2: the
    questions walker.iter_leaves asks (present, is_leaf, valid, frame) and the walks' kind.
    `p` holds the walk's mode, granule, ds, lpa and oa_bits."""

    def __init__(self, p):
        self.p = p
        self.mode = p.mode
        self.last = len(p.mode.levels) - 1
        high = 49 if p.ds else 47
        self.masks = [bits(high, spec.shift) for spec in p.mode.levels]   # leaf OA field
        self.table_mask = bits(high, p.granule)
        self.sizes = [1 << spec.shift if i == self.last else spec.large_page
                      for i, spec in enumerate(p.mode.levels)]

    def level(self, i: int) -> int:
        return level_number(self.mode, i)

    def present(self, e: int) -> bool:
        return bool(e & VALID)

    def is_leaf(self, i: int, e: int) -> bool:
        """A block (bits[1:0] = 01 above the last level) or a page (11 at the last)."""
        return i == self.last or not e & TABLE

    def kind(self, i: int, e: int) -> str:
        """AArch64.DecodeDescriptorType: invalid, reserved (01 at level 3), a block where the
        granule allows none (block!), block, table or page."""
        if not e & VALID:
            return "invalid"
        if i == self.last:
            return "page" if e & TABLE else "reserved"
        if e & TABLE:
            return "table"
        return "block" if self.sizes[i] else "block!"

    def frame(self, i: int, e: int, leaf: bool) -> int:
        """The output address: next table, or the block/page base (descriptor formats: OA[51:48] in
        bits[15:12] with 64K and FEAT_LPA, OA[51:50] in bits[9:8] with DS=1)."""
        oa = e & (self.masks[i] if leaf else self.table_mask)
        if self.p.ds:
            oa |= ((e >> 8) & 3) << 50
        elif self.p.lpa:
            oa |= ((e >> 12) & 0xF) << 48
        return oa

    def valid(self, i: int, e: int, leaf: bool) -> bool:
        """Translates past this entry: a table or a leaf, within the output address size."""
        return self.kind(i, e) in ("table", "block", "page") \
            and not self.frame(i, e, leaf) >> self.p.oa_bits

    def page_size(self, i: int, leaf: bool) -> Optional[int]:
        return self.sizes[i] if leaf else None


class Arm64Format(DescriptorGeometry):
    """What a stage 1 descriptor says in one range's mode: its geometry, and the attributes
    and rights the scalar walk and renderers ask about."""

    def __init__(self, p: RangeParams, mair: int):
        super().__init__(p)
        self.mair = mair

    def shareability(self, e: int) -> int:
        return self.p.sh if self.p.ds else (e >> 8) & 3

    def flags(self, i: int, e: int, leaf: bool) -> Tuple[str, ...]:
        kind = self.kind(i, e)
        if kind == "invalid":
            return ("invalid",)
        if kind == "reserved":
            return ("reserved",)
        if kind == "table":
            names = ["table"]
            if not self.p.hpd:        # HPD=1: bits 62:59 are not permission bits
                names += [n for n, b in (("PXNTable", PXN_TABLE), ("UXNTable", UXN_TABLE))
                          if e & b]
                if (e >> 61) & 3:
                    names.append(f"APTable={(e >> 61) & 3:02b}")
            if e & NS_TABLE:
                names.append("NSTable")
            return tuple(names)
        names = ["page" if kind == "page" else "block"]
        names += [n for n, b in (("AF", AF), ("nG", NG)) if e & b]
        names.append(f"AP={(e >> 6) & 3:02b}")
        names.append(f"SH={SHAREABILITY[self.shareability(e)]}")
        index = (e >> 2) & 7
        names.append(f"Attr{index}={mair_name((self.mair >> (8 * index)) & 0xFF)}")
        names += [n for n, b in (("NS", NS), ("GP", GP), ("DBM", DBM), ("PXN", PXN),
                                 ("UXN", UXN), ("Cont", CONT)) if e & b]
        return tuple(names)


@lru_cache(maxsize=64)
def arm64_format(p: RangeParams, mair: int) -> Arm64Format:
    return Arm64Format(p, mair)


def contiguous_entries(g: int, level: int) -> int:
    """How many adjacent entries one Contiguous hint spans ("The Contiguous bit"): 16 with
    4K; 16K: 128 at level 3, 32 above; 64K: 32."""
    if g == 12:
        return 16
    if g == 14:
        return 128 if level == 3 else 32
    return 32


def contiguous_note(g: int, level: int, size: int, va: int) -> str:
    n = contiguous_entries(g, level)
    run = n * size
    lo = va & ~(run - 1) & ((1 << 64) - 1)
    return (f"contiguous hint: part of a {n}-entry run of {size_name(size)} "
            f"{'pages' if level == 3 else 'blocks'} ({size_name(run)}, VA {lo:#x}-"
            f"{lo + run - 1:#x}) that a TLB may cache as one entry; the page size shown is "
            f"the descriptor's")
