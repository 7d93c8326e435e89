"""One KVM rig for every test in this folder (L1 under TCG with kvm-amd, L2 under real KVM):
booted once, torn down after the folder's last test. L2 starts as the bundled Linux guest with
its probe spinning; test_rig_oracle.py, which runs last, relaunches L2 as the oracle guest in
the same L1. The rig FAILS (not skips) when it is not built: run vm/kvm/build.sh first."""

import time

import pytest

from vm.kvm.rig import KvmRig, KvmRigNotBuilt

# An independent witness of the NPT root, armed before L2 exists: a kprobe on the function
# KVM's SVM code loads the root into the VMCB with (svm_load_mmu_pgd(vcpu, root_hpa,
# root_level): root in %rsi, level in %edx).
NPT_KPROBE = "p:qi_npt svm_load_mmu_pgd root=%si:x64 level=%dx:s32"
MODULE = "/qi/modules/slat_dump.ko"


@pytest.fixture(scope="package")
def rig():
    try:
        KvmRig.check_built()
    except KvmRigNotBuilt as e:
        pytest.fail(str(e), pytrace=False)
    r = KvmRig(l2=None, l2_cpu="host", smp=2)
    t0 = time.monotonic()
    try:
        r.start()
        r.run_l1(f"echo '{NPT_KPROBE}' >> /sys/kernel/tracing/kprobe_events && "
                 "echo 1 > /sys/kernel/tracing/events/kprobes/qi_npt/enable")
        assert r.last_status == 0, "the kprobe on svm_load_mmu_pgd could not be armed"
        r.run_l1(f"test -s {MODULE}")
        if r.last_status != 0:
            pytest.fail(f"{MODULE} is missing in L1: run vm/kvm/build.sh (it builds "
                        "vm/module/ into the cache the rig's per-start disk copies)",
                        pytrace=False)
        r.launch_l2(l2="linux")
        r.l2_start_probe("spin")
    except BaseException:
        r.stop()
        raise
    print(f"\nKVM rig up in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{k}={v:.2f}" for k, v in r.timings.items()))
    try:
        yield r
    finally:
        r.stop()
