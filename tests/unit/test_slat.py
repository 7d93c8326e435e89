"""Second-level tables found and walked, on host memory a test builds (NPT and EPT, 4 and 5
levels, 4 KiB / 2 MiB / 1 GiB leaves), with decoys: a stale root that maps the probe elsewhere,
a table that is not reachable from any root, random data. The real-KVM proof is in
tests/integration/kvm/."""

import struct

import numpy as np
import pytest

from qintrospect import slat
from qintrospect.present import render
from qintrospect.errors import UsageError
from qintrospect.memory.kcore import ram_segments

PAGE = 4096
MEM = 8 << 20       # 8 MiB of "host physical memory"


class Host:
    def __init__(self, seed=1):
        rng = np.random.default_rng(seed)
        self.b = bytearray(rng.integers(0, 256, MEM, dtype=np.uint8).tobytes())
        for page in range(0, MEM, PAGE):            # most pages are zero, as in real RAM
            if rng.random() < 0.5:
                self.b[page:page + PAGE] = bytes(PAGE)
        self.next = 0x100000

    def table(self):
        addr = self.next
        self.next += PAGE
        self.b[addr:addr + PAGE] = bytes(PAGE)
        return addr

    def set(self, table, index, value):
        struct.pack_into("<Q", self.b, table + 8 * index, value)

    def read(self, addr, n):
        return bytes(self.b[addr:addr + n])

    def chunks(self, size=1 << 20):
        for base in range(0, MEM, size):
            yield base, bytes(self.b[base:base + size])


NPT_TABLE = 0x7            # P RW U (KVM's NPT entries)
EPT_TABLE = 0x7            # R W X
EPT_LEAF = 0x7 | (6 << 3)  # RWX, WB


def build(host, fmt, depth, mappings):
    """A table of `depth` levels mapping each (gpa, host frame, page size); its root."""
    table_bits = NPT_TABLE if fmt == "npt" else EPT_TABLE
    leaf_bits = NPT_TABLE if fmt == "npt" else EPT_LEAF
    root = host.table()
    shifts = slat.SHIFTS[5 - depth:]
    for gpa, frame, size in mappings:
        t = root
        for shift in shifts:
            index = (gpa >> shift) & 511
            if 1 << shift == size:
                host.set(t, index, frame | leaf_bits | (0x80 if size > PAGE else 0))
                break
            e = struct.unpack_from("<Q", host.b, t + 8 * index)[0]
            if not e:
                e = host.table() | table_bits
                host.set(t, index, e)
            t = e & ~0xFFF & ((1 << 52) - 1)
    return root


@pytest.mark.parametrize("fmt", ["npt", "ept"])
@pytest.mark.parametrize("depth", [4, 5])
@pytest.mark.parametrize("size", [PAGE, 2 << 20, 1 << 30])
def test_the_root_is_found_from_one_probe_and_ranked_by_all(fmt, depth, size):
    host = Host()
    gpa = 0x1234_5678_9000 & ((1 << 47) - 1) | 0x3E8
    frame = 0x40000000 if size == 1 << 30 else 0x600000
    pa = frame | (gpa & (size - 1))
    other = (0x7000, 0x700000, PAGE)                   # a second mapping, for ranking
    root = build(host, fmt, depth, [(gpa & ~(size - 1), frame, size), other])
    # a stale root that maps the probe to the same frame but not the other address
    stale = build(host, fmt, depth, [(gpa & ~(size - 1), frame, size)])
    # a table that leads to the frame but hangs from nothing
    orphan = build(host, fmt, depth, [(gpa & ~(size - 1), frame, size)])
    host.set(orphan, (gpa >> slat.SHIFTS[5 - depth]) & 511, 0)
    probes = [(gpa, pa), (0x7008, 0x700008)]
    kinds = (fmt, "ept" if fmt == "npt" else "npt")    # the host CPU's kind first
    found, how = slat.find_roots(host.chunks(), host.read, probes, kinds)
    best = found[0]
    assert (best.spec.format, best.spec.depth, best.spec.root) == (fmt, depth, root)
    assert best.agree == 2 and best.probes == 2
    assert {f.spec.root for f in found if f.agree == 1} >= {stale}
    assert orphan not in {f.spec.root for f in found if f.spec.format == fmt}
    assert how["candidates"][0]["root"] == hex(root)
    r = slat.translate(host.read, best.spec, how, gpa, pa)
    assert r.agrees is True and r.out == pa and r.walk.page_size == size
    d = r.to_dict()
    assert d["format"] == fmt and d["out"] == hex(pa) and d["agrees"] is True
    assert len(d["levels"]) == depth - {PAGE: 0, 2 << 20: 1, 1 << 30: 2}[size]


