"""Issue 22 on a real QEMU: the guest's own processes, read from its kernel's memory with no
symbol files, checked against the guest's own view from inside (its console: /proc/PID/status
and /proc/PID/maps) and against the probe, which prints its GVAs and the GPAs its own
/proc/self/pagemap gives.

Three guests: the bundled 6.1 kernel under -cpu max (5-level paging, no KPTI under TCG's
AMD-like CPU) and under -cpu qemu64 with `pti=on` (4-level, KPTI: every process has a kernel
and a user copy of its table), and Debian's 6.12 cloud kernel (vm/kernel612.sh) booting the
same initramfs: other task_struct and mm_struct layouts, pcpu_hot, the same code path.
"""

import json
import os
import re

import pytest

from vm.guest import default_cache_dir

from .conftest import attach_args, booted, run_cli, run_json

pytestmark = pytest.mark.vm

USER_REGIONS = ("heap", "stack", "rodata", "thp", "text")


KERNEL_612 = os.path.join(default_cache_dir(), "kernel-6.12")


@pytest.fixture(scope="module", params=[("max", "", None), ("qemu64", "pti=on", None),
                                        ("max", "", KERNEL_612)],
                ids=["max", "qemu64-pti", "6.12"])
def g(request):
    cpu, append, kernel = request.param
    if kernel is not None and not os.path.isfile(os.path.join(kernel, "vmlinuz")):
        pytest.skip(f"Debian's 6.12 kernel is not in {kernel}: run vm/kernel612.sh")
    with booted(cpu, append_extra=append, kernel=kernel) as guest:
        guest.kpti = "pti=on" in append
        guest.release = guest.run("uname -r").strip()
        yield guest


def same_name(proc_name, ours):
    """/proc's Name: and ps's name. A workqueue worker's name says which workqueue it worked
    for last, and `+` while it works: that may change between the two reads, the comm
    before it may not."""
    if proc_name == ours:
        return True
    return proc_name.startswith("kworker/") and \
        re.split(r"[+-]", proc_name, 1)[0] == re.split(r"[+-]", ours, 1)[0]


def ps(g):
    rc, tasks, err = run_json("ps", *attach_args(g))
    assert rc == 0, err
    return {t["pid"]: t for t in tasks}


def test_ps_agrees_with_the_guests_own_proc(g):
    inside = g.proc_status()
    outside = ps(g)
    # the grep that listed /proc from inside is gone when we look from outside
    gone = {pid for pid in set(inside) - set(outside) if pid == g.lister}
    assert set(inside) - set(outside) == gone, (sorted(inside), sorted(outside))
    # anything the outside sees that the inside did not: kernel threads started since
    extra = set(outside) - set(inside)
    assert all(outside[p]["kthread"] for p in extra), {p: outside[p] for p in extra}
    both = set(inside) & set(outside)
    assert len(both) > 20
    for pid in both:
        i, o = inside[pid], outside[pid]
        assert (o["ppid"], o["uid"]) == (i["ppid"], i["uid"]), (pid, i, o)
        assert same_name(i["name"], o["name"]), (pid, i, o)
        assert i["name"].startswith(o["comm"]), (pid, i, o)
        assert o["tgid"] == pid
    probe = outside[g.probe["pid"]]
    assert probe["comm"] == "probe" and not probe["kthread"] and probe["root"]
    assert outside[2]["comm"] == "kthreadd" and outside[2]["kthread"] and outside[2]["root"] is None
    assert outside[1]["comm"] == "init" and not outside[1]["kthread"]


def test_ps_threads_agrees_with_the_guests_own_task_folders(g):
    inside = g.proc_status(threads=True)
    rc, tasks, err = run_json("ps", *attach_args(g), "--threads")
    assert rc == 0, err
    outside = {t["pid"]: t for t in tasks}
    gone = {pid for pid in set(inside) - set(outside) if pid == g.lister}
    assert set(inside) - set(outside) == gone
    assert all(outside[p]["kthread"] for p in set(outside) - set(inside))
    for pid in set(inside) & set(outside):
        assert (outside[pid]["tgid"], outside[pid]["ppid"]) == \
            (inside[pid]["tgid"], inside[pid]["ppid"]), pid


def test_roots_and_kpti_copies(g):
    outside = ps(g)
    users = [t for t in outside.values() if not t["kthread"]]
    assert users and all(t["root"] for t in users)
    for t in users:
        root = int(t["root"], 16)
        if g.kpti:
            assert t["user_root"] == f"{root + 0x1000:#x}", t
        else:
            assert t["user_root"] is None, t
    if g.kpti:
        assert "isolation: enabled" in g.run("dmesg | grep -i 'page tables isolation'")


