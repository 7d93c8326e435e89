"""Pictures on synthetic walks, no VM: every paging mode's figure (4-level, 5-level, PAE, 32-bit,
EPT and NPT second-level walks), faults, nested hops, the map of a large address space, the
mermaid chain, the pages; everything parsed as XML, and everything from the VM or a log escaped.
"""

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from qintrospect import modlog

from qintrospect.commands import vmmap
from qintrospect.cli import main
from qintrospect.memory.host import HostPage
from qintrospect.machine.rammap import RamRegion
from qintrospect.commands.nested import Hop, NestedTranslation
from qintrospect.paging import walk, walk_ept, walk_npt
from qintrospect.present.picture import MAX_PICTURES, TranslatePictures, svg_names
from qintrospect.present.picture import html as H
from qintrospect.present.picture import mermaid, report, spacemap
from qintrospect.present.picture.svg import Svg, esc
from qintrospect.present.picture.walk import W, address_fields, entry_fields, nested_svg, translation_svg
from qintrospect.commands.translate import Translation
from qintrospect.slat import SlatResult, SlatSpec

from .test_paging import (
    A, D, G, NX, P, PAT_LARGE, RW, US, Mem, chain, cpu32, cpu64, cpupae, idx, pae_chain, pae_va,
    va32,
)

SVG_NS = "{http://www.w3.org/2000/svg}"
EPT_R, EPT_W, EPT_X, EPT_WB = 1, 2, 4, 6 << 3


def texts(svg_text: str) -> str:
    """All the text an SVG shows (parsed as XML), joined by newlines."""
    root = ET.fromstring(svg_text.split("?>", 1)[-1])
    return "\n".join("".join(e.itertext()) for e in root.iter(SVG_NS + "text"))


def translation(w, gva=None, ram_block="pc.ram", value=0x1122334455667788, **kw):
    """A Translation as the session makes one, around a synthetic walk."""
    t = Translation(gva=w.va if gva is None else gva, vcpu=0, cr3=w.root, walk=w, qemu_pid=42)
    if w.ok:
        t.ram = RamRegion(0, 0xFFFFFFFFF, "ram", ram_block, 0, 0x7F0000000000)
        t.hva = 0x7F0000000000 + w.pa
        t.host = HostPage(t.hva, "present", 0x100000000 + w.pa, 4096, "4k")
        t.value = t.value_at_hva = value.to_bytes(8, "little")
    for k, v in kw.items():
        setattr(t, k, v)
    return t


# ---- synthetic walks of every mode -----------------------------------------------------------

def walk_4level(leaf_level=3, frame=0x150000):
    mem = Mem(0x400000)
    va = idx(0x1FF, 3, 4, 5, 0x3E8) | 0xFFFF000000000000
    chain(mem, va, 4, leaf_level, frame, leaf_flags=P | RW | A | D | NX | G)
    return walk(mem, cpu64(), va)


def walk_5level():
    mem = Mem()
    va = idx(1, 2, 3, 4, 5, 0x10)
    chain(mem, va, 5, 4, 0x90000, leaf_flags=P | RW | US | A)
    return walk(mem, cpu64(la57=True), va)


def walk_pae(leaf_level=2):
    mem = Mem()
    va = pae_va(2, 7, 9, 0x321)
    pae_chain(mem, va, leaf_level=leaf_level, frame=0x600000 if leaf_level == 1 else 0x7000)
    return walk(mem, cpupae(cr3=0x1020), va)


def walk_32(leaf_level=1):
    mem = Mem()
    va = va32(0x301, 0x2A5, 0x123)
    frame = 0xAC000000 if leaf_level == 0 else 0xABCDE000
    chain(mem, va, 2, leaf_level, frame, leaf_flags=P | RW | US | PAT_LARGE * (leaf_level == 0),
          entry_size=4, shifts=[22, 12])
    return walk(mem, cpu32(pse=True), va)


def walk_ept4(leaf_level=3):
    mem = Mem()
    gpa = idx(0, 1, 2, 3, 0x456)
    chain(mem, gpa, 4, leaf_level, 0x88000000 if leaf_level == 3 else 0x10800000,
          leaf_flags=EPT_R | EPT_W | EPT_X | EPT_WB, table_flags=EPT_R | EPT_W | EPT_X)
    return walk_ept(mem, 0x1000 | 6 | (3 << 3), gpa)


