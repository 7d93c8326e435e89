"""The parsers of QEMU's monitor output (qintrospect/qmp.py) on realistic generated text.

Each generator prints what QEMU prints, with random values, in QEMU's own formats:

* `info mtree -f`: several FlatViews in random order -- the one of AS "memory" (shared with
  "cpu-memory-N"), "cpu-smm-N", "I/O", bus-master views with "No rendered FlatView" -- whose
  lines are `  %016x-%016x (prio N, [nv-]ram|rom|romd|ramd|i/o): NAME[ @%016x][ KVM]`
  (memory.c, mtree_print_flatview);
* `info registers`: "CPU#N" then target/i386/cpu-dump.c's x86_cpu_dump_state, in its 64-bit form
  (CS64: RAX..R15, with APX R16..R31 on QEMU 10.x), its 32-bit form, and 32-bit registers with
  long-mode control registers (compatibility mode), with the FPU block and XMM/YMM/ZMM rows; one
  or several vCPUs (`info registers -a`);
* `info tlb`: `%016x: %016x XGPDACTUW` lines (target/i386/monitor.c, print_pte), "PG disabled";
* `gpa2hva`: "Host virtual address for 0x%x (NAME) is %p", or QEMU's error sentences;
* `gva2gpa`: "gpa: %#x" (zero prints as plain "0"), "Unmapped", "No cpu".

HMP text reaches QMP with CRLF line ends; both are generated. The parsers must give back the
generated values exactly. Then the text is damaged (lines dropped, repeated, swapped, cut, a
character changed): every number an undamaged line printed still comes back exactly, a damaged
line gives its value, nothing, or a ParseError, never a number the text does not hold, and
nothing raises anything but ParseError (parse_gva2gpa also returns None for "Unmapped", as
documented). Counts are small and derandomized; QI_FUZZ_SCALE=K runs K times as many, fresh.
"""

from __future__ import annotations

import os
import random
import re
from typing import Dict, List, Optional, Tuple

from hypothesis import given, settings, strategies as st

from qintrospect.errors import ParseError
from qintrospect.machine.monitor_text import Region, TlbLine, parse_gpa2hva, parse_gva2gpa, parse_info_tlb, parse_mtree_flat, parse_registers


def fuzz(n: int):
    scale = int(os.environ.get("QI_FUZZ_SCALE", "1"))
    return settings(max_examples=n * scale, deadline=None, derandomize=scale == 1)


SEEDS = st.integers(0, 2 ** 32)


def join(lines: List[str], crlf: bool) -> str:
    nl = "\r\n" if crlf else "\n"
    return nl.join(lines) + nl


# A damaged line: (text, changed). Lines that were dropped are gone; repeated or swapped lines
# are unchanged (their text is still what QEMU printed).
Lines = List[Tuple[str, bool]]


def damage(rnd: random.Random, lines: List[str], ops: int,
           where: Optional[List[int]] = None) -> Lines:
    """Drop, repeat, swap, cut or change lines (only those at indexes `where`, if given)."""
    out: Lines = [(text, False) for text in lines]
    movable = list(range(len(out))) if where is None else list(where)
    for _ in range(ops):
        if not movable:
            break
        i = rnd.choice(movable)
        op = rnd.choice(("drop", "repeat", "swap", "cut", "char", "char"))
        text, changed = out[i]
        if op == "drop":
            out[i] = None
        elif op == "repeat":
            out.insert(i, out[i])
            movable = [m + (m >= i) for m in movable] + [i]
        elif op == "swap":
            j = rnd.choice(movable)
            out[i], out[j] = out[j], out[i]
        elif op == "cut" and text:
            out[i] = (text[:rnd.randrange(len(text))], True)
        elif text:
            p = rnd.randrange(len(text))
            out[i] = (text[:p] + rnd.choice("0123456789abcdefxXG =:()@-\t[]") + text[p + 1:],
                      True)
        movable = [m for m in movable if m < len(out) and out[m] is not None]
    return [x for x in out if x is not None]


def hex_in(text: str, value: int) -> bool:
    """`value` is written in `text` as hex (with or without 0x and leading zeros)."""
    return re.search(rf"(?<![0-9a-fA-F])(?:0x)?0*{value:x}(?![0-9a-fA-F])", text,
                     re.I) is not None or (value == 0 and re.search(r"(?<![0-9a-fA-F])0", text)
                                           is not None)


