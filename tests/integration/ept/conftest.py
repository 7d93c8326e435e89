"""One EPT rig for every test in this folder (L1 under Bochs with kvm-intel, L2 under real
KVM with a real EPT): booted once, torn down after the folder's last test. L2 is the bundled
Linux guest with its probe spinning. A kprobe on the function KVM's VMX code loads the EPT root
with is armed in L1 before L2 exists: an independent witness of the root. The rig FAILS (not
skips) when it is not built: run vm/ept/build.sh first (scripts/setup does)."""

import re
import time

import pytest

from vm.ept.rig import EptRig, EptRigNotBuilt

# vmx_load_mmu_pgd(vcpu, root_hpa, root_level): the root in %rsi, the level in %edx.
EPT_KPROBE = "p:qi_ept vmx_load_mmu_pgd root=%si:x64 level=%dx:s32"
MODULE = "/qi/modules/slat_dump.ko"


@pytest.fixture(scope="package")
def rig():
    try:
        EptRig.check_built()
    except EptRigNotBuilt as e:
        pytest.fail(str(e), pytrace=False)
    r = EptRig(l2=None)
    t0 = time.monotonic()
    try:
        r.start()
        r.run_l1(f"echo '{EPT_KPROBE}' >> /sys/kernel/tracing/kprobe_events && "
                 "echo 1 > /sys/kernel/tracing/events/kprobes/qi_ept/enable")
        assert r.last_status == 0, "the kprobe on vmx_load_mmu_pgd could not be armed"
        r.run_l1(f"test -s {MODULE}")
        if r.last_status != 0:
            pytest.fail(f"{MODULE} is missing in L1: run vm/ept/build.sh (it runs vm/kvm/build.sh,"
                        " which builds vm/module/ into the cache the per-start disk copies)",
                        pytrace=False)
        r.launch_l2(l2="linux")
        r.l2_start_probe("spin")
    except BaseException:
        r.stop()
        raise
    print(f"\nEPT rig up in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{k}={v:.2f}" for k, v in r.timings.items()))
    try:
        yield r
    finally:
        r.stop()


# Every qintrospect in L1 gets a long --timeout: under Bochs, L1 runs a few tens of millions
# of instructions a second, and gdb alone takes seconds to start there.
QI_TIMEOUT = ["--timeout", "120"]
MiB = 1 << 20


def inside(rig, gdb=True):
    """What a user on the Intel KVM host (L1) passes: L2's QMP socket, and its gdbstub's."""
    return ["--qmp", rig.l2_qmp_in_l1] + (["--gdb", rig.l2_gdb_in_l1] if gdb else []) + QI_TIMEOUT


def kprobe_roots(rig):
    """{(root, levels)} KVM loaded for L2, from the kprobe's trace in L1."""
    trace = rig.run_l1("grep qi_ept: /sys/kernel/tracing/trace")
    roots = {(int(r, 16), int(n)) for r, n in re.findall(r"root=(0x[0-9a-f]+) level=(\d+)", trace)}
    assert roots, f"the kprobe saw no root load:\n{trace}"
    return roots


# L1-physical memory read by L1's own kernel, through /proc/kcore (whose RAM segments carry
# their physical address in p_paddr): a witness independent of qintrospect's code.
PHYS_READ = r'''
import struct, sys
f = open("/proc/kcore", "rb")
hdr = f.read(64)
phoff, = struct.unpack_from("<Q", hdr, 32)
phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
f.seek(phoff)
table = f.read(phentsize * phnum)
segs = []
for i in range(phnum):
    kind, _, off, va, pa, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
    if kind == 1 and pa != 2**64 - 1:
        segs.append((pa, off, filesz))
for a in sys.argv[1:]:
    pa = int(a, 0)
    pa0, off, size = next(s for s in segs if s[0] <= pa < s[0] + s[2])
    f.seek(off + pa - pa0)
    print(a, hex(struct.unpack("<Q", f.read(8))[0]))
'''


def l1_phys_u64(rig, *addresses):
    """{address: the 8 bytes at that L1-physical address}, read in L1 by PHYS_READ."""
    rig.run_l1("test -s /tmp/physread.py")
    if rig.last_status != 0:
        rig.l1_write_file("/tmp/physread.py", PHYS_READ.encode())
    out = rig.run_l1("python3 /tmp/physread.py " + " ".join(hex(a) for a in addresses), timeout=120)
    assert rig.last_status == 0, out
    return {int(a, 16): int(v, 16) for a, v in (line.split() for line in out.splitlines() if line)}


@pytest.fixture(scope="package")
def seed(rig):
    """The seed's scenario, inside L1: `translate --slat auto --json` (QMP + gdbstub, as a user
    on the host would) for the probe's heap and its THP region: {name: the JSON object}, and
    the run itself (QiResult) under "run"."""
    names = ("heap", "thp")
    regions = rig.probe["regions"]
    r = rig.run_qi("translate", *inside(rig), "--slat", "auto", "--json",
                   *[hex(regions[n]["gva"]) for n in names])
    print(f"\ntranslate --slat auto --json (heap, thp) in L1: {r.seconds:.1f} s")
    assert r.rc == 0, r.stderr
    assert r.json and len(r.json) == len(names), r.stdout
    return {"run": r, **dict(zip(names, r.json))}
