"""The RISC-V oracle's scenarios: what each maps, and what the spec says every probe must give.

Expectations are written by hand from the RISC-V Privileged ISA v1.12 (20211203): 4.3.2 "Virtual
Address Translation Process" (with 4.4-4.6 for Sv39/48/57), 3.1.6.3 (MPRV, SUM, MXR), and the
Svnapot and Svpbmt chapters of the same volume:

  * step 2/3: V=0, R=0 with W=1, or any reserved bit/encoding set -> page fault (reserved:
    bits 60:54; N without Svnapot; PBMT without Svpbmt or with menvcfg.PBMTE=0; PBMT=3; on a
    non-leaf PTE D, A, U (and N, PBMT: "reserved for future use" there)).
  * step 4: a pointer (R=W=X=0) at level 0 -> page fault.
  * step 5: R/W/X/U/SUM/MXR as in layout.SUP / layout.USR.
  * step 6: a superpage whose ppn[i-1:0] is not zero (misaligned) -> page fault.
  * step 7: A=0, or D=0 on a store: either a page fault or the hart sets the bit(s) (both
    schemes are allowed). Expectations assume the second (QEMU's); `ad` says what the leaf
    holds afterwards (A by any access that passed, D by a store that passed).
  * 4.4.1: a VA whose bits 63:39 (Sv39; 63:48, 63:57) differ from bit 38 (47, 56) -> page fault.
  * Svnapot (level 0, ppn[3:0]=1000 -> 64 KiB): the VA's vpn[0][3:0] replaces ppn[3:0];
    other ppn[3:0] values, or N at a level above 0 -> page fault.

Every probe VA lands (when it translates) on a FRAMES word `(pa << 32) | ecall`, so loads tell
the PA and fetches trap with the ecall. `qemu={...}` says what QEMU 7.2 gives instead, where it
differs (a finding: see the comment above the probe and README.md "Measured").
"""

from __future__ import annotations

from typing import Dict, Tuple

from .layout import (ALL_KINDS, FRAMES, MENVCFG_PBMTE, PTE_A, PTE_D, PTE_G, PTE_N, PTE_R, PTE_U,
                     PTE_V, PTE_W, SUP, USR, Leaf, Pointer, Probe, Raw, Scenario)


def F(n: int) -> int:
    """The n-th 4 KiB frame of FRAMES."""
    return FRAMES + n * 0x1000


def _ppn(pa: int) -> int:
    return (pa >> 12) << 10


# ---------------------------------------------------------------------------------------------
# sv39

_SV39_PERMS = ("R", "RW", "X", "RX", "RWX", "W", "WX")
L0 = 0x40000000                # the 4 KiB pages: root[1] -> L1[0] -> L0[n]


def _l0(n: int) -> int:
    return L0 + n * 0x1000


_SV39_ENTRIES = tuple(
    [Leaf(_l0(n), 0, F(n), perms=p) for n, p in enumerate(_SV39_PERMS)]
    + [Leaf(_l0(8 + n), 0, F(8 + n), perms=p, u=1) for n, p in enumerate(_SV39_PERMS)]
    + [
        Leaf(_l0(16), 0, F(16), perms="RW", a=0, d=0),
        Leaf(_l0(17), 0, F(17), perms="RW", d=0),
        Leaf(_l0(18), 0, F(18), perms="R", a=0, d=0),
        Leaf(_l0(19), 0, F(19), perms="RW", g=1),
        Leaf(_l0(20), 0, F(20), perms="RW", bits=1 << 54),
        Leaf(_l0(21), 0, F(21), perms="RW", bits=1 << 60),
        Leaf(_l0(22), 0, F(22), perms="RW", pbmt=1),
        Raw(_l0(23), 0, 0xFFFFFFFFFFFFFFFE),                     # V=0, every other bit set
        Raw(_l0(24), 0, PTE_V | _ppn(F(24))),                   # a pointer at level 0
        Leaf(_l0(25), 0, F(25), perms="RW", bits=0b11 << 8),    # RSW
        Leaf(_l0(26), 0, F(26), perms="RW", a=0, d=0),          # never probed: gva2gpa
        Leaf(_l0(32), 0, F(32), perms="RW", napot=True),        # 16 PTEs with N, no Svnapot
        Raw(0x40200000, 1, 0),                                  # L1[1] invalid
        Leaf(0x40400000, 1, 0x80000000, perms="RW", u=1),       # 2 MiB, user
        Leaf(0x40600000, 1, 0x80101000, perms="RW"),            # 2 MiB, ppn[0] != 0
        Leaf(0x40800000, 0, F(40)), Pointer(0x40800000, 1, PTE_U),
        Leaf(0x40A00000, 0, F(41)), Pointer(0x40A00000, 1, PTE_A),
        Leaf(0x40C00000, 0, F(42)), Pointer(0x40C00000, 1, PTE_D),
        Leaf(0x40E00000, 0, F(43)), Pointer(0x40E00000, 1, PTE_G),
        Raw(0xC0000000, 2, PTE_R | PTE_W | _ppn(0x80000000)),   # root[3]: V=0, R W set
        Leaf(0x140000000, 2, 0x80000000, perms="RWX"),          # root[5]: 1 GiB
        Leaf(0x180000000, 2, 0x80200000, perms="RW"),           # root[6]: 1 GiB, misaligned
        Leaf(0xFFFFFFC000000000, 2, 0x80000000, perms="RW"),    # root[256]: upper half
    ])

