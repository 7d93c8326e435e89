"""One translation drawn: the address split into its index fields (the gpt_dump layout, with
the bits), each level's table and entry with its bit fields and flags, arrows from entry to
next table, the fault where the walk stopped, the second-level (EPT/NPT) walk when there is
one, then GVA -> GPA (RAM block) -> HVA -> HPA with page sizes and the 8 bytes at each step.
Nested translations: one column per hop, side by side.

Everything drawn is read from the Translation / paging.Walk / slat.SlatResult objects; nothing
is recomputed except where a field lies in an entry (which is the format's definition).
"""

from typing import List, Optional, Sequence, Tuple

from ...paging.formats import size_name
from .svg import Svg, fit, text_width

W = 1260                 # figure width
BAR_X = 350              # where bit bars start
BAR_W = 896              # bit bar width (64 bits x 14 px, 32 bits x 28 px)
BOX_W = 320              # table boxes on the left
LEVEL_H = 128            # one level: box, bar, arrow

# (high bit, low bit, name, kind): kind is flag, addr, hiaddr (PSE-36: physical bits 39:32),
# idx, off, ign, rsvd, value or sign
Field = Tuple[int, int, str, str]


def _h(v: Optional[int]) -> str:
    return "-" if v is None else f"{v:#x}"


def value_text(b: Optional[bytes]) -> str:
    """The bytes read, as the JSON's value (little-endian integer) and in memory order."""
    if b is None:
        return "-"
    return f"{int.from_bytes(b, 'little'):#x}"


def bytes_text(b: Optional[bytes]) -> str:
    return " ".join(f"{x:02x}" for x in b) if b else ""


def kind_of(mode) -> str:
    """'32-bit', 'pae', 'long', 'ept', 'npt' (npt entries are long-mode entries), 'aarch64'
    or 'riscv'."""
    if mode is None:
        return "none"
    name = mode.name
    if name.startswith("aarch64"):
        return "aarch64"
    if name in ("sv39", "sv48", "sv57"):
        return "riscv"
    if name.startswith("ept"):
        return "ept"
    if name.startswith("npt"):
        return "npt"
    return {"32-bit": "32-bit", "pae": "pae"}.get(name, "long")


# ---- where the fields lie ------------------------------------------------------------------

def _flags(*spec) -> List[Field]:
    return [(bit, bit, name, "flag") for bit, name in spec]


