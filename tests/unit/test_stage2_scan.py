"""KVM/arm64 stage 2 tables found by a scan (commands/stage2_scan.py) on synthetic guest RAM:
a stage 2 first level confirmed by the VMM's own table mapping its pages at the memslot's
offset, and the lookalikes it must refuse: a process's own table (nG on its pages), a table
read one level too deep, a process that holds the same pages scattered (or in the kernel's
half only), a crafted tree that points at itself. The rig test (test_kvm_arm64.py) holds the
same to a real KVM."""

import pytest

from qintrospect.commands import finder, stage2_scan
from qintrospect.commands.roots_arm64 import unreferenced_tables
from qintrospect.errors import UsageError
from qintrospect.machine.arm64 import Arm64Vcpu
from qintrospect.paging.arm64_format import Arm64State

from .test_roots_arm64 import AF, AP_EL0, PAGE_DESC, STATE, TABLE, Ram, page

NG, SH = 1 << 11, 3 << 8
VTCR = 24 | 1 << 6 | 0b101 << 16 | 1 << 31        # 40-bit IPA, 4K, start level 1, 48-bit PA
S2_LEAF = AF | SH | 0xF << 2 | 3 << 6 | PAGE_DESC  # KVM's: Normal WB, S2AP RW
VMM_PAGE = AF | SH | AP_EL0 | NG | PAGE_DESC       # a Linux user page
IPA, HVA, PAGES = 0x4000_0000, 0x7f00_0000_0000, 16
S2_ROOT, VMM_ROOT, OTHER_ROOT = page(300), page(400), page(500)


def stage1(ram, root, tables, va, pa, flags=VMM_PAGE):
    """One 4 KiB page VA -> PA in a 48-bit 4K TTBR0 tree at root (tables: L1, L2, L3 pages)."""
    l1, l2, l3 = tables
    ram.put(root + 8 * (va >> 39 & 511), l1 | TABLE)
    ram.put(l1 + 8 * (va >> 30 & 511), l2 | TABLE)
    ram.put(l2 + 8 * (va >> 21 & 511), l3 | TABLE)
    ram.put(l3 + 8 * (va >> 12 & 511), pa | flags)


