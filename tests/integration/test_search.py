"""search on a real guest: the probe's value found where the probe says it is (its GVA and GPA,
and the kernel's aliases of that frame), held to a plain Python scan of the same memory; a
match that crosses from one page into a page elsewhere in RAM; guest-physical RAM; filters,
alignment, --max, and bad input."""

import json

import pytest

import qintrospect

from .conftest import attach_args, booted, run_cli
from .test_translate_chain import stop_on_probe

pytestmark = pytest.mark.vm

HEAP_VALUE = 0x51494e54524f0001           # vm/probe.c's value at the heap GVA


@pytest.fixture(scope="module")
def g():
    with booted("max") as guest:
        stop_on_probe(guest)
        yield guest


def plain_scan(vm, pattern, user_only):
    """Every GVA where pattern starts, by reading each leaf page by page and joining pages
    contiguous in GVA: the independent answer search is held to."""
    found, run_start, run = [], None, bytearray()

    def flush():
        i = run.find(pattern)
        while i >= 0:
            found.append(run_start + i)
            i = run.find(pattern, i + 1)

    for m in vm.mappings():
        if user_only and not m.user:
            continue
        if vm.ram_map.ram_at(m.pa) is None:
            continue
        if run_start is None or run_start + len(run) != m.va:
            if run_start is not None:
                flush()
            run_start, run = m.va, bytearray()
        for off in range(0, m.size, 4096):
            run += vm.memory.read(m.pa + off, 4096)
    if run_start is not None:
        flush()
    return found


