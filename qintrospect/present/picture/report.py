"""The page of `qintrospect report` (frontend.report collects what goes in): one self-contained
page a student can hand in. The VM and its vCPUs
(the `cpus` facts), each address drawn (as translate --html draws it), each module log parsed,
checked against itself and compared with the live outside walk (as `compare --log` does, each
difference with its reason), the two logs of one experiment chained, and the chain as mermaid
for a Markdown report.

--out FILE.html writes the page alone. --out DIR writes DIR/report.html, DIR/report.md (the
same content for Markdown: the figures as DIR/translation-N.svg, the chain as a mermaid block,
the text views in code blocks) and the SVG files.
"""

import os
from typing import List, Optional

from ...errors import UsageError
from . import html as H
from ...record import field, record
from .svg import esc


@record
class LogEntry:
    path: str
    log: object                       # modlog.ModLog
    findings: list
    text: str                         # the file as written (shown escaped)
    comparison: object = None         # modlog.Comparison
    explain: Optional[str] = None
    outside: dict = field(default_factory=dict)
    translation: object = None        # the outside walk of a gpt_dump log's address
    error: str = ""

    @property
    def agree(self) -> Optional[bool]:
        if self.comparison is None:
            return None
        compared = any(r.agree is True for r in self.comparison.rows)
        return self.comparison.agree and compared


@record
class Report:
    title: str
    facts: dict
    vcpus: List[dict]
    results: List
    logs: List[LogEntry]
    chain: object = None              # modlog.Chain of a gpt_dump and an ept_dump log

    @property
    def status(self) -> int:
        bad = any(not r.ok for r in self.results) or \
            any(e.agree is False for e in self.logs) or \
            any(t.slat is not None and t.slat.agrees is False for t in self.results)
        return 1 if bad else 0


# ---- the page ---------------------------------------------------------------------------------

FACT_NAMES = (("qmp", "QMP socket"), ("gdb", "gdbstub"), ("status_found", "run state found"),
              ("vcpus", "vCPUs"), ("vcpu", "vCPU used"), ("qemu_pid", "QEMU pid"),
              ("process_note", "QEMU process"), ("memory_path", "guest memory read via"),
              ("page1gb", "1 GiB pages"), ("page1gb_source", "1 GiB pages known from"),
              ("guest_process", "guest process (--guest-pid/--guest-comm)"))


def _registers(vcpus: List[dict]) -> tuple:
    """(the column names for CPL, the root register, PCID and the three control registers,
    each vCPU's three control-register cells): x86's CR0/CR4/EFER, or aarch64's
    TCR_EL1/SCTLR_EL1/MAIR_EL1 (cpus --json of either)."""
    if vcpus and "satp" in vcpus[0]:
        return (["privilege", "satp", "ASID", "mstatus", "menvcfg", "extensions"],
                [(f"{v['mstatus']} {' '.join(v['mstatus_bits'])}", v["menvcfg"] or "-",
                  " ".join(e for e in ("svnapot", "svpbmt") if v[e]) or "-") for v in vcpus])
    if vcpus and "tcr_el1" in vcpus[0]:
        return (["EL", "TTBR0_EL1", "ASID", "TCR_EL1", "SCTLR_EL1", "MAIR_EL1"],
                [(v["tcr_el1"], f"{v['sctlr_el1']} {' '.join(v['sctlr_bits'])}", v["mair_el1"])
                 for v in vcpus])
    return (["CPL", "CR3", "PCID", "CR0", "CR4", "EFER"],
            [(f"{v['cr0']} {' '.join(v['cr0_bits'])}", f"{v['cr4']} {' '.join(v['cr4_bits'])}",
              f"{v['efer']} {' '.join(v['efer_bits'])}") for v in vcpus])


