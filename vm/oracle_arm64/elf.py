"""A minimal ELF64 (little-endian, ET_EXEC) with one PT_LOAD segment: AArch64 by default, any
other machine (vm/oracle_riscv: EM_RISCV) through `machine`.

That is all `qemu-system-aarch64 -M virt -kernel image.elf` needs: QEMU's ELF loader copies the
segment to its physical address (p_paddr) and starts vCPU 0 at e_entry (a non-Linux image: no
boot stub, no registers set up; without `virtualization=on`/`secure=on` the vCPU starts at EL1).
The DTB goes below the segment, at the start of RAM (0x40000000), as long as the segment starts
above it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

EM_AARCH64 = 183
EM_RISCV = 243
ET_EXEC = 2
PT_LOAD = 1
PF_X, PF_W, PF_R = 1, 2, 4
EHDR_SIZE = 64
PHDR_SIZE = 56
SEGMENT_OFFSET = 0x10000     # file offset of the segment: congruent to its address mod p_align
ALIGN = 0x10000


def elf_bytes(load_addr: int, entry: int, image: bytes, machine: int = EM_AARCH64) -> bytes:
    """The ELF file: header, one program header, then `image` at SEGMENT_OFFSET, loaded at
    `load_addr` (virtual = physical) and entered at `entry`."""
    assert load_addr % ALIGN == 0 and load_addr <= entry < load_addr + len(image)
    # ELFCLASS64, ELFDATA2LSB, EV_CURRENT, SYSV ABI
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        ET_EXEC, machine, 1,             # e_type, e_machine, e_version
        entry, EHDR_SIZE, 0,             # e_entry, e_phoff, e_shoff (no sections)
        0, EHDR_SIZE, PHDR_SIZE, 1,      # e_flags, e_ehsize, e_phentsize, e_phnum
        64, 0, 0)                        # e_shentsize, e_shnum, e_shstrndx
    phdr = struct.pack(
        "<IIQQQQQQ",
        PT_LOAD, PF_R | PF_W | PF_X,     # p_type, p_flags
        SEGMENT_OFFSET, load_addr, load_addr,   # p_offset, p_vaddr, p_paddr
        len(image), len(image), ALIGN)   # p_filesz, p_memsz, p_align
    head = ehdr + phdr
    assert len(ehdr) == EHDR_SIZE and len(phdr) == PHDR_SIZE
    return head + bytes(SEGMENT_OFFSET - len(head)) + image


class Segment(NamedTuple):
    entry: int
    paddr: int
    vaddr: int
    flags: int
    data: bytes
    memsz: int


def parse_elf(data: bytes, machine: int = EM_AARCH64) -> Segment:
    """Read back what elf_bytes wrote (checks the fields QEMU's loader looks at)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64")
    (e_type, e_machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize,
     phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    if e_type != ET_EXEC or e_machine != machine or phnum != 1 or phentsize != PHDR_SIZE:
        raise ValueError(f"unexpected ELF header: type={e_type} machine={e_machine} phnum={phnum}")
    (p_type, p_flags, off, vaddr, paddr, filesz, memsz, _align) = struct.unpack_from(
        "<IIQQQQQQ", data, phoff)
    if p_type != PT_LOAD:
        raise ValueError(f"program header type {p_type}, not PT_LOAD")
    return Segment(entry, paddr, vaddr, p_flags, data[off:off + filesz], memsz)


def write_elf(path: str, load_addr: int, entry: int, image: bytes,
              machine: int = EM_AARCH64) -> str:
    with open(path, "wb") as f:
        f.write(elf_bytes(load_addr, entry, image, machine))
    return path
