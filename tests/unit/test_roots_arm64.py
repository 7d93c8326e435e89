"""The aarch64 root finder (commands/roots_arm64.py) on synthetic guest RAM: process roots
found by their shape, the kernel's tables (whose linear map points at every page) left out,
lookalikes refused, and who-maps over the roots found."""

from qintrospect.commands import finder, roots_arm64
from qintrospect.machine.monitor_text import Region
from qintrospect.machine.rammap import RamMap
from qintrospect.memory.guest import PhysicalMemory
from qintrospect.paging.arm64_format import Arm64State

BASE, SIZE = 0x4000_0000, 1 << 24
TABLE, PAGE_DESC, BLOCK = 0b11, 0b11, 0b01
AF, AP_EL0 = 1 << 10, 1 << 6
TCR = 16 | 16 << 16 | 0b10 << 30 | 0b101 << 32       # 48-bit VAs both ranges, 4K granules
STATE = dict(tcr=TCR, sctlr=1, mair=0xFF, cpsr=0x3c5)


class Ram(PhysicalMemory):
    name = "test"

    def __init__(self):
        super().__init__(RamMap([Region(BASE, BASE + SIZE - 1, "ram", "mach-virt.ram", 0, 0)],
                                {}))
        self.ram = bytearray(SIZE)

    def _read(self, gpa, length):
        return bytes(self.ram[gpa - BASE:gpa - BASE + length])

    def put(self, addr, value):
        self.ram[addr - BASE:addr - BASE + 8] = value.to_bytes(8, "little")


def page(n):
    return BASE + n * 0x1000


def process(ram, root, l1, l2, l3, data, value, user=True):
    """VA 0x400000 -> data, holding value."""
    ram.put(root, l1 | TABLE)
    ram.put(l1, l2 | TABLE)
    ram.put(l2 + 2 * 8, l3 | TABLE)
    ram.put(l3, data | PAGE_DESC | AF | (AP_EL0 if user else 0))
    ram.put(data, value)


def build():
    ram = Ram()
    # the kernel (TTBR1): its last-level table maps every page of RAM, tables included
    k0, k1, k2 = page(1), page(2), page(3)
    ram.put(k0 + 256 * 8, k1 | TABLE)
    ram.put(k1, k2 | TABLE)
    for i in range(SIZE // 0x200000):
        ram.put(k2 + i * 8, page(16 + i) | TABLE)
        for j in range(512):
            pa = BASE + i * 0x200000 + j * 0x1000
            if page(16 + i) + j * 8 < BASE + SIZE:
                ram.put(page(16 + i) + j * 8, pa | PAGE_DESC | AF)
    process(ram, page(100), page(101), page(102), page(103), page(104), 111)
    process(ram, page(110), page(111), page(112), page(113), page(114), 222)
    process(ram, page(120), page(121), page(122), page(123), page(124), 333, user=False)
    # lookalikes: a table descriptor to outside RAM, an entry with bits a table keeps clear,
    # a "root" whose tree holds garbage below it
    ram.put(page(130), 0x1000 | TABLE)
    ram.put(page(131), page(104) | TABLE | 1 << 5)
    ram.put(page(132), page(133) | TABLE)
    ram.put(page(133), 0x1234_5678_9ABC_DEF2)
    return ram, k0


def test_finds_the_process_roots_and_leaves_the_kernels_tables_out():
    ram, kernel = build()
    state = Arm64State(ttbr0=page(100), ttbr1=kernel, **STATE)
    found = {c.root: c for c in finder.scan(ram, ram.ram_map, state)}
    assert set(found) == {page(100), page(110), page(120)}
    assert found[page(100)].is_current and "current TTBR0_EL1" in found[page(100)].how
    assert "EL0 pages" in found[page(110)].how
    assert "EL1 pages only" in found[page(120)].how


def test_tables_known_to_be_something_else_are_not_offered():
    """KVM's stage 2 first level is shaped like a root (finder.stage2_roots passes it)."""
    ram, kernel = build()
    state = Arm64State(ttbr0=page(100), ttbr1=kernel, **STATE)
    found = {c.root for c in finder.scan(ram, ram.ram_map, state, not_roots={page(110)})}
    assert found == {page(100), page(120)}


def test_candidates_are_checked_by_value():
    ram, kernel = build()
    state = Arm64State(ttbr0=page(100), ttbr1=kernel, **STATE)
    checked = finder.check(ram.read, state, finder.scan(ram, ram.ram_map, state), 0x400000,
                           222)
    assert checked[0].root == page(110) and checked[0].value_matches
    assert checked[0].gpa == page(114)
    assert [c.value_matches for c in checked[1:]] == [False, False]


def test_an_empty_current_ttbr0_is_still_listed():
    """A kernel thread runs with an empty TTBR0 table (Linux's reserved_pg_dir)."""
    ram, kernel = build()
    state = Arm64State(ttbr0=page(140), ttbr1=kernel, **STATE)
    found = {c.root: c for c in finder.scan(ram, ram.ram_map, state)}
    assert found[page(140)].is_current
    assert {page(100), page(110), page(120)} < set(found)


def test_without_ttbr0_walks_it_says_why():
    ram, kernel = build()
    state = Arm64State(ttbr0=page(100), ttbr1=kernel, **dict(STATE, tcr=TCR | 1 << 7))
    try:
        roots_arm64.scan(ram, ram.ram_map, state)
    except Exception as exc:            # UsageError: exit 2
        assert "EPD0" in str(exc) and type(exc).__name__ == "UsageError"
    else:
        raise AssertionError("no error")


def test_who_maps_names_the_process_page_the_kernels_linear_map_and_the_tables():
    import types
    from qintrospect.commands import whomaps
    ram, kernel = build()
    state = Arm64State(ttbr0=page(100), ttbr1=kernel, **STATE)
    session = types.SimpleNamespace(cpu=state, memory=ram, ram_map=ram.ram_map, process=None)
    roots = [c.root for c in finder.scan(ram, ram.ram_map, state)]
    w = whomaps.who_maps_gpa(session, page(114) + 0x10, roots)
    user = [(r.root, r.gva, r.level, r.half) for r in w.reaches if r.half == "user"]
    assert user == [(page(110), 0x400010, "L3", "user")]
    kernel_hits = [r for r in w.reaches if r.half == "kernel"]
    linear = 0xFFFF_8000_0000_0000 + 114 * 0x1000 + 0x10    # the kernel's L0 entry 256
    assert [(r.root, r.gva) for r in kernel_hits] == [(kernel, linear)]
    t = whomaps.who_maps_gpa(session, page(112), roots)      # process 2's L2 table
    assert [(u.root, u.level, u.half) for u in t.tables] == [(page(110), "L2", "user")]
    t = whomaps.who_maps_gpa(session, page(110), roots)      # its first table
    assert (page(110), "L0", "user") in [(u.root, u.level, u.half) for u in t.tables]


def test_crafted_memory_neither_hangs_nor_crashes():
    """A table that points at itself at every entry, and a RAM map with no RAM."""
    import pytest
    from qintrospect.errors import UsageError
    ram, kernel = build()
    for i in range(512):
        ram.put(page(150) + 8 * i, page(150) | TABLE)
    state = Arm64State(ttbr0=page(100), ttbr1=kernel, **STATE)
    found = {c.root: c for c in finder.scan(ram, ram.ram_map, state)}
    assert page(150) not in found                 # no leaf below it
    empty = Ram()
    empty.ram_map.ram = []
    with pytest.raises(UsageError, match="no RAM"):
        roots_arm64.scan(empty, empty.ram_map, state)
