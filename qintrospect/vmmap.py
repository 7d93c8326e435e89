"""Whole address spaces: leaves from the walker, merged into ranges, with optional GPA/HPA.

Leaves come from paging.iter_mappings (each table page read once). Merging joins leaves that
are virtually contiguous with equal page size and effective permissions, and, when physical
columns are asked for, physically contiguous too: a range always means one linear piece.
"""

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

from .host import PAGE

MASK64 = (1 << 64) - 1


@dataclass
class MapRow:
    start: int
    end: int                    # exclusive
    page_size: int
    writable: bool
    user: bool
    executable: bool
    gpa: Optional[int] = None   # of `start`
    hpa: Optional[int] = None   # of `start`, when the host page is present
    host_status: Optional[str] = None
    leaves: int = 1
    flags: Tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def perms(self) -> str:
        return "r" + ("w" if self.writable else "-") + ("x" if self.executable else "-")

    def to_dict(self, leaf: bool = False) -> dict:
        h = lambda v: None if v is None else f"{v:#x}"  # noqa: E731
        out = {"start": h(self.start), "end": h(self.end), "size": self.size,
               "page_size": self.page_size, "writable": self.writable, "user": self.user,
               "executable": self.executable, "gpa": h(self.gpa)}
        if self.hpa is not None or self.host_status is not None:
            out["hpa"] = h(self.hpa)
            out["host_status"] = self.host_status
        if leaf:
            out["flags"] = list(self.flags)
        else:
            out["leaves"] = self.leaves
        return out


def rows_from_mappings(mappings: Iterable) -> Iterator[MapRow]:
    for m in mappings:
        yield MapRow(m.va, (m.va + m.size) & MASK64 or (1 << 64), m.size, m.writable, m.user,
                     m.executable, gpa=m.pa, flags=tuple(m.flags))


def keep(row: MapRow, user: bool = False, kernel: bool = False, writable: bool = False,
         executable: bool = False) -> bool:
    if user and not row.user:
        return False
    if kernel and row.user:
        return False
    if writable and not row.writable:
        return False
    if executable and not row.executable:
        return False
    return True


def split_by_host(rows: Iterable[MapRow], ram_map, process) -> Iterator[MapRow]:
    """Cut each row where its host pages stop being contiguous (or present), with the HPA of
    each piece; one pagemap read per row."""
    for row in rows:
        region = ram_map.ram_at(row.gpa) if row.gpa is not None else None
        if region is None or region.hva is None or process is None \
                or row.gpa + row.size - 1 > region.end:
            row.host_status = "no-ram" if region is None else "unknown"
            yield row
            continue
        hva = region.hva_of(row.gpa)
        try:
            entries = process.pagemap_entries(hva, row.size // PAGE)
        except OSError:
            row.host_status = "unreadable"
            yield row
            continue
        piece = None
        for i, e in enumerate(entries):
            status, hpa = _host(e, hva + i * PAGE)
            va = row.start + i * PAGE
            if piece is not None and piece.host_status == status and (
                    hpa is None or piece.hpa + (va - piece.start) == hpa):
                piece.end = va + PAGE
                continue
            if piece is not None:
                yield piece
            piece = MapRow(va, va + PAGE, row.page_size, row.writable, row.user, row.executable,
                           gpa=row.gpa + i * PAGE, hpa=hpa, host_status=status,
                           flags=row.flags)
        if piece is not None:
            yield piece


def _host(entry: int, hva: int):
    if entry >> 62 & 1:
        return "swapped", None
    if not entry >> 63 & 1:
        return "not-present", None
    pfn = entry & ((1 << 55) - 1)
    if pfn == 0:
        return "pfn-hidden", None
    return "present", pfn * PAGE + hva % PAGE


def merge(rows: Iterable[MapRow], physical: bool = False) -> Iterator[MapRow]:
    """Join neighbours with equal page size and permissions (and linear GPA/HPA if physical)."""
    cur: Optional[MapRow] = None
    for row in rows:
        if cur is not None and row.start == cur.end and row.page_size == cur.page_size \
                and (row.writable, row.user, row.executable) == \
                (cur.writable, cur.user, cur.executable) and (
                not physical or (
                    row.gpa == cur.gpa + cur.size and row.host_status == cur.host_status and
                    (row.hpa is None) == (cur.hpa is None) and
                    (row.hpa is None or row.hpa == cur.hpa + cur.size))):
            cur.end = row.end
            cur.leaves += row.leaves
            continue
        if cur is not None:
            yield cur
        cur = MapRow(row.start, row.end, row.page_size, row.writable, row.user, row.executable,
                     row.gpa, row.hpa, row.host_status, row.leaves, row.flags)
    if cur is not None:
        yield cur


def row_text(row: MapRow, show_gpa: bool, show_hpa: bool, leaf: bool) -> str:
    from .render import size_name
    who = "user" if row.user else "kernel"
    line = (f"{row.start:#018x} {row.end & MASK64 if row.end < (1 << 64) else MASK64 + 1:#018x} "
            f"{_human(row.size):>10} "
            f"{size_name(row.page_size):>6}  {row.perms}  {who:<6}")
    if show_gpa:
        line += f" {row.gpa:#014x}" if row.gpa is not None else f" {'-':>14}"
    if show_hpa:
        line += f" {row.hpa:#014x}" if row.hpa is not None else f" {row.host_status or '-':>14}"
    if leaf:
        line += "  " + " ".join(row.flags)
    return line


def header(show_gpa: bool, show_hpa: bool, leaf: bool) -> str:
    line = f"{'start':<18} {'end':<18} {'size':>10} {'page':>6}  prm  {'who':<6}"
    if show_gpa:
        line += f" {'gpa':>14}"
    if show_hpa:
        line += f" {'hpa':>14}"
    if leaf:
        line += "  flags"
    return line


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n / (1 << 20):.1f} MiB"
