"""The guest's own processes (qintrospect.guestos) as commands use them: the list (ps), one
process named by pid or comm and the root that translates as it does (--guest-pid,
--guest-comm), its VMAs beside its page tables (vmmap --guest-pid), and the processes
whose roots are among a set (who-maps naming them)."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from ..record import field, record


def processes(vm, include_idle: bool = False, threads: bool = False, progress=None):
    """guestos.TaskList of an attached VM (with threads: every thread, after its process)."""
    from .. import guestos
    vm.check_open()
    return guestos.processes(vm, include_idle=include_idle, threads=threads,
                             progress=progress)


def process(vm, pid: Optional[int] = None, comm: Optional[str] = None, progress=None):
    """guestos.GuestTask: the one process with that pid or comm (NoSuchProcess,
    AmbiguousProcess: exit 2)."""
    from .. import guestos
    vm.check_open()
    return guestos.find_process(vm, pid=pid, comm=comm, progress=progress)


def root_for(task, addresses: Iterable[int] = ()) -> Tuple[int, str]:
    """(root, which) translating `addresses` as the process sees them: under KPTI the user
    copy when every address is a user one, else the kernel copy."""
    addresses = list(addresses)
    if task.user_root is not None and all(a < 1 << 63 for a in addresses):
        return task.user_root, "KPTI user copy"
    if task.user_root is not None:
        return task.root, "KPTI kernel copy (a kernel address among them)"
    return task.root, "mm->pgd"


def vmas(vm, task):
    """guestos.vmas.VmaList of a process."""
    from .. import guestos
    from ..guestos.vmas import vmas as read_vmas
    vm.check_open()
    return read_vmas(guestos.open_kernel(vm), task)


@record
class VmaCoverage:
    """A VMA set beside the page-table leaves in its range."""
    vma: object                      # guestos.vmas.GuestVma
    pages: int                       # 4 KiB pages the VMA spans
    mapped: int                      # of them mapped by present leaves
    differs: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = self.vma.to_dict()
        d.update(maps_line=self.vma.maps_line(), pages=self.pages, mapped_pages=self.mapped,
                 differs=self.differs)
        return d


@record
class Outside:
    """Present user leaves in no VMA: a range the page tables map that the kernel's VMAs do
    not name."""
    start: int
    end: int

    def to_dict(self) -> dict:
        return {"outside_vmas": True, "start": f"{self.start:#x}", "end": f"{self.end:#x}"}


def coverage(vma_list, leaves) -> Tuple[List[VmaCoverage], List[Outside]]:
    """Each VMA with how much of it the leaves map and where their rights go beyond its
    permissions (a writable leaf in a VMA without w, an executable one without x); the user
    leaves no VMA holds."""
    import numpy as np
    va = leaves.va.astype(np.uint64)
    end = va + leaves.size.astype(np.uint64)
    user = leaves.user
    out, covered = [], np.zeros(len(va), bool)
    for v in vma_list:
        lo, hi = np.uint64(v.start), np.uint64(v.end)
        inside = (va < hi) & (end > lo)
        covered |= inside
        clipped = (np.minimum(end[inside], hi) - np.maximum(va[inside], lo)).sum()
        differs = []
        if (leaves.writable[inside] & user[inside]).any() and v.perms[1] != "w":
            differs.append("a writable leaf in a VMA without w")
        if (leaves.executable[inside] & user[inside]).any() and v.perms[2] != "x":
            differs.append("an executable leaf in a VMA without x")
        if inside.any() and not user[inside].all():
            differs.append("a supervisor-only leaf inside the VMA")
        out.append(VmaCoverage(v, (v.end - v.start) // 4096, int(clipped) // 4096, differs))
    stray = np.flatnonzero(user & ~covered)
    outside: List[Outside] = []
    for i in stray.tolist():
        s, e = int(va[i]), int(end[i])
        if outside and outside[-1].end == s:
            outside[-1] = Outside(outside[-1].start, e)
        else:
            outside.append(Outside(s, e))
    return out, outside


def names_for_roots(task_list, roots: Iterable[int]) -> Dict[int, List[Tuple[int, str]]]:
    """{root: [(pid, comm), ...]} of the processes whose kernel or user root is one of
    `roots` (threads share their process's)."""
    wanted = set(roots)
    out: Dict[int, List[Tuple[int, str]]] = {}
    for t in task_list.tasks:
        for r in (t.root, t.user_root):
            if r is not None and r in wanted:
                out.setdefault(r, []).append((t.pid, t.comm))
    return out


def name_processes(vm, results) -> None:
    """who-maps: each mapping's processes (pid, comm) by the roots that reach it, read from
    the guest kernel's own memory; when it cannot be read, a note says why and the mappings
    stay unnamed."""
    from ..guestos import GuestOSUnavailable
    from ..errors import QIError
    if not any(w.reaches for w in results):
        return      # no mapping to name: the guest kernel is not looked for (a scan of its RAM)
    try:
        task_list = processes(vm)
    except GuestOSUnavailable as exc:
        for w in results:
            w.notes.append(f"processes not named: {exc}")
        return
    except QIError as exc:
        for w in results:
            w.notes.append(f"processes not named: the guest kernel could not be read ({exc})")
        return
    names = names_for_roots(task_list, [r for w in results for x in w.reaches for r in x.roots])
    for w in results:
        for reach in w.reaches:
            found = []
            for r in reach.roots:
                for item in names.get(r, []):
                    if item not in found:
                        found.append(item)
            reach.processes = tuple(found)
        if task_list.cut:
            w.notes.append(f"processes named from a task list read only in part: "
                           f"{task_list.cut}")


def kvm_vms(vm, task):
    """guestos.kvm_arm64.GuestKvmVm of each VM the guest process `task` holds by descriptor
    (a guest that is itself a KVM/arm64 host)."""
    from .. import guestos
    from ..guestos import kvm_arm64
    vm.check_open()
    return kvm_arm64.vms_of(guestos.open_kernel(vm), task)


def all_kvm_vms(vm, tasks):
    """guestos.kvm_arm64.all_vms: (every VM the processes among `tasks` hold, notes)."""
    from .. import guestos
    from ..guestos import kvm_arm64
    vm.check_open()
    return kvm_arm64.all_vms(guestos.open_kernel(vm), tasks)


def use_kvm_vcpu(vm, pid: int, index: int = 0, progress=None):
    """From now on translate as vCPU `index` of the KVM VM guest process `pid` runs (its
    VMM): that vCPU's EL1 registers and its VM's stage 2, from the guest kernel's memory
    (guestos.kvm_arm64.registers). Returns (GuestKvmVm, GuestKvmVcpu, where its EL1
    registers came from)."""
    from ..guestos import kvm_arm64
    task = process(vm, pid=pid, progress=progress)
    guest_vm, vcpu = kvm_arm64.find_vcpu(kvm_vms(vm, task), pid, index)
    registers, where = kvm_arm64.registers(vm, guest_vm, vcpu)
    vm.use_registers(registers)
    return guest_vm, vcpu, where