def test_the_spinning_probe_runs_on_vcpu_0(g):
    # the probe spins: most reads find it on vCPU 0; a few tries for the moments it is not
    for _ in range(10):
        probe = ps(g)[g.probe["pid"]]
        if probe["vcpu"] == 0:
            break
    assert probe["vcpu"] == 0 and probe["loaded_on"] == [0], probe


def test_translate_guest_pid_gives_the_gpas_the_probe_reports(g):
    regions = g.probe["regions"]
    addresses = [hex(regions[n]["gva"]) for n in USER_REGIONS]
    for option in (["--guest-pid", str(g.probe["pid"])], ["--guest-comm", "probe"]):
        rc, out, err = run_json("translate", *attach_args(g), *option, *addresses)
        assert rc == 0, err
        for name, t in zip(USER_REGIONS, out):
            assert t["gva"] == f"{regions[name]['gva']:#x}"
            assert int(t["gpa"], 16) == regions[name]["gpa"], (name, t["root"])
            if g.kpti:                  # user addresses: through the KPTI user copy
                assert int(t["root"], 16) % 0x2000 == 0x1000, t["root"]


def test_read_and_find_cr3_by_guest_pid(g):
    heap = g.probe["regions"]["heap"]
    pid = str(g.probe["pid"])
    rc, pieces, err = run_json("read", *attach_args(g), "--guest-pid", pid, hex(heap["gva"]), 8)
    assert rc == 0, err
    assert bytes.fromhex(pieces[0]["data"]) == heap["value"].to_bytes(8, "little")
    rc, cands, err = run_json("find-cr3", *attach_args(g), "--guest-pid", pid,
                              "--gva", hex(heap["gva"]), "--expect", hex(heap["value"]))
    assert rc == 0, err
    assert cands and all(c["value_matches"] for c in cands)


def test_vmmap_guest_pid_lists_proc_maps_line_by_line(g):
    pid = g.probe["pid"]
    inside = g.proc_maps(pid)
    rc, out, err = run_json("vmmap", *attach_args(g), "--guest-pid", pid, "--user")
    assert rc == 0, err
    vmas = [o for o in out if "maps_line" in o]
    assert [v["maps_line"].split() for v in vmas] == [line.split() for line in inside]
    heap = g.probe["regions"]["heap"]
    holder = next(v for v in vmas if int(v["start"], 16) <= heap["gva"] < int(v["end"], 16))
    assert holder["path"] == "[heap]" and holder["mapped_pages"] >= 1 and not holder["differs"]
    text = next(v for v in vmas if v["path"] == "/probe" and "x" in v["perms"])
    assert text["mapped_pages"] >= 1
    page = os.path.join(g.tmpdir, "map.html")
    rc, plain, err = run_cli("vmmap", *attach_args(g), "--guest-pid", pid, "--user",
                             "--html", page)
    assert rc == 0, err
    with open(page) as f:
        html = f.read()
    data = json.loads(re.search(r'id="qi-data">(.*?)</script>', html, re.S).group(1))
    assert "[heap]" in data["vma"] and "/probe" in data["vma"]          # the ranges labelled
    assert f"VMAs of guest process {pid} (probe)" in html
    assert f"# VMAs of guest process {pid} (probe), as /proc/{pid}/maps lists them" in plain
    for line in inside:
        assert any(row.split()[:len(line.split())] == line.split()
                   for row in plain.splitlines()), line


def test_who_maps_names_the_process(g):
    heap = g.probe["regions"]["heap"]
    rc, out, err = run_json("who-maps", *attach_args(g), "--gpa", hex(heap["gpa"]))
    assert rc == 0, err
    probe = ps(g)[g.probe["pid"]]
    roots = {probe["root"], probe["user_root"]}
    mine = [m for m in out[0]["mappings"] if m["half"] == "user" and m["root"] in roots]
    assert mine and all(m["processes"] == [{"pid": g.probe["pid"], "comm": "probe"}]
                        for m in mine), out[0]["mappings"]
    # another root's user half mapping the page (the kernel's real-mode trampoline table maps
    # low memory one to one) names no process
    others = [m for m in out[0]["mappings"] if m["half"] == "user" and m["root"] not in roots]
    assert all(m["processes"] == [] for m in others), others
    rc, text, err = run_cli("who-maps", *attach_args(g), "--gpa", hex(heap["gpa"]))
    assert f"pid {g.probe['pid']} (probe)" in text