def entry_fields(mode, i: int, step) -> List[Field]:
    """The bit fields of the entry `step` at level i in `mode`, high bits first (SDM Vol 3
    tables 4-4..4-20 for x86 and NPT entries, tables 29-1..29-7 for EPT entries)."""
    kind = kind_of(mode)
    last = i == mode.depth - 1
    leaf = bool(step.leaf)
    size = step.page_size or 0
    present = step.next_addr is not None or leaf
    if kind == "aarch64":
        return arm64_entry_fields(mode, step)
    if kind == "riscv":
        return riscv_entry_fields(step)
    if kind == "ept":
        if not present:
            return [(63, 3, "ignored (no R/W/X: not present)", "ign")] + _flags(
                (2, "X"), (1, "W"), (0, "R"))
        out: List[Field] = [(63, 63, "SVE" if leaf else "ign", "flag" if leaf else "ign"),
                            (62, 52, "ignored", "ign")]
        if leaf and size > 4096:
            lo = size.bit_length() - 1
            out += [(51, lo, "page frame", "addr"), (lo - 1, 12, "must be 0", "rsvd")]
        else:
            out += [(51, 12, "page frame" if leaf else "next table", "addr")]
        out += [(11, 11, "ign", "ign"), (10, 10, "XU", "flag"),
                (9, 9, "D", "flag") if leaf else (9, 9, "ign", "ign"), (8, 8, "A", "flag"),
                (7, 7, "ign", "ign") if last else (7, 7, "PS", "flag")]
        out += [(6, 6, "IPAT", "flag"), (5, 3, "MT", "value")] if leaf else \
            [(6, 3, "rsvd", "rsvd")]
        return out + _flags((2, "X"), (1, "W"), (0, "R"))
    low_flags = _flags((5, "A"), (4, "PCD"), (3, "PWT"), (2, "US"), (1, "RW"), (0, "P"))
    if kind == "32-bit":
        if not present:
            return [(31, 1, "ignored (P=0: not present)", "ign")] + _flags((0, "P"))
        if leaf and not last:      # a 4 MiB page (PSE; PSE-36 keeps PA bits 39:32 in 20:13)
            out = [(31, 22, "page frame", "addr"), (21, 21, "rsvd", "rsvd"),
                   (20, 13, "PA 39:32", "hiaddr"), (12, 12, "PAT", "flag")]
        else:
            out = [(31, 12, "page frame" if leaf else "next table", "addr")]
        out += [(11, 9, "avl", "ign"),
                (8, 8, "G", "flag") if leaf else (8, 8, "ign", "ign"),
                (7, 7, "PAT", "flag") if last else (7, 7, "PS", "flag"),
                (6, 6, "D", "flag") if leaf else (6, 6, "ign", "ign")]
        return out + low_flags
    if not present:
        return [(63, 1, "ignored (P=0: not present)", "ign")] + _flags((0, "P"))
    if kind == "pae" and i == 0:     # a PDPTE: loaded at MOV CR3, neither R/W nor U/S
        return [(63, 52, "rsvd", "rsvd"), (51, 12, "next table", "addr"),
                (11, 9, "avl", "ign"), (8, 5, "rsvd", "rsvd")] + _flags(
            (4, "PCD"), (3, "PWT")) + [(2, 1, "rsvd", "rsvd")] + _flags((0, "P"))
    out = [(63, 63, "XD", "flag")]
    if kind == "pae":
        out.append((62, 52, "rsvd", "rsvd"))
    elif leaf:
        out += [(62, 59, "PK", "value"), (58, 52, "avl", "ign")]
    else:
        out.append((62, 52, "avl", "ign"))
    if leaf and size > 4096:
        lo = size.bit_length() - 1
        out += [(51, lo, "page frame", "addr")]
        if lo - 1 >= 13:
            out.append((lo - 1, 13, "must be 0", "rsvd"))
        out.append((12, 12, "PAT", "flag"))
    else:
        out.append((51, 12, "page frame" if leaf else "next table", "addr"))
    out += [(11, 9, "avl", "ign"),
            (8, 8, "G", "flag") if leaf else (8, 8, "ign", "ign"),
            (7, 7, "PAT", "flag") if last else (7, 7, "PS", "flag"),
            (6, 6, "D", "flag") if leaf else (6, 6, "ign", "ign")]
    return out + low_flags


