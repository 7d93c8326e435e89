"""What the AArch64 oracle guest maps, and what the Arm ARM says each probe must give.

Plain data first (the scenarios: registers, descriptors, probes with their expected answers),
then the builder that turns a scenario into page tables at known physical addresses.

Physical layout, the same in every scenario (RAM of `-M virt` starts at 0x40000000, where QEMU
puts the DTB; the image is loaded above it):

    0x40200000  BASE    code (64 KiB): entry `b start`, VBAR_EL1 vectors at +0x800
    0x40210000  DATA    results (64 KiB): header, PAR/ESR values, the probe list at +0x8000
    0x40300000  FRAMES  1 MiB filled with `svc #0` (the targets of the execute probes)
    0x40400000  TABLES  2 MiB of translation tables (granule-sized, granule-aligned)

Code, data and tables are identity-mapped (TTBR0, pages of the scenario's granule, attribute
index 0, Inner Shareable): code AP=0b10 (read-only at EL1, so executable under WXN) PXN=0 UXN=1;
data and tables AP=0b00 PXN=1 UXN=1. FRAMES is not identity-mapped.

## Expectations

Every probe states by hand, from the Arm ARM (DDI 0487), what each kind of access gives:

    ok="R W X"          the kinds that translate (to `pa`, with PAR.ATTR `attr`, PAR.SH `sh`)
    fault="permission@3"   what every other kind gives: <fault kind>@<level>
    faults={"X": ...}   per-kind exceptions to `fault`
    qemu={"X": ...}     what QEMU 7.2 gives instead, where it differs from the Arm ARM (a finding)

Kinds: R = AT S1E1R, W = AT S1E1W, r = AT S1E0R, w = AT S1E0W, RP = AT S1E1RP, WP = AT S1E1WP
(FEAT_PAN2), X = an instruction fetch at EL1 (`br` to the VA), x = one at EL0 (`eret` to the VA);
the execute kinds run only for probes with exec=True (their frame is in FRAMES, all `svc #0`).
Fault kinds:
translation, address-size, access-flag, permission (PAR_EL1.FST / ESR.IFSC, Arm ARM D17/D19
"ESR_ELx ... DFSC/IFSC"). Where a probe names neither RP nor WP, they are expected to equal R and
W: with PSTATE.PAN=0 they are the same check (AT S1E1RP: "the value of PSTATE.PAN determines if
a read ... will generate a Permission fault"). In the `pan` scenario they follow the same rule as
every other kind (listed in `ok` or they give `fault`). `qemu` may also hold "pa", "attr", "sh":
QEMU's values where they differ from the Arm ARM's.

Rules used (Arm ARM D8 "The AArch64 Virtual Memory System Architecture", stage 1 EL1&0):
  * AP[2:1]: 00 EL1 RW / EL0 none; 01 RW / RW; 10 RO / none; 11 RO / RO. EL1 reads are always
    allowed (except PAN). An EL0 fetch needs UXN=0 only (AP[1]=0 does not stop it: execute-only).
  * EL1 fetch: not if PXN, not if the page is writable at EL0 (AP=01), not if WXN and writable
    at EL1. EL0 fetch: not if UXN, not if WXN and writable at EL0.
  * APTable[0]=1: no EL0 access below (AP[1] forced 0); APTable[1]=1: no write below (AP[2]
    forced 1). PXNTable/UXNTable: PXN/UXN below. The permission fault is reported at the level
    of the leaf. HPD=0 throughout.
  * PAN=1: EL1 data accesses to EL0-accessible (AP[1]=1) pages fault; AT S1E1R/W ignore PAN
    (pseudocode: ATAccess_Read/Write, not ATAccess_ReadPAN/WritePAN); fetches are not affected.
  * AF=0 with TCR.HA=0: Access flag fault. It is found by the walk, before the permission check
    (Armv8.0 AArch64.TranslationTableWalk checks desc<10> inside the walk;
    AArch64.FirstStageTranslate calls AArch64.CheckPermission only on a walk without fault).
  * bits[1:0]=0b01 at level 3 (reserved) and a block at a level where the granule has none (4K
    L0 and 16K L1 without DS; 64K L1 is allowed when FEAT_LPA is implemented) are Translation
    faults at that level.
  * An output address (leaf or next-level table) at or above the PA size min(TCR.IPS, PARange)
    is an Address size fault at the level of that descriptor. With the 64 KiB granule and
    FEAT_LPA, descriptor bits[15:12] are OA[51:48] whatever TCR.IPS says (AArch64.LeafBase),
    so non-zero bits there under IPS=48 are out of range.
  * A VA outside both TTBR ranges, or in a range with EPDn=1: Translation fault, level 0.
  * PAR.SH: the descriptor's SH (TCR.SHn with DS=1) for Normal cacheable memory; 0b10 (Outer
    Shareable) for Device and Normal Non-cacheable memory (PAR_EL1.SH).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

# ---------------------------------------------------------------------------------------------
# Physical layout

RAM_BASE = 0x40000000
BASE = 0x40200000
CODE_SIZE = 0x10000
VECTORS = BASE + 0x800
START = BASE + 0x1000
DATA = BASE + 0x10000
DATA_SIZE = 0x10000
FRAMES = BASE + 0x100000
FRAMES_SIZE = 0x100000
TABLES = BASE + 0x200000
TABLES_SIZE = 0x200000

# ---------------------------------------------------------------------------------------------
# Descriptor fields (Arm ARM D8.3 "Translation table descriptor formats")

AP_RW_EL1 = 0b00      # EL1 read/write, EL0 none
AP_RW_ALL = 0b01      # EL1 and EL0 read/write
AP_RO_EL1 = 0b10      # EL1 read-only, EL0 none
AP_RO_ALL = 0b11      # EL1 and EL0 read-only
SH_NON, SH_OUTER, SH_INNER = 0b00, 0b10, 0b11

#: MAIR_EL1 of every scenario: index -> attribute byte
MAIR_ATTRS = {
    0: 0xFF,   # Normal, Inner/Outer Write-Back non-transient, read/write-allocate
    1: 0x00,   # Device-nGnRnE
    2: 0x44,   # Normal, Inner/Outer Non-cacheable
    3: 0x04,   # Device-nGnRE
    4: 0xBB,   # Normal, Inner/Outer Write-Through non-transient, read/write-allocate
}
MAIR = sum(v << (8 * i) for i, v in MAIR_ATTRS.items())      # 0x000000bb044400ff
ATTR_WB, ATTR_DEV_NGNRNE, ATTR_NC, ATTR_DEV_NGNRE, ATTR_WT = range(5)

GRANULE_BITS = {4096: 12, 16384: 14, 65536: 16}
IPS_BITS = {0b000: 32, 0b001: 36, 0b010: 40, 0b011: 42, 0b100: 44, 0b101: 48, 0b110: 52}

#: SCTLR_EL1: the RES1 bits of Armv8.0 (LSMAOE, nTLSMD, SPAN, EIS, TSCXT, EOS) plus M, C, I.
#: SPAN=1: taking an exception to EL1 leaves PSTATE.PAN alone.
SCTLR_BASE = (1 << 29 | 1 << 28 | 1 << 23 | 1 << 22 | 1 << 20 | 1 << 11) | 1 << 0 | 1 << 2 | 1 << 12
SCTLR_WXN = 1 << 19

# ---------------------------------------------------------------------------------------------
# Scenario data

@dataclass(frozen=True)
class Leaf:
    """A page (at the last level) or a block (above it) mapping `va` to `oa`."""
    va: int
    level: int
    oa: int
    ap: int = AP_RW_EL1
    pxn: int = 0
    uxn: int = 0
    af: int = 1
    ng: int = 0
    attr: int = ATTR_WB
    sh: int = SH_INNER
    contiguous: int = 0


@dataclass(frozen=True)
class TableAttrs:
    """Hierarchical attributes on the table descriptor at `level` on the way to `va`."""
    va: int
    level: int
    aptable: int = 0
    pxntable: int = 0
    uxntable: int = 0


@dataclass(frozen=True)
class Raw:
    """A descriptor written as given at `level` on the way to `va` (invalid, reserved, a block
    where none may be, an out-of-range address...): the tables above it are created."""
    va: int
    level: int
    value: int


Entry = Union[Leaf, TableAttrs, Raw]

#: short kind -> result kind (boot.AtResult.kind)
KINDS = {"R": "s1e1r", "W": "s1e1w", "r": "s1e0r", "w": "s1e0w", "RP": "s1e1rp", "WP": "s1e1wp",
         "X": "exec-el1", "x": "exec-el0"}
AT_KINDS = ("R", "W", "r", "w", "RP", "WP")
EXEC_KINDS = ("X", "x")
FAULT_KINDS = ("translation", "address-size", "access-flag", "permission")


@dataclass(frozen=True)
class Probe:
    name: str
    va: int
    ok: str = ""                      # short kinds that translate, space-separated
    fault: str = ""                   # "<fault kind>@<level>" for every other kind
    pa: Optional[int] = None          # where `ok` kinds land (page offset included); on a
                                      # probe that only faults: the address its leaf names
    attr: Optional[int] = None        # expected PAR.ATTR (the MAIR byte) on success
    sh: Optional[int] = None          # expected PAR.SH on success
    exec: bool = False                # run the execute probes (the VA lands in FRAMES: svc #0)
    faults: Dict[str, str] = field(default_factory=dict)   # per-kind exceptions to `fault`
    qemu: Dict[str, object] = field(default_factory=dict)  # QEMU 7.2's answer where it differs
    note: str = ""

    def _kind(self, kind: str, pan: bool) -> str:
        named = set(self.ok.split()) | set(self.faults)
        if kind in ("RP", "WP") and kind not in named and not pan:
            return kind[0]                       # PAN=0: the same check as S1E1R / S1E1W
        return kind

    def expected(self, kind: str, pan: bool) -> str:
        """The Arm ARM's answer for a short kind: "ok" or "<fault kind>@<level>"."""
        kind = self._kind(kind, pan)
        if kind in self.ok.split():
            return "ok"
        if kind in self.faults:
            return self.faults[kind]
        if not self.fault:
            raise ValueError(f"{self.name}: no expectation for {kind}")
        return self.fault

    def qemu_expected(self, kind: str, pan: bool) -> str:
        """What QEMU 7.2 is expected to give: the Arm ARM's answer unless `qemu` says otherwise."""
        return self.qemu.get(self._kind(kind, pan), self.expected(kind, pan))

    def qemu_field(self, name: str):
        """pa, attr or sh as QEMU 7.2 gives them on success (`qemu` may override each)."""
        return self.qemu.get(name, getattr(self, name))


