"""The in-guest and host kernel modules' page-walk logs: parse them, check them, compare them.

Two formats, both from the seed lab report (and our own vm/module/gpt_dump.c, which prints the
same lines plus hex ones so nothing is lost):

* gpt_dump: a guest page walk, GVA -> GPA, printed inside the guest
  (``Value at GVA: N``, `` GPT PGD index: N``, `` GVA <9> <9> <9> <9> <12>``,
  `` NEXT_LVL_GPA(CR3)  =  <40 binary digits>  +  64 * idx``, `` 284: PGD <12> <40> <12>`` ...);
* ept_dump: an EPT walk, GPA -> HPA, printed on the host (the same layout with EPT/HPA, and for a
  2 MiB leaf a block of 12/40/12 lines: PMD, Mask1, HFN, GPA, Mask2, Offset, HPA). Our
  vm/module/slat_dump.c prints this layout for AMD's NPT ("This is NPT", nCR3) and Intel's EPT,
  4 or 5 levels, plus a "begin" line, hex lines and the line that ends a walk early (not
  present, reserved bit, misconfiguration); its logs are kind "ept_dump" with ModLog.format
  "npt" or "ept".

Real logs are damaged text: dmesg timestamps, other messages in between, CRLF, and lines cut at
the console width (80 columns), sometimes wrapped onto the next line. The parser therefore keeps,
for every number, the mask of the bits that were actually printed (``*_known_mask``); every
check and comparison works on the bits both sides know and names the ones it could not see.

Bit layout of the binary fields (as the modules print them): an entry or address split 12/40/12
is bits 63..52, 51..12, 11..0; a NEXT_LVL value is the 40 bits 51..12 (a frame number); an
address split 9/9/9/9/12 is bits 47..0 (9/9/9/9/9/12: 56..0 with five levels).

The package, by concern:

* model: the values (ModLog, LogLevel, Printed) and the bit vocabulary (bit_name, bit_ranges);
* parse: text -> ModLog (parse_log, parse_logs, parse_log_file);
* check: what a log implies about itself (check_log, implied_final, leaf_of, Finding);
* compare: a log against an outside walk or the host's HPA (compare, compare_host, Row,
  Comparison), a second-level log against the live NPT/EPT walk (compare_second_level);
* explain: a guest log and a host log joined (chain, Chain), and why indexes are equal
  (explain_shared_bits, explain_direct_map).
"""

from .check import Finding, check_log, implied_final, leaf_of, replay
from .compare import Comparison, Row, compare, compare_host, compare_second_level
from .explain import (
    DIRECT_MAP_END, DIRECT_MAP_START_L4, DIRECT_MAP_START_L5, GIB, Chain, chain,
    explain_direct_map, explain_shared_bits,
)
from .model import (
    ADDR_BITS, KINDS, LEVELS_4, LEVELS_5, PAGE_SIZES, U64, LogLevel, ModLog, Printed, bit_name,
    bit_ranges,
)
from .parse import parse_log, parse_log_file, parse_logs

__all__ = [
    "ADDR_BITS", "KINDS", "LEVELS_4", "LEVELS_5", "PAGE_SIZES", "U64", "LogLevel", "ModLog",
    "Printed", "bit_name", "bit_ranges",
    "parse_log", "parse_log_file", "parse_logs",
    "Finding", "check_log", "implied_final", "leaf_of", "replay",
    "Comparison", "Row", "compare", "compare_host", "compare_second_level",
    "Chain", "chain", "explain_direct_map", "explain_shared_bits", "GIB", "DIRECT_MAP_START_L4",
    "DIRECT_MAP_START_L5", "DIRECT_MAP_END",
]
