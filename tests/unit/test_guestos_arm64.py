"""qintrospect.guestos.arm64: what reading an aarch64 Linux guest takes beyond x86-64's, on
data built here. Kernel reads through TTBR1 (a 4 KiB / 48-bit table built below, by the Arm
ARM's descriptor format), swapper_pg_dir's PA from the note alone, the BTF found by its header
and init_task by its contents in a kernel image whose kallsyms names functions only (the BTF
blob and layout of tests/guest_linux.py), and which task a vCPU runs (SP_EL0 in the kernel,
TTBR0 at EL0); hostile images (decoy headers and structs, a looping list, a window with
holes) end with a clear error or no answer, never a hang."""

import struct
from types import SimpleNamespace

import pytest

from qintrospect.btf import Btf, Vmcoreinfo
from qintrospect.btf.kallsyms import Kallsyms, Symbol
from qintrospect.guestos import arm64
from qintrospect.guestos.kmem import KernelFault, KernelMemory, kernel_cpu
from qintrospect.guestos.layout import Fields, layout
from qintrospect.guestos.tasks import GuestTask, TaskList
from qintrospect.paging.arm64 import Arm64State
from tests.guest_linux import PF_KTHREAD, _layouts, build_btf

KIMAGE = 0xFFFFAE1154600000            # a KASLR'd kernel image base, as Debian's arm64 one
AF, SH_INNER, ATTR1 = 1 << 10, 3 << 8, 1 << 2
TCR = 16 | 16 << 16 | 0b10 << 30 | 0b101 << 32 | 1 << 22     # 4K, 48-bit both ranges, A1
MAIR = 0x000000BB_0444FF00


class Phys:
    def __init__(self, size):
        self.data = bytearray(size)

    def read(self, pa, n):
        from qintrospect.errors import MemoryReadError
        if pa < 0 or pa + n > len(self.data):
            raise MemoryReadError(f"{pa:#x} outside RAM", pa)
        return bytes(self.data[pa:pa + n])

    def u64(self, pa, value):
        self.data[pa:pa + 8] = value.to_bytes(8, "little")


def table_with_block(phys, root, va, pa):
    """4 KiB granule, 48-bit VA: L0 -> L1 -> L2 block of 2 MiB mapping va to pa."""
    l1, l2 = root + 0x1000, root + 0x2000
    phys.u64(root + 8 * (va >> 39 & 511), l1 | 0b11)
    phys.u64(l1 + 8 * (va >> 30 & 511), l2 | 0b11)
    phys.u64(l2 + 8 * (va >> 21 & 511), pa | 0b01 | AF | SH_INNER | ATTR1)


def state(ttbr0=0, ttbr1=0, cpsr=0x3C5, regime="EL1&0"):
    return Arm64State(ttbr0=ttbr0, ttbr1=ttbr1, tcr=TCR, sctlr=1, mair=MAIR, cpsr=cpsr,
                      regime=regime)


def test_kernel_reads_go_through_ttbr1_set_to_the_root():
    phys = Phys(8 << 20)
    root = 0x10000
    table_with_block(phys, root, KIMAGE, 0x200000)
    phys.data[0x200000 + 0x840:0x200000 + 0x848] = b"6.1.0-57"
    # the vCPU's own TTBR1 holds another table (KPTI's trampoline at EL0), and an ASID
    cpu = state(ttbr0=0x55 << 48 | 0x40000, ttbr1=0x4A << 48 | 0x90000, cpsr=0x0)
    kcpu = kernel_cpu(cpu, root)
    assert kcpu.ttbr1 == root and kcpu.ttbr0 == cpu.ttbr0 and kcpu.regime == "EL1&0"
    mem = KernelMemory(phys.read, kcpu)
    assert mem.root == root
    assert mem.read(KIMAGE + 0x840, 8) == b"6.1.0-57"
    assert mem.translate(KIMAGE + 0x1234) == 0x201234
    with pytest.raises(KernelFault):
        mem.read(KIMAGE + (2 << 20), 8)               # past the block: not mapped
    with pytest.raises(KernelFault):
        mem.read(0x400000, 8)                         # TTBR0's range: not the kernel's
    # without a root: the vCPU's own TTBR1; a vCPU at EL2 without VHE reads EL1's kernel
    assert kernel_cpu(cpu).ttbr1 == cpu.ttbr1
    assert kernel_cpu(state(ttbr1=root, regime="EL2")).regime == "EL1&0"
    assert kernel_cpu(state(ttbr1=root, regime="EL2&0")).regime == "EL2&0"


