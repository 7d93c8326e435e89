"""What the RISC-V oracle guest maps, the kinds of access it tries, and the table builder.

The scenarios themselves (plain data, with the expected answers) are in scenarios.py.

Physical layout, the same in every scenario (RAM of `-M virt` starts at 0x80000000; with
`-bios none` QEMU starts the hart in M-mode at the ELF entry and puts the FDT near the top of RAM,
at 0xbfe00000 with -m 1G):

    0x80000000  BASE    code (64 KiB): `j start`, nop, ECALL_VA: `ecall`, nop, handler, ...
    0x80010000  DATA    128 KiB: header, probe list at +0x1000, results at +0x4000
    0x80100000  FRAMES  1 MiB: word at PA p is (p << 32) | 0x73 (`ecall` in its low half)
    0x80200000  TABLES  up to 2 MiB of 4 KiB page tables, the root (satp.PPN) first

Code and DATA are identity-mapped in every scenario (4 KiB pages, U=0, A=1, D=1): code R X
(the guest parks in S-mode there), DATA R W. FRAMES are what the probes map.

Sv39/Sv48/Sv57 PTE (Privileged ISA v1.12, 4.4.1/4.5.1/4.6.1, Svnapot and Svpbmt chapters):

    63 N | 62:61 PBMT | 60:54 reserved | 53:10 PPN | 9:8 RSW | 7 D | 6 A | 5 G | 4 U | 3 X
    | 2 W | 1 R | 0 V

Levels are numbered as the spec's `i`: 0 is the 4 KiB level, the root is levels-1 (2 for Sv39,
3 for Sv48, 4 for Sv57); a leaf at level i maps 4 KiB << 9i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

# ---------------------------------------------------------------------------------------------
# Physical layout

RAM_BASE = 0x80000000
BASE = 0x80000000
CODE_SIZE = 0x10000
ECALL_VA = BASE + 0x8          # an `ecall` (and a nop) in the code page: the identity probe
DATA = BASE + 0x10000
DATA_SIZE = 0x20000
FRAMES = BASE + 0x100000
FRAMES_SIZE = 0x100000
TABLES = BASE + 0x200000
TABLES_SIZE = 0x200000
ECALL = 0x00000073
SCRATCH = 0xF8                 # a DATA word (in the header page) the identity-data probe uses
SCRATCH_VALUE = 0x5343524154434821


def frame_word(pa: int) -> int:
    """The 8 bytes at `pa` (8-aligned, in FRAMES) as the image has them."""
    return (pa & ~7) << 32 | ECALL


# ---------------------------------------------------------------------------------------------
# PTE fields

PTE_V, PTE_R, PTE_W, PTE_X, PTE_U, PTE_G, PTE_A, PTE_D = (1 << b for b in range(8))
PTE_RSW_SHIFT = 8
PTE_PPN_SHIFT = 10
PPN_BITS = 44
PTE_RESERVED = 0x7F << 54      # bits 60:54
PBMT_SHIFT = 61                # 0 PMA, 1 NC, 2 IO, 3 reserved (Svpbmt)
PTE_N = 1 << 63                # Svnapot
NAPOT_64K = 0b1000             # ppn[3:0] of a 64 KiB NAPOT PTE
PERM_BITS = {"R": PTE_R, "W": PTE_W, "X": PTE_X}

SATP_MODE = {"sv39": 8, "sv48": 9, "sv57": 10}
LEVELS = {"sv39": 3, "sv48": 4, "sv57": 5}
MENVCFG_PBMTE = 1 << 62

# mstatus fields the guest sets for a probe (v1.12 3.1.6)
MSTATUS_MPP_S = 1 << 11        # MPP[12:11] = 01; U is 00
MSTATUS_MPRV = 1 << 17
MSTATUS_SUM = 1 << 18
MSTATUS_MXR = 1 << 19

# ---------------------------------------------------------------------------------------------
# Kinds of access


@dataclass(frozen=True)
class Kind:
    """One way the guest asks its CPU about a VA. Loads and stores run in M-mode with
    mstatus.MPRV=1 and MPP = the mode (so they translate as that mode); fetches `mret` to the VA
    in that mode."""
    name: str
    access: str                # "load", "store", "fetch"
    mode: str                  # "S" or "U"
    sum: int = 0
    mxr: int = 0

    @property
    def mstatus(self) -> int:
        v = MSTATUS_MPP_S if self.mode == "S" else 0
        v |= MSTATUS_SUM if self.sum else 0
        v |= MSTATUS_MXR if self.mxr else 0
        return v | (MSTATUS_MPRV if self.access != "fetch" else 0)

    @property
    def page_fault(self) -> int:
        """mcause of a page fault for this access (v1.12 table 3.6)."""
        return {"fetch": 12, "load": 13, "store": 15}[self.access]

    @property
    def access_fault(self) -> int:
        return {"fetch": 1, "load": 5, "store": 7}[self.access]

    @property
    def ok_cause(self) -> Optional[int]:
        """What a working fetch traps with: the frame's `ecall` from S (9) or U (8)."""
        return (9 if self.mode == "S" else 8) if self.access == "fetch" else None


