"""The RISC-V oracle guest's image, without QEMU or a toolchain: the RV64 encodings (a table
recorded from `llvm-mc -triple=riscv64 -show-encoding`, LLVM 14.0.6), `li`, the ELF header, the
page-table builder (PTEs checked against words computed by hand) and the scenario data. Where
llvm-mc is installed, every instruction of every scenario's program is also assembled by it and
compared."""

import random
import re
import shutil
import struct
import subprocess

import pytest

from vm.oracle_arm64.elf import EM_RISCV, PT_LOAD, parse_elf
from vm.oracle_riscv import image as I
from vm.oracle_riscv import rv64 as A
from vm.oracle_riscv.boot import decode
from vm.oracle_riscv.layout import (
    ALL_KINDS, BASE, DATA, ECALL_VA, FRAMES, FRAMES_SIZE, KINDS, OUTCOMES, PTE_A, PTE_D, PTE_N,
    PTE_U, SCRATCH, SCRATCH_VALUE, STORE_LOAD, SUP, TABLES, TABLES_SIZE, USR, build_tables,
    frame_word)
from vm.oracle_riscv.scenarios import SCENARIOS

#: (encoder call, assembly, word from llvm-mc 14)
ENCODINGS = [
    (A.lui("t0", 0x80010), "lui t0, 0x80010", 0x800102b7),
    (A.lui("gp", 0xfffff), "lui gp, 0xfffff", 0xfffff1b7),
    (A.auipc("s11", 0x0), "auipc s11, 0x0", 0x00000d97),
    (A.auipc("t0", 0xfffff), "auipc t0, 0xfffff", 0xfffff297),
    (A.addi("s10", "s2", 176), "addi s10, s2, 176", 0x0b090d13),
    (A.addi("s1", "s1", -1), "addi s1, s1, -1", 0xfff48493),
    (A.addi("t0", "zero", -2048), "addi t0, zero, -2048", 0x80000293),
    (A.addiw("t0", "t0", 2047), "addiw t0, t0, 2047", 0x7ff2829b),
    (A.addiw("a0", "a0", -1), "addiw a0, a0, -1", 0xfff5051b),
    (A.andi("t0", "s4", 1), "andi t0, s4, 1", 0x001a7293),
    (A.slli("t0", "s3", 8), "slli t0, s3, 8", 0x00899293),
    (A.slli("a0", "a0", 63), "slli a0, a0, 63", 0x03f51513),
    (A.srli("t1", "t0", 12), "srli t1, t0, 12", 0x00c2d313),
    (A.add("a0", "a1", "a2"), "add a0, a1, a2", 0x00c58533),
    (A.or_("t0", "t0", "t1"), "or t0, t0, t1", 0x0062e2b3),
    (A.mv("s11", "zero"), "mv s11, zero", 0x00000d93),
    (A.mv("t6", "s11"), "mv t6, s11", 0x000d8f93),
    (A.ld("a0", "s5"), "ld a0, 0(s5)", 0x000ab503),
    (A.ld("t0", "s0", 16), "ld t0, 16(s0)", 0x01043283),
    (A.ld("s1", "gp", 152), "ld s1, 152(gp)", 0x0981b483),
    (A.ld("t1", "t0", -8), "ld t1, -8(t0)", 0xff82b303),
    (A.sd("a0", "s5"), "sd a0, 0(s5)", 0x00aab023),
    (A.sd("zero", "s10", 0), "sd zero, 0(s10)", 0x000d3023),
    (A.sd("a0", "s10", 8), "sd a0, 8(s10)", 0x00ad3423),
    (A.sd("t6", "gp", 2040), "sd t6, 2040(gp)", 0x7ff1bc23),
    (A.sd("t5", "gp", -2048), "sd t5, -2048(gp)", 0x81e1b023),
    (A.beq("a0", "a1", 16), "beq a0, a1, 16", 0x00b50863),
    (A.bne("t0", "t1", -4096), "bne t0, t1, -4096", 0x80629063),
    (A.bne("t0", "t1", 4094), "bne t0, t1, 4094", 0x7e629fe3),
    (A.beqz("s11", 120), "beqz s11, 120", 0x060d8c63),
    (A.beqz("s1", -2), "beqz s1, -2", 0xfe048fe3),
    (A.bnez("t1", -4), "bnez t1, -4", 0xfe031ee3),
    (A.j(-8), "j -8", 0xff9ff06f),
    (A.j(2048), "j 2048", 0x0010006f),
    (A.j(1048574), "j 1048574", 0x7ffff06f),
    (A.j(-1048576), "j -1048576", 0x8000006f),
    (A.jr("t6"), "jr t6", 0x000f8067),
    (A.ECALL, "ecall", 0x00000073),
    (A.MRET, "mret", 0x30200073),
    (A.WFI, "wfi", 0x10500073),
    (A.SFENCE_VMA, "sfence.vma", 0x12000073),
    (A.FENCE_I, "fence.i", 0x0000100f),
    (A.NOP, "nop", 0x00000013),
    (A.csrr("t0", "satp"), "csrr t0, satp", 0x180022f3),
    (A.csrw("satp", "a1"), "csrw satp, a1", 0x18059073),
    (A.csrr("t0", "mstatus"), "csrr t0, mstatus", 0x300022f3),
    (A.csrw("mstatus", "a1"), "csrw mstatus, a1", 0x30059073),
    (A.csrr("t0", "misa"), "csrr t0, misa", 0x301022f3),
    (A.csrr("t0", "medeleg"), "csrr t0, medeleg", 0x302022f3),
    (A.csrw("medeleg", "a1"), "csrw medeleg, a1", 0x30259073),
    (A.csrw("mideleg", "a1"), "csrw mideleg, a1", 0x30359073),
    (A.csrw("mie", "a1"), "csrw mie, a1", 0x30459073),
    (A.csrr("t0", "mtvec"), "csrr t0, mtvec", 0x305022f3),
    (A.csrw("mtvec", "a1"), "csrw mtvec, a1", 0x30559073),
    (A.csrr("t0", "menvcfg"), "csrr t0, menvcfg", 0x30a022f3),
    (A.csrw("menvcfg", "a1"), "csrw menvcfg, a1", 0x30a59073),
    (A.csrw("mscratch", "a1"), "csrw mscratch, a1", 0x34059073),
    (A.csrr("t0", "mepc"), "csrr t0, mepc", 0x341022f3),
    (A.csrw("mepc", "a1"), "csrw mepc, a1", 0x34159073),
    (A.csrr("t0", "mcause"), "csrr t0, mcause", 0x342022f3),
    (A.csrr("t0", "mtval"), "csrr t0, mtval", 0x343022f3),
    (A.csrr("t0", "mip"), "csrr t0, mip", 0x344022f3),
    (A.csrr("t0", "pmpcfg0"), "csrr t0, pmpcfg0", 0x3a0022f3),
    (A.csrw("pmpcfg0", "a1"), "csrw pmpcfg0, a1", 0x3a059073),
    (A.csrr("t0", "pmpaddr0"), "csrr t0, pmpaddr0", 0x3b0022f3),
    (A.csrw("pmpaddr0", "a1"), "csrw pmpaddr0, a1", 0x3b059073),
    (A.csrr("t0", "mvendorid"), "csrr t0, mvendorid", 0xf11022f3),
    (A.csrr("t0", "marchid"), "csrr t0, marchid", 0xf12022f3),
    (A.csrr("t0", "mimpid"), "csrr t0, mimpid", 0xf13022f3),
    (A.csrr("t0", "mhartid"), "csrr t0, mhartid", 0xf14022f3),
]


