"""translate: one guest virtual address followed down the chain, GVA -> GPA (the guest's own
tables) -> RAM block -> HVA -> HPA (the QEMU process's pagemap), with the 8 bytes at it read
both ways. Faults are values, not errors. Over an attached machine (connect.session.Session)."""

from __future__ import annotations

from typing import Iterable, Optional

from .. import paging
from ..errors import MemoryReadError, UsageError
from ..memory.host import HostPage
from ..machine.rammap import RamRegion
from ..record import record

MASK64 = (1 << 64) - 1
VALUE_SIZE = 8


def _hex(v):
    return None if v is None else f"{v:#x}"


@record
class Stage2Step:
    """The second stage of the vCPU's own translation (an aarch64 vCPU that runs a guest of
    its hypervisor): the IPA stage 1 gave (the VA itself when stage 1 is off) walked through
    VTTBR_EL2/VTCR_EL2 to the attached machine's physical address."""
    ipa: int
    walk: paging.Walk
    regs: object                        # machine.arm64.Stage2Regs
    stage1_off: bool = False            # SCTLR_EL1.M=0: the IPA is the VA

    def to_dict(self) -> dict:
        w = self.walk
        out = dict(self.regs.to_dict(), ipa=_hex(self.ipa), stage1_off=self.stage1_off,
                   mode=w.mode.name if w.mode else None,
                   levels=[s.to_dict() for s in w.levels],
                   page_size=w.page_size if w.ok else None, pa=_hex(w.pa) if w.ok else None,
                   fault=w.fault.to_dict() if w.fault else None,
                   access={k: v.to_dict() for k, v in w.access.items()},
                   notes=list(w.notes))
        return out


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
    stage2: Optional[Stage2Step] = None  # the vCPU's own stage 2 (aarch64, a guest running)
    root_name: str = "CR3"               # the register cr3 is: CR3, TTBR0_EL1, satp, ...

    @property
    def ok(self) -> bool:
        if self.stage2 is not None:
            return (self.walk.ok or self.stage2.stage1_off) and self.stage2.walk.ok
        return self.walk.ok

    @property
    def gpa(self) -> Optional[int]:
        """The attached machine's physical address (after stage 2, when there is one)."""
        return self.stage2.walk.pa if self.stage2 is not None else self.walk.pa

    @property
    def writable(self) -> Optional[bool]:
        """Writable through every stage (stage 1 off allows everything)."""
        return self._both("writable")

    @property
    def executable(self) -> Optional[bool]:
        return self._both("executable")

    def _both(self, right: str) -> Optional[bool]:
        first = True if self.stage2 is not None and self.stage2.stage1_off \
            else getattr(self.walk, right)
        if self.stage2 is None or first is None:
            return first
        return bool(first and getattr(self.stage2.walk, right))

    @property
    def page_size(self) -> Optional[int]:
        """The size of the page that maps the address through every stage (the smallest)."""
        sizes = [w.page_size for w in (self.walk, self.stage2 and self.stage2.walk)
                 if w is not None and w.ok]
        return min(sizes) if sizes else None

    @property
    def hpa(self) -> Optional[int]:
        return self.host.hpa if self.host else None

    def to_dict(self) -> dict:
        w = self.walk
        out = {"gva": _hex(self.gva), "vcpu": self.vcpu, "cr3": _hex(self.cr3),
               "cr3_source": self.cr3_source, "root": _hex(w.root), "pcid": _hex(w.pcid),
               "mode": w.mode.name if w.mode else None,
               "levels": [s.to_dict() for s in w.levels]}
        if self.stage2 is not None:
            out["ipa"] = _hex(self.stage2.ipa)
            out["stage2"] = self.stage2.to_dict()
        if not self.ok:
            stage2_fault = self.stage2 is not None and self.stage2.walk.fault is not None
            f = self.stage2.walk.fault if stage2_fault else w.fault
            out["fault"] = (dict(f.to_dict(), stage=2) if stage2_fault else f.to_dict()) \
                if f else {"level": None, "reason": "unknown", "message": "no translation"}
            out["notes"] = list(w.notes)
            out["memory_path"] = self.memory_path
            return out
        w = self.stage2.walk if self.stage2 is not None else w    # where the address ends
        value = None if self.value is None else int.from_bytes(self.value, "little")
        value_hva = None if self.value_at_hva is None else int.from_bytes(self.value_at_hva,
                                                                          "little")
        out.update({
            "page_size": self.page_size, "gpa": _hex(w.pa),
            "ram_block": self.ram.block if self.ram else None,
            "ram_block_offset": _hex(self.ram.block_offset + (w.pa - self.ram.start))
            if self.ram else None,
            "gpa_note": self.gpa_note or None,
            "hva": _hex(self.hva), "qemu_pid": self.qemu_pid,
            "hpa": _hex(self.hpa),
            "host_page_size": self.host.page_size if self.host else None,
            "host": self.host.to_dict() if self.host else None,
            "writable": self.writable, "user": self.walk.user,
            "executable": self.executable,
            "access": {k: v.to_dict() for k, v in self.walk.access.items()},
            "value": _hex(value), "value_bytes": self.value.hex() if self.value else None,
            "value_at_hva": _hex(value_hva),
            "value_matches": (self.value == self.value_at_hva)
            if self.value is not None and self.value_at_hva is not None else None,
            "value_note": self.value_note or None,
            "maxphyaddr": w.maxphyaddr, "assumed_maxphyaddr": w.assumed_maxphyaddr,
            "notes": list(self.walk.notes),
            "memory_path": self.memory_path,
            # the page size on each layer: guest tables, second-level table, host
            "guest_page_size": self.walk.page_size,
            "slat_page_size": self.slat.walk.page_size
            if self.slat is not None and self.slat.walk is not None and self.slat.walk.ok
            else None,
        })
        if self.slat is not None:
            out["slat"] = self.slat.to_dict()
        if self.kvm is not None:
            out["kvm"] = self.kvm
        return out


