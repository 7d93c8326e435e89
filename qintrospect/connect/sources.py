"""Where an attached VM's facts come from: its own sockets. QMP (or a monitor reached another
way: libvirt) for the run state, the vCPUs, the RAM map and the QEMU process; a gdbstub for
registers and guest-physical reads when one is given and needed; the QEMU process's memory
once it proves to hold the VM's RAM.

A source does for a Session (connect.session): monitor() connects, hold() takes the run state
(runguard), attach() reads the vCPUs, the RAM map, the process and chooses memory, refresh()
reads them again for a shell, monitor_memory() is QMP `xp`, detach() closes what it opened.
qintrospect/gdb.py has the other source: a gdb already attached.
"""

from __future__ import annotations

from typing import Optional

from ..errors import AttachError, QIError, UsageError
from ..machine.rammap import RamMap
from ..machine.vcpus import Vcpus
from ..memory.guest import DirectMemory, GdbMemory, QmpMemory
from ..memory.host import HostProcess, process_exists, process_start_time
from ..memory.identity import holds_ram
from . import runstate
from .peers import socket_owner
from .qmp import QmpMonitor, describe_address, parse_address
from .runguard import RunGuard


class SocketSource:
    """The VM through its QMP socket (or libvirt's monitor) and, maybe, its gdbstub."""

    via_option = "--via"

    def __init__(self, qmp, gdb: Optional[str], pid: Optional[int], via: str,
                 allow_remote: bool, timeout: float, freeze: bool, monitor=None):
        if via == "gdb" and not gdb:
            raise UsageError("--via gdb needs --gdb")
        self._monitor = monitor
        self.qmp_address = parse_address(qmp, "--qmp", allow_remote) if monitor is None \
            else qmp
        self.gdb_address = parse_address(gdb, "--gdb", allow_remote) if gdb else None
        self.pid, self.via, self.timeout, self.freeze = pid, via, timeout, freeze
        self.key = runstate.vm_key(self.qmp_address, label=monitor is not None)
        self.label = describe_address(self.qmp_address)
        self._memory_size_seen: Optional[tuple] = None   # at attach (refresh() compares)

    # ---- connecting -------------------------------------------------------------------------

    def monitor(self):
        if self._monitor is not None:
            return self._monitor()
        return QmpMonitor(self.qmp_address, self.timeout).connect()

    def hold(self, vm) -> RunGuard:
        """Take the VM's lock, read its run state, write the marker (runguard)."""
        guard = RunGuard(self.monitor, self.key, self._lock_name(vm), self.timeout, vm.warnings)
        guard.attach(vm.qmp)
        return guard

    def _lock_name(self, vm) -> str:
        """The name of this VM's lock (runstate): the QEMU process's where it is known
        (however it is reached: each QMP socket, libvirt), else the monitor's."""
        pid = self.pid
        if pid is None and hasattr(vm.qmp, "peer_pid"):
            pid = vm.qmp.peer_pid()
        return f"qemu-pid:{pid}" if pid else self.key

    def attach(self, vm) -> None:
        vm.facts = Vcpus.of(vm.qmp, vm.vcpu)
        if self.gdb_address is None and self.freeze:
            vm.guard.pause(vm.found_status)   # one consistent view; close() resumes
        vm.ram_map = RamMap.from_qmp(vm.qmp)
        self._memory_size_seen = self._memory_size(vm)
        self._find_process(vm)
        if self.gdb_address is not None and self._gdb_not_needed(vm):
            # registers from QMP, memory from the QEMU process: no gdb, unless a killed
            # session left the stub in physical-memory mode to put back
            self._repair_phys_mode(vm)
            return
        if self.gdb_address is not None:
            from .gdbstub import GdbStub  # (loaded only where a gdbstub is used)
            vm.gdb = GdbStub(self.gdb_address, self.timeout, arch=vm.facts.arch).connect()
            vm.guard.debugger_attached()          # connecting stopped the VM
            # Registers of every vCPU first: selecting a gdb thread makes gdb read memory at
            # its PC, which must happen before memory packets become physical.
            vm.vcpu_info = vm.facts.from_gdbstub(vm.gdb, vm.vcpu)
            vm.cpu = vm.facts.cpu_state(vm.vcpu_info[vm.vcpu])
            self._physical_mode(vm)
            reference = GdbMemory(vm.ram_map, vm.gdb)
        else:
            vm.vcpu_info = vm.facts.from_monitor()
            vm.cpu = vm.facts.cpu_state(vm.vcpu_info[vm.vcpu])
            reference = QmpMemory(vm.ram_map, vm.qmp)
        use_memory(vm, reference, self)

    def _find_process(self, vm) -> None:
        pid, how = self.pid, "--pid" if self._monitor is None else "the monitor's owner"
        if pid is None:
            # our own QMP connection's peer, else the owner of the listening socket (never a
            # second connection: a gdbstub would stop the VM when it accepted it)
            pid = (vm.qmp.peer_pid() if hasattr(vm.qmp, "peer_pid") else None) \
                or (socket_owner(self.qmp_address) if self._monitor is None else None) \
                or (socket_owner(self.gdb_address) if self.gdb_address else None)
            how = "socket peer"
        find_process(vm, pid, how, "the QEMU process was not found (remote sockets?); pass "
                                  "--pid to get host addresses")

    def _gdb_not_needed(self, vm) -> bool:
        """With a gdbstub given (and --via auto): when QEMU is local and its memory readable,
        the walk needs neither gdb nor the stub. The VM is paused through QMP for the command
        (as --freeze does: one consistent view), the registers come from `info registers`, and
        memory from the QEMU process, once it has proved it holds this VM's RAM. Otherwise
        gdb is the way (remote QEMU, another user's, a monitor behind a serial line), and
        for an aarch64 guest's registers, which the monitor does not show."""
        if self.via != "auto" or vm.process is None or vm.facts.arch != "x86_64":
            return False
        vm.guard.pause(vm.found_status)     # close() resumes it
        vm.vcpu_info = vm.facts.from_monitor()
        vm.cpu = vm.facts.cpu_state(vm.vcpu_info[vm.vcpu])
        if not proves_ram(vm, QmpMemory(vm.ram_map, vm.qmp), self):
            return False                        # gdb below; use_memory says why
        vm.memory = DirectMemory(vm.ram_map, vm.process)
        vm.gdb_note = ("the gdbstub was not used: QEMU is local and its memory readable "
                       "(--via gdb uses it)")
        return True

    def _repair_phys_mode(self, vm) -> None:
        """Put back the memory mode a killed session found (it left the stub in mode 1)."""
        mode = vm.guard.phys_mode_inherited
        if mode is None:
            return
        try:
            from .gdbstub import GdbStub
            gdb = GdbStub(self.gdb_address, self.timeout, arch=vm.facts.arch).connect()
        except QIError as exc:
            vm.warnings.append(f"could not put the gdbstub's memory mode back to "
                               f"{mode} ({exc}); it stays noted")
            return
        gdb.physical_mode(restore_to=mode)   # close() puts it back
        gdb.close()
        vm.guard.phys_mode_inherited = None

    def _physical_mode(self, vm) -> None:
        """Switch the gdbstub to physical addresses, after writing down (in the marker) the
        mode to put back: the one found, or the one a killed predecessor found before it."""
        found = vm.gdb.query_phys_mode()
        original = vm.guard.phys_mode_inherited or found
        vm.guard.note_phys_mode(original)       # gdb.close() puts `original` back
        vm.gdb.physical_mode(restore_to=original)

    # ---- the proof that the process holds the VM's RAM, remembered -------------------------

    def proved(self, vm) -> bool:
        """A proof made earlier (runstate), for the very process serving our QMP socket: for
        that process's life and that RAM map the answer cannot change. A failed proof is
        never remembered: it is made again each time."""
        fact = self._fact(vm)
        if fact is not None and runstate.remembered(fact):
            vm.process_note += "; it holds this VM's RAM (proved by an earlier command)"
            return True
        return False

    def remember(self, vm) -> None:
        fact = self._fact(vm)
        if fact is not None:
            try:
                runstate.remember(fact, vm.process.pid)
            except (runstate.RunStateError, OSError):
                pass

    def _fact(self, vm) -> Optional[str]:
        peer = vm.qmp.peer_pid() if hasattr(vm.qmp, "peer_pid") else None
        if peer is None or vm.process is None or peer != vm.process.pid:
            return None
        start = process_start_time(peer)
        if start is None:
            return None
        ram = ";".join(f"{r.start:x}-{r.end:x}:{r.block}@{r.hva:x}" for r in vm.ram_map.ram
                       if r.hva is not None)
        return f"holds-ram qmp={self.key} pid={peer} start={start} ram={ram}"

    # ---- a shell's session, and leaving -----------------------------------------------------

    def monitor_memory(self, vm):
        return QmpMemory(vm.ram_map, vm.qmp)

    def refresh(self, vm) -> None:
        """Every vCPU's registers read again. The RAM map and QEMU's mappings are read again
        when a memory device was plugged or unplugged since (QMP's memory size summary
        changed), and before a look at the range the guest's chipset switches (PAM, SMRAM:
        rammap.SWITCHED); reading them for every command would cost more than the command."""
        size = self._memory_size(vm) if self._memory_size_seen is not None else None
        if size is not None and size != self._memory_size_seen:
            self._reread_ram_map(vm)
            self._memory_size_seen = size
        else:
            vm.ram_map.before_switched = lambda: self._reread_ram_map(vm)
        if vm.gdb is not None:
            vm.gdb.flush_registers()
            vm.vcpu_info = vm.facts.from_gdbstub(vm.gdb, vm.vcpu)
        else:
            vm.vcpu_info = vm.facts.from_monitor()

    def _reread_ram_map(self, vm) -> None:
        """The RAM map read again, in place (memory adapters hold the same map); QEMU's
        mappings forgotten when it changed."""
        vm.ram_map.before_switched = None
        if vm.ram_map.replace_with(RamMap.from_qmp(vm.qmp)) and vm.process is not None:
            vm.process.forget_mappings()

    @staticmethod
    def _memory_size(vm) -> Optional[tuple]:
        """QMP's memory size summary (base and plugged), which a memory device plugged in or
        out changes; None where the monitor will not say."""
        try:
            summary = vm.qmp.command("query-memory-size-summary")
        except QIError:
            return None
        if not isinstance(summary, dict):          # a monitor that answers oddly says nothing
            return None
        return summary.get("base-memory"), summary.get("plugged-memory")

    def detach(self, vm) -> None:
        if vm.gdb is not None:
            vm.gdb.close()
            vm.gdb = None


