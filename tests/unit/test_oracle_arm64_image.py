"""The AArch64 oracle guest's image, without QEMU or a toolchain: the A64 encodings (a table
recorded from `llvm-mc -triple=aarch64 -mattr=+v8.5a -show-encoding`, LLVM 14), the ELF writer,
the page-table builder (descriptors checked against words computed by hand) and the scenario
data. Where llvm-mc is installed, every instruction of every scenario's program is also
assembled by it and compared."""

import re
import shutil
import struct
import subprocess

import pytest

from vm.oracle_arm64 import a64 as A
from vm.oracle_arm64 import image as I
from vm.oracle_arm64.boot import decode_exec, decode_par
from vm.oracle_arm64.elf import EM_AARCH64, PT_LOAD, elf_bytes, parse_elf
from vm.oracle_arm64.layout import (
    AT_KINDS, BASE, DATA, EXEC_KINDS, FAULT_KINDS, FRAMES, FRAMES_SIZE, KINDS, SCENARIOS, TABLES,
    TABLES_SIZE, VECTORS, build_tables,
)

#: (encoder call, assembly, word from llvm-mc 14)
ENCODINGS = [
    (A.movz(0, 0x1234, 16), "movz x0, #0x1234, lsl #16", 0xd2a24680),
    (A.movz(28, 0x0, 0), "movz x28, #0x0, lsl #0", 0xd280001c),
    (A.movk(28, 0xffff, 48), "movk x28, #0xffff, lsl #48", 0xf2fffffc),
    (A.movk(1, 0x21, 32), "movk x1, #0x21, lsl #32", 0xf2c00421),
    (A.mov_reg(11, 27), "mov x11, x27", 0xaa1b03eb),
    (A.mov_reg(27, 31), "mov x27, xzr", 0xaa1f03fb),
    (A.add_imm(21, 28, 0x100), "add x21, x28, #0x100", 0x91040395),
    (A.add_imm(26, 21, 0x38), "add x26, x21, #0x38", 0x9100e2ba),
    (A.sub_imm(20, 20, 1), "sub x20, x20, #0x1", 0xd1000694),
    (A.cmp_imm(1, 15), "cmp x1, #0xf", 0xf1003c3f),
    (A.ubfx(1, 0, 28, 4), "ubfx x1, x0, #28, #4", 0xd35c7c01),
    (A.ubfx(1, 0, 0, 4), "ubfx x1, x0, #0, #4", 0xd3400c01),
    (A.str_imm(31, 21, 0x30), "str xzr, [x21, #0x30]", 0xf9001abf),
    (A.str_imm(1, 21, 56), "str x1, [x21, #0x38]", 0xf9001ea1),
    (A.str_imm(10, 28, 0x90), "str x10, [x28, #0x90]", 0xf9004b8a),
    (A.ldr_imm(20, 28, 0xa0), "ldr x20, [x28, #0xa0]", 0xf9405394),
    (A.ldr_post(0, 19, 8), "ldr x0, [x19], #8", 0xf8408660),
    (A.ldr_post(24, 19, -16), "ldr x24, [x19], #-16", 0xf85f0678),
    (A.b(-8), "b #-8", 0x17fffffe),
    (A.b(0x7fc), "b #2044", 0x140001ff),
    (A.b_cond('lo', 64), "b.lo #64", 0x54000203),
    (A.b_cond('hi', -4), "b.hi #-4", 0x54ffffe8),
    (A.b_cond('ne', 0x100), "b.ne #256", 0x54000801),
    (A.cbz(20, 0x100), "cbz x20, #256", 0xb4000814),
    (A.cbz(27, -0x800), "cbz x27, #-2048", 0xb4ffc01b),
    (A.adr(27, 12), "adr x27, #12", 0x1000007b),
    (A.adr(27, -8), "adr x27, #-8", 0x10ffffdb),
    (A.br(0), "br x0", 0xd61f0000),
    (A.ERET, "eret", 0xd69f03e0),
    (A.WFI, "wfi", 0xd503207f),
    (A.NOP, "nop", 0xd503201f),
    (A.SVC0, "svc #0", 0xd4000001),
    (A.ISB, "isb", 0xd5033fdf),
    (A.DSB_SY, "dsb sy", 0xd5033f9f),
    (A.DSB_ISH, "dsb ish", 0xd5033b9f),
    (A.TLBI_VMALLE1, "tlbi vmalle1", 0xd508871f),
    (A.IC_IALLU, "ic iallu", 0xd508751f),
    (A.MSR_PAN_1, "msr pan, #1", 0xd500419f),
    (A.msr('sctlr_el1', 3), "msr sctlr_el1, x3", 0xd5181003),
    (A.msr('ttbr0_el1', 3), "msr ttbr0_el1, x3", 0xd5182003),
    (A.msr('ttbr1_el1', 3), "msr ttbr1_el1, x3", 0xd5182023),
    (A.msr('tcr_el1', 3), "msr tcr_el1, x3", 0xd5182043),
    (A.msr('spsr_el1', 3), "msr spsr_el1, x3", 0xd5184003),
    (A.msr('elr_el1', 3), "msr elr_el1, x3", 0xd5184023),
    (A.msr('pan', 3), "msr pan, x3", 0xd5184263),
    (A.msr('esr_el1', 3), "msr esr_el1, x3", 0xd5185203),
    (A.msr('far_el1', 3), "msr far_el1, x3", 0xd5186003),
    (A.msr('par_el1', 3), "msr par_el1, x3", 0xd5187403),
    (A.msr('mair_el1', 3), "msr mair_el1, x3", 0xd518a203),
    (A.msr('vbar_el1', 3), "msr vbar_el1, x3", 0xd518c003),
    (A.mrs(4, 'midr_el1'), "mrs x4, midr_el1", 0xd5380004),
    (A.mrs(4, 'id_aa64pfr0_el1'), "mrs x4, id_aa64pfr0_el1", 0xd5380404),
    (A.mrs(4, 'id_aa64mmfr0_el1'), "mrs x4, id_aa64mmfr0_el1", 0xd5380704),
    (A.mrs(4, 'id_aa64mmfr1_el1'), "mrs x4, id_aa64mmfr1_el1", 0xd5380724),
    (A.mrs(4, 'id_aa64mmfr2_el1'), "mrs x4, id_aa64mmfr2_el1", 0xd5380744),
    (A.mrs(4, 'sctlr_el1'), "mrs x4, sctlr_el1", 0xd5381004),
    (A.mrs(4, 'ttbr0_el1'), "mrs x4, ttbr0_el1", 0xd5382004),
    (A.mrs(4, 'ttbr1_el1'), "mrs x4, ttbr1_el1", 0xd5382024),
    (A.mrs(4, 'tcr_el1'), "mrs x4, tcr_el1", 0xd5382044),
    (A.mrs(4, 'spsr_el1'), "mrs x4, spsr_el1", 0xd5384004),
    (A.mrs(4, 'elr_el1'), "mrs x4, elr_el1", 0xd5384024),
    (A.mrs(4, 'currentel'), "mrs x4, currentel", 0xd5384244),
    (A.mrs(4, 'pan'), "mrs x4, pan", 0xd5384264),
    (A.mrs(4, 'esr_el1'), "mrs x4, esr_el1", 0xd5385204),
    (A.mrs(4, 'far_el1'), "mrs x4, far_el1", 0xd5386004),
    (A.mrs(4, 'par_el1'), "mrs x4, par_el1", 0xd5387404),
    (A.mrs(4, 'mair_el1'), "mrs x4, mair_el1", 0xd538a204),
    (A.mrs(4, 'vbar_el1'), "mrs x4, vbar_el1", 0xd538c004),
    (A.at('s1e1r', 0), "at s1e1r, x0", 0xd5087800),
    (A.at('s1e1w', 0), "at s1e1w, x0", 0xd5087820),
    (A.at('s1e0r', 0), "at s1e0r, x0", 0xd5087840),
    (A.at('s1e0w', 0), "at s1e0w, x0", 0xd5087860),
    (A.at('s1e1rp', 0), "at s1e1rp, x0", 0xd5087900),
    (A.at('s1e1wp', 0), "at s1e1wp, x0", 0xd5087920),
]


