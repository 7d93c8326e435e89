"""The module-log parser on realistic logs made from random walks, and on those logs damaged.

Most of this file generates logs the way the modules print them: a random but consistent walk
(GVA or GPA, root, one entry per level whose address bits are the next table, a 4 KiB, 2 MiB or
1 GiB leaf or a not-present entry, the final address and the value), printed in one of three
layouts -- the seed report's gpt_dump (tests/data/seed_gpt_dump.log), the seed's ept_dump
(tests/data/seed_ept_dump.log, with its 2 MiB block whose lines print bits 11..10 and ")"),
our own module's (vm/module/gpt_dump.c, tests/data/guest_gpt_dump*.log), and our second-level
module's (vm/module/slat_dump.c, tests/data/slat_dump_*.log: an NPT or EPT walk, 4 or 5 levels,
not-present entries, the value check) -- with or without
dmesg timestamps, other kernel messages in between, CRLF, and lines cut or wrapped at a console
width of 60 columns or more. Then:

* an undamaged log parses and gives back exactly the generated numbers, check_log finds nothing
  that disagrees, compare() against a walk of the generated tables agrees, and a guest log
  chained with a host log of the same GPA agrees on the GPA and the value;
* a log cut or wrapped at the console width gives back only true bits (whatever it keeps, it
  keeps right), and nothing disagrees (this found our module's first line, cut inside gva=,
  read as a whole address); a wrapped log knows every bit its cut twin knows, and more where
  a binary group was wrapped (the pieces are joined);
* a bit flipped in a line whose bits the log prints or implies elsewhere is found by check_log;
* a log with lines dropped, repeated, swapped, cut or with a character changed parses or raises
  ParseError (nothing else), and what parses survives check_log, to_dict (JSON), compare and
  chain.

Last, the old fuzz: random text, the data logs mangled, and lines built from the logs' words.
Example counts are kept small (the whole file runs in a few seconds) and derandomized (every
run the same); QI_FUZZ_SCALE=20 runs twenty times as many, fresh ones, for a deeper search.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from hypothesis import given, settings, strategies as st

from qintrospect.errors import ParseError
from qintrospect.modlog import (ADDR_BITS, U64, ModLog, chain, check_log, compare,
                                compare_second_level, parse_log, parse_logs)
from qintrospect.paging import CpuState, walk, walk_ept, walk_npt

DATA = Path(__file__).resolve().parent.parent / "data"
LOGS = [p.read_text() for p in sorted(DATA.glob("*.log"))]
SEED_EPT = parse_log((DATA / "seed_ept_dump.log").read_text())


def fuzz(n: int):
    """n examples, the same ones every run; QI_FUZZ_SCALE=K runs K times as many, new ones."""
    scale = int(os.environ.get("QI_FUZZ_SCALE", "1"))
    return settings(max_examples=n * scale, deadline=None, derandomize=scale == 1)


# ====================================================================== a random, consistent walk

LEVELS_4 = ("PGD", "PUD", "PMD", "PTE")
LEVELS_5 = ("PGD", "P4D", "PUD", "PMD", "PTE")
SIZES = {"PTE": 1 << 12, "PMD": 1 << 21, "PUD": 1 << 30}
EPTP_LOW = 0x5E                # WB, 4-level walk, A/D: what KVM writes (not printed by ept_dump)


@dataclass
class Level:
    name: str
    index: int
    table: int
    entry: int
    leaf: bool = False
    present: bool = True


@dataclass
class TrueWalk:
    kind: str                  # gpt_dump (GVA -> GPA) or ept_dump (GPA -> HPA)
    names: Tuple[str, ...]
    address: int
    root: int
    levels: List[Level]        # the whole walk, printed or not
    size: Optional[int]        # page size, None when not mapped
    final: Optional[int]
    value: Optional[int]
    pid: int = 0
    comm: str = ""
    page_offset_base: int = 0
    fmt: str = "ept"           # ept_dump: the table's format, "ept" or "npt" (x86 entries)

    def shift(self, name: str) -> int:
        return 12 + 9 * (len(self.names) - 1 - self.names.index(name))


def _frame(rnd: random.Random, align: int = 1 << 12, top: int = 1 << 46) -> int:
    return rnd.randrange(align, top, align)


def _x86_entry(rnd, frame, leaf, size, name):
    low = 1 | rnd.getrandbits(1) << 1 | rnd.getrandbits(1) << 2 | rnd.getrandbits(1) << 5
    low |= rnd.getrandbits(3) << 9                                   # AVL
    if leaf:
        low |= rnd.getrandbits(1) << 6 | rnd.getrandbits(1) << 8     # D, G
        low |= (1 << 7) if size > 1 << 12 else rnd.getrandbits(1) << 7   # PS, or PAT in a PTE
        if size > 1 << 12:
            low |= rnd.getrandbits(1) << 12                           # PAT of a large page
    high = rnd.getrandbits(1) << 63 | (rnd.getrandbits(7) << 52 if rnd.random() < 0.3 else 0)
    return high | frame | low


def _ept_entry(rnd, frame, leaf, size, name):
    low = 1 | rnd.getrandbits(2) << 1 | rnd.getrandbits(1) << 8 | rnd.getrandbits(1) << 11
    if leaf:
        low |= rnd.choice((0, 1, 4, 5, 6)) << 3 | rnd.getrandbits(1) << 6 | rnd.getrandbits(1) << 9
        if size > 1 << 12:
            low |= 1 << 7
    high = rnd.getrandbits(1) << 63
    return high | frame | low


def make_walk(rnd: random.Random, kind: str, n: int, leaf_name: str,
              absent: Optional[str] = None, kernel: bool = False,
              readable: bool = True, address: Optional[int] = None,
              fmt: str = "ept") -> TrueWalk:
    names = LEVELS_5 if n == 5 else LEVELS_4
    top = 12 + 9 * n                      # 48 or 57 address bits
    if address is not None:
        pass
    elif kind == "gpt_dump":
        address = rnd.getrandbits(top - 1)
        if kernel:
            address |= U64 & ~((1 << (top - 1)) - 1)                # canonical upper half
    else:
        address = rnd.getrandbits(rnd.choice((32, 40, 47)))
    root = _frame(rnd)
    entry_of = _ept_entry if kind == "ept_dump" and fmt == "ept" else _x86_entry
    levels, table, size, final = [], root, None, None
    for name in names:
        index = address >> (12 + 9 * (n - 1 - names.index(name))) & 0x1FF
        if name == absent:
            entry = rnd.choice((0, rnd.getrandbits(64) & ~1 & ~(1 << 7)))
            if kind == "ept_dump":
                entry &= ~7
            levels.append(Level(name, index, table, entry, present=False))
            break
        leaf = name == leaf_name
        page = SIZES[name] if leaf else 1 << 12
        frame = _frame(rnd, page)
        levels.append(Level(name, index, table, entry_of(rnd, frame, leaf, page, name), leaf))
        if leaf:
            size, final = page, frame | (address & (page - 1))
            break
        table = frame
    value = rnd.getrandbits(64) if final is not None and readable else None
    pob = (0xFFFF888000000000 if n == 4 else 0xFF11000000000000) + (rnd.getrandbits(8) << 30)
    return TrueWalk(kind, names, address, root, levels, size, final, value,
                    rnd.randrange(1, 1 << 22), rnd.choice(("probe", "insmod", "bash")), pob, fmt)


# ================================================================================ printing it

def bits(v: int, hi: int, lo: int) -> str:
    return "".join("1" if v >> i & 1 else "0" for i in range(hi, lo - 1, -1))


def split3(v: int) -> str:
    return f"{bits(v, 63, 52)} {bits(v, 51, 12)} {bits(v, 11, 0)}"


def lvl_index(w: TrueWalk, name: str) -> int:
    return w.address >> w.shift(name) & 0x1FF


def columns(w: TrueWalk) -> str:
    widths = (13, 10, 10, 10, 9) if len(w.names) == 5 else (13, 10, 10, 9)
    return "".join(f"{lvl_index(w, nm):>{wd}}" for nm, wd in zip(w.names, widths))


def header(w: TrueWalk, name: str) -> str:
    return f" {name} " + " ".join(f"[{nm} IDX]" for nm in w.names) + " [  Offset  ]"


# A printed line is (key, text): the key says which number the line prints ("entry", "PGD"),
# ("next", "PUD"), ("final",) ... or ("noise",) for other drivers' messages. A renderer takes a
# `tamper` {key: xor mask}: the number of that one line is printed with those bits flipped.
Line = Tuple[tuple, str]


class Printer:
    def __init__(self, tamper):
        self.tamper = tamper or {}
        self.lines: List[Line] = []

    def v(self, key, value):
        return value ^ self.tamper.get(key, 0)

    def add(self, key, text):
        self.lines.append((key, text))


def seed_gpt_lines(w: TrueWalk, rnd: random.Random, tamper=None) -> List[Line]:
    """The seed report's gpt_dump: value first, no hex, no final line; its capture stops after
    the last NEXT_LVL it kept (here: after a random number of levels)."""
    p = Printer(tamper)
    if rnd.random() < 0.5:
        p.add(("noise",), "gpt_dump: loading out-of-tree module taints kernel.")
        p.add(("noise",), "gpt_dump: module verification failed: signature and/or required "
                          "key missing - tainting kernel")
    if w.value is not None:
        p.add(("value",), f"Value at GVA: {w.value}")
    for nm in w.names:
        p.add(("index", nm), f" GPT {nm} index: {lvl_index(w, nm)}")
    p.add(("columns",), columns(w))
    p.add(("header",), header(w, "GVA"))
    a = p.v(("address",), w.address)
    p.add(("address",), " GVA " + " ".join(bits(a, w.shift(nm) + 8, w.shift(nm))
                                           for nm in w.names) + " " + bits(a, 11, 0))
    p.add(("blank",), "")
    p.add(("root",), f" NEXT_LVL_GPA(CR3)  =  {bits(p.v(('root',), w.root), 51, 12)}  +  64 * "
                     f"{lvl_index(w, w.names[0])}")
    p.add(("blank",), "")
    stop = rnd.randrange(len(w.levels) + 1)
    for i, lvl in enumerate(w.levels[:stop]):
        p.add(("entry", lvl.name), f" {lvl.index:<3}: {lvl.name} "
                                   f"{split3(p.v(('entry', lvl.name), lvl.entry))}")
        if i + 1 < len(w.levels):
            nxt = w.levels[i + 1]
            p.add(("next", lvl.name), f" NEXT_LVL_GPA({lvl.name})  =  "
                                      f"{bits(p.v(('next', lvl.name), nxt.table), 51, 12)}  +  "
                                      f"64 * {nxt.index}")
            p.add(("blank",), "")
    return p.lines


HEADER_2M = "[e.g]   [Rsvd./Ign.] [  Huge Page Number, 31 Bits  ][Ignored] [ ]"
DASHES = "-" * 65


def huge_masks(w: TrueWalk) -> Tuple[int, int, int]:
    mask2 = w.size - 1
    return ADDR_BITS & ~mask2, mask2, {1 << 21: 2, 1 << 30: 3}[w.size]


def seed_ept_lines(w: TrueWalk, rnd: random.Random, tamper=None) -> List[Line]:
    """The seed report's ept_dump; a 2 MiB / 1 GiB leaf prints the breakdown block, whose lines
    print bits 11..10 and then ")" (all the seed shows of them), then the HPA line."""
    p = Printer(tamper)
    for nm in w.names:
        p.add(("index", nm), f" EPT {nm} index: {lvl_index(w, nm)}")
    p.add(("columns",), columns(w))
    p.add(("header",), header(w, "GPA"))
    a = p.v(("address",), w.address)
    p.add(("address",), " GPA " + " ".join(bits(a, w.shift(nm) + 8, w.shift(nm))
                                           for nm in w.names) + " " + bits(a, 11, 0))
    p.add(("mark",), "This is EPT")
    p.add(("blank",), "")
    p.add(("root",), f" NEXT_LVL_HPA(EPTP) =  {bits(p.v(('root',), w.root), 51, 12)}  ")
    p.add(("blank",), "")
    for i, lvl in enumerate(w.levels):
        p.add(("entry", lvl.name), f" {lvl.index:<3}: {lvl.name} "
                                   f"{split3(p.v(('entry', lvl.name), lvl.entry))}")
        if i + 1 < len(w.levels):
            table = p.v(("next", lvl.name), w.levels[i + 1].table)
            p.add(("next", lvl.name), f" NEXT_LVL_HPA({lvl.name})  =  {bits(table, 51, 12)}  ")
            p.add(("blank",), "")
    leaf = w.levels[-1]
    if w.size and w.size > 1 << 12:
        mask1, mask2, level = huge_masks(w)

        def brk(key, label, value):
            v = p.v(key, value)
            p.add(key, f" {label:<6} {bits(v, 63, 52)} {bits(v, 51, 12)} {bits(v, 11, 10)})")
        p.add(("mark",), f"Huge Page ({'2M' if level == 2 else '1G'}) at level {level} detected!")
        p.add(("noise",), HEADER_2M)
        brk(("entry-split",), leaf.name, leaf.entry)
        brk(("mask1",), "Mask1", mask1)
        brk(("hfn",), "HFN", leaf.entry & mask1)
        p.add(("noise",), DASHES)
        brk(("address-split",), "GPA", w.address)
        brk(("mask2",), "Mask2", mask2)
        brk(("offset",), "Offset", w.address & mask2)
        p.add(("noise",), DASHES)
    if w.final is not None:
        p.add(("final",), f"HPA   {split3(p.v(('final',), w.final))}")
    if w.value is not None:
        p.add(("value",), f"Value at HPA: {w.value}")
    return p.lines


def huge_page_lines(p, w: TrueWalk, lvl, address: str, header=None) -> None:
    """Our modules' lines for a huge-page leaf (gpt_dump.c and slat_dump.c print the same,
    slat_dump with the huge-page fields named first): the entry and the address split by masks."""
    mask1, mask2, level = huge_masks(w)
    p.add(("mark",), f"Huge Page ({'2M' if level == 2 else '1G'}) at level {level} detected!")
    if header is not None:
        p.add(("noise",), header)
    for key, label, value in ((("entry-split",), lvl.name, lvl.entry),
                              (("mask1",), "Mask1", mask1),
                              (("hfn",), "HFN", lvl.entry & mask1),
                              (("noise",), None, None),
                              (("address-split",), address, w.address),
                              (("mask2",), "Mask2", mask2),
                              (("offset",), "Offset", w.address & mask2),
                              (("noise",), None, None)):
        p.add(key, " " + DASHES if label is None else f" {label:<6} {split3(p.v(key, value))}")


def ours_lines(w: TrueWalk, rnd: random.Random, tamper=None) -> List[Line]:
    """vm/module/gpt_dump.c, line for line (every line prefixed 'gpt_dump: ')."""
    p = Printer(tamper)
    p.add(("begin",), f"begin pid={w.pid} comm={w.comm} gva=0x{w.address:016x} "
                      f"levels={len(w.names)}")
    for nm in w.names:
        p.add(("index", nm), f" GPT {nm} index: {lvl_index(w, nm)}")
    p.add(("columns",), columns(w))
    p.add(("header",), header(w, "GVA"))
    a = p.v(("address",), w.address)
    p.add(("address",), " GVA " + " ".join(bits(a, w.shift(nm) + 8, w.shift(nm))
                                           for nm in w.names) + " " + bits(a, 11, 0))
    p.add(("blank",), "")
    p.add(("root-hex",), f" CR3: 0x{w.root:016x}")
    p.add(("base",), f" page_offset_base: 0x{w.page_offset_base:016x}")
    p.add(("root",), f" NEXT_LVL_GPA(CR3)  =  {bits(p.v(('root',), w.root), 51, 12)}  +  64 * "
                     f"{lvl_index(w, w.names[0])}")
    p.add(("blank",), "")
    for i, lvl in enumerate(w.levels):
        p.add(("entry", lvl.name), f" {lvl.index:<3}: {lvl.name} "
                                   f"{split3(p.v(('entry', lvl.name), lvl.entry))}")
        p.add(("entry-hex", lvl.name), f" {lvl.name} entry: 0x{lvl.entry:016x}")
        if not lvl.present:
            p.add(("mark",), f" {lvl.name} not present (entry 0x{lvl.entry:016x}): the GVA is "
                             f"not mapped")
            break
        if lvl.leaf and w.size > 1 << 12:
            huge_page_lines(p, w, lvl, "GVA")
        elif i + 1 < len(w.levels):
            nxt = w.levels[i + 1]
            p.add(("next", lvl.name), f" NEXT_LVL_GPA({lvl.name})  =  "
                                      f"{bits(p.v(('next', lvl.name), nxt.table), 51, 12)}  +  "
                                      f"64 * {nxt.index}")
            p.add(("blank",), "")
    if w.final is not None:
        p.add(("final",), f" {'GPA':<6} {split3(p.v(('final',), w.final))}")
        p.add(("final-hex",), f" GPA: 0x{w.final:016x}")
        if w.value is None:
            p.add(("mark",), "Value at GVA: unreadable (0 of 8 bytes)")
        else:
            p.add(("value",), f"Value at GVA: {w.value}")
            p.add(("value",), f"Value at GVA (hex): 0x{w.value:016x}")
    p.add(("mark",), "end")
    return [(key, "gpt_dump: " + text) for key, text in p.lines]


def slat_lines(w: TrueWalk, rnd: random.Random, tamper=None) -> List[Line]:
    """vm/module/slat_dump.c, line for line (every line prefixed 'slat_dump: ')."""
    p = Printer(tamper)
    table, root_name = w.fmt.upper(), "EPTP" if w.fmt == "ept" else "nCR3"
    n = len(w.names)
    if rnd.random() < 0.3:
        p.add(("noise",), "loading out-of-tree module taints kernel.")
    p.add(("begin",), f"begin format={w.fmt} levels={n} root=0x{w.root:016x} "
                      f"gpa=0x{w.address:016x} maxphyaddr=52")
    for nm in w.names:
        p.add(("index", nm), f" {table} {nm} index: {lvl_index(w, nm)}")
    p.add(("columns",), columns(w))
    p.add(("header",), header(w, "GPA"))
    a = p.v(("address",), w.address)
    p.add(("address",), " GPA " + " ".join(bits(a, w.shift(nm) + 8, w.shift(nm))
                                           for nm in w.names) + " " + bits(a, 11, 0))
    p.add(("mark",), f"This is {table}")
    p.add(("blank",), "")
    p.add(("address-hex",), f" GPA: 0x{w.address:016x}")
    p.add(("root-hex",), f" {root_name}: 0x{w.root:016x}")
    pad = " " * (5 - len(root_name))
    p.add(("root",), f" NEXT_LVL_HPA({root_name}){pad}=  {bits(p.v(('root',), w.root), 51, 12)}"
                     f"  +  64 * {lvl_index(w, w.names[0])}")
    p.add(("blank",), "")
    for i, lvl in enumerate(w.levels):
        p.add(("entry", lvl.name), f" {lvl.index:<3}: {lvl.name} "
                                   f"{split3(p.v(('entry', lvl.name), lvl.entry))}")
        p.add(("entry-hex", lvl.name), f" {lvl.name} entry: 0x{lvl.entry:016x}")
        p.add(("flags", lvl.name), f" {lvl.name} flags: {'R W X' if w.fmt == 'ept' else 'P RW'}")
        if not lvl.present:
            p.add(("mark",), f" {lvl.name} not present (entry 0x{lvl.entry:016x}): GPA "
                             f"0x{w.address:016x} is not mapped in this {table}")
            break
        if lvl.leaf and w.size > 1 << 12:
            huge_page_lines(p, w, lvl, "GPA", header=HEADER_2M)
        elif i + 1 < len(w.levels):
            nxt = w.levels[i + 1]
            p.add(("next", lvl.name), f" NEXT_LVL_HPA({lvl.name})  =  "
                                      f"{bits(p.v(('next', lvl.name), nxt.table), 51, 12)}  +  "
                                      f"64 * {nxt.index}")
            p.add(("blank",), "")
    if w.final is not None:
        p.add(("final",), f" {'HPA':<5} {split3(p.v(('final',), w.final))}")
        p.add(("final-hex",), f" HPA: 0x{w.final:016x}")
        if w.value is None:
            p.add(("mark",), "Value at HPA: unreadable (its frame is not in the kernel's "
                             "memory map (pfn not valid))")
        else:
            p.add(("value",), f"Value at HPA: {w.value}")
            p.add(("value",), f"Value at HPA (hex): 0x{w.value:016x}")
            if rnd.random() < 0.5:
                p.add(("expect",), f"Value check: expect=0x{w.value:016x}: equal")
    p.add(("mark",), "end")
    return [(key, "slat_dump: " + text) for key, text in p.lines]


# Other drivers' messages, as dmesg shows them between the module's lines (none starts with a
# blank, a binary digit or a module's own words).
NOISE = [
    "random: crng init done", "EXT4-fs (vda1): mounted filesystem with ordered data mode",
    "audit: type=1400 audit(1700000000.123:42): apparmor=\"STATUS\" operation=\"profile_load\"",
    "virtio_net virtio0 enp0s2: renamed from eth0", "IPv6: ADDRCONF(NETDEV_CHANGE): enp0s2: "
    "link becomes ready", "kvm: already loaded vendor module 'kvm_intel'",
    "perf: interrupt took too long (2501 > 2500), lowering kernel.perf_event_max_sample_rate",
    "systemd-journald[123]: Received client request to flush runtime journal.",
    "clocksource: tsc: mask: 0xffffffffffffffff max_cycles: 0x2b3e459bf4c",
]
LAYOUTS = {"seed-gpt": seed_gpt_lines, "seed-ept": seed_ept_lines, "ours": ours_lines,
           "slat": slat_lines}


@dataclass
class Case:
    """A generated walk and how its log is printed and damaged; rendering is deterministic."""

    walk: TrueWalk
    layout: str                # seed-gpt, seed-ept, ours, slat
    seed: int
    stamped: bool = False
    noise: int = 0             # other drivers' messages mixed in
    damage: str = "none"       # none, cut (at width), wrap (at width)
    width: Optional[int] = None
    crlf: bool = False

    def lines(self, tamper=None) -> List[Line]:
        rnd = random.Random(self.seed)
        lines = LAYOUTS[self.layout](self.walk, rnd, tamper)
        for _ in range(self.noise):
            lines.insert(rnd.randrange(len(lines) + 1), (("noise",), rnd.choice(NOISE)))
        t = rnd.uniform(1, 5000)
        out = []
        for key, text in lines:
            if self.stamped and (text or self.layout in ("ours", "slat")):  # seed: blanks bare
                t += rnd.uniform(0, 0.01)
                text = f"[{t:12.6f}] {text}"
            if self.damage == "cut":
                out.append((key, text[:self.width]))
            elif self.damage == "wrap":
                out += [(key, text[i:i + self.width])
                        for i in range(0, len(text), self.width)] or [(key, "")]
            else:
                out.append((key, text))
        return out

    def text(self, tamper=None) -> str:
        return ("\r\n" if self.crlf else "\n").join(t for _, t in self.lines(tamper))


# ============================================================================ what comes back

def known_right(label, value, mask, truth):
    if value is None:
        assert mask == 0, label
        return
    assert (value ^ truth) & mask == 0, f"{label}: {value:#x} vs {truth:#x} on mask {mask:#x}"


def assert_true_bits(log: ModLog, w: TrueWalk, exact: bool, layout: str) -> None:
    """Every bit the log says it knows is the generated one; when exact, it knows them all."""
    assert log.kind == w.kind
    assert log.paging_levels == len(w.names)
    if layout == "slat":
        assert log.format == w.fmt and log.module == "slat_dump"
    known_right("address", log.address, log.address_bits_known, w.address)
    known_right("root", log.root, log.root_known_mask, w.root)
    truth = {lvl.name: lvl for lvl in w.levels}
    for i, lvl in enumerate(log.levels):
        t = truth[lvl.name]
        assert lvl.name == w.levels[i].name
        assert lvl.index in (None, t.index), lvl.name
        known_right(f"{lvl.name} entry", lvl.entry, lvl.entry_known_mask, t.entry)
        known_right(f"{lvl.name} table", lvl.table_addr, lvl.table_known_mask, t.table)
        if lvl.next_addr is not None:
            known_right(f"{lvl.name} next", lvl.next_addr, lvl.next_known_mask,
                        w.levels[i + 1].table)
        if lvl.page_size:
            assert t.leaf and lvl.page_size == w.size
        if lvl.present is False:
            assert not t.present
    if w.final is not None:
        known_right("final", log.final_address, log.final_known_mask, w.final)
    else:
        assert log.final_address is None
    assert log.value in (None, w.value)
    if exact:
        assert log.address == w.address and log.root == w.root
        assert log.root_known_mask & ADDR_BITS == ADDR_BITS
        if layout == "ours":
            assert log.address_bits_known == U64 and log.pid == w.pid
            assert log.page_offset_base == w.page_offset_base
        if layout == "slat":
            assert log.address_bits_known == U64 and log.maxphyaddr == 52
        if layout != "seed-gpt":
            assert len(log.levels) == len(w.levels)
            assert log.final_address == w.final
            assert log.final_address is None or log.final_known_mask == U64
            assert log.value == w.value
        for lvl in log.levels:
            t = truth[lvl.name]
            assert lvl.index == t.index and lvl.table_addr in (None, t.table)
            assert lvl.entry in (None, t.entry)
            assert lvl.entry is None or lvl.entry_known_mask == U64
            if layout != "seed-gpt":     # the seed's capture may stop before a level's table
                assert lvl.table_addr == t.table and lvl.entry == t.entry


def no_disagreement(log: ModLog):
    findings = check_log(log)
    wrong = [f.message for f in findings if f.agree is False]
    assert wrong == [], wrong
    return findings


class SparseMem:
    def __init__(self, words=None):
        self.words = dict(words or {})

    def __call__(self, addr, length):
        out = bytearray()
        for a in range(addr & ~7, addr + length, 8):
            out += self.words.get(a, 0).to_bytes(8, "little")
        return bytes(out[addr & 7:(addr & 7) + length])


def outside_walk(w: TrueWalk):
    """The generated tables walked by qintrospect's own walker (what `compare` runs against)."""
    mem = SparseMem({lvl.table + 8 * lvl.index: lvl.entry for lvl in w.levels})
    if w.kind == "ept_dump" and w.fmt == "npt":
        return walk_npt(mem, w.root, w.address, len(w.names))
    if w.kind == "ept_dump":
        eptp = w.root | (EPTP_LOW if len(w.names) == 4 else EPTP_LOW + (1 << 3))
        return walk_ept(mem, eptp, w.address)
    cpu = CpuState(cr0=(1 << 31) | 1, cr3=w.root, cr4=(1 << 5) | ((len(w.names) == 5) << 12),
                   efer=(1 << 8) | (1 << 10) | (1 << 11), maxphyaddr=52)
    return walk(mem, cpu, w.address)


