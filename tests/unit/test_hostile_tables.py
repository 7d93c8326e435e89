"""Hostile page tables: entries pointing at MMIO or beyond RAM are never read, loops end.

The memory adapter here is the real RAM-map guard (PhysicalMemory.read) over a bytearray,
with the memory map of a real QEMU 7.2 pc machine (tests/data/qemu)."""

import os

from qintrospect import paging
from qintrospect.machine.rammap import RamMap
from qintrospect.memory.guest import PhysicalMemory
from qintrospect.machine.monitor_text import parse_mtree_flat

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "qemu", "mtree_f_pc_7.2.txt")
P, RW, PS = 1, 2, 0x80
CR0, CR4, EFER = 0x80010001, 0x20, 0xD00   # PG|WP|PE; PAE; LME|LMA|NXE: 4-level paging


class GuardedRam(PhysicalMemory):
    name = "test"

    def __init__(self):
        with open(DATA) as f:
            super().__init__(RamMap(parse_mtree_flat(f.read()), {}))
        self.ram = bytearray(1 << 22)
        self.reads = []

    def _read(self, gpa, length):
        self.reads.append(gpa)
        return bytes(self.ram[gpa:gpa + length])

    def put(self, addr, value):
        self.ram[addr:addr + 8] = value.to_bytes(8, "little")


def cpu(root):
    return paging.CpuState(CR0, root, CR4, EFER, maxphyaddr=40)


def test_entry_pointing_at_mmio_is_unreadable_and_never_read():
    mem = GuardedRam()
    mem.put(0x100000, 0xFED00000 | P | RW)      # PML4[0] -> the HPET's registers
    w = paging.walk(mem.read, cpu(0x100000), 0x1000)
    assert w.fault.reason == "unreadable" and w.fault.level == "PDPT"
    assert "hpet" in w.fault.message
    assert all(not 0xFED00000 <= a < 0xFED01000 for a in mem.reads)
    assert list(paging.iter_mappings(mem.read, cpu(0x100000))) == []


def test_entry_pointing_beyond_ram_is_unreadable():
    mem = GuardedRam()
    mem.put(0x100000, 0x300000 | P | RW)
    mem.put(0x300000, 0x7_0000_0000 | P | RW)   # a PD far above the 256 MiB of RAM
    w = paging.walk(mem.read, cpu(0x100000), 0x1000)
    assert w.fault.reason == "unreadable" and "unassigned" in w.fault.message


def test_tables_pointing_at_themselves_end():
    mem = GuardedRam()
    mem.put(0x100000, 0x100000 | P | RW)        # PML4[0] -> the PML4 itself, at every level
    w = paging.walk(mem.read, cpu(0x100000), 0x1000)
    assert len(w.levels) <= 4 and len(mem.reads) <= 4
    leaves = list(paging.iter_mappings(mem.read, cpu(0x100000), 0, 1 << 30))
    # the self-map makes PT[0] the PML4 itself: one 4 KiB leaf at 0, mapping the table
    assert [(m.va, m.pa, m.size) for m in leaves] == [(0, 0x100000, 4096)]


def test_reserved_bits_fault_with_rsvd_error_code():
    mem = GuardedRam()
    mem.put(0x100000, 0x300000 | P | RW)
    mem.put(0x300000, (1 << 45) | P | RW | PS)  # 1 GiB page with a bit above MAXPHYADDR 40
    w = paging.walk(mem.read, cpu(0x100000), 0x1000)
    assert w.fault.reason == "reserved-bit" and w.fault.error_code & 0x8
