#!/usr/bin/env python3
"""qintrospect on an aarch64 guest beside QEMU's own monitor (issue 25's target rows).

Boots the bundled aarch64 guest (vm/arm64: Debian's arm64 kernel under qemu-system-aarch64,
TCG), starts a busy user process, pauses the VM with QMP `stop`, and times, in one run:

- a batch of N addresses (default 100,000: the pages of the user and kernel leaves, a few
  percent unmapped) through `vm.translate_batch()` (the numpy AArch64 walk, the host's
  pagemap and the 8 bytes at each address), median of a few runs;
- HMP `gva2gpa` over one QMP connection on a sample of the same addresses, extrapolated to N
  (QEMU's own walk, one address per command); the ratio between the two;
- `vm.search()` for a text pattern that is not there over the kernel's half (every RAM leaf
  read): bytes scanned a second. (A pattern holding a NUL byte over mostly-zero RAM is the
  worst case of CPython's bytes.find, about 4x slower: measured 0.26 GB/s.)

With --pt-dump DIR (a checkout of https://github.com/martinradev/gdb-pt-dump), also end to end
on the same paused guest: `qintrospect search TEXT` (attach, walk both halves, read every RAM
leaf, answer) against gdb-pt-dump's `pt -ss TEXT` in gdb-multiarch (`source DIR/pt.py`,
`target remote`, the same search: it also reads through /proc/QEMU_PID/mem), each the median
of --reps runs, with what each found (a text that is there: both must find it, at the same
addresses). gdb-pt-dump's own tree, not a git mirror: its pt.py is sourced from DIR.

Each batch answer is checked against gva2gpa's on the sample (as the access QEMU walks as: an
EL0 read when the vCPU is at EL0, else an EL1 read with PAN). Nothing is asserted; the table
says met / not met against the targets.

    scripts/bench_arm64.py [--count 100000] [--sample 2000] [--json] [--pt-dump DIR]

Assumes scripts/setup has been run (qemu-system-aarch64, gdb-multiarch, vm/arm64 built).
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qintrospect  # noqa: E402
from vm.arm64.guest import Arm64Guest  # noqa: E402

BATCH_TARGET = 300.0        # x the gva2gpa loop
SEARCH_TARGET_GBS = 1.0     # GB/s (10^9 bytes)


def addresses_of(vm, count: int, rnd: random.Random) -> list:
    """`count` addresses in the leaves of both halves (one per page, spread), 3% unmapped."""
    leaves = [m for m in vm.mappings()]
    out = []
    while len(out) < count:
        m = rnd.choice(leaves)
        out.append(m.va + rnd.randrange(0, m.size, 8))
        if rnd.random() < 0.03:
            out.append(0xFFFF7000_0000_0000 + rnd.randrange(0, 1 << 30, 8))   # no table there
    return out[:count]


def gva2gpa_loop(qmp_path: str, sample: list) -> tuple:
    """(seconds per call, {va: gpa or None}) of HMP gva2gpa over one connection."""
    from qemu.qmp.legacy import QEMUMonitorProtocol     # as scripts/bench times QEMU
    mon = QEMUMonitorProtocol(qmp_path)
    mon.connect()
    mon.settimeout(30)
    answers, times = {}, []
    try:
        for va in sample:
            t0 = time.perf_counter()
            text = mon.cmd("human-monitor-command", **{"command-line": f"gva2gpa {va:#x}"})
            times.append(time.perf_counter() - t0)
            answers[va] = int(text.split("gpa:")[1].split()[0], 16) if "gpa:" in text else None
    finally:
        mon.close()
    return statistics.median(times), answers


NEEDLE = "KVMARM-needle-8f3c1d"       # written into the guest by the spinner's shell


def end_to_end_search(g, pt_dump: str, reps: int) -> tuple:
    """(qintrospect's seconds, its matches, gdb-pt-dump's seconds, its matches): the same text
    searched in the whole address space of the paused vCPU, each tool started afresh."""
    import re
    import subprocess
    qi = [sys.executable, "-m", "qintrospect", "search", NEEDLE, "--qmp", g.qmp_path,
          "--gdb", g.gdb_address, "--json", "--max", "100000"]
    remote = g.gdb_address[5:] if g.gdb_address.startswith("unix:") else g.gdb_address
    pt = ["gdb-multiarch", "-q", "-nx", "-batch", "-ex", f"source {pt_dump}/pt.py",
          "-ex", f"target remote {remote}", "-ex", f"pt -ss {NEEDLE}", "-ex", "detach"]
    times = {"qi": [], "pt": []}
    found = {}
    for _ in range(reps):
        for name, argv in (("qi", qi), ("pt", pt)):
            t0 = time.perf_counter()
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            times[name].append(time.perf_counter() - t0)
            g.qmp("stop")               # (gdb's detach resumes the VM)
            if name == "qi":
                found[name] = {int(json.loads(line)["gva"], 16)
                               for line in r.stdout.splitlines()}
            else:
                found[name] = {int(a, 16) for a in re.findall(r"Found at (0x[0-9a-f]+)",
                                                              r.stdout)}
    return (statistics.median(times["qi"]), found["qi"], statistics.median(times["pt"]),
            found["pt"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pt-dump", metavar="DIR",
                    help="a gdb-pt-dump checkout: time its search beside qintrospect's")
    args = ap.parse_args(argv)
    rnd = random.Random(25)
    with Arm64Guest(memory="512M") as g:
        g.start_spinner()
        if args.pt_dump:        # a text both tools must find: in a shell variable's page
            g.run(f"export QI_NEEDLE={NEEDLE}; sh -c 'while :; do sleep 1; done' &")
        g.qmp("stop")
        with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
            addresses = addresses_of(vm, args.count, rnd)
            batch_s = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                b = vm.translate_batch(addresses)
                batch_s.append(time.perf_counter() - t0)
            el0 = vm.cpu.cpsr >> 2 & 3 == 0
            kind = "el0-read" if el0 else "el1-read"
            sample = rnd.sample(range(len(addresses)), min(args.sample, len(addresses)))
            # what QEMU's walk should answer: the batch's GPA where that access is allowed
            want = {}
            for i in sample:
                va = addresses[i]
                ok = bool(b.ok[i]) and vm.translate(va).walk.access[kind].allowed
                want[va] = int(b.gpa[i]) if ok else None
            kernel_bytes = 0
            t0 = time.perf_counter()
            found = vm.search(b"qintrospect: not in this guest", kernel=True)
            search_s = time.perf_counter() - t0
            kernel_bytes = found.scanned
        per_call, answers = gva2gpa_loop(g.qmp_path, [addresses[i] for i in sample])
        e2e = end_to_end_search(g, args.pt_dump, args.reps) if args.pt_dump else None
        g.qmp("cont")
    agree = sum(answers[va] == want[va] for va in want)
    batch = statistics.median(batch_s)
    loop = per_call * len(addresses)
    ratio = loop / batch
    gbs = kernel_bytes / search_s / 1e9
    rows = [
        ("translate_batch", f"{len(addresses)} addresses in {batch * 1e3:.0f} ms "
         f"({len(addresses) / batch / 1e6:.2f} M/s)", None),
        ("HMP gva2gpa loop", f"{per_call * 1e6:.0f} us a call x {len(addresses)} = {loop:.1f} s "
         f"(timed on {len(sample)})", None),
        ("batch vs the loop", f"{ratio:.0f}x", ratio >= BATCH_TARGET),
        ("agree with gva2gpa", f"{agree}/{len(want)} ({kind})", agree == len(want)),
        ("search, kernel half", f"{kernel_bytes / 1e6:.0f} MB in {search_s:.2f} s = {gbs:.2f} GB/s",
         gbs >= SEARCH_TARGET_GBS),
    ]
    if e2e:
        qi_s, qi_found, pt_s, pt_found = e2e
        same = "the same addresses" if qi_found == pt_found else \
            f"{len(qi_found & pt_found)} in common"
        rows += [("search end to end", f"qintrospect {qi_s:.2f} s ({len(qi_found)} found), "
                  f"gdb-pt-dump {pt_s:.2f} s ({len(pt_found)}; {same}): {pt_s / qi_s:.1f}x",
                  qi_s < pt_s and bool(qi_found) and qi_found == pt_found)]
    if args.json:
        print(json.dumps({"rows": [{"name": n, "result": r, "met": m} for n, r, m in rows]}))
        return 0
    print(f"{'row':<22} {'result':<62} target")
    targets = {"batch vs the loop": f">= {BATCH_TARGET:.0f}x",
               "search, kernel half": f">= {SEARCH_TARGET_GBS} GB/s",
               "agree with gva2gpa": "all", "search end to end": "faster than gdb-pt-dump"}
    for name, result, met in rows:
        verdict = "" if met is None else (" met" if met else " NOT met")
        print(f"{name:<22} {result:<62} {targets.get(name, '')}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
