"""search: where a byte pattern lies in one address space (the leaves of its page tables, in
virtual-address order) or in guest-physical RAM, read from the VM's own memory in large pieces.

A match may cross from one page into the next when the two are contiguous in virtual addresses,
wherever their frames are: the end of each piece is carried into the next. Matches may overlap
("aa" twice in "aaa"), as gdb's `find` reports them. Only plain RAM is read (never MMIO); a
leaf that points elsewhere is counted, not read.
"""

import time
from typing import List, Optional

from .. import paging
from ..errors import MemoryReadError, UsageError
from ..record import record

PIECE = 16 << 20     # bytes read at once: bounded memory whatever the address space
CONTEXT = 16         # bytes shown from each match on
KINDS = ("text", "hex", "u16", "u32", "u64")


def pattern_bytes(text: str, kind: str = "text") -> bytes:
    """The bytes to look for: text as UTF-8, hex bytes ("de ad be ef", "0xdeadbeef" read as
    written, high byte first), or an integer of 2/4/8 bytes as the guest stores it
    (little-endian)."""
    if kind == "text":
        data = text.encode()
    elif kind == "hex":
        digits = "".join(text.split())
        if digits[:2].lower() == "0x":
            digits = digits[2:]
        try:
            data = bytes.fromhex(digits)
        except ValueError:
            raise UsageError(f"--hex {text!r}: expected hex bytes, e.g. 'de ad be ef'") from None
    elif kind in ("u16", "u32", "u64"):
        size = int(kind[1:]) // 8
        try:
            value = int(text, 0)
        except ValueError:
            raise UsageError(f"--{kind} {text!r}: expected an integer (0x... or decimal)") \
                from None
        if not 0 <= value < 1 << (8 * size):
            raise UsageError(f"--{kind} {text}: does not fit in {size} bytes")
        data = value.to_bytes(size, "little")
    else:
        raise UsageError(f"pattern kind {kind!r}: one of {', '.join(KINDS)}")
    if not data:
        raise UsageError("the pattern is empty")
    if len(data) > 4096:
        raise UsageError(f"the pattern is {len(data)} bytes: at most 4096")
    return data


@record
class Match:
    """One place the pattern starts."""
    gpa: Optional[int]
    gva: Optional[int] = None       # None in a physical search
    ram_block: Optional[str] = None
    hva: Optional[int] = None
    hpa: Optional[int] = None
    host: Optional[str] = None      # the host page: present, not-present, swapped, ...
    page_size: Optional[int] = None
    readable: Optional[bool] = None  # a load works (false: a riscv64 execute-only page)
    writable: Optional[bool] = None
    user: Optional[bool] = None
    executable: Optional[bool] = None
    context: bytes = b""            # the bytes from the match on, as far as its read reached

    def to_dict(self) -> dict:
        h = lambda v: None if v is None else f"{v:#x}"  # noqa: E731
        out = {} if self.gva is None else {"gva": h(self.gva)}
        out.update(gpa=h(self.gpa), ram_block=self.ram_block, hva=h(self.hva), hpa=h(self.hpa),
                   host=self.host)
        if self.gva is not None:
            out.update(page_size=self.page_size, readable=self.readable,
                       writable=self.writable, user=self.user, executable=self.executable)
        out["bytes"] = self.context.hex()
        return out


@record
class SearchResult:
    pattern: bytes
    matches: List[Match]
    space: str                  # "virtual" or "physical"
    root: Optional[int]         # the page-table root searched (virtual)
    scanned: int                # bytes read and searched
    truncated: bool             # stopped at the limit: there may be more
    not_ram: int                # leaves (or bytes, physical) that are not RAM: not read
    unreadable: int             # pieces whose read failed
    seconds: float

    def summary(self) -> dict:
        return {"pattern": self.pattern.hex(), "space": self.space,
                "root": None if self.root is None else f"{self.root:#x}",
                "matches": len(self.matches), "truncated": self.truncated,
                "scanned_bytes": self.scanned, "not_ram_leaves": self.not_ram,
                "unreadable_pieces": self.unreadable, "seconds": round(self.seconds, 4)}


