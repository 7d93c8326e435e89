"""Whole address spaces: leaves from the vectorized walker, merged into ranges, with optional
GPA/HPA columns.

Everything is done on columns (numpy arrays, one element per row): filters are masks, merging
finds the break points between neighbours and keeps the first row of each run. Merging joins
leaves that are virtually contiguous with equal page size and effective permissions and, when
physical columns are shown, physically contiguous too: a range always means one linear piece.
"""

from typing import Iterator, Optional

import numpy as np

from ..memory.host import HOST_NO_RAM, HOST_PRESENT, HOST_STATUS, HOST_UNKNOWN, PAGE, pagemap_arrays
from ..paging.formats import size_name
from ..paging.x86 import FLAG_BITS
from ..record import field_names, record

U64 = np.uint64


@record
class Rows:
    """Columns of a map; element i is row i."""
    start: np.ndarray        # uint64
    size: np.ndarray         # uint64 (bytes covered by the row)
    page_size: np.ndarray    # uint64
    writable: np.ndarray     # bool
    user: np.ndarray         # bool
    executable: np.ndarray   # bool
    gpa: np.ndarray          # uint64, of `start`
    hpa: np.ndarray          # uint64, of `start` (valid where host == present)
    host: np.ndarray         # uint8 index into HOST_STATUS (0: not looked up)
    leaves: np.ndarray       # int64: leaves that begin in this row
    level: np.ndarray        # int8: the leaf's level (for flags)
    entry: np.ndarray        # uint64: the leaf entry (for flags)
    readable: np.ndarray     # bool: a kernel load works (riscv: R=1; execute-only pages exist)

    def __len__(self) -> int:
        return len(self.start)

    def take(self, index) -> "Rows":
        return Rows(*(getattr(self, name)[index] for name in field_names(self)))


def from_leaves(la) -> Rows:
    n = len(la)
    readable = getattr(la, "readable", None)
    return Rows(la.va, la.size, la.size, la.writable, la.user, la.executable, la.pa,
                np.zeros(n, U64), np.zeros(n, np.uint8), np.ones(n, np.int64), la.level,
                la.entry, np.ones(n, bool) if readable is None else readable)


def keep(rows: Rows, user=False, kernel=False, writable=False, executable=False) -> Rows:
    mask = np.ones(len(rows), bool)
    if user:
        mask &= rows.user
    if kernel:
        mask &= ~rows.user
    if writable:
        mask &= rows.writable
    if executable:
        mask &= rows.executable
    return rows.take(mask)


SPLIT_BUDGET = 1 << 18   # 4 KiB pieces held at once when cutting rows for the HPA column


def host_columns(rows: Rows, ram_map, process) -> Rows:
    """Fill hpa/host of each row (at its start) from the QEMU process's pagemap."""
    rows.host = np.full(len(rows), HOST_NO_RAM, np.uint8)
    for region in ram_map.ram:
        sel = (rows.gpa >= U64(region.start)) & (rows.gpa <= U64(region.end))
        if not sel.any():
            continue
        rows.host[sel] = HOST_UNKNOWN
        if region.hva is None or process is None:
            continue
        try:
            rows.host[sel], rows.hpa[sel] = pagemap_arrays(
                process, U64(region.hva) + (rows.gpa[sel] - U64(region.start)))
        except OSError:
            pass
    return rows


