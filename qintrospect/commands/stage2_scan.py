"""KVM/arm64's stage 2 tables found in an aarch64 guest's RAM by a scan, without symbols: the
fallback when KVM's own structures do not read (no BTF; guestos.kvm_arm64 reads them when they
do) and VTTBR_EL2 names no VM (0, or only the last one loaded).

A stage 2 first level is shaped like a process's root (roots_arm64.unreferenced_tables finds
both), so the shape alone proves nothing. What proves a table is KVM's is what it maps, checked
two independent ways:
- its leaves, read in the stage 2 format VTCR_EL2 gives, carry no nG bit (bit 11 is RES0 in a
  stage 2 descriptor; Linux sets nG in every user page's descriptor, so a process's table read
  this way has it on every page), and give some access (S2AP) with a memory type KVM writes
  (MemAttr not 0b0000: a table descriptor read one level too deep has neither);
- every page it maps is a page of the VMM's own memory: KVM maps a memslot's IPA at the page
  the VMM's address space has at HVA = IPA + (userspace_addr - guest_phys_addr). So a process
  root that maps (nearly) all of its sampled pages, each at one of a few such offsets, is the
  VM's VMM, and those offsets are its memslots (the VMM's table, walked as the processor
  walks it: what /proc/VMM_PID/pagemap would say inside the guest).
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from .. import paging
from ..errors import MemoryReadError, UsageError
from ..record import record

U64 = np.uint64
PAGE = 4096
NG = 1 << 11                 # a stage 1 descriptor's nG; RES0 in a stage 2 descriptor
S2AP = 3 << 6                # a stage 2 leaf's access permissions
MEMATTR = 0xF << 2           # its memory attributes (KVM writes none that is 0b0000)
SAMPLES = 2048               # pages of a candidate stage 2 checked against each process
LEAVES_MAX = 1 << 16         # leaves read per candidate at most (a bound on crafted trees)
TABLES_MAX = 4096            # tables read per candidate at most
MATCHED = 0.9                # share of the sampled pages a VMM must map
SLOTS_MAX = 32               # offsets (memslots) a VMM may map them at


@record(frozen=True)
class Stage2Found:
    """A table in guest RAM that is KVM's stage 2 first level, with the evidence."""
    root: int
    vtcr: int                # the layout it was read in (VTCR_EL2 as the vCPU holds it)
    leaves: int              # leaves read
    mapped: int              # bytes those leaves map
    checked: int             # pages sampled from them
    matched: int             # of those, the pages the VMM maps at a memslot's offset
    vmm_root: int            # the process root (TTBR0) that maps them: the VMM's
    slots: tuple             # ((hva - ipa, pages matched, first IPA, last IPA), ...)
    complete: bool = True    # every leaf read (else the first LEAVES_MAX, or TABLES_MAX tables)

    def to_dict(self) -> dict:
        h = lambda v: f"{v:#x}"  # noqa: E731
        return {"root": h(self.root), "vtcr_el2": h(self.vtcr), "leaves": self.leaves,
                "mapped_bytes": self.mapped, "complete": self.complete,
                "pages_checked": self.checked, "pages_matched": self.matched,
                "vmm_root": h(self.vmm_root),
                "memslots": [{"hva_minus_ipa": h(d), "pages_matched": n, "first_ipa": h(lo),
                              "last_ipa": h(hi)} for d, n, lo, hi in self.slots]}


def vtcr_of(vm, vtcr: Optional[int] = None) -> int:
    """The stage 2 layout to read candidates in: `vtcr`, else the vCPU's VTCR_EL2 (KVM writes
    it per VM, from the VM's IPA size: every VM with the default size has the same)."""
    here = vm.vcpu_info[vm.vcpu]
    if getattr(here, "hcr", None) is None:
        raise UsageError("a stage 2 table needs a guest with EL2 (aarch64, -M "
                         "virt,virtualization=on) whose gdbstub shows HCR_EL2/VTCR_EL2")
    vtcr = here.vtcr if vtcr is None else vtcr
    if not vtcr:
        raise UsageError("VTCR_EL2 is 0 on this vCPU (its hypervisor has not run a guest on "
                         "it): give the layout as --vtcr HEX")
    from ..paging.arm64_stage2 import decode_vtcr
    problems = decode_vtcr(vtcr, id_aa64mmfr0=here.id_aa64mmfr0, id_aa64mmfr1=here.id_aa64mmfr1,
                           id_aa64mmfr2=here.id_aa64mmfr2)["problems"]
    if problems:
        raise UsageError(f"VTCR_EL2 {vtcr:#x} lays out no stage 2 walk: {'; '.join(problems)}")
    return vtcr