def arm64_entry_fields(mode, step) -> List[Field]:
    """An AArch64 stage-1 descriptor's fields (Arm ARM D8.3: table, block and page
    descriptors). The output address runs from the granule's (or the block's) low bit to 47;
    with 52-bit output addresses its top bits sit in 15:12 (64 KiB granule) or, with
    TCR_EL1.DS=1, in 9:8 and 49:48 (then SH comes from TCR_EL1)."""
    if not step.entry & 1:
        return [(63, 1, "ignored (bit 0 = 0: invalid)", "ign")] + _flags((0, "V"))
    granule = 1 << mode.levels[-1].shift
    ds = granule != 1 << 16 and mode.va_bits > 48          # LPA2: the only way past 48 bits
    lo = (step.page_size or granule).bit_length() - 1 if step.leaf else \
        granule.bit_length() - 1
    top = 49 if ds else 47
    if step.leaf:
        out = [(63, 55, "ignored", "ign"), (54, 54, "UXN", "flag"), (53, 53, "PXN", "flag"),
               (52, 52, "Cont", "flag"), (51, 51, "DBM", "flag"), (50, 50, "GP", "flag")]
        if not ds:
            out.append((49, 48, "rsvd", "rsvd"))
    else:
        out = [(63, 63, "NSTable", "flag"), (62, 61, "APTable", "value"),
               (60, 60, "UXNTable", "flag"), (59, 59, "PXNTable", "flag"),
               (58, 51 if not ds else 50, "ignored", "ign")]
        if not ds:
            out.append((50, 48, "rsvd", "rsvd"))
    out.append((top, lo, "page frame" if step.leaf else "next table", "addr"))
    if granule == 1 << 16 and lo > 16:
        out.append((lo - 1, 16, "rsvd", "rsvd"))
    if granule == 1 << 16:
        out.append((15, 12, "OA 51:48", "hiaddr"))
    elif lo > 12:
        out.append((lo - 1, 12, "rsvd", "rsvd"))
    if not step.leaf:
        out.append((11, 2, "ignored", "ign"))
        return out + _flags((1, "table"), (0, "V"))
    out += _flags((11, "nG"), (10, "AF"))
    out.append((9, 8, "OA 51:50", "hiaddr") if ds else (9, 8, "SH", "value"))
    out += [(7, 6, "AP", "value")] + _flags((5, "NS")) + [(4, 2, "AttrIndx", "value")]
    return out + _flags((1, "page" if step.name == mode.levels[-1].name else "table=0"),
                        (0, "V"))


def riscv_entry_fields(step) -> List[Field]:
    """An Sv39/48/57 PTE's fields (privileged spec 4.4.1, with Svpbmt's PBMT and Svnapot's N):
    one layout for pointers and leaves (R=W=X=0 makes a pointer)."""
    if not step.entry & 1:
        return [(63, 1, "ignored (V = 0: invalid)", "ign")] + _flags((0, "V"))
    return ([(63, 63, "N", "flag"), (62, 61, "PBMT", "value"), (60, 54, "rsvd", "rsvd"),
             (53, 10, "page frame" if step.leaf else "next table", "addr"),
             (9, 8, "RSW", "ign")]
            + _flags((7, "D"), (6, "A"), (5, "G"), (4, "U"), (3, "X"), (2, "W"), (1, "R"),
                     (0, "V")))


def address_fields(walk, what: str = "GVA") -> Tuple[int, List[Field]]:
    """(bits shown, fields) of the translated address: the bits above the mode's (sign
    extension for a GVA, must-be-0 for a GPA), one index per level (gpt_dump's [PGD IDX] ...),
    the offset; levels below a large-page leaf are part of the offset."""
    mode = walk.mode
    if mode is None:
        return 64, [(63, 0, "no paging: the address is physical", "off")]
    nbits = 32 if mode.va_bits == 32 else 64
    out: List[Field] = []
    top = mode.levels[0].shift + mode.levels[0].index_bits - 1
    if top < nbits - 1:   # bits above the first index: copies of its top bit, or zeros
        name = ("TTBR select: all 0 or all 1" if kind_of(mode) == "aarch64"
                else "sign extension" if what == "GVA" and kind_of(mode) not in ("ept", "npt")
                else "must be 0")
        out.append((nbits - 1, top + 1, name, "sign"))
    leaf_at = next((k for k, s in enumerate(walk.levels) if s.leaf), None)
    for k, spec in enumerate(mode.levels):
        hi, lo = spec.shift + spec.index_bits - 1, spec.shift
        kind = "off" if leaf_at is not None and k > leaf_at else "idx"
        out.append((hi, lo, f"{spec.linux_name.upper()} IDX", kind))
    low = mode.levels[-1].shift
    out.append((low - 1, 0, "Offset", "off"))
    return nbits, out


# ---- drawing pieces -----------------------------------------------------------------------

