"""Boot the RISC-V oracle guest in QEMU and read what its CPU and QEMU say.

    from vm.oracle_riscv.boot import OracleRiscvVM
    with OracleRiscvVM("sv39", workdir) as vm:      # builds the image, boots, waits for DONE
        vm.results                                  # [AccessResult]: every probe x kind
        vm.result("u-rw", "r")                      # one of them
        vm.pte("a0-d0")                             # its leaf PTE before and after the probes
        vm.hmp("info mem"); vm.gva2gpa(va); vm.read_phys(pa, n)

QEMU (`qemu-system-riscv64 -M virt -cpu <the scenario's> -m 1G -bios none -kernel <elf>`, TCG,
no display) runs with the gdbstub on 127.0.0.1:<free port> (vm.gdb_address) and two QMP
monitors on Unix sockets in `workdir`: vm.qmp_path is left free for the tool under test (a QMP
socket takes one client at a time), vm.own_qmp_path is the one this helper talks to. Only
read-only monitor commands are used (`xp`, `info registers`, `info mem`, `gva2gpa`), though
QEMU 7.2's gva2gpa may set A bits (README.md).

The guest writes its answers to RAM (vm/oracle_riscv/image.py): this helper polls the magic word
with HMP `xp` until DONE (raises OracleRiscvError on EXCEPTION, with mcause/mepc/mtval, or on
timeout; FeatureMissing when QEMU refuses the scenario's -cpu or the guest's satp/menvcfg write
did not stick), then decodes the slots into AccessResult records.

By hand:  python -m vm.oracle_riscv.boot sv39 [--wait]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from vm.oracle.boot import QMP, OracleError, free_port

from . import image as I
from .layout import ECALL, FRAMES, FRAMES_SIZE, KINDS, PTE_A, PTE_D, SLOT, Probe, Scenario
from .scenarios import SCENARIOS

QEMU = os.environ.get("QI_QEMU_RISCV64", "qemu-system-riscv64")
MEMORY = "1G"


class OracleRiscvError(OracleError):
    pass


class FeatureMissing(OracleRiscvError):
    """QEMU refused the scenario's -cpu, or the hart dropped its satp mode or menvcfg value."""


@dataclass(frozen=True)
class AccessResult:
    """One answer of the guest's CPU: one kind of access to one probe's VA."""
    name: str                  # the probe (Probe.name)
    va: int
    kind: str                  # layout.KINDS: R W X r w x R+sum W+sum X+sum R+mxr r+mxr R+sum+mxr
    access: str                # load, store, fetch
    mode: str                  # S, U
    outcome: str               # ok, page-fault, access-fault, cause-<n>, not-run
    cause: Optional[int]       # the mcause it trapped with (a fetch always traps: 8/9 is ok)
    tval: Optional[int]        # mtval, when it trapped
    value: Optional[int]       # load: the 8 bytes read; store: the 8 bytes written
    raw: Tuple[int, int]       # the slot: (status, value)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def pa(self) -> Optional[int]:
        """The PA a load read, from the FRAMES word's high half (None elsewhere)."""
        if self.access != "load" or not self.ok or self.value & 0xFFFFFFFF != ECALL:
            return None
        pa = self.value >> 32
        return pa | (self.va & 7) if FRAMES <= pa < FRAMES + FRAMES_SIZE else None


def decode(name: str, va: int, kind: str, status: int, value: int) -> AccessResult:
    k = KINDS[kind]
    if status == I.NOT_RUN:
        return AccessResult(name, va, kind, k.access, k.mode, "not-run", None, None, None,
                            (status, value))
    if k.access != "fetch" and status == 0:
        return AccessResult(name, va, kind, k.access, k.mode, "ok", None, None, value,
                            (status, value))
    if status == k.ok_cause:
        outcome = "ok"
    elif status == k.page_fault:
        outcome = "page-fault"
    elif status == k.access_fault:
        outcome = "access-fault"
    else:
        outcome = f"cause-{status}"
    return AccessResult(name, va, kind, k.access, k.mode, outcome, status, value, None,
                        (status, value))


