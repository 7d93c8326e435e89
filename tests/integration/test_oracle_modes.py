"""Our page walker against QEMU itself, in every x86 paging mode.

For each mode the oracle guest (vm/oracle) builds page tables with a known list of mappings,
reads every listed address through the emulated MMU (PROBE lines), prints the list and halts
with paging on. Each listed address is then checked against:

  (a) QEMU's debug translation: HMP `gva2gpa` and `info tlb`, through QMP;
  (b) the list the guest printed and what its own reads through the MMU gave;
  (c) qintrospect: the pure walker (qintrospect.paging.walk / iter_mappings, fed by HMP `xp`
      and `info registers`) and the whole tool, `qintrospect translate --json`, attached
      through QMP and the gdbstub;
  (d) the access rules: the guest's own supervisor/user read/write/execute of a set of pages
      under CR0.WP and EFER.NXE (ACCESS lines) against walk().access (the check lives in
      test_oracle_access.py, which also runs it under -cpu max with SMEP, SMAP and PKU).

Known differences, asserted explicitly (they are QEMU's, not ours):
  * QEMU's debug translation ignores reserved bits: `gva2gpa` and `info tlb` show a mapping where
    the CPU (the guest's own probe) takes #PF with RSVD.
  * QEMU 7.2 TCG reports a reserved-bit #PF with error code 0x8 (RSVD without P); the SDM says
    RSVD is only ever set together with P (0x9), which is what our walker reports.
  * `info tlb` prints a frame with a mask, not the address: in PAE mode a 4 KiB frame keeps
    XD (bit 63); a 32-bit 4 MiB frame loses the PSE-36 bits 39:32 and keeps bit 21.
  * `info tlb` prints the leaf entry's own U/W/X bits, not the effective rights.
  * With MAXPHYADDR < 40 (variant pse-phys-bits-36), QEMU's MMU does not fault on a 4 MiB
    PSE-36 PDE naming physical bits at or above MAXPHYADDR (SDM table 4-4: reserved).
  * QEMU TCG sets the accessed bit (5) in PAE PDPTEs when it walks (a CPU loads PDPTEs into
    registers at MOV CR3 and never writes them); the SDM reserves PDPTE bits 8:5.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from vm.oracle import boot
from vm.oracle.boot import MODES, OracleVM, tlb_letters

from .test_oracle_access import check_access_lines_complete, check_accesses

pytestmark = pytest.mark.vm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The mapping names the guest lists in each mode.
COMMON = {"identity", "4k", "read-only", "user", "user-ro", "user-code", "alias-a", "pat-4k",
          "np-pte", "restrict-parent", "np-pde", "np-top", "upper", "alias-b", "last-page"}
EXPECTED_NAMES = {
    "32bit": COMMON,
    "pse": COMMON | {"large-4m", "pse36-4m", "rsvd-4m-bit21"},
    "pae": COMMON | {"nx", "rsvd-pte", "large-2m", "rsvd-2m-bit13"},
    "4level": COMMON | {"nx", "rsvd-pte", "large-2m", "rsvd-2m-bit13", "huge-1g",
                        "rsvd-1g-bit13", "rsvd-pml4-ps"},
    "5level": COMMON | {"nx", "rsvd-pte", "large-2m", "rsvd-2m-bit13", "huge-1g",
                        "rsvd-1g-bit13", "rsvd-pml4-ps", "rsvd-pml5-ps", "la57-only"},
}
#: Test variants: id -> (mode, -cpu or None for vm.oracle.boot.CPU[mode], mapping names).
VARIANTS = {
    mode: (mode, None, EXPECTED_NAMES[mode]) for mode in MODES
}
VARIANTS["5level-cpu-max"] = ("5level", "max", EXPECTED_NAMES["5level"])
VARIANTS["pse-phys-bits-36"] = ("pse", "qemu64,+pdpe1gb,phys-bits=36",
                                EXPECTED_NAMES["pse"] | {"rsvd-4m-above-maxphyaddr"})
#: Reserved-bit entries on which QEMU 7.2's MMU does not fault (the SDM says it must).
QEMU_CPU_MISSES_RSVD = {"rsvd-4m-above-maxphyaddr"}
#: Addresses the guest does not map but a walker must refuse as non-canonical (or, in the
#: 32-bit modes, as not a 32-bit linear address).
NON_CANONICAL = {
    "32bit": [1 << 32],
    "pse": [1 << 32],
    "pae": [0xFFFFFFFF00000000],
    "4level": [0x0000800000000000, 0xFFFF7FFFFFFFF000],
    "5level": [0x0100000000000000, 0xFEFFFFFFFFFFF000],
}
PF_P, PF_RSVD = 0x1, 0x8


def _have_qemu():
    return shutil.which(boot.QEMU) is not None


@pytest.fixture(scope="session")
def oracle_elf(tmp_path_factory):
    assert _have_qemu(), f"{boot.QEMU} is not installed; run scripts/setup"
    return boot.build()


@pytest.fixture(scope="module", params=list(VARIANTS))
def vm(request, oracle_elf, tmp_path_factory):
    mode, cpu, names = VARIANTS[request.param]
    workdir = tmp_path_factory.mktemp(f"oracle-{request.param}")
    with OracleVM(mode, str(workdir), cpu=cpu, elf=oracle_elf) as v:
        v.wait_halted()
        v.variant = request.param
        v.expected_names = names
        yield v


def ordinary(vm):
    return [m for m in vm.output.maps if m.fault == "none"]


def faulting(vm, kind=None):
    return [m for m in vm.output.maps if m.fault != "none" and (kind is None or m.fault == kind)]


def probe_points(m):
    """Addresses inside one listed page that we check: its first and its last 8 bytes."""
    return [(m.va, 0), (m.va + m.size - 8, m.size - 8)]


def is_ram(vm, pa):
    return pa + 8 <= int(vm.output.info["ram_end"], 16)


# ---------------------------------------------------------------------------------------------
# (b) the guest's list: complete, consistent, and what the CPU itself did

def test_guest_list_is_complete(vm):
    out = vm.output
    assert out.error is None
    assert out.ready["mode"] == vm.mode
    names = {m.name for m in out.maps}
    assert names == vm.expected_names
    # the registers READY printed are the vCPU's
    regs = vm.registers()
    assert int(out.ready["cr3"], 16) == regs["CR3"]
    assert int(out.ready["cr4"], 16) == regs["CR4"]
    assert int(out.ready["efer"], 16) == regs["EFER"]
    assert int(out.ready["cr0"], 16) == regs["CR0"]
    assert int(out.info["maxphyaddr"]) == vm.phys_bits()
    # aliases: one frame, two addresses, and every filled frame holds a distinct value
    alias = [m for m in out.maps if m.name.startswith("alias-")]
    assert len(alias) == 2 and alias[0].pa == alias[1].pa and alias[0].va != alias[1].va
    assert len(set(out.fills.values())) == len(out.fills)
    for pa, value in out.fills.items():
        assert int.from_bytes(vm.read_phys(pa, 8), "little") == value


def test_guest_reads_through_the_mmu(vm):
    """The guest read every listed address itself: mapped ones gave the bytes at the listed
    frame, not-present ones faulted with P=0, reserved-bit ones faulted with RSVD."""
    out = vm.output
    for m in out.maps:
        p = out.probes[m.va]
        if m.fault == "none":
            assert p.ok, (m, p)
            if is_ram(vm, m.pa):
                assert p.value == int.from_bytes(vm.read_phys(m.pa, 8), "little"), m
                if m.pa in out.fills:
                    assert p.value == out.fills[m.pa]
            else:
                assert p.value == 0, m          # unassigned physical memory reads as 0
            if m.size > 0x1000:
                end = out.probes[m.va + m.size - 8]
                assert end.ok
                if is_ram(vm, m.pa + m.size - 8):
                    assert end.value == int.from_bytes(vm.read_phys(m.pa + m.size - 8, 8),
                                                       "little")
        elif m.fault == "not-present":
            assert not p.ok and p.err & PF_P == 0 and p.err & PF_RSVD == 0, (m, p)
        elif m.name in QEMU_CPU_MISSES_RSVD:
            assert p.ok, f"QEMU now faults on {m}: drop it from QEMU_CPU_MISSES_RSVD"
        else:
            assert not p.ok and p.err & PF_RSVD, (m, p)
            # QEMU 7.2 TCG leaves P out of a reserved-bit #PF error code (the SDM: P=1 always).
            assert p.err in (PF_RSVD, PF_RSVD | PF_P), (m, p)


# ---------------------------------------------------------------------------------------------
# (a) QEMU's debug translation against the list

def test_qemu_gva2gpa(vm):
    for m in vm.output.maps:
        got = vm.gva2gpa(m.va)
        if m.fault == "none":
            for va, off in probe_points(m):
                assert vm.gva2gpa(va) == m.pa + off, (m, hex(va))
        elif m.fault == "not-present":
            assert got is None, (m, got)
        else:
            # Known difference: QEMU's debug walk ignores reserved bits, so it returns an
            # address where the CPU faults (the guest's probe says RSVD).
            assert got is not None, m
    if vm.mode in ("4level", "5level"):
        for va in NON_CANONICAL[vm.mode]:
            assert vm.gva2gpa(va) is None


@pytest.mark.parametrize("vm", ["pae"], indirect=True)
def test_qemu_sets_accessed_in_pae_pdptes(vm):
    """Known QEMU behaviour: its walk sets A (bit 5) in PAE PDPTEs, which the guest wrote as
    frame|P only and which the SDM reserves (table 4-8: bits 8:5). A walker of a PAE guest
    under TCG must therefore meet PDPTEs with bit 5 set."""
    root = int(vm.output.ready["cr3"], 16) & ~0x1F
    pdptes = [int.from_bytes(vm.read_phys(root + 8 * i, 8), "little") for i in range(4)]
    present = [e for e in pdptes if e & 1]
    assert len(present) == 3                  # index 2 is the np-top entry (P=0)
    assert all(e & 0x1E0 == 0x20 for e in present), [hex(e) for e in pdptes]


def qemu_tlb_frame(mode, entry, leaf_level):
    """What QEMU 7.2's `info tlb` prints as the frame of a leaf entry (target/i386/monitor.c:
    print_pte(addr, pte, mask) prints pte & mask). leaf_level 1 = PT, 2 = PD, 3 = PDPT."""
    if mode in ("32bit", "pse"):
        return entry & (0xFFFFF000 if leaf_level == 1 else 0xFFE00000)   # ~((1 << 21) - 1)
    if mode == "pae":
        return entry & (~0xFFF if leaf_level == 1 else ~0xFFFFF) & (1 << 64) - 1
    return entry & {1: 0x3FFFFFFFFF000, 2: 0x3FFFFFFE00000, 3: 0x3FFFFC0000000}[leaf_level]


def test_qemu_info_tlb(vm):
    tlb = {line.va: line for line in vm.info_tlb()}
    nx_mode = vm.mode not in ("32bit", "pse")
    for m in ordinary(vm):
        line = tlb.get(m.va)
        assert line is not None, f"info tlb has no line for {m}"
        frame = line.frame
        if vm.mode == "pae":
            frame &= (1 << 52) - 1        # known: PAE frames printed with XD (bit 63) in
            assert (line.frame >> 63) == (line.flags[0] == "X")
        if m.name == "pse36-4m":
            # known: info tlb drops the PSE-36 bits 39:32 of a 4 MiB frame (gva2gpa keeps them)
            assert m.pa >> 32 != 0 and frame == m.pa & 0xFFFFFFFF
        else:
            assert frame == m.pa, (m, line)
        letters = line.flags
        large = m.size > 0x1000
        assert (letters[2] == "P") == large, (m, line)
        if m.name == "restrict-parent":
            # known: info tlb shows the leaf's own bits; the parent entry takes them away
            assert letters[-1] == "W" and letters[-2] == "U" and not m.w and not m.u
            continue
        assert (letters[-1] == "W") == m.w, (m, line)
        assert (letters[-2] == "U") == m.u, (m, line)
        if nx_mode:
            assert (letters[0] == "X") == (not m.x), (m, line)
    listed = {m.va for m in ordinary(vm)}
    for m in faulting(vm, "not-present"):
        assert not [va for va in tlb if m.va <= va < m.va + m.size], m
    rsvd_lines = set()
    for m in faulting(vm, "reserved-bit"):
        inside = [va for va in tlb if m.va <= va < m.va + m.size]
        # Known difference: info tlb lists what the CPU refuses (a reserved bit set).
        assert inside, f"QEMU no longer lists the reserved-bit mapping {m}"
        rsvd_lines.update(inside)
    assert set(tlb) == listed | rsvd_lines, "info tlb has mappings the guest did not list"


# ---------------------------------------------------------------------------------------------
# (c) our walker

def _walker():
    from qintrospect import paging
    return paging


def check(problems, ok, message):
    """Collect a mismatch instead of stopping at the first: a failure lists them all."""
    if not ok:
        problems.append(message)


def report(problems):
    assert not problems, f"{len(problems)} mismatch(es):\n" + "\n".join(problems)


def test_walker_against_list(vm):
    """qintrospect.paging.walk, reading memory with HMP xp and registers from info registers."""
    paging = _walker()
    cpu = vm.cpu_state()
    out = vm.output
    problems = []
    for m in vm.output.maps:
        for va, off in probe_points(m):
            w = paging.walk(vm.read_phys, cpu, va)
            where = (f"{vm.variant} {m.name} va={va:#x} "
                     f"entries={[hex(s.entry) for s in w.levels]}")
            if m.fault == "none":
                if w.fault is not None:
                    problems.append(f"{where}: expected pa={m.pa + off:#x}, got fault "
                                    f"{w.fault.reason} at {w.fault.level}: {w.fault.message}")
                    continue
                check(problems, (w.pa, w.page_size) == (m.pa + off, m.size),
                      f"{where}: expected pa={m.pa + off:#x} size={m.size:#x}, got "
                      f"pa={w.pa:#x} size={w.page_size:#x}")
                check(problems, (w.writable, w.user, w.executable) == (m.w, m.u, m.x),
                      f"{where}: expected w/u/x={m.w:d}{m.u:d}{m.x:d}, got "
                      f"{w.writable:d}{w.user:d}{w.executable:d}")
                check(problems, w.pa == vm.gva2gpa(va),
                      f"{where}: walker pa={w.pa:#x}, QEMU gva2gpa={vm.gva2gpa(va)}")
            elif w.fault is None:
                problems.append(f"{where}: expected fault {m.fault}, got pa={w.pa:#x}")
            else:
                check(problems, w.pa is None and w.fault.reason == m.fault,
                      f"{where}: expected fault {m.fault}, got {w.fault.reason}")
                if m.fault == "reserved-bit":
                    # the SDM's code (P|RSVD); QEMU 7.2 raised RSVD alone, checked above
                    check(problems, w.fault.error_code == PF_P | PF_RSVD,
                          f"{where}: error code {w.fault.error_code}, expected 0x9")
                else:
                    check(problems, w.fault.error_code == out.probes[m.va].err,
                          f"{where}: error code {w.fault.error_code}, the CPU raised "
                          f"{out.probes[m.va].err:#x}")
    for va in NON_CANONICAL[vm.mode]:
        w = paging.walk(vm.read_phys, cpu, va)
        check(problems, w.fault is not None and w.fault.reason == "non-canonical",
              f"{vm.variant} va={va:#x}: expected non-canonical, got {w.fault or hex(w.pa)}")
    report(problems)


def test_walker_alias_values(vm):
    """Both alias addresses reach one frame; the bytes there are the ones the guest read."""
    paging = _walker()
    cpu = vm.cpu_state()
    a, b = [m for m in vm.output.maps if m.name.startswith("alias-")]
    wa, wb = paging.walk(vm.read_phys, cpu, a.va), paging.walk(vm.read_phys, cpu, b.va)
    assert wa.pa == wb.pa == a.pa
    value = int.from_bytes(vm.read_phys(wa.pa, 8), "little")
    assert value == vm.output.probes[a.va].value == vm.output.probes[b.va].value
    assert value == vm.output.fills[a.pa]


def test_iter_mappings_equals_info_tlb(vm):
    """The whole address space: our iterator against `info tlb`, line for line (address,
    frame as QEMU prints it, flags), for the ordinary mappings; the reserved-bit ones are in
    QEMU's list only (it ignores reserved bits)."""
    paging = _walker()
    cpu = vm.cpu_state()
    depth = {"32bit": 2, "pse": 2, "pae": 3, "4level": 4, "5level": 5}[vm.mode]
    ours = list(paging.iter_mappings(vm.read_phys, cpu))
    tlb = vm.info_tlb()
    rsvd = faulting(vm, "reserved-bit")

    def in_rsvd(va):
        return any(m.va <= va < m.va + m.size for m in rsvd)

    qemu_lines = [(t.va, t.frame, t.flags) for t in tlb if not in_rsvd(t.va)]
    assert len(qemu_lines) == len(tlb) - len(rsvd)
    our_lines = []
    for mp in ours:
        leaf = mp.levels_entries[-1]
        leaf_level = depth - len(mp.levels_entries) + 1
        our_lines.append((mp.va, qemu_tlb_frame(vm.mode, leaf, leaf_level),
                          tlb_letters(leaf, leaf_level)))
    problems = []

    def fmt(line):
        return f"{line[0]:016x}: {line[1]:016x} {line[2]}"

    ours_set, qemu_set = set(our_lines), set(qemu_lines)
    for line in qemu_lines:
        check(problems, line in ours_set, f"{vm.variant}: info tlb line not from iter_mappings: "
                                          f"{fmt(line)}")
    for line in our_lines:
        check(problems, line in qemu_set, f"{vm.variant}: iter_mappings line not in info tlb: "
                                          f"{fmt(line)}")
    if not problems:
        check(problems, our_lines == qemu_lines, f"{vm.variant}: same lines, other order")
    for mp in ours:
        check(problems, not in_rsvd(mp.va),
              f"{vm.variant}: iter_mappings lists the reserved-bit mapping at {mp.va:#x}")

    # and against the guest's list: the same pages, frames, sizes and effective rights
    listed = {m.va: m for m in ordinary(vm)}
    check(problems, [mp.va for mp in ours] == sorted(listed),
          f"{vm.variant}: iter_mappings pages {sorted(set(mp.va for mp in ours) ^ set(listed))} "
          f"differ from the guest's list")
    for mp in ours:
        m = listed.get(mp.va)
        if m is None:
            continue
        check(problems, (mp.pa, mp.size, mp.writable, mp.user, mp.executable) ==
              (m.pa, m.size, m.w, m.u, m.x), f"{vm.variant}: {m} vs {mp}")
        # flag names agree with the entry bits QEMU prints as letters
        leaf = mp.levels_entries[-1]
        names = set(mp.flags)
        for name, bit in (("RW", 1), ("US", 2), ("A", 5), ("G", 8), ("NX", 63)):
            check(problems, (name in names) == bool(leaf >> bit & 1),
                  f"{vm.variant}: {m.name} flags {mp.flags} vs entry {leaf:#x} ({name})")
        check(problems, ("PS" in names) == (mp.size > 0x1000),
              f"{vm.variant}: {m.name} flags {mp.flags} vs size {mp.size:#x}")
    report(problems)


