"""Which QEMU this run really boots.

scripts/test runs the integration tests twice: with the system's qemu-system-x86_64 (QEMU 7.2
on Debian 12) and with QI_QEMU set to the private QEMU 10.x that vm/qemu-backports.sh installs.
A launcher that ignored QI_QEMU, or a wrapper that ran another QEMU, would let the second run
pass on 7.2 without anyone noticing. Here each launcher (vm/guest.py's Guest, vm/oracle's
OracleVM) boots a guest and QMP `query-version` must equal what the chosen binary's `--version`
says, and, when QI_QEMU_VERSION is set (scripts/test sets it for the 10.x run), begin with it.
The process behind the QMP socket must be QEMU itself (the wrapper execs), since qintrospect
reads that pid's /proc/PID/pagemap, and with QEMU_MODULE_DIR set every module it has loaded
must come from there (never a module of another QEMU build).
"""

import os
import re
import subprocess

import pytest

from vm.guest import Guest, GuestNotBuilt, default_qemu
from vm.oracle import boot as oracle_boot

_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)(?:\s*\(([^)]*)\))?")


def _clean_package(text):
    return (text or "").strip().strip("()").strip()


def binary_version(qemu):
    """(major, minor, micro), package string from `QEMU --version`."""
    proc = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{qemu} --version failed ({proc.returncode}): {proc.stderr}"
    m = _VERSION_RE.search(proc.stdout)
    assert m, f"{qemu} --version printed no version: {proc.stdout!r}"
    return (int(m[1]), int(m[2]), int(m[3])), _clean_package(m[4])


def qmp_version(reply):
    """(major, minor, micro), package string from QMP query-version's return value."""
    q = reply["qemu"]
    return (q["major"], q["minor"], q["micro"]), _clean_package(reply.get("package"))


def _check_process(pid, qemu):
    """The pid is QEMU's own (not a shell around it); its modules are from its module dir."""
    exe = os.readlink(f"/proc/{pid}/exe")
    assert os.path.basename(exe).startswith("qemu-system"), (
        f"the process behind the QMP socket runs {exe}, not QEMU: a wrapper ({qemu}) must exec "
        "QEMU so that the pid qintrospect finds is QEMU's own")
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    moddir = env.get(b"QEMU_MODULE_DIR", b"").decode()
    if moddir:
        with open(f"/proc/{pid}/maps") as f:
            mapped = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
        modules = sorted(p for p in mapped if p.endswith(".so") and "/qemu/" in p)
        foreign = [p for p in modules if os.path.dirname(p) != os.path.normpath(moddir)]
        assert not foreign, f"QEMU ({exe}) loaded modules outside QEMU_MODULE_DIR={moddir}: {foreign}"
    return exe


def _check_version(launcher, qemu, reply, pid):
    running, running_pkg = qmp_version(reply)
    binary, binary_pkg = binary_version(qemu)
    exe = _check_process(pid, qemu)
    shown = ".".join(map(str, running))
    print(f"\n{launcher}: {qemu} -> {exe}: QEMU {shown} ({running_pkg})")
    assert running == binary, (
        f"{launcher} booted QEMU {shown}, but {qemu} --version says "
        f"{'.'.join(map(str, binary))}: the launcher did not run the chosen binary")
    if binary_pkg and running_pkg:
        assert running_pkg == binary_pkg, (launcher, running_pkg, binary_pkg)
    want = os.environ.get("QI_QEMU_VERSION")
    if want:
        assert f"{shown}.".startswith(want if want.endswith(".") else want + "."), (
            f"this run must use QEMU {want} (QI_QEMU_VERSION), but {launcher} booted QEMU "
            f"{shown} from {qemu} (QI_QEMU={os.environ.get('QI_QEMU', '')!r})")


@pytest.mark.vm
def test_bundled_guest_runs_the_chosen_qemu():
    try:
        Guest.check_built()
    except GuestNotBuilt as e:
        pytest.fail(str(e), pytrace=False)
    qemu = default_qemu()
    with Guest(cpu="qemu64", start_paused=True) as g:   # QMP answers at once; no boot needed
        assert g.qemu == qemu
        _check_version("vm.guest.Guest", qemu, g.qmp("query-version"), g.pid)


@pytest.mark.vm
def test_oracle_runs_the_chosen_qemu(tmp_path):
    qemu = default_qemu()
    assert oracle_boot.QEMU == qemu, "vm/oracle/boot.py and vm/guest.py chose different QEMUs"
    with oracle_boot.OracleVM("4level", str(tmp_path)) as vm:
        _check_version("vm.oracle.boot.OracleVM", qemu, vm.qmp.cmd("query-version"), vm.proc.pid)