#: every kind, in the order the guest runs them (and of the 16-byte result slots). A store runs
#: right after its load, the same mode and SUM, and writes back what the load read.
KIND_LIST = (
    Kind("R", "load", "S"), Kind("W", "store", "S"), Kind("X", "fetch", "S"),
    Kind("r", "load", "U"), Kind("w", "store", "U"), Kind("x", "fetch", "U"),
    Kind("R+sum", "load", "S", sum=1), Kind("W+sum", "store", "S", sum=1),
    Kind("X+sum", "fetch", "S", sum=1),
    Kind("R+mxr", "load", "S", mxr=1), Kind("r+mxr", "load", "U", mxr=1),
    Kind("R+sum+mxr", "load", "S", sum=1, mxr=1),
)
KINDS: Dict[str, Kind] = {k.name: k for k in KIND_LIST}
SLOT: Dict[str, int] = {k.name: n for n, k in enumerate(KIND_LIST)}
BASE_KINDS = ("R", "W", "X", "r", "w", "x")
ALL_KINDS = tuple(KINDS)
#: a store's load (its value is written back)
STORE_LOAD = {"W": "R", "w": "r", "W+sum": "R+sum"}
OUTCOMES = ("ok", "page-fault", "access-fault")

#: What a valid leaf (A=1, D=1, nothing reserved) allows, by its U bit and R/W/X bits, written
#: out from v1.12 4.3.1 (R/W/X; W without R reserved), 4.3.2 step 5 and 3.1.6.3 (SUM: S may
#: load/store U pages, never fetch from them; U never touches U=0 pages; MXR: loads from
#: execute-only pages).
SUP: Dict[str, str] = {
    "R": "R R+sum R+mxr R+sum+mxr",
    "RW": "R W R+sum W+sum R+mxr R+sum+mxr",
    "X": "X X+sum R+mxr R+sum+mxr",
    "RX": "R X R+sum X+sum R+mxr R+sum+mxr",
    "RWX": "R W X R+sum W+sum X+sum R+mxr R+sum+mxr",
    "W": "", "WX": "",
}
USR: Dict[str, str] = {
    "R": "r r+mxr R+sum R+sum+mxr",
    "RW": "r w r+mxr R+sum W+sum R+sum+mxr",
    "X": "x r+mxr R+sum+mxr",
    "RX": "r x r+mxr R+sum R+sum+mxr",
    "RWX": "r w x r+mxr R+sum W+sum R+sum+mxr",
    "W": "", "WX": "",
}

# ---------------------------------------------------------------------------------------------
# Scenario data types


@dataclass(frozen=True)
class Leaf:
    """A leaf at `level` mapping `va` (4 KiB << 9*level) to `pa` (not checked for alignment: a
    misaligned superpage is a scenario). napot=True: a 64 KiB Svnapot page (level 0, `pa` 64 KiB
    aligned): 16 identical PTEs with N=1 and ppn[3:0]=1000. `bits`: OR-ed in as given."""
    va: int
    level: int
    pa: int
    perms: str = "RW"
    u: int = 0
    g: int = 0
    a: int = 1
    d: int = 1
    pbmt: int = 0
    napot: bool = False
    bits: int = 0


@dataclass(frozen=True)
class Pointer:
    """Extra bits OR-ed into the pointer (non-leaf) PTE at `level` on the way to `va`."""
    va: int
    level: int
    bits: int


