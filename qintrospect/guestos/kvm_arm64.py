"""The VMs a guest's own KVM/arm64 runs (a guest that is a hypervisor: L1 with L2 under it),
read in the guest kernel's memory, as guestos reads its processes: offsets from its BTF only.

A VMM holds its VM and each vCPU by file descriptor: files KVM made with anon_inode_getfile,
named "kvm-vm" and "kvm-vcpu:N" (/proc/PID/fd shows "anon_inode:kvm-vm"), whose private_data
is the struct kvm / struct kvm_vcpu. So a process's fd table (task->files->fdt) leads to its
VMs without any data symbol (Debian's arm64 kallsyms names functions only: no vm_list).

What each gives:
- struct kvm: arch.mmu (struct kvm_s2_mmu: pgd_phys, the stage 2 table's root as a physical
  address of the guest that runs KVM; vmid.id, the VMID in its low VTCR_EL2.VS ? 16 : 8 bits,
  a rollover generation above), arch.vtcr (kvm_s2_mmu.vtcr since 6.8): VTTBR_EL2/VTCR_EL2
  as KVM loads them for this VM (kvm_get_vttbr: pgd_phys | VMID << 48).
- struct kvm_vcpu: arch.hw_mmu (the stage 2 it runs on), arch.hcr_el2, the saved context
  (arch.ctxt: pc, pstate, sys_regs[] indexed by enum vcpu_sysreg), and `cpu`: the CPU the
  vCPU is loaded on (-1 when put). On a VHE host a loaded vCPU's EL1 registers live in that
  CPU's own EL1 registers (kvm_vcpu_load_sysregs_vhe), not in sys_regs[]: they are read
  there.

Bounded: at most MAX_FDS descriptors and MAX_VCPUS vCPUs per process; a pointer that does not
read ends that item with a note, never an exception.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..errors import QIError
from ..record import field, record
from .errors import GuestOSUnavailable, NoKvmStructures, NoSuchKvmVcpu

MAX_FDS = 4096
MAX_VCPUS = 512
VM_FILE, VCPU_FILE = "kvm-vm", "kvm-vcpu:"
VTCR_VS = 1 << 19               # VTCR_EL2.VS: 16-bit VMIDs
NEEDED = ("task.files", "files.fdt", "fdt.max_fds", "fdt.fd", "file.private_data",
          "file.dentry", "dentry.name", "kvm.mmu", "s2mmu.pgd_phys", "s2mmu.vmid",
          "kvm_vcpu.kvm", "kvm_vcpu.cpu", "kvm_vcpu.id", "kvm_vcpu.hw_mmu", "kvm_vcpu.hcr",
          "kvm_vcpu.pstate", "kvm_vcpu.pc")
SYSREG_FIELDS = {"ttbr0": "TTBR0_EL1", "ttbr1": "TTBR1_EL1", "tcr": "TCR_EL1",
                 "sctlr": "SCTLR_EL1", "mair": "MAIR_EL1"}


@record
class GuestKvmVcpu:
    """One vCPU of a VM the guest's KVM runs, as KVM holds it."""
    fd: int
    address: int                    # struct kvm_vcpu
    vcpu_id: int
    index: Optional[int]            # vcpu_idx
    cpu: int                        # the guest's CPU it is loaded on, -1: put (saved)
    mmu: int                        # arch.hw_mmu: the struct kvm_s2_mmu it runs on
    hcr: int                        # arch.hcr_el2, what KVM loads into HCR_EL2 for it
    pc: int                         # arch.ctxt.regs: as last saved (at its last exit)
    pstate: int
    saved: Dict[str, int] = field(default_factory=dict)   # arch.ctxt.sys_regs[]: ttbr0, ...

    @property
    def number(self) -> int:
        """What --kvm-vcpu PID:N takes: vcpu_idx, or the vcpu_id when KVM has no index."""
        return self.vcpu_id if self.index is None else self.index

    def to_dict(self) -> dict:
        h = _hex
        return {"fd": self.fd, "struct_kvm_vcpu": h(self.address), "vcpu_id": self.vcpu_id,
                "index": self.index, "loaded_on_cpu": None if self.cpu < 0 else self.cpu,
                "hw_mmu": h(self.mmu), "hcr_el2": h(self.hcr), "pc": h(self.pc),
                "pstate": h(self.pstate),
                "saved_sysregs": {SYSREG_FIELDS[k]: h(v) for k, v in self.saved.items()}}


