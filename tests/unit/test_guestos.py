"""qintrospect.guestos over a small Linux laid out in memory (tests/guest_linux.py), in the
layouts of 6.1 and 6.12: the note found and proven, kallsyms and BTF read, the task list,
roots (KPTI pairs), the vCPU that runs a task, VMAs as /proc/PID/maps, the per-boot cache;
and the damage a running or hostile guest can do (a looped list, a pointer into nowhere, a
NULL, a truncated BTF, another kernel's note, no kallsyms in vmcoreinfo, no note at all):
each ends with a note or a clear error, never a hang or a traceback."""

import os
from types import SimpleNamespace

import pytest

from qintrospect import guestos
from qintrospect.btf import BtfError
from qintrospect.guestos import vmas as guest_vmas
from qintrospect.guestos.kmem import KernelFault, KernelMemory
from qintrospect.guestos.tasks import state_letter
from qintrospect.machine.rammap import RamRegion
from qintrospect.paging import CpuState
from tests.guest_linux import DIRECT, Linux, Ram

MIB = 1 << 20
SIZE = 16 * MIB
PML4 = 0x1000
VM_READ, VM_WRITE, VM_EXEC = 1, 2, 4
PROBE_VMAS = [
    (0x400000, 0x401000, VM_READ, 0, "/probe"),
    (0x401000, 0x47a000, VM_READ | VM_EXEC, 1, "/probe"),
    (0x4a6000, 0x4a9000, VM_READ | VM_WRITE, 0xa5, "/probe"),
    (0x35886000, 0x358a8000, VM_READ | VM_WRITE, 0, None),            # [heap]
    (0x7fff9315d000, 0x7fff9317e000, VM_READ | VM_WRITE, 0, None),    # [stack]
    (0x7fff931e4000, 0x7fff931e8000, VM_READ, 0, "[vvar]"),
    (0x7fff931e8000, 0x7fff931ea000, VM_READ | VM_EXEC, 0, "[vdso]"),
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """runstate's cache in a folder of this test's own."""
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))


class FakeVm:
    """What guestos asks of a session: memory, the RAM map, the vCPUs' roots, a CpuState."""

    def __init__(self, ram, roots, label="test-vm"):
        self.memory = ram
        self.ram_map = SimpleNamespace(ram=[RamRegion(0, SIZE - 1, "ram", "pc.ram", 0, None)])
        self.vcpu = 0
        self.vcpu_info = [SimpleNamespace(index=i, root=r, pcid=None)
                          for i, r in enumerate(roots)]
        self.source = SimpleNamespace(label=label)
        self.process = None
        self.live = False

    def check_open(self):
        pass

    def cached_memory(self):
        return self.memory

    def cpu_state(self, cr3=None):
        return CpuState(cr0=0x80050033, cr3=self.vcpu_info[self.vcpu].root if cr3 is None
                        else cr3, cr4=0x6B0, efer=0xD01, maxphyaddr=40)


def small_linux(version="6.1", kpti=False, finish=True, **finish_kw):
    ram = Ram(SIZE)
    lx = Linux(ram, PML4, 0x100000, SIZE, version=version, kpti=kpti)
    init = lx.new_task(1, "init", parent=lx.init_task)
    kthreadd = lx.new_task(2, "kthreadd", kthread=True, parent=lx.init_task)
    lx.new_task(3, "kworker/0:0", kthread=True, parent=kthreadd, state=0x402)
    sh = lx.new_task(50, "sh", parent=init)
    probe = lx.new_task(51, "probe", parent=sh, uid=1000, state=0, vmas=PROBE_VMAS)
    mm = lx.tasks[-1]["mm"]
    lx.field("mm_struct", mm, "start_brk", 0x35886000)
    lx.field("mm_struct", mm, "brk", 0x358a8000)
    lx.field("mm_struct", mm, "start_stack", 0x7fff9317c9a0)
    lx.set_current(0, probe)
    note = lx.finish(**finish_kw) if finish else None
    return ram, lx, note


