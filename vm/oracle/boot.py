"""Boot the oracle guest in QEMU and read what it and QEMU say.

    from vm.oracle.boot import OracleVM
    with OracleVM("pae", workdir) as vm:       # builds (if needed), boots, waits for READY
        out = vm.output                        # parsed ORACLE lines (out.accesses: ACCESS)
        vm.hmp("info tlb"); vm.gva2gpa(va); vm.read_phys(pa, n); vm.cpu_state()

QEMU runs under TCG with `-display none`, the serial port in a file, the gdbstub on
127.0.0.1:<free port> (vm.gdb_address) and two QMP monitors on Unix sockets in `workdir`:
vm.qmp_path is left free for the tool under test (a QMP socket takes one client at a time),
vm.own_qmp_path is the one this helper talks to. Everything here reads the VM through QMP only, with read-only commands (`xp`, `info registers`,
`info tlb`, `gva2gpa`, `qom-get`): never `gpa2hpa`, which writes to the guest page.

QemuVM holds what every oracle VM shares (starting and stopping QEMU, HMP, read_phys through
`xp`): OracleVM here, and vm/oracle_ram.py's RamOracleVM under vm/oracle_arm64 and vm/oracle_riscv.

Also a command line for trying it by hand:
    python -m vm.oracle.boot pae [--wait]   # boots, prints the serial output and QEMU's `info tlb`
                                            # --wait: keeps QEMU up until SIGINT/SIGTERM
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("32bit", "pse", "pae", "4level", "5level")
QEMU = os.environ.get("QI_QEMU", "qemu-system-x86_64")
#: -cpu per mode: 5-level needs la57 (qemu64 has neither la57 nor pdpe1gb). Without pdpe1gb
#: the guest still builds its 1 GiB page and lists it as fault=reserved-bit (as the SDM says).
CPU = {
    "32bit": "qemu64,+pdpe1gb",
    "pse": "qemu64,+pdpe1gb",
    "pae": "qemu64,+pdpe1gb",
    "4level": "qemu64,+pdpe1gb",
    "5level": "qemu64,+pdpe1gb,+la57",
}
#: Enough RAM for the 1 GiB page's frame at 0x40000000 (the guest fills its first 8 bytes).
MEMORY = "1152M"


class OracleError(Exception):
    pass


def cache_dir() -> str:
    base = os.environ.get("QI_VM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "qintrospect", "vm")
    return os.path.join(base, "oracle")


def build(outdir: Optional[str] = None) -> str:
    """Run build.sh (idempotent) and return the path of oracle.elf."""
    args = [os.path.join(HERE, "build.sh")] + ([outdir] if outdir else [])
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise OracleError(f"vm/oracle/build.sh failed ({res.returncode}):\n{res.stderr}")
    return res.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The guest's output

@dataclass(frozen=True)
class MapLine:
    va: int
    pa: Optional[int]        # None for a fault line
    size: int                # page size; for a fault line the span of the faulting entry
    w: bool
    u: bool
    x: bool
    fault: str               # "none", "not-present", "reserved-bit"
    name: str


@dataclass(frozen=True)
class Probe:
    va: int
    ok: bool
    value: Optional[int]     # the 8 bytes the guest read (little-endian), when ok
    err: Optional[int]       # the #PF error code, when not ok


#: ACCESS kinds, in the guest's order (= qintrospect.paging.model.X86_ACCESS_KINDS).
ACCESS_KINDS = ("supervisor-read", "supervisor-write", "supervisor-execute",
                "user-read", "user-write", "user-execute")
#: Where in the page each kind of access touches (the ACCESS-RUN line says the same).
ACCESS_OFFSET = {"read": 0x0, "write": 0x808, "execute": 0x800}


@dataclass(frozen=True)
class Access:
    """One ACCESS line: what the CPU did for one kind of access to one page under one setting
    of CR0.WP, CR4.SMEP/SMAP/PKE (PKRU) and EFER.NXE (EFLAGS.AC=0 throughout)."""
    va: int                  # the page (as in its MAP line); the access is at va + ACCESS_OFFSET
    kind: str                # one of ACCESS_KINDS
    wp: bool
    smep: bool
    smap: bool
    nxe: bool
    pke: bool
    pkru: Optional[int]      # when pke
    ok: bool
    err: Optional[int]       # the #PF error code, when not ok
    name: str

    @property
    def addr(self) -> int:
        return (self.va + ACCESS_OFFSET[self.kind.split("-")[1]]) & ((1 << 64) - 1)


@dataclass
class OracleOutput:
    info: Dict[str, str] = field(default_factory=dict)
    cpuid: Dict[str, str] = field(default_factory=dict)     # CPUID line: nx, page1gb, ... "0"/"1"
    access_run: Dict[str, str] = field(default_factory=dict)  # ACCESS-RUN (settings run); {} if off
    accesses: List[Access] = field(default_factory=list)
    fills: Dict[int, int] = field(default_factory=dict)    # pa -> 8-byte value written there
    maps: List[MapLine] = field(default_factory=list)
    probes: Dict[int, Probe] = field(default_factory=dict)  # va -> probe
    ready: Dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None


def _kv(text: str) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def parse_output(text: str) -> OracleOutput:
    out = OracleOutput()
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("ORACLE "):
            continue
        kind, _, rest = line[len("ORACLE "):].partition(" ")
        kv = _kv(rest)
        if kind == "INFO":
            out.info = kv
        elif kind == "CPUID":
            out.cpuid = kv
        elif kind == "ACCESS-RUN":
            out.access_run = kv
        elif kind == "ACCESS":
            ok = kv["result"] == "ok"
            out.accesses.append(Access(
                va=int(kv["va"], 16), kind=kv["kind"], wp=kv["wp"] == "1",
                smep=kv["smep"] == "1", smap=kv["smap"] == "1", nxe=kv["nxe"] == "1",
                pke=kv["pke"] == "1", pkru=int(kv["pkru"], 16) if "pkru" in kv else None,
                ok=ok, err=None if ok else int(kv["err"], 16), name=kv.get("name", "")))
        elif kind == "FILL":
            out.fills[int(kv["pa"], 16)] = int(kv["value"], 16)
        elif kind == "MAP":
            out.maps.append(MapLine(
                va=int(kv["va"], 16),
                pa=None if kv["pa"] == "none" else int(kv["pa"], 16),
                size=int(kv["size"], 16),
                w=kv["w"] == "1", u=kv["u"] == "1", x=kv["x"] == "1",
                fault=kv["fault"], name=kv.get("name", "")))
        elif kind == "PROBE":
            va = int(kv["va"], 16)
            ok = kv["result"] == "ok"
            out.probes[va] = Probe(va, ok, int(kv["value"], 16) if ok else None,
                                   None if ok else int(kv["err"], 16))
        elif kind == "READY":
            out.ready = kv
        elif kind == "ERROR":
            out.error = rest
    return out


# ---------------------------------------------------------------------------------------------
# A minimal synchronous QMP client (raw JSON over the Unix socket)

class QMP:
    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise OracleError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise OracleError("QMP connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def cmd(self, name: str, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise OracleError(f"QMP {name}: {reply['error']}")
            # events: ignore

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# QEMU's own answers, parsed

_TLB_RE = re.compile(r"^([0-9a-f]{16}): ([0-9a-f]{16}) ([X-])([G-])([P-])([D-])([A-])([C-])([T-])([U-])([W-])$")
#: info tlb letters, in print order, and the entry bit each one shows.
TLB_LETTERS = (("X", 63), ("G", 8), ("P", 7), ("D", 6), ("A", 5), ("C", 4), ("T", 3),
               ("U", 2), ("W", 1))


@dataclass(frozen=True)
class TlbLine:
    va: int
    frame: int     # exactly as printed: QEMU's mask may leave NX/high bits in (see FACTS)
    flags: str     # the 9 letters as printed, e.g. "X--DA--UW"


def parse_info_tlb(text: str) -> List[TlbLine]:
    lines = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        m = _TLB_RE.match(raw)
        if not m:
            raise OracleError(f"unexpected `info tlb` line: {raw!r}")
        lines.append(TlbLine(int(m.group(1), 16), int(m.group(2), 16), "".join(m.groups()[2:])))
    return lines


def tlb_letters(entry: int, leaf_level: int) -> str:
    """The letters `info tlb` prints for a leaf entry (it clears bit 7 of a 4 KiB PTE: PAT)."""
    out = []
    for letter, bit in TLB_LETTERS:
        on = bool(entry >> bit & 1)
        if letter == "P" and leaf_level == 1:
            on = False
        out.append(letter if on else "-")
    return "".join(out)


class QemuVM:
    """What the oracle VMs share (OracleVM here, vm/oracle_ram.py's RamOracleVM): one QEMU
    (self.proc, its output in self.log_path) with the gdbstub on 127.0.0.1:<free port>
    (gdb_address) and two QMP monitors on Unix sockets in `workdir`: qmp_path is left free for
    the tool under test (a QMP socket takes one client at a time), own_qmp_path is the one this
    helper talks to (self.qmp), with read-only commands only. A subclass starts QEMU with
    _launch() and sets `error`, the OracleError it raises."""

    error = OracleError

    def __init__(self, tag: str, name: str, workdir: str, cpu: Optional[str], memory: str,
                 timeout: float, extra_args: Optional[List[str]], elf: Optional[str]):
        self.workdir = workdir
        self.cpu = cpu
        self.memory = memory
        self.timeout = timeout
        self.elf = elf
        self.extra_args = extra_args or []
        self.proc: Optional[subprocess.Popen] = None
        self.qmp: Optional[QMP] = None
        self.qmp_path = os.path.join(workdir, f"qmp-{tag}{name}.sock")
        self.own_qmp_path = os.path.join(workdir, f"qmp-{tag}oracle-{name}.sock")
        self.log_path = os.path.join(workdir, f"qemu-{tag}{name}.log")
        self.gdb_port: Optional[int] = None
        self.boot_seconds: Optional[float] = None
        self._page_cache: Dict[int, bytes] = {}

    @property
    def gdb_address(self) -> str:
        return f"127.0.0.1:{self.gdb_port}"

    def _launch(self, qemu: str, machine: Sequence[str], ready: Callable[[float], None],
                files: Sequence[str] = ()) -> float:
        """Run `qemu -nodefaults ... <machine> <the monitors, the gdbstub> <extra_args>` and
        ready(t0) until it returns; t0 (when QEMU started) then. `files` (the QMP sockets and
        these) are removed first. If ready() raises an OracleError QEMU is stopped, and started
        again on a new port if the gdbstub's was taken between free_port() and QEMU's bind;
        else _refused(the log) may raise a plainer error, and ready()'s is raised."""
        attempt = 0
        while True:
            attempt += 1
            self.gdb_port = free_port()
            for p in (self.qmp_path, self.own_qmp_path, *files):
                if os.path.exists(p):
                    os.unlink(p)
            args = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                    *machine,
                    "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                    "-chardev", f"socket,id=oracleqmp,path={self.own_qmp_path},server=on,wait=off",
                    "-mon", "chardev=oracleqmp,mode=control",
                    "-gdb", f"tcp:127.0.0.1:{self.gdb_port}"] + self.extra_args
            t0 = time.monotonic()
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
            try:
                ready(t0)
                return t0
            except OracleError:
                err = self._log()
                self.close()
                if "Address already in use" in err and attempt < 3:
                    continue
                self._refused(err)
                raise

    def _refused(self, log: str):
        """After QEMU failed to come up (not for a taken port): raise a clearer error, if any."""

    def _log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def close(self):
        if self.qmp is not None:
            try:
                self.qmp.cmd("quit")
            except (OracleError, OSError):
                pass
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    # -- QMP / HMP (read-only) --
    def hmp(self, command: str) -> str:
        return self.qmp.cmd("human-monitor-command", **{"command-line": command})

    def gva2gpa(self, va: int) -> Optional[int]:
        """QEMU's debug translation of `va` (how each target walks: its class's docstring).
        None if it says Unmapped."""
        text = self.hmp(f"gva2gpa {va:#x}").strip()
        if text.startswith("gpa:"):
            return int(text.split()[1], 16)
        if "Unmapped" in text:
            return None
        raise self.error(f"unexpected gva2gpa answer for {va:#x}: {text!r}")

    @staticmethod
    def _xp_values(text: str) -> List[int]:
        """The numbers of an `xp` answer (lines `address: value value ...`)."""
        values = []
        for line in text.splitlines():
            if ":" in line:
                values += [int(w, 16) for w in line.split(":", 1)[1].split()]
        return values

    def _xp_page(self, page: int) -> bytes:
        if page not in self._page_cache:
            text = self.hmp(f"xp /512gx {page:#x}")
            if "Cannot access memory" in text:
                try:
                    from qintrospect.errors import MemoryReadError
                except ImportError:                  # pragma: no cover
                    raise self.error(f"no RAM at {page:#x}") from None
                raise MemoryReadError(f"xp: no RAM at {page:#x}", page)
            words = self._xp_values(text)
            if len(words) != 512:
                raise self.error(f"xp /512gx {page:#x}: got {len(words)} words:\n{text[:500]}")
            self._page_cache[page] = b"".join(w.to_bytes(8, "little") for w in words)
        return self._page_cache[page]

    def read_phys(self, addr: int, length: int) -> bytes:
        """Guest-physical memory through HMP `xp` (read-only), one 4 KiB page per command,
        cached: call forget() if the guest may have written since. Outside RAM it raises
        qintrospect.errors.MemoryReadError, as a qintrospect ReadPhys must."""
        out = b""
        while length > 0:
            page = addr & ~0xFFF
            off = addr - page
            n = min(length, 0x1000 - off)
            out += self._xp_page(page)[off:off + n]
            addr += n
            length -= n
        return out

    def forget(self):
        self._page_cache.clear()


