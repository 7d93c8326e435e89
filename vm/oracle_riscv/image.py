"""The RISC-V oracle guest's program and image, per scenario, emitted in Python (rv64.py, elf).

What the guest does (M-mode from reset, `-bios none`: a0 = hartid, a1 = FDT; no stack):

  1. gp = DATA; MAGIC = RUNNING; stores a0, a1, mstatus; mtvec = handler (direct); mstatus,
     medeleg, mideleg, mie = 0 (every trap comes to M); stores mhartid, misa, m*id.
  2. PMP entry 0 = NAPOT over everything, RWX (without one, S and U may touch nothing).
  3. menvcfg = the scenario's, satp = the scenario's (mode, ASID, root); each read back: if it
     differs (QEMU lacks PBMTE, or the satp mode is not supported: a WARL write is dropped),
     SKIP_REASON = 2 / 1, MAGIC = SKIP, park. Then sfence.vma.
  4. PTE_BEFORE of every probe = the 8 bytes at its PTE address (physical: M-mode, MPRV=0).
  5. For each probe (PROGRESS = index << 8 | slot) and each of the scenario's kinds, in
     layout.KIND_LIST order, into its 16-byte slot (status, value):
       load:  a0 = MARKER; mstatus = MPRV | MPP | SUM | MXR; ld a0, (VA); mstatus = 0;
              slot = (0, a0)
       store: mstatus = ...; sd a0, (VA) (a0: what its load read, or MARKER if the load
              faulted); mstatus = 0; slot = (0, a0)
       fetch: (probes with exec only) mepc = VA; mstatus = MPP | SUM; mret: the frame's
              `ecall` traps with mcause 9 (from S) or 8 (from U), a failed fetch with 12.
     s11 holds where to resume while an access is in flight: the handler then stores
     (mcause, mtval) in the slot, sets mstatus = 0, s11 = 0 and jumps there.
  6. PTE_AFTER of every probe, as in 4.
  7. mret to `park_s` in S-mode (satp still on): it stores MAGIC = DONE through the identity map
     and loops on `wfi`, so gva2gpa / info mem / a debugger see priv S and the scenario's satp.

Any other trap (s11 = 0): mcause/mepc/mtval in the header, MAGIC = EXCEPTION, park in M-mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import numpy as np

from vm.oracle_arm64.elf import EM_RISCV, elf_bytes, write_elf

from . import rv64 as A
from .layout import (BASE, CODE_SIZE, DATA, ECALL, ECALL_VA, FRAMES, FRAMES_SIZE, KINDS,
                     MSTATUS_MPP_S, SCRATCH, SCRATCH_VALUE, SLOT, STORE_LOAD, Built, Scenario,
                     build_tables)

# -- the header (offsets from DATA) --
MAGIC, PROGRESS = 0x00, 0x08
MHARTID, MISA, MVENDORID, MARCHID, MIMPID = 0x10, 0x18, 0x20, 0x28, 0x30
A0_ENTRY, A1_ENTRY, MSTATUS_ENTRY = 0x38, 0x40, 0x48
SATP_RB, MENVCFG_RB, PMPADDR0_RB, PMPCFG0_RB, MTVEC_RB = 0x50, 0x58, 0x60, 0x68, 0x70
EXC_MCAUSE, EXC_MEPC, EXC_MTVAL = 0x78, 0x80, 0x88
SKIP_REASON = 0x90                  # 1: satp not accepted, 2: menvcfg not accepted
NPROBES = 0x98                      # written by the builder
HEADER_SIZE = 0x100                 # SCRATCH (layout) is the last word of it
HEADER = {"magic": MAGIC, "progress": PROGRESS, "mhartid": MHARTID, "misa": MISA,
          "mvendorid": MVENDORID, "marchid": MARCHID, "mimpid": MIMPID, "a0": A0_ENTRY,
          "a1": A1_ENTRY, "mstatus": MSTATUS_ENTRY, "satp": SATP_RB, "menvcfg": MENVCFG_RB,
          "pmpaddr0": PMPADDR0_RB, "pmpcfg0": PMPCFG0_RB, "mtvec": MTVEC_RB,
          "mcause": EXC_MCAUSE, "mepc": EXC_MEPC, "mtval": EXC_MTVAL, "skip": SKIP_REASON,
          "nprobes": NPROBES, "scratch": SCRATCH}
SKIP_REASONS = {1: "satp", 2: "menvcfg"}

PROBES = 0x1000                     # probe i: PROBES + 32 * i: VA, flags (bit 0 exec), PTE addr
PROBE_SIZE = 32
RESULTS = 0x4000                    # probe i: RESULTS + RESULT_SIZE * i
RESULT_SIZE = 0x100                 # slot k (layout.SLOT) at 16 * k: status, value
PTE_BEFORE, PTE_AFTER = 0xE0, 0xE8
MAX_PROBES = (RESULTS - PROBES) // PROBE_SIZE
NOT_RUN = (1 << 64) - 1             # a status the guest never wrote
MARKER = 0xFFFFFFFF_00000000 | ECALL   # what a store writes when its load faulted


def _magic(text: bytes) -> int:
    assert len(text) == 8
    return int.from_bytes(text, "little")


MAGIC_RUNNING = _magic(b"RVORARUN")
MAGIC_DONE = _magic(b"RVORADON")
MAGIC_EXCEPTION = _magic(b"RVORAEXC")
MAGIC_SKIP = _magic(b"RVORASKP")


@dataclass
class Image:
    scenario: Scenario
    built: Built
    program: List[A.Insn]     # the code, BASE upwards
    data: bytes               # the whole image, loaded at BASE

    def elf(self) -> bytes:
        return elf_bytes(BASE, BASE, self.data, EM_RISCV)

    def write_elf(self, path: str) -> str:
        return write_elf(path, BASE, BASE, self.data, EM_RISCV)

    def word(self, pa: int) -> int:
        """The 8 bytes at `pa` in the image (what a load there reads, until a store changes it)."""
        return int.from_bytes(self.data[pa - BASE:pa - BASE + 8], "little")


def _kind_code(a: A.Asm, name: str):
    """One access of kind `name` to the VA in s5, its slot at s2 + 16 * SLOT[name]."""
    k = KINDS[name]
    end = f"end_{name}"
    if k.access == "fetch":
        a.emit(A.andi("t0", "s4", 1))
        a.branch(A.beqz, "t0", end)
    if k.access == "load":
        a.emit(A.li("a0", MARKER))
    a.emit(A.addi("s10", "s2", 16 * SLOT[name]))
    a.la("s11", end)
    if k.access == "fetch":
        a.emit(A.csrw("mepc", "s5"), A.li("t0", k.mstatus), A.csrw("mstatus", "t0"), A.MRET)
    else:
        access = A.ld("a0", "s5") if k.access == "load" else A.sd("a0", "s5")
        a.emit(A.li("t0", k.mstatus), A.csrw("mstatus", "t0"), access,
               A.csrw("mstatus", A.ZERO), A.mv("s11", A.ZERO),
               A.sd(A.ZERO, "s10", 0), A.sd("a0", "s10", 8))
    a.label(end)


def _pte_pass(a: A.Asm, name: str, offset: int):
    """Copy the PTE at each probe's PTE address (0: none) to its result's `offset`."""
    a.emit(A.li("s0", DATA + PROBES), A.ld("s1", "gp", NPROBES), A.li("s2", DATA + RESULTS))
    a.label(name)
    a.branch(A.beqz, "s1", f"{name}_done")
    a.emit(A.ld("t0", "s0", 16))
    a.branch(A.beqz, "t0", f"{name}_next")
    a.emit(A.ld("t1", "t0"), A.sd("t1", "s2", offset))
    a.label(f"{name}_next")
    a.emit(A.addi("s0", "s0", PROBE_SIZE), A.addi("s2", "s2", RESULT_SIZE),
           A.addi("s1", "s1", -1))
    a.branch(A.j, name)
    a.label(f"{name}_done")


def program(s: Scenario, built: Built) -> List[A.Insn]:
    """The guest's code for one scenario (registers: gp DATA, s0 probe entry, s1 probes left,
    s2 result, s3 probe index, s4 flags, s5 VA, a0 the loaded value, s10 slot and s11 resume
    address of the access in flight, t5/t6 the handler's and the park's)."""
    for name in s.kinds:
        assert name in KINDS, name
        if name in STORE_LOAD:
            assert STORE_LOAD[name] in s.kinds, f"{s.name}: {name} without its load"
    a = A.Asm(BASE)
    a.branch(A.j, "start")
    a.emit(A.NOP)
    assert a.here == ECALL_VA
    a.emit(A.ECALL, A.NOP)

    a.label("handler")                               # mtvec (direct mode: 4-byte aligned)
    a.branch(A.beqz, "s11", "fatal")
    a.emit(A.csrr("t6", "mcause"), A.sd("t6", "s10", 0), A.csrr("t6", "mtval"),
           A.sd("t6", "s10", 8), A.csrw("mstatus", A.ZERO), A.mv("t6", "s11"),
           A.mv("s11", A.ZERO), A.jr("t6"))
    a.label("fatal")
    a.emit(A.csrw("mstatus", A.ZERO),
           A.csrr("t6", "mcause"), A.sd("t6", "gp", EXC_MCAUSE),
           A.csrr("t6", "mepc"), A.sd("t6", "gp", EXC_MEPC),
           A.csrr("t6", "mtval"), A.sd("t6", "gp", EXC_MTVAL),
           A.li("t6", MAGIC_EXCEPTION), A.sd("t6", "gp", MAGIC))
    a.label("park_m")
    a.emit(A.WFI)
    a.branch(A.j, "park_m")
    a.label("skip")                                  # t5 = the reason
    a.emit(A.sd("t5", "gp", SKIP_REASON), A.li("t6", MAGIC_SKIP), A.sd("t6", "gp", MAGIC))
    a.branch(A.j, "park_m")
    a.label("park_s")                                # S-mode, t5 = MAGIC_DONE
    a.emit(A.sd("t5", "gp", MAGIC))
    a.label("park_s_loop")
    a.emit(A.WFI)
    a.branch(A.j, "park_s_loop")

    # -- start: M-mode, MMU off --
    a.label("start")
    a.emit(A.li("gp", DATA), A.mv("s11", A.ZERO), A.li("t0", MAGIC_RUNNING),
           A.sd("t0", "gp", MAGIC), A.sd("a0", "gp", A0_ENTRY), A.sd("a1", "gp", A1_ENTRY),
           A.csrr("t0", "mstatus"), A.sd("t0", "gp", MSTATUS_ENTRY))
    a.la("t0", "handler")
    a.emit(A.csrw("mtvec", "t0"), A.csrr("t0", "mtvec"), A.sd("t0", "gp", MTVEC_RB))
    for csr in ("mstatus", "medeleg", "mideleg", "mie"):
        a.emit(A.csrw(csr, A.ZERO))
    for csr, off in (("mhartid", MHARTID), ("misa", MISA), ("mvendorid", MVENDORID),
                     ("marchid", MARCHID), ("mimpid", MIMPID)):
        a.emit(A.csrr("t0", csr), A.sd("t0", "gp", off))
    # PMP: entry 0 NAPOT over all addresses (pmpaddr0 all ones), R W X, not locked
    a.emit(A.li("t0", -1), A.csrw("pmpaddr0", "t0"), A.li("t0", 0x1F), A.csrw("pmpcfg0", "t0"),
           A.csrr("t0", "pmpaddr0"), A.sd("t0", "gp", PMPADDR0_RB),
           A.csrr("t0", "pmpcfg0"), A.sd("t0", "gp", PMPCFG0_RB))
    for csr, value, off, reason in (("menvcfg", s.menvcfg, MENVCFG_RB, 2),
                                    ("satp", built.satp, SATP_RB, 1)):
        a.emit(A.li("t0", value), A.csrw(csr, "t0"), A.csrr("t1", csr), A.sd("t1", "gp", off),
               A.li("t5", reason))
        a.branch(A.bne, "t0", "t1", "skip")
    a.emit(A.SFENCE_VMA)

    _pte_pass(a, "before", PTE_BEFORE)
    a.emit(A.li("s0", DATA + PROBES), A.ld("s1", "gp", NPROBES), A.li("s2", DATA + RESULTS),
           A.mv("s3", A.ZERO))
    a.label("loop")
    a.branch(A.beqz, "s1", "probes_done")
    a.emit(A.ld("s5", "s0", 0), A.ld("s4", "s0", 8))
    for name in (k for k in KINDS if k in s.kinds):
        a.emit(A.slli("t0", "s3", 8), A.addi("t0", "t0", SLOT[name]),
               A.sd("t0", "gp", PROGRESS))
        _kind_code(a, name)
    a.emit(A.addi("s0", "s0", PROBE_SIZE), A.addi("s2", "s2", RESULT_SIZE),
           A.addi("s3", "s3", 1), A.addi("s1", "s1", -1))
    a.branch(A.j, "loop")
    a.label("probes_done")
    _pte_pass(a, "after", PTE_AFTER)

    # -- park in S-mode, through the tables --
    a.emit(A.li("t5", MAGIC_DONE))
    a.la("t0", "park_s")
    a.emit(A.csrw("mepc", "t0"), A.li("t0", MSTATUS_MPP_S), A.csrw("mstatus", "t0"), A.MRET)
    insns = a.insns()
    # all in the first page, ECALL_VA's: layout.py's identity-code finding depends on it
    assert 4 * len(insns) <= 0x1000 < CODE_SIZE
    return insns


def build(s: Scenario) -> Image:
    built = build_tables(s)
    probes = s.all_probes()
    if len(probes) > MAX_PROBES:
        raise ValueError(f"{s.name}: {len(probes)} probes, at most {MAX_PROBES}")
    insns = program(s, built)
    img = bytearray(built.tables_end - BASE)
    code = b"".join(i.word.to_bytes(4, "little") for i in insns)
    img[0:len(code)] = code

    def put(addr: int, value: int):
        img[addr - BASE:addr - BASE + 8] = value.to_bytes(8, "little")

    put(DATA + NPROBES, len(probes))
    put(DATA + SCRATCH, SCRATCH_VALUE)
    for i, p in enumerate(probes):
        assert p.va % 8 == 0, f"{s.name} {p.name}: VA not 8-byte aligned"
        entry = DATA + PROBES + PROBE_SIZE * i
        put(entry, p.va)
        put(entry + 8, int(p.exec))
        put(entry + 16, built.pte_address(p.va))
        for slot in range(len(KINDS)):
            put(DATA + RESULTS + RESULT_SIZE * i + 16 * slot, NOT_RUN)
    frames = np.arange(FRAMES, FRAMES + FRAMES_SIZE, 8, dtype="<u8") << np.uint64(32)
    frames |= np.uint64(ECALL)
    img[FRAMES - BASE:FRAMES - BASE + FRAMES_SIZE] = frames.tobytes()
    for pa, table in built.tables.items():
        img[pa - BASE:pa - BASE + len(table)] = table
    return Image(s, built, insns, bytes(img))


def build_elf(s: Scenario, outdir: str) -> str:
    """Write <outdir>/oracle-riscv-<name>.elf (always rebuilt) and return its path."""
    os.makedirs(outdir, exist_ok=True)
    return build(s).write_elf(os.path.join(outdir, f"oracle-riscv-{s.name}.elf"))
