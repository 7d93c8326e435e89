"""The second-level table KVM keeps on this host for an attached VM (translate --slat, who-maps
--slat, compare of a module's EPT/NPT log): the root given, or read from KVM's own vCPU
(slat.kvm_vcpu), or found by a scan of this host's memory (slat.SecondLevel.resolve), over
/proc/kcore; then each translation's GPA walked through it."""

from __future__ import annotations

import itertools

from .. import paging, slat
from ..errors import UsageError
from ..machine import hostcpu
from ..memory.identity import held_pages

TIE_PROBES = 64           # more probes for second-level roots that tie
CHUNK = 4096              # translations taken at a time by with_second_level


def second_level(vm, spec, translations=(), progress=None, pairs=()) -> slat.SecondLevel:
    """This VM's second-level table: the root given; or (auto) the root KVM's own vCPU holds,
    else, saying why, one found by a scan keyed by the pagemap path's answers for the vCPU's
    page-table root and the translations given (and the (GPA, host address) pairs given).
    spec: a SlatSpec or its text ("auto", ...)."""
    from ..memory.kcore import KcoreMemory
    if paging.arch_of(vm.cpu) == "aarch64":
        raise UsageError("--slat reads this host's own KVM tables for an x86 guest; on an "
                         "aarch64 guest running KVM, its guest's stage 2 is walked without it: "
                         "stopped inside that guest (VTTBR_EL2 live), or from the host with "
                         "--kvm-vcpu PID (KVM's structures) or --stage2 ROOT (find-stage2)")
    vm.require_x86("--slat")
    vm.check_open()
    if isinstance(spec, str):      # "auto", "npt:0x...", "ept:0x..." as on the command line
        spec = slat.parse_slat(spec)
    if vm.process is None:
        raise UsageError("--slat on this host needs the VM's QEMU to be local: "
                         + vm.process_note)
    if not vm.kvm_enabled:
        raise UsageError("--slat: this VM does not run under KVM (QMP query-kvm), so no "
                         "hypervisor keeps a second-level table for it on this host; for a "
                         "VM inside another VM, use --outer")
    memory = KcoreMemory()
    probes = [host_probe(vm, vm.vcpu_info[vm.vcpu].root)]
    probes += [(t.gpa, t.hpa) for t in translations if t.ok and t.hpa is not None]
    probes += list(pairs)
    second = why = None
    if spec.auto and spec.source in ("auto", "kvm"):
        second, why = _from_kvm(vm, memory, probes)
        if second is None and spec.source == "kvm":
            from ..slat.kvm_vcpu import Unavailable
            raise Unavailable(f"--slat kvm: {why}")
    if second is None:
        # the VM's own RAM (its QEMU's pages) holds none of the hypervisor's tables: not read
        skip = guest_frames(vm) if spec.auto else []
        if progress is not None and spec.auto:
            progress.total = memory.scan_bytes(skip)
        second = slat.SecondLevel.resolve(memory, memory.scan_chunks(skip=skip), spec,
                                          probes, hostcpu.slat_formats(), progress,
                                          lambda: spread_probes(vm))
        if spec.auto:
            second.how["guest_ram_skipped"] = sum(b - a for a, b in skip)
        if why is not None:
            second.how["fell_back"] = why
    if second.spec is not None and second.spec.format == "npt":
        second.page1gb = hostcpu.page1gb()    # NPT walks with this host CPU's paging
    second.maxphyaddr = hostcpu.phys_bits()
    second.device = vm.device_region
    return second


GUEST_FRAMES_CHUNK = 1 << 16      # pagemap entries read at a time