# ============================================================================== the strategies

@st.composite
def cases(draw, damage=None):
    layout = draw(st.sampled_from(["seed-gpt", "seed-ept", "ours", "slat"]))
    kind = "ept_dump" if layout in ("seed-ept", "slat") else "gpt_dump"
    fmt = draw(st.sampled_from(["npt", "ept"])) if layout == "slat" else "ept"
    n = draw(st.sampled_from([4, 5])) if layout in ("ours", "slat") else 4
    leaf = draw(st.sampled_from(["PTE"] if layout == "seed-gpt" else ["PTE", "PMD", "PUD"]))
    absent = draw(st.sampled_from([None, None, None] + list(LEVELS_5 if n == 5 else LEVELS_4))) \
        if layout in ("ours", "slat") else None
    seed = draw(st.integers(0, 2 ** 32))
    w = make_walk(random.Random(seed), kind, n, leaf, absent, kernel=draw(st.booleans()),
                  readable=draw(st.sampled_from([True, True, False])), fmt=fmt)
    if damage is None:
        damage = draw(st.sampled_from(["cut", "wrap"]))
    return Case(w, layout, seed, draw(st.booleans()), draw(st.integers(0, 4)), damage,
                draw(st.integers(60, 100)) if damage != "none" else None, draw(st.booleans()))