class _Finder:
    """Feeds pieces of one address space in order; finds the pattern across their joins."""

    def __init__(self, pattern: bytes, align: int, limit: int):
        self.pattern, self.align, self.limit = pattern, align, limit
        self.found: List[tuple] = []        # (address, piece index, offset in piece, context)
        self.carry, self.carry_end = b"", None
        self.full = False

    def feed(self, address: int, data: bytes, tag) -> None:
        """Search data (at address), and the join with the previous piece if it ended here
        (its last bytes and data's first: data itself is never copied)."""
        keep = len(self.pattern) - 1
        head = self.carry if self.carry_end == address else b""
        if head:
            joined = head + data[:max(keep, CONTEXT)]
            at = joined.find(self.pattern)
            while 0 <= at < len(head):
                if self._add(address - len(head) + at, tag, at - len(head),
                             joined[at:at + CONTEXT]):
                    return
                at = joined.find(self.pattern, at + 1)
        at = data.find(self.pattern)
        while at >= 0:
            if self._add(address + at, tag, at, data[at:at + CONTEXT]):
                return
            at = data.find(self.pattern, at + 1)
        tail = (head + data) if len(data) < keep else data
        self.carry = tail[-keep:] if keep else b""
        self.carry_end = address + len(data)

    def feed_sparse(self, address: int, data: bytes, zeros, tag) -> None:
        """feed(), skipping the inside of runs of data known to be zeros (`zeros`: sorted
        (start, end) offsets; read_sparse's): a pattern with a non-zero byte cannot start
        more than len(pattern) - 1 bytes before such a run's end, nor lie inside it, so
        only that much of each run's edges is searched (and CONTEXT bytes after data, for
        the context shown). An all-zero pattern searches everything."""
        edge = max(len(self.pattern) - 1, CONTEXT)
        if not zeros or not any(self.pattern):
            return self.feed(address, data, tag)
        start = 0                               # the next byte of data still to feed
        for a, b in _merged(zeros):
            if b - a <= 2 * edge:
                continue                        # a short run: searched as data
            self.feed(address + start, data[start:a + edge], tag)
            if self.full:
                return
            start = b - edge
        self.feed(address + start, data[start:], tag)

    def _add(self, where: int, tag, offset: int, context: bytes) -> bool:
        """Keep one match (if aligned); True when the limit is reached."""
        if where % self.align == 0:
            self.found.append((where, tag, offset, bytes(context)))
            if len(self.found) >= self.limit:
                self.full = True
        return self.full


def _read_sparse(memory, gpa: int, length: int):
    """(bytes, runs known to be zeros) from a memory that knows them (PhysicalMemory's
    read_sparse), else (bytes, [])."""
    sparse = getattr(memory, "read_sparse", None)
    return sparse(gpa, length) if sparse is not None else (memory.read(gpa, length), [])


def _merged(runs):
    """Sorted (start, end) runs with neighbours joined."""
    out = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def search_virtual(session, pattern: bytes, cr3: Optional[int] = None, start: int = 0,
                   end: Optional[int] = None, user: bool = False, kernel: bool = False,
                   writable: bool = False, executable: bool = False, align: int = 1,
                   limit: int = 1000, progress=None) -> SearchResult:
    """Every place in the address space of root cr3 (the vCPU's by default) where pattern
    starts, in [start, end), among the pages the filters keep."""
    import numpy as np
    t0 = time.monotonic()
    leaves = session.leaf_arrays(cr3, start, end)
    keep = np.ones(len(leaves), bool)
    for wanted, column in ((user, leaves.user), (kernel, ~leaves.user),
                           (writable, leaves.writable), (executable, leaves.executable)):
        if wanted:
            keep &= column
    pieces, not_ram = _virtual_pieces(leaves, np.flatnonzero(keep), session.ram_map.ram,
                                      start, end)
    if progress is not None:
        progress.total = sum(length for _, _, length, _ in pieces)
    finder = _Finder(pattern, align, limit)
    scanned = unreadable = 0
    for va, gpa, length, leaf in pieces:
        try:
            data, zeros = _read_sparse(session.memory, gpa, length)
        except MemoryReadError:
            unreadable += 1
            finder.carry_end = None
            continue
        finder.feed_sparse(va, data, zeros, (gpa, leaf))
        scanned += length
        if progress is not None:
            progress.advance(length)
        if finder.full:
            break
    session.check_live()
    matches = _virtual_matches(session, leaves, finder.found, cr3)
    cpu = session.cpu_state(cr3)
    # the root said with the result: CR3's table, TTBR0_EL1's (the process's half) or satp's;
    # a guest with its MMU off (its addresses its IPAs): the stage 2 root
    s2 = getattr(session, "stage2", None)
    if s2 is not None and cr3 is None and not cpu.sctlr & 1:
        root = s2.to_dict()["root"]
        root = None if root is None else int(root, 16)
    else:
        root = paging.process_root(cpu)
    return SearchResult(pattern, matches, "virtual", root, scanned, finder.full, not_ram,
                        unreadable, time.monotonic() - t0)


