"""kallsyms: the /proc/kallsyms text parser (on this machine's own file and on crafted text)
and the decoder of the kernel's compressed tables (on tables a test encoder builds, as
scripts/kallsyms.c does, in all four address layouts; hostile variants). The real tables of
the bundled guest kernel are in test_kallsyms_real.py."""

import os
import re
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qintrospect.btf.errors import (
    AmbiguousSymbol, KallsymsError, KallsymsRestricted, SymbolNotFound,
)
from qintrospect.btf.kallsyms import Kallsyms, Symbol, decode_tables
from qintrospect.errors import AttachError, ParseError

PROC = "/proc/kallsyms"


# ---- text ------------------------------------------------------------------------------------
TEXT = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
0000000000000000 A fixed_percpu_data
ffffffff81234560 t helper
ffffffff81345670 t helper
ffffffff81456780 d same_place
ffffffff81456780 D same_place
ffffffffc0a01000 t helper\t[kvm]
ffffffffc0a02000 D vm_list\t[kvm]
ffffffffc0b03000 T svm_init\t[kvm_amd]

"""


def test_parse_text_and_look_up():
    ks = Kallsyms.parse(TEXT, "test")
    assert len(ks) == 10
    assert ks.address("_stext") == 0xFFFFFFFF81000000
    assert ks.address("vm_list") == ks.address("vm_list", "kvm") == 0xFFFFFFFFC0A02000
    assert ks.address("fixed_percpu_data") == 0
    assert ks.lookup("svm_init") == [Symbol(0xFFFFFFFFC0B03000, "T", "svm_init", "kvm_amd")]
    assert ks.address("same_place") == 0xFFFFFFFF81456780      # two entries, one address
    assert "helper" in ks and "nope" not in ks
    assert str(ks.lookup("vm_list")[0]) == "0xffffffffc0a02000 D vm_list [kvm]"


def test_duplicates_are_reported_and_module_narrows():
    ks = Kallsyms.parse(TEXT, "test")
    with pytest.raises(AmbiguousSymbol, match=r"3 symbols called 'helper' at different "
                                              r"addresses: 0xffffffff81234560 t helper; .*\[kvm\]"):
        ks.address("helper")
    assert ks.address("helper", "kvm") == 0xFFFFFFFFC0A01000
    with pytest.raises(AmbiguousSymbol):
        ks.address("helper", "vmlinux")                          # still two in the kernel
    assert len(ks.lookup("helper")) == 3 and len(ks.lookup("helper", "vmlinux")) == 2


def test_missing_symbols_say_where_they_are():
    ks = Kallsyms.parse(TEXT, "test")
    with pytest.raises(SymbolNotFound, match="no symbol 'nope'$"):
        ks.address("nope")
    with pytest.raises(SymbolNotFound, match=r"no symbol 'vm_list' in the kernel itself "
                                             r"\(there is one in kvm\)"):
        ks.address("vm_list", "vmlinux")
    with pytest.raises(SymbolNotFound, match="in module kvm_intel"):
        ks.address("vm_list", "kvm_intel")


def test_symbolize():
    ks = Kallsyms.parse(TEXT, "test")
    sym, off = ks.symbolize(0xFFFFFFFF81234570)
    assert sym.name == "helper" and off == 0x10
    assert ks.symbolize(0xFFFFFFFFC0B03001)[0].name == "svm_init"


@pytest.mark.parametrize("line, message", [
    ("ffffffff81000000 T", "is not 'ADDRESS TYPE NAME"),
    ("ffffffff81000000 TT name", "is not 'ADDRESS TYPE NAME"),
    ("zzzz T name", "address 'zzzz' is not hexadecimal"),
    ("ffffffff81000000 T name kvm", "module 'kvm' is not \\[NAME\\]"),
    ("ffffffff81000000 T name [] ", "module '\\[\\]' is not"),
    ("a b c d e", "is not 'ADDRESS"),
])
def test_malformed_text(line, message):
    with pytest.raises(KallsymsError, match="line 2: .*" + message):
        Kallsyms.parse("ffffffff81000000 T ok\n" + line + "\n")


def test_all_zero_addresses_mean_kptr_restrict():
    hidden = re.sub(r"^[0-9a-f]{16}", "0" * 16, TEXT, flags=re.M)
    with pytest.raises(KallsymsRestricted, match=r"shows every address as 0: .*"
                                                 r"kptr_restrict=.*sysctl kernel.kptr_restrict=1"):
        Kallsyms.parse(hidden, "/proc/kallsyms")
    assert issubclass(KallsymsRestricted, AttachError) and KallsymsRestricted.exit_status == 3
    assert len(Kallsyms.parse(hidden, allow_restricted=True)) == 10
    assert len(Kallsyms.parse("")) == 0


def test_unreadable_file():
    with pytest.raises(KallsymsError, match="cannot read /nonexistent"):
        Kallsyms.read("/nonexistent")
    assert issubclass(KallsymsError, ParseError)


@pytest.mark.skipif(not os.access(PROC, os.R_OK), reason="no /proc/kallsyms")
def test_this_machines_kallsyms():
    """The whole of this machine's /proc/kallsyms, against a plain reading of the same text."""
    with open(PROC) as f:
        lines = [ln.split() for ln in f.read().splitlines() if ln.strip()]
    try:
        ks = Kallsyms.read()
    except KallsymsRestricted:
        pytest.skip("addresses hidden from this user (kptr_restrict)")
    assert len(ks) == len(lines)
    want = {p[2]: int(p[0], 16) for p in lines if p[2] == "_stext"}
    assert ks.address("_stext") == want["_stext"] != 0
    by_name = {}
    for p in lines:
        by_name.setdefault(p[2], set()).add(int(p[0], 16))
    dup = next((n for n, a in by_name.items() if len(a) > 1), None)
    if dup:
        with pytest.raises(AmbiguousSymbol):
            ks.address(dup)
    modules = Counter(p[3][1:-1] for p in lines if len(p) == 4)
    for mod, count in modules.items():
        assert sum(1 for s in ks if s.module == mod) == count


