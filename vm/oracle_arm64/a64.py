"""The handful of A64 instructions the oracle guest uses, as 32-bit encodings (no toolchain).

Every encoder returns an `Insn`: the word and the assembly text it stands for, in the syntax
`llvm-mc -triple=aarch64 -mattr=+v8.5a` accepts (PC-relative operands as `#<byte offset>`), so
the whole program can be checked against llvm-mc on a machine that has it
(tests/unit/test_oracle_arm64_image.py does both: a fixed table of words recorded from llvm-mc,
and, when llvm-mc is installed, every word of every scenario's program).

Field layouts: Arm ARM (DDI 0487) C4 "A64 Instruction Set Encoding"; system registers: their
(op0, op1, CRn, CRm, op2) from the register descriptions (D19/D23 in recent issues).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

XZR = 31   # as Rt/Rd of a store, a MOV or CMP: the zero register (never SP in these encodings)


@dataclass(frozen=True)
class Insn:
    word: int
    text: str

    def __post_init__(self):
        assert 0 <= self.word < 1 << 32, self


def _x(r: int) -> str:
    assert 0 <= r <= 31
    return "xzr" if r == XZR else f"x{r}"


# ---------------------------------------------------------------------------------------------
# Moves and arithmetic

def movz(rd: int, imm16: int, shift: int = 0) -> Insn:
    """movz xD, #imm16, lsl #shift   (sf=1 opc=10 100101 hw imm16 Rd)"""
    assert 0 <= imm16 < 1 << 16 and shift in (0, 16, 32, 48)
    return Insn(0xD2800000 | (shift // 16) << 21 | imm16 << 5 | rd,
                f"movz {_x(rd)}, #{imm16:#x}, lsl #{shift}")


def movk(rd: int, imm16: int, shift: int = 0) -> Insn:
    """movk xD, #imm16, lsl #shift   (sf=1 opc=11 100101 hw imm16 Rd)"""
    assert 0 <= imm16 < 1 << 16 and shift in (0, 16, 32, 48)
    return Insn(0xF2800000 | (shift // 16) << 21 | imm16 << 5 | rd,
                f"movk {_x(rd)}, #{imm16:#x}, lsl #{shift}")


def mov64(rd: int, value: int) -> List[Insn]:
    """xD = value: movz of the low half-word, then a movk for each non-zero higher one."""
    assert 0 <= value < 1 << 64
    out = [movz(rd, value & 0xFFFF, 0)]
    for shift in (16, 32, 48):
        part = value >> shift & 0xFFFF
        if part:
            out.append(movk(rd, part, shift))
    return out


def mov_reg(rd: int, rm: int) -> Insn:
    """mov xD, xM   (= orr xD, xzr, xM: sf=1 01 01010 shift=00 N=0 Rm imm6=0 Rn=11111 Rd)"""
    return Insn(0xAA0003E0 | rm << 16 | rd, f"mov {_x(rd)}, {_x(rm)}")


def add_imm(rd: int, rn: int, imm12: int) -> Insn:
    """add xD, xN, #imm12   (sf=1 0 0 100010 sh=0 imm12 Rn Rd)"""
    assert 0 <= imm12 < 1 << 12 and rd != 31 and rn != 31
    return Insn(0x91000000 | imm12 << 10 | rn << 5 | rd, f"add {_x(rd)}, {_x(rn)}, #{imm12:#x}")


def sub_imm(rd: int, rn: int, imm12: int) -> Insn:
    """sub xD, xN, #imm12   (sf=1 1 0 100010 sh=0 imm12 Rn Rd)"""
    assert 0 <= imm12 < 1 << 12 and rd != 31 and rn != 31
    return Insn(0xD1000000 | imm12 << 10 | rn << 5 | rd, f"sub {_x(rd)}, {_x(rn)}, #{imm12:#x}")


def cmp_imm(rn: int, imm12: int) -> Insn:
    """cmp xN, #imm12   (= subs xzr, xN, #imm12: sf=1 1 1 100010 sh=0 imm12 Rn 11111)"""
    assert 0 <= imm12 < 1 << 12 and rn != 31
    return Insn(0xF100001F | imm12 << 10 | rn << 5, f"cmp {_x(rn)}, #{imm12:#x}")


def ubfx(rd: int, rn: int, lsb: int, width: int) -> Insn:
    """ubfx xD, xN, #lsb, #width

    = ubfm xD, xN, #lsb, #lsb+width-1: sf=1 10 100110 N=1 immr imms Rn Rd"""
    assert 0 <= lsb < 64 and 1 <= width <= 64 - lsb
    return Insn(0xD3400000 | lsb << 16 | (lsb + width - 1) << 10 | rn << 5 | rd,
                f"ubfx {_x(rd)}, {_x(rn)}, #{lsb}, #{width}")


# ---------------------------------------------------------------------------------------------
# Loads and stores (64-bit)

def str_imm(rt: int, rn: int, offset: int) -> Insn:
    """str xT, [xN, #offset]   (unsigned offset: 11 111 0 01 00 imm12=offset/8 Rn Rt)"""
    assert offset % 8 == 0 and 0 <= offset < 8 << 12 and rn != 31
    return Insn(0xF9000000 | (offset // 8) << 10 | rn << 5 | rt,
                f"str {_x(rt)}, [{_x(rn)}, #{offset:#x}]")


def ldr_imm(rt: int, rn: int, offset: int) -> Insn:
    """ldr xT, [xN, #offset]   (unsigned offset: 11 111 0 01 01 imm12=offset/8 Rn Rt)"""
    assert offset % 8 == 0 and 0 <= offset < 8 << 12 and rn != 31 and rt != 31
    return Insn(0xF9400000 | (offset // 8) << 10 | rn << 5 | rt,
                f"ldr {_x(rt)}, [{_x(rn)}, #{offset:#x}]")


def ldr_post(rt: int, rn: int, imm9: int) -> Insn:
    """ldr xT, [xN], #imm9   (post-index: 11 111 0 00 01 0 imm9 01 Rn Rt)"""
    assert -256 <= imm9 < 256 and rn != 31 and rt != 31
    return Insn(0xF8400400 | (imm9 & 0x1FF) << 12 | rn << 5 | rt,
                f"ldr {_x(rt)}, [{_x(rn)}], #{imm9}")


# ---------------------------------------------------------------------------------------------
# Branches (offsets in bytes, relative to the instruction itself)

def b(offset: int) -> Insn:
    """b #offset   (000101 imm26)"""
    assert offset % 4 == 0 and -(1 << 27) <= offset < 1 << 27
    return Insn(0x14000000 | (offset >> 2) & 0x3FFFFFF, f"b #{offset}")


#: condition codes (Arm ARM C1.2.4)
COND = {"eq": 0, "ne": 1, "hs": 2, "lo": 3, "mi": 4, "pl": 5, "vs": 6, "vc": 7,
        "hi": 8, "ls": 9, "ge": 10, "lt": 11, "gt": 12, "le": 13}


def b_cond(cond: str, offset: int) -> Insn:
    """b.<cond> #offset   (0101010 0 imm19 0 cond)"""
    assert offset % 4 == 0 and -(1 << 20) <= offset < 1 << 20
    return Insn(0x54000000 | ((offset >> 2) & 0x7FFFF) << 5 | COND[cond], f"b.{cond} #{offset}")


def cbz(rt: int, offset: int) -> Insn:
    """cbz xT, #offset   (sf=1 011010 0 imm19 Rt)"""
    assert offset % 4 == 0 and -(1 << 20) <= offset < 1 << 20
    return Insn(0xB4000000 | ((offset >> 2) & 0x7FFFF) << 5 | rt, f"cbz {_x(rt)}, #{offset}")


def adr(rd: int, offset: int) -> Insn:
    """adr xD, #offset   (0 immlo 10000 immhi Rd)"""
    assert -(1 << 20) <= offset < 1 << 20 and rd != 31
    imm = offset & 0x1FFFFF
    return Insn(0x10000000 | (imm & 3) << 29 | (imm >> 2) << 5 | rd, f"adr {_x(rd)}, #{offset}")


def br(rn: int) -> Insn:
    """br xN   (1101011 0000 11111 000000 Rn 00000)"""
    return Insn(0xD61F0000 | rn << 5, f"br {_x(rn)}")


ERET = Insn(0xD69F03E0, "eret")            # 1101011 0100 11111 000000 11111 00000
WFI = Insn(0xD503207F, "wfi")              # hint #3
NOP = Insn(0xD503201F, "nop")              # hint #0
SVC0 = Insn(0xD4000001, "svc #0")          # 11010100 000 imm16=0 000 01
ISB = Insn(0xD5033FDF, "isb")              # isb sy: CRm=1111 op2=110
DSB_SY = Insn(0xD5033F9F, "dsb sy")        # CRm=1111 op2=100
DSB_ISH = Insn(0xD5033B9F, "dsb ish")      # CRm=1011 op2=100
TLBI_VMALLE1 = Insn(0xD508871F, "tlbi vmalle1")   # sys #0, c8, c7, #0
IC_IALLU = Insn(0xD508751F, "ic iallu")    # sys #0, c7, c5, #0
MSR_PAN_1 = Insn(0xD500419F, "msr pan, #1")       # msr (immediate): op1=000 CRm=imm op2=100


# ---------------------------------------------------------------------------------------------
# System registers and instructions

#: name -> (op0, op1, CRn, CRm, op2)
SYSREG: Dict[str, Tuple[int, int, int, int, int]] = {
    "midr_el1": (3, 0, 0, 0, 0),
    "id_aa64pfr0_el1": (3, 0, 0, 4, 0),
    "id_aa64mmfr0_el1": (3, 0, 0, 7, 0),
    "id_aa64mmfr1_el1": (3, 0, 0, 7, 1),
    "id_aa64mmfr2_el1": (3, 0, 0, 7, 2),
    "sctlr_el1": (3, 0, 1, 0, 0),
    "ttbr0_el1": (3, 0, 2, 0, 0),
    "ttbr1_el1": (3, 0, 2, 0, 1),
    "tcr_el1": (3, 0, 2, 0, 2),
    "spsr_el1": (3, 0, 4, 0, 0),
    "elr_el1": (3, 0, 4, 0, 1),
    "currentel": (3, 0, 4, 2, 2),
    "pan": (3, 0, 4, 2, 3),
    "esr_el1": (3, 0, 5, 2, 0),
    "far_el1": (3, 0, 6, 0, 0),
    "par_el1": (3, 0, 7, 4, 0),
    "mair_el1": (3, 0, 10, 2, 0),
    "vbar_el1": (3, 0, 12, 0, 0),
}


def _sysreg_bits(name: str) -> int:
    op0, op1, crn, crm, op2 = SYSREG[name]
    return (op0 - 2) << 19 | op1 << 16 | crn << 12 | crm << 8 | op2 << 5


def msr(name: str, rt: int) -> Insn:
    """msr <sysreg>, xT   (1101010100 0 1 o0 op1 CRn CRm op2 Rt)"""
    return Insn(0xD5100000 | _sysreg_bits(name) | rt, f"msr {name}, {_x(rt)}")


def mrs(rt: int, name: str) -> Insn:
    """mrs xT, <sysreg>   (1101010100 1 1 o0 op1 CRn CRm op2 Rt)"""
    return Insn(0xD5300000 | _sysreg_bits(name) | rt, f"mrs {_x(rt)}, {name}")


#: AT operations: name -> (op1, CRm, op2) of `sys #op1, c7, cCRm, #op2, xT` (Arm ARM C5.5)
AT_OPS = {
    "s1e1r": (0, 8, 0),
    "s1e1w": (0, 8, 1),
    "s1e0r": (0, 8, 2),
    "s1e0w": (0, 8, 3),
    "s1e1rp": (0, 9, 0),     # FEAT_PAN2
    "s1e1wp": (0, 9, 1),     # FEAT_PAN2
}


def at(op: str, rt: int) -> Insn:
    """at <op>, xT   (= sys #op1, c7, cCRm, #op2, xT: 1101010100 0 01 op1 0111 CRm op2 Rt)"""
    op1, crm, op2 = AT_OPS[op]
    return Insn(0xD5087000 | op1 << 16 | crm << 8 | op2 << 5 | rt, f"at {op}, {_x(rt)}")


# ---------------------------------------------------------------------------------------------
# A tiny assembler: a list of instructions with labels and forward references

class Asm:
    """Instructions at consecutive addresses from `origin`; branch targets by label name.

        a = Asm(0x40200000)
        a.emit(movz(0, 1)); a.label("loop"); a.branch(cbz, 0, "done") ...
        words = a.words()      # [(word, text)], every label resolved
    """

    def __init__(self, origin: int):
        self.origin = origin
        self.items: List[object] = []      # Insn, or (encoder, args, label) to resolve later
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

    def align(self, boundary: int):
        while self.here % boundary:
            self.emit(NOP)

    def pad_to(self, addr: int):
        assert self.here <= addr, f"code overflows {addr:#x} (at {self.here:#x})"
        while self.here < addr:
            self.emit(NOP)

    def branch(self, encoder, *args):
        """encoder(*args[:-1], offset) with args[-1] a label: b, b_cond, cbz, adr."""
        self.items.append((encoder, args[:-1], args[-1]))

    def insns(self) -> List[Insn]:
        out = []
        for n, item in enumerate(self.items):
            if isinstance(item, Insn):
                out.append(item)
            else:
                encoder, args, label = item
                if label not in self.labels:
                    raise KeyError(f"undefined label {label}")
                out.append(encoder(*args, self.labels[label] - (self.origin + 4 * n)))
        return out

    def code(self) -> bytes:
        return b"".join(i.word.to_bytes(4, "little") for i in self.insns())