def bit_bar(svg: Svg, x: float, y: float, value: int, nbits: int, fields: Sequence[Field],
            bad_bits: int = 0, values: Optional[dict] = None) -> float:
    """A register-style bar of `nbits` cells, high bit left: field names above (rotated where
    the field is narrow), the bits in the cells, bit numbers below, and for multi-bit fields
    their value (`values[name]` when given, else the field's number). Returns the bottom y."""
    cw = BAR_W / nbits
    name_h, cell_h = 34, 18
    top = y + name_h
    for hi, lo, name, kind in fields:
        fx = x + (nbits - 1 - hi) * cw
        fw = (hi - lo + 1) * cw
        field_value = (value >> lo) & ((1 << (hi - lo + 1)) - 1)
        cls = {"addr": "bit-addr", "hiaddr": "bit-addr", "idx": "bit-idx", "off": "bit-off",
               "sign": "bit-sign",
               "flag": "bit-set" if field_value else "bit",
               "value": "bit-set" if field_value else "bit"}.get(kind, "bit")
        if bad_bits >> lo & ((1 << (hi - lo + 1)) - 1):
            cls = "bit-bad"
        title = f"bits {hi}:{lo} {name} = {field_value:#x}" if hi != lo else \
            f"bit {hi} {name} = {field_value}"
        svg.rect(fx, top, fw, cell_h, cls=cls, title=title)
        # the digits, one <text> per field with a position per character
        digits = f"{field_value:0{hi - lo + 1}b}"
        xs = " ".join(f"{fx + (k + 0.5) * cw:.1f}" for k in range(len(digits)))
        svg.raw(f'<text x="{xs}" y="{top + 13}" class="t-small" text-anchor="middle">'
                f"{digits}</text>")
        # the name: horizontal when it fits, else rotated
        label_cls = "t-small" + ("" if kind in ("flag", "addr", "hiaddr", "idx", "off", "value")
                                 else " t-dim")
        if text_width(name, 10) <= fw - 2:
            svg.text(fx + fw / 2, top - 4, name, cls=label_cls, anchor="middle")
        else:
            short = fit(name, name_h - 4, 10)
            cx = fx + fw / 2 + 3
            svg.text(cx, top - 3, short, cls=label_cls,
                     transform=f"rotate(-90 {cx:.1f} {top - 3:.1f})")
        # the field's high bit number under it (and bit 0 at the right end)
        svg.text(fx + cw / 2, top + cell_h + 10, str(hi), cls="t-small t-dim", anchor="middle")
        if lo == 0 and hi != lo:
            svg.text(fx + fw - cw / 2, top + cell_h + 10, "0", cls="t-small t-dim",
                     anchor="middle")
        # what a multi-bit field holds
        if hi != lo and kind in ("addr", "hiaddr", "idx", "off", "value"):
            shown = (values or {}).get(name)
            if shown is None:
                shown = str(field_value) if kind in ("idx", "value") else \
                    f"{field_value << lo:#x}" if kind == "addr" else \
                    f"{field_value << 32:#x}" if kind == "hiaddr" else f"{field_value:#x}"
            if text_width(shown, 10) <= fw + 6:
                svg.text(fx + fw / 2, top + cell_h + 22, shown, cls="t-small", anchor="middle")
    svg.rect(x, top, BAR_W, cell_h, cls="field")
    return top + cell_h + 26


def wrap(text: str, width: int) -> List[str]:
    """Words into lines of at most `width` characters."""
    lines, cur = [], ""
    for word in str(text).split():
        while len(word) > width:
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:width])
            word = word[width:]
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    return lines or [""]