# ---- the compressed tables ------------------------------------------------------------------
class Memory:
    """Sparse memory: regions placed at addresses; read() fails outside them."""

    def __init__(self):
        self.regions = []
        self.reads = 0

    def put(self, addr, data):
        self.regions.append((addr, bytes(data)))

    def read(self, addr, n):
        self.reads += 1
        for start, data in self.regions:
            if start <= addr and addr + n <= start + len(data):
                return data[addr - start:addr - start + n]
        raise ValueError(f"unmapped {addr:#x}+{n}")


def compress(entries):
    """Token table and compressed names, the way scripts/kallsyms.c builds them: codes that
    appear in the names stand for themselves, the free codes become the most frequent pairs
    (applied repeatedly, so tokens nest), each name is then the list of its codes."""
    seqs = [list(e) for e in entries]
    table = {c: bytes([c]) for s in seqs for c in s}
    free = [c for c in range(256) if c not in table]
    for code in free:
        pairs = Counter((a, b) for s in seqs for a, b in zip(s, s[1:]))
        if not pairs:
            break
        (a, b), n = pairs.most_common(1)[0]
        if n < 2:
            break
        table[code] = table[a] + table[b]
        for s in seqs:
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(code)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            s[:] = out
    tokens = [table.get(c, b"") for c in range(256)]
    return tokens, seqs


def build_tables(symbols, mode, layout="6.1", big_endian=False, base=0xFFFFFFFF82000000):
    """Place kallsyms tables for [(address, type, name)] (sorted by address) in a Memory,
    as the kernel would for `mode`; returns (memory, the vmcoreinfo-style addresses)."""
    e = ">" if big_endian else "<"
    entries = [t.encode() + n.encode() for _, t, n in symbols]
    tokens, seqs = compress(entries)
    names = b""
    for s in seqs:
        ln = len(s)
        names += bytes([ln]) if ln < 0x80 else bytes([(ln & 0x7F) | 0x80, ln >> 7])
        names += bytes(s)
    table, index = b"", []
    for tok in tokens:
        index.append(len(table))
        table += tok + b"\0"
    num = len(symbols)
    addrs = [a for a, _, _ in symbols]
    rb = None
    if mode == "absolute_percpu":
        rb = min(a for a, t, _ in symbols if t != "A")
        offsets = [a if t == "A" else rb - a - 1 for a, t, _ in symbols]
    elif mode == "relative":
        rb = min(addrs)
        offsets = [a - rb for a in addrs]
    pieces = {
        "kallsyms_num_syms": struct.pack(e + "I", num),
        "kallsyms_names": names,
        "kallsyms_token_table": table,
        "kallsyms_token_index": struct.pack(e + "256H", *index),
    }
    if rb is not None:
        pieces["kallsyms_relative_base"] = struct.pack(e + "Q", rb)
    order = ["kallsyms_offsets", "kallsyms_relative_base", "kallsyms_num_syms",
             "kallsyms_names", "kallsyms_token_table", "kallsyms_token_index"]
    if layout == "6.12":
        order = ["kallsyms_num_syms", "kallsyms_names", "kallsyms_token_table",
                 "kallsyms_token_index", "kallsyms_offsets", "kallsyms_relative_base"]
    if mode == "absolute":
        order = [n.replace("kallsyms_offsets", "kallsyms_addresses") for n in order]
    where, pos = {}, base
    for name in order:
        if name == "kallsyms_addresses":
            pieces[name] = struct.pack(f"{e}{num}Q", *addrs)
        if name == "kallsyms_offsets":
            if mode == "pc_relative":
                offsets = [a - (pos + 4 * i) for i, a in enumerate(addrs)]
            pieces[name] = struct.pack(f"{e}{num}i", *offsets)
        if name not in pieces:
            continue
        where[name] = pos
        pos += (len(pieces[name]) + 7) & ~7
    mem = Memory()
    blob = bytearray(pos - base)
    for name, addr in where.items():
        blob[addr - base:addr - base + len(pieces[name])] = pieces[name]
    mem.put(base, blob)
    return mem, where


