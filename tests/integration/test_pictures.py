"""Issue 14: pictures, checked in a real browser.

The real CLI draws a real guest's walks (several addresses, faults among them), its address
space and a report with module logs; headless Chromium (Debian's `chromium`, no network, a new
empty profile each time) renders each page: the DOM it builds (--dump-dom, after the page's own
script ran) must show the addresses and values the JSON output gives, a screenshot must not be
blank (decoded here with zlib), the printed PDF must break pages between addresses, and every
SVG (files, and every figure inline in the pages) must parse as XML.
"""

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest

from .conftest import attach_args, booted, run_cli, run_json
from .test_module_compare import module_log
from .test_translate_chain import stop_on_probe

pytestmark = pytest.mark.vm

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")
NON_CANONICAL = 0x0100000000000000    # bit 56 set, bits 63:57 clear: 4-level and 5-level


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium. Missing is a failure, not a skip: scripts/setup installs it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("headless Chromium is not installed, and these tests render every page in a "
                    "real browser: `apt-get install chromium` (scripts/setup installs it)",
                    pytrace=False)
    return path


def browse(chromium, folder, target, *args, fragment=""):
    """Run Chromium once on a file, with a new empty profile; its stdout."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=folder)
    url = "file://" + os.path.abspath(target) + fragment
    proc = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def dom(chromium, folder, target, fragment=""):
    out = browse(chromium, folder, target, "--dump-dom", fragment=fragment)
    assert out.lstrip().lower().startswith(("<!doctype html>", "<html")), out[:500]
    return out


class Browser:
    """Chromium driven through the DevTools protocol over --remote-debugging-pipe (its fd 3
    reads our JSON messages, its fd 4 writes the answers, each ended by a NUL): no socket, no
    network. For what the command line cannot do: move the pointer."""

    def __init__(self, chromium, folder):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds():
            a = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)    # above 3 and 4 before moving them
            b = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
        profile = tempfile.mkdtemp(prefix="chromium-", dir=folder)
        self.proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-pipe", "--window-size=1300,900",
                                      "about:blank"], preexec_fn=fds, close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self):
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], 120)
            chunk = os.read(self._r, 1 << 16) if ready else b""
            if not chunk:
                raise AssertionError("Chromium stopped answering on its debugging pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == self._id:
                assert "error" not in m, (method, m["error"])
                return m.get("result", {})
            self.events.append(m)

    def open(self, path, fragment=""):
        """A page in a new tab, loaded; its session."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session=session)
        self.call("Page.enable", session=session)
        self.call("Page.navigate", session=session,
                  url="file://" + os.path.abspath(path) + fragment)
        while not any(m.get("method") == "Page.loadEventFired" for m in self.events):
            self.events.append(self._read())
        return session

    def js(self, session, expression):
        r = self.call("Runtime.evaluate", session=session, expression=expression,
                      returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def errors(self):
        return [m["params"] for m in self.events if m.get("method") == "Runtime.exceptionThrown"]

    def close(self):
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


def png_pixels(path):
    """The RGB pixels of a PNG (8-bit RGB or RGBA, not interlaced) as an (h, w, 3) array."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            depth, ctype, interlace = body[8], body[9], body[12]
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.uint8)
    prev = np.zeros(w * bpp, np.int64)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 1:      # Sub: a running sum per channel
            line = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:    # Up
            line = (line + prev) % 256
        elif f in (3, 4):   # Average, Paeth: byte by byte
            cur = [0] * (w * bpp)
            up = prev.tolist()
            src = line.tolist()
            for x in range(w * bpp):
                a = cur[x - bpp] if x >= bpp else 0
                b = up[x]
                if f == 3:
                    cur[x] = (src[x] + (a + b) // 2) & 255
                else:
                    c = up[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[x] = (src[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            line = np.array(cur, np.int64)
        out[y] = line
        prev = line
    return out.reshape(h, w, bpp)[:, :, :3]


def not_blank(chromium, folder, target, fragment=""):
    """Screenshot the page (half scale, to keep the decoding short) and check it shows a drawing:
    many distinct colours, a fair share of pixels that are not background."""
    png = os.path.join(folder, os.path.basename(target) + ".png")
    browse(chromium, folder, target, f"--screenshot={png}", "--window-size=1300,1800",
           "--force-device-scale-factor=0.5", fragment=fragment)
    px = png_pixels(png)
    colours = len(np.unique(px.reshape(-1, 3), axis=0))
    ink = float((px.min(axis=2) < 200).mean())
    assert colours >= 24 and ink > 0.01, (png, colours, ink)
    return png


def svg_elements(markup):
    """The outermost <svg>...</svg> elements of a page, as text."""
    out, depth, start = [], 0, 0
    for m in re.finditer(r"<svg\b|</svg>", markup):
        if m.group(0) == "</svg>":
            depth -= 1
            if depth == 0:
                out.append(markup[start:m.end()])
        else:
            if depth == 0:
                start = m.start()
            depth += 1
    return out


def parse_svg(text):
    root = ET.fromstring(text.split("?>", 1)[-1] if text.startswith("<?xml") else text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def pdf_pages(chromium, folder, target):
    pdf = os.path.join(folder, os.path.basename(target) + ".pdf")
    browse(chromium, folder, target, f"--print-to-pdf={pdf}", "--no-pdf-header-footer")
    return len(re.findall(rb"/Type\s*/Page[^s]", open(pdf, "rb").read()))


def test_translate_html_and_svg_draw_each_address_and_the_faults(guest, chromium, tmp_path):
    g = guest
    regions = g.probe["regions"]
    addresses = [regions["heap"]["gva"], regions["thp"]["gva"], regions["untouched"]["gva"],
                 NON_CANONICAL]
    html, svg = tmp_path / "walks.html", tmp_path / "walk.svg"
    stop_on_probe(g)
    try:
        rc, out, err = run_json("translate", *attach_args(g), *map(hex, addresses),
                                "--html", html, "--svg", svg)
        rc_m, mer, err_m = run_cli("translate", *attach_args(g), *map(hex, addresses[:3]),
                                   "--mermaid")
    finally:
        g.qmp("cont")
    assert rc == 1, err            # faults: exit 1, and the pictures are written all the same
    assert [int(o["gva"], 16) for o in out] == addresses     # the JSON on stdout as usual
    ok = [o for o in out if "fault" not in o]
    assert len(ok) == 2 and out[2]["fault"]["reason"] == "not-present"
    assert out[3]["fault"]["reason"] == "non-canonical"
    # one SVG file per address, FILE-N.svg, each parsing as XML, with its address drawn
    for k, o in enumerate(out, 1):
        root = parse_svg((tmp_path / f"walk-{k}.svg").read_text())
        text = " ".join("".join(e.itertext()) for e in root.iter())
        assert f"GVA {o['gva']}" in text
    # the page: every figure parses; the browser's DOM shows every address and value
    page = html.read_text()
    figures = svg_elements(page)
    assert len(figures) == 4
    for fig in figures:
        parse_svg(fig)
    d = dom(chromium, tmp_path, html)
    for o in ok:
        for key in ("gva", "gpa", "hva", "hpa", "value"):
            assert o[key] in d, (key, o[key])
        for level in o["levels"]:
            assert level["entry"] in d and level["entry_addr"] in d
        assert o["ram_block"] in d
    assert "the walk stops here: not-present at " + out[2]["fault"]["level"] in d
    assert "the walk stops here: non-canonical" in d
    assert d.count('<section class="addr"') == 4
    not_blank(chromium, tmp_path, html)
    assert pdf_pages(chromium, tmp_path, html) >= 4          # a page break between addresses
    # --mermaid: stdout is the flowchart alone
    assert rc_m == 1, err_m
    assert mer.startswith("flowchart LR\n")
    assert f'gpa1["GPA<br>{ok[0]["gpa"]}<br>RAM block {ok[0]["ram_block"]}"]' in mer
    assert "fault3[\"FAULT<br>not-present" in mer


def test_vmmap_html_is_a_map_with_the_rows_under_the_pointer(guest, chromium, tmp_path):
    g = guest
    heap = g.probe["regions"]["heap"]
    html, svg = tmp_path / "map.html", tmp_path / "map.svg"
    stop_on_probe(g)
    try:
        rc, rows, err = run_json("vmmap", *attach_args(g), "--leaf", "--hpa", "--html", html,
                                 "--svg", svg)
    finally:
        g.qmp("cont")
    assert rc == 0, err
    assert len(rows) > 1000                                  # the rows on stdout as usual
    root = parse_svg(svg.read_text())
    rects = list(root.iter("{http://www.w3.org/2000/svg}rect"))
    assert len(rects) < len(rows) / 4                        # aggregated, not one per page
    page = html.read_text()
    [fig] = svg_elements(page)
    parse_svg(fig)
    # the row holding the heap page, as the JSON gives it
    row = next(r for r in rows
               if int(r["start"], 16) <= heap["gva"] < int(r["end"], 16))
    d = dom(chromium, tmp_path, html, fragment=f"#addr={heap['gva']:#x}")
    start = d.index('id="qi-hover"')
    shown = re.sub(r"<[^>]+>", " ", d[start:d.index('<p class="meta">', start)])
    for key in ("start", "end", "gpa", "hpa"):
        assert row[key] in shown, (key, row[key], shown)
    assert f"address {heap['gva']:#x} is in row" in shown
    # the rows table, filled by the page's script a page at a time
    body = re.search(r'<tbody id="qi-rows">(.*?)</tbody>', d, re.S).group(1)
    assert body.count("<tr") == min(200, len(rows)) and 'class="hit"' in body
    assert f"of {-(-len(rows) // 200)} ({len(rows)} rows)" in d
    assert "user half" in d and "kernel half" in d and "legend" in d
    not_blank(chromium, tmp_path, html)
    # the pointer on the map, for real: over a run of each permission, the panel shows the row
    # under it (one of the JSON's rows, holding the address the panel names, with that colour's
    # permissions)
    by_start = {r["start"]: r for r in rows}
    browser = Browser(chromium, tmp_path)
    try:
        tab = browser.open(html)
        hovered = 0
        for cls, perms in (("p-rx", "r-x"), ("p-rw", "rw-"), ("p-r", "r--")):
            at = browser.js(tab, f"""(function () {{
                var r = document.querySelector('svg[data-label="address space map"] rect.{cls}');
                if (!r) return null;
                r.scrollIntoView({{block: "center"}});
                var b = r.getBoundingClientRect();
                return [b.left + b.width / 2, b.top + b.height / 2];
            }})()""")
            if at is None:
                continue
            browser.call("Input.dispatchMouseEvent", session=tab, type="mouseMoved",
                         x=at[0], y=at[1])
            cells = browser.js(tab, "Array.from(document.querySelectorAll('#qi-hover-row td'))"
                                    ".map(function (c) { return c.textContent; })")
            head = browser.js(tab, "document.getElementById('qi-hover').firstChild.textContent")
            shown = dict(zip(cells[::2], cells[1::2]))
            assert shown["perms"] == perms, (cls, shown)
            row = by_start[shown["start"]]
            assert shown["end"] == row["end"] and shown["GPA"] == row["gpa"], (shown, row)
            address = int(re.match(r"address (0x[0-9a-f]+) is in row", head).group(1), 16)
            assert int(row["start"], 16) <= address < int(row["end"], 16)
            hovered += 1
        assert hovered == 3 and browser.errors() == []
    finally:
        browser.close()


@pytest.fixture(scope="module")
def sleeper():
    with booted("max", probe="sleep") as g:
        yield g


def test_report_is_a_page_to_hand_in(sleeper, chromium, tmp_path):
    g = sleeper
    heap, untouched = g.probe["regions"]["heap"], g.probe["regions"]["untouched"]
    log = tmp_path / "gpt_dump.log"
    log.write_text(module_log(g, heap["gva"]))
    evil = tmp_path / "evil.log"
    evil.write_text(log.read_text() + "<script>alert(1)</script>\n</pre><img src=x "
                                      "onerror=alert(2)> & \"quoted\"\n")
    seed_ept = os.path.join(os.path.dirname(__file__), "..", "data", "seed_ept_dump.log")
    out = tmp_path / "report"
    # the probe sleeps: its CR3 is not the vCPU's, so the addresses are drawn with the root
    # the module printed (as compare finds it)
    cr3 = re.search(r"CR3: (0x[0-9a-f]+)", log.read_text()).group(1)
    g.qmp("stop")             # one state for `cpus`, `report` and `translate`
    try:
        _, cpus, _ = run_json("cpus", *attach_args(g))
        rc, text, err = run_cli("report", *attach_args(g), "--cr3", cr3, hex(heap["gva"]),
                                hex(untouched["gva"]), "--log", log, "--log", evil,
                                "--log", seed_ept, "--out", out)
        _, [t_heap, t_untouched], _ = run_json("translate", *attach_args(g), "--cr3", cr3,
                                               hex(heap["gva"]), hex(untouched["gva"]))
    finally:
        g.qmp("cont")
    assert rc == 1, err              # the untouched page faults; the report is written anyway
    assert "report.html" in text
    files = sorted(os.listdir(out))
    assert files == ["report.html", "report.md", "translation-1.svg", "translation-2.svg"]
    for name in files[2:]:
        parse_svg((out / name).read_text())
    page = (out / "report.html").read_text()
    for fig in svg_elements(page):
        parse_svg(fig)
    d = dom(chromium, tmp_path, out / "report.html")
    # the VM facts, as `cpus` gives them
    assert cpus[0]["cr3"] in d and " ".join(cpus[0]["cr4_bits"]) in d
    # the translations, as translate gives them
    for key in ("gva", "gpa", "hva", "hpa", "value"):
        assert t_heap[key] in d
    assert t_untouched["gva"] in d and "the walk stops here: not-present" in d
    # the module logs: compared (our module agrees with the outside), escaped, explained
    assert "the outside view agrees with the log at every level it printed" in d
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in d
    assert "<script>alert" not in d and "<img" not in d and "onerror=alert(2)" in d
    assert "ept_dump log" in d and "the two logs chained" in d
    assert "```mermaid" in d and "flowchart LR" in d
    md = (out / "report.md").read_text()
    assert "![GVA" in md and "```mermaid" in md and t_heap["gpa"] in md
    not_blank(chromium, tmp_path, out / "report.html")
    # the page prints: one page or more per address and per log
    assert pdf_pages(chromium, tmp_path, out / "report.html") >= 5
    # --out FILE.html: the page alone
    single = tmp_path / "one.html"
    rc, _, err = run_cli("report", *attach_args(g), "--cr3", cr3, hex(heap["gva"]),
                         "--out", single)
    assert rc == 0, err
    assert single.read_text().startswith("<!DOCTYPE html>")
