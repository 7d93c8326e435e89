#!/usr/bin/env python3
"""qintrospect benchmark: boots the bundled guest and measures qintrospect beside QEMU's monitor.

Measured (each in a fresh child process, so that each peak RSS is its own):

1. one translation: qintrospect through the gdbstub (via="gdb") and the direct path
   (via="direct"), `vm.translate(gva)` repeated, median/p90; HMP `gva2gpa` over QMP
   (qemu.qmp's legacy QEMUMonitorProtocol, one connection) repeated; one whole
   `qintrospect translate` command, process start to exit.
2. a batch of 100,000 addresses (the probe's pages, the kernel's direct map, ~5% faulting) through
   `vm.translate_many()`, beside a loop of HMP `gva2gpa` over a spread sample of the same
   addresses (timed on a few thousand calls, extrapolated to the batch); ratio.
3. the whole address space: `list(vm.mappings())` (direct and gdb paths) and the
   `qintrospect vmmap --leaf --json` command beside HMP `info tlb`; ratio.
4. the find-cr3 scan rate (`vm.find_cr3()`, direct path) on the 256 MiB guest and on a 2 GiB guest
   (as booted, and after the guest filled its RAM so that it is present on the host).
5. the peak RSS (ru_maxrss) of every measurement's process.
6. the guest's own processes on a 1 GiB guest (issue 22): the first `qintrospect ps` (the
   guest kernel's note, kallsyms and BTF found), a later one (what was kept), and
   `translate --guest-pid` beside `translate --cr3` with the same root.

The VM is paused with QMP `stop` for all measurements, so both sides see a still VM (attaching gdb
would stop it anyway; qintrospect leaves a VM it found paused paused). Targets are printed beside
the figures and marked met / not met; nothing is asserted. QEMU's answers are read with
qintrospect's own parsers (qintrospect.connect.qmp), and set against qintrospect's in the same run.

    scripts/bench [--json] [--quick] [--cpu max|qemu64] [--profile NAME,...]

Progress goes to stderr, the table (or, with --json, one JSON object) to stdout. The JSON holds
`bench` (parameters, targets, guests), `rows` (the table: each row's `result` text, `peak_rss_mb`,
`target`, and `met`: true / false / null where there is no target), `checks` (qintrospect against
QEMU in the same run: name -> true / false), `notes` and `measurements` (every figure measured).
--quick boots the 256 MiB and 1 GiB guests (no 2 GiB scans) with smaller N: about 1-3 min.
Internal: `bench.py --one NAME --ctx FILE [--profile-out FILE]` runs one measurement and prints
one `BENCH-RESULT {json}` line.
"""

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MASK64 = (1 << 64) - 1
PAGE = 4096
MB = 1000 * 1000            # figures in MB are 10^6 bytes; GB/s is 10^9 bytes a second
RESULT_TAG = "BENCH-RESULT "

TARGETS = {
    "single_gdb_ms": 3.0,        # one translation through the gdbstub alone: <= 3 ms
    "batch_ratio": 200.0,        # batch >= 200x the HMP gva2gpa loop
    "map_ratio": 1.0,            # whole map no slower than info tlb: <= 1.0x
    "scan_mb_s": 1000.0,         # scan >= 1 GB/s
    "scan_2g_rss_mb": 200.0,     # peak RSS < 200 MB for the 2 GiB scan
    "slat_s_per_gib": 2.0,       # second-level root found over 1 GiB of RAM in <= 2 s
    "slat_walk_ratio": 2.0,      # second-level walk <= 2x the process-table walk, per address
    "slat_batch_ratio": 1.5,     # a batch's GPAs through an EPT <= 1.5x its guest walk, at once
    "help_s": 0.1,               # `qintrospect --help` <= 0.1 s
    "translate_vs_gdb": 0.75,    # one translate command <= 0.75x a bare gdb attach + disconnect
    "shell_vs_gva2gpa": 1.0,     # one translate in the shell <= 1.0x one HMP gva2gpa round trip
    "json_batch_ratio": 100.0,   # translate --json - (full detail) >= 100x the gva2gpa loop
    "brief_batch_ratio": 300.0,  # translate --brief - (the summary) >= 300x the gva2gpa loop
    "vmmap_vs_ptdump": 1.0,      # vmmap --json <= 1.0x gdb-pt-dump's pt, start to exit
    "who_maps_s": 1.0,           # who-maps over all roots of the 256 MiB guest <= 1 s
    "search_mb_s": 1000.0,       # search of one address space >= 1 GB/s
    "ps_first_s": 1.0,           # the first `qintrospect ps` on the 1 GiB guest <= 1 s
    "ps_later_s": 0.2,           # a later one (the guest kernel's facts kept) <= 0.2 s
    "guest_pid_extra_ms": 20.0,  # translate --guest-pid <= 20 ms more than --cr3
}

FULL = dict(n_single_gdb=300, n_single_direct=1000, n_single_hmp=500, cli_reps=5,
            batch_n=100_000, hmp_loop_n=3000, map_reps=5, tlb_reps=10, map_cli_reps=3,
            scan_reps=3, json_n=100_000, json_reps=5)
QUICK = dict(n_single_gdb=50, n_single_direct=200, n_single_hmp=100, cli_reps=2,
             batch_n=20_000, hmp_loop_n=400, map_reps=2, tlb_reps=3, map_cli_reps=1,
             scan_reps=2, json_n=100_000, json_reps=3)   # the JSON target is stated for 100,000 addresses


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def summary(seconds):
    s = sorted(seconds)
    n = len(s)
    return {"n": n, "median_ms": statistics.median(s) * 1e3,
            "p90_ms": s[max(0, math.ceil(0.9 * n) - 1)] * 1e3,
            "min_ms": s[0] * 1e3, "max_ms": s[-1] * 1e3, "mean_ms": statistics.fmean(s) * 1e3}


# =============================================================================================
# Child side: one measurement per process
# =============================================================================================

def _attach(ctx, via):
    import qintrospect
    return qintrospect.attach(qmp=ctx["qmp"], gdb=ctx["gdb"], pid=ctx["pid"], via=via,
                              timeout=10.0)


def _monitor(ctx):
    """One legacy QMP connection (QEMU serves one QMP client at a time)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    mon = QEMUMonitorProtocol(ctx["qmp"])
    mon.connect()            # no timeout of its own: the parent's per-child timeout covers it
    mon.settimeout(30)
    status = mon.cmd("query-status")
    if status.get("running"):
        raise RuntimeError(f"the VM is running ({status}); the bench expects it paused")
    return mon


def _hmp(mon, line):
    return mon.cmd("human-monitor-command", **{"command-line": line})


def _gva2gpa(mon, gva):
    """HMP gva2gpa, read by qintrospect's own parser (None: "Unmapped"; "gpa: 0" is 0)."""
    from qintrospect.machine.monitor_text import parse_gva2gpa
    return parse_gva2gpa(_hmp(mon, f"gva2gpa {gva:#x}"))


def _cr3(mon):
    """CR3 from HMP info registers, read by qintrospect's own parser."""
    from qintrospect.machine.monitor_text import parse_registers
    return parse_registers(_hmp(mon, "info registers"))["CR3"]


def _qintrospect_cli():
    exe = os.path.join(os.path.dirname(sys.executable), "qintrospect")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "qintrospect"]


def run_timed(argv, timeout, stdin_path=None, counts=None):
    """Run a command, process start to exit: (seconds, exit status, stdout bytes, maxrss KiB).
    The process's own rusage comes from wait4; a timer kills it (and its group) on timeout.
    With `counts` (a dict), stdout is read as a consumer would and not kept: counts gets
    "bytes" and "lines", and only its first MiB is returned."""
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=stdin, start_new_session=True)
    if stdin_path:
        stdin.close()
    killed = []

    def kill():
        killed.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        if counts is None:
            out = proc.stdout.read()
        else:
            out, counts["bytes"], counts["lines"] = b"", 0, 0
            while True:
                piece = proc.stdout.read1(1 << 20)
                if not piece:
                    break
                if len(out) < 1 << 20:
                    out += piece
                counts["bytes"] += len(piece)
                counts["lines"] += piece.count(b"\n")
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if killed:
        raise TimeoutError(f"{' '.join(argv[:2])} did not finish within {timeout} s")
    return elapsed, proc.returncode, out, usage.ru_maxrss


def m_baseline(ctx):
    """Python + qintrospect + qemu.qmp imported, no VM: the floor under every RSS figure."""
    import qemu.qmp.legacy  # noqa: F401  (what every measurement imports)
    import qintrospect
    return {"qintrospect": qintrospect.__file__}


def _single(ctx, via, n):
    gva, expect = ctx["gva"], ctx["expect"]
    t0 = time.perf_counter()
    vm = _attach(ctx, via)
    try:
        attach_s = time.perf_counter() - t0
        first = vm.translate(gva)
        if not first.ok:
            raise RuntimeError(f"{gva:#x} did not translate: {first.walk.fault}")
        value = int.from_bytes(first.value, "little") if first.value else None
        reads0 = vm.gdb.reads
        vm.translate(gva)
        reads_per = vm.gdb.reads - reads0
        for _ in range(5):
            vm.translate(gva)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            vm.translate(gva)
            times.append(time.perf_counter() - t)
        return {"via": via, "memory_path": first.memory_path, "attach_s": attach_s,
                "gva": gva, "gpa": first.gpa, "cr3": vm.cpu.cr3, "value_ok": value == expect,
                "levels": len(first.walk.levels), "gdb_reads_per_translation": reads_per,
                "times": summary(times)}
    finally:
        vm.close()


