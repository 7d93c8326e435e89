"""The oracle guest's program and image, per scenario, emitted in Python (see a64.py, elf.py).

What the guest does (EL1, MMU off, DAIF masked, no stack):

  1. x28 = DATA; MAGIC = RUNNING; VBAR_EL1 = VECTORS.
  2. Stores MIDR, ID_AA64PFR0/MMFR0/MMFR1/MMFR2 and CurrentEL in the header; checks the
     scenario's requirements (ID register fields): if one fails, SKIP_INDEX = its index,
     MAGIC = SKIP, and it parks (so a CPU without, say, FEAT_LPA2 never sees DS=1).
  3. PAN2 = (ID_AA64MMFR1_EL1.PAN >= 2): whether it will run AT S1E1RP/S1E1WP.
  4. MAIR, TCR, TTBR0, TTBR1; isb; tlbi vmalle1; dsb ish; isb; SCTLR_EL1 (M=1); isb. Reads
     SCTLR/TCR/TTBR0/TTBR1/MAIR back into the header; `msr pan, #1` if the scenario says so;
     stores the PAN register.
  5. For each probe i (DATA+PROBES: 16 bytes each, VA then flags): PROGRESS = i; AT S1E1R,
     S1E1W, S1E0R, S1E0W (and S1E1RP, S1E1WP with PAN2), each followed by ISB and MRS PAR_EL1,
     into slots 0-5 of its 64-byte result; with flag bit 0 (exec), a fetch at EL1 (`br` to the
     VA) and one at EL0 (`eret` to the VA with SPSR=EL0t): the frame holds `svc #0`, so either
     the SVC or an Instruction Abort comes to the vector, which stores ESR_EL1 in slot 6 / 7 and
     returns (x27 = where to resume, non-zero only during a fetch probe).
  6. MAGIC = DONE; `wfi` in a loop.

Any other exception: the vector stores ESR/FAR/ELR/SPSR and the vector offset in the header,
MAGIC = EXCEPTION, and parks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

from . import a64 as A
from .elf import elf_bytes, write_elf
from .layout import (BASE, CODE_SIZE, DATA, FRAMES, FRAMES_SIZE, START, VECTORS,
                     Built, Scenario, build_tables)

# -- the results area (offsets from DATA) --
MAGIC = 0x00
PROGRESS = 0x08
MMFR0, MMFR1, MMFR2, PFR0, CURRENTEL, MIDR = 0x10, 0x18, 0x20, 0x28, 0x30, 0x38
SCTLR_RB, TCR_RB, TTBR0_RB, TTBR1_RB, MAIR_RB, PAN_RB = 0x40, 0x48, 0x50, 0x58, 0x60, 0x68
EXC_ESR, EXC_FAR, EXC_ELR, EXC_SPSR, EXC_VECTOR = 0x70, 0x78, 0x80, 0x88, 0x90
SKIP_INDEX = 0x98
NPROBES = 0xA0          # written by the builder
PAN2 = 0xA8             # 1 if the guest ran AT S1E1RP/S1E1WP
HEADER_SIZE = 0x100
RESULTS = 0x100         # probe i: RESULTS + RESULT_SIZE * i
RESULT_SIZE = 0x40
SLOTS = ("R", "W", "r", "w", "RP", "WP", "X", "x")   # 8-byte slots of a result, in order
PROBES = 0x8000         # probe i: PROBES + 16 * i: VA, flags (bit 0: exec)
MAX_PROBES = (PROBES - RESULTS) // RESULT_SIZE

HEADER_REGS = {"id_aa64mmfr0_el1": MMFR0, "id_aa64mmfr1_el1": MMFR1, "id_aa64mmfr2_el1": MMFR2,
               "id_aa64pfr0_el1": PFR0, "currentel": CURRENTEL, "midr_el1": MIDR}


def _magic(text: bytes) -> int:
    assert len(text) == 8
    return int.from_bytes(text, "little")


MAGIC_RUNNING = _magic(b"A64ORRUN")
MAGIC_DONE = _magic(b"A64ORDON")
MAGIC_EXCEPTION = _magic(b"A64OREXC")
MAGIC_SKIP = _magic(b"A64ORSKP")

SPSR_EL1H = 0x3C5          # M=EL1h, DAIF masked
SPSR_EL0T = 0x3C0          # M=EL0t, DAIF masked
PSTATE_PAN = 1 << 22


@dataclass
class Image:
    scenario: Scenario
    built: Built
    program: List[A.Insn]     # the code, BASE upwards
    data: bytes               # the whole image, loaded at BASE

    def write_elf(self, path: str) -> str:
        return write_elf(path, BASE, BASE, self.data)

    def elf(self) -> bytes:
        return elf_bytes(BASE, BASE, self.data)


def program(scenario: Scenario, built: Built) -> List[A.Insn]:
    """The guest's code for one scenario (registers: x28 DATA, x19 probe list, x20 probes left,
    x21 result slot, x22 PAN2, x23 probe index, x24 flags, x26 ESR slot and x27 resume address
    of a fetch probe, x9-x11 the vector's scratch)."""
    a = A.Asm(BASE)
    a.branch(A.b, "start")

    a.label("handler")
    a.branch(A.cbz, 27, "fatal")                  # not in a fetch probe
    a.emit(A.mrs(10, "esr_el1"), A.str_imm(10, 26, 0),
           A.mov_reg(11, 27), A.mov_reg(27, A.XZR),
           A.mov64(10, SPSR_EL1H | (PSTATE_PAN if scenario.pan else 0)),
           A.msr("spsr_el1", 10), A.msr("elr_el1", 11), A.ERET)
    a.label("fatal")
    a.emit(A.mrs(10, "esr_el1"), A.str_imm(10, 28, EXC_ESR),
           A.mrs(10, "far_el1"), A.str_imm(10, 28, EXC_FAR),
           A.mrs(10, "elr_el1"), A.str_imm(10, 28, EXC_ELR),
           A.mrs(10, "spsr_el1"), A.str_imm(10, 28, EXC_SPSR),
           A.str_imm(9, 28, EXC_VECTOR),
           A.mov64(10, MAGIC_EXCEPTION), A.DSB_SY, A.str_imm(10, 28, MAGIC), A.DSB_SY)
    a.branch(A.b, "park")
    a.label("skip")                               # x2 = index of the failed requirement
    a.emit(A.str_imm(2, 28, SKIP_INDEX), A.mov64(0, MAGIC_SKIP), A.DSB_SY,
           A.str_imm(0, 28, MAGIC), A.DSB_SY)
    a.label("park")
    a.emit(A.WFI)
    a.branch(A.b, "park")

    # -- vectors (VBAR_EL1: 2 KiB aligned): 16 entries of 0x80 bytes, each `x9 = its index`
    #    and a branch to the common handler --
    a.pad_to(VECTORS)
    for i in range(16):
        a.emit(A.movz(9, i))
        a.branch(A.b, "handler")
        a.pad_to(VECTORS + 0x80 * (i + 1))

    # -- start --
    a.pad_to(START)
    a.label("start")
    a.emit(A.mov64(28, DATA), A.mov64(0, MAGIC_RUNNING), A.str_imm(0, 28, MAGIC),
           A.mov64(27, 0), A.mov64(0, VECTORS), A.msr("vbar_el1", 0), A.ISB)
    for reg, off in HEADER_REGS.items():
        a.emit(A.mrs(0, reg), A.str_imm(0, 28, off))
    for n, req in enumerate(scenario.requires):
        a.emit(A.movz(2, n), A.ldr_imm(0, 28, HEADER_REGS[req.reg]),
               A.ubfx(1, 0, req.shift, 4), A.cmp_imm(1, req.value))
        a.branch(A.b_cond, {"ge": "lo", "le": "hi", "eq": "ne"}[req.op], "skip")
    # PAN2: ID_AA64MMFR1_EL1.PAN >= 2
    a.emit(A.movz(22, 0), A.ldr_imm(0, 28, MMFR1), A.ubfx(1, 0, 20, 4), A.cmp_imm(1, 2))
    a.branch(A.b_cond, "lo", "no_pan2")
    a.emit(A.movz(22, 1))
    a.label("no_pan2")
    a.emit(A.str_imm(22, 28, PAN2))

    # -- the MMU --
    a.emit(A.mov64(0, scenario.mair), A.msr("mair_el1", 0),
           A.mov64(0, scenario.tcr), A.msr("tcr_el1", 0),
           A.mov64(0, built.ttbr0), A.msr("ttbr0_el1", 0),
           A.mov64(0, built.ttbr1), A.msr("ttbr1_el1", 0),
           A.ISB, A.TLBI_VMALLE1, A.DSB_ISH, A.ISB,
           A.mov64(0, scenario.sctlr), A.msr("sctlr_el1", 0), A.ISB, A.IC_IALLU, A.DSB_ISH,
           A.ISB)
    for reg, off in (("sctlr_el1", SCTLR_RB), ("tcr_el1", TCR_RB), ("ttbr0_el1", TTBR0_RB),
                     ("ttbr1_el1", TTBR1_RB), ("mair_el1", MAIR_RB)):
        a.emit(A.mrs(0, reg), A.str_imm(0, 28, off))
    if scenario.pan:
        a.emit(A.MSR_PAN_1)
    a.emit(A.mrs(0, "pan"), A.str_imm(0, 28, PAN_RB))

    # -- the probes --
    a.emit(A.mov64(19, DATA + PROBES), A.ldr_imm(20, 28, NPROBES), A.add_imm(21, 28, RESULTS),
           A.movz(23, 0))
    a.label("loop")
    a.branch(A.cbz, 20, "done")
    a.emit(A.str_imm(23, 28, PROGRESS), A.ldr_post(0, 19, 8), A.ldr_post(24, 19, 8))
    for slot, op in enumerate(("s1e1r", "s1e1w", "s1e0r", "s1e0w")):
        a.emit(A.at(op, 0), A.ISB, A.mrs(1, "par_el1"), A.str_imm(1, 21, 8 * slot))
    a.branch(A.cbz, 22, "no_at_pan")
    for slot, op in ((4, "s1e1rp"), (5, "s1e1wp")):
        a.emit(A.at(op, 0), A.ISB, A.mrs(1, "par_el1"), A.str_imm(1, 21, 8 * slot))
    a.label("no_at_pan")
    a.branch(A.cbz, 24, "next")
    # fetch at EL1: br to the VA; svc #0 there (or an Instruction Abort) comes back via x27
    a.emit(A.str_imm(A.XZR, 21, 0x30), A.add_imm(26, 21, 0x30))
    a.branch(A.adr, 27, "after_x1")
    a.emit(A.br(0))
    a.label("after_x1")
    # fetch at EL0: eret to the VA as EL0t
    a.emit(A.str_imm(A.XZR, 21, 0x38), A.add_imm(26, 21, 0x38))
    a.branch(A.adr, 27, "after_x0")
    a.emit(A.msr("elr_el1", 0), A.mov64(10, SPSR_EL0T), A.msr("spsr_el1", 10), A.ERET)
    a.label("after_x0")
    a.label("next")
    a.emit(A.add_imm(21, 21, RESULT_SIZE), A.add_imm(23, 23, 1), A.sub_imm(20, 20, 1))
    a.branch(A.b, "loop")
    a.label("done")
    a.emit(A.DSB_SY, A.mov64(0, MAGIC_DONE), A.str_imm(0, 28, MAGIC), A.DSB_SY)
    a.branch(A.b, "park")
    insns = a.insns()
    assert 4 * len(insns) <= CODE_SIZE
    return insns