def _virtual_pieces(leaves, kept, ram, start, end):
    """(va, gpa, length, leaf index) pieces to read, in VA order: each kept leaf clipped to
    [start, end), in RAM only, runs of neighbours contiguous in both VA and GPA (and in one
    RAM region) cut into pieces of at most PIECE bytes; the leaf index is the piece's first
    byte's. Computed on the leaf columns (a kernel's linear map has 10^5 leaves)."""
    import numpy as np
    u64 = np.uint64
    if not len(kept):
        return [], 0
    if end is not None and end >= 1 << 64:
        end = None
    va, pa, size = leaves.va[kept], leaves.pa[kept], leaves.size[kept]
    last = va + (size - u64(1))                      # inclusive: no overflow at the top
    lo = np.maximum(va, u64(start))
    if end is not None:
        last = np.minimum(last, u64(end - 1))
    inside = (lo <= last) & (va <= last)
    if end is not None:
        inside &= va < u64(end)
    kept, va, pa, lo, last = kept[inside], va[inside], pa[inside], lo[inside], last[inside]
    gpa = pa + (lo - va)
    length = last - lo + u64(1)                    # a leaf is at most 1 GiB: never 2**64
    starts = np.array([r.start for r in ram], u64)
    ends = np.array([r.end for r in ram], u64)
    k = np.searchsorted(starts, gpa, side="right").astype(np.int64) - 1
    in_ram = k >= 0
    kk = np.maximum(k, 0)
    in_ram &= (gpa + length - u64(1)) <= ends[kk]
    not_ram = int((~in_ram).sum())
    kept, lo, gpa, length, k = kept[in_ram], lo[in_ram], gpa[in_ram], length[in_ram], k[in_ram]
    if not len(kept):
        return [], not_ram
    # runs: a leaf continues the previous one in VA, GPA and RAM region
    joins = (lo[1:] == lo[:-1] + length[:-1]) & (gpa[1:] == gpa[:-1] + length[:-1]) & \
        (k[1:] == k[:-1])
    heads = np.concatenate(([0], np.flatnonzero(~joins) + 1))
    run_len = np.add.reduceat(length, heads)
    # each run cut into PIECE-sized pieces from its start
    counts = ((run_len + u64(PIECE - 1)) // u64(PIECE)).astype(np.int64)
    run = np.repeat(np.arange(len(heads)), counts)
    nth = (np.arange(len(run)) - np.repeat(np.cumsum(counts) - counts, counts)).astype(u64)
    offset = nth * u64(PIECE)
    piece_va = lo[heads][run] + offset
    piece_gpa = gpa[heads][run] + offset
    piece_len = np.minimum(u64(PIECE), run_len[run] - offset)
    # the leaf holding each piece's first byte: the last leaf of its run starting at or before
    first = np.searchsorted(lo, piece_va, side="right") - 1
    return list(zip(piece_va.tolist(), piece_gpa.tolist(), piece_len.tolist(),
                    kept[first].tolist())), not_ram


def _virtual_matches(session, leaves, found, cr3) -> List[Match]:
    if not found:
        return []
    if getattr(session, "stage2", None) is not None:
        return _two_stage_matches(session, leaves, found, cr3)
    b = session.translate_batch([where for where, *_ in found], cr3)
    w = b.walk_result
    out = []
    for k, (where, _, _, context) in enumerate(found):
        d = b.row_dict(k)
        if "fault" in d:        # the tables changed under a running VM: say what was found
            out.append(Match(None, where, context=context))
            continue
        out.append(Match(int(w.pa[k]), where, d["ram_block"],
                         int(b.hva[k]) if b.has_hva[k] else None,
                         int(b.hpa[k]) if d["hpa"] else None, d["host"], d["page_size"],
                         # row_dict says readable where it can be false (riscv64), as vmmap
                         readable=d.get("readable", True), writable=d["writable"],
                         user=d["user"], executable=d["executable"], context=context))
    return out


def _two_stage_matches(session, leaves, found, cr3) -> List[Match]:
    """The matches of a guest of the vCPU's hypervisor (aarch64, stage 2 live): each address
    translated through both stages (the batch walk takes one), `user` as the leaf says (stage
    2's map: EL0 and EL1 alike)."""
    import numpy as np
    readable = getattr(leaves, "readable", None)
    out = []
    for where, _, _, context in found:
        t = session.translate(where, cr3)
        if not t.ok:
            out.append(Match(None, where, context=context))
            continue
        k = int(np.searchsorted(leaves.va, np.uint64(where), side="right")) - 1
        out.append(Match(t.gpa, where, t.ram.block if t.ram else None, t.hva, t.hpa,
                         t.host.status if t.host else None, t.page_size,
                         readable=True if readable is None else bool(readable[k]),
                         writable=t.writable, user=bool(leaves.user[k]),
                         executable=t.executable, context=context))
    return out


def search_physical(session, pattern: bytes, align: int = 1, limit: int = 1000,
                    progress=None) -> SearchResult:
    """Every place in guest-physical RAM (the RAM blocks QEMU maps, never devices) where
    pattern starts."""
    t0 = time.monotonic()
    ram = [r for r in session.ram_map.ram if r.kind == "ram"]
    if progress is not None:
        progress.total = sum(r.end - r.start + 1 for r in ram)
    finder = _Finder(pattern, align, limit)
    scanned = unreadable = 0
    for r in ram:
        gpa = r.start
        while gpa <= r.end and not finder.full:
            n = min(r.end + 1 - gpa, PIECE)
            try:
                data, zeros = _read_sparse(session.memory, gpa, n)
            except MemoryReadError:
                unreadable += 1
                finder.carry_end = None
            else:
                finder.feed_sparse(gpa, data, zeros, r)
                scanned += n
            if progress is not None:
                progress.advance(n)
            gpa += n
        finder.carry_end = None                 # RAM blocks are not one another's neighbours
        if finder.full:
            break
    session.check_live()
    matches = [_physical_match(session, where, region, context)
               for where, region, _, context in finder.found]
    return SearchResult(pattern, matches, "physical", None, scanned, finder.full, 0,
                        unreadable, time.monotonic() - t0)


def _physical_match(session, gpa: int, region, context: bytes) -> Match:
    hva = None if region.hva is None else region.hva + (gpa - region.start)
    hpa = status = None
    if hva is not None and session.process is not None:
        page = session.process.host_page(hva)
        status = page.status
        hpa = page.hpa
    return Match(gpa, None, region.block, hva, hpa, status, context=context)


def text(result: SearchResult) -> str:
    """The matches as a table, then one line that says what was searched."""
    from ..present.textsafe import printable
    virtual = result.space == "virtual"
    lines = [(f"{'gva':<18} " if virtual else "") + f"{'gpa':<14} {'hpa':<14} "
             + ("prm  who    " if virtual else f"{'block':<10} ") + "bytes"]
    for m in result.matches:
        hpa = f"{m.hpa:#014x}" if m.hpa is not None else f"{m.host or '-':>14}"
        gpa = f"{m.gpa:#014x}" if m.gpa is not None else f"{'-':>14}"
        row = (f"{m.gva:#018x} " if virtual else "") + f"{gpa} {hpa} "
        if virtual:
            rights = ("r" if m.readable else "-") + ("w" if m.writable else "-") + \
                ("x" if m.executable else "-")
            row += f"{rights if m.gpa is not None else '?  '}  {'user' if m.user else 'kernel':<6} "
        else:
            row += f"{printable(m.ram_block or '-'):<10} "
        shown = m.context
        row += " ".join(f"{b:02x}" for b in shown) + "  |" + \
            "".join(chr(b) if 32 <= b < 127 else "." for b in shown) + "|"
        lines.append(row)
    where = ("guest-physical RAM" if not virtual else "the address space" if result.root is None
             else f"the address space of root {result.root:#x}")
    more = " (stopped at --max: there may be more)" if result.truncated else ""
    skipped = f"; {result.not_ram} leaves not RAM, not read" if result.not_ram else ""
    failed = f"; {result.unreadable} pieces could not be read" if result.unreadable else ""
    lines.append(f"{len(result.matches)} match(es){more} in {result.scanned / (1 << 20):.1f} MiB of "
                 f"{where}, {result.seconds:.2f} s{skipped}{failed}")
    return "\n".join(lines)
