"""Where the guest kernel keeps what we read: member offsets and sizes, from its own BTF only.

FIELDS names each value this room reads, with the struct and the member paths tried in order
(the kernel's own names across versions: task_struct.__state since 5.14, .state before). No
offset is written in code: layout(btf) asks the BTF, and the result (plain numbers, JSON-able)
is what a later command reuses for the same boot (guestos.kernel keeps it). Fields reads
integers at those offsets through a read(va, n) function.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from .errors import GuestOSUnavailable

Read = Callable[[int, int], bytes]

# name: (struct, member paths tried in order)
FIELDS = {
    "list.next": ("list_head", ("next",)),
    "list.prev": ("list_head", ("prev",)),
    "task.tasks": ("task_struct", ("tasks",)),
    "task.pid": ("task_struct", ("pid",)),
    "task.tgid": ("task_struct", ("tgid",)),
    "task.comm": ("task_struct", ("comm",)),
    "task.state": ("task_struct", ("__state", "state")),
    "task.exit_state": ("task_struct", ("exit_state",)),
    "task.flags": ("task_struct", ("flags",)),
    "task.real_parent": ("task_struct", ("real_parent",)),
    "task.real_cred": ("task_struct", ("real_cred",)),
    "task.mm": ("task_struct", ("mm",)),
    "task.signal": ("task_struct", ("signal",)),
    "task.thread_node": ("task_struct", ("thread_node",)),
    "task.worker_private": ("task_struct", ("worker_private",)),
    "kthread.full_name": ("kthread", ("full_name",)),
    "kthread.data": ("kthread", ("data",)),
    "worker.desc": ("worker", ("desc",)),
    "worker.current_work": ("worker", ("current_work",)),
    "worker.pool": ("worker", ("pool",)),
    "signal.thread_head": ("signal_struct", ("thread_head",)),
    "signal.nr_threads": ("signal_struct", ("nr_threads",)),
    "cred.uid": ("cred", ("uid.val", "uid")),
    "cred.gid": ("cred", ("gid.val", "gid")),
    "mm.pgd": ("mm_struct", ("pgd",)),
    "mm.mm_mt": ("mm_struct", ("mm_mt",)),
    "mm.start_brk": ("mm_struct", ("start_brk",)),
    "mm.brk": ("mm_struct", ("brk",)),
    "mm.start_stack": ("mm_struct", ("start_stack",)),
    "mm.context_vdso": ("mm_struct", ("context.vdso",)),
    "uts.release": ("uts_namespace", ("name.release",)),
    "vma.vm_start": ("vm_area_struct", ("vm_start",)),
    "vma.vm_end": ("vm_area_struct", ("vm_end",)),
    "vma.vm_flags": ("vm_area_struct", ("vm_flags", "__vm_flags")),
    "vma.vm_pgoff": ("vm_area_struct", ("vm_pgoff",)),
    "vma.vm_file": ("vm_area_struct", ("vm_file",)),
    "vma.vm_ops": ("vm_area_struct", ("vm_ops",)),
    "vma.vm_private_data": ("vm_area_struct", ("vm_private_data",)),
    "special.name": ("vm_special_mapping", ("name",)),
    "file.dentry": ("file", ("f_path.dentry",)),
    "file.mnt": ("file", ("f_path.mnt",)),
    "file.inode": ("file", ("f_inode",)),
    "dentry.name": ("dentry", ("d_name.name",)),
    "dentry.len": ("dentry", ("d_name.len",)),
    "dentry.parent": ("dentry", ("d_parent",)),
    "mount.mnt": ("mount", ("mnt",)),
    "mount.parent": ("mount", ("mnt_parent",)),
    "mount.mountpoint": ("mount", ("mnt_mountpoint",)),
    "vfsmount.root": ("vfsmount", ("mnt_root",)),
    "inode.ino": ("inode", ("i_ino",)),
    "inode.sb": ("inode", ("i_sb",)),
    "sb.dev": ("super_block", ("s_dev",)),
    "pcpu_hot.current_task": ("pcpu_hot", ("current_task",)),
    # a process's open files (guestos.kvm_arm64: the VMs a VMM holds by file descriptor)
    "task.files": ("task_struct", ("files",)),
    "files.fdt": ("files_struct", ("fdt",)),
    "fdt.max_fds": ("fdtable", ("max_fds",)),
    "fdt.fd": ("fdtable", ("fd",)),
    "file.private_data": ("file", ("private_data",)),
    # KVM/arm64's VM and vCPU (arch/arm64/include/asm/kvm_host.h)
    "kvm.mmu": ("kvm", ("arch.mmu",)),
    "kvm.vtcr": ("kvm", ("arch.vtcr",)),                 # before 6.8; then kvm_s2_mmu.vtcr
    "kvm.pid": ("kvm", ("userspace_pid",)),
    "s2mmu.vmid": ("kvm_s2_mmu", ("vmid.id.counter", "vmid.id")),
    "s2mmu.pgd_phys": ("kvm_s2_mmu", ("pgd_phys",)),
    "s2mmu.vtcr": ("kvm_s2_mmu", ("vtcr",)),
    "s2mmu.arch": ("kvm_s2_mmu", ("arch",)),            # back to its kvm->arch
    "kvm.arch": ("kvm", ("arch",)),
    "kvm_vcpu.kvm": ("kvm_vcpu", ("kvm",)),
    "kvm_vcpu.cpu": ("kvm_vcpu", ("cpu",)),
    "kvm_vcpu.id": ("kvm_vcpu", ("vcpu_id",)),
    "kvm_vcpu.idx": ("kvm_vcpu", ("vcpu_idx",)),
    "kvm_vcpu.hw_mmu": ("kvm_vcpu", ("arch.hw_mmu",)),
    "kvm_vcpu.hcr": ("kvm_vcpu", ("arch.hcr_el2",)),
    "kvm_vcpu.pc": ("kvm_vcpu", ("arch.ctxt.regs.pc",)),
    "kvm_vcpu.pstate": ("kvm_vcpu", ("arch.ctxt.regs.pstate",)),
    "kvm_vcpu.sys_regs": ("kvm_vcpu", ("arch.ctxt.sys_regs",)),
    "kvm_vcpu.pid": ("kvm_vcpu", ("pid",)),             # the thread that runs KVM_RUN
    "pid.tasks": ("pid", ("tasks",)),                   # tasks[PIDTYPE_PID].first
    "task.pid_links": ("task_struct", ("pid_links",)),
}
# enum vcpu_sysreg: where in kvm_vcpu.arch.ctxt.sys_regs[] KVM saves each of a guest's
# EL1 registers (the indices, like the offsets, from BTF)
SYSREGS = ("TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "SCTLR_EL1", "MAIR_EL1")
# the rest are needed for ps; these only for what they add (threads, VMAs, the vCPU, names)
OPTIONAL = frozenset({
    "task.signal", "task.thread_node", "signal.thread_head", "cred.gid", "mm.mm_mt",
    "list.prev", "signal.nr_threads", "mm.context_vdso",
    "task.worker_private", "kthread.full_name", "kthread.data", "worker.desc",
    "worker.current_work", "worker.pool",
    "mm.start_brk", "mm.brk", "mm.start_stack", "uts.release",
    "vma.vm_start", "vma.vm_end", "vma.vm_flags", "vma.vm_pgoff", "vma.vm_file",
    "vma.vm_ops", "vma.vm_private_data", "special.name", "file.dentry", "file.mnt",
    "file.inode", "dentry.name", "dentry.len", "dentry.parent", "mount.mnt", "mount.parent",
    "mount.mountpoint", "vfsmount.root", "inode.ino", "inode.sb", "sb.dev",
    "pcpu_hot.current_task",
    "task.files", "files.fdt", "fdt.max_fds", "fdt.fd", "file.private_data",
    "kvm.mmu", "kvm.vtcr", "kvm.pid", "s2mmu.vmid", "s2mmu.pgd_phys", "s2mmu.vtcr",
    "s2mmu.arch", "kvm.arch",
    "kvm_vcpu.kvm", "kvm_vcpu.cpu", "kvm_vcpu.id", "kvm_vcpu.idx", "kvm_vcpu.hw_mmu",
    "kvm_vcpu.hcr", "kvm_vcpu.pc", "kvm_vcpu.pstate", "kvm_vcpu.sys_regs", "kvm_vcpu.pid",
    "pid.tasks", "task.pid_links",
})
VMA_FIELDS = ("vma.vm_start", "vma.vm_end", "vma.vm_flags", "vma.vm_pgoff", "vma.vm_file",
              "mm.mm_mt")


def layout(btf) -> Dict[str, List[int]]:
    """{field: [byte offset, byte size]} for FIELDS from the kernel's BTF; a missing required
    member raises GuestOSUnavailable (a kernel this reader does not know)."""
    from ..btf import BtfError
    out: Dict[str, List[int]] = {}
    for name, (struct, paths) in FIELDS.items():
        for path in paths:
            try:
                f = btf.member(struct, path)
            except BtfError:
                continue
            if f.is_bitfield or f.bit_offset % 8:
                continue
            out[name] = [f.offset, f.size or btf.ptr_size]
            break
        else:
            if name not in OPTIONAL:
                raise GuestOSUnavailable(
                    f"the guest kernel's BTF has no {struct}.{' or '.join(paths)}: a kernel "
                    "this reader does not know")
    if "kvm_vcpu.sys_regs" in out:
        try:
            index = btf.enum("vcpu_sysreg")
        except BtfError:
            index = {}
        regs_at, regs_size = out["kvm_vcpu.sys_regs"]
        for reg in SYSREGS:
            i = index.get(reg)
            if i is not None and 0 <= i and 8 * (i + 1) <= regs_size:
                out[f"kvm_vcpu.{reg}"] = [regs_at + 8 * i, 8]
    return out


class Fields:
    """Integers at BTF's offsets, read through read(va, n)."""

    def __init__(self, read: Read, fields: Dict[str, List[int]]):
        self.read, self.f = read, fields

    def has(self, *names: str) -> bool:
        return all(n in self.f for n in names)

    def offset(self, name: str) -> int:
        return self.f[name][0]

    def size(self, name: str) -> int:
        return self.f[name][1]

    def get(self, base: int, name: str, signed: bool = False) -> int:
        off, size = self.f[name]
        return int.from_bytes(self.read(base + off, size), "little", signed=signed)

    def maybe(self, base: int, name: str) -> Optional[int]:
        return self.get(base, name) if name in self.f else None

    def span(self, names) -> Tuple[int, int]:
        """(first offset, end) covering the named fields (one read for several)."""
        present = [self.f[n] for n in names if n in self.f]
        return min(o for o, _ in present), max(o + s for o, s in present)


class Snapshot:
    """A struct's bytes read once; Fields-style access into them."""

    def __init__(self, fields: Fields, base: int, lo: int, hi: int):
        self.fields, self.base, self.lo = fields, base, lo
        self.data = fields.read(base + lo, hi - lo)

    def get(self, name: str, signed: bool = False) -> int:
        off, size = self.fields.f[name]
        off -= self.lo
        return int.from_bytes(self.data[off:off + size], "little", signed=signed)

    def raw(self, name: str) -> bytes:
        off, size = self.fields.f[name]
        return self.data[off - self.lo:off - self.lo + size]