# ================================================================================== the tests

@fuzz(150)
@given(cases(damage="none"))
def test_generated_logs_give_back_their_numbers(case):
    w = case.walk
    log = parse_log(case.text(), width=None)
    assert_true_bits(log, w, exact=True, layout=case.layout)
    findings = no_disagreement(log)
    checks = {(f.check, f.agree) for f in findings}
    assert ("index", True) in checks
    if any(lvl.next_addr is not None for lvl in log.levels):
        assert ("next_addr", True) in checks
    if log.final_address is not None:
        assert ("final", True) in checks
    cmp = compare(log, outside_walk(w), value=w.value)
    assert cmp.agree, [(x.field, x.level, x.reason) for x in cmp.differences()]
    if case.layout == "slat":
        # its whole entries are replayed through the NPT/EPT walker; the live comparison adds
        # where both stopped
        assert ("walk", True) in checks
        cmp = compare_second_level(log, outside_walk(w), value=w.value)
        assert cmp.agree, [(x.field, x.level, x.reason) for x in cmp.differences()]
        assert any(r.field == "stop" for r in cmp.rows) == (w.final is None)
    # The same text read as an 80-column console capture changes no known bit.
    assert_true_bits(parse_log(case.text()), w, exact=False, layout=case.layout)


@fuzz(50)
@given(st.integers(0, 2 ** 32), st.sampled_from(["PTE", "PMD", "PUD"]),
       st.sampled_from(["PTE", "PMD"]), st.sampled_from([4, 5]), st.booleans())