def walk_npt4():
    mem = Mem()
    gpa = idx(0, 1, 2, 3, 0x456)
    chain(mem, gpa, 4, 3, 0x88000000, leaf_flags=P | RW | US)
    return walk_npt(mem, 0x1000, gpa)


MODES = {
    "4-level 4k": lambda: walk_4level(3),
    "4-level 2m": lambda: walk_4level(2, 0x200000),
    "4-level 1g": lambda: walk_4level(1, 0x40000000),
    "5-level": walk_5level,
    "pae 4k": lambda: walk_pae(2),
    "pae 2m": lambda: walk_pae(1),
    "32-bit 4k": lambda: walk_32(1),
    "32-bit 4m": lambda: walk_32(0),
    "ept 4k": lambda: walk_ept4(3),
    "ept 2m": lambda: walk_ept4(2),
    "npt 4k": walk_npt4,
}


def tiles(fields, nbits):
    """The fields cover bits nbits-1..0 exactly once, high to low."""
    expect = nbits - 1
    for hi, lo, name, kind in fields:
        assert hi == expect and lo <= hi, (fields, name)
        expect = lo - 1
    return expect == -1


@pytest.mark.parametrize("mode", MODES)
def test_every_bit_of_every_entry_and_address_lies_in_one_field(mode):
    w = MODES[mode]()
    assert w.ok, w.fault
    for i, step in enumerate(w.levels):
        assert tiles(entry_fields(w.mode, i, step), w.mode.entry_size * 8), (mode, step.name)
    nbits, fields = address_fields(w)
    assert tiles(fields, nbits)
    # the levels below a large-page leaf are part of the offset
    kinds = [f[3] for f in fields if f[2].endswith("IDX")]
    assert kinds.count("idx") == len(w.levels)


@pytest.mark.parametrize("mode", MODES)
def test_figure_of_each_mode_shows_the_walk_and_the_chain(mode):
    w = MODES[mode]()
    second = mode.startswith(("ept", "npt"))
    if second:   # a second-level walk is drawn under a guest walk, as translate --slat does
        guest = walk_4level()
        kind = mode.split()[0]
        t = translation(guest)
        t.slat = SlatResult(SlatSpec(kind, w.root, w.mode.depth), {"method": "given"}, w,
                            expected=w.pa)
    else:
        t = translation(w)
    svg = translation_svg(t)
    out = svg.render()
    text = texts(out)
    assert svg.width == W and 300 < svg.height < 6000
    assert f"GVA {t.gva:#x}" in text and f"{t.gpa:#x}" in text
    assert f"{t.hva:#x}" in text and f"{t.hpa:#x}" in text and "0x1122334455667788" in text
    for s in w.levels:    # every level: its table, entry address, entry and flags
        assert f"{s.name} ({s.linux_name.upper()}) table at {s.table_addr:#x}" in text
        assert f"entry at {s.entry_addr:#x}" in text
        assert f"[{s.index}] = {s.entry:#x}" in text
        assert " ".join(s.flags) in text
    size = {"2m": "2 MiB", "1g": "1 GiB", "4m": "4 MiB"}.get(mode.split()[-1], "4 KiB")
    assert f"a {size} page" in text
    assert "page sizes: guest" in text
    if second:
        name = mode.split()[0].upper()
        assert f"{name} walk of GPA {w.va:#x}" in text
        assert "agrees with the pagemap path" in text
    # the index fields, as gpt_dump labels them
    for s in w.levels:
        assert f"{s.linux_name.upper()} IDX" in text
    assert "Offset" in text


def test_the_bits_drawn_are_the_entry_s_bits():
    w = walk_4level()
    out = translation_svg(translation(w)).render()
    leaf = w.levels[-1]
    root = ET.fromstring(out.split("?>", 1)[-1])
    titles = [t.text for t in root.iter(SVG_NS + "title")]
    assert "bit 63 XD = 1" in titles                     # NX set in the leaf
    assert "bit 8 G = 1" in titles and "bit 2 US = 0" in titles
    assert f"bits 51:12 page frame = {leaf.next_addr >> 12:#x}" in titles


