"""An oracle guest that writes its answers to RAM and parks: what vm/oracle_arm64 and
vm/oracle_riscv share.

QEMU (`-M virt -accel tcg -cpu <cpu> -m <memory>`, no display, no serial, `-kernel` the
scenario's image) runs with the gdbstub and two QMP sockets (vm/oracle/boot.py's QemuVM). The
guest prints nothing: it writes a header and one result per probe at `data` in RAM, its magic
word last, and parks. RamOracleVM polls that word with HMP `xp` until DONE, EXCEPTION or SKIP
(or the timeout), reads the header, then lets the subclass decode the results. Only read-only
monitor commands are used.

A subclass (OracleArm64VM, OracleRiscvVM) supplies only what differs: the class attributes
below (QEMU binary, errors, file names, the header's address, layout and magic words) and

    _build()              make self.elf (and whatever _decode needs) before QEMU starts
    _decode()             the results area -> self.results (after DONE)
    _skip_reason()        FeatureMissing's text (after SKIP)
    _exception_report()   the error's text (after EXCEPTION)
    _progress(word)       the progress word, for the timeout's message
    _refused(log)         optional: a clearer error when QEMU would not start

plus its own readers (registers(), info_mem(), pte(), ...).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

from vm.oracle.boot import QMP, OracleError, QemuVM, wait_for_signal


def u64(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off:off + 8], "little")


class RamOracleVM(QemuVM):
    """One QEMU running a RAM-answering oracle guest in one scenario."""

    # -- what a subclass sets --
    qemu = ""                          # the QEMU binary
    qemu_hint = ""                     # how to get it, for the not-found error
    machine: Sequence[str] = ()        # more QEMU options, before -kernel (e.g. -bios none)
    tag = ""                           # file names: qmp-<tag><scenario>.sock, qemu-<tag>...
    scenarios: Dict[str, object] = {}  # name -> Scenario
    missing = OracleError              # raised on SKIP (FeatureMissing)
    data = 0                           # guest-physical address of the header
    header_size = 0
    header_layout: Dict[str, int] = {}  # name -> offset from data; has "magic" and "progress"
    magic_done = magic_exception = magic_skip = 0

    def __init__(self, scenario, workdir: str, cpu: Optional[str], memory: str,
                 timeout: float, extra_args: Optional[List[str]], elf: Optional[str]):
        self.scenario = self.scenarios[scenario] if isinstance(scenario, str) else scenario
        self.name = self.scenario.name
        super().__init__(self.tag, self.name, workdir, cpu, memory, timeout, extra_args, elf)
        self.header: Dict[str, int] = {}
        self.results: list = []

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def probes(self) -> tuple:
        return self.scenario.all_probes()

    # -- life cycle --
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        if shutil.which(self.qemu) is None:
            raise self.error(f"{self.qemu} not found{self.qemu_hint}")
        self._build()
        t0 = self._launch(self.qemu, ["-M", "virt", "-accel", "tcg", "-cpu", self.cpu,
                                      "-m", self.memory, *self.machine, "-kernel", self.elf,
                                      "-serial", "none", "-monitor", "none"], self._connect)
        try:
            self._wait_done(t0)
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self, t0: float):
        deadline = t0 + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise self.error(f"QEMU exited ({self.proc.returncode}):\n{self._log()}")
            if os.path.exists(self.own_qmp_path):
                try:
                    self.qmp = QMP(self.own_qmp_path)
                    return
                except (OSError, OracleError):
                    pass
            if time.monotonic() > deadline:
                raise self.error(f"no QMP socket within {self.timeout}s:\n{self._log()}")
            time.sleep(0.005)

    def _wait_done(self, t0: float):
        deadline = t0 + self.timeout
        while True:
            magic = self._header_word(self.header_layout["magic"])
            if magic in (self.magic_done, self.magic_exception, self.magic_skip):
                break
            if self.proc.poll() is not None:
                raise self.error(f"QEMU exited ({self.proc.returncode}) before DONE:\n"
                                 f"{self._log()}")
            if time.monotonic() > deadline:
                progress = self._progress(self._header_word(self.header_layout["progress"]))
                raise self.error(
                    f"{self.name}: the guest did not finish within {self.timeout}s (magic "
                    f"{magic:#x}, {progress}); registers:\n{self.hmp('info registers')}")
            time.sleep(0.005)
        self.boot_seconds = time.monotonic() - t0
        head = self.read_phys(self.data, self.header_size)
        self.header = {name: u64(head, off) for name, off in self.header_layout.items()}
        if magic == self.magic_skip:
            raise self.missing(self._skip_reason())
        if magic == self.magic_exception:
            raise self.error(self._exception_report())
        self._decode()

    def _header_word(self, off: int) -> int:
        return int.from_bytes(self._xp(self.data + off, 8), "little")

    # -- the subclass's part --
    def _build(self):
        raise NotImplementedError

    def _decode(self):
        raise NotImplementedError

    def _skip_reason(self) -> str:
        raise NotImplementedError

    def _exception_report(self) -> str:
        raise NotImplementedError

    def _progress(self, word: int) -> str:
        return f"progress {word:#x}"

    # -- answers --
    def result(self, probe: str, kind: str):
        """The answer for probe `probe` (its name) and `kind`."""
        for r in self.results:
            if r.name == probe and r.kind == kind:
                return r
        raise KeyError((probe, kind))

    def probe(self, name: str):
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(name)

    # -- QMP / HMP (read-only; hmp, gva2gpa, read_phys, forget, close: QemuVM) --
    def _xp(self, addr: int, length: int) -> bytes:
        """Uncached read through `xp /Nbx` (for the magic word while the guest runs)."""
        text = self.hmp(f"xp /{length}bx {addr:#x}")
        vals = self._xp_values(text)
        if len(vals) != length:
            raise self.error(f"xp {addr:#x}: {text!r}")
        return bytes(vals)


def by_hand(cls, default: str, show: Callable, argv: Optional[List[str]] = None) -> int:
    """The command line of a boot.py (`python -m vm.oracle_<arch>.boot [scenario] [--wait]`):
    boot the scenario (else `default`) in a temporary directory, show(vm); with --wait keep
    QEMU up until SIGINT or SIGTERM (nohup and closed stdin are fine), then stop it."""
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else default
    with tempfile.TemporaryDirectory() as d, cls(name, d) as vm:
        show(vm)
        if "--wait" in argv:
            wait_for_signal()
    return 0
