"""An attached VM: its connections (a monitor, maybe a gdbstub, the local QEMU process), what the
VM is (its vCPUs' registers, its RAM map) and where its memory is read, put together from a
source: the VM's own sockets (connect.sources.SocketSource), or a gdb already attached to it
(qintrospect/gdb.py). The commands (qintrospect.commands) read through it.

Attaching changes the run state only as runguard allows (a gdb connection, or a pause for one
consistent view); leaving undoes only that: see runguard.RunGuard. The methods that name a
command (translate, find_cr3, ...: commands.api) are the Python API: each calls that
command's function.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import List, Optional

from .. import paging
from ..commands.api import Commands
from ..errors import UsageError, VMGoneError
from ..machine.rammap import RamMap
from ..memory.guest import PageCache
from ..memory.host import HostProcess
from ..record import replace


class Session(Commands):
    """`with attach(qmp=..., gdb=...) as vm: vm.translate(0x7f...)`; see attach(). The
    commands as methods (the Python API) come from commands.api.Commands."""

    def __init__(self, qmp: str = None, gdb: Optional[str] = None, pid: Optional[int] = None,
                 vcpu: int = 0, via: str = "auto", allow_remote: bool = False,
                 timeout: float = 5.0, freeze: bool = False, monitor=None, source=None):
        """qmp, gdb: the VM's QMP socket and gdbstub; or, with monitor (a callable returning
        a connected object with QmpMonitor's command/hmp/close, e.g. a monitor through
        libvirt), qmp is only a label for messages and the run-state marker. source: where
        all of it comes from, when it is not the VM's own sockets (qi inside gdb)."""
        if via not in ("auto", "gdb", "direct", "qmp"):
            raise UsageError(f"--via {via!r}: expected auto, gdb, direct or qmp")
        if vcpu < 0:
            raise UsageError(f"--vcpu {vcpu}: vCPU numbers start at 0")
        if source is None:
            from .sources import SocketSource
            source = SocketSource(qmp, gdb, pid, via, allow_remote, timeout, freeze, monitor)
        self.source = source
        self.vcpu, self.via, self.timeout = vcpu, via, timeout
        self.requested_pid = pid
        self.qmp = None                      # the monitor (QMP, libvirt's, gdb's `monitor`)
        self.gdb = None                      # our gdbstub connection (connect.gdbstub.GdbStub)
        self.guard = None                    # the run state: pause, resume, lock, marker
        self.facts = None                    # machine.vcpus.Vcpus: the vCPUs, QOM, query-kvm
        self.vcpu_info: list = []            # registers of each vCPU (machine.cpu.Vcpu)
        self.registers_source = "vcpu"       # "kvm-vcpu": the selected one's, from KVM's
        self._own_registers = None           # what use_registers replaced (own_registers)
        self.cpu: Optional[paging.CpuState] = None
        self.page1gb_source = ""             # where CpuState.page1gb came from
        self.ram_map: Optional[RamMap] = None
        self.process: Optional[HostProcess] = None
        self.process_note = ""
        self.memory = None                   # memory.guest.PhysicalMemory
        self.gdb_note = ""
        self.timings = {}
        self.unreadable_tables: List[tuple] = []
        self.warnings: List[str] = []

    # ---- attach / detach ------------------------------------------------------------------

    def __enter__(self) -> "Session":
        if self.memory is None:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "Session":
        t0 = time.perf_counter()
        try:
            self.qmp = self.source.monitor()
            self.guard = self.source.hold(self)
            self.source.attach(self)         # vCPUs, registers, RAM map, process, memory
            vcpu = self.vcpu_info[self.vcpu]
            page1gb, self.page1gb_source = self.facts.page1gb(vcpu, self.process is not None)
            self.cpu = _with_page1gb(self.cpu, page1gb)
            # from here, what is read relies on the VM staying paused (ours or found so), or,
            # for a VM that runs while we read, on its not resetting: the guard watches
            self.guard.begin()
        except BaseException:
            self.close()
            raise
        self.timings["attach"] = time.perf_counter() - t0
        return self

    def close(self, hold: bool = False) -> None:
        """Leave the VM as found: the source's own connections closed (the gdbstub's memory
        mode put back), and our own pause (only ours, and only if nobody resumed the VM
        since) undone through the monitor; sockets closed (runguard.RunGuard's rules).

        hold=True keeps our pause (a nested translation holds an inner VM still while it
        walks the outer one); resume_held() then ends it."""
        # While we clean up, a second Ctrl-C or SIGTERM must not cut the restore short.
        old_int = _block_signal(signal.SIGINT)
        old_term = _block_signal(signal.SIGTERM)
        try:
            self.source.detach(self)
            if self.guard is not None:
                self.guard.leave(hold)
                self.guard.close_monitor()
            elif self.qmp is not None:
                self.qmp.close()
            self.qmp = None
            if self.process is not None:
                self.process.close()
            self.memory = None
        finally:
            _restore_signal(signal.SIGINT, old_int)
            _restore_signal(signal.SIGTERM, old_term)

    def resume_held(self) -> None:
        """After close(hold=True): end our pause, as close() would have."""
        if self.guard is not None:
            self.guard.resume_held()

    # ---- a shell's session between commands -------------------------------------------------

    def take_lock(self) -> None:
        """(A shell, before a command) hold this VM's lock again; see release_lock()."""
        if self.guard is not None:
            self.guard.take_lock()

    def release_lock(self) -> None:
        """(A shell, between commands) let another qintrospect work on this VM."""
        if self.guard is not None:
            self.guard.release_lock()

    def refresh(self) -> None:
        """For a session that lives across commands (a shell): read every vCPU's registers
        again, since the VM may have run in between (and the RAM map, when it may have
        changed: the source says when). Table pages are never cached across commands."""
        self.check_open()
        self.source.refresh(self)
        self.registers_source, self._own_registers = "vcpu", None
        page1gb = getattr(self.cpu, "page1gb", None)
        self.cpu = _with_page1gb(self.facts.cpu_state(self.vcpu_info[self.vcpu]), page1gb)

    def select_vcpu(self, index: int) -> None:
        """Use vCPU `index`'s registers from now on."""
        self.check_open()
        if not 0 <= index < len(self.vcpu_info):
            raise UsageError(f"vCPU {index}: this VM has {len(self.vcpu_info)} vCPU(s), "
                             f"numbered 0-{len(self.vcpu_info) - 1}")
        self.vcpu = index
        if self.gdb is not None:
            self.gdb.select_vcpu(index)
        page1gb, self.page1gb_source = self.facts.page1gb(self.vcpu_info[index],
                                                          self.process is not None)
        self.cpu = _with_page1gb(self.facts.cpu_state(self.vcpu_info[index]), page1gb)

    def use_registers(self, registers, source: str = "kvm-vcpu") -> None:
        """Translate with these registers in place of the selected vCPU's, for this command:
        a vCPU the guest's own KVM holds (guestos.kvm_arm64.registers, source "kvm-vcpu"), or
        a VM's stage 2 given by its root (commands.stage2_scan.registers_for, "stage2")."""
        self.check_open()
        if self._own_registers is None:
            self._own_registers = (self.vcpu, self.vcpu_info[self.vcpu], self.cpu,
                                   self.registers_source)
        self.vcpu_info[self.vcpu] = registers
        self.cpu = self.facts.cpu_state(registers)
        self.registers_source = source

    def own_registers(self) -> None:
        """Back to the vCPU's own registers after a command that used others (use_registers):
        a shell's next command translates as the vCPU again, even with the VM held paused
        (its registers are then not read again)."""
        if self._own_registers is not None:
            index, registers, cpu, self.registers_source = self._own_registers
            self.vcpu_info[index] = registers
            if self.vcpu == index:
                self.cpu = cpu
            self._own_registers = None

    # ---- what the commands read through ----------------------------------------------------

    @property
    def found_status(self) -> Optional[dict]:
        """query-status as found at attach."""
        return self.guard.found if self.guard is not None else None

    @property
    def stopped(self) -> bool:
        """The VM is paused while we look (by us, or found so, and watched for a resume):
        cached table pages stay valid."""
        return self.guard is not None and self.guard.stable

    @property
    def live(self) -> bool:
        """The VM runs while we read (no gdb, no --freeze): it may reset under us."""
        return self.guard is not None and self.guard.live

    def check_live(self, final: bool = False) -> None:
        """Raise VMGoneError if what was read since the command began no longer holds
        together: a VM that ran reset or shut down, or a paused one was resumed by someone
        else (runguard). For a running VM QEMU is asked (a round trip brings every earlier
        event); for a paused one only what already arrived is looked at, unless final (the
        command's last look)."""
        if self.guard is not None:
            self.guard.check(sync=final or self.guard.live)

    def check_open(self) -> None:
        if self.memory is None:
            raise VMGoneError("the session is not attached")

    def cpu_state(self, cr3: Optional[int] = None) -> paging.CpuState:
        self.check_open()
        if cr3 is None:
            return self.cpu
        return paging.with_root(self.cpu, cr3)

    def read_phys(self, gpa: int, length: int) -> bytes:
        self.check_open()
        return self.memory.read(gpa, length)

    def cached_memory(self):
        """Memory with a whole-page cache in front, when the VM cannot change it meanwhile."""
        return PageCache(self.memory) if self.stopped else self.memory

    @contextlib.contextmanager
    def page_cache(self):
        """A whole-page cache in front of guest memory for a batch of walks, when the VM
        cannot run meanwhile (a running VM may change its tables under us: no cache then)."""
        if not self.stopped or isinstance(self.memory, PageCache):
            yield
            return
        inner = self.memory
        self.memory = PageCache(inner)
        try:
            yield
        finally:
            self.memory = inner

    @property
    def kvm_enabled(self) -> Optional[bool]:
        """Whether the VM runs under KVM (QMP query-kvm); None if QEMU will not say."""
        return self.facts.kvm_enabled

    def vcpu_property(self, prop: str):
        """A QOM property of the session's vCPU (e.g. a CPUID feature name), or None."""
        return self.facts.qom(self.vcpu_info[self.vcpu], prop)

    def device_region(self, gpa: int) -> Optional[str]:
        """What QEMU's memory map has at a GPA that is not RAM (a device, or nothing); None
        for RAM."""
        return None if self.ram_map.ram_at(gpa) is not None else self.ram_map.describe(gpa)

    def describe(self) -> dict:
        from .qmp import describe_address
        src = self.source
        gdb = getattr(src, "gdb_address", None)
        return {"qmp": src.label, "gdb": (describe_address(gdb) if gdb else None)
                if self.gdb is not None or not self.gdb_note else None,
                "gdb_note": self.gdb_note or None,
                "status_found": self.found_status.get("status") if self.found_status else None,
                "vcpu": self.vcpu, "vcpus": len(self.vcpu_info),
                "qemu_pid": self.process.pid if self.process else None,
                "process_note": self.process_note, "memory_path": self.memory.name
                if self.memory else None,
                "page1gb": getattr(self.cpu, "page1gb", None),
                "page1gb_source": self.page1gb_source or None}

def attach(qmp: str, gdb: Optional[str] = None, **options) -> Session:
    """Open a session on a running QEMU VM. Use it as a context manager:

        with qintrospect.attach(qmp="/run/vm/qmp.sock", gdb="127.0.0.1:1234") as vm:
            t = vm.translate(0x7f12345673e8)

    Options: pid (the QEMU process, found from the socket's peer otherwise), vcpu (default 0),
    via ("auto", "gdb", "direct", "qmp"), allow_remote, timeout (seconds for every socket
    exchange), freeze (without gdb: pause the VM while attached). With gdb the VM is stopped
    while attached; without gdb (registers through QMP) it keeps running unless freeze. Either
    way it is left as found on exit.
    """
    return Session(qmp, gdb, **options).open()


def _with_page1gb(cpu, page1gb):
    """An x86 state with Page1GB as the walking processor applies it (aarch64: unchanged)."""
    return replace(cpu, page1gb=page1gb) if paging.is_x86(cpu) else cpu


def _block_signal(signum):
    try:
        return signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread
        return None


def _restore_signal(signum, old) -> None:
    if old is not None:
        try:
            signal.signal(signum, old)
        except ValueError:
            pass
