"""The actions' part that names a guest process (issue 22): `ps`, and --guest-pid /
--guest-comm where --cr3 is taken (translate, vmmap, read, find-cr3, who-maps, report): the
process's root, read from the guest kernel's own memory (qintrospect.guestos through the
session's commands)."""

import sys

from ..errors import UsageError
from ..present import render
from ..present.textsafe import printable
from .attaching import attached

EXIT_OK, EXIT_FAULT = 0, 1          # as frontend.actions


def guest_named(args) -> bool:
    """Whether --guest-pid or --guest-comm names a guest process (UsageError for both, or
    for either with --cr3)."""
    pid, comm = getattr(args, "guest_pid", None), getattr(args, "guest_comm", None)
    if pid is not None and comm is not None:
        raise UsageError("--guest-pid and --guest-comm exclude each other")
    named = pid is not None or comm is not None
    if named and getattr(args, "cr3", None):
        raise UsageError("--cr3 and --guest-pid/--guest-comm exclude each other")
    return named


def guest_root(vm, args, addresses=()):
    """(root, task) of the guest process --guest-pid/--guest-comm names: its root for these
    addresses (commands.guest.root_for), said on stderr with -v; (None, None) if none named."""
    if not guest_named(args):
        return None, None
    if vm.stage2 is not None:       # (a host process's root is no table of the guest's)
        vm.require_one_stage("--guest-pid/--guest-comm")
    from ..commands.guest import root_for
    with kernel_progress(vm) as progress:
        task = vm.guest_process(pid=args.guest_pid, comm=args.guest_comm, progress=progress)
    root, which = root_for(task, addresses)
    if getattr(args, "verbose", False):
        print(f"# guest process {task.pid} ({task.comm}): root {root:#x} ({which})",
              file=sys.stderr)
    return root, task


def kvm_vcpu_named(args):
    """(pid, vCPU index) that --kvm-vcpu PID[:N] names, or None; UsageError for a bad one or
    one given with --cr3/--guest-pid/--guest-comm."""
    spec = getattr(args, "kvm_vcpu", None)
    if spec is None:
        return None
    pid, colon, index = spec.partition(":")
    if not pid.isdigit() or (colon and not index.isdigit()):
        raise UsageError(f"--kvm-vcpu {spec!r}: give PID or PID:N (a guest process that runs "
                         "a KVM VM, and its vCPU index; `qintrospect ps` lists processes)")
    if getattr(args, "cr3", None) or guest_named(args):
        raise UsageError("--kvm-vcpu and --cr3/--guest-pid/--guest-comm exclude each other")
    return int(pid), int(index or 0)


def stage2_named(args):
    """(root, VTCR_EL2 or None) that --stage2 ROOT [--vtcr HEX] names, or None; UsageError
    for a bad one, or one given with --kvm-vcpu/--cr3/--guest-pid/--guest-comm."""
    from .addresses import parse_number
    spec, vtcr = getattr(args, "stage2", None), getattr(args, "vtcr", None)
    if spec is None:
        if vtcr is not None:
            raise UsageError("--vtcr goes with --stage2")
        return None
    if getattr(args, "kvm_vcpu", None) or getattr(args, "cr3", None) or guest_named(args):
        raise UsageError("--stage2 and --kvm-vcpu/--cr3/--guest-pid/--guest-comm exclude "
                         "each other")
    return (parse_number(spec, "--stage2"),
            None if vtcr is None else parse_number(vtcr, "--vtcr"))


def vm_named(args) -> bool:
    """Whether --kvm-vcpu or --stage2 names a VM the guest's own KVM runs."""
    return kvm_vcpu_named(args) is not None or stage2_named(args) is not None


def use_guest_vm(vm, args) -> None:
    """--kvm-vcpu: translate as that vCPU of the guest's own KVM (commands.guest); --stage2:
    as a vCPU of the VM whose stage 2 is at ROOT, its stage 1 off (commands.stage2_scan)."""
    named, stage2 = kvm_vcpu_named(args), stage2_named(args)
    if stage2 is not None:
        from ..commands.stage2_scan import registers_for
        vm.use_registers(registers_for(vm, *stage2), source="stage2")
    elif named is not None:
        from ..commands.guest import use_kvm_vcpu as use
        with kernel_progress(vm) as progress:
            use(vm, *named, progress=progress)
    else:
        return
    if getattr(args, "verbose", False):
        print(f"# {printable(vm.stage2.source)}", file=sys.stderr)


def kernel_progress(vm):
    """Progress over guest RAM, drawn (on a terminal) only while the guest kernel's note is
    looked for: the first command of a guest boot."""
    import contextlib
    from ..present.progress import Progress

    @contextlib.contextmanager
    def shown():
        progress = Progress("looking for the guest kernel in its RAM", vm.ram_map.ram_bytes)
        try:
            yield progress
        finally:
            progress.close()
    return shown()


def cmd_ps(args) -> int:
    """The guest's processes, from its kernel's own memory."""
    from ..present import guest as view
    from ..guestos import open_kernel
    with attached(args) as vm:
        with kernel_progress(vm) as progress:
            kernel = open_kernel(vm, progress=progress)
        found = vm.processes(threads=args.threads)
        if getattr(args, "kvm", False):
            return _ps_kvm(vm, args, found)
        vm.check_live(final=True)
        described = kernel.describe()
    if args.json:
        sys.stdout.write("".join(render.json_line(t.to_dict()) + "\n" for t in found.tasks))
    else:
        print(view.ps_header(described, found))
        print(view.ps_text(found))
    for note in found.notes + ([f"the task list was read only in part: {found.cut}"]
                               if found.cut else []):
        print(f"qintrospect: note: {printable(note)}", file=sys.stderr)   # (task names)
    return EXIT_OK if found.complete else EXIT_FAULT


