"""vmcoreinfo: the text parser, the ELF-note finder, and the guest reader's whole offline path
on the bundled 6.1 kernel: a note (with that kernel's real numbers) found in a buffer of
"RAM", parsed, its kallsyms table addresses decoded against the image, its other SYMBOL()s
checking the decode, and BTF reached through __start_BTF."""

import random
import struct

import pytest

from qintrospect.btf import Btf
from qintrospect.btf.errors import KallsymsError, VmcoreinfoError
from qintrospect.btf.vmcoreinfo import Vmcoreinfo, find_note, find_notes
from qintrospect.errors import ParseError
from tests import kernel_image

# the lines kernel/crash_core.c (6.1) and arch/x86's arch_crash_save_vmcoreinfo() write, in
# their order and formats (values made up where the test does not check them)
SAMPLE = """\
OSRELEASE=6.1.0-57-cloud-amd64
BUILD-ID=6c3e5e3b1a2b7f0c9d8e7f6a5b4c3d2e1f0a9b8c
PAGESIZE=4096
SYMBOL(init_uts_ns)=ffffffff82bf9b60
OFFSET(uts_namespace.name)=4
SYMBOL(node_online_map)=ffffffff82b1c6a8
SYMBOL(swapper_pg_dir)=ffffffff82a10000
SYMBOL(_stext)=ffffffff81000000
SYMBOL(vmap_area_list)=ffffffff82b5b6b0
SYMBOL(mem_section)=ffff88800fffa000
LENGTH(mem_section)=2048
SIZE(mem_section)=16
OFFSET(mem_section.section_mem_map)=0
NUMBER(SECTION_SIZE_BITS)=27
NUMBER(MAX_PHYSMEM_BITS)=46
SIZE(page)=64
SIZE(list_head)=16
SIZE(nodemask_t)=128
OFFSET(page.flags)=0
OFFSET(list_head.next)=0
OFFSET(list_head.prev)=8
LENGTH(zone.free_area)=11
NUMBER(PG_lru)=4
NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)=-257
SYMBOL(kallsyms_names)=ffffffff82175590
SYMBOL(kallsyms_num_syms)=ffffffff82175588
SYMBOL(kallsyms_token_table)=ffffffff822c9d08
SYMBOL(kallsyms_token_index)=ffffffff822ca0a0
SYMBOL(kallsyms_offsets)=ffffffff821200b0
SYMBOL(kallsyms_relative_base)=ffffffff82175580
NUMBER(phys_base)=-2097152
SYMBOL(init_top_pgt)=ffffffff82a10000
NUMBER(pgtable_l5_enabled)=0
SYMBOL(node_data)=ffffffff82b1d8c0
LENGTH(node_data)=1024
KERNELOFFSET=0
NUMBER(KERNEL_IMAGE_SIZE)=1073741824
NUMBER(sme_mask)=0
CONFIG_X86_64=y
NUMBER(kimage_voffset)=0xffffffbf70000000
CRASHTIME=1733540000
"""


def test_parse_sample():
    info = Vmcoreinfo.parse(SAMPLE)
    assert info.osrelease == "6.1.0-57-cloud-amd64" and info.pagesize == 4096
    assert info.build_id.startswith("6c3e5e")
    assert info.symbol("_stext") == 0xFFFFFFFF81000000
    assert info.offset("uts_namespace", "name") == 4
    assert info.offsets["list_head.prev"] == 8 and info.sizes["list_head"] == 16
    assert info.lengths["zone.free_area"] == 11
    assert info.numbers["PAGE_OFFLINE_MAPCOUNT_VALUE"] == -257
    assert info.numbers["phys_base"] == -2097152
    assert info.numbers["kimage_voffset"] == 0xFFFFFFBF70000000      # arm64 writes hex
    assert info.kerneloffset == 0 and info.crashtime == 1733540000
    assert "X86_64" in info.configs
    assert set(info.kallsyms_tables()) == {
        "kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table",
        "kallsyms_token_index", "kallsyms_offsets", "kallsyms_relative_base"}
    assert "6.1.0-57" in repr(info)


def test_missing_values_say_so():
    info = Vmcoreinfo.parse("OSRELEASE=5.15.0\nSYMBOL(_stext)=ffffffff81000000\n")
    with pytest.raises(VmcoreinfoError, match=r"no SYMBOL\(kallsyms_names\) \(kallsyms tables "
                                              r"are listed since Linux 6.0\)"):
        info.symbol("kallsyms_names")
    with pytest.raises(VmcoreinfoError, match=r"no OFFSET\(task_struct.tasks\)"):
        info.offset("task_struct", "tasks")
    with pytest.raises(KallsymsError, match="missing: kallsyms_num_syms"):
        info.decode_kallsyms(lambda a, n: b"")


def test_bytes_with_trailing_nuls_and_blank_lines():
    info = Vmcoreinfo.parse(b"OSRELEASE=6.12.0\n\nPAGESIZE=4096\n\0\0\0garbage")
    assert (info.osrelease, info.pagesize) == ("6.12.0", 4096)


