"""Whatever text it is given, the module-log parser returns a ModLog or raises ParseError.

Three sources of text: random strings; the seed's and the guest's logs mangled (characters
dropped, inserted or replaced, lines cut, repeated, swapped); and lines assembled from the
logs' own vocabulary with random numbers and bit strings of random lengths. Whatever parses
must also survive check_log, to_dict (as JSON), compare and chain.
"""

import json
from pathlib import Path

from hypothesis import given, settings, strategies as st

from qintrospect.errors import ParseError
from qintrospect.modlog import ModLog, chain, check_log, compare, parse_log, parse_logs
from qintrospect.paging import CpuState, walk

DATA = Path(__file__).resolve().parent.parent / "data"
LOGS = [p.read_text() for p in sorted(DATA.glob("*.log"))]
SEED_EPT = parse_log((DATA / "seed_ept_dump.log").read_text())
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True)


def _zero_mem(addr, length):
    return bytes(length)


WALK = walk(_zero_mem, CpuState(cr0=(1 << 31) | 1, cr3=0x62F9C000, cr4=1 << 5,
                                efer=(1 << 8) | (1 << 10) | (1 << 11)), 0xFFFF8E2876653BE8)


def survives(text, width=80):
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
    json.dumps(compare(log, WALK, value=1772334).to_dict())
    if log.kind == "gpt_dump":
        json.dumps(chain(log, SEED_EPT).to_dict())
    try:
        parse_logs(text, width)
    except ParseError:
        raise AssertionError("parse_log found a log that parse_logs did not")
    return log


@FUZZ
@given(st.text(), st.sampled_from([80, None, 1, 40]))
def test_random_text(text, width):
    survives(text, width)


# ------------------------------------------------------------------------------- mutations

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


@FUZZ
@given(mangled(), st.sampled_from([80, None, 60]))
def test_mangled_logs(text, width):
    survives(text, width)


# --------------------------------------------------------------- lines from the logs' words

LEVEL = st.sampled_from(["PGD", "P4D", "PUD", "PMD", "PTE", "CR3", "EPTP", "XYZ", ""])
NUMBER = st.one_of(st.integers(0, 600).map(str), st.integers(0, 2 ** 70).map(str),
                   st.integers(0, 2 ** 64).map(hex), st.sampled_from(["-1", "", "0x", "00"]))
BITS = st.integers(0, 70).flatmap(lambda n: st.text(alphabet="01", min_size=n, max_size=n))
SPLIT_NAME = st.sampled_from(["GVA", "GPA", "HPA", "PMD", "PUD", "Mask1", "Mask2", "HFN",
                              "Offset"])


@st.composite
def log_line(draw):
    kind = draw(st.integers(0, 12))
    lvl, num, bits = draw(LEVEL), draw(NUMBER), draw(BITS)
    line = [
        f"Value at {draw(st.sampled_from(['GVA', 'GPA', 'HPA']))}: {num}",
        f"Value at GVA (hex): {num}",
        f" {draw(st.sampled_from(['GPT', 'EPT']))} {lvl} index: {num}",
        " ".join(draw(st.lists(NUMBER, max_size=6))),
        f" GVA {' '.join(draw(st.lists(BITS, max_size=7)))}",
        f" NEXT_LVL_{draw(st.sampled_from(['GPA', 'HPA']))}({lvl})  =  {bits}  +  64 * {num}",
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


@FUZZ
@given(st.lists(log_line(), max_size=40), st.sampled_from([80, None, 30]))
def test_lines_built_from_the_log_vocabulary(lines, width):
    survives("\n".join(lines), width)
