"""The Intel EPT rig: L0 = Bochs (Intel VT-x with EPT), L1 = Linux with kvm-intel, L2 under KVM.

QEMU's TCG emulates AMD SVM but not Intel VMX; Debian's Bochs emulates VMX with EPT. So L1 (the
bundled cloud kernel, booted by Bochs from vm/ept/build.sh's isolinux ISO) loads its own kvm
and kvm-intel modules (ept=Y) and runs L2 with ``qemu-system-x86_64 -accel kvm``: L2's memory
goes through a real EPT built by L1's KVM. L1's root file system is the KVM rig's (Python,
numpy, gdb, QEMU), so qintrospect runs INSIDE L1 against L2 exactly as on an Intel KVM host::

    from vm.ept.rig import EptRig
    with EptRig(l2="linux") as rig:             # boots L1 under Bochs, checks KVM + EPT, starts L2
        p = rig.l2_start_probe("spin")           # the bundled guest's probe, parsed
        r = rig.run_qi("translate", "--qmp", rig.l2_qmp_in_l1, "--slat", "auto", "--json", hex(gva))
        r.rc, r.stdout, r.stderr, r.json, r.seconds   # qintrospect inside L1 (seconds: L0's clock)
        rig.run_l1("ls /sys/kernel/debug/kvm")   # any shell command in L1 (rig.last_status)
        rig.l2_run("dmesg | tail")               # L2's shell (its console: L1's ttyS1 = COM2)

Everything about L2 (its QEMU started in L1, its console, the probe, qintrospect in L1, the
per-start disk) is ``vm.kvm.rig.KvmHostRig``, shared with the KVM rig; this module is what
runs L1: Bochs, its configuration and its serial ports.

Bochs's COM1 (L1's console, ttyS0) and COM2 (L2's console through L1's ttyS1) are TCP
connections to 127.0.0.1: the rig listens on two ports the kernel picks (port 0) and Bochs
connects to them (``mode=socket-client``), so no fixed port can clash with another run, and a
killed run's ports in TIME_WAIT are never asked for again. L2's QMP and gdbstub are Unix
sockets inside L1 (``rig.l2_qmp_in_l1``, ``rig.l2_gdb_in_l1``), for qintrospect inside L1;
L0 has neither a QMP nor a gdbstub of L1 (Bochs has no QMP; Debian's build has its internal
debugger instead of a gdbstub), so there is no ``--outer`` chain here.

Bochs's clock is virtual (``clock: sync=none``: time follows the instruction count, so L1 is
never starved of timer ticks however slow the host is): L1's /proc/uptime says little about
wall time, and the rig times everything from L0.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import pexpect
import pexpect.fdpexpect

from vm.guest import Guest, GuestError, GuestNotBuilt, _die_with_parent, default_cache_dir
from vm.kvm.rig import KvmHostRig

__all__ = ["EptRig", "EptRigError", "EptRigNotBuilt", "ept_cache_dir", "BUILD_SCRIPT"]

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SCRIPT = os.path.join(HERE, "build.sh")

# Bochs's hard disks are whole cylinders of 16 heads x 63 sectors of 512 bytes.
CYLINDER = 16 * 63 * 512


class EptRigError(GuestError):
    """The EPT rig could not be started or did not answer as expected."""


class EptRigNotBuilt(EptRigError, GuestNotBuilt):
    """An image of the rig (or Bochs) is missing: run vm/ept/build.sh (scripts/setup does)."""


def ept_cache_dir(cache_dir: Optional[str] = None) -> str:
    return os.path.join(os.path.abspath(cache_dir) if cache_dir else default_cache_dir(), "ept")


def _listen_loopback() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


class EptRig(KvmHostRig, Guest):
    """L1 (Linux + kvm-intel + QEMU + Python/qintrospect) under Bochs; L2 inside it under KVM.

    ``l2``: "linux" (the bundled guest), "oracle" (vm/oracle, mode ``oracle_mode``) or None
    (start it later with ``launch_l2``). ``memory``: L1's RAM in MiB (Bochs's ``megs``).
    A context manager that always tears down (killing Bochs kills L1 and L2 with it).

    Attributes once started:
      l1_pid                         Bochs's pid (at L0); bochsrc (its configuration file)
      l2_qmp_in_l1, l2_gdb_in_l1     L2's QMP / gdbstub Unix sockets inside L1
      l2_qemu_pid_in_l1, l2_argv     L2's QEMU in L1 and its command line
      l1_ready                       the "EPT L1-READY" key=values (vmx, ept, nested, thp, ...)
      kvm_dmesg                      kvm/vmx lines of L1's dmesg
      probe                          the last l2_start_probe() report
      l2_output/l2_maps/l2_ready     the oracle L2's output
      timings: seconds -- "qi_disk" (making the per-start disk), "l1_prompt" (L1's shell from
        spawning Bochs), "l2_start" (from spawning Bochs to L2's QEMU started in L1),
        "l2_first_output", "l2_ready" (L2's shell prompt / ORACLE READY, from spawning Bochs),
        "l2_boot" (the same from starting L2's QEMU); all from L0's clock
    """

    rig_error = EptRigError
    ready_prefix = "EPT"
    kvm_dmesg_pattern = "-e kvm -e vmx"
    l2_console_tty = "/dev/ttyS1"          # Bochs's COM2
    disk_align = CYLINDER
    l1_clock_is_wall = False               # Bochs's clock is virtual: time from L0

    def __init__(self, l2: Optional[str] = "linux", l2_cpu: str = "host",
                 l2_memory: Optional[str] = None, l2_smp: int = 1, l2_gdb: str = "unix",
                 oracle_mode: str = "4level", l2_append: str = "", memory: int = 1024,
                 cpu_model: str = "corei7_skylake_x", ips: int = 50_000_000,
                 cache_dir: Optional[str] = None, timeout: float = 900.0,
                 console_log: Optional[str] = None, l2_extra_args=()):
        if l2 not in ("linux", "oracle", None):
            raise ValueError("l2 must be 'linux', 'oracle' or None")
        if l2_gdb not in ("unix", "none"):
            raise ValueError("l2_gdb must be 'unix' or 'none' (L0 reaches no gdbstub in L1)")
        if l2_memory is None:
            l2_memory = "256M" if l2 != "oracle" else "64M"
        Guest.__init__(self, cpu=cpu_model, memory=f"{int(memory)}M", smp=1, accel="bochs",
                       cache_dir=cache_dir, console_log=console_log)
        self.megs = int(memory)
        self.ips = int(ips)
        self.l2_cpu = l2_cpu
        self.l2_memory = l2_memory
        self.timeout = timeout
        self.timings: dict = {}
        self.bochsrc: Optional[str] = None
        self._bochs: Optional[subprocess.Popen] = None
        self._listeners: List[socket.socket] = []
        self._console_sock: Optional[socket.socket] = None
        self._init_l2_console()
        self._init_kvm_host(l2, l2_smp, l2_gdb, oracle_mode, l2_append, l2_extra_args)

    # ------------------------------------------------------------------ names
    @property
    def l1_pid(self) -> Optional[int]:
        return self.pid

    @property
    def boot_iso(self) -> str:
        return os.path.join(ept_cache_dir(self.cache_dir), "boot.iso")

    @property
    def root_image(self) -> str:
        return os.path.join(ept_cache_dir(self.cache_dir), "root.img")

    @classmethod
    def check_built(cls, cache_dir=None) -> None:
        """Raise EptRigNotBuilt (naming vm/ept/build.sh) when Bochs or an image is missing."""
        cache = os.path.abspath(cache_dir) if cache_dir else default_cache_dir()
        ept = ept_cache_dir(cache)
        need = [os.path.join(cache, "vmlinuz"), os.path.join(cache, "initramfs.cpio.gz"),
                os.path.join(cache, "kernel-release"), os.path.join(cache, "oracle", "oracle.elf"),
                os.path.join(ept, "boot.iso"), os.path.join(ept, "root.img")]
        missing = [p for p in need if not os.path.isfile(p)]
        if shutil.which("bochs-bin") is None:
            missing.append("bochs-bin (apt-get install bochs bochsbios vgabios)")
        if missing:
            raise EptRigNotBuilt(
                f"the EPT rig is not built: {', '.join(missing)} missing. Run "
                f"`bash {os.path.relpath(BUILD_SCRIPT)}` first (scripts/setup installs Bochs and runs it)"
                + (" with the same QI_VM_CACHE" if os.environ.get("QI_VM_CACHE") else "") + ".")

    @staticmethod
    def build() -> str:
        """Run vm/ept/build.sh (idempotent); return the cache folder it printed."""
        res = subprocess.run(["bash", BUILD_SCRIPT], capture_output=True, text=True)
        if res.returncode != 0:
            raise EptRigError(f"vm/ept/build.sh failed ({res.returncode}):\n{res.stderr}")
        return res.stdout.strip().splitlines()[-1]

    # ------------------------------------------------------------------ KvmHostRig's hooks
    def _python_magic_file(self) -> str:
        return os.path.join(ept_cache_dir(self.cache_dir), "python-magic")

    def _l1_ready_problem(self) -> Optional[str]:
        r = self.l1_ready
        if r.get("kvm") != "yes" or r.get("vmx") != "yes" or r.get("ept") != "Y":
            return "L1 has no usable KVM with EPT"
        return None

    def _after_l2_ready(self) -> None:
        """L2's vCPU threads at nice 19 in L1. L1 has one vCPU (two make Bochs twice as slow),
        and the probe spins in L2: at equal weight, L2's vCPU thread would take half of L1's
        CPU from qintrospect and the shell. Measured: `qintrospect --help` 10.0 s -> 6.2 s,
        `translate --slat auto` 75 s -> 39 s. L2 still runs whenever L1 has nothing else."""
        out = self.run_l1(f"for t in $(cat /sys/kernel/debug/kvm/{self.l2_qemu_pid_in_l1}-*/vcpu*/pid);"
                          f" do renice -n 19 -p $t >/dev/null || exit 1; done")
        if self.last_status != 0:
            raise EptRigError(f"cannot renice L2's vCPU threads in L1: {out}")

    def _l0_view_of_l1(self) -> str:
        alive = self._bochs is not None and self._bochs.poll() is None
        return f"Bochs (pid {self.pid}) {'runs' if alive else 'has exited'}; its log's tail:\n" \
               f"{self._bochs_tail()}"

    # ------------------------------------------------------------------ Bochs
    def _bochs_tail(self, n: int = 1500) -> str:
        out = []
        for name in ("bochs.out", "bochs.log"):
            try:
                with open(os.path.join(self.tmpdir or "", name), "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - n))
                    out.append(f"[{name}] " + f.read().decode("utf-8", "replace"))
            except OSError:
                pass
        return "\n".join(out)

    def _write_bochsrc(self, com_ports: List[int]) -> str:
        """Bochs's configuration; why each line, in vm/ept/README.md."""
        rc = f"""# written by vm/ept/rig.py
megs: {self.megs}
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
cpu: model={self.cpu}, count=1, ips={self.ips}, reset_on_triple_fault=1, ignore_bad_msrs=1
clock: sync=none, time0=local
# Debian's Bochs has no "nogui" display: the VNC server, which waits for no client
# (timeout=0) and takes the first free port from 5900.
display_library: rfb, options="timeout=0"
vga: extension=vbe, update_freq=1
pci: enabled=1, chipset=i440fx
ata0-master: type=disk, path={self.root_image}, mode=flat
ata0-slave: type=disk, path={self.qi_disk}, mode=flat
ata1-master: type=cdrom, path={self.boot_iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=socket-client, dev=127.0.0.1:{com_ports[0]}
com2: enabled=1, mode=socket-client, dev=127.0.0.1:{com_ports[1]}
mouse: enabled=0
# Debian's ALSA mixer thread aborts Bochs ("buffer overflow detected"): no sound at all.
speaker: enabled=0
sound: driver=dummy
log: {os.path.join(self.tmpdir, "bochs.log")}
panic: action=fatal
error: action=ignore
info: action=report
debug: action=ignore
"""
        path = os.path.join(self.tmpdir, "bochsrc")
        with open(path, "w") as f:
            f.write(rc)
        return path

    def start(self, timeout: Optional[float] = None) -> "EptRig":
        """Boot L1 under Bochs to its shell prompt, check KVM + EPT, start L2 (if ``l2``)."""
        timeout = self.timeout if timeout is None else timeout
        if self.console is not None:
            raise EptRigError("the rig is already started")
        self.check_built(self.cache_dir)
        atexit.register(self.stop)
        try:
            self.tmpdir = tempfile.mkdtemp(prefix="qi-ept-")
            if self.console_log:
                self._log_fh = open(self.console_log, "a", encoding="utf-8", errors="replace")
                self._transcript._tee = self._log_fh
            self.qi_disk = self.make_qi_disk(os.path.join(self.tmpdir, "qi.img"))
            self._spawn_bochs(timeout)
            self.wait_for_prompt(timeout=max(1.0, timeout - (time.monotonic() - self._spawned_at)))
            self.timings["l1_prompt"] = self.boot_seconds
            self._check_l1()
            if self.l2:
                self.launch_l2()
            return self
        except BaseException:
            self.stop()
            raise

    def _spawn_bochs(self, timeout: float) -> None:
        self._listeners = [_listen_loopback(), _listen_loopback()]
        self.bochsrc = self._write_bochsrc([s.getsockname()[1] for s in self._listeners])
        # Bochs's built-in debugger stops before the first instruction and reads commands from
        # stdin: -rc gives it "c" (continue). -unlock: a killed run leaves the images' .lock
        # files behind, and every later run would refuse them.
        rc_file = os.path.join(self.tmpdir, "continue.rc")
        with open(rc_file, "w") as f:
            f.write("c\n")
        self.argv = ["bochs-bin", "-q", "-unlock", "-rc", rc_file, "-f", self.bochsrc]
        self._spawned_at = time.monotonic()
        with open(os.path.join(self.tmpdir, "bochs.out"), "wb") as out:
            self._bochs = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, cwd=self.tmpdir,
                                           preexec_fn=_die_with_parent)
        self.pid = self._bochs.pid
        # Bochs connects COM1, then COM2, while it sets up its devices.
        conns = []
        for listener in self._listeners:
            deadline = time.monotonic() + min(timeout, 60)
            while True:
                ready, _, _ = select.select([listener], [], [], 0.2)
                if ready:
                    conn, _ = listener.accept()
                    conns.append(conn)
                    break
                if self._bochs.poll() is not None or time.monotonic() > deadline:
                    raise EptRigError(f"Bochs did not connect its serial port "
                                      f"{len(conns) + 1} ({' '.join(self.argv)}):\n{self._bochs_tail()}")
        for s in self._listeners:
            s.close()
        self._listeners = []
        self._console_sock, l2_console = conns
        child = pexpect.fdpexpect.fdspawn(self._console_sock.fileno(), encoding="utf-8",
                                          codec_errors="replace", timeout=timeout)
        child.delaybeforesend = None   # pexpect's default 50 ms a send is not needed here
        child.logfile_read = self._transcript
        self.console = child
        self._start_l2_console_reader(l2_console)

    def _expect(self, pattern, timeout, what) -> None:
        try:
            super()._expect(pattern, timeout, what)
        except GuestError as e:
            alive = self._bochs is not None and self._bochs.poll() is None
            raise EptRigError(f"{e}\nBochs {'still runs' if alive else 'has exited'}:\n"
                              f"{self._bochs_tail()}") from None

    def interrupt(self) -> None:
        """Ctrl-C to L1's foreground job (fdspawn has no sendcontrol)."""
        self.console.send("\x03")

    def stop(self) -> None:
        """Kill Bochs (and so L1 and L2), close the rig's sockets, remove the temp dir.
        Idempotent; never raises."""
        self._close_l2_console()
        child, self.console = self.console, None
        for s in [self._console_sock] + self._listeners:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self._console_sock, self._listeners = None, []
        if child is not None:
            child.child_fd = -1           # the socket above owned the fd: nothing left to close
        p, self._bochs = self._bochs, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        super().stop()                    # atexit, the temp dir, the console log
        self._join_l2_console_reader()

    def qmp(self, command: str, **arguments):
        raise EptRigError("L1 runs under Bochs, which has no QMP")

    def hmp(self, command_line: str) -> str:
        raise EptRigError("L1 runs under Bochs, which has no monitor")


def _interact(sock: socket.socket) -> None:
    """This terminal on L1's console (raw), until Ctrl-]."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        while True:
            ready, _, _ = select.select([fd, sock], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 1024)
                if b"\x1d" in data:
                    return
                sock.sendall(data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vm.ept.rig",
                                 description="Boot the EPT rig (L1 Linux+kvm-intel under Bochs, L2 under KVM) and wait.")
    ap.add_argument("--l2", choices=("linux", "oracle", "none"), default="linux")
    ap.add_argument("--l2-cpu", default="host")
    ap.add_argument("--l2-memory", default=None)
    ap.add_argument("--memory", "-m", type=int, default=1024, help="L1's RAM in MiB")
    ap.add_argument("--probe", choices=("spin", "sleep", "none"), default="spin")
    ap.add_argument("--console-log", default=None, help="append L1's console to FILE")
    ap.add_argument("--interact", action="store_true", help="attach this terminal to L1's console")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rig = EptRig(l2=None if args.l2 == "none" else args.l2, l2_cpu=args.l2_cpu,
                 l2_memory=args.l2_memory, memory=args.memory, console_log=args.console_log)
    try:
        with rig:
            print(f"Bochs pid {rig.l1_pid}; {rig.bochsrc}")
            print(f"L1: {' '.join(f'{k}={v}' for k, v in rig.l1_ready.items())}")
            if rig.l2:
                print(f"L2 ({rig.l2}) QEMU pid in L1 {rig.l2_qemu_pid_in_l1}; in L1: QMP "
                      f"{rig.l2_qmp_in_l1}, gdb {rig.l2_gdb_in_l1}")
                if rig.l2 == "linux" and args.probe != "none":
                    for line in rig.l2_start_probe(args.probe)["lines"]:
                        print(line)
                elif rig.l2 == "oracle":
                    print(rig.l2_ready_line)
            print("timings: " + ", ".join(f"{k}={v:.2f}s" for k, v in rig.timings.items()))
            sys.stdout.flush()
            if args.interact:
                rig.run("stty echo")
                print("-- L1 console (prompt 'qi# '; qintrospect is on PATH); Ctrl-] leaves and tears down --")
                sys.stdout.flush()
                rig.console.logfile_read = None
                rig._console_sock.sendall(b"\n")
                _interact(rig._console_sock)
            else:
                print("Ctrl-C to stop.")
                while True:
                    signal.pause()
    except KeyboardInterrupt:
        print("\nstopping")
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