def _pieces(rows: Rows, cum: np.ndarray, a: int, b: int) -> Rows:
    """Global 4 KiB pieces [a, b) of rows (cum: running total of each row's pieces) as rows
    of their own."""
    g = np.arange(a, b, dtype=np.int64)
    r = np.searchsorted(cum, g, side="right")
    first = cum[r] - (rows.size[r] // U64(PAGE)).astype(np.int64)
    offset = (g - first).astype(U64) * U64(PAGE)
    out = rows.take(r)
    out.start = out.start + offset
    out.gpa = out.gpa + offset
    out.size = np.full(len(out), PAGE, U64)
    out.leaves = np.where(offset == 0, out.leaves, 0)
    return out


def with_host(rows: Rows, ram_map, process, leaf: bool, budget: int = SPLIT_BUDGET):
    """Rows with the HPA column, in chunks (an iterator of Rows), in bounded memory. --leaf
    rows get it at their start. Ranges are cut into 4 KiB pieces so that merging can stop
    wherever host pages stop being contiguous, `budget` pieces at a time; the last merged row
    of a chunk waits for the next chunk, which may continue it."""
    if leaf:
        yield host_columns(rows, ram_map, process)
        return
    cum = np.cumsum((rows.size // U64(PAGE)).astype(np.int64))
    total = int(cum[-1]) if len(cum) else 0
    pending = None
    for a in range(0, total, budget):
        part = host_columns(_pieces(rows, cum, a, min(total, a + budget)), ram_map, process)
        if pending is not None:
            part = concat(pending, part)
        merged = merge(part, physical=True)
        pending = merged.take(slice(len(merged) - 1, None))
        yield merged.take(slice(0, len(merged) - 1))
    if pending is not None:
        yield pending


def concat(a: Rows, b: Rows) -> Rows:
    return Rows(*(np.concatenate((getattr(a, name), getattr(b, name))) for name in field_names(a)))


def merge(rows: Rows, physical: bool = False) -> Rows:
    """Join neighbours with equal page size and permissions (and linear GPA/HPA if physical).
    Each merged row keeps its first element's columns, with the summed size and leaves."""
    n = len(rows)
    if n == 0:
        return rows
    prev_end = rows.start[:-1] + rows.size[:-1]   # wraps to 0 after the top page: no match
    joins = ((rows.start[1:] == prev_end) & (rows.page_size[1:] == rows.page_size[:-1])
             & (rows.writable[1:] == rows.writable[:-1]) & (rows.user[1:] == rows.user[:-1])
             & (rows.executable[1:] == rows.executable[:-1])
             & (rows.readable[1:] == rows.readable[:-1]))
    if physical:
        joins &= rows.gpa[1:] == rows.gpa[:-1] + rows.size[:-1]
        joins &= rows.host[1:] == rows.host[:-1]
        present = rows.host[1:] == HOST_PRESENT
        joins &= ~present | (rows.hpa[1:] == rows.hpa[:-1] + rows.size[:-1])
    heads = np.concatenate(([0], np.flatnonzero(~joins) + 1))
    merged = rows.take(heads)
    merged.size = np.add.reduceat(rows.size, heads)
    merged.leaves = np.add.reduceat(rows.leaves, heads)
    return merged


@record
class MapRow:
    """One row for output."""
    start: int
    end: int          # exclusive (2**64 for a row reaching the top)
    page_size: int
    writable: bool
    user: bool
    executable: bool
    gpa: int
    hpa: Optional[int]
    host_status: str
    leaves: int
    flags: tuple
    readable: bool = True

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def perms(self) -> str:
        return ("r" if self.readable else "-") + ("w" if self.writable else "-") + \
            ("x" if self.executable else "-")

    def to_dict(self, leaf: bool = False) -> dict:
        h = lambda v: None if v is None else f"{v:#x}"  # noqa: E731
        out = {"start": h(self.start), "end": h(self.end), "size": self.size,
               "page_size": self.page_size, "readable": self.readable,
               "writable": self.writable, "user": self.user, "executable": self.executable,
               "gpa": h(self.gpa)}
        if self.host_status:
            out["hpa"] = h(self.hpa)
            out["host_status"] = self.host_status
        if leaf:
            out["flags"] = list(self.flags)
        else:
            out["leaves"] = self.leaves
        return out


def iter_rows(rows: Rows, fmt=None) -> Iterator[MapRow]:
    """The rows as MapRow objects; leaf flags named by the entry format when given."""
    flags_of = {}
    flag_bits = getattr(fmt, "flag_bits", FLAG_BITS)   # the bits the format's flags() read
    columns = (rows.start, rows.size, rows.page_size, rows.writable, rows.user,
               rows.executable, rows.gpa, rows.hpa, rows.host, rows.leaves, rows.level,
               rows.entry, rows.readable)
    for start, size, psize, w, u, x, gpa, hpa, host, leaves, level, entry, r in \
            zip(*(c.tolist() for c in columns)):
        flags = ()
        if fmt is not None:
            key = (level, entry & flag_bits)
            flags = flags_of.get(key)
            if flags is None:
                flags = flags_of[key] = fmt.flags(level, entry, True)
        status = HOST_STATUS[host]
        yield MapRow(start, start + size, psize, w, u, x, gpa,
                     hpa if status == "present" else None, status, leaves, flags, r)


def row_text(row: MapRow, show_gpa: bool, show_hpa: bool, leaf: bool) -> str:
    who = "user" if row.user else "kernel"
    end = min(row.end, 1 << 64)
    line = (f"{row.start:#018x} {end:#018x} {size_name(row.size):>10} "
            f"{size_name(row.page_size):>6}  {row.perms}  {who:<6}")
    if show_gpa:
        line += f" {row.gpa:#014x}"
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
