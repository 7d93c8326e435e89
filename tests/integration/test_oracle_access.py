"""qintrospect's access rules against the CPU itself (QEMU's TCG), in every x86 paging mode.

With `access=on` (vm.oracle.boot.OracleVM passes it) the oracle guest performs, on a chosen set
of its pages, every kind of access (supervisor/user read/write/execute; user ones from ring 3)
under every setting of CR0.WP, CR4.SMEP, CR4.SMAP (where CPUID has them), EFER.NXE (0 and 1 in
the 32-bit modes, where it changes only the #PF error code; 1 in the others) and CR4.PKE with
PKRU=0xe6 (pae and long modes, where CPUID has PKU), all with EFLAGS.AC=0, and prints one
ACCESS line each: ok, or the #PF error code. For every line, qintrospect's answer
(paging.walk(...).access[kind] with the CR bits of that line) must be the CPU's: allowed where
it did the access, the same error code where it faulted.

The variants here use -cpu max (SMEP, SMAP and PKU present); test_oracle_modes.py runs the same
check on its qemu64 variants (no SMEP/SMAP/PKU: CR0.WP and EFER.NXE only).

Also here: 1 GiB pages on a CPU without Page1GB (-cpu qemu64, no pdpe1gb). The SDM (4.5,
table 4-16: PS in a PDPTE is reserved when CPUID.80000001H:EDX.Page1GB=0) says the access
faults with RSVD; QEMU's TCG does not look at CPUID there (mmu_translate in
target/i386/tcg/sysemu/excp_helper.c treats PS=1 in any PDPTE as a 1 GiB page and tests only
rsvd_mask at that level), so the guest maps it. Asserted as that: QEMU's known deviation.

Known QEMU differences asserted explicitly: none in the access rules themselves (QEMU 7.2's TCG
agrees with the SDM on every ACCESS line here); the Page1GB one above.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from vm.oracle import boot
from vm.oracle.boot import ACCESS_KINDS, MODES, OracleVM

pytestmark = pytest.mark.vm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CR0_WP = 1 << 16
CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 20, 1 << 21, 1 << 22
EFER_NXE = 1 << 11
PF_P, PF_WR, PF_US, PF_RSVD, PF_ID, PF_PK = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20

#: The pages the guest runs its access checks on, per mode (rows of SPECS with .acc).
ACCESS_PAGES = {
    "32bit": {"4k", "read-only", "user", "user-ro", "restrict-parent", "alias-b"},
    "pse": {"4k", "read-only", "user", "user-ro", "restrict-parent", "alias-b", "large-4m"},
    "pae": {"4k", "read-only", "user", "user-ro", "nx", "restrict-parent", "alias-b",
            "large-2m"},
    "4level": {"4k", "read-only", "user", "user-ro", "nx", "restrict-parent", "alias-b",
               "large-2m", "huge-1g"},
}
ACCESS_PAGES["5level"] = ACCESS_PAGES["4level"]
#: The PKRU the guest loads with CR4.PKE=1: WD0, AD1, WD2, AD3|WD3.
ACC_PKRU = 0xE6

HUGE_1G_VA = 0x8000000000
HUGE_1G_PA = 0x40000000


@pytest.fixture(scope="session")
def oracle_elf():
    assert shutil.which(boot.QEMU), f"{boot.QEMU} is not installed; run scripts/setup"
    return boot.build()


@pytest.fixture(scope="module", params=list(MODES))
def vm(request, oracle_elf, tmp_path_factory):
    """The oracle in each mode under -cpu max: SMEP, SMAP and PKU are there to switch."""
    workdir = tmp_path_factory.mktemp(f"oracle-access-{request.param}")
    with OracleVM(request.param, str(workdir), cpu="max", elf=oracle_elf) as v:
        v.wait_halted()
        v.variant = f"{request.param}-cpu-max"
        yield v


# ---------------------------------------------------------------------------------------------
# the check, shared with test_oracle_modes.py

def line_cpu_state(base, line, **extra):
    """The CpuState of one ACCESS line: the mode's own registers (READY, = the vCPU's now)
    with CR0.WP, CR4.SMEP/SMAP/PKE, EFER.NXE and PKRU as the line says."""
    from qintrospect.paging.model import CpuState

    def bit(value, mask, on):
        return value | mask if on else value & ~mask

    cr4 = bit(bit(bit(base.cr4, CR4_SMEP, line.smep), CR4_SMAP, line.smap), CR4_PKE, line.pke)
    return CpuState(cr0=bit(base.cr0, CR0_WP, line.wp), cr3=base.cr3, cr4=cr4,
                    efer=bit(base.efer, EFER_NXE, line.nxe), maxphyaddr=base.maxphyaddr,
                    pkru=line.pkru if line.pke else None, **extra)


def describe(line):
    pk = f" pke=1 pkru={line.pkru:#x}" if line.pke else ""
    return (f"{line.name} va={line.va:#x} {line.kind} wp={line.wp:d} smep={line.smep:d} "
            f"smap={line.smap:d} nxe={line.nxe:d}{pk}")


def check_accesses(vm, deviation=None, extra_state=None):
    """Every ACCESS line against qintrospect.paging.walk; returns the number checked.

    deviation(line) may return (expected_ok, expected_err, why) for a line where QEMU is known
    to differ from the SDM (and so from qintrospect): the CPU must then do exactly that, and
    qintrospect must still give the SDM's answer, which the caller checks."""
    from qintrospect import paging
    base = vm.cpu_state()
    problems = []
    for line in vm.output.accesses:
        cpu = line_cpu_state(base, line, **(extra_state or {}))
        w = paging.walk(vm.read_phys, cpu, line.addr)
        ours = w.access.get(line.kind)
        cpu_said = "ok" if line.ok else f"fault err={line.err:#x}"
        known = deviation(line) if deviation else None
        if known is not None:
            want_ok, want_err, why = known
            if (line.ok, line.err) != (want_ok, want_err):
                problems.append(f"{vm.variant} {describe(line)}: the CPU said {cpu_said}, the "
                                f"known QEMU deviation ({why}) predicts "
                                f"{'ok' if want_ok else f'err={want_err:#x}'}: "
                                f"drop or fix the deviation")
            continue
        if ours is None:
            problems.append(f"{vm.variant} {describe(line)}: walk has no access[{line.kind}] "
                            f"(fault {w.fault})")
            continue
        if ours.allowed != line.ok:
            problems.append(f"{vm.variant} {describe(line)}: the CPU said {cpu_said}, "
                            f"qintrospect says {'allowed' if ours.allowed else 'denied'} "
                            f"(err={ours.error_code and hex(ours.error_code)}, {ours.reason!r})")
        elif not line.ok and ours.error_code != line.err:
            problems.append(f"{vm.variant} {describe(line)}: the CPU raised err={line.err:#x}, "
                            f"qintrospect says err={ours.error_code and hex(ours.error_code)} "
                            f"({ours.reason!r})")
        # PKRU is given whenever CR4.PKE is on, so nothing is left unknown
        unknown = getattr(ours, "unknown", "")
        if unknown:
            problems.append(f"{vm.variant} {describe(line)}: qintrospect left {unknown!r} unknown")
    assert not problems, f"{len(problems)} of {len(vm.output.accesses)} ACCESS lines disagree:\n" \
        + "\n".join(problems[:60])
    return len(vm.output.accesses)