@dataclass(frozen=True)
class Requirement:
    """The guest checks ID register field `reg`[shift+3:shift] (`op` "ge", "le", "eq" against
    `value`) before it touches the MMU; if it fails, it stops with the SKIP magic."""
    reg: str                          # "id_aa64mmfr0_el1", "id_aa64mmfr1_el1", "id_aa64mmfr2_el1"
    shift: int
    op: str
    value: int
    what: str


@dataclass(frozen=True)
class Scenario:
    name: str
    granule: int                      # bytes, both TTBRs
    t0sz: int
    ips: int                          # TCR_EL1.IPS encoding
    entries: Tuple[Entry, ...]
    probes: Tuple[Probe, ...]
    t1sz: Optional[int] = None        # None: TTBR1 walks disabled (EPD1=1, T1SZ = T0SZ)
    ds: int = 0                       # TCR_EL1.DS (FEAT_LPA2)
    wxn: int = 0
    pan: int = 0                      # `msr pan, #1` after the MMU is on, before the probes
    requires: Tuple[Requirement, ...] = ()
    description: str = ""

    # -- registers (derived from the fields above) --
    @property
    def granule_bits(self) -> int:
        return GRANULE_BITS[self.granule]

    @property
    def pa_bits(self) -> int:
        return IPS_BITS[self.ips]

    @property
    def tcr(self) -> int:
        tg0 = {4096: 0b00, 65536: 0b01, 16384: 0b10}[self.granule]
        tg1 = {16384: 0b01, 4096: 0b10, 65536: 0b11}[self.granule]
        walk_attrs = 0b01 | 0b01 << 2 | SH_INNER << 4     # IRGN=WB-WA, ORGN=WB-WA, SH=Inner
        v = self.t0sz | walk_attrs << 8 | tg0 << 14
        v |= (self.t1sz if self.t1sz is not None else self.t0sz) << 16
        v |= (0 if self.t1sz is not None else 1) << 23      # EPD1
        v |= walk_attrs << 24 | tg1 << 30 | self.ips << 32 | self.ds << 59
        return v

    @property
    def sctlr(self) -> int:
        return SCTLR_BASE | (SCTLR_WXN if self.wxn else 0)

    @property
    def mair(self) -> int:
        return MAIR

    def all_probes(self) -> Tuple[Probe, ...]:
        """The scenario's probes, then the identity-mapped code and data pages (every
        scenario: pages of the granule, so the level is 3)."""
        return self.probes + (
            Probe("identity-code", BASE + 0x40, ok="R RP X", fault="permission@3", pa=BASE + 0x40,
                  attr=0xFF, sh=SH_INNER,
                  note="AP=10 PXN=0 UXN=1: W, r, w denied; X is not probed (it would run the "
                       "entry point)"),
            Probe("identity-data", DATA + 0x8, ok="R W RP WP", fault="permission@3", pa=DATA + 0x8,
                  attr=0xFF, sh=SH_INNER),
        )