@pytest.mark.parametrize("what", ["not-present", "reserved-bit", "non-canonical", "unreadable"])
def test_faults_show_where_the_walk_stopped_and_why(what):
    mem = Mem(0x400000)
    va = idx(3, 5, 7, 9, 0xABC)
    chain(mem, va, 4, 3, 0x150000)
    if what == "not-present":
        mem.put(0x3000 + 7 * 8, 0)
    elif what == "reserved-bit":
        mem.put(0x3000 + 7 * 8, 0x4000 | P | RW | US | (1 << 51))
    elif what == "non-canonical":
        va = 0x0000900000000000
    else:
        mem.holes.add(0x4000)
    w = walk(mem, cpu64(maxphyaddr=40), va)
    assert w.fault is not None and w.fault.reason == what
    t = translation(w)
    out = translation_svg(t).render()
    text = texts(out)
    level = f" at {w.fault.level}" if w.fault.level else ""
    assert f"the walk stops here: {what}{level}" in text
    assert w.fault.message[:40] in text.replace("\n", " ")
    assert "the chain" not in text                       # no GPA, no chain
    assert out.count('class="box-fault"') >= 1
    if what == "non-canonical":
        assert 'class="bit-bad"' in out                  # the sign bits that break the rule
    if what == "not-present":
        assert "PD (PMD) table at 0x3000" in text and "not present" in text
    m = mermaid.flowchart([t])
    assert f"FAULT<br>{what}" in m


