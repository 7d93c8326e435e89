"""What QEMU's monitor prints, read: `info mtree -f` (the RAM map), `gpa2hva`, `info registers`,
`info tlb`, `gva2gpa`. Each parser takes text and refuses what is not in QEMU's form (ParseError)."""

import re
from typing import Dict, List, Optional, Tuple

from ..errors import ParseError
from ..record import record



@record(frozen=True)
class Region:
    """One line of `info mtree -f` for the system address space."""
    start: int
    end: int            # inclusive, as QEMU prints it
    kind: str           # "ram", "rom", "romd", "ramd", "i/o", "container", ...
    name: str
    offset: int         # offset inside the RAM block (the "@..." part), 0 when absent
    priority: int

    @property
    def is_ram(self) -> bool:
        """Plain RAM (or a read-only view of it): safe to read, and has a host address. Not
        "ramd" (RAM devices: VFIO BARs mapped into QEMU, reading them is a device access),
        not "romd" (ROM devices such as flash, whose reads go to the device outside ROMD
        mode), not "i/o" or "container". "nv-" marks non-volatile RAM (NVDIMM)."""
        kind = self.kind[3:] if self.kind.startswith("nv-") else self.kind
        return kind in ("ram", "rom")

    @property
    def size(self) -> int:
        return self.end - self.start + 1


_MTREE_LINE = re.compile(
    r"^\s+([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio (-?\d+), ([^)]+)\): (.*?)(?: @([0-9a-fA-F]+))?"
    r"(?: KVM)?\s*$")


def parse_mtree_flat(text: str) -> List[Region]:
    """The regions of the FlatView that serves the "memory" address space in `info mtree -f`."""
    if not isinstance(text, str):
        raise ParseError("info mtree -f: expected text")
    views = re.split(r"^FlatView #\d+\s*$", text, flags=re.M)
    for view in views[1:]:
        if not re.search(r'^\s*AS "memory"', view, flags=re.M):
            continue
        regions = []
        for line in view.splitlines():
            m = _MTREE_LINE.match(line)
            if not m:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if end < start:
                raise ParseError(f"info mtree -f: region end before start in {line.strip()!r}")
            regions.append(Region(start, end, m.group(4).strip(), m.group(5).strip(),
                                  int(m.group(6), 16) if m.group(6) else 0, int(m.group(3))))
        if not regions:
            raise ParseError('info mtree -f: the "memory" address space has no regions')
        return regions
    raise ParseError('info mtree -f: no FlatView for the "memory" address space found; '
                     "is this QEMU's `info mtree -f` output?")


# gva2gpa prints with C's "%#" format, which prints a zero as plain "0" (no 0x); gpa2hva
# prints "0x0". Both spellings are taken everywhere.
_HEX = r"(0x[0-9a-fA-F]+|0)"


_GPA2HVA = re.compile(rf"Host virtual address for {_HEX} \((.*)\) is {_HEX}")


def parse_gpa2hva(text: str) -> Tuple[int, str, int]:
    """`gpa2hva ADDR` output -> (gpa, region name, hva). ParseError for "not RAM" and the like."""
    m = _GPA2HVA.search(text or "")
    if not m:
        raise ParseError(f"gpa2hva: unexpected answer {(text or '').strip()[:120]!r}")
    return int(m.group(1), 16), m.group(2), int(m.group(3), 16)


_REG = re.compile(r"\b([A-Z][A-Z0-9]*)=([0-9a-fA-F]+)\b")


def parse_registers(text: str) -> Dict[str, int]:
    """`info registers` -> {"CR0": ..., "CR3": ..., "EFER": ..., "RIP"/"EIP": ..., "CPL": ...}.

    Only NAME=HEX pairs are taken (segment lines and vector registers are skipped). CPL is
    printed in decimal but is a single digit, so hex reads it the same.
    """
    regs: Dict[str, int] = {}
    width: Dict[str, int] = {}
    for line in (text or "").splitlines():
        if line.startswith(("ES =", "CS =", "SS =", "DS =", "FS =", "GS =", "LDT=", "TR ",
                            "GDT=", "IDT=", "FPR", "XMM", "YMM", "ZMM", "Opmask")):
            continue
        for name, value in _REG.findall(line):
            if name not in regs:
                regs[name], width[name] = int(value, 16), len(value)
    for needed in ("CR0", "CR3", "CR4", "EFER"):
        if needed not in regs:
            raise ParseError(f"info registers: no {needed}= in the output")
        # QEMU prints these with all their digits (%08x, %016x): fewer means a cut line
        digits = width[needed]
        if digits not in (8, 16):
            raise ParseError(f"info registers: {needed}= has {digits} hex digits, not 8 or 16 "
                             "as QEMU prints it: the output is cut or not QEMU's")
    return regs


_TLB_LINE = re.compile(r"^([0-9a-fA-F]+): ([0-9a-fA-F]+) ([-XGPDACTUW]{9})\s*$")


@record(frozen=True)
class TlbLine:
    va: int
    pa: int
    flags: str   # QEMU's 9 letters: X G P D A C T U W (X means NX set)


def parse_info_tlb(text: str) -> List[TlbLine]:
    """`info tlb` -> one TlbLine per leaf (QEMU prints large pages once, at their base)."""
    out = []
    for line in (text or "").splitlines():
        m = _TLB_LINE.match(line.strip())
        if m:
            out.append(TlbLine(int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


_GVA2GPA = re.compile(rf"^gpa: {_HEX}\s*$", re.M)


def parse_gva2gpa(text: str) -> Optional[int]:
    """`gva2gpa ADDR` -> the GPA, or None when QEMU says "Unmapped"."""
    m = _GVA2GPA.search(text or "")
    if m:
        return int(m.group(1), 16)
    if "Unmapped" in (text or ""):
        return None
    raise ParseError(f"gva2gpa: unexpected answer {(text or '').strip()[:120]!r}")
