"""Self-contained HTML pages: inline CSS and script only (no fonts, scripts or styles from the
network), light colours, a print stylesheet (no backgrounds, a page break between addresses).
Every string from the VM or a log is escaped (svg.esc); the map's row data is JSON inside a
<script type="application/json"> with "</" written as "<\\/".
"""

import datetime
from typing import Iterable, List, Optional, Sequence

from .svg import STYLE, esc

CSS = """
:root { color-scheme: light; }
body { font-family: 'DejaVu Sans', 'Liberation Sans', sans-serif; margin: 1.2em 1.6em;
       color: #111; background: #fff; line-height: 1.35; }
h1 { font-size: 1.5em; margin: 0 0 .3em 0; }
h2 { font-size: 1.2em; margin: 1.2em 0 .4em 0; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin: 1em 0 .3em 0; }
pre, code, .mono, td { font-family: 'DejaVu Sans Mono', 'Liberation Mono', monospace; }
pre { font-size: 12px; background: #f7f7f7; border: 1px solid #ddd; padding: 8px;
      overflow-x: auto; white-space: pre; }
.meta { color: #555; font-size: .9em; }
.fig { overflow-x: auto; margin: .4em 0; }
.fig svg { max-width: 100%; height: auto; }
.fig.wide svg { max-width: none; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; font-size: 12px; text-align: left;
         vertical-align: top; }
th { background: #f0f0f0; }
.bad { color: #b00020; font-weight: bold; }
.ok { color: #1b5e20; }
.unk { color: #666; }
#qi-hover { position: fixed; right: 12px; bottom: 12px; background: #fffbe6;
            border: 1px solid #b08900; padding: 6px 10px; font-family: 'DejaVu Sans Mono',
            monospace; font-size: 12px; max-width: 46em; min-width: 20em; z-index: 5; }
#qi-hover:empty { display: none; }
.pager button, .pager input { font: inherit; margin-right: .4em; }
tr.hit td { background: #fff2b3; }
section.addr { margin-bottom: 1.5em; }
@media print {
  body { margin: 0; background: #fff; }
  .noprint, #qi-hover, .pager { display: none !important; }
  pre { white-space: pre-wrap; word-break: break-all; background: #fff; border-color: #999; }
  th { background: #fff; }
  .fig, .fig.wide { overflow: visible; }
  .fig svg, .fig.wide svg { max-width: 100% !important; height: auto; }
  section.addr { break-after: page; page-break-after: always; }
  section.addr:last-of-type { break-after: auto; page-break-after: auto; }
  h2, h3 { break-after: avoid; page-break-after: avoid; }
}
"""