_SV39_PROBES = tuple(
    [Probe(f"s-{p.lower()}", _l0(n), ok=SUP[p], pa=F(n),
           note="reserved: W without R" if "R" not in p and "W" in p else "")
     for n, p in enumerate(_SV39_PERMS)]
    + [Probe(f"u-{p.lower()}", _l0(8 + n), ok=USR[p], pa=F(8 + n),
             note="reserved: W without R" if "R" not in p and "W" in p else "")
       for n, p in enumerate(_SV39_PERMS)]
    + [
        Probe("a0-d0", _l0(16), ok=SUP["RW"], pa=F(16), ad="AD",
              note="A and D set by the hart (the load sets A, the store D)"),
        Probe("d0", _l0(17), ok=SUP["RW"], pa=F(17), ad="AD"),
        Probe("a0-read-only", _l0(18) + 0x10, ok=SUP["R"], pa=F(18) + 0x10, ad="A"),
        Probe("global", _l0(19) + 0x20, ok=SUP["RW"], pa=F(19) + 0x20),
        Probe("reserved-bit-54", _l0(20), pa=F(20)),
        Probe("reserved-bit-60", _l0(21), pa=F(21)),
        Probe("pbmt-without-svpbmt", _l0(22), pa=F(22)),
        Probe("invalid-l0", _l0(23)),
        Probe("pointer-at-l0", _l0(24)),
        Probe("rsw", _l0(25) + 0x18, ok=SUP["RW"], pa=F(25) + 0x18, note="RSW: ignored"),
        Probe("napot-without-svnapot", _l0(35) + 0x8, pa=F(35) + 0x8,
              note="N (bit 63) is reserved without Svnapot"),
        Probe("invalid-l1", 0x40200000),
        Probe("superpage-2m", 0x40503000, ok=USR["RW"], pa=0x80103000),
        Probe("misaligned-2m", 0x40600000, pa=0x80101000),
        Probe("pointer-with-u", 0x40800000, pa=F(40)),
        Probe("pointer-with-a", 0x40A00000, pa=F(41)),
        Probe("pointer-with-d", 0x40C00000, pa=F(42)),
        Probe("pointer-with-g", 0x40E00000, ok=SUP["RW"], pa=F(43), note="G is not reserved"),
        Probe("invalid-l2", 0xC0000000),
        Probe("superpage-1g", 0x140104000, ok=SUP["RWX"], pa=0x80104000),
        Probe("misaligned-1g", 0x180104000, pa=0x80304000),
        Probe("upper-half-1g", 0xFFFFFFC000105000, ok=SUP["RW"], pa=0x80105000),
        Probe("non-canonical-hi", 0x0000004000105000, pa=0x80105000,
              note="bits 63:39 clear, bit 38 set: root[256] if QEMU ignored the rule"),
        Probe("non-canonical-lo", 0xFFFFFF8040001000, pa=F(1),
              note="bits 63:39 set, bit 38 clear: the RW page s-rw otherwise"),
    ])

SV39 = Scenario(
    "sv39", "sv39", _SV39_ENTRIES, _SV39_PROBES, unprobed=(_l0(26),),
    description="Sv39: every R/W/X x U leaf, reserved encodings and bits, A/D, G, RSW, V=0 at "
                "each level, 2 MiB and 1 GiB superpages (and misaligned ones), pointer at "
                "level 0 and with U/A/D/G, upper half, non-canonical VAs")

# ---------------------------------------------------------------------------------------------
# sum-mxr: the S/U x SUM x MXR matrix on Sv39, every kind

