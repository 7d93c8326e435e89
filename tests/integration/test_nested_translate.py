"""Issue: one L2 address all the way down to L0, with nothing installed at any level.

On the nested rig (vm/nested: L1 = Linux running QEMU, L2 = the oracle guest inside it), from
L0: every hop's address is what that level's own monitor says (L2 gva2gpa/gpa2hva, L1 xp/
gpa2hva), the L1 GPA is what L1's own kernel pagemap says for L2's QEMU (the "local" way), the
final HPA is what this host's pagemap says, and the value is the same 8 bytes at every hop.
"""

import re
import struct

import pytest

from vm.nested.rig import NestedRig, SerialQMP

from .conftest import boot, run_cli, run_json

pytestmark = pytest.mark.vm

PRESENT, PFN_MASK = 1 << 63, (1 << 55) - 1


@pytest.fixture(scope="module")
def rig():
    NestedRig.check_built()
    r = NestedRig()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def nested_args(rig):
    return ["--qmp", rig.l2_qmp_path, "--gdb", rig.l2_gdb_path,
            "--outer", f"qmp={rig.l1_qmp_path},gdb={rig.l1_gdb_address}"]


def hexnum(pattern, text):
    m = re.search(pattern, text)
    assert m, text
    return int(m.group(1), 16)


def host_hpa(pid, hva):
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(hva // 4096 * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    assert entry & PRESENT
    return (entry & PFN_MASK) * 4096 + hva % 4096


def test_l2_addresses_down_to_l0(rig):
    maps = [m for m in rig.l2_maps if m.fault == "none"][:6]
    addrs = [m.va + 0x10 for m in maps]
    rc, out, err = run_json("translate", *nested_args(rig), *addrs, timeout=300)
    assert rc == 0, err
    assert len(out) == len(addrs)
    for m, va, r in zip(maps, addrs, out):
        l2, l1 = r["hops"]
        assert (l2["level"], l1["level"]) == ("L2", "L1")
        # L2: its own monitor agrees on GPA and HVA
        with SerialQMP(rig.l2_qmp_path) as q:
            assert hexnum(r"gpa: (0x[0-9a-f]+)", q.hmp(f"gva2gpa {va:#x}")) == int(l2["gpa"], 16)
            assert hexnum(r"is (0x[0-9a-f]+)", q.hmp(f"gpa2hva {int(l2['gpa'], 16):#x}")) == \
                int(l2["hva"], 16)
        assert int(l2["gpa"], 16) == m.pa + 0x10
        # L1: the walk of L2's QEMU process agrees with L1's own kernel (pagemap, read in L1)
        assert int(l1["gva"], 16) == int(l2["hva"], 16)
        entry = rig.l1_pagemap_entry(rig.l2_qemu_pid_in_l1, int(l1["gva"], 16))
        assert entry & PRESENT
        assert (entry & PFN_MASK) << 12 | int(l1["gva"], 16) & 0xFFF == int(l1["gpa"], 16)
        assert l2["hpa"] == l1["gpa"]  # a hop's hpa is the next hop's gpa
        rig.qmp("stop")
        try:
            xp = rig.hmp(f"xp /1gx {int(l1['gpa'], 16):#x}")
            assert hexnum(r":\s*(0x[0-9a-f]+)", xp) == int(l2["value"], 16)
            assert hexnum(r"is (0x[0-9a-f]+)", rig.hmp(f"gpa2hva {int(l1['gpa'], 16):#x}")) == \
                int(l1["hva"], 16)
        finally:
            rig.qmp("cont")
        # L0: this host's pagemap, and the same 8 bytes everywhere
        assert int(l1["hpa"], 16) == host_hpa(rig.l1_pid, int(l1["hva"], 16))
        assert r["hpa"] == l1["hpa"]
        assert l2["value"] == l1["value"] == l1["value_at_hva"]
        assert "find-cr3" in l1["root_how"]
        # the innermost hop's keys stay at the top level
        assert r["gva"] == hex(va) and r["gpa"] == l2["gpa"] and r["levels"] == l2["levels"]
    # both VMs run again
    assert rig.qmp("query-status")["running"]
    with SerialQMP(rig.l2_qmp_path) as q:
        assert q.cmd("query-status")["running"]


def test_text_view_and_timings(rig):
    m = next(m for m in rig.l2_maps if m.fault == "none")
    rc, out, err = run_cli("-v", "translate", *nested_args(rig), hex(m.va), timeout=300)
    assert rc == 0, err
    for word in ("L2", "L1", "L0", "GVA", "GPA", "HVA", "HPA", "find-cr3", " ms]"):
        assert word in out


def test_faulting_address_stops_at_its_level(rig):
    m = next(m for m in rig.l2_maps if m.fault == "not-present")
    rc, out, err = run_json("translate", *nested_args(rig), hex(m.va), timeout=300)
    assert rc == 1
    assert out[0]["fault"]["reason"] == "not-present" and len(out[0]["hops"]) == 1


def test_unreachable_level_and_root_not_found(rig, tmp_path):
    m = next(m for m in rig.l2_maps if m.fault == "none")
    rc, out, err = run_cli("translate", "--qmp", rig.l2_qmp_path, "--gdb", rig.l2_gdb_path,
                           "--outer", f"qmp={tmp_path / 'missing.sock'}", hex(m.va), timeout=120)
    assert rc == 3 and "L1:" in err and "Traceback" not in err
    with SerialQMP(rig.l2_qmp_path) as q:
        assert q.cmd("query-status")["running"]  # the held inner VM was put back
    # an outer VM that does not run L2's QEMU: no root maps the HVA with the value
    other = boot("qemu64", probe=None)
    try:
        rc, out, err = run_json("translate", "--qmp", rig.l2_qmp_path, "--gdb",
                                rig.l2_gdb_path, "--outer",
                                f"qmp={other.qmp_path},gdb={other.gdb_address}", hex(m.va),
                                timeout=300)
        assert rc == 1, err
        assert out[0]["stopped"]["level"] == "L1"
        assert "not found" in out[0]["stopped"]["reason"]
        assert out[0]["hpa"] is None
    finally:
        other.stop()


def test_no_second_level_table_where_no_hypervisor_keeps_one(rig):
    """On this rig L1's QEMU runs L2 under TCG: no NPT or EPT exists in L1's RAM. --slat auto
    says the root was not found, keeps the chain, and exits 1."""
    m = next(m for m in rig.l2_maps if m.fault == "none")
    rc, out, err = run_json("translate", *nested_args(rig), "--slat", "auto", hex(m.va),
                            timeout=300)
    assert rc == 1, err
    s = out[0]["hops"][0]["slat"]
    assert s["root"] is None and s["out"] is None and s["how"]["method"] == "scan"
    assert "no npt or ept root" in s["note"].lower()
    assert out[0]["hops"][1]["gpa"] is not None and out[0]["hpa"] is not None   # the chain holds
    rc, out, err = run_cli("translate", *nested_args(rig), "--slat", "auto", hex(m.va),
                           timeout=300)
    assert rc == 1 and "NPT" in out or "EPT" in out
