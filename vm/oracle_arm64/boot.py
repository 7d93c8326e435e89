"""Boot the AArch64 oracle guest in QEMU and read what its CPU and QEMU say.

    from vm.oracle_arm64.boot import OracleArm64VM
    with OracleArm64VM("4k-48", workdir) as vm:     # builds the image, boots, waits for DONE
        vm.results                                  # [AtResult]: every probe x every kind
        vm.result("ap01", "s1e0w")                  # one of them
        vm.hmp("info registers"); vm.gva2gpa(va); vm.read_phys(pa, n)

QEMU (`qemu-system-aarch64 -M virt -cpu max -m 1G`, TCG, no display, `-kernel` the image) runs
with the gdbstub on 127.0.0.1:<free port> (vm.gdb_address) and two QMP monitors on Unix sockets
in `workdir`: vm.qmp_path is left free for the tool under test (a QMP socket takes one client at
a time), vm.own_qmp_path is the one this helper talks to. Only read-only monitor commands are
used (`xp`, `info registers`, `gva2gpa`, `query-*`).

The guest writes its answers to RAM (vm/oracle_arm64/image.py): this helper polls the magic word
with HMP `xp` until DONE (raises OracleArm64Error on EXCEPTION, with ESR/FAR/ELR, or on timeout;
FeatureMissing when the guest found its CPU lacking a scenario's requirement), then decodes
PAR_EL1 / ESR_EL1 values into AtResult records.

By hand:  python -m vm.oracle_arm64.boot 4k-48 [--wait]
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
from typing import Dict, List, Optional, Union

from vm.oracle.boot import QMP, OracleError, free_port

from . import image as I
from .layout import AT_KINDS, EXEC_KINDS, KINDS, SCENARIOS, Probe, Scenario

QEMU = os.environ.get("QI_QEMU_AARCH64", "qemu-system-aarch64")
CPU = "max"
MEMORY = "1G"


class OracleArm64Error(OracleError):
    pass


class FeatureMissing(OracleArm64Error):
    """The guest's CPU lacks what the scenario needs (the guest checked its ID registers)."""


# ---------------------------------------------------------------------------------------------
# PAR_EL1 and ESR_EL1

#: FST / DFSC / IFSC (6 bits) -> (fault kind, level). Arm ARM: PAR_EL1.FST, ESR_ELx ISS DFSC.
FAULT_CODES: Dict[int, tuple] = {}
for _lvl in range(4):
    FAULT_CODES[0b000000 | _lvl] = ("address-size", _lvl)
    FAULT_CODES[0b000100 | _lvl] = ("translation", _lvl)
    FAULT_CODES[0b001000 | _lvl] = ("access-flag", _lvl)     # level 0: FEAT_LPA2
    FAULT_CODES[0b001100 | _lvl] = ("permission", _lvl)      # level 0: FEAT_LPA2
    FAULT_CODES[0b010100 | _lvl] = ("external-abort-on-walk", _lvl)
FAULT_CODES[0b101001] = ("address-size", -1)
FAULT_CODES[0b101011] = ("translation", -1)
FAULT_CODES[0b010011] = ("external-abort-on-walk", -1)
FAULT_CODES[0b010000] = ("external-abort", None)
FAULT_CODES[0b100001] = ("alignment", None)
FAULT_CODES[0b110000] = ("tlb-conflict", None)

EC_SVC64 = 0x15
EC_IABT_LOWER, EC_IABT_CUR = 0x20, 0x21
PA_MASK = ((1 << 52) - 1) & ~0xFFF          # PAR_EL1.PA: bits[51:12] (bits[51:48]: FEAT_LPA)


def decode_fault(code: int) -> tuple:
    return FAULT_CODES.get(code, (f"fault-{code:#04x}", None))


