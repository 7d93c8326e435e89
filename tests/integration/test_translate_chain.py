"""Issue: the whole chain for one address, proven on a real QEMU, gdb and guest kernel.

Every answer is checked against a source that is not qintrospect: the guest kernel's own
/proc/self/pagemap (printed by the probe), QEMU's `gva2gpa` / `info tlb` / `info mem` / `gpa2hva`,
and the host's /proc/PID/pagemap read here by the test itself.
"""

import re
import struct
import time

import pytest

import qintrospect
from qintrospect.machine.monitor_text import parse_gpa2hva, parse_gva2gpa, parse_info_tlb, parse_registers

from .conftest import attach_args, run_cli, run_json

pytestmark = pytest.mark.vm

USER_REGIONS = ("heap", "stack", "rodata", "thp", "text")


def host_pagemap_hpa(pid, hva):
    """The test's own pagemap read: HPA of hva in process pid, or None when not present."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(hva // 4096 * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    if not entry >> 63 & 1:
        return None
    return (entry & ((1 << 55) - 1)) * 4096 + hva % 4096


def stop_on_probe(g, tries=20):
    """Pause the VM while vCPU 0 runs the probe (it spins, so that is nearly always), so that
    QEMU's gva2gpa and qintrospect see the probe's page tables. Returns CR3."""
    heap = g.probe["regions"]["heap"]
    for _ in range(tries):
        g.qmp("stop")
        if parse_gva2gpa(g.hmp(f"gva2gpa {heap['gva']:#x}")) == heap["gpa"]:
            return parse_registers(g.hmp("info registers"))["CR3"]
        g.qmp("cont")
        time.sleep(0.05)
    pytest.fail("vCPU 0 never ran the probe's address space")


def test_probe_addresses_match_guest_pagemap_qemu_and_host(guest):
    g = guest
    regions = g.probe["regions"]
    cr3 = stop_on_probe(g)
    try:
        qemu_gpa = {n: parse_gva2gpa(g.hmp(f"gva2gpa {regions[n]['gva']:#x}"))
                    for n in USER_REGIONS}
        rc, out, err = run_json("translate", *attach_args(g),
                                *[hex(regions[n]["gva"]) for n in USER_REGIONS])
        assert rc == 0, err
        assert g.qmp("query-status")["status"] == "paused", "a paused VM must stay paused"
    finally:
        g.qmp("cont")
    results = dict(zip(USER_REGIONS, out))
    for name, t in results.items():
        r = regions[name]
        assert int(t["cr3"], 16) == cr3
        assert t["mode"] == ("5-level" if g.cpu == "max" else "4-level")
        assert int(t["gva"], 16) == r["gva"]
        assert int(t["gpa"], 16) == r["gpa"] == qemu_gpa[name], name
        assert int(t["value"], 16) == r["value"], name
        # the same 8 bytes at the HVA, and the HPA is what the host's pagemap says
        assert t["value_at_hva"] == t["value"] and t["value_matches"] is True
        hva = int(t["hva"], 16)
        _, block, qemu_hva = parse_gpa2hva(g.hmp(f"gpa2hva {r['gpa']:#x}"))
        assert hva == qemu_hva and t["ram_block"] == block == "pc.ram"
        assert int(t["hpa"], 16) == host_pagemap_hpa(g.pid, hva), name
        assert t["host_page_size"] in (4096, 2 << 20)
        assert t["user"] is True
        levels = t["levels"]
        assert len(levels) == (5 if g.cpu == "max" else 4) - (1 if t["page_size"] == 2 << 20 else 0)
        for level in levels:
            for key in ("name", "index", "entry_addr", "entry", "flags"):
                assert key in level
    assert results["heap"]["writable"] and results["stack"]["writable"]
    assert results["rodata"]["writable"] is False
    assert results["text"]["executable"] is True and results["text"]["writable"] is False
    assert results["heap"]["executable"] is False  # NX heap, EFER.NXE on
    if regions["thp"]["thp"]:
        assert results["thp"]["page_size"] == 2 << 20
        assert results["thp"]["levels"][-1]["name"] == "PD"
        assert "PS" in results["thp"]["levels"][-1]["flags"]
    assert g.qmp("query-status")["running"], "a running VM must be running afterwards"


def test_untouched_page_faults_not_present(guest):
    g = guest
    r = g.probe["regions"]["untouched"]
    rc, out, err = run_json("translate", *attach_args(g), hex(r["gva"]))
    assert rc == 1, err
    assert out[0]["fault"]["reason"] == "not-present"
    assert out[0]["fault"]["level"] in ("PT", "PD", "PDPT", "PML4", "PML5")
    assert "gpa" not in out[0]
    assert g.qmp("query-status")["running"]


def kernel_addresses(g):
    """Kernel addresses QEMU itself lists as mapped: `info mem` ranges (4-level), or `info tlb`
    lines (under LA57 QEMU 7.2's `info mem` spends ~30 s and prints nothing). Includes the
    direct map."""
    text = g.hmp("info mem") if g.cpu != "max" else ""
    addrs = []
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]{16})-([0-9a-f]{16}) ([0-9a-f]{16}) ", line)
        if m and int(m.group(1), 16) >> 63:
            addrs.append(int(m.group(1), 16) + 0x3e8)
    if not addrs:
        lines = [t for t in parse_info_tlb(g.hmp("info tlb")) if t.va >> 63]
        addrs = [t.va + 0x3e8 for t in lines]
    assert addrs, "QEMU lists no kernel mappings"
    step = max(1, len(addrs) // 12)
    return addrs[::step][:12]


def test_kernel_addresses_match_qemu(guest):
    g = guest
    stop_on_probe(g)
    try:
        addrs = kernel_addresses(g)
        expected = [parse_gva2gpa(g.hmp(f"gva2gpa {a:#x}")) for a in addrs]
        rc, out, err = run_json("translate", *attach_args(g), *map(hex, addrs))
    finally:
        g.qmp("cont")
    direct = [a for a, t in zip(addrs, out) if "gpa" in t and (a - int(t["gpa"], 16)) % (1 << 30) == 0]
    assert direct, "the kernel's direct map is among QEMU's kernel ranges"
    rc, text, err = run_cli("translate", *attach_args(g), "--no-bits", hex(direct[0]))
    assert rc == 0 and "direct-map alias" in text and "by construction" in text
    # RAM below 640 KiB too (QEMU prints the region at GPA 0 as "for 0", without 0x)
    base = direct[0] - int(out[addrs.index(direct[0])]["gpa"], 16)
    rc, low, err = run_json("translate", *attach_args(g), hex(base + 0x1008))
    assert rc == 0 and low[0]["gpa"] == "0x1008" and low[0]["ram_block"] == "pc.ram"
    assert int(low[0]["hpa"], 16) == host_pagemap_hpa(g.pid, int(low[0]["hva"], 16))
    assert low[0]["value"] == low[0]["value_at_hva"]
    for a, want, t in zip(addrs, expected, out):
        if want is None:
            assert "fault" in t
            continue
        assert int(t["gpa"], 16) == want, hex(a)
        assert t["user"] is False
        # some kernel pages (e.g. the direct map of reserved memory) are not RAM: say so
        if t["ram_block"] is None:
            assert t["gpa_note"]


def test_python_api_and_page_walk_text(guest):
    g = guest
    heap = g.probe["regions"]["heap"]
    stop_on_probe(g)
    try:
        with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
            t = vm.translate(heap["gva"])
            assert t.gpa == heap["gpa"]
            assert t.value == heap["value"].to_bytes(8, "little")
            assert t.hpa == host_pagemap_hpa(g.pid, t.hva)
        assert g.qmp("query-status")["status"] == "paused"
    finally:
        g.qmp("cont")
    rc, out, err = run_cli("translate", *attach_args(g), hex(heap["gva"]))
    assert rc == 0, err
    assert re.search(r"GPA\s+0x0*%x" % heap["gpa"], out)
    assert "HPA" in out and "the same bytes" in out
    # the in-guest module's layout: the entry split into 12 / 40 / 12 bits
    assert re.search(r"\b[01]{12} [01]{40} [01]{12}\b", out)


def test_bad_addresses(guest):
    g = guest
    rc, out, err = run_json("translate", *attach_args(g), "0x0000800000000000" if g.cpu ==
                            "qemu64" else "0x0100000000000000")
    assert rc == 1
    assert out[0]["fault"]["reason"] == "non-canonical"
    for bad in ("0xzz", "12ab", "-5", "0x1ffffffffffffffff"):
        rc, out, err = run_cli("translate", *attach_args(g), bad)
        assert rc == 2, (bad, err)
        assert "Traceback" not in err and err.strip()
    rc, out, err = run_cli("translate", *attach_args(g), "--vcpu", "7", "0x1000")
    assert rc == 2 and "vCPU" in err
    assert g.qmp("query-status")["running"]


def test_memory_paths_agree(guest):
    """gdbstub, direct (/proc/PID/mem) and QMP xp read the same bytes."""
    from qintrospect.memory.guest import DirectMemory, QmpMemory
    g = guest
    pages = [g.probe["regions"][n]["gpa"] & ~0xFFF for n in USER_REGIONS]
    with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address) as vm:
        direct = DirectMemory(vm.ram_map, vm.process)
        xp = QmpMemory(vm.ram_map, vm.qmp)
        for page in pages + [vm.cpu.cr3 & ~0xFFF]:
            a = vm.memory.read(page, 4096)
            assert a == direct.read(page, 4096) == xp.read(page, 4096)
        with pytest.raises(qintrospect.MemoryReadError, match="hpet"):
            vm.read_phys(0xFED00000, 8)
