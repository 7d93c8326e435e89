"""Views of translation results: a human text view (each level as the in-guest modules print
it, plus the whole chain in one table) and JSON lines. Views only read the values; nothing
here recomputes a translation."""

import json
from typing import List

from ..paging.formats import size_name


def json_line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


def binary_split(entry: int, entry_size: int) -> str:
    """An entry the way the seed's gpt_dump prints it: high bits, address bits, low flag bits."""
    if entry_size == 8:
        bits = f"{entry:064b}"
        return f"{bits[:12]} {bits[12:52]} {bits[52:]}"
    bits = f"{entry:032b}"
    return f"{bits[:20]} {bits[20:]}"


def is_arm64(walk) -> bool:
    return walk.mode is not None and walk.mode.name.startswith("aarch64")


def is_riscv(walk) -> bool:
    return walk.mode is not None and walk.mode.name.startswith("sv")


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
    arm = "el1-read" in access
    riscv = "s-read" in access

    def cell(result):
        if result.allowed:
            if not result.unknown:
                return "ok"
            if result.unknown not in reasons:   # allowed by the paging bits; a key may deny
                reasons.append(result.unknown)
            return f"ok? [{reasons.index(result.unknown) + 1}]"
        if result.reason not in reasons:
            reasons.append(result.reason)
        mark = f"[{reasons.index(result.reason) + 1}]"
        if result.error_code is None:
            return f"denied {mark}"
        if arm:                                # the fault status code an ESR would carry
            return f"FSC {result.error_code:#04x} {mark}"
        if riscv:                              # the exception code scause would carry
            return f"cause {result.error_code} {mark}"
        return f"#PF {result.error_code:#x} {mark}"

    lines = [f"  {'access':<12}{'read':<16}{'write':<16}execute"]
    kinds = ("read", "write", "execute")
    if "user-read" in access:
        rows = [("supervisor", [f"supervisor-{k}" for k in kinds]),
                ("user", [f"user-{k}" for k in kinds])]
    elif "el0-read" in access:
        rows = [("EL1", [f"el1-{k}" for k in kinds]), ("EL0", [f"el0-{k}" for k in kinds])]
    elif "execute-el1" in access:       # aarch64 stage 2: one data right, execution per EL
        rows = [("EL1", ["read", "write", "execute-el1"]),
                ("EL0", ["read", "write", "execute-el0"])]
    elif riscv:
        rows = [("S-mode", [f"s-{k}" for k in kinds]), ("U-mode", [f"u-{k}" for k in kinds])]
    else:
        rows = [("guest", list(kinds))]
    for label, names in rows:
        cells = [cell(access[k]) if k in access else "-" for k in names]
        lines.append(f"  {label:<12}{cells[0]:<16}{cells[1]:<16}{cells[2]}")
    lines += [f"    [{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return lines


def explain_indexes(gva: int, gpa: int, page_size: int):
    """Why the GVA and GPA share index bits, when that is more than the page offset: a kernel
    direct-map alias (1 GiB-aligned difference) or a large page."""
    if (gva - gpa) % (1 << 30) and page_size <= 4096:
        return None
    from ..modlog import explain_direct_map
    return explain_direct_map(gva, gpa)


def translation_text(t, show_bits: bool = True) -> str:
    w = t.walk
    out = []
    mode = w.mode.name if w.mode else "no paging"
    pcid = f" PCID {w.pcid:#x}" if w.pcid is not None else ""
    assumed = " (assumed)" if w.assumed_maxphyaddr else ""
    if is_arm64(w) or t.root_name.startswith("TTBR"):
        if w.mode:
            out.append(f"GVA {t.gva:#018x}   vCPU {t.vcpu}, {t.root_name} {t.cr3:#x} "
                       f"({t.cr3_source}), {mode} translation, {w.maxphyaddr}-bit output "
                       f"addresses{assumed}")
        else:       # no TTBR is read: the register's value says nothing (it is often junk)
            out.append(f"GVA {t.gva:#018x}   vCPU {t.vcpu} ({t.cr3_source}), stage 1 off")
    elif is_riscv(w):
        out.append(f"GVA {t.gva:#018x}   vCPU {t.vcpu}, satp {t.cr3:#x} ({t.cr3_source}), "
                   f"{mode.capitalize()} translation")
    else:
        out.append(f"GVA {t.gva:#018x}   vCPU {t.vcpu}, CR3 {t.cr3:#x} ({t.cr3_source})"
                   f"{pcid}, {mode} paging, MAXPHYADDR {w.maxphyaddr}{assumed}")
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
    s2 = t.stage2
    if s2 is not None and s2.stage1_off:
        out.append(f"  stage 1 off (SCTLR_EL1.M=0): the IPA is the VA, {s2.ipa:#x}")
    elif not w.ok:
        f = w.fault
        where = f" at {f.level}" if f and f.level else ""
        code = "" if not f or f.error_code is None else \
            f" (FSC {f.error_code:#04x} for an EL1 read)" if is_arm64(w) else \
            f" (scause {f.error_code} for an S-mode load)" if is_riscv(w) else \
            f" (#PF error code {f.error_code:#x})"
        out.append(f"  FAULT{where}: {f.reason if f else 'unknown'}{code}")
        if f and f.message:
            out.append(f"  {f.message}")
        return "\n".join(out)
    else:
        perms = ", ".join([("writable" if w.writable else "read-only"),
                           ("user" if w.user else "EL1-only" if is_arm64(w) else
                            "S-mode only" if is_riscv(w) else "supervisor-only"),
                           ("executable" if w.executable else "no-execute")])
        out.append(f"  => {'IPA' if s2 else 'GPA'} {w.pa:#x} in a {size_name(w.page_size)} "
                   f"page; {perms}")
        out.extend(access_lines(w.access))
        # (x86-64 Linux's direct map and index names: not said of aarch64 or riscv64 tables)
        why = None if is_arm64(w) or is_riscv(w) else explain_indexes(t.gva, w.pa,
                                                                      w.page_size)
        if why:
            out.append(f"  why: {why}")
    if s2 is not None:
        out.append("")
        out.extend(stage2_lines(s2, show_bits))
        if not s2.walk.ok:
            return "\n".join(out)
    gpa = t.gpa
    out.append("")
    out.append("  chain")
    out.append(f"    GVA  {t.gva:#018x}")
    if s2 is not None:
        out.append(f"    IPA  {s2.ipa:#018x}   the guest's physical address (stage 1's output)")
    block = (f"RAM block {t.ram.block} +{t.ram.block_offset + (gpa - t.ram.start):#x}"
             if t.ram else t.gpa_note)
    out.append(f"    {'PA ' if s2 else 'GPA'}  {gpa:#018x}   {block}")
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
    if t.slat is not None:
        out.append("")
        out.extend(slat_lines(t.slat, show_bits))
    out.append("")
    out.append("  " + page_sizes_line(t))
    for note in w.notes:
        out.append(f"  note: {note}")
    return "\n".join(out)


def stage2_lines(s2, show_bits: bool = True) -> List[str]:
    """The vCPU's own stage 2 (commands.translate.Stage2Step): the registers, each level's
    descriptor with its fields, and where the IPA ends (or the fault EL2 would take)."""
    from ..paging.arm64_stage2 import descriptor_words
    d = s2.regs.to_dict()
    v = d["vtcr"]
    roots = f" ({v['root_tables']} concatenated tables)" if v.get("root_tables", 1) > 1 else ""
    out = [f"  stage 2 (the hypervisor's table for its guest): VTTBR_EL2 {s2.regs.vttbr:#x} "
           f"(root {d['root']}, VMID {d['vmid']})",
           f"    VTCR_EL2 {s2.regs.vtcr:#x}: {v['ia_bits']}-bit IPA, {v['granule']} granule, "
           f"start level {v['start_level']}{roots}"]
    if s2.regs.source:               # not the vCPU's own VTTBR_EL2 (--kvm-vcpu)
        from .textsafe import printable      # (a process name from guest memory is in it)
        first, *more = printable(s2.regs.source).split("; ")
        out.append(f"    from {first}")
        out.extend(f"      {part}" for part in more)
    w = s2.walk
    for st in w.levels:
        nxt = "-" if st.next_addr is None else f"{st.next_addr:#x}"
        if st.leaf:
            nxt += f" ({size_name(st.page_size)} {'page' if st.page_size <= 65536 else 'block'})"
        out.append(f"    {st.index:>4}: {st.name:<4} entry {st.entry:#018x} at "
                   f"{st.entry_addr:#x}  -> {nxt}  {' '.join(st.flags)}".rstrip())
        if show_bits:
            out.append(f"          {binary_split(st.entry, 8)}")
            out.append(f"          {descriptor_words(st.entry, st.leaf)}")
    if w.ok:
        out.append(f"    => PA {w.pa:#x} in a {size_name(w.page_size)} stage 2 "
                   f"{'page' if w.page_size <= 65536 else 'block'}")
        out.extend("  " + line for line in access_lines(w.access))
    else:
        f = w.fault
        code = "" if f.error_code is None else f" (FSC {f.error_code:#04x})"
        out.append(f"    => stage 2 {f.reason} fault at {f.level}{code}: EL2 would take it")
        if f.message:
            out.append(f"    {f.message}")
    out.extend(f"    note: {n}" for n in w.notes)
    return out


def page_sizes_line(t) -> str:
    """The page size on every layer, one line: guest tables, second-level table, host."""
    parts = [f"guest {size_name(t.walk.page_size)}" if t.walk.ok else "guest -"]
    if t.stage2 is not None:
        w = t.stage2.walk
        parts.append(f"stage 2 {size_name(w.page_size) if w.ok else '-'}")
    if t.slat is not None:
        kind = (t.slat.spec.format or "second-level").upper()
        w = t.slat.walk
        parts.append(f"{kind} {size_name(w.page_size) if w is not None and w.ok else '-'}")
    if t.host is not None and t.host.status == "present":
        kind = {"thp": " (THP)", "hugetlb": " (hugetlbfs)"}.get(t.host.page_kind, "")
        parts.append(f"host {size_name(t.host.page_size)}{kind}")
    else:
        parts.append("host -")
    return "page sizes: " + " / ".join(parts)


def slat_lines(r, show_bits: bool = True) -> List[str]:
    """A second-level walk laid out as the seed's ept_dump prints one: the GPA split into its
    indexes, each level's entry (12/40/12 bits) and the next table, the entry's fields in
    words (with KVM's own bits), the huge-page block where the leaf is large, the host
    address; then whether it agrees with the pagemap path."""
    from ..slat import entry_fields, found_how
    how = r.how or {}
    if r.spec.root is None:
        what = "not chosen" if how.get("ambiguous") else "not found"
        return [f"  second-level table: {what} ({r.note or how.get('note', '')})"]
    kind = r.spec.format.upper()
    eptp = f", EPTP {r.spec.eptp:#x}" if r.spec.eptp is not None else ""
    out = [f"  {kind} (the hypervisor's second-level table), root {r.spec.root:#x}, "
           f"{r.spec.depth} levels{eptp}{found_how(how)}"]
    w = r.walk
    out.extend("  " + line for line in index_lines(w))
    marker = r.marker
    for k, s in enumerate(w.levels):
        nxt = "-" if s.next_addr is None else f"{s.next_addr:#x}"
        if s.leaf:
            nxt += f" ({size_name(s.page_size)} leaf)"
        flags = " ".join(s.flags)
        fields = entry_fields(r.spec.format, s.entry, s.leaf)
        if marker and k == len(w.levels) - 1:       # its bits are KVM's, not the CPU's flags
            nxt, flags = "none: KVM's MMIO marker", ""
            fields = (f"KVM's MMIO marker, not flags: {marker['why']}; GPA {marker['gpa']} "
                      f"kept in bits {marker['bits']}; the other bits: the access KVM allows "
                      "and its memslot generation")
        out.append(f"    {s.index:>3}: {s.name:<5} entry {s.entry:#018x} at {s.entry_addr:#x}"
                   f"  -> {nxt}  {flags}".rstrip())
        if show_bits:
            out.append(f"         {binary_split(s.entry, 8)}")
            out.append(f"         {fields}")
    if w.ok and w.page_size > 4096 and show_bits:
        out.extend("    " + line for line in huge_page_block(w.levels[-1], w.va, w.pa,
                                                           w.page_size))
    if w.ok:
        verdict = {True: "agrees with the pagemap path", None: "(no pagemap answer to compare)",
                   False: "DISAGREES with the pagemap path"}[r.agrees]
        out.append(f"    => host {w.pa:#x} in a {size_name(w.page_size)} {kind} page: {verdict}")
    else:
        out.append(f"    => {w.fault.reason} at {w.fault.level}"
                   + (": KVM's MMIO marker, not a mapping" if marker else ""))
    if r.note:
        out.append(f"    note: {r.note}")
    return out


def huge_page_block(leaf, address: int, pa: int, size: int) -> List[str]:
    """The huge-page block the seed's ept_dump (and our modules) print for a 2 MiB / 1 GiB
    leaf: the entry, the frame mask and the frame; the address, the offset mask and the
    offset; the host address they make."""
    level = {1 << 21: 2, 1 << 30: 3}.get(size, 0)
    mask2 = size - 1
    mask1 = ((1 << 52) - 1) & ~mask2 & ~0xFFF
    rows = [(leaf.name, leaf.entry), ("Mask1", mask1), ("HFN", leaf.entry & mask1), None,
            ("GPA", address), ("Mask2", mask2), ("Offset", address & mask2), None]
    out = [f"Huge Page ({size_name(size).replace(' MiB', 'M').replace(' GiB', 'G')}) at "
           f"level {level} detected!",
           "[e.g]   [Rsvd./Ign.] [  Huge Page Number, 31 Bits  ][Ignored] [ ]"]
    for row in rows:
        out.append("-" * 65 if row is None else f" {row[0]:<6} {binary_split(row[1], 8)}")
    out.append(f"HPA    {binary_split(pa, 8)}")
    return out


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


def _masked(value, mask, full=(1 << 64) - 1) -> str:
    if value is None:
        return "-"
    text = f"{value:#x}"
    return text if mask & full == full or not mask else text + "*"


def modlog_text(path: str, log, findings) -> str:
    """A parsed module log: the walk it printed, then what it implies about itself."""
    kind = log.kind
    fmt, module = getattr(log, "format", None), getattr(log, "module", None)
    if fmt or module:   # our slat_dump names its table's format (NPT or EPT)
        kind += " (" + ", ".join(x for x in (fmt.upper() if fmt else None, module) if x) + ")"
    out = [f"{path}: {kind} log, {log.address_name} {_masked(log.address, log.address_bits_known)}"
           + (f", root {log.root:#x}" if log.root is not None else "")
           + f", {log.paging_levels}-level" + (f", pid {log.pid}" if log.pid else "")]
    out.append(f"  {'level':<6}{'index':>6}  {'entry':<22}{'next':<22}")
    for lvl in log.levels:
        idx = "-" if lvl.index is None else str(lvl.index)
        size = f" ({size_name(lvl.page_size)} page)" if lvl.page_size else ""
        state = " not present" if lvl.present is False else ""
        out.append(f"  {lvl.name:<6}{idx:>6}  {_masked(lvl.entry, lvl.entry_known_mask):<22}"
                   f"{_masked(lvl.next_addr, lvl.next_known_mask):<22}{size}{state}")
    out.append(f"  => {log.final_name} {_masked(log.final_address, log.final_known_mask)}"
               + (f"   value {log.value:#x} ({log.value})" if log.value is not None else ""))
    out.append("  (* = some bits were not printed in the log)")
    out.append("  checks (what the log's own numbers imply):")
    for f in findings:
        mark = {True: "agree ", False: "DIFFER", None: "  ?   "}[f.agree]
        out.append(f"    {mark} {f.message}")
    for w in log.warnings:
        out.append(f"  note: {w}")
    return "\n".join(out)


def chain_text(c) -> str:
    out = ["chained: the guest log's GVA -> GPA, the host log's GPA -> HPA",
           f"  GVA {_masked(c.gva, c.gva_known_mask)}",
           f"  GPA {_masked(c.guest_gpa, c.guest_gpa_known_mask)} (guest log), "
           f"{_masked(c.host_gpa, c.host_gpa_known_mask)} (host log): "
           + {True: "agree", False: "DIFFER", None: "nothing to compare"}[c.gpa_agree],
           f"  HPA {_masked(c.hpa, c.hpa_known_mask)} printed, "
           f"{_masked(c.hpa_recomputed, c.hpa_recomputed_mask)} recomputed"]
    if c.guest_value is not None or c.host_value is not None:
        out.append(f"  value {c.guest_value} (guest) / {c.host_value} (host): "
                   + {True: "same", False: "DIFFERENT", None: "-"}[c.value_agree])
    out += [f"  note: {n}" for n in c.notes]
    return "\n".join(out)


def comparison_text(log, cmp, outside: dict, explain) -> str:
    """The log and the live outside view side by side, row by row."""
    how = outside.get("root_found_by")
    head = (f"{log.kind} log for {log.address_name} {log.address:#x} against the outside view"
            + (f" (root {outside.get('root')}, {how})" if how else ""))
    out = [head, f"  {'field':<10}{'level':<6}{'log':<22}{'outside':<22}verdict"]
    for r in cmp.rows:
        plain = r.field in ("index", "page_size")
        fmt = (lambda v: "-" if v is None else str(v)) if plain else \
            (lambda v: "-" if v is None else f"{v:#x}")
        verdict = {True: "agree", False: "DIFFER", None: "-"}[r.agree]
        line = f"  {r.field:<10}{r.level or '':<6}{fmt(r.log):<22}{fmt(r.outside):<22}{verdict}"
        if r.reason:
            line += f"  ({r.reason})"
        out.append(line)
    out.append("  => " + ("the outside view agrees with the log at every level"
                          if cmp.agree else f"{len(cmp.differences())} difference(s)"))
    if explain:
        out.append("  why: " + explain)
    return "\n".join(out)


def nested_text(r, verbose: bool = False) -> str:
    """Every address of a nested chain in one table, with the value read at each level."""
    out = [f"GVA {r.gva:#018x} through {len(r.hops)} level(s)"]
    out.append(f"  {'level':<6}{'address':<22}{'kind':<6}{'value':<20}how")
    for i, hop in enumerate(r.hops):
        t = hop.translation
        if t is None:
            out.append(f"  {hop.level:<6}{'-':<22}{'':<6}{'':<20}{hop.note}")
            continue
        kind = "GVA" if i == 0 else "VA"
        what = (f"{t.walk.mode.name if t.walk.mode else 'no'} paging, root {t.walk.root:#x} "
                f"({hop.root_how})")
        if verbose:
            what += f" [{hop.seconds * 1000:.0f} ms]"
        out.append(f"  {hop.level:<6}{t.gva:<#22x}{kind:<6}{'':<20}{what}")
        if not t.ok:
            f = t.walk.fault
            out.append(f"  {'':<6}{'-':<22}{'GPA':<6}{'':<20}FAULT at {f.level}: {f.reason}")
            break
        value = f"{int.from_bytes(t.value, 'little'):#018x}" if t.value else "-"
        block = f"{size_name(t.walk.page_size)} page, RAM block {t.ram.block}" if t.ram \
            else t.gpa_note
        out.append(f"  {'':<6}{t.gpa:<#22x}{'GPA':<6}{value:<20}{block}")
        if t.slat is not None:
            sl = t.slat
            kind = (sl.spec.format or "SLAT").upper()
            if sl.out is not None:
                verdict = (f"gives {sl.out:#x} ({size_name(sl.walk.page_size)} leaf, root "
                           f"{sl.spec.root:#x})" + {True: ", agrees", False: ", DISAGREES",
                                                     None: ""}[sl.agrees])
            else:
                verdict = sl.note
            out.append(f"  {'':<6}{'':<22}{kind:<6}{'':<20}{verdict}")
        if i + 1 == len(r.hops):
            if t.hva is not None:
                hva_value = f"{int.from_bytes(t.value_at_hva, 'little'):#018x}" \
                    if t.value_at_hva else "-"
                out.append(f"  {'L0':<6}{t.hva:<#22x}{'HVA':<6}{hva_value:<20}"
                           f"in {hop.level}'s QEMU, pid {t.qemu_pid}")
            if t.host is not None and t.host.status == "present":
                out.append(f"  {'':<6}{t.host.hpa:<#22x}{'HPA':<6}{'':<20}host page "
                           f"{size_name(t.host.page_size)}")
            elif t.host is not None:
                out.append(f"  {'':<6}{'-':<22}{'HPA':<6}{'':<20}{t.host.detail}")
            elif t.gpa_note:
                out.append(f"  {'':<6}{'-':<22}{'HPA':<6}{'':<20}{t.gpa_note}")
        if hop.note:
            out.append(f"  {'':<6}note: {hop.note}")
    return "\n".join(out)