TEXT_BASE = 0xFFFFFFFF81000000
SYMS = [(0, "A", "fixed_percpu_data"), (0x1000, "A", "cpu_debug_store"),
        (0x31980, "A", "runqueues")] + \
    [(TEXT_BASE + 0x10 * i, "Tt"[i % 2], f"func_{i}_do_something") for i in range(300)] + \
    [(TEXT_BASE + 0x100000, "T", "x" * 200),                     # a "big" symbol (6.1+)
     (TEXT_BASE + 0x100010, "T", "_etext"),
     (0xFFFFFFFF82A1AA40, "D", "init_task"), (0xFFFFFFFF82A1AA40, "D", "init_task_alias"),
     (0xFFFFFFFF83000000, "B", "__bss_stop")]
NON_PERCPU = [s for s in SYMS if s[1] != "A"]


@pytest.mark.parametrize("mode, syms", [
    ("absolute", SYMS), ("absolute_percpu", SYMS), ("relative", NON_PERCPU),
    ("pc_relative", NON_PERCPU)])
@pytest.mark.parametrize("layout", ["6.1", "6.12"])
def test_decode_every_layout(mode, syms, layout):
    mem, where = build_tables(syms, mode, layout)
    for asked in (mode, "auto"):
        ks = Kallsyms.from_tables(mem.read, where, mode=asked)
        assert ks.mode == mode
        assert [(s.address, s.type, s.name) for s in ks] == syms
        assert ks.address("x" * 200) == TEXT_BASE + 0x100000
        assert ks.address("init_task") == ks.address("init_task_alias")


def test_big_endian_tables():
    mem, where = build_tables(SYMS, "absolute_percpu", big_endian=True)
    ks = Kallsyms.from_tables(mem.read, where, byteorder="big")
    assert ks.address("runqueues") == 0x31980 and ks.address("_etext") == TEXT_BASE + 0x100010


def test_the_compressor_really_nests_tokens():
    tokens, seqs = compress([b"Tfunc_a", b"tfunc_b", b"Tfunc_c"])
    assert any(len(t) > 2 for t in tokens)
    assert max(len(s) for s in seqs) < 7


def test_check_picks_the_layout_and_refuses_a_wrong_one():
    mem, where = build_tables(NON_PERCPU, "relative")
    ks = Kallsyms.from_tables(mem.read, where, check={"init_task": 0xFFFFFFFF82A1AA40,
                                                      "not_in_kallsyms": 1})
    assert ks.mode == "relative"
    with pytest.raises(KallsymsError, match="init_task decodes to 0xffffffff82a1aa40, "
                                            "expected 0x1234"):
        Kallsyms.from_tables(mem.read, where, check={"init_task": 0x1234})
    with pytest.raises(KallsymsError, match="as absolute_percpu: init_task decodes to"):
        Kallsyms.from_tables(mem.read, where, mode="absolute_percpu",
                             check={"init_task": 0xFFFFFFFF82A1AA40})


def test_missing_table_addresses():
    mem, where = build_tables(NON_PERCPU, "relative")
    del where["kallsyms_token_index"]
    with pytest.raises(KallsymsError, match="missing: kallsyms_token_index .*since Linux 6.0"):
        Kallsyms.from_tables(mem.read, where)
    with pytest.raises(KallsymsError, match="layout 'sideways' unknown"):
        decode_tables(mem.read, build_tables(NON_PERCPU, "relative")[1], mode="sideways")
    mem, where = build_tables(NON_PERCPU, "relative")
    with pytest.raises(KallsymsError, match="needs kallsyms_addresses"):
        Kallsyms.from_tables(mem.read, where, mode="absolute")


def corrupt(where, mem, name, offset, data):
    start, blob = mem.regions[0]
    blob = bytearray(blob)
    at = where[name] - start + offset
    blob[at:at + len(data)] = data
    mem.regions[0] = (start, bytes(blob))


