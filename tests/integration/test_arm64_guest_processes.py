"""An aarch64 Linux guest's processes read from outside with no symbol files (Debian's arm64
6.1 cloud kernel, whose kallsyms names functions only: BTF and init_task come from its image,
guestos.arm64), held to the guest's own view from inside: /proc/PID/status for the list,
/proc/PID/maps for the VMAs, /proc/PID/pagemap for a translation; and to QEMU's own gva2gpa
on the paused vCPU. One boot (module fixture)."""

import re

import pytest

from vm.arm64.guest import Arm64Guest

from .conftest import run_cli, run_json
from .test_arm64_guest import paused

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def g():
    Arm64Guest.check_built()       # fails (not skips) when vm/arm64/build.sh was not run
    with Arm64Guest() as guest:
        guest.start_spinner()
        yield guest


def args(g):
    return ("--qmp", g.qmp_path, "--gdb", g.gdb_address)


def same_name(proc_name, ours):
    """/proc's Name: and ps's name (a workqueue worker's suffix may change in between)."""
    if proc_name == ours:
        return True
    return proc_name.startswith("kworker/") and \
        re.split(r"[+-]", proc_name, 1)[0] == re.split(r"[+-]", ours, 1)[0]


def test_ps_agrees_with_the_guests_own_proc(g):
    inside = g.proc_status()
    rc, tasks, err = run_json("ps", *args(g))
    assert rc == 0, err
    outside = {t["pid"]: t for t in tasks}
    gone = {pid for pid in set(inside) - set(outside) if pid == g.lister}
    assert set(inside) - set(outside) == gone, (sorted(inside), sorted(outside))
    assert all(outside[p]["kthread"] for p in set(outside) - set(inside))
    both = set(inside) & set(outside)
    assert len(both) > 20
    for pid in both:
        i, o = inside[pid], outside[pid]
        assert (o["ppid"], o["uid"], o["tgid"]) == (i["ppid"], i["uid"], pid), (pid, i, o)
        assert same_name(i["name"], o["name"]) and i["name"].startswith(o["comm"]), (i, o)
    spin = outside[g.probe["pid"]]
    assert spin["comm"] == "sh" and not spin["kthread"] and spin["user_root"] is None
    assert spin["root"] and int(spin["pgd"], 16) >> 48 == 0xFFFF        # the linear map
    assert outside[1]["comm"] == "init" and outside[2]["kthread"] and outside[2]["root"] is None
    # the same keys as on x86
    assert set(spin) == {"pid", "tgid", "ppid", "comm", "name", "state", "uid", "kthread",
                         "task", "mm", "pgd", "root", "user_root", "vcpu", "loaded_on",
                         "pcids", "note"}


def test_the_spinner_is_on_vcpu_0_with_its_root_in_ttbr0(g):
    pid = g.probe["pid"]
    with paused(g):
        rc, (cpu,), err = run_json("cpus", *args(g))
        rc, tasks, err = run_json("ps", *args(g))
    assert rc == 0, err
    spin = next(t for t in tasks if t["pid"] == pid)
    ttbr0 = int(cpu["ttbr0_el1"], 16) & ((1 << 48) - 2)
    if ttbr0 != int(spin["root"], 16):
        pytest.skip("the vCPU was not in the spinner's address space when stopped")
    assert spin["loaded_on"] == [0] and spin["pcids"] == [cpu["pcid"]]
    assert spin["vcpu"] == 0
    assert [t["pid"] for t in tasks if t["vcpu"] == 0] == [pid]


def test_translate_guest_pid_agrees_with_pagemap_and_qemu(g):
    pid = g.probe["pid"]
    maps = g.proc_maps(pid)
    heap = next(line for line in maps if line.endswith("[heap]"))
    text = next(line for line in maps if "r-xp" in line and "busybox" in line)
    stack = next(line for line in maps if line.endswith("[stack]"))
    addresses = [int(text.split("-")[0], 16), int(stack.split("-")[1].split()[0], 16) - 8,
                 int(heap.split("-")[0], 16)]
    own = {va: g.pagemap(pid, va) for va in addresses}
    with paused(g):
        rc, rows, err = run_json("translate", *args(g), "--guest-pid", pid,
                                 *map(hex, addresses))
        rc2, (cpu,), _ = run_json("cpus", *args(g))
        qemu = {va: g.hmp(f"gva2gpa {va:#x}") for va in addresses}
    assert len(rows) == len(addresses), err
    checked = 0
    for va, row in zip(addresses, rows):
        entry = own[va]
        if not entry >> 63:
            assert row.get("fault"), (hex(va), row)
            continue
        assert int(row["gpa"], 16) >> 12 == entry & ((1 << 55) - 1), (hex(va), row)
        assert row["user"] is True
        checked += 1
        # QEMU walks the vCPU's own TTBR0: only when it holds the spinner's tables
        m = re.search(r"gpa: (0x[0-9a-f]+)", qemu[va])
        if m and cpu["cpl"] == 0 and int(row["cr3"], 16) == \
                int(cpu["ttbr0_el1"], 16) & ((1 << 48) - 2):
            assert int(m.group(1), 16) == int(row["gpa"], 16), (hex(va), qemu[va])
    assert checked >= 2


def test_vmmap_guest_pid_lists_proc_maps(g):
    pid = g.probe["pid"]
    inside = g.proc_maps(pid)
    rc, out, err = run_json("vmmap", *args(g), "--guest-pid", pid, "--user")
    assert rc == 0, err
    vmas = [o for o in out if "maps_line" in o]
    assert [v["maps_line"].split() for v in vmas] == [line.split() for line in inside]
    assert {"[heap]", "[stack]", "[vdso]", "[vvar]"} <= {v["path"] for v in vmas}
    rc, plain, err = run_cli("ps", *args(g))
    assert rc == 0 and "6.1.0" in plain and "cloud-arm64" in plain, err


def test_an_idle_vcpu_gives_no_process_its_lazy_ttbr0(g):
    """In the kernel SP_EL0 is `current`: with the spinner gone the vCPU idles (init_task,
    not listed) and its TTBR0 still holds the last process's tables; no process gets it."""
    g.run(f"kill {g.probe['pid']}")
    try:
        with paused(g):
            rc, (cpu,), err = run_json("cpus", *args(g))
            rc, tasks, err = run_json("ps", *args(g))
        assert rc == 0, err
        if cpu["cpl"] == 1:
            # at most the task SP_EL0 names (the console's shell may be current, about to
            # sleep: state S while still on the CPU); never one for a lazy TTBR0 alone
            running = [t for t in tasks if t["vcpu"] == 0]
            assert len(running) <= 1, running
    finally:
        g.start_spinner()