def test_everything_from_the_vm_is_escaped_in_svg_and_html():
    w = walk_4level()
    evil = 'pc.ram<script>alert(1)</script>"&\'\x01\x1b\ud800]]>'
    t = translation(w, ram_block=evil, value_note="note <b>bold</b> & \x07")
    out = translation_svg(t).render()
    assert "<script" not in out and "<b>" not in out and "\x01" not in out
    text = texts(out).replace("\n", "")                  # parses; the text comes back as text
    # controls, ESC and a lone surrogate shown as escapes, never sent as they are
    assert "pc.ram<script>alert(1)</script>\"&'\\x01\\x1b\\ud800]]>" in text
    assert "note <b>bold</b> &" in text
    page = H.translate_page([t])
    assert "<script" not in page.lower().replace("<script>(function", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert esc('"<&>\'') == "&quot;&lt;&amp;&gt;&#x27;"


def test_slat_not_found_and_disagreeing_are_drawn():
    guest = walk_4level()
    w = walk_ept4()
    t = translation(guest)
    t.slat = SlatResult(SlatSpec("ept", w.root, 4), {"method": "given"}, w, expected=w.pa + 4096,
                        note="the EPT maps GPA ... to ..., but the pagemap path says ...")
    text = texts(translation_svg(t).render())
    assert "DISAGREES with the pagemap path" in text and "but the pagemap path says" in text
    t.slat = SlatResult(SlatSpec(), {"method": "scan", "note": "no NPT or EPT root"}, None,
                        note="no NPT or EPT root in host memory")
    text = texts(translation_svg(t).render())
    assert "the hypervisor's second-level table was not found" in text


def test_nested_hops_side_by_side():
    inner = translation(walk_5level())
    outer_walk = walk_4level()
    outer = translation(outer_walk, gva=outer_walk.va)
    r = NestedTranslation(inner.gva, [Hop("L2", inner, "vCPU 0's CR3"),
                                      Hop("L1", outer, "find-cr3: the root whose ..."),
                                      Hop("L0", None, note="no page-table root <maps> it")])
    svg = nested_svg(r)
    out = svg.render()
    assert svg.width == 3 * W + 2 * 80
    text = texts(out)
    assert "L2 (innermost)" in text and "L1" in text and "no page-table root <maps> it" in text
    assert f"HVA {inner.hva:#x}" in text and "= VA in L1" in text
    assert out.count("<svg") == 4                        # the figure and one per hop
    m = mermaid.flowchart([r])
    assert "l2_gva1" in m and "l1_gva1" in m and "==>" in m


def test_mermaid_chain_as_the_seed_draws_it():
    t = translation(walk_4level(), ram_block='odd"block<br>#60;|x|')
    m = mermaid.flowchart([t])
    lines = m.splitlines()
    assert lines[0] == "flowchart LR"
    assert f'gva1["GVA<br>{t.gva:#x}<br>value 0x1122334455667788"]' in m
    safe = "odd\u201dblock\u2039br\u203a\u266f60;\u00a6x\u00a6"
    assert f'gpa1["GPA<br>{t.gpa:#x}<br>RAM block {safe}"]' in m
    assert f'hpa1["HPA<br>{t.hpa:#x}"]' in m
    for line in lines[1:]:
        # every label is one quoted string: quotes come in pairs, each right after [ or |
        for label_text in re.findall(r'"([^"]*)"', line):
            assert "<" not in label_text.replace("<br>", "")
    assert mermaid.markdown([t]).startswith("```mermaid\nflowchart LR\n")


# ---- the map -------------------------------------------------------------------------------

def rows_of(starts, sizes, page_sizes=None, writable=None, user=None, executable=None):
    n = len(starts)

    def u64(v):
        return np.array(v, dtype=np.uint64)

    def flag(v, default):
        return np.array(v if v is not None else [default] * n, bool)
    return vmmap.Rows(u64(starts), u64(sizes), u64(page_sizes or sizes), flag(writable, True),
                      flag(user, True), flag(executable, False), u64(starts), u64([0] * n),
                      np.zeros(n, np.uint8), np.ones(n, np.int64), np.zeros(n, np.int8),
                      u64([0] * n), np.ones(n, bool))


def big_rows(n=60_000, seed=3):
    """n ranges: a user half of scattered 4 KiB pages, a kernel direct map of mixed permissions
    and page sizes, a 1 GiB page, and the top page of the space."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("start", "size", "w", "u", "x")}

    def add(start, size, w, u, x):
        for k, v in zip(cols, (start, size, w, u, x)):
            cols[k].append(v)
    a = 0x400000
    for k in range(n // 2):
        a += 4096 * int(rng.integers(1, 4)) + (1 << 30 if k % 997 == 0 else 0)
        add(a, 4096, bool(k % 3), True, k % 5 == 0)
    a = 0xFFFF888000000000
    for k in range(n - n // 2 - 2):
        size = 2 << 20 if k % 7 == 0 else 4096
        add(a, size, k % 4 != 0, False, k % 11 == 0)
        a += size + (4096 if k % 13 == 0 else 0)
    add(0xFFFFFFFF80000000 - (1 << 30), 1 << 30, False, False, True)
    add((1 << 64) - 4096, 4096, False, False, True)
    return rows_of(cols["start"], cols["size"], cols["size"], cols["w"], cols["u"], cols["x"])


def test_a_large_map_stays_light():
    rows = big_rows()
    smap = spacemap.SpaceMap(rows, 48, show_gpa=True)
    out = smap.svg("map").render()
    root = ET.fromstring(out.split("?>", 1)[-1])
    rects = list(root.iter(SVG_NS + "rect"))
    assert len(rows) == 60_000 and len(rects) < 12_000    # never one element per range
    regions = [g for h in smap.halves for g in h.regions]
    assert 2 <= len(regions) <= spacemap.MAX_REGIONS * len(smap.halves)
    # every row lies in exactly one region, in order
    covered = [i for g in regions for i in range(g.row0, g.row1)]
    assert covered == list(range(len(rows)))
    assert all(g.start < g.end for g in regions)
    assert regions[-1].end == 1 << 64                    # the top page reaches 2**64
    data = json.loads(smap.data_json())
    assert len(data["start"]) == len(rows) and data["end"][-1] == "10000000000000000"
    assert data["gpa"] is True and len(data["gpaS"]) == len(rows)
    text = texts(out)
    assert "user half" in text and "kernel half" in text and "legend" in text
    for name in spacemap.PERMS:
        assert name in text
    page = H.vmmap_page(smap)
    assert 'id="qi-data"' in page and "<\\/" not in page.split('id="qi-data"')[0]


def test_map_titles_name_the_row_and_folds_the_hole():
    rows = rows_of([0x400000, 0x401000, 0x7F0000000000], [0x1000, 0x3000, 0x200000],
                   [4096, 4096, 2 << 20], writable=[False, True, True],
                   executable=[True, False, False])
    smap = spacemap.SpaceMap(rows, 48)
    out = smap.svg().render()
    root = ET.fromstring(out.split("?>", 1)[-1])
    titles = [t.text for t in root.iter(SVG_NS + "title")]
    assert any(t.startswith("0x400000 - 0x401000  4 KiB in 4 KiB pages  r-x  user")
               for t in titles)
    assert any(t.startswith("0x7f0000000000 - 0x7f0000200000  2 MiB in 2 MiB pages  rw-")
               for t in titles)
    assert any(t.startswith("hole of ") and "folded: 0x404000 - 0x7f0000000000" in t
               for t in titles)
    assert [len(h.regions) for h in smap.halves] == [2, 0]


def test_map_of_a_32bit_space_and_an_empty_one():
    rows = rows_of([0x8048000, 0xC0000000], [0x1000, 4 << 20], [4096, 4 << 20],
                   user=[True, False])
    smap = spacemap.SpaceMap(rows, 32)
    assert [h.name for h in smap.halves] == ["the whole address space"]
    ET.fromstring(smap.svg().render().split("?>", 1)[-1])
    empty = spacemap.SpaceMap(rows_of([], []), 57)
    text = texts(empty.svg().render())
    assert "nothing mapped" in text and "0 range(s)" in text


# ---- pages ----------------------------------------------------------------------------------

class Markup(HTMLParser):
    """The tags of a page, with their attributes, and the text of its style elements."""

    def __init__(self, page):
        super().__init__()
        self.tags, self.styles, self._in_style = [], [], False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def external_references(page: str) -> list:
    """Everything in a page's markup that would load from elsewhere: src attributes, links,
    hrefs that are not #fragments, url() other than #ids and @import in styles."""
    m = Markup(page)
    bad = [(t, a) for t, a in m.tags if "src" in a or t in ("link", "iframe", "object", "embed")]
    bad += [(t, a) for t, a in m.tags for k in ("href", "xlink:href")
            if k in a and not a[k].startswith("#")]
    for css in m.styles:
        bad += re.findall(r"url\((?!#)[^)]*\)|@import", css)
    return bad


def script_tags(page: str) -> list:
    return [a.get("type", "") for t, a in Markup(page).tags if t == "script"]


def test_pages_are_self_contained_and_print_well():
    t = translation(walk_4level())
    f = translation(walk_5level())
    pages = [H.translate_page([t, f]), H.vmmap_page(spacemap.SpaceMap(big_rows(2000), 48))]
    for page in pages:
        assert page.startswith("<!DOCTYPE html>")
        assert external_references(page) == []
        assert "@media print" in page and "break-after: page" in page
        assert "background: #fff" in page
    assert pages[0].count('<section class="addr"') == 2
    assert script_tags(pages[0]) == [] and script_tags(pages[1]) == ["application/json", ""]


SEED_EVIL = """[    1.0] gpt_dump: begin pid=95 comm=probe gva=0x0000000005d786d0 levels=4
<script>alert(1)</script>
</pre><img src=x onerror=alert(2)> & "q"
"""


def test_report_page_escapes_logs_and_explains_differences(tmp_path):
    from pathlib import Path
    seed = (Path(__file__).parent.parent / "data" / "seed_gpt_dump.log").read_text()
    text = seed + SEED_EVIL
    log = modlog.parse_log(text)
    w = walk_4level()
    entry = report.LogEntry("evil <b>.log", log, modlog.check_log(log), text,
                            comparison=modlog.compare(log, w, None), outside={"root": "0x1000"})
    t = translation(w)
    rep = report.Report("report <i>", {"qmp": "/tmp/q<.sock", "vcpus": 1},
                        [{"index": 0, "thread_id": 7, "cpl": 3, "mode": "4-level", "cr3": "0x1000",
                          "root": "0x1000", "pcid": None, "cr0": "0x80050033",
                          "cr0_bits": ["PE", "PG"], "cr4": "0x20", "cr4_bits": ["PAE"],
                          "efer": "0x500", "efer_bits": ["LME", "LMA"]}],
                        [t], [entry])
    page = report.page(rep)
    assert "<script>alert" not in page and "<img" not in page and "<b>.log" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "what it means" in page and "DIFFER" in page
    assert entry.agree is False and rep.status == 1
    assert external_references(page) == [] and script_tags(page) == []
    assert not [t for t, a in Markup(page).tags if t in ("img", "i")]
    assert "evil &lt;b&gt;.log" in page and "report &lt;i&gt;" in page
    md = report.markdown(rep, ["translation-1.svg"])
    assert "![GVA" in md and "```mermaid" in md
    prose = re.sub(r"```.*?```", "", md, flags=re.S)     # code blocks show text as it is
    assert "<" not in prose and "report &lt;i&gt;" in prose
    files = report.write(rep, str(tmp_path / "out"))
    assert sorted(p.split("/")[-1] for p in files) == ["report.html", "report.md",
                                                       "translation-1.svg"]
    ET.parse(tmp_path / "out" / "translation-1.svg")
    one = tmp_path / "one.html"
    assert report.write(rep, str(one)) == [str(one)] and one.read_text().startswith("<!DOCTYPE")


# ---- options ----------------------------------------------------------------------------------

def test_svg_names():
    assert svg_names("walk.svg", 1) == ["walk.svg"]
    assert svg_names("out/walk.svg", 3) == ["out/walk-1.svg", "out/walk-2.svg", "out/walk-3.svg"]
    assert svg_names("walk", 2) == ["walk-1.svg", "walk-2.svg"]


def test_picture_options_are_checked_before_attaching(tmp_path, capsys):
    html = str(tmp_path / "t.html")
    assert main(["translate", "--qmp", "/nonexistent", "--brief", "--html", html, "0x1000"]) == 2
    assert "--brief" in capsys.readouterr().err
    assert main(["translate", "--qmp", "/nonexistent", "--svg", str(tmp_path / "no" / "t.svg"),
                 "0x1000"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["vmmap", "--qmp", "/nonexistent", "--html", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["report", "--qmp", "/nonexistent", "--out", str(tmp_path / "r")]) == 2
    assert "give addresses" in capsys.readouterr().err


def test_too_many_pictures_are_refused():
    class Args:
        html, svg, mermaid, brief = None, None, True, False
    p = TranslatePictures(Args())
    for k in range(MAX_PICTURES):
        assert p.add(k) is True
    with pytest.raises(Exception, match="at most"):
        p.add(0)


def test_svg_builder_escapes_attributes_and_parses():
    s = Svg(100, 50, title='a "t" <x>', label="l&l")
    s.rect(0, 0, 10, 10, cls="box", title="<r>")
    s.text(1, 2, "t\x00<>")
    out = s.render()
    root = ET.fromstring(out.split("?>", 1)[-1])
    assert root.get("data-label") == "l&l"
    assert texts(out) == "t\\x00<>"


def test_pse36_high_address_bits_are_drawn_as_physical_bits_39_32():
    mem = Mem()
    va = va32(0x301, 0x2A5, 0x123)
    chain(mem, va, 2, 0, 0xAC000000, leaf_flags=P | RW | (0x3 << 13), entry_size=4,
          shifts=[22, 12])
    w = walk(mem, cpu32(pse=True, maxphyaddr=40), va)
    assert w.ok and w.pa == 0x3_AC000000 | (va & 0x3FFFFF)
    text = texts(translation_svg(translation(w)).render())
    assert "PA 39:32" in text and "0x300000000" in text and f"GPA {w.pa:#x}" in text


def test_a_guest_processs_map_is_labelled_with_its_vmas():
    """vmmap --guest-pid --html: each range carries the name of the VMA that holds it (in the
    embedded rows, for the hover panel and the row pages), each region the names of its VMAs,
    and the page lists the VMAs as /proc/PID/maps does; a name from the guest is escaped."""
    rows = rows_of([0x400000, 0x401000, 0x35886000, 0x7f0000000000, 0xFFFF888000000000],
                   [0x1000, 0x1000, 0x1000, 0x1000, 0x200000],
                   user=[True, True, True, True, False])
    vmas = [(0x400000, 0x402000, "/probe"), (0x35886000, 0x358a8000, "[heap]"),
            (0x7f0000000000, 0x7f0000001000, "</td><script>x</script>")]
    evil = vmas[-1][2]
    smap = spacemap.SpaceMap(rows, 48, vmas=vmas)
    assert smap.vma_names() == ["/probe", "/probe", "[heap]", evil, ""]
    smap.vma_rows = ("VMAs of guest process 95 (probe), as /proc/95/maps lists them",
                     [("00400000-00402000 r-xp 00000000 00:02 92   /probe", "2/2", "")])
    page = H.vmmap_page(smap)
    data = json.loads(re.search(r'<script type="application/json" id="qi-data">(.*?)</script>',
                                page, re.S).group(1).replace("<\\/", "</"))
    assert data["vma"] == ["/probe", "/probe", "[heap]", evil, ""]
    assert "VMAs of guest process 95 (probe)" in page and "<th>VMAs</th>" in page
    assert "<td>/probe</td>" in page and "<td>[heap]</td>" in page
    assert "<script>x</script>" not in page and "&lt;script&gt;x" in page
    outside = spacemap.SpaceMap(rows_of([0x1000], [0x1000]), 48, vmas=vmas[:1])
    assert outside.vma_names() == ["no VMA"]
    plain = H.vmmap_page(spacemap.SpaceMap(rows, 48))
    assert "<th>VMA" not in plain and '"vma":' not in plain
