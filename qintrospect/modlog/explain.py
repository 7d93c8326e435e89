"""Join a guest log and a host log of one experiment, and say why indexes are equal.

GVA -> GPA (the guest's gpt_dump) and GPA -> HPA (the host's ept_dump): equal PMD/PTE indexes
or offsets come from a direct-map alias (GVA = page_offset_base + GPA, a 1 GiB-aligned base),
from a large page keeping the low bits, or from chance.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..errors import UsageError
from ..paging.formats import size_name
from ..record import record
from .check import implied_final
from .model import U64, ModLog, bit_ranges, merge
from .model import hex_or_none as _h

# ------------------------------------------------------------------------- guest log + host log

@record(frozen=True)
class Chain:
    """One experiment's two logs joined: GVA (guest) -> GPA (both) -> HPA (host)."""

    gva: Optional[int]
    gva_known_mask: int
    guest_gpa: Optional[int]          # the guest log's final GPA, printed or recomputed
    guest_gpa_known_mask: int
    host_gpa: Optional[int]           # the address the host log walked
    host_gpa_known_mask: int
    hpa: Optional[int]                # as the host log printed it
    hpa_known_mask: int
    hpa_recomputed: Optional[int]     # from the host log's leaf entry and GPA
    hpa_recomputed_mask: int
    gpa_compared_mask: int
    gpa_agree: Optional[bool]         # None: no GPA bit known on both sides
    guest_value: Optional[int]
    host_value: Optional[int]
    value_agree: Optional[bool]
    notes: Tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "gva": _h(self.gva), "gva_known_mask": hex(self.gva_known_mask),
            "guest_gpa": _h(self.guest_gpa), "guest_gpa_known_mask": hex(self.guest_gpa_known_mask),
            "host_gpa": _h(self.host_gpa), "host_gpa_known_mask": hex(self.host_gpa_known_mask),
            "hpa": _h(self.hpa), "hpa_known_mask": hex(self.hpa_known_mask),
            "hpa_recomputed": _h(self.hpa_recomputed),
            "hpa_recomputed_mask": hex(self.hpa_recomputed_mask),
            "gpa_compared_mask": hex(self.gpa_compared_mask), "gpa_agree": self.gpa_agree,
            "guest_value": _h(self.guest_value), "host_value": _h(self.host_value),
            "value_agree": self.value_agree, "notes": list(self.notes),
        }


def chain(guest_log: ModLog, host_log: ModLog) -> Chain:
    """Join a gpt_dump (guest) and an ept_dump (host) log of one experiment.

    The guest's GPA is its printed final address, completed with what its leaf entry and
    GVA imply (at least the page offset); it is compared with the host log's GPA on the bits
    both know. Raises UsageError when the logs are not one gpt_dump and one ept_dump.
    """
    if guest_log.kind != "gpt_dump" or host_log.kind != "ept_dump":
        raise UsageError(f"chain() needs a gpt_dump log and an ept_dump log, in that order; "
                         f"got {guest_log.kind} and {host_log.kind}")
    notes = []
    gpa, gmask = implied_final(guest_log)
    if guest_log.final_address is not None:
        gpa, gmask = merge(guest_log.final_address, guest_log.final_known_mask, gpa, gmask)
    else:
        notes.append(f"the guest log does not print its GPA; known from its own entries and "
                     f"GVA: bits {bit_ranges(gmask)}")
    hgpa, hmask = host_log.address, host_log.address_bits_known
    both = gmask & hmask
    agree = None
    if hgpa is not None and both:
        differ = (gpa ^ hgpa) & both
        agree = not differ
        notes.append("guest GPA and host GPA: " + (
            f"agree on bits {bit_ranges(both)}" if agree else
            f"DIFFER at bit(s) {bit_ranges(differ)}: not the same page, or not one experiment"))
    hpa_c, hpa_cmask = implied_final(host_log)
    if guest_log.value is not None and host_log.value is not None:
        value_agree = guest_log.value == host_log.value
        notes.append(f"value {guest_log.value} at the GVA and {host_log.value} at the HPA: "
                     + ("the same" if value_agree else "DIFFERENT"))
    else:
        value_agree = None
    low48 = (1 << 48) - 1
    if guest_log.address is not None and hgpa is not None and hmask & low48 == low48:
        text = explain_direct_map(guest_log.address, hgpa)
        if text:
            notes.append(text)
        base = guest_log.page_offset_base
        if base is not None:
            same = (guest_log.address - hgpa) & U64 == base
            notes.append(f"the guest log prints page_offset_base {hex(base)}: GVA - host GPA "
                         + ("equals it" if same else "does not equal it"))
    if hgpa is not None and hpa_cmask == U64:
        text = explain_shared_bits(hgpa, hpa_c, "GPA", "HPA")
        if text:
            notes.append(text)
    return Chain(guest_log.address, guest_log.address_bits_known, gpa, gmask, hgpa, hmask,
                 host_log.final_address, host_log.final_known_mask, hpa_c, hpa_cmask, both,
                 agree, guest_log.value, host_log.value, value_agree, tuple(notes))


# --------------------------------------------------------------------- why indexes may be equal