# ---------------------------------------------------------------------------------------------
# The scenarios

PERM3, PERM2, PERM1, PERM0 = "permission@3", "permission@2", "permission@1", "permission@0"

_4K_48_ENTRIES: List[Entry] = [
    # -- region A: L0[0] L1[0] L2[128] -> one L3 table (VA 0x10000000..) --
    Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1),
    Leaf(0x10001000, 3, 0x40301000, ap=AP_RW_ALL),
    Leaf(0x10002000, 3, 0x40302000, ap=AP_RO_EL1),
    Leaf(0x10003000, 3, 0x40303000, ap=AP_RO_ALL),
    Leaf(0x10004000, 3, 0x40304000, ap=AP_RO_ALL, uxn=1),
    Leaf(0x10005000, 3, 0x40305000, ap=AP_RO_ALL, pxn=1),
    Leaf(0x10006000, 3, 0x40306000, ap=AP_RW_ALL, af=0),
    Leaf(0x10007000, 3, 0x40307000, ap=AP_RW_EL1, uxn=1, ng=1),
    Raw(0x10008000, 3, 0xFFFFFFFFFFFFFFFE),                       # invalid, every other bit set
    Raw(0x10009000, 3, 0x40309000 | 1 << 10 | 0b01),              # 0b01 at L3: reserved
    Leaf(0x1000A000, 3, 0x1004030A000, ap=AP_RW_EL1),             # OA bit 40 >= IPS (40 bits)
    Leaf(0x1000B000, 3, 0x0900B000, ap=AP_RW_EL1, pxn=1, uxn=1, attr=ATTR_DEV_NGNRNE),
    Leaf(0x1000C000, 3, 0x4030C000, ap=AP_RW_EL1, pxn=1, uxn=1, attr=ATTR_NC),
    Leaf(0x1000D000, 3, 0x0900D000, ap=AP_RW_EL1, pxn=1, uxn=1, attr=ATTR_DEV_NGNRE),
    Leaf(0x1000E000, 3, 0x4030E000, ap=AP_RW_EL1, pxn=1, uxn=1, attr=ATTR_WT, sh=SH_NON),
] + [
    # a contiguous run of 16 pages: VA and OA 64 KiB aligned, identical attributes
    Leaf(0x10010000 + i * 0x1000, 3, 0x40310000 + i * 0x1000, ap=AP_RW_EL1, pxn=1, uxn=1,
         contiguous=1) for i in range(16)
] + [
    Raw(0x10200000, 2, 0),                                         # L2[129] invalid
    Leaf(0x10400000, 2, 0x40200000, ap=AP_RO_ALL),                 # 2 MiB block over the image
    Leaf(0x80000000, 1, 0x40000000, ap=AP_RW_ALL, pxn=1),          # 1 GiB block (L1[2])
    Raw(0xC0000000, 1, 0),                                         # L1[3] invalid
    Raw(0x010000000000, 0, 0x0000000000000401 | 0b01),             # L0[2]: block at L0, no DS
    Raw(0x018000000000, 0, 0),                                     # L0[3] invalid
    Raw(0x020000000000, 0, 0x10000000000 | 0b11),                  # L0[4]: table at 2^40
    # -- hierarchical attributes under L0[1] (VA 0x8000000000..) --
    TableAttrs(0x8000000000, 1, aptable=0b01),
    Leaf(0x8000000000, 3, 0x40320000, ap=AP_RW_ALL),
    TableAttrs(0x8040000000, 1, aptable=0b10),
    Leaf(0x8040000000, 3, 0x40321000, ap=AP_RW_ALL),
    TableAttrs(0x8080000000, 1, aptable=0b11),
    Leaf(0x8080000000, 3, 0x40322000, ap=AP_RW_ALL),
    TableAttrs(0x80C0000000, 1, pxntable=1),
    Leaf(0x80C0000000, 3, 0x40323000, ap=AP_RO_ALL),
    TableAttrs(0x8100000000, 2, uxntable=1),                       # on an L2 table descriptor
    Leaf(0x8100000000, 3, 0x40324000, ap=AP_RO_ALL),
    TableAttrs(0x8140000000, 1, aptable=0b01),
    Leaf(0x8140000000, 2, 0x40200000, ap=AP_RW_ALL),               # 2 MiB block below APTable
    # -- TTBR1 (T1SZ=16) --
    Leaf(0xFFFFFFFFFFFFF000, 3, 0x40330000, ap=AP_RW_EL1, uxn=1, ng=1),
    Leaf(0xFFFFFFFF80000000, 1, 0x40000000, ap=AP_RO_EL1),         # L0[511] L1[510]: 1 GiB
]

