"""The guest's processes: the task list from init_task, read at BTF's offsets.

Every process (thread-group leader) is on init_task.tasks; /proc lists the same ones. Per
task: pid, tgid, ppid (real_parent's tgid, as /proc/PID/status's PPid), comm, state (the
letter /proc shows, computed as fs/proc/array.c's task_state_index does), uid (real_cred's),
a kernel thread or not (PF_KTHREAD), and its page-table root: mm->pgd as a guest-physical
address, and under KPTI the user copy 4 KiB above it. Which vCPU runs it now comes from each
CPU's current task (per-CPU current_task, or pcpu_hot.current_task since 6.2; Linux's CPU n
taken as QEMU's vCPU n, the order of the firmware's processor list under -smp); which vCPUs
have its root loaded from their CR3 (Linux keeps the last process's tables loaded while a
kernel thread or the idle task runs: a loaded root is not a running task).

The walk is bounded: a loop, the cap, a NULL or a pointer into nowhere ends it with a note
(TaskList.cut), never a hang. With the VM running, a task that exits while the list is read
is a broken link like any other.
"""

from __future__ import annotations

import struct
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import MemoryReadError, QIError
from ..record import field, record
from .arm64 import is_arm64
from .layout import Snapshot

MAX_TASKS = 1 << 16
PAGE = 4096
# include/linux/sched.h: #define constants, which BTF does not carry
PF_KTHREAD = 0x00200000
PF_WQ_WORKER = 0x00000020
NAME_LEN = 64                        # proc_task_name's buffer
TASK_REPORT = 0x7F
TASK_IDLE = 0x402
TASK_RTLOCK_WAIT = 0x1000
TASK_REPORT_IDLE = 0x80
STATE_LETTERS = "RSDTtXZPI"          # fs/proc/array.c task_state_array, by fls(state)
TASK_FIELDS = ("task.tasks", "task.pid", "task.tgid", "task.comm", "task.state",
               "task.exit_state", "task.flags", "task.real_parent", "task.real_cred",
               "task.mm")


@record(frozen=True)
class GuestTask:
    pid: int
    tgid: int
    ppid: Optional[int]
    comm: str
    state: str                      # R S D T t X Z P I, as /proc/PID/status
    uid: Optional[int]
    kthread: bool
    task: int                       # struct task_struct's address
    mm: Optional[int] = None        # struct mm_struct's address (None: a kernel thread)
    pgd: Optional[int] = None       # mm->pgd, a kernel virtual address
    root: Optional[int] = None      # its guest-physical address: the page-table root
    user_root: Optional[int] = None  # KPTI: the user copy (root + 4 KiB); None without KPTI
    vcpu: Optional[int] = None      # the vCPU that runs this task now
    loaded_on: Tuple[int, ...] = ()  # vCPUs whose CR3 holds one of its roots
    pcids: Tuple[Optional[int], ...] = ()   # the PCID in each of those CR3s (None: PCIDs off)
    note: Optional[str] = None      # what could not be read of it
    name: Optional[str] = None      # as /proc/PID/status's Name: (None: the comm)

    @property
    def proc_name(self) -> str:
        """The name /proc shows: a kernel thread's full name, a workqueue worker's comm with
        its workqueue (`kworker/0:1-events`), else the comm."""
        return self.name or self.comm

    def root_for(self, address: Optional[int] = None) -> Optional[int]:
        """The root that translates `address` as this process sees it: under KPTI the user
        copy for a user address (the kernel copy marks user pages NX), the kernel copy for a
        kernel one."""
        if self.user_root is not None and (address is None or address < 1 << 63):
            return self.user_root
        return self.root

    def to_dict(self) -> dict:
        h = _hex
        return {"pid": self.pid, "tgid": self.tgid, "ppid": self.ppid, "comm": self.comm,
                "name": self.proc_name,
                "state": self.state, "uid": self.uid, "kthread": self.kthread,
                "task": h(self.task), "mm": h(self.mm), "pgd": h(self.pgd),
                "root": h(self.root), "user_root": h(self.user_root), "vcpu": self.vcpu,
                "loaded_on": list(self.loaded_on),
                "pcids": [None if p is None else f"{p:#x}" for p in self.pcids],
                "note": self.note}


@record
class TaskList:
    """What a walk of the task list found; `cut` says why it stopped early (None: whole)."""
    tasks: List[GuestTask] = field(default_factory=list)
    cut: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    osrelease: str = "?"
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.cut is None

    def find(self, pid: Optional[int] = None, comm: Optional[str] = None) -> List[GuestTask]:
        return [t for t in self.tasks if (pid is None or t.pid == pid)
                and (comm is None or t.comm == comm or t.proc_name == comm)]


