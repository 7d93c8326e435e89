"""who-maps on a real guest, against independent truth: the guest's own /proc/self/pagemap (two
probe processes), QEMU's gva2gpa (the direct-map alias), the vCPU's CR3 from QEMU's `info
registers` (the root table), and this host's pagemap (--hpa)."""

import pytest

from qintrospect.machine.monitor_text import parse_gva2gpa, parse_registers

from .conftest import attach_args, booted, run_json

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=["max", "qemu64"])
def two(request):
    """The bundled guest with two probe processes: same program, so the same text page."""
    with booted(request.param) as g:
        first = g.probe
        second = g.start_probe("sleep")
        g.probes = (first, second)
        yield g


def who(g, *args):
    rc, out, err = run_json("who-maps", *attach_args(g), *args)
    assert rc == 0, err
    assert len(out) == 1
    return out[0]


def test_a_text_page_shared_by_two_processes(two):
    a, b = (p["regions"]["text"] for p in two.probes)
    assert a["gpa"] == b["gpa"] and a["gva"] == b["gva"]    # the guest's own pagemap says so
    w = who(two, "--gpa", hex(a["gpa"]))
    user = [m for m in w["mappings"] if m["user"]]
    assert {int(m["gva"], 16) for m in user} == {a["gva"]}
    assert len({m["root"] for m in user}) == 2                # one per process
    assert all(m["executable"] and not m["writable"] and m["level"] == "PT" for m in user)


def test_a_heap_page_and_its_direct_map_alias(two):
    heap = two.probes[0]["regions"]["heap"]
    w = who(two, "--gpa", hex(heap["gpa"]))
    user = [m for m in w["mappings"] if m["user"]]
    assert [int(m["gva"], 16) for m in user] == [heap["gva"]]  # only its own process
    kernel = [int(m["gva"], 16) for m in w["mappings"] if not m["user"]]
    assert kernel, w
    # every kernel alias translates to the same GPA for QEMU too (kernel halves are shared)
    for gva in kernel:
        if gva >= 1 << 63:
            assert parse_gva2gpa(two.hmp(f"gva2gpa {gva:#x}")) == heap["gpa"], hex(gva)
    shared = [m for m in w["mappings"] if m["half"] == "kernel"]
    assert all(len(m["roots"]) >= 2 for m in shared)          # every process has that alias


def test_the_root_table_is_a_page_table_page(two):
    cr3 = parse_registers(two.hmp("info registers"))["CR3"] & 0x000FFFFFFFFFF000
    w = who(two, "--gpa", hex(cr3 + 8))
    top = [t for t in w["page_table_of"] if int(t["root"], 16) == cr3]
    assert top and top[0]["level"] in ("PML4", "PML5")


def test_a_leaf_table_is_found_as_a_pt_page(two):
    heap = two.probes[0]["regions"]["heap"]
    rc, out, err = run_json("translate", *attach_args(two), hex(heap["gva"]))
    assert rc == 0, err
    pt = int(out[0]["levels"][-1]["table_addr"], 16)
    w = who(two, "--gpa", hex(pt))
    assert {"root": out[0]["root"], "level": "PT"} in [
        {"root": t["root"], "level": t["level"]} for t in w["page_table_of"]]


def test_from_the_host_frame(two):
    heap = two.probes[0]["regions"]["heap"]
    rc, out, err = run_json("translate", *attach_args(two), hex(heap["gva"]))
    hpa = int(out[0]["hpa"], 16)
    w = who(two, "--hpa", hex(hpa))
    mine = [h for h in w["host_holders"] if h["this_vm"]]
    assert [int(h["gpa"], 16) for h in mine] == [heap["gpa"]] and mine[0]["pid"] == two.pid
    assert heap["gva"] in [int(m["gva"], 16) for m in w["mappings"]]


def test_nothing_maps_the_bios_rom(two):
    """The firmware ROM at the top of 4 GiB: Linux maps none of it."""
    rc, out, err = run_json("who-maps", *attach_args(two), "--gpa", "0xfffff000")
    assert rc == 1 and not out[0]["mappings"] and not out[0]["page_table_of"]
    assert out[0]["ram_block"] == "pc.bios"


def test_usage(two):
    rc, out, err = run_json("who-maps", *attach_args(two), "--gpa", "0x1000", "--hpa", "0x1000")
    assert rc == 2 and "exactly one" in err


def test_given_roots_are_the_only_ones_searched(two):
    """--cr3: only that root's mappings (no scan of guest RAM for the others): the heap page
    through its own process's root, and nothing through the other probe's; a root that is no
    table (beyond RAM, or a device page) maps nothing, said so, never a traceback."""
    heap = two.probes[0]["regions"]["heap"]
    rc, out, err = run_json("translate", *attach_args(two), hex(heap["gva"]))
    root = out[0]["root"]
    w = who(two, "--gpa", hex(heap["gpa"]), "--cr3", root)
    assert w["roots"] == [root] and heap["gva"] in [int(m["gva"], 16) for m in w["mappings"]]
    assert {m["root"] for m in w["mappings"]} == {root}
    for bogus in ("0xfffff000", hex(1 << 40)):
        rc, out, err = run_json("who-maps", *attach_args(two), "--gpa", hex(heap["gpa"]),
                                "--cr3", bogus)
        assert rc in (0, 1) and "Traceback" not in err, err
        assert not [m for m in out[0]["mappings"] if m["root"] == bogus], out
    rc, out, err = run_json("who-maps", *attach_args(two), "--gpa", "0x1000", "--cr3", "x1")
    assert rc == 2 and "--cr3" in err
