"""Issue 12, item 5: our second-level dump module (vm/module/slat_dump.c) in the KVM rig's L1.

L1 (the cloud kernel under TCG with kvm-amd) runs L2 (the bundled Linux guest and its probe)
under real KVM: L2's memory goes through the 5-level NPT that L1's KVM builds. qintrospect
inside L1 finds that NPT's root (`translate --slat auto`); slat_dump.ko, built for L1's kernel
by vm/module/build.sh and shipped on the rig's per-start disk (/qi/modules), walks it in C for
one GPA and prints the seed's ept_dump layout; `parse-log` reads that log and finds it
consistent with itself, and `compare --log` inside L1 sets it against qintrospect's own walk of
the same table over /proc/kcore, row by row. Also: a GPA the NPT does not map (the not-present
line), a tampered log (exit 1, the rows that differ), and an EPT made by hand in L1's memory
(vm/module/slat_tables.py: the module's EPT format and qintrospect's EPT walker agree).

The folder's one L1 boot (conftest.py). These tests FAIL (not skip) when the rig is not built: run
vm/kvm/build.sh first (it also builds the modules). Every qintrospect in L1 gets --timeout 60.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest


from ..conftest import REPO

pytestmark = pytest.mark.vm

QI_TIMEOUT = ["--timeout", "60"]
from .conftest import MODULE  # noqa: E402
MIB2 = 1 << 21


def inside(rig):
    return ["--qmp", rig.l2_qmp_in_l1, "--gdb", rig.l2_gdb_in_l1] + QI_TIMEOUT


@pytest.fixture(scope="module")
def npt(rig):
    """qintrospect in L1: the probe's heap and THP region translated with --slat auto. The
    NPT root it found, and each region's translation (gpa, hpa, value, slat)."""
    regions = rig.probe["regions"]
    names = ("heap", "thp")
    r = rig.run_qi("translate", *inside(rig), "--slat", "auto", "--json",
                   *[hex(regions[n]["gva"]) for n in names])
    print(f"\ntranslate --slat auto in L1: {r.seconds:.1f} s")
    assert r.rc == 0, r.stderr
    found = dict(zip(names, r.json))
    slat = found["heap"]["slat"]
    assert slat["format"] == "npt" and slat["agrees"] is True, slat
    assert found["thp"]["slat"]["root"] == slat["root"]
    return {"root": int(slat["root"], 16), "depth": slat["depth"], **found}


def slat_dump(rig, name, args):
    """insmod slat_dump.ko ARGS in L1; the dmesg of that run, left in /tmp/NAME.log in L1 too."""
    out = rig.run_l1(f"dmesg -c >/dev/null; insmod {MODULE} {args}; echo insmod=$?;"
                     f" dmesg > /tmp/{name}.log; rmmod slat_dump")
    assert "insmod=0" in out, out
    return rig.l1_read_file(f"/tmp/{name}.log").decode()