class _Stop(Exception):
    pass


def wait_for_signal(message: str = "# VM running; Ctrl-C or SIGTERM quits") -> None:
    """Print `message` and return on SIGINT or SIGTERM (the `--wait` of the command lines), so
    that the caller's `with` blocks stop QEMU and remove its files. stdin is not read: under
    nohup or a service it is closed or not a terminal."""
    def stop(signum, frame):
        raise _Stop

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)
           if signal.getsignal(sig) is not signal.SIG_IGN}    # `cmd &` in a script ignores SIGINT
    try:
        print(message, flush=True)
        while True:
            signal.pause()
    except _Stop:
        pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class OracleVM(QemuVM):
    """One QEMU running the oracle guest in one paging mode. Its gva2gpa is QEMU's debug
    walk, which ignores reserved bits."""

    def __init__(self, mode: str, workdir: str, cpu: Optional[str] = None,
                 memory: str = MEMORY, timeout: float = 60.0, elf: Optional[str] = None,
                 extra_args: Optional[List[str]] = None, access: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        super().__init__("", mode, workdir, cpu or CPU[mode], memory, timeout, extra_args, elf)
        self.mode = mode
        self.access = access          # access=on: the guest runs its access checks (ACCESS lines)
        self.serial_path = os.path.join(workdir, f"serial-{mode}.txt")
        self.output: Optional[OracleOutput] = None

    # -- life cycle --
    def __enter__(self) -> "OracleVM":
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> "OracleVM":
        if shutil.which(QEMU) is None:
            raise OracleError(f"{QEMU} not found")
        elf = self.elf or build()
        self._launch(QEMU, ["-accel", "tcg", "-m", self.memory, "-cpu", self.cpu,
                            "-kernel", elf, "-append",
                            f"mode={self.mode} access={'on' if self.access else 'off'}",
                            "-serial", f"file:{self.serial_path}"],
                     self._wait_ready, files=[self.serial_path])
        self.qmp = QMP(self.own_qmp_path)
        return self

    def serial_text(self) -> str:
        try:
            with open(self.serial_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _wait_ready(self, t0: float):
        deadline = t0 + self.timeout
        while True:
            text = self.serial_text()
            if re.search(r"ORACLE READY [^\n]*\n", text):
                self.boot_seconds = time.monotonic() - t0
                self.output = parse_output(text)
                return
            if "ORACLE ERROR" in text and text.endswith("\n"):
                raise OracleError(f"guest reported an error:\n{text}")
            if self.proc.poll() is not None:
                raise OracleError(f"QEMU exited ({self.proc.returncode}) before READY:\n"
                                  f"{self._log()}\nserial:\n{text}")
            if time.monotonic() > deadline:
                raise OracleError(f"no ORACLE READY within {self.timeout}s; serial:\n{text}")
            time.sleep(0.01)

    def wait_halted(self, timeout: float = 30.0):
        """Until the vCPU sits in its final hlt (`info registers` says HLT=1): from then on
        nothing in the guest changes, accessed/dirty bits included."""
        deadline = time.monotonic() + timeout
        while "HLT=1" not in self.hmp("info registers"):
            if time.monotonic() > deadline:
                raise OracleError("the guest printed READY but did not reach hlt")
            time.sleep(0.01)

    # -- QMP / HMP (close, hmp, gva2gpa, read_phys, forget: QemuVM) --
    def info_tlb(self) -> List[TlbLine]:
        return parse_info_tlb(self.hmp("info tlb"))

    def phys_bits(self) -> int:
        cpus = self.qmp.cmd("query-cpus-fast")
        return int(self.qmp.cmd("qom-get", path=cpus[0]["qom-path"], property="phys-bits"))

    def registers(self) -> Dict[str, int]:
        """CR0, CR3, CR4, EFER (and the rest of `info registers` of the form NAME=hex)."""
        text = self.hmp("info registers")
        regs = {}
        for name, value in re.findall(r"\b([A-Z][A-Z0-9]*)=([0-9a-fA-F]+)\b", text):
            regs.setdefault(name, int(value, 16))
        for need in ("CR0", "CR3", "CR4", "EFER"):
            if need not in regs:
                raise OracleError(f"`info registers` has no {need}=:\n{text}")
        return regs

    def cpu_property(self, name: str):
        """qom-get of a property of vCPU 0 (e.g. "pdpe1gb", "phys-bits")."""
        cpus = self.qmp.cmd("query-cpus-fast")
        return self.qmp.cmd("qom-get", path=cpus[0]["qom-path"], property=name)

    def cpu_state(self):
        """qintrospect.paging.model.CpuState from `info registers` and qom-get phys-bits."""
        from qintrospect.paging.model import CpuState
        r = self.registers()
        return CpuState(cr0=r["CR0"], cr3=r["CR3"], cr4=r["CR4"], efer=r["EFER"],
                        maxphyaddr=self.phys_bits())


def main(argv=None) -> int:
    import tempfile
    argv = sys.argv[1:] if argv is None else argv
    mode = argv[0] if argv else "4level"
    with tempfile.TemporaryDirectory() as d, OracleVM(mode, d) as vm:
        print(vm.serial_text(), end="")
        print(f"# booted in {vm.boot_seconds:.3f}s; qmp {vm.qmp_path}; gdb {vm.gdb_address}")
        print(vm.hmp("info tlb"), end="")
        if "--wait" in argv:
            wait_for_signal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
