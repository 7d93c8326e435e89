"""The page cache in front of a memory adapter: whole pages, read once."""

from qintrospect.machine.rammap import RamMap
from qintrospect.memory.guest import PageCache, PhysicalMemory
from qintrospect.machine.monitor_text import Region


class Counting(PhysicalMemory):
    name = "test"

    def __init__(self):
        super().__init__(RamMap([Region(0, 0xFFFFF, "ram", "pc.ram", 0, 0)], {0: 0x7F0000000000}))
        self.calls = []

    def _read(self, gpa, length):
        self.calls.append((gpa, length))
        return bytes((gpa + i) & 0xFF for i in range(length))


def test_page_cache_reads_each_page_once():
    inner = Counting()
    cache = PageCache(inner)
    assert cache.read(0x1008, 8) == inner._read(0x1008, 8)
    inner.calls.clear()
    for off in range(0, 4096, 8):
        cache.read(0x1000 + off, 8)
    assert inner.calls == [] and cache.hits == 512
    # a read across a page boundary goes to the adapter
    assert cache.read(0x1FFC, 8) == inner._read(0x1FFC, 8)


def test_a_page_that_does_not_read_whole_is_read_exactly():
    """RAM that ends in the middle of a page, and a device after it: the cache reads what an
    uncached read reads, and an error names the address asked for, not the page."""
    import pytest
    from qintrospect.errors import MemoryReadError
    ram = RamMap([Region(0, 0x17FF, "ram", "pc.ram", 0, 0),
                  Region(0x1800, 0x1FFF, "i/o", "dev", 0, 0)], {0: 0x7F0000000000})

    class Partial(Counting):
        def __init__(self):
            PhysicalMemory.__init__(self, ram)
            self.calls = []

    inner, cache = Partial(), PageCache(Partial())
    assert cache.read(0x1008, 8) == inner.read(0x1008, 8)
    for memory in (inner, cache):
        with pytest.raises(MemoryReadError) as exc:
            memory.read(0x1808, 8)
        assert "0x1808" in str(exc.value)