@dataclass(frozen=True)
class Raw:
    """A PTE written as given at `level` on the way to `va` (tables above it are created)."""
    va: int
    level: int
    value: int


Entry = Union[Leaf, Pointer, Raw]


@dataclass(frozen=True)
class Probe:
    name: str
    va: int
    ok: str = ""                      # kinds the spec lets through, space-separated
    pa: Optional[int] = None          # where they land (offset included); None: nowhere
    faults: Dict[str, str] = field(default_factory=dict)   # kind -> outcome other than
                                                           # "page-fault" for the rest
    qemu: Dict[str, object] = field(default_factory=dict)  # QEMU 7.2 where it differs: kind ->
                                                           # outcome, and/or "pa"
    ad: Optional[str] = None          # A/D bits of the leaf after the probes: "", "A", "AD"
    exec: bool = True                 # run the fetch kinds (the VA must land on an ecall)
    note: str = ""

    def expected(self, kind: str) -> str:
        """The spec's answer for a kind: "ok", "page-fault" or what `faults` says."""
        assert kind in KINDS, kind
        if kind in self.ok.split():
            return "ok"
        return self.faults.get(kind, "page-fault")

    def qemu_expected(self, kind: str) -> str:
        """What QEMU 7.2 is expected to give: the spec's answer unless `qemu` says otherwise."""
        return self.qemu.get(kind, self.expected(kind))

    def qemu_pa(self) -> Optional[int]:
        return self.qemu.get("pa", self.pa)


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str                         # "sv39", "sv48", "sv57"
    entries: Tuple[Entry, ...]
    probes: Tuple[Probe, ...]
    kinds: Tuple[str, ...] = BASE_KINDS
    cpu: str = "rv64"                 # QEMU -cpu (extensions as properties)
    menvcfg: int = 0                  # must read back as written, or the guest stops (SKIP)
    asid: int = 0
    unprobed: Tuple[int, ...] = ()    # VAs mapped but never probed (gva2gpa side effects)
    description: str = ""

    @property
    def levels(self) -> int:
        return LEVELS[self.mode]

    @property
    def va_bits(self) -> int:
        return 12 + 9 * self.levels

    def satp(self, root: int) -> int:
        return SATP_MODE[self.mode] << 60 | self.asid << 44 | root >> 12

    def all_probes(self) -> Tuple[Probe, ...]:
        """The scenario's probes, then the identity-mapped `ecall` in the code page and a word
        of DATA (every scenario)."""
        return self.probes + (
            # FINDING: QEMU 7.2 files loads and stores under MPRV in M-mode's TLB (its MMU
            # index is the privilege, not the effective one), so the access hits the entry the
            # fetch of the very `ld`/`sd` made for this page (M-mode: VA = PA, RWX) and is never
            # translated. Only this probe's VA is a page M-mode runs from (image.py keeps the
            # probe loop in the first page).
            Probe("identity-code", ECALL_VA, ok=SUP["RX"], pa=ECALL_VA,
                  qemu={"W": "ok", "r": "ok", "w": "ok", "W+sum": "ok", "r+mxr": "ok"},
                  note="loads read `ecall; nop`; the S-mode park loop runs from this page"),
            Probe("identity-data", DATA + SCRATCH, ok=SUP["RW"], pa=DATA + SCRATCH),
        )


# ---------------------------------------------------------------------------------------------
# The builder


@dataclass
class Table:
    pa: int
    entries: Dict[int, int] = field(default_factory=dict)
    children: Dict[int, "Table"] = field(default_factory=dict)