# ================================================================================ info mtree -f

RAM_NAMES = ["pc.ram", "vga.vram", "pc.ram", "mem0", "ram1", "qxl.vram", "pc.ram"]
ROM_NAMES = ["pc.bios", "pc.rom", "isa-bios", "vga.rom", "kvmvapic.bin", "e1000.rom"]
IO_NAMES = ["hpet", "ioapic", "apic-msi", "vga-lowmem", "e1000-mmio", "vga ioports remapped",
            "bochs dispi interface", "qemu extended regs", "edid", "pcie-mmcfg-mmio",
            "virtio-pci-common-virtio-net", "msix-table", "tpm-crb-cmd", "fwcfg.dma"]
KIND_NAMES = {"ram": RAM_NAMES, "nv-ram": ["nvdimm0", "mem1"], "rom": ROM_NAMES + RAM_NAMES,
              "romd": ["system.flash0", "system.flash1", "pflash"],
              "ramd": ["0000:00:02.0 BAR 0 mmaps[0]", "vfio-bar2", "ivshmem.bar2"],
              "i/o": IO_NAMES}
KINDS = ["ram", "ram", "rom", "romd", "ramd", "i/o", "i/o", "i/o", "nv-ram"]


def region_line(r: Region, kvm: bool) -> str:
    line = f"  {r.start:016x}-{r.end:016x} (prio {r.priority}, {r.kind}): {r.name}"
    if r.offset:
        line += f" @{r.offset:016x}"
    if kvm and r.kind != "i/o":
        line += " KVM"
    return line


def random_regions(rnd: random.Random, n: int, top: int = 1 << 44) -> List[Region]:
    out, addr = [], 0
    for _ in range(n):
        if rnd.random() < 0.5:
            addr += rnd.choice((0x1000, 0x10000, 0x100000, 1 << 28)) * rnd.randrange(1, 16)
        kind = rnd.choice(KINDS)
        if kind == "i/o":
            size = rnd.choice((1, 2, 4, 8, 0x18, 0x100, 0x400, 0x1000, 0x100000))
        else:
            size = rnd.choice((0x1000, 0x20000, 0x40000, 0x100000, 1 << 24, 1 << 30)) \
                * rnd.randrange(1, 9)
        if addr + size > top:
            break
        offset = rnd.choice((0, 0, rnd.randrange(0, 1 << 40, 0x1000), rnd.randrange(1, 0x1000)))
        prio = rnd.choice((0, 0, 0, 1, 1, 4096, -1, 2))
        out.append(Region(addr, addr + size - 1, kind, rnd.choice(KIND_NAMES[kind]), offset,
                          prio))
        addr += size
    return out


def view(number: int, spaces: List[str], root: Optional[str], lines: List[str]) -> List[str]:
    out = [f"FlatView #{number}"]
    out += [f' AS "{name}", root: {root or "bus master container"}' for name in spaces]
    out.append(f" Root memory region: {root or '(none)'}")
    out += lines or ["  No rendered FlatView"]
    return out + [""]


def mtree_text(rnd: random.Random, memory: List[Region], kvm: bool, cpus: int
               ) -> Tuple[List[str], Tuple[int, int]]:
    """The whole `info mtree -f` text, and the line range of the "memory" view's regions."""
    views = [("memory", [f"cpu-memory-{i}" for i in range(cpus)], "system",
              [region_line(r, kvm) for r in memory])]
    if rnd.random() < 0.7:
        smm = random_regions(rnd, rnd.randrange(1, 8))
        views.append(("smm", [f"cpu-smm-{i}" for i in range(cpus)], "memory",
                      [region_line(r, kvm) for r in smm]))
    io = [Region(r.start & 0xFFFF, (r.start & 0xFFFF) + 3, "i/o", r.name, 0, 0)
          for r in random_regions(rnd, rnd.randrange(1, 10))]
    views.append(("io", ["I/O"], "io", [region_line(r, False) for r in io]))
    views.append(("bus", ["i440FX", "PIIX3", "VGA", "e1000", "piix3-ide"][:rnd.randrange(1, 6)],
                  None, []))
    rnd.shuffle(views)
    lines, span = [], (0, 0)
    for k, (what, spaces, root, body) in enumerate(views):
        names = (["memory"] + spaces) if what == "memory" else spaces
        text = view(k, names, root, body)
        if what == "memory":
            first = len(lines) + 1 + len(names) + 1
            span = (first, first + len(body))
        lines += text
    return lines, span