def expected_settings(vm):
    """(wp, smep, smap, nxe, pke) combinations the guest must have run, from its CPUID line."""
    cpuid = vm.output.cpuid
    legacy = vm.mode in ("32bit", "pse")
    smeps = (0, 1) if cpuid["smep"] == "1" else (0,)
    smaps = (0, 1) if cpuid["smap"] == "1" else (0,)
    nxes = ((0, 1) if cpuid["nx"] == "1" else (0,)) if legacy else (1,)
    pkes = (0, 1) if cpuid["pku"] == "1" and not legacy else (0,)
    return {(wp, smep, smap, nxe, pke) for wp in (0, 1) for smep in smeps for smap in smaps
            for nxe in nxes for pke in pkes}


def check_access_lines_complete(vm, pages=None):
    """The ACCESS lines are the full product the ACCESS-RUN line announces, each once."""
    out = vm.output
    run = out.access_run
    assert run and "wp" in run, f"no access checks ran: {run}"
    pages = ACCESS_PAGES[vm.mode] if pages is None else pages
    settings = expected_settings(vm)

    def listed(values):
        return {int(v) for v in values.split(",")}

    for key, pos in (("wp", 0), ("smep", 1), ("smap", 2), ("nxe", 3), ("pke", 4)):
        assert listed(run[key]) == {s[pos] for s in settings}, (key, run)
    assert int(run["pkru"], 16) == ACC_PKRU and run["eflags.ac"] == "0"
    assert int(run["count"]) == len(out.accesses) == len(settings) * len(pages) * 6
    assert int(run["pages"]) == len(pages)
    seen = {}
    for a in out.accesses:
        key = (a.va, a.kind, a.wp, a.smep, a.smap, a.nxe, a.pke)
        assert key not in seen, f"twice: {a}"
        seen[key] = a
        assert a.kind in ACCESS_KINDS
        assert (a.wp, a.smep, a.smap, a.nxe, a.pke) in settings
        assert a.pkru == (ACC_PKRU if a.pke else None)
        assert a.name in pages and a.va in {m.va for m in out.maps if m.name == a.name}, a
    assert {a.name for a in out.accesses} == pages


