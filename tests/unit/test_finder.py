"""The symbol-free root finder on synthetic guest RAM: KPTI pairs, filters, ranking."""

from qintrospect.commands import finder

from qintrospect import paging
from qintrospect.machine.rammap import RamMap
from qintrospect.memory.guest import PhysicalMemory
from qintrospect.machine.monitor_text import Region

P, RW, US = 1, 2, 4
CR0, CR4, EFER = 0x80010001, 0x20, 0xD00


class Ram(PhysicalMemory):
    name = "test"

    def __init__(self, size=1 << 24):
        super().__init__(RamMap([Region(0, size - 1, "ram", "pc.ram", 0, 0)], {}))
        self.ram = bytearray(size)

    def _read(self, gpa, length):
        return bytes(self.ram[gpa:gpa + length])

    def put(self, addr, value):
        self.ram[addr:addr + 8] = value.to_bytes(8, "little")


def build():
    """Two processes sharing a kernel half; the second with KPTI (user copy at +4 KiB). Each
    maps VA 0x400000 to its own data page holding its own value."""
    ram = Ram()
    kernel_pdpt = 0x10000
    for root in (0x20000, 0x40000):
        ram.put(root + 511 * 8, kernel_pdpt | P | RW)        # shared kernel half
    ram.put(kernel_pdpt, 0x90000 | P | RW | 0x80)            # something in it
    for root, pdpt, pd, pt, data, value in ((0x20000, 0x21000, 0x22000, 0x23000, 0x24000, 111),
                                            (0x40000, 0x31000, 0x32000, 0x33000, 0x34000, 222)):
        # Linux sets NX in the kernel copy's user entries under KPTI
        ram.put(root, pdpt | P | RW | US | (1 << 63 if root == 0x40000 else 0))
        ram.put(pdpt, pd | P | RW | US)
        ram.put(pd + 2 * 8, pt | P | RW | US)
        ram.put(pt, data | P | RW | US)
        ram.put(data, value)
    # KPTI user copy of 0x40000: same user half, (nearly) empty kernel half
    ram.put(0x41000, 0x31000 | P | RW | US)
    return ram


def test_finds_every_root_pairs_kpti_and_filters():
    ram = build()
    cpu = paging.CpuState(CR0, 0x20000, CR4, EFER, 40)
    cands = finder.scan(ram, ram.ram_map, cpu)
    by_root = {c.root: c for c in cands}
    assert set(by_root) == {0x20000, 0x40000, 0x41000}
    assert by_root[0x20000].is_current
    assert by_root[0x40000].kpti_user_copy == 0x41000
    assert by_root[0x41000].kpti_kernel_copy == 0x40000
    checked = finder.check(ram.read, cpu, cands, 0x400000, 222)
    assert checked[0].root in (0x40000, 0x41000) and checked[0].value_matches
    assert {c.root for c in checked if c.value_matches} == {0x40000, 0x41000}
    assert [c for c in checked if c.root == 0x20000][0].value == 111


def test_current_cr3_on_the_user_copy_uses_the_kernel_copy():
    ram = build()
    cpu = paging.CpuState(CR0, 0x41000, CR4, EFER, 40)   # stopped in user mode, KPTI
    cands = {c.root: c for c in finder.scan(ram, ram.ram_map, cpu)}
    assert set(cands) == {0x20000, 0x40000, 0x41000}
    assert cands[0x41000].is_current and not cands[0x40000].is_current


def test_a_user_copy_with_its_own_kernel_entries_leads_to_the_kernel_copies():
    """Linux's KPTI user copy is not empty above the user half: it maps the entry code and the
    CPU entry area. Stopped in user mode (CR3 on the user copy), the finder must still key on
    the kernel copy's half (found just below: the same user half), so that it finds the
    kernel copies and their pairs, not only the user copies (which map none of the kernel)."""
    ram = build()
    trampoline = 0x50000
    ram.put(0x41000 + 510 * 8, trampoline | P | RW)      # the user copy's own kernel entry
    ram.put(trampoline, 0x91000 | P | RW)
    cpu = paging.CpuState(CR0, 0x41000, CR4, EFER, 40)
    root, half = finder.fingerprint_root(ram.read, cpu)
    assert root == 0x40000 and half == ram.read(0x40000 + 2048, 2048)
    cands = {c.root: c for c in finder.scan(ram, ram.ram_map, cpu)}
    assert set(cands) == {0x20000, 0x40000, 0x41000}
    assert cands[0x40000].kpti_user_copy == 0x41000 and cands[0x41000].is_current
    # an odd page with a kernel half of its own, where the page below is no kernel copy
    # (another user half): no KPTI, it is its own root
    ram.put(0x61000 + 511 * 8, 0x10000 | P | RW)
    ram.put(0x61000, 0x31000 | P | RW | US)
    cpu = paging.CpuState(CR0, 0x61000, CR4, EFER, 40)
    assert finder.fingerprint_root(ram.read, cpu)[0] == 0x61000


def test_riscv64_roots_share_the_kernel_half_without_kpti_pairs():
    """Sv39: every process's root holds the kernel's entries 256-511 (Linux copies them in);
    two roots 4 KiB apart are two processes, never a KPTI pair."""
    from qintrospect.paging.riscv_format import RiscvState
    V = 1
    ram = Ram()
    kernel_l1 = 0x10000
    for root in (0x20000, 0x21000):                       # adjacent, as a KPTI pair would be
        ram.put(root + 300 * 8, (kernel_l1 >> 12) << 10 | V)
    for root, l1, l0, data, value in ((0x20000, 0x30000, 0x31000, 0x32000, 111),
                                      (0x21000, 0x40000, 0x41000, 0x42000, 222)):
        ram.put(root + 1 * 8, (l1 >> 12) << 10 | V)         # VA 0x40000000 ...
        ram.put(l1, (l0 >> 12) << 10 | V)
        ram.put(l0, (data >> 12) << 10 | 0xC7 | 1 << 4)     # V R W A D U
        ram.put(data, value)
    cpu = RiscvState(satp=8 << 60 | 0x20, priv=0)
    cands = {c.root: c for c in finder.scan(ram, ram.ram_map, cpu)}
    assert set(cands) == {0x20000, 0x21000}
    assert cands[0x20000].is_current and not cands[0x21000].is_current
    assert all(c.kpti_user_copy is None and c.kpti_kernel_copy is None for c in cands.values())
    checked = finder.check(ram.read, cpu, list(cands.values()), 0x40000000, 222)
    assert checked[0].root == 0x21000 and checked[0].value_matches and checked[0].gpa == 0x42000
