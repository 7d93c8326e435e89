"""Find page-table roots in guest RAM without symbols.

Every process's top-level table shares the kernel half (entries 256-511) with every other (x86
4/5-level paging and riscv64 Sv39/48/57: Linux copies the kernel's entries into each), so a
4 KiB page whose upper 2 KiB equal those of the current table (CR3's, satp's) is a candidate
root (FACTS.md, "The guest's view"); aarch64's roots are found by their shape instead
(roots_arm64.py). With KPTI each process has a pair: the kernel copy at an 8 KiB
aligned address and the user copy 4 KiB above it, whose user half is the same. Candidates are
then filtered by "maps GVA" and "the 8 bytes at GVA equal VALUE" with the ordinary walker.
"""

import struct
from typing import Callable, List, Optional

from .. import paging
from ..errors import MemoryReadError, UsageError
from ..memory.host import PAGE
from ..record import record, replace

HALF = PAGE // 2
CHUNK = 4 << 20   # scan granularity: bounded memory whatever the guest's size


@record(frozen=True)
class Candidate:
    root: int
    how: str
    is_current: bool = False
    kpti_kernel_copy: Optional[int] = None   # set on a KPTI user copy
    kpti_user_copy: Optional[int] = None     # set on a KPTI kernel copy
    maps_gva: Optional[bool] = None
    gpa: Optional[int] = None
    value: Optional[int] = None
    value_matches: Optional[bool] = None

    @property
    def rank(self):
        """Best first: the value matches, then the GVA is mapped, then the current root."""
        return (self.value_matches is not True, self.maps_gva is not True, not self.is_current,
                self.kpti_kernel_copy is not None, self.root)

    def to_dict(self) -> dict:
        h = lambda v: None if v is None else f"{v:#x}"  # noqa: E731
        return {"cr3": h(self.root), "how": self.how, "is_current": self.is_current,
                "kpti_kernel_copy": h(self.kpti_kernel_copy),
                "kpti_user_copy": h(self.kpti_user_copy), "maps_gva": self.maps_gva,
                "gpa": h(self.gpa), "value": h(self.value), "value_matches": self.value_matches}


def _top_table(cpu):
    """(the current top-level table's address, the mode) where every process's top table
    holds the kernel's half: x86 4/5-level paging, riscv64 Sv39/48/57 (Linux copies the
    kernel's entries into each process's table on both)."""
    if paging.arch_of(cpu) == "riscv64":
        from ..paging.riscv_format import riscv_mode, satp_root
        mode = riscv_mode(cpu)
        if mode is None:
            raise UsageError("find-cr3 needs translation on (satp.MODE is Bare)")
        return satp_root(cpu.satp), mode
    mode = paging.paging_mode(cpu)
    if mode is None or mode.name not in ("4-level", "5-level"):
        raise UsageError(f"find-cr3 needs 4- or 5-level paging; this vCPU is in "
                         f"{mode.name if mode else 'no paging'} mode")
    return paging.cr3_root(cpu, mode)[0], mode


def fingerprint_root(read: Callable[[int, int], bytes], cpu):
    """The current top-level table (its kernel copy, under KPTI) and its upper half."""
    root, _ = _top_table(cpu)
    table = read(root, PAGE)
    if paging.is_x86(cpu) and root % (2 * PAGE) == PAGE and (
            not any(table[HALF:]) or _user_halves_match(read, root - PAGE)):
        # CR3 holds a KPTI user copy (stopped in user mode): the kernel copy is just below it.
        # The user copy's kernel half is not empty (Linux maps the entry code and the CPU
        # entry area there), but it is not the kernel's: every other user copy shares it
        root -= PAGE
        table = read(root, PAGE)
    kernel_half = table[HALF:]
    if not any(kernel_half):
        raise UsageError(f"the current page table at {root:#x} has an empty kernel half; there "
                         "is nothing to recognise other processes' tables by")
    return root, kernel_half


