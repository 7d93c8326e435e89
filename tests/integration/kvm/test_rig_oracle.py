"""The KVM rig with the oracle as L2: a freestanding guest that sets up one x86 paging mode with
known mappings, run by L1's KVM (nested SVM under TCG), checked by qintrospect inside L1.

The folder's L1 (conftest.py); L2 is relaunched as the oracle in mode 4level under ``-cpu qemu64,+pdpe1gb`` (the CPU
model of the nested rig), then is relaunched in the same L1 in mode 32bit (legacy paging under
L1's NPT). FAILS (not skips) when the rig is not built: run vm/kvm/build.sh first.
"""

import time

import pytest

from vm.nested.rig import SerialQMP

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def oracle(rig):
    """The folder's rig with L2 relaunched as the oracle (this file runs last in the folder).
    1152M: RAM behind the oracle's 1 GiB page (frame 0x40000000); KVM allocates it lazily."""
    t0 = time.monotonic()
    rig.launch_l2(l2="oracle", oracle_mode="4level", l2_cpu="qemu64,+pdpe1gb",
                  l2_memory="1152M")
    print(f"\noracle L2 up in {time.monotonic() - t0:.1f} s")
    return rig


def check_every_mapping(rig):
    """qintrospect inside L1 translates every address the oracle listed, in one command: the
    GPA and the fill value of each mapping, the fault reason of each faulting address."""
    maps = list(rig.l2_maps)
    r = rig.run_qi("translate", "--qmp", rig.l2_qmp_in_l1, "--gdb", rig.l2_gdb_in_l1,
                   "--timeout", "60", "--json", *[hex(m.va) for m in maps])
    assert r.rc in (0, 1), r.stderr          # 1: some addresses fault, as listed
    assert r.json and len(r.json) == len(maps), r.stdout
    bad = []
    for m, j in zip(maps, r.json):
        if m.fault == "none":
            fill = rig.l2_output.fills.get(m.pa)
            if "gpa" not in j or int(j["gpa"], 16) != m.pa or (
                    fill is not None and int(j["value"], 16) != fill):
                bad.append((m.name, hex(m.va), hex(m.pa), j.get("gpa"), j.get("fault")))
        elif "fault" not in j or j["fault"]["reason"] != m.fault:
            bad.append((m.name, hex(m.va), m.fault, j.get("fault"), j.get("gpa")))
    assert not bad, bad
    return r, sum(m.fault == "none" for m in maps), len(maps)


def test_oracle_4level_under_kvm(oracle):
    rig = oracle
    assert rig.l2_ready["mode"] == "4level"
    with SerialQMP(rig.l2_qmp_path) as q:
        assert q.cmd("query-kvm") == {"enabled": True, "present": True}
    assert any(m.name == "huge-1g" for m in rig.l2_maps)
    r, ok, n = check_every_mapping(rig)
    print(f"\noracle 4level under KVM: {ok} mappings + {n - ok} faults agree; "
          f"qintrospect in L1 {r.seconds:.2f} s")


def test_oracle_32bit_relaunched_in_the_same_l1(oracle):
    rig = oracle
    old_pid = rig.l2_qemu_pid_in_l1
    t0 = time.monotonic()
    rig.launch_l2(oracle_mode="32bit")
    print(f"\nL2 relaunched (32bit) in {time.monotonic() - t0:.2f} s")
    assert rig.l2_qemu_pid_in_l1 != old_pid
    assert rig.run_l1(f"test -d /proc/{old_pid} && echo alive || echo gone").strip() == "gone"
    assert rig.l2_ready["mode"] == "32bit"
    assert len(rig.kvm_debugfs_dirs()) == 1
    r, ok, n = check_every_mapping(rig)
    print(f"oracle 32bit under KVM: {ok} mappings + {n - ok} faults agree; "
          f"qintrospect in L1 {r.seconds:.2f} s")