def test_a_name_several_processes_share_is_exit_2_listing_them(g):
    g.run("sleep 600 & sleep 601 &")
    pids = sorted(p for p, e in g.proc_status().items() if e.get("name") == "sleep")
    try:
        rc, out, err = run_cli("translate", *attach_args(g), "--guest-comm", "sleep", "0x400000")
        assert rc == 2, (out, err)
        assert f"{len(pids)} guest processes have comm 'sleep'" in err
        for pid in pids:
            assert f"{pid} (sleep)" in err
        rc, out, err = run_cli("translate", *attach_args(g), "--guest-pid", "99999", "0x400000")
        assert rc == 2 and "no guest process with pid 99999" in err
        rc, out, err = run_cli("translate", *attach_args(g), "--guest-comm", "kthreadd", "0x1000")
        assert rc == 2 and "kernel thread" in err
    finally:
        g.run("kill " + " ".join(map(str, pids)))


def test_the_second_ps_uses_what_the_first_kept(g):
    rc, first, err = run_cli("ps", *attach_args(g))
    rc, second, err = run_cli("ps", *attach_args(g))
    assert rc == 0, err
    assert "cached for this boot" in second.splitlines()[0]
    assert f"guest kernel {g.release} " in second.splitlines()[0]


def test_the_shell_takes_a_guest_process_for_cr3(g):
    heap = g.probe["regions"]["heap"]
    script = f"cr3 pid {g.probe['pid']}\ntranslate --json {heap['gva']:#x}\nps --json\n"
    rc, out, err = run_cli("shell", *attach_args(g), input=script)
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert int(lines[0]["gpa"], 16) == heap["gpa"]
    assert any(t.get("comm") == "probe" for t in lines[1:])


def test_ps_on_a_running_vm_whose_processes_come_and_go():
    """No gdb, no --freeze: the VM runs while its task list is read, two vCPUs, and a loop in
    the guest forks and reaps a process all the while. Every ps ends with a list (exit 0) or a
    list read in part and a note (exit 1), never a hang or a traceback; with --freeze (one
    still view) the vCPUs agree with their CR3s."""
    with booted("max", smp=2) as g:
        g.run("while true; do ( : ); done >/dev/null 2>&1 &")
        churn = g.run("echo $!").strip()
        try:
            statuses = []
            for _ in range(6):
                rc, out, err = run_cli("ps", "--qmp", g.qmp_path, "--json")
                assert rc in (0, 1), err
                assert "Traceback" not in err and "bug in qintrospect" not in err, err
                if rc == 1:
                    assert "read only in part" in err, err
                assert "the VM ran while the list was read" in err
                tasks = [json.loads(line) for line in out.splitlines()]
                assert {1, 2, g.probe["pid"]} <= {t["pid"] for t in tasks}
                statuses.append(rc)
            rc, tasks, err = run_json("ps", "--qmp", g.qmp_path, "--freeze")
            assert rc == 0, err
            on = [t for t in tasks if t["vcpu"] is not None]
            assert len({t["vcpu"] for t in on}) == len(on) <= 2, on
            shell = next(t["ppid"] for t in tasks if t["pid"] == g.probe["pid"])
            for t in on:
                # a user task running has its root in that vCPU's CR3; but the loop's own
                # children fork and exit all the time: one caught in do_exit after exit_mm
                # (mm gone, or not yet switched away from) may not
                churn = t["ppid"] == shell and t["comm"] == "sh"
                if not t["kthread"] and t["root"] and not churn:
                    assert t["vcpu"] in t["loaded_on"], t
            print(f"exit statuses of 6 ps on a running VM: {statuses}")
        finally:
            g.run(f"kill {churn}")


def test_who_maps_and_report_take_a_guest_process(g, tmp_path):
    heap = g.probe["regions"]["heap"]
    pid = str(g.probe["pid"])
    rc, out, err = run_json("who-maps", *attach_args(g), "--gpa", hex(heap["gpa"]),
                            "--guest-pid", pid)
    assert rc == 0, err
    probe = ps(g)[g.probe["pid"]]
    assert set(out[0]["roots"]) == {r for r in (probe["root"], probe["user_root"]) if r}
    assert any(m["gva"] == f"{heap['gva']:#x}" for m in out[0]["mappings"])
    page = tmp_path / "r.html"
    rc, text, err = run_cli("report", *attach_args(g), "--guest-comm", "probe",
                            "--out", str(page), hex(heap["gva"]))
    assert rc == 0, err
    html = page.read_text()
    assert f"pid {pid} (probe)" in html and f"{heap['gpa']:#x}" in html