@pytest.mark.parametrize("name, offset, data, message", [
    ("kallsyms_num_syms", 0, struct.pack("<I", 0), "kallsyms_num_syms is 0"),
    ("kallsyms_num_syms", 0, struct.pack("<I", 0xFFFFFFFF), "not a plausible symbol count"),
    ("kallsyms_num_syms", 0, struct.pack("<I", 100000), "cannot read|has length 0"),
    ("kallsyms_names", 0, b"\x00", "symbol 0 has length 0"),
    ("kallsyms_names", 0, b"\xff\x7f", "cannot read kallsyms_names|would run past"),
    ("kallsyms_token_index", 0, struct.pack("<H", 0xFFF0), "cannot read kallsyms_token_table"),
])
def test_hostile_tables(name, offset, data, message):
    mem, where = build_tables(NON_PERCPU, "relative")
    corrupt(where, mem, name, offset, data)
    with pytest.raises(KallsymsError, match=message):
        Kallsyms.from_tables(mem.read, where)


def test_token_without_terminator():
    mem, where = build_tables(NON_PERCPU, "relative")
    start, blob = mem.regions[0]
    t = where["kallsyms_token_table"] - start
    i = where["kallsyms_token_index"] - start
    blob = bytearray(blob)
    blob[t:i] = b"A" * (i - t)                      # no NUL anywhere in the table
    mem.regions[0] = (start, bytes(blob + b"B" * 4096))
    with pytest.raises(KallsymsError, match="kallsyms token 0 .*not a short NUL-terminated"):
        Kallsyms.from_tables(mem.read, where)


def test_reader_errors_are_said_with_what_was_read():
    def read(addr, n):
        raise OSError(5, "Input/output error")
    with pytest.raises(KallsymsError, match="cannot read kallsyms_num_syms .*Input/output"):
        Kallsyms.from_tables(read, build_tables(NON_PERCPU, "relative")[1])

    def short(addr, n):
        return b"\0" * (n - 1)
    with pytest.raises(KallsymsError, match="got 3 of 4 bytes"):
        Kallsyms.from_tables(short, build_tables(NON_PERCPU, "relative")[1])


def test_names_are_read_in_chunks_up_to_an_unreadable_end():
    """The names table's end is not known: reads go by chunks and, near an unmapped page,
    shrink to what is needed."""
    syms = NON_PERCPU
    mem, where = build_tables(syms, "relative", layout="6.12")
    start, blob = mem.regions[0]
    names_end = where["kallsyms_token_table"] - start
    # cut the memory right after the names: a chunked read past them fails
    mem.regions = [(start, blob[:names_end])]
    table, index = where["kallsyms_token_table"], where["kallsyms_token_index"]
    mem.put(table, blob[table - start:])
    ks = Kallsyms.from_tables(mem.read, where)
    assert len(ks) == len(syms)


def test_only_some_names():
    ks = Kallsyms.parse(TEXT, "test", names=["helper", "vm_list", "nope", "svm_init"])
    assert sorted(s.name for s in ks) == ["helper", "helper", "helper", "svm_init", "vm_list"]
    assert ks.address("helper", "kvm") == 0xFFFFFFFFC0A01000
    assert ks.lookup("_stext") == []
    hidden = re.sub(r"^[0-9a-f]{16}", "0" * 16, TEXT, flags=re.M)
    with pytest.raises(KallsymsRestricted):
        Kallsyms.parse(hidden, names=["helper"])
    assert len(Kallsyms.parse("ffffffff81000000 T a_b\nffffffff81000010 T b\n",
                              names=["b"])) == 1


@pytest.mark.skipif(not os.access(PROC, os.R_OK), reason="no /proc/kallsyms")
def test_some_names_of_this_machine_agree_with_all():
    try:
        every = Kallsyms.read()
    except KallsymsRestricted:
        pytest.skip("addresses hidden from this user (kptr_restrict)")
    wanted = ["_stext", "_text", every.symbols[len(every) // 2].name, "no_such_symbol_here"]
    some = Kallsyms.read(names=wanted)
    for name in wanted:
        assert some.lookup(name) == every.lookup(name) or \
            sorted(some.lookup(name)) == sorted(every.lookup(name))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="0123456789abcdefxTtD [kvm]\t_\n", max_size=60), max_size=8))
def test_random_text_never_escapes(lines):
    try:
        Kallsyms.parse("\n".join(lines), allow_restricted=bool(len(lines) % 2))
    except KallsymsError:
        pass
    except KallsymsRestricted:
        pass


_TABLES = {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["absolute_percpu", "relative", "pc_relative", "absolute"]),
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                max_size=6))
def test_random_table_damage_never_escapes(mode, changes):
    if mode not in _TABLES:
        syms = SYMS if mode in ("absolute", "absolute_percpu") else NON_PERCPU
        _TABLES[mode] = build_tables(syms, mode, "6.12")
    mem, where = _TABLES[mode]
    start, blob = mem.regions[0]
    data = bytearray(blob)
    for pos, value in changes:
        data[pos % len(data)] = value
    damaged = Memory()
    damaged.put(start, data)
    try:
        Kallsyms.from_tables(damaged.read, where, check={"init_task": 0xFFFFFFFF82A1AA40})
    except KallsymsError:
        pass