_SM_PERMS = ("R", "RW", "X", "RX", "RWX")
SUM_MXR = Scenario(
    "sum-mxr", "sv39",
    tuple([Leaf(_l0(n), 0, F(n), perms=p) for n, p in enumerate(_SM_PERMS)]
          + [Leaf(_l0(8 + n), 0, F(8 + n), perms=p, u=1) for n, p in enumerate(_SM_PERMS)]
          + [Leaf(_l0(16), 0, F(16), perms="W", u=1),
             Leaf(0x40400000, 1, 0x80000000, perms="X", u=1)]),
    tuple([Probe(f"s-{p.lower()}", _l0(n) + 8 * n, ok=SUP[p], pa=F(n) + 8 * n)
           for n, p in enumerate(_SM_PERMS)]
          + [Probe(f"u-{p.lower()}", _l0(8 + n) + 8 * n, ok=USR[p], pa=F(8 + n) + 8 * n)
             for n, p in enumerate(_SM_PERMS)]
          + [Probe("u-w-reserved", _l0(16), pa=F(16), note="SUM/MXR do not lift reserved"),
             Probe("u-x-superpage-2m", 0x40506000, ok=USR["X"], pa=0x80106000)]),
    kinds=ALL_KINDS,
    description="Sv39, every kind: S/U loads, stores and fetches with SUM and MXR on and off "
                "on S and U pages of each permission")

# ---------------------------------------------------------------------------------------------
# sv48 and sv57: more levels, bigger superpages, the upper half

SV48 = Scenario(
    "sv48", "sv48",
    (
        Leaf(0x40000000, 0, F(0), perms="RW"),                  # root[0] L2[1] L1[0] L0[0]
        Leaf(0x40001000, 0, F(1), perms="RX", u=1),
        Leaf(0x40200000, 1, 0x80000000, perms="RX"),            # 2 MiB
        Raw(0xC0000000, 2, 0),                                  # L2[3] invalid
        Leaf(0x140000000, 2, 0x80000000, perms="RW", u=1),      # 1 GiB
        Leaf(0x8000000000, 3, 0, perms="RWX"),                  # root[1]: 512 GiB at PA 0
        Leaf(0x10000000000, 3, 0x80000000, perms="RW"),         # root[2]: misaligned
        Raw(0x18000000000, 3, 0),                               # root[3] invalid
        Leaf(0xFFFF800000000000, 0, F(2), perms="RW"),          # root[256] ... L0[0]
        Leaf(0xFFFFFF8000000000, 3, 0, perms="R"),              # root[511]: 512 GiB
    ),
    (
        Probe("page", 0x40000000, ok=SUP["RW"], pa=F(0)),
        Probe("user-rx", 0x40001000, ok=USR["RX"], pa=F(1)),
        Probe("superpage-2m", 0x40308000, ok=SUP["RX"], pa=0x80108000),
        Probe("invalid-l2", 0xC0000000),
        Probe("superpage-1g", 0x140107000, ok=USR["RW"], pa=0x80107000),
        Probe("superpage-512g", 0x8080106000, ok=SUP["RWX"], pa=0x80106000),
        Probe("misaligned-512g", 0x10080106000),
        Probe("invalid-l3", 0x18000000000),
        Probe("upper-page", 0xFFFF800000000008, ok=SUP["RW"], pa=F(2) + 8),
        Probe("upper-512g", 0xFFFFFF8080109000, ok=SUP["R"], pa=0x80109000),
        Probe("non-canonical-hi", 0x0000800000000008, pa=F(2) + 8,
              note="bits 63:48 clear, bit 47 set: upper-page if QEMU ignored the rule"),
        Probe("non-canonical-lo", 0xFFFF000040000000, pa=F(0),
              note="bits 63:48 set, bit 47 clear: page otherwise"),
    ),
    description="Sv48: 4 levels, 2 MiB, 1 GiB and 512 GiB superpages (one misaligned), upper "
                "half pages and superpages, V=0 at levels 3 and 2, non-canonical VAs")