def vm_of(ram, lx, current="probe"):
    task = next(t for t in lx.tasks if t["comm"] == current)
    return FakeVm(ram, [task["user_root"] or task["root"]])


@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_ps_reads_every_process_in_either_layout(version):
    ram, lx, note = small_linux(version)
    vm = vm_of(ram, lx)
    kernel = guestos.open_kernel(vm)
    assert kernel.osrelease == lx.release and kernel.note_gpa == note
    assert kernel.how.startswith("scan")
    found = guestos.processes(vm, kernel)
    assert found.complete and found.notes == []
    rows = [(t.pid, t.ppid, t.comm, t.state, t.uid, t.kthread) for t in found.tasks]
    assert rows == [(1, 0, "init", "S", 0, False), (2, 0, "kthreadd", "S", 0, True),
                    (3, 2, "kworker/0:0", "I", 0, True), (50, 1, "sh", "S", 0, False),
                    (51, 50, "probe", "R", 1000, False)]
    by_pid = {t.pid: t for t in found.tasks}
    for info in lx.tasks[1:]:
        t = by_pid[info["pid"]]
        assert t.task == info["task"] and t.root == info["root"] and t.user_root is None
    assert by_pid[51].vcpu == 0 and by_pid[51].loaded_on == (0,) and by_pid[51].pcids == (None,)
    assert by_pid[50].vcpu is None and by_pid[50].loaded_on == ()
    assert by_pid[2].root is None and by_pid[2].mm is None
    with_idle = guestos.processes(vm, kernel, include_idle=True)
    assert [t.pid for t in with_idle.tasks][:2] == [0, 1]


def test_kpti_pairs_and_the_root_for_an_address():
    ram, lx, _ = small_linux(kpti=True)
    vm = vm_of(ram, lx)
    probe = guestos.find_process(vm, comm="probe")
    assert probe.user_root == probe.root + 4096 == lx.tasks[-1]["user_root"]
    assert probe.loaded_on == (0,)              # the vCPU holds its user copy
    assert probe.root_for(0x400000) == probe.user_root
    assert probe.root_for(0xFFFF888000000000) == probe.root


def test_kernel_reads_go_through_the_kernels_own_table():
    """A running VM: the process whose root the vCPU held may exit and its table be freed and
    reused; the kernel is read through init_top_pgt, found once through the vCPU's root."""
    ram, lx, _ = small_linux()
    vm = vm_of(ram, lx)
    kernel = guestos.open_kernel(vm)
    assert kernel.mem.root == lx.gpa(lx.init_top_pgt)
    probe_root = lx.tasks[-1]["root"]
    ram.put(probe_root + 2048, bytes(2048))               # the vCPU's table, freed
    assert [t.pid for t in guestos.processes(vm, kernel).tasks] == [1, 2, 3, 50, 51]


def test_the_second_command_uses_what_the_first_kept():
    ram, lx, note = small_linux()
    vm = vm_of(ram, lx)
    first = guestos.open_kernel(vm)
    second = guestos.open_kernel(vm)
    assert second.how == "cached for this boot" and second.note_gpa == note
    assert second.facts["fields"] == first.facts["fields"]
    assert [t.pid for t in guestos.processes(vm, second).tasks] == [1, 2, 3, 50, 51]
    # another boot (KASLR moved the kernel: the note differs): scanned again
    text = ram.read(note + 24, 4096).split(b"\0", 1)[0].replace(b"KERNELOFFSET=2a00000",
                                                                b"KERNELOFFSET=2c00000")
    ram.put(note + 24, text + b"\0")
    assert guestos.open_kernel(vm).how.startswith("scan")
    assert guestos.open_kernel(vm).how == "cached for this boot"


def test_a_looped_task_list_ends_with_a_note():
    ram, lx, _ = small_linux()
    sh = lx.tasks[4]["task"]
    lx.u64(lx.link_of(sh), lx.link_of(lx.tasks[2]["task"]))     # sh -> kthreadd again
    found = guestos.processes(vm_of(ram, lx))
    assert "loop" in found.cut and not found.complete
    assert [t.pid for t in found.tasks] == [1, 2, 3, 50]