@record
class GuestKvmVm:
    """A VM the guest's KVM runs for one of its processes: its stage 2 and its vCPUs."""
    pid: int                        # the process whose descriptor holds it
    comm: str
    fd: int
    address: int                    # struct kvm
    mmu: int                        # &kvm->arch.mmu
    pgd_phys: int                   # the stage 2 root (a physical address of this guest)
    vmid: int                       # the VMID field of VTTBR_EL2
    vtcr: Optional[int]
    vcpus: List[GuestKvmVcpu] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def vttbr(self) -> int:
        """VTTBR_EL2 as KVM builds it for this VM (kvm_get_vttbr, without CnP)."""
        return self.pgd_phys | self.vmid << 48

    def to_dict(self) -> dict:
        h = _hex
        return {"pid": self.pid, "comm": self.comm, "fd": self.fd, "struct_kvm": h(self.address),
                "pgd_phys": h(self.pgd_phys), "vmid": self.vmid, "vttbr_el2": h(self.vttbr),
                "vtcr_el2": h(self.vtcr), "vcpus": [v.to_dict() for v in self.vcpus],
                "notes": self.notes}


def _hex(v):
    return None if v is None else f"{v:#x}"


def open_files(kernel, task: int, limit: int = MAX_FDS):
    """(fd, struct file, dentry name) of each open descriptor of the task at `task` (a
    process's table: its threads share it), the first `limit`. The name of a file that is
    not an anonymous inode's (its dentry has a parent other than itself: a file anyone can
    name "kvm-vm" on a real file system) is given with a leading "/"."""
    f = kernel.fields
    files = f.get(task, "task.files")
    if not files:
        return []
    fdt = f.get(files, "files.fdt")
    n = min(f.get(fdt, "fdt.max_fds"), limit)
    array = f.get(fdt, "fdt.fd")
    if not n or not array:
        return []
    raw = kernel.mem.read(array, 8 * n)
    out = []
    for fd in range(n):
        file = int.from_bytes(raw[8 * fd:8 * fd + 8], "little")
        if not file:
            continue
        try:
            dentry = f.get(file, "file.dentry")
            name = kernel.mem.string(f.get(dentry, "dentry.name"), 64) if dentry else ""
            if dentry and f.has("dentry.parent") and f.get(dentry, "dentry.parent") != dentry:
                name = "/" + name           # (anon_inode_getfile's dentries are their own root)
        except (QIError, OSError):
            name = ""
        out.append((fd, file, name))
    return out


def vms_of(kernel, task) -> List[GuestKvmVm]:
    """The KVM VMs the guest process `task` (guestos.GuestTask) holds, each with the vCPUs
    it holds. GuestOSUnavailable when the kernel's BTF lacks KVM/arm64's structures."""
    f = kernel.fields
    missing = [n for n in NEEDED if not f.has(n)]
    if missing:
        raise NoKvmStructures(
            f"the guest kernel {kernel.osrelease} has no KVM/arm64 structures in its BTF "
            f"(no {', '.join(missing[:4])}): built without KVM, or not arm64")
    try:
        files = open_files(kernel, task.task)
    except (QIError, OSError) as e:
        raise GuestOSUnavailable(f"guest process {task.pid}'s file table does not read: "
                                 f"{e}") from None
    vms: Dict[int, GuestKvmVm] = {}
    vcpus, notes = [], []
    for fd, file, name in files:
        if name != VM_FILE and not name.startswith(VCPU_FILE):
            continue
        try:
            data = f.get(file, "file.private_data")
            if name == VM_FILE:
                vms[data] = _vm(kernel, task, fd, data)
            elif len(vcpus) < MAX_VCPUS:
                vcpus.append(_vcpu(kernel, fd, data))
        except (QIError, OSError, ValueError) as e:
            notes.append(f"descriptor {fd} ({name}) does not read as KVM's: {e}")
    if notes and not vms:
        raise GuestOSUnavailable(f"guest process {task.pid}: {'; '.join(notes[:3])}")
    for v, kvm in vcpus:
        owner = vms.get(kvm)
        if owner is not None:
            owner.vcpus.append(v)
    for vm in vms.values():
        vm.vcpus.sort(key=lambda v: v.number)
        vm.notes.extend(notes)
    return sorted(vms.values(), key=lambda vm: vm.fd)


def all_vms(kernel, tasks):
    """(every VM the processes among `tasks` hold, what did not read): each process once
    (its threads share its fd table). NoKvmStructures when the kernel has none to read."""
    vms: List[GuestKvmVm] = []
    notes: List[str] = []
    for t in tasks:
        if not t.mm or t.kthread or getattr(t, "tgid", t.pid) != t.pid:
            continue
        try:
            vms += vms_of(kernel, t)
        except NoKvmStructures:
            raise
        except GuestOSUnavailable as e:         # one process that does not read: said
            notes.append(str(e))
    return vms, notes