# ---------------------------------------------------------------------------------------------
# (c) the whole tool: attach layer + walker, through the real command line

def _cli():
    exe = os.path.join(REPO, ".venv", "bin", "qintrospect")
    if os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "qintrospect"]


def test_cli_translate(vm):
    points = []
    for m in vm.output.maps:
        points += [(m, va, off) for va, off in probe_points(m)]
    extra = NON_CANONICAL[vm.mode]
    args = _cli() + ["translate", "--json", "--qmp", vm.qmp_path, "--gdb", vm.gdb_address]
    args += [hex(va) for _, va, _ in points] + [hex(va) for va in extra]
    t0 = time.monotonic()
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stderr       # 1: some addresses fault, as they should
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == len(points) + len(extra), res.stderr
    out = vm.output
    problems = []
    for (m, va, off), row in zip(points, rows):
        where = (f"{vm.variant} {m.name} va={va:#x} "
                 f"entries={[lv['entry'] for lv in row['levels']]}")
        check(problems, int(row["gva"], 16) == va, f"{where}: row for {row['gva']}")
        check(problems, int(row["cr3"], 16) == int(out.ready["cr3"], 16), f"{where}: cr3")
        if m.fault == "none":
            if "fault" in row:
                problems.append(f"{where}: expected pa={m.pa + off:#x}, got {row['fault']}")
                continue
            check(problems, int(row["gpa"], 16) == m.pa + off,
                  f"{where}: gpa {row['gpa']}, expected {m.pa + off:#x}")
            check(problems, row["page_size"] == m.size,
                  f"{where}: page_size {row['page_size']}, expected {m.size}")
            check(problems, (row["writable"], row["user"], row["executable"]) == (m.w, m.u, m.x),
                  f"{where}: w/u/x {row['writable']} {row['user']} {row['executable']}")
            if off == 0 and is_ram(vm, m.pa):
                # the 8 bytes the tool read at the GVA are the ones the guest read there
                check(problems, row["value"] is not None and
                      int(row["value"], 16) == out.probes[va].value,
                      f"{where}: value {row['value']}, the guest read "
                      f"{out.probes[va].value:#x}")
        elif "fault" not in row:
            problems.append(f"{where}: expected fault {m.fault}, got gpa {row['gpa']}")
        else:
            check(problems, row["fault"]["reason"] == m.fault,
                  f"{where}: fault {row['fault']}, expected {m.fault}")
            want = PF_P | PF_RSVD if m.fault == "reserved-bit" else out.probes[m.va].err
            got = row["fault"]["error_code"]
            check(problems, got is not None and int(got, 16) == want,
                  f"{where}: error code {got}, expected {want:#x}")
    for va, row in zip(extra, rows[len(points):]):
        check(problems, row.get("fault", {}).get("reason") == "non-canonical",
              f"{vm.variant} va={va:#x}: expected non-canonical, got {row.get('fault')}")
    # the tool left the VM as it found it (running, halted in its loop)
    check(problems, vm.qmp.cmd("query-status")["running"] is True, "VM left paused")
    print(f"\n{vm.variant}: qintrospect translate of {len(rows)} addresses took {elapsed:.2f}s")
    report(problems)


