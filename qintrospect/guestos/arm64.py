"""What reading an aarch64 Linux guest's kernel takes beyond what x86-64's does: the parts of
guestos that depend on the architecture, each named here and small. The rest of the room (the
note scan, kallsyms, BTF, the task list, the maple tree of VMAs) reads either architecture.

- Kernel virtual reads go through TTBR1 (the upper range: the kernel's tables, swapper_pg_dir);
  `kernel_state` gives the vCPU's registers with TTBR1 set to a root. The kernel's own table is
  found from the note alone: SYMBOL(swapper_pg_dir) - NUMBER(kimage_voffset) (the kernel
  image's VA minus its PA, KASLR included), then each vCPU's TTBR1 (with KPTI a vCPU at EL0
  holds the trampoline's table there, which maps no kernel data).
- Debian's arm64 kernels are built without CONFIG_KALLSYMS_ALL: kallsyms names functions only
  (the range _stext.._etext and the init text), not init_task, __start_BTF/__stop_BTF or any
  per-CPU variable. So the BTF is found by its header in the kernel image's read-only data
  (between _etext and _sinittext, where the linker script puts .BTF), and init_task by its
  contents in the image's data after _einittext: comm "swapper...", pid 0, a kernel thread
  with no mm, its own real_parent, and a task list whose next entry points back at it.
- A task's page-table root is mm->pgd's physical address: what TTBR0_EL1 holds (its base;
  the ASID is in TTBR1 under TCR_EL1.A1=1, Linux's choice). No KPTI user copy beside it.
- Which task a vCPU runs: in the kernel (EL1, or EL2 on a VHE host) Linux keeps `current` in
  SP_EL0 (read from the gdbstub's system registers); at EL0, and in the few instructions of
  exception entry where SP_EL0 still holds the user stack pointer, the process whose root is
  in TTBR0 (a thread of it: the vCPU is given to it only when it has one thread, or when the
  threads are listed and one alone has that root).
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

from ..btf.errors import BtfError
from ..errors import MemoryReadError, QIError

PAGE = 4096
CHUNK = 1 << 20
# struct btf_header's first 8 bytes (little-endian): magic 0xeb9f, version 1, flags 0,
# hdr_len 24 (include/uapi/linux/btf.h)
BTF_HEAD = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"
MAX_BTF = 64 << 20
MAX_RODATA = 64 << 20           # bytes of _etext.._sinittext scanned for the BTF at most
MAX_DATA = 48 << 20             # bytes after _einittext scanned for init_task at most
MAX_TRIES = 16                  # BTF headers tried
INIT_COMM = b"swapper"          # INIT_TASK_COMM; init_idle() makes it "swapper/0"
PF_KTHREAD = 0x00200000


def is_arm64(cpu) -> bool:
    from .. import paging
    return cpu is not None and paging.arch_of(cpu) == "aarch64"


# ---- the kernel's tables -----------------------------------------------------------------

def kernel_state(cpu, root: Optional[int] = None):
    """The vCPU's Arm64State reading the kernel: TTBR1 = `root` (a table's physical address;
    None: the vCPU's own), in the EL1&0 regime (or a VHE host's EL2&0, whose TTBR1_EL2 holds
    its kernel). A vCPU at EL2 without VHE gives the EL1 registers, which are the kernel's."""
    from ..record import replace
    regime = cpu.regime if cpu.regime == "EL2&0" else "EL1&0"
    return replace(cpu, ttbr1=cpu.ttbr1 if root is None else root, regime=regime)


def reading_state(v):
    """The registers that read this vCPU's own kernel: its regime's (Arm64Vcpu.state), or,
    while it runs a guest of a VHE host (a live stage 2), the host's EL2&0 ones (TTBR1_EL2
    keeps the host kernel's table, TTBR0_EL2 the VMM's). None: a guest of a host without VHE
    (the host's tables are not in any register then)."""
    if getattr(v, "stage2", None) is None:
        return v.state
    return v.host_state


def kernel_root(cpu) -> int:
    """The first table of TTBR1's range, as the walk takes it."""
    from ..paging.arm64_format import range_params, ttbr_base
    return ttbr_base(range_params(cpu, 1))


def image_root(vi) -> Optional[int]:
    """swapper_pg_dir's physical address from the note alone (its SYMBOL() minus
    NUMBER(kimage_voffset)), or None when the note lacks either or the result is no page."""
    va = vi.symbols.get("swapper_pg_dir")
    voff = vi.numbers.get("kimage_voffset")
    if va is None or voff is None:
        return None
    pa = (va - voff) & ((1 << 64) - 1)
    return pa if pa % PAGE == 0 and pa < 1 << 52 else None


