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


def translate(vm, gva: int, cr3: Optional[int] = None) -> Translation:
    """Follow one guest virtual address down to the host (with the vCPU's CR3, or `cr3`)."""
    vm.check_open()
    if not 0 <= gva <= MASK64:
        raise UsageError(f"address {gva:#x} does not fit in 64 bits")
    cpu = vm.cpu_state(cr3)
    walk = paging.walk(vm.memory.read, cpu, gva)
    t = Translation(gva=gva, vcpu=vm.vcpu, cr3=paging.root_register(cpu, gva), walk=walk,
                    memory_path=vm.memory.name,
                    qemu_pid=vm.process.pid if vm.process else None,
                    cr3_source="vcpu" if cr3 is None else "given")
    if not walk.ok:
        return t
    _finish_on_host(vm, t)
    _read_value(vm, t)
    return t


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
    try:
        return batch.translate_batch(vm, addresses, cr3)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"addresses must be integers from 0 to 2**64-1: {exc}") from None


def _finish_on_host(vm, t: Translation) -> None:
    gpa = t.walk.pa
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


def _read_value(vm, t: Translation) -> None:
    """The 8 bytes at the GVA through the GPA, and the same bytes at the HVA."""
    gpa = t.walk.pa
    in_page = min(VALUE_SIZE, t.walk.page_size - gpa % t.walk.page_size)
    try:
        value = vm.memory.read(gpa, in_page)
        if in_page < VALUE_SIZE:  # crosses into the next virtual page: walk that one too
            nxt = paging.walk(vm.memory.read, vm.cpu_state(t.cr3), (t.gva + in_page) & MASK64)
            if not nxt.ok:
                t.value_note = (f"the 8 bytes cross into the next page, which is not mapped "
                                f"({nxt.fault.reason}); showing {in_page} bytes")
            else:
                value += vm.memory.read(nxt.pa, VALUE_SIZE - in_page)
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