@pytest.mark.parametrize("pointer, words", [
    (DIRECT + 0x40000000, "does not translate"),          # a kernel address mapped nowhere
    (0x00DEAD0000000000, "non-canonical"),
    (0, "NULL"),
])
def test_a_pointer_into_nowhere_ends_the_walk_with_a_note(pointer, words):
    ram, lx, _ = small_linux()
    lx.u64(lx.link_of(lx.tasks[3]["task"]), pointer)         # kworker's next
    found = guestos.processes(vm_of(ram, lx))
    assert words in found.cut
    assert [t.pid for t in found.tasks] == [1, 2, 3]


def test_a_bad_parent_or_mm_is_a_note_on_that_task():
    ram, lx, _ = small_linux()
    sh = lx.tasks[4]["task"]
    lx.field("task_struct", sh, "real_parent", DIRECT + 0x40000000)
    lx.field("task_struct", sh, "mm", 0x00DEAD0000000000)
    found = guestos.processes(vm_of(ram, lx))
    sh_row = next(t for t in found.tasks if t.pid == 50)
    assert found.complete and sh_row.ppid is None and sh_row.root is None
    assert "real_parent unreadable" in sh_row.note and "mm" in sh_row.note


def test_a_truncated_btf_is_bad_input():
    ram, lx, _ = small_linux()
    lx.put(lx.btf_kva + 20, (1 << 30).to_bytes(4, "little"))   # str_len beyond the blob
    with pytest.raises(BtfError, match="guest kernel's BTF") as e:
        guestos.open_kernel(vm_of(ram, lx))
    assert e.value.exit_status == 2


def test_a_kernel_older_than_6_0_is_said_not_guessed():
    ram, lx, _ = small_linux(kallsyms=False)
    with pytest.raises(guestos.GuestOSUnavailable, match="no vmcoreinfo kallsyms: kernel "
                       "6.1.0-57") as e:
        guestos.open_kernel(vm_of(ram, lx))
    assert e.value.exit_status == 3 and "--cr3" in str(e.value)


def test_a_kernel_without_btf_is_said_not_guessed():
    ram, lx, _ = small_linux(omit=("__start_BTF", "__stop_BTF"))
    with pytest.raises(guestos.GuestOSUnavailable, match="has no BTF") as e:
        guestos.open_kernel(vm_of(ram, lx))
    assert e.value.exit_status == 3 and "CONFIG_DEBUG_INFO_BTF" in str(e.value)


def test_a_kernel_without_init_task_in_kallsyms():
    ram, lx, _ = small_linux(omit=("init_task",))
    with pytest.raises(guestos.GuestOSUnavailable, match="no init_task"):
        guestos.open_kernel(vm_of(ram, lx))


def test_a_guest_without_linux():
    ram = Ram(SIZE)
    Linux(ram, PML4, 0x100000, SIZE)                 # the page tables, no note
    vm = FakeVm(ram, [PML4])
    with pytest.raises(guestos.GuestOSUnavailable, match="not running Linux") as e:
        guestos.open_kernel(vm)
    assert e.value.exit_status == 3


def test_another_kernels_note_higher_in_ram_is_refused():
    ram, lx, note = small_linux()
    other = note.__class__(SIZE - 4096)
    text = ram.read(note + 24, 4096).split(b"\0", 1)[0].replace(lx.release.encode(),
                                                                b"5.10.0-other")
    import struct
    ram.put(other, struct.pack("<III", 11, len(text) + 1, 0) + b"VMCOREINFO\0\0" + text + b"\0")
    kernel = guestos.open_kernel(vm_of(ram, lx))
    assert kernel.note_gpa == note and kernel.osrelease == lx.release