def guest_frames(vm):
    """The host-physical ranges [start, end) of the VM's RAM that its QEMU process holds now
    (its pagemap), sorted and merged: KVM's second-level tables are kernel pages, never the
    guest's own, so a scan for them need not read these. [] when the pagemap does not read
    (frames hidden: not root)."""
    import numpy as np
    from ..memory.host import PAGE
    pfns = []
    try:
        for r in vm.ram_map.ram:
            if r.kind != "ram" or r.hva is None:
                continue
            pages = (r.end + 1 - r.start) // PAGE
            for at in range(0, pages, GUEST_FRAMES_CHUNK):
                n = min(GUEST_FRAMES_CHUNK, pages - at)
                e = np.array(vm.process.pagemap_entries(r.hva + at * PAGE, n), np.uint64)
                present = (e >> np.uint64(63)) & np.uint64(1) == 1
                pfns.append(e[present] & np.uint64((1 << 55) - 1))
    except OSError:
        return []
    if not pfns:
        return []
    pfn = np.unique(np.concatenate(pfns))
    pfn = pfn[pfn != 0]                          # (hidden frames read as 0)
    if not len(pfn):
        return []
    breaks = np.flatnonzero(np.diff(pfn) != 1) + 1
    starts = np.concatenate(([pfn[0]], pfn[breaks]))
    ends = np.concatenate((pfn[breaks - 1], [pfn[-1]])) + np.uint64(1)
    return [(int(a) * PAGE, int(b) * PAGE) for a, b in zip(starts, ends)]


def _from_kvm(vm, memory, probes):
    """(SecondLevel from KVM's own vCPU, None) or (None, why not). The root is used only if
    the pagemap path's answers agree with it (one at least, and none against)."""
    from ..slat import kvm, kvm_vcpu
    try:
        kvm_vm = kvm_vcpu.read_vm(vm.process.pid, memory,
                                  debugfs_vcpus=kvm.debugfs_vcpus(vm.process.pid))
    except kvm_vcpu.Unavailable as exc:
        return None, str(exc)
    v = kvm_vm.root_of(vm.vcpu)
    if v is None:
        return None, (f"no vCPU of KVM's VM {kvm_vm.address:#x} has a root loaded now (none "
                      "ran since its table was last dropped)")
    spec = slat.SlatSpec("ept", v.root, v.level or 4, v.eptp) if kvm_vm.vendor == "intel" \
        else slat.SlatSpec("npt", v.root, v.level or 4)
    agree, disagree = slat.agreement(memory.read, spec, probes)
    how = {"method": "kvm-vcpu", "vcpu": v.index, "seconds": round(kvm_vm.seconds, 4),
           "probes": [[f"{g:#x}", f"{p:#x}"] for g, p in probes if p is not None],
           "probes_agreeing": agree, "probes_disagreeing": disagree, "kvm": kvm_vm.to_dict()}
    if disagree or not agree:
        return None, (f"KVM's vCPU {v.index} holds root {v.root:#x}, but it takes "
                      f"{agree} of the pagemap path's probe addresses where that path "
                      f"does and {disagree} elsewhere: not used (read while KVM changed "
                      "it?)")
    return slat.SecondLevel(memory, spec, how), None


def spread_probes(vm, count: int = TIE_PROBES) -> list:
    """(GPA, host physical address) of up to `count` pages QEMU holds, spread over guest
    RAM: more keys for a second-level search whose first ones left roots tied."""
    pages = list(held_pages(vm.process, vm.ram_map, vm.vcpu_info[vm.vcpu].root))
    return [host_probe(vm, gpa) for gpa in pages[::max(1, len(pages) // count)]]


def host_probe(vm, gpa: int):
    """(gpa, its host physical address by pagemap), or (gpa, None)."""
    region = vm.ram_map.ram_at(gpa)
    if region is None or region.hva is None:
        return gpa, None
    return gpa, vm.process.host_page(region.hva_of(gpa)).hpa


def with_second_level(vm, translations, spec, progress_factory=None):
    """Each translation with its walk through the table (t.slat), lazily: the table found
    once, from the first CHUNK of translations (their answers are its keys), then one walk
    each. progress_factory() makes the progress shown while the table is found."""
    it = iter(translations)
    second = None
    while True:
        chunk = list(itertools.islice(it, CHUNK))
        if not chunk:
            return
        if second is None:
            progress = progress_factory() if progress_factory is not None else None
            try:
                second = second_level(vm, spec, chunk, progress)
            finally:
                if progress is not None:
                    progress.close()
        for t in chunk:
            if t.ok:
                t.slat = second.result(t.gpa, t.hpa)
            yield t