_4K_48_PROBES = (
    Probe("ap00", 0x10000000, ok="R W X x", fault=PERM3, pa=0x40300000, attr=0xFF, sh=SH_INNER,
          exec=True, note="x: EL0 may execute an AP=00 page with UXN=0"),
    Probe("ap01", 0x10001000, ok="R W r w x", fault=PERM3, pa=0x40301000, attr=0xFF, exec=True,
          note="X: EL0-writable implies PXN"),
    Probe("ap10", 0x10002000, ok="R X x", fault=PERM3, pa=0x40302000, exec=True),
    Probe("ap11", 0x10003000, ok="R r X x", fault=PERM3, pa=0x40303000, exec=True),
    Probe("uxn", 0x10004000, ok="R r X", fault=PERM3, pa=0x40304000, exec=True),
    Probe("pxn", 0x10005000, ok="R r x", fault=PERM3, pa=0x40305000, exec=True),
    Probe("af0", 0x10006000, fault="access-flag@3", exec=True, pa=0x40306000,
          note="X would also be a permission fault (AP=01); the access flag fault comes first"),
    Probe("ng", 0x10007000, ok="R W X", fault=PERM3, pa=0x40307000, exec=True),
    Probe("invalid-l3", 0x10008000, fault="translation@3"),
    Probe("reserved-l3", 0x10009000, fault="translation@3"),
    Probe("addrsize-l3", 0x1000A000, fault="address-size@3"),
    # FINDING: PAR_EL1.SH "returns the value 0b10 for Device memory and for Normal memory that
    # is Inner and Outer Non-cacheable"; QEMU 7.2 returns the descriptor's SH (0b11) there.
    Probe("device-ngnrne", 0x1000B123, ok="R W", fault=PERM3, pa=0x0900B123, attr=0x00,
          sh=SH_OUTER, qemu={"sh": SH_INNER}),
    Probe("normal-nc", 0x1000C000, ok="R W", fault=PERM3, pa=0x4030C000, attr=0x44, sh=SH_OUTER,
          qemu={"sh": SH_INNER}),
    Probe("device-ngnre", 0x1000D000, ok="R W", fault=PERM3, pa=0x0900D000, attr=0x04,
          sh=SH_OUTER, qemu={"sh": SH_INNER}),
    Probe("wt-non-shareable", 0x1000E000, ok="R W", fault=PERM3, pa=0x4030E000, attr=0xBB,
          sh=SH_NON),
    Probe("contig-first", 0x10010000, ok="R W", fault=PERM3, pa=0x40310000, attr=0xFF),
    Probe("contig-middle", 0x10017ABC, ok="R W", fault=PERM3, pa=0x40317ABC),
    Probe("contig-last", 0x1001FFF8, ok="R W", fault=PERM3, pa=0x4031FFF8),
    Probe("invalid-l2", 0x10200000, fault="translation@2"),
    Probe("block-2m", 0x10500000, ok="R r X x", fault=PERM2, pa=0x40300000, exec=True),
    Probe("block-1g", 0x80300000, ok="R W r w x", fault=PERM1, pa=0x40300000, exec=True),
    Probe("invalid-l1", 0xC0000000, fault="translation@1"),
    # FINDING: QEMU 7.2 takes any block descriptor above level 3 as a block (a 512 GiB block
    # here); AArch64.BlockDescSupported() allows a 4 KiB-granule L0 block only with DS=1.
    # (Upstream QEMU added the check in August 2023: lpae_block_desc_valid() in
    # target/arm/ptw.c, patch 20230807141514.19075-14-peter.maydell@linaro.org.)
    Probe("block-at-l0", 0x010000000000, fault="translation@0", pa=0x0,
          qemu={"R": "ok", "W": "ok", "r": "permission@0", "w": "permission@0", "attr": 0xFF,
                "sh": SH_NON}),
    Probe("invalid-l0", 0x018000000000, fault="translation@0"),
    Probe("addrsize-table-l0", 0x020000000000, fault="address-size@0",
          note="the L0 table descriptor names a table at 2^40 (IPS: 40 bits)"),
    Probe("non-canonical", 0x0001000000000000, fault="translation@0"),
    Probe("aptable-01", 0x8000000000, ok="R W X x", fault=PERM3, pa=0x40320000, exec=True,
          note="AP=01 under APTable=01 acts as AP=00: no longer EL0-writable, so X is allowed"),
    Probe("aptable-10", 0x8040000000, ok="R r X x", fault=PERM3, pa=0x40321000, exec=True,
          note="AP=01 under APTable=10 acts as AP=11"),
    Probe("aptable-11", 0x8080000000, ok="R X x", fault=PERM3, pa=0x40322000, exec=True,
          note="AP=01 under APTable=11 acts as AP=10"),
    Probe("pxntable", 0x80C0000000, ok="R r x", fault=PERM3, pa=0x40323000, exec=True),
    Probe("uxntable-l2", 0x8100000000, ok="R r X", fault=PERM3, pa=0x40324000, exec=True),
    Probe("aptable-over-block", 0x8140100000, ok="R W X x", fault=PERM2, pa=0x40300000, exec=True),
    Probe("ttbr1-page", 0xFFFFFFFFFFFFF010, ok="R W X", fault=PERM3, pa=0x40330010, exec=True),
    Probe("ttbr1-block-1g", 0xFFFFFFFF80301000, ok="R X x", fault=PERM1, pa=0x40301000,
          exec=True),
    Probe("ttbr1-invalid-l0", 0xFFFF800000000000, fault="translation@0"),
    Probe("ttbr1-non-canonical", 0xFFFEFFFFFFFFF000, fault="translation@0"),
)

SCENARIO_4K_48 = Scenario(
    "4k-48", 4096, t0sz=16, t1sz=16, ips=0b010, entries=tuple(_4K_48_ENTRIES),
    probes=_4K_48_PROBES,
    requires=(Requirement("id_aa64mmfr0_el1", 28, "le", 1, "TGran4 (4 KiB granule)"),),
    description="4 KiB granule, 48-bit VAs in both halves (4 levels from L0), IPS 40 bits")

