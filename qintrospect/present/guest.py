"""Text views of the guest's own processes: the ps table, a process's VMAs beside its page
tables (vmmap --guest-pid)."""

from __future__ import annotations

from typing import List

from .textsafe import printable


def _h(v) -> str:
    return "-" if v is None else f"{v:#x}"


def ps_header(kernel: dict, task_list) -> str:
    where = kernel.get("vmcoreinfo_gpa")
    return (f"# guest kernel {printable(str(kernel.get('osrelease')))} (KASLR offset "
            f"{kernel.get('kerneloffset')}), {len(task_list.tasks)} processes, read from its "
            f"own memory (vmcoreinfo at GPA {where}; {kernel.get('how')})")


def ps_text(task_list) -> str:
    """One line per process: pid, ppid, uid, state, kernel thread, roots, vCPU, comm."""
    lines = [f"{'PID':>6} {'TGID':>6} {'PPID':>6} {'UID':>5} S K  {'ROOT':<12} "
             f"{'USER ROOT':<12} {'VCPU':<5} {'LOADED':<7} COMM"]
    for t in task_list.tasks:
        loaded = ",".join(str(i) for i in t.loaded_on) or "-"
        lines.append(f"{t.pid:>6} {t.tgid:>6} {'-' if t.ppid is None else t.ppid:>6} "
                     f"{'-' if t.uid is None else t.uid:>5} {t.state} {'K' if t.kthread else ' '}"
                     f"  {_h(t.root):<12} {_h(t.user_root):<12} "
                     f"{'-' if t.vcpu is None else t.vcpu:<5} {loaded:<7} {printable(t.proc_name)}"
                     + (f"   ({printable(t.note)})" if t.note else ""))
    return "\n".join(lines)


def kvm_vms_text(vms) -> str:
    """ps --kvm: each VM a guest process holds (guestos.kvm_arm64.GuestKvmVm): its stage 2
    and its vCPUs, and the command that translates as one of them."""
    from ..paging.arm64_stage2 import decode_vtcr
    out: List[str] = []
    for vm in vms:
        v = decode_vtcr(vm.vtcr) if vm.vtcr is not None else {}
        layout = (f"VTCR_EL2 {vm.vtcr:#x}: {v.get('ia_bits')}-bit IPA, {v.get('granule')} "
                  f"granule, start level {v.get('start_level')}") if v else "VTCR_EL2 unknown"
        out.append(f"guest process {vm.pid} ({printable(vm.comm)}): VM fd {vm.fd}, struct kvm "
                   f"{vm.address:#x}")
        out.append(f"  stage 2 root {vm.pgd_phys:#x} (kvm_s2_mmu.pgd_phys), VMID {vm.vmid}; "
                   f"{layout}")
        for c in vm.vcpus:
            where = f"loaded on CPU {c.cpu}" if c.cpu >= 0 else "put (registers saved)"
            out.append(f"  vCPU {c.number}: fd {c.fd}, struct "
                       f"kvm_vcpu {c.address:#x}, {where}, pc {c.pc:#x}, HCR_EL2 {c.hcr:#x}")
        out.extend(f"  note: {printable(n)}" for n in vm.notes)
        if vm.vcpus:
            first = vm.vcpus[0]
            out.append(f"  translate its addresses: qintrospect translate --kvm-vcpu "
                       f"{vm.pid}:{first.number} ADDR")
    return "\n".join(out)


def vma_text(task, root: int, which: str, covered, outside) -> str:
    """The VMAs as /proc/PID/maps shows them, each with how much of it the page tables map,
    and what differs."""
    lines: List[str] = [f"# VMAs of guest process {task.pid} ({printable(task.comm)}), as "
                        f"/proc/{task.pid}/maps lists them, beside root {root:#x} ({which}): "
                        "mapped/pages of each"]
    for c in covered:
        mark = f"   <- differs: {'; '.join(c.differs)}" if c.differs else ""
        lines.append(f"{printable(c.vma.maps_line()):<100} {c.mapped:>6}/{c.pages:<6}{mark}")
    for o in outside:
        lines.append(f"{o.start:08x}-{o.end:08x}  mapped by the page tables, in no VMA   "
                     "<- differs")
    return "\n".join(lines)