def stage2_roots(vm) -> set:
    """The pages of every vCPU's stage 2 first level (aarch64 with EL2; empty elsewhere), and
    of every VM the guest's own KVM holds (guestos.kvm_arm64: VTTBR_EL2 keeps only the last
    guest's root, and was seen 0 in the host's kernel)."""
    pages = {p for v in vm.vcpu_info for p in getattr(v, "stage2_root_pages", tuple)()}
    if any(getattr(v, "hcr", None) is not None for v in vm.vcpu_info):
        pages |= _kvm_stage2_roots(vm)
    return pages


def without_stage2(vm, candidates: list) -> list:
    """The candidates, less those a scan confirms are KVM/arm64 stage 2 first levels
    (stage2_scan: stage 2 leaves that a process maps as a VMM maps its VM's memory): the
    fallback when KVM's structures and VTTBR_EL2 do not name them."""
    here = vm.vcpu_info[vm.vcpu]
    if getattr(here, "hcr", None) is None or not getattr(here, "vtcr", None):
        return candidates
    from .stage2_scan import classify
    kvm = {f.root for f in classify(vm, [c.root for c in candidates], here.vtcr)}
    return [c for c in candidates if c.root not in kvm]


def _kvm_stage2_roots(vm) -> set:
    """The stage 2 first-level pages of the VMs KVM holds in the guest's kernel; nothing when
    that kernel cannot be read so (no note, no BTF, no KVM)."""
    from ..errors import QIError
    from ..record import replace
    try:
        from ..guestos import kvm_arm64, open_kernel, processes
        kernel = open_kernel(vm)
        here = vm.vcpu_info[vm.vcpu]
        vms, _ = kvm_arm64.all_vms(kernel, processes(vm, kernel).tasks)
        return {p for gvm in vms if gvm.vtcr is not None
                for p in replace(here, vttbr=gvm.vttbr, vtcr=gvm.vtcr).stage2_root_pages()}
    except (QIError, OSError, ValueError):      # (NoKvmStructures too: nothing to leave out)
        return set()