def test_no_root_when_nothing_leads_to_the_frame():
    host = Host()
    build(host, "npt", 4, [(0x5000, 0x600000, PAGE)])
    found, how = slat.find_roots(host.chunks(), host.read, [(0x5000, 0x700000)])
    assert found == [] and how["candidates"] == []


def test_a_page_not_in_the_table_and_a_disagreement_are_explained():
    host = Host()
    root = build(host, "npt", 4, [(0x5000, 0x600000, PAGE)])
    spec = slat.SlatSpec("npt", root, 4)
    r = slat.translate(host.read, spec, {}, 0x9000, 0x123000)
    assert r.out is None and r.agrees is None and "not in the NPT" in r.note
    r = slat.translate(host.read, spec, {}, 0x5010, 0x123010)
    assert r.agrees is False and "disagree" in r.note


class Mem:
    """SecondLevel.resolve's memory: reads of the test's host bytes."""

    def __init__(self, host):
        self.read, self.name = host.read, "host"


def test_two_roots_that_fit_every_probe_are_ambiguous_not_chosen():
    """Two tables that map the same GPAs to the same host frames (two VMs with merged pages,
    KVM's SMM root beside the normal one): the scan refuses to choose, says which roots, and
    the text view says so; before, the lowest address won silently."""
    from qintrospect.present import render
    host = Host()
    maps = [(0x5000, 0x600000, PAGE), (0x9000, 0x700000, PAGE)]
    one, two = build(host, "npt", 4, maps), build(host, "npt", 4, maps)
    probes = [(0x5008, 0x600008), (0x9010, 0x700010)]
    asked = []

    def more():
        asked.append(True)
        return [(0x5000, 0x600000), (0x9ff8, 0x700ff8)]        # they agree there too

    second = slat.SecondLevel.resolve(Mem(host), host.chunks(), slat.SlatSpec(), probes,
                                      ("npt", "ept"), more_probes=more)
    assert asked and second.spec is None
    roots = {int(f["root"], 16) for f in second.how["ambiguous"]}
    assert roots == {one, two}
    assert second.how["note"].startswith("ambiguous: roots ")
    assert hex(one) in second.how["note"] and hex(two) in second.how["note"]
    r = second.result(0x5008, 0x600008)
    assert r.spec.root is None and r.walk is None and r.agrees is None
    text = "\n".join(render.slat_lines(r))
    assert "not chosen (ambiguous: roots" in text and hex(one) in text and hex(two) in text
    d = r.to_dict()
    assert d["root"] is None and d["out"] is None and d["how"]["ambiguous"]


def test_more_probes_break_a_tie_between_roots():
    """A root that fits the first probes as well as the right one (the other VM's table,
    sharing a merged page) loses on pages spread over RAM."""
    host = Host()
    right = build(host, "npt", 4, [(0x5000, 0x600000, PAGE), (0x9000, 0x700000, PAGE)])
    other = build(host, "npt", 4, [(0x5000, 0x600000, PAGE), (0x9000, 0x710000, PAGE)])
    second = slat.SecondLevel.resolve(Mem(host), host.chunks(), slat.SlatSpec(),
                                      [(0x5008, 0x600008)], ("npt", "ept"),
                                      more_probes=lambda: [(0x9000, 0x700000)])
    assert second.spec is not None and second.spec.root == right
    assert second.how["chosen"]["root"] == hex(right) and "ambiguous" not in second.how
    assert second.how["tie_probes"] == [["0x9000", "0x700000"]]
    assert other in {int(c["root"], 16) for c in second.how["candidates"]}


