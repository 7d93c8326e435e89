"""The handful of RV64I + Zicsr + privileged instructions the RISC-V oracle guest uses, as 32-bit
encodings (no toolchain).

Every encoder returns an `Insn`: the word and the assembly text it stands for, in the syntax
`llvm-mc -triple=riscv64` accepts (PC-relative operands as byte offsets, ABI register names), so
the whole program can be checked against llvm-mc on a machine that has it
(tests/unit/test_oracle_riscv_image.py: a fixed table of words recorded from llvm-mc 14, and,
when llvm-mc is installed, every word of every scenario's program). No compressed (C)
instructions: the text assembles to the same 4-byte words only without `+c`.

Formats: RISC-V Unprivileged ISA 20191213, 2.2/2.3 "Base Instruction Formats" / "Immediate
Encoding Variants"; CSR numbers and mret/wfi/sfence.vma: Privileged ISA 20211203 (v1.12), 2.2 and
3.3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, Union

ABI = ("zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1", "a0", "a1", "a2", "a3",
       "a4", "a5", "a6", "a7", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
       "t3", "t4", "t5", "t6")
REG: Dict[str, int] = {name: n for n, name in enumerate(ABI)}
ZERO = 0

#: CSR name -> number (Privileged ISA v1.12, tables 2.2-2.5)
CSR: Dict[str, int] = {
    "satp": 0x180,
    "mstatus": 0x300, "misa": 0x301, "medeleg": 0x302, "mideleg": 0x303, "mie": 0x304,
    "mtvec": 0x305, "menvcfg": 0x30A,
    "mscratch": 0x340, "mepc": 0x341, "mcause": 0x342, "mtval": 0x343, "mip": 0x344,
    "pmpcfg0": 0x3A0, "pmpaddr0": 0x3B0,
    "mvendorid": 0xF11, "marchid": 0xF12, "mimpid": 0xF13, "mhartid": 0xF14,
}


@dataclass(frozen=True)
class Insn:
    word: int
    text: str

    def __post_init__(self):
        assert 0 <= self.word < 1 << 32, self


def _r(reg: Union[int, str]) -> int:
    n = REG[reg] if isinstance(reg, str) else reg
    assert 0 <= n < 32, reg
    return n


def _signed(value: int, bits: int) -> bool:
    return -(1 << (bits - 1)) <= value < 1 << (bits - 1)


# ---------------------------------------------------------------------------------------------
# The six formats

def _rtype(f7: int, rs2, rs1, f3: int, rd, op: int) -> int:
    return f7 << 25 | _r(rs2) << 20 | _r(rs1) << 15 | f3 << 12 | _r(rd) << 7 | op


def _itype(imm: int, rs1, f3: int, rd, op: int) -> int:
    assert _signed(imm, 12), imm
    return (imm & 0xFFF) << 20 | _r(rs1) << 15 | f3 << 12 | _r(rd) << 7 | op


def _stype(imm: int, rs2, rs1, f3: int, op: int) -> int:
    assert _signed(imm, 12), imm
    return ((imm >> 5) & 0x7F) << 25 | _r(rs2) << 20 | _r(rs1) << 15 | f3 << 12 | \
        (imm & 0x1F) << 7 | op


def _btype(off: int, rs2, rs1, f3: int) -> int:
    assert off % 2 == 0 and _signed(off, 13), off
    return ((off >> 12) & 1) << 31 | ((off >> 5) & 0x3F) << 25 | _r(rs2) << 20 | \
        _r(rs1) << 15 | f3 << 12 | ((off >> 1) & 0xF) << 8 | ((off >> 11) & 1) << 7 | 0b1100011


def _utype(imm20: int, rd, op: int) -> int:
    assert 0 <= imm20 < 1 << 20, imm20
    return imm20 << 12 | _r(rd) << 7 | op


def _jtype(off: int, rd) -> int:
    assert off % 2 == 0 and _signed(off, 21), off
    return ((off >> 20) & 1) << 31 | ((off >> 1) & 0x3FF) << 21 | ((off >> 11) & 1) << 20 | \
        ((off >> 12) & 0xFF) << 12 | _r(rd) << 7 | 0b1101111


def _n(reg) -> str:
    return ABI[_r(reg)]


# ---------------------------------------------------------------------------------------------
# Integer instructions

def lui(rd, imm20: int) -> Insn:
    """lui rd, imm20   (U: imm[31:12] rd 0110111); RV64 sign-extends bit 31"""
    return Insn(_utype(imm20, rd, 0b0110111), f"lui {_n(rd)}, {imm20:#x}")


def auipc(rd, imm20: int) -> Insn:
    """auipc rd, imm20   (U: imm[31:12] rd 0010111): rd = pc + sext(imm20 << 12)"""
    return Insn(_utype(imm20, rd, 0b0010111), f"auipc {_n(rd)}, {imm20:#x}")


def addi(rd, rs1, imm: int) -> Insn:
    """addi rd, rs1, imm   (I: imm[11:0] rs1 000 rd 0010011)"""
    return Insn(_itype(imm, rs1, 0b000, rd, 0b0010011), f"addi {_n(rd)}, {_n(rs1)}, {imm}")


def addiw(rd, rs1, imm: int) -> Insn:
    """addiw rd, rs1, imm   (I: imm[11:0] rs1 000 rd 0011011): 32-bit sum, sign-extended"""
    return Insn(_itype(imm, rs1, 0b000, rd, 0b0011011), f"addiw {_n(rd)}, {_n(rs1)}, {imm}")


def andi(rd, rs1, imm: int) -> Insn:
    """andi rd, rs1, imm   (I: imm[11:0] rs1 111 rd 0010011)"""
    return Insn(_itype(imm, rs1, 0b111, rd, 0b0010011), f"andi {_n(rd)}, {_n(rs1)}, {imm}")


def slli(rd, rs1, shamt: int) -> Insn:
    """slli rd, rs1, shamt   (I: 000000 shamt[5:0] rs1 001 rd 0010011)"""
    assert 0 <= shamt < 64
    return Insn(_itype(shamt, rs1, 0b001, rd, 0b0010011), f"slli {_n(rd)}, {_n(rs1)}, {shamt}")


def srli(rd, rs1, shamt: int) -> Insn:
    """srli rd, rs1, shamt   (I: 000000 shamt[5:0] rs1 101 rd 0010011)"""
    assert 0 <= shamt < 64
    return Insn(_itype(shamt, rs1, 0b101, rd, 0b0010011), f"srli {_n(rd)}, {_n(rs1)}, {shamt}")


def add(rd, rs1, rs2) -> Insn:
    """add rd, rs1, rs2   (R: 0000000 rs2 rs1 000 rd 0110011)"""
    return Insn(_rtype(0, rs2, rs1, 0b000, rd, 0b0110011), f"add {_n(rd)}, {_n(rs1)}, {_n(rs2)}")


def or_(rd, rs1, rs2) -> Insn:
    """or rd, rs1, rs2   (R: 0000000 rs2 rs1 110 rd 0110011)"""
    return Insn(_rtype(0, rs2, rs1, 0b110, rd, 0b0110011), f"or {_n(rd)}, {_n(rs1)}, {_n(rs2)}")


def mv(rd, rs1) -> Insn:
    """mv rd, rs1   (= addi rd, rs1, 0)"""
    return Insn(addi(rd, rs1, 0).word, f"mv {_n(rd)}, {_n(rs1)}")


def ld(rd, rs1, off: int = 0) -> Insn:
    """ld rd, off(rs1)   (I: imm[11:0] rs1 011 rd 0000011)"""
    return Insn(_itype(off, rs1, 0b011, rd, 0b0000011), f"ld {_n(rd)}, {off}({_n(rs1)})")


def sd(rs2, rs1, off: int = 0) -> Insn:
    """sd rs2, off(rs1)   (S: imm[11:5] rs2 rs1 011 imm[4:0] 0100011)"""
    return Insn(_stype(off, rs2, rs1, 0b011, 0b0100011), f"sd {_n(rs2)}, {off}({_n(rs1)})")


# ---------------------------------------------------------------------------------------------
# Control transfer (offsets in bytes, relative to the instruction itself)

def beq(rs1, rs2, off: int) -> Insn:
    """beq rs1, rs2, off   (B: imm[12|10:5] rs2 rs1 000 imm[4:1|11] 1100011)"""
    return Insn(_btype(off, rs2, rs1, 0b000), f"beq {_n(rs1)}, {_n(rs2)}, {off}")


def bne(rs1, rs2, off: int) -> Insn:
    """bne rs1, rs2, off   (B: imm[12|10:5] rs2 rs1 001 imm[4:1|11] 1100011)"""
    return Insn(_btype(off, rs2, rs1, 0b001), f"bne {_n(rs1)}, {_n(rs2)}, {off}")


def beqz(rs1, off: int) -> Insn:
    """beqz rs1, off   (= beq rs1, zero, off)"""
    return Insn(_btype(off, ZERO, rs1, 0b000), f"beqz {_n(rs1)}, {off}")


def bnez(rs1, off: int) -> Insn:
    """bnez rs1, off   (= bne rs1, zero, off)"""
    return Insn(_btype(off, ZERO, rs1, 0b001), f"bnez {_n(rs1)}, {off}")


def j(off: int) -> Insn:
    """j off   (= jal zero, off; J: imm[20|10:1|11|19:12] rd 1101111)"""
    return Insn(_jtype(off, ZERO), f"j {off}")


def jr(rs1) -> Insn:
    """jr rs1   (= jalr zero, 0(rs1); I: imm rs1 000 rd 1100111)"""
    return Insn(_itype(0, rs1, 0b000, ZERO, 0b1100111), f"jr {_n(rs1)}")


# ---------------------------------------------------------------------------------------------
# CSRs (Zicsr: csr[11:0] rs1 funct3 rd 1110011) and privileged instructions

def csrr(rd, csr: str) -> Insn:
    """csrr rd, csr   (= csrrs rd, csr, zero: funct3 010)"""
    return Insn(CSR[csr] << 20 | 0b010 << 12 | _r(rd) << 7 | 0b1110011, f"csrr {_n(rd)}, {csr}")


def csrw(csr: str, rs1) -> Insn:
    """csrw csr, rs1   (= csrrw zero, csr, rs1: funct3 001)"""
    return Insn(CSR[csr] << 20 | _r(rs1) << 15 | 0b001 << 12 | 0b1110011, f"csrw {csr}, {_n(rs1)}")


ECALL = Insn(0x00000073, "ecall")              # SYSTEM, funct12 = 0
MRET = Insn(0x30200073, "mret")                # funct7 0011000 rs2 00010
WFI = Insn(0x10500073, "wfi")                  # funct7 0001000 rs2 00101
SFENCE_VMA = Insn(0x12000073, "sfence.vma")    # funct7 0001001, rs1 = rs2 = zero: everything
FENCE_I = Insn(0x0000100F, "fence.i")          # MISC-MEM funct3 001
NOP = Insn(0x00000013, "nop")                  # addi zero, zero, 0


def li(rd, value: int) -> List[Insn]:
    """rd = value (any 64-bit value): addi; lui + addiw; or the upper part (recursively), slli
    and addi, as llvm-mc's `li` does it (not necessarily the same sequence)."""
    v = value - (1 << 64) if value >= 1 << 63 else value
    assert _signed(v, 64), value
    if _signed(v, 12):
        return [addi(rd, ZERO, v)]
    if _signed(v, 32):
        hi, lo = (v + 0x800) >> 12, v - (((v + 0x800) >> 12) << 12)
        out = [lui(rd, hi & 0xFFFFF)]
        return out + ([addiw(rd, rd, lo)] if lo else [])
    lo = ((v & 0xFFF) ^ 0x800) - 0x800          # sign-extended low 12 bits
    rest, shift = (v - lo) >> 12, 12
    while rest & 1 == 0:
        rest, shift = rest >> 1, shift + 1
    return li(rd, rest) + [slli(rd, rd, shift)] + ([addi(rd, rd, lo)] if lo else [])