def page(title: str, body: str, script: str = "", data: str = "") -> str:
    """A whole HTML document. `data` (JSON) goes in a script element of type
    application/json, read by `script`."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title>",
             f"<style>{CSS}{STYLE}</style></head><body>", body]
    if data:
        parts.append(f'<script type="application/json" id="qi-data">{data}</script>')
    if script:
        parts.append(f"<script>{script}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def stamp() -> str:
    try:
        from importlib.metadata import version
        ver = version("qintrospect")
    except Exception:   # not installed (run from a checkout)
        ver = "(checkout)"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"made by qintrospect {ver} on {now}"


def pre(text: str, cls: str = "") -> str:
    return f'<pre{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{esc(text)}</pre>'


def table(head: Sequence[str], rows: Iterable[Sequence], cls: str = "") -> str:
    """Cells are text (escaped) unless given as ("html", markup) made here."""
    def cell(c) -> str:
        if isinstance(c, tuple) and len(c) == 2 and c[0] == "html":
            return c[1]
        return esc("" if c is None else c)
    out = [f'<table{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}><thead><tr>'
           + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def verdict(agree: Optional[bool], yes="agree", no="DIFFER", unknown="-") -> tuple:
    if agree is True:
        return ("html", f'<span class="ok">{esc(yes)}</span>')
    if agree is False:
        return ("html", f'<span class="bad">{esc(no)}</span>')
    return ("html", f'<span class="unk">{esc(unknown)}</span>')


# ---- translate --html -----------------------------------------------------------------------

def translation_section(r, index: int, heading_level: int = 2) -> str:
    """One address: its figure, the text view as the terminal shows it, its mermaid chain."""
    from .. import render
    from . import mermaid, walk
    nested = getattr(r, "hops", None) is not None
    fig = walk.nested_svg(r) if nested else walk.translation_svg(r)
    text = render.nested_text(r) if nested else render.translation_text(r)
    ok = r.ok
    h = f"h{heading_level}"
    status = "" if ok else ' <span class="bad">(faulted)</span>'
    gva = f"{r.gva:#x}"
    return (f'<section class="addr" id="addr-{index}" data-gva="{esc(gva)}">'
            f"<{h}>{index}. GVA <span class=\"mono\">{esc(gva)}</span>{status}</{h}>"
            f'<div class="fig{" wide" if nested else ""}">{fig.render(standalone=False)}</div>'
            f"<h3>as text</h3>{pre(text)}"
            f"<h3>the chain as a mermaid flowchart</h3>{pre(mermaid.markdown([r]))}"
            "</section>")


def translate_page(results: List, title: str = "qintrospect translate") -> str:
    index = "".join(f'<li><a href="#addr-{k}">{esc(f"{r.gva:#x}")}</a>'
                    f'{"" if r.ok else " (faulted)"}</li>' for k, r in enumerate(results, 1))
    body = (f"<h1>{esc(title)}</h1><p class=\"meta\">{esc(stamp())}</p>"
            f"<ol class=\"noprint\">{index}</ol>"
            + "".join(translation_section(r, k) for k, r in enumerate(results, 1)))
    return page(title, body)


# ---- vmmap --html ---------------------------------------------------------------------------

MAP_SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("qi-data").textContent);
  var svg = document.querySelector('svg[data-label="address space map"]');
  var panel = document.getElementById("qi-hover");
  var LANE = 36, PER_PAGE = 200;
  var PERMS = ["r--", "rw-", "r-x", "rwx"];
  var n = D.start.length;
  function big(h) { return BigInt("0x" + h); }
  function hx(b) { return "0x" + b.toString(16); }
  function size(b) {
    var units = [["GiB", 30n], ["MiB", 20n], ["KiB", 10n]];
    for (var i = 0; i < units.length; i++) {
      var s = 1n << units[i][1];
      if (b >= s && b % s === 0n) return (b >> units[i][1]).toString() + " " + units[i][0];
    }
    return b.toString() + " B";
  }
  function find(lo, hi, a) {          // the last row in [lo, hi) whose start <= a, or lo - 1
    hi = Math.min(hi, n);
    var r = lo - 1;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      if (big(D.start[mid]) <= a) { r = mid; lo = mid + 1; } else { hi = mid; }
    }
    return r;
  }
  function fields(i) {
    var s = big(D.start[i]), e = big(D.end[i]);
    var f = [["start", hx(s)], ["end", hx(e)], ["size", size(e - s)],
             ["page size", size(BigInt(D.ps[i]))], ["perms", PERMS[D.perm[i]]],
             ["who", D.user[i] ? "user" : "kernel"]];
    if (D.gpa) f.push(["GPA", "0x" + D.gpaS[i]]);
    if (D.hpa) f.push(["HPA", /^[0-9a-f]+$/.test(D.hpaS[i]) ? "0x" + D.hpaS[i] : D.hpaS[i]]);
    f.push([D.leaf ? "leaf" : "leaves", String(D.leaves[i])]);
    if (D.vma) f.push(["VMA", D.vma[i]]);
    return f;
  }
  function show(i, a, note) {
    panel.textContent = "";
    var head = document.createElement("div");
    head.textContent = note || ("address " + hx(a) + (i >= 0 ? " is in row " + (i + 1) : ""));
    panel.appendChild(head);
    if (i < 0) return;
    var t = document.createElement("table");
    t.id = "qi-hover-row";
    fields(i).forEach(function (kv) {
      var tr = t.insertRow(), k = tr.insertCell(), v = tr.insertCell();
      k.textContent = kv[0]; v.textContent = kv[1];
    });
    panel.appendChild(t);
  }
  function locate(a) {                // (row containing a, or -1) and a sentence
    var i = find(0, n, a);
    if (i >= 0 && a < big(D.end[i])) return [i, ""];
    var before = i >= 0 ? hx(big(D.end[i])) : "the bottom";
    var after = i + 1 < n ? hx(big(D.start[i + 1])) : "the top";
    return [-1, "address " + hx(a) + " is in a hole, between " + before + " and " + after];
  }
  if (svg) {
    var groups = svg.querySelectorAll("g.qi-half");
    svg.addEventListener("mousemove", function (ev) {
      var pt = svg.createSVGPoint(); pt.x = ev.clientX; pt.y = ev.clientY;
      var p = pt.matrixTransform(svg.getScreenCTM().inverse());
      for (var h = 0; h < D.halves.length && h < groups.length; h++) {
        var gy = parseFloat(groups[h].getAttribute("data-y"));
        var regs = D.halves[h].regions;
        for (var k = 0; k < regs.length; k++) {
          var r = regs[k], x = r[0], y = gy + r[1], w = r[2];
          if (p.x >= x && p.x <= x + w && p.y >= y && p.y <= y + LANE) {
            var s = big(r[3]), e = big(r[4]);
            var frac = BigInt(Math.max(0, Math.min(999999, Math.floor((p.x - x) / w * 1e6))));
            var a = s + (e - s) * frac / 1000000n;
            var l = locate(a);
            if (l[0] < 0 && r[6] - r[5] === 1) l = [r[5], ""];
            show(l[0], a, l[1]);
            return;
          }
        }
      }
    });
  }
  // the rows, a page at a time
  var body = document.getElementById("qi-rows"), info = document.getElementById("qi-page");
  var pageNo = 0, pages = Math.max(1, Math.ceil(n / PER_PAGE)), hit = -1;
  function render() {
    body.textContent = "";
    for (var i = pageNo * PER_PAGE; i < Math.min(n, (pageNo + 1) * PER_PAGE); i++) {
      var tr = body.insertRow();
      if (i === hit) tr.className = "hit";
      tr.insertCell().textContent = String(i + 1);
      fields(i).forEach(function (kv) { tr.insertCell().textContent = kv[1]; });
    }
    info.textContent = "page " + (pageNo + 1) + " of " + pages + " (" + n + " rows" +
      (D.cap ? ", of " + D.total + ": the rest are not embedded" : "") + ")";
  }
  function go(p) { pageNo = Math.max(0, Math.min(pages - 1, p)); render(); }
  document.getElementById("qi-prev").onclick = function () { go(pageNo - 1); };
  document.getElementById("qi-next").onclick = function () { go(pageNo + 1); };
  function jump(text) {
    var a;
    try { a = BigInt(text.trim()); } catch (e) {
      info.textContent = "not a number: " + text; return;
    }
    var l = locate(a), i = l[0] >= 0 ? l[0] : Math.min(n - 1, find(0, n, a) + 1);
    hit = i; go(Math.floor(Math.max(0, i) / PER_PAGE)); show(l[0], a, l[1]);
  }
  document.getElementById("qi-go").onclick = function () {
    jump(document.getElementById("qi-addr").value);
  };
  var m = /[#&]addr=(0x[0-9a-fA-F]+)/.exec(location.hash);
  if (m) { document.getElementById("qi-addr").value = m[1]; jump(m[1]); } else { render(); }
})();
"""