def _vm(kernel, task, fd: int, kvm: int) -> GuestKvmVm:
    f = kernel.fields
    mmu = kvm + f.offset("kvm.mmu")
    if f.has("s2mmu.arch", "kvm.arch") and f.get(mmu, "s2mmu.arch") != kvm + f.offset("kvm.arch"):
        raise ValueError(f"{kvm:#x} is no struct kvm (its arch.mmu.arch does not point back "
                         "at its arch)")
    vtcr = f.get(mmu, "s2mmu.vtcr") if f.has("s2mmu.vtcr") else f.maybe(kvm, "kvm.vtcr")
    vmid_bits = 16 if vtcr is not None and vtcr & VTCR_VS else 8
    vmid = f.get(mmu, "s2mmu.vmid") & ((1 << vmid_bits) - 1)
    return GuestKvmVm(pid=getattr(task, "tgid", task.pid), comm=task.comm, fd=fd, address=kvm,
                      mmu=mmu,
                      pgd_phys=f.get(mmu, "s2mmu.pgd_phys"), vmid=vmid, vtcr=vtcr)


def _vcpu(kernel, fd: int, vcpu: int):
    f = kernel.fields
    saved = {k: f.get(vcpu, f"kvm_vcpu.{reg}") for k, reg in SYSREG_FIELDS.items()
             if f.has(f"kvm_vcpu.{reg}")}
    v = GuestKvmVcpu(fd=fd, address=vcpu, vcpu_id=f.get(vcpu, "kvm_vcpu.id", signed=True),
                     index=f.maybe(vcpu, "kvm_vcpu.idx"),
                     cpu=f.get(vcpu, "kvm_vcpu.cpu", signed=True),
                     mmu=f.get(vcpu, "kvm_vcpu.hw_mmu"), hcr=f.get(vcpu, "kvm_vcpu.hcr"),
                     pc=f.get(vcpu, "kvm_vcpu.pc"), pstate=f.get(vcpu, "kvm_vcpu.pstate"),
                     saved=saved)
    return v, f.get(vcpu, "kvm_vcpu.kvm")


def vcpu_thread(kernel, vcpu: GuestKvmVcpu) -> Optional[int]:
    """The task_struct of the thread that runs `vcpu` (kvm_vcpu.pid, the thread of its last
    KVM_RUN: pid->tasks[PIDTYPE_PID].first is that task's pid_links[PIDTYPE_PID]), or None."""
    f = kernel.fields
    if not f.has("kvm_vcpu.pid", "pid.tasks", "task.pid_links"):
        return None
    pid = f.get(vcpu.address, "kvm_vcpu.pid")
    node = kernel.mem.u64(pid + f.offset("pid.tasks")) if pid else 0
    return node - f.offset("task.pid_links") if node else None


def guest_runners(kernel, vm, tasks) -> Dict[int, tuple]:
    """{vCPU: (thread's task_struct, GuestKvmVm, GuestKvmVcpu)} for each vCPU that runs a
    guest now (a live stage 2): the KVM vCPU loaded on it in a VM whose VTTBR_EL2 is the live
    one, among the VMs of the processes (`tasks`, guestos.GuestTask) whose table that vCPU's
    TTBR0_EL2 holds (the VMM). Nothing for what does not read."""
    from .arm64 import process_roots
    inside = {v.index: v for v in vm.vcpu_info if getattr(v, "stage2", None) is not None}
    if not inside:
        return {}
    out: Dict[int, tuple] = {}
    for cpu, (root, _) in process_roots(vm).items():
        if cpu not in inside:
            continue
        for task in (t for t in tasks if t.root == root and not t.kthread
                     and getattr(t, "tgid", t.pid) == t.pid):    # processes (threads share)
            try:
                for gvm in vms_of(kernel, task):
                    if gvm.vttbr != inside[cpu].vttbr & ~1:
                        continue
                    for v in gvm.vcpus:
                        thread = vcpu_thread(kernel, v) if v.cpu == cpu else None
                        if thread:
                            out[cpu] = (thread, gvm, v)
            except (QIError, OSError):
                continue
    return out


