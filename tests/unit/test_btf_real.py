"""The BTF reader on real kernels' BTF, checked against pahole (Debian's dwarves), an
independent reader of the same data:

- the bundled guest's vmlinux (Debian 6.1, decompressed from the VM cache) and its kvm.ko and
  kvm-amd.ko (split BTF on that vmlinux), every member of the structs qintrospect reads;
- this machine's own /sys/kernel/btf/vmlinux (a newer kernel: other layouts), and its parse
  time, which must stay well under a second.

Tests skip, saying why, when the VM cache (scripts/setup) or pahole (apt-get install dwarves)
is missing.
"""

import functools
import os
import re
import shutil
import subprocess
import time

import pytest

from qintrospect.btf import Btf
from qintrospect.btf import btf as B
from tests import kernel_image

SYSFS = "/sys/kernel/btf/vmlinux"
PAHOLE = shutil.which("pahole")
need_pahole = pytest.mark.skipif(PAHOLE is None, reason="pahole not installed "
                                 "(apt-get install dwarves)")

# the structs (and their members) the host-side KVM reader and the guest reader rely on
GUEST_STRUCTS = ["task_struct", "mm_struct", "list_head", "xarray", "xa_node", "maple_tree",
                 "maple_node", "maple_range_64", "maple_arange_64", "vm_area_struct",
                 "pid", "upid", "cred", "uts_namespace", "new_utsname"]
