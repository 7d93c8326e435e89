"""Issue: fast paths. Every memory path reads the same bytes; batches from stdin; a session
without gdb (registers through QMP) that leaves the VM running, or --freeze for one view."""

import json

import pytest

import qintrospect

from .conftest import attach_args, booted, run_cli, run_json
from .test_translate_chain import USER_REGIONS, stop_on_probe

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def g():
    with booted("max") as guest:
        yield guest


def test_all_paths_give_the_same_translation(g):
    regions = g.probe["regions"]
    addrs = [hex(regions[n]["gva"]) for n in USER_REGIONS]
    stop_on_probe(g)
    try:
        results = {}
        for via in ("gdb", "direct", "qmp"):
            rc, out, err = run_json("translate", *attach_args(g), "--via", via, *addrs)
            assert rc == 0, err
            assert {t["memory_path"] for t in out} == {via}
            results[via] = [(t["gpa"], t["hpa"], t["value"], t["levels"]) for t in out]
        # without gdb: registers through QMP, the VM paused (as found) all along
        rc, out, err = run_json("translate", "--qmp", g.qmp_path, *addrs)
        assert rc == 0, err
        results["no-gdb"] = [(t["gpa"], t["hpa"], t["value"], t["levels"]) for t in out]
        assert g.qmp("query-status")["status"] == "paused"
    finally:
        g.qmp("cont")
    assert results["gdb"] == results["direct"] == results["qmp"] == results["no-gdb"]
    assert [int(r[0], 16) for r in results["gdb"]] == [regions[n]["gpa"] for n in USER_REGIONS]
    rc, out, err = run_cli("-v", "translate", *attach_args(g), "--via", "direct", addrs[0])
    assert "memory via direct" in err


def test_stdin_batch_writes_json_lines(g):
    regions = g.probe["regions"]
    lines = [hex(regions[n]["gva"]) for n in USER_REGIONS] * 50 + ["0x0", str(regions["heap"]["gva"])]
    rc, out, err = run_cli("translate", *attach_args(g), "-", input="\n".join(lines) + "\n")
    assert rc == 1, err  # address 0 is not mapped
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == len(lines)
    assert objs[-2]["fault"]["reason"] == "not-present"
    assert int(objs[-1]["gva"], 16) == regions["heap"]["gva"]
    rc, out, err = run_cli("translate", *attach_args(g), "-", input="0x1000\nnot-a-number\n")
    assert rc == 2 and "not-a-number" in err


def test_translate_many_api_uses_a_page_cache_while_stopped(g):
    regions = g.probe["regions"]
    stop_on_probe(g)
    try:
        with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address, via="gdb") as vm:
            assert vm.stopped
            reads_before = vm.gdb.reads
            ts = list(vm.translate_many([regions["heap"]["gva"] + 8 * i for i in range(200)]))
            # 200 walks of one page: the tables and the data page are each read once
            assert vm.gdb.reads - reads_before <= 8
            assert {t.gpa & ~0xFFF for t in ts} == {regions["heap"]["gpa"] & ~0xFFF}
    finally:
        g.qmp("cont")


def test_live_session_keeps_running_and_freeze_restores(g):
    heap = g.probe["regions"]["heap"]
    with qintrospect.attach(qmp=g.qmp_path) as vm:
        assert not vm.stopped and vm.gdb is None
        assert vm.qmp.command("query-status")["running"]  # we did not stop it
    assert g.qmp("query-status")["running"]
    with qintrospect.attach(qmp=g.qmp_path, freeze=True) as vm:
        assert vm.qmp.command("query-status")["status"] == "paused"
        assert vm.stopped
    assert g.qmp("query-status")["running"]
    rc, out, err = run_json("translate", "--qmp", g.qmp_path, "--freeze", "--find-cr3",
                            "--expect", hex(heap["value"]), hex(heap["gva"]))
    assert rc == 0, err
    assert int(out[0]["gpa"], 16) == heap["gpa"]
    assert g.qmp("query-status")["running"]
    rc, out, err = run_cli("translate", *attach_args(g), "--freeze", "0x1000")
    assert rc == 2 and "--freeze" in err


