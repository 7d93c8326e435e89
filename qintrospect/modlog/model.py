"""The values a module log holds, and the vocabulary of entry bits every part of modlog shares.

A number printed in binary may have lost digits (a line cut at the console width), so every value
comes with the mask of the bits that were printed (``*_known_mask``).
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..paging.formats import ADDR_51_12

from ..record import record

U64 = (1 << 64) - 1
ADDR_BITS = ADDR_51_12   # bits 51..12: the address in an entry or NEXT_LVL value
PAGE_SIZES = {"PTE": 1 << 12, "PMD": 1 << 21, "PUD": 1 << 30}
LEVELS_4 = ("PGD", "PUD", "PMD", "PTE")
LEVELS_5 = ("PGD", "P4D", "PUD", "PMD", "PTE")
KINDS = ("gpt_dump", "ept_dump")

# Where a second-level log says the walk stopped (LogLevel.fault), and the paging walker's
# fault reasons (paging.model) that mean the same thing.
SAME_STOP = {"not-present": ("not-present", "ept-violation"), "reserved-bit": ("reserved-bit",),
             "ept-misconfiguration": ("ept-misconfiguration",)}

# The walked address and the final address are called differently in the two logs.
ADDR_NAME = {"gpt_dump": "GVA", "ept_dump": "GPA"}
FINAL_NAME = {"gpt_dump": "GPA", "ept_dump": "HPA"}

# Names of entry bits, for saying which field of an entry differs (SDM Vol 3, 4.5 and 29.3.2).
_X86_BITS = {0: "P", 1: "RW", 2: "US", 3: "PWT", 4: "PCD", 5: "A", 6: "D", 7: "PS/PAT", 8: "G",
             9: "AVL", 10: "AVL", 11: "AVL", 63: "XD"}
_EPT_BITS = {0: "R", 1: "W", 2: "X", 3: "MT", 4: "MT", 5: "MT", 6: "IPAT", 7: "PS", 8: "A",
             9: "D", 10: "XU", 11: "IGN", 63: "SVE"}


def bit_name(bit: int, kind: str = "gpt_dump") -> str:
    """The field an entry bit belongs to: P, RW, US, A, D, PS, PFN, PK, XD (EPT: R, W, X, MT...).

    kind is a log kind ("gpt_dump": x86 names, "ept_dump": EPT names) or a table format ("ept",
    "npt": an NPT entry is a long-mode entry, x86 names); ModLog.bits_kind gives the right one."""
    ept = kind in ("ept_dump", "ept")
    kind = "ept_dump" if ept else "gpt_dump"
    names = _EPT_BITS if ept else _X86_BITS
    if bit in names:
        return names[bit]
    if 12 <= bit <= 51:
        return "PFN"
    if kind != "ept_dump" and 59 <= bit <= 62:
        return "PK"
    return "AVL" if kind != "ept_dump" else "IGN"


def bit_ranges(mask: int) -> str:
    """'63..52, 7' for a mask: the set bits as ranges, highest first ('none' for 0)."""
    parts = []
    bit = 63
    while bit >= 0:
        if mask >> bit & 1:
            top = bit
            while bit >= 0 and mask >> bit & 1:
                bit -= 1
            low = bit + 1
            parts.append(str(top) if top == low else f"{top}..{low}")
        else:
            bit -= 1
    return ", ".join(parts) if parts else "none"


def hex_or_none(value: Optional[int]) -> Optional[str]:
    return None if value is None else hex(value)


_h = hex_or_none


def merge(val: int, mask: int, more_val: int, more_mask: int) -> Tuple[int, int]:
    """Add the bits another printing knows to the ones known already (first one wins)."""
    new = more_mask & ~mask
    return val | (more_val & new), mask | new


# ----------------------------------------------------------------------------------- the values

@record(frozen=True)
class LogLevel:
    """One level of the walk as the log printed it.

    ``index`` is as printed (None if no line gives it); ``entry``/``next_addr``/``table_addr``
    come with the mask of the bits printed. ``table_addr`` is the table this level's entry is
    read from: the previous level's NEXT_LVL value (or the root). ``page_size`` is set at a leaf.
    """

    name: str
    index: Optional[int]
    entry: Optional[int]
    entry_known_mask: int
    next_addr: Optional[int]
    next_known_mask: int
    table_addr: Optional[int]
    table_known_mask: int
    page_size: Optional[int]
    present: Optional[bool] = None  # False when the log says the entry is not present
    # Where the log says the walk stopped at this entry: "not-present", "reserved-bit" (NPT,
    # #NPF with RSVD) or "ept-misconfiguration"; None when it went on (or reached a leaf).
    fault: Optional[str] = None

    @property
    def linux_name(self) -> str:
        return self.name.lower()

    def to_dict(self) -> dict:
        return {
            "name": self.name, "index": self.index,
            "entry": _h(self.entry), "entry_known_mask": hex(self.entry_known_mask),
            "next_addr": _h(self.next_addr), "next_known_mask": hex(self.next_known_mask),
            "table_addr": _h(self.table_addr), "table_known_mask": hex(self.table_known_mask),
            "page_size": self.page_size, "present": self.present, "fault": self.fault,
        }


@record
class Line:
    """One message line of a log, as the reader sees it."""
    no: int          # 1-based line number of its first physical line
    text: str        # the message, stripped of timestamp, module prefix and outer blanks
    cut: bool        # the physical line reached the console width: its end may be lost
    module: str      # "gpt_dump" / "ept_dump" / "" from a "xxx_dump: " prefix


@record(frozen=True)
class Printed:
    """One number as one line printed it: what it is, for which level, which bits were shown."""

    what: str             # address index root entry next final value mask1 hfn mask2 offset
    level: Optional[str]  # PGD..PTE where it belongs to a level
    value: int
    mask: int
    line: int             # 1-based line number in the text given to parse_log
    source: str           # which kind of line: "index line", "binary line", "hex line", ...


@record(frozen=True)
class ModLog:
    """One run of gpt_dump or ept_dump, as far as the text shows it.

    For a gpt_dump the address bits above the printed ones are filled in by sign extension
    (a GVA walked by the CPU is canonical); ``address_bits_known`` still says what was printed.
    """

    kind: str
    address: Optional[int]
    address_bits_known: int
    root: Optional[int]
    root_known_mask: int
    levels: Tuple[LogLevel, ...]
    final_address: Optional[int]
    final_known_mask: int
    value: Optional[int]
    warnings: Tuple[str, ...]
    printed: Tuple[Printed, ...] = ()
    pid: Optional[int] = None
    paging_levels: int = 4    # 4 or 5 (a P4D level)
    page_offset_base: Optional[int] = None   # the guest's direct-map base, when printed
    # ept_dump logs: the second-level table's format, "ept" (Intel; the seed's) or "npt" (AMD:
    # long-mode entries); None for a gpt_dump log
    format: Optional[str] = None
    maxphyaddr: Optional[int] = None         # the host's, when the module prints it
    module: Optional[str] = None             # "slat_dump" etc. when a "name: " prefix says so
    stopped: Optional[str] = None            # the module's sentence when it did not walk at all

    @property
    def address_name(self) -> str:
        return ADDR_NAME[self.kind]

    @property
    def bits_kind(self) -> str:
        """How to name entry bits (bit_name): "ept_dump" for EPT entries, "gpt_dump" for x86
        long-mode ones (a guest's page tables, and AMD's NPT)."""
        return "ept_dump" if self.kind == "ept_dump" and self.format != "npt" else "gpt_dump"

    @property
    def root_name(self) -> str:
        """What the root is called: CR3, EPTP or nCR3."""
        if self.kind == "gpt_dump":
            return "CR3"
        return "nCR3" if self.format == "npt" else "EPTP"

    @property
    def stop(self) -> Optional[LogLevel]:
        """The level whose entry the log says ended the walk (not present, reserved bit,
        misconfigured), or None."""
        return next((lvl for lvl in self.levels if lvl.present is False or lvl.fault), None)

    @property
    def final_name(self) -> str:
        return FINAL_NAME[self.kind]

    def level(self, name: str) -> Optional[LogLevel]:
        for lvl in self.levels:
            if lvl.name == name.upper():
                return lvl
        return None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "address": _h(self.address), "address_bits_known": hex(self.address_bits_known),
            "root": _h(self.root), "root_known_mask": hex(self.root_known_mask),
            "levels": [lvl.to_dict() for lvl in self.levels],
            "final_address": _h(self.final_address),
            "final_known_mask": hex(self.final_known_mask),
            "value": _h(self.value),
            "value_decimal": None if self.value is None else str(self.value),
            "pid": self.pid,
            "paging_levels": self.paging_levels,
            "page_offset_base": _h(self.page_offset_base),
            "format": self.format, "maxphyaddr": self.maxphyaddr, "module": self.module,
            "stopped": self.stopped,
            "warnings": list(self.warnings),
        }