def build(scenario: Scenario) -> Image:
    built = build_tables(scenario)
    probes = scenario.all_probes()
    if len(probes) > MAX_PROBES:
        raise ValueError(f"{scenario.name}: {len(probes)} probes, at most {MAX_PROBES}")
    insns = program(scenario, built)
    img = bytearray(built.tables_end - BASE)
    code = b"".join(i.word.to_bytes(4, "little") for i in insns)
    img[0:len(code)] = code
    d = DATA - BASE
    img[d + NPROBES:d + NPROBES + 8] = len(probes).to_bytes(8, "little")
    for i, p in enumerate(probes):
        off = d + PROBES + 16 * i
        img[off:off + 8] = p.va.to_bytes(8, "little")
        img[off + 8:off + 16] = int(p.exec).to_bytes(8, "little")
    f = FRAMES - BASE
    img[f:f + FRAMES_SIZE] = A.SVC0.word.to_bytes(4, "little") * (FRAMES_SIZE // 4)
    for pa, table in built.tables.items():
        img[pa - BASE:pa - BASE + len(table)] = table
    return Image(scenario, built, insns, bytes(img))


def build_elf(scenario: Scenario, outdir: str) -> str:
    """Write <outdir>/oracle-arm64-<name>.elf (always rebuilt: 5-10 ms) and return its path."""
    os.makedirs(outdir, exist_ok=True)
    return build(scenario).write_elf(os.path.join(outdir, f"oracle-arm64-{scenario.name}.elf"))