def registers(vm, guest_vm: GuestKvmVm, vcpu: GuestKvmVcpu):
    """(machine.arm64.Arm64Vcpu, where its EL1 registers came from): vCPU `vcpu` of
    `guest_vm` as the CPU would hold it while it runs, to translate that VM's addresses
    through both stages: its EL1 registers (from the CPU it is loaded on, else as KVM saved
    them), KVM's HCR_EL2 for it, and VTTBR_EL2/VTCR_EL2 built from its VM's stage 2. The
    selected vCPU's ID and EL2 registers are kept (the same machine)."""
    from ..machine.arm64 import HCR_DC, HCR_VM, Arm64Vcpu
    from ..record import replace
    here = vm.vcpu_info[vm.vcpu]
    if not isinstance(here, Arm64Vcpu):
        raise GuestOSUnavailable("KVM/arm64's vCPUs are read on an aarch64 guest only")
    if guest_vm.vtcr is None:
        raise GuestOSUnavailable(f"VM fd {guest_vm.fd} of guest process {guest_vm.pid}: its "
                                 "VTCR_EL2 is not in the guest kernel's BTF")
    if not vcpu.hcr & (HCR_VM | HCR_DC):
        raise GuestOSUnavailable(f"vCPU {vcpu.vcpu_id} of guest process {guest_vm.pid}: KVM's "
                                 f"HCR_EL2 for it ({vcpu.hcr:#x}) enables no stage 2")
    if vcpu.mmu != guest_vm.mmu:
        raise GuestOSUnavailable(
            f"vCPU {vcpu.vcpu_id} of guest process {guest_vm.pid} runs on another stage 2 "
            f"(hw_mmu {vcpu.mmu:#x}, not its VM's {guest_vm.mmu:#x}: a nested guest's)")
    if 0 <= vcpu.cpu < len(vm.vcpu_info):
        live = vm.vcpu_info[vcpu.cpu]
        regs = dict(ttbr0=live.ttbr0, ttbr1=live.ttbr1, tcr=live.tcr, sctlr=live.sctlr,
                    mair=live.mair)
        where = (f"loaded on the guest's CPU {vcpu.cpu}: its EL1 registers are that vCPU's "
                 "own (VHE keeps them there)")
        cpsr = live.cpsr if live.stage2 is not None else vcpu.pstate
        if live.stage2 is None and set(vcpu.saved) == set(SYSREG_FIELDS) and \
                any(regs[k] != vcpu.saved[k] for k in SYSREG_FIELDS):
            # the CPU is in its host: KVM may be loading this vCPU's registers into it (it
            # marks the vCPU loaded first) or the guest changed them since it was last put
            where += ("; but that CPU's EL1 registers and KVM's saved copy differ: stopped "
                      "while KVM loads them, or changed since the vCPU was last put (the "
                      "CPU's are used)")
    else:
        missing = [SYSREG_FIELDS[k] for k in SYSREG_FIELDS if k not in vcpu.saved]
        if missing:
            raise GuestOSUnavailable(f"the guest kernel's BTF does not say where KVM saves "
                                     f"{', '.join(missing)}")
        regs = dict(vcpu.saved)
        where = "not loaded: its EL1 registers as KVM saved them (kvm_vcpu.arch.ctxt)"
        cpsr = vcpu.pstate
    if here.stage2 is not None:            # the selected vCPU runs a guest now: this VM?
        same = here.vttbr & ~1 == guest_vm.vttbr          # (bit 0: CnP)
        loaded_here = vcpu.cpu == vm.vcpu
        if same:
            where += f"; vCPU {vm.vcpu} runs this VM now: its VTTBR_EL2 {here.vttbr:#x} agrees"
        elif loaded_here:                   # KVM says this vCPU is there: it must agree
            where += (f"; vCPU {vm.vcpu} runs it, but its VTTBR_EL2 {here.vttbr:#x} DIFFERS "
                      "from the VM's")
        else:
            where += f"; vCPU {vm.vcpu} runs another VM now (VTTBR_EL2 {here.vttbr:#x})"
    view = replace(here, ttbr0=regs["ttbr0"], ttbr1=regs["ttbr1"], tcr=regs["tcr"],
                   sctlr=regs["sctlr"], mair=regs["mair"], cpsr=cpsr & 0xFFFFFFFF,
                   hcr=vcpu.hcr, vttbr=guest_vm.vttbr, vtcr=guest_vm.vtcr,
                   stage2_source=describe_source(guest_vm, vcpu, where))
    return view, where


def find_vcpu(vms: List[GuestKvmVm], pid: int, index: int):
    """(VM, vCPU) of process `pid`'s vCPU `index` (vcpu_idx; the vcpu_id when KVM has no
    index), or NoSuchKvmVcpu (exit 2) naming what there is."""
    if not vms:
        raise NoSuchKvmVcpu(f"guest process {pid} holds no KVM VM (no kvm-vm file among "
                                 "its descriptors)")
    for vm in vms:
        for v in vm.vcpus:
            if v.number == index:
                return vm, v
    have = ", ".join(f"VM fd {vm.fd}: vCPUs " + (", ".join(
        str(v.number) for v in vm.vcpus) or "none")
        for vm in vms)
    raise NoSuchKvmVcpu(f"guest process {pid} has no KVM vCPU {index} ({have})")


def describe_source(guest_vm: GuestKvmVm, vcpu: GuestKvmVcpu, where: str) -> str:
    return (f"KVM in the guest: VM of process {guest_vm.pid} ({guest_vm.comm}, fd "
            f"{guest_vm.fd}, struct kvm {guest_vm.address:#x}), vCPU {vcpu.vcpu_id}: "
            f"kvm_s2_mmu.pgd_phys {guest_vm.pgd_phys:#x}, VMID {guest_vm.vmid}; {where}")