def test_many_address_json_is_the_one_address_json(vm, monkeypatch):
    """The many-address JSON (vectorized walk, pieces shared per page and per fault) is the
    one-address line, in every paging mode: large pages, PSE-36, PAE's PDPTE registers,
    reserved bits, not-present entries at every level, non-canonical addresses; made in C
    (_rowformat) and by the fallback (bytes.__mod__) alike."""
    import qintrospect
    from qintrospect.present import rowlines
    from qintrospect.present.render import json_line
    addrs = [va for m in vm.output.maps for va, _ in probe_points(m)]
    addrs += [va + 8 * i for m in vm.output.maps for va, _ in probe_points(m)[:1]
              for i in range(1, 5)]
    addrs += NON_CANONICAL[vm.mode] * 2
    with qintrospect.attach(qmp=vm.qmp_path, gdb=vm.gdb_address) as s:
        fast = list(s.translate_json(addrs))
        with monkeypatch.context() as m:
            m.setattr(rowlines, "_rowformat", None)
            fallback = list(s.translate_json(addrs))
        slow = [json_line(s.translate(a).to_dict()) for a in addrs]
    problems = [f"{vm.variant} {a:#x}:\n  many: {line}\n  one:  {want}"
                for a, (ok, line), want in zip(addrs, fast, slow) if line != want]
    problems += [f"{vm.variant} {a:#x}:\n  C:        {line}\n  fallback: {other}"
                 for a, (_, line), (_, other) in zip(addrs, fast, fallback) if line != other]
    report(problems)
    assert len(fast) == len(addrs)