@pytest.mark.parametrize("insn,text,word", ENCODINGS, ids=[t for _, t, _ in ENCODINGS])
def test_encoding_matches_llvm_mc(insn, text, word):
    assert insn.text == text
    assert insn.word == word, f"{text}: {insn.word:#010x}, llvm-mc says {word:#010x}"


def test_every_csr_is_in_the_table():
    texts = " ".join(t for _, t, _ in ENCODINGS)
    for name in A.CSR:
        assert re.search(rf"\b{name}\b", texts), name


def _run_li(insns, rd):
    """Replay lui/addi/addiw/slli (what `li` emits) on 64-bit registers."""
    regs = [0] * 32
    mask = (1 << 64) - 1

    def sext(v, bits):
        v &= (1 << bits) - 1
        return v - (1 << bits) if v >> (bits - 1) else v
    for i in insns:
        w, d, s1 = i.word, i.word >> 7 & 31, i.word >> 15 & 31
        op, f3, imm = w & 0x7F, w >> 12 & 7, sext(w >> 20, 12)
        if op == 0b0110111:
            regs[d] = sext(w & 0xFFFFF000, 32) & mask
        elif op == 0b0010011 and f3 == 0:
            regs[d] = (regs[s1] + imm) & mask
        elif op == 0b0011011 and f3 == 0:
            regs[d] = sext(regs[s1] + imm, 32) & mask
        elif op == 0b0010011 and f3 == 1:
            regs[d] = (regs[s1] << (imm & 63)) & mask
        else:
            raise AssertionError(i.text)
        regs[0] = 0
    return regs[rd]