SCENARIO_4K_39 = Scenario(
    "4k-39", 4096, t0sz=25, ips=0b001,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1, uxn=1),
        Leaf(0x10001000, 3, 0x40301000, ap=AP_RW_ALL),
        Leaf(0x10002000, 3, 0x1040302000, ap=AP_RW_EL1),           # OA bit 36 >= IPS (36)
        Leaf(0x10200000, 2, 0x40200000, ap=AP_RW_EL1, uxn=1),      # 2 MiB block
        Leaf(0x10400000, 2, 0x1000200000, ap=AP_RW_EL1),           # block, OA bit 36
        Leaf(0x10800000, 2, 0x40200000, ap=AP_RW_ALL, af=0, uxn=1, pxn=1),
        Leaf(0x80000000, 1, 0x40000000, ap=AP_RO_ALL, pxn=1),      # 1 GiB block (L1[2])
        Raw(0xC0000000, 1, 0),
        Raw(0x10600000, 2, 0),
    ),
    probes=(
        Probe("page", 0x10000000, ok="R W X", fault=PERM3, pa=0x40300000, attr=0xFF,
              sh=SH_INNER, exec=True),
        Probe("page-user", 0x10001000, ok="R W r w x", fault=PERM3, pa=0x40301000, exec=True),
        Probe("addrsize-l3", 0x10002000, fault="address-size@3"),
        Probe("block-2m", 0x10301000, ok="R W X", fault=PERM2, pa=0x40301000, exec=True),
        Probe("addrsize-block-2m", 0x10400000, fault="address-size@2"),
        Probe("af0-block-2m", 0x10800000, fault="access-flag@2", pa=0x40200000),
        Probe("block-1g", 0x80302000, ok="R r x", fault=PERM1, pa=0x40302000, exec=True),
        Probe("invalid-l1", 0xC0000000, fault="translation@1",
              note="the walk starts at L1: its first fault level is 1"),
        Probe("invalid-l2", 0x10600000, fault="translation@2"),
        Probe("beyond-39-bits", 0x8000000000, fault="translation@0"),
        Probe("ttbr1-epd1", 0xFFFFFFFFFFFFF000, fault="translation@0",
              note="in TTBR1's range (T1SZ=25) with EPD1=1"),
    ),
    requires=(Requirement("id_aa64mmfr0_el1", 28, "le", 1, "TGran4 (4 KiB granule)"),),
    description="4 KiB granule, 39-bit VAs (3 levels from L1), TTBR0 only, IPS 36 bits")

SCENARIO_16K_47 = Scenario(
    "16k-47", 16384, t0sz=17, ips=0b101,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1, uxn=1),
        Leaf(0x10004000, 3, 0x40304000, ap=AP_RO_ALL, pxn=1),
        Leaf(0x10008000, 3, 0x40308000, ap=AP_RW_EL1, uxn=1),
        Leaf(0x1000C000, 3, 0x4030C000, ap=AP_RW_ALL, af=0, pxn=1, uxn=1),
        Raw(0x10010000, 3, 0),
        Raw(0x10014000, 3, 0x40314000 | 1 << 10 | 0b01),
        Leaf(0x12000000, 2, 0x40000000, ap=AP_RW_ALL),             # 32 MiB block (L2[9])
        Raw(0x1000000000, 1, 0x0000000000000401 | 0b01),           # L1[1]: 64 GiB block, no DS
    ),
    probes=(
        Probe("page", 0x10000000, ok="R W X", fault=PERM3, pa=0x40300000, attr=0xFF,
              sh=SH_INNER, exec=True),
        Probe("page-ro-user-pxn", 0x10004000, ok="R r x", fault=PERM3, pa=0x40304000, exec=True),
        Probe("page-offset", 0x1000A345, ok="R W X", fault=PERM3, pa=0x4030A345,
              note="offset 0x2345 inside a 16 KiB page (not 4-byte aligned: no execute probe)"),
        Probe("af0", 0x1000C000, fault="access-flag@3", pa=0x4030C000),
        Probe("invalid-l3", 0x10010000, fault="translation@3"),
        Probe("reserved-l3", 0x10014000, fault="translation@3"),
        Probe("block-32m", 0x12300000, ok="R W r w x", fault=PERM2, pa=0x40300000, exec=True),
        # FINDING: as block-at-l0 in 4k-48: QEMU 7.2 maps a 64 GiB block at L1 without DS=1.
    Probe("block-at-l1", 0x1000000000, fault="translation@1", pa=0x0,
          qemu={"R": "ok", "W": "ok", "r": "permission@1", "w": "permission@1", "attr": 0xFF,
                "sh": SH_NON}),
        Probe("beyond-47-bits", 0x800000000000, fault="translation@0"),
    ),
    requires=(Requirement("id_aa64mmfr0_el1", 20, "ge", 1, "TGran16 (16 KiB granule)"),),
    description="16 KiB granule, 47-bit VAs (3 levels from L1), TTBR0 only, IPS 48 bits")

SCENARIO_64K_42 = Scenario(
    "64k-42", 65536, t0sz=22, ips=0b010,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1, uxn=1),
        Leaf(0x10010000, 3, 0x40310000, ap=AP_RO_ALL),
        Leaf(0x10020000, 3, 0x40320000, ap=AP_RW_ALL, pxn=1, uxn=1),
        Raw(0x10030000, 3, 0x40330000 | 1 << 10 | 0b01),
        Leaf(0x10040000, 3, 0x10000000000, ap=AP_RW_EL1),          # OA bit 40 >= IPS (40)
        Leaf(0x80000000, 2, 0x40000000, ap=AP_RO_EL1),             # 512 MiB block (L2[4])
        Raw(0xA0000000, 2, 0),
    ) + tuple(
        Leaf(0x10200000 + i * 0x10000, 3, 0x48000000 + i * 0x10000, ap=AP_RW_EL1, pxn=1, uxn=1,
             contiguous=1) for i in range(32)),        # 32 x 64 KiB contiguous run
    probes=(
        Probe("page", 0x10000000, ok="R W X", fault=PERM3, pa=0x40300000, attr=0xFF,
              sh=SH_INNER, exec=True),
        Probe("page-ro-all", 0x10010000, ok="R r X x", fault=PERM3, pa=0x40310000, exec=True),
        Probe("page-offset", 0x1002ABCD, ok="R W r w", fault=PERM3, pa=0x4032ABCD),
        Probe("reserved-l3", 0x10030000, fault="translation@3"),
        Probe("addrsize-l3", 0x10040000, fault="address-size@3"),
        Probe("block-512m", 0x80300000, ok="R X x", fault=PERM2, pa=0x40300000, exec=True),
        Probe("invalid-l2", 0xA0000000, fault="translation@2",
              note="the walk starts at L2"),
        Probe("contig-first", 0x10200000, ok="R W", fault=PERM3, pa=0x48000000),
        Probe("contig-last", 0x103FFFF0, ok="R W", fault=PERM3, pa=0x481FFFF0),
        Probe("beyond-42-bits", 0x40000000000, fault="translation@0"),
    ),
    requires=(Requirement("id_aa64mmfr0_el1", 24, "eq", 0, "TGran64 (64 KiB granule)"),),
    description="64 KiB granule, 42-bit VAs (2 levels from L2), TTBR0 only, IPS 40 bits")

