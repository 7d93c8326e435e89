"""Our second-level dump module (vm/module/slat_dump.c) on the real EPT of the EPT rig's L1.

qintrospect inside L1 found the EPT of L2 (conftest.py's `seed`: `translate --slat auto`);
slat_dump.ko (built for L1's kernel by vm/module/build.sh, on the rig's per-start disk at
/qi/modules) walks the same table in C for the same GPA (`format=ept`, the whole EPTP as root)
and prints the seed's ept_dump layout; `parse-log` reads that log and finds it consistent with
itself, and `compare --log` inside L1 sets it against qintrospect's own walk, row by row.

The folder's one L1 boot (conftest.py). These tests FAIL (not skip) when the rig is not built:
run vm/ept/build.sh first.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from ..conftest import REPO
from .conftest import MODULE, MiB, inside

pytestmark = pytest.mark.vm


def slat_dump(rig, name, args):
    """insmod slat_dump.ko ARGS in L1; the dmesg of that run, left in /tmp/NAME.log in L1 too."""
    out = rig.run_l1(f"dmesg -c >/dev/null; insmod {MODULE} {args}; echo insmod=$?;"
                     f" dmesg > /tmp/{name}.log; rmmod slat_dump", timeout=120)
    assert "insmod=0" in out, out
    return rig.l1_read_file(f"/tmp/{name}.log").decode()


def parse_log_l0(tmp_path, name, text):
    """parse-log at L0 (offline, as a user would on a copied log): (exit status, objects)."""
    path = tmp_path / f"{name}.log"
    path.write_text(text)
    p = subprocess.run([sys.executable, "-m", "qintrospect", "parse-log", "--json", str(path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    return p.returncode, [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def test_the_module_is_built_for_l1s_kernel(rig):
    release = rig.run_l1("uname -r").strip()
    # (busybox's modinfo wants modules.dep: read the .modinfo string itself)
    info = rig.run_l1(f"tr '\\000' '\\n' < {MODULE} | grep '^vermagic='")
    assert rig.last_status == 0, info
    assert re.search(rf"vermagic={re.escape(release)} ", info), (release, info)


@pytest.mark.parametrize("region", ["heap", "thp"])
def test_the_module_walks_l2s_ept_as_qintrospect_does(rig, seed, region, tmp_path):
    probe = rig.probe["regions"][region]
    t = seed[region]
    s = t["slat"]
    gpa, hpa = int(t["gpa"], 16), int(t["hpa"], 16)
    t0 = time.monotonic()
    text = slat_dump(rig, region, f"format=ept root={s['eptp']} gpa={gpa:#x} "
                                  f"expect={probe['value']:#x}")
    print(f"\nslat_dump {region} (insmod + dmesg + rmmod, read back): "
          f"{time.monotonic() - t0:.1f} s")
    assert "slat_dump: This is EPT" in text and "slat_dump: end" in text, text

    # parse-log: what the log says, and that it agrees with itself
    rc, (obj,) = parse_log_l0(tmp_path, region, text)
    log, checks = obj["log"], obj["checks"]
    assert rc == 0, [c["message"] for c in checks if c["agree"] is False]
    assert (log["kind"], log["format"], log["paging_levels"], log["module"]) == \
        ("ept_dump", "ept", 4, "slat_dump")
    assert int(log["root"], 16) == int(s["root"], 16) and int(log["address"], 16) == gpa
    assert int(log["final_address"], 16) == hpa == int(s["out"], 16)
    assert int(log["value"], 16) == probe["value"]
    walked = {c["check"]: c for c in checks if c["check"] in ("walk", "value_check")}
    assert walked["walk"]["agree"] is True and walked["value_check"]["agree"] is True
    # the same levels and entries as translate --slat printed
    assert [int(lvl["entry"], 16) for lvl in log["levels"]] == \
        [int(lvl["entry"], 16) for lvl in s["levels"]]
    if s["page_size"] == 2 * MiB:
        assert "Huge Page (2M) at level 2 detected!" in text
        assert log["levels"][-1]["page_size"] == 2 * MiB
        assert {"mask1", "hfn", "mask2", "offset"} <= {c["check"] for c in checks
                                                      if c["agree"] is True}
    print(f"{region}: GPA {gpa:#x} -> L1 {hpa:#x} through the EPT at {s['root']}, "
          f"{s['page_size'] >> 10} KiB leaf")

    # compare --log in L1: the log against qintrospect's walk of the same EPT, row by row
    r = rig.run_qi("compare", *inside(rig, gdb=False), "--log", f"/tmp/{region}.log", "--json")
    print(f"compare --log {region} in L1: {r.seconds:.1f} s")
    assert r.rc == 0, (r.stderr, r.stdout)
    (result,) = r.json
    assert result["agree"] is True and result["compared"] is True
    assert not [x for x in result["rows"] if x["agree"] is False]
    agreed = {(x["field"], x["level"]) for x in result["rows"] if x["agree"] is True}
    for lvl in log["levels"]:
        assert ("entry", lvl["name"]) in agreed and ("index", lvl["name"]) in agreed
    for field in ("address", "root", "final", "value", "host_hpa", "host_value"):
        assert (field, None) in agreed, field
    assert result["outside"]["slat"]["agrees"] is True
    assert result["outside"]["slat"]["format"] == "ept"


def test_a_4k_ept_leaf_in_l2s_first_2mib(rig, seed, tmp_path):
    """GPA 0x400, the BIOS data area (L2's firmware wrote it, L2 reads it here through
    /dev/mem): L2's first 2 MiB hold the VGA hole and ROMs, so KVM maps them with 4 KiB EPT
    pages only. The module's walk goes down to the PT level, and compare agrees there too."""
    gpa = 0x400
    out = rig.l2_run(f"dd if=/dev/mem bs=8 skip={gpa // 8} count=1 2>/dev/null | od -A n -t x8")
    assert rig.l2_last_status == 0 and out.split(), out
    value = int(out.split()[0], 16)
    eptp = seed["heap"]["slat"]["eptp"]
    text = slat_dump(rig, "low", f"format=ept root={eptp} gpa={gpa:#x} expect={value:#x}")
    assert "slat_dump: This is EPT" in text and "Huge Page" not in text, text
    rc, (obj,) = parse_log_l0(tmp_path, "low", text)
    log, checks = obj["log"], obj["checks"]
    assert rc == 0, [c["message"] for c in checks if c["agree"] is False]
    assert [lvl["name"] for lvl in log["levels"]] == ["PGD", "PUD", "PMD", "PTE"], log["levels"]
    assert log["final_address"] is not None and int(log["final_address"], 16) & 0xFFF == gpa & 0xFFF
    assert int(log["value"], 16) == value
    r = rig.run_qi("compare", *inside(rig, gdb=False), "--log", "/tmp/low.log", "--json")
    print(f"\nGPA {gpa:#x} -> L1 {log['final_address']} (4 KiB EPT leaf); compare in L1: {r.seconds:.1f} s")
    assert r.rc == 0, (r.stderr, r.stdout)
    (result,) = r.json
    assert result["agree"] is True and not [x for x in result["rows"] if x["agree"] is False]
    agreed = {(x["field"], x["level"]) for x in result["rows"] if x["agree"] is True}
    assert {("entry", "PTE"), ("final", None), ("value", None), ("host_value", None)} <= agreed
    assert result["outside"]["slat"]["page_size"] == 4096