@dataclass
class Built:
    """A scenario's tables: satp and the bytes of every table at its physical address."""
    scenario: Scenario
    root: Table
    satp: int
    tables: Dict[int, bytes]          # pa -> 4 KiB table
    tables_end: int

    def canonical(self, va: int) -> bool:
        top = va >> (self.scenario.va_bits - 1)
        return top in (0, (1 << (65 - self.scenario.va_bits)) - 1)

    def walk(self, va: int) -> List[Tuple[int, int, int]]:
        """(level, PTE address, PTE) of every PTE a walk of `va` reads, following pointers
        (V=1, R=W=X=0) into the builder's tables whatever else they hold; [] if `va` is not
        canonical."""
        if not self.canonical(va):
            return []
        out, t = [], self.root
        for level in range(self.scenario.levels - 1, -1, -1):
            i = _index(va, level)
            pte = t.entries.get(i, 0)
            out.append((level, t.pa + 8 * i, pte))
            if pte & (PTE_V | PTE_R | PTE_W | PTE_X) != PTE_V or i not in t.children:
                break
            t = t.children[i]
        return out

    def pte_address(self, va: int) -> int:
        """Where the walk of `va` ends (its leaf, or the PTE that stops it); 0 if none."""
        w = self.walk(va)
        return w[-1][1] if w else 0


def _index(va: int, level: int) -> int:
    return (va >> (12 + 9 * level)) & 0x1FF


def leaf_pte(e: Leaf) -> int:
    assert e.pa % 4096 == 0 and set(e.perms) <= set("RWX"), e
    pte = PTE_V | sum(PERM_BITS[p] for p in e.perms)
    pte |= (PTE_U if e.u else 0) | (PTE_G if e.g else 0) | (PTE_A if e.a else 0)
    pte |= (PTE_D if e.d else 0) | e.pbmt << PBMT_SHIFT | e.bits
    ppn = e.pa >> 12
    if e.napot:
        assert e.level == 0 and ppn & 0xF == 0, e
        ppn |= NAPOT_64K
        pte |= PTE_N
    assert ppn < 1 << PPN_BITS
    return pte | ppn << PTE_PPN_SHIFT


def build_tables(s: Scenario) -> Built:
    tables: List[Table] = []

    def alloc() -> Table:
        pa = TABLES + 4096 * len(tables)
        if pa + 4096 > TABLES + TABLES_SIZE:
            raise ValueError(f"{s.name}: more tables than fit in {TABLES_SIZE:#x} bytes")
        tables.append(Table(pa))
        return tables[-1]

    root = alloc()

    def walk_to(va: int, level: int) -> Table:
        """The table holding `va`'s PTE at `level`, creating pointers (V only) above it."""
        assert 0 <= level < s.levels, (s.name, level)
        t = root
        for lvl in range(s.levels - 1, level, -1):
            i = _index(va, lvl)
            if i not in t.entries:
                child = alloc()
                t.entries[i] = PTE_V | (child.pa >> 12) << PTE_PPN_SHIFT
                t.children[i] = child
            elif i not in t.children:
                raise ValueError(f"{s.name}: VA {va:#x} needs a table below level {lvl}, where "
                                 f"there is a leaf or raw PTE")
            t = t.children[i]
        return t

    def put(va: int, level: int, pte: int):
        t, i = walk_to(va, level), _index(va, level)
        assert i not in t.entries, f"{s.name}: VA {va:#x} level {level}: PTE written twice"
        t.entries[i] = pte

    for e in identity_entries() + list(s.entries):
        if isinstance(e, Leaf):
            pte = leaf_pte(e)
            if e.napot:
                for n in range(16):
                    put((e.va & ~0xFFFF) + n * 0x1000, 0, pte)
            else:
                put(e.va, e.level, pte)
        elif isinstance(e, Raw):
            put(e.va, e.level, e.value)
        elif isinstance(e, Pointer):
            walk_to(e.va, e.level - 1)            # makes the PTE at e.level a pointer
            t = walk_to(e.va, e.level)
            t.entries[_index(e.va, e.level)] |= e.bits
        else:
            raise TypeError(e)
    out = {}
    for t in tables:
        buf = bytearray(4096)
        for i, pte in t.entries.items():
            buf[8 * i:8 * i + 8] = pte.to_bytes(8, "little")
        out[t.pa] = bytes(buf)
    return Built(s, root, s.satp(root.pa), out, TABLES + 4096 * len(tables))


def identity_entries() -> List[Leaf]:
    """Code R X and DATA R W, identity-mapped with 4 KiB pages (every scenario)."""
    out = [Leaf(pa, 0, pa, perms="RX") for pa in range(BASE, BASE + CODE_SIZE, 4096)]
    return out + [Leaf(pa, 0, pa, perms="RW") for pa in range(DATA, DATA + DATA_SIZE, 4096)]
