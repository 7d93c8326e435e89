"""The KVM rig: L0 = this machine, L1 = Linux under TCG that runs L2 with real KVM (nested SVM).

QEMU's TCG emulates AMD SVM with nested paging, so L1 (the bundled cloud kernel under
``-accel tcg -cpu max``) loads its own kvm and kvm-amd modules and runs L2 with
``qemu-system-x86_64 -accel kvm``: L2's memory goes through a real NPT built by L1's KVM.
L1 has Python 3, numpy, gdb and QEMU (vm/kvm/build.sh), so qintrospect runs INSIDE L1 against
L2 exactly as on a KVM host; L2's monitors also reach L0 through L1's serial ports, as in the
nested rig (vm/nested), for the ``--outer`` chain::

    from vm.kvm.rig import KvmRig
    with KvmRig(l2="linux") as rig:              # boots L1, checks KVM, starts L2, waits for it
        p = rig.l2_start_probe("spin")           # the bundled guest's probe, parsed
        r = rig.run_qi("translate", "--qmp", rig.l2_qmp_in_l1, "--json", hex(gva))
        r.rc, r.stdout, r.stderr, r.json         # qintrospect inside L1
        rig.run_l1("ls /sys/kernel/debug/kvm")   # any shell command in L1 (rig.last_status)
        rig.l2_qmp_path, rig.l2_gdb_path         # L2's QMP / gdbstub at L0 (L1's ttyS1 / ttyS2)
        rig.l1_qmp_path, rig.l1_gdb_address, rig.l1_pid, rig.l2_qemu_pid_in_l1

L1's serial ports, each a Unix socket at L0: ttyS0 = L1's console (busybox sh, prompt
``qi# ``, ``rig.run_l1``), ttyS1 = L2's second QMP monitor (``-chardev serial`` + ``-mon``; the
first is ``rig.l2_qmp_in_l1``, a Unix socket inside L1), ttyS2 = L2's gdbstub when it is on the
serial line, ttyS3 = L2's serial console (the rig keeps it connected: ``rig.l2_run``,
``rig.l2_console_text()``).

QEMU has ONE gdbstub. By default (``l2_gdb="unix"``) it listens on a Unix socket inside L1
(``rig.l2_gdb_in_l1``), for qintrospect inside L1; ``rig.l2_gdb_to("serial")`` moves it to
L1's ttyS2 (``rig.l2_gdb_path`` at L0) with HMP ``gdbserver none`` + ``gdbserver /dev/ttyS2``
(QEMU 7.2 refuses a second ``gdbserver DEVICE`` without the ``none`` first: "duplicate yank
instance"), and ``l2_gdb_to("unix")`` moves it back. Opening the serial line stops L2 (QEMU's
gdbstub "opened" event); the rig puts L2's run state back.

Everything the serial-line monitors need (no QMP greeting for late clients, never ``detach``
a serial gdbstub) is in vm/nested/rig.py and vm/nested/README.md; this module reuses
``NestedRig`` (L1's sockets, the L2 console reader, teardown) and ``SerialQMP``.

What does not depend on what runs L1 (the per-start disk, L2's QEMU started, waited for and
stopped in L1, L2's console, qintrospect run inside L1) is ``KvmHostRig``, which the Intel rig
(vm/ept/rig.py: L1 under Bochs) shares.

qintrospect in L1 is the checkout's current code: at every start the rig writes the repo's
``qintrospect/`` (bytecode precompiled when this Python's magic matches the image's) and the
L2 images into a small ext4 image (``mke2fs -d``, no root needed) that L1 mounts read-only at
``/qi``; ``qintrospect`` in L1 is ``python3 -m qintrospect`` with ``PYTHONPATH=/qi/src``.
"""

from __future__ import annotations

import base64
import compileall
import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import List, Optional

from vm.guest import (PROMPT, GuestError, GuestNotBuilt, default_cache_dir, hold,
                      parse_probe_output)
from vm.nested.rig import NestedRig, NestedShells, SerialQMP, _connect_unix

__all__ = ["KvmRig", "KvmHostRig", "KvmRigError", "KvmRigNotBuilt", "QiResult", "kvm_cache_dir",
           "BUILD_SCRIPT"]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_SCRIPT = os.path.join(HERE, "build.sh")

# Paths inside L1.
L1_RUN = "/run/qi"
L2_QMP_IN_L1 = L1_RUN + "/l2-qmp.sock"
L2_GDB_IN_L1 = L1_RUN + "/l2-gdb.sock"
L2_LOG_IN_L1 = L1_RUN + "/l2-qemu.log"

_L2_READY_RE = re.compile(r"PROBE-READY pid=(\d+)\r*\n")
_ORACLE_READY_RE = re.compile(r"ORACLE READY [^\r\n]*\r?\n")


class KvmRigError(GuestError):
    """The KVM rig could not be started or did not answer as expected."""


class KvmRigNotBuilt(KvmRigError, GuestNotBuilt):
    """An image of the rig is missing: run vm/kvm/build.sh."""


def kvm_cache_dir(cache_dir: Optional[str] = None) -> str:
    return os.path.join(os.path.abspath(cache_dir) if cache_dir else default_cache_dir(), "kvm")


