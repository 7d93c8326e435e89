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

The guest writes its answers to RAM (vm/oracle_riscv/image.py): vm/oracle_ram.py's RamOracleVM,
the base of OracleRiscvVM, polls the magic word with HMP `xp` until DONE (raises
OracleRiscvError on EXCEPTION, with mcause/mepc/mtval, or on timeout; FeatureMissing when QEMU
refuses the scenario's -cpu or the guest's satp/menvcfg write did not stick), then decodes the
slots into AccessResult records.

By hand:  python -m vm.oracle_riscv.boot sv39 [--wait]     (--wait: until SIGINT or SIGTERM)
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from vm.oracle.boot import OracleError
from vm.oracle_ram import RamOracleVM, by_hand, u64

from . import image as I
from .layout import ECALL, FRAMES, FRAMES_SIZE, KINDS, PTE_A, PTE_D, SLOT, Scenario
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


class OracleRiscvVM(RamOracleVM):
    """One QEMU running the RISC-V oracle guest in one scenario. Its gva2gpa is a load at the
    hart's privilege (S after DONE); QEMU 7.2's may set A bits (forget() then)."""

    qemu = QEMU
    qemu_hint = " (apt-get install qemu-system-misc)"
    machine = ("-bios", "none")
    tag = "rv-"
    scenarios = SCENARIOS
    error = OracleRiscvError
    missing = FeatureMissing
    data = I.DATA
    header_size = I.HEADER_SIZE
    header_layout = I.HEADER
    magic_done, magic_exception, magic_skip = I.MAGIC_DONE, I.MAGIC_EXCEPTION, I.MAGIC_SKIP

    def __init__(self, scenario: Union[str, Scenario], workdir: str, cpu: Optional[str] = None,
                 memory: str = MEMORY, timeout: float = 30.0,
                 extra_args: Optional[List[str]] = None, elf: Optional[str] = None):
        super().__init__(scenario, workdir, cpu, memory, timeout, extra_args, elf)
        self.cpu = cpu or self.scenario.cpu
        self.image: Optional[I.Image] = None
        self.ptes: Dict[str, PteChange] = {}

    def _build(self):
        self.image = I.build(self.scenario)
        if self.elf is None:          # None: build the scenario's image into workdir
            os.makedirs(self.workdir, exist_ok=True)
            self.elf = self.image.write_elf(
                os.path.join(self.workdir, f"oracle-riscv-{self.name}.elf"))

    def _refused(self, log: str):
        if re.search(r"Property '[^']*' not found|can't apply global", log):
            raise FeatureMissing(f"{self.name}: QEMU refuses -cpu {self.cpu}: "
                                 f"{log.strip()}") from None

    def _skip_reason(self) -> str:
        h = self.header
        what = I.SKIP_REASONS.get(h["skip"], h["skip"])
        want = self.image.built.satp if what == "satp" else self.scenario.menvcfg
        return f"{self.name}: the hart did not take {what} = {want:#x} (reads back {h[what]:#x})"

    def _exception_report(self) -> str:
        h = self.header
        p = h["progress"]
        return (f"{self.name}: unexpected trap in the guest at probe {p >> 8} slot {p & 0xFF}: "
                f"mcause={h['mcause']:#x} mepc={h['mepc']:#x} mtval={h['mtval']:#x}")

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
                out.append(decode(p.name, p.va, kind, u64(raw, off), u64(raw, off + 8)))
            self.ptes[p.name] = PteChange(self.image.built.pte_address(p.va),
                                          u64(raw, base + I.PTE_BEFORE),
                                          u64(raw, base + I.PTE_AFTER))
        self.results = out

    def pte(self, name: str) -> PteChange:
        return self.ptes[name]

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


def _show(vm: OracleRiscvVM):
    """Every answer, marked where it differs from the spec, and the PTEs around the probes."""
    print(f"# {vm.name}: done in {vm.boot_seconds:.3f}s; -cpu {vm.cpu}; qmp {vm.qmp_path}; "
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


def main(argv=None) -> int:
    return by_hand(OracleRiscvVM, "sv39", _show, argv)


if __name__ == "__main__":
    sys.exit(main())