@pytest.mark.parametrize("value", [
    0, 1, -1, 2047, -2048, 2048, 0x7FFFFFFF, 0x7FFFF800, -0x80000000, 0x80000000, 0x80010000,
    0xFFFFFFFF, 0x100000000, I.MARKER, I.MAGIC_DONE, I.MAGIC_EXCEPTION, 0x8000000000080200,
    0xA000000000080200, 1 << 62, (1 << 64) - 1, 0x123456789ABCDEF0, 0x800000000000FFFF,
])
def test_li_builds_the_value(value):
    assert _run_li(A.li("t0", value), A.REG["t0"]) == value & ((1 << 64) - 1)


def test_li_random_values():
    rng = random.Random(5)
    for _ in range(2000):
        v = rng.getrandbits(rng.choice((12, 20, 32, 33, 48, 64)))
        seq = A.li("a0", v)
        assert _run_li(seq, A.REG["a0"]) == v, (hex(v), [i.text for i in seq])
        assert len(seq) <= 8


def test_assembler_resolves_labels_both_ways():
    a = A.Asm(0x80000000)
    a.branch(A.j, "end")           # forward
    a.label("top")
    a.emit(A.NOP)
    a.branch(A.bnez, "t1", "top")  # backward
    a.label("end")
    a.la("s11", "top")
    assert [i.text for i in a.insns()] == ["j 12", "nop", "bnez t1, -4", "auipc s11, 0x0",
                                           "addi s11, s11, -8"]
    b = A.Asm(0x80000000)
    b.la("t0", "far")
    b.pad_to(0x80001800)
    b.label("far")                 # 0x1800 away: 0x2000 - 0x800
    assert [i.text for i in b.insns()[:2]] == ["auipc t0, 0x2", "addi t0, t0, -2048"]
    with pytest.raises(KeyError):
        c = A.Asm(0)
        c.branch(A.j, "nowhere")
        c.insns()


@pytest.mark.skipif(shutil.which("llvm-mc") is None, reason="llvm-mc not installed (dev-only)")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_whole_program_matches_llvm_mc(name):
    insns = I.build(SCENARIOS[name]).program
    src = "".join(i.text + "\n" for i in insns)
    out = subprocess.run(["llvm-mc", "-triple=riscv64", "-show-encoding"],
                         input=src, capture_output=True, text=True, check=True)
    assert not out.stderr, out.stderr
    words = [int.from_bytes(bytes(int(b, 16) for b in m.split(",")), "little")
             for m in re.findall(r"encoding: \[([^\]]*)\]", out.stdout)]
    assert len(words) == len(insns)
    bad = [f"{i.text}: {i.word:#010x} != {w:#010x}" for i, w in zip(insns, words) if i.word != w]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# ELF and image

def test_elf_header_and_segment():
    img = I.build(SCENARIOS["sv39"])
    data = img.elf()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1      # ELF64, little-endian
    assert struct.unpack_from("<HH", data, 16) == (2, EM_RISCV) == (2, 243)   # ET_EXEC
    seg = parse_elf(data, EM_RISCV)
    assert (seg.entry, seg.paddr, seg.vaddr) == (BASE, BASE, BASE) == (0x80000000,) * 3
    assert seg.flags == 7 and seg.data == img.data and seg.memsz == len(img.data)
    assert struct.unpack_from("<I", data, 64) == (PT_LOAD,)
    with pytest.raises(ValueError):
        parse_elf(data)                                   # not an AArch64 ELF