@dataclass(frozen=True)
class PteChange:
    """A probe's PTE (where the walk ends: its leaf, or the PTE that stops it) around the probes."""
    address: int               # 0: none (a non-canonical VA)
    before: int
    after: int

    @property
    def set_bits(self) -> int:
        return self.after & ~self.before

    @property
    def cleared_bits(self) -> int:
        return self.before & ~self.after

    @property
    def ad(self) -> str:
        """"", "A", "D" or "AD": the A/D bits after the probes."""
        return ("A" if self.after & PTE_A else "") + ("D" if self.after & PTE_D else "")


def _u64(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off:off + 8], "little")


class OracleRiscvVM:
    """One QEMU running the RISC-V oracle guest in one scenario."""

    def __init__(self, scenario: Union[str, Scenario], workdir: str, cpu: Optional[str] = None,
                 memory: str = MEMORY, timeout: float = 30.0,
                 extra_args: Optional[List[str]] = None, elf: Optional[str] = None):
        self.scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
        self.name = self.scenario.name
        self.workdir = workdir
        self.cpu = cpu or self.scenario.cpu
        self.memory = memory
        self.timeout = timeout
        self.extra_args = extra_args or []
        self.proc: Optional[subprocess.Popen] = None
        self.qmp: Optional[QMP] = None
        self.qmp_path = os.path.join(workdir, f"qmp-rv-{self.name}.sock")
        self.own_qmp_path = os.path.join(workdir, f"qmp-rv-oracle-{self.name}.sock")
        self.log_path = os.path.join(workdir, f"qemu-rv-{self.name}.log")
        self.elf = elf                # None: build the scenario's image into workdir
        self.image: Optional[I.Image] = None
        self.gdb_port: Optional[int] = None
        self.boot_seconds: Optional[float] = None
        self.header: Dict[str, int] = {}
        self.results: List[AccessResult] = []
        self.ptes: Dict[str, PteChange] = {}
        self._page_cache: Dict[int, bytes] = {}

    @property
    def gdb_address(self) -> str:
        return f"127.0.0.1:{self.gdb_port}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def probes(self) -> tuple:
        return self.scenario.all_probes()

    # -- life cycle --
    def __enter__(self) -> "OracleRiscvVM":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> "OracleRiscvVM":
        if shutil.which(QEMU) is None:
            raise OracleRiscvError(f"{QEMU} not found (apt-get install qemu-system-misc)")
        self.image = I.build(self.scenario)
        if self.elf is None:
            os.makedirs(self.workdir, exist_ok=True)
            self.elf = self.image.write_elf(
                os.path.join(self.workdir, f"oracle-riscv-{self.name}.elf"))
        for attempt in range(3):       # the free port may be taken between probe and bind
            self.gdb_port = free_port()
            for p in (self.qmp_path, self.own_qmp_path):
                if os.path.exists(p):
                    os.unlink(p)
            args = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                    "-M", "virt", "-accel", "tcg", "-cpu", self.cpu, "-m", self.memory,
                    "-bios", "none", "-kernel", self.elf, "-serial", "none", "-monitor", "none",
                    "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                    "-chardev", f"socket,id=oracleqmp,path={self.own_qmp_path},server=on,wait=off",
                    "-mon", "chardev=oracleqmp,mode=control",
                    "-gdb", f"tcp:127.0.0.1:{self.gdb_port}"] + self.extra_args
            t0 = time.monotonic()
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
            try:
                self._connect(t0)
                break
            except OracleRiscvError:
                err = self._log()
                self.close()
                if "Address already in use" in err and attempt < 2:
                    continue
                if re.search(r"Property '[^']*' not found|can't apply global", err):
                    raise FeatureMissing(f"{self.name}: QEMU refuses -cpu {self.cpu}: "
                                         f"{err.strip()}") from None
                raise
        try:
            self._wait_done(t0)
        except BaseException:
            self.close()
            raise
        return self

    def _log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def _connect(self, t0: float):
        deadline = t0 + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise OracleRiscvError(f"QEMU exited ({self.proc.returncode}):\n{self._log()}")
            if os.path.exists(self.own_qmp_path):
                try:
                    self.qmp = QMP(self.own_qmp_path)
                    return
                except (OSError, OracleError):
                    pass
            if time.monotonic() > deadline:
                raise OracleRiscvError(f"no QMP socket within {self.timeout}s:\n{self._log()}")
            time.sleep(0.005)

    def _wait_done(self, t0: float):
        deadline = t0 + self.timeout
        while True:
            magic = self._header_word(I.MAGIC)
            if magic in (I.MAGIC_DONE, I.MAGIC_EXCEPTION, I.MAGIC_SKIP):
                break
            if self.proc.poll() is not None:
                raise OracleRiscvError(f"QEMU exited ({self.proc.returncode}) before DONE:\n"
                                       f"{self._log()}")
            if time.monotonic() > deadline:
                raise OracleRiscvError(
                    f"{self.name}: the guest did not finish within {self.timeout}s (magic "
                    f"{magic:#x}, progress {self._header_word(I.PROGRESS):#x}); registers:\n"
                    f"{self.hmp('info registers')}")
            time.sleep(0.005)
        self.boot_seconds = time.monotonic() - t0
        head = self.read_phys(I.DATA, I.HEADER_SIZE)
        self.header = {name: _u64(head, off) for name, off in I.HEADER.items()}
        h = self.header
        if magic == I.MAGIC_SKIP:
            what = I.SKIP_REASONS.get(h["skip"], h["skip"])
            want = self.image.built.satp if what == "satp" else self.scenario.menvcfg
            raise FeatureMissing(f"{self.name}: the hart did not take {what} = {want:#x} "
                                 f"(reads back {h[what]:#x})")
        if magic == I.MAGIC_EXCEPTION:
            p = h["progress"]
            raise OracleRiscvError(
                f"{self.name}: unexpected trap in the guest at probe {p >> 8} slot {p & 0xFF}: "
                f"mcause={h['mcause']:#x} mepc={h['mepc']:#x} mtval={h['mtval']:#x}")
        self._decode()

    def _header_word(self, off: int) -> int:
        return int.from_bytes(self._xp(I.DATA + off, 8), "little")

    def _decode(self):
        probes = self.probes
        raw = self.read_phys(I.DATA + I.RESULTS, I.RESULT_SIZE * len(probes))
        out = []
        for i, p in enumerate(probes):
            base = I.RESULT_SIZE * i
            for kind in (k for k in KINDS if k in self.scenario.kinds):
                if KINDS[kind].access == "fetch" and not p.exec:
                    continue
                off = base + 16 * SLOT[kind]
                out.append(decode(p.name, p.va, kind, _u64(raw, off), _u64(raw, off + 8)))
            self.ptes[p.name] = PteChange(self.image.built.pte_address(p.va),
                                          _u64(raw, base + I.PTE_BEFORE),
                                          _u64(raw, base + I.PTE_AFTER))
        self.results = out

    def result(self, probe: str, kind: str) -> AccessResult:
        """The answer for probe `probe` (its name) and `kind` (R, W, X, r, w, x, R+sum, ...)."""
        for r in self.results:
            if r.name == probe and r.kind == kind:
                return r
        raise KeyError((probe, kind))

    def probe(self, name: str) -> Probe:
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(name)

    def pte(self, name: str) -> PteChange:
        return self.ptes[name]

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

    # -- QMP / HMP --
    def hmp(self, command: str) -> str:
        return self.qmp.cmd("human-monitor-command", **{"command-line": command})

    def gva2gpa(self, va: int) -> Optional[int]:
        """QEMU's debug translation of `va` (a load at the hart's privilege: S after DONE).
        None if it says Unmapped."""
        text = self.hmp(f"gva2gpa {va:#x}").strip()
        if text.startswith("gpa:"):
            return int(text.split()[1], 16)
        if "Unmapped" in text:
            return None
        raise OracleRiscvError(f"unexpected gva2gpa answer for {va:#x}: {text!r}")

    def info_mem(self) -> List[Tuple[int, int, int, str]]:
        """HMP `info mem` as (vaddr, paddr, size, attrs) rows (attrs: QEMU's `rwxugad`)."""
        rows = []
        for line in self.hmp("info mem").splitlines():
            m = re.match(r"\s*([0-9a-f]{16})\s+([0-9a-f]{16})\s+([0-9a-f]{16})\s+(\S+)\s*$", line)
            if m:
                rows.append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16),
                             m.group(4)))
        return rows

    def registers(self) -> Dict[str, int]:
        """`info registers` as name -> value (pc, mstatus, satp, mepc, ..., x5 and t0 both).
        QEMU 7.2 prints no privilege mode there (gdb's $priv has it)."""
        regs = {}
        for name, value in re.findall(r"\b([a-z][a-z0-9/]*)\s+([0-9a-f]{16})\b",
                                      self.hmp("info registers")):
            for n in name.split("/"):
                regs.setdefault(n, int(value, 16))
        return regs

    def _xp(self, addr: int, length: int) -> bytes:
        """Uncached read through `xp /Nbx` (for the magic word while the guest runs)."""
        text = self.hmp(f"xp /{length}bx {addr:#x}")
        vals = []
        for line in text.splitlines():
            if ":" in line:
                vals += [int(w, 16) for w in line.split(":", 1)[1].split()]
        if len(vals) != length:
            raise OracleRiscvError(f"xp {addr:#x}: {text!r}")
        return bytes(vals)

    def _xp_page(self, page: int) -> bytes:
        if page not in self._page_cache:
            text = self.hmp(f"xp /512gx {page:#x}")
            if "Cannot access memory" in text:
                try:
                    from qintrospect.errors import MemoryReadError
                except ImportError:                  # pragma: no cover
                    raise OracleRiscvError(f"no RAM at {page:#x}") from None
                raise MemoryReadError(f"xp: no RAM at {page:#x}", page)
            words = []
            for line in text.splitlines():
                if ":" in line:
                    words += [int(w, 16) for w in line.split(":", 1)[1].split()]
            if len(words) != 512:
                raise OracleRiscvError(f"xp /512gx {page:#x}: got {len(words)} words")
            self._page_cache[page] = b"".join(w.to_bytes(8, "little") for w in words)
        return self._page_cache[page]

    def read_phys(self, addr: int, length: int) -> bytes:
        """Guest-physical memory through HMP `xp` (read-only), 4 KiB at a time, cached (the
        guest writes nothing after DONE; gva2gpa may: forget())."""
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "sv39"
    with tempfile.TemporaryDirectory() as d, OracleRiscvVM(name, d) as vm:
        print(f"# {name}: done in {vm.boot_seconds:.3f}s; -cpu {vm.cpu}; qmp {vm.qmp_path}; "
              f"gdb {vm.gdb_address}")
        for k in ("misa", "mstatus", "satp", "menvcfg", "pmpaddr0", "pmpcfg0", "a1"):
            print(f"# {k} = {vm.header[k]:#x}")
        for r in vm.results:
            p = vm.probe(r.name)
            want, qemu = p.expected(r.kind), p.qemu_expected(r.kind)
            mark = "" if r.outcome == want else (
                "   <-- spec: " + want + ("" if r.outcome == qemu else " (not the recorded QEMU"
                                         f" answer {qemu})"))
            extra = f" pa={r.pa:#x}" if r.pa is not None else ""
            print(f"{r.name:24} {r.va:#20x} {r.kind:10} {r.outcome:13}{extra} "
                  f"raw=({r.raw[0]:#x}, {r.raw[1]:#x}){mark}")
        for n, c in vm.ptes.items():
            if c.address:
                print(f"# pte {n:24} @{c.address:#x} {c.before:#018x} -> {c.after:#018x}")
        if "--wait" in argv:
            input("# VM running; press Enter to quit ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
