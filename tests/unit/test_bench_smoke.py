"""scripts/bench.py without a VM: its options, and its report (table and JSON) built from
measurements given to it, complete or failed. The real run, `scripts/bench --quick --json` on the
bundled guest, is tests/integration/test_bench_quick.py; both hold the JSON to check_bench_json.
"""

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "scripts", "bench.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("qi_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------- what the JSON must hold

def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def count0(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def text(x):
    return isinstance(x, str) and x != ""


def flag(x):
    return isinstance(x, bool)


def times(x):
    return (isinstance(x, dict) and count(x["n"])
            and all(positive(x[k]) for k in ("median_ms", "p90_ms", "min_ms", "max_ms",
                                             "mean_ms"))
            and x["min_ms"] <= x["median_ms"] <= x["p90_ms"] <= x["max_ms"])


def gpas(x):
    return isinstance(x, list) and x and all(v is None or count0(v) for v in x) \
        and any(v is not None for v in x)


def sizes(x):
    return isinstance(x, dict) and x and all(k.isdigit() and count(v) for k, v in x.items())


RSS = {"maxrss_kb": count}
SINGLE = {"via": text, "memory_path": text, "attach_s": positive, "gva": count, "gpa": count,
          "cr3": count, "value_ok": flag, "levels": count, "gdb_reads_per_translation": count0,
          "times": times, **RSS}
MAP = {"via": text, "memory_path": text, "leaves": count, "cr3": count, "by_page_size": sizes,
       "times": times, **RSS}
# Every field the table, the notes and the checks are built from.
MEASUREMENTS = {
    "baseline": {"qintrospect": text, **RSS},
    "single_gdb": SINGLE,
    "single_direct": SINGLE,
    "single_hmp": {"gva": count, "gpa": count, "cr3": count, "times": times, **RSS},
    "cli_translate": {"times": times, "memory_path": text, "cmd_maxrss_kb": count},
    "addresses": {"n": count, "leaves": count, "va_bits": count, "user_pages": count,
                  "direct_map_pages": count, "direct_map_offset": text,
                  "fault_candidates": count, "distinct_pages": count, **RSS},
    "batch": {"n": count, "seconds": positive, "per_second": positive,
              "us_per_translation": positive, "translated": count, "faulted": count,
              "memory_path": text, "sample_gpas": gpas, **RSS},
    "batch_arrays": {"n": count, "seconds": positive, "per_second": positive,
                     "us_per_translation": positive, "translated": count, "faulted": count,
                     "memory_path": text, "sample_gpas": gpas, "with_value": count,
                     "with_hpa": count0, **RSS},
    "batch_hmp": {"calls": count, "seconds": positive, "per_second": positive,
                  "extrapolated_seconds": positive, "n": count, "times": times,
                  "sample_gpas": gpas, **RSS},
    "map_tlb": {"lines": count, "bytes": count, "cr3": count, "times": times, **RSS},
    "map_arrays": MAP,
    "map_direct": MAP,
    "map_gdb": MAP,
    "map_cli": {"rows": count, "times": times, "cmd_maxrss_kb": count},
    "scan_256M": {"ram_bytes": count, "present_bytes": count, "memory_path": text,
                  "candidates": count, "times": times, "mb_per_s": positive,
                  "best_mb_per_s": positive, "present_mb_per_s": positive, **RSS},
    "who_maps": {"times": times, "roots": count, "mappings": count, "heap_found": flag, **RSS},
    "search": {"times": times, "scanned_bytes": count, "matches": count, "mb_per_s": positive,
               "heap_found": flag, **RSS},
    "guest_ps": {"first_s": positive, "first_maxrss_kb": count, "later": times,
                 "later_maxrss_kb": count, "processes": count, "by_pid": times,
                 "by_cr3": times, "gpa_pid": text, "gpa_cr3": text, "probe_gpa": count,
                 "open_uncached_ms": positive, "open_cached_ms": positive,
                 "walk_ms": positive, "walk_tasks": count, "how": text, "osrelease": text,
                 "btf_bytes": count, **RSS},
    "cli_help": {"times": times, "cmd_maxrss_kb": count},
    "gdb_bare": {"times": times, "cmd_maxrss_kb": count},
    "cli_json_batch": {"n": count, "lines": count, "seconds": positive, "times": times,
                       "per_second": positive, "bytes": count, "cmd_maxrss_kb": count,
                       "levels_in_first": count},
    "cli_brief_batch": {"n": count, "lines": count, "seconds": positive, "times": times,
                        "per_second": positive, "bytes": count, "cmd_maxrss_kb": count},
    "ptdump": {"skipped": text},
    "slat_256M": {"ram_bytes": count, "times": times, "probes": count, "found_root": count,
                  "cr3_root": count, "depth": count, "found_is_cr3": flag, "candidates": count,
                  "s_per_gib": positive, "slat_walk_us": positive, "table_walk_us": positive,
                  "walk_ratio": positive, "batch_n": count, "batch_gpas": count,
                  "batch_guest_s": positive, "batch_ept_s": positive,
                  "batch_ept_ratio": positive, **RSS},
}
# Table rows by key; those with a target carry met: true/false.
ROWS = {"single_gdb", "single_direct", "single_hmp", "cli_translate", "batch", "batch_hmp",
        "batch_arrays", "batch_ratio", "batch_many_ratio", "map_tlb", "map_arrays",
        "map_arrays_ratio", "map_direct", "map_direct_ratio", "map_gdb", "map_gdb_ratio",
        "map_cli", "map_cli_ratio", "scan_256M", "scan_2G_booted", "scan_2G_filled", "baseline",
        "slat_256M", "slat_walk_ratio", "slat_batch_ratio", "slat_2G_filled", "cli_help",
        "gdb_bare",
        "translate_vs_gdb", "cli_json_batch", "json_batch_ratio", "cli_brief_batch",
        "brief_batch_ratio", "map_cli_extra_ratio", "ptdump", "who_maps", "search",
        "shell_translate", "shell_vs_gva2gpa", "ps_first", "ps_later", "guest_pid_extra",
        "guest_open"}
TARGETED = {"single_gdb", "batch_ratio", "map_arrays_ratio", "scan_256M", "slat_256M",
            "slat_walk_ratio", "slat_batch_ratio", "cli_help", "translate_vs_gdb",
            "json_batch_ratio",
            "brief_batch_ratio", "map_cli_extra_ratio", "who_maps", "search",
            "shell_vs_gva2gpa", "ps_first", "ps_later", "guest_pid_extra"}
CHECKS = {"single_cr3_same", "single_gpa_agree", "single_gdb_value_ok", "single_direct_value_ok",
          "batch_agrees_with_gva2gpa", "batch_arrays_agrees_with_gva2gpa",
          "map_leaves_equal_tlb_lines", "map_cr3_same", "map_arrays_leaves_equal_map_direct",
          "map_gdb_leaves_equal_map_direct", "slat_256M_found_the_cr3_table",
          "who_maps_found_the_heap", "search_found_the_heap", "shell_gpa_agrees_with_gva2gpa",
          "guest_pid_gpa_is_the_probes", "guest_pid_gpa_equals_cr3s"}


def check_bench_json(obj: dict, quick: bool = True) -> None:
    """A bench --json object is complete and sane: every figure present with the right type and
    sign, every check true, every target a boolean. Its speed is not judged."""
    problems = []
    bench = obj["bench"]
    if not (bench["quick"] is quick and text(bench["cpu"]) and positive(bench["seconds"])
            and count(bench["cpus"]) and text(bench["code"])):
        problems.append(f"bench: {bench}")
    if not all(positive(v) for v in bench["targets"].values()):
        problems.append(f"targets: {bench['targets']}")
    for when in ("start", "end"):
        if len(bench["loadavg"][when]) != 3:
            problems.append(f"loadavg {when}")
    guests = bench["guests"]
    if [g["memory"] for g in guests] != (["256M", "1G"] if quick else ["256M", "1G", "2G"]) or \
            not all(positive(g["boot_s"]) and text(g["cpu"]) for g in guests):
        problems.append(f"guests: {guests}")
    m = obj["measurements"]
    for name, fields in MEASUREMENTS.items():
        if name not in m or "error" in m[name]:
            problems.append(f"{name}: {m.get(name)}")
            continue
        problems += [f"{name}.{k} = {m[name].get(k)!r}" for k, ok in fields.items()
                     if not ok(m[name].get(k))]
    for name in ("batch", "batch_arrays"):
        b = m.get(name) or {}
        if b.get("translated", 0) + b.get("faulted", 0) != b.get("n"):
            problems.append(f"{name}: translated + faulted != n")
    rows = {r["key"]: r for r in obj["rows"]}
    if set(rows) != ROWS:
        problems.append(f"rows: {sorted(set(rows) ^ ROWS, key=str)}")
    for key, r in rows.items():
        if not (r["section"] in range(1, 8) and text(r["measurement"]) and text(r["result"])):
            problems.append(f"row {key}: {r}")
        if r["result"].startswith("ERROR"):
            problems.append(f"row {key}: {r['result']}")
        if r["peak_rss_mb"] is not None and not positive(r["peak_rss_mb"]):
            problems.append(f"row {key}: peak RSS {r['peak_rss_mb']}")
        if key in TARGETED:
            if not (flag(r["met"]) and text(r["target"])
                    and r["status"] == ("met" if r["met"] else "not met")):
                problems.append(f"row {key}: target {r['target']!r} met {r['met']!r}")
        elif r["met"] is not None or r["status"] is not None:
            problems.append(f"row {key}: met {r['met']!r} without a target")
    checks = obj["checks"]
    if set(checks) != CHECKS or not all(v is True for v in checks.values()):
        problems.append(f"checks: {checks}")
    if not (obj["notes"] and all(text(n) for n in obj["notes"])):
        problems.append("notes")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------ tests

def test_bench_help_runs_without_a_vm():
    out = subprocess.run([sys.executable, BENCH, "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for option in ("--json", "--quick", "--cpu", "--profile"):
        assert option in out.stdout


def test_bench_refuses_an_unknown_profile_name():
    out = subprocess.run([sys.executable, BENCH, "--profile", "nosuch"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "nosuch" in out.stderr


def summary(ms):
    return {"n": 3, "median_ms": ms, "p90_ms": ms * 1.5, "min_ms": ms / 2, "max_ms": ms * 2,
            "mean_ms": ms * 1.1}


def measured():
    """One run's measurements, as the children print them (figures of a real --quick run)."""
    sample = [0xBDDA6D0, None, 0x1000, 0]
    single = {"memory_path": "direct", "attach_s": 0.6, "gva": 0x28D56D0, "gpa": 0xBDDA6D0,
              "cr3": 0x28E2000, "value_ok": True, "levels": 5, "times": summary(0.1),
              "maxrss_kb": 42000}
    amap = {"memory_path": "direct", "leaves": 8239, "cr3": 0x28E2000,
            "by_page_size": {"4096": 8098, "2097152": 141}, "times": summary(9.3),
            "maxrss_kb": 46000}
    return {
        "baseline": {"qintrospect": "/x/qintrospect/__init__.py", "maxrss_kb": 41000},
        "single_gdb": {**single, "via": "gdb", "memory_path": "gdb",
                       "gdb_reads_per_translation": 6, "times": summary(2.0)},
        "single_direct": {**single, "via": "direct", "gdb_reads_per_translation": 0},
        "single_hmp": {"gva": 0x28D56D0, "gpa": 0xBDDA6D0, "cr3": 0x28E2000,
                       "times": summary(0.5), "maxrss_kb": 41000},
        "cli_translate": {"times": summary(741), "memory_path": "direct",
                          "cmd_maxrss_kb": 39000, "argv": "translate ..."},
        "shell_translate": {"times": summary(0.45), "in_shell": summary(0.3), "gpa": "0xbdda6d0",
                            "exit": 0, "maxrss_kb": 41000},
        "addresses": {"n": 20000, "leaves": 8239, "va_bits": 57, "user_pages": 1201,
                      "direct_map_pages": 65504, "direct_map_offset": "0xff3991e880000000",
                      "fault_candidates": 1000, "distinct_pages": 19141, "maxrss_kb": 54000},
        "batch": {"n": 20000, "seconds": 3.7, "per_second": 5416.0, "us_per_translation": 184.6,
                  "translated": 19000, "faulted": 1000, "memory_path": "direct",
                  "sample_gpas": sample, "maxrss_kb": 78000},
        "batch_arrays": {"n": 20000, "seconds": 0.054, "per_second": 370975.0,
                         "us_per_translation": 2.7, "translated": 19000, "faulted": 1000,
                         "memory_path": "direct", "sample_gpas": sample, "with_value": 19000,
                         "with_hpa": 9362, "maxrss_kb": 51000},
        "batch_hmp": {"calls": 400, "seconds": 0.71, "per_second": 561.0,
                      "extrapolated_seconds": 36.0, "n": 20000, "times": summary(0.49),
                      "sample_gpas": sample, "maxrss_kb": 43000},
        "map_tlb": {"lines": 8239, "bytes": 379000, "cr3": 0x28E2000, "times": summary(24.2),
                    "maxrss_kb": 45000},
        "map_arrays": {**amap, "via": "direct"},
        "map_direct": {**amap, "via": "direct", "times": summary(69.1)},
        "map_gdb": {**amap, "via": "gdb", "memory_path": "gdb", "times": summary(198.3)},
        "map_cli": {"rows": 8239, "times": summary(675), "cmd_maxrss_kb": 49000},
        "scan_256M": {"ram_bytes": 256 << 20, "present_bytes": 124 << 20,
                      "memory_path": "direct", "candidates": 8, "times": summary(274),
                      "mb_per_s": 979.0, "best_mb_per_s": 1038.0, "present_mb_per_s": 474.0,
                      "maxrss_kb": 58000},
        "who_maps": {"times": summary(40), "roots": 7, "mappings": 4, "heap_found": True,
                     "maxrss_kb": 60000},
        "search": {"times": summary(300), "scanned_bytes": 320 << 20, "matches": 9,
                   "mb_per_s": 1100.0, "heap_found": True, "maxrss_kb": 80000},
        "cli_help": {"times": summary(80), "cmd_maxrss_kb": 30000},
        "gdb_bare": {"times": summary(60), "cmd_maxrss_kb": 40000},
        "cli_json_batch": {"n": 20000, "lines": 20000, "seconds": 0.6, "times": summary(600),
                           "per_second": 33000.0, "bytes": 30000000, "cmd_maxrss_kb": 90000,
                           "levels_in_first": 5},
        "cli_brief_batch": {"n": 20000, "lines": 20000, "seconds": 0.1, "times": summary(100),
                            "per_second": 200000.0, "bytes": 4000000, "cmd_maxrss_kb": 60000,
                            "levels_in_first": 0},
        "ptdump": {"skipped": "set QI_GDB_PT_DUMP to gdb-pt-dump's pt.py to compare with it"},
        "guest_ps": {"first_s": 0.95, "first_maxrss_kb": 60000, "later": summary(160),
                     "later_maxrss_kb": 40000, "processes": 48, "by_pid": summary(170),
                     "by_cr3": summary(160), "gpa_pid": "0xfddf6d0", "gpa_cr3": "0xfddf6d0",
                     "probe_gpa": 0xFDDF6D0, "open_uncached_ms": 830.0, "open_cached_ms": 1.8,
                     "walk_ms": 8.0, "walk_tasks": 48, "how": "cached for this boot",
                     "osrelease": "6.1.0-57-cloud-amd64",
                     "kallsyms": {"mode": "absolute_percpu", "count": 87347},
                     "btf_bytes": 4120215, "maxrss_kb": 70000},
        "slat_256M": {"ram_bytes": 256 << 20, "times": summary(126), "probes": 5,
                      "found_root": 0x2992000, "cr3_root": 0x2992000, "depth": 5,
                      "found_is_cr3": True, "candidates": 1, "s_per_gib": 0.5,
                      "slat_walk_us": 68.0, "table_walk_us": 78.0, "walk_ratio": 0.87,
                      "batch_n": 100000, "batch_gpas": 95000, "batch_guest_s": 0.05,
                      "batch_ept_s": 0.03, "batch_ept_ratio": 0.6, "maxrss_kb": 63000},
    }


def report(bench, results, capsys, as_json=True):
    b = bench.Bench(Namespace(json=as_json, quick=True, cpu="max", profile=[]))
    try:
        b.results = results
        b.elapsed = 25.0
        b.loadavg["end"] = os.getloadavg()
        b.guest_info = [{"memory": "256M", "boot_s": 6.7, "cpu": "max", "qemu": "7.2.22"},
                        {"memory": "1G", "boot_s": 6.9, "cpu": "max", "qemu": "7.2.22"}]
        b.report()
    finally:
        b.close()
    out = capsys.readouterr().out
    return json.loads(out) if as_json else out


def test_report_json_of_a_complete_run(capsys):
    bench = load_bench()
    obj = report(bench, measured(), capsys)
    check_bench_json(obj)
    rows = {r["key"]: r for r in obj["rows"]}
    assert rows["batch_ratio"]["met"] is True and rows["scan_256M"]["met"] is False
    assert any("4 KiB: 8,098, 2 MiB: 141" in n for n in obj["notes"])   # size_name
    table = report(bench, measured(), capsys, as_json=False)
    assert "1. single translation" in table and "not met" in table


def test_report_of_a_run_whose_measurements_failed(capsys):
    bench = load_bench()
    results = {name: {"error": "child exited 1"} for name in measured()}
    obj = report(bench, results, capsys)
    assert all(r["result"].startswith(("ERROR", "skipped", "-")) or r["key"] == "baseline"
               for r in obj["rows"])
    assert obj["checks"] == {}
    with pytest.raises(AssertionError):
        check_bench_json(obj)
    # A wrong answer is a false check, and fails the JSON check.
    results = measured()
    results["batch_hmp"]["sample_gpas"] = [0xBDDA6D0, None, 0x2000, 0]
    obj = report(bench, results, capsys)
    assert obj["checks"]["batch_agrees_with_gva2gpa"] is False
    with pytest.raises(AssertionError, match="checks"):
        check_bench_json(obj)


# ------------------------------------------------------------------- scripts/bench_rig.py

def test_the_rig_bench_table_says_flat_or_not():
    """scripts/bench_rig.py's table (its real run boots the KVM rig twice: a benchmark, not
    a test): the vCPU read judged against 0.1 s and flatness between the sizes."""
    spec = importlib.util.spec_from_file_location(
        "qi_bench_rig", os.path.join(REPO, "scripts", "bench_rig.py"))
    rig_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rig_bench)
    row = {"same_root": True, "scan_s_per_gib": 6.0}
    flat = [{**row, "l1_ram_gib": 1.0, "kvm_vcpu_s": 0.02, "scan_s": 6.0},
            {**row, "l1_ram_gib": 3.0, "kvm_vcpu_s": 0.021, "scan_s": 18.0}]
    text = rig_bench.table(flat)
    assert "21.0 ms at 3.00 GiB (target <= 100 ms: met); 1.05x" in text, text
    assert "(flat: target <= 1.5x: met)" in text and "scan: 3.00x" in text, text
    grows = [flat[0], {**flat[1], "kvm_vcpu_s": 0.2}]
    text = rig_bench.table(grows)
    assert "target <= 100 ms: not met" in text and "(flat: target <= 1.5x: not met)" in text
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_rig.py"),
                        "--memory", "1G"], capture_output=True, text=True)
    assert r.returncode == 2 and "two sizes" in r.stderr, r.stderr
