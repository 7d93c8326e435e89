"""The second-level root read from KVM itself: each vCPU's MMU root, exactly, on this host.

KVM keeps every VM on its `vm_list` (a kvm.ko symbol: /proc/kallsyms), each `struct kvm` with
the pid of the process that made it (`userspace_pid`) and its vCPUs (`vcpu_array`, an xarray;
a plain `vcpus[]` array before 5.16). A vCPU's MMU (`arch.root_mmu`: the VM's own GPA -> host
table; `arch.guest_mmu` while it runs a nested guest of its own) holds the root KVM loads
into the VMCS (EPTP) or VMCB (nCR3): `root.hpa` (`root_hpa` before 6.0) and its level
(`root_role.level`). All of it is read through /proc/kcore, at offsets the kernel's own BTF
gives (/sys/kernel/btf): no offset is written here, so another kernel works unchanged.

The offsets and vm_list's address are kept (runstate's cache, per boot and per kvm.ko load)
so that a second command reads neither BTF nor kallsyms. Whatever is missing (kcore, kallsyms hidden, no BTF, a VM not found)
raises Unavailable with the reason: the caller falls back to the scan and says why. A root
read this way is still checked against the pagemap path's answers before it is used.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple

from ..connect import runstate
from ..errors import AttachError, MemoryReadError, QIError
from ..record import field, record

INVALID_PAGE = (1 << 64) - 1      # KVM's hpa_t for "no root"
MAX_VMS = 4096
MAX_VCPUS = 4096
XA_MAX_DEPTH = 12
EPT_WB, EPT_AD = 6, 1 << 6

# (struct, member paths tried in order: the kernel's own names across versions)
FIELDS = {
    "list.next": ("list_head", ("next",)),
    "kvm.vm_list": ("kvm", ("vm_list",)),
    "kvm.pid": ("kvm", ("userspace_pid",)),
    "kvm.vcpu_array": ("kvm", ("vcpu_array.xa_head", "vcpus")),
    "kvm.online_vcpus": ("kvm", ("online_vcpus.counter", "online_vcpus")),
    "xa.shift": ("xa_node", ("shift",)),
    "xa.slots": ("xa_node", ("slots",)),
    "vcpu.id": ("kvm_vcpu", ("vcpu_id",)),
    "vcpu.idx": ("kvm_vcpu", ("vcpu_idx",)),
    "vcpu.mmu": ("kvm_vcpu", ("arch.mmu",)),
    "vcpu.root_mmu": ("kvm_vcpu", ("arch.root_mmu",)),
    "vcpu.guest_mmu": ("kvm_vcpu", ("arch.guest_mmu",)),
    "vcpu.nested_mmu": ("kvm_vcpu", ("arch.nested_mmu",)),
    "vcpu.hflags": ("kvm_vcpu", ("arch.hflags",)),
    "mmu.root": ("kvm_mmu", ("root.hpa", "root_hpa")),
    "mmu.level": ("kvm_mmu", ("root_role.level", "mmu_role.base.level", "shadow_root_level")),
    "mmu.smm": ("kvm_mmu", ("root_role.smm", "mmu_role.base.smm")),
}
OPTIONAL = ("vcpu.idx", "vcpu.nested_mmu", "mmu.smm", "vcpu.hflags", "xa.shift", "xa.slots")
# arch.hflags' HF_GUEST_MASK: a #define (not in BTF), bit 0 since KVM's nested support began
HF_GUEST_MASK = 1


class Unavailable(AttachError):
    """KVM's own vCPUs cannot be read here; the message says why (the caller may scan)."""


@record
class VcpuRoot:
    """One vCPU's MMU as KVM holds it."""
    index: int                   # vcpu_idx (QEMU's cpu-index)
    vcpu_id: int                 # the APIC id KVM was given
    address: int                 # struct kvm_vcpu
    root: Optional[int]          # root_mmu's root: the VM's GPA -> host table (None: none now)
    level: Optional[int]         # its walk length (4 or 5)
    smm: Optional[bool]          # the root is the vCPU's SMM table
    active: str                  # the MMU the vCPU runs with now: root_mmu, guest_mmu, ...
    active_root: Optional[int]   # that MMU's root (a nested guest's shadow table: guest_mmu)
    guest_mode: Optional[bool]   # running a nested guest of its own (hflags, debugfs)
    eptp: Optional[int] = None   # Intel: the EPTP KVM builds for root (memory type, length, A/D)

    def to_dict(self) -> dict:
        h = _hex
        return {"index": self.index, "vcpu_id": self.vcpu_id, "struct_kvm_vcpu": h(self.address),
                "root": h(self.root), "level": self.level, "smm": self.smm,
                "eptp": h(self.eptp), "active_mmu": self.active,
                "active_root": h(self.active_root), "guest_mode": self.guest_mode}