# ---- what every source does the same way --------------------------------------------------

def find_process(vm, pid: Optional[int], how: str, missing: str) -> None:
    """Take QEMU process `pid` (found by `how`) as this VM's; `missing` says why there is
    none when pid is None. A --pid that names no process is a UsageError."""
    if pid is None:
        vm.process_note = missing
        return
    if not process_exists(pid):
        if vm.requested_pid is not None:
            raise UsageError(f"{how} {pid}: no such process")
        return
    vm.process = HostProcess(pid)
    vm.process_note = f"QEMU {vm.process.describe()}, found by {how}"


def proves_ram(vm, reference, proofs) -> bool:
    """Whether the QEMU process holds this VM's RAM as `reference` (the gdbstub, or QMP
    `xp`) reads it (memory.identity), or was proved to earlier (proofs: proved(vm),
    remember(vm)). Why a proof failed is added to process_note."""
    if proofs.proved(vm):
        return True
    held, why = holds_ram(vm.process, vm.ram_map, reference,
                          vm.vcpu_info[vm.vcpu].root)
    if held:
        proofs.remember(vm)
    elif why and why not in vm.process_note:
        vm.process_note += f"; {why}"
    return held


def use_memory(vm, reference, proofs) -> None:
    """Read guest memory through `reference`, or through the QEMU process directly when
    it proves to hold this VM's RAM (proves_ram) and --via allows it."""
    vm.memory = reference
    if vm.process is not None and not proves_ram(vm, reference, proofs):
        # The process behind a socket may be another VM's QEMU (nested rigs): trust it
        # only if it holds this VM's RAM, i.e. the root table reads the same both ways.
        vm.process_note += ("; but its memory does not hold this VM's RAM (or cannot "
                              "be read), so host addresses are not shown")
        vm.process.close()
        vm.process = None
    if vm.via == "direct" and vm.process is None:
        raise AttachError(f"{vm.source.via_option} direct needs the local QEMU process "
                          "and permission to read its memory: " + vm.process_note)
    if vm.via == "qmp":
        vm.memory = vm.source.monitor_memory(vm)
    elif vm.via in ("direct", "auto") and vm.process is not None:
        vm.memory = DirectMemory(vm.ram_map, vm.process)