@st.composite
def mtrees(draw):
    rnd = random.Random(draw(SEEDS))
    memory = random_regions(rnd, draw(st.integers(1, 25)))
    kvm, crlf = draw(st.booleans()), draw(st.booleans())
    lines, span = mtree_text(rnd, memory, kvm, draw(st.integers(1, 4)))
    return rnd, memory, lines, span, crlf


@fuzz(150)
@given(mtrees())
def test_mtree_gives_back_the_memory_view(case):
    rnd, memory, lines, span, crlf = case
    assert parse_mtree_flat(join(lines, crlf)) == memory


def one_region(line: str):
    """What the parser makes of one region line on its own: [Region], [] or "bad" (a region
    that ends before it starts: the parser refuses the whole view)."""
    try:
        return parse_mtree_flat(f'FlatView #0\n AS "memory", root: system\n{line}\n')
    except ParseError as e:
        return "bad" if "end before start" in str(e) else []


@fuzz(150)
@given(mtrees(), st.integers(1, 6))
def test_mtree_damaged_region_lines(case, ops):
    rnd, memory, lines, (first, last), crlf = case
    damaged = damage(rnd, lines[first:last], ops)
    text = join(lines[:first] + [t for t, _ in damaged] + lines[last:], crlf)
    expected: List[Region] = []
    bad = False
    for line, changed in damaged:
        got = one_region(line)
        if not changed:
            assert len(got) == 1 and got[0] in memory        # an intact line: exactly its region
        if got == "bad":
            bad = True
            continue
        for r in got:
            assert hex_in(line, r.start) and hex_in(line, r.end) and hex_in(line, r.offset), line
        expected += got
    try:
        regions = parse_mtree_flat(text)
    except ParseError:
        assert bad or not expected     # a region ending before its start, or none left
        return
    assert not bad and regions == expected


@fuzz(100)
@given(mtrees(), SEEDS)
def test_mtree_damaged_headers(case, seed):
    rnd, memory, lines, (first, last), crlf = case
    rnd = random.Random(seed)
    memory_as = next(i for i, line in enumerate(lines) if line == ' AS "memory", root: system')
    # Without its AS "memory" line no view serves the memory address space: refused.
    with_out = lines[:memory_as] + lines[memory_as + 1:]
    try:
        parse_mtree_flat(join(with_out, crlf))
        raise AssertionError("a text with no AS \"memory\" was accepted")
    except ParseError:
        pass
    # Any other damage to the header lines: regions or ParseError, nothing else.
    headers = [i for i, line in enumerate(lines) if not line.startswith("  ")]
    damaged = damage(rnd, lines, rnd.randrange(1, 6), headers)
    try:
        regions = parse_mtree_flat(join([t for t, _ in damaged], crlf))
    except ParseError:
        return
    assert regions and all(isinstance(r, Region) and r.end >= r.start for r in regions)


def test_mtree_real_capture_has_crlf_and_other_views():
    """The committed QEMU 7.2 capture reads the same with LF and with its own CRLF."""
    path = os.path.join(os.path.dirname(__file__), "..", "data", "qemu", "mtree_f_pc_7.2.txt")
    with open(path, newline="") as f:
        text = f.read()
    assert "\r\n" in text
    assert parse_mtree_flat(text) == parse_mtree_flat(text.replace("\r\n", "\n"))


# ============================================================================== info registers

GPR64 = ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11",
         "R12", "R13", "R14", "R15"]
GPR32 = ["EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP", "ESP"]
SEGS = ["ES", "CS", "SS", "DS", "FS", "GS", "LDT", "TR"]
# Lines the parser skips (segment caches, descriptor tables, FPU and vector registers).
SKIPPED = ("ES =", "CS =", "SS =", "DS =", "FS =", "GS =", "LDT=", "TR ", "GDT=", "IDT=", "FPR",
           "XMM", "YMM", "ZMM", "Opmask")
REQUIRED = ("CR0", "CR3", "CR4", "EFER")