def test_guest_and_host_logs_of_one_experiment_chain(seed, guest_leaf, host_leaf, n, stamped):
    rnd = random.Random(seed)
    guest = make_walk(rnd, "gpt_dump", n, guest_leaf, kernel=rnd.random() < 0.5)
    # The host walks the guest's GPA through its EPT and reads the same 8 bytes there.
    host = make_walk(rnd, "ept_dump", 4, host_leaf, address=guest.final)
    host.value = guest.value
    glog = parse_log(Case(guest, "ours", seed, stamped, 1).text(), None)
    hlog = parse_log(Case(host, "seed-ept", seed, stamped, 1).text(), None)
    assert_true_bits(hlog, host, exact=True, layout="seed-ept")
    ch = chain(glog, hlog)
    assert ch.gpa_agree is True and ch.value_agree is True
    assert ch.hpa_recomputed == host.final and ch.hpa == host.final
    json.dumps(ch.to_dict())


@fuzz(200)
@given(cases())
def test_cut_or_wrapped_logs_keep_only_true_bits(case):
    log = parse_log(case.text(), width=case.width)
    assert_true_bits(log, case.walk, exact=False, layout=case.layout)
    no_disagreement(log)


def known_masks(log: ModLog) -> dict:
    out = {"address": log.address_bits_known, "root": log.root_known_mask,
           "final": log.final_known_mask, "value": U64 if log.value is not None else 0}
    for lvl in log.levels:
        out.update({(lvl.name, "entry"): lvl.entry_known_mask,
                    (lvl.name, "next"): lvl.next_known_mask,
                    (lvl.name, "index"): 0x1FF if lvl.index is not None else 0})
    return out