SCENARIO_64K_48 = Scenario(
    "64k-48", 65536, t0sz=16, ips=0b101,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1, uxn=1),
        Raw(0x10010000, 3, 0x40310000 | 1 << 10 | 0b01),
        Raw(0x10020000, 3, 0x40320000 | 1 << 12 | 1 << 10 | 0b11),  # bits[15:12] = OA[51:48] = 1
        Leaf(0x80000000, 2, 0x40000000, ap=AP_RW_ALL),             # 512 MiB block
        Leaf(0x40000000000, 1, 0x40000000000, ap=AP_RW_EL1),       # L1[1]: 4 TiB block
        Raw(0x80000000000, 1, 0),
    ),
    probes=(
        Probe("page", 0x10000000, ok="R W X", fault=PERM3, pa=0x40300000, attr=0xFF,
              sh=SH_INNER, exec=True),
        Probe("reserved-l3", 0x10010000, fault="translation@3"),
        # FINDING: QEMU 7.2 reads descriptor bits[15:12] as OA[51:48] only when TCR.IPS is
        # 52 bits; the Arm ARM (AArch64.LeafBase: "tgx == TGx_64KB && AArch64.PAMax() >= 52")
        # whenever the PE has 52-bit PAs. QEMU maps the page at 0x40320000.
        Probe("addrsize-oa-51-48", 0x10020000, fault="address-size@3", pa=0x1000040320000,
              note="64 KiB granule + FEAT_LPA: descriptor bits[15:12] are OA[51:48] even "
                   "with IPS=48; OA 2^48 + 0x40320000 is out of range",
              qemu={"R": "ok", "W": "ok", "r": "permission@3", "w": "permission@3",
                    "pa": 0x40320000, "attr": 0xFF, "sh": SH_NON}),
        Probe("block-512m", 0x80310000, ok="R W r w x", fault=PERM2, pa=0x40310000, exec=True),
        Probe("block-4t-l1", 0x40012345678, ok="R W", fault=PERM1, pa=0x40012345678,
              note="a level 1 block with the 64 KiB granule exists with FEAT_LPA"),
        Probe("invalid-l1", 0x80000000000, fault="translation@1"),
        Probe("beyond-48-bits", 0x1000000000000, fault="translation@0"),
    ),
    requires=(Requirement("id_aa64mmfr0_el1", 24, "eq", 0, "TGran64 (64 KiB granule)"),),
    description="64 KiB granule, 48-bit VAs (3 levels from L1), TTBR0 only, IPS 48 bits")

SCENARIO_64K_52 = Scenario(
    "64k-52", 65536, t0sz=12, ips=0b110,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1, uxn=1),
        Leaf(0xF000000000000, 3, 0xF000012340000, ap=AP_RW_EL1, uxn=1, pxn=1),
        Leaf(0xE000000000000, 1, 0x8000000000000, ap=AP_RO_ALL, uxn=1, pxn=1),   # 4 TiB block
        Leaf(0x80000000, 2, 0x40000000, ap=AP_RW_EL1),
        Raw(0x4000000000000, 1, 0),
    ),
    probes=(
        Probe("page", 0x10000000, ok="R W X", fault=PERM3, pa=0x40300000, attr=0xFF,
              sh=SH_INNER, exec=True),
        Probe("page-oa-52", 0xF000000000ABC, ok="R W", fault=PERM3, pa=0xF000012340ABC,
              note="VA bits 51:48 set (FEAT_LVA), OA[51:48] in descriptor bits[15:12]"),
        Probe("block-4t-oa-52", 0xE000000001000, ok="R r", fault=PERM1, pa=0x8000000001000),
        Probe("block-512m", 0x80300000, ok="R W X x", fault=PERM2, pa=0x40300000, exec=True),
        Probe("invalid-l1", 0x4000000000000, fault="translation@1"),
        Probe("beyond-52-bits", 0x10000000000000, fault="translation@0"),
    ),
    requires=(
        Requirement("id_aa64mmfr0_el1", 24, "eq", 0, "TGran64 (64 KiB granule)"),
        Requirement("id_aa64mmfr0_el1", 0, "ge", 6, "PARange=0b0110 (52-bit PA, FEAT_LPA)"),
        Requirement("id_aa64mmfr2_el1", 16, "ge", 1, "VARange=0b0001 (52-bit VA, FEAT_LVA)"),
    ),
    description="64 KiB granule, 52-bit VAs (FEAT_LVA, 3 levels from L1, 1024-entry L1), "
                "IPS 52 bits (FEAT_LPA: OA[51:48] in descriptor bits[15:12])")