def test_image_layout():
    s = SCENARIOS["sv39"]
    img = I.build(s)
    code = img.data
    first = int.from_bytes(code[:4], "little")
    assert first & 0x7F == 0b1101111 and first >> 7 & 31 == 0      # j start
    assert img.word(ECALL_VA) == A.NOP.word << 32 | A.ECALL.word
    # the probe loop runs from the first page: the identity-code finding (layout.py) needs it
    assert 4 * len(img.program) <= 0x1000
    assert img.word(FRAMES) == FRAMES << 32 | 0x73 == frame_word(FRAMES)
    assert img.word(FRAMES + FRAMES_SIZE - 8) == frame_word(FRAMES + FRAMES_SIZE - 8)
    assert img.word(DATA + SCRATCH) == SCRATCH_VALUE
    probes = s.all_probes()
    assert img.word(DATA + I.NPROBES) == len(probes)
    for n, p in enumerate(probes):
        entry = DATA + I.PROBES + I.PROBE_SIZE * n
        assert img.word(entry) == p.va and img.word(entry + 8) == int(p.exec)
        assert img.word(entry + 16) == img.built.pte_address(p.va)
        for slot in range(len(KINDS)):
            assert img.word(DATA + I.RESULTS + I.RESULT_SIZE * n + 16 * slot) == I.NOT_RUN
    assert img.word(DATA + I.MAGIC) == 0                 # the guest writes it


# ---------------------------------------------------------------------------------------------
# The table builder: PTEs against words computed by hand

def test_sv39_ptes():
    b = build_tables(SCENARIOS["sv39"])
    assert b.satp == 0x8000000000080200 and b.root.pa == TABLES
    walk = b.walk(0x40001000)                        # s-rw: root[1] L1[0] L0[1]
    assert [(lvl, addr) for lvl, addr, _ in walk] == [(2, 0x80200008), (1, 0x80203000),
                                                      (0, 0x80204008)]
    assert walk[0][2] == 0x20080C01                  # pointer to 0x80203000: V only
    assert walk[-1][2] == 0x200404C7                 # ppn 0x80101, D A W R V
    assert b.walk(0x140000000) == [(2, 0x80200028, 0x200000CF)]    # 1 GiB: D A X W R V
    assert b.walk(0x40800000)[1][2] & 0x3FF == 0x11  # pointer with U
    assert b.walk(0x40018000)[-1][2] == 0x20046001   # a pointer at level 0
    assert b.walk(0xC0000000)[-1][2] == 0x20000006   # V=0 with R W
    assert b.walk(0x0000004000105000) == [] and b.pte_address(0x0000004000105000) == 0
    leaf = b.walk(0x40010000)[-1][2]                 # A=0 D=0
    assert leaf & (PTE_A | PTE_D) == 0 and leaf & PTE_U == 0


def test_napot_ptes_are_16_identical_entries():
    b = build_tables(SCENARIOS["napot"])
    ptes = {b.walk(0x40010000 + n * 0x1000)[-1][2] for n in range(16)}
    assert ptes == {PTE_N | 0x80118 << 10 | 0xC7}    # ppn = 0x80110 | 0b1000
    assert b.walk(0x40020000)[-1][2] & 0xFF == 0xDB  # D A U X R V


def test_sv48_and_sv57_roots():
    b48, b57 = build_tables(SCENARIOS["sv48"]), build_tables(SCENARIOS["sv57"])
    assert (b48.satp, b57.satp) == (0x9000000000080200, 0xA000000000080200)
    assert b48.walk(0x8080106000) == [(3, 0x80200008, 0xCF)]       # 512 GiB at PA 0
    assert b57.walk(0x100008010A000) == [(4, 0x80200008, 0xCF)]    # 256 TiB at PA 0
    assert [lvl for lvl, _, _ in b57.walk(0xFFFFFFFFFFFFFFF8)] == [4, 3, 2, 1, 0]
    assert [lvl for lvl, _, _ in b57.walk(0xFFFF800000000000)] == [4, 3]   # root[511] L3[256]
    assert b57.walk(0x0100000000000000) == []                      # bit 56 without 63:57