@fuzz(100)
@given(cases(damage="none"), st.integers(60, 100))
def test_wrapped_lines_are_joined(case, width):
    """A console that wraps long lines loses nothing a console that cuts them keeps: the
    parser joins a wrapped line's pieces (unless a piece starts with a blank, when it reads
    like a line of its own), so it knows every bit the cut capture knows, and more."""
    cut = parse_log(Case(**{**case.__dict__, "damage": "cut", "width": width}).text(), width)
    wrapped = parse_log(Case(**{**case.__dict__, "damage": "wrap", "width": width}).text(),
                        width)
    assert_true_bits(wrapped, case.walk, exact=False, layout=case.layout)
    have, had = known_masks(wrapped), known_masks(cut)
    lost = {k: m for k, m in had.items() if m & ~have.get(k, 0)}
    assert not lost, lost
    # The seed's gpt_dump prints every number once: a binary group wrapped right before one
    # of its digits must come back with more bits than its cut twin.
    full = Case(**{**case.__dict__, "damage": "none"}).lines()
    if case.layout == "seed-gpt" and any(
            key[0] in ("entry", "next", "root", "address") and len(text) > width and
            text[width] in "01" and "+" not in text[:width + 1] for key, text in full):
        assert sum(bin(m).count("1") for m in have.values()) > \
            sum(bin(m).count("1") for m in had.values())