def text_box(svg: Svg, x, y, w, lines: Sequence[str], cls="box", head: Optional[str] = None,
             head_cls="t-head", line_cls=None, title=None) -> float:
    """A box of lines (wrapped to its width); returns its bottom y."""
    per = max(8, int((w - 12) / (12 * 0.6)))
    body: List[str] = []
    for line in lines:
        body += wrap(line, per)
    h = 10 + (18 if head else 0) + 15 * len(body)
    svg.rect(x, y, w, h, cls=cls, rx=4, title=title)
    ty = y + 18
    if head:
        svg.text(x + 8, ty, fit(head, w - 12, 13), cls=head_cls)
        ty += 18
    for line in body:
        svg.text(x + 8, ty, line, cls=line_cls)
        ty += 15
    return y + h


def _fault_lines(fault, walk) -> List[str]:
    where = f" at {fault.level}" if fault.level else ""
    code = f" (#PF error code {fault.error_code:#x})" if fault.error_code is not None else ""
    out = [f"FAULT{where}: {fault.reason}{code}", fault.message]
    out += [f"note: {n}" for n in walk.notes]
    return out


def draw_walk(svg: Svg, y: float, walk, what: str = "GVA", title: str = "",
              slat: bool = False) -> Tuple[float, Optional[float]]:
    """The address split and every level of `walk` from y; returns (bottom y, the x centre of
    the last box) -- the walk ends with the page frame box, or with the fault."""
    mode = walk.mode
    kind = kind_of(mode)
    table_cls = "box-slat" if slat else "box-table"
    if title:
        svg.text(10, y + 16, title, cls="t-head")
        y += 26
    # the address split, as gpt_dump prints it
    nbits, fields = address_fields(walk, what)
    bad = 0
    if walk.fault is not None and walk.fault.reason == "non-canonical" and fields[0][3] == "sign":
        bad = ((1 << 64) - 1) ^ ((1 << (fields[0][1])) - 1)
    pcid = f", PCID {walk.pcid:#x}" if walk.pcid is not None else ""
    left = [f"{what} {walk.va:#x}",
            f"{mode.name} {'translation' if kind_of(mode) == 'aarch64' else 'paging'}, "
            f"{mode.va_bits} bits translated" if mode else "paging off",
            f"root {walk.root:#x}{pcid}"]
    text_box(svg, 10, y + 8, BOX_W, left, cls="box", head="the address, split")
    bottom = bit_bar(svg, BAR_X, y, walk.va, nbits, fields, bad_bits=bad)
    y = max(bottom, y + 8 + 10 + 18 + 15 * 3) + 26
    centre = 10 + BOX_W / 2
    entry_size = mode.entry_size if mode else 8
    prev_bottom = y - 26
    for i, step in enumerate(walk.levels):
        stopped = walk.fault is not None and i == len(walk.levels) - 1 and \
            walk.fault.level == step.name
        # arrow from the previous box (or the address) down into this table
        svg.line(centre, prev_bottom, centre, y + 2, cls="arrow-slat" if slat else "arrow",
                 arrow=True)
        if i == 0:
            svg.text(centre + 8, y - 2, f"root {step.table_addr:#x}", cls="t-small")
        lines = [f"index {step.index} -> entry at {step.entry_addr:#x}",
                 f"entry {step.entry:#0{entry_size * 2 + 2}x}",
                 "flags: " + (" ".join(step.flags) or "(none)")]
        if step.leaf:
            lines.append(f"leaf: a {size_name(step.page_size)} page at {step.next_addr:#x}")
        elif step.next_addr is not None:
            lines.append(f"next table at {step.next_addr:#x}")
        else:
            lines.append("not present")
        head = f"{step.name} ({step.linux_name.upper()}) table at {step.table_addr:#x}"
        box_bottom = text_box(svg, 10, y, BOX_W, lines,
                              cls="box-fault" if stopped else table_cls, head=head,
                              title=f"{step.name} entry {step.index} at {step.entry_addr:#x}: "
                                    f"{step.entry:#x}")
        bad_bits = 0
        if stopped and walk.fault.reason == "not-present":
            bad_bits = 7 if kind == "ept" else 1
        values = {"next table": _h(step.next_addr) if step.next_addr is not None else None,
                  "page frame": _h(step.next_addr) if step.leaf else None}
        bar_bottom = bit_bar(svg, BAR_X, y - 10, step.entry, entry_size * 8,
                             entry_fields(mode, i, step), bad_bits=bad_bits,
                             values={k: v for k, v in values.items() if v})
        svg.text(BAR_X, y - 12, f"{step.linux_name.upper()} entry [{step.index}] "
                 f"= {step.entry:#x}", cls="t-small t-dim")
        prev_bottom = box_bottom
        y = max(box_bottom, bar_bottom) + 26
    if walk.fault is not None:
        f = walk.fault
        svg.line(centre, prev_bottom, centre, y + 2, cls="arrow-bad", arrow=True)
        bottom = text_box(svg, 10, y, W - 20, _fault_lines(f, walk), cls="box-fault",
                          head=f"the walk stops here: {f.reason}" + (f" at {f.level}"
                                                                     if f.level else ""),
                          head_cls="t-head t-bad")
        return bottom + 12, None
    if walk.ok:
        svg.line(centre, prev_bottom, centre, y + 2, cls="arrow-slat" if slat else "arrow",
                 arrow=True)
        leaf = walk.levels[-1] if walk.levels else None
        frame = leaf.next_addr if leaf is not None else walk.pa
        size = walk.page_size or 0
        out = "host physical" if slat else "GPA"
        lines = [f"frame {_h(frame)} + offset {walk.va & (size - 1):#x} = {out} {walk.pa:#x}"
                 if size else f"{out} {walk.pa:#x}"]
        perms = []
        if walk.writable is not None:
            perms.append("writable" if walk.writable else "read-only")
        if walk.user is not None:
            perms.append("user" if walk.user else "supervisor-only")
        if walk.executable is not None:
            perms.append("executable" if walk.executable else "no-execute")
        if perms:
            lines.append("effective: " + ", ".join(perms))
        lines += [f"note: {n}" for n in walk.notes]
        bottom = text_box(svg, 10, y, W - 20, lines, cls="box-slat" if slat else "box-chain",
                          head=f"a {size_name(size)} page" if size else "the page")
        return bottom + 12, centre
    return y, centre