def _root_source(vm, cr3: Optional[int]) -> str:
    """Translation.cr3_source: "given" (a root given), "vcpu", "kvm-vcpu" (registers a
    guest's own KVM holds for a vCPU of its VM: --kvm-vcpu), or "stage2" (a VM's stage 2
    root given, --stage2: its IPAs, stage 1 off)."""
    return "given" if cr3 is not None else getattr(vm, "registers_source", "vcpu")


def translate(vm, gva: int, cr3: Optional[int] = None) -> Translation:
    """Follow one guest virtual address down to the host (with the vCPU's CR3, or `cr3`).
    On an aarch64 vCPU that runs a guest of its hypervisor, the guest's stage 1 is walked
    through the vCPU's stage 2 (its tables are at IPAs), and the IPA through stage 2."""
    vm.check_open()
    if not 0 <= gva <= MASK64:
        raise UsageError(f"address {gva:#x} does not fit in 64 bits")
    cpu = vm.cpu_state(cr3)
    paging.require_walkable(cpu)
    walk, stage2 = _walk(vm, cpu, gva)
    t = Translation(gva=gva, vcpu=vm.vcpu, cr3=paging.root_register(cpu, gva), walk=walk,
                    memory_path=vm.memory.name,
                    qemu_pid=vm.process.pid if vm.process else None,
                    cr3_source=_root_source(vm, cr3), stage2=stage2,
                    root_name=paging.root_register_name(cpu, gva))
    if not t.ok:
        return t
    _finish_on_host(vm, t)
    _read_value(vm, t, cpu)
    return t


