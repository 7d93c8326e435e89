"""The compressed kallsyms tables of the bundled guest kernel (Debian 6.1), decoded from the
decompressed vmlinux exactly as from a guest's memory (read(addr, n) over the image), and
checked against sources that do not go through kallsyms:

- every exported symbol in __ksymtab/__ksymtab_gpl (place-relative entries the linker wrote);
- ELF section bounds (.text, .BTF, .data..percpu);
- BTF's .data..percpu variables: with x86-64's absolute per-CPU symbols, a per-CPU variable's
  kallsyms address is its offset in that section;
- static data the kernel image holds, read through BTF (init_task's pointers point at the
  symbols kallsyms names).

The table addresses (which vmcoreinfo would give in a running guest) are found by their
shape (tests/kernel_image.py), since Debian's image has no symbol table.
"""

import pytest

from qintrospect.btf import Btf
from qintrospect.btf.errors import KallsymsError
from qintrospect.btf.kallsyms import Kallsyms
from qintrospect.btf.maple import MapleTree
from qintrospect.btf.typed import Obj, list_for_each
from tests import kernel_image


@pytest.fixture(scope="module")
def img():
    image = kernel_image.vmlinux()
    if image is None:
        pytest.skip(f"no guest kernel in {kernel_image.cache_dir()} (run scripts/setup)")
    return image


@pytest.fixture(scope="module")
def tables(img):
    return kernel_image.find_kallsyms_tables(img)


@pytest.fixture(scope="module")
def ks(img, tables):
    return Kallsyms.from_tables(img.read, tables)


@pytest.fixture(scope="module")
def btf(img):
    return Btf.parse(img.section(".BTF"), name="vmlinux")


def test_layout_is_base_relative_with_absolute_percpu(ks, tables):
    assert ks.mode == "absolute_percpu"            # x86-64 SMP, Linux 6.1
    assert len(ks) > 50000
    assert ks.address("_text") == ks.address("_stext") == 0xFFFFFFFF81000000
    assert ks.lookup("kallsyms_names") == []        # the tables leave themselves out
    addrs = [s.address for s in ks]
    assert addrs == sorted(addrs)


def test_every_exported_symbol_agrees_with_ksymtab(img, ks):
    exported = kernel_image.ksymtab(img)
    assert len(exported) > 5000
    wrong = [(n, hex(a)) for n, a in exported.items()
             if a not in {s.address for s in ks.lookup(n)}]
    assert wrong == []


def test_section_bounds_agree(img, ks):
    text, btf_sec, percpu = (img.by_name[n] for n in (".text", ".BTF", ".data..percpu"))
    assert ks.address("_stext") == text.addr
    assert ks.address("__start_BTF") == btf_sec.addr
    assert ks.address("__stop_BTF") == btf_sec.addr + btf_sec.size
    assert ks.address("__per_cpu_start") == 0
    assert ks.address("__per_cpu_end") == percpu.size


def test_percpu_symbols_are_btf_percpu_offsets(ks, btf):
    percpu = btf.variables(".data..percpu")
    both = [n for n in percpu if n in ks]
    assert len(both) > 200
    for name in both:
        syms = ks.lookup(name)
        assert any(s.address == percpu[name][0] and s.type == "A" for s in syms), name


def test_btf_found_through_kallsyms_is_the_btf_section(img, ks):
    """The guest reader's path: __start_BTF..__stop_BTF from kallsyms, then BTF."""
    start, stop = ks.address("__start_BTF"), ks.address("__stop_BTF")
    blob = img.read(start, stop - start)
    assert blob == img.section(".BTF")
    assert Btf.parse(blob).struct("task_struct").size > 1000


def test_a_wrong_check_or_layout_is_refused(img, tables):
    with pytest.raises(KallsymsError, match="_stext decodes to 0xffffffff81000000, expected"):
        Kallsyms.from_tables(img.read, tables, check={"_stext": 0xFFFFFFFF81200000})
    with pytest.raises(KallsymsError, match="as relative: _stext decodes to"):
        Kallsyms.from_tables(img.read, tables, mode="relative",
                             check={"_stext": 0xFFFFFFFF81000000})
    assert Kallsyms.from_tables(img.read, tables, check={"_stext": 0xFFFFFFFF81000000}).mode \
        == "absolute_percpu"


def test_init_task_read_through_btf_points_where_kallsyms_says(img, ks, btf):
    """init_task is statically initialized in the image: its pointers and text are data
    the compiler wrote, checked against kallsyms' addresses; offsets all from BTF."""
    read = img.read
    task = Obj(btf, "task_struct", ks.address("init_task"), read)
    assert task.member("comm").string() == "swapper"
    assert task.member("pid") == 0 and task.member("tgid") == 0
    assert task.member("mm").pointer() is None
    mm = task.member("active_mm").pointer()
    assert mm.address == ks.address("init_mm")
    assert mm.member("pgd").value() == ks.address("init_top_pgt")
    assert task.member("real_parent").value() == task.address
    assert task.member("group_leader").value() == task.address
    assert task.member("thread_pid").value() == ks.address("init_struct_pid")
    assert task.member("signal").value() == ks.address("init_signals")
    assert task.member("stack").value() == ks.address("init_stack")
    assert task.member("cred").value() == ks.address("init_cred")
    # an empty list: the head points at itself
    tasks = list_for_each(btf, read, task.address_of("tasks"), "task_struct", "tasks")
    assert tasks == [] and tasks.complete
    # init_mm's maple tree is empty until the first mapping
    assert MapleTree(btf, read, mm.address_of("mm_mt")).items() == []
    uts = Obj(btf, "uts_namespace", ks.address("init_uts_ns"), read)
    assert uts.member("name.sysname").string() == "Linux"
    release = kernel_image.release()
    if release:
        assert uts.member("name.release").string() == release
