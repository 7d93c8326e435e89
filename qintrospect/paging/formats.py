"""Entry formats: how a mode's entries say present / leaf / reserved / frame address / flags.

A format is built once per walk from the mode and the state that changes the layout (MAXPHYADDR,
EFER.NXE, CR4.PKE/PKS, whether the CPU has 1 GiB pages, EPT mode-based execute control). It
precomputes, per level, the page size a leaf may have and the reserved-bit rules for a table
entry and for a leaf entry, each rule being (mask, why) so that a fault can say which bits and
why; the walkers (scalar and numpy) and the whole-space iterators only ask it questions.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from .model import EPT_MISCONFIGURATION, EPT_VIOLATION, NOT_PRESENT, RESERVED_BIT, PagingMode
from .modes import GIB1

Rule = Tuple[int, str]  # (mask of bits that must be 0, why they must be)

# x86 entry bits (SDM Vol 3, tables 4-4 .. 4-20).
P, RW, US, PWT, PCD, A, D, PS, G = (1 << n for n in range(9))
PAT_LARGE = 1 << 12
XD = 1 << 63
# EPT entry bits (SDM Vol 3, tables 29-1 .. 29-7).
EPT_R, EPT_W, EPT_X = 1, 2, 4
EPT_IPAT, EPT_PS, EPT_A, EPT_D, EPT_XU = 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10
EPT_SVE = 1 << 63
EPT_BAD_MEMORY_TYPES = (2, 3, 7)
MEMORY_TYPES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}

ADDR_51_12 = ((1 << 52) - 1) & ~0xFFF

# Why PS is a reserved bit in a PDPTE when the CPU lacks 1 GiB pages (SDM Vol 3, 4.5, table 4-16;
# for EPT, 29.3.3.1: an EPT misconfiguration).
NO_1G_PAGES = "PS in a PDPTE: this CPU has no 1-GByte pages (CPUID.80000001H:EDX.Page1GB=0)"
NO_1G_EPT_PAGES = ("bit 7 (PS) in an EPT PDPTE: this CPU has no 1-GByte EPT pages "
                   "(IA32_VMX_EPT_VPID_CAP bit 17 = 0)")


def bits(hi: int, lo: int) -> int:
    """Mask of bits hi..lo inclusive (0 when hi < lo)."""
    if hi < lo:
        return 0
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def bit_list(mask: int) -> str:
    """'51', '51:48', '63, 20:13' -- set bits, highest first, runs written hi:lo."""
    runs = []
    n = mask.bit_length() - 1
    while n >= 0:
        if mask >> n & 1:
            hi = n
            while n - 1 >= 0 and mask >> (n - 1) & 1:
                n -= 1
            runs.append(str(hi) if hi == n else f"{hi}:{n}")
        n -= 1
    return ", ".join(runs)


def size_name(size: Optional[int]) -> str:
    """'4 KiB', '2 MiB', '1536 KiB', '1 GiB': the one way sizes are written ('?' for None)."""
    if size is None:
        return "?"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


class EntryFormat:
    """Common shape; subclasses fill the per-level tables in __init__."""

    not_present_reason = NOT_PRESENT
    invalid_reason = RESERVED_BIT

    def __init__(self, mode: PagingMode, maxphyaddr: int, page1gb: Optional[bool] = None):
        self.mode = mode
        self.m = maxphyaddr
        self.page1gb = page1gb
        self.last = len(mode.levels) - 1
        n = len(mode.levels)
        # The page size each level may map, as this CPU allows: the mode's, less 1 GiB pages
        # when the CPU says it has none (None = unknown: allowed, the walkers say so).
        self.large: List[Optional[int]] = [
            None if spec.large_page == GIB1 and page1gb is False else spec.large_page
            for spec in mode.levels]
        self.table_rules: List[List[Rule]] = [[] for _ in range(n)]
        self.leaf_rules: List[List[Rule]] = [[] for _ in range(n)]
        self.table_addr = [ADDR_51_12] * n
        self.leaf_addr = [0] * n
        self._masks = None
        for i, spec in enumerate(mode.levels):
            size = self.page_size(i, True)
            if size:
                self.leaf_addr[i] = ADDR_51_12 & ~(size - 1)

    # -- questions the walkers ask -------------------------------------------------------
    def page_size(self, i: int, leaf: bool) -> Optional[int]:
        if not leaf:
            return None
        return 1 << self.mode.levels[i].shift if i == self.last else self.large[i]

    def present(self, e: int) -> bool:
        return bool(e & P)

    def is_leaf(self, i: int, e: int) -> bool:
        return i == self.last or bool(self.large[i] and e & PS)

    def problems(self, i: int, e: int, leaf: bool) -> List[Rule]:
        """The rules this present entry breaks, each with the offending bits only."""
        rules = self.leaf_rules[i] if leaf else self.table_rules[i]
        return [(e & mask, why) for mask, why in rules if e & mask]

    def reserved_mask(self, i: int, leaf: bool) -> int:
        """All must-be-zero bits of an entry at level i."""
        m = 0
        for mask, _ in (self.leaf_rules[i] if leaf else self.table_rules[i]):
            m |= mask
        return m

    def valid(self, i: int, e: int, leaf: bool) -> bool:
        """No rule broken (the fast question of the whole-space scan)."""
        masks = self._masks
        if masks is None:
            masks = self._masks = ([self.reserved_mask(k, False) for k in range(self.last + 1)],
                                   [self.reserved_mask(k, True) for k in range(self.last + 1)])
        return not e & masks[leaf][i]

    def frame(self, i: int, e: int, leaf: bool) -> int:
        """Next table's base, or the page frame's base at a leaf."""
        return e & (self.leaf_addr[i] if leaf else self.table_addr[i])

    def flags(self, i: int, e: int, leaf: bool) -> Tuple[str, ...]:
        raise NotImplementedError


class X86Format(EntryFormat):
    """32-bit, PAE, 4-level and 5-level entries (also NPT, which uses the 4/5-level format)."""

    def __init__(self, mode: PagingMode, maxphyaddr: int, nxe: bool, pke: bool = False, *,
                 pks: bool = False, page1gb: Optional[bool] = None):
        self.kind = {"32-bit": "32-bit", "pae": "pae"}.get(mode.name, "long")
        self.nxe = nxe and self.kind != "32-bit"   # 4-byte entries have no XD bit
        self.pke = pke and self.kind == "long"     # protection keys exist only in IA-32e mode:
        self.pks = pks and self.kind == "long"     # PKE for user pages, PKS for supervisor ones
        super().__init__(mode, maxphyaddr, page1gb)
        if self.kind == "32-bit":
            self._rules_32bit()
        else:
            self._rules_64bit()

    def _rules_32bit(self) -> None:
        # PSE-36: a 4 MiB PDE holds physical bits (M'-1):32 in bits (M'-20):13, M' = min(M, 40);
        # bits 21:(M'-19) must be 0 (SDM table 4-4). 4 KiB entries have no reserved bits.
        m = max(32, min(self.m, 40))
        self.table_addr = [0xFFFFF000] * 2
        self.leaf_addr = [0xFFC00000, 0xFFFFF000]
        self.leaf_rules[0] = [(bits(21, m - 19),
                               f"reserved in a 4 MiB PDE: PSE-36 with MAXPHYADDR {m}")]

    def _rules_64bit(self) -> None:
        m = self.m
        long = self.kind == "long"
        # Above MAXPHYADDR: 4/5-level entries ignore bits 62:52; PAE reserves them too.
        above = (bits(51, m) if long else bits(62, m), f"above MAXPHYADDR {m}")
        nx = (0 if self.nxe else XD, "XD (NX) with EFER.NXE=0")
        for i, spec in enumerate(self.mode.levels):
            if self.kind == "pae" and i == 0:
                # PDPTEs are loaded at MOV CR3; any of these set there is a #GP (SDM table 4-8).
                # Bit 5 (A) is reserved too, but QEMU's TCG sets it in memory whenever it walks
                # (it keeps no PDPTE registers), so every PDPTE a TCG guest used has it: the
                # walk goes on, and walk() says so in a note (PDPTE_ACCESSED_NOTE).
                self.table_rules[0] = [(bits(63, m), f"above MAXPHYADDR {m}"),
                                       (bits(2, 1) | bits(8, 6),
                                        "reserved in a PAE PDPTE (bits 2:1, 8:5)")]
                continue
            common = [r for r in (above, nx) if r[0]]
            large = self.large[i]
            if i != self.last:
                extra = [] if large else [(PS, NO_1G_PAGES if spec.large_page
                                           else f"PS is reserved in a {spec.name} entry")]
                self.table_rules[i] = common + extra
            if large:
                low = bits(large.bit_length() - 2, 13)  # between PAT (12) and the frame
                self.leaf_rules[i] = common + [
                    (low, f"must be 0 in a {size_name(large)} page entry")]
            elif i == self.last:
                self.leaf_rules[i] = common

    def frame(self, i: int, e: int, leaf: bool) -> int:
        if self.kind == "32-bit" and leaf and i == 0:
            return (e & 0xFFC00000) | ((e >> 13) & 0xFF) << 32   # PSE-36 high bits
        return super().frame(i, e, leaf)

    def rights(self, i: int, e: int) -> Tuple[bool, bool, bool]:
        """(R/W, U/S, XD) this entry contributes. PAE PDPTEs have neither R/W nor U/S."""
        if self.kind == "pae" and i == 0:
            return True, True, False
        return bool(e & RW), bool(e & US), bool(self.nxe and e & XD)

    def protection_key(self, e: int) -> Optional[int]:
        """Bits 62:59 of a leaf, when CR4.PKE or CR4.PKS gives them a meaning (user pages with
        PKE, supervisor pages with PKS: the caller knows which applies to its page)."""
        return (e >> 59) & 0xF if self.pke or self.pks else None

    def flags(self, i: int, e: int, leaf: bool) -> Tuple[str, ...]:
        names = [n for n, b in (("P", P), ("RW", RW), ("US", US), ("PWT", PWT), ("PCD", PCD),
                                ("A", A)) if e & b]
        large = leaf and i != self.last
        if leaf and e & D:
            names.append("D")
        if e & PS and i != self.last:
            names.append("PS")
        if leaf and i == self.last and e & PS:
            names.append("PAT")           # bit 7 of a 4 KiB PTE is PAT
        if leaf and e & G:
            names.append("G")
        if large and e & PAT_LARGE:
            names.append("PAT")           # bit 12 of a large-page entry is PAT
        if leaf and (self.pke or self.pks):
            names.append(f"PK={self.protection_key(e)}")
        if self.mode.entry_size == 8 and e & XD:
            names.append("NX")
        return tuple(names)


class EptFormat(EntryFormat):
    """Intel EPT entries: R/W/X permissions, memory type at leaves, misconfigurations."""

    not_present_reason = EPT_VIOLATION
    invalid_reason = EPT_MISCONFIGURATION

    def __init__(self, mode: PagingMode, maxphyaddr: int, mbec: bool = False,
                 page1gb: Optional[bool] = None):
        self.mbec = mbec
        super().__init__(mode, maxphyaddr, page1gb)
        above = (bits(51, maxphyaddr), f"above MAXPHYADDR {maxphyaddr}")
        common = [above] if above[0] else []
        for i, spec in enumerate(mode.levels):
            large = self.large[i]
            if i != self.last:
                if spec.large_page:
                    extra = [(bits(6, 3), "reserved in a non-leaf EPT entry (bits 6:3)")]
                    if not large:
                        extra.append((EPT_PS, NO_1G_EPT_PAGES))
                else:
                    extra = [(bits(7, 3), f"reserved in an EPT {spec.name} entry (bits 7:3)")]
                self.table_rules[i] = common + extra
            if large:
                low = bits(large.bit_length() - 2, 12)
                self.leaf_rules[i] = common + [
                    (low, f"must be 0 in a {size_name(large)} EPT page entry")]
            elif i == self.last:
                self.leaf_rules[i] = common

    def present(self, e: int) -> bool:
        # Not present = no access right at all (bit 10 counts with mode-based execute control).
        return bool(e & 7 or (self.mbec and e & EPT_XU))

    def is_leaf(self, i: int, e: int) -> bool:
        return i == self.last or bool(self.large[i] and e & EPT_PS)

    def problems(self, i: int, e: int, leaf: bool) -> List[Rule]:
        found = super().problems(i, e, leaf)
        if (e & (EPT_R | EPT_W)) == EPT_W:
            found.append((EPT_W, "write permission without read (W=1, R=0)"))
        if leaf and self.memory_type(e) in EPT_BAD_MEMORY_TYPES:
            found.append((bits(5, 3), f"memory type {self.memory_type(e)} is reserved"))
        return found

    def valid(self, i: int, e: int, leaf: bool) -> bool:
        return not self.problems(i, e, leaf)

    @staticmethod
    def memory_type(e: int) -> int:
        return (e >> 3) & 7

    def rights(self, e: int) -> Tuple[bool, bool, bool, bool]:
        """(read, write, execute, user-execute); user-execute is X itself without MBEC."""
        x = bool(e & EPT_X)
        return bool(e & EPT_R), bool(e & EPT_W), x, bool(e & EPT_XU) if self.mbec else x

    def flags(self, i: int, e: int, leaf: bool) -> Tuple[str, ...]:
        names = [n for n, b in (("R", EPT_R), ("W", EPT_W), ("X", EPT_X)) if e & b]
        if leaf:
            names.append(f"MT={self.memory_type(e)}")
            if e & EPT_IPAT:
                names.append("IPAT")
        if e & EPT_PS and i != self.last:
            names.append("PS")
        if e & EPT_A:
            names.append("A")
        if leaf and e & EPT_D:
            names.append("D")
        if self.mbec and e & EPT_XU:
            names.append("XU")
        if leaf and e & EPT_SVE:
            names.append("SVE")
        return tuple(names)