def _walk(vm, cpu, gva: int, memory=None):
    """(stage 1 walk, Stage2Step or None): the vCPU's whole translation of `gva`, reading
    `memory` (the session's by default)."""
    regs = vm.stage2
    memory = memory or vm.memory
    if regs is None:
        return paging.walk(memory.read, cpu, gva), None
    from ..memory.stage2 import Stage2Memory
    from ..paging.arm64 import stage1_off_output
    walk = paging.walk(Stage2Memory(memory, regs).read, cpu, gva)
    ipa = walk.pa if walk.ok else None
    off = not walk.ok and not cpu.sctlr & 1
    if off:
        ipa = stage1_off_output(cpu, gva)
        off = ipa is not None
    if ipa is None:           # stage 1 faulted (a stage 2 fault on its tables included)
        return walk, None
    return walk, Stage2Step(ipa, regs.walk(memory.read, ipa), regs, off)


def physical(vm, cpu, va: int, memory=None):
    """(the physical address `va` reaches, None) or (None, why not): both stages on a vCPU
    inside a guest of its hypervisor, else the one walk."""
    walk, s2 = _walk(vm, cpu, va, memory)
    t = Translation(gva=va, vcpu=vm.vcpu, cr3=0, walk=walk, stage2=s2)
    if t.ok:
        return t.gpa, None
    stage2 = s2 is not None and s2.walk.fault is not None
    f = s2.walk.fault if stage2 else walk.fault
    return None, (f"{'stage 2 ' if stage2 else ''}{f.reason}"
                  + (f" at {f.level}" if f.level else ""))


def translate_many(vm, addresses: Iterable[int], cr3: Optional[int] = None):
    """translate() for each address, lazily. When the VM cannot run meanwhile (gdb attached,
    frozen, or found paused) a page cache sits in front of memory for the whole batch."""
    vm.check_open()
    with vm.page_cache():
        for gva in addresses:
            yield translate(vm, gva, cr3)


def translate_batch(vm, addresses, cr3: Optional[int] = None):
    """The chain for many addresses at once, as arrays (batch.BatchTranslation): the fast
    way for large batches; .walk(i, session) gives one element's levels."""
    from . import batch
    vm.check_open()
    vm.require_one_stage("translate --brief")
    try:
        return batch.translate_batch(vm, addresses, cr3)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"addresses must be integers from 0 to 2**64-1: {exc}") from None


def _finish_on_host(vm, t: Translation) -> None:
    gpa = t.gpa
    t.ram = vm.ram_map.ram_at(gpa)
    if t.ram is None:
        t.gpa_note = vm.ram_map.describe(gpa)
        return
    t.hva = t.ram.hva_of(gpa)
    if t.hva is None:
        t.gpa_note = f"QEMU gave no host address for RAM region {t.ram.block!r}"
        return
    if vm.process is None:
        t.gpa_note = vm.process_note
        return
    t.host = vm.process.host_page(t.hva)


def _read_value(vm, t: Translation, cpu) -> None:
    """The 8 bytes at the GVA through the GPA, and the same bytes at the HVA."""
    gpa, size = t.gpa, t.page_size
    in_page = min(VALUE_SIZE, size - gpa % size)
    try:
        value = vm.memory.read(gpa, in_page)
        if in_page < VALUE_SIZE:  # crosses into the next virtual page: walk that one too
            nxt, nxt2 = _walk(vm, cpu, (t.gva + in_page) & MASK64)
            nxt_t = Translation(gva=t.gva + in_page, vcpu=t.vcpu, cr3=t.cr3, walk=nxt,
                                stage2=nxt2)
            if not nxt_t.ok:
                f = nxt2.walk.fault if nxt2 is not None and nxt2.walk.fault else nxt.fault
                t.value_note = (f"the 8 bytes cross into the next page, which is not mapped "
                                f"({f.reason}); showing {in_page} bytes")
            else:
                value += vm.memory.read(nxt_t.gpa, VALUE_SIZE - in_page)
        t.value = value
    except MemoryReadError as exc:
        t.value_note = f"value not read: {exc}"
        return
    if t.host is not None and t.host.status in ("present", "pfn-hidden") \
            and len(value) == VALUE_SIZE \
            and in_page == VALUE_SIZE:
        try:
            t.value_at_hva = vm.process.read(t.hva, VALUE_SIZE)
        except MemoryReadError as exc:
            t.value_note = str(exc)