def checked_bits(key, case: Case) -> int:
    """The bits of the number a line prints that the log prints or implies elsewhere too, so
    that flipping one of them must make check_log find a disagreement."""
    w, ours = case.walk, case.layout in ("ours", "slat")
    seen = U64 if ours else (U64 & ~0x3FF)    # the seed's block lines show bits 11..10 only
    if key[0] == "entry":
        if ours:
            return U64                         # the hex line repeats it
        lvl = next(x for x in w.levels if x.name == key[1])
        return ADDR_BITS if not lvl.leaf else 0   # checked by NEXT_LVL; a leaf's only once
    if key[0] == "next":
        return ADDR_BITS
    if key == ("root",):
        return ADDR_BITS if ours else 0        # the CR3 hex line; the seed prints it once
    if key == ("address",):                    # the index groups, against the index lines
        return ((1 << (12 + 9 * len(w.names))) - 1) & ~0xFFF
    if key in (("mask1",), ("mask2",), ("hfn",), ("offset",), ("entry-split",)):
        return seen
    if key == ("final",):
        return U64
    if key == ("address-split",):
        return U64 if ours else 0              # the begin line's gva= repeats it
    return 0


@fuzz(150)
@given(cases(damage="none"), st.integers(0, 2 ** 32))
def test_a_flipped_bit_is_found(case, seed):
    rnd = random.Random(seed)
    keys = sorted({key for key, _ in case.lines() if checked_bits(key, case)})
    key = rnd.choice(keys)
    mask = checked_bits(key, case)
    bit = rnd.choice([b for b in range(64) if mask >> b & 1])
    log = parse_log(case.text({key: 1 << bit}), width=None)
    wrong = [f for f in check_log(log) if f.agree is False]
    assert wrong, f"bit {bit} of the {key} line flipped: nothing disagrees"