def map_body(smap, title: str, heading_level: int = 1) -> str:
    h = f"h{heading_level}"
    cols = ["#", "start", "end", "size", "page size", "perms", "who"]
    if smap.show_gpa:
        cols.append("GPA")
    if smap.show_hpa:
        cols.append("HPA")
    cols.append("leaf" if smap.leaf else "leaves")
    if smap.vmas is not None:
        cols.append("VMA")
    regions = list(smap.region_rows())
    labelled = smap.vmas is not None
    head = ["half", "start", "end", "span", "mapped", "ranges", "perms", "page sizes"] + \
        (["VMAs"] if labelled else [])
    return (f"<{h}>{esc(title)}</{h}><p class=\"meta\">{esc(smap.summary())}</p>"
            f'<div class="fig">{smap.svg(title).render(standalone=False)}</div>'
            '<p class="noprint meta">Hover over the map: the row under the pointer shows at the '
            'bottom right. Or give an address:</p>'
            '<div class="pager"><input id="qi-addr" size="22" placeholder="0x7f0000000000">'
            '<button id="qi-go">find</button><button id="qi-prev">previous</button>'
            '<button id="qi-next">next</button><span id="qi-page"></span></div>'
            f'<table class="noprint" id="qi-table"><thead><tr>'
            + "".join(f"<th>{esc(c)}</th>" for c in cols)
            + '</tr></thead><tbody id="qi-rows"></tbody></table>'
            f"<h2>regions ({len(regions)}; holes of 2 MiB or more fold between them)</h2>"
            + table(head, ([g["half"], g["start"], g["end"], g["span"], g["mapped"], g["ranges"],
                            g["perms"], g["pages"]] + ([g["vmas"]] if labelled else [])
                           for g in regions))
            + vma_section(smap)
            + '<div id="qi-hover" aria-live="polite"></div>')


def vma_section(smap) -> str:
    """vmmap --guest-pid: the process's VMAs as /proc/PID/maps lists them, each with how much
    of it the page tables map and where they differ (smap.vma_rows: its title, and rows of
    (maps line, mapped/pages, differs))."""
    listed = getattr(smap, "vma_rows", None) if smap.vmas is not None else None
    if not listed:
        return ""
    title, rows = listed
    return (f"<h2>{esc(title)}</h2>"
            + table(["/proc/PID/maps line", "mapped / pages", "differs"], rows))


def vmmap_page(smap, title: str = "qintrospect vmmap") -> str:
    body = map_body(smap, title) + f'<p class="meta">{esc(stamp())}</p>'
    return page(title, body, MAP_SCRIPT, smap.data_json())