# ---------------------------------------------------------------------------------------------
# -cpu max, every mode

def test_cpuid_and_settings(vm):
    """-cpu max under TCG has SMEP, SMAP, PKU and Page1GB; the guest ran every setting, and
    put the mode's own CR0/CR4/EFER back before READY."""
    cpuid = vm.output.cpuid
    assert {k: cpuid[k] for k in ("nx", "page1gb", "smep", "smap", "pku")} == \
        {"nx": "1", "page1gb": "1", "smep": "1", "smap": "1", "pku": "1"}, cpuid
    check_access_lines_complete(vm)
    regs = vm.registers()
    ready = vm.output.ready
    for reg in ("cr0", "cr3", "cr4", "efer"):
        assert int(ready[reg], 16) == regs[reg.upper()], reg
    assert not regs["CR0"] & CR0_WP and not regs["CR4"] & (CR4_SMEP | CR4_SMAP | CR4_PKE)
    print(f"\n{vm.variant}: {len(vm.output.accesses)} ACCESS lines, settings "
          f"{ {k: v for k, v in vm.output.access_run.items() if k in ('wp', 'smep', 'smap', 'nxe', 'pke')} }")


def test_access_rules_match_the_cpu(vm):
    n = check_accesses(vm)
    print(f"\n{vm.variant}: {n} accesses, qintrospect agrees with the CPU on each")


def test_access_checks_left_memory_alone(vm):
    """Supervisor/user writes went to +0x808 only: every fill value is intact, and the bytes the
    guest read first (PROBE) are still there."""
    out = vm.output
    for pa, value in out.fills.items():
        assert int.from_bytes(vm.read_phys(pa, 8), "little") == value, hex(pa)
    for a in out.accesses:
        if a.kind == "supervisor-write" and a.ok:
            m = next(m for m in out.maps if m.name == a.name and m.va == a.va)
            assert vm.read_phys(m.pa + 0x808, 1) == b"\xa5", a