def parse_log_l0(tmp_path, name, text):
    """parse-log at L0 (offline, as a user would on a copied log): (exit status, objects)."""
    path = tmp_path / f"{name}.log"
    path.write_text(text)
    p = subprocess.run([sys.executable, "-m", "qintrospect", "parse-log", "--json", str(path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    return p.returncode, [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def compare_in_l1(rig, name):
    r = rig.run_qi("compare", *inside(rig), "--log", f"/tmp/{name}.log", "--json")
    print(f"compare --log {name} in L1: {r.seconds:.1f} s")
    return r


# ----------------------------------------------------------------------------------- tests

def test_the_module_is_built_for_l1s_kernel(rig):
    release = rig.run_l1("uname -r").strip()
    # (busybox's modinfo wants modules.dep: read the .modinfo string itself)
    info = rig.run_l1(f"tr '\\000' '\\n' < {MODULE} | grep '^vermagic='")
    assert rig.last_status == 0, info
    assert re.search(rf"vermagic={re.escape(release)} ", info), (release, info)
    assert rig.run_l1("cat /qi/l2/kernel-release").strip() == release


@pytest.mark.parametrize("region", ["heap", "thp"])
def test_the_module_walks_l2s_npt_as_qintrospect_does(rig, npt, region, tmp_path):
    probe = rig.probe["regions"][region]
    t = npt[region]
    gpa, hpa = int(t["gpa"], 16), int(t["hpa"], 16)
    assert gpa == probe["gpa"]
    t0 = time.monotonic()
    text = slat_dump(rig, region, f"root={npt['root']:#x} gpa={gpa:#x} "
                                  f"expect={probe['value']:#x}")
    print(f"\nslat_dump {region} (insmod + dmesg + rmmod, read back): "
          f"{time.monotonic() - t0:.1f} s")
    assert "slat_dump: This is NPT" in text and "slat_dump: end" in text, text

    # parse-log: what the log says, and that it agrees with itself
    rc, (obj,) = parse_log_l0(tmp_path, region, text)
    log, checks = obj["log"], obj["checks"]
    assert rc == 0, [c["message"] for c in checks if c["agree"] is False]
    assert (log["kind"], log["format"], log["paging_levels"], log["module"]) == \
        ("ept_dump", "npt", npt["depth"], "slat_dump")
    assert int(log["root"], 16) == npt["root"] and int(log["address"], 16) == gpa
    assert int(log["final_address"], 16) == hpa == int(t["slat"]["out"], 16)
    assert int(log["value"], 16) == probe["value"]
    walked = {c["check"]: c for c in checks if c["check"] in ("walk", "value_check")}
    assert walked["walk"]["agree"] is True and walked["value_check"]["agree"] is True
    # the same levels and entries as translate --slat printed
    assert [int(lvl["entry"], 16) for lvl in log["levels"]] == \
        [int(lvl["entry"], 16) for lvl in t["slat"]["levels"]]
    if t["slat"]["page_size"] == MIB2:        # likely: QEMU's RAM is THP-backed in L1
        assert "Huge Page (2M) at level 2 detected!" in text
        assert log["levels"][-1]["name"] == "PMD" and log["levels"][-1]["page_size"] == MIB2
        assert {"mask1", "hfn", "mask2", "offset"} <= {c["check"] for c in checks
                                                      if c["agree"] is True}
    print(f"{region}: GPA {gpa:#x} -> HPA {hpa:#x} through the NPT at {npt['root']:#x}, "
          f"{t['slat']['page_size'] >> 10} KiB leaf")

    # compare --log in L1: the log against qintrospect's walk of the same NPT, row by row
    r = compare_in_l1(rig, region)
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


def test_a_tampered_log_differs_where_it_was_changed(rig, npt):
    """The heap's log with another value: compare exits 1 and names the value rows only."""
    rig.run_l1("sed -e 's/Value at HPA: [0-9]*/Value at HPA: 42/' "
               "-e 's/Value at HPA (hex): 0x[0-9a-f]*/Value at HPA (hex): 0x000000000000002a/' "
               "/tmp/heap.log > /tmp/tampered.log")
    assert rig.last_status == 0
    r = compare_in_l1(rig, "tampered")
    assert r.rc == 1, (r.stderr, r.stdout)
    (result,) = r.json
    differ = {(x["field"], x["level"]) for x in result["rows"] if x["agree"] is False}
    assert differ == {("value", None), ("host_value", None)}, result["rows"]
    assert any(x["field"] == "entry" and x["agree"] for x in result["rows"])


def test_a_gpa_the_npt_does_not_map(rig, npt, tmp_path):
    """1 TiB: far above L2's RAM (256 MiB), so KVM never mapped it: the walk stops at a
    not-present entry, which the module says, and qintrospect's walk stops there too."""
    gpa = 1 << 40
    text = slat_dump(rig, "absent", f"root={npt['root']:#x} gpa={gpa:#x}")
    m = re.search(r"slat_dump:  (\w+) not present \(P=0, entry 0x0+\): GPA "
                  rf"0x0*{gpa:x} is not mapped in this NPT", text)
    assert m, text
    rc, (obj,) = parse_log_l0(tmp_path, "absent", text)
    assert rc == 0
    last = obj["log"]["levels"][-1]
    assert last["name"] == m.group(1) and last["fault"] == "not-present"
    assert obj["log"]["final_address"] is None
    r = compare_in_l1(rig, "absent")
    assert r.rc == 0, (r.stderr, r.stdout)
    (result,) = r.json
    stop = [x for x in result["rows"] if x["field"] == "stop"]
    assert len(stop) == 1 and stop[0]["agree"] is True and stop[0]["level"] == m.group(1)
    assert result["outside"]["slat"]["fault"]["reason"] == "not-present"
    assert result["outside"]["ram_block"] is None          # not L2 RAM either


def test_an_ept_made_in_l1_is_walked_alike(rig, npt, tmp_path):
    """The module's EPT format against qintrospect's EPT walker: vm/module/slat_tables.py
    builds a 4-level EPT in L1's memory (a 2 MiB leaf, an EPT misconfiguration); the module
    walks it given the whole EPTP; compare --log walks the same table from L1's /proc/kcore."""
    with open(os.path.join(REPO, "vm", "module", "slat_tables.py"), "rb") as f:
        rig.l1_write_file("/tmp/slat_tables.py", f.read())
    out = rig.run_l1("rm -f /tmp/ept /tmp/ept.done; (python3 /tmp/slat_tables.py ept 4 /tmp/ept"
                     " &); n=0; while [ ! -s /tmp/ept ] && [ $n -lt 600 ]; do usleep 100000;"
                     " n=$((n+1)); done; cat /tmp/ept", timeout=120)
    cases = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())
    try:
        eptp = int(cases["root"], 16) | 0x5E          # WB, walk length 4, A/D: as KVM's
        text = slat_dump(rig, "ept", f"format=ept root={eptp:#x} gpa={cases['2m']} "
                                     f"expect={cases['value']}")
        rc, (obj,) = parse_log_l0(tmp_path, "ept", text)
        assert rc == 0 and obj["log"]["format"] == "ept"
        assert obj["log"]["levels"][-1]["page_size"] == MIB2
        assert int(obj["log"]["value"], 16) == int(cases["value"], 16)
        r = compare_in_l1(rig, "ept")
        assert r.rc == 0, (r.stderr, r.stdout)
        (result,) = r.json
        agreed = {(x["field"], x["level"]) for x in result["rows"] if x["agree"] is True}
        assert {("entry", "PGD"), ("entry", "PUD"), ("entry", "PMD"), ("final", None),
                ("value", None)} <= agreed
        # W without R: an EPT misconfiguration, said by both
        text = slat_dump(rig, "ept-bad", f"format=ept root={eptp:#x} gpa={cases['invalid']}")
        assert "PMD misconfigured" in text
        r = compare_in_l1(rig, "ept-bad")
        assert r.rc == 0, (r.stderr, r.stdout)
        stop = [x for x in r.json[0]["rows"] if x["field"] == "stop"]
        assert stop and stop[0]["agree"] is True
    finally:
        rig.run_l1("touch /tmp/ept.done")