def _ps_kvm(vm, args, found) -> int:
    """ps --kvm: the KVM VMs the guest's processes hold (guestos.kvm_arm64), one per line
    (JSON) or a paragraph each; exit 1 when none does."""
    from ..commands.guest import all_kvm_vms
    from ..present import guest as view
    vms, notes = all_kvm_vms(vm, found.tasks)
    vm.check_live(final=True)
    for note in notes:                  # (names read in guest memory: made printable)
        print(f"qintrospect: note: {printable(note)}", file=sys.stderr)
    if args.json:
        sys.stdout.write("".join(render.json_line(v.to_dict()) + "\n" for v in vms))
    elif vms:
        print(view.kvm_vms_text(vms))
    if not vms:
        print("qintrospect: no guest process holds a KVM VM (no kvm-vm descriptor)",
              file=sys.stderr)
    return EXIT_OK if vms else EXIT_FAULT


def guest_candidates(vm, args, gva, expect):
    """find-cr3 --guest-pid: that process's roots (both copies under KPTI), checked as the
    finder checks its candidates, with no scan."""
    from ..commands import finder
    _, task = guest_root(vm, args)
    how = f"mm->pgd of guest process {task.pid} ({task.comm})"
    current = {v.root for v in vm.vcpu_info}
    cands = [finder.Candidate(task.root, how, is_current=task.root in current,
                              kpti_user_copy=task.user_root)]
    if task.user_root is not None:
        cands.append(finder.Candidate(task.user_root, f"KPTI user copy of {how}",
                                      is_current=task.user_root in current,
                                      kpti_kernel_copy=task.root))
    return finder.check(vm.cached_memory().read, vm.cpu, cands, gva, expect)


def vmmap_vmas(vm, args, task, root, leaves, start, end, pictures) -> None:
    """vmmap --guest-pid: the process's VMAs (as /proc/PID/maps) beside its page tables
    (`leaves`: the map's own leaf arrays, over its --range [start, end): the VMAs that
    overlap it)."""
    from ..commands import guest
    from ..present import guest as view
    listed = vm.guest_vmas(task)
    shown = [v for v in listed.vmas if v.end > start and (end is None or v.start < end)]
    covered, outside = guest.coverage(shown, leaves)
    vm.check_live()
    pictures.guest_vmas(task, covered, outside)
    if args.json:
        sys.stdout.write("".join(render.json_line(dict(c.to_dict(), pid=task.pid)) + "\n"
                                 for c in covered))
        sys.stdout.write("".join(render.json_line(dict(o.to_dict(), pid=task.pid)) + "\n"
                                 for o in outside))
    else:
        which = guest.root_for(task)[1]
        print()
        print(view.vma_text(task, root, which, covered, outside))
    for note in listed.notes + ([listed.cut] if listed.cut else []):
        print(f"qintrospect: note: {printable(note)}", file=sys.stderr)


def cmd_find_stage2(args) -> int:
    """KVM/arm64 stage 2 first levels in guest RAM, by a scan (commands.stage2_scan); exit 1
    when none is confirmed."""
    from .addresses import parse_number
    from ..present.progress import Progress
    vtcr = parse_number(args.vtcr, "--vtcr") if args.vtcr else None
    with attached(args) as vm:
        progress = Progress("find-stage2: scanning guest RAM", vm.ram_map.ram_bytes)
        try:
            found = vm.find_stage2(vtcr, progress)
        finally:
            progress.close()
        vmms = _processes_at(vm, {f.vmm_root for f in found})
    if args.json:
        sys.stdout.write("".join(render.json_line(dict(f.to_dict(), vmm=vmms.get(f.vmm_root)))
                                 + "\n" for f in found))
        return EXIT_OK if found else EXIT_FAULT
    print(f"{len(found)} stage 2 first level(s) in guest RAM, each confirmed by a process "
          "that maps its pages as a VMM maps its VM's memory")
    for f in found:
        who = vmms.get(f.vmm_root)
        named = f" (pid {who['pid']}, {printable(who['comm'])})" if who else ""
        read = "" if f.complete else "the first "
        print(f"  stage 2 {f.root:#014x}  VTCR_EL2 {f.vtcr:#x}: {read}{f.leaves} leaves, "
              f"{f.mapped >> 10} KiB mapped; process root (TTBR0) {f.vmm_root:#x}{named} "
              f"maps {f.matched} of {f.checked} sampled pages")
        for delta, pages, lo, hi in f.slots:
            print(f"    memslot: HVA = IPA + {delta:#x}  ({pages} pages sampled, "
                  f"IPA {lo:#x}..{hi:#x})")
        print(f"    translate as its vCPU (MMU off): qintrospect translate --stage2 "
              f"{f.root:#x} IPA")
    return EXIT_OK if found else EXIT_FAULT


def _processes_at(vm, roots) -> dict:
    """{root: {"pid", "comm"}} of the guest processes whose table is at one of `roots`, where
    the guest kernel reads that way (BTF); {} where it does not (find-stage2 needs no symbols)."""
    from ..errors import QIError
    if not roots:
        return {}
    try:
        tasks = vm.processes().tasks
    except (QIError, OSError, ValueError):
        return {}
    return {t.root: {"pid": t.pid, "comm": t.comm} for t in tasks
            if t.root in roots and not t.kthread}