@pytest.mark.parametrize("insn,text,word", ENCODINGS, ids=[t for _, t, _ in ENCODINGS])
def test_encoding_matches_llvm_mc(insn, text, word):
    assert insn.text == text
    assert insn.word == word, f"{text}: {insn.word:#010x}, llvm-mc says {word:#010x}"


def test_every_sysreg_and_at_op_is_in_the_table():
    texts = {t for _, t, _ in ENCODINGS}
    for name in A.SYSREG:
        assert f"mrs x4, {name}" in texts
    for op in A.AT_OPS:
        assert f"at {op}, x0" in texts


def test_mov64_uses_only_the_half_words_it_needs():
    assert [i.text for i in A.mov64(0, 0x40210000)] == ["movz x0, #0x0, lsl #0",
                                                         "movk x0, #0x4021, lsl #16"]
    words = A.mov64(2, 0x0800_0000_0000_0000 | 0x6B5_8C35_0C)
    value = 0
    for i in words:                     # replay movz/movk
        hw, imm = i.word >> 21 & 3, i.word >> 5 & 0xFFFF
        value = (value & ~(0xFFFF << 16 * hw)) | imm << 16 * hw
    assert value == 0x0800_0000_0000_0000 | 0x6B5_8C35_0C


def test_assembler_resolves_labels_both_ways():
    a = A.Asm(0x1000)
    a.branch(A.b, "end")           # forward
    a.label("top")
    a.emit(A.NOP)
    a.branch(A.cbz, 3, "top")      # backward
    a.label("end")
    a.branch(A.adr, 27, "top")
    words = a.insns()
    assert [w.text for w in words] == ["b #12", "nop", "cbz x3, #-4", "adr x27, #-8"]
    with pytest.raises(KeyError):
        b = A.Asm(0)
        b.branch(A.b, "nowhere")
        b.insns()