def kernel_roots(vm, vi) -> List[int]:
    """Tables to read the kernel through: swapper_pg_dir (from the note), then each vCPU's
    TTBR1 (the session's vCPU first)."""
    out: List[int] = []
    first = image_root(vi) if vi is not None else None
    if first is not None:
        out.append(first)
    order = [vm.vcpu] + [i for i in range(len(vm.vcpu_info)) if i != vm.vcpu]
    for i in order:
        try:
            r = kernel_root(reading_state(vm.vcpu_info[i]))
        except (QIError, ValueError, AttributeError):
            continue
        if r and r not in out:
            out.append(r)
    return out


def process_roots(vm) -> Dict[int, Tuple[int, Optional[int]]]:
    """{vCPU: (TTBR0's table, the ASID)}: which process's tables each vCPU holds (a vCPU
    inside a guest of a VHE host: the host's TTBR0_EL2, the VMM that runs that guest)."""
    from ..paging.arm64_format import range_params, ttbr_base
    out = {}
    for v in vm.vcpu_info:
        try:
            if getattr(v, "stage2", None) is None:
                out[v.index] = (v.table(0), v.pcid)
            elif v.host_state is not None:
                host = v.host_state
                asid = (host.ttbr1 if host.tcr >> 22 & 1 else host.ttbr0) >> 48
                out[v.index] = (ttbr_base(range_params(host, 0)), asid)
        except (QIError, ValueError):
            continue
    return out


# ---- what kallsyms does not name ---------------------------------------------------------

def _scan(read, start: int, end: int, needle: bytes):
    """Each address in [start, end) where `needle` begins, read a chunk at a time through
    read(va, n); a chunk that does not read whole is read a page at a time, and pages that
    do not translate (the freed init sections, unmapped after boot) are skipped."""
    pos = start
    while pos < end:
        n = min(CHUNK - pos % CHUNK, end - pos)
        try:
            pieces = [(pos, read(pos, n))]
        except (MemoryReadError, OSError):
            pieces = []
            page = pos
            while page < pos + n:
                m = min(PAGE - page % PAGE, pos + n - page)
                try:
                    pieces.append((page, read(page, m)))
                except (MemoryReadError, OSError):
                    pass
                page += m
        for at, data in pieces:
            # a needle across a piece's end: the next bytes, if they read
            more = b""
            if len(needle) > 1 and at + len(data) < end:
                try:
                    more = read(at + len(data), min(len(needle) - 1, end - at - len(data)))
                except (MemoryReadError, OSError):
                    more = b""
            buf = data + more
            hit = buf.find(needle)
            while 0 <= hit < len(data):
                yield at + hit
                hit = buf.find(needle, hit + 1)
        pos += n


def btf_candidates(read, start: int, end: int):
    """(address, size) of each struct btf_header in [start, end) whose sections are laid out
    as the kernel's build lays them (types at 0, strings right after, a string section
    beginning with NUL) and fit the window: the kernel's BTF is the first that parses."""
    end = min(end, start + MAX_RODATA)
    for at in _scan(read, start, end, BTF_HEAD):
        if at % 4:
            continue
        try:
            type_off, type_len, str_off, str_len = struct.unpack("<4I", read(at + 8, 16))
        except (MemoryReadError, OSError):
            continue
        size = 24 + str_off + str_len
        if type_off != 0 or str_off != type_len or not type_len or not str_len \
                or size > MAX_BTF or at + size > end:
            continue
        try:
            if read(at + 24 + str_off, 1) != b"\0":
                continue
        except (MemoryReadError, OSError):
            continue
        yield at, size


def looks_like_init_task(fields, read_u64, task: int) -> bool:
    """Whether `task` holds init_task: pid and tgid 0, a kernel thread, no mm, its own
    real_parent, and a task list whose next entry's prev comes back to it."""
    f = fields
    try:
        if f.get(task, "task.pid") != 0 or f.get(task, "task.tgid") != 0:
            return False
        if not f.get(task, "task.flags") & PF_KTHREAD or f.get(task, "task.mm"):
            return False
        if f.get(task, "task.real_parent") != task:
            return False
        link = task + f.offset("task.tasks")
        node = read_u64(link + f.offset("list.next"))
        if not node or node == link:
            return node == link          # a list of init_task alone (nothing else forked)
        prev = f.offset("list.prev") if f.has("list.prev") else f.offset("list.next") + 8
        return read_u64(node + prev) == link
    except (QIError, OSError):
        return False


def find_init_task(fields, read, read_u64, start: int, end: int) -> int:
    """init_task's address: the first struct in [start, end) whose comm begins "swapper" and
    that looks_like_init_task. LookupError if none."""
    comm = fields.offset("task.comm")
    end = min(end, start + MAX_DATA)
    for at in _scan(read, start, end, INIT_COMM):
        task = at - comm
        if task % 8 or task < start:
            continue
        if looks_like_init_task(fields, read_u64, task):
            return task
    raise LookupError(f"no init_task in {start:#x}..{end:#x}")


