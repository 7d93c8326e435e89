"""The guest kernel from its own memory, with no symbol files: its vmcoreinfo note (found in
guest RAM), kallsyms (decoded from the tables the note names), BTF (between __start_BTF and
__stop_BTF), and what they let us read: the task list (tasks.py) and a process's VMAs
(vmas.py). Read-only, bounded, offsets from BTF only; kept per guest boot (kernel.py)."""

from ..errors import QIError
from .errors import AmbiguousProcess, GuestOSUnavailable, NoSuchProcess
from .kernel import GuestKernel, open_kernel
from .kmem import KernelFault, KernelMemory
from .tasks import GuestTask, TaskList, current_tasks, walk_tasks

__all__ = ["GuestKernel", "open_kernel", "KernelMemory", "KernelFault", "GuestTask",
           "TaskList", "walk_tasks", "current_tasks", "GuestOSUnavailable", "NoSuchProcess",
           "AmbiguousProcess", "processes", "find_process"]


def processes(vm, kernel=None, include_idle: bool = False, threads: bool = False,
              progress=None, want=None) -> TaskList:
    """Every process of an attached VM's guest (and with threads, each one's other threads),
    each with its roots and vCPU. progress: for the first look for the kernel (a RAM scan)."""
    import time
    t0 = time.perf_counter()
    from . import arm64
    kernel = kernel or open_kernel(vm, progress=progress)
    on_arm64 = arm64.is_arm64(vm.cpu_state())
    if on_arm64:        # TTBR0's table and ASID; `current` in SP_EL0 while in the kernel
        roots = arm64.process_roots(vm)
        current = arm64.sp_el0(vm)
    else:
        roots = {v.index: (v.root, v.pcid) for v in vm.vcpu_info}
        current = current_tasks(kernel, len(vm.vcpu_info))
    out = walk_tasks(kernel, vm.cached_memory().read, roots, current,
                     include_idle=include_idle, threads=threads, want=want)
    if on_arm64:
        known = set(current)
        out.notes += _place_guest_runners(kernel, vm, out, known)
        out.notes += arm64.place_by_root(out, roots, known, threads,
                                         lambda t: _nr_threads(kernel, t))
    elif not current:
        out.notes.append("which vCPU runs what is not known: the kernel's per-CPU current "
                         "task was not found")
    if vm.live:
        out.notes.append("the VM ran while the list was read: it may have changed meanwhile")
    out.seconds = time.perf_counter() - t0
    return out


def _place_guest_runners(kernel, vm, task_list, known: set) -> list:
    """The vCPUs that run a guest of the guest's own KVM (aarch64): the VMM thread whose KVM
    vCPU is loaded there (guestos.kvm_arm64.guest_runners) gets the vCPU when it is listed
    (ps --threads, or the process's first thread); said in a note either way. Adds the
    vCPUs placed so to `known`."""
    from ..record import replace
    from . import kvm_arm64
    notes = []
    for cpu, (thread, gvm, v) in sorted(kvm_arm64.guest_runners(kernel, vm,
                                                                task_list.tasks).items()):
        try:
            tid = kernel.fields.get(thread, "task.pid", signed=True)
        except (QIError, OSError):
            continue
        hits = [i for i, t in enumerate(task_list.tasks) if t.task == thread]
        if hits:
            task_list.tasks[hits[0]] = replace(task_list.tasks[hits[0]], vcpu=cpu)
        notes.append(f"vCPU {cpu} runs a guest of {gvm.pid} ({gvm.comm}): its KVM vCPU "
                     f"{v.vcpu_id}, on thread {tid}"
                     + ("" if hits else " (ps --threads lists it)"))
        known.add(cpu)
    return notes


def _nr_threads(kernel, task):
    """signal->nr_threads of a task (None: not known)."""
    f = kernel.fields
    if not f.has("task.signal", "signal.nr_threads"):
        return None
    try:
        signal = f.get(task.task, "task.signal")
        return f.get(signal, "signal.nr_threads", signed=True) if signal else None
    except (QIError, OSError):
        return None


def find_process(vm, pid=None, comm=None, kernel=None, progress=None) -> GuestTask:
    """The guest process with this pid, or the one process called `comm`. NoSuchProcess or
    AmbiguousProcess (exit 2) otherwise; a kernel thread has no page-table root of its own:
    also NoSuchProcess, said so."""
    if (pid is None) == (comm is None):
        from ..errors import UsageError
        raise UsageError("name a guest process by --guest-pid or by --guest-comm (one)")
    # only the tasks that may be it are read whole: by pid, or by a comm the name may
    # begin with (a kernel thread's full name is longer than its 15-byte comm)
    if pid is not None:
        def want(p, c):
            return p == pid
    else:
        def want(p, c):
            return c == comm or (len(c) >= 15 and comm.startswith(c))
    found = processes(vm, kernel, progress=progress, want=want)
    hits = found.find(pid=pid, comm=comm)
    what = f"pid {pid}" if pid is not None else f"comm {comm!r}"
    if not hits:
        cut = f" (the task list was read only in part: {found.cut})" if found.cut else ""
        raise NoSuchProcess(f"no guest process with {what}{cut}; `qintrospect ps` lists "
                            "them")
    if len(hits) > 1:
        listed = ", ".join(f"{t.pid} ({t.comm})" for t in hits[:20])
        raise AmbiguousProcess(f"{len(hits)} guest processes have {what}: {listed}; "
                               "choose one with --guest-pid")
    task = hits[0]
    if task.root is None:
        why = "a kernel thread" if task.kthread else (task.note or "no mm")
        raise NoSuchProcess(f"guest process {task.pid} ({task.comm}) has no page tables of "
                            f"its own ({why})")
    return task