@pytest.mark.skipif(shutil.which("llvm-mc") is None, reason="llvm-mc not installed (dev-only)")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_whole_program_matches_llvm_mc(name):
    insns = I.build(SCENARIOS[name]).program
    src = "".join(i.text + "\n" for i in insns)
    out = subprocess.run(["llvm-mc", "-triple=aarch64", "-mattr=+v8.5a", "-show-encoding"],
                         input=src, capture_output=True, text=True, check=True)
    assert not out.stderr, out.stderr
    words = [int.from_bytes(bytes(int(b, 16) for b in m.split(",")), "little")
             for m in re.findall(r"encoding: \[([^\]]*)\]", out.stdout)]
    assert len(words) == len(insns)
    bad = [f"{i.text}: {i.word:#010x} != {w:#010x}" for i, w in zip(insns, words) if i.word != w]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# ELF

def test_elf_header_and_segment():
    data = elf_bytes(0x40200000, 0x40200000, b"\x01\x02\x03\x04" * 8)
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1      # ELF64, little-endian
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (2, EM_AARCH64)
    seg = parse_elf(data)
    assert (seg.entry, seg.paddr, seg.vaddr, seg.memsz) == (0x40200000, 0x40200000, 0x40200000, 32)
    assert seg.data == b"\x01\x02\x03\x04" * 8
    assert seg.flags == 7
    p_type, = struct.unpack_from("<I", data, 64)
    assert p_type == PT_LOAD
    off, = struct.unpack_from("<Q", data, 64 + 8)
    assert off % 0x10000 == 0x40200000 % 0x10000      # congruent mod p_align