def test_one_root_read_as_npt_and_as_ept_is_one_table_not_a_tie():
    """Entries with bits 2:0 set and nothing else read alike as NPT and EPT: the same root
    in both formats is not two tables; the host CPU's kind (first) stands."""
    host = Host()
    root = build(host, "npt", 4, [(0x5000, 0x600000, PAGE)])
    second = slat.SecondLevel.resolve(Mem(host), host.chunks(), slat.SlatSpec(),
                                      [(0x5008, 0x600008)], ("npt", "ept"),
                                      more_probes=lambda: [])
    assert second.spec.root == root and second.spec.format == "npt"


@pytest.mark.parametrize("text,fmt,root,depth", [
    ("npt:0x1234000", "npt", 0x1234000, 4), ("npt5:0x1234000", "npt", 0x1234000, 5),
    ("ept:0x1234000", "ept", 0x1234000, 4), ("ept:0x123405e", "ept", 0x1234000, 4),
    ("ept:0x1234026", "ept", 0x1234000, 5),
])
def test_slat_option(text, fmt, root, depth):
    spec = slat.parse_slat(text)
    assert (spec.format, spec.root, spec.depth) == (fmt, root, depth)


@pytest.mark.parametrize("text", ["npt", "npt:1234", "npt:0x1234001", "ept:0x1234007",
                                  "xpt:0x1000", "ept:0xzz"])
def test_bad_slat_option(text):
    with pytest.raises(UsageError):
        slat.parse_slat(text)


def test_auto():
    assert slat.parse_slat("auto").auto


def elf(segments):
    """An ELF64 header and program headers as /proc/kcore has them."""
    phdrs = b"".join(struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, size, size, 0)
                     for off, vaddr, paddr, size in segments)
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 32, 64)
    struct.pack_into("<HH", header, 54, 56, len(segments))
    return bytes(header), phdrs


def test_kcore_ram_segments_are_the_direct_map():
    direct = 0xFFFF888000000000
    header, phdrs = elf([
        (0x1000, 0xFFFFFFFF81000000, 0x1000000, 0x2000000),     # kernel text
        (0x4000, 0xFFFFC90000000000, (1 << 64) - 1, 0x1000),    # vmalloc: no paddr
        (0x9000, direct + 0x1000, 0x1000, 0x9F000),             # RAM below 640 KiB
        (0xA000, direct + 0x100000, 0x100000, 0x7FF00000),      # RAM above 1 MiB
    ])
    assert ram_segments(header, phdrs) == [(0x1000, 0xA0000, 0x9000),
                                           (0x100000, 0x80000000, 0xA000)]


