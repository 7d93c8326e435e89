"""A riscv64 Linux guest (Debian 13's riscv64 kernel under qemu-system-riscv64, TCG, OpenSBI)
read from the outside the way an x86 one is: satp, priv and mstatus through the gdbstub, the
tables walked by qintrospect, every answer held to independent sources on the same paused
vCPU: QEMU's own `info mem` (its dump of the tables from satp) and the guest kernel's own
/proc/PID/pagemap and /proc/iomem. (QEMU's gva2gpa is not used: on riscv it sets the A bit
of the leaf it walks.)"""

import json

import pytest

from vm.riscv64.guest import Riscv64Guest

from .conftest import run_cli, run_json

PAGE = 4096
PFN = (1 << 55) - 1


@pytest.fixture(scope="module")
def riscv_guest():
    Riscv64Guest.check_built()      # fails (not skips) when vm/riscv64/build.sh was not run
    with Riscv64Guest(memory="256M") as g:      # a smaller RAM to scan for roots
        g.start_spinner()
        g.kallsyms = {}
        wanted = ("_stext", "schedule", "vfs_read", "do_idle")
        for line in g.run(f"grep -w -E '{'|'.join(wanted)}' /proc/kallsyms").splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[2] in wanted:
                g.kallsyms[fields[2]] = int(fields[0], 16)
        yield g


def attach_args(g):
    return ("--qmp", g.qmp_path, "--gdb", g.gdb_address)


class paused:
    """The VM stopped by its owner for the length of a `with`."""

    def __init__(self, g):
        self.g = g

    def __enter__(self):
        self.g.qmp("stop")

    def __exit__(self, *exc):
        self.g.qmp("cont")


def info_mem(g):
    """QEMU's `info mem`: [(va, pa, size, attrs)] as it dumps satp's tables."""
    rows = []
    for line in g.hmp("info mem").splitlines():
        fields = line.split()
        if len(fields) == 4 and all(c in "0123456789abcdef" for c in fields[0]):
            rows.append((int(fields[0], 16), int(fields[1], 16), int(fields[2], 16), fields[3]))
    return rows


def qemu_pa(rows, va):
    for start, pa, size, _ in rows:
        if start <= va < start + size:
            return pa + (va - start)
    return None


