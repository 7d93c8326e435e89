"""The chain as a mermaid flowchart, as the seed lab report draws it
(``A["GVA<br>..."]-->|"Guest page tables"|B["GPA<br>..."]``), with the values: for Markdown
reports. Several addresses make one flowchart, one row of nodes per address.

Labels are quoted. The characters that could end a label or be read as markup or as an entity
(" < > # & | ` \\ and control characters) are replaced by look-alikes (U+201D, U+2039 ...):
mermaid's own entity codes (#60;) are not decoded by every renderer (mermaid 11 shows them raw),
and nothing from the VM may close a label or inject markup. Hex values never need it.
"""

import re
from typing import List

from ...paging.formats import size_name

_LOOK_ALIKE = {'"': "\u201d", "<": "\u2039", ">": "\u203a", "#": "\u266f", "&": "\u214b",
               "|": "\u00a6", "`": "\u02cb", "\\": "\u2216"}
_UNSAFE = re.compile(r'["<>#&|`\\]|[^\x20-\x7e\u00a0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]')


def label(*lines) -> str:
    """A quoted mermaid label: each line made safe, joined with <br>."""
    def one(text) -> str:
        return _UNSAFE.sub(lambda m: _LOOK_ALIKE.get(m.group(0), "\ufffd"), str(text))
    return '"' + "<br>".join(one(line) for line in lines if line is not None) + '"'


def _value(b) -> str:
    return f"{int.from_bytes(b, 'little'):#x}" if b else "-"


def _node(name: str, *lines) -> str:
    return f"{name}[{label(*lines)}]"


def _edge(a: str, b: str, *lines, arrow: str = "-->") -> str:
    return f"  {a} {arrow}|{label(*lines)}| {b}"


def _one(t, n: str, prefix: str = "", head: str = "GVA") -> List[str]:
    """Lines for one Translation; node ids end in n."""
    w = t.walk
    mode = w.mode.name if w.mode else "no"
    gva, gpa, hva, hpa = (f"{prefix}{k}{n}" for k in ("gva", "gpa", "hva", "hpa"))
    value = f"value {_value(t.value)}" if t.ok else None
    out = ["  " + _node(gva, head, f"{t.gva:#x}", value)]
    if not w.ok:
        f = w.fault
        reason = (f.reason if f else "unknown") + (f" at {f.level}" if f and f.level else "")
        out.append(_edge(gva, _node(f"{prefix}fault{n}", "FAULT", reason),
                         "guest page tables", f"{mode} paging"))
        return out
    block = f"RAM block {t.ram.block}" if t.ram is not None else (t.gpa_note or "no RAM block")
    out.append(_edge(gva, _node(gpa, "GPA", f"{w.pa:#x}", block),
                     "guest page tables", f"{mode}, {size_name(w.page_size)} page"))
    present = t.host is not None and t.host.status == "present"
    if t.hva is not None:
        at_hva = f"value {_value(t.value_at_hva)}" if t.value_at_hva else None
        out.append(_edge(gpa, _node(hva, "HVA", f"{t.hva:#x}", at_hva),
                         "QEMU RAM block", "gpa2hva"))
        if present:
            kind = {"thp": " THP", "hugetlb": " hugetlbfs"}.get(t.host.page_kind, "")
            out.append(_edge(hva, _node(hpa, "HPA", f"{t.host.hpa:#x}"),
                             "host page tables", f"pagemap, {size_name(t.host.page_size)}{kind}"))
        elif t.host is not None:
            out.append(_edge(hva, _node(hpa, "HPA", t.host.status), "host page tables"))
    if t.slat is not None and t.slat.out is not None:
        s = t.slat
        verdict = {True: "agrees", False: "DISAGREES", None: ""}[s.agrees]
        target = hpa if present and s.agrees else _node(f"{prefix}slat{n}", "HPA", f"{s.out:#x}")
        out.append(_edge(gpa, target, (s.spec.format or "slat").upper(),
                         f"{size_name(s.walk.page_size)} page {verdict}".strip(), arrow="-.->"))
    return out


def flowchart(translations) -> str:
    """One flowchart for Translations and NestedTranslations (a row per address)."""
    lines = ["flowchart LR"]
    for k, r in enumerate(translations, 1):
        n = str(k)
        hops = getattr(r, "hops", None)
        if hops is None:
            lines += _one(r, n)
            continue
        prev = None
        for j, hop in enumerate(hops):
            p = f"{hop.level.lower()}_"
            t = hop.translation
            if t is None:
                lines.append("  " + _node(f"{p}stop{n}", hop.level, hop.note or "not reached"))
                if prev:
                    lines.append(f"  {prev} --> {p}stop{n}")
                break
            lines += _one(t, n, p, head=f"{hop.level} GVA" if j == 0 else f"{hop.level} VA")
            if prev:
                lines.append(_edge(prev, f"{p}gva{n}", "is the VA in", hop.level, arrow="==>"))
            prev = f"{p}hva{n}" if t.hva is not None else None
            if not t.ok or prev is None:
                break
    return "\n".join(lines) + "\n"


def markdown(translations) -> str:
    """The flowchart in a fenced block, for a Markdown report."""
    return "```mermaid\n" + flowchart(translations) + "```\n"