SCENARIO_4K_52_LPA2 = Scenario(
    "4k-52-lpa2", 4096, t0sz=12, ips=0b110, ds=1,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1, uxn=1),
        Leaf(0xF000000000000, 3, 0xC000001234000, ap=AP_RW_EL1, uxn=1, pxn=1),
        Leaf(0xF000000001000, 3, 0x3000000005000, ap=AP_RW_EL1, uxn=1, pxn=1),
        Leaf(0xE000000000000, 0, 0x8000000000000, ap=AP_RW_ALL, uxn=1, pxn=1),   # 512 GiB
        Leaf(0xE008000000000, 0, 0x8008000000000, ap=AP_RO_EL1, uxn=1, pxn=1),
        Leaf(0xE010000000000, 0, 0x8010000000000, ap=AP_RW_ALL, af=0, uxn=1, pxn=1),
        Raw(0xE018000000000, 0, 0),
        Leaf(0x80000000, 1, 0x40000000, ap=AP_RW_ALL),                           # 1 GiB
        Raw(0x1000000000000, -1, 0),
    ),
    probes=(
        Probe("page", 0x10000000, ok="R W X", fault=PERM3, pa=0x40300000, attr=0xFF,
              sh=SH_INNER, exec=True, note="sh from TCR_EL1.SH0 (DS=1)"),
        Probe("page-oa-51-50", 0xF000000000567, ok="R W", fault=PERM3, pa=0xC000001234567,
              sh=SH_INNER, note="OA[51:50] in descriptor bits[9:8]"),
        Probe("page-oa-49-48", 0xF000000001000, ok="R W", fault=PERM3, pa=0x3000000005000),
        Probe("block-512g-l0", 0xE000012345678, ok="R W r w", fault=PERM0, pa=0x8000012345678,
              note="a level 0 block exists with the 4 KiB granule only when DS=1"),
        Probe("block-l0-ro", 0xE008000000000, ok="R", fault=PERM0, pa=0x8008000000000),
        Probe("block-l0-af0", 0xE010000000000, fault="access-flag@0", pa=0x8010000000000),
        Probe("invalid-l0", 0xE018000000000, fault="translation@0"),
        Probe("block-1g", 0x80300000, ok="R W r w x", fault=PERM1, pa=0x40300000, exec=True),
        Probe("invalid-l-1", 0x1000000000000, fault="translation@-1",
              note="FST 0b101011: Translation fault, level -1"),
        Probe("beyond-52-bits", 0x10000000000000, fault="translation@0"),
    ),
    requires=(
        Requirement("id_aa64mmfr0_el1", 28, "eq", 1, "TGran4=0b0001 (FEAT_LPA2 with 4 KiB)"),
        Requirement("id_aa64mmfr0_el1", 0, "ge", 6, "PARange=0b0110 (52-bit PA)"),
    ),
    description="4 KiB granule with TCR_EL1.DS=1 (FEAT_LPA2): 52-bit VAs, 5 levels from L-1, "
                "IPS 52 bits (OA[49:48] in bits[49:48], OA[51:50] in bits[9:8])")

SCENARIO_PAN = Scenario(
    "pan", 4096, t0sz=16, ips=0b101, pan=1,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1),
        Leaf(0x10001000, 3, 0x40301000, ap=AP_RW_ALL),
        Leaf(0x10002000, 3, 0x40302000, ap=AP_RO_EL1),
        Leaf(0x10003000, 3, 0x40303000, ap=AP_RO_ALL),
        Leaf(0x10400000, 2, 0x40200000, ap=AP_RW_ALL),
        TableAttrs(0x8000000000, 1, aptable=0b01),
        Leaf(0x8000000000, 3, 0x40304000, ap=AP_RW_ALL),
    ),
    probes=(
        Probe("ap00", 0x10000000, ok="R W RP WP X x", fault=PERM3, pa=0x40300000, exec=True),
        Probe("ap01", 0x10001000, ok="R W r w x", fault=PERM3, pa=0x40301000, exec=True,
              note="RP/WP: PAN; X: EL0-writable"),
        Probe("ap10", 0x10002000, ok="R RP X x", fault=PERM3, pa=0x40302000, exec=True),
        Probe("ap11", 0x10003000, ok="R r X x", fault=PERM3, pa=0x40303000, exec=True,
              note="RP too: PAN denies EL1 reads of EL0-readable pages; PAN does not stop X"),
        Probe("block-2m-ap01", 0x10500000, ok="R W r w x", fault=PERM2, pa=0x40300000,
              exec=True),
        Probe("aptable-hides-el0", 0x8000000000, ok="R W RP WP X x", fault=PERM3, pa=0x40304000,
              exec=True, note="APTable=01: the page is not EL0-accessible, PAN does not apply"),
    ),
    requires=(Requirement("id_aa64mmfr1_el1", 20, "ge", 1, "PAN (FEAT_PAN)"),),
    description="4 KiB, 48-bit, TTBR0 only, PSTATE.PAN=1 (msr pan, #1) during the probes")

SCENARIO_WXN = Scenario(
    "wxn", 4096, t0sz=16, ips=0b101, wxn=1,
    entries=(
        Leaf(0x10000000, 3, 0x40300000, ap=AP_RW_EL1),
        Leaf(0x10001000, 3, 0x40301000, ap=AP_RW_ALL),
        Leaf(0x10002000, 3, 0x40302000, ap=AP_RO_EL1),
        Leaf(0x10003000, 3, 0x40303000, ap=AP_RO_ALL),
        Leaf(0x10400000, 2, 0x40200000, ap=AP_RW_EL1),
        TableAttrs(0x8000000000, 1, aptable=0b10),
        Leaf(0x8000000000, 3, 0x40304000, ap=AP_RW_EL1),
    ),
    probes=(
        Probe("ap00", 0x10000000, ok="R W x", fault=PERM3, pa=0x40300000, exec=True,
              note="X: WXN (writable at EL1); x: not writable at EL0, UXN=0"),
        Probe("ap01", 0x10001000, ok="R W r w", fault=PERM3, pa=0x40301000, exec=True,
              note="x: WXN (writable at EL0)"),
        Probe("ap10", 0x10002000, ok="R X x", fault=PERM3, pa=0x40302000, exec=True),
        Probe("ap11", 0x10003000, ok="R r X x", fault=PERM3, pa=0x40303000, exec=True),
        Probe("block-2m-ap00", 0x10500000, ok="R W x", fault=PERM2, pa=0x40300000, exec=True),
        Probe("aptable-ro", 0x8000000000, ok="R X x", fault=PERM3, pa=0x40304000, exec=True,
              note="AP=00 under APTable=10 is read-only: WXN does not apply"),
    ),
    description="4 KiB, 48-bit, TTBR0 only, SCTLR_EL1.WXN=1 (the guest's code page is "
                "read-only, its data execute-never)")

SCENARIOS: Dict[str, Scenario] = {s.name: s for s in (
    SCENARIO_4K_48, SCENARIO_4K_39, SCENARIO_16K_47, SCENARIO_64K_42, SCENARIO_64K_48,
    SCENARIO_64K_52, SCENARIO_4K_52_LPA2, SCENARIO_PAN, SCENARIO_WXN)}