@dataclass(frozen=True)
class AtResult:
    """One answer of the guest's CPU: an AT instruction's PAR_EL1, or a fetch probe's ESR_EL1."""
    name: str                  # the probe (layout.Probe.name)
    va: int
    kind: str                  # s1e1r s1e1w s1e0r s1e0w s1e1rp s1e1wp exec-el1 exec-el0
    ok: bool
    pa: Optional[int]          # PAR.PA | the VA's offset in its 4 KiB (AT kinds, when ok)
    fst: Optional[int]         # PAR.FST, or ESR.IFSC of an Instruction Abort, when not ok
    level: Optional[int]
    fault_kind: Optional[str]  # translation, address-size, access-flag, permission, ...
    attr: Optional[int]        # PAR.ATTR (the MAIR byte), when ok
    sh: Optional[int]          # PAR.SH, when ok
    ns: Optional[int]          # PAR.NS (UNKNOWN in Non-secure state: informational)
    ptw: Optional[bool]        # PAR.PTW (fault on a stage 2 walk of a stage 1 table: never here)
    s: Optional[bool]          # PAR.S (stage of the fault: always stage 1 here)
    raw: int                   # the PAR_EL1 or ESR_EL1 value

    @property
    def short(self) -> str:
        return {v: k for k, v in KINDS.items()}[self.kind]

    @property
    def outcome(self) -> str:
        """"ok" or "<fault kind>@<level>", as layout.Probe expectations are written."""
        return "ok" if self.ok else f"{self.fault_kind}@{self.level}"


def decode_par(name: str, va: int, kind: str, par: int) -> AtResult:
    if par & 1 == 0:
        return AtResult(name, va, kind, True, (par & PA_MASK) | (va & 0xFFF), None, None, None,
                        par >> 56, par >> 7 & 3, par >> 9 & 1, None, None, par)
    fst = par >> 1 & 0x3F
    fk, lvl = decode_fault(fst)
    return AtResult(name, va, kind, False, None, fst, lvl, fk, None, None, None,
                    bool(par >> 8 & 1), bool(par >> 9 & 1), par)


def decode_exec(name: str, va: int, kind: str, esr: int) -> AtResult:
    ec = esr >> 26 & 0x3F
    if ec == EC_SVC64:
        return AtResult(name, va, kind, True, None, None, None, None, None, None, None, None,
                        None, esr)
    if ec in (EC_IABT_LOWER, EC_IABT_CUR):
        fsc = esr & 0x3F
        fk, lvl = decode_fault(fsc)
        return AtResult(name, va, kind, False, None, fsc, lvl, fk, None, None, None, None, None,
                        esr)
    return AtResult(name, va, kind, False, None, None, None, f"esr-ec-{ec:#x}", None, None, None,
                    None, None, esr)


# ---------------------------------------------------------------------------------------------
# The VM

def _u64(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off:off + 8], "little")