def test_swapper_pg_dir_from_the_note_alone():
    text = ("OSRELEASE=6.1.0-57-cloud-arm64\nSYMBOL(swapper_pg_dir)=ffffae115598f000\n"
            "NUMBER(kimage_voffset)=0xffffae1114400000\n")
    assert arm64.image_root(Vmcoreinfo.parse(text)) == 0x4158F000
    # no kimage_voffset (another architecture's note), or a result that is no page
    assert arm64.image_root(Vmcoreinfo.parse(text.split("NUMBER")[0])) is None
    bad = text.replace("ffffae1114400000", "ffffae1114400008")
    assert arm64.image_root(Vmcoreinfo.parse(bad)) is None


def test_kernel_roots_put_the_notes_table_first():
    vi = Vmcoreinfo.parse("OSRELEASE=x\nSYMBOL(swapper_pg_dir)=ffffae115598f000\n"
                          "NUMBER(kimage_voffset)=0xffffae1114400000\n")

    def vcpu(i, ttbr1):
        return SimpleNamespace(index=i, state=state(ttbr1=ttbr1))
    vm = SimpleNamespace(vcpu=1, vcpu_info=[vcpu(0, 0x4A << 48 | 0x4158F000),
                                            vcpu(1, 0x4A << 48 | 0x41590000)])
    assert arm64.kernel_roots(vm, vi) == [0x4158F000, 0x41590000]


# ---- a kernel image whose kallsyms names functions only ----------------------------------

class Image:
    """Kernel virtual memory over one bytearray at KIMAGE, with holes (the freed init
    sections are unmapped after boot)."""

    def __init__(self, size, holes=()):
        self.data = bytearray(size)
        self.holes = list(holes)

    def read(self, va, n):
        off = va - KIMAGE
        if off < 0 or off + n > len(self.data) or any(
                lo < off + n and off < hi for lo, hi in self.holes):
            raise KernelFault(f"kernel address {va:#x} does not translate", va)
        return bytes(self.data[off:off + n])

    def u64(self, va):
        return int.from_bytes(self.read(va, 8), "little")

    def put(self, va, data):
        self.data[va - KIMAGE:va - KIMAGE + len(data)] = data

    def put64(self, va, value):
        self.put(va, value.to_bytes(8, "little"))


ETEXT, SINITTEXT, EINITTEXT = KIMAGE + 0x10000, KIMAGE + 0x200000, KIMAGE + 0x210000
TASK_SIZE = 0x800


def kallsyms_of(**names):
    return Kallsyms([Symbol(a, "T", n, None) for n, a in names.items()], "test")


def fields_6_1():
    return layout(Btf.parse(build_btf("6.1")))


def put_task(img, f, task, pid, comm, kthread=True, mm=0, parent=None, next_task=None):
    """A task_struct at BTF's offsets; tasks.next to next_task (itself: alone)."""
    def put(name, value, size=None):
        off, n = f[name]
        img.put(task + off, int(value).to_bytes(size or n, "little", signed=value < 0))
    put("task.pid", pid)
    put("task.tgid", pid)
    put("task.flags", PF_KTHREAD if kthread else 0)
    put("task.mm", mm)
    put("task.real_parent", task if parent is None else parent)
    off, n = f["task.comm"]
    img.put(task + off, comm.encode().ljust(n, b"\0"))
    link = task + f["task.tasks"][0]
    nxt = (next_task if next_task is not None else task) + f["task.tasks"][0]
    img.put64(link, nxt)                       # next
    img.put64(nxt + 8, link)                   # the next one's prev comes back