SV57 = Scenario(
    "sv57", "sv57",
    (
        Leaf(0x40000000, 0, F(0), perms="RW"),                  # root[0] L3[0] L2[1] L1[0] L0[0]
        Leaf(0x8000000000, 3, 0, perms="RW", u=1),              # L3[1]: 512 GiB at PA 0
        Raw(0x10000000000, 3, 0),                               # L3[2] invalid
        Leaf(0x1000000000000, 4, 0, perms="RWX"),               # root[1]: 256 TiB at PA 0
        Leaf(0x2000000000000, 4, 0x80000000, perms="RW"),       # root[2]: misaligned
        Raw(0x3000000000000, 4, 0),                             # root[3] invalid
        Raw(0xFFFF800000000000, 3, 0),                          # root[511] L3[256] invalid
        Leaf(0xFFFFFFFFFFFFF000, 0, F(3), perms="RW"),          # root[511] ... L0[511]
        Leaf(0xFF00000000000000, 4, 0, perms="RX"),             # root[256]: 256 TiB
    ),
    (
        Probe("page", 0x40000000, ok=SUP["RW"], pa=F(0)),
        Probe("superpage-512g", 0x808010B000, ok=USR["RW"], pa=0x8010B000),
        Probe("invalid-l3", 0x10000000000),
        Probe("superpage-256t", 0x100008010A000, ok=SUP["RWX"], pa=0x8010A000),
        Probe("misaligned-256t", 0x2000080100000),
        Probe("invalid-l4", 0x3000000000000),
        Probe("upper-page", 0xFFFFFFFFFFFFFFF8, ok=SUP["RW"], pa=F(3) + 0xFF8),
        Probe("upper-256t", 0xFF0000008010C000, ok=SUP["RX"], pa=0x8010C000),
        Probe("non-canonical", 0x010000008010C000, pa=0x8010C000,
              note="bits 63:57 clear, bit 56 set: upper-256t if QEMU ignored the rule"),
        Probe("upper-invalid-l3", 0xFFFF800000000000,
              note="the Sv48 upper half's start: root[511], L3[256] not valid"),
    ),
    description="Sv57: 5 levels, 512 GiB and 256 TiB superpages (one misaligned), the upper "
                "half, V=0 at levels 4 and 3, non-canonical VAs")

# ---------------------------------------------------------------------------------------------
# Svnapot, with and without the extension

_NAPOT_BAD = PTE_V | PTE_R | PTE_W | PTE_A | PTE_D | PTE_N

_NAPOT_ENTRIES = (
    Leaf(0x40000000, 0, F(0), perms="RW"),
    Leaf(0x40001000, 0, F(1), perms="RW", bits=1 << 54),
    Leaf(0x40010000, 0, F(16), perms="RW", napot=True),         # 64 KiB
    Leaf(0x40020000, 0, F(32), perms="RX", u=1, napot=True),
    Raw(0x40030000, 0, _NAPOT_BAD | _ppn(F(48)) | 0b0100 << 10),  # ppn[3:0] = 0100: 32 KiB
    Raw(0x40031000, 0, _NAPOT_BAD | _ppn(F(48))),                 # ppn[3:0] = 0000
    Raw(0x40200000, 1, _NAPOT_BAD | _ppn(0x80000000)),           # N on a 2 MiB leaf
    Leaf(0x40400000, 0, F(56), perms="RW"), Pointer(0x40400000, 1, PTE_N),
)


def _napot_probes(svnapot: bool) -> Tuple[Probe, ...]:
    """With Svnapot, ppn[3:0]=1000 at level 0 is a 64 KiB page and every other use of N is
    reserved; without it, N itself is reserved: every PTE with N faults."""
    on = svnapot
    return (
        Probe("plain-page", 0x40000000, ok=SUP["RW"], pa=F(0)),
        # FINDING (with Svnapot): QEMU 7.2 takes the PPN from bits 53:10 and looks at no
        # other bit when Svnapot or Svpbmt is on: bits 60:54 are ignored. (Without either it
        # faults, as napot-off and sv39 show.)
        Probe("reserved-bit-54", 0x40001000, pa=F(1),
              qemu={"R": "ok", "W": "ok"} if on else {}),
        Probe("napot-first", 0x40010000, ok=SUP["RW"] if on else "", pa=F(16)),
        Probe("napot-page-5", 0x40015008, ok=SUP["RW"] if on else "", pa=F(21) + 8,
              note="vpn[0][3:0] = 5 replaces ppn[3:0]"),
        Probe("napot-last", 0x4001FFF8, ok=SUP["RW"] if on else "", pa=F(31) + 0xFF8),
        Probe("napot-user-rx", 0x40027000, ok=USR["RX"] if on else "", pa=F(39)),
        Probe("napot-32k-reserved", 0x40030000),
        Probe("napot-ppn-0000", 0x40031000),
        Probe("napot-superpage-2m", 0x40300000, pa=F(0),
              note="Svnapot defines N only at level 0"),
        Probe("napot-on-pointer", 0x40400000, pa=F(56),
              note="N is reserved in a non-leaf PTE"),
    )


NAPOT = Scenario(
    "napot", "sv39", _NAPOT_ENTRIES, _napot_probes(True), cpu="rv64,svnapot=on",
    description="Sv39 with Svnapot: a 64 KiB NAPOT page (16 identical PTEs), a user one, "
                "reserved NAPOT encodings, N on a 2 MiB leaf and on a pointer")
