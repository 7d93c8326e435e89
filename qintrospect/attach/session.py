"""Attach to a running QEMU VM, translate addresses, and leave the VM exactly as found.

A Session owns the connections: QMP (run state, RAM map, host addresses), the gdbstub (vCPU
control registers, guest-physical reads) and the QEMU process (pagemap, memory). Attaching
gdb stops the VM, so everything a session reports is one consistent view. On close the run
state is put back: gdb disconnects (leaving the VM stopped), then QMP resumes a VM that was
found running and confirms that a VM found paused is still paused.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import TYPE_CHECKING, Iterable, List, Optional

from .. import paging
from . import runstate
from ..machine import hostcpu
from ..machine.cpu import Vcpu
from ..errors import AttachError, MemoryReadError, QIError, UsageError, VMGoneError
from ..memory.host import HostPage, HostProcess, process_exists, process_start_time
from ..machine.rammap import RamMap, RamRegion
from ..memory.guest import DirectMemory, GdbMemory, PageCache, PhysicalMemory, QmpMemory
from .peers import socket_owner
from .qmp import QmpMonitor, describe_address, parse_address
from ..machine.monitor_text import parse_registers
from ..record import record, replace
from .runguard import RunGuard

if TYPE_CHECKING:
    from ..commands import finder
    from .gdbstub import GdbStub

MASK64 = (1 << 64) - 1
VALUE_SIZE = 8
PAGE = 4096
IDENTITY_PAGES = 4       # distinctive pages that must read the same both ways
IDENTITY_SAMPLES = 512   # pages looked at, spread over RAM
IDENTITY_CHUNK = 1 << 17  # pagemap entries read at a time (512 MiB of RAM)
TIE_PROBES = 64           # more probes for second-level roots that tie


def _hex(v):
    return None if v is None else f"{v:#x}"


@record
class Translation:
    """One address followed down the chain. Renderers read this; none recomputes it."""
    gva: int
    vcpu: int
    cr3: int
    walk: paging.Walk
    ram: Optional[RamRegion] = None     # the RAM region holding the GPA
    gpa_note: str = ""                  # why the GPA has no RAM block (device, unassigned)
    hva: Optional[int] = None
    host: Optional[HostPage] = None
    value: Optional[bytes] = None       # the 8 bytes at GVA, read through the GPA
    value_at_hva: Optional[bytes] = None
    value_note: str = ""
    memory_path: str = "gdb"
    qemu_pid: Optional[int] = None
    cr3_source: str = "vcpu"
    slat: Optional[object] = None        # slat.SlatResult: the hypervisor's second-level walk
    kvm: Optional[dict] = None           # KVM's own facts about the VM (local KVM only)

    @property
    def ok(self) -> bool:
        return self.walk.ok

    @property
    def gpa(self) -> Optional[int]:
        return self.walk.pa

    @property
    def hpa(self) -> Optional[int]:
        return self.host.hpa if self.host else None

    def to_dict(self) -> dict:
        w = self.walk
        out = {"gva": _hex(self.gva), "vcpu": self.vcpu, "cr3": _hex(self.cr3),
               "cr3_source": self.cr3_source, "root": _hex(w.root), "pcid": _hex(w.pcid),
               "mode": w.mode.name if w.mode else None,
               "levels": [s.to_dict() for s in w.levels]}
        if not w.ok:
            out["fault"] = w.fault.to_dict() if w.fault else {"level": None, "reason": "unknown",
                                                               "message": "no translation"}
            out["notes"] = list(w.notes)
            out["memory_path"] = self.memory_path
            return out
        value = None if self.value is None else int.from_bytes(self.value, "little")
        value_hva = None if self.value_at_hva is None else int.from_bytes(self.value_at_hva,
                                                                          "little")
        out.update({
            "page_size": w.page_size, "gpa": _hex(w.pa),
            "ram_block": self.ram.block if self.ram else None,
            "ram_block_offset": _hex(self.ram.block_offset + (w.pa - self.ram.start))
            if self.ram else None,
            "gpa_note": self.gpa_note or None,
            "hva": _hex(self.hva), "qemu_pid": self.qemu_pid,
            "hpa": _hex(self.hpa),
            "host_page_size": self.host.page_size if self.host else None,
            "host": self.host.to_dict() if self.host else None,
            "writable": w.writable, "user": w.user, "executable": w.executable,
            "access": {k: v.to_dict() for k, v in w.access.items()},
            "value": _hex(value), "value_bytes": self.value.hex() if self.value else None,
            "value_at_hva": _hex(value_hva),
            "value_matches": (self.value == self.value_at_hva)
            if self.value is not None and self.value_at_hva is not None else None,
            "value_note": self.value_note or None,
            "maxphyaddr": w.maxphyaddr, "assumed_maxphyaddr": w.assumed_maxphyaddr,
            "notes": list(w.notes),
            "memory_path": self.memory_path,
            # the page size on each layer: guest tables, second-level table, host
            "guest_page_size": w.page_size,
            "slat_page_size": self.slat.walk.page_size
            if self.slat is not None and self.slat.walk is not None and self.slat.walk.ok
            else None,
        })
        if self.slat is not None:
            out["slat"] = self.slat.to_dict()
        if self.kvm is not None:
            out["kvm"] = self.kvm
        return out


@record
class MemoryPiece:
    """Up to one page of a `read`: the bytes, or why there are none."""
    address: int
    length: int
    gpa: Optional[int]          # for virtual reads
    data: Optional[bytes]
    note: str = ""

    def to_dict(self) -> dict:
        return {"address": _hex(self.address), "length": self.length, "gpa": _hex(self.gpa),
                "data": self.data.hex() if self.data is not None else None,
                "note": self.note or None}


class Session:
    """`with attach(qmp=..., gdb=...) as vm: vm.translate(0x7f...)`; see attach()."""

    def __init__(self, qmp: str, gdb: Optional[str] = None, pid: Optional[int] = None,
                 vcpu: int = 0, via: str = "auto", allow_remote: bool = False,
                 timeout: float = 5.0, freeze: bool = False, monitor=None):
        """qmp: the QMP socket address; or, with monitor (a callable returning a connected
        object with QmpMonitor's command/hmp/close, e.g. a monitor through libvirt), only a
        label for messages and the run-state marker."""
        if via not in ("auto", "gdb", "direct", "qmp"):
            raise UsageError(f"--via {via!r}: expected auto, gdb, direct or qmp")
        if via == "gdb" and not gdb:
            raise UsageError("--via gdb needs --gdb")
        if vcpu < 0:
            raise UsageError(f"--vcpu {vcpu}: vCPU numbers start at 0")
        self._monitor = monitor
        self.qmp_address = parse_address(qmp, "--qmp", allow_remote) if monitor is None \
            else qmp
        self.gdb_address = parse_address(gdb, "--gdb", allow_remote) if gdb else None
        self.freeze = freeze
        self.requested_pid = pid
        self.vcpu = vcpu
        self.via = via
        self.timeout = timeout
        self.qmp: Optional[QmpMonitor] = None
        self.gdb: Optional[GdbStub] = None
        self.process: Optional[HostProcess] = None
        self.process_note = ""
        self.ram_map: Optional[RamMap] = None
        self.memory: Optional[PhysicalMemory] = None
        self.cpu: Optional[paging.CpuState] = None
        self.guard: Optional[RunGuard] = None   # the run state: pause, resume, lock, marker
        self.vcpus: List[dict] = []          # query-cpus-fast
        self.page1gb_source = ""             # where CpuState.page1gb came from
        self._kvm: Optional[dict] = None     # QMP query-kvm, asked once
        self._phys_bits: dict = {}           # QOM phys-bits per vCPU, asked once
        self.vcpu_info: List[Vcpu] = []      # registers of each vCPU, read at attach
        self.timings = {}
        self.unreadable_tables: List[tuple] = []
        self.warnings: List[str] = []
        self._vm_key = runstate.vm_key(self.qmp_address, label=monitor is not None)
        self.gdb_note = ""
        self._memory_size_seen: Optional[tuple] = None   # at attach (refresh() compares)

    # ---- attach / detach ------------------------------------------------------------------------

    def __enter__(self) -> "Session":
        if self.memory is None:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "Session":
        t0 = time.perf_counter()
        try:
            self.qmp = self._connect_monitor()
            self.guard = RunGuard(self._connect_monitor, self._vm_key, self._lock_name(),
                                  self.timeout, self.warnings)
            self.guard.attach(self.qmp)
            self.vcpus = self.qmp.command("query-cpus-fast")
            if self.vcpu >= len(self.vcpus):
                raise UsageError(f"--vcpu {self.vcpu}: this VM has {len(self.vcpus)} vCPU(s), "
                                 f"numbered 0-{len(self.vcpus) - 1}")
            if self.gdb_address is None and self.freeze:
                self.guard.pause(self.found_status)   # one consistent view; close() resumes
            self.ram_map = RamMap.from_qmp(self.qmp)
            self._memory_size_seen = self._memory_size()
            self._find_process()
            if self.gdb_address is not None and self._gdb_not_needed():
                # registers from QMP, memory from the QEMU process: no gdb, unless a killed
                # session left the stub in physical-memory mode to put back
                self._repair_phys_mode()
            elif self.gdb_address is not None:
                from .gdbstub import GdbStub  # (loaded only where a gdbstub is used)
                self.gdb = GdbStub(self.gdb_address, self.timeout).connect()
                self.guard.debugger_attached()          # connecting stopped the VM
                # Registers of every vCPU first: selecting a gdb thread makes gdb read memory
                # at its PC, which must happen before memory packets become physical.
                self.vcpu_info = self._read_vcpus()
                self.cpu = self._cpu_state_of(self.vcpu_info[self.vcpu])
                self._physical_mode()
            else:
                self.vcpu_info = self._read_vcpus_qmp()
                self.cpu = self._cpu_state_of(self.vcpu_info[self.vcpu])
            if self.memory is None:
                self._choose_memory()
            page1gb, self.page1gb_source = self._page1gb(self.vcpu_info[self.vcpu])
            self.cpu = replace(self.cpu, page1gb=page1gb)
            # from here, what is read relies on the VM staying paused (ours or found so), or,
            # for a VM that runs while we read, on its not resetting: the guard watches
            self.guard.begin()
        except BaseException:
            self.close()
            raise
        self.timings["attach"] = time.perf_counter() - t0
        return self

    def _lock_name(self) -> str:
        """The name of this VM's lock (runstate): the QEMU process's where it is known
        (however it is reached: each QMP socket, libvirt), else the monitor's."""
        pid = self.requested_pid
        if pid is None and hasattr(self.qmp, "peer_pid"):
            pid = self.qmp.peer_pid()
        return f"qemu-pid:{pid}" if pid else self._vm_key

    @property
    def found_status(self) -> Optional[dict]:
        """query-status as found at attach."""
        return self.guard.found if self.guard is not None else None

    def take_lock(self) -> None:
        """(A shell, before a command) hold this VM's lock again; see release_lock()."""
        if self.guard is not None:
            self.guard.take_lock()

    def release_lock(self) -> None:
        """(A shell, between commands) let another qintrospect work on this VM."""
        if self.guard is not None:
            self.guard.release_lock()

    def _connect_monitor(self):
        if self._monitor is not None:
            return self._monitor()
        return QmpMonitor(self.qmp_address, self.timeout).connect()

    def refresh(self) -> None:
        """For a session that lives across commands (a shell): read every vCPU's registers
        again, since the VM may have run in between. Table pages are never cached across
        commands (PageCache lives for one call). The RAM map and QEMU's mappings are read
        again when a memory device was plugged or unplugged since (QMP's memory size summary
        changed), and before a look at the range the guest's chipset switches (PAM, SMRAM:
        rammap.SWITCHED); reading them for every command would cost more than the command."""
        self._check_open()
        size = self._memory_size() if self._memory_size_seen is not None else None
        if size is not None and size != self._memory_size_seen:
            self._reread_ram_map()
            self._memory_size_seen = size
        else:
            self.ram_map.before_switched = self._reread_ram_map
        if self.gdb is not None:
            self.gdb.flush_registers()
            self.vcpu_info = self._read_vcpus()
        else:
            self.vcpu_info = self._read_vcpus_qmp()
        page1gb = self.cpu.page1gb if self.cpu else None
        self.cpu = replace(self._cpu_state_of(self.vcpu_info[self.vcpu]), page1gb=page1gb)

    def _reread_ram_map(self) -> None:
        """The RAM map read again, in place (memory adapters hold the same map); QEMU's
        mappings forgotten when it changed."""
        self.ram_map.before_switched = None
        if self.ram_map.replace_with(RamMap.from_qmp(self.qmp)) and self.process is not None:
            self.process.forget_mappings()

    def _memory_size(self) -> Optional[tuple]:
        """QMP's memory size summary (base and plugged), which a memory device plugged in or
        out changes; None where the monitor will not say."""
        try:
            summary = self.qmp.command("query-memory-size-summary")
        except QIError:
            return None
        if not isinstance(summary, dict):          # a monitor that answers oddly says nothing
            return None
        return summary.get("base-memory"), summary.get("plugged-memory")

    def select_vcpu(self, index: int) -> None:
        """Use vCPU `index`'s registers from now on."""
        self._check_open()
        if not 0 <= index < len(self.vcpu_info):
            raise UsageError(f"vCPU {index}: this VM has {len(self.vcpu_info)} vCPU(s), "
                             f"numbered 0-{len(self.vcpu_info) - 1}")
        self.vcpu = index
        if self.gdb is not None:
            self.gdb.select_vcpu(index)
        page1gb, self.page1gb_source = self._page1gb(self.vcpu_info[index])
        self.cpu = replace(self._cpu_state_of(self.vcpu_info[index]), page1gb=page1gb)

    def _repair_phys_mode(self) -> None:
        """Put back the memory mode a killed session found (it left the stub in mode 1)."""
        mode = self.guard.phys_mode_inherited
        if mode is None:
            return
        try:
            from .gdbstub import GdbStub
            gdb = GdbStub(self.gdb_address, self.timeout).connect()
        except QIError as exc:
            self.warnings.append(f"could not put the gdbstub's memory mode back to "
                                 f"{mode} ({exc}); it stays noted")
            return
        gdb.physical_mode(restore_to=mode)   # close() puts it back
        gdb.close()
        self.guard.phys_mode_inherited = None

    def _physical_mode(self) -> None:
        """Switch the gdbstub to physical addresses, after writing down (in the marker) the
        mode to put back: the one found, or the one a killed predecessor found before it."""
        found = self.gdb.query_phys_mode()
        original = self.guard.phys_mode_inherited or found
        self.guard.note_phys_mode(original)       # gdb.close() puts `original` back
        self.gdb.physical_mode(restore_to=original)

    def close(self, hold: bool = False) -> None:
        """Leave the VM as found: the PhyMemMode put back, gdb disconnected, and our own pause
        (only ours, and only if nobody resumed the VM since) undone through QMP; sockets
        closed (runguard.RunGuard says the rules).

        hold=True closes the connections but keeps our pause (a nested translation holds an
        inner VM still while it walks the outer one); resume_held() then ends it."""
        # While we clean up, a second Ctrl-C or SIGTERM must not cut the restore short.
        old_int = _block_signal(signal.SIGINT)
        old_term = _block_signal(signal.SIGTERM)
        try:
            if self.gdb is not None:
                self.gdb.close()
                self.gdb = None
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

    def _find_process(self) -> None:
        pid = self.requested_pid
        how = "--pid" if self._monitor is None else "the monitor's owner"
        if pid is None:
            # our own QMP connection's peer, else the owner of the listening socket (never a
            # second connection: a gdbstub would stop the VM when it accepted it)
            pid = (self.qmp.peer_pid() if hasattr(self.qmp, "peer_pid") else None) \
                or (socket_owner(self.qmp_address) if self._monitor is None else None) \
                or (socket_owner(self.gdb_address) if self.gdb_address else None)
            how = "socket peer"
        if pid is None:
            self.process_note = ("the QEMU process was not found (remote sockets?); pass --pid "
                                 "to get host addresses")
            return
        if not process_exists(pid):
            if self.requested_pid is not None:
                raise UsageError(f"--pid {pid}: no such process")
            return
        self.process = HostProcess(pid)
        self.process_note = f"QEMU {self.process.describe()}, found by {how}"

    def _read_vcpus(self) -> List[Vcpu]:
        from . import gdbstub
        out = []
        for i, info in enumerate(self.vcpus):
            self.gdb.select_vcpu(i)
            # the protection-key registers too, where the stub describes them (QEMU 7.2 to
            # 10.0 do not: the walk then says "unknown" for keyed pages)
            keys = tuple(k for k in gdbstub.KEY_REGISTERS if self.gdb.has_register(k))
            regs = self.gdb.registers(gdbstub.CONTROL_REGISTERS + ("cs",) + keys)
            out.append(Vcpu(i, info.get("thread-id"), info.get("qom-path"), regs["cr0"],
                            regs["cr3"], regs["cr4"], regs["efer"], regs["cs"],
                            regs.get("pkru"), regs.get("pkrs")))
        self.gdb.select_vcpu(self.vcpu)
        return out

    def _read_vcpus_qmp(self) -> List[Vcpu]:
        """Without a gdbstub: every vCPU's registers from HMP `info registers`."""
        out = []
        for i, info in enumerate(self.vcpus):
            regs = parse_registers(self.qmp.hmp("info registers", cpu_index=info["cpu-index"]))
            out.append(Vcpu(i, info.get("thread-id"), info.get("qom-path"), regs["CR0"],
                            regs["CR3"], regs["CR4"], regs["EFER"], regs.get("CPL", 0),
                            regs.get("PKRU"), regs.get("PKRS")))
        return out

    @property
    def stopped(self) -> bool:
        """The VM is paused while we look (by us, or found so, and watched for a resume):
        cached table pages stay valid."""
        return self.guard is not None and self.guard.stable

    def _cached(self):
        """Memory with a whole-page cache in front, when the VM cannot change it meanwhile."""
        return PageCache(self.memory) if self.stopped else self.memory

    def _cpu_state_of(self, vcpu: Vcpu) -> paging.CpuState:
        """The vCPU's registers plus its MAXPHYADDR (QOM phys-bits), which reserved-bit checks
        need; None (the walker then assumes 52 and says so) when QEMU will not tell."""
        phys_bits = self._phys_bits.get(vcpu.index)
        if phys_bits is None:         # fixed for the VM's life: asked once per vCPU
            phys_bits = self._phys_bits[vcpu.index] = self._qom(vcpu, "phys-bits")
        return paging.CpuState(cr0=vcpu.cr0, cr3=vcpu.cr3, cr4=vcpu.cr4, efer=vcpu.efer,
                               maxphyaddr=int(phys_bits) if isinstance(phys_bits, int) else None,
                               pkru=vcpu.pkru, pkrs=vcpu.pkrs)

    def vcpu_property(self, prop: str):
        """A QOM property of the session's vCPU (e.g. a CPUID feature name), or None."""
        return self._qom(self.vcpu_info[self.vcpu], prop)

    def _qom(self, vcpu: Vcpu, prop: str):
        """A property of the vCPU's QOM object (a CPUID feature, phys-bits...), or None."""
        if not vcpu.qom_path:
            return None
        try:
            return self.qmp.command("qom-get", path=vcpu.qom_path, property=prop)
        except QIError:
            return None

    def _page1gb(self, vcpu: Vcpu):
        """(Page1GB, where it comes from): whether PS in a PDPTE maps a 1 GiB page for this
        vCPU. Under TCG and under KVM without two-dimensional paging, the guest's CPUID says
        (QOM "pdpe1gb"); under KVM with EPT/NPT the processor walks the guest's tables itself,
        so the host CPU's Page1GB decides, known only when QEMU runs on this host."""
        kvm = self.kvm_enabled
        cpuid = self._qom(vcpu, "pdpe1gb")
        cpuid = cpuid if isinstance(cpuid, bool) else None
        if not kvm:
            return cpuid, "the vCPU's CPUID (QOM pdpe1gb)" if cpuid is not None else "unknown"
        tdp = hostcpu.tdp()["enabled"]
        if tdp is False:
            return cpuid, "the vCPU's CPUID (KVM shadow paging emulates it)"
        if self.process is None:
            return None, "unknown: KVM walks with the host CPU's Page1GB, and QEMU is not local"
        return hostcpu.page1gb(), "the host CPU (KVM with EPT/NPT: the processor walks)"

    def _gdb_not_needed(self) -> bool:
        """With a gdbstub given (and --via auto): when QEMU is local and its memory readable,
        the walk needs neither gdb nor the stub. The VM is paused through QMP for the command
        (as --freeze does: one consistent view), the registers come from `info registers`, and
        memory from the QEMU process, once it has proved it holds this VM's RAM. Otherwise
        gdb is the way (remote QEMU, another user's, a monitor behind a serial line)."""
        if self.via != "auto" or self.process is None:
            return False
        self.guard.pause(self.found_status)     # close() resumes it
        self.vcpu_info = self._read_vcpus_qmp()
        self.cpu = self._cpu_state_of(self.vcpu_info[self.vcpu])
        if not self._holds_ram(QmpMemory(self.ram_map, self.qmp)):
            return False                        # gdb below; _choose_memory says why
        self.memory = DirectMemory(self.ram_map, self.process)
        self.gdb_note = ("the gdbstub was not used: QEMU is local and its memory readable "
                         "(--via gdb uses it)")
        return True

    def _choose_memory(self) -> None:
        """The gdbstub, the QEMU process (direct), or QMP `xp`: direct when it is local and
        really holds this VM's RAM, unless --via says otherwise."""
        reference = GdbMemory(self.ram_map, self.gdb) if self.gdb is not None \
            else QmpMemory(self.ram_map, self.qmp)
        self.memory = reference
        if self.process is not None and not self._holds_ram(reference):
            # The process behind a socket may be another VM's QEMU (nested rigs): trust it
            # only if it holds this VM's RAM, i.e. the root table reads the same both ways.
            self.process_note += ("; but its memory does not hold this VM's RAM (or cannot "
                                  "be read), so host addresses are not shown")
            self.process.close()
            self.process = None
        if self.via == "direct" and self.process is None:
            raise AttachError("--via direct needs the local QEMU process and permission to "
                              "read its memory: " + self.process_note)
        if self.via == "qmp":
            self.memory = QmpMemory(self.ram_map, self.qmp)
        elif self.via in ("direct", "auto") and self.process is not None:
            self.memory = DirectMemory(self.ram_map, self.process)

    def _holds_ram(self, reference: PhysicalMemory) -> bool:
        """_process_holds_ram, remembered (runstate) once proved when the QEMU process is the
        one serving our QMP socket: for that process's life and that RAM map the answer
        cannot change. A failed proof is never remembered: it is made again each time."""
        fact = self._holds_ram_fact()
        if fact is not None and runstate.remembered(fact):
            self.process_note += "; it holds this VM's RAM (proved by an earlier command)"
            return True
        if not self._process_holds_ram(reference):
            return False
        if fact is not None:
            try:
                runstate.remember(fact, self.process.pid)
            except (runstate.RunStateError, OSError):
                pass
        return True

    def _holds_ram_fact(self) -> Optional[str]:
        peer = self.qmp.peer_pid() if hasattr(self.qmp, "peer_pid") else None
        if peer is None or self.process is None or peer != self.process.pid:
            return None
        start = process_start_time(peer)
        if start is None:
            return None
        ram = ";".join(f"{r.start:x}-{r.end:x}:{r.block}@{r.hva:x}" for r in self.ram_map.ram
                       if r.hva is not None)
        return f"holds-ram qmp={self._vm_key} pid={peer} start={start} ram={ram}"

    def _process_holds_ram(self, reference: PhysicalMemory) -> bool:
        """Whether the QEMU process holds this VM's RAM: several whole pages that only this
        VM can hold (many different byte values and 8-byte words: page tables, code, data,
        never zeros or a fill pattern) read the same through the process and through the
        reference (gdbstub or QMP). One stable page that differs is proof of the contrary."""
        matched = 0
        for gpa in self._held_pages():
            region = self.ram_map.ram_at(gpa)
            hva = region.hva_of(gpa)
            try:
                if not self.process.pagemap_entry(hva) >> 63 & 1:
                    continue          # absent pages hold zeros or file data: no proof
                mine = self.process.read(hva, PAGE)
                if not _distinctive(mine):
                    continue
                theirs = reference.read(gpa, PAGE)
                if self.process.read(hva, PAGE) != mine:
                    continue          # changed while we looked (the VM runs): no proof
            except (OSError, MemoryReadError):
                return False
            if theirs != mine:
                return False
            matched += 1
            if matched == IDENTITY_PAGES:
                return True
        self.process_note += (f"; only {matched} page(s) distinctive enough to prove it holds "
                              "this VM's RAM were found")
        return False

    def _held_pages(self):
        """GPAs of pages QEMU holds (present in its pagemap), the page-table root first, then
        spread evenly over guest RAM (IDENTITY_SAMPLES of them), a chunk of the pagemap at a
        time."""
        root = self.vcpu_info[self.vcpu].root
        region = self.ram_map.ram_at(root)
        if region is not None and region.hva is not None:
            yield root
        ram = [r for r in self.ram_map.ram if r.kind == "ram" and r.hva is not None]
        total = sum((r.end + 1 - r.start) // PAGE for r in ram) or 1
        for r in ram:
            pages = (r.end + 1 - r.start) // PAGE
            for first in range(0, pages, IDENTITY_CHUNK):
                n = min(IDENTITY_CHUNK, pages - first)
                try:
                    entries = self.process.pagemap_entries(r.hva + first * PAGE, n)
                except OSError:
                    return
                present = [i for i, e in enumerate(entries) if e >> 63]
                want = max(8, IDENTITY_SAMPLES * n // total)
                for i in present[::max(1, len(present) // want)]:
                    yield r.start + (first + i) * PAGE

    # ---- translation ------------------------------------------------------------------------------

    def cpu_state(self, cr3: Optional[int] = None) -> paging.CpuState:
        self._check_open()
        if cr3 is None:
            return self.cpu
        # the PAE PDPTE registers belong to the vCPU's own CR3 only
        return replace(self.cpu, cr3=cr3, pdptes=None)

    def read_phys(self, gpa: int, length: int) -> bytes:
        self._check_open()
        return self.memory.read(gpa, length)

    def translate(self, gva: int, cr3: Optional[int] = None) -> Translation:
        """Follow one guest virtual address down to the host. Faults are values, not errors."""
        self._check_open()
        if not 0 <= gva <= MASK64:
            raise UsageError(f"address {gva:#x} does not fit in 64 bits")
        cpu = self.cpu_state(cr3)
        walk = paging.walk(self.memory.read, cpu, gva)
        t = Translation(gva=gva, vcpu=self.vcpu, cr3=cpu.cr3, walk=walk,
                        memory_path=self.memory.name,
                        qemu_pid=self.process.pid if self.process else None,
                        cr3_source="vcpu" if cr3 is None else "given")
        if not walk.ok:
            return t
        self._finish_on_host(t)
        self._read_value(t)
        return t

    def translate_many(self, addresses: Iterable[int], cr3: Optional[int] = None):
        """translate() for each address, lazily. When the VM cannot run meanwhile (gdb attached,
        frozen, or found paused) a page cache sits in front of memory for the whole batch."""
        self._check_open()
        with self.page_cache():
            for gva in addresses:
                yield self.translate(gva, cr3)

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

    def translate_json(self, addresses, cr3: Optional[int] = None, kvm: Optional[dict] = None):
        """(translated?, JSON line) per address, the lines translate().to_dict() gives (with
        `kvm` set to the facts given), many addresses at once (jsonlines.json_lines): the fast
        way to the full detail."""
        from ..present.jsonlines import json_lines
        self._check_open()
        return json_lines(self, addresses, cr3, kvm)

    def translate_json_blocks(self, addresses, cr3: Optional[int] = None,
                              kvm: Optional[dict] = None, size: int = 256):
        """translate_json() a block at a time, for a writer of many lines: (translated? of
        each, the lines as ASCII bytes, each ending in a newline) per block of up to `size`
        addresses."""
        from ..present.jsonlines import json_blocks
        self._check_open()
        return json_blocks(self, addresses, cr3, kvm, size)

    def translate_batch(self, addresses, cr3: Optional[int] = None):
        """The chain for many addresses at once, as arrays (batch.BatchTranslation): the fast
        way for large batches; .walk(i, session) gives one element's levels."""
        from ..commands import batch
        self._check_open()
        try:
            return batch.translate_batch(self, addresses, cr3)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UsageError(f"addresses must be integers from 0 to 2**64-1: {exc}") from None

    def _finish_on_host(self, t: Translation) -> None:
        gpa = t.walk.pa
        t.ram = self.ram_map.ram_at(gpa)
        if t.ram is None:
            t.gpa_note = self.ram_map.describe(gpa)
            return
        t.hva = t.ram.hva_of(gpa)
        if t.hva is None:
            t.gpa_note = f"QEMU gave no host address for RAM region {t.ram.block!r}"
            return
        if self.process is None:
            t.gpa_note = self.process_note
            return
        t.host = self.process.host_page(t.hva)

    def _read_value(self, t: Translation) -> None:
        """The 8 bytes at the GVA through the GPA, and the same bytes at the HVA."""
        gpa = t.walk.pa
        in_page = min(VALUE_SIZE, t.walk.page_size - gpa % t.walk.page_size)
        try:
            value = self.memory.read(gpa, in_page)
            if in_page < VALUE_SIZE:  # crosses into the next virtual page: walk that one too
                nxt = paging.walk(self.memory.read, self.cpu_state(t.cr3),
                                  (t.gva + in_page) & MASK64)
                if not nxt.ok:
                    t.value_note = (f"the 8 bytes cross into the next page, which is not mapped "
                                    f"({nxt.fault.reason}); showing {in_page} bytes")
                else:
                    value += self.memory.read(nxt.pa, VALUE_SIZE - in_page)
            t.value = value
        except MemoryReadError as exc:
            t.value_note = f"value not read: {exc}"
            return
        if t.host is not None and t.host.status in ("present", "pfn-hidden") \
                and len(value) == VALUE_SIZE \
                and in_page == VALUE_SIZE:
            try:
                t.value_at_hva = self.process.read(t.hva, VALUE_SIZE)
            except MemoryReadError as exc:
                t.value_note = str(exc)

    def _check_open(self) -> None:
        if self.memory is None:
            raise VMGoneError("the session is not attached")

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

    def read_pieces(self, address: int, length: int, physical: bool = False,
                    cr3: Optional[int] = None):
        """Guest memory in pieces that end at page boundaries: each piece is read, or says why
        not (unmapped, not RAM). MMIO is never read."""
        self._check_open()
        memory = self._cached()
        cpu = self.cpu_state(cr3)
        end = address + length
        while address < end:
            n = min(end - address, PAGE - address % PAGE)
            gpa, note = address, ""
            if not physical:
                walk = paging.walk(memory.read, cpu, address)
                gpa = walk.pa if walk.ok else None
                if not walk.ok:
                    note = f"unmapped: {walk.fault.reason}" + (
                        f" at {walk.fault.level}" if walk.fault.level else "")
            data = None
            if gpa is not None:
                try:
                    data = memory.read(gpa, n)
                except MemoryReadError as exc:
                    note = str(exc)
            yield MemoryPiece(address, n, None if physical else gpa, data, note)
            address += n

    # ---- KVM on this host -------------------------------------------------------------------

    @property
    def kvm_enabled(self) -> Optional[bool]:
        """Whether the VM runs under KVM (QMP query-kvm); None if QEMU will not say."""
        if self._kvm is None:
            try:
                self._kvm = self.qmp.command("query-kvm")
            except QIError:
                self._kvm = {}
        return self._kvm.get("enabled")

    def kvm_facts(self, roots: bool = False) -> dict:
        """KVM's own facts about this VM (qintrospect.slat.kvm.facts)."""
        from ..slat import kvm
        self._check_open()
        return kvm.facts(self.qmp, self.process.pid if self.process else None, roots=roots)

    def second_level(self, spec, translations=(), progress=None):
        """This VM's second-level table, kept by KVM on this host, over this host's physical
        memory (/proc/kcore): the root given; or (auto) the root KVM's own vCPU holds
        (kvm_vcpu), else, saying why, one found by a scan keyed by the pagemap path's
        answers for the vCPU's page-table root and the translations given."""
        from .. import slat
        from ..memory.kcore import KcoreMemory
        self._check_open()
        if isinstance(spec, str):      # "auto", "npt:0x...", "ept:0x..." as on the command line
            spec = slat.parse_slat(spec)
        if self.process is None:
            raise UsageError("--slat on this host needs the VM's QEMU to be local: "
                             + self.process_note)
        if not self.kvm_enabled:
            raise UsageError("--slat: this VM does not run under KVM (QMP query-kvm), so no "
                             "hypervisor keeps a second-level table for it on this host; for a "
                             "VM inside another VM, use --outer")
        memory = KcoreMemory()
        probes = [self._host_probe(self.vcpu_info[self.vcpu].root)]
        probes += [(t.gpa, t.hpa) for t in translations if t.ok and t.hpa is not None]
        second = why = None
        if spec.auto and spec.source in ("auto", "kvm"):
            second, why = self._kvm_vcpu_level(memory, probes)
            if second is None and spec.source == "kvm":
                from ..slat.kvm_vcpu import Unavailable
                raise Unavailable(f"--slat kvm: {why}")
        if second is None:
            if progress is not None and spec.auto:
                progress.total = memory.ram_bytes
            second = slat.SecondLevel.resolve(memory, memory.scan_chunks(), spec, probes,
                                              hostcpu.slat_formats(), progress,
                                              self.spread_probes)
            if why is not None:
                second.how["fell_back"] = why
        if second.spec is not None and second.spec.format == "npt":
            second.page1gb = hostcpu.page1gb()    # NPT walks with this host CPU's paging
        second.maxphyaddr = hostcpu.phys_bits()
        second.device = self.device_region
        return second

    def device_region(self, gpa: int) -> Optional[str]:
        """What QEMU's memory map has at a GPA that is not RAM (a device, or nothing); None
        for RAM."""
        return None if self.ram_map.ram_at(gpa) is not None else self.ram_map.describe(gpa)

    def _kvm_vcpu_level(self, memory, probes):
        """(SecondLevel from KVM's own vCPU, None) or (None, why not). The root is used only
        if the pagemap path's answers agree with it (one at least, and none against)."""
        from ..slat import kvm, kvm_vcpu
        from .. import slat
        try:
            vm = kvm_vcpu.read_vm(self.process.pid, memory,
                                  debugfs_vcpus=kvm.debugfs_vcpus(self.process.pid))
        except kvm_vcpu.Unavailable as exc:
            return None, str(exc)
        v = vm.root_of(self.vcpu)
        if v is None:
            return None, (f"no vCPU of KVM's VM {vm.address:#x} has a root loaded now (none "
                          "ran since its table was last dropped)")
        spec = slat.SlatSpec("ept", v.root, v.level or 4, v.eptp) if vm.vendor == "intel" \
            else slat.SlatSpec("npt", v.root, v.level or 4)
        agree, disagree = slat.agreement(memory.read, spec, probes)
        how = {"method": "kvm-vcpu", "vcpu": v.index, "seconds": round(vm.seconds, 4),
               "probes": [[f"{g:#x}", f"{p:#x}"] for g, p in probes if p is not None],
               "probes_agreeing": agree, "probes_disagreeing": disagree, "kvm": vm.to_dict()}
        if disagree or not agree:
            return None, (f"KVM's vCPU {v.index} holds root {v.root:#x}, but it takes "
                          f"{agree} of the pagemap path's probe addresses where that path "
                          f"does and {disagree} elsewhere: not used (read while KVM changed "
                          "it?)")
        return slat.SecondLevel(memory, spec, how), None

    def spread_probes(self, count: int = TIE_PROBES) -> list:
        """(GPA, host physical address) of up to `count` pages QEMU holds, spread over guest
        RAM: more keys for a second-level search whose first ones left roots tied."""
        pages = list(self._held_pages())
        return [self._host_probe(gpa) for gpa in pages[::max(1, len(pages) // count)]]

    def _host_probe(self, gpa: int):
        """(gpa, its host physical address by pagemap), or (gpa, None)."""
        region = self.ram_map.ram_at(gpa)
        if region is None or region.hva is None:
            return gpa, None
        return gpa, self.process.host_page(region.hva_of(gpa)).hpa

    # ---- whole address spaces and roots ------------------------------------------------------

    def find_cr3(self, gva: Optional[int] = None, expect: Optional[int] = None,
                 progress=None) -> List[finder.Candidate]:
        """Candidate page-table roots in guest RAM (no symbols), best match first."""
        self._check_open()
        from ..commands import finder
        candidates = finder.scan(self.memory, self.ram_map, self.cpu, progress)
        return finder.check(self._cached().read, self.cpu, candidates, gva, expect)

    def leaf_arrays(self, cr3: Optional[int] = None, start: int = 0,
                    end: Optional[int] = None) -> paging.LeafArrays:
        """Every present leaf of the address space as numpy columns (paging.leaf_arrays):
        each table page read once, decoded a page at a time. Tables that cannot be read (not
        RAM) are skipped and listed in self.unreadable_tables."""
        self._check_open()
        self.unreadable_tables = []
        return paging.leaf_arrays(self.memory.read, self.cpu_state(cr3), start, end,
                                  lambda level, addr, exc: self.unreadable_tables.append(
                                      (level, addr, str(exc))))

    def who_maps(self, gpa: Optional[int] = None, hva: Optional[int] = None,
                 hpa: Optional[int] = None, progress=None, slat=None):
        """The reverse map (whomaps.who_maps): every GVA in every address space of the guest
        that reaches the frame, whether it is a page-table page, and for a host address the
        QEMU processes holding it; with slat ("auto", "npt:0x..." or a SlatSpec) on a KVM
        host, the second-level table's GPAs for that host frame too. One WhoMaps per GPA."""
        from .. import slat as slat_mod
        from ..commands import whomaps
        self._check_open()
        spec = slat_mod.parse_slat(slat) if isinstance(slat, str) else slat
        return whomaps.who_maps(self, gpa, hva, hpa, progress, spec)

    def mappings(self, cr3: Optional[int] = None, start: int = 0, end: Optional[int] = None):
        """Every present leaf of the address space as paging.Mapping objects, in VA order."""
        return self.leaf_arrays(cr3, start, end).mappings()

    # ---- facts for the header --------------------------------------------------------------------

    def describe(self) -> dict:
        return {"qmp": describe_address(self.qmp_address),
                "gdb": (describe_address(self.gdb_address) if self.gdb_address else None)
                if self.gdb is not None or not self.gdb_note else None,
                "gdb_note": self.gdb_note or None,
                "status_found": self.found_status.get("status") if self.found_status else None,
                "vcpu": self.vcpu, "vcpus": len(self.vcpus),
                "qemu_pid": self.process.pid if self.process else None,
                "process_note": self.process_note, "memory_path": self.memory.name
                if self.memory else None,
                "page1gb": self.cpu.page1gb if self.cpu else None,
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


def _distinctive(page: bytes) -> bool:
    """A page whose content two VMs would not share by chance: many byte values and many
    different 8-byte words (not zeros, not a pattern, not a mostly empty table)."""
    return len(set(page)) >= 64 and len(set(memoryview(page).cast("Q"))) >= 128


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