def image_with_kernel(btf_at=ETEXT + 0x3000, decoys=True, holes=True):
    blob = build_btf("6.1")
    f = fields_6_1()
    img = Image(0x400000, holes=[(EINITTEXT - KIMAGE, EINITTEXT - KIMAGE + 0x40000)]
                if holes else [])
    if decoys:
        # a BTF header whose sections do not fit, and one whose string section is no table
        img.put(ETEXT + 0x100, arm64.BTF_HEAD + struct.pack("<4I", 0, 0x100000, 0x100000, 9))
        img.put(ETEXT + 0x200, arm64.BTF_HEAD + struct.pack("<4I", 0, 16, 16, 4) + b"x" * 40)
    img.put(btf_at, blob)
    data = EINITTEXT + 0x50000
    init_task = data + 0x2000
    other = data + 0x4000
    if decoys:
        # "swapper" in rodata-like strings and a struct that says pid 7
        img.put(data + 0x10, b"swapper/%d\0")
        put_task(img, f, data + 0x800, 7, "swapper/1")
    put_task(img, f, init_task, 0, "swapper/0", next_task=other)
    put_task(img, f, other, 1, "init", kthread=False, mm=0xFFFF000001230000,
             parent=init_task, next_task=init_task)
    ks = kallsyms_of(_etext=ETEXT, _sinittext=SINITTEXT, _einittext=EINITTEXT,
                     _stext=KIMAGE)
    return img, ks, blob, init_task


def locate(img, ks, symbols=None):
    return arm64.locate(img, ks, symbols or {}, lambda blob, name: Btf.parse(blob, name=name),
                        layout)


def test_btf_and_init_task_are_found_in_the_image():
    img, ks, blob, init_task = image_with_kernel()
    symbols, btf, how = locate(img, ks)
    assert symbols["__start_BTF"] == ETEXT + 0x3000
    assert symbols["__stop_BTF"] - symbols["__start_BTF"] == len(blob)
    assert symbols["init_task"] == init_task
    assert btf is not None and set(how) == {"btf", "init_task"}


def test_a_btf_header_across_a_chunk_boundary_is_found():
    at = ETEXT - 3 + arm64.CHUNK - (ETEXT % arm64.CHUNK)     # 4-aligned, crossing the chunk
    at -= at % 4
    img, ks, blob, _ = image_with_kernel(btf_at=at, decoys=False)
    symbols, _, _ = locate(img, ks)
    assert symbols["__start_BTF"] == at


def test_what_kallsyms_names_is_kept():
    img, ks, blob, init_task = image_with_kernel()
    given = {"__start_BTF": ETEXT + 0x3000, "__stop_BTF": ETEXT + 0x3000 + len(blob),
             "init_task": init_task}
    symbols, btf, how = locate(img, ks, dict(given))
    assert symbols == given and btf is None and how == {}


def test_no_btf_in_the_window_is_said():
    img, ks, _, _ = image_with_kernel()
    img.put(ETEXT + 0x3000, b"\0" * 8)                      # the real header gone
    with pytest.raises(LookupError, match="BTF"):
        locate(img, ks)


def test_kallsyms_without_the_section_bounds_is_said():
    img, _, _, _ = image_with_kernel()
    with pytest.raises(LookupError, match="_etext"):
        locate(img, kallsyms_of(_stext=KIMAGE))


@pytest.mark.parametrize("damage", ["pid", "parent", "loop", "nowhere", "mm"])
def test_a_damaged_init_task_is_not_taken(damage):
    img, ks, _, init_task = image_with_kernel(decoys=False)
    f = fields_6_1()
    link = init_task + f["task.tasks"][0]
    if damage == "pid":
        img.put(init_task + f["task.pid"][0], (3).to_bytes(4, "little"))
    elif damage == "parent":
        img.put64(init_task + f["task.real_parent"][0], 0xFFFF000000001000)
    elif damage == "loop":          # next's prev points elsewhere: not a list through it
        nxt = img.u64(link)
        img.put64(nxt + 8, nxt)
    elif damage == "nowhere":
        img.put64(link, 0xFFFF7777_00000000)
    else:
        img.put64(init_task + f["task.mm"][0], 0xFFFF000001230000)
    with pytest.raises(LookupError, match="init_task"):
        locate(img, ks)


def test_init_task_alone_on_its_list_is_taken():
    img, ks, _, _ = image_with_kernel(decoys=False)
    f = fields_6_1()
    lone = EINITTEXT + 0x60000
    img.put(EINITTEXT + 0x50000, b"\0" * 0x8000)
    put_task(img, f, lone, 0, "swapper/0")
    symbols, _, _ = locate(img, ks)
    assert symbols["init_task"] == lone