def dump_state(rnd: random.Random, cs64: bool, lma: bool, apx: bool, vec: str
               ) -> List[Tuple[str, Dict[str, int]]]:
    """One vCPU as x86_cpu_dump_state prints it (flags CPU_DUMP_FPU): each line with the
    NAME=HEX values the parser should read from it (R8/R9 are printed "R8 =": not NAME=HEX)."""
    r = rnd.getrandbits
    out: List[Tuple[str, Dict[str, int]]] = []
    cur: Dict[str, int] = {}

    def reg(name, value, width):
        cur[name] = value
        return f"{name}={value:0{width}x}"

    def emit(text):
        out.append((text, dict(cur)))
        cur.clear()
    eflags = r(22) | 2
    flags = "[" + "".join(c if eflags >> b & 1 else "-"
                          for c, b in zip("DOSZAPC", (10, 11, 7, 6, 4, 2, 0))) + "]"
    small = {"CPL": r(2), "II": r(1), "A20": r(1), "SMM": r(1), "HLT": r(1)}
    tail = " ".join(f"{k}={v}" for k, v in small.items())
    if cs64:
        regs = {n: r(64) for n in GPR64 + ([f"R{i}" for i in range(16, 32)] if apx else [])}
        names = list(regs)
        for k in range(0, len(names), 4):
            emit(" ".join(f"{n:<3}={regs[n]:016x}" if n in ("R8", "R9") else
                          reg(n, regs[n], 16) for n in names[k:k + 4]))
        line = f"{reg('RIP', r(64), 16)} {reg('RFL', eflags, 8)} {flags} {tail}"
    else:
        for k in range(0, 8, 4):
            emit(" ".join(reg(n, r(32), 8) for n in GPR32[k:k + 4]))
        line = f"{reg('EIP', r(32), 8)} {reg('EFL', eflags, 8)} {flags} {tail}"
    cur.update(small)
    emit(line)
    for seg in SEGS:
        sel, base, limit, fl = r(16), r(64 if cs64 else 32), r(32), r(32) & 0xFFFF00
        text = (f"{seg:<3}={sel:04x} {base:016x} {limit:08x} {fl:08x}" if cs64 else
                f"{seg:<3}={sel:04x} {base:08x} {limit:08x} {fl:08x}")
        if rnd.random() < 0.7:
            text += rnd.choice([" DPL=0 CS64 [-RA]", " DPL=3 DS   [-WA]", " DPL=0 LDT",
                                " DPL=0 TSS64-avl", " DPL=0 DS16 [-W-]", " DPL=0 CS32 [-R-]"])
        emit(text)
    if lma:
        emit(f"GDT=     {r(64):016x} {r(16):08x}")
        emit(f"IDT=     {r(64):016x} {r(16):08x}")
        emit(f"{reg('CR0', r(32), 8)} {reg('CR2', r(64), 16)} {reg('CR3', r(52), 16)} "
             f"{reg('CR4', r(24), 8)}")
    else:
        emit(f"GDT=     {r(32):08x} {r(16):08x}")
        emit(f"IDT=     {r(32):08x} {r(16):08x}")
        emit(f"{reg('CR0', r(32), 8)} {reg('CR2', r(32), 8)} {reg('CR3', r(32), 8)} "
             f"{reg('CR4', r(24), 8)}")
    emit(" ".join(reg(f"DR{i}", r(64), 16) for i in range(4)) + " ")
    emit(f"{reg('DR6', r(64), 16)} {reg('DR7', r(64), 16)}")
    emit(reg("EFER", r(16), 16))
    st_ = r(3)
    emit(f"{reg('FCW', r(16), 4)} {reg('FSW', r(16), 4)} [ST={st_}] {reg('FTW', r(8), 2)} "
         f"{reg('MXCSR', r(32), 8)}")
    out[-1][1]["ST"] = st_
    for i in range(0, 8, 2):
        emit(f"FPR{i}={r(64):016x} {r(16):04x} FPR{i + 1}={r(64):016x} {r(16):04x}")
    nb = 16 if cs64 else 8
    if vec == "zmm":
        for i in range(0, 8, 4):
            emit(" ".join(f"Opmask{i + k:02d}={r(64):016x}" for k in range(4)))
        for i in range(32 if cs64 else 8):
            emit(f"ZMM{i:02d}=" + " ".join(f"{r(64):016x}" for _ in range(8)))
    elif vec == "ymm":
        for i in range(nb):
            emit(f"YMM{i:02d}=" + " ".join(f"{r(64):016x}" for _ in range(4)))
    else:
        for i in range(0, nb, 2):
            emit(f"XMM{i:02d}={r(64):016x} {r(64):016x} XMM{i + 1:02d}={r(64):016x} "
                 f"{r(64):016x}")
    return out