def test_find_process_by_pid_and_name():
    ram, lx, _ = small_linux()
    vm = vm_of(ram, lx)
    assert guestos.find_process(vm, pid=51).comm == "probe"
    assert guestos.find_process(vm, comm="sh").pid == 50
    with pytest.raises(guestos.NoSuchProcess, match="no guest process with pid 4242") as e:
        guestos.find_process(vm, pid=4242)
    assert e.value.exit_status == 2
    with pytest.raises(guestos.NoSuchProcess, match="kernel thread"):
        guestos.find_process(vm, comm="kthreadd")


def test_a_name_several_processes_have_is_an_error_listing_them():
    ram, lx, _ = small_linux(finish=False)
    lx.new_task(60, "sh", parent=lx.tasks[4]["task"])
    lx.finish()
    with pytest.raises(guestos.AmbiguousProcess, match=r"2 guest processes have comm 'sh': "
                       r"50 \(sh\), 60 \(sh\)") as e:
        guestos.find_process(vm_of(ram, lx), comm="sh")
    assert e.value.exit_status == 2


@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_vmas_as_proc_maps_shows_them(version):
    ram, lx, _ = small_linux(version)
    vm = vm_of(ram, lx)
    kernel = guestos.open_kernel(vm)
    probe = guestos.find_process(vm, pid=51, kernel=kernel)
    got = guest_vmas.vmas(kernel, probe)
    assert got.complete and got.notes == []
    lines = [v.maps_line() for v in got.vmas]
    assert [line.split() for line in lines] == [
        ["00400000-00401000", "r--p", "00000000", "00:02", "92", "/probe"],
        ["00401000-0047a000", "r-xp", "00001000", "00:02", "92", "/probe"],
        ["004a6000-004a9000", "rw-p", "000a5000", "00:02", "92", "/probe"],
        ["35886000-358a8000", "rw-p", "00000000", "00:00", "0", "[heap]"],
        ["7fff9315d000-7fff9317e000", "rw-p", "00000000", "00:00", "0", "[stack]"],
        ["7fff931e4000-7fff931e8000", "r--p", "00000000", "00:00", "0", "[vvar]"],
        ["7fff931e8000-7fff931ea000", "r-xp", "00000000", "00:00", "0", "[vdso]"],
    ]
    assert lines[0].index("/probe") == 73            # maps pads the name to column 73


def test_a_damaged_vma_tree_is_a_note():
    ram, lx, _ = small_linux()
    vm = vm_of(ram, lx)
    kernel = guestos.open_kernel(vm)
    probe = guestos.find_process(vm, pid=51, kernel=kernel)
    mt = probe.mm + lx.L["mm_struct"]["mm_mt"][0]
    lx.u64(mt + 8, (DIRECT + 0x40000000) | (1 << 3) | 4 | 2)     # ma_root into nowhere
    got = guest_vmas.vmas(kernel, probe)
    assert got.cut and got.vmas == []


@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_threads_follow_their_process(version):
    ram, lx, _ = small_linux(version, finish=False)
    probe = lx.tasks[-1]
    lx.new_thread(probe, 52)
    lx.new_thread(probe, 53, comm="worker")
    lx.finish()
    vm = vm_of(ram, lx)
    plain = guestos.processes(vm)
    assert [t.pid for t in plain.tasks] == [1, 2, 3, 50, 51]
    found = guestos.processes(vm, threads=True)
    assert found.complete and found.notes == []
    rows = [(t.pid, t.tgid, t.ppid, t.comm) for t in found.tasks]
    assert rows[-3:] == [(51, 51, 50, "probe"), (52, 51, 50, "probe"), (53, 51, 50, "worker")]
    assert found.tasks[-1].root == found.tasks[-3].root          # one address space
    assert [t.pid for t in found.tasks[:-2]] == [1, 2, 3, 50, 51]


def test_a_looped_thread_list_is_a_note_and_the_process_list_goes_on():
    ram, lx, _ = small_linux(finish=False)
    probe = lx.tasks[-1]
    t52 = lx.new_thread(probe, 52)
    node = t52 + lx.L["task_struct"]["thread_node"][0]
    lx.u64(node, node)                                     # 52's next is itself
    lx.finish()
    found = guestos.processes(vm_of(ram, lx), threads=True)
    assert found.complete and any("loop" in n for n in found.notes)
    assert [t.pid for t in found.tasks] == [1, 2, 3, 50, 51, 52]