@pytest.mark.parametrize("fmt", ["npt", "ept"])
@pytest.mark.parametrize("depth", [4, 5])
def test_reverse_finds_every_gpa_and_the_tables_own_pages(fmt, depth):
    host = Host()
    # two GPAs on one host frame (an alias), a 2 MiB leaf over another, one elsewhere
    root = build(host, fmt, depth, [(0x5000, 0x600000, PAGE), (0x9000, 0x600000, PAGE),
                                    (0x40200000, 0xA00000, 2 << 20), (0x7000, 0x700000, PAGE)])
    spec = (slat.SlatSpec("ept", root, depth, root | 6 | (depth - 1) << 3) if fmt == "ept"
            else slat.SlatSpec("npt", root, depth))
    r = slat.reverse(host.read, spec, 0x600010)
    assert sorted(r.maps) == [(0x5010, PAGE, "PT"), (0x9010, PAGE, "PT")]
    r = slat.reverse(host.read, spec, 0xA12345)
    assert r.maps == [(0x40212345, 2 << 20, "PD")]
    assert slat.reverse(host.read, spec, root + 8).tables == ["PML5" if depth == 5 else "PML4"]
    pt = host.read(root, 8)   # the top table's first entry points to the next level's table
    child = int.from_bytes(pt, "little") & ~0xFFF & ((1 << 52) - 1)
    assert slat.reverse(host.read, spec, child).tables == [("PML4" if depth == 5 else "PDPT")]
    assert slat.reverse(host.read, spec, 0x800000).maps == []
    d = slat.reverse(host.read, spec, 0x600010).to_dict(spec)
    assert d["format"] == fmt and {m["gpa"] for m in d["maps"]} == {"0x5010", "0x9010"}


# ---- what an entry says, and KVM's MMIO markers ----------------------------------------------

def test_an_ept_entry_in_words_with_kvms_own_bits():
    """The leaf FACTS.md saw KVM make under Bochs: 2 MiB, RWX, WB, A/D, KVM's bits 11/57/58."""
    words = slat.entry_fields("ept", 0x0600000009200BF7, leaf=True)
    assert words == ("R=1 W=1 X=1 user-X=0; memtype=6 (WB) ignore-PAT=1; A=1 D=1; "
                     "KVM: MMU-present (11), host-writable (57), MMU-writable (58)")
    assert slat.entry_fields("ept", 0x1000 | 7, leaf=False) == "R=1 W=1 X=1 user-X=0; A=0"
    assert "A/D off" in slat.entry_fields("ept", (1 << 52) | 0x37, leaf=True)
    assert slat.entry_fields("npt", 0x8000000007fe9c827 & ((1 << 64) - 1) | 0x800,
                             leaf=False).endswith("KVM: MMU-present (11)")


def test_kvms_mmio_markers_are_named_never_mappings():
    """KVM makes an entry invalid on purpose for a GPA its device model emulates: EPT W+X
    without R (a misconfiguration), NPT present with bit 51 set above MAXPHYADDR (today's
    BIT(51) | present with the GFN and generation bits; before Linux 5.13 every bit from
    MAXPHYADDR to 51). The walk says so, with the GPA's device region, and gives no host
    address."""
    host = Host()
    # each as KVM makes it for GPA 0xfec00000: the GFN kept in it, generation bits about
    for fmt, marker, maxphy in (("ept", 0x6 | 0xFEC00000 | 0x5 << 3 | (0x3 << 54), 52),
                                ("npt", 1 << 51 | 0xFEC00000 | 0x7 << 3 | 1 << 54 | 1, 40),
                                ("npt", 0x1 | 0xFEC00000 | (((1 << 52) - 1) & ~((1 << 40) - 1)),
                                 40)):
        root = build(host, fmt, 4, [(0x5000, 0x600000, PAGE)])
        t = root
        for shift in slat.SHIFTS[1:-1]:                    # down to the PT of GPA 0xfec00000
            i = (0xFEC00000 >> shift) & 511
            e = struct.unpack_from("<Q", host.b, t + 8 * i)[0]
            if not e:
                e = host.table() | 7
                host.set(t, i, e)
            t = e & ~0xFFF & ((1 << 52) - 1)
        host.set(t, (0xFEC00000 >> 12) & 511, marker)
        spec = slat.SlatSpec(fmt, root, 4, root | 0x1E if fmt == "ept" else None)
        second = slat.SecondLevel(Mem(host), spec, {"method": "given"})
        second.maxphyaddr = maxphy
        second.device = lambda gpa: ("0xfec00000 is in device region 'ioapic' (i/o, "
                                     "0xfec00000-0xfec00fff), not RAM")
        r = second.result(0xFEC00000, None)
        assert r.out is None and r.agrees is None and r.marker["level"] == "PT", fmt
        assert r.note.startswith("KVM's MMIO marker, not a mapping") and "ioapic" in r.note
        d = r.to_dict()
        assert d["kvm_mmio_marker"]["device"].startswith("0xfec00000 is in device region")
        # the marker's bits are KVM's (the GFN it keeps, access, generation): never flags
        assert d["kvm_mmio_marker"]["gpa"] == "0xfec00000", d
        text = render.slat_lines(r)
        leaf = [x for x in text if " PT " in x and "entry" in x][0]
        assert leaf.endswith("-> none: KVM's MMIO marker"), leaf
        assert any("KVM's MMIO marker, not flags: " in x for x in text), text
        assert text[-2].endswith("at PT: KVM's MMIO marker, not a mapping"), text
        # the same bits on RAM that merely is not in the table: not a marker
        plain = second.result(0x9000, 0x700000)
        assert plain.marker is None and "not in the" in plain.note
        # the batch walk (translate --brief --slat) finds the same marker, and only it
        batch = second.walk_batch([0xFEC00000, 0x9000, 0x5000])
        assert second.markers(batch).tolist() == [True, False, False], fmt
    # an NPT entry with another reserved bit (45, above MAXPHYADDR 40) but not 51: a broken
    # entry, said as that, not a marker
    host.set(t, (0xFEC00000 >> 12) & 511, 1 << 45 | 0xFEC00000 | 1)
    r = second.result(0xFEC00000, None)
    assert r.marker is None and r.walk.fault.reason == "reserved-bit", r.note
    assert not second.markers(second.walk_batch([0xFEC00000])).any()