def find_stage2(vm, vtcr: Optional[int] = None, progress=None) -> List[Stage2Found]:
    """Every stage 2 first level in the attached aarch64 guest's RAM that a process's memory
    confirms (module docstring), best evidence first."""
    vm.check_open()
    if vm.stage2 is not None:
        live = vm.stage2.to_dict()["root"]
        raise UsageError(f"find-stage2 reads the host's tables, and vCPU {vm.vcpu} runs a guest "
                         f"of its hypervisor now: that guest's stage 2 root is VTTBR_EL2's "
                         f"({live}, `cpus` shows it); stop in the host to scan for the others")
    vm.require_one_stage("find-stage2")
    if paging.arch_of(vm.cpu) != "aarch64":
        raise UsageError("find-stage2 is for aarch64 guests (KVM/arm64's stage 2 tables)")
    vtcr = vtcr_of(vm, vtcr)
    from .roots_arm64 import unreferenced_tables
    tables = unreferenced_tables(vm.memory, vm.ram_map, vm.cpu, progress).tolist()
    return classify(vm, tables, vtcr)


def classify(vm, tables, vtcr: int) -> List[Stage2Found]:
    """Of `tables` (first-level addresses), those that are stage 2 first levels, confirmed by
    another of them (a process root) mapping their pages as a VMM maps its VM's memory."""
    read = vm.cached_memory().read
    here = vm.vcpu_info[vm.vcpu]
    ids = dict(id_aa64mmfr0=here.id_aa64mmfr0, id_aa64mmfr1=here.id_aa64mmfr1,
               id_aa64mmfr2=here.id_aa64mmfr2)
    from ..paging.arm64_stage2 import decode_vttbr
    shaped = {}
    for root in tables:
        # a concatenated first level is found page by page: only its first page starts one
        if root in shaped or decode_vttbr(root, vtcr, **ids).get("root") != root:
            continue
        leaves = _stage2_leaves(read, root, vtcr, ids)
        if leaves is not None:
            shaped[root] = leaves
    if not shaped:
        return []
    from ..record import replace        # (the pages of each first level, concatenated ones too)
    kvm = {page for root in shaped
           for page in replace(here, vttbr=root, vtcr=vtcr).stage2_root_pages()}
    processes = {r: _process_pages(read, vm.cpu, r) for r in tables if r not in kvm}
    found = []
    for root, (ipa, pa, size, complete) in shaped.items():
        sample_ipa, sample_pa = _sample(ipa, pa, size)
        best = None
        for proc, pages in processes.items():
            if pages is None:
                continue
            evidence = _as_vmm(sample_ipa, sample_pa, *pages)
            if evidence is not None and (best is None or evidence[0] > best[1][0]):
                best = (proc, evidence)
        if best is not None:
            proc, (matched, slots) = best
            found.append(Stage2Found(root, vtcr, len(ipa), int(size.sum()), len(sample_ipa),
                                     matched, proc, slots, complete))
    return sorted(found, key=lambda f: (-f.matched, f.root))


def _stage2_leaves(read, root: int, vtcr: int, ids: dict):
    """(IPA, PA, size, complete) of the leaves of `root` read as a stage 2 first level, or
    None when it is no such table: no leaf, or a leaf unlike KVM's (module docstring). At most
    TABLES_MAX tables and LEAVES_MAX leaves are read (complete: every leaf was): a big VM is
    judged by its first leaves, a crafted tree costs no more."""
    from ..paging.arm64_stage2 import iter_mappings_stage2
    from ..machine.arm64 import HCR_VM
    budget = [TABLES_MAX]

    def bounded(addr, n):
        budget[0] -= 1
        if budget[0] < 0:      # (the walk skips what does not read: it ends with what it has)
            raise MemoryReadError("more tables than one candidate may cost", addr)
        return read(addr, n)
    ipa, pa, size = [], [], []
    complete = True
    for m in iter_mappings_stage2(bounded, root, vtcr, hcr=HCR_VM, **ids):
        e = m.levels_entries[-1]
        if e & NG or not e & S2AP or not e & MEMATTR:
            return None
        ipa.append(m.va)
        pa.append(m.pa)
        size.append(m.size)
        if len(ipa) >= LEAVES_MAX:
            complete = False
            break
    if not ipa:
        return None
    return (np.array(ipa, U64), np.array(pa, U64), np.array(size, U64),
            complete and budget[0] >= 0)


