"""The composition of nested hops (qintrospect.commands.nested), on page tables built in memory.

The live proof is tests/integration/test_nested_translate.py on the nested rig (and the real
NPT on the KVM rig). What no rig here can show is an EPT (QEMU's TCG does not emulate VT-x), so
the second-level comparison in EPT format is proven here: an outer "session" over a bytearray
holding both the inner QEMU process's page tables and an EPT for the inner VM, given and
found."""

import pytest

from qintrospect.commands import nested

from qintrospect import paging, slat
from qintrospect.errors import UsageError
from qintrospect.commands.finder import Candidate
from qintrospect.machine.rammap import RamRegion
from qintrospect.commands.translate import Translation

P, RW, US = 1, 2, 4
EPT_RWX, EPT_WB = 7, 6 << 3
CR0, CR4, EFER = 0x80010001, 0x20, 0xD00


class Ram:
    def __init__(self):
        self.b = bytearray(1 << 22)

    def put(self, addr, value):
        self.b[addr:addr + 8] = value.to_bytes(8, "little")

    def read(self, addr, n):
        return bytes(self.b[addr:addr + n])


class RamMap:
    def __init__(self, size):
        self.ram = [RamRegion(0, size - 1, "ram", "pc.ram", 0, None)]
        self.ram_bytes = size


class OuterSession:
    """What _walk_outer uses of a Session, over Ram: the walker and finder are the real ones."""

    def __init__(self, ram, root):
        self.ram, self.root = ram, root
        self.cpu = paging.CpuState(CR0, root, CR4, EFER, 40)
        self.memory = ram
        self.ram_map = RamMap(len(ram.b))

    def translate(self, gva, cr3=None):
        return next(self.translate_many([gva], cr3))

    def read_phys(self, addr, n):
        return self.ram.read(addr, n)

    def vcpu_property(self, name):
        return {"vendor": "GenuineIntel"}.get(name)   # an Intel host: EPT looked for first

    def find_cr3(self, gva, expect):
        w = paging.walk(self.ram.read, self.cpu, gva)
        value = int.from_bytes(self.ram.read(w.pa, 8), "little") if w.ok else None
        return [Candidate(self.root, "test root", maps_gva=w.ok, gpa=w.pa, value=value,
                          value_matches=value == expect)]

    def translate_many(self, addresses, cr3=None):
        cpu = paging.CpuState(CR0, cr3, CR4, EFER, 40)
        for a in addresses:
            w = paging.walk(self.ram.read, cpu, a)
            yield Translation(a, 0, cr3, w, value=self.ram.read(w.pa, 8) if w.ok else None)


def inner_hop(hva, value, gpa=0x5000):
    w = paging.Walk(0x1000, None, 0, None, (), gpa, 4096, True, True, True, None)
    return nested.Hop("L2", Translation(0x1000, 0, 0, w, hva=hva,
                                        value=value.to_bytes(8, "little")))


def outer_world(ept_target):
    """The inner QEMU process maps HVA 0x7f0000000000 to L1 GPA 0x200000 (holding the value);
    an EPT maps the inner GPA 0x5000 to ept_target."""
    ram = Ram()
    ram.put(0x10000 + 254 * 8, 0x11000 | P | RW | US)     # PML4[254] (0x7f00...)
    ram.put(0x11000, 0x12000 | P | RW | US)
    ram.put(0x12000, 0x13000 | P | RW | US)
    ram.put(0x13000, 0x200000 | P | RW | US)
    ram.put(0x200000, 0x1122334455667788)
    ram.put(0x20000, 0x21000 | EPT_RWX)                    # EPT PML4[0]
    ram.put(0x21000, 0x22000 | EPT_RWX)
    ram.put(0x22000, 0x23000 | EPT_RWX)
    ram.put(0x23000 + 5 * 8, ept_target | EPT_RWX | EPT_WB)
    return ram


@pytest.mark.parametrize("target,agree", [(0x200000, True), (0x300000, False)])
def test_given_ept_beside_the_process_tables(target, agree):
    ram = outer_world(target)
    r = nested.NestedTranslation(0x1000, [inner_hop(0x7F0000000000, 0x1122334455667788)])
    spec = slat.parse_slat(f"ept:{0x20000 | 0x18 | 6:#x}")
    nested._walk_outer(OuterSession(ram, 0x10000), [r], "L1", spec)
    hop, inner = r.hops[1], r.hops[0].translation
    assert hop.translation.gpa == 0x200000 and inner.slat.out == target
    assert inner.slat.agrees is agree and (not hop.note) == agree
    d = r.to_dict()
    assert d["hops"][0]["hpa"] == "0x200000" and d["hpa"] is None   # no host step in this test
    assert d["hops"][0]["slat"]["out"] == hex(target) and d["slat"]["format"] == "ept"
    assert d["hops"][0]["slat"]["how"] == {"method": "given"}


def test_ept_root_found_in_the_outer_vms_ram():
    """--slat auto: the EPT root is found in the outer VM's RAM, keyed by the inner GPA and
    the outer GPA the process tables give for it (and the inner root's page)."""
    ram = outer_world(0x200000)
    ram.put(0x13000 + 8, 0x201000 | P | RW | US)              # inner root page's HVA ...
    ram.put(0x23000 + 3 * 8, 0x201000 | EPT_RWX | EPT_WB)    # ... and its GPA 0x3000 in the EPT
    r = nested.NestedTranslation(0x1000, [inner_hop(0x7F0000000000, 0x1122334455667788)])
    nested._walk_outer(OuterSession(ram, 0x10000), [r], "L1", slat.SlatSpec(),
                       root_probe=(0x3000, 0x7F0000001000))
    s = r.hops[0].translation.slat
    assert (s.spec.format, s.spec.root, s.spec.depth) == ("ept", 0x20000, 4)
    assert s.how["method"] == "scan" and s.how["probes"] == [["0x3000", "0x201000"],
                                                             ["0x5000", "0x200000"]]
    assert s.agrees is True and s.out == 0x200000


def test_root_not_found_stops_the_chain():
    ram = outer_world(0x200000)
    r = nested.NestedTranslation(0x1000, [inner_hop(0x7F0000000000, 0xDEAD)])
    nested._walk_outer(OuterSession(ram, 0x10000), [r], "L1")
    assert r.hops[1].translation is None and "not found" in r.hops[1].note
    assert not r.ok and r.to_dict()["stopped"]["level"] == "L1"


def test_outer_specs_and_level_names():
    spec = nested.parse_outer("qmp=/run/l1.sock,gdb=127.0.0.1:1234,pid=42")
    assert (spec.qmp, spec.gdb, spec.pid, spec.vcpu) == ("/run/l1.sock", "127.0.0.1:1234", 42, 0)
    for bad in ("gdb=1:2", "qmp", "qmp=/x,pid=abc", "qmp=/x,foo=1"):
        with pytest.raises(UsageError):
            nested.parse_outer(bad)
    assert nested.level_names(1) == ["L2", "L1"] and nested.level_names(2) == ["L3", "L2", "L1"]