def m_single_gdb(ctx):
    return _single(ctx, "gdb", ctx["n_single_gdb"])


def m_single_direct(ctx):
    return _single(ctx, "direct", ctx["n_single_direct"])


def m_single_hmp(ctx):
    gva, n = ctx["gva"], ctx["n_single_hmp"]
    mon = _monitor(ctx)
    try:
        cr3 = _cr3(mon)
        gpa = _gva2gpa(mon, gva)
        for _ in range(5):
            _hmp(mon, f"gva2gpa {gva:#x}")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            _hmp(mon, f"gva2gpa {gva:#x}")
            times.append(time.perf_counter() - t)
        return {"gva": gva, "gpa": gpa, "cr3": cr3, "times": summary(times)}
    finally:
        mon.close()


def m_cli_translate(ctx):
    argv = _qintrospect_cli() + ["translate", "--qmp", ctx["qmp"], "--gdb", ctx["gdb"],
                                 "--json", f"{ctx['gva']:#x}"]
    times, rss, path = [], [], None
    for _ in range(ctx["cli_reps"]):
        elapsed, status, out, maxrss = run_timed(argv, 60)
        if status != 0:
            raise RuntimeError(f"qintrospect translate exited {status}")
        path = json.loads(out.decode().splitlines()[0]).get("memory_path")
        times.append(elapsed)
        rss.append(maxrss)
    return {"times": summary(times), "memory_path": path, "cmd_maxrss_kb": max(rss),
            "argv": " ".join(argv[1:2] + ["..."])}


def m_shell_translate(ctx):
    """One `translate --json` in an attached `qintrospect shell` (-v): from writing the line
    to reading the timing line the shell prints after the command's output; the VM paused,
    as for the HMP gva2gpa round trips it is compared with."""
    import threading
    argv = _qintrospect_cli() + ["shell", "-v", "--qmp", ctx["qmp"], "--gdb", ctx["gdb"]]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    out = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    line = f"translate --json {ctx['gva']:#x}\n"

    def one():
        t0 = time.perf_counter()
        proc.stdin.write(line)
        proc.stdin.flush()
        while True:
            said = proc.stderr.readline()
            if not said:
                raise RuntimeError("the shell ended")
            if said.startswith("# translate:"):
                if said.split()[-1] != "0":
                    raise RuntimeError(f"shell translate failed: {said.strip()}")
                return time.perf_counter() - t0, float(said.split()[2]) / 1000
    try:
        for _ in range(5):
            one()                                   # warm: imports, first reads
        runs = [one() for _ in range(ctx["n_single_hmp"])]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    gpa = json.loads(out[0])["gpa"] if out else None
    return {"times": summary([r[0] for r in runs]), "in_shell": summary([r[1] for r in runs]),
            "gpa": gpa, "exit": proc.returncode}


def _times(argv, reps, timeout=60, ok=(0,)):
    times, rss, out = [], [], b""
    for _ in range(reps):
        elapsed, status, out, maxrss = run_timed(argv, timeout)
        if status not in ok:
            raise RuntimeError(f"{' '.join(argv[:3])} exited {status}")
        times.append(elapsed)
        rss.append(maxrss)
    return times, max(rss), out


def m_who_maps(ctx):
    """who-maps of the probe's heap page over every page-table root of the guest (the finder's
    scan included), direct path."""
    with _attach(ctx, "direct") as vm:
        gpa = ctx["regions"]["heap"]["gpa"]
        times, found = [], None
        for _ in range(ctx["scan_reps"]):
            t = time.perf_counter()
            found = vm.who_maps(gpa=gpa)[0]
            times.append(time.perf_counter() - t)
    return {"times": summary(times), "roots": len(found.roots),
            "mappings": len(found.reaches), "heap_found": any(
                r.gva == ctx["regions"]["heap"]["gva"] for r in found.reaches)}


def m_search(ctx):
    """vm.search of the probe's 8-byte heap value over the whole address space (every leaf of
    the vCPU's tables that is RAM), direct path: bytes searched per second."""
    pattern = ctx["regions"]["heap"]["value"].to_bytes(8, "little")
    with _attach(ctx, "direct") as vm:
        times, result = [], None
        for _ in range(ctx["scan_reps"]):
            t = time.perf_counter()
            result = vm.search(pattern)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"times": summary(times), "scanned_bytes": result.scanned,
            "matches": len(result.matches), "mb_per_s": result.scanned / med / MB,
            "heap_found": any(m.gva == ctx["regions"]["heap"]["gva"] for m in result.matches)}