def test_translate_batch_equals_translate_one_by_one(g):
    """The array path answers what the one-address path answers, key for key."""
    import random
    rnd = random.Random(7)
    stop_on_probe(g)
    try:
        with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
            leaves = vm.leaf_arrays()
            picks = rnd.sample(range(len(leaves)), 600)
            addrs = [int(leaves.va[i]) + rnd.randrange(0, int(leaves.size[i]), 4) for i in picks]
            addrs += [g.probe["regions"][n]["gva"] for n in USER_REGIONS + ("untouched",)]
            addrs += [0x0, 0x0000800000000000, 0xFFFFFFFFFFFFF000]
            # values that run into the next 4 KiB page: inside large pages, at a leaf's end,
            # and at the end of the last page before a hole (no next page: no value)
            ends = [int(leaves.va[i]) + rnd.randrange(1, int(leaves.size[i]) // 4096 + 1) * 4096
                    for i in rnd.sample(range(len(leaves)), 60)]
            holes = [int(leaves.va[i] + leaves.size[i]) for i in range(len(leaves) - 1)
                     if leaves.va[i] + leaves.size[i] != leaves.va[i + 1]][:20]
            addrs += [(end - k) & (1 << 64) - 1 for end in ends + holes for k in (1, 4, 7)]
            batch = list(vm.translate_batch(addrs).to_dicts())
            keys = ("gpa", "page_size", "ram_block", "hva", "hpa", "writable", "user",
                    "executable", "value")
            short = 0
            for a, b in zip(addrs, batch):
                t = vm.translate(a).to_dict()
                if "fault" in t:
                    assert (b["fault"]["reason"], b["fault"]["level"]) == \
                        (t["fault"]["reason"], t["fault"]["level"]), hex(a)
                elif "cross into the next page, which is not mapped" in (t["value_note"] or ""):
                    short += 1     # the one-address path shows the bytes before the hole
                    assert b["value"] is None, hex(a)
                    assert {k: t[k] for k in keys[:-1]} == {k: b[k] for k in keys[:-1]}, hex(a)
                else:
                    assert {k: t[k] for k in keys} == {k: b[k] for k in keys}, hex(a)
            assert short >= 3     # some holes were met
        rc, out, err = run_cli("translate", *attach_args(g), "--brief", "-",
                               input="\n".join(map(hex, addrs)) + "\n")
        assert rc == 1  # some of them fault
        # byte for byte the dicts' lines (present.brieflines makes them from the arrays)
        from qintrospect.present.render import json_line
        assert out.splitlines() == [json_line(d) for d in batch]
    finally:
        g.qmp("cont")


def test_the_many_address_json_is_the_one_address_json(g, monkeypatch):
    """translate --json of many addresses (vectorized walk, shared levels and access tables) gives
    exactly the lines the one-address path gives: probe pages, a spread of the kernel's direct
    map (2 MiB and 4 KiB leaves), the kernel image, faults, non-canonical addresses, values at
    a page's end. Lines made in C (_rowformat) and by the fallback (bytes.__mod__) alike."""
    from qintrospect.present import rowlines
    from qintrospect.present.render import json_line
    regions = g.probe["regions"]
    stop_on_probe(g)
    try:
        with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
            heap = regions["heap"]
            direct = next(r.gva for r in vm.who_maps(gpa=heap["gpa"])[0].reaches
                          if r.half == "kernel" and (r.gva - heap["gpa"]) % (1 << 30) == 0)
            base = direct - heap["gpa"]
            addrs = [regions[n]["gva"] + off for n in regions for off in (0, 8, 0xFF8, 0xFFC)]
            addrs += [base + gpa for gpa in range(0, 256 << 20, (1 << 20) + 0x2468)]
            addrs += [0, 0x1000, 1 << 60, (1 << 64) - 8, 0xFFFFFFFF81000000]
            # many addresses of one page (pieces shared per page), faults alike but for the
            # index where they stop (a hole's pages and tables), non-canonical addresses
            addrs += [heap["gva"] + 8 * i for i in range(64)]
            addrs += [0x100000000000 + (i << 12) + (i << 21) + (i << 30) for i in range(40)]
            addrs += [(1 << 62) + (i << 12) for i in range(10)] + [0xDEAD << 48]
            # faults in one table at many indexes (one %-format with the index as a place):
            # the first 2 MiB pieces of user space, the pages and 2 MiB pieces above RAM in
            # the direct map
            addrs += [(i << 21) + 8 * i for i in range(12)]
            addrs += [base + (256 << 20) + (i << 12) + 16 * i for i in range(0, 600, 7)]
            addrs += [base + (256 << 20) + (i << 21) for i in range(0, 40, 3)]
            # and a random spread over every leaf of the address space
            import random
            rnd = random.Random(5)
            leaves = vm.leaf_arrays()
            addrs += [int(leaves.va[i]) + rnd.randrange(0, int(leaves.size[i]) - 8)
                      for i in rnd.sample(range(len(leaves)), 1500)]
            rnd.shuffle(addrs)
            assert rowlines._rowformat is not None
            fast = list(vm.translate_json(addrs))
            with monkeypatch.context() as m:
                m.setattr(rowlines, "_rowformat", None)
                assert list(vm.translate_json(addrs)) == fast
            slow = [json_line(vm.translate(a).to_dict()) for a in addrs]
            assert vm.memory.name == "direct"
        for a, (ok, line), want in zip(addrs, fast, slow):
            assert json.loads(line) == json.loads(want), hex(a)
            assert line == want and ok == ("fault" not in json.loads(want)), hex(a)
        rc, out, err = run_cli("translate", *attach_args(g), "-",
                               input="".join(f"{a:#x}\n" for a in addrs))
        assert rc == 1 and out.splitlines() == slow, err
    finally:
        g.qmp("cont")


def test_one_address_imports_no_numpy(g):
    """A one-address translate builds no arrays, so it does not import numpy (most of such a
    command's start): for a page present on the host and for one QEMU never touched (its
    value read as proven zeros); many addresses do."""
    import subprocess
    import sys
    stop_on_probe(g)
    try:
        with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
            heap = g.probe["regions"]["heap"]
            direct = next(r.gva for r in vm.who_maps(gpa=heap["gpa"])[0].reaches
                          if r.half == "kernel" and (r.gva - heap["gpa"]) % (1 << 30) == 0)
            base = direct - heap["gpa"]
            untouched = next(base + gpa for gpa in range(0, 256 << 20, 1 << 20)
                             if vm.translate(base + gpa).host.status == "not-present")
        script = ("import sys; from qintrospect import cli; status = cli.main(sys.argv[1:]); "
                  "print('numpy' in sys.modules, status)")
        for addresses in ([heap["gva"]], [untouched], [heap["gva"] + 8 * i for i in range(40)]):
            proc = subprocess.run(
                [sys.executable, "-c", script, "translate", "--json", *attach_args(g),
                 *map(hex, addresses)], capture_output=True, text=True, timeout=120)
            lines = proc.stdout.splitlines()
            assert len(lines) == len(addresses) + 1, proc.stderr
            assert lines[-1] == f"{len(addresses) > 1} 0", (addresses[0], lines[-1])
            if addresses == [untouched]:
                line = json.loads(lines[0])
                assert line["host"]["status"] == "not-present" and line["value"] == "0x0"
    finally:
        g.qmp("cont")