def test_image_layout():
    img = I.build(SCENARIOS["4k-48"])
    seg = parse_elf(img.elf())
    assert seg.paddr == BASE and seg.entry == BASE and seg.data == img.data
    code = img.data
    first = int.from_bytes(code[:4], "little")
    assert first >> 26 == 0b000101                      # b start
    assert (first & 0x3FFFFFF) * 4 == 0x1000
    assert VECTORS % 0x800 == 0
    for i in range(16):                                 # movz x9, #i at each vector
        w = int.from_bytes(code[VECTORS - BASE + 0x80 * i:][:4], "little")
        assert w == A.movz(9, i).word
    frames = code[FRAMES - BASE:FRAMES - BASE + FRAMES_SIZE]
    assert frames == A.SVC0.word.to_bytes(4, "little") * (FRAMES_SIZE // 4)
    d = DATA - BASE
    probes = SCENARIOS["4k-48"].all_probes()
    assert int.from_bytes(code[d + I.NPROBES:][:8], "little") == len(probes)
    for n, p in enumerate(probes):
        off = d + I.PROBES + 16 * n
        assert int.from_bytes(code[off:off + 8], "little") == p.va
        assert int.from_bytes(code[off + 8:off + 16], "little") == int(p.exec)
    assert int.from_bytes(code[d:d + 8], "little") == 0          # MAGIC: the guest writes it


# ---------------------------------------------------------------------------------------------
# The table builder: descriptors against words computed by hand

def entry(built, table, index):
    return int.from_bytes(built.tables[table][8 * index:8 * index + 8], "little")


def follow(built, root, indices, addr):
    """The entry at the end of `indices` from `root`, taking each table address with `addr`."""
    t = root
    for i in indices[:-1]:
        d = entry(built, t, i)
        assert d & 3 == 3, f"not a table: {d:#x}"
        t = addr(d)
    return entry(built, t, indices[-1])


def addr48(d):
    return d & 0x0000_FFFF_FFFF_F000


def test_4k_48_descriptors():
    b = build_tables(SCENARIOS["4k-48"])
    assert b.ttbr0 == TABLES
    # VA 0x10001000: L0[0] L1[0] L2[128] L3[1]: page 0x40301000, AP=01, SH=11, AF, attr 0
    assert follow(b, b.ttbr0, [0, 0, 128, 1], addr48) == 0x0000_0000_4030_1743
    # the reserved 0b01 at L3[9] and the invalid L3[8]
    assert follow(b, b.ttbr0, [0, 0, 128, 9], addr48) == 0x4030_9401
    assert follow(b, b.ttbr0, [0, 0, 128, 8], addr48) == 0xFFFF_FFFF_FFFF_FFFE
    # contiguous run: bit 52, PXN, UXN, AP=00
    assert follow(b, b.ttbr0, [0, 0, 128, 0x10], addr48) == 0x0070_0000_4031_0703
    # 1 GiB block at L1[2] (VA 0x80000000): block type 01, AP=01, PXN
    assert follow(b, b.ttbr0, [0, 2], addr48) == 0x0020_0000_4000_0741
    # APTable=01 on L1[0] under L0[1]; UXNTable on L2[0] of L1[4]
    assert follow(b, b.ttbr0, [1, 0], addr48) >> 59 == 0b00100
    assert follow(b, b.ttbr0, [1, 4, 0], addr48) >> 59 == 0b00010
    assert follow(b, b.ttbr0, [1, 3], addr48) >> 59 == 0b00001          # PXNTable
    # TTBR1: VA 0xFFFFFFFFFFFFF000: L0[511] L1[511] L2[511] L3[511], nG, UXN, AP=00
    assert follow(b, b.ttbr1, [511, 511, 511, 511], addr48) == 0x0040_0000_4033_0F03
    # identity: the code page read-only (AP=10) and UXN; the data page XN
    assert follow(b, b.ttbr0, [0, 1, 1, 0], addr48) == 0x0040_0000_4020_0783
    assert follow(b, b.ttbr0, [0, 1, 1, 0x10], addr48) == 0x0060_0000_4021_0703


def test_lpa2_descriptor_puts_oa_51_50_in_bits_9_8():
    b = build_tables(SCENARIOS["4k-52-lpa2"])
    # VA 0xF000000000000: L-1[15] L0[0] L1[0] L2[0] L3[0] -> OA 0xC000001234000 (no SH field)
    assert follow(b, b.ttbr0, [15, 0, 0, 0, 0], addr48) == 0x0060_0000_0123_4703
    # L0 block (4 KiB granule, DS=1): VA 0xE000000000000 -> OA 0x8000000000000: bits 49:48 = 0,
    # bits 51:50 = 0b10 in [9:8]
    assert follow(b, b.ttbr0, [14, 0], addr48) == 0x0060_0000_0000_0641


def test_64k_lpa_descriptor_puts_oa_51_48_in_bits_15_12():
    b = build_tables(SCENARIOS["64k-52"])

    def addr64(d):
        return (d & 0x0000_FFFF_FFFF_0000) | (d >> 12 & 0xF) << 48
    # VA 0xF000000000000: L1[0x3C0] L2[0] L3[0] -> OA 0xF000012340000
    assert follow(b, b.ttbr0, [0x3C0, 0, 0], addr64) == 0x0060_0000_1234_F703


def test_tables_fit_and_ttbrs_are_tables():
    for s in SCENARIOS.values():
        b = build_tables(s)
        assert b.tables_end <= TABLES + TABLES_SIZE
        assert all(pa % s.granule == 0 for pa in b.tables)
        assert b.ttbr0 in b.tables and (b.ttbr1 in b.tables if s.t1sz is not None else b.ttbr1 == 0)


def test_tcr_values():
    # written out by hand from the fields (T0SZ, IRGN0/ORGN0/SH0, TG0, T1SZ, EPD1, ..., IPS, DS)
    assert SCENARIOS["4k-48"].tcr == 0x2_B510_3510
    assert SCENARIOS["4k-39"].tcr == 0x1_B599_3519
    assert SCENARIOS["64k-42"].tcr == 0x2_F596_7516
    assert SCENARIOS["4k-52-lpa2"].tcr == 0x0800_0006_B58C_350C
    assert SCENARIOS["wxn"].sctlr == 0x30D8_1805


# ---------------------------------------------------------------------------------------------
# Scenario data

@pytest.mark.parametrize("name", list(SCENARIOS))
def test_expectations_are_complete_and_well_formed(name):
    s = SCENARIOS[name]
    probes = s.all_probes()
    assert len({p.name for p in probes}) == len(probes)
    assert len(probes) <= I.MAX_PROBES
    for p in probes:
        for k in p.ok.split() + list(p.faults):
            assert k in KINDS, (p.name, k)
        for kind in AT_KINDS + EXEC_KINDS:
            want = p.expected(kind, bool(s.pan))
            if want != "ok":
                fk, _, lvl = want.partition("@")
                assert fk in FAULT_KINDS and -1 <= int(lvl) <= 3, (p.name, kind, want)
        if p.exec:
            assert p.va % 4 == 0
        if p.ok:
            assert p.pa is not None, p.name
        for key in p.qemu:
            assert key in KINDS or key in ("pa", "attr", "sh"), (p.name, key)


def test_every_scenario_named_in_the_brief_exists():
    assert set(SCENARIOS) == {"4k-48", "4k-39", "16k-47", "64k-42", "64k-48", "64k-52",
                              "4k-52-lpa2", "pan", "wxn"}


# ---------------------------------------------------------------------------------------------
# PAR_EL1 / ESR_EL1 decoding

def test_decode_par_success():
    r = decode_par("p", 0x10017ABC, "s1e1r", 0xFF00_0000_4031_7B80)
    assert (r.ok, r.pa, r.attr, r.sh, r.ns, r.outcome) == (True, 0x40317ABC, 0xFF, 3, 1, "ok")
    r = decode_par("p", 0xF000000000567, "s1e1r", 0xFF0C_0000_0123_4B80)     # PA[51:48]
    assert r.pa == 0xC000001234567


@pytest.mark.parametrize("par,outcome", [
    (0x81F, "permission@3"), (0x80F, "translation@3"), (0x809, "translation@0"),
    (0x807, "address-size@3"), (0x801, "address-size@0"), (0x817, "access-flag@3"),
    (0x811, "access-flag@0"), (0x819, "permission@0"), (0x857, "translation@-1"),
    (0x853, "address-size@-1"),
])
def test_decode_par_faults(par, outcome):
    r = decode_par("p", 0x1000, "s1e0w", par)
    assert not r.ok and r.outcome == outcome and r.pa is None
    assert r.fst == par >> 1 & 0x3F


def test_decode_exec():
    assert decode_exec("p", 0x1000, "exec-el1", 0x5600_0000).ok           # SVC from AArch64
    r = decode_exec("p", 0x1000, "exec-el1", 0x8600_000F)                 # IABT, same EL
    assert r.outcome == "permission@3"
    r = decode_exec("p", 0x1000, "exec-el0", 0x8200_000B)                 # IABT, lower EL
    assert r.outcome == "access-flag@3"