@pytest.mark.parametrize("state, exit_state, letter", [
    (0, 0, "R"), (1, 0, "S"), (2, 0, "D"), (4, 0, "T"), (8, 0, "t"), (0, 0x10, "X"),
    (0, 0x20, "Z"), (0x40, 0, "P"), (0x402, 0, "I"), (0x1000, 0, "D"), (0x82, 0, "D")])
def test_state_letters_as_proc_gives_them(state, exit_state, letter):
    assert state_letter(state, exit_state) == letter


def test_kernel_memory_across_leaves_and_faults():
    ram, lx, _ = small_linux()
    cpu = vm_of(ram, lx).cpu_state()
    mem = KernelMemory(ram.read, cpu)
    ram.put(0x1FFFFC, b"abcdefgh")                              # across a 2 MiB boundary
    assert mem.read(DIRECT + 0x1FFFFC, 8) == b"abcdefgh"
    assert mem.translate(DIRECT + 0x123456) == 0x123456
    assert mem.walks == 2
    with pytest.raises(KernelFault, match="does not translate"):
        mem.read(DIRECT + 0x40000000, 8)
    assert mem.string(lx.uts + 130) == lx.release


def test_the_cache_lives_in_a_private_folder():
    ram, lx, _ = small_linux()
    guestos.open_kernel(vm_of(ram, lx))
    folder = os.path.join(os.environ["XDG_RUNTIME_DIR"], f"qintrospect-{os.geteuid()}")
    assert any(n.startswith("cache-") for n in os.listdir(folder))


def test_the_scan_goes_from_the_top_down_and_stops_at_the_note():
    from qintrospect.guestos.locate import WINDOW
    ram, lx, note = small_linux()
    advanced = []
    progress = SimpleNamespace(advance=advanced.append)
    kernel = guestos.open_kernel(vm_of(ram, lx), use_cache=False, progress=progress)
    assert kernel.note_gpa == note
    # every window above the note's was scanned whole, and the scan stopped in the note's
    assert advanced[0] == WINDOW and sum(advanced) == SIZE - (note & ~(WINDOW - 1)) - WINDOW
    # a page cache in front of the memory (PageCache.inner) still scans with the adapter's
    # own scan, which skips what it proves empty
    scanned = []

    class Adapter:
        def read(self, gpa, n):
            return ram.read(gpa, n)

        def scan_chunks(self, start, end, chunk):
            scanned.append((start, end))
            yield start, ram.read(start, end - start)
    vm = vm_of(ram, lx)
    vm.memory = SimpleNamespace(inner=Adapter(), read=ram.read)
    assert guestos.open_kernel(vm, use_cache=False).note_gpa == note
    assert scanned and scanned[0] == (SIZE - WINDOW, SIZE)


def test_names_from_the_guest_are_printed_escaped():
    from qintrospect.present.guest import ps_text, vma_text
    ram, lx, _ = small_linux(finish=False)
    lx.new_task(66, "\x1b]0;pwn\x07\u202e", parent=lx.tasks[1]["task"],
                vmas=[(0x400000, 0x401000, VM_READ, 0, "/evil\x1b[2J")])
    lx.finish()
    vm = vm_of(ram, lx)
    found = guestos.processes(vm)
    text = ps_text(found)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;pwn" in text
    evil = guestos.find_process(vm, pid=66)
    listed = guest_vmas.vmas(guestos.open_kernel(vm), evil)
    from qintrospect.commands.guest import coverage
    import numpy as np
    empty = SimpleNamespace(va=np.zeros(0, np.uint64), size=np.zeros(0, np.uint64),
                            user=np.zeros(0, bool), writable=np.zeros(0, bool),
                            executable=np.zeros(0, bool))
    covered, outside = coverage(listed.vmas, empty)
    shown = vma_text(evil, evil.root, "mm->pgd", covered, outside)
    assert "\x1b" not in shown and "/evil\\x1b[2J" in shown