def test_the_probes_value_where_the_probe_says_and_nowhere_a_plain_scan_disagrees(g):
    heap = g.probe["regions"]["heap"]
    rc, out, err = run_cli("search", *attach_args(g), "--u64", hex(HEAP_VALUE), "--user",
                           "--json")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    at_heap = [r for r in rows if int(r["gva"], 16) == heap["gva"]]
    assert at_heap and int(at_heap[0]["gpa"], 16) == heap["gpa"], rows
    assert at_heap[0]["user"] is True and at_heap[0]["writable"] is True
    assert at_heap[0]["bytes"].startswith(HEAP_VALUE.to_bytes(8, "little").hex())
    with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
        want = plain_scan(vm, HEAP_VALUE.to_bytes(8, "little"), user_only=True)
    assert sorted(int(r["gva"], 16) for r in rows) == sorted(want)
    # the whole space, kernel half too: the heap's frame is also in the kernel's direct map
    rc, out, err = run_cli("search", *attach_args(g), "--u64", hex(HEAP_VALUE), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert any(int(r["gva"], 16) >= 1 << 63 and int(r["gpa"], 16) == heap["gpa"] for r in rows)


def test_a_match_across_two_pages_that_are_apart_in_ram(g):
    """Eight bytes that start 4 bytes before the end of one user page and go on into the next
    page of the address space, whose frame is elsewhere: found, at the right GVA."""
    with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
        leaves = [m for m in vm.mappings() if m.user and m.size == 4096]
        for a, b in zip(leaves, leaves[1:]):
            if b.va != a.va + 4096 or b.pa == a.pa + 4096:
                continue
            pattern = vm.memory.read(a.pa + 4092, 4) + vm.memory.read(b.pa, 4)
            if len(set(pattern)) > 3:       # bytes that say something, not a run of zeros
                break
        else:
            pytest.fail("no two neighbouring user pages apart in RAM with data across them")
    rc, out, err = run_cli("search", *attach_args(g), "--hex", pattern.hex(), "--range",
                           f"{a.va:#x}-{b.va + 4096:#x}", "--json")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert a.va + 4092 in [int(r["gva"], 16) for r in rows], (hex(a.va), rows)


def test_guest_physical_ram_is_a_plain_scan(g):
    heap = g.probe["regions"]["heap"]
    pattern = HEAP_VALUE.to_bytes(8, "little")
    rc, out, err = run_cli("search", *attach_args(g), "--phys", "--u64", hex(HEAP_VALUE),
                           "--json")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
        want = []
        for r in vm.ram_map.ram:
            if r.kind != "ram":
                continue
            data = b"".join(vm.memory.read(a, min(1 << 20, r.end + 1 - a))
                            for a in range(r.start, r.end + 1, 1 << 20))
            i = data.find(pattern)
            while i >= 0:
                want.append(r.start + i)
                i = data.find(pattern, i + 1)
        host = {r["gpa"]: r for r in rows}
        page = vm.process.host_page(int(host[hex(heap["gpa"])]["hva"], 16))
    assert sorted(int(r["gpa"], 16) for r in rows) == sorted(want) and heap["gpa"] in want
    assert host[hex(heap["gpa"])]["hpa"] == hex(page.hpa)      # the host's own pagemap


def test_filters_alignment_and_the_limit(g):
    value = hex(HEAP_VALUE)
    rc, out, _ = run_cli("search", *attach_args(g), "--u64", value, "--kernel", "--json")
    assert rc == 0 and all(not json.loads(line)["user"] for line in out.splitlines())
    rc, out, _ = run_cli("search", *attach_args(g), "--u64", value, "--align", "16", "--json")
    assert rc in (0, 1) and all(int(json.loads(line)["gva"], 16) % 16 == 0
                                for line in out.splitlines())
    rc, out, err = run_cli("search", *attach_args(g), "--u64", value, "--max", "2", "--json")
    assert rc == 0 and len(out.splitlines()) == 2 and "--max 2" in err
    rc, out, _ = run_cli("search", *attach_args(g), "--text", "no such text in this guest 7q!")
    assert rc == 2                                      # no --text option: the default is text
    rc, out, _ = run_cli("search", *attach_args(g), "no such text in this guest 7q!")
    assert rc == 1 and out.splitlines()[-1].startswith("0 match(es)")
    for bad in (["--hex", "xyz"], ["--u16", "0x10000"], ["--phys", "--user", "a"],
                ["--align", "0", "a"], ["--range", "5-1", "a"]):
        rc, out, err = run_cli("search", *attach_args(g), *bad)
        assert rc == 2 and "Traceback" not in err and err.strip(), (bad, err)
    assert g.qmp("query-status")["status"] == "paused"


def test_the_shell_and_gdb_search_as_the_command_line_does(g):
    """One search in `qintrospect shell` (with its `cr3` set) and one as `qi search` inside
    gdb print the command line's rows."""
    import subprocess
    import sys
    from .test_gdb_commands import gdb_batch
    heap = g.probe["regions"]["heap"]
    args = ["--u64", hex(HEAP_VALUE), "--user", "--json"]
    rc, out, err = run_cli("search", *attach_args(g), *args)
    want = out.splitlines()
    with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
        root = vm.cpu.cr3 & ~0xFFF
    script = f"cr3 {root:#x}\nsearch {' '.join(args)}\nquit\n"
    shell = subprocess.run([sys.executable, "-m", "qintrospect", "shell", *attach_args(g)],
                           input=script, capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0, shell.stderr
    assert [ln for ln in shell.stdout.splitlines() if ln.startswith("{")] == want
    parts, err, rc = gdb_batch(g, ("s", "qi search " + " ".join(args)))
    assert [ln for ln in parts["s"].splitlines() if ln.startswith("{")] == want, err
    assert any(int(json.loads(ln)["gva"], 16) == heap["gva"] for ln in want)


def test_a_guest_process_named_by_pid(g):
    """search --guest-pid: the probe's own address space, its root read from the guest
    kernel's memory (the vCPU may run another process)."""
    heap = g.probe["regions"]["heap"]
    rc, out, err = run_cli("search", *attach_args(g), "--guest-pid", str(g.probe["pid"]),
                           "--u64", hex(HEAP_VALUE), "--user", "--json")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert any(int(r["gva"], 16) == heap["gva"] and int(r["gpa"], 16) == heap["gpa"]
               for r in rows), rows
    rc, out, err = run_cli("search", *attach_args(g), "--guest-pid", "1", "--cr3", "0x1000",
                           "a")
    assert rc == 2 and "exclude" in err


def test_runs_of_absent_host_pages_are_skipped_but_not_their_edges(g):
    """Host pages QEMU never touched are zeros proven without a read (pagemap), and search
    looks only at their edges: a pattern that ends in such a page's first zeros, or starts
    in the last zeros before a page with data, is found where a plain scan of every byte
    finds it, and nowhere else."""
    with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
        r = next(r for r in vm.ram_map.ram if r.kind == "ram" and r.end - r.start > 1 << 24)
        pages = (r.end + 1 - r.start) // 4096
        present = [bool(e >> 63) for e in vm.process.pagemap_entries(r.hva, pages)]
        patterns = []            # (pattern, where it starts)
        for k in range(1, pages - 1):
            base = r.start + k * 4096
            if present[k] and not present[k + 1] and len(patterns) == 0:
                page = vm.memory.read(base, 4096)     # its last data, its zeros, 4 beyond
                last = len(page.rstrip(bytes(1))) - 1
                if last >= 31:
                    patterns.append((page[last - 31:] + bytes(4), base + last - 31))
            if not present[k - 1] and present[k] and len(patterns) == 1:
                page = vm.memory.read(base, 4096)     # 4 zeros before, its first data
                first = 4096 - len(page.lstrip(bytes(1)))
                if first < 4064:
                    patterns.append((bytes(4) + page[:first + 32], base - 4))
        assert len(patterns) == 2, "no present page beside an absent one with data at the edge"
        data = b"".join(vm.memory.read(a, min(1 << 20, r.end + 1 - a))
                        for a in range(r.start, r.end + 1, 1 << 20))
    for pattern, where in patterns:
        rc, out, err = run_cli("search", *attach_args(g), "--phys", "--hex", pattern.hex(),
                               "--max", "100000", "--json")
        assert rc == 0, err
        found = sorted(int(row["gpa"], 16) for row in map(json.loads, out.splitlines())
                       if int(row["gpa"], 16) in range(r.start, r.end + 1))
        want, i = [], data.find(pattern)
        while i >= 0:
            want.append(r.start + i)
            i = data.find(pattern, i + 1)
        assert where in found and found == want, (pattern.hex(), hex(where))