def test_pbmt_pointer_bits():
    b = build_tables(SCENARIOS["pbmt"])
    assert b.walk(0x40200000)[1][2] == 1 << 61 | 0x20081401
    assert b.walk(0x40003000)[-1][2] >> 61 == 3


def test_tables_fit():
    for s in SCENARIOS.values():
        b = build_tables(s)
        assert TABLES < b.tables_end <= TABLES + TABLES_SIZE
        assert all(pa % 4096 == 0 for pa in b.tables)


# ---------------------------------------------------------------------------------------------
# Scenario data

def test_the_permission_tables_follow_the_spec():
    """Spot checks of layout.SUP / USR against v1.12 3.1.6.3 and 4.3.1."""
    for perms, ok in SUP.items():
        assert not any(k[0].islower() for k in ok.split()), perms      # U never on U=0
    for perms, ok in USR.items():
        kinds = ok.split()
        assert not {"R", "W", "X", "X+sum", "R+mxr"} & set(kinds), perms   # S: SUM, no X
        assert ("R+sum" in kinds) == ("R" in perms), perms
    assert SUP["W"] == SUP["WX"] == USR["W"] == USR["WX"] == ""        # reserved
    assert "R+mxr" in SUP["X"].split() and "r+mxr" in USR["X"].split()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_expectations_are_well_formed(name):
    s = SCENARIOS[name]
    probes = s.all_probes()
    assert len({p.name for p in probes}) == len(probes)
    assert len(probes) <= I.MAX_PROBES
    for k in s.kinds:
        assert k in KINDS and (k not in STORE_LOAD or STORE_LOAD[k] in s.kinds)
    for p in probes:
        assert p.va % 8 == 0, p.name
        for k in p.ok.split() + list(p.faults):
            assert k in KINDS, (p.name, k)
        for k in ALL_KINDS:
            assert p.expected(k) in OUTCOMES and p.qemu_expected(k) in OUTCOMES, (p.name, k)
        if p.ok:
            assert p.pa is not None, p.name
        for key in p.qemu:
            assert key in KINDS or key == "pa", (p.name, key)
        fetches = [k for k in ALL_KINDS if KINDS[k].access == "fetch"
                   and "ok" in (p.expected(k), p.qemu_expected(k))]
        if p.exec and fetches:                # a fetch that works must meet an ecall
            for pa in (p.pa, p.qemu_pa()):
                assert FRAMES <= pa < FRAMES + FRAMES_SIZE or pa == ECALL_VA, p.name


def test_every_scenario_named_in_the_brief_exists():
    assert set(SCENARIOS) == {"sv39", "sv48", "sv57", "sum-mxr", "napot", "napot-off", "pbmt",
                              "pbmt-off"}
    assert SCENARIOS["sum-mxr"].kinds == ALL_KINDS


# ---------------------------------------------------------------------------------------------
# Decoding a slot

def test_decode():
    r = decode("p", 0x40000000, "R", 0, 0x8010000000000073)
    assert (r.ok, r.outcome, r.pa, r.cause) == (True, "ok", 0x80100000, None)
    assert decode("p", 0x40000000, "R", 0, 0x1300000073).pa is None     # not a FRAMES word
    assert decode("p", 0x40000000, "R", 13, 0x40000000).outcome == "page-fault"
    assert decode("p", 0x40000000, "W", 15, 0x40000000).outcome == "page-fault"
    assert decode("p", 0x40000000, "W", 13, 0x40000000).outcome == "cause-13"
    assert decode("p", 0x40000000, "r", 5, 0x40000000).outcome == "access-fault"
    assert decode("p", 0x40000000, "X", 9, 0).outcome == "ok"            # ecall from S
    assert decode("p", 0x40000000, "x", 8, 0).outcome == "ok"            # ecall from U
    assert decode("p", 0x40000000, "X", 8, 0).outcome == "cause-8"
    r = decode("p", 0x40000000, "X+sum", 12, 0x40000000)
    assert (r.outcome, r.tval, r.mode, r.access) == ("page-fault", 0x40000000, "S", "fetch")
    assert decode("p", 0, "R", I.NOT_RUN, I.NOT_RUN).outcome == "not-run"