def _process_pages(read, state, root: int):
    """(PA, VA, size) of the pages process root `root` maps as a process's (in the lower,
    TTBR0 range, with nG set as Linux sets it on every user page), sorted by PA, or None. The
    upper range is the kernel's: its linear map holds every page of RAM at one offset, and
    would match anything; a table that is not a process's has no such leaves."""
    try:
        leaves = paging.leaf_arrays(read, paging.with_root(state, root), 0, 1 << 63)
    except (MemoryReadError, UsageError):
        return None
    user = np.flatnonzero((leaves.entry & U64(NG)) != U64(0))
    if not len(user):
        return None
    order = user[np.argsort(leaves.pa[user], kind="stable")]
    return leaves.pa[order], leaves.va[order], leaves.size[order]


def _sample(ipa, pa, size):
    """Up to SAMPLES 4 KiB pages spread over the leaves: (their IPAs, their PAs)."""
    pages = (size // U64(PAGE)).astype(np.int64)
    cum = np.cumsum(pages)
    total = int(cum[-1])
    picks = np.linspace(0, total - 1, min(total, SAMPLES)).astype(np.int64)
    leaf = np.searchsorted(cum, picks, side="right")
    offset = (picks - (cum[leaf] - pages[leaf])).astype(U64) * U64(PAGE)
    return ipa[leaf] + offset, pa[leaf] + offset


def _as_vmm(sample_ipa, sample_pa, proc_pa, proc_va, proc_size):
    """(pages matched, slots) when the process maps at least MATCHED of the sampled pages,
    each at HVA = IPA + one of a few offsets (at most SLOTS_MAX, and at most one for every two
    pages matched: memslots are large and few, a mapping that merely holds the same pages is
    scattered); else None."""
    k = np.searchsorted(proc_pa, sample_pa, side="right").astype(np.int64) - 1
    inside = k >= 0
    kk = np.maximum(k, 0)
    inside &= sample_pa < proc_pa[kk] + proc_size[kk]
    if inside.sum() < MATCHED * len(sample_pa):
        return None
    delta = proc_va[kk[inside]] + (sample_pa[inside] - proc_pa[kk[inside]]) - sample_ipa[inside]
    offsets, counts = np.unique(delta, return_counts=True)
    if len(offsets) > min(SLOTS_MAX, max(1, int(inside.sum()) // 2)):
        return None
    ipas = sample_ipa[inside]
    slots = tuple((int(d), int(n), int(ipas[delta == d].min()), int(ipas[delta == d].max()))
                  for d, n in sorted(zip(offsets.tolist(), counts.tolist()),
                                     key=lambda x: (-x[1], x[0])))
    return int(inside.sum()), slots


def registers_for(vm, root: int, vtcr: Optional[int] = None):
    """The selected vCPU's registers made those of a vCPU of the VM whose stage 2 first level
    is at `root` (--stage2), with its stage 1 off: an address is then that VM's IPA, walked
    through `root` as VTCR_EL2 (given, or the vCPU's) lays it out."""
    from ..machine.arm64 import HCR_DC, HCR_TGE, HCR_VM
    from ..paging.arm64_format import SCTLR_M
    from ..paging.arm64_stage2 import decode_vttbr
    from ..record import replace
    given = vtcr is not None
    vtcr = vtcr_of(vm, vtcr)
    here = vm.vcpu_info[vm.vcpu]
    got = decode_vttbr(root, vtcr, id_aa64mmfr0=here.id_aa64mmfr0,
                       id_aa64mmfr1=here.id_aa64mmfr1, id_aa64mmfr2=here.id_aa64mmfr2)
    if got.get("root") != root:
        raise UsageError(f"--stage2 {root:#x}: not a stage 2 first level's address for VTCR_EL2 "
                         f"{vtcr:#x} ({'; '.join(got.get('problems') or ['not aligned'])})")
    if vm.ram_map.ram_at(root) is None:
        raise UsageError(f"--stage2 {root:#x} is not in the guest's RAM "
                         f"({vm.ram_map.describe(root)})")
    source = (f"--stage2 {root:#x} (given), VTCR_EL2 {vtcr:#x} "
              + ("(given)" if given else "(the vCPU's)"))
    # stage 1 off: no TTBR is read (0 says so); EL1h; a stage 2 (VM=1), no TGE, no DC
    return replace(here, ttbr0=0, ttbr1=0, sctlr=here.sctlr & ~SCTLR_M,
                   cpsr=(here.cpsr & ~0xF) | 0x5,
                   hcr=(here.hcr | HCR_VM) & ~(HCR_TGE | HCR_DC),
                   vttbr=root, vtcr=vtcr, stage2_source=source)
