"""An aarch64 Linux guest (Debian's arm64 cloud kernel under qemu-system-aarch64, TCG) read from
the outside the way an x86 one is: its registers through the gdbstub, its tables walked by
qintrospect, every answer held to independent sources on the same paused vCPU: QEMU's own
`gva2gpa` (its walker, as an EL1 read) and the guest kernel's own /proc/PID/pagemap."""

import json
import re

import pytest

from vm.arm64.guest import Arm64Guest

from .conftest import run_cli, run_json

PAGE = 4096


@pytest.fixture(scope="module")
def arm64_guest():
    Arm64Guest.check_built()       # fails (not skips) when vm/arm64/build.sh was not run
    with Arm64Guest() as g:
        g.start_spinner()
        g.kallsyms = {}
        # (Debian's arm64 kernel lists functions only: no CONFIG_KALLSYMS_ALL)
        wanted = ("_stext", "schedule", "vfs_read", "do_idle", "start_kernel")
        for line in g.run(f"grep -w -E '{'|'.join(wanted)}' /proc/kallsyms").splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[2] in wanted:
                g.kallsyms[fields[2]] = int(fields[0], 16)
        yield g


def qemu_gva2gpa(g, va):
    """QEMU's own answer for va on the paused vCPU (None: it says the page is unmapped)."""
    out = g.hmp(f"gva2gpa {va:#x}")
    m = re.search(r"gpa: (0x[0-9a-f]+)", out)
    return int(m.group(1), 16) if m else None


def attach_args(g):
    return ("--qmp", g.qmp_path, "--gdb", g.gdb_address)


