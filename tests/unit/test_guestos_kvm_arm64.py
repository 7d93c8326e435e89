"""guestos.kvm_arm64 over a crafted kernel memory: a VMM's descriptors lead to its VM and vCPUs,
the VMID is cut where VTCR_EL2.VS says, a loaded vCPU's EL1 registers come from the CPU it is
loaded on and a put one's from KVM's saved context, and hostile structures give errors that
say why (never an exception of Python's own). The real thing: tests/integration/
test_kvm_arm64.py."""

import types

import pytest

from qintrospect.errors import MemoryReadError
from qintrospect.guestos import kvm_arm64
from qintrospect.guestos.errors import GuestOSUnavailable, NoSuchKvmVcpu
from qintrospect.guestos.layout import Fields
from qintrospect.machine.arm64 import Arm64Vcpu

LAYOUT = {
    "task.files": [0x10, 8], "files.fdt": [0x20, 8], "fdt.max_fds": [0, 4], "fdt.fd": [8, 8],
    "file.dentry": [0x18, 8], "file.private_data": [0x30, 8], "dentry.name": [0x28, 8],
    "dentry.parent": [0x30, 8],
    "kvm.arch": [0xF8, 0x40], "kvm.mmu": [0x100, 40], "kvm.vtcr": [0x128, 8],
    "kvm.pid": [0x200, 4], "s2mmu.vmid": [0, 8], "s2mmu.pgd_phys": [8, 8],
    "s2mmu.arch": [0x20, 8],
    "kvm_vcpu.kvm": [0, 8], "kvm_vcpu.cpu": [0x20, 4], "kvm_vcpu.id": [0x24, 4],
    "kvm_vcpu.idx": [0x28, 4], "kvm_vcpu.hw_mmu": [0x30, 8], "kvm_vcpu.hcr": [0x38, 8],
    "kvm_vcpu.pc": [0x40, 8], "kvm_vcpu.pstate": [0x48, 8], "kvm_vcpu.pid": [0x50, 8],
    "pid.tasks": [0x10, 8], "task.pid_links": [0x300, 16],
    **{f"kvm_vcpu.{r}": [0x100 + 8 * i, 8] for i, r in
       enumerate(("TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "SCTLR_EL1", "MAIR_EL1"))},
}
TASK, FILES, FDT, FDS = 0x1000, 0x2000, 0x3000, 0x4000
KVM, VCPU, PID, THREAD = 0x10000, 0x20000, 0x30000, 0x40000
PGD = 0x42814000
VTCR_16BIT = 0x802d3558             # KVM's: 40-bit IPA, 4k, SL0=1, VS=1
HCR_GUEST = 0x0000403c807c263f      # KVM's HCR_EL2 for its guest (VM, E2H, ...)


class Mem:
    """Sparse kernel memory: only what was written reads."""

    def __init__(self):
        self.bytes = {}

    def put(self, va, data):
        for i, b in enumerate(data):
            self.bytes[va + i] = b

    def u(self, va, value, n=8):
        self.put(va, (value & ((1 << 8 * n) - 1)).to_bytes(n, "little"))

    def read(self, va, n):
        try:
            return bytes(self.bytes[va + i] for i in range(n))
        except KeyError:
            raise MemoryReadError(f"{va:#x}+{n} not mapped") from None

    def u64(self, va):
        return int.from_bytes(self.read(va, 8), "little")

    def string(self, va, limit=256):
        out = bytearray()
        while len(out) < limit:
            b = self.read(va + len(out), 1)[0]
            if not b:
                break
            out.append(b)
        return out.decode()


def file_at(mem, addr, name, data, parent=None):
    """A file whose dentry is its own parent (an anonymous inode's), or under `parent`."""
    dentry, text = addr + 0x800, addr + 0xc00
    mem.u(addr + 0x18, dentry)
    mem.u(addr + 0x30, data)
    mem.u(dentry + 0x28, text)
    mem.u(dentry + 0x30, dentry if parent is None else parent)
    mem.put(text, name.encode() + b"\0")


def kernel(vtcr=VTCR_16BIT, vmid_counter=(1 << 16) | 1, cpu=-1, hw_mmu=None, hcr=HCR_GUEST,
           max_fds=8, layout=LAYOUT, extra_files=()):
    mem = Mem()
    mem.u(TASK + 0x10, FILES)
    mem.u(FILES + 0x20, FDT)
    mem.u(FDT, max_fds, 4)
    mem.u(FDT + 8, FDS)
    for fd in range(max(max_fds, 8)):
        mem.u(FDS + 8 * fd, 0)
    files = [(3, 0x5000, "kvm", 0), (4, 0x6000, "kvm-vm", KVM), (5, 0x7000, "kvm-vcpu:0", VCPU)]
    for fd, addr, name, data in list(files) + list(extra_files):
        mem.u(FDS + 8 * fd, addr)
        file_at(mem, addr, name, data)
    mem.u(KVM + 0x100, vmid_counter)
    mem.u(KVM + 0x108, PGD)
    mem.u(KVM + 0x128, vtcr)
    mem.u(KVM + 0x120, KVM + 0xF8)              # arch.mmu.arch: back at its arch
    mem.u(VCPU, KVM)
    mem.u(VCPU + 0x20, cpu, 4)
    mem.u(VCPU + 0x24, 0, 4)
    mem.u(VCPU + 0x28, 0, 4)
    mem.u(VCPU + 0x30, KVM + 0x100 if hw_mmu is None else hw_mmu)
    mem.u(VCPU + 0x38, hcr)
    mem.u(VCPU + 0x40, 0x4000002c)
    mem.u(VCPU + 0x48, 0x3c5)
    mem.u(VCPU + 0x50, PID)                     # struct pid of the vCPU's thread
    mem.u(PID + 0x10, THREAD + 0x300)           # its tasks[PIDTYPE_PID].first
    for i, v in enumerate((0x1111000, 0x2222000, 0x35103510, 0xc50838, 0xff)):
        mem.u(VCPU + 0x100 + 8 * i, v)
    k = types.SimpleNamespace(mem=mem, fields=Fields(mem.read, layout), osrelease="6.1-test")
    return k


TASK_OBJ = types.SimpleNamespace(task=TASK, pid=109, comm="vmm")


def host_vcpu(**kw):
    """L1's vCPU 0, stopped in its VHE kernel (EL2), its EL1 registers L2's while loaded."""
    regs = dict(index=0, thread_id=1, qom_path=None, ttbr0=0xaaa000, ttbr1=0xbbb000, tcr=0,
                sctlr=0xc50078, mair=0, cpsr=0x3c9, hcr=0x488000000, vttbr=0x1000042814001,
                vtcr=VTCR_16BIT, ttbr0_el2=0x42851000, ttbr1_el2=0x41000000,
                tcr_el2=0x35103510, sctlr_el2=0x30d0199d, mair_el2=0xff)
    regs.update(kw)
    return Arm64Vcpu(**regs)


def vm_of(*vcpus):
    return types.SimpleNamespace(vcpu=0, vcpu_info=list(vcpus))


def test_the_vmms_descriptors_lead_to_its_vm_and_vcpu():
    (vm,) = kvm_arm64.vms_of(kernel(), TASK_OBJ)
    assert (vm.fd, vm.address, vm.pgd_phys, vm.vmid, vm.vtcr) == (4, KVM, PGD, 1, VTCR_16BIT)
    assert vm.vttbr == PGD | 1 << 48
    (v,) = vm.vcpus
    assert (v.fd, v.address, v.vcpu_id, v.cpu, v.mmu) == (5, VCPU, 0, -1, KVM + 0x100)
    assert v.saved["tcr"] == 0x35103510 and v.pc == 0x4000002c
    d = vm.to_dict()
    assert d["vttbr_el2"] == hex(PGD | 1 << 48) and d["vcpus"][0]["loaded_on_cpu"] is None


def test_the_vmid_is_cut_where_vtcr_vs_says():
    # 8-bit VMIDs: the rollover generation starts at bit 8
    (vm,) = kvm_arm64.vms_of(kernel(vtcr=VTCR_16BIT & ~(1 << 19), vmid_counter=(3 << 8) | 7),
                             TASK_OBJ)
    assert vm.vmid == 7
    (vm,) = kvm_arm64.vms_of(kernel(vmid_counter=(3 << 16) | 0x1234), TASK_OBJ)
    assert vm.vmid == 0x1234


def test_a_put_vcpu_is_read_from_kvms_saved_context():
    k = kernel(cpu=-1)
    (gvm,) = kvm_arm64.vms_of(k, TASK_OBJ)
    view, where = kvm_arm64.registers(vm_of(host_vcpu()), gvm, gvm.vcpus[0])
    assert "as KVM saved them" in where
    assert (view.ttbr0, view.ttbr1, view.tcr, view.sctlr) == (0x1111000, 0x2222000,
                                                              0x35103510, 0xc50838)
    assert view.regime == "EL1&0" and view.cpl == 1         # pstate 0x3c5: EL1h
    s2 = view.stage2
    assert s2 is not None and s2.vttbr == PGD | 1 << 48 and s2.vtcr == VTCR_16BIT
    assert s2.to_dict()["root"] == hex(PGD) and "pgd_phys" in s2.source
    assert view.ttbr1_el2 == 0x41000000                     # the host's own kept


def test_a_loaded_vcpu_is_read_from_the_cpu_it_is_loaded_on():
    k = kernel(cpu=0)
    (gvm,) = kvm_arm64.vms_of(k, TASK_OBJ)
    view, where = kvm_arm64.registers(vm_of(host_vcpu()), gvm, gvm.vcpus[0])
    assert "loaded on the guest's CPU 0" in where and (view.ttbr0, view.ttbr1) == (0xaaa000,
                                                                                   0xbbb000)
    assert view.cpsr == 0x3c5                   # the host CPU is at EL2: the saved pstate
    assert "differ" in where                    # (the CPU's EL1 registers are not the saved)
    same = host_vcpu(ttbr0=0x1111000, ttbr1=0x2222000, tcr=0x35103510, sctlr=0xc50838,
                     mair=0xff)
    assert "differ" not in kvm_arm64.registers(vm_of(same), gvm, gvm.vcpus[0])[1]
    # the CPU runs the guest now: its live VTTBR must be the VM's (CnP aside)
    inside = host_vcpu(cpsr=0x3c5, hcr=HCR_GUEST)
    assert inside.stage2 is not None
    _, where = kvm_arm64.registers(vm_of(inside), gvm, gvm.vcpus[0])
    assert "agrees" in where
    other = host_vcpu(cpsr=0x3c5, hcr=HCR_GUEST, vttbr=0x2000055555000)
    _, where = kvm_arm64.registers(vm_of(other), gvm, gvm.vcpus[0])
    assert "DIFFERS" in where


def test_a_put_vcpu_while_the_cpu_runs_another_vm_says_so():
    (gvm,) = kvm_arm64.vms_of(kernel(cpu=-1), TASK_OBJ)
    other = host_vcpu(cpsr=0x3c5, hcr=HCR_GUEST, vttbr=0x2000055555000)
    view, where = kvm_arm64.registers(vm_of(other), gvm, gvm.vcpus[0])
    assert "runs another VM now" in where and "DIFFERS" not in where
    assert view.stage2.vttbr == PGD | 1 << 48           # the VM's, not the live register's


def test_a_cpu_number_beyond_the_machine_falls_back_to_the_saved_context():
    k = kernel(cpu=7)
    (gvm,) = kvm_arm64.vms_of(k, TASK_OBJ)
    view, where = kvm_arm64.registers(vm_of(host_vcpu()), gvm, gvm.vcpus[0])
    assert "as KVM saved them" in where and view.ttbr0 == 0x1111000


@pytest.mark.parametrize("kw, why", [
    (dict(hw_mmu=0xdead000), "runs on another stage 2"),
    (dict(hcr=0x80000000), "enables no stage 2"),
])
def test_a_vcpu_kvm_does_not_run_on_its_vms_stage2_is_refused(kw, why):
    (gvm,) = kvm_arm64.vms_of(kernel(**kw), TASK_OBJ)
    with pytest.raises(GuestOSUnavailable, match=why):
        kvm_arm64.registers(vm_of(host_vcpu()), gvm, gvm.vcpus[0])


def test_what_is_not_there_is_said():
    vms = kvm_arm64.vms_of(kernel(), TASK_OBJ)
    with pytest.raises(NoSuchKvmVcpu, match=r"no KVM vCPU 3 \(VM fd 4: vCPUs 0\)"):
        kvm_arm64.find_vcpu(vms, 109, 3)
    with pytest.raises(NoSuchKvmVcpu, match="holds no KVM VM"):
        kvm_arm64.find_vcpu([], 1, 0)
    assert kvm_arm64.find_vcpu(vms, 109, 0)[1].address == VCPU
    no_kvm = {k: v for k, v in LAYOUT.items() if not k.startswith("kvm_vcpu.")}
    with pytest.raises(GuestOSUnavailable, match="no KVM/arm64 structures"):
        kvm_arm64.vms_of(kernel(layout=no_kvm), TASK_OBJ)


def test_hostile_descriptors_end_in_notes_or_errors_not_exceptions():
    # a vCPU file whose private_data points nowhere, a file with an unreadable dentry,
    # a descriptor table far larger than what reads
    bad = [(6, 0x8000, "kvm-vcpu:1", 0xdead0000)]
    (vm,) = kvm_arm64.vms_of(kernel(extra_files=bad), TASK_OBJ)
    assert len(vm.vcpus) == 1 and any("descriptor 6" in n for n in vm.notes)
    k = kernel()
    k.mem.u(0x5000 + 0x18, 0xbad000)                  # fd 3's dentry: unmapped
    assert len(kvm_arm64.vms_of(k, TASK_OBJ)) == 1
    k = kernel()
    k.mem.u(FDT, 0xFFFFFFFF, 4)                        # max_fds: capped, and the table
    with pytest.raises(GuestOSUnavailable, match="file table does not read"):
        kvm_arm64.vms_of(k, TASK_OBJ)                  # beyond what is mapped says so
    k = kernel()
    k.mem.u(TASK + 0x10, 0)                            # no files (an exiting task)
    assert kvm_arm64.vms_of(k, TASK_OBJ) == []


def test_a_vcpu_inside_a_guest_reads_its_hosts_kernel_with_the_el2_registers():
    """Stopped inside KVM's guest, a VHE host's kernel is still TTBR1_EL2's and the process
    whose guest runs is TTBR0_EL2's (ps there); without VHE no register holds them."""
    from qintrospect.guestos import arm64
    inside = host_vcpu(cpsr=0x3c5, hcr=HCR_GUEST)
    assert inside.stage2 is not None and inside.regime == "EL1&0"
    state = arm64.reading_state(inside)
    assert state.regime == "EL2&0" and (state.ttbr0, state.ttbr1) == (0x42851000, 0x41000000)
    assert arm64.process_roots(vm_of(inside)) == {0: (0x42851000, 0)}
    no_vhe = host_vcpu(cpsr=0x3c5, hcr=HCR_GUEST & ~(1 << 34))
    assert no_vhe.stage2 is not None and arm64.reading_state(no_vhe) is None
    assert arm64.process_roots(vm_of(no_vhe)) == {}
    host = host_vcpu()                                   # in the host's kernel: its own
    assert arm64.reading_state(host) == host.state and host.state.regime == "EL2&0"


def test_the_thread_that_runs_a_guest_is_kvms_loaded_vcpus():
    """guest_runners: a vCPU inside a guest runs the VMM thread whose KVM vCPU is loaded on
    it, in the VM whose VTTBR_EL2 is live (kvm_vcpu.pid -> pid->tasks -> the task)."""
    k = kernel(cpu=0)
    vmm = types.SimpleNamespace(task=TASK, pid=109, comm="vmm", root=0x42851000,
                                kthread=False)
    inside = host_vcpu(cpsr=0x3c5, hcr=HCR_GUEST, vttbr=PGD | 1 << 48 | 1)   # (CnP set)
    assert kvm_arm64.vcpu_thread(k, kvm_arm64.vms_of(k, TASK_OBJ)[0].vcpus[0]) == THREAD
    ((cpu, (thread, vm, v)),) = kvm_arm64.guest_runners(k, vm_of(inside), [vmm]).items()
    assert (cpu, thread, vm.pid, v.vcpu_id) == (0, THREAD, 109, 0)
    # another VM live there, the vCPU put, the CPU in its host, another process's table: none
    other = host_vcpu(cpsr=0x3c5, hcr=HCR_GUEST, vttbr=0x2000055555000)
    assert kvm_arm64.guest_runners(k, vm_of(other), [vmm]) == {}
    assert kvm_arm64.guest_runners(kernel(cpu=-1), vm_of(inside), [vmm]) == {}
    assert kvm_arm64.guest_runners(k, vm_of(host_vcpu()), [vmm]) == {}
    stranger = types.SimpleNamespace(**dict(vars(vmm), root=0x7000))
    assert kvm_arm64.guest_runners(k, vm_of(inside), [stranger]) == {}


def test_a_file_named_kvm_vm_is_not_a_vm_and_a_kvm_must_point_back_at_itself():
    """A real file anyone may call "kvm-vm" (its dentry has a parent) is not taken for one;
    a struct kvm whose arch.mmu.arch does not point back at its arch is refused, saying so."""
    k = kernel()
    file_at(k.mem, 0x6000, "kvm-vm", KVM, parent=0x99000)       # fd 4 on a real file system
    assert kvm_arm64.vms_of(k, TASK_OBJ) == []
    k = kernel()
    k.mem.u(KVM + 0x120, 0xdead)
    with pytest.raises(GuestOSUnavailable, match="no struct kvm"):
        kvm_arm64.vms_of(k, TASK_OBJ)


def test_a_hostile_process_name_is_printed_escaped():
    """A VMM may name itself anything (prctl PR_SET_NAME): its name reaches the stage 2
    block's source line, which the text view prints with its controls escaped."""
    from qintrospect.present.render import stage2_lines
    (gvm,) = kvm_arm64.vms_of(kernel(cpu=-1), types.SimpleNamespace(
        task=TASK, pid=109, comm="vm\x1b[2Jm"))
    view, _ = kvm_arm64.registers(vm_of(host_vcpu()), gvm, gvm.vcpus[0])
    walk = types.SimpleNamespace(levels=[], ok=False, fault=types.SimpleNamespace(
        error_code=None, reason="translation", level="L1", message=""), notes=())
    lines = stage2_lines(types.SimpleNamespace(regs=view.stage2, walk=walk), False)
    assert not any("\x1b" in ln for ln in lines) and any("vm\\x1b[2Jm" in ln for ln in lines)