class OracleArm64VM:
    """One QEMU running the AArch64 oracle guest in one scenario."""

    def __init__(self, scenario: Union[str, Scenario], workdir: str, cpu: str = CPU,
                 memory: str = MEMORY, timeout: float = 30.0,
                 extra_args: Optional[List[str]] = None, elf: Optional[str] = None):
        self.scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
        self.name = self.scenario.name
        self.workdir = workdir
        self.cpu = cpu
        self.memory = memory
        self.timeout = timeout
        self.extra_args = extra_args or []
        self.proc: Optional[subprocess.Popen] = None
        self.qmp: Optional[QMP] = None
        self.qmp_path = os.path.join(workdir, f"qmp-a64-{self.name}.sock")
        self.own_qmp_path = os.path.join(workdir, f"qmp-a64-oracle-{self.name}.sock")
        self.log_path = os.path.join(workdir, f"qemu-a64-{self.name}.log")
        self.elf = elf                # None: build the scenario's image into workdir
        self.gdb_port: Optional[int] = None
        self.boot_seconds: Optional[float] = None
        self.header: Dict[str, int] = {}
        self.results: List[AtResult] = []
        self.pan2: bool = False
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
    def __enter__(self) -> "OracleArm64VM":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> "OracleArm64VM":
        if shutil.which(QEMU) is None:
            raise OracleArm64Error(f"{QEMU} not found (apt-get install qemu-system-arm; scripts/setup does)")
        if self.elf is None:
            self.elf = I.build_elf(self.scenario, self.workdir)
        for attempt in range(3):       # the free port may be taken between probe and bind
            self.gdb_port = free_port()
            for p in (self.qmp_path, self.own_qmp_path):
                if os.path.exists(p):
                    os.unlink(p)
            args = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                    "-M", "virt", "-accel", "tcg", "-cpu", self.cpu, "-m", self.memory,
                    "-kernel", self.elf, "-serial", "none", "-monitor", "none",
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
            except OracleArm64Error:
                err = self._log()
                self.close()
                if "Address already in use" in err and attempt < 2:
                    continue
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
                raise OracleArm64Error(f"QEMU exited ({self.proc.returncode}):\n{self._log()}")
            if os.path.exists(self.own_qmp_path):
                try:
                    self.qmp = QMP(self.own_qmp_path)
                    return
                except (OSError, OracleError):
                    pass
            if time.monotonic() > deadline:
                raise OracleArm64Error(f"no QMP socket within {self.timeout}s:\n{self._log()}")
            time.sleep(0.005)

    def _wait_done(self, t0: float):
        deadline = t0 + self.timeout
        while True:
            magic = int.from_bytes(self._xp(I.DATA + I.MAGIC, 8), "little")
            if magic in (I.MAGIC_DONE, I.MAGIC_EXCEPTION, I.MAGIC_SKIP):
                break
            if self.proc.poll() is not None:
                raise OracleArm64Error(f"QEMU exited ({self.proc.returncode}) before DONE:\n"
                                       f"{self._log()}")
            if time.monotonic() > deadline:
                raise OracleArm64Error(
                    f"{self.name}: the guest did not finish within {self.timeout}s (magic "
                    f"{magic:#x}, probe {self._header_word(I.PROGRESS)}); registers:\n"
                    f"{self.hmp('info registers')}")
            time.sleep(0.005)
        self.boot_seconds = time.monotonic() - t0
        head = self.read_phys(I.DATA, I.HEADER_SIZE)
        self.header = {name: _u64(head, off) for name, off in (
            ("magic", I.MAGIC), ("progress", I.PROGRESS), ("id_aa64mmfr0_el1", I.MMFR0),
            ("id_aa64mmfr1_el1", I.MMFR1), ("id_aa64mmfr2_el1", I.MMFR2),
            ("id_aa64pfr0_el1", I.PFR0), ("currentel", I.CURRENTEL), ("midr_el1", I.MIDR),
            ("sctlr_el1", I.SCTLR_RB), ("tcr_el1", I.TCR_RB), ("ttbr0_el1", I.TTBR0_RB),
            ("ttbr1_el1", I.TTBR1_RB), ("mair_el1", I.MAIR_RB), ("pan", I.PAN_RB),
            ("esr", I.EXC_ESR), ("far", I.EXC_FAR), ("elr", I.EXC_ELR), ("spsr", I.EXC_SPSR),
            ("vector", I.EXC_VECTOR), ("skip_index", I.SKIP_INDEX), ("nprobes", I.NPROBES),
            ("pan2", I.PAN2))}
        h = self.header
        if magic == I.MAGIC_SKIP:
            req = self.scenario.requires[h["skip_index"]]
            reg = h[req.reg]
            raise FeatureMissing(
                f"{self.name}: the CPU lacks {req.what}: {req.reg}[{req.shift + 3}:{req.shift}] "
                f"= {reg >> req.shift & 0xF:#x} ({req.reg} = {reg:#x})")
        if magic == I.MAGIC_EXCEPTION:
            raise OracleArm64Error(
                f"{self.name}: unexpected exception in the guest at probe {h['progress']}: "
                f"vector {h['vector'] * 0x80:#x} ESR={h['esr']:#x} (EC {h['esr'] >> 26:#x}) "
                f"FAR={h['far']:#x} ELR={h['elr']:#x} SPSR={h['spsr']:#x}")
        self.pan2 = bool(h["pan2"])
        self.results = self._decode()

    def _header_word(self, off: int) -> int:
        return int.from_bytes(self._xp(I.DATA + off, 8), "little")

    def _decode(self) -> List[AtResult]:
        probes = self.probes
        raw = self.read_phys(I.DATA + I.RESULTS, I.RESULT_SIZE * len(probes))
        out = []
        for i, p in enumerate(probes):
            for slot, short in enumerate(I.SLOTS):
                if short in ("RP", "WP") and not self.pan2:
                    continue
                if short in EXEC_KINDS and not p.exec:
                    continue
                value = _u64(raw, I.RESULT_SIZE * i + 8 * slot)
                kind = KINDS[short]
                out.append(decode_par(p.name, p.va, kind, value) if short in AT_KINDS
                           else decode_exec(p.name, p.va, kind, value))
        return out

    def result(self, probe: str, kind: str) -> AtResult:
        """The answer for probe `probe` (its name) and `kind` (s1e1r... or R, W, r, ...)."""
        kind = KINDS.get(kind, kind)
        for r in self.results:
            if r.name == probe and r.kind == kind:
                return r
        raise KeyError((probe, kind))

    def probe(self, name: str) -> Probe:
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(name)

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
        """QEMU's debug translation of `va` (an EL1 data read with the CPU's PSTATE.PAN, as
        QEMU 7.2 does it). None if it says Unmapped."""
        text = self.hmp(f"gva2gpa {va:#x}").strip()
        if text.startswith("gpa:"):
            return int(text.split()[1], 16)
        if "Unmapped" in text:
            return None
        raise OracleArm64Error(f"unexpected gva2gpa answer for {va:#x}: {text!r}")

    def registers(self) -> Dict[str, int]:
        """`info registers` as NAME -> value (PC, SP, X0.., PSTATE)."""
        text = self.hmp("info registers")
        regs = {}
        for name, value in re.findall(r"\b([A-Z][A-Z0-9_]*)=\s*([0-9a-fA-F]+)\b", text):
            regs.setdefault(name, int(value, 16))
        return regs

    def _xp(self, addr: int, length: int) -> bytes:
        """Uncached read through `xp /Nbx` (for the magic word while the guest runs)."""
        text = self.hmp(f"xp /{length}bx {addr:#x}")
        vals = []
        for line in text.splitlines():
            if ":" in line:
                vals += [int(w, 16) for w in line.split(":", 1)[1].split()]
        if len(vals) != length:
            raise OracleArm64Error(f"xp {addr:#x}: {text!r}")
        return bytes(vals)

    def _xp_page(self, page: int) -> bytes:
        if page not in self._page_cache:
            text = self.hmp(f"xp /512gx {page:#x}")
            if "Cannot access memory" in text:
                try:
                    from qintrospect.errors import MemoryReadError
                except ImportError:                  # pragma: no cover
                    raise OracleArm64Error(f"no RAM at {page:#x}") from None
                raise MemoryReadError(f"xp: no RAM at {page:#x}", page)
            words = []
            for line in text.splitlines():
                if ":" in line:
                    words += [int(w, 16) for w in line.split(":", 1)[1].split()]
            if len(words) != 512:
                raise OracleArm64Error(f"xp /512gx {page:#x}: got {len(words)} words")
            self._page_cache[page] = b"".join(w.to_bytes(8, "little") for w in words)
        return self._page_cache[page]

    def read_phys(self, addr: int, length: int) -> bytes:
        """Guest-physical memory through HMP `xp` (read-only), 4 KiB at a time, cached (the
        guest writes nothing after DONE). Outside RAM: qintrospect.errors.MemoryReadError."""
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
    name = argv[0] if argv else "4k-48"
    with tempfile.TemporaryDirectory() as d, OracleArm64VM(name, d) as vm:
        print(f"# {name}: done in {vm.boot_seconds:.3f}s; qmp {vm.qmp_path}; gdb {vm.gdb_address}")
        for k in ("id_aa64mmfr0_el1", "id_aa64mmfr1_el1", "id_aa64mmfr2_el1", "sctlr_el1",
                  "tcr_el1", "ttbr0_el1", "ttbr1_el1", "mair_el1", "pan"):
            print(f"# {k} = {vm.header[k]:#x}")
        for r in vm.results:
            p = vm.probe(r.name)
            want = p.expected(r.short, bool(vm.scenario.pan))
            mark = "" if r.outcome == want else f"   <-- Arm ARM: {want}"
            extra = (f" pa={r.pa:#x} attr={r.attr:#04x} sh={r.sh}" if r.ok and r.pa is not None
                     else "")
            print(f"{r.name:22} {r.va:#20x} {r.kind:9} {r.outcome:16}{extra} raw={r.raw:#x}{mark}")
        if "--wait" in argv:
            input("# VM running; press Enter to quit ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