@st.composite
def register_dumps(draw):
    """(lines, {line: its values}, the first vCPU's values, crlf)."""
    rnd = random.Random(draw(SEEDS))
    mode = draw(st.sampled_from([(True, True), (False, True), (False, False)]))
    apx = mode[0] and draw(st.booleans())
    vec = draw(st.sampled_from(["xmm", "ymm", "zmm"]))
    lines, values, first = [], {}, None
    for cpu in range(draw(st.sampled_from([1, 1, 2, 3]))):      # one vCPU, or `-a`
        dump = dump_state(rnd, *mode, apx, vec)
        lines += ["", f"CPU#{cpu}"] + [t for t, _ in dump]
        values.update({t: v for t, v in dump})
        if first is None:
            first = {k: v for _, vals in dump for k, v in vals.items()}
    return rnd, lines, values, first, draw(st.booleans())


@fuzz(150)
@given(register_dumps())
def test_registers_give_back_every_value(case):
    rnd, lines, values, expected, crlf = case
    regs = parse_registers(join(lines, crlf))
    assert {k: regs.get(k) for k in expected} == expected     # the first vCPU's, exactly
    assert "R8" not in regs and "R9" not in regs              # printed "R8 =", not NAME=HEX


def mentions(lines: Lines, name: str) -> List[Tuple[str, bool]]:
    """The lines, in order, that print NAME= outside the lines the parser skips."""
    return [(t, c) for t, c in lines
            if not t.startswith(SKIPPED) and re.search(rf"(?<![A-Za-z0-9_]){name}=", t)]


@fuzz(150)
@given(register_dumps(), st.integers(1, 6))
def test_registers_damaged(case, ops):
    rnd, lines, values, expected, crlf = case
    damaged = damage(rnd, lines, ops)
    text = join([t for t, _ in damaged], crlf)
    try:
        regs = parse_registers(text)
    except ParseError as e:
        cut = re.search(r"(\w+)= has \d+ hex digits", str(e))
        if cut:     # a value with too few digits: the first line printing it was damaged
            assert cut.group(1) in REQUIRED and mentions(damaged, cut.group(1))[0][1]
            return
        missing = re.search(r"no (\w+)=", str(e)).group(1)
        assert missing in REQUIRED and all(changed for _, changed in mentions(damaged, missing))
        return
    for name in expected:
        where = mentions(damaged, name)
        if where and not where[0][1]:          # the first line printing it is intact
            assert regs[name] == values[where[0][0]][name], (name, where[0][0])
    for name, value in regs.items():
        assert any(hex_in(t, value) for t, _ in damaged if f"{name}=" in t), name


# ==================================================================================== info tlb

def tlb_line(rnd: random.Random) -> Tuple[str, TlbLine]:
    va = rnd.getrandbits(47) & ~0xFFF
    if rnd.random() < 0.4:
        va |= 0xFFFF800000000000                              # canonical upper half
    pa = rnd.getrandbits(rnd.choice((32, 40, 46))) & ~0xFFF
    flags = "".join(c if rnd.random() < 0.5 else "-" for c in "XGPDACTUW")
    return f"{va:016x}: {pa:016x} {flags}", TlbLine(va, pa, flags)


@fuzz(100)
@given(SEEDS, st.integers(0, 200), st.booleans())
def test_info_tlb_gives_back_every_line(seed, n, crlf):
    rnd = random.Random(seed)
    made = [tlb_line(rnd) for _ in range(n)]
    assert parse_info_tlb(join([t for t, _ in made], crlf)) == [x for _, x in made]
    assert parse_info_tlb(join(["PG disabled"], crlf)) == []


@fuzz(150)
@given(SEEDS, st.integers(1, 60), st.integers(1, 8), st.booleans())
def test_info_tlb_damaged(seed, n, ops, crlf):
    rnd = random.Random(seed)
    made = dict(tlb_line(rnd) for _ in range(n))
    damaged = damage(rnd, list(made), ops)
    got = parse_info_tlb(join([t for t, _ in damaged], crlf))
    per_line = [parse_info_tlb(t) for t, _ in damaged]
    assert got == [x for lines in per_line for x in lines]        # line by line
    for (text, changed), lines in zip(damaged, per_line):
        if not changed:
            assert lines == [made[text]]
        else:
            assert len(lines) <= 1
            for x in lines:
                assert hex_in(text, x.va) and hex_in(text, x.pa) and x.flags in text