# ---------------------------------------------------------------------------- damaged text

WALK = walk(SparseMem(), CpuState(cr0=(1 << 31) | 1, cr3=0x62F9C000, cr4=1 << 5,
                                  efer=(1 << 8) | (1 << 10) | (1 << 11)), 0xFFFF8E2876653BE8)


def survives(text, width=80, outside=None, value=1772334):
    """Parse; anything but a ModLog or a ParseError fails the test. Then use the result."""
    try:
        log = parse_log(text, width)
    except ParseError as e:
        assert str(e)
        return None
    assert isinstance(log, ModLog)
    json.dumps(log.to_dict())
    for finding in check_log(log):
        json.dumps(finding.to_dict())
    json.dumps(compare(log, outside or WALK, value=value).to_dict())
    if log.kind == "gpt_dump":
        json.dumps(chain(log, SEED_EPT).to_dict())
    try:
        parse_logs(text, width)
    except ParseError:
        raise AssertionError("parse_log found a log that parse_logs did not")
    return log


@st.composite
def mutated(draw):
    case = draw(cases(damage=draw(st.sampled_from(["none", "none", "cut", "wrap"]))))
    lines = [t for _, t in case.lines()]
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "duplicate", "swap", "flip", "cut", "char"]))
        i = rnd.randrange(len(lines))
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(rnd.randrange(len(lines) + 1), lines[i])
        elif op == "swap":
            j = rnd.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "flip":
            digits = [p for p, c in enumerate(lines[i]) if c in "01"]
            if digits:
                p = rnd.choice(digits)
                lines[i] = lines[i][:p] + "10"[int(lines[i][p])] + lines[i][p + 1:]
        elif op == "cut":
            lines[i] = lines[i][:rnd.randrange(len(lines[i]) + 1)]
        elif lines[i]:
            p = rnd.randrange(len(lines[i]))
            lines[i] = lines[i][:p] + rnd.choice(" :x)(9\t-é") + lines[i][p + 1:]
    return case.walk, "\n".join(lines)


