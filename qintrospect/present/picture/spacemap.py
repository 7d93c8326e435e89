"""The address space drawn as a map: `vmmap`'s rows (vmmap.Rows columns) in two lanes, the
user (lower) and kernel (upper) halves, coloured by permission, with the page size as the bar's
height and a strip under it for user/supervisor pages.

Holes are FOLDED: the space is cut into regions at every hole of 2 MiB or more (at most
MAX_REGIONS regions: beyond that only the largest holes fold), each fold drawn as a zig-zag mark
whose tooltip gives the hole's size and bounds. Inside a region addresses are linear (small
holes to scale); a region's drawn width grows with the log of its span (4 KiB: 6 px, each
doubling 5 px more), so a 4 KiB page and a 64 TiB direct map both stay visible.

Large maps stay light: each region is painted per pixel column (the row covering the column's
centre, else the first row touching it) and equal neighbouring columns are merged into one
rectangle, so the drawing has at most a few rectangles per pixel of width, never one element
per range. The HTML page finds the exact row under the pointer in the embedded row table
(binary search), and pages through the rows 200 at a time.
"""

import json
import math
from typing import List, Optional

import numpy as np

from ...memory.host import HOST_STATUS
from ...paging.formats import size_name
from ...record import field, record
from .svg import Svg, fit

U64 = np.uint64
MAP_W = 1200
LANE_H = 30
ROW_H = 58
FOLD_W = 12
FOLD_MIN = 2 << 20
MAX_REGIONS = 400
MAX_STRETCH = 6.0          # how much wider regions may be drawn when a half has few
ROW_DATA_CAP = 250_000     # rows embedded for hovering and paging in the HTML
PERMS = ("r--", "rw-", "r-x", "rwx")
PERM_CLS = ("p-r", "p-rw", "p-rx", "p-rwx")


@record
class Region:
    start: int            # first mapped byte
    end: int              # exclusive
    row0: int             # rows [row0, row1) lie in it
    row1: int
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0


@record
class Half:
    name: str
    lo: int
    hi: int               # exclusive
    regions: List[Region] = field(default_factory=list)
    height: float = 0.0

    @property
    def row_count(self) -> int:
        return sum(g.row1 - g.row0 for g in self.regions)


def region_width(span: int) -> float:
    return 6 + 5 * max(0.0, math.log2(max(span, 4096) / 4096))


def _halves(va_bits: int):
    if va_bits >= 64 or va_bits <= 32:
        top = 1 << (va_bits if va_bits <= 32 else 64)
        return [("the whole address space", 0, top)]
    n = va_bits - 1
    return [(f"user half (lower, 0x0 - {(1 << n) - 1:#x})", 0, 1 << n),
            (f"kernel half (upper, {(1 << 64) - (1 << n):#x} - 0xffffffffffffffff)",
             1 << 63, 1 << 64)]


def _regions(starts: np.ndarray, sizes: np.ndarray, first: int) -> List[Region]:
    """Rows (sorted, not overlapping) cut at the holes that fold. Only the last row of a space
    can end at 2**64, and its end is never a gap's left side, so uint64 holds every gap."""
    n = len(starts)
    if n == 0:
        return []
    gaps = (starts[1:] - (starts[:-1] + sizes[:-1])).astype(np.float64)
    cut = gaps >= FOLD_MIN
    if cut.sum() > MAX_REGIONS - 1:
        cut = np.zeros(len(gaps), bool)
        cut[np.argsort(-gaps, kind="stable")[:MAX_REGIONS - 1]] = True
    heads = np.concatenate(([0], np.flatnonzero(cut) + 1, [n])).tolist()
    return [Region(int(starts[a]), int(starts[b - 1]) + int(sizes[b - 1]), first + a, first + b)
            for a, b in zip(heads[:-1], heads[1:])]