def spinner_addresses(g):
    out = []
    for line in g.probe["maps"]:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        out += [lo, lo + 0x18, (lo + hi) // 2 & ~7, hi - 8]
    return out


def test_cpus_reads_satp_and_the_privilege_level(riscv_guest):
    g = riscv_guest
    rc, (cpu,), err = run_json("cpus", *attach_args(g))
    assert rc == 0, err
    assert cpu["mode"] in ("sv39", "sv48", "sv57") and cpu["privilege"] in ("U", "S")
    assert int(cpu["satp"], 16) >> 60 == {"sv39": 8, "sv48": 9, "sv57": 10}[cpu["mode"]]
    rc, text, err = run_cli("cpus", *attach_args(g))
    assert rc == 0 and "satp" in text and cpu["mode"] in text, err + text


def test_user_pages_agree_with_info_mem_and_the_guests_pagemap(riscv_guest):
    g = riscv_guest
    pid = g.probe["pid"]
    user = spinner_addresses(g)
    own = {va: g.pagemap(pid, va) for va in user}
    for _ in range(20):     # stopped in the spinner (U-mode: its satp), not in the kernel
        with paused(g):
            rc, (cpu,), err = run_json("cpus", *attach_args(g))
            if cpu["privilege"] == "U":
                rc, rows, err = run_json("translate", *attach_args(g), *map(hex, user))
                dump = info_mem(g)
                break
    else:
        pytest.fail("20 stops, none in U-mode: the spinner does not run")
    checked = 0
    for va, row in zip(user, rows):
        if not own[va] >> 63:                  # not present for the kernel either
            continue
        assert not row.get("fault"), (hex(va), row.get("fault"))
        assert int(row["gpa"], 16) >> 12 == own[va] & PFN, hex(va)
        assert qemu_pa(dump, va) == int(row["gpa"], 16), hex(va)
        assert row["user"] is True and row["access"]["u-read"]["allowed"] is True
        checked += 1
    assert checked >= 8


def test_kernel_text_is_where_the_guest_says(riscv_guest):
    """_stext translates to the start of "Kernel code" in the guest's own /proc/iomem, with
    S-mode execute and no U-mode access; QEMU's dump agrees for every kernel symbol."""
    g = riscv_guest
    k = g.kallsyms
    symbols = [k["_stext"], k["schedule"], k["vfs_read"], k["do_idle"]]
    iomem = g.run("grep 'Kernel code' /proc/iomem")
    with paused(g):
        rc, rows, err = run_json("translate", *attach_args(g), *map(hex, symbols))
        dump = info_mem(g)
    assert rc == 0, err
    text = rows[0]
    assert int(text["gpa"], 16) == int(iomem.split("-")[0].strip(), 16), iomem
    for va, row in zip(symbols, rows):
        assert row["access"]["s-execute"]["allowed"] is True, hex(va)
        assert row["access"]["u-read"]["allowed"] is False
        assert row["access"]["u-read"]["error_code"] == "0xd"
        assert qemu_pa(dump, va) == int(row["gpa"], 16), hex(va)
        assert row["value_matches"] is True and row["hpa"]


def test_vmmap_leaves_are_what_translate_and_info_mem_give(riscv_guest):
    g = riscv_guest
    with paused(g):
        rc, rows, err = run_json("vmmap", *attach_args(g), "--leaf")
        assert rc == 0, err
        user = [r for r in rows if r["user"]]
        kernel = [r for r in rows if not r["user"]]
        sample = user[:: max(1, len(user) // 30)] + kernel[:: max(1, len(kernel) // 30)]
        rc, walks, err = run_json("translate", *attach_args(g), *(r["start"] for r in sample))
        dump = info_mem(g)
    assert user and kernel
    for r, w in zip(sample, walks):
        assert (w["gpa"], w["page_size"], w["user"]) == (r["gpa"], r["page_size"], r["user"])
        assert qemu_pa(dump, int(r["start"], 16)) == int(r["gpa"], 16), r
    assert all(int(r["start"], 16) >> 63 for r in kernel)


def test_brief_batch_agrees_with_the_one_address_walks(riscv_guest):
    g = riscv_guest
    addresses = spinner_addresses(g) + [g.kallsyms["_stext"], 0x10, 1 << 62]
    with paused(g):
        rc, full, err = run_json("translate", *attach_args(g), *map(hex, addresses))
        rc_brief, out, err_brief = run_cli("translate", *attach_args(g), "--brief",
                                           *map(hex, addresses))
    brief = [json.loads(line) for line in out.splitlines()]
    assert rc == rc_brief == 1, err + err_brief          # some addresses fault
    assert len(brief) == len(full) == len(addresses)
    for b, f in zip(brief, full):
        if "fault" in f:
            assert b["fault"] == {"level": f["fault"]["level"],
                                  "reason": f["fault"]["reason"]}, (b, f["fault"])
        else:
            assert (b["gpa"], b["page_size"], b["hpa"], b["value"], b["user"], b["writable"],
                    b["executable"]) == (f["gpa"], f["page_size"], f["hpa"], f["value"],
                                         f["user"], f["writable"], f["executable"])
    assert "non-canonical" in {b["fault"]["reason"] for b in brief if "fault" in b}


def test_find_cr3_finds_every_process_by_a_value_only_it_holds(riscv_guest):
    """Each user process's root table, found in RAM by the kernel half it shares with the
    current satp's (no symbols), and picked out by a value of its own stack; for the spinner
    the GPA it gives is the guest kernel's own pagemap answer."""
    g = riscv_guest
    pids = g.user_pids()
    words = {pid: g.stack_word(pid) for pid in pids}
    # the spinner's stack frame stays put; a shell that forks a command gets a new copy of
    # its stack page at its next write
    spinner = g.probe["pid"]
    frame = g.pagemap(spinner, words[spinner][0]) & PFN
    with paused(g):
        rc, everything, err = run_json("find-cr3", *attach_args(g))
        assert rc == 0, err
        found = {}
        for pid, (va, value) in words.items():
            rc, rows, err = run_json("find-cr3", *attach_args(g), "--gva", hex(va),
                                     "--expect", hex(value))
            assert rc == 0 and len(rows) == 1, (pid, rows, err)
            found[pid] = rows[0]
    roots = [r["cr3"] for r in found.values()]
    assert len(set(roots)) == len(pids) >= 3             # init, the console's shell, spinner
    assert set(roots) <= {r["cr3"] for r in everything}
    assert sum(r["is_current"] for r in everything) == 1
    assert int(found[spinner]["gpa"], 16) >> 12 == frame
    rc, text, err = run_cli("find-cr3", *attach_args(g))
    assert rc == 0 and "current satp" in text, err


def test_who_maps_names_the_spinners_stack_page(riscv_guest):
    """who-maps from the spinner's stack frame: its user page in the root found by value,
    and the kernel's linear map (in the shared half); from that root's frame: a page table."""
    g = riscv_guest
    pid = g.probe["pid"]
    va, value = g.stack_word(pid)
    gpa = (g.pagemap(pid, va) & PFN) << 12 | va % PAGE
    with paused(g):
        rc, (root,), err = run_json("find-cr3", *attach_args(g), "--gva", hex(va),
                                    "--expect", hex(value))
        rc, (w,), err = run_json("who-maps", *attach_args(g), "--gpa", hex(gpa))
        assert rc == 0, err
        rc, (t,), err = run_json("who-maps", *attach_args(g), "--gpa", root["cr3"])
    user = [m for m in w["mappings"] if m["half"] == "user"]
    assert [(m["root"], m["gva"], m["user"]) for m in user] == [(root["cr3"], hex(va), True)]
    kernel = [m for m in w["mappings"] if m["half"] == "kernel"]
    assert kernel and all(int(m["gva"], 16) >> 63 and not m["user"] for m in kernel)
    assert any(u["root"] == root["cr3"] and u["half"] == "user" for u in t["page_table_of"])


def test_commands_that_read_other_structures_say_so(riscv_guest):
    g = riscv_guest
    for argv in (("ps",), ("translate", "--slat", "auto", "0x10000")):
        rc, out, err = run_cli(*argv, *attach_args(g))
        assert rc == 2 and "riscv64" in err and "Traceback" not in err, (argv, err)
    rc, out, err = run_cli("translate", "--cr3", "0x1234", "0x10000", *attach_args(g))
    assert rc == 2 and "neither a satp value" in err, err