@dataclass
class QiResult:
    """One qintrospect run inside L1."""

    argv: List[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float          # wall time of the command inside L1 (L1's clock); on the Intel
                            # rig, whose L1 clock is virtual, L0's time of the whole call
    json: Optional[list] = field(default=None)   # one object per stdout line, when all parse


class KvmHostRig(NestedShells):
    """What a rig whose L1 is a KVM host running qintrospect has, whatever runs L1 at L0.

    Shared by ``KvmRig`` (L1 under QEMU's TCG, AMD NPT) and ``vm.ept.rig.EptRig`` (L1 under
    Bochs, Intel EPT): the per-start disk L1 mounts at /qi (the checkout's qintrospect/, the L2
    images, our modules), L1's status line, L2's QEMU started in L1 in the background, waited
    for and stopped, L2's serial console (``l2_run``, ``l2_start_probe``), qintrospect run
    inside L1 (``run_qi``), files in and out of L1 through its console.

    A concrete rig is also a ``vm.guest.Guest`` (L1's console) and says, as class attributes:
    ``rig_error`` (the exception it raises), ``ready_prefix`` (its /init prints
    "PREFIX L1-READY k=v ..." and "PREFIX L1-MODULE-FAILED name"), ``kvm_dmesg_pattern`` (grep
    -e arguments for ``kvm_dmesg``), ``l2_console_tty`` (L1's serial line that carries L2's
    console to L0), ``disk_align`` (the per-start disk's size is a multiple of it),
    ``l1_clock_is_wall`` (False: ``run_qi`` times commands from L0); and, as methods,
    ``_python_magic_file``, ``_l1_ready_problem``, ``_l2_l0_monitor_args``, ``_l2_gdb_device``;
    ``_before_l2_start``/``_after_l2_ready``/``_l0_view_of_l1`` when it has something to add.
    Call ``_init_kvm_host`` in ``__init__``.
    """

    rig_error = KvmRigError
    ready_prefix = "KVM"
    kvm_dmesg_pattern = "-e kvm -e svm"
    l2_console_tty = "/dev/ttyS3"
    disk_align = 1
    l1_clock_is_wall = True

    def _init_kvm_host(self, l2: Optional[str], l2_smp: int, l2_gdb: str, oracle_mode: str,
                       l2_append: str, l2_extra_args) -> None:
        self.l2 = l2
        self.l2_smp = int(l2_smp)
        self.l2_append = l2_append
        self.l2_gdb = l2_gdb
        self.l2_extra_args = list(l2_extra_args)
        self.oracle_mode = oracle_mode
        self.l2_qmp_in_l1 = L2_QMP_IN_L1
        self.l2_gdb_in_l1: Optional[str] = None
        self.l2_argv: List[str] = []
        self.l1_ready: dict = {}
        self.kvm_dmesg: str = ""
        self.probe: Optional[dict] = None
        self.qi_disk: Optional[str] = None
        self._l2_seq = 0
        self.l2_last_status: Optional[int] = None
        self._l2_started_at: Optional[float] = None
        self.l2_qemu_pid_in_l1: Optional[int] = None
        self.l2_output = None               # the oracle L2's vm.oracle.boot.OracleOutput
        self.l2_maps: list = []
        self.l2_ready: dict = {}
        self.l2_ready_line: Optional[str] = None
        self.l2_qmp_greeting: Optional[dict] = None

    # ------------------------------------------------------------------ hooks
    def _python_magic_file(self) -> str:
        """The file holding L1's Python's bytecode magic (hex), written by the build."""
        raise NotImplementedError

    def _l1_ready_problem(self) -> Optional[str]:
        """Why L1 cannot run L2 under KVM, from ``self.l1_ready``; None when it can."""
        raise NotImplementedError

    def _l2_l0_monitor_args(self) -> List[str]:
        """L2's QEMU arguments for monitors that L0 reaches through L1's serial lines."""
        return []

    def _l2_gdb_device(self) -> str:
        """The device of L2's gdbstub when ``l2_gdb == "serial"``."""
        raise self.rig_error("this rig has no serial line for L2's gdbstub")

    def _before_l2_start(self) -> None:
        """Called just before L2's QEMU starts in L1."""

    def _after_l2_ready(self) -> None:
        """Called once L2 is ready."""

    def _l0_view_of_l1(self) -> str:
        """What L0 sees of L1's vCPUs, for a report on a process in L1 that will not die."""
        return ""

    # ------------------------------------------------------------------ the per-start disk
    def make_qi_disk(self, path: str) -> str:
        """The per-start disk (LABEL=qi-src, mounted at /qi in L1): src/qintrospect (the
        checkout's), l2/{vmlinuz,initramfs.cpio.gz,kernel-release,oracle.elf}, modules/*.ko
        (vm/module/'s, for L1's kernel: gpt_dump.ko, slat_dump.ko)."""
        t0 = time.monotonic()
        stage = path + ".d"
        shutil.rmtree(stage, ignore_errors=True)
        src = os.path.join(stage, "src")
        shutil.copytree(os.path.join(REPO_ROOT, "qintrospect"), os.path.join(src, "qintrospect"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Bytecode for L1's Python (its magic is in the build's python-magic), so that L1 (under
        # emulation) does not compile qintrospect at every command (the disk is read-only there).
        try:
            with open(self._python_magic_file()) as f:
                image_magic = f.read().strip()
        except OSError:
            image_magic = ""
        if image_magic and image_magic == importlib.util.MAGIC_NUMBER.hex():
            compileall.compile_dir(src, quiet=2, workers=1,
                                   invalidation_mode=compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH)
        l2dir = os.path.join(stage, "l2")
        os.makedirs(l2dir)
        for name, srcpath in (("vmlinuz", self.kernel), ("kernel-release", os.path.join(self.cache_dir, "kernel-release")),
                              ("initramfs.cpio.gz", os.path.join(self.cache_dir, "initramfs.cpio.gz")),
                              ("oracle.elf", os.path.join(self.cache_dir, "oracle", "oracle.elf"))):
            dst = os.path.join(l2dir, name)
            try:
                os.link(srcpath, dst)
            except OSError:
                shutil.copy2(srcpath, dst)
        # The kernel modules vm/module/build.sh built for this kernel release (L1 runs the same
        # kernel as L2): /qi/modules/slat_dump.ko walks L2's NPT/EPT in L1.
        moddir = os.path.join(self.cache_dir, "modules")
        kos = sorted(n for n in os.listdir(moddir) if n.endswith(".ko")) \
            if os.path.isdir(moddir) else []
        for name in kos:
            os.makedirs(os.path.join(stage, "modules"), exist_ok=True)
            shutil.copy2(os.path.join(moddir, name), os.path.join(stage, "modules", name))
        kib = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(stage) for f in fs) // 1024
        size_mib = kib * 12 // 10 // 1024 + 16
        res = subprocess.run(["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-m", "0",
                              "-L", "qi-src", "-E", "root_owner=0:0", "-d", stage, path,
                              f"{size_mib}M"], capture_output=True, text=True)
        shutil.rmtree(stage, ignore_errors=True)
        if res.returncode != 0:
            raise self.rig_error(f"mke2fs -d for the per-start disk failed: {res.stderr or res.stdout}")
        size = os.path.getsize(path)
        if size % self.disk_align:          # the file system stays as made; the disk grows
            os.truncate(path, size + self.disk_align - size % self.disk_align)
        self.timings["qi_disk"] = time.monotonic() - t0
        return path

    # ------------------------------------------------------------------ L1
    def _check_l1(self) -> None:
        text = self.drain_transcript()
        prefix = self.ready_prefix
        m = re.search(rf"{prefix} L1-READY ([^\r\n]*)", text)
        if not m:
            raise self.rig_error(f"L1's init printed no '{prefix} L1-READY':\n{self._transcript.tail()}")
        self.l1_ready = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        if "uptime" in self.l1_ready:
            self.timings["l1_uptime_ready"] = float(self.l1_ready["uptime"])
        failed = re.findall(rf"{prefix} L1-MODULE-FAILED (\S+)", text)
        self.kvm_dmesg = self.run_l1(f"dmesg | grep -i {self.kvm_dmesg_pattern}")
        problem = self._l1_ready_problem()
        if problem:
            raise self.rig_error(
                f"{problem} ({m.group(0).strip()}; modules that failed: {failed or 'none'});"
                f" L1's dmesg:\n{self.kvm_dmesg}")
        if self.l1_ready.get("qi") != "yes":
            raise self.rig_error(f"L1 did not mount the per-start disk at /qi: {m.group(0).strip()}")

    def l1_write_file(self, path: str, data: bytes, mode: Optional[str] = None) -> None:
        """Write bytes to a file in L1 through its console (base64 lines)."""
        b64 = base64.b64encode(data).decode()
        self.run_l1(f": > {shlex.quote(path)}")
        if self.last_status != 0:
            raise self.rig_error(f"cannot write {path} in L1")
        step = 3000
        for i in range(0, len(b64), step):
            self.run_l1(f"echo {b64[i:i + step]} | base64 -d >> {shlex.quote(path)}")
            if self.last_status != 0:
                raise self.rig_error(f"writing {path} in L1 failed")
        if mode:
            self.run_l1(f"chmod {mode} {shlex.quote(path)}")

    def l1_read_file(self, path: str, timeout: float = 120) -> bytes:
        """Read a file in L1 through its console (gzip, then base64: a serial line is slow,
        under Bochs about 2.5 KB/s)."""
        out = self.run_l1(f"gzip -c {shlex.quote(path)} | base64", timeout=timeout)
        if self.last_status != 0:
            raise self.rig_error(f"cannot read {path} in L1: {out[:500]}")
        return gzip.decompress(base64.b64decode("".join(out.split())))

    def sh_l1(self, command: str, timeout: float = 120):
        """Run a shell command in L1; return (exit status, output)."""
        out = self.run_l1(command, timeout=timeout)
        return self.last_status, out

    def run_qi(self, *args, timeout: float = 600, env: Optional[dict] = None) -> QiResult:
        """Run ``qintrospect ARGS`` inside L1 as a user would; stdout and stderr come back
        exactly (base64), the JSON lines parsed when every stdout line is JSON."""
        argv = [str(a) for a in args]
        prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items())
        cmd = " ".join(shlex.quote(a) for a in argv)
        t0 = time.monotonic()
        # One round trip: the command, its status and both outputs (gzip + base64).
        out = self.run_l1(
            f"t0=$(cut -d' ' -f1 /proc/uptime); {prefix} qintrospect {cmd} >/tmp/qi.out 2>/tmp/qi.err"
            f" </dev/null; rc=$?; t1=$(cut -d' ' -f1 /proc/uptime); echo \"QI-RC $rc $t0 $t1\";"
            f" echo QI-STDOUT; gzip -c /tmp/qi.out | base64; echo QI-STDERR; gzip -c /tmp/qi.err | base64;"
            f" echo QI-END", timeout=timeout)
        l0_seconds = time.monotonic() - t0
        m = re.search(r"QI-RC (\d+) ([\d.]+) ([\d.]+)\n+QI-STDOUT\n(.*)QI-STDERR\n(.*)QI-END", out, re.S)
        if not m:
            raise self.rig_error(f"qintrospect did not run in L1: {out[-2000:]}")
        stdout, stderr = (gzip.decompress(base64.b64decode("".join(m.group(i).split())))
                          .decode("utf-8", "replace") for i in (4, 5))
        parsed = None
        lines = [ln for ln in stdout.splitlines() if ln.strip()]
        if lines:
            try:
                parsed = [json.loads(ln) for ln in lines]
            except ValueError:
                parsed = None
        seconds = float(m.group(3)) - float(m.group(2)) if self.l1_clock_is_wall else l0_seconds
        return QiResult(argv, int(m.group(1)), stdout, stderr, seconds, parsed)

    def kvm_debugfs_dirs(self) -> List[str]:
        """L1's /sys/kernel/debug/kvm/PID-FD folders of L2's QEMU."""
        out = self.run_l1("ls /sys/kernel/debug/kvm/")
        return [d for d in out.split() if d.startswith(f"{self.l2_qemu_pid_in_l1}-")]

    # ------------------------------------------------------------------ L2's QEMU in L1
    def l2_qemu_argv(self) -> List[str]:
        """L2's QEMU command line (run inside L1)."""
        argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-name", f"qi-l2-{self.l2}",
                "-display", "none", "-no-reboot", "-accel", "kvm", "-cpu", self.l2_cpu,
                "-m", self.l2_memory, "-smp", str(self.l2_smp)]
        if self.l2 == "linux":
            append = "console=ttyS0 panic=-1 quiet" + (" " + self.l2_append if self.l2_append else "")
            argv += ["-kernel", "/qi/l2/vmlinuz", "-initrd", "/qi/l2/initramfs.cpio.gz", "-append", append]
        else:
            argv += ["-kernel", "/qi/l2/oracle.elf", "-append", f"mode={self.oracle_mode}"]
        argv += ["-qmp", f"unix:{L2_QMP_IN_L1},server=on,wait=off"] + self._l2_l0_monitor_args()
        if self.l2_gdb == "unix":
            argv += ["-gdb", f"unix:{L2_GDB_IN_L1},server=on,wait=off"]
        elif self.l2_gdb == "serial":
            argv += ["-gdb", self._l2_gdb_device()]
        argv += ["-serial", self.l2_console_tty]
        return argv + self.l2_extra_args

    def launch_l2(self, timeout: Optional[float] = None, *, l2: Optional[str] = None,
                  oracle_mode: Optional[str] = None, l2_cpu: Optional[str] = None,
                  l2_memory: Optional[str] = None, l2_gdb: Optional[str] = None) -> None:
        """Start L2's QEMU in L1 (in the background) and wait for L2: the bundled guest's shell
        prompt (then ``stty -echo``), or the oracle's READY line. An L2 already running is
        stopped first; the keyword arguments change the L2 for this and later launches."""
        if l2 is not None:
            if l2 not in ("linux", "oracle"):
                raise ValueError("l2 must be 'linux' or 'oracle'")
            self.l2 = l2
        self.oracle_mode = oracle_mode or self.oracle_mode
        self.l2_cpu = l2_cpu or self.l2_cpu
        self.l2_memory = l2_memory or self.l2_memory
        self.l2_gdb = l2_gdb or self.l2_gdb
        if self.l2 is None:
            raise self.rig_error("no L2 kind given (l2='linux' or 'oracle')")
        timeout = self.timeout if timeout is None else timeout
        if self.l2_qemu_pid_in_l1:
            self.stop_l2()
        self.l2_argv = self.l2_qemu_argv()
        cmd = " ".join(shlex.quote(a) for a in self.l2_argv)
        script = f"""#!/bin/sh
# L2's QEMU, started by {type(self).__module__}; its pid, log and exit status are in {L1_RUN}.
rm -f {L1_RUN}/l2-qemu.pid {L1_RUN}/l2-qemu.exit {L2_QMP_IN_L1} {L2_GDB_IN_L1}
(
    {cmd} </dev/null >{L2_LOG_IN_L1} 2>&1 &
    echo $! > {L1_RUN}/l2-qemu.pid
    wait $!
    echo $? > {L1_RUN}/l2-qemu.exit
) </dev/null >/dev/null 2>&1 &
while [ ! -s {L1_RUN}/l2-qemu.pid ]; do usleep 10000; done
echo "L2-QEMU pid=$(cat {L1_RUN}/l2-qemu.pid)"
"""
        self.l1_write_file(f"{L1_RUN}/start-l2.sh", script.encode())
        with self._l2_console_cond:
            self._l2_console_buf.clear()
        self.timings.pop("l2_first_output", None)
        self._before_l2_start()
        out = self.run_l1(f"sh {L1_RUN}/start-l2.sh", timeout=60)
        m = re.search(r"L2-QEMU pid=(\d+)", out)
        if self.last_status != 0 or not m:
            raise self.rig_error(f"starting L2's QEMU in L1 failed: {out}")
        self.l2_qemu_pid_in_l1 = int(m.group(1))
        self._l2_started_at = time.monotonic()
        self.timings["l2_start"] = self._l2_started_at - self._spawned_at
        self.l2_gdb_in_l1 = L2_GDB_IN_L1 if self.l2_gdb == "unix" else None
        if self.l2 == "linux":
            self._wait_l2_text(re.compile(re.escape(PROMPT)), timeout, "the L2 guest's shell prompt")
            self.l2_run("stty -echo", timeout=timeout)
            up = self.l2_run("cut -d' ' -f1 /proc/uptime").strip()
            try:
                self.timings["l2_boot_uptime"] = float(up)
            except ValueError:
                pass
        else:
            text = self._wait_l2_text(_ORACLE_READY_RE, timeout, "the oracle's ORACLE READY")
            from vm.oracle.boot import parse_output
            self.l2_output = parse_output(text)
            self.l2_maps = list(self.l2_output.maps)
            self.l2_ready = dict(self.l2_output.ready)
            self.l2_ready_line = _ORACLE_READY_RE.search(text).group(0).strip()
        now = time.monotonic()
        self.timings["l2_ready"] = now - self._spawned_at
        self.timings["l2_boot"] = now - self._l2_started_at
        self._after_l2_ready()

    def stop_l2(self, timeout: float = 120) -> Optional[int]:
        """Kill L2's QEMU in L1 (SIGTERM, then SIGKILL); return its exit status."""
        pid = self.l2_qemu_pid_in_l1
        if not pid:
            return None
        try:
            out = self.run_l1(
                f"kill {pid} 2>/dev/null; n=0; while [ ! -s {L1_RUN}/l2-qemu.exit ] && [ $n -lt 100 ]; do"
                f" usleep 100000; n=$((n+1)); done; [ -s {L1_RUN}/l2-qemu.exit ] || kill -9 {pid};"
                f" while [ ! -s {L1_RUN}/l2-qemu.exit ]; do usleep 100000; done; cat {L1_RUN}/l2-qemu.exit",
                timeout=timeout)
        except GuestError as e:
            raise self.rig_error(f"{e}\n{self._stuck_process_report(pid)}") from None
        self.l2_qemu_pid_in_l1 = None
        self.probe = None
        self.l2_output, self.l2_maps, self.l2_ready, self.l2_ready_line = None, [], {}, None
        self.l2_qmp_greeting = None
        self.l2_gdb_in_l1 = None
        try:
            return int(out.split()[-1])
        except (ValueError, IndexError):
            return None

    def _stuck_process_report(self, pid: int) -> str:
        """Why a process in L1 would not die: what L0 sees of L1's vCPUs, then, if L1's console
        still answers, each thread's kernel stack and dmesg's tail."""
        report = self._l0_view_of_l1()
        try:
            self.interrupt()
            time.sleep(1)
            self.drain()
            report += "\nL1's kernel on the stuck process:\n" + self.run_l1(
                f"for t in /proc/{pid}/task/*; do echo \"== $t $(cat $t/comm) wchan=$(cat $t/wchan)\";"
                f" cat $t/stack; done; dmesg | tail -40", timeout=20)
        except GuestError:
            report += "\n(L1's console does not answer)"
        return report

    def l2_qemu_exit_status(self, timeout: float = 20) -> Optional[int]:
        """L2's QEMU's exit status when it exited in L1 although the rig did not stop it (a
        shell's: 128+N = killed by signal N); None while it runs, or when there is no L2 or
        no answer. One short read in L1, nothing changed."""
        if not self.l2_qemu_pid_in_l1 or self.console is None:
            return None
        try:
            out = self.run_l1(f"cat {L1_RUN}/l2-qemu.exit 2>/dev/null", timeout=timeout)
        except GuestError:
            return None
        m = re.match(r"\s*(\d+)", out)
        return int(m.group(1)) if self.last_status == 0 and m else None

    def l1_diagnostics(self, timeout: float = 30) -> str:
        """What would explain a dead or failing L2, for a failed test's report: whether L2's
        QEMU is alive (or its exit status), its stderr, L1's free memory, the tail of L1's
        kernel log (OOM killer, segfaults, KVM errors) and of L2's console as L0 holds it.
        Only reads (one round trip on L1's console, bounded by ``timeout``); never raises."""
        text = [f"L2 ({self.l2}): QEMU pid in L1 as the rig knows it: "
                f"{self.l2_qemu_pid_in_l1 or 'none (stopped or not started)'}"]
        if self.console is None:
            return "\n".join(text + ["L1 is not running: nothing to read in it"])
        log, ex = L2_LOG_IN_L1, f"{L1_RUN}/l2-qemu.exit"
        script = (
            f"p=$(cat {L1_RUN}/l2-qemu.pid 2>/dev/null); e=$(cat {ex} 2>/dev/null);"
            f" if [ -n \"$e\" ]; then echo \"L2's QEMU (pid $p in {L1_RUN}/l2-qemu.pid) EXITED, status $e\";"
            f" elif [ -n \"$p\" ] && [ -d /proc/$p ]; then echo \"L2's QEMU (pid $p) is running:\""
            f" $(grep -e ^State -e ^VmRSS /proc/$p/status);"
            f" else echo \"L2's QEMU: no pid file or no such process (pid '$p')\"; fi;"
            f" echo \"== L1: uptime $(cut -d' ' -f1 /proc/uptime) s, load $(cat /proc/loadavg)\";"
            f" head -n 5 /proc/meminfo;"
            f" echo \"== L2's QEMU's stderr ({log}), last 30 lines:\";"
            f" if [ -s {log} ]; then tail -n 30 {log}; else echo '(empty)'; fi;"
            # An OOM report alone can fill the tail: its key lines, from the whole buffer.
            f" echo \"== L1's dmesg, OOM killer, crashes, KVM:\"; dmesg | grep -i -e 'out of memory'"
            f" -e oom-kill -e oom_reaper -e 'killed process' -e segfault -e 'traps:' -e 'general protection'"
            f" -e 'BUG:' -e lockup -e 'kvm \\[' | tail -n 20;"
            f" echo \"== L1's dmesg, last 40 lines:\"; dmesg | tail -n 40")
        try:
            out = self.run_l1(script, timeout=timeout)
        except Exception as e:             # a report of a failure must not fail in turn
            text.append(f"L1's console did not answer within {timeout:.0f} s: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
            try:
                text.append(self._l0_view_of_l1())
            except Exception:
                pass
        else:
            m = re.search(r"EXITED, status (\d+)", out)
            if m and int(m.group(1)) > 128:
                try:
                    name = signal.Signals(int(m.group(1)) - 128).name
                except ValueError:
                    name = f"signal {int(m.group(1)) - 128}"
                out = out.replace(m.group(0), f"{m.group(0)} (killed by {name})", 1)
            text.append(out.rstrip())
        try:
            console = self.l2_console_text()[-1500:]
        except Exception:
            console = ""
        text.append("== L2's console, last lines (as L0 received them):\n" + console.rstrip())
        return "\n".join(text)

    def _l2_exited(self) -> Optional[str]:
        out = self.run_l1(f"cat {L1_RUN}/l2-qemu.exit 2>/dev/null && cat {L2_LOG_IN_L1}", timeout=60)
        return out if self.last_status == 0 and out.strip() else None

    def _wait_l2_text(self, pattern, timeout: float, what: str, start: int = 0) -> str:
        """Wait until L2's console (from byte ``start``) matches; return the text so far."""
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + 5
        while True:
            with self._l2_console_cond:
                text = self._l2_console_buf[start:].decode("utf-8", "replace")
                if not pattern.search(text):
                    self._l2_console_cond.wait(0.1)
                    text = self._l2_console_buf[start:].decode("utf-8", "replace")
            if pattern.search(text):
                return text
            now = time.monotonic()
            if now > deadline:
                raise self.rig_error(f"timed out after {timeout:.0f}s waiting for {what}; L2 console tail:\n"
                                     f"{text[-2000:]}\nL1 console tail:\n{self._transcript.tail()}")
            if now > next_check and self.l2_qemu_pid_in_l1 and self.console is not None:
                next_check = now + 5
                died = self._l2_exited()
                if died:
                    raise self.rig_error(f"L2's QEMU exited in L1 (status, log):\n{died}\nL2 console:\n{text[-2000:]}")
            if self._reader is None or not self._reader.is_alive():
                raise self.rig_error(f"the L2 console socket closed; L2 console so far:\n{text[-2000:]}")

    # ------------------------------------------------------------------ L2
    def l2_run(self, command: str, timeout: float = 120) -> str:
        """Type a shell command on the bundled L2 guest's console (reaching L0 through one of
        L1's serial lines); return its output. The exit status is left in
        ``self.l2_last_status``."""
        if self.l2 != "linux":
            raise self.rig_error("l2_run needs the bundled Linux guest as L2")
        self._l2_seq += 1
        marker = f"@@QI-L2-DONE-{self._l2_seq}-"
        with self._l2_console_cond:
            start = len(self._l2_console_buf)
        self._l2_console_sock.sendall(f"{command}\necho {marker}$?@@\n".encode())
        done = re.compile(re.escape(marker) + r"(\d+)@@\r?\n(.*?)" + re.escape(PROMPT), re.S)
        text = self._wait_l2_text(done, timeout, f"the end of {command!r} in L2", start=start)
        m = done.search(text)
        self.l2_last_status = int(m.group(1))
        out = text[:m.start()].replace("\r\n", "\n").replace("\r", "")
        if out.endswith(PROMPT):
            out = out[: -len(PROMPT)]
        return out

    def l2_start_probe(self, mode: str = "spin", timeout: float = 120) -> dict:
        """Start the bundled guest's ``/probe MODE &`` in L2; return its parsed report
        (vm.guest.parse_probe_output: {"pid", "regions": {name: {gva, value, gpa, size, thp}}})."""
        if mode not in ("spin", "sleep"):
            raise ValueError("mode must be 'spin' or 'sleep'")
        with self._l2_console_cond:
            start = len(self._l2_console_buf)
        self._l2_console_sock.sendall(f"/probe {mode} &\n".encode())
        text = self._wait_l2_text(_L2_READY_RE, timeout, "the probe's PROBE-READY line", start=start)
        report = parse_probe_output(text)
        missing = {"heap", "stack", "rodata", "thp", "untouched", "text"} - set(report["regions"])
        if missing:
            raise self.rig_error(f"probe output lacks {sorted(missing)}:\n{text}")
        self.probe = report
        return report

    def l2_uptime(self) -> float:
        return float(self.l2_run("cut -d' ' -f1 /proc/uptime").strip())


class KvmRig(KvmHostRig, NestedRig):
    """L1 (Linux + kvm-amd + QEMU + Python/qintrospect) at L0 under TCG; L2 inside it under KVM.

    ``l2``: "linux" (the bundled guest: vmlinuz + initramfs with /probe and gpt_dump.ko),
    "oracle" (vm/oracle, mode ``oracle_mode``) or None (start it later with ``launch_l2``).
    A context manager that always tears down (killing L1's QEMU kills L2 with it).

    Attributes once started:
      l1_qmp_path, l1_gdb_address, l1_pid      L1's QMP socket, gdbstub, QEMU pid (at L0)
      l2_qmp_in_l1, l2_gdb_in_l1               L2's QMP / gdbstub Unix sockets inside L1
                                               (l2_gdb_in_l1 is None while the stub is on ttyS2)
      l2_qmp_path, l2_gdb_path, l2_console_path  L1's ttyS1/2/3 as Unix sockets at L0
      l2_qemu_pid_in_l1, l2_argv (L2's QEMU command line), l2_gdb ("unix" | "serial" | "none")
      l1_ready (the KVM L1-READY key=values), kvm_dmesg (kvm lines of L1's dmesg)
      probe (the last l2_start_probe() report), l2_output/l2_maps/l2_ready (oracle L2)
      timings: seconds -- "qi_disk" (making the per-start disk), "l1_prompt" (L1's shell
        from spawning L1's QEMU), "l1_uptime_ready" (L1's uptime at the end of its init),
        "l2_start" (from spawning L1 to L2's QEMU started in L1), "l2_first_output",
        "l2_ready" (L2's shell prompt / ORACLE READY, from spawning L1), "l2_boot" (the same
        from starting L2's QEMU), "l2_boot_uptime" (L2's own /proc/uptime at its prompt)
    """

    def __init__(self, l2: Optional[str] = "linux", l2_cpu: str = "host",
                 l2_memory: Optional[str] = None, l2_smp: int = 1, l2_gdb: str = "unix",
                 oracle_mode: str = "4level", l2_append: str = "", cpu: str = "max",
                 memory: str = "2G", smp: int = 2, cache_dir: Optional[str] = None,
                 timeout: float = 600.0, console_log: Optional[str] = None, extra_args=(),
                 l2_extra_args=()):
        if l2 not in ("linux", "oracle", None):
            raise ValueError("l2 must be 'linux', 'oracle' or None")
        if l2_gdb not in ("unix", "serial", "none"):
            raise ValueError("l2_gdb must be 'unix', 'serial' or 'none'")
        if l2_memory is None:
            l2_memory = "256M" if l2 != "oracle" else "64M"
        super().__init__(l2_mode=oracle_mode, l2_cpu=l2_cpu, l2_memory=l2_memory, cpu=cpu,
                         memory=memory, smp=smp, cache_dir=cache_dir, timeout=timeout,
                         start_l2=False, console_log=console_log, extra_args=extra_args,
                         read_greeting=False)
        self.append_extra = "quiet"
        self._init_kvm_host(l2, l2_smp, l2_gdb, oracle_mode, l2_append, l2_extra_args)
        self.anchor_vm_pid_in_l1: Optional[int] = None

    # ------------------------------------------------------------------ files
    @property
    def initrd(self) -> str:
        return os.path.join(kvm_cache_dir(self.cache_dir), "initramfs.cpio.gz")

    @property
    def root_image(self) -> str:
        return os.path.join(kvm_cache_dir(self.cache_dir), "root.ext4")

    @classmethod
    def check_built(cls, cache_dir=None) -> None:
        """Raise KvmRigNotBuilt (naming vm/kvm/build.sh) when an image is missing."""
        cache = os.path.abspath(cache_dir) if cache_dir else default_cache_dir()
        kvm = kvm_cache_dir(cache)
        need = [os.path.join(cache, "vmlinuz"), os.path.join(cache, "initramfs.cpio.gz"),
                os.path.join(cache, "oracle", "oracle.elf"),
                os.path.join(kvm, "initramfs.cpio.gz"), os.path.join(kvm, "root.ext4")]
        missing = [p for p in need if not os.path.isfile(p)]
        if missing:
            raise KvmRigNotBuilt(
                f"the KVM rig is not built: {', '.join(missing)} missing. Run "
                f"`bash {os.path.relpath(BUILD_SCRIPT)}` first"
                + (" with the same QI_VM_CACHE" if os.environ.get("QI_VM_CACHE") else "") + ".")

    @staticmethod
    def build() -> str:
        """Run vm/kvm/build.sh (idempotent); return the cache folder it printed."""
        res = subprocess.run(["bash", BUILD_SCRIPT], capture_output=True, text=True)
        if res.returncode != 0:
            raise KvmRigError(f"vm/kvm/build.sh failed ({res.returncode}):\n{res.stderr}")
        return res.stdout.strip().splitlines()[-1]

    def _python_magic_file(self) -> str:
        return os.path.join(kvm_cache_dir(self.cache_dir), "python-magic")

    def _l1_ready_problem(self) -> Optional[str]:
        if self.l1_ready.get("kvm") != "yes" or self.l1_ready.get("npt") != "Y":
            return "L1 has no usable KVM with nested paging"
        return None

    def _l2_l0_monitor_args(self) -> List[str]:
        # L2's second QMP monitor, for L0: L1's ttyS1 (rig.l2_qmp_path at L0)
        return ["-chardev", "serial,id=l0qmp,path=/dev/ttyS1", "-mon", "chardev=l0qmp,mode=control"]

    def _l2_gdb_device(self) -> str:
        return "/dev/ttyS2"

    def _before_l2_start(self) -> None:
        # The first QMP greeting goes by once, on ttyS1, when L2's QEMU starts: read it.
        self._greet_sock = None
        try:
            greet = _connect_unix(self.l2_qmp_path, 1.0)
        except OSError:
            greet = None
        self._greet_sock = greet

    def _after_l2_ready(self) -> None:
        if self._greet_sock is not None:
            greeting = self._poll_greeting(wait=0.5)
            self._greet_sock.close()
            self._greet_sock = None
            for line in greeting.splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "QMP" in obj:
                    self.l2_qmp_greeting = obj
                    break

    def _l0_view_of_l1(self) -> str:
        """L1's vCPUs as L0's QEMU sees them (a dead L1 still shows where it loops, and whether
        interrupts are off)."""
        try:
            regs = self.hmp("info registers -a")
            cpus = "\n".join(f"  CPU#{n} RIP={rip} RFL={rfl} CPL={cpl} HLT={hlt}" for n, rip, rfl, cpl, hlt
                             in re.findall(r"CPU#(\d+)\s*\nRAX=.*?RIP=(\w+) RFL=(\w+).*?CPL=(\d).*?"
                                           r"HLT=(\d)", regs, re.S))
        except Exception as e:                  # the report must not hide the hang itself
            cpus = f"  (L0's monitor did not answer: {e})"
        return f"L1's vCPUs seen from L0 (RFL bit 0x200 = interrupts on):\n{cpus}"

    # ------------------------------------------------------------------ boot
    def _qemu_argv(self, port: int) -> List[str]:
        argv = super()._qemu_argv(port)    # + L1's ttyS1-3 as Unix sockets at L0
        if self.qi_disk is None:
            self.qi_disk = self.make_qi_disk(os.path.join(self.tmpdir, "qi.ext4"))
        argv += ["-drive", f"file={self.root_image},if=virtio,format=raw,readonly=on",
                 "-drive", f"file={self.qi_disk},if=virtio,format=raw,readonly=on"]
        return argv

    def start(self, timeout: Optional[float] = None) -> "KvmRig":
        timeout = self.timeout if timeout is None else timeout
        try:
            super().start(timeout=timeout)       # L1 to its shell prompt
            self._check_l1()
            self._hold_anchor_vm()
            if self.l2:
                self.launch_l2()
            return self
        except BaseException:
            self.stop()
            raise

    def _hold_anchor_vm(self) -> None:
        """Keep one empty KVM VM open in L1 for L1's whole life, so that starting and stopping
        L2's QEMU never creates L1's first VM or destroys its last.

        Why: KVM's first VM turns on the static key of the scheduler's preempt notifiers and
        its last turns it off; the kernel patches that key's jump inside __schedule (through
        an int3) while the other CPU runs it. About once in ten runs of tests/integration/kvm,
        L1 hung at an L2 stop or start ("soft lockup", or a dead console). L0's
        `info registers -a` then showed one vCPU at __schedule+0x2ab with IF=0, passing
        through asm_exc_int3 again and again, and the other in smp_call_function_many_cond
        under kvm_destroy_vm; those 5 bytes are the key's (nopl with no VM, jmp with one,
        read with HMP `x /3i`). Our reading: under L0's multi-threaded TCG that vCPU keeps
        running a stale translation holding the int3, while the handler, finding the byte
        already patched, steps back to it. With one VM always open, the key and KVM's SVM
        enabling on every CPU never change as L2s come and go. Checked in L1 with a shell
        pipeline keeping the scheduler busy: creating and closing VMs in a loop hung L1 at
        that address within 300 VMs without the anchor, and 3,000 went through with it."""
        # KVM_CREATE_VM is _IO(0xAE, 0x01); the process says its pid and waits for L1 to go down.
        holder = ("import fcntl, os, signal; kvm = os.open('/dev/kvm', os.O_RDWR); "
                  "vm = fcntl.ioctl(kvm, 0xAE01, 0); "
                  "print('anchor vm fd', vm, 'pid', os.getpid(), flush=True); signal.pause()")
        log = f"{L1_RUN}/anchor-vm.log"
        self.run_l1(f"mkdir -p {L1_RUN}; python3 -c {shlex.quote(holder)} </dev/null >{log} 2>&1 &")
        out = self.run_l1(f"n=0; until grep -q 'anchor vm fd' {log} || [ $n -ge 300 ]; do"
                          f" usleep 100000; n=$((n+1)); done; cat {log}", timeout=60)
        m = re.search(r"anchor vm fd \d+ pid (\d+)", out)
        if not m:
            raise KvmRigError(f"L1 could not hold an empty KVM VM open: {out.strip()}")
        self.anchor_vm_pid_in_l1 = int(m.group(1))

    # ------------------------------------------------------------------ L2's monitors at L0
    def l2_qmp(self, timeout: float = 30.0) -> SerialQMP:
        """A new SerialQMP on L2's second monitor, through L1's ttyS1 (close it, or `with`)."""
        return SerialQMP(self.l2_qmp_path, timeout=timeout)

    def l2_gdb_to(self, where: str) -> None:
        """Move L2's one gdbstub: "unix" (l2_gdb_in_l1, inside L1), "serial" (L1's ttyS2 =
        l2_gdb_path at L0) or "none". L2's run state is put back as it was."""
        if where not in ("unix", "serial", "none"):
            raise ValueError("where must be 'unix', 'serial' or 'none'")
        with self.l2_qmp() as q:
            running = q.cmd("query-status")["running"]
            out = q.hmp("gdbserver none")
            if where != "none":
                device = f"unix:{L2_GDB_IN_L1},server=on,wait=off" if where == "unix" else "/dev/ttyS2"
                if where == "unix":
                    self.run_l1(f"rm -f {L2_GDB_IN_L1}")
                out = q.hmp(f"gdbserver {device}")
                if "Waiting for gdb connection" not in out:
                    raise KvmRigError(f"HMP gdbserver {device}: {out.strip()}")
            if q.cmd("query-status")["running"] != running:
                q.cmd("cont" if running else "stop")
        self.l2_gdb = where
        self.l2_gdb_in_l1 = L2_GDB_IN_L1 if where == "unix" else None


def main(argv=None) -> int:
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(prog="python -m vm.kvm.rig",
                                 description="Boot the KVM rig (L1 Linux+KVM under TCG, L2 under KVM) and wait.")
    ap.add_argument("--l2", choices=("linux", "oracle", "none"), default="linux")
    ap.add_argument("--l2-cpu", default="host")
    ap.add_argument("--l2-memory", default=None)
    ap.add_argument("--l2-gdb", choices=("unix", "serial", "none"), default="unix")
    ap.add_argument("--memory", "-m", default="2G", help="L1's RAM")
    ap.add_argument("--smp", type=int, default=2, help="L1's vCPUs")
    ap.add_argument("--probe", choices=("spin", "sleep", "none"), default="spin")
    ap.add_argument("--console-log", default=None, help="append L1's console to FILE")
    ap.add_argument("--interact", action="store_true", help="attach this terminal to L1's console")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rig = KvmRig(l2=None if args.l2 == "none" else args.l2, l2_cpu=args.l2_cpu,
                 l2_memory=args.l2_memory, l2_gdb=args.l2_gdb, memory=args.memory, smp=args.smp,
                 console_log=args.console_log)
    try:
        with rig:
            print(f"L1 QEMU pid {rig.l1_pid}; QMP {rig.l1_qmp_path}; gdb {rig.l1_gdb_address}")
            print(f"L1: {' '.join(f'{k}={v}' for k, v in rig.l1_ready.items())}")
            if rig.l2:
                print(f"L2 ({rig.l2}) QEMU pid in L1 {rig.l2_qemu_pid_in_l1}; in L1: QMP {rig.l2_qmp_in_l1}"
                      f", gdb {rig.l2_gdb_in_l1}; at L0: QMP {rig.l2_qmp_path}, gdb {rig.l2_gdb_path}"
                      f" (when on serial), console {rig.l2_console_path}")
                if rig.l2 == "linux" and args.probe != "none":
                    for line in rig.l2_start_probe(args.probe)["lines"]:
                        print(line)
                elif rig.l2 == "oracle":
                    print(rig.l2_ready_line)
            print("timings: " + ", ".join(f"{k}={v:.2f}s" for k, v in rig.timings.items()))
            hold(rig, args.interact, "L1 console (prompt 'qi# '; qintrospect is on PATH)")
    except KeyboardInterrupt:
        print("\nstopping")
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