def test_cpu_follows_the_sdm_on_a_few_lines(vm):
    """Independent of qintrospect: a handful of SDM 4.6/4.7 facts read straight off the lines,
    so that a bug shared by the walker and this test's expectations cannot hide."""
    by = {(a.name, a.kind, a.wp, a.smep, a.smap, a.nxe, a.pke): a for a in vm.output.accesses}
    nxe = 0 if vm.mode in ("32bit", "pse") else 1
    idb = PF_ID if vm.mode not in ("32bit", "pse") else 0

    def get(name, kind, wp=0, smep=0, smap=0, pke=0, n=nxe):
        return by[(name, kind, bool(wp), bool(smep), bool(smap), bool(n), bool(pke))]

    # CR0.WP: supervisor writes to a read-only page succeed with WP=0, fault with WP=1
    assert get("read-only", "supervisor-write", wp=0).ok
    assert get("read-only", "supervisor-write", wp=1).err == PF_P | PF_WR
    # user writes to a read-only user page fault whatever WP says
    assert get("user-ro", "user-write", wp=0).err == PF_P | PF_WR | PF_US
    # user accesses to supervisor pages: P|US (+W, +I/D)
    assert get("4k", "user-read").err == PF_P | PF_US
    assert get("restrict-parent", "user-write").err == PF_P | PF_US | PF_WR
    # SMEP: supervisor fetch from a user page faults with P|I/D
    assert get("user", "supervisor-execute", smep=0).ok
    assert get("user", "supervisor-execute", smep=1).err == PF_P | PF_ID
    # SMAP (EFLAGS.AC=0): supervisor data accesses to user pages fault
    assert get("user", "supervisor-read", smap=1).err == PF_P
    assert get("user", "supervisor-write", smap=1).err == PF_P | PF_WR
    assert get("user", "supervisor-execute", smap=1).ok          # SMAP is about data only
    # I/D only with NXE in PAE-format tables, or with SMEP (4.7)
    assert get("4k", "user-execute").err == PF_P | PF_US | idb
    if vm.mode in ("32bit", "pse"):
        assert get("4k", "user-execute", n=1).err == PF_P | PF_US   # NXE=1 without PAE: no I/D
    else:
        assert get("nx", "supervisor-execute").err == PF_P | PF_ID
        assert get("restrict-parent", "supervisor-execute").err == PF_P | PF_ID
    if vm.mode in ("4level", "5level"):
        # protection keys (4.6.2): AD1 denies data access to the key-1 user page, for
        # supervisor accesses too, with PK in the code; fetches are not affected; supervisor
        # pages (key 1 in the 4k page) are not affected by PKRU
        assert get("user", "user-read", pke=1).err == PF_P | PF_US | PF_PK
        assert get("user", "supervisor-write", pke=1).err == PF_P | PF_WR | PF_PK
        assert get("user", "user-execute", pke=1).ok
        assert get("4k", "supervisor-write", wp=1, pke=1).ok
        # WD2 (huge-1g) stops supervisor writes only with CR0.WP=1
        assert get("huge-1g", "supervisor-write", wp=0, pke=1).ok
        assert get("huge-1g", "supervisor-write", wp=1, pke=1).err == PF_P | PF_WR | PF_PK
        assert get("huge-1g", "user-write", wp=0, pke=1).err == PF_P | PF_WR | PF_US | PF_PK
        # PK is reported even when the paging bits alone would deny (WD0, read-only alias-b)
        assert get("alias-b", "user-write", pke=1).err == PF_P | PF_WR | PF_US | PF_PK
    elif vm.mode == "pae":
        # PKE has no effect outside IA-32e mode
        assert get("user", "user-read", pke=1).ok


# ---------------------------------------------------------------------------------------------
# 1 GiB pages on a CPU without Page1GB: -cpu qemu64 (no pdpe1gb), mode 4level