@fuzz(200)
@given(mutated(), st.sampled_from([80, None, 60]))
def test_damaged_generated_logs_parse_or_raise_parse_error(case, width):
    w, text = case
    survives(text, width, outside_walk(w), w.value)


# ------------------------------------------------------------------- the old fuzz, kept small

@fuzz(150)
@given(st.text(), st.sampled_from([80, None, 1, 40]))
def test_random_text(text, width):
    survives(text, width)


CHARS = st.sampled_from(list("01 \n\r\t:+*=()[]-x.,") + ["0x", "\x00", "é", "\u2028", "٣"])


@st.composite
def mangled(draw):
    text = draw(st.sampled_from(LOGS))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["drop", "insert", "replace", "cut", "repeat", "swap",
                                   "truncate", "crlf"]))
        n = len(text)
        i = draw(st.integers(0, max(n - 1, 0)))
        if op == "drop":
            text = text[:i] + text[i + draw(st.integers(1, 40)):]
        elif op == "insert":
            text = text[:i] + draw(st.one_of(CHARS, st.text(max_size=20))) + text[i:]
        elif op == "replace" and n:
            text = text[:i] + draw(CHARS) + text[i + 1:]
        elif op == "cut":
            w = draw(st.integers(0, 100))
            text = "\n".join(line[:w] for line in text.split("\n"))
        elif op == "repeat":
            lines = text.split("\n")
            j = draw(st.integers(0, len(lines) - 1))
            lines.insert(j, lines[draw(st.integers(0, len(lines) - 1))])
            text = "\n".join(lines)
        elif op == "swap":
            lines = text.split("\n")
            a, b = (draw(st.integers(0, len(lines) - 1)) for _ in range(2))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
        elif op == "truncate":
            text = text[:i]
        else:
            text = text.replace("\n", "\r\n")
    return text


@fuzz(150)
@given(mangled(), st.sampled_from([80, None, 60]))
def test_mangled_logs(text, width):
    survives(text, width)


LEVEL = st.sampled_from(["PGD", "P4D", "PUD", "PMD", "PTE", "CR3", "EPTP", "XYZ", ""])
NUMBER = st.one_of(st.integers(0, 600).map(str), st.integers(0, 2 ** 70).map(str),
                   st.integers(0, 2 ** 64).map(hex), st.sampled_from(["-1", "", "0x", "00"]))
BITS = st.integers(0, 70).flatmap(lambda n: st.text(alphabet="01", min_size=n, max_size=n))
SPLIT_NAME = st.sampled_from(["GVA", "GPA", "HPA", "PMD", "PUD", "Mask1", "Mask2", "HFN",
                              "Offset"])


@st.composite
def log_line(draw):
    kind = draw(st.integers(0, 12))
    lvl, num, bits_ = draw(LEVEL), draw(NUMBER), draw(BITS)
    line = [
        f"Value at {draw(st.sampled_from(['GVA', 'GPA', 'HPA']))}: {num}",
        f"Value at GVA (hex): {num}",
        f" {draw(st.sampled_from(['GPT', 'EPT']))} {lvl} index: {num}",
        " ".join(draw(st.lists(NUMBER, max_size=6))),
        f" GVA {' '.join(draw(st.lists(BITS, max_size=7)))}",
        f" NEXT_LVL_{draw(st.sampled_from(['GPA', 'HPA']))}({lvl})  =  {bits_}  +  64 * {num}",
        f" {num}: {lvl} {' '.join(draw(st.lists(BITS, max_size=4)))}",
        f" {draw(SPLIT_NAME)}    {' '.join(draw(st.lists(BITS, max_size=4)))}",
        f" {lvl} entry: {num}",
        f" {draw(st.sampled_from(['GVA', 'GPA', 'HPA', 'CR3', 'EPTP']))}: {num}",
        f"Huge Page ({num}{draw(st.sampled_from('KMGX'))}) at level {draw(NUMBER)} detected!",
        f" {lvl} not present (entry {num})",
        draw(st.sampled_from(["This is EPT", "begin pid=1 gva=0x10 levels=5", "end",
                              " page_offset_base: 0xffff888000000000", "",
                              " GVA [PGD IDX] [P4D IDX] [PUD IDX] [PMD IDX] [PTE IDX] [ Offset ]",
                              "begin pid=x gva=zz levels=9"])),
    ][kind]
    prefix = draw(st.sampled_from(["", "[  384.573240] ", "gpt_dump: ", "ept_dump: ",
                                   "[    3.0] gpt_dump: ", "<6>"]))
    return prefix + line


@fuzz(100)
@given(st.lists(log_line(), max_size=25), st.sampled_from([80, None, 30]))
def test_lines_built_from_the_log_vocabulary(lines, width):
    survives("\n".join(lines), width)