def _vm_section(rep: Report) -> str:
    facts = H.table(["fact", "value"], ((name, rep.facts.get(key)) for key, name in FACT_NAMES))
    names, regs = _registers(rep.vcpus)
    cpus = H.table(
        ["vCPU", "host thread", names[0], "paging", names[1], "root", names[2]] + names[3:],
        ([v["index"], v["thread_id"], v["cpl"], v["mode"], v["cr3"], v["root"], v["pcid"] or "-",
          *r] for v, r in zip(rep.vcpus, regs)))
    return f'<h2 id="vm">1. The VM and its vCPUs</h2>{facts}{cpus}'


def _log_section(k: int, e: LogEntry) -> str:
    from .. import render
    from .walk import translation_svg
    log = e.log
    addr = "?" if log.address is None else f"{log.address:#x}"
    out = [f'<section class="addr log" id="log-{k}"><h3>{k}. {esc(e.path)}: {esc(log.kind)} log '
           f'of {esc(log.address_name)} <span class="mono">{esc(addr)}</span></h3>',
           "<h3>what the log says, checked against its own numbers</h3>",
           H.pre(render.modlog_text(e.path, log, e.findings))]
    if e.error:
        out.append(f'<p class="bad">not compared with the outside view: {esc(e.error)}</p>')
    elif e.comparison is not None:
        rows = e.comparison.rows
        how = e.outside.get("root_found_by")
        out.append("<h3>against the live outside view"
                   + (f" (root {esc(e.outside.get('root'))}, {esc(how)})" if how else "")
                   + "</h3>")

        def num(r, v):
            if v is None:
                return "-"
            return str(v) if r.field in ("index", "page_size") else f"{v:#x}"
        out.append(H.table(["field", "level", "log", "outside", "verdict", "what it means"],
                           ([r.field, r.level or "", num(r, r.log), num(r, r.outside),
                             H.verdict(r.agree), r.reason] for r in rows)))
        diffs = e.comparison.differences()
        compared = any(r.agree is True for r in rows)
        if diffs:
            out.append(f'<p class="bad">{len(diffs)} difference(s):</p><ul>'
                       + "".join(f"<li>{esc(r.field)} {esc(r.level or '')}: {esc(r.reason)}</li>"
                                 for r in diffs) + "</ul>")
        elif compared:
            out.append('<p class="ok">the outside view agrees with the log at every level it '
                       "printed</p>")
        else:
            out.append('<p class="unk">nothing could be compared: the outside view has none of '
                       "the log's numbers (see the reasons)</p>")
        if e.explain:
            out.append(f"<p>why: {esc(e.explain)}</p>")
        if e.translation is not None:
            out.append(f'<div class="fig">{translation_svg(e.translation).render(standalone=False)}'
                       "</div>")
    out.append("<h3>the log as written</h3>" + H.pre(e.text))
    out.append("</section>")
    return "".join(out)


def page(rep: Report) -> str:
    from .. import render
    from .mermaid import markdown
    toc = ['<li><a href="#vm">The VM and its vCPUs</a></li>']
    body = [f"<h1>{esc(rep.title)}</h1><p class=\"meta\">{esc(H.stamp())}</p>"]
    parts = [_vm_section(rep)]
    if rep.results:
        toc.append('<li><a href="#translations">Translations</a><ol>' + "".join(
            f'<li><a href="#addr-{k}">{esc(f"{r.gva:#x}")}</a>{"" if r.ok else " (faulted)"}</li>'
            for k, r in enumerate(rep.results, 1)) + "</ol></li>")
        parts.append('<h2 id="translations">2. Translations</h2>'
                     + "".join(H.translation_section(r, k, 3)
                               for k, r in enumerate(rep.results, 1)))
    if rep.logs:
        toc.append('<li><a href="#logs">Module logs</a></li>')
        parts.append('<h2 id="logs">3. Module logs, parsed and compared</h2>'
                     '<p>verdicts: <b>agree</b>: the bits the log printed equal the outside '
                     "view's; <b>DIFFER</b>: they do not, and the last column says what that "
                     "means; <b>-</b>: not compared (not printed in the log, or no outside "
                     "number).</p>"
                     + "".join(_log_section(k, e) for k, e in enumerate(rep.logs, 1)))
        if rep.chain is not None:
            parts.append("<h3>the two logs chained</h3>" + H.pre(render.chain_text(rep.chain)))
    if rep.results:
        toc.append('<li><a href="#mermaid">The chain for Markdown</a></li>')
        parts.append('<h2 id="mermaid">4. The chain as mermaid, for a Markdown report</h2>'
                     + H.pre(markdown(rep.results)))
    body.append('<ol class="noprint">' + "".join(toc) + "</ol>")
    return H.page(rep.title, "".join(body + parts))