@pytest.mark.parametrize("text, message", [
    ("SYMBOL(x)=zz\n", "line 1: .*SYMBOL value is not a number"),
    ("OSRELEASE=1\nOFFSET(x)=0\n", "line 2: .*names no member"),
    ("OSRELEASE=1\nSIZE(x)=0x10\n", "SIZE value is not a number"),
    ("OSRELEASE=1\nPAGESIZE=four\n", "PAGESIZE value is not a number"),
    ("OSRELEASE=1\nSYMBOL(x)=1ffffffffffffffff\n", "out of 64-bit range"),
    ("OSRELEASE=1\nno equals sign\n", "not KEY=VALUE"),
    ("OSRELEASE=1\nlower=case\n", "not KEY=VALUE"),
    ("PAGESIZE=4096\n", "not vmcoreinfo text"),
    ("", "not vmcoreinfo text"),
    ("OSRELEASE=" + "x" * 70000, "more than vmcoreinfo's"),
])
def test_malformed_text(text, message):
    with pytest.raises(VmcoreinfoError, match=message):
        Vmcoreinfo.parse(text)
    assert issubclass(VmcoreinfoError, ParseError)


def note(text: bytes, namesz=11, ntype=0, descsz=None, name=b"VMCOREINFO\0\0"):
    return struct.pack("<III", namesz, len(text) if descsz is None else descsz, ntype) + \
        name + text + b"\0" * (-len(text) % 4) + b"\0" * 12          # + the final empty note


def test_find_note_in_noise():
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(20000))
    decoy = b"VMCOREINFO\0" + b"\xff" * 40                        # the name without a header
    bad_type = note(SAMPLE.encode(), ntype=1)
    real = note(SAMPLE.encode())
    data = noise[:5000] + decoy + noise[5000:9000] + bad_type + noise[9000:13001] + real + noise
    hit = find_note(data)
    assert hit.offset == data.index(real) and hit.text == SAMPLE
    assert Vmcoreinfo.parse(hit.text).symbol("init_top_pgt") == 0xFFFFFFFF82A10000
    assert find_note(noise) is None


@pytest.mark.parametrize("bad", [
    note(SAMPLE.encode(), namesz=10),
    note(SAMPLE.encode(), descsz=1 << 20),
    note(SAMPLE.encode())[:200],                                   # cut off by the buffer end
    note(b"OSRELEASE=1\n\x01\x02binary"),
    note(b"no key value pairs at all"),
    note(b""),
])
def test_find_note_refuses_malformed(bad):
    assert find_note(b"\0" * 64 + bad) is None


def test_find_several_notes():
    data = note(b"OSRELEASE=a\n") + b"\0" * 100 + note(b"OSRELEASE=b\n")
    assert [n.text for n in find_notes(data)] == ["OSRELEASE=a\n", "OSRELEASE=b\n"]
    assert len(find_notes(data, limit=1)) == 1


# ---- the whole guest path, offline on the bundled kernel ---------------------------------
def build_id(img):
    """The GNU build-id note of the image's .notes section (name "GNU", type 3)."""
    notes, i = img.section(".notes"), 0
    while i + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, i)
        name = notes[i + 12:i + 12 + namesz]
        desc_at = i + 12 + (namesz + 3) // 4 * 4
        if name == b"GNU\0" and ntype == 3:
            return notes[desc_at:desc_at + descsz].hex()
        i = desc_at + (descsz + 3) // 4 * 4
    return None


@pytest.fixture(scope="module")
def img():
    image = kernel_image.vmlinux()
    if image is None:
        pytest.skip(f"no guest kernel in {kernel_image.cache_dir()} (run scripts/setup)")
    return image


def test_guest_path_from_a_note_to_btf(img):
    btf_sec = Btf.parse(img.section(".BTF"))
    tables = kernel_image.find_kallsyms_tables(img)
    exported = kernel_image.ksymtab(img)
    lines = [f"OSRELEASE={kernel_image.release() or 'unknown'}", f"BUILD-ID={build_id(img)}",
             "PAGESIZE=4096",
             f"SYMBOL(init_uts_ns)={exported['init_uts_ns']:x}",
             f"OFFSET(uts_namespace.name)={btf_sec.offsetof('uts_namespace', 'name')}",
             f"SYMBOL(_stext)={img.by_name['.text'].addr:x}",
             f"SIZE(list_head)={btf_sec.sizeof('list_head')}",
             f"OFFSET(list_head.next)={btf_sec.offsetof('list_head', 'next')}",
             f"OFFSET(list_head.prev)={btf_sec.offsetof('list_head', 'prev')}"]
    lines += [f"SYMBOL({k})={v:x}" for k, v in sorted(tables.items())]
    lines += ["NUMBER(pgtable_l5_enabled)=0", "KERNELOFFSET=0"]
    ram = bytearray(1 << 16)
    ram[0x2345:0x2345 + 1] = b"\x07"
    blob = note(("\n".join(lines) + "\n").encode())
    ram[0x8000:0x8000 + len(blob)] = blob

    hit = find_note(bytes(ram))
    assert hit is not None and hit.offset == 0x8000
    info = Vmcoreinfo.parse(hit.text)
    assert len(info.build_id) == 40 and info.pagesize == 4096
    ks = info.decode_kallsyms(img.read)            # _stext and init_uts_ns check it
    assert ks.mode == "absolute_percpu"
    assert ks.address("init_uts_ns") == info.symbol("init_uts_ns")
    start, stop = ks.address("__start_BTF"), ks.address("__stop_BTF")
    btf = Btf.parse(img.read(start, stop - start))
    assert btf.offsetof("uts_namespace", "name") == info.offset("uts_namespace", "name")
    assert btf.offsetof("list_head", "prev") == info.offsets["list_head.prev"]

    # a note that lies about one symbol makes the decode refuse itself
    lying = Vmcoreinfo.parse(hit.text.replace(f"SYMBOL(_stext)={img.by_name['.text'].addr:x}",
                                              "SYMBOL(_stext)=ffffffff81200000"))
    with pytest.raises(KallsymsError, match="_stext decodes to"):
        lying.decode_kallsyms(img.read)