@record
class KvmVm:
    """A VM as KVM keeps it: its struct kvm and its vCPUs' roots."""
    address: int
    pid: int
    vendor: str                  # "intel" (EPT) or "amd" (NPT)
    vcpus: List[VcpuRoot] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def root_of(self, vcpu: int = 0) -> Optional[VcpuRoot]:
        """The vCPU whose root_mmu root stands for the VM's table: `vcpu` if it has a valid
        non-SMM root, else the first that has one."""
        usable = [v for v in self.vcpus if v.root is not None and not v.smm]
        return next((v for v in usable if v.index == vcpu), usable[0] if usable else None)

    def to_dict(self) -> dict:
        return {"struct_kvm": _hex(self.address), "pid": self.pid, "vendor": self.vendor,
                "vcpus": [v.to_dict() for v in self.vcpus], "notes": self.notes,
                "seconds": round(self.seconds, 4)}


def _hex(v):
    return None if v is None else f"{v:#x}"


# ---- the layout: offsets from BTF, kept per boot -------------------------------------------

LAYOUT_CACHE = "kvm-layout"
PROC_KALLSYMS, SYS_BTF = "/proc/kallsyms", "/sys/kernel/btf"


def _cache_key() -> Optional[str]:
    """The kernel and the loaded kvm.ko as they are now: the boot, and kvm.ko's address."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open("/proc/modules") as f:
            kvm = next((line.split()[-1] for line in f if line.startswith("kvm ")), None)
    except OSError:
        return None
    return f"boot={boot} kvm={kvm}" if kvm else None


def kernel_facts(kallsyms_path: str = PROC_KALLSYMS, btf_folder: str = SYS_BTF
                 ) -> Tuple[int, Dict[str, Tuple[int, Optional[int], int]]]:
    """(vm_list's address, layout()): from kallsyms and BTF, or, for this very boot and
    kvm.ko, from what an earlier command kept."""
    key = _cache_key() if (kallsyms_path, btf_folder) == (PROC_KALLSYMS, SYS_BTF) else None
    if key is not None:
        try:
            kept = runstate.cached(LAYOUT_CACHE, key)
        except (runstate.RunStateError, OSError):
            kept = None
        if isinstance(kept, dict) and isinstance(kept.get("vm_list"), int) \
                and isinstance(kept.get("fields"), dict) \
                and set(FIELDS) - set(OPTIONAL) <= set(kept["fields"]):
            return kept["vm_list"], {k: tuple(v) for k, v in kept["fields"].items()}
    head, fields = _vm_list_address(kallsyms_path), layout(btf_folder)
    if key is not None:
        try:
            runstate.cache(LAYOUT_CACHE, key, {"vm_list": head, "fields": fields})
        except (runstate.RunStateError, OSError):
            pass
    return head, fields


def _vm_list_address(kallsyms_path: str) -> int:
    from ..btf import Kallsyms
    from ..btf.errors import KallsymsError, KallsymsRestricted
    try:
        return Kallsyms.read(kallsyms_path, names=("vm_list",)).address("vm_list", module="kvm")
    except KallsymsRestricted as exc:
        raise Unavailable(f"kallsyms hides kernel addresses here ({exc})") from None
    except KallsymsError as exc:
        raise Unavailable(f"KVM's vm_list is not in {kallsyms_path} ({exc}): is kvm.ko "
                          "loaded, and the kernel built with CONFIG_KALLSYMS_ALL?") from None


def layout(btf_folder: str = SYS_BTF) -> Dict[str, Tuple[int, Optional[int], int]]:
    """{field: (bit offset, bit size or None, byte size)} for FIELDS, from the kernel's BTF
    (kvm.ko's over vmlinux's)."""
    from ..btf import Btf, BtfError
    try:
        vmlinux = Btf.load(os.path.join(btf_folder, "vmlinux"))
        kvm_path = os.path.join(btf_folder, "kvm")
        btf = Btf.load(kvm_path, base=vmlinux) if os.path.exists(kvm_path) else vmlinux
    except (BtfError, OSError) as exc:
        raise Unavailable(f"no BTF for the kernel or kvm.ko ({exc}); it is needed to read "
                          "KVM's structures (a kernel built with CONFIG_DEBUG_INFO_BTF)") \
            from None
    out = {}
    for name, (struct, paths) in FIELDS.items():
        for path in paths:
            try:
                f = btf.member(struct, path)
            except BtfError:
                continue
            out[name] = (f.bit_offset, f.bit_size, f.size or 8)
            if name == "xa.slots":
                out["xa.chunk"] = (f.resolved.nelems or 0, None, 0)
            if name == "kvm.vcpu_array":
                out["kvm.xarray"] = (1 if path.startswith("vcpu_array") else 0, None, 0)
            break
        else:
            if name not in OPTIONAL:
                raise Unavailable(f"this kernel's BTF has no {struct}.{' or '.join(paths)}: "
                                  "a KVM this reader does not know")
    return out


class _Reader:
    def __init__(self, read, fields):
        self.read, self.f = read, fields

    def get(self, base: int, name: str) -> Optional[int]:
        """The integer at base + field (a bitfield's bits), or None for an absent optional."""
        spec = self.f.get(name)
        if spec is None:
            return None
        bit, bits, size = spec
        if bits is None:
            return int.from_bytes(self.read(base + bit // 8, size), "little")
        first, last = bit // 8, (bit + bits - 1) // 8
        raw = int.from_bytes(self.read(base + first, last - first + 1), "little")
        return (raw >> (bit % 8)) & ((1 << bits) - 1)

    def offset(self, name: str) -> int:
        return self.f[name][0] // 8


# ---- reading the VM -----------------------------------------------------------------------

def read_vm(pid: int, memory=None, vendor: Optional[str] = None,
            kallsyms_path: str = PROC_KALLSYMS, btf_folder: str = SYS_BTF,
            debugfs_vcpus: Optional[Dict[int, dict]] = None) -> KvmVm:
    """The VM QEMU process `pid` made, with every vCPU's root, read from KVM's structures.
    memory: a KcoreMemory (opened here if None). Unavailable (exit 3) with the reason when it
    cannot be read; never a guess: a VM not found, or two for one pid, is said."""
    from ..machine.hostcpu import vendor as cpu_vendor
    t0 = time.perf_counter()
    if memory is None:
        from ..memory.kcore import KcoreMemory
        try:
            memory = KcoreMemory()
        except AttachError as exc:
            raise Unavailable(str(exc)) from None
    head, fields = kernel_facts(kallsyms_path, btf_folder)
    if not memory.covers(head):
        raise Unavailable(f"/proc/kcore does not show the modules' area (kvm.ko's vm_list at "
                          f"{head:#x}): a kernel that leaves it out of kcore")
    r = _Reader(memory.read_virtual, fields)
    vendor = vendor or cpu_vendor() or "amd"
    try:
        vms = [k for k in _vm_list(r, head) if r.get(k, "kvm.pid") == pid]
    except (QIError, OSError) as exc:
        raise Unavailable(f"KVM's vm_list could not be read: {exc}") from None
    if not vms:
        raise Unavailable(f"KVM has no VM made by process {pid} (its vm_list names the VMs' "
                          "processes): is that QEMU using KVM on this host?")
    if len(vms) > 1:
        raise Unavailable(f"process {pid} made {len(vms)} KVM VMs "
                          f"({', '.join(hex(v) for v in vms)}): which one is QEMU's cannot "
                          "be told from here")
    vm = KvmVm(vms[0], pid, vendor)
    try:
        for vcpu in _vcpus(r, vm.address):
            vm.vcpus.append(_vcpu_root(r, vcpu, vendor, (debugfs_vcpus or {})))
    except (QIError, OSError) as exc:
        raise Unavailable(f"the vCPUs of KVM's VM {vm.address:#x} could not be read: {exc}") \
            from None
    if not vm.vcpus:
        raise Unavailable(f"KVM's VM {vm.address:#x} (process {pid}) has no vCPU yet")
    vm.seconds = time.perf_counter() - t0
    return vm


def _vm_list(r: _Reader, head: int) -> List[int]:
    """The struct kvm addresses on vm_list, bounded, a loop refused."""
    out, seen = [], {head}
    node = r.get(head, "list.next")
    while node != head:
        if node in seen or not node or len(out) >= MAX_VMS:
            raise MemoryReadError(f"KVM's vm_list is broken at {node:#x} (a loop, a NULL, or "
                                  f"more than {MAX_VMS} VMs): read while it changed?", node)
        seen.add(node)
        out.append(node - r.offset("kvm.vm_list"))
        node = r.get(node, "list.next")
    return out


def _vcpus(r: _Reader, kvm: int) -> List[int]:
    """The struct kvm_vcpu addresses of a VM, in index order."""
    count = r.get(kvm, "kvm.online_vcpus")
    if count is None or not 0 <= count <= MAX_VCPUS:
        raise MemoryReadError(f"struct kvm {kvm:#x} says {count} vCPUs", kvm)
    base = kvm + r.offset("kvm.vcpu_array")
    if not r.f.get("kvm.xarray", (0,))[0]:          # before 5.16: struct kvm_vcpu *vcpus[]
        return [p for p in (int.from_bytes(r.read(base + 8 * i, 8), "little")
                            for i in range(count)) if p]
    entries = _xa_items(r, int.from_bytes(r.read(base, 8), "little"))
    return [entries[i] for i in sorted(entries) if i < count]


def _xa_items(r: _Reader, head: int) -> Dict[int, int]:
    """{index: pointer} of an xarray from its head (lib/xarray.c): an entry whose low bits
    are 10 and above 4096 is a node (+2); a head that is not a node is index 0's entry."""
    out: Dict[int, int] = {}
    if not head:
        return out
    if head & 3 != 2 or head < 4096:
        if not head & 3:
            out[0] = head
        return out
    chunk = r.f["xa.chunk"][0]
    stack, seen = [(head - 2, 0, 0)], set()
    while stack:
        node, base, depth = stack.pop()
        if node in seen or depth > XA_MAX_DEPTH:
            raise MemoryReadError(f"an xarray node {node:#x} seen twice or nested too deep",
                                  node)
        seen.add(node)
        shift = r.get(node, "xa.shift")
        slots = r.read(node + r.offset("xa.slots"), 8 * chunk)
        for i in range(chunk):
            e = int.from_bytes(slots[8 * i:8 * i + 8], "little")
            index = base + (i << shift)
            if not e or e & 3 == 1:
                continue
            if e & 3 == 2:
                if e > 4096 and shift:
                    stack.append((e - 2, index, depth + 1))
                continue                              # siblings, retry and zero markers
            if not e & 3:
                out[index] = e
    return out


def _vcpu_root(r: _Reader, vcpu: int, vendor: str, debugfs: Dict[int, dict]) -> VcpuRoot:
    index = r.get(vcpu, "vcpu.idx")
    vcpu_id = r.get(vcpu, "vcpu.id")
    index = vcpu_id if index is None else index
    root_mmu = vcpu + r.offset("vcpu.root_mmu")
    active = r.get(vcpu, "vcpu.mmu")
    names = {root_mmu: "root_mmu", vcpu + r.offset("vcpu.guest_mmu"): "guest_mmu"}
    if "vcpu.nested_mmu" in r.f:
        names[vcpu + r.offset("vcpu.nested_mmu")] = "nested_mmu"
    root, level = _root(r, root_mmu)
    smm = r.get(root_mmu, "mmu.smm")
    guest_mode = debugfs.get(index, {}).get("guest_mode")
    if guest_mode is None and "vcpu.hflags" in r.f:
        guest_mode = bool(r.get(vcpu, "vcpu.hflags") & HF_GUEST_MASK)
    elif guest_mode is not None:
        guest_mode = bool(guest_mode)
    active_root = _root(r, active)[0] if active in names else None
    eptp = None
    if vendor == "intel" and root is not None:
        eptp = root | EPT_WB | ((level or 4) - 1) << 3 | (EPT_AD if _ept_ad() else 0)
    return VcpuRoot(index, vcpu_id, vcpu, root, level, None if smm is None else bool(smm),
                    names.get(active, f"? ({active:#x})"), active_root, guest_mode, eptp)


def _root(r: _Reader, mmu: int) -> Tuple[Optional[int], Optional[int]]:
    hpa = r.get(mmu, "mmu.root")
    if hpa in (None, INVALID_PAGE, 0) or hpa & 0xFFF:
        return None, None
    return hpa, r.get(mmu, "mmu.level")


def _ept_ad() -> bool:
    """kvm_intel's eptad: KVM sets the EPTP's A/D bit for the VM's own table when on."""
    try:
        with open("/sys/module/kvm_intel/parameters/eptad") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False