def test_the_huge_page_block_is_the_seeds():
    from qintrospect.present import render
    host = Host()
    gpa = 0x366536E8                                  # the seed's ept_dump address
    root = build(host, "ept", 4, [(gpa & ~((2 << 20) - 1), 0x10800000, 2 << 20)])
    spec = slat.SlatSpec("ept", root, 4, root | 0x1E)
    r = slat.SecondLevel(Mem(host), spec, {"method": "given"}).result(gpa, None)
    lines = [x.strip() for x in render.slat_lines(r)]
    i = lines.index("Huge Page (2M) at level 2 detected!")
    assert lines[i + 1] == "[e.g]   [Rsvd./Ign.] [  Huge Page Number, 31 Bits  ][Ignored] [ ]"
    assert lines[i + 3].split()[1:] == ["000000000000", "1" * 31 + "0" * 9, "0" * 12]  # Mask1
    hpa = lines[i + 10].split()
    assert hpa[0] == "HPA" and int("".join(hpa[1:]), 2) == r.out == 0x10800000 | (gpa & 0x1FFFFF)
    assert any("memtype=6 (WB)" in x for x in lines)


def test_the_gpa_kept_in_a_marker_with_and_without_l1tf():
    """KVM keeps the GFN in an MMIO marker; with the L1TF mitigation (an Intel host: the Bochs
    rig's EPT showed 0xf8fec002b6 for GPA 0xfec00000 at MAXPHYADDR 40) it also sets the top 5
    bits below MAXPHYADDR and moves the GFN's own top bits 5 higher."""
    top = 0x1F << 35
    assert slat.marker_gpa(0xF8FEC002B6, 40) == (
        0xFEC00000, "12-34 and 40-44 (L1TF: bits 35-39 set)")
    gpa = (1 << 35) | 0xFEC00000                    # a GFN bit under the mask: moved to bit 40
    entry = 0x6 | 0xFEC00000 | top | (1 << 40)
    assert slat.marker_gpa(entry, 40)[0] == gpa
    assert slat.marker_gpa(1 << 51 | 0xFEC002A7, 40) == (0xFEC00000, "12-39")      # AMD's
    assert slat.marker_gpa(0xFEC00006 | 0x3 << 54, 52) == (0xFEC00000, "12-51")