def locate(mem, ks, symbols: dict, btf_parse, layout) -> Tuple[dict, object, dict]:
    """What kallsyms did not give, found in the image: (symbols with __start_BTF/__stop_BTF
    and init_task added, the parsed BTF, {what: how it was found}). `btf_parse(blob, name)`
    and `layout(btf)` are kernel.py's. Raises LookupError naming what is missing."""
    how: Dict[str, str] = {}
    bounds = {}
    for name in ("_etext", "_sinittext", "_einittext"):
        hits = {s.address for s in ks.lookup(name)}
        if len(hits) == 1:
            bounds[name] = hits.pop()
    btf = None
    if "__start_BTF" not in symbols or "__stop_BTF" not in symbols:
        if "_etext" not in bounds or "_sinittext" not in bounds:
            raise LookupError("kallsyms has neither __start_BTF nor _etext/_sinittext")
        why = f"no BTF header in _etext.._sinittext ({bounds['_etext']:#x}..)"
        for tries, (start, size) in enumerate(btf_candidates(mem.read, bounds["_etext"],
                                                             bounds["_sinittext"])):
            if tries >= MAX_TRIES:
                break
            try:
                btf = btf_parse(mem.read(start, size), f"the guest kernel's BTF ({start:#x}, "
                                "found by its header in the kernel's read-only data)")
                break
            except (BtfError, MemoryReadError) as e:
                why = f"the BTF header at {start:#x} does not lead to BTF: {e}"
        if btf is None:
            raise LookupError(why)
        symbols = dict(symbols, __start_BTF=start, __stop_BTF=start + size)
        how["btf"] = (f"header scan of _etext.._sinittext: {start:#x}, {size} bytes")
    fields = None
    if "init_task" not in symbols:
        if "_einittext" not in bounds:
            raise LookupError("kallsyms has neither init_task nor _einittext")
        if btf is None:
            start, stop = symbols["__start_BTF"], symbols["__stop_BTF"]
            btf = btf_parse(mem.read(start, stop - start), "the guest kernel's BTF")
        fields = layout(btf)
        from .layout import Fields
        f = Fields(mem.read, fields)
        task = find_init_task(f, mem.read, mem.u64, bounds["_einittext"],
                              bounds["_einittext"] + MAX_DATA)
        symbols = dict(symbols, init_task=task)
        how["init_task"] = f"contents scan of the data after _einittext: {task:#x}"
    return symbols, btf, how


# ---- which task each vCPU runs -----------------------------------------------------------

def sp_el0(vm) -> Dict[int, int]:
    """{vCPU: SP_EL0} of the vCPUs in the kernel (EL1; EL2 on a VHE host), where Linux keeps
    `current`; {} without a gdbstub that shows SP_EL0."""
    gdb = getattr(vm, "gdb", None)
    if gdb is None:
        return {}
    try:
        if not gdb.has_register("SP_EL0"):
            return {}
    except (QIError, OSError):
        return {}
    out = {}
    try:
        for v in vm.vcpu_info:
            if v.cpl not in (1, 2) or getattr(v, "stage2", None) is not None:
                continue            # (inside a guest, SP_EL0 is the guest's)
            gdb.select_vcpu(v.index)
            value = gdb.registers(("SP_EL0",))["SP_EL0"]
            if value >> 63:                 # a kernel address (the user stack pointer not)
                out[v.index] = value
    except (QIError, OSError, KeyError):
        pass
    finally:
        try:
            gdb.select_vcpu(vm.vcpu)
        except (QIError, OSError):
            pass
    return out


def place_by_root(task_list, vcpu_roots, known, threads_listed: bool, nr_threads
                  ) -> List[str]:
    """Give each vCPU whose current task SP_EL0 does not give (not in `known`: at EL0, or
    in exception entry before SP_EL0 holds `current`) the one task whose root its TTBR0
    holds (in the kernel, TTBR0 keeps the last process's tables while a kernel thread or the
    idle task runs: those vCPUs are in `known`): the thread itself when the threads are listed
    and one alone has that root, else a process of one thread (nr_threads(task) == 1).
    Changes task_list.tasks in place; returns notes for the vCPUs left unplaced."""
    from ..record import replace
    notes = []
    for cpu, (root, _) in sorted(vcpu_roots.items()):
        if cpu in known:
            continue
        hits = [i for i, t in enumerate(task_list.tasks) if t.root == root]
        if len(hits) != 1:
            if len(hits) > 1:
                notes.append(f"vCPU {cpu} runs one of {len(hits)} threads whose root "
                             f"{root:#x} its TTBR0 holds")
            continue
        task = task_list.tasks[hits[0]]
        if not threads_listed:
            n = nr_threads(task)
            if n != 1:
                notes.append(f"vCPU {cpu} runs a thread of {task.pid} ({task.comm}), "
                             f"{n if n is not None else 'several'} threads: which one is "
                             "not known")
                continue
        task_list.tasks[hits[0]] = replace(task, vcpu=cpu)
    return notes