def draw_chain(svg: Svg, y: float, t) -> float:
    """GVA -> GPA -> HVA -> HPA, with page sizes and the 8 bytes at each step."""
    from ..render import page_sizes_line
    w = t.walk
    svg.text(10, y + 16, "the chain", cls="t-head")
    y += 26
    bw = 250
    gap = (W - 20 - 4 * bw) / 3
    xs = [10 + k * (bw + gap) for k in range(4)]
    value = value_text(t.value)
    gva = [f"{t.gva:#x}", f"vCPU {t.vcpu}, {root_register_name(t)} {t.cr3:#x}",
           f"{w.mode.name if w.mode else 'no'} paging, {size_name(w.page_size)} guest page",
           f"8 bytes: {value}"]
    if t.ram is not None:
        block = f"RAM block {t.ram.block} +{t.ram.block_offset + (w.pa - t.ram.start):#x}"
    else:
        block = t.gpa_note or "no RAM block"
    gpa = [f"{w.pa:#x}", block, f"8 bytes: {value}", bytes_text(t.value)]
    if t.hva is not None:
        hva = [f"{t.hva:#x}", f"in QEMU pid {t.qemu_pid}" if t.qemu_pid else "in QEMU",
               f"8 bytes: {value_text(t.value_at_hva)}"
               + ("" if t.value_at_hva is None else
                  " (same)" if t.value_at_hva == t.value else " (DIFFERENT)")]
    else:
        hva = ["-", t.gpa_note or "no host address"]
    if t.host is not None and t.host.status == "present":
        kind = {"thp": " (transparent huge page)", "hugetlb": " (hugetlbfs)"}.get(
            t.host.page_kind, "")
        hpa = [f"{t.host.hpa:#x}", f"host page {size_name(t.host.page_size)}{kind}",
               "the HVA's page in host RAM (pagemap)"]
    elif t.host is not None:
        hpa = ["-", f"{t.host.status}: {t.host.detail}"]
    else:
        hpa = ["-", t.gpa_note or "not looked up"]
    boxes = [("GVA", gva), ("GPA", gpa), ("HVA", hva), ("HPA", hpa)]
    labels = [("guest page", "tables"), ("QEMU RAM", "block"), ("host page", "tables")]
    bottoms = []
    for k, (head, lines) in enumerate(boxes):
        bottoms.append(text_box(svg, xs[k], y, bw, lines, cls="box-chain", head=head))
    mid = y + 30
    for k in range(3):
        svg.line(xs[k] + bw, mid, xs[k + 1] - 2, mid, arrow=True)
        svg.text(xs[k] + bw + gap / 2, mid - 18, labels[k][0], cls="t-small", anchor="middle")
        svg.text(xs[k] + bw + gap / 2, mid - 6, labels[k][1], cls="t-small", anchor="middle")
    y = max(bottoms) + 10
    if t.slat is not None:
        s = t.slat
        name = (s.spec.format or "second-level").upper()
        if s.out is not None:
            verdict = {True: "agrees with the pagemap path", False: "DISAGREES with the "
                       "pagemap path", None: "(no pagemap answer to compare)"}[s.agrees]
            label = (f"{name} walk (root {_h(s.spec.root)}): GPA {w.pa:#x} -> {s.out:#x} in a "
                     f"{size_name(s.walk.page_size)} page: {verdict}")
        else:
            label = f"{name}: {s.note or 'no walk'}"
        x1, x2 = xs[1] + bw / 2, xs[3] + bw / 2
        svg.path(f"M{x1:.0f},{y - 10} C{x1:.0f},{y + 30} {x2:.0f},{y + 30} {x2:.0f},{y - 8}",
                 cls="arrow-slat" if s.agrees is not False else "arrow-bad", arrow=True)
        svg.text((x1 + x2) / 2, y + 40, label, cls="t-small t-bad" if s.agrees is False
                 else "t-small", anchor="middle")
        y += 52
    svg.text(10, y + 12, page_sizes_line(t), cls="t-small")
    y += 20
    notes = ([t.value_note] if t.value_note else [])
    for n in notes:
        for line in wrap(f"note: {n}", 160):
            svg.text(10, y + 12, line, cls="t-small t-dim")
            y += 15
    return y + 6