# ======================================================================= gpa2hva and gva2gpa

NOT_RAM = ["No memory is mapped at address 0x{:x}", "Memory at address 0x{:x} is not RAM"]


@st.composite
def gpa2hva_answers(draw):
    rnd = random.Random(draw(SEEDS))
    gpa = rnd.choice((0, rnd.getrandbits(32), rnd.getrandbits(46)))
    hva = rnd.getrandbits(47) or 1
    name = rnd.choice(RAM_NAMES + ROM_NAMES + ["system.flash0", "pc.ram (copy)"])
    return rnd, gpa, name, hva, draw(st.booleans())


@fuzz(100)
@given(gpa2hva_answers())
def test_gpa2hva(case):
    rnd, gpa, name, hva, crlf = case
    # hmp_gpa2hva: "0x%" HWADDR_PRIx for the GPA (so 0 is "0x0"), %p for the pointer
    text = join([f"Host virtual address for 0x{gpa:x} ({name}) is 0x{hva:x}"], crlf)
    assert parse_gpa2hva(text) == (gpa, name, hva)
    for sentence in NOT_RAM:
        try:
            parse_gpa2hva(join([sentence.format(gpa)], crlf))
            raise AssertionError("an error sentence was read as an address")
        except ParseError:
            pass


GPA2HVA = re.compile(r"Host virtual address for (0x[0-9a-fA-F]+|0) \((.*)\) is "
                     r"(0x[0-9a-fA-F]+|0)\s*")


@fuzz(150)
@given(gpa2hva_answers(), st.integers(1, 4))
def test_gpa2hva_damaged(case, ops):
    rnd, gpa, name, hva, crlf = case
    line = f"Host virtual address for 0x{gpa:x} ({name}) is 0x{hva:x}"
    damaged = damage(rnd, [line], ops)
    text = join([t for t, _ in damaged], crlf)
    try:
        got = parse_gpa2hva(text)
    except ParseError:
        assert not any(GPA2HVA.fullmatch(t) for t, _ in damaged)
        return
    g, n, h = got
    assert hex_in(text, g) and hex_in(text, h) and f"({n})" in text
    if any(not changed for _, changed in damaged):
        assert got == (gpa, name, hva) or damaged[0][1]


def gva2gpa_text(gpa: Optional[int]) -> str:
    # hmp_gva2gpa: "gpa: %#" HWADDR_PRIx; C's %#x prints zero as "0" (Python's as "0x0")
    return "Unmapped" if gpa is None else f"gpa: {gpa:#x}" if gpa else "gpa: 0"


GPAS = st.one_of(st.none(), st.just(0), st.integers(1, 0xFFF), st.integers(0, (1 << 52) - 1))


@fuzz(100)
@given(GPAS, st.booleans())
def test_gva2gpa(gpa, crlf):
    assert parse_gva2gpa(join([gva2gpa_text(gpa)], crlf)) == gpa
    try:
        parse_gva2gpa(join(["No cpu"], crlf))
        raise AssertionError("'No cpu' was read as an address")
    except ParseError:
        pass


@fuzz(200)
@given(GPAS, SEEDS, st.integers(1, 4), st.booleans())
def test_gva2gpa_damaged(gpa, seed, ops, crlf):
    rnd = random.Random(seed)
    damaged = damage(rnd, [gva2gpa_text(gpa)], ops)
    text = join([t for t, _ in damaged], crlf)
    try:
        got = parse_gva2gpa(text)
    except ParseError:
        assert not any(re.fullmatch(r"gpa: (0x[0-9a-fA-F]+|0)|Unmapped", t) for t, _ in damaged)
        return
    if got is None:
        assert "Unmapped" in text                                  # documented: None
    else:
        assert re.search(rf"^gpa: (0x0*{got:x}|0)\s*$", text, re.M | re.I), (text, got)
    if damaged and not any(changed for _, changed in damaged):
        assert got == gpa                                          # intact (maybe repeated)
