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

The guest writes its answers to RAM (vm/oracle_arm64/image.py): vm/oracle_ram.py's RamOracleVM,
the base of OracleArm64VM, polls the magic word with HMP `xp` until DONE (raises
OracleArm64Error on EXCEPTION, with ESR/FAR/ELR, or on timeout; FeatureMissing when the guest
found its CPU lacking a scenario's requirement), then decodes PAR_EL1 / ESR_EL1 values into
AtResult records.

By hand:  python -m vm.oracle_arm64.boot 4k-48 [--wait]    (--wait: until SIGINT or SIGTERM)
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from vm.oracle.boot import OracleError
from vm.oracle_ram import RamOracleVM, by_hand, u64

from . import image as I
from .layout import AT_KINDS, EXEC_KINDS, KINDS, SCENARIOS, Scenario

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

#: vm.header: name -> offset from image.DATA.
HEADER = {
    "magic": I.MAGIC, "progress": I.PROGRESS, "id_aa64mmfr0_el1": I.MMFR0,
    "id_aa64mmfr1_el1": I.MMFR1, "id_aa64mmfr2_el1": I.MMFR2, "id_aa64pfr0_el1": I.PFR0,
    "currentel": I.CURRENTEL, "midr_el1": I.MIDR, "sctlr_el1": I.SCTLR_RB, "tcr_el1": I.TCR_RB,
    "ttbr0_el1": I.TTBR0_RB, "ttbr1_el1": I.TTBR1_RB, "mair_el1": I.MAIR_RB, "pan": I.PAN_RB,
    "esr": I.EXC_ESR, "far": I.EXC_FAR, "elr": I.EXC_ELR, "spsr": I.EXC_SPSR,
    "vector": I.EXC_VECTOR, "skip_index": I.SKIP_INDEX, "nprobes": I.NPROBES, "pan2": I.PAN2}


class OracleArm64VM(RamOracleVM):
    """One QEMU running the AArch64 oracle guest in one scenario. Its gva2gpa is an EL1 data
    read with the CPU's PSTATE.PAN, as QEMU 7.2 does it; registers() reads `info registers`."""

    qemu = QEMU
    qemu_hint = " (apt-get install qemu-system-arm; scripts/setup does)"
    tag = "a64-"
    scenarios = SCENARIOS
    error = OracleArm64Error
    missing = FeatureMissing
    data = I.DATA
    header_size = I.HEADER_SIZE
    header_layout = HEADER
    magic_done, magic_exception, magic_skip = I.MAGIC_DONE, I.MAGIC_EXCEPTION, I.MAGIC_SKIP

    def __init__(self, scenario: Union[str, Scenario], workdir: str, cpu: str = CPU,
                 memory: str = MEMORY, timeout: float = 30.0,
                 extra_args: Optional[List[str]] = None, elf: Optional[str] = None):
        super().__init__(scenario, workdir, cpu, memory, timeout, extra_args, elf)
        self.pan2: bool = False

    def _build(self):
        if self.elf is None:          # None: build the scenario's image into workdir
            self.elf = I.build_elf(self.scenario, self.workdir)

    def _progress(self, word: int) -> str:
        return f"probe {word}"

    def _skip_reason(self) -> str:
        req = self.scenario.requires[self.header["skip_index"]]
        reg = self.header[req.reg]
        return (f"{self.name}: the CPU lacks {req.what}: {req.reg}[{req.shift + 3}:{req.shift}] "
                f"= {reg >> req.shift & 0xF:#x} ({req.reg} = {reg:#x})")

    def _exception_report(self) -> str:
        h = self.header
        return (f"{self.name}: unexpected exception in the guest at probe {h['progress']}: "
                f"vector {h['vector'] * 0x80:#x} ESR={h['esr']:#x} (EC {h['esr'] >> 26:#x}) "
                f"FAR={h['far']:#x} ELR={h['elr']:#x} SPSR={h['spsr']:#x}")

    def _decode(self):
        self.pan2 = bool(self.header["pan2"])
        probes = self.probes
        raw = self.read_phys(I.DATA + I.RESULTS, I.RESULT_SIZE * len(probes))
        out = []
        for i, p in enumerate(probes):
            for slot, short in enumerate(I.SLOTS):
                if short in ("RP", "WP") and not self.pan2:
                    continue
                if short in EXEC_KINDS and not p.exec:
                    continue
                value = u64(raw, I.RESULT_SIZE * i + 8 * slot)
                kind = KINDS[short]
                out.append(decode_par(p.name, p.va, kind, value) if short in AT_KINDS
                           else decode_exec(p.name, p.va, kind, value))
        self.results = out

    def result(self, probe: str, kind: str) -> AtResult:
        """The answer for probe `probe` (its name) and `kind` (s1e1r... or R, W, r, ...)."""
        return super().result(probe, KINDS.get(kind, kind))

    def registers(self) -> Dict[str, int]:
        """`info registers` as NAME -> value (PC, SP, X0.., PSTATE)."""
        text = self.hmp("info registers")
        regs = {}
        for name, value in re.findall(r"\b([A-Z][A-Z0-9_]*)=\s*([0-9a-fA-F]+)\b", text):
            regs.setdefault(name, int(value, 16))
        return regs


def _show(vm: OracleArm64VM):
    """Every answer, marked where it differs from the Arm ARM."""
    print(f"# {vm.name}: done in {vm.boot_seconds:.3f}s; qmp {vm.qmp_path}; gdb {vm.gdb_address}")
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


def main(argv=None) -> int:
    return by_hand(OracleArm64VM, "4k-48", _show, argv)


if __name__ == "__main__":
    sys.exit(main())