def _estimate_height(t) -> float:
    n = len(t.walk.levels) + 2
    if t.slat is not None and t.slat.walk is not None:
        n += len(t.slat.walk.levels) + 3
    return 200 + n * LEVEL_H + 400


def root_register_name(t) -> str:
    """CR3, satp, or the TTBR of the aarch64 range the address lies in."""
    if kind_of(t.walk.mode) == "riscv":
        return "satp"
    if kind_of(t.walk.mode) != "aarch64":
        return "CR3"
    return "TTBR1_EL1" if t.gva >> 55 & 1 else "TTBR0_EL1"


def translation_svg(t, title: Optional[str] = None) -> Svg:
    """The figure of one Translation (commands.translate.Translation)."""
    w = t.walk
    svg = Svg(W, _estimate_height(t), title=title or f"GVA {t.gva:#x}",
              label=f"translation {t.gva:#x}")
    mode = w.mode.name if w.mode else "no"
    assumed = " (assumed)" if w.assumed_maxphyaddr else ""
    svg.text(10, 22, f"GVA {t.gva:#x}", cls="t-title")
    if kind_of(w.mode) == "aarch64":
        line = (f"vCPU {t.vcpu}, {root_register_name(t)} {t.cr3:#x} ({t.cr3_source}), {mode} "
                f"translation, {w.maxphyaddr}-bit output addresses{assumed}")
    elif kind_of(w.mode) == "riscv":
        line = f"vCPU {t.vcpu}, satp {t.cr3:#x} ({t.cr3_source}), {mode.capitalize()} translation"
    else:
        line = (f"vCPU {t.vcpu}, CR3 {t.cr3:#x} ({t.cr3_source}), {mode} paging, "
                f"MAXPHYADDR {w.maxphyaddr}{assumed}")
    svg.text(10, 40, line, cls="t-small")
    y, _ = draw_walk(svg, 50, w, "GVA", title="guest page walk (as gpt_dump prints it)")
    if w.ok:
        if t.slat is not None:
            y = draw_slat(svg, y, t.slat, w.pa)
        y = draw_chain(svg, y, t)
    svg.height = y + 10
    return svg