def m_guest_ps(ctx):
    """Issue 22 on the 1 GiB guest: `qintrospect ps` start to exit, the first (nothing kept:
    a private cache folder of its own, so the note is scanned for, kallsyms decoded and BTF
    read) and the later ones; `translate --guest-pid` beside `translate --cr3` with the same
    root; and in one process, open_kernel() with and without what was kept."""
    folder = tempfile.mkdtemp(prefix="qi-bench-ps-")
    os.chmod(folder, 0o700)
    os.environ["XDG_RUNTIME_DIR"] = folder          # the children inherit it
    try:
        att = ["--qmp", ctx["qmp"], "--gdb", ctx["gdb"]]
        ps = _qintrospect_cli() + ["ps", "--json"] + att
        first, status, out, rss = run_timed(ps, 60)
        if status != 0:
            raise RuntimeError(f"qintrospect ps exited {status}")
        tasks = [json.loads(line) for line in out.decode().splitlines()]
        probe = next(t for t in tasks if t["pid"] == ctx["probe_pid"])
        later, later_rss, _ = _times(ps, ctx["cli_reps"] * 3)
        gva = f"{ctx['gva']:#x}"
        tr = _qintrospect_cli() + ["translate", "--json"] + att
        by_pid, _, out_pid = _times(tr + ["--guest-pid", str(ctx["probe_pid"]), gva],
                                    ctx["cli_reps"] * 3)
        root = probe["user_root"] or probe["root"]
        by_cr3, _, out_cr3 = _times(tr + ["--cr3", root, gva], ctx["cli_reps"] * 3)
        gpa_pid = json.loads(out_pid.decode().splitlines()[0])["gpa"]
        gpa_cr3 = json.loads(out_cr3.decode().splitlines()[0])["gpa"]
        from qintrospect import guestos
        with _attach(ctx, "direct") as vm:
            t = time.perf_counter()
            kernel = guestos.open_kernel(vm, use_cache=False)
            uncached = time.perf_counter() - t
            t = time.perf_counter()
            guestos.open_kernel(vm)
            cached = time.perf_counter() - t
            t = time.perf_counter()
            listed = guestos.processes(vm, kernel)
            walk = time.perf_counter() - t
        return {"first_s": first, "first_maxrss_kb": rss, "later": summary(later),
                "later_maxrss_kb": later_rss, "processes": len(tasks),
                "by_pid": summary(by_pid), "by_cr3": summary(by_cr3),
                "gpa_pid": gpa_pid, "gpa_cr3": gpa_cr3, "probe_gpa": ctx["probe_gpa"],
                "open_uncached_ms": uncached * 1000, "open_cached_ms": cached * 1000,
                "walk_ms": walk * 1000, "walk_tasks": len(listed.tasks),
                "how": kernel.how, "osrelease": kernel.osrelease,
                "kallsyms": kernel.facts.get("kallsyms"), "btf_bytes": kernel.facts.get(
                    "btf_bytes")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def m_cli_help(ctx):
    """`qintrospect --help`, start to exit: what every command pays before it attaches."""
    times, rss, _ = _times(_qintrospect_cli() + ["--help"], ctx["cli_reps"] * 3)
    return {"times": summary(times), "cmd_maxrss_kb": rss}


def m_gdb_bare(ctx):
    """A bare gdb attaching to the stub and leaving (no walk at all): the floor of any gdb-based
    tool. It disconnects, never detaches, so the paused VM stays paused."""
    gdb = shutil.which("gdb")
    times, rss, _ = _times([gdb, "-nx", "-batch", "-ex", f"target remote {ctx['gdb']}",
                            "-ex", "disconnect"], ctx["cli_reps"] * 2)
    return {"times": summary(times), "cmd_maxrss_kb": rss}


def m_cli_json_batch(ctx, brief=False):
    """`qintrospect translate --json -` of the batch's addresses, every level and flag, start to
    exit (the batch's addresses from stdin, JSON Lines out); with brief, `--brief -`."""
    path = ctx["addresses_file"] + ".txt"     # json_n addresses, written by m_addresses
    with open(path) as f:
        n = sum(1 for _ in f)
    argv = _qintrospect_cli() + ["translate", "--qmp", ctx["qmp"], "--gdb", ctx["gdb"]] + \
        (["--brief"] if brief else []) + ["-"]
    times, maxrss = [], 0
    for _ in range(ctx["json_reps"]):       # the median of a few: one run is a noisy figure
        counts = {}
        elapsed, status, out, rss = run_timed(argv, 900, stdin_path=path, counts=counts)
        if status not in (0, 1):
            raise RuntimeError(f"qintrospect translate - exited {status}")
        times.append(elapsed)
        maxrss = max(maxrss, rss)
    elapsed = statistics.median(times)
    lines = out.splitlines()
    return {"n": n, "lines": counts["lines"], "seconds": elapsed, "times": summary(times),
            "per_second": n / elapsed, "bytes": counts["bytes"], "cmd_maxrss_kb": maxrss,
            "levels_in_first": len(json.loads(lines[0]).get("levels", []))}


def m_cli_brief_batch(ctx):
    """`qintrospect translate --brief -` of the same addresses: the chain's summary only."""
    return m_cli_json_batch(ctx, brief=True)


def m_ptdump(ctx):
    """gdb-pt-dump's `pt` (gdb start, attach, walk, print), beside `qintrospect vmmap --json`,
    both start to exit, when QI_GDB_PT_DUMP names its pt.py (third-party: not shipped)."""
    pt = os.environ.get("QI_GDB_PT_DUMP")
    if not pt or not os.path.isfile(pt):
        return {"skipped": "set QI_GDB_PT_DUMP to gdb-pt-dump's pt.py to compare with it"}
    gdb = shutil.which("gdb")
    pt_times, pt_rss, pt_out = _times([gdb, "-nx", "-batch", "-ex", f"target remote {ctx['gdb']}",
                                      "-ex", f"source {pt}", "-ex", "pt", "-ex", "disconnect"],
                                     ctx["map_cli_reps"] + 1, 120)
    qi_times, qi_rss, qi_out = _times(_qintrospect_cli() + ["vmmap", "--json", "--qmp",
                                                            ctx["qmp"], "--gdb", ctx["gdb"]],
                                      ctx["map_cli_reps"] + 1, 120)
    return {"pt_times": summary(pt_times), "pt_lines": len(pt_out.splitlines()),
            "qi_times": summary(qi_times), "qi_rows": len(qi_out.splitlines()),
            "ratio": statistics.median(qi_times) / statistics.median(pt_times),
            "maxrss_kb": max(pt_rss, qi_rss)}


def m_addresses(ctx):
    """The batch's addresses, from the whole map: every 4 KiB page of the probe's (user) mappings
    and of the kernel's direct map, a random 8-byte slot in each, plus ~5% that fault (holes
    between user mappings, above the direct map, and non-canonical ones); shuffled."""
    with _attach(ctx, "direct") as vm:
        maps = list(vm.mappings())
        mode = vm.cpu_state()
        va_bits = 57 if mode.cr4 >> 12 & 1 else 48
    user = sorted((m for m in maps if m.va < 1 << 63), key=lambda m: m.va)
    kernel = [m for m in maps if m.va >= 1 << 63]
    weight = Counter()
    for m in kernel:
        weight[(m.va - m.pa) & MASK64] += m.size
    direct_offset, _ = weight.most_common(1)[0]
    direct = sorted((m for m in kernel if (m.va - m.pa) & MASK64 == direct_offset),
                    key=lambda m: m.va)

    def pages(ms):
        return [m.va + k * PAGE for m in ms for k in range(m.size // PAGE)]
    user_pages, direct_pages = pages(user), pages(direct)
    holes = []
    for a, b in zip(user, user[1:]):
        end = a.va + a.size
        holes.extend(end + k * PAGE for k in range(min(8, (b.va - end) // PAGE)))
    top = direct[-1].va + direct[-1].size
    holes.extend(top + k * PAGE for k in range(64))                      # above the direct map
    holes.extend((1 << 63) + k * (1 << 30) for k in range(16))           # non-canonical
    holes.extend(k * PAGE for k in range(16))                            # the NULL pages

    n = ctx["batch_n"]
    n_all = max(n, ctx["json_n"])     # translate --json - takes the first json_n of the same mix
    n_bad = n_all // 20
    rng = random.Random(20240611)
    good_pool = user_pages + direct_pages
    rng.shuffle(good_pool)
    everyone = [good_pool[i % len(good_pool)] + rng.randrange(PAGE // 8) * 8
                for i in range(n_all - n_bad)]
    everyone += [holes[i % len(holes)] + rng.randrange(PAGE // 8) * 8 for i in range(n_bad)]
    rng.shuffle(everyone)
    addrs = everyone[:n]
    with open(ctx["addresses_file"], "w") as f:
        json.dump(addrs, f)
    with open(ctx["addresses_file"] + ".txt", "w") as f:
        f.write("".join(f"{a:#x}\n" for a in everyone[:ctx["json_n"]]))
    return {"n": len(addrs), "leaves": len(maps), "va_bits": va_bits,
            "user_pages": len(user_pages), "direct_map_pages": len(direct_pages),
            "direct_map_offset": f"{direct_offset:#x}", "fault_candidates": n_bad,
            "distinct_pages": len({a & ~(PAGE - 1) for a in addrs})}


def _sample_indexes(n, k):
    step = max(1, n // k)
    return list(range(0, n, step))[:k]


def m_batch(ctx):
    with open(ctx["addresses_file"]) as f:
        addrs = json.load(f)
    sample = _sample_indexes(len(addrs), ctx["hmp_loop_n"])
    wanted = set(sample)
    got = {}
    ok = faults = 0
    with _attach(ctx, "direct") as vm:
        t0 = time.perf_counter()
        for i, t in enumerate(vm.translate_many(addrs)):
            if t.ok:
                ok += 1
            else:
                faults += 1
            if i in wanted:
                got[i] = t.gpa
        elapsed = time.perf_counter() - t0
        path = vm.memory.name
    return {"n": len(addrs), "seconds": elapsed, "per_second": len(addrs) / elapsed,
            "us_per_translation": elapsed / len(addrs) * 1e6, "translated": ok,
            "faulted": faults, "memory_path": path,
            "sample_gpas": [got[i] for i in sample]}


def m_batch_arrays(ctx):
    """translate_batch: the whole chain for every address at once, as arrays."""
    with open(ctx["addresses_file"]) as f:
        addrs = json.load(f)
    sample = _sample_indexes(len(addrs), ctx["hmp_loop_n"])
    with _attach(ctx, "direct") as vm:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            result = vm.translate_batch(addrs)
            times.append(time.perf_counter() - t0)
        path = vm.memory.name
    elapsed = sorted(times)[1]
    ok = int(result.ok.sum())
    gpas = [int(result.gpa[i]) if result.ok[i] else None for i in sample]
    return {"n": len(addrs), "seconds": elapsed, "per_second": len(addrs) / elapsed,
            "us_per_translation": elapsed / len(addrs) * 1e6, "translated": ok,
            "faulted": len(addrs) - ok, "memory_path": path, "sample_gpas": gpas,
            "with_value": int(result.has_value.sum()),
            "with_hpa": int((result.host_status == 1).sum())}


def m_batch_hmp(ctx):
    with open(ctx["addresses_file"]) as f:
        addrs = json.load(f)
    sample = _sample_indexes(len(addrs), ctx["hmp_loop_n"])
    mon = _monitor(ctx)
    try:
        gpas, times = [], []
        t0 = time.perf_counter()
        for i in sample:
            t = time.perf_counter()
            gpas.append(_gva2gpa(mon, addrs[i]))
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
    finally:
        mon.close()
    rate = len(sample) / elapsed
    return {"calls": len(sample), "seconds": elapsed, "per_second": rate,
            "extrapolated_seconds": len(addrs) / rate, "n": len(addrs),
            "times": summary(times), "sample_gpas": gpas}


def _map(ctx, via):
    with _attach(ctx, via) as vm:
        list(vm.mappings())          # warm, untimed: numpy and the vector walker imported
        times = []
        for _ in range(ctx["map_reps"]):
            t = time.perf_counter()
            maps = list(vm.mappings())
            times.append(time.perf_counter() - t)
        sizes = Counter(m.size for m in maps)
        cr3 = vm.cpu.cr3
        path = vm.memory.name
    return {"via": via, "memory_path": path, "leaves": len(maps), "cr3": cr3,
            "by_page_size": {str(k): v for k, v in sorted(sizes.items())},
            "times": summary(times)}


def m_map_arrays(ctx):
    """leaf_arrays: the whole address space as numpy columns, direct path."""
    with _attach(ctx, "direct") as vm:
        vm.leaf_arrays()             # warm, untimed: numpy and the vector walker imported
        times = []
        for _ in range(ctx["map_reps"]):
            t = time.perf_counter()
            leaves = vm.leaf_arrays()
            times.append(time.perf_counter() - t)
        sizes = Counter(int(x) for x in leaves.size)
        cr3 = vm.cpu.cr3
        path = vm.memory.name
    return {"via": "direct", "memory_path": path, "leaves": len(leaves), "cr3": cr3,
            "by_page_size": {str(k): v for k, v in sorted(sizes.items())},
            "times": summary(times)}


def m_map_direct(ctx):
    return _map(ctx, "direct")


def m_map_gdb(ctx):
    return _map(ctx, "gdb")


def m_map_tlb(ctx):
    from qintrospect.machine.monitor_text import parse_info_tlb
    mon = _monitor(ctx)
    try:
        cr3 = _cr3(mon)
        times = []
        for _ in range(ctx["tlb_reps"]):
            t = time.perf_counter()
            text = _hmp(mon, "info tlb")
            times.append(time.perf_counter() - t)
    finally:
        mon.close()
    return {"lines": len(parse_info_tlb(text)), "bytes": len(text), "cr3": cr3,
            "times": summary(times)}


def m_map_cli(ctx):
    argv = _qintrospect_cli() + ["vmmap", "--leaf", "--json", "--qmp", ctx["qmp"], "--gdb",
                                 ctx["gdb"]]
    times, rss, rows = [], [], 0
    for _ in range(ctx["map_cli_reps"]):
        elapsed, status, out, maxrss = run_timed(argv, 120)
        if status != 0:
            raise RuntimeError(f"qintrospect vmmap exited {status}")
        rows = sum(1 for line in out.splitlines() if line.strip())
        times.append(elapsed)
        rss.append(maxrss)
    return {"rows": rows, "times": summary(times), "cmd_maxrss_kb": max(rss)}


def m_scan(ctx):
    with _attach(ctx, "direct") as vm:
        ram = [r for r in vm.ram_map.ram if r.kind == "ram"]
        ram_bytes = vm.ram_map.ram_bytes
        times, found = [], []
        for _ in range(ctx["scan_reps"]):
            t = time.perf_counter()
            found = vm.find_cr3()
            times.append(time.perf_counter() - t)
        present = 0
        for r in ram:
            if r.hva is None:
                continue
            first = r.hva // PAGE
            last = (r.hva + (r.end - r.start)) // PAGE
            pos = first
            while pos <= last:
                count = min(65536, last - pos + 1)
                present += sum(e >> 63 & 1 for e in vm.process.pagemap_entries(pos * PAGE, count))
                pos += count
        path = vm.memory.name
    best = min(times)
    med = statistics.median(times)
    return {"ram_bytes": ram_bytes, "present_bytes": present * PAGE, "memory_path": path,
            "candidates": len(found), "times": summary(times),
            "mb_per_s": ram_bytes / med / MB, "best_mb_per_s": ram_bytes / best / MB,
            "present_mb_per_s": present * PAGE / med / MB}


def m_slat(ctx):
    """The second-level root search and walk, over this guest's real RAM on the direct path.
    An AMD NPT is an ordinary long-mode table, so the guest's own page table is one: the
    probe's user GVAs play guest-physical addresses, their GPAs host addresses, and the search
    (slat.find_roots, one pass over all RAM) must find the vCPU's CR3 root as an NPT root. The
    walk is timed per address beside the process-table walk of the same addresses."""
    from qintrospect import paging, slat
    from qintrospect.commands.finder import ram_chunks
    with _attach(ctx, "direct") as vm:
        regions = ctx["regions"]
        probes = [(r["gva"], r["gpa"]) for r in regions.values()
                  if r["gpa"] is not None and r["gva"] < 1 << 47]
        cpu = vm.cpu
        root = vm.vcpu_info[vm.vcpu].root
        depth = 5 if cpu.cr4 & (1 << 12) else 4
        times, found, how = [], [], {}
        for _ in range(ctx["scan_reps"]):
            t = time.perf_counter()
            found, how = slat.find_roots(ram_chunks(vm.memory, vm.ram_map), vm.memory.read,
                                         probes, ("npt",))
            times.append(time.perf_counter() - t)
        best = found[0].spec if found else None
        spec = slat.SlatSpec("npt", root, depth)
        gvas = [p[0] for p in probes] * max(1, ctx["n_single_direct"] // len(probes))
        t = time.perf_counter()
        for gva in gvas:
            slat.walk(vm.memory.read, spec, gva)
        slat_s = (time.perf_counter() - t) / len(gvas)
        t = time.perf_counter()
        for gva in gvas:
            paging.walk(vm.memory.read, cpu, gva)
        walk_s = (time.perf_counter() - t) / len(gvas)
        ram_bytes = vm.ram_map.ram_bytes
        batch = _slat_batch_walks(ctx, vm, cpu)
    med = statistics.median(times)
    return {**batch, "ram_bytes": ram_bytes, "times": summary(times), "probes": len(probes),
            "found_root": best.root if best else None, "cr3_root": root, "depth": depth,
            "found_is_cr3": bool(best and best.root == root and best.depth == depth),
            "candidates": len(found), "s_per_gib": med / (ram_bytes / (1 << 30)),
            "slat_walk_us": slat_s * 1e6, "table_walk_us": walk_s * 1e6,
            "walk_ratio": slat_s / walk_s}


def _identity_ept(ram_bytes: int):
    """An EPT (4 levels) that maps GPA 0 .. ram_bytes to itself with 4 KiB pages, as KVM maps
    pages the guest touched, R/W/X and write-back; its tables in a dict: (root, read_phys)."""
    import numpy as np
    pages = -(-ram_bytes // 4096)
    pts, pds = -(-pages // 512), -(-pages // (512 * 512))
    base, tables = 1 << 40, {}          # tables above guest RAM: never a GPA of the batch
    leaf, table = 7 | 6 << 3, 7

    def put(addr, entries):
        page = np.zeros(512, np.uint64)
        page[:len(entries)] = entries
        tables[addr] = page.tobytes()
    pt_at = base + 4096 * (2 + pds) + 4096 * np.arange(pts, dtype=np.uint64)
    frames = np.arange(pages, dtype=np.uint64) << np.uint64(12) | np.uint64(leaf)
    for k in range(pts):
        put(int(pt_at[k]), frames[k * 512:(k + 1) * 512])
    pd_at = base + 4096 * 2 + 4096 * np.arange(pds, dtype=np.uint64)
    for k in range(pds):
        put(int(pd_at[k]), pt_at[k * 512:(k + 1) * 512] | np.uint64(table))
    put(base + 4096, pd_at | np.uint64(table))          # the PDPT
    put(base, np.array([base + 4096 | table], np.uint64))  # the PML4

    def read(addr, n):
        page = tables.get(addr & ~0xFFF)
        if page is None:
            raise MemoryReadError(f"no table at {addr:#x}", addr)
        return page[addr & 0xFFF:(addr & 0xFFF) + n]
    return base, read


def _slat_batch_walks(ctx, vm, cpu):
    """The batch's addresses walked at once through the guest's own table (walk_array, the
    direct path), and the RAM GPAs that gave walked at once through an EPT (slat.walk_batch)
    that maps guest RAM with 4 KiB pages: medians of 3, and their ratio."""
    from qintrospect import paging, slat
    with open(ctx["addresses_file"]) as f:
        addrs = json.load(f)
    ept_root, ept_read = _identity_ept(vm.ram_map.ram_bytes)
    spec = slat.SlatSpec("ept", ept_root, 4, ept_root | 6 | 3 << 3)
    guest, ept = [], []
    for _ in range(3):
        t = time.perf_counter()
        w = paging.walk_array(vm.memory.read, cpu, addrs)
        guest.append(time.perf_counter() - t)
        gpas = w.pa[w.ok & (w.pa < vm.ram_map.ram_bytes)]   # RAM's (not a device's) GPAs
        t = time.perf_counter()
        e = slat.walk_batch(ept_read, spec, gpas)
        ept.append(time.perf_counter() - t)
    if not e.ok.all() or (e.pa != gpas).any():
        raise RuntimeError("the identity EPT did not map every GPA to itself")
    g, x = statistics.median(guest), statistics.median(ept)
    return {"batch_n": len(addrs), "batch_gpas": len(gpas), "batch_guest_s": g,
            "batch_ept_s": x, "batch_ept_ratio": x / g}


MEASURES = {
    "baseline": m_baseline,
    "single_hmp": m_single_hmp,
    "single_gdb": m_single_gdb,
    "single_direct": m_single_direct,
    "cli_translate": m_cli_translate,
    "shell_translate": m_shell_translate,
    "addresses": m_addresses,
    "batch": m_batch,
    "batch_hmp": m_batch_hmp,
    "batch_arrays": m_batch_arrays,
    "map_arrays": m_map_arrays,
    "map_tlb": m_map_tlb,
    "map_direct": m_map_direct,
    "map_gdb": m_map_gdb,
    "map_cli": m_map_cli,
    "scan": m_scan,
    "slat": m_slat,
    "who_maps": m_who_maps,
    "search": m_search,
    "guest_ps": m_guest_ps,
    "cli_help": m_cli_help,
    "gdb_bare": m_gdb_bare,
    "cli_json_batch": m_cli_json_batch,
    "cli_brief_batch": m_cli_brief_batch,
    "ptdump": m_ptdump,
}


def child_main(name, ctx_file, profile_out=None) -> int:
    with open(ctx_file) as f:
        ctx = json.load(f)
    func = MEASURES[name]
    profiler = None
    if profile_out:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    result = func(ctx)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile_out)
        import pstats
        for key in ("tottime", "cumulative"):
            print(f"===== profile of {name}, by {key} =====", file=sys.stderr)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats(key).print_stats(25)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["maxrss_kb"] = usage.ru_maxrss
    result["children_maxrss_kb"] = kids.ru_maxrss
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# =============================================================================================
# Parent side: guests, children, table
# =============================================================================================

class Bench:
    def __init__(self, args):
        self.args = args
        self.params = QUICK if args.quick else FULL
        self.workdir = tempfile.mkdtemp(prefix="qi-bench-")
        self.results = {}
        self.guests = {}
        self.guest_info = []
        self.fill = None
        self.elapsed = 0.0
        self.loadavg = {"start": os.getloadavg()}
        self.code = code_version()
        self._child = None
        # the commands are timed as installed: with their bytecode written (as a wheel install
        # or scripts/setup does), not compiled again at every start
        self.bytecode = subprocess.run(
            [sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "qintrospect")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        # translate --json -'s lines: made in C, or by bytes.__mod__ where it was not built
        self.rowformat_built = subprocess.run(
            [sys.executable, "-c", "import qintrospect.present._rowformat"], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0

    # ---- children ----------------------------------------------------------------------------
    def run_child(self, name, ctx, key=None, timeout=180, profile=False):
        key = key or name
        ctx_file = os.path.join(self.workdir, f"ctx-{key}.json")
        with open(ctx_file, "w") as f:
            json.dump(ctx, f)
        argv = [sys.executable, os.path.abspath(__file__), "--one", name, "--ctx", ctx_file]
        if profile:
            argv += ["--profile-out", os.path.join(self.workdir, f"{key}.prof")]
        log(f"{key}: running" + (" under cProfile" if profile else ""))
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO)
        self._child = proc
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_child()
            log(f"{key}: TIMEOUT after {timeout} s (killed)")
            return {"error": f"timed out after {timeout} s"}
        except BaseException:       # Ctrl-C, SIGTERM: the child (own session) goes too
            self.kill_child()
            raise
        self._child = None
        result = None
        for line in out.decode(errors="replace").splitlines():
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
        if proc.returncode != 0 or result is None:
            log(f"{key}: FAILED (exit {proc.returncode})")
            return {"error": f"child exited {proc.returncode}"}
        log(f"{key}: done in {time.monotonic() - t0:.1f} s, peak RSS "
            f"{result['maxrss_kb'] * 1024 / MB:.1f} MB")
        if not profile:
            self.results[key] = result
        return result

    def kill_child(self):
        proc, self._child = self._child, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the child and its gdb / CLI children
            except OSError:
                pass
            proc.wait()

    # ---- guests ------------------------------------------------------------------------------
    def boot(self, memory):
        from vm.guest import Guest
        log(f"booting the bundled guest (-cpu {self.args.cpu}, -m {memory})")
        g = Guest(cpu=self.args.cpu, memory=memory)
        self.guests[memory] = g
        g.start(timeout=120)
        log(f"guest up in {g.boot_seconds:.1f} s (QEMU pid {g.pid})")
        info = {"memory": memory, "boot_s": g.boot_seconds, "cpu": g.cpu}
        try:
            q = g.qmp("query-version")["qemu"]
            info["qemu"] = f"{q['major']}.{q['minor']}.{q['micro']}"
        except Exception:
            pass
        self.guest_info.append(info)
        return g

    def start_probe_paused(self, g):
        probe = g.start_probe("spin")
        g.qmp("stop")
        status = g.qmp("query-status")
        if status.get("running"):
            raise RuntimeError("the VM did not pause")
        return probe

    def ctx_for(self, g, probe, **extra):
        heap = probe["regions"]["heap"]
        ctx = dict(self.params, qmp=g.qmp_path, gdb=g.gdb_address, pid=g.pid,
                   gva=heap["gva"], expect=heap["value"], regions=probe["regions"],
                   addresses_file=os.path.join(self.workdir, "addresses.json"))
        ctx.update(extra)
        return ctx

    def check_paused(self, g, what):
        status = g.qmp("query-status")
        if status.get("running"):
            log(f"warning: the VM was running after {what}; pausing it again")
            g.qmp("stop")

    def stop_guest(self, memory):
        g = self.guests.pop(memory, None)
        if g is not None:
            g.stop()

    def close(self):
        self.kill_child()
        for memory in list(self.guests):
            log(f"tearing down the {memory} guest")
            self.stop_guest(memory)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- the run -----------------------------------------------------------------------------
    def run(self):
        p = self.params
        t0 = time.monotonic()
        self.run_child("baseline", {}, timeout=60)
        g = self.boot("256M")
        probe = self.start_probe_paused(g)
        ctx = self.ctx_for(g, probe)
        log(f"probe pid {probe['pid']} spinning, VM paused by QMP stop; heap GVA {ctx['gva']:#x}")
        plan = [("single_hmp", 60), ("single_gdb", 120), ("single_direct", 60),
                ("cli_translate", 60 + 60 * p["cli_reps"]), ("shell_translate", 120),
                ("addresses", 120),
                ("cli_help", 60), ("gdb_bare", 60),
                ("batch", 900), ("batch_arrays", 300), ("batch_hmp", 300),
                ("cli_json_batch", 900), ("cli_brief_batch", 900), ("ptdump", 600), ("map_tlb", 120),
                ("map_arrays", 120), ("map_direct", 120),
                ("map_gdb", 300), ("map_cli", 60 + 120 * p["map_cli_reps"]),
                ("who_maps", 300), ("search", 300), ("scan", 300),
                ("slat", 300)]
        for name, timeout in plan:
            if name in ("batch", "batch_arrays", "batch_hmp", "cli_json_batch",
                        "cli_brief_batch") and \
                    "error" in self.results.get("addresses", {}):
                continue
            self.run_child(name, ctx, key={"scan": "scan_256M", "slat": "slat_256M"}.get(
                name, name), timeout=timeout)
            self.check_paused(g, name)
        for name in self.args.profile:
            if name in MEASURES and name != "scan":
                self.run_child(name, ctx, key=f"{name}-profile", timeout=1800, profile=True)
        if "scan" in self.args.profile:
            self.run_child("scan", ctx, key="scan-profile", timeout=900, profile=True)
        self.stop_guest("256M")

        g = self.boot("1G")                 # issue 22's figures are for the 1 GiB guest
        probe = self.start_probe_paused(g)
        ctx = self.ctx_for(g, probe, probe_pid=probe["pid"],
                           probe_gpa=probe["regions"]["heap"]["gpa"])
        self.run_child("guest_ps", ctx, timeout=600)
        self.check_paused(g, "guest_ps")
        if "guest_ps" in self.args.profile:
            self.run_child("guest_ps", ctx, key="guest_ps-profile", timeout=900, profile=True)
        self.stop_guest("1G")

        if not self.args.quick:
            g = self.boot("2G")
            probe = self.start_probe_paused(g)
            ctx = self.ctx_for(g, probe)
            self.run_child("scan", ctx, key="scan_2G_booted", timeout=900)
            g.qmp("cont")
            self.fill_guest(g, probe)
            probe = self.start_probe_paused(g)
            ctx = self.ctx_for(g, probe)
            self.run_child("scan", ctx, key="scan_2G_filled", timeout=900)
            self.run_child("slat", ctx, key="slat_2G_filled", timeout=900)
            self.stop_guest("2G")
        self.elapsed = time.monotonic() - t0
        self.loadavg["end"] = os.getloadavg()

    def fill_guest(self, g, probe):
        """Make the guest's RAM present on the host: the guest writes a tmpfs file nearly as
        large as its free memory (remounting /tmp large enough), then deletes it. The freed
        pages stay present in the QEMU process."""
        g.run(f"kill {probe['pid']}", timeout=30)
        text = g.run("grep MemAvailable /proc/meminfo", timeout=30)
        avail_mb = int(text.split()[1]) // 1024
        fill_mb = max(0, avail_mb - 160)
        log(f"filling the 2G guest: writing {fill_mb} MiB to tmpfs (MemAvailable {avail_mb} MiB)")
        t = time.monotonic()
        g.run(f"mount -o remount,size={fill_mb + 64}m /tmp; "
              f"dd if=/dev/zero of=/tmp/fill bs=1M count={fill_mb} 2>/dev/null; "
              "rm -f /tmp/fill", timeout=600)
        self.fill = {"fill_mib": fill_mb, "mem_available_mib": avail_mb,
                     "seconds": time.monotonic() - t}
        log(f"filled in {self.fill['seconds']:.1f} s")

    # ---- report -------------------------------------------------------------------------------
    def rows(self):
        r = self.results
        rows = []

        def add(section, label, result, rss_mb=None, target=None, met=None, key=None):
            rows.append({"section": section, "measurement": label, "result": result,
                         "peak_rss_mb": rss_mb, "target": target,
                         "status": None if met is None else ("met" if met else "not met"),
                         "met": None if met is None else bool(met), "key": key})

        def err(res):
            return res is None or "error" in res

        def ms(t):
            return f"median {t['median_ms']:.3f} ms, p90 {t['p90_ms']:.3f} ms (N={t['n']})"

        def kb_mb(kb):
            return kb * 1024 / MB

        # 1. single translation
        for key, label in (("single_gdb", "translate(gva), gdbstub path (via=gdb)"),
                           ("single_direct", "translate(gva), direct path (via=direct)"),
                           ("single_hmp", "HMP gva2gpa over QMP (legacy client)")):
            res = r.get(key)
            if err(res):
                add(1, label, f"ERROR: {res and res.get('error')}", key=key)
                continue
            target = met = None
            if key == "single_gdb":
                target = f"median <= {TARGETS['single_gdb_ms']:g} ms"
                met = res["times"]["median_ms"] <= TARGETS["single_gdb_ms"]
            add(1, label, ms(res["times"]), kb_mb(res["maxrss_kb"]), target, met, key)
        res = r.get("cli_translate")
        if err(res):
            add(1, "`qintrospect translate` command", f"ERROR: {res and res.get('error')}",
                key="cli_translate")
        else:
            add(1, "`qintrospect translate ADDR --json` (start to exit)",
                f"median {res['times']['median_ms']:.0f} ms, p90 {res['times']['p90_ms']:.0f} ms "
                f"(N={res['times']['n']}, via {res['memory_path']})",
                kb_mb(res["cmd_maxrss_kb"]), key="cli_translate")
        hp, gb = r.get("cli_help"), r.get("gdb_bare")
        if err(hp):
            add(1, "`qintrospect --help`", f"ERROR: {hp and hp.get('error')}", key="cli_help")
        else:
            med = hp["times"]["median_ms"] / 1000
            add(1, "`qintrospect --help` (start to exit)", ms(hp["times"]),
                kb_mb(hp["cmd_maxrss_kb"]), f"<= {TARGETS['help_s']:g} s",
                med <= TARGETS["help_s"], key="cli_help")
        if err(gb):
            add(1, "bare gdb attach + disconnect", f"ERROR: {gb and gb.get('error')}",
                key="gdb_bare")
        else:
            add(1, "bare `gdb -batch -ex 'target remote ...' -ex disconnect`", ms(gb["times"]),
                kb_mb(gb["cmd_maxrss_kb"]), key="gdb_bare")
        if not err(res) and not err(gb):
            ratio = res["times"]["median_ms"] / gb["times"]["median_ms"]
            add(1, "  translate command / bare gdb", f"{ratio:.2f}x",
                target=f"<= {TARGETS['translate_vs_gdb']:g}x",
                met=ratio <= TARGETS["translate_vs_gdb"], key="translate_vs_gdb")
        sh, hmp = r.get("shell_translate"), r.get("single_hmp")
        if err(sh):
            add(1, "translate in `qintrospect shell`", f"ERROR: {sh and sh.get('error')}",
                key="shell_translate")
        else:
            add(1, "`translate --json ADDR` in `qintrospect shell` (line in to answer out)",
                ms(sh["times"]) + f"; in the shell {sh['in_shell']['median_ms']:.3f} ms",
                key="shell_translate")
            if not err(hmp):
                ratio = sh["times"]["median_ms"] / hmp["times"]["median_ms"]
                add(1, "  shell translate / HMP gva2gpa round trip", f"{ratio:.2f}x",
                    target=f"<= {TARGETS['shell_vs_gva2gpa']:g}x",
                    met=ratio <= TARGETS["shell_vs_gva2gpa"], key="shell_vs_gva2gpa")

        # 2. batch
        b, h = r.get("batch"), r.get("batch_hmp")
        if err(b):
            add(2, "translate_many batch", f"ERROR: {b and b.get('error')}", key="batch")
        else:
            add(2, f"translate_many({b['n']:,} addresses), direct path",
                f"{b['per_second']:,.0f}/s ({b['seconds']:.2f} s, {b['us_per_translation']:.1f} "
                f"us each; {b['faulted']:,} faulted)", kb_mb(b["maxrss_kb"]), key="batch")
        if err(h):
            add(2, "HMP gva2gpa loop", f"ERROR: {h and h.get('error')}", key="batch_hmp")
        else:
            add(2, f"HMP gva2gpa loop ({h['calls']:,} calls timed, extrapolated)",
                f"{h['per_second']:,.0f}/s (-> {h['n']:,} in ~{h['extrapolated_seconds']:.0f} s "
                f"extrapolated)", kb_mb(h["maxrss_kb"]), key="batch_hmp")
        a = r.get("batch_arrays")
        if err(a):
            add(2, "translate_batch", f"ERROR: {a and a.get('error')}", key="batch_arrays")
        else:
            add(2, f"translate_batch({a['n']:,} addresses), direct path: GVA..HPA + value",
                f"{a['per_second']:,.0f}/s ({a['seconds'] * 1000:.1f} ms, "
                f"{a['us_per_translation']:.2f} us each; {a['faulted']:,} faulted)",
                kb_mb(a["maxrss_kb"]), key="batch_arrays")
        if not err(a) and not err(h):
            ratio = a["per_second"] / h["per_second"]
            add(2, "translate_batch / HMP loop, same run", f"{ratio:.1f}x",
                target=f">= {TARGETS['batch_ratio']:g}x", met=ratio >= TARGETS["batch_ratio"],
                key="batch_ratio")
        if not err(b) and not err(h):
            ratio = b["per_second"] / h["per_second"]
            add(2, "translate_many (every level, flag and access rule) / HMP loop",
                f"{ratio:.1f}x", key="batch_many_ratio")
        j = r.get("cli_json_batch")
        if err(j):
            add(2, "`qintrospect translate --json -`", f"ERROR: {j and j.get('error')}",
                key="cli_json_batch")
        else:
            add(2, f"`qintrospect translate --json -` of {j['n']:,} addresses (every level and "
                "flag; start to exit)",
                f"{j['per_second']:,.0f}/s ({j['seconds']:.2f} s median of {j['times']['n']}, "
                f"{j['bytes'] / MB:.0f} MB of JSON Lines)", kb_mb(j["cmd_maxrss_kb"]),
                key="cli_json_batch")
            if not err(h):
                ratio = j["per_second"] / h["per_second"]
                add(2, "  translate --json - / HMP loop", f"{ratio:.1f}x",
                    target=f">= {TARGETS['json_batch_ratio']:g}x",
                    met=ratio >= TARGETS["json_batch_ratio"], key="json_batch_ratio")
        j = r.get("cli_brief_batch")
        if err(j):
            add(2, "`qintrospect translate --brief -`", f"ERROR: {j and j.get('error')}",
                key="cli_brief_batch")
        else:
            add(2, f"`qintrospect translate --brief -` of {j['n']:,} addresses (the chain's "
                "summary; start to exit)",
                f"{j['per_second']:,.0f}/s ({j['seconds']:.2f} s median of {j['times']['n']}, "
                f"{j['bytes'] / MB:.0f} MB of JSON Lines)", kb_mb(j["cmd_maxrss_kb"]),
                key="cli_brief_batch")
            if not err(h):
                ratio = j["per_second"] / h["per_second"]
                add(2, "  translate --brief - / HMP loop", f"{ratio:.1f}x",
                    target=f">= {TARGETS['brief_batch_ratio']:g}x",
                    met=ratio >= TARGETS["brief_batch_ratio"], key="brief_batch_ratio")

        # 3. whole map
        tlb = r.get("map_tlb")
        if err(tlb):
            add(3, "HMP info tlb", f"ERROR: {tlb and tlb.get('error')}", key="map_tlb")
        else:
            add(3, "HMP info tlb over QMP", f"{ms(tlb['times'])}; {tlb['lines']:,} lines",
                kb_mb(tlb["maxrss_kb"]), key="map_tlb")
        for key, label, short in (
                ("map_arrays", "vm.leaf_arrays(), direct path", "leaf_arrays, direct"),
                ("map_direct", "list(vm.mappings()), direct path", "list(vm.mappings()), direct"),
                ("map_gdb", "list(vm.mappings()), gdbstub path", "list(vm.mappings()), gdb"),
                ("map_cli", "`qintrospect vmmap --leaf --json` (start to exit)",
                 "vmmap --leaf --json command")):
            res = r.get(key)
            if err(res):
                add(3, label, f"ERROR: {res and res.get('error')}", key=key)
                continue
            if key == "map_cli":
                text = (f"median {res['times']['median_ms']:.0f} ms (N={res['times']['n']}); "
                        f"{res['rows']:,} rows")
                rss_mb = kb_mb(res["cmd_maxrss_kb"])
            else:
                text = f"{ms(res['times'])}; {res['leaves']:,} leaves"
                rss_mb = kb_mb(res["maxrss_kb"])
            add(3, label, text, rss_mb, key=key)
            if not err(tlb):
                ratio = res["times"]["median_ms"] / tlb["times"]["median_ms"]
                targeted = key == "map_arrays"   # the API the target is about
                add(3, f"  {short} / info tlb",
                    f"{ratio:.2f}x (time ratio, same run)",
                    target=f"<= {TARGETS['map_ratio']:g}x" if targeted else None,
                    met=ratio <= TARGETS["map_ratio"] if targeted else None,
                    key=f"{key}_ratio")
            one = r.get("cli_translate")
            if key == "map_cli" and not err(tlb) and not err(one):
                # the command less what one translate command costs (interpreter, imports,
                # attach, one address): the map's own share, numpy's import included
                extra = res["times"]["median_ms"] - one["times"]["median_ms"]
                ratio = extra / tlb["times"]["median_ms"]
                add(3, "  (vmmap command - translate command) / info tlb",
                    f"{ratio:.2f}x ({extra:.0f} ms more than one translate)",
                    target=f"<= {TARGETS['map_ratio']:g}x", met=ratio <= TARGETS["map_ratio"],
                    key="map_cli_extra_ratio")
        wm = r.get("who_maps")
        if err(wm):
            add(3, "who-maps", f"ERROR: {wm and wm.get('error')}", key="who_maps")
        else:
            med = wm["times"]["median_ms"] / 1000
            add(3, "vm.who_maps(heap GPA): every root (finder scan included), direct path",
                f"{ms(wm['times'])}; {wm['roots']} roots, {wm['mappings']} mappings",
                kb_mb(wm["maxrss_kb"]), f"<= {TARGETS['who_maps_s']:g} s",
                med <= TARGETS["who_maps_s"], key="who_maps")
        se = r.get("search")
        if err(se):
            add(3, "search", f"ERROR: {se and se.get('error')}", key="search")
        else:
            add(3, "vm.search(8 bytes): the whole address space, direct path",
                f"{se['mb_per_s']:,.0f} MB/s ({se['scanned_bytes'] / MB:.0f} MB in "
                f"{ms(se['times'])}; {se['matches']} matches)", kb_mb(se["maxrss_kb"]),
                f">= {TARGETS['search_mb_s'] / 1000:g} GB/s",
                se["mb_per_s"] >= TARGETS["search_mb_s"], key="search")
        pt = r.get("ptdump")
        if err(pt):
            add(3, "gdb-pt-dump's pt", f"ERROR: {pt and pt.get('error')}", key="ptdump")
        elif "skipped" in pt:
            add(3, "gdb-pt-dump's pt beside `qintrospect vmmap --json`",
                f"not measured: {pt['skipped']}", key="ptdump")
        else:
            add(3, "gdb-pt-dump's `pt` (gdb start, attach, walk; start to exit)",
                f"{ms(pt['pt_times'])}; {pt['pt_lines']:,} lines", key="ptdump")
            add(3, "  `qintrospect vmmap --json` / pt, start to exit",
                f"{pt['ratio']:.2f}x ({ms(pt['qi_times'])}; {pt['qi_rows']:,} rows)",
                kb_mb(pt["maxrss_kb"]), f"<= {TARGETS['vmmap_vs_ptdump']:g}x",
                pt["ratio"] <= TARGETS["vmmap_vs_ptdump"], key="vmmap_vs_ptdump")

        # 4./5. scans
        for key, label in (("scan_256M", "find_cr3(), 256 MiB guest"),
                           ("scan_2G_booted", "find_cr3(), 2 GiB guest as booted"),
                           ("scan_2G_filled", "find_cr3(), 2 GiB guest after filling RAM")):
            res = r.get(key)
            if res is None:
                if self.args.quick and key != "scan_256M":
                    add(4, label, "skipped (--quick)", key=key)
                continue
            if err(res):
                add(4, label, f"ERROR: {res.get('error')}", key=key)
                continue
            t = res["times"]
            add(4, label,
                f"{res['mb_per_s']:,.0f} MB/s of guest RAM ({res['ram_bytes'] / (1 << 20):,.0f} "
                f"MiB in {t['median_ms']:.0f} ms median of {t['n']}; "
                f"{res['present_bytes'] / (1 << 20):,.0f} MiB present on host = "
                f"{100 * res['present_bytes'] / res['ram_bytes']:.0f}%; "
                f"{res['candidates']} roots)",
                kb_mb(res["maxrss_kb"]), f">= {TARGETS['scan_mb_s'] / 1000:g} GB/s",
                res["mb_per_s"] >= TARGETS["scan_mb_s"], key=key)
            if key == "scan_2G_filled":
                peak = kb_mb(res["maxrss_kb"])
                add(6, "peak RSS of the 2 GiB scan (filled)", f"{peak:.1f} MB",
                    target=f"< {TARGETS['scan_2g_rss_mb']:g} MB",
                    met=peak < TARGETS["scan_2g_rss_mb"], key="scan_2g_rss")
        # 5. the second-level table: root search over RAM, walk per address
        for key, label in (("slat_256M", "second-level root search, 256 MiB guest"),
                           ("slat_2G_filled", "second-level root search, 2 GiB guest (filled)")):
            res = r.get(key)
            if res is None:
                if self.args.quick and key != "slat_256M":
                    add(5, label, "skipped (--quick)", key=key)
                continue
            if err(res):
                add(5, label, f"ERROR: {res.get('error')}", key=key)
                continue
            add(5, label,
                f"{res['s_per_gib']:.2f} s per GiB ({res['times']['median_ms']:.0f} ms for "
                f"{res['ram_bytes'] / (1 << 20):,.0f} MiB, {res['probes']} probes, "
                f"{res['candidates']} root(s); the vCPU's own table found as an NPT: "
                f"{res['found_is_cr3']})", kb_mb(res["maxrss_kb"]),
                f"<= {TARGETS['slat_s_per_gib']:g} s/GiB",
                res["s_per_gib"] <= TARGETS["slat_s_per_gib"], key=key)
            if key == "slat_256M":
                add(5, "second-level walk / process-table walk, per address",
                    f"{res['walk_ratio']:.2f}x ({res['slat_walk_us']:.0f} vs "
                    f"{res['table_walk_us']:.0f} us, direct path)", None,
                    f"<= {TARGETS['slat_walk_ratio']:g}x",
                    res["walk_ratio"] <= TARGETS["slat_walk_ratio"], key="slat_walk_ratio")
                add(5, f"EPT walk of the batch's {res['batch_gpas']:,} GPAs at once / the guest "
                    f"walk of its {res['batch_n']:,} addresses",
                    f"{res['batch_ept_ratio']:.2f}x ({res['batch_ept_s'] * 1e3:.1f} vs "
                    f"{res['batch_guest_s'] * 1e3:.1f} ms; an EPT of 4 KiB pages over guest RAM)",
                    None, f"<= {TARGETS['slat_batch_ratio']:g}x",
                    res["batch_ept_ratio"] <= TARGETS["slat_batch_ratio"], key="slat_batch_ratio")
        base = r.get("baseline")
        if not err(base):
            add(6, "baseline: python + qintrospect imported, no VM", "-",
                kb_mb(base["maxrss_kb"]), key="baseline")
        gp = r.get("guest_ps")
        if err(gp):
            add(7, "qintrospect ps", f"ERROR: {gp and gp.get('error')}", key="guest_ps")
        else:
            add(7, "first `qintrospect ps --json` on the 1 GiB guest (start to exit; note "
                f"scanned, kallsyms decoded, BTF read)",
                f"{gp['first_s'] * 1000:.0f} ms; {gp['processes']} processes, "
                f"{gp['osrelease']}", kb_mb(gp["first_maxrss_kb"]),
                f"<= {TARGETS['ps_first_s']:g} s", gp["first_s"] <= TARGETS["ps_first_s"],
                key="ps_first")
            add(7, "a later `qintrospect ps --json` (the kernel's facts kept for this boot)",
                ms(gp["later"]), kb_mb(gp["later_maxrss_kb"]),
                f"<= {TARGETS['ps_later_s']:g} s",
                gp["later"]["median_ms"] / 1000 <= TARGETS["ps_later_s"], key="ps_later")
            extra = gp["by_pid"]["median_ms"] - gp["by_cr3"]["median_ms"]
            add(7, "`translate --guest-pid P ADDR` - `translate --cr3 ROOT ADDR` (medians)",
                f"{extra:+.1f} ms ({gp['by_pid']['median_ms']:.0f} vs "
                f"{gp['by_cr3']['median_ms']:.0f} ms)", None,
                f"<= {TARGETS['guest_pid_extra_ms']:g} ms",
                extra <= TARGETS["guest_pid_extra_ms"], key="guest_pid_extra")
            add(7, "in one process: open_kernel() without / with what was kept; the task walk",
                f"{gp['open_uncached_ms']:.0f} ms / {gp['open_cached_ms']:.1f} ms; "
                f"{gp['walk_ms']:.1f} ms for {gp['walk_tasks']} tasks "
                f"({gp['kallsyms']['count']:,} symbols, {gp['btf_bytes'] / MB:.1f} MB of BTF)",
                key="guest_open")
        return rows

    def checks(self):
        """qintrospect set against QEMU's own answers in the same run, each True or False (absent
        when a measurement it needs failed): the same CR3 and GPA for the single address, the
        probe's value read there, the sampled batch GPAs equal to gva2gpa's, as many leaves as
        `info tlb` lines, the same CR3 for the whole map."""
        r = self.results
        out = {}
        g, hm = r.get("single_gdb") or {}, r.get("single_hmp") or {}
        if "cr3" in g and "cr3" in hm:
            out["single_cr3_same"] = (g["cr3"] & ~0xFFF) == (hm["cr3"] & ~0xFFF)
            out["single_gpa_agree"] = g.get("gpa") == hm.get("gpa")
        if (r.get("shell_translate") or {}).get("gpa") and "gpa" in hm:
            out["shell_gpa_agrees_with_gva2gpa"] = int(r["shell_translate"]["gpa"], 16) == \
                hm["gpa"]
        for key in ("single_gdb", "single_direct"):
            if "value_ok" in (r.get(key) or {}):
                out[f"{key}_value_ok"] = r[key]["value_ok"]
        h = r.get("batch_hmp") or {}
        for key in ("batch", "batch_arrays"):
            b = r.get(key) or {}
            if "sample_gpas" in b and "sample_gpas" in h:
                out[f"{key}_agrees_with_gva2gpa"] = b["sample_gpas"] == h["sample_gpas"]
        gp = r.get("guest_ps") or {}
        if "gpa_pid" in gp:
            out["guest_pid_gpa_is_the_probes"] = int(gp["gpa_pid"], 16) == gp["probe_gpa"]
            out["guest_pid_gpa_equals_cr3s"] = gp["gpa_pid"] == gp["gpa_cr3"]
        md, tlb = r.get("map_direct") or {}, r.get("map_tlb") or {}
        if "leaves" in md and "lines" in tlb:
            out["map_leaves_equal_tlb_lines"] = md["leaves"] == tlb["lines"]
            out["map_cr3_same"] = (md["cr3"] & ~0xFFF) == ((tlb["cr3"] or 0) & ~0xFFF)
        for key in ("map_arrays", "map_gdb"):
            m = r.get(key) or {}
            if "leaves" in m and "leaves" in md:
                out[f"{key}_leaves_equal_map_direct"] = m["leaves"] == md["leaves"]
        if "heap_found" in (r.get("who_maps") or {}):
            out["who_maps_found_the_heap"] = r["who_maps"]["heap_found"]
        if "heap_found" in (r.get("search") or {}):
            out["search_found_the_heap"] = r["search"]["heap_found"]
        for key in ("slat_256M", "slat_2G_filled"):
            if "found_is_cr3" in (r.get(key) or {}):
                out[f"{key}_found_the_cr3_table"] = r[key]["found_is_cr3"]
        return out

    def notes(self):
        r = self.results
        out = ["commands timed with their bytecode " + (
            "written first (python -m compileall, as an install does)"
            if getattr(self, "bytecode", False) else "NOT written: each start compiles"),
            "translate --json -: lines made " + (
                "in C (qintrospect/present/_rowformat.c)" if getattr(self, "rowformat_built", False)
                else "by bytes.__mod__: the C module was NOT built (pip install -e . with a C "
                     "compiler and Python's headers builds it)")]
        checks = self.checks()
        g, d = r.get("single_gdb") or {}, r.get("single_direct") or {}
        hm = r.get("single_hmp") or {}
        if "single_cr3_same" in checks:
            same = checks["single_cr3_same"]
            out.append(f"single: CR3 {g['cr3']:#x} (gdb) vs {hm['cr3']:#x} (HMP info registers): "
                       f"{'same root' if same else 'DIFFERENT'}; GPA {g.get('gpa', 0):#x} "
                       f"(qintrospect) vs {hm.get('gpa') or 0:#x} (gva2gpa): "
                       f"{'agree' if checks['single_gpa_agree'] else 'DISAGREE'}; value at GVA "
                       f"{'as the probe said' if g.get('value_ok') else 'NOT the probe value'}; "
                       f"{g.get('levels')} levels, {g.get('gdb_reads_per_translation')} gdb reads "
                       f"per translation on the gdb path, "
                       f"{d.get('gdb_reads_per_translation')} on the direct path")
            out.append(f"attach: {g.get('attach_s', 0) * 1e3:.0f} ms (via gdb), "
                       f"{d.get('attach_s', 0) * 1e3:.0f} ms (via direct); translate timings "
                       "exclude it; each translate() includes the walk, pagemap HPA and the "
                       "8-byte value read both through the GPA and at the HVA")
        a, b, h = r.get("addresses") or {}, r.get("batch") or {}, r.get("batch_hmp") or {}
        if "n" in a:
            out.append(f"batch addresses: {a['n']:,} ({a['distinct_pages']:,} distinct pages) "
                       f"from {a['user_pages']:,} probe pages and {a['direct_map_pages']:,} "
                       f"direct-map pages (offset {a['direct_map_offset']}), "
                       f"{a['fault_candidates']:,} from holes/non-canonical; {a['va_bits']}-bit "
                       "VA; shuffled")
        if "sample_gpas" in b and "sample_gpas" in h:
            agree = sum(x == y for x, y in zip(b["sample_gpas"], h["sample_gpas"]))
            out.append(f"batch check: qintrospect and gva2gpa agree on {agree:,} of "
                       f"{len(h['sample_gpas']):,} sampled addresses (GPA or both unmapped); the "
                       f"HMP loop was timed on {h['calls']:,} calls (median "
                       f"{h['times']['median_ms']:.3f} ms each) and extrapolated to "
                       f"{h['n']:,}")
        ba = r.get("batch_arrays") or {}
        if "sample_gpas" in ba and "sample_gpas" in h:
            agree = sum(x == y for x, y in zip(ba["sample_gpas"], h["sample_gpas"]))
            out.append(f"translate_batch check: agrees with gva2gpa on {agree:,} of "
                       f"{len(h['sample_gpas']):,} sampled addresses; {ba['with_value']:,} "
                       f"values and {ba['with_hpa']:,} HPAs found")
        md, tlb = r.get("map_direct") or {}, r.get("map_tlb") or {}
        if "leaves" in md and "lines" in tlb:
            from qintrospect.paging.formats import size_name
            sizes = ", ".join(f"{size_name(int(k))}: {v:,}"
                              for k, v in md["by_page_size"].items())
            out.append(f"map check: {md['leaves']:,} leaves from qintrospect vs {tlb['lines']:,} "
                       f"lines of info tlb ({tlb['bytes'] / 1000:.0f} kB of text); page sizes "
                       f"{sizes}; CR3 {md['cr3']:#x} vs {tlb['cr3'] or 0:#x}")
        for key in ("scan_256M", "scan_2G_booted", "scan_2G_filled"):
            s = r.get(key) or {}
            if "ram_bytes" in s:
                out.append(f"{key}: guest RAM {s['ram_bytes'] / (1 << 20):,.0f} MiB, present on "
                           f"host {s['present_bytes'] / (1 << 20):,.0f} MiB; "
                           f"{s['mb_per_s']:,.0f} MB/s over guest RAM (best "
                           f"{s['best_mb_per_s']:,.0f}), {s['present_mb_per_s']:,.0f} MB/s over "
                           "the present part (host pages proven zero -- never touched "
                           "private anonymous memory -- are skipped via pagemap)")
        if self.fill:
            f = self.fill
            out.append(f"2G fill: the guest wrote {f['fill_mib']} MiB of zeros to tmpfs and "
                       f"deleted it ({f['seconds']:.1f} s) so its RAM is present on the host")
        out.append("the VM is paused by QMP stop for every measurement; peak RSS = ru_maxrss of "
                   "the measuring process (for the two commands: of the command's own process, "
                   "from wait4; gdb's own RSS is not included). MB = 10^6 bytes, GB/s = 10^9 B/s")
        return out

    def report(self):
        rows = self.rows()
        if self.args.json:
            obj = {"bench": {"cpu": self.args.cpu, "quick": self.args.quick,
                             "params": self.params, "targets": TARGETS,
                             "seconds": round(self.elapsed, 1), "loadavg": self.loadavg,
                             "cpus": os.cpu_count(), "code": self.code,
                             "guests": self.guest_info},
                   "rows": rows, "checks": self.checks(), "notes": self.notes(),
                   "measurements": self.results}
            print(json.dumps(obj, indent=2))
            return
        widths = (54, 12, 16, 8)
        head = (f"{'measurement':<{widths[0]}} {'peak RSS':>{widths[1]}}  "
                f"{'target':<{widths[2]}} {'status':<{widths[3]}} result")
        print(f"qintrospect bench: -cpu {self.args.cpu}, {'quick' if self.args.quick else 'full'}"
              f" run, {self.elapsed:.0f} s; {self.guest_line()}; host load average "
              f"{self.load_line()} on {os.cpu_count()} CPUs")
        print(f"qintrospect code: {self.code}; QEMU "
              f"{', '.join(sorted({g.get('qemu', '?') for g in self.guest_info})) or '?'}")
        titles = {1: "1. single translation (VM paused)",
                  2: "2. batch of addresses",
                  3: "3. whole address space (same CR3, VM paused)",
                  4: "4. find-cr3 scan rate (direct path)",
                  5: "5. second-level table (the guest's own table read as an NPT)",
                  6: "6. memory",
                  7: "7. the guest's own processes (issue 22; 1 GiB guest, VM paused)"}
        print(head)
        print("-" * (len(head) + 40))
        section = None
        for row in rows:
            if row["section"] != section:
                section = row["section"]
                print(titles[section])
            rss = f"{row['peak_rss_mb']:.1f} MB" if row["peak_rss_mb"] is not None else ""
            print(f"  {row['measurement']:<{widths[0] - 2}} {rss:>{widths[1]}}  "
                  f"{row['target'] or '':<{widths[2]}} {row['status'] or '':<{widths[3]}} "
                  f"{row['result']}")
        print()
        for note in self.notes():
            print(f"- {note}")

    def load_line(self):
        return " -> ".join(f"{v[0]:.1f}" for v in self.loadavg.values())

    def guest_line(self):
        return "; ".join(f"{g['memory']} guest booted in {g['boot_s']:.1f} s"
                         for g in self.guest_info)


def code_version():
    """The qintrospect commit measured (others edit it meanwhile): HEAD, plus whether qintrospect/
    has uncommitted changes."""
    def git(*a):
        try:
            return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("log", "-1", "--format=%h %cI %s")
    dirty = git("status", "--porcelain", "--", "qintrospect")
    if not head:
        return "unknown (not a git checkout)"
    return head[:90] + (" + uncommitted changes in qintrospect/" if dirty else "")


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Boot the bundled guest and measure qintrospect beside QEMU's monitor: one "
                    "translation (gdbstub / direct / HMP gva2gpa / whole command), a batch of "
                    "100,000 addresses vs a gva2gpa loop, the whole map vs info tlb, the "
                    "find-cr3 scan rate (256 MiB and 2 GiB guests) and each peak RSS. Targets "
                    "are printed beside the figures, never asserted.")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the "
                                                        "table")
    ap.add_argument("--quick", action="store_true",
                    help="smaller N (batch of 20,000), no 2 GiB guest; a few minutes")
    ap.add_argument("--cpu", choices=("max", "qemu64"), default="max",
                    help="QEMU -cpu model of the guests (max: 5-level paging; qemu64: 4-level)")
    ap.add_argument("--profile", default="",
                    help="comma-separated measurements to run again under cProfile after the "
                         "timed run (top functions to stderr), e.g. batch,map_direct,scan; "
                         f"names: {', '.join(MEASURES)}")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.profile = [n for n in args.profile.split(",") if n]
    unknown = [n for n in args.profile if n not in MEASURES]
    if unknown:
        ap.error(f"--profile: unknown measurement(s) {', '.join(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return child_main(args.one, args.ctx, args.profile_out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(args)
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted; tearing down")
        return 130
    except Exception as exc:
        log(f"error: {type(exc).__name__}: {exc}; reporting what was measured")
        status = 1
    finally:
        bench.close()
    bench.report()
    return status


if __name__ == "__main__":
    sys.exit(main())