# ---------------------------------------------------------------------------------------------
# The builder

class Regime:
    """One translation table tree (TTBR0 or TTBR1) of a scenario, built in Python."""

    def __init__(self, scenario: Scenario, va_bits: int, alloc):
        self.s = scenario
        self.gb = scenario.granule_bits
        self.stride = self.gb - 3
        self.va_bits = va_bits
        levels = -(-(va_bits - self.gb) // self.stride)       # ceil
        self.start = 4 - levels
        self.alloc = alloc
        self.root = alloc()

    def shift(self, level: int) -> int:
        return self.gb + self.stride * (3 - level)

    def index(self, va: int, level: int) -> int:
        s = self.shift(level)
        bits = self.va_bits - s if level == self.start else self.stride
        return (va >> s) & ((1 << bits) - 1)

    # -- descriptor encodings --
    def oa_field(self, oa: int) -> int:
        """Output (or next-table) address bits of a descriptor, in the scenario's format."""
        assert oa % self.s.granule == 0, f"unaligned address {oa:#x}"
        if self.s.ds:                         # LPA2: OA[49:gb] as is, OA[51:50] in [9:8]
            assert oa < 1 << 52
            return (oa & ((1 << 50) - 1)) | (oa >> 50 & 3) << 8
        if self.s.granule == 65536:                       # FEAT_LPA: OA[51:48] in [15:12]
            assert oa < 1 << 52
            return (oa & ((1 << 48) - 1)) | (oa >> 48 & 0xF) << 12
        assert oa < 1 << 48
        return oa

    def leaf(self, e: Leaf) -> int:
        last = e.level == 3
        d = (0b11 if last else 0b01) | e.attr << 2 | e.ap << 6 | e.af << 10 | e.ng << 11
        if not self.s.ds:
            d |= e.sh << 8
        d |= e.contiguous << 52 | e.pxn << 53 | e.uxn << 54
        assert e.oa % (1 << self.shift(e.level)) == 0, f"unaligned OA {e.oa:#x}"
        return d | self.oa_field(e.oa)

    def table(self, next_pa: int) -> int:
        return 0b11 | self.oa_field(next_pa)

    # -- building --
    def _walk_to(self, va: int, level: int) -> "Table":
        """The table that holds `va`'s entry at `level`, creating the tables above it."""
        assert self.start <= level <= 3, (level, self.start)
        t = self.root
        for lvl in range(self.start, level):
            i = self.index(va, lvl)
            d = t.entries.get(i)
            if d is None:
                child = self.alloc()
                t.entries[i] = self.table(child.pa)
                t.children[i] = child
            elif i not in t.children:
                raise ValueError(f"{self.s.name}: VA {va:#x} needs a table at level {lvl + 1} "
                                 f"where there is a leaf or raw entry")
            t = t.children[i]
        return t

    def add(self, e: Entry):
        if isinstance(e, Leaf):
            t = self._walk_to(e.va, e.level)
            i = self.index(e.va, e.level)
            assert i not in t.entries, f"{self.s.name}: {e} overwrites an entry"
            t.entries[i] = self.leaf(e)
        elif isinstance(e, Raw):
            t = self._walk_to(e.va, e.level)
            i = self.index(e.va, e.level)
            assert i not in t.entries, f"{self.s.name}: {e} overwrites an entry"
            t.entries[i] = e.value
        elif isinstance(e, TableAttrs):
            t = self._walk_to(e.va, e.level + 1)      # makes the descriptor at e.level a table
            t = self._walk_to(e.va, e.level)
            i = self.index(e.va, e.level)
            t.entries[i] |= e.pxntable << 59 | e.uxntable << 60 | e.aptable << 61
        else:
            raise TypeError(e)


@dataclass
class Table:
    pa: int
    entries: Dict[int, int] = field(default_factory=dict)
    children: Dict[int, "Table"] = field(default_factory=dict)


@dataclass
class Built:
    """A scenario's tables: TTBR values and the bytes of every table at its physical address."""
    ttbr0: int
    ttbr1: int
    tables: Dict[int, bytes]          # pa -> granule-sized table
    tables_end: int                   # first byte after the last table


def identity_entries(scenario: Scenario) -> List[Leaf]:
    """The identity map every scenario carries (see the module docstring)."""
    g = scenario.granule
    out = [Leaf(pa, 3, pa, ap=AP_RO_EL1, pxn=0, uxn=1) for pa in range(BASE, BASE + CODE_SIZE, g)]
    for start, size in ((DATA, DATA_SIZE), (TABLES, TABLES_SIZE)):
        out += [Leaf(pa, 3, pa, ap=AP_RW_EL1, pxn=1, uxn=1) for pa in range(start, start + size, g)]
    return out


def build_tables(scenario: Scenario) -> Built:
    g = scenario.granule
    tables: List[Table] = []

    def alloc() -> Table:
        pa = TABLES + g * len(tables)
        if pa + g > TABLES + TABLES_SIZE:
            raise ValueError(f"{scenario.name}: more tables than fit in {TABLES_SIZE:#x} bytes")
        t = Table(pa)
        tables.append(t)
        return t

    lo = Regime(scenario, 64 - scenario.t0sz, alloc)
    hi = Regime(scenario, 64 - scenario.t1sz, alloc) if scenario.t1sz is not None else None
    for e in identity_entries(scenario):
        lo.add(e)
    for e in scenario.entries:
        if e.va >> 55 & 1:
            if hi is None:
                raise ValueError(f"{scenario.name}: TTBR1 entry {e} but TTBR1 walks are disabled")
            hi.add(e)
        else:
            lo.add(e)
    out = {}
    for t in tables:
        buf = bytearray(g)
        for i, d in t.entries.items():
            buf[8 * i:8 * i + 8] = d.to_bytes(8, "little")
        out[t.pa] = bytes(buf)

    def ttbr(pa: int) -> int:       # BADDR; with 52-bit OAs, BADDR[51:48] goes in bits[5:2]
        return (pa & ((1 << 48) - 1)) | (pa >> 48 & 0xF) << 2

    return Built(ttbr0=ttbr(lo.root.pa), ttbr1=ttbr(hi.root.pa) if hi else 0, tables=out,
                 tables_end=TABLES + g * len(tables))