def _md_cell(v) -> str:
    """Text for a Markdown line or table cell: no HTML, no cell break."""
    text = str("-" if v is None else v).replace("\n", " ")
    return esc(text).replace("|", "\\|")


def markdown(rep: Report, svg_names: List[str]) -> str:
    """The report for Markdown: the figures referenced as SVG files."""
    from .. import render
    from .mermaid import markdown as mermaid_md
    out = [f"# {_md_cell(rep.title)}", "", H.stamp(), "", "## The VM and its vCPUs", "",
           "| fact | value |", "|---|---|"]
    out += [f"| {name} | {_md_cell(rep.facts.get(key))} |" for key, name in FACT_NAMES]
    names, regs = _registers(rep.vcpus)
    out += ["", f"| vCPU | {names[0]} | paging | {names[1]} | {' | '.join(names[3:])} |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {v['index']} | {v['cpl']} | {v['mode']} | {v['cr3']} | "
            + " | ".join(_md_cell(c) for c in r) + " |" for v, r in zip(rep.vcpus, regs)]
    if rep.results:
        out += ["", "## Translations"]
    for k, (r, name) in enumerate(zip(rep.results, svg_names), 1):
        text = render.translation_text(r)
        out += ["", f"### {k}. GVA {r.gva:#x}" + ("" if r.ok else " (faulted)"), "",
                f"![GVA {r.gva:#x}]({os.path.basename(name)})", "", mermaid_md([r]).rstrip(),
                "", "```text", text.replace("```", "'''"), "```"]
    if rep.logs:
        out += ["", "## Module logs, parsed and compared"]
    for e in rep.logs:
        out += ["", f"### {_md_cell(e.path)}", "", "```text",
                render.modlog_text(e.path, e.log, e.findings).replace("```", "'''"), "```"]
        if e.error:
            out += ["", f"not compared with the outside view: {_md_cell(e.error)}"]
        elif e.comparison is not None:
            out += ["", "```text", render.comparison_text(e.log, e.comparison, e.outside,
                                                          e.explain).replace("```", "'''"),
                    "```"]
    if rep.chain is not None:
        out += ["", "### the two logs chained", "", "```text",
                render.chain_text(rep.chain).replace("```", "'''"), "```"]
    return "\n".join(out) + "\n"


def write(rep: Report, out: str, folder: Optional[int] = None) -> List[str]:
    """The files: FILE.html alone, or DIR/report.html + report.md + translation-N.svg (in
    `folder`, DIR opened by outfile.output_folder, or opened here)."""
    from . import write_text
    from .walk import translation_svg
    from ..outfile import output_folder, write_file
    if folder is None and single_page(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise UsageError(f"--out {out}: the folder {parent} does not exist")
        write_text(out, page(rep))
        return [out]
    own = folder is None
    if own:
        folder = output_folder(out)    # a real folder of this user's own, or refused
    try:
        names = [f"translation-{k}.svg" for k in range(1, len(rep.results) + 1)]
        for name, r in zip(names, rep.results):
            write_file(name, translation_svg(r).render(), folder)
        write_file("report.html", page(rep), folder)
        write_file("report.md", markdown(rep, names), folder)
    finally:
        if own:
            os.close(folder)
    return [os.path.join(out, name) for name in ["report.html", "report.md"] + names]


def single_page(out: str) -> bool:
    """--out names one page (FILE.html), not a folder."""
    return out.lower().endswith((".html", ".htm")) and not os.path.isdir(out)