def spinner_addresses(g):
    """A few addresses in each of the spinner's mappings (text, data, heap, stack, vdso)."""
    out = []
    for line in g.probe["maps"]:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        out += [lo, lo + 0x18, (lo + hi) // 2 & ~7, hi - 8]
    return out


def paused(g):
    """The VM stopped by its owner for the length of a `with`; its vCPU where it was."""
    class Pause:
        def __enter__(self):
            g.qmp("stop")

        def __exit__(self, *exc):
            g.qmp("cont")
    return Pause()


def test_cpus_reads_the_el1_translation_registers(arm64_guest):
    g = arm64_guest
    rc, cpus, err = run_json("cpus", *attach_args(g))
    assert rc == 0, err
    (cpu,) = cpus
    assert cpu["mode"] == "aarch64-4k-48"            # the cloud kernel: 4 KiB, 48-bit VA
    assert "M" in cpu["sctlr_bits"]
    assert int(cpu["ttbr1_el1"], 16) & ~1 & ((1 << 48) - 1)
    rc, text, err = run_cli("cpus", *attach_args(g))
    assert rc == 0 and "TTBR1_EL1" in text and "aarch64-4k-48" in text, err + text


def qemu_kind(cpus_row):
    """QEMU's gva2gpa walks as a data read at the vCPU's own exception level (its current
    MMU index): at EL0 kernel pages do not translate for it, at EL1 PAN applies."""
    return "el0-read" if cpus_row["cpl"] == 0 else "el1-read"


def check_against_qemu(g, addresses):
    """translate --json on the paused VM; each GPA held to QEMU's gva2gpa for the access
    QEMU walks as. Returns the rows and the vCPU's `cpus` row."""
    with paused(g):
        rc, (cpu,), err = run_json("cpus", *attach_args(g))
        expected = {va: qemu_gva2gpa(g, va) for va in addresses}
        rc, rows, err = run_json("translate", *attach_args(g), *(hex(va) for va in addresses))
        again = {va: qemu_gva2gpa(g, va) for va in addresses}
    assert again == expected                      # the VM did not move under us
    assert len(rows) == len(addresses), err
    kind = qemu_kind(cpu)
    for va, row in zip(addresses, rows):
        ours = None if row.get("fault") or not row["access"][kind]["allowed"] \
            else int(row["gpa"], 16)
        assert ours == expected[va], (hex(va), kind, row.get("fault"), row.get("gpa"))
    return rows, cpu


def test_user_addresses_agree_with_qemu(arm64_guest):
    g = arm64_guest
    user = spinner_addresses(g)
    rows, cpu = check_against_qemu(g, user)
    assert sum(1 for r in rows if not r.get("fault")) >= 8
    assert all(r["cr3"] == cpu["ttbr0_el1"] for r in rows)
    for r in rows:
        if not r.get("fault"):
            assert r["user"] is True and r["value_matches"] in (True, None) and r["hpa"]


def test_kernel_addresses_at_el1_agree_with_qemu(arm64_guest):
    """With no user process running the vCPU idles in the kernel (EL1), where QEMU's own
    walk reads kernel pages too."""
    g = arm64_guest
    k = g.kallsyms
    # the kernel image's text (start_kernel's init text is freed after boot)
    kernel = [k["_stext"], k["_stext"] + 0x1234, k["schedule"], k["vfs_read"], k["do_idle"],
              k["start_kernel"]]
    g.run(f"kill {g.probe['pid']}")
    try:
        rows, cpu = check_against_qemu(g, kernel)
    finally:
        g.start_spinner()
    assert cpu["cpl"] == 1, cpu
    text = rows[0]
    assert text["cr3"] == cpu["ttbr1_el1"] and text["mode"] == "aarch64-4k-48"
    assert text["user"] is False and text["executable"] is True
    assert text["access"]["el1-execute"]["allowed"] is True
    assert text["access"]["el0-read"]["allowed"] is False
    # _stext is the start of "Kernel code" in the guest's own /proc/iomem
    iomem = g.run("grep 'Kernel code' /proc/iomem")
    assert int(text["gpa"], 16) == int(iomem.split("-")[0], 16), iomem
    assert all(r["value_matches"] is True and r["hpa"] for r in rows if not r.get("fault"))


def test_user_pages_match_the_guest_kernels_own_pagemap(arm64_guest):
    g = arm64_guest
    pid = g.probe["pid"]
    user = [va for va in spinner_addresses(g)]
    own = {va: g.pagemap(pid, va) for va in user}
    with paused(g):
        # the vCPU runs the spinner most of the time, but find its TTBR0 from the kernel's
        # answer rather than hoping: --cr3 takes TTBR0_EL1's value
        rc, rows, err = run_json("translate", *attach_args(g), *(hex(va) for va in user))
    # the guest's answers are read while it runs: a page that moved meanwhile (khugepaged, a
    # first write to a zero page) says nothing, so only pages the kernel gave twice count
    again = {va: g.pagemap(pid, va) for va in user}
    checked = 0
    for va, row in zip(user, rows):
        entry = own[va]
        if not entry >> 63 or again[va] != entry:     # not present, or moved while read
            continue
        if row.get("fault"):
            pytest.skip("the vCPU was not in the spinner when stopped (another TTBR0)")
        assert int(row["gpa"], 16) >> 12 == entry & ((1 << 55) - 1), hex(va)
        checked += 1
    assert checked >= 4


def test_vmmap_leaves_agree_with_qemu(arm64_guest):
    """Every listed leaf is what the one-address walk gives there, and QEMU's own walk (as the
    access it walks as: an EL0 read, or an EL1 one with PAN) agrees."""
    g = arm64_guest
    with paused(g):
        rc, (cpu,), err = run_json("cpus", *attach_args(g))
        rc, rows, err = run_json("vmmap", *attach_args(g), "--leaf")
        assert rc == 0, err
        user = [r for r in rows if r["user"]]
        kernel = [r for r in rows if not r["user"]]
        assert user and kernel
        sample = user[:: max(1, len(user) // 40)] + kernel[:: max(1, len(kernel) // 40)]
        rc, walks, err = run_json("translate", *attach_args(g), *(r["start"] for r in sample))
        qemu = [qemu_gva2gpa(g, int(r["start"], 16)) for r in sample]
    kind = qemu_kind(cpu)
    for r, w, q in zip(sample, walks, qemu):
        assert (w["gpa"], w["page_size"], w["user"]) == (r["gpa"], r["page_size"], r["user"])
        assert q == (int(r["gpa"], 16) if w["access"][kind]["allowed"] else None), (r, kind)
    assert all(int(r["start"], 16) >> 63 for r in kernel)
    assert all(not int(r["start"], 16) >> 63 for r in user)


def test_brief_batch_agrees_with_the_one_address_walks(arm64_guest):
    """translate --brief (the numpy batch walk, both ranges) line for line against --json."""
    g = arm64_guest
    addresses = spinner_addresses(g) + [g.kallsyms["_stext"], g.kallsyms["schedule"],
                                        0xffff000040000000, 0x0000800000000000, 0x10]
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
            assert (b["gpa"], b["page_size"], b["hpa"], b["value"], b["user"],
                    b["writable"], b["executable"]) == \
                (f["gpa"], f["page_size"], f["hpa"], f["value"], f["user"], f["writable"],
                 f["executable"])
    reasons = {b["fault"]["reason"] for b in brief if "fault" in b}
    assert "translation" in reasons


def test_search_finds_what_a_plain_scan_of_the_user_pages_finds(arm64_guest):
    """search over the user half, held to a plain Python scan of the same leaves' bytes;
    busybox's ELF header is where the guest's own /proc/PID/maps puts it."""
    import qintrospect
    g = arm64_guest
    magic = b"\x7fELF"
    with paused(g):
        rc, rows, err = run_json("search", *attach_args(g), "--hex", magic.hex(), "--user")
        with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
            plain = []
            for m in vm.mappings():
                if not m.user:
                    continue
                data = vm.read_phys(m.pa, m.size)
                at = data.find(magic)
                while at >= 0:
                    plain.append(m.va + at)
                    at = data.find(magic, at + 1)
    assert rc == 0, err
    assert sorted(int(r["gva"], 16) for r in rows) == sorted(plain)
    assert 0x400000 in plain and all(r["user"] for r in rows)


def test_find_cr3_finds_every_process_by_a_value_only_it_holds(arm64_guest):
    """Each user process's TTBR0 table, found in RAM by its shape with no symbols, and picked
    out by a value of its own stack; for the spinner the GPA it gives is the guest kernel's own
    pagemap answer, and its root the TTBR0_EL1 the vCPU runs it with."""
    g = arm64_guest
    pids = g.user_pids()
    words = {pid: g.stack_word(pid) for pid in pids}
    # the spinner's stack frame stays put; a shell that forks a command (the console's, which
    # runs these) gets a new copy of its stack page at the next write after each fork
    spinner = g.probe["pid"]
    frame = g.pagemap(spinner, words[spinner][0]) & ((1 << 55) - 1)
    with paused(g):
        rc, (cpu,), err = run_json("cpus", *attach_args(g))
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
    assert int(found[spinner]["gpa"], 16) >> 12 == frame
    if cpu["cpl"] == 0:                                    # stopped in the spinner
        assert found[g.probe["pid"]]["cr3"] == cpu["root"]
        assert found[g.probe["pid"]]["is_current"] is True
    rc, text, err = run_cli("find-cr3", *attach_args(g))
    assert rc == 0 and "TTBR0 0x" in text and "current TTBR0" in text, err


def test_who_maps_names_each_mapping_of_a_stack_page(arm64_guest):
    """who-maps from the spinner's stack frame: the spinner's own user page (its root found
    by value) and the kernel's linear map; from its TTBR0 table's frame: that it is a page
    table."""
    g = arm64_guest
    pid = g.probe["pid"]
    va, value = g.stack_word(pid)
    gpa = (g.pagemap(pid, va) & ((1 << 55) - 1)) << 12 | va % PAGE
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
    assert {"root": root["cr3"], "level": "L0", "half": "user",
            "roots": [root["cr3"]]} in t["page_table_of"]
    rc, text, err = run_cli("who-maps", *attach_args(g), "--gpa", hex(gpa))
    assert rc == 0 and f"GVA {va:#018x}" in text, err + text


def test_x86_only_commands_say_so(arm64_guest):
    """--slat walks an x86 host's EPT/NPT (an aarch64 guest's hypervisor stage 2 is walked by
    translate itself, on a vCPU stopped inside that guest: test_kvm_arm64.py); ps reads
    aarch64 guests too (test_arm64_guest_processes.py)."""
    g = arm64_guest
    rc, out, err = run_cli("translate", "--slat", "auto", "0x400000", *attach_args(g))
    assert rc == 2 and "aarch64" in err and "Traceback" not in err, err
