"""Views of translation results: a human text view (each level as the in-guest modules print
it, plus the whole chain in one table) and JSON lines. Views only read the values; nothing
here recomputes a translation."""

import json
from typing import Iterable, List, Optional

SIZE_NAMES = {4096: "4 KiB", 2 << 20: "2 MiB", 4 << 20: "4 MiB", 1 << 30: "1 GiB"}


def size_name(size: Optional[int]) -> str:
    if size is None:
        return "?"
    return SIZE_NAMES.get(size, f"{size:#x} bytes")


def json_line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


def binary_split(entry: int, entry_size: int) -> str:
    """An entry the way the seed's gpt_dump prints it: high bits, address bits, low flag bits."""
    if entry_size == 8:
        bits = f"{entry:064b}"
        return f"{bits[:12]} {bits[12:52]} {bits[52:]}"
    bits = f"{entry:032b}"
    return f"{bits[:20]} {bits[20:]}"


def index_lines(walk) -> List[str]:
    """The GVA split into its level indexes and offset, in binary, as gpt_dump shows it."""
    mode = walk.mode
    if mode is None:
        return []
    heads, bins, decs = [], [], []
    for spec in mode.levels:
        index = (walk.va >> spec.shift) & ((1 << spec.index_bits) - 1)
        width = max(spec.index_bits, len(spec.name) + 6)
        heads.append(f"[{spec.name} IDX]".center(width))
        bins.append(f"{index:0{spec.index_bits}b}".center(width))
        decs.append(str(index).center(width))
    low = mode.levels[-1].shift
    offset = walk.va & ((1 << low) - 1)
    heads.append("[ Offset ]".center(max(low, 12)))
    bins.append(f"{offset:0{low}b}".center(max(low, 12)))
    decs.append(f"{offset:#x}".center(max(low, 12)))
    return ["  " + " ".join(decs), "  " + " ".join(heads), "  " + " ".join(bins)]


def access_lines(access) -> List[str]:
    """What each kind of access would do, as a CPU would: a grid, then the reasons."""
    if not access:
        return []
    reasons: List[str] = []

    def cell(result):
        if result.allowed:
            return "ok"
        if result.reason not in reasons:
            reasons.append(result.reason)
        mark = f"[{reasons.index(result.reason) + 1}]"
        if result.error_code is None:
            return f"denied {mark}"
        return f"#PF {result.error_code:#x} {mark}"

    lines = [f"  {'access':<12}{'read':<16}{'write':<16}execute"]
    rows = [("supervisor", "supervisor-"), ("user", "user-")] \
        if "user-read" in access else [("guest", "")]
    for label, prefix in rows:
        cells = [cell(access[prefix + k]) if prefix + k in access else "-"
                 for k in ("read", "write", "execute")]
        lines.append(f"  {label:<12}{cells[0]:<16}{cells[1]:<16}{cells[2]}")
    lines += [f"    [{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return lines


def translation_text(t, show_bits: bool = True) -> str:
    w = t.walk
    out = []
    mode = w.mode.name if w.mode else "no paging"
    pcid = f" PCID {w.pcid:#x}" if w.pcid is not None else ""
    maxphy = f"MAXPHYADDR {w.maxphyaddr}" + (" (assumed)" if w.assumed_maxphyaddr else "")
    out.append(f"GVA {t.gva:#018x}   vCPU {t.vcpu}, CR3 {t.cr3:#x} ({t.cr3_source}){pcid}, "
               f"{mode} paging, {maxphy}")
    out.extend(index_lines(w))
    if w.levels:
        out.append("")
        out.append(f"  {'level':<6}{'idx':>5}  {'entry address':<20}{'entry':<20}"
                   f"{'next':<28}flags")
        entry_size = w.mode.entry_size if w.mode else 8
        for s in w.levels:
            nxt = "-" if s.next_addr is None else f"{s.next_addr:#x}"
            if s.leaf:
                nxt += f" ({size_name(s.page_size)} page)"
            out.append(f"  {s.name:<6}{s.index:>5}  {s.entry_addr:<#20x}{s.entry:<#20x}"
                       f"{nxt:<28}{' '.join(s.flags)}")
            if show_bits:
                out.append(f"  {'':<11}{s.linux_name.upper():<5}{binary_split(s.entry, entry_size)}")
    out.append("")
    if not w.ok:
        f = w.fault
        where = f" at {f.level}" if f and f.level else ""
        code = f" (#PF error code {f.error_code:#x})" if f and f.error_code is not None else ""
        out.append(f"  FAULT{where}: {f.reason if f else 'unknown'}{code}")
        if f and f.message:
            out.append(f"  {f.message}")
        return "\n".join(out)
    perms = ", ".join([("writable" if w.writable else "read-only"),
                       ("user" if w.user else "supervisor-only"),
                       ("executable" if w.executable else "no-execute")])
    out.append(f"  => GPA {w.pa:#x} in a {size_name(w.page_size)} page; {perms}")
    out.extend(access_lines(w.access))
    out.append("")
    out.append("  chain")
    out.append(f"    GVA  {t.gva:#018x}")
    block = (f"RAM block {t.ram.block} +{t.ram.block_offset + (w.pa - t.ram.start):#x}"
             if t.ram else t.gpa_note)
    out.append(f"    GPA  {w.pa:#018x}   {block}")
    if t.hva is not None:
        pid = f"QEMU pid {t.qemu_pid}" if t.qemu_pid else ""
        out.append(f"    HVA  {t.hva:#018x}   {pid}")
    if t.host is not None:
        if t.host.status == "present":
            kind = {"thp": " (transparent huge page)", "hugetlb": " (hugetlbfs)"}.get(
                t.host.page_kind, "")
            out.append(f"    HPA  {t.host.hpa:#018x}   host page {size_name(t.host.page_size)}"
                       f"{kind}")
        else:
            out.append(f"    HPA  {'-':<18}   {t.host.status}: {t.host.detail}")
    elif t.hva is not None and t.gpa_note:
        out.append(f"    HPA  {'-':<18}   {t.gpa_note}")
    if t.value is not None:
        v = int.from_bytes(t.value, "little")
        line = f"    value {v:#018x} ({len(t.value)} bytes, little-endian) at GVA/GPA"
        if t.value_at_hva is not None:
            same = "the same bytes" if t.value_at_hva == t.value else "DIFFERENT bytes"
            line += f"; {int.from_bytes(t.value_at_hva, 'little'):#018x} at HVA: {same}"
        out.append(line)
    if t.value_note:
        out.append(f"    note: {t.value_note}")
    return "\n".join(out)


def translations_text(translations: Iterable, show_bits: bool = True) -> str:
    return "\n\n".join(translation_text(t, show_bits) for t in translations)


def hexdump_piece(piece) -> str:
    """xxd-like lines for one piece of a read; a marker line where there are no bytes."""
    where = f" (GPA {piece.gpa:#x})" if piece.gpa is not None else ""
    if piece.data is None:
        return f"{piece.address:016x}: -- {piece.length} bytes not read: {piece.note} --"
    lines = []
    for off in range(0, len(piece.data), 16):
        chunk = piece.data[off:off + 16]
        hexes = " ".join(chunk[i:i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        suffix = where if off == 0 else ""
        lines.append(f"{piece.address + off:016x}: {hexes:<39}  {text}{suffix}")
    return "\n".join(lines)