class SpaceMap:
    """The layout of one map: halves, regions, their positions."""

    def __init__(self, rows, va_bits: int = 48, show_gpa: bool = False,
                 show_hpa: bool = False, leaf: bool = False, facts: Optional[dict] = None,
                 vmas: Optional[List[tuple]] = None):
        """vmas: a guest process's VMAs, (start, end, name), to label the ranges with (vmmap
        --guest-pid): each row gets the name of the VMA that holds its start."""
        order = np.argsort(rows.start, kind="stable")
        self.vmas = sorted(vmas) if vmas else None
        self.rows = rows.take(order) if len(rows) else rows
        self.va_bits = va_bits
        self.show_gpa, self.show_hpa, self.leaf = show_gpa, show_hpa, leaf
        self.facts = facts or {}
        starts, sizes = self.rows.start, self.rows.size
        self.halves: List[Half] = []
        for name, lo, hi in _halves(va_bits):
            inside = starts >= U64(lo)
            if hi < 1 << 64:
                inside &= starts < U64(hi)
            sel = np.flatnonzero(inside)
            half = Half(name, lo, hi)
            if len(sel):
                a, b = int(sel[0]), int(sel[-1]) + 1
                half.regions = _regions(starts[a:b], sizes[a:b], a)
            self.halves.append(half)
        self._place()

    def _place(self) -> None:
        """Regions left to right, wrapping; a fold mark before every region but the first.
        When a half's regions would fill less than one line, their widths are scaled up (at
        most MAX_STRETCH times) to fill it."""
        avail = MAP_W - 20
        for half in self.halves:
            widths = [region_width(r.end - r.start) for r in half.regions]
            natural = sum(widths) + FOLD_W * max(0, len(widths) - 1)
            stretch = 1.0
            if widths and natural < avail:
                stretch = min(MAX_STRETCH, (avail - FOLD_W * (len(widths) - 1)) / sum(widths))
            x, y = 10.0, 0.0
            for k, (r, w) in enumerate(zip(half.regions, widths)):
                w = min(w * stretch, avail - FOLD_W)
                need = w + (FOLD_W if k else 0)
                if x + need > MAP_W - 10 and x > 10:
                    x, y = 10.0, y + ROW_H
                if k:
                    x += FOLD_W
                r.x, r.y, r.w = x, y, w
                x += w
            half.height = y + ROW_H

    def vma_names(self) -> List[str]:
        """Per row: the name of the VMA holding its start ("anon" for anonymous memory, "no
        VMA" for a user range none holds, "" for a kernel range); [] without VMAs."""
        if self.vmas is None:
            return []
        import bisect
        starts = [v[0] for v in self.vmas]
        out = []
        for start, user in zip(self.rows.start.tolist(), self.rows.user.tolist()):
            k = bisect.bisect_right(starts, start) - 1
            if k >= 0 and start < self.vmas[k][1]:
                out.append(self.vmas[k][2] or "anon")
            else:
                out.append("no VMA" if user else "")
        return out

    # -- the codes of each row ------------------------------------------------------------------
    def perm_code(self) -> np.ndarray:
        r = self.rows
        return (r.writable.astype(np.int64) + 2 * r.executable.astype(np.int64))

    def size_code(self) -> np.ndarray:
        ps = self.rows.page_size
        return np.where(ps >= U64(1 << 30), 2, np.where(ps > U64(4096), 1, 0))

    def row_text(self, i: int) -> str:
        r = self.rows
        start = int(r.start[i])
        end = start + int(r.size[i])
        perms = PERMS[int(r.writable[i]) + 2 * int(r.executable[i])]
        text = (f"{start:#x} - {end:#x}  {size_name(end - start)} in "
                f"{size_name(int(r.page_size[i]))} pages  {perms}  "
                f"{'user' if r.user[i] else 'kernel'}")
        if self.show_gpa:
            text += f"  GPA {int(r.gpa[i]):#x}"
        if self.show_hpa:
            status = HOST_STATUS[int(r.host[i])]
            text += f"  HPA {int(r.hpa[i]):#x}" if status == "present" else f"  HPA {status or '-'}"
        return text

    # -- drawing ----------------------------------------------------------------------------
    def _paint(self, svg: Svg, half: Half, y0: float) -> None:
        perm, psize, user = self.perm_code(), self.size_code(), self.rows.user
        starts = self.rows.start
        for k, reg in enumerate(half.regions):
            x, y = reg.x, y0 + reg.y
            if k:
                self._fold(svg, x - FOLD_W, y, half.regions[k - 1], reg)
            span = reg.end - reg.start
            cols = max(1, int(round(reg.w)))
            # offsets inside the region as floats: exact enough to choose pixels
            rs = (starts[reg.row0:reg.row1] - U64(reg.start)).astype(np.float64)
            re_ = rs + self.rows.size[reg.row0:reg.row1].astype(np.float64)
            edges = np.linspace(0.0, float(span), cols + 1)
            lo, hi = edges[:-1], edges[1:]
            mid = (lo + hi) / 2
            last = len(rs) - 1
            cover = np.searchsorted(rs, mid, side="right") - 1
            ok_c = (cover >= 0) & (re_[np.maximum(cover, 0)] > mid)
            left = np.searchsorted(rs, lo, side="right") - 1
            ok_l = (left >= 0) & (re_[np.maximum(left, 0)] > lo)
            first = np.searchsorted(rs, lo, side="left")
            ok_f = (first <= last) & (rs[np.minimum(first, last)] < hi)
            pick = np.where(ok_c, cover, np.where(ok_l, left, np.where(ok_f, first, -1)))
            pick_g = np.where(pick >= 0, pick + reg.row0, -1)
            safe = np.maximum(pick_g, 0)
            key = np.where(pick_g >= 0, perm[safe] * 3 + psize[safe], -1)
            ukey = np.where(pick_g >= 0, user[safe].astype(np.int64), -1)
            colw = reg.w / cols
            title = (f"region {reg.start:#x} - {reg.end:#x} ({size_name(span)} span, "
                     f"{reg.row1 - reg.row0} range(s))")
            svg.rect(x, y, reg.w, LANE_H + 6, cls="lane", title=title)
            for a, b, kv in _runs(key):
                if kv < 0:
                    continue
                h = LANE_H * (0.5, 0.75, 1.0)[kv % 3]
                rows = np.unique(pick_g[a:b])
                rows = rows[rows >= 0]
                if len(rows) == 1:
                    tip = self.row_text(int(rows[0]))
                else:
                    end = int(starts[rows[-1]]) + int(self.rows.size[rows[-1]])
                    tip = f"{len(rows)} ranges, {int(starts[rows[0]]):#x} - {end:#x}"
                svg.rect(x + a * colw, y + LANE_H - h, (b - a) * colw, h,
                         cls=PERM_CLS[kv // 3], title=tip)
            for a, b, kv in _runs(ukey):
                if kv < 0:
                    continue
                svg.rect(x + a * colw, y + LANE_H + 2, (b - a) * colw, 4,
                         cls="strip-u" if kv else "strip-s")
            svg.rect(x, y, reg.w, LANE_H + 6, cls="seg", data_region=f"{reg.row0}:{reg.row1}")
            if reg.w >= 80:
                svg.text(x + 2, y + LANE_H + 18, fit(f"{reg.start:#x}", reg.w - 4, 10),
                         cls="t-small t-dim")
                svg.text(x + 2, y + LANE_H + 29, fit(size_name(span), reg.w - 4, 10),
                         cls="t-small t-dim")

    def _fold(self, svg: Svg, x: float, y: float, before: Region, after: Region) -> None:
        hole = after.start - before.end
        d = (f"M{x + 3:.1f},{y} L{x + 9:.1f},{y + 8} L{x + 3:.1f},{y + 16} "
             f"L{x + 9:.1f},{y + 24} L{x + 3:.1f},{y + 32}")
        svg.path(d, cls="fold", title=f"hole of {size_name(hole)} folded: {before.end:#x} - "
                                      f"{after.start:#x}")

    def svg(self, title: Optional[str] = None) -> Svg:
        """The whole map: header, each half, the legend."""
        head = 56
        legend_h = 96
        height = head + sum(40 + max(h.height, ROW_H) for h in self.halves) + legend_h
        svg = Svg(MAP_W, height, title=title or "address space map", label="address space map")
        svg.text(10, 22, title or "address space map", cls="t-title")
        svg.text(10, 42, self.summary(), cls="t-small")
        y = head
        for half in self.halves:
            svg.text(10, y + 16, f"{half.name}: {half.row_count} range(s) in "
                     f"{len(half.regions)} region(s)", cls="t-head")
            y += 28
            if not half.regions:
                svg.text(10, y + 16, "nothing mapped", cls="t-dim")
            svg.open_group(cls="qi-half", data_half=half.name, data_y=f"{y:.1f}")
            self._paint(svg, half, y)
            svg.close_group()
            y += max(half.height, ROW_H) + 12
        self._legend(svg, y)
        svg.height = y + legend_h
        return svg

    def summary(self) -> str:
        n = len(self.rows)
        total = int(self.rows.size.sum()) if n else 0
        facts = ", ".join(f"{k} {v}" for k, v in self.facts.items() if v is not None)
        return (f"{n} {'page(s)' if self.leaf else 'range(s)'}, {size_name(total)} mapped"
                + (f"; {facts}" if facts else "")
                + "; holes of 2 MiB or more folded; widths grow with log2(span)")

    def _legend(self, svg: Svg, y: float) -> None:
        svg.text(10, y + 14, "legend", cls="t-head")
        x = 10
        for name, cls in zip(PERMS, PERM_CLS):
            svg.rect(x, y + 22, 26, 16, cls=cls)
            svg.text(x + 32, y + 35, name)
            x += 100
        for label, frac in (("4 KiB pages", 0.5), ("2/4 MiB pages", 0.75), ("1 GiB pages", 1.0)):
            h = 24 * frac
            svg.rect(x, y + 22 + 24 - h, 14, h, cls="p-r")
            svg.text(x + 20, y + 42, label)
            x += 140
        svg.rect(10, y + 58, 26, 4, cls="strip-u")
        svg.text(42, y + 64, "strip: user page")
        svg.rect(200, y + 58, 26, 4, cls="strip-s")
        svg.text(232, y + 64, "strip: supervisor page")
        svg.path(f"M{433},{y + 50} L{439},{y + 56} L{433},{y + 62} L{439},{y + 68}", cls="fold")
        svg.text(450, y + 64, "folded hole (2 MiB or more; hover for its size)")
        svg.text(10, y + 86, "in a region, addresses are linear; a region's width grows with "
                 "log2 of its span", cls="t-small t-dim")

    # -- for the HTML page --------------------------------------------------------------------
    def data_json(self) -> str:
        """The rows and the regions' positions for the page's script (hex strings: JavaScript
        numbers cannot hold 64-bit addresses)."""
        r = self.rows
        n = min(len(r), ROW_DATA_CAP)
        data = {
            "cap": len(r) > n, "total": len(r), "gpa": self.show_gpa, "hpa": self.show_hpa,
            "leaf": self.leaf,
            "start": [f"{v:x}" for v in r.start[:n].tolist()],
            "end": [f"{s + z:x}" for s, z in zip(r.start[:n].tolist(), r.size[:n].tolist())],
            "ps": [int(v) for v in r.page_size[:n].tolist()],
            "perm": self.perm_code()[:n].tolist(),
            "user": [int(v) for v in r.user[:n].tolist()],
            "leaves": [int(v) for v in r.leaves[:n].tolist()],
            "halves": [{"name": h.name, "regions": [
                [round(g.x, 2), round(g.y, 2), round(g.w, 2), f"{g.start:x}", f"{g.end:x}",
                 g.row0, g.row1] for g in h.regions]} for h in self.halves],
        }
        if self.show_gpa:
            data["gpaS"] = [f"{v:x}" for v in r.gpa[:n].tolist()]
        if self.show_hpa:
            data["hpaS"] = [f"{v:x}" if HOST_STATUS[s] == "present" else (HOST_STATUS[s] or "-")
                            for v, s in zip(r.hpa[:n].tolist(), r.host[:n].tolist())]
        if self.vmas is not None:
            data["vma"] = self.vma_names()[:n]
        # "</" never appears in JSON of hex strings and numbers, but the names could hold it
        return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")

    def region_rows(self):
        """One line per region (for the printed page and pages without script); with VMAs,
        the names of those its ranges lie in."""
        names = self.vma_names()
        for half in self.halves:
            for g in half.regions:
                labels = list(dict.fromkeys(n for n in names[g.row0:g.row1] if n))
                vmas = ", ".join(labels[:4]) + (f", +{len(labels) - 4} more"
                                                if len(labels) > 4 else "")
                perms = sorted(set(self.perm_code()[g.row0:g.row1].tolist()))
                sizes = sorted(set(self.rows.page_size[g.row0:g.row1].tolist()))
                mapped = int(self.rows.size[g.row0:g.row1].sum())
                yield {"half": half.name.split(" (")[0], "start": f"{g.start:#x}",
                       "end": f"{g.end:#x}", "span": size_name(g.end - g.start),
                       "mapped": size_name(mapped), "ranges": g.row1 - g.row0,
                       "perms": " ".join(PERMS[p] for p in perms),
                       "pages": " ".join(size_name(int(s)) for s in sizes), "vmas": vmas}


def _runs(key: np.ndarray):
    """(start, end, value) of runs of equal values."""
    if len(key) == 0:
        return
    change = np.flatnonzero(key[1:] != key[:-1]) + 1
    bounds = np.concatenate(([0], change, [len(key)]))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        yield a, b, int(key[a])