@pytest.fixture(scope="module")
def vm_no1g(oracle_elf, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("oracle-access-no-pdpe1gb")
    with OracleVM("4level", str(workdir), cpu="qemu64", elf=oracle_elf) as v:
        v.wait_halted()
        v.variant = "4level-no-pdpe1gb"
        yield v


def huge_1g_deviation(base_walk_allowed):
    """QEMU's TCG maps a PS=1 PDPTE as a 1 GiB page without CPUID.Page1GB: every access there
    does what it would on a CPU with Page1GB (the SDM: #PF with P|RSVD, and nothing else)."""
    def deviation(line):
        if line.name != "huge-1g":
            return None
        ok, err = base_walk_allowed(line)
        return ok, err, "TCG ignores CPUID.Page1GB: PS=1 in a PDPTE maps 1 GiB"
    return deviation


def test_no_page1gb_the_cpu_maps_it_anyway(vm_no1g):
    """(1) What the emulated CPU and QEMU's debug walk did at the 1 GiB page: QEMU's known
    deviation from the SDM, asserted as such."""
    vm = vm_no1g
    out = vm.output
    assert out.cpuid["page1gb"] == "0"
    assert vm.cpu_property("pdpe1gb") is False
    m = next(m for m in out.maps if m.name == "huge-1g")
    # the guest lists it as the SDM has it: PS in a PDPTE is reserved without Page1GB
    assert (m.va, m.pa, m.size, m.fault) == (HUGE_1G_VA, None, 1 << 30, "reserved-bit")
    probe = out.probes[HUGE_1G_VA]
    # SDM: #PF with RSVD. QEMU's TCG (mmu_translate checks only rsvd_mask at level 3, never
    # CPUID.Page1GB): the read succeeds and returns the 1 GiB frame's first bytes.
    assert probe.ok, f"QEMU now faults at the 1 GiB page without Page1GB ({probe}): update"
    assert probe.value == out.fills[HUGE_1G_PA]
    # QEMU's debug translation agrees with its MMU: a 1 GiB page
    assert vm.gva2gpa(HUGE_1G_VA) == HUGE_1G_PA
    assert vm.gva2gpa(HUGE_1G_VA + 0x12345678) == HUGE_1G_PA + 0x12345678
    tlb = {t.va: t for t in vm.info_tlb()}
    assert tlb[HUGE_1G_VA].frame == HUGE_1G_PA and tlb[HUGE_1G_VA].flags[2] == "P"
    # every ACCESS line at the page is what a CPU with Page1GB would do there (qintrospect's
    # walk with Page1GB unknown = accepted), and every other line is ordinary
    from qintrospect import paging
    base = vm.cpu_state()

    def with_page1gb(line):
        w = paging.walk(vm.read_phys, line_cpu_state(base, line), line.addr)
        r = w.access[line.kind]
        return r.allowed, r.error_code

    check_access_lines_complete(vm)
    assert any(a.name == "huge-1g" for a in out.accesses)
    check_accesses(vm, deviation=huge_1g_deviation(with_page1gb))


def test_no_page1gb_walker_says_reserved_bit(vm_no1g):
    """(2) qintrospect's walker told the CPU has no Page1GB: reserved-bit at the PDPTE, with a
    note that QEMU's TCG would map it regardless."""
    from qintrospect import paging
    from qintrospect.paging.model import CpuState
    vm = vm_no1g
    base = vm.cpu_state()
    cpu = CpuState(cr0=base.cr0, cr3=base.cr3, cr4=base.cr4, efer=base.efer,
                   maxphyaddr=base.maxphyaddr, page1gb=False)
    w = paging.walk(vm.read_phys, cpu, HUGE_1G_VA)
    assert w.fault is not None and w.fault.reason == "reserved-bit", w.fault
    assert w.fault.level == "PDPT" and w.pa is None
    assert w.fault.error_code == PF_P | PF_RSVD            # the SDM's code for a read
    assert any("TCG" in note for note in w.notes), w.notes
    for kind, r in w.access.items():
        assert not r.allowed and r.error_code & (PF_P | PF_RSVD) == PF_P | PF_RSVD, (kind, r)
    # the same tables with Page1GB: an ordinary 1 GiB page (what the CPU did)
    cpu1g = CpuState(cr0=base.cr0, cr3=base.cr3, cr4=base.cr4, efer=base.efer,
                     maxphyaddr=base.maxphyaddr, page1gb=True)
    w = paging.walk(vm.read_phys, cpu1g, HUGE_1G_VA)
    assert w.ok and (w.pa, w.page_size) == (HUGE_1G_PA, 1 << 30)


def test_no_page1gb_cli_says_reserved_bit(vm_no1g):
    """(3) The whole tool reads the vCPU's Page1GB (QOM pdpe1gb) and says reserved-bit."""
    vm = vm_no1g
    res = subprocess.run([sys.executable, "-m", "qintrospect", "translate", "--qmp", vm.qmp_path,
                          "--gdb", vm.gdb_address, "--json", hex(HUGE_1G_VA)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 1, res.stderr                   # 1: the address faults
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(rows) == 1 and "fault" in rows[0], rows
    assert rows[0]["fault"]["reason"] == "reserved-bit", rows[0]
    assert vm.qmp.cmd("query-status")["running"] is True