def draw_slat(svg: Svg, y: float, s, gpa: int) -> float:
    name = (s.spec.format or "second-level").upper()
    if s.walk is None:
        return text_box(svg, 10, y, W - 20, [s.note or s.how.get("note", "") or "not found"],
                        cls="box-slat", head=f"{name}: the hypervisor's second-level table "
                                             + ("was not chosen (roots tie)"
                                                if (s.how or {}).get("ambiguous")
                                                else "was not found")) + 14
    how = s.how or {}
    from ...slat import found_how
    found = found_how(how)
    y, _ = draw_walk(svg, y, s.walk, "GPA", slat=True,
                     title=f"{name} walk of GPA {s.walk.va:#x} (the hypervisor's second-level "
                           f"table, root {_h(s.spec.root)}{found}; as ept_dump prints it)")
    if s.note:
        y = text_box(svg, 10, y, W - 20, [s.note], cls="box-note") + 12
    return y


def nested_svg(r) -> Svg:
    """A nested translation (nested.NestedTranslation): one column per hop, innermost left,
    side by side, each column the hop's own figure; arrows say how one hop's HVA is the next
    hop's virtual address."""
    cols: List[Svg] = []
    for k, hop in enumerate(r.hops):
        t = hop.translation
        if t is None:
            col = Svg(W, 100, label=f"hop {hop.level}")
            bottom = text_box(col, 10, 10, W - 20, [hop.note or "not reached"],
                              cls="box-fault", head=f"{hop.level}: not reached",
                              head_cls="t-head t-bad")
            col.height = bottom + 10
        else:
            col = translation_svg(t, title=f"{hop.level}")
            extra = [f"{hop.level}: root by {hop.root_how}"] if hop.root_how else []
            if hop.note:
                extra.append(f"note: {hop.note}")
            if extra:
                y = col.height
                col.height = text_box(col, 10, y, W - 20, extra, cls="box-note") + 10
        cols.append(col)
    gap = 80
    head = 70
    width = len(cols) * W + (len(cols) - 1) * gap
    height = head + max(c.height for c in cols)
    svg = Svg(width, height, title=f"GVA {r.gva:#x} through {len(r.hops)} level(s)",
              label=f"nested {r.gva:#x}")
    svg.text(10, 24, f"GVA {r.gva:#x} through {len(r.hops)} level(s), innermost left",
             cls="t-title")
    for k, (hop, col) in enumerate(zip(r.hops, cols)):
        x = k * (W + gap)
        svg.text(x + 10, 54, f"{hop.level}" + (" (innermost)" if k == 0 else ""),
                 cls="t-head")
        svg.embed(col, x, head)
        if k + 1 < len(cols):
            t = hop.translation
            svg.line(x + W - 10, 48, x + W + gap + 10, 48, arrow=True)
            label = f"HVA {t.hva:#x}" if t is not None and t.hva is not None else "HVA"
            svg.text(x + W + gap / 2, 40, label, cls="t-small", anchor="middle")
            svg.text(x + W + gap / 2, 64, f"= VA in {r.hops[k + 1].level}", cls="t-small",
                     anchor="middle")
    return svg