def test_the_scan_is_bounded():
    reads = []

    def read(va, n):
        reads.append(n)
        return b"swapper" * (n // 7) + b"\0" * (n % 7)
    hits = list(arm64._scan(read, KIMAGE, KIMAGE + (3 << 20), b"swapper"))
    assert hits[:2] == [KIMAGE, KIMAGE + 7] and all(KIMAGE <= h < KIMAGE + (3 << 20)
                                                     for h in hits)
    assert sum(reads) < (3 << 20) + 64                   # each byte read once (+ overlaps)
    seen = []

    def zeros(va, n):
        seen.append(n)
        return b"\0" * n
    f = Fields(zeros, fields_6_1())
    with pytest.raises(LookupError):
        arm64.find_init_task(f, zeros, lambda va: 0, KIMAGE, KIMAGE + (1 << 40))
    assert sum(seen) <= arm64.MAX_DATA + 64 * (arm64.MAX_DATA // arm64.CHUNK)   # capped


# ---- which task a vCPU runs --------------------------------------------------------------

class FakeGdb:
    def __init__(self, regs):
        self.regs, self.selected = regs, None

    def has_register(self, name):
        return name == "SP_EL0"

    def select_vcpu(self, i):
        self.selected = i

    def registers(self, names):
        return {"SP_EL0": self.regs[self.selected]}


def vcpu(i, cpl, ttbr0=0x4312A000, asid=0x4A):
    return SimpleNamespace(index=i, cpl=cpl, table=lambda s: ttbr0 if s == 0 else 0x4158F000,
                           pcid=asid)


def test_sp_el0_is_current_only_in_the_kernel():
    gdb = FakeGdb({0: 0xFFFF0000031C2080, 1: 0xFFFF0000031C2080, 2: 0xFFFFD12333D0})
    vm = SimpleNamespace(gdb=gdb, vcpu=1, vcpu_info=[vcpu(0, 1), vcpu(1, 0), vcpu(2, 1)])
    # vCPU 1 at EL0: SP_EL0 is the user stack; vCPU 2 in exception entry: still the user's
    assert arm64.sp_el0(vm) == {0: 0xFFFF0000031C2080}
    assert gdb.selected == 1                          # the session's vCPU selected again
    assert arm64.sp_el0(SimpleNamespace(gdb=None, vcpu=0, vcpu_info=[])) == {}
    assert arm64.process_roots(vm) == {0: (0x4312A000, 0x4A), 1: (0x4312A000, 0x4A),
                                       2: (0x4312A000, 0x4A)}


def task(pid, root, tgid=None, vcpu=None):
    return GuestTask(pid, tgid or pid, 1, f"t{pid}", "R", 0, False, 0x1000 * pid,
                     root=root, vcpu=vcpu)


def test_a_vcpu_at_el0_runs_the_process_whose_root_ttbr0_holds():
    tl = TaskList(tasks=[task(1, 0x100), task(93, 0x200), task(94, 0x300)])
    notes = arm64.place_by_root(tl, {0: (0x200, 5), 1: (0x300, 6)}, known={1},
                                threads_listed=False, nr_threads=lambda t: 1)
    assert [t.vcpu for t in tl.tasks] == [None, 0, None] and notes == []
    # a process of several threads: which one is not known
    tl = TaskList(tasks=[task(93, 0x200)])
    notes = arm64.place_by_root(tl, {0: (0x200, 5)}, set(), False, lambda t: 3)
    assert tl.tasks[0].vcpu is None and "3 threads" in notes[0]
    # the threads listed: one alone with the root is the one; several are a note
    tl = TaskList(tasks=[task(93, 0x200), task(95, 0x200, tgid=93)])
    notes = arm64.place_by_root(tl, {0: (0x200, 5)}, set(), True, lambda t: 2)
    assert [t.vcpu for t in tl.tasks] == [None, None] and "2 threads" in notes[0]
    # a root no task has (a process that exited, the idle task's last tables): no answer
    tl = TaskList(tasks=[task(93, 0x200)])
    assert arm64.place_by_root(tl, {0: (0x999, 5)}, set(), False, lambda t: 1) == []
    assert tl.tasks[0].vcpu is None


def test_the_layout_knows_arm64s_optional_members():
    f = fields_6_1()
    lay = _layouts("6.1")
    assert f["task.comm"][0] == lay["task_struct"]["comm"][0]
    assert f["list.prev"] == [8, 8]
