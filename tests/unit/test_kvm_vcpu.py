"""KVM's own vCPUs read at BTF offsets (kvm_vcpu.py), on kernel memory a test lays out with the
bundled Debian 6.1 kernel's own BTF (the offsets a real KVM host of that kernel has), and every
way it cannot be read: each a sentence (Unavailable), never a root. The real KVM is in
tests/integration/kvm/ (AMD NPT) and tests/integration/ept/ (Intel EPT)."""

import os
import shutil
import struct

import pytest

from qintrospect.slat import kvm_vcpu
from qintrospect.errors import MemoryReadError
from tests import kernel_image

HEAD = 0xFFFFFFFFC0A10000          # kvm.ko's vm_list (the modules' area)
VM, OTHER = 0xFFFFC90000100000, 0xFFFFC90000300000   # struct kvm (vmalloc)
NODE = 0xFFFF888004000000           # an xa_node
VCPUS = (0xFFFF888004100000, 0xFFFF888004200000)     # struct kvm_vcpu
PID = 4242


@pytest.fixture(scope="module")
def btf_folder(tmp_path_factory):
    img = kernel_image.vmlinux()
    if img is None:
        pytest.fail("the bundled guest is not built (vm/build.sh): its kernel's BTF is the "
                    "test's layout")
    folder = tmp_path_factory.mktemp("btf")
    (folder / "vmlinux").write_bytes(img.section(".BTF"))
    shutil.copy(kernel_image.module_path("kvm.ko"), folder / "kvm")
    return str(folder)


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    monkeypatch.setattr(kvm_vcpu, "_cache_key", lambda: None)


class Kernel:
    """Sparse kernel memory: what read_vm reads, through read_virtual and covers."""

    def __init__(self, modules=True):
        self.mem = {}
        self.modules = modules

    def covers(self, va):
        return self.modules or va < 0xFFFFFFFFA0000000

    def put(self, va, data):
        for i, b in enumerate(data):
            self.mem[va + i] = b

    def u64(self, va, v):
        self.put(va, struct.pack("<Q", v))

    def read_virtual(self, va, n):
        if not self.covers(va):
            raise MemoryReadError(f"{va:#x} not shown", va)
        return bytes(self.mem.get(va + i, 0) for i in range(n))