# ---------------------------------------------------------------------------------------------
# A tiny assembler: a list of instructions with labels and forward references

Deferred = Tuple[Callable[[int], Insn], str]      # (offset -> Insn, label)


class Asm:
    """Instructions at consecutive addresses from `origin`; branch targets by label name.

        a = Asm(0x80000000)
        a.emit(li("t0", 1)); a.label("loop"); a.branch(bnez, "t0", "loop"); a.la("t1", "loop")
        insns = a.insns()      # [Insn], every label resolved
    """

    def __init__(self, origin: int):
        self.origin = origin
        self.items: List[Union[Insn, Deferred]] = []
        self.labels: Dict[str, int] = {}

    @property
    def here(self) -> int:
        return self.origin + 4 * len(self.items)

    def emit(self, *insns):
        for i in insns:
            if isinstance(i, (list, tuple)):
                self.emit(*i)
            else:
                assert isinstance(i, Insn), i
                self.items.append(i)

    def label(self, name: str):
        assert name not in self.labels, f"label {name} defined twice"
        self.labels[name] = self.here

    def pad_to(self, addr: int):
        assert self.here <= addr, f"code overflows {addr:#x} (at {self.here:#x})"
        while self.here < addr:
            self.emit(NOP)

    def branch(self, encoder, *args):
        """encoder(*args[:-1], offset) with args[-1] a label: beq, bne, beqz, bnez, j."""
        self.items.append((lambda off, e=encoder, a=args[:-1]: e(*a, off), args[-1]))

    def la(self, rd, label: str):
        """rd = the label's address: auipc + addi (the pair's offset is taken from the auipc)."""
        def hi(off):
            return auipc(rd, ((off + 0x800) >> 12) & 0xFFFFF)

        def lo(off):                 # off is from the addi, 4 bytes after the auipc
            off += 4
            return addi(rd, rd, off - (((off + 0x800) >> 12) << 12))
        self.items.append((hi, label))
        self.items.append((lo, label))

    def insns(self) -> List[Insn]:
        out = []
        for n, item in enumerate(self.items):
            if isinstance(item, Insn):
                out.append(item)
                continue
            make, label = item
            if label not in self.labels:
                raise KeyError(f"undefined label {label}")
            out.append(make(self.labels[label] - (self.origin + 4 * n)))
        return out

    def code(self) -> bytes:
        return b"".join(i.word.to_bytes(4, "little") for i in self.insns())
