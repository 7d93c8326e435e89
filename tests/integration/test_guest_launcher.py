"""The bundled test guest and its launcher (vm/guest.py): boot, probe, QMP, gdbstub, teardown.

These tests FAIL (not skip) when the guest is not built: run vm/build.sh first.
"""

import os
import re
import subprocess
import time

import pytest

from vm.guest import Guest, GuestNotBuilt, PROMPT

MAGIC = 0x51494E54524F0000
REGIONS = ("heap", "stack", "rodata", "thp", "untouched", "text")


def _require_built():
    """Fail (never skip) when the guest is not built, saying how to build it."""
    try:
        Guest.check_built()
    except GuestNotBuilt as e:
        pytest.fail(str(e), pytrace=False)


def _qemu_alive(pid):
    """True if pid exists and is a QEMU (pids are reused, so look at its command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"qemu" in f.read()
    except FileNotFoundError:
        return False


def _gva2gpa(qmp, gva):
    out = qmp.cmd("human-monitor-command", **{"command-line": f"gva2gpa 0x{gva:x}"})
    m = re.search(r"gpa: (0x[0-9a-fA-F]+)", out)
    return int(m.group(1), 16) if m else None


def test_missing_guest_is_reported_with_build_hint(tmp_path):
    with pytest.raises(GuestNotBuilt, match=r"vm/build\.sh"):
        Guest(cache_dir=str(tmp_path)).start()


@pytest.mark.vm
@pytest.mark.parametrize("cpu", ["max", "qemu64"])
def test_boot_probe_qmp_gdb_teardown(cpu):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    _require_built()
    t0 = time.monotonic()
    with Guest(cpu=cpu) as g:
        boot = time.monotonic() - t0
        pid, tmpdir = g.pid, g.tmpdir
        print(f"\n-cpu {cpu}: booted to the prompt in {boot:.2f} s "
              f"(QEMU pid {pid}, QMP {g.qmp_path}, gdb {g.gdb_address})")
        assert _qemu_alive(pid)
        assert os.path.exists(g.qmp_path)

        # The console: output, exit status, prompt handling.
        assert g.run("echo hello; echo world") == "hello\nworld\n"
        assert g.last_status == 0
        g.run("false")
        assert g.last_status == 1
        assert g.run("printf 'no-newline'") == "no-newline"
        assert g.run("uname -r").strip() == g.kernel_release

        probe = g.start_probe("spin")
        for line in probe["lines"]:
            print("  " + line)
        regions = probe["regions"]
        assert probe["pid"] > 1
        assert set(REGIONS) <= set(regions)
        for n, name in enumerate(("heap", "stack", "rodata", "thp"), start=1):
            assert regions[name]["value"] == MAGIC + n, name
        for name in ("heap", "stack", "rodata", "thp", "text"):
            r = regions[name]
            assert r["gpa"] is not None, f"{name} should be present"
            assert r["gpa"] % 4096 == r["gva"] % 4096, name
            assert r["gpa"] < 256 << 20, f"{name}: GPA beyond a 256 MiB guest"
            assert r["size"] in (4096, 2 << 20)
        assert regions["untouched"]["gpa"] is None
        assert regions["untouched"]["value"] == 0
        assert regions["untouched"]["gva"] % 4096 == 0
        assert regions["text"]["value"] != 0
        assert regions["thp"]["gva"] % 8 == 0
        thp = regions["thp"]
        if thp["thp"]:
            assert thp["size"] == 2 << 20
            assert thp["gpa"] % (2 << 20) == thp["gva"] % (2 << 20)
            print(f"  THP: the thp region is backed by a 2 MiB page at GPA "
                  f"0x{thp['gpa'] & ~((2 << 20) - 1):x}")
        else:
            print("  THP: the guest did NOT give the thp region a huge page (size 4096)")
        assert g.run(f"kill -0 {probe['pid']} && echo alive").strip() == "alive"

        # QMP answers, and QEMU's own translation agrees with the guest's pagemap.
        qmp = QEMUMonitorProtocol(g.qmp_path)
        qmp.connect()
        try:
            qmp.settimeout(30)
            assert qmp.cmd("query-status")["status"] == "running"
            cpus = qmp.cmd("query-cpus-fast")
            assert len(cpus) == 1 and cpus[0]["thread-id"] > 0
            cr4 = None
            agreed = None
            for attempt in range(50):
                qmp.cmd("stop")
                try:
                    assert qmp.cmd("query-status")["status"] == "paused"
                    regs = qmp.cmd("human-monitor-command", **{"command-line": "info registers"})
                    cr4 = int(re.search(r"CR4=([0-9a-f]+)", regs).group(1), 16)
                    got = {name: _gva2gpa(qmp, regions[name]["gva"])
                           for name in ("heap", "stack", "rodata", "thp", "text", "untouched")}
                finally:
                    qmp.cmd("cont")
                want = {name: regions[name]["gpa"] for name in got}
                if got == want:
                    agreed = attempt
                    break
                # The vCPU was stopped in another process (another CR3): try again.
                time.sleep(0.05)
            assert agreed is not None, f"gva2gpa {got} != probe {want}"
            print(f"  gva2gpa agrees with pagemap for {sorted(got)} "
                  f"(after {agreed + 1} stop(s)); CR4=0x{cr4:x}")
            la57 = bool(cr4 >> 12 & 1)
            assert la57 == (cpu == "max"), f"CR4.LA57={la57} under -cpu {cpu}"
            assert qmp.cmd("query-status")["status"] == "running"
        finally:
            qmp.close()

        # The gdbstub serves one client after another (the launcher holds no connection);
        # attaching stops the VM, detaching resumes it.
        for _ in range(2):
            out = subprocess.run(
                ["gdb", "-nx", "-batch", "-ex", f"target remote {g.gdb_address}",
                 "-ex", "p/x $cr3", "-ex", "detach"],
                capture_output=True, text=True, timeout=60,
            )
            assert re.search(r"\$1 = 0x[0-9a-f]+", out.stdout), out.stdout + out.stderr
        deadline = time.monotonic() + 5
        while g.qmp("query-status")["status"] != "running":
            assert time.monotonic() < deadline, "VM not running after gdb detached"
            time.sleep(0.05)

        # The probe survived all that and reports the same translations.
        again = g.reprobe()["regions"]
        assert {k: v["gpa"] for k, v in again.items()} == {k: v["gpa"] for k, v in regions.items()}

    assert g.console is None
    assert not _qemu_alive(pid), "QEMU still running after teardown"
    assert not os.path.exists(tmpdir)


@pytest.mark.vm
def test_teardown_on_error_and_start_paused():
    _require_built()
    with pytest.raises(RuntimeError, match="boom"):
        with Guest(start_paused=True) as g:
            pid, tmpdir = g.pid, g.tmpdir
            assert g.qmp("query-status")["status"] == "prelaunch"
            raise RuntimeError("boom")
    assert not _qemu_alive(pid)
    assert not os.path.exists(tmpdir)

    # A paused start can be continued by hand and then reaches the prompt.
    with Guest(start_paused=True, cpu="qemu64") as g:
        g.qmp("cont")
        g.wait_for_prompt(timeout=60)
        assert g.run('echo "$PS1"') == PROMPT + "\n"
        pid = g.pid
    assert not _qemu_alive(pid)