NAPOT_OFF = Scenario(
    "napot-off", "sv39", _NAPOT_ENTRIES, _napot_probes(False), cpu="rv64",
    description="napot's tables on a hart without Svnapot: N is a reserved bit")

# ---------------------------------------------------------------------------------------------
# Svpbmt, with menvcfg.PBMTE = 1 and 0

_PBMT_ENTRIES = (
    Leaf(0x40000000, 0, F(0), perms="RWX", pbmt=0),
    Leaf(0x40001000, 0, F(1), perms="RWX", pbmt=1),
    Leaf(0x40002000, 0, F(2), perms="RW", pbmt=2),
    Leaf(0x40003000, 0, F(3), perms="RW", pbmt=3),
    Leaf(0x40004000, 0, F(4), perms="RW", bits=1 << 54),
    Leaf(0x40010000, 0, F(16), perms="RW", napot=True),
    Leaf(0x40200000, 0, F(5), perms="RW"), Pointer(0x40200000, 1, 1 << 61),
    Leaf(0x40400000, 1, 0x80000000, perms="RWX", pbmt=1),
)


def _pbmt_probes(pbmte: bool) -> Tuple[Probe, ...]:
    """PBMT 0 PMA, 1 NC, 2 IO translate like any page when menvcfg.PBMTE=1; 3 is reserved, and
    so are non-zero PBMT bits on a pointer. With PBMTE=0 the hart behaves as without Svpbmt:
    every non-zero PBMT is reserved."""
    on = pbmte
    io = "not probed: executing from I/O memory is for the PMAs to say"
    # FINDING (pbmt-off): QEMU 7.2 ignores menvcfg.PBMTE (it reads and writes back): with
    # Svpbmt on, PBMT 1 and 2 work whatever PBMTE says. (Upstream added the check in 2023:
    # "target/riscv: Add *envcfg.PBMTE related check in address translation".)
    rwx = {} if on else {"R": "ok", "W": "ok", "X": "ok"}
    return (
        Probe("pbmt-0-pma", 0x40000000, ok=SUP["RWX"], pa=F(0)),
        Probe("pbmt-1-nc", 0x40001008, ok=SUP["RWX"] if on else "", pa=F(1) + 8, qemu=rwx),
        Probe("pbmt-2-io", 0x40002010, ok=SUP["RW"] if on else "", pa=F(2) + 0x10, exec=False,
              note=io, qemu={} if on else {"R": "ok", "W": "ok"}),
        # FINDING: PBMT=3 is reserved; QEMU 7.2 maps the page (it models no memory types).
        Probe("pbmt-3-reserved", 0x40003000, pa=F(3), qemu={"R": "ok", "W": "ok"}),
        # FINDING: with Svpbmt on, bits 60:54 are ignored (as in napot).
        Probe("reserved-bit-54", 0x40004000, pa=F(4), qemu={"R": "ok", "W": "ok"}),
        # FINDING: N (bit 63) without Svnapot, on a hart with Svpbmt: QEMU 7.2 masks it off
        # the PPN and checks nothing, so each of the 16 PTEs maps an ordinary 4 KiB page at
        # ppn = base | 0b1000: VA 0x40013000 reads F(24), not F(19).
        Probe("n-without-svnapot", 0x40013000, pa=F(19), note="N is reserved without Svnapot",
              qemu={"R": "ok", "W": "ok", "pa": F(24)}),
        Probe("pbmt-on-pointer", 0x40200000, pa=F(5), note="PBMT is reserved in a pointer"),
        Probe("pbmt-1-superpage-2m", 0x40505000, ok=SUP["RWX"] if on else "", pa=0x80105000,
              qemu=rwx),
    )


PBMT = Scenario(
    "pbmt", "sv39", _PBMT_ENTRIES, _pbmt_probes(True), cpu="rv64,svpbmt=on",
    menvcfg=MENVCFG_PBMTE,
    description="Sv39 with Svpbmt and menvcfg.PBMTE=1: PBMT 0-3 on pages and a superpage, "
                "PBMT on a pointer")
PBMT_OFF = Scenario(
    "pbmt-off", "sv39", _PBMT_ENTRIES, _pbmt_probes(False), cpu="rv64,svpbmt=on",
    menvcfg=0, description="pbmt's tables with menvcfg.PBMTE=0: PBMT is reserved")

SCENARIOS: Dict[str, Scenario] = {s.name: s for s in (
    SV39, SV48, SV57, SUM_MXR, NAPOT, NAPOT_OFF, PBMT, PBMT_OFF)}