KVM_STRUCTS = ["kvm", "kvm_vcpu", "kvm_vcpu_arch", "kvm_mmu", "kvm_mmu_root_info",
               "kvm_arch", "kvm_mmu_page"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    img = kernel_image.vmlinux()
    if img is None:
        pytest.skip(f"no guest kernel in {kernel_image.cache_dir()} (run scripts/setup)")
    path = tmp_path_factory.mktemp("kernel") / "vmlinux"
    path.write_bytes(img.data)
    return img, str(path)


@pytest.fixture(scope="module")
def vmlinux(image):
    return Btf.parse(image[0].section(".BTF"), name="vmlinux 6.1")


def module(name):
    path = kernel_image.module_path(name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not built (vm/kvm/build.sh, run by scripts/setup)")
    return path


@pytest.fixture(scope="module")
def kvm(vmlinux):
    return Btf.load(module("kvm.ko"), base=vmlinux)


@pytest.fixture(scope="module")
def kvm_amd(vmlinux):
    return Btf.load(module("kvm-amd.ko"), base=vmlinux)


@functools.lru_cache(maxsize=None)
def pahole(struct, path, base=None):
    cmd = [PAHOLE, "-F", "btf", "-C", struct]
    if base:
        cmd += ["--btf_base", base]
    out = subprocess.run(cmd + [path], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith(f"struct {struct} {{"), out[:200]
    return out


def pahole_layout(struct, path, base=None):
    """{member: (bit offset, bit size or None)} of a struct as pahole prints it, with the
    members of anonymous structs/unions brought up to the struct's level, as C does."""
    out = pahole(struct, path, base)
    stack = [{}]
    comment = re.compile(r"/\*\s*(\d+)(?::\s*(\d+))?\s+(\d+)\s*\*/")
    for line in out.splitlines()[1:]:
        code = line.split("/*")[0].strip()
        if code.endswith("{"):
            stack.append({})
            continue
        if code.startswith("}"):
            inner = stack.pop()
            if not stack:
                return inner
            named = re.match(r"}\s*(\w+)\s*;", code)
            m = comment.search(line)
            if named and m:
                stack[-1][named.group(1)] = (8 * int(m.group(1)), None)
            elif not named:
                stack[-1].update(inner)
            continue
        m = comment.search(line)
        if not m or not code.endswith(";"):
            continue
        fp = re.search(r"\(\*\s*(\w+)\)", code)
        if fp:
            name, bits = fp.group(1), None
        else:
            decl = re.sub(r"__attribute__\(\(.*\)\)", "", code[:-1])
            decl = re.sub(r"\[[^\]]*\]", "", decl).strip()
            bits = None
            if re.search(r":\s*\d+$", decl):
                decl, nbits = decl.rsplit(":", 1)
                bits = int(nbits)
            name = decl.split()[-1].lstrip("*")
        bit = 8 * int(m.group(1)) + (int(m.group(2)) if m.group(2) else 0)
        stack[-1][name] = (bit, bits)
    raise AssertionError(f"pahole's output for {struct} does not close: {out[-200:]!r}")


def compare(btf, struct, path, base=None):
    """Every member pahole lists must be where our reader puts it; returns how many."""
    theirs = pahole_layout(struct, path, base)
    assert theirs, f"pahole printed no members for {struct}"
    for name, (bit, bits) in theirs.items():
        f = btf.member(struct, name)
        assert f.bit_offset == bit, f"{struct}.{name}: we say bit {f.bit_offset}, pahole {bit}"
        assert f.bit_size == bits, f"{struct}.{name}: bitfield {f.bit_size} vs pahole {bits}"
    assert btf.sizeof(struct) == pahole_size(struct, path, base)
    return len(theirs)


def pahole_size(struct, path, base=None):
    return int(re.search(r"/\* size: (\d+),", pahole(struct, path, base)).group(1))


# ---- the bundled guest's kernel (Debian 6.1) -------------------------------------------------
def test_guest_vmlinux_btf_is_whole(vmlinux, image):
    img, _ = image
    assert vmlinux.validate() == vmlinux.count > 50000
    assert vmlinux.ptr_size == 8
    s = img.by_name[".BTF"]
    assert s.size == len(img.section(".BTF"))


@need_pahole
@pytest.mark.parametrize("struct", GUEST_STRUCTS)
def test_guest_structs_match_pahole(vmlinux, image, struct):
    assert compare(vmlinux, struct, image[1]) > 1


@need_pahole
@pytest.mark.parametrize("struct", KVM_STRUCTS)
def test_kvm_module_structs_match_pahole(kvm, image, struct):
    assert compare(kvm, struct, module("kvm.ko"), base=image[1]) > 1


@need_pahole
@pytest.mark.parametrize("struct", ["vcpu_svm", "kvm_svm", "vmcb", "kvm_vcpu"])
def test_kvm_amd_module_structs_match_pahole(kvm_amd, image, struct):
    assert compare(kvm_amd, struct, module("kvm-amd.ko"), base=image[1]) > 1


def test_the_paths_the_kvm_reader_takes(kvm, kvm_amd):
    """The dotted paths feature (A) uses, in both module BTFs (each is split on vmlinux
    alone, so each carries its own copy of KVM's structs): they must agree."""
    paths = [("kvm_vcpu", "arch.mmu"), ("kvm_vcpu", "arch.root_mmu"),
             ("kvm_vcpu", "arch.guest_mmu"), ("kvm_vcpu", "arch.hflags"),
             ("kvm_mmu", "root.hpa"), ("kvm_mmu_root_info", "hpa"), ("kvm", "vm_list"),
             ("kvm", "userspace_pid"), ("kvm", "vcpu_array"), ("kvm", "online_vcpus"),
             ("kvm_vcpu", "vcpu_id"), ("kvm_vcpu", "kvm")]
    for struct, path in paths:
        assert kvm.offsetof(struct, path) == kvm_amd.offsetof(struct, path), (struct, path)
    assert kvm.offsetof("kvm_vcpu", "arch.mmu") == \
        kvm.offsetof("kvm_vcpu", "arch") + kvm.offsetof("kvm_vcpu_arch", "mmu")
    assert kvm.member("kvm_vcpu", "arch.mmu").resolved.kind == B.PTR
    assert kvm.describe(kvm.member("kvm_vcpu", "arch.mmu").type_id) == "struct kvm_mmu *"
    assert kvm.member("kvm_mmu", "root.hpa").type.name == "hpa_t"
    assert kvm.member("kvm", "vcpu_array").resolved.name == "xarray"     # 6.1: an xarray
    assert kvm.member("kvm_vcpu", "arch.hflags").size == 4
    with pytest.raises(B.BtfLookupError, match="no member 'root_hpa'"):
        kvm.member("kvm_mmu", "root_hpa")               # older kernels' name, gone in 6.1
    assert kvm.has_member("kvm_mmu", "root.hpa") and not kvm.has_member("kvm_mmu", "root_hpa")
    assert not kvm.has_member("kvm", "vcpus[0]")         # the array before the xarray


def test_module_btf_is_split_on_vmlinux(kvm, vmlinux):
    """Debian 6.1's vmlinux BTF already has struct kvm, kvm_vcpu, kvm_mmu (headers that
    vmlinux code includes), so kvm.ko's BTF reuses them; kvm_mmu_page is kvm.ko's own."""
    assert kvm.first_id == vmlinux.last_id + 1
    assert kvm.struct("kvm").id == vmlinux.struct("kvm").id < kvm.first_id
    assert kvm.struct("kvm_mmu_page").id >= kvm.first_id
    assert not vmlinux.find("kvm_mmu_page", B.STRUCT)
    assert kvm.validate() == kvm.count


def test_guest_percpu_variables(vmlinux):
    percpu = vmlinux.variables(".data..percpu")
    assert "runqueues" in percpu and "current_task" in percpu
    off, size, tid = percpu["runqueues"]
    assert vmlinux.describe(tid) == "struct rq" and size == vmlinux.sizeof("rq")


def test_guest_vmlinux_loads_from_the_elf_file(image, vmlinux):
    whole = Btf.load(image[1])
    assert whole.last_id == vmlinux.last_id
    assert whole.offsetof("task_struct", "tasks") == vmlinux.offsetof("task_struct", "tasks")


@need_pahole
def test_pahole_sees_the_same_guest_offsets_the_brief_names(vmlinux, kvm, image):
    """A few named numbers, both tools side by side (for the record in the report)."""
    pairs = {("task_struct", "tasks"): vmlinux, ("task_struct", "pid"): vmlinux,
             ("task_struct", "tgid"): vmlinux, ("task_struct", "comm"): vmlinux,
             ("task_struct", "mm"): vmlinux, ("mm_struct", "pgd"): vmlinux,
             ("kvm_vcpu", "arch"): kvm, ("kvm_vcpu_arch", "mmu"): kvm, ("kvm_mmu", "root"): kvm,
             ("kvm_mmu_root_info", "hpa"): kvm, ("kvm", "vm_list"): kvm,
             ("kvm", "userspace_pid"): kvm, ("kvm", "vcpu_array"): kvm}
    for (struct, member), btf in pairs.items():
        base = image[1] if btf is kvm else None
        path = module("kvm.ko") if btf is kvm else image[1]
        bit, _ = pahole_layout(struct, path, base)[member]
        assert btf.offsetof(struct, member) * 8 == bit


# ---- this machine's kernel ---------------------------------------------------------------
host = pytest.mark.skipif(not os.path.exists(SYSFS), reason=f"{SYSFS} absent")


@host
def test_host_btf_parses_fast():
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        btf = Btf.load(SYSFS)
        btf.struct("task_struct")
        btf.offsetof("task_struct", "tasks")
        btf.offsetof("mm_struct", "pgd")
        elapsed = time.perf_counter() - t0
        best = elapsed if best is None else min(best, elapsed)
    size = os.path.getsize(SYSFS)
    assert best < 1.0, f"{size} bytes of BTF took {best:.2f} s to parse and look up"


@pytest.fixture(scope="module")
def host_btf():
    return Btf.load(SYSFS)


@host
def test_host_btf_validates(host_btf):
    assert host_btf.validate() == host_btf.count


@host
@need_pahole
@pytest.mark.parametrize("struct", ["task_struct", "mm_struct", "list_head", "xa_node",
                                    "maple_range_64", "maple_arange_64"])
def test_host_structs_match_pahole(host_btf, struct):
    assert compare(host_btf, struct, SYSFS) > 1


@host
@need_pahole
@pytest.mark.parametrize("struct", ["kvm", "kvm_vcpu", "kvm_vcpu_arch", "kvm_mmu"])
def test_host_kvm_structs_match_pahole(host_btf, struct):
    btf = host_btf
    if not btf.find(struct, B.STRUCT):
        pytest.skip(f"this host's vmlinux BTF has no struct {struct} (KVM is a module here)")
    assert compare(btf, struct, SYSFS) > 1