def _hex(v):
    return None if v is None else f"{v:#x}"


def state_letter(state: int, exit_state: int) -> str:
    """/proc's state letter for task_struct.__state and .exit_state."""
    report = (state | exit_state) & TASK_REPORT
    if state == TASK_IDLE:
        report = TASK_REPORT_IDLE
    if state == TASK_RTLOCK_WAIT:
        report = 0x2
    return STATE_LETTERS[report.bit_length()] if report.bit_length() < len(STATE_LETTERS) \
        else "?"


def user_copy(read_phys, root: int) -> Optional[int]:
    """The KPTI user copy of the top-level table at `root`, or None: an 8 KiB aligned pair
    whose upper page repeats the lower's user half (NX masked: Linux sets it in the kernel
    copy's user entries), and is not empty."""
    if root % (2 * PAGE):
        return None
    try:
        kernel_copy = read_phys(root, PAGE // 2)
        user = read_phys(root + PAGE, PAGE // 2)
    except MemoryReadError:
        return None
    if not any(user):
        return None
    mask = (1 << 63) - 1
    a = struct.unpack(f"<{PAGE // 16}Q", kernel_copy)
    b = struct.unpack(f"<{PAGE // 16}Q", user)
    return root + PAGE if all(x & mask == y & mask for x, y in zip(a, b)) else None


def current_tasks(kernel, ncpus: int) -> Dict[int, int]:
    """{cpu: its current task's address}, from per-CPU data; {} where the kernel does not
    say (no __per_cpu_offset, current_task or pcpu_hot in its kallsyms)."""
    syms, f = kernel.symbols, kernel.fields
    base = syms.get("__per_cpu_offset")
    if base is None:
        return {}
    if "current_task" in syms:
        var = syms["current_task"]
    elif "pcpu_hot" in syms and f.has("pcpu_hot.current_task"):
        var = syms["pcpu_hot"] + f.offset("pcpu_hot.current_task")
    else:
        return {}
    out = {}
    try:
        offsets = struct.unpack(f"<{ncpus}Q", kernel.mem.read(base, 8 * ncpus))
        for cpu, off in enumerate(offsets):
            out[cpu] = kernel.mem.u64((off + var) & (1 << 64) - 1)
    except (QIError, OSError):
        pass
    return out


def walk_tasks(kernel, read_phys, vcpu_roots: Dict[int, Tuple[int, Optional[int]]],
               current: Dict[int, int], max_tasks: int = MAX_TASKS,
               include_idle: bool = False, threads: bool = False,
               want: Optional[Callable[[int, str], bool]] = None) -> TaskList:
    """Every process on the guest's task list, in list order (init_task itself, pid 0, only
    with include_idle); with threads, each process's other threads after it (its signal's
    thread_head list). vcpu_roots: {vCPU: (its CR3's root, its PCID or None)}; current:
    {vCPU: task address}. want(pid, comm): keep only the tasks it takes (the others' pid and
    comm only are read: a look-up by pid or name walks the list at a fraction of the cost)."""
    f = kernel.fields
    out = TaskList(osrelease=kernel.osrelease)
    head = kernel.symbol("init_task")
    link = f.offset("task.tasks")
    nxt = link + f.offset("list.next")
    lo, hi = f.span(TASK_FIELDS)
    running = {task: cpu for cpu, task in current.items()}
    seen = {head + link}
    addr = head
    threads = threads and f.has("task.signal", "task.thread_node", "signal.thread_head")
    try:
        while True:
            if addr != head or include_idle:
                s = Snapshot(f, addr, lo, hi)
                if want is None or want(s.get("task.pid", signed=True), _comm(s)):
                    out.tasks.append(_task(kernel, read_phys, addr, lo, hi, vcpu_roots,
                                           running, s))
                if threads and addr != head:
                    _threads(kernel, read_phys, addr, lo, hi, vcpu_roots, running, out,
                             max_tasks)
            node = kernel.mem.u64(addr + nxt)           # tasks.next
            if node == head + link:
                break
            if node == 0:
                out.cut = f"NULL next pointer after {len(out.tasks)} tasks"
                break
            if node in seen:
                out.cut = (f"loop: the task list comes back to {node:#x} after "
                           f"{len(out.tasks)} tasks without reaching init_task")
                break
            if len(out.tasks) >= max_tasks:
                out.cut = f"stopped at {max_tasks} tasks"
                break
            seen.add(node)
            addr = node - link
    except (QIError, OSError) as e:
        out.cut = f"the task list breaks after {len(out.tasks)} tasks: {e}"
    return out


def _threads(kernel, read_phys, leader: int, lo: int, hi: int, vcpu_roots, running,
             out: TaskList, max_tasks: int) -> None:
    """The leader's other threads (signal->thread_head, linked by thread_node), appended to
    out; a broken thread list is a note, the process list goes on."""
    f, mem = kernel.fields, kernel.mem
    link = f.offset("task.thread_node")
    nxt = f.offset("list.next")
    try:
        signal = f.get(leader, "task.signal")
        if not signal:
            return
        head = signal + f.offset("signal.thread_head")
        seen, node = {head}, mem.u64(head + nxt)
        while node != head:
            if node == 0 or node in seen or len(out.tasks) >= max_tasks:
                why = "a NULL" if node == 0 else "a loop" if node in seen else "the cap"
                out.notes.append(f"the threads of task {leader:#x} end at {why}")
                return
            seen.add(node)
            task = node - link
            if task != leader:
                out.tasks.append(_task(kernel, read_phys, task, lo, hi, vcpu_roots, running))
            node = mem.u64(node + nxt)
    except (QIError, OSError) as e:
        out.notes.append(f"the threads of task {leader:#x} could not be read: {e}")


def _comm(s: Snapshot) -> str:
    return s.raw("task.comm").split(b"\0", 1)[0].decode("utf-8", "replace")


def _task(kernel, read_phys, addr: int, lo: int, hi: int, vcpu_roots, running,
          s: Optional[Snapshot] = None) -> GuestTask:
    f = kernel.fields
    s = s or Snapshot(f, addr, lo, hi)
    pid, tgid = s.get("task.pid", signed=True), s.get("task.tgid", signed=True)
    comm = _comm(s)
    state = state_letter(s.get("task.state"), s.get("task.exit_state"))
    flags = s.get("task.flags")
    notes = []
    ppid = uid = None
    try:
        parent = s.get("task.real_parent")
        ppid = f.get(parent, "task.tgid", signed=True) if parent else None
    except (QIError, OSError) as e:
        notes.append(f"real_parent unreadable: {e}")
    try:
        cred = s.get("task.real_cred")
        uid = f.get(cred, "cred.uid") if cred else None
    except (QIError, OSError) as e:
        notes.append(f"real_cred unreadable: {e}")
    mm = s.get("task.mm") or None
    pgd = root = user = None
    if mm is not None:
        try:
            pgd = f.get(mm, "mm.pgd")
            root = kernel.mem.translate(pgd)
            # aarch64: the root is what TTBR0 holds; KPTI there swaps TTBR1, not TTBR0
            user = None if is_arm64(kernel.mem.cpu) else user_copy(read_phys, root)
        except (QIError, OSError) as e:
            notes.append(f"mm {mm:#x} unreadable: {e}")
    loaded = tuple(sorted(cpu for cpu, (r, _) in vcpu_roots.items()
                          if root is not None and r in (root, user)))
    pcids = tuple(vcpu_roots[cpu][1] for cpu in loaded)
    name = None
    if flags & PF_KTHREAD and f.has("task.worker_private"):
        try:
            name = _kthread_name(kernel, s.get("task.worker_private"), comm, flags)
        except (QIError, OSError) as e:
            notes.append(f"kernel thread's name unreadable: {e}")
    return GuestTask(pid, tgid, ppid, comm, state, uid, bool(flags & PF_KTHREAD), addr, mm,
                     pgd, root, user, running.get(addr), loaded, pcids,
                     "; ".join(notes) or None, name)


def _kthread_name(kernel, kthread: int, comm: str, flags: int) -> Optional[str]:
    """As fs/proc/array.c's proc_task_name: a workqueue worker's comm + '+' (working) or '-'
    and its description (wq_worker_comm); another kernel thread's full_name, when it has
    one longer than the comm (get_kthread_comm). None: the comm itself."""
    f, mem = kernel.fields, kernel.mem
    if not kthread:
        return None
    if flags & PF_WQ_WORKER:
        if not f.has("kthread.data", "worker.desc", "worker.pool", "worker.current_work"):
            return None
        worker = f.get(kthread, "kthread.data")
        if not worker or not f.get(worker, "worker.pool"):
            return None
        desc = mem.read(worker + f.offset("worker.desc"), f.size("worker.desc"))
        desc = desc.split(b"\0", 1)[0].decode("utf-8", "replace")
        if not desc:
            return None
        mark = "+" if f.get(worker, "worker.current_work") else "-"
        return (comm + mark + desc)[:NAME_LEN - 1]
    if not f.has("kthread.full_name"):
        return None
    full = f.get(kthread, "kthread.full_name")
    return mem.string(full, NAME_LEN - 1) if full else None
