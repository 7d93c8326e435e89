"""The parsers of what QEMU 7.2 prints, on text captured from a real QEMU (tests/data/qemu).

Generated text in QEMU 7.2's and 10.x's formats, and that text damaged, is in
tests/unit/test_parsers_fuzz.py.
"""

import os

import pytest
from hypothesis import given, settings, strategies as st

from qintrospect.errors import ParseError
from qintrospect.machine.rammap import RamMap
from qintrospect.connect.qmp import parse_address
from qintrospect.machine.monitor_text import parse_gpa2hva, parse_gva2gpa, parse_info_tlb, parse_mtree_flat, parse_registers
from qintrospect.errors import UsageError, MemoryReadError

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "qemu")


def data(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def test_mtree_takes_the_memory_address_space():
    regions = parse_mtree_flat(data("mtree_f_pc_7.2.txt"))
    by_start = {r.start: r for r in regions}
    ram = by_start[0x100000]
    assert (ram.end, ram.kind, ram.name, ram.offset) == (0xFFFFFFF, "ram", "pc.ram", 0x100000)
    assert by_start[0xC0000].kind == "rom" and by_start[0xC0000].name == "pc.ram"
    assert by_start[0xFED00000].name == "hpet" and not by_start[0xFED00000].is_ram
    assert by_start[0xFD000000].name == "vga.vram" and by_start[0xFD000000].is_ram
    # the I/O port space (FlatView "I/O") and the SMM view are not taken
    assert all(r.name != "dma-chan" for r in regions)
    assert len([r for r in regions if r.start == 0]) == 1


def test_ram_map_refuses_devices_and_holes():
    regions = parse_mtree_flat(data("mtree_f_pc_7.2.txt"))
    m = RamMap(regions, {0x100000: 0x7F0000100000})
    assert m.ram_at(0x200000).block == "pc.ram"
    assert m.ram_at(0x200123).hva_of(0x200123) == 0x7F0000200123
    assert m.check_readable(0x100000, 4096).block == "pc.ram"
    with pytest.raises(MemoryReadError, match="hpet"):
        m.check_readable(0xFED00000, 8)
    with pytest.raises(MemoryReadError, match="unassigned"):
        m.check_readable(0x20000000, 8)
    with pytest.raises(MemoryReadError, match="runs past the end"):
        m.check_readable(0xFFFFFF8, 16)
    # VGA low memory at 0xa0000 is i/o, between two pieces of pc.ram
    with pytest.raises(MemoryReadError, match="vga-lowmem"):
        m.check_readable(0xA0000, 8)


def test_gpa2hva():
    assert parse_gpa2hva("Host virtual address for 0x100000 (pc.ram) is 0x7f6537f00000\n") == \
        (0x100000, "pc.ram", 0x7F6537F00000)
    # hmp_gpa2hva prints the GPA with "0x%" PRIx64, so zero as "0x0" (QEMU 7.2 and 10.0, seen);
    # a plain "0" (as %#x would print it) is read too
    assert parse_gpa2hva("Host virtual address for 0x0 (pc.ram) is 0x7f97d3e00000\r\n") == \
        (0, "pc.ram", 0x7F97D3E00000)
    assert parse_gpa2hva("Host virtual address for 0 (pc.ram) is 0x7f6537e00000\n") == \
        (0, "pc.ram", 0x7F6537E00000)
    with pytest.raises(ParseError):
        parse_gpa2hva("Memory at address 0xfed00000 is not RAM\n")


def test_registers():
    regs = parse_registers(data("info_registers_7.2.txt"))
    assert regs["CR3"] == 0x28F4000 and regs["CR4"] == 0x751EB0 and regs["EFER"] == 0xD01
    assert regs["CR0"] == 0x80050033 and regs["CPL"] == 3 and regs["RIP"] == 0x40185B
    with pytest.raises(ParseError):
        parse_registers("CR0=00000011\n")


def test_gva2gpa_and_tlb():
    assert parse_gva2gpa("gpa: 0xb7e46d0\n") == 0xB7E46D0
    assert parse_gva2gpa("gpa: 0\n") == 0   # C's %#x prints zero without 0x
    assert parse_gva2gpa("Unmapped\n") is None
    lines = parse_info_tlb("0000000000400000: 000000000f6af000 X---A--U-\n"
                           "ff34110800000000: 0000000000000000 XG-DA---W\n")
    assert lines[1].va == 0xFF34110800000000 and lines[1].flags == "XG-DA---W"


@pytest.mark.parametrize("text,expected", [
    ("/run/vm/qmp.sock", "/run/vm/qmp.sock"), ("unix:/x/y", "/x/y"),
    ("127.0.0.1:1234", ("127.0.0.1", 1234)), ("tcp:localhost:4444", ("localhost", 4444)),
    ("[::1]:5", ("::1", 5)), (":1234", ("127.0.0.1", 1234)),
])
def test_addresses(text, expected):
    assert parse_address(text, "--qmp") == expected


@pytest.mark.parametrize("text", ["10.0.0.1:1234", "example.org:1", "0.0.0.0:1234"])
def test_remote_addresses_refused_without_flag(text):
    with pytest.raises(UsageError, match="--allow-remote"):
        parse_address(text, "--gdb")
    assert parse_address(text, "--gdb", allow_remote=True)[1] > 0


@pytest.mark.parametrize("text", ["127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:ab", ""])
def test_bad_addresses(text):
    with pytest.raises(UsageError):
        parse_address(text, "--gdb")


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text())
def test_parsers_raise_only_parse_error(text):
    for parser in (parse_mtree_flat, parse_gpa2hva, parse_registers, parse_gva2gpa):
        try:
            parser(text)
        except ParseError:
            pass
    parse_info_tlb(text)