def scan(memory, ram_map, cpu, progress=None, not_roots=()) -> List[Candidate]:
    """Every RAM page whose upper half equals the current table's, streamed in CHUNK pieces
    (aarch64: roots_arm64.scan, by the tables' shape).

    Only page-aligned slots can hold a table: one 8-byte word of the kernel half is checked at
    every page of a chunk at once (numpy), and the full 2 KiB compare runs only where it
    matches. Memory adapters that can skip pages the host never touched do so. not_roots:
    tables known to be something else (aarch64: KVM's stage 2 roots, shaped like roots)."""
    if paging.arch_of(cpu) == "aarch64":
        from . import roots_arm64
        return roots_arm64.scan(memory, ram_map, cpu, progress, not_roots)
    import numpy as np
    _, kernel_half = fingerprint_root(memory.read, cpu)
    words = np.frombuffer(kernel_half, dtype="<u8")
    k = int(np.flatnonzero(words)[0])
    slot, word = HALF // 8 + k, words[k]
    found = []
    for gpa, data in ram_chunks(memory, ram_map, progress):
        qwords = np.frombuffer(data, dtype="<u8")
        for page in np.flatnonzero(qwords[slot::PAGE // 8] == word):
            off = int(page) * PAGE
            if data[off + HALF:off + PAGE] == kernel_half:
                found.append(gpa + off)
    current = _top_table(cpu)[0]
    if not paging.is_x86(cpu):          # no KPTI pairs on riscv64
        return [Candidate(r, "the current satp's table" if r == current else
                          "kernel half equals the current satp's table",
                          is_current=r == current) for r in sorted(set(found))]
    return pair_kpti(memory.read, found, current)


def ram_chunks(memory, ram_map, progress=None):
    """(gpa, bytes-like) pieces of all of the VM's RAM (not ROM views, which alias it)."""
    for region in ram_map.ram:
        if region.kind != "ram":
            continue
        start = (region.start + PAGE - 1) & ~(PAGE - 1)
        end = (region.end + 1) & ~(PAGE - 1)
        yield from _chunks(memory, start, end)
        if progress is not None:
            progress.advance(end - start)


def _chunks(memory, start: int, end: int):
    """(gpa, bytes-like) pieces of [start, end): the adapter's own scan if it has one."""
    scan_chunks = getattr(memory, "scan_chunks", None)
    if scan_chunks is not None:
        yield from scan_chunks(start, end, CHUNK)
        return
    for gpa in range(start, end, CHUNK):
        try:
            yield gpa, memory.read(gpa, min(CHUNK, end - gpa))
        except MemoryReadError:
            continue


def pair_kpti(read, roots: List[int], current: int) -> List[Candidate]:
    """Mark KPTI pairs: an 8 KiB aligned kernel copy whose next page repeats its user half.
    Linux sets NX in the kernel copy's user entries (the kernel must not run user code), so
    the halves are compared with bit 63 masked off."""
    out = []
    for root in sorted(set(roots)):
        how = ("the current CR3's table" if root == current else
               "kernel half equals the current CR3's table")
        cand = Candidate(root, how, is_current=root == current)
        if root % (2 * PAGE) == 0 and _user_halves_match(read, root):
            cand = replace(cand, kpti_user_copy=root + PAGE)
            out.append(Candidate(root + PAGE, f"KPTI user copy of {root:#x}",
                                 is_current=root + PAGE == current, kpti_kernel_copy=root))
        out.append(cand)
    return out


def _user_halves_match(read, root: int) -> bool:
    try:
        kernel_copy = read(root, HALF)
        user_copy = read(root + PAGE, HALF)
    except MemoryReadError:
        return False
    if not any(user_copy):
        return False
    nx_off = (1 << 63) - 1
    a = struct.unpack(f"<{HALF // 8}Q", kernel_copy)
    b = struct.unpack(f"<{HALF // 8}Q", user_copy)
    return all(x & nx_off == y & nx_off for x, y in zip(a, b))


def check(read, cpu, candidates: List[Candidate], gva: Optional[int],
          expect: Optional[int]) -> List[Candidate]:
    """Walk gva with each candidate; record whether it maps and what 8 bytes it finds."""
    if gva is None:
        return sorted(candidates, key=lambda c: c.rank)
    out = []
    for c in candidates:
        state = _with_root(cpu, c.root)
        walk = paging.walk(read, state, gva)
        if not walk.ok:
            out.append(replace(c, maps_gva=False))
            continue
        value = None
        try:
            value = int.from_bytes(read(walk.pa, 8), "little")
        except MemoryReadError:
            pass
        out.append(replace(c, maps_gva=True, gpa=walk.pa, value=value,
                           value_matches=None if expect is None else value == expect))
    return sorted(out, key=lambda c: c.rank)


def _with_root(cpu, root: int):
    """The vCPU's state with a candidate's root: on x86 with no PCID bits and no PAE PDPTE
    registers of the vCPU's own; on aarch64 as TTBR0_EL1; on riscv64 in satp (ASID 0)."""
    if paging.is_x86(cpu):
        return replace(cpu, cr3=root, cr4=cpu.cr4 & ~(1 << 17), pdptes=None)
    return paging.with_root(cpu, root)


def find_cr3(vm, gva: Optional[int] = None, expect: Optional[int] = None, progress=None,
             label: Optional[str] = None) -> List[Candidate]:
    """Candidate page-table roots in an attached VM's RAM (no symbols), best match first:
    those that map gva, and hold expect there, first. label: show progress on a terminal,
    under this name."""
    vm.check_open()
    vm.require_one_stage("find-cr3")
    if label is not None and progress is None:
        from ..present.progress import Progress
        progress = Progress(f"{label}: scanning guest RAM", vm.ram_map.ram_bytes)
        try:
            return find_cr3(vm, gva, expect, progress)
        finally:
            progress.close()
    candidates = without_stage2(vm, scan(vm.memory, vm.ram_map, vm.cpu, progress,
                                         stage2_roots(vm)))
    return check(vm.cached_memory().read, vm.cpu, candidates, gva, expect)
