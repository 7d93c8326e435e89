"""One KVM rig for every test in this folder (L1 under TCG with kvm-amd, L2 under real KVM):
booted once, torn down after the folder's last test. L2 starts as the bundled Linux guest with
its probe spinning; test_rig_oracle.py, which runs last, relaunches L2 as the oracle guest in
the same L1. The rig FAILS (not skips) when it is not built: run vm/kvm/build.sh first.

When a test fails, its report gets a section with what L1 knows about L2's QEMU (alive or its
exit status, its stderr, L1's dmesg tail and free memory: rig.l1_diagnostics), also saved under
pytest's basetemp in kvm-rig/. An L2 whose QEMU died is said once, by the test that failed
with it or the next test to start; later tests that would need it are skipped, saying so."""

import re
import sys
import time

import pytest

from vm.kvm.rig import KvmRig, KvmRigNotBuilt

# An independent witness of the NPT root, armed before L2 exists: a kprobe on the function
# KVM's SVM code loads the root into the VMCB with (svm_load_mmu_pgd(vcpu, root_hpa,
# root_level): root in %rsi, level in %edx).
NPT_KPROBE = "p:qi_npt svm_load_mmu_pgd root=%si:x64 level=%dx:s32"
MODULE = "/qi/modules/slat_dump.ko"


class _Watch:
    """What this folder's hooks share: the rig while it is up, L2's QEMU found dead (pid, the
    test that said so), the last test that ran, pytest's tmp_path_factory."""
    rig = None
    dead = None
    last = None
    tmp = None


def _save(nodeid, text):
    """The diagnostics in a file under pytest's basetemp; its path, or why not."""
    try:
        d = _Watch.tmp.getbasetemp() / "kvm-rig"
        d.mkdir(exist_ok=True)
        path = d / (re.sub(r"[^\w.-]+", "_", nodeid)[-150:] + ".txt")
        path.write_text(f"{nodeid}\n{text}\n")
        return str(path)
    except Exception as e:
        return f"(not saved: {e})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report gets what L1 says about L2's QEMU, read before the rig goes on."""
    rep = (yield).get_result()
    _Watch.last = item.nodeid
    rig = _Watch.rig
    if not rep.failed or rig is None:
        return
    title = "KVM rig: L1 and L2's QEMU after the failure"
    pid = rig.l2_qemu_pid_in_l1
    if pid and _Watch.dead and _Watch.dead[0] == pid:
        # Already said with the facts; a module fixture set up before our check failed on it.
        if _Watch.dead[1] != item.nodeid:
            rep.sections.append((title, f"L2's QEMU (pid {pid} in L1) is dead: see {_Watch.dead[1]}"))
        return
    try:
        if rig.l2_qemu_exit_status() is not None:
            _Watch.dead = (pid, item.nodeid)
        text = rig.l1_diagnostics()
        text += f"\n(saved in {_save(item.nodeid, text)})"
    except Exception as e:                      # the report must stay the test's own
        text = f"collecting L1's diagnostics failed: {type(e).__name__}: {e}"
    rep.sections.append((title, text))


@pytest.fixture(autouse=True)
def l2_qemu_alive(request):
    """L2's QEMU must not have exited since the last test (the rig did not stop it). Found
    dead: this test fails once with L1's facts; later tests skip saying where it was found,
    rather than each failing on a lost QMP connection or a silent console."""
    rig = _Watch.rig
    pid = rig and rig.l2_qemu_pid_in_l1
    if not pid:
        return
    if _Watch.dead and _Watch.dead[0] == pid:
        pytest.skip(f"L2's QEMU (pid {pid} in L1) is dead: see {_Watch.dead[1]}")
    status = rig.l2_qemu_exit_status()          # one ~10 ms read in L1; None: running
    if status is not None:
        _Watch.dead = (pid, request.node.nodeid)
        text = rig.l1_diagnostics()
        pytest.fail(f"L2's QEMU (pid {pid} in L1) exited (status {status}) before this test; "
                    f"the last test that ran: {_Watch.last}\n{text}\n"
                    f"(saved in {_save(request.node.nodeid, text)})", pytrace=False)


@pytest.fixture(scope="package")
def rig(tmp_path_factory):
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
    except BaseException as e:
        if r.console is not None and not isinstance(e, KeyboardInterrupt):
            print(f"KVM rig setup failed; L1 then:\n{r.l1_diagnostics()}", file=sys.stderr)
        r.stop()
        raise
    print(f"\nKVM rig up in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{k}={v:.2f}" for k, v in r.timings.items()))
    _Watch.rig, _Watch.tmp = r, tmp_path_factory
    try:
        yield r
    finally:
        _Watch.rig = None
        r.stop()
