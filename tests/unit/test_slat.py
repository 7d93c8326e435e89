"""Second-level tables found and walked, on host memory a test builds (NPT and EPT, 4 and 5
levels, 4 KiB / 2 MiB / 1 GiB leaves), with decoys: a stale root that maps the probe elsewhere,
a table that is not reachable from any root, random data. The real-KVM proof is in
tests/integration/kvm/."""

import struct

import numpy as np
import pytest

from qintrospect import slat
from qintrospect.errors import UsageError
from qintrospect.kcore import ram_segments

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