def build(s2_flags=S2_LEAF, vmm_pages=PAGES, scatter=False):
    """Guest RAM with the kernel's tables (test_roots_arm64's), a VM's stage 2 (IPA + k pages
    -> page(200 + k)) and its VMM's table (HVA + k pages -> the same pages)."""
    from .test_roots_arm64 import build as kernel_and_processes
    ram, _ = kernel_and_processes()
    ram.put(S2_ROOT + 8 * (IPA >> 30), page(302) | TABLE)        # L1 (2 concatenated tables)
    ram.put(page(302) + 8 * (IPA >> 21 & 511), page(303) | TABLE)
    for k in range(PAGES):
        ram.put(page(303) + 8 * k, page(200 + k) | s2_flags)
    for k in range(vmm_pages):
        va = HVA + (k * 0x5000 if scatter else k * 0x1000)
        stage1(ram, VMM_ROOT, (page(401), page(402), page(403 + k // 512)), va, page(200 + k))
    return ram


class FakeVm:
    def __init__(self, ram, vtcr=VTCR, hcr=1 << 34 | 1 << 27 | 1 << 31):
        self.memory = ram
        self.ram_map = ram.ram_map
        self.vcpu = 0
        self.cpu = Arm64State(ttbr0=VMM_ROOT, ttbr1=page(1), regime="EL2&0", **STATE)
        self.vcpu_info = [Arm64Vcpu(0, None, None, ttbr0=VMM_ROOT, ttbr1=page(1),
                                    tcr=STATE["tcr"], sctlr=1, mair=0xFF, cpsr=0x3c9,
                                    hcr=hcr, vttbr=0, vtcr=vtcr)]

    @property
    def stage2(self):            # (as Session: the stage 2 the vCPU runs under now)
        return self.vcpu_info[0].stage2

    def cached_memory(self):
        return self.memory

    def check_open(self):
        pass

    def require_one_stage(self, what):
        pass


def tables_of(vm):
    return unreferenced_tables(vm.memory, vm.ram_map, vm.cpu).tolist()


def test_the_stage2_first_level_is_found_with_its_vmm_and_memslot():
    vm = FakeVm(build())
    assert {S2_ROOT, VMM_ROOT} <= set(tables_of(vm))      # both have a root's shape
    (f,) = stage2_scan.find_stage2(vm)
    assert (f.root, f.vmm_root, f.leaves, f.checked, f.matched) == \
        (S2_ROOT, VMM_ROOT, PAGES, PAGES, PAGES)
    assert f.slots == ((HVA - IPA, PAGES, IPA, IPA + (PAGES - 1) * 0x1000),)
    d = f.to_dict()
    assert d["memslots"][0]["hva_minus_ipa"] == hex(HVA - IPA) and d["mapped_bytes"] == 65536
    # find-cr3/who-maps keep the process root and leave KVM's table out
    scanned = [finder.Candidate(root, "a table") for root in tables_of(vm)]
    kept = [c.root for c in finder.without_stage2(vm, scanned)]
    assert S2_ROOT not in kept and VMM_ROOT in kept


@pytest.mark.parametrize("why, ram", [
    ("nG on its pages: a process's own table", lambda: build(s2_flags=S2_LEAF | NG)),
    ("no access, no memory type: a table descriptor read one level too deep",
     lambda: build(s2_flags=PAGE_DESC)),
    ("the VMM maps too few of its pages", lambda: build(vmm_pages=PAGES // 2)),
    ("a process holds the pages, scattered", lambda: build(scatter=True)),
])
def test_lookalikes_are_not_taken_for_kvms(why, ram):
    vm = FakeVm(ram())
    assert stage2_scan.find_stage2(vm) == [], why


def test_the_kernels_half_confirms_nothing():
    """The kernel's linear map holds every page of RAM at one offset: pages that only it maps
    (here with nG, as under KPTI) confirm no VM (only a process table's lower, TTBR0 range is
    looked at)."""
    ram = build(vmm_pages=0)
    for k in range(PAGES):           # test_roots_arm64's kernel: page(16) maps RAM's first 2 MiB
        ram.put(page(16) + 8 * (200 + k), page(200 + k) | PAGE_DESC | AF | NG)
    assert stage2_scan.find_stage2(FakeVm(ram)) == []


def test_a_tree_that_points_at_itself_is_bounded():
    ram = build()
    ram.put(page(303) + 8 * 511, page(303) | TABLE)           # read as a page: no S2AP
    ram.put(page(302) + 8 * 7, page(302) | TABLE)             # an L2 entry back at itself
    assert stage2_scan.find_stage2(FakeVm(ram)) == []          # refused, and it returned


@pytest.mark.parametrize("root, vtcr, says", [
    (S2_ROOT + 0x1000, VTCR, "not a stage 2 first level's address"),   # not 8 KiB aligned
    (0x1000_0000, VTCR, "not in the guest's RAM"),
    (S2_ROOT, 0, "VTCR_EL2 is 0"),
    (S2_ROOT, 1 << 31 | 63, "lays out no stage 2 walk"),                 # T0SZ 63
])
def test_stage2_registers_refuse_what_cannot_be_walked(root, vtcr, says):
    vm = FakeVm(build(), vtcr=vtcr)
    with pytest.raises(UsageError, match=says):
        stage2_scan.registers_for(vm, root)


def test_stage2_registers_are_a_vcpu_of_that_vm_with_its_mmu_off():
    vm = FakeVm(build())
    regs = stage2_scan.registers_for(vm, S2_ROOT)
    assert regs.regime == "EL1&0" and regs.stage2 is not None and not regs.sctlr & 1
    assert (regs.vttbr, regs.vtcr, regs.ttbr0, regs.ttbr1) == (S2_ROOT, VTCR, 0, 0)
    assert "(the vCPU's)" in regs.stage2_source
    given = stage2_scan.registers_for(vm, S2_ROOT, VTCR)
    assert f"VTCR_EL2 {VTCR:#x} (given)" in given.stage2_source


def test_inside_a_guest_the_live_root_is_named():
    from qintrospect.record import replace
    vm = FakeVm(build())
    vm.vcpu_info[0] = replace(vm.vcpu_info[0], cpsr=0x3c5, hcr=1 << 34 | 1 | 1 << 31,
                              vttbr=S2_ROOT)
    with pytest.raises(UsageError, match=f"VTTBR_EL2's \\({S2_ROOT:#x}"):
        stage2_scan.find_stage2(vm)


def test_no_el2_is_said():
    vm = FakeVm(build(), hcr=None)
    with pytest.raises(UsageError, match="needs a guest with EL2"):
        stage2_scan.find_stage2(vm)


def test_a_layout_that_walks_nothing_is_refused_before_the_scan():
    vm = FakeVm(build(), vtcr=1 << 31 | 63)
    with pytest.raises(UsageError, match="lays out no stage 2 walk"):
        stage2_scan.find_stage2(vm)


def test_a_big_vm_is_judged_by_its_first_leaves(monkeypatch):
    """More leaves than a candidate may cost: the scan stops reading there and judges by what
    it read, and says so (complete: false), rather than refusing the VM."""
    monkeypatch.setattr(stage2_scan, "LEAVES_MAX", 8)
    (f,) = stage2_scan.find_stage2(FakeVm(build()))
    assert (f.root, f.vmm_root, f.complete) == (S2_ROOT, VMM_ROOT, False)
    assert f.matched == f.checked == f.leaves == 8 and f.to_dict()["complete"] is False