def build(folder, loop=False):
    """Two VMs on vm_list (another process's, then PID's) and PID's two vCPUs in an xa_node:
    vCPU 0 on its own table (5 levels), vCPU 1 running a nested guest (guest_mmu)."""
    f = kvm_vcpu.layout(folder)
    off = lambda name: f[name][0] // 8                  # noqa: E731
    k = Kernel()
    k.u64(HEAD + off("list.next"), OTHER + off("kvm.vm_list"))
    k.u64(OTHER + off("kvm.vm_list"), VM + off("kvm.vm_list"))
    k.u64(VM + off("kvm.vm_list"), OTHER + off("kvm.vm_list") if loop else HEAD)
    k.put(OTHER + off("kvm.pid"), struct.pack("<i", 999))
    k.put(VM + off("kvm.pid"), struct.pack("<i", PID))
    k.put(VM + off("kvm.online_vcpus"), struct.pack("<i", 2))
    k.u64(VM + off("kvm.vcpu_array"), NODE | 2)          # an internal entry: a node
    k.put(NODE + off("xa.shift"), b"\0")
    for i, v in enumerate(VCPUS):
        k.u64(NODE + off("xa.slots") + 8 * i, v)
        k.put(v + off("vcpu.idx"), struct.pack("<i", i))
        k.put(v + off("vcpu.id"), struct.pack("<i", i))
        for mmu, root in (("vcpu.root_mmu", 0x7FE9D000 + 0x1000 * i), ("vcpu.guest_mmu",
                                                                          0x1234000)):
            base = v + off(mmu)
            k.u64(base + off("mmu.root"), root)
            bit, bits, _ = f["mmu.level"]
            k.put(base + bit // 8, bytes([5 << (bit % 8)]))      # root_role.level = 5
        k.u64(v + off("vcpu.mmu"), v + off("vcpu.guest_mmu" if i else "vcpu.root_mmu"))
        k.put(v + off("vcpu.hflags"), struct.pack("<I", i))      # HF_GUEST_MASK on vCPU 1
    return k


def kallsyms(tmp_path, text=None):
    path = tmp_path / "kallsyms"
    path.write_text(text if text is not None else
                    f"ffffffff81000000 T _stext\n{HEAD:016x} d vm_list\t[kvm]\n")
    return str(path)


def read(tmp_path, folder, k, **kw):
    return kvm_vcpu.read_vm(PID, memory=k, vendor=kw.pop("vendor", "intel"),
                            kallsyms_path=kw.pop("kallsyms", None) or kallsyms(tmp_path),
                            btf_folder=folder, **kw)


def test_each_vcpus_root_read_at_btf_offsets(tmp_path, btf_folder):
    vm = read(tmp_path, btf_folder, build(btf_folder))
    assert vm.address == VM and vm.pid == PID and len(vm.vcpus) == 2
    v0, v1 = vm.vcpus
    assert (v0.index, v0.root, v0.level, v0.smm) == (0, 0x7FE9D000, 5, False)
    assert v0.active == "root_mmu" and v0.guest_mode is False
    # the EPTP KVM builds: WB (6), walk length 5 (4 << 3), A/D as kvm_intel's eptad says
    assert v0.eptp & ~(1 << 6) == 0x7FE9D000 | 6 | 4 << 3
    assert (v1.active, v1.active_root, v1.guest_mode) == ("guest_mmu", 0x1234000, True)
    assert vm.root_of(1) is v1 and vm.root_of(7) is v0
    d = vm.to_dict()
    assert d["struct_kvm"] == hex(VM) and d["vcpus"][1]["active_mmu"] == "guest_mmu"
    amd = read(tmp_path, btf_folder, build(btf_folder), vendor="amd")
    assert amd.vcpus[0].eptp is None


def test_debugfs_says_guest_mode_where_it_can(tmp_path, btf_folder):
    vm = read(tmp_path, btf_folder, build(btf_folder), debugfs_vcpus={0: {"guest_mode": 1}})
    assert vm.vcpus[0].guest_mode is True          # debugfs first, hflags otherwise


@pytest.mark.parametrize("case, why", [
    ("kallsyms hidden", "hides kernel addresses"),
    ("no vm_list", "is not in"),
    ("no BTF", "no BTF"),
    ("no module area", "does not show the modules' area"),
    ("another pid", "has no VM made by process"),
    ("a loop", "vm_list could not be read"),
    ("no vcpu", "has no vCPU yet"),
])
def test_what_cannot_be_read_is_said_never_guessed(tmp_path, btf_folder, case, why):
    k = build(btf_folder, loop=case == "a loop")
    kw = {}
    folder = btf_folder
    if case == "kallsyms hidden":
        kw["kallsyms"] = kallsyms(tmp_path, f"{0:016x} T _stext\n{0:016x} d vm_list\t[kvm]\n")
    elif case == "no vm_list":
        kw["kallsyms"] = kallsyms(tmp_path, "ffffffff81000000 T _stext\n")
    elif case == "no BTF":
        folder = str(tmp_path / "empty")
        os.mkdir(folder)
    elif case == "no module area":
        k.modules = False
    elif case == "another pid":
        k.put(VM + kvm_vcpu.layout(btf_folder)["kvm.pid"][0] // 8, struct.pack("<i", 1))
    elif case == "no vcpu":
        k.put(VM + kvm_vcpu.layout(btf_folder)["kvm.online_vcpus"][0] // 8,
              struct.pack("<i", 0))
    with pytest.raises(kvm_vcpu.Unavailable, match=why) as exc:
        read(tmp_path, folder, k, **kw)
    assert exc.value.exit_status == 3


def test_a_vcpu_with_no_root_loaded_gives_none(tmp_path, btf_folder):
    k = build(btf_folder)
    f = kvm_vcpu.layout(btf_folder)
    for v in VCPUS:
        k.u64(v + f["vcpu.root_mmu"][0] // 8 + f["mmu.root"][0] // 8, (1 << 64) - 1)
    vm = read(tmp_path, btf_folder, k)
    assert vm.vcpus[0].root is None and vm.root_of(0) is None


def test_the_second_command_reads_neither_kallsyms_nor_btf(tmp_path, btf_folder, monkeypatch):
    """vm_list's address and the offsets are kept for this boot and this kvm.ko (runstate's
    private folder): the next command takes them from there; another boot reads again."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = kallsyms(tmp_path)
    monkeypatch.setattr(kvm_vcpu, "PROC_KALLSYMS", path)
    monkeypatch.setattr(kvm_vcpu, "SYS_BTF", btf_folder)
    monkeypatch.setattr(kvm_vcpu, "_cache_key", lambda: "boot=1 kvm=0xffffffffc0a00000")
    first = kvm_vcpu.kernel_facts(path, btf_folder)
    os.unlink(path)
    assert kvm_vcpu.kernel_facts(path, btf_folder) == first          # kept
    monkeypatch.setattr(kvm_vcpu, "_cache_key", lambda: "boot=2 kvm=0xffffffffc0a00000")
    with pytest.raises(kvm_vcpu.Unavailable, match="is not in"):   # read again: gone now
        kvm_vcpu.kernel_facts(path, btf_folder)