GIB = 1 << 30
# Where KASLR may put page_offset_base (arch/x86/mm/kaslr.c): from __PAGE_OFFSET_BASE_L4/L5 up
# to CPU_ENTRY_AREA_BASE, in 1 GiB steps (512 GiB steps with 5-level paging).
DIRECT_MAP_START_L4 = 0xFFFF_8880_0000_0000
DIRECT_MAP_START_L5 = 0xFF11_0000_0000_0000
DIRECT_MAP_END = 0xFFFF_FE00_0000_0000


def _index_names(a: int, b: int) -> List[str]:
    """Which of PMD index, PTE index and page offset two addresses share."""
    same = []
    if (a ^ b) >> 21 & 0x1FF == 0:
        same.append("PMD index")
    if (a ^ b) >> 12 & 0x1FF == 0:
        same.append("PTE index")
    if (a ^ b) & 0xFFF == 0:
        same.append("offset")
    return same


def _the(names: List[str], verb_one: str, verb_many: str) -> str:
    """'the PTE index and the offset are' / 'the offset is'."""
    items = [f"the {n}" for n in names]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{text} {verb_one if len(items) == 1 else verb_many}"


def explain_shared_bits(a: int, b: int, a_name: str = "GPA", b_name: str = "HPA",
                        page_size: Optional[int] = None) -> Optional[str]:
    """Why two addresses share their PMD/PTE indexes or offset: shared low bits, or chance.

    page_size, when known (the leaf that maps a to b), decides which shared bits the mapping
    explains (those below the page size); without it, the longest run of shared low bits is
    read as the page that keeps them."""
    same = _index_names(a, b)
    if not same:
        return None
    x = (a ^ b) & U64
    low = 64 if not x else (x & -x).bit_length() - 1     # bits low-1..0 are equal
    text = (f"{a_name} {hex(a)} and {b_name} {hex(b)} share bits {low - 1}..0" if low
            else f"{a_name} {hex(a)} and {b_name} {hex(b)} differ in bit 0")
    kept = low if page_size is None else min(low, page_size.bit_length() - 1)
    by_bits = [n for n in same if {"offset": 12, "PTE index": 21, "PMD index": 30}[n] <= kept]
    chance = [n for n in same if n not in by_bits]
    if page_size is not None:
        text += (f" (a {size_name(page_size)} page maps them: its frame keeps the low "
                 f"{page_size.bit_length() - 1} bits"
                 + (f"; bits {low - 1}..{kept} are equal only by chance" if low > kept else "")
                 + ")")
    elif low >= 30:
        text += " (a 1 GiB mapping, or the same 1 GiB region)"
    elif low >= 21:
        text += " (as a 2 MiB page maps them: its frame keeps the low 21 bits)"
    elif low >= 12:
        text += " (as any page keeps the 12-bit offset)"
    if by_bits:
        text += f": so {_the(by_bits, 'is', 'are')} equal by construction"
    if chance:
        text += f"; {_the(chance, 'is', 'are')} equal only by chance"
    others = [n for n in ("PMD index", "PTE index", "offset") if n not in same]
    if others:
        text += f"; {_the(others, 'differs', 'differ')}"
    return text + "."


def explain_direct_map(gva: int, gpa: int) -> Optional[str]:
    """Say whether a Linux x86-64 GVA is the direct-map alias of a GPA, and what follows.

    The direct map puts GPA g at page_offset_base + g, a base KASLR places on a 1 GiB boundary:
    if (gva - gpa) is such a base, bits 29..0 of both are equal and so their PMD index, PTE
    index and offset. Otherwise equal indexes come from shared low bits or chance (see
    explain_shared_bits). None when nothing is equal and it is not a direct-map alias.
    """
    gva &= U64
    gpa &= U64
    base = (gva - gpa) & U64
    start = DIRECT_MAP_START_L4 if gva >= DIRECT_MAP_START_L4 else DIRECT_MAP_START_L5
    in_range = start <= gva < DIRECT_MAP_END and start <= base < DIRECT_MAP_END
    if in_range and not base % GIB:
        default = " (the default: memory KASLR is off)" if base == start else \
            " (placed there by KASLR)"
        text = (f"GVA {hex(gva)} = {hex(base)} + GPA {hex(gpa)}: {hex(base)} is 1 GiB-aligned and "
                f"lies in the x86-64 direct-map range [{hex(start)}, {hex(DIRECT_MAP_END)}), so "
                f"the GVA is the kernel's direct-map alias of the GPA, page_offset_base = "
                f"{hex(base)}{default}. Both share bits 29..0: the PMD index "
                f"({gva >> 21 & 0x1FF}), the PTE index ({gva >> 12 & 0x1FF}) and the offset "
                f"({hex(gva & 0xFFF)}) are equal by construction, not by coincidence")
        if not base % (1 << 39):
            text += f"; the base is 512 GiB-aligned too, so the PUD index ({gva >> 30 & 0x1FF}) " \
                    f"is equal as well"
        return text + "."
    why = ("not 1 GiB-aligned" if base % GIB else
           f"outside the direct-map range [{hex(start)}, {hex(DIRECT_MAP_END)})")
    shared = explain_shared_bits(gva, gpa, "GVA", "GPA")
    if shared is None:
        return None
    return f"GVA - GPA = {hex(base)} is {why}: not a direct-map alias. {shared}"