def test_attach_session_state(vm):
    """qintrospect.attach sees the same registers and memory as QEMU's monitor."""
    import qintrospect
    regs = vm.registers()
    with qintrospect.attach(qmp=vm.qmp_path, gdb=vm.gdb_address) as s:
        cpu = s.cpu_state()
        assert (cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer) == \
            (regs["CR0"], regs["CR3"], regs["CR4"], regs["EFER"])
        assert cpu.maxphyaddr == vm.phys_bits()
        root = regs["CR3"] & ~0xFFF
        assert s.read_phys(root, 4096) == vm.read_phys(root, 4096)
        for pa in vm.output.fills:
            assert s.read_phys(pa, 8) == vm.read_phys(pa, 8)
    assert vm.qmp.cmd("query-status")["running"] is True


# ---------------------------------------------------------------------------------------------
# (d) the access rules against the CPU's own accesses

def test_cpu_access_rules(vm):
    """Every ACCESS line (this variant's CPU: CR0.WP, EFER.NXE; SMEP/SMAP/PKU where -cpu has
    them) against qintrospect.paging.walk(...).access."""
    check_access_lines_complete(vm)
    n = check_accesses(vm)
    print(f"\n{vm.variant}: {n} accesses, qintrospect agrees with the CPU on each")


def test_boot_time(vm):
    """How long a boot took (QEMU start to READY, access checks included): printed, not
    asserted (the machine is shared; a fraction of a second under TCG when it is quiet)."""
    assert vm.boot_seconds > 0
    print(f"\n{vm.variant}: boot to READY in {vm.boot_seconds:.3f}s")
