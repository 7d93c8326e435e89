"""Each command's action: its options read (frontend.options), the VM attached (frontend.
attaching), the command run (qintrospect.commands), its records printed (qintrospect.present),
its exit status returned. The command line, the shell and qi inside gdb run these same actions.

Exit status: 0 success; 1 an address faulted or a comparison disagreed; 2 bad usage or input;
3 could not attach or the VM went away; 4 a bug in qintrospect (please report it); 130 Ctrl-C.
"""

import sys

from .. import paging
from ..errors import UsageError
from ..present import render
from ..present.output import grow_stdout_pipe, lines_writer
from .addresses import parse_number, read_addresses
from .attaching import attached, checked, slat_progress
from .guest import (guest_candidates, guest_named, guest_root, use_guest_vm, vm_named,
                    vmmap_vmas)

EXIT_OK, EXIT_FAULT, EXIT_USAGE, EXIT_ATTACH, EXIT_BUG = 0, 1, 2, 3, 4
MASK64 = (1 << 64) - 1


def cmd_translate(args) -> int:
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    named = guest_named(args)
    if args.addresses == ["-"]:
        addresses = read_addresses(getattr(sys.stdin, "buffer", sys.stdin))
        args.json = True  # a stream in, JSON Lines out
    else:
        if "-" in args.addresses:
            raise UsageError("'-' (read addresses from stdin) must be the only address")
        addresses = [parse_number(a) for a in args.addresses]
    if args.find_cr3:
        if cr3 is not None or named:
            raise UsageError("--find-cr3 and --cr3/--guest-pid/--guest-comm exclude each other")
        if not args.expect or not isinstance(addresses, list) or len(addresses) != 1:
            raise UsageError("--find-cr3 needs --expect VALUE and exactly one ADDR")
    elif args.expect:
        raise UsageError("--expect goes with --find-cr3")
    slat_spec = _slat_spec(args)
    if vm_named(args) and (args.find_cr3 or args.outer or slat_spec or args.brief):
        raise UsageError("--kvm-vcpu and --stage2 name their VM's stage 2 themselves: "
                         "--find-cr3, --outer and --slat do not apply, and --brief walks one "
                         "stage")
    if args.outer:
        if args.brief:
            raise UsageError("--brief does not go with --outer")
        if named:
            raise UsageError("--outer takes the innermost VM's own CR3; --guest-pid/"
                             "--guest-comm do not apply")
        return _translate_nested(args, addresses, cr3, slat_spec)
    status = EXIT_OK
    from ..present.picture import TranslatePictures
    pictures = TranslatePictures(args)      # --html/--svg/--mermaid: written after the text
    with attached(args) as vm:
        if named:
            cr3, _ = guest_root(vm, args, addresses if isinstance(addresses, list) else ())
        use_guest_vm(vm, args)
        if args.find_cr3:
            expect = parse_number(args.expect, "--expect")
            found = [c for c in _find_cr3(vm, addresses[0], expect) if c.value_matches]
            if not found:
                print(f"qintrospect: no page-table root in guest RAM maps {addresses[0]:#x} to "
                      f"the value {expect:#x}", file=sys.stderr)
                return EXIT_FAULT
            cr3 = found[0].root
            if args.verbose:
                print(f"# root {cr3:#x} found by scanning ({found[0].how})", file=sys.stderr)
        if args.brief:
            return _translate_brief(vm, addresses, cr3, slat_spec)
        kvm_facts = vm.kvm_facts() if args.json and vm.process and vm.kvm_enabled else None
        if args.json and slat_spec is None and not pictures.wanted:
            # every level and flag of many addresses at once, the same lines, streamed
            grow_stdout_pipe()
            # a few hundred lines at a time, each block written once the VM is known to have
            # stayed up (a VM that runs while we read), by this thread: a writer thread of
            # its own took more from the GIL and the two cores than it gave. The garbage
            # collector is off for the whole stream: collections counted while the chunks'
            # own steps ran would otherwise all run here, between blocks, each over every
            # object a chunk holds.
            from ..present.jsonlines import gc_paused
            write = lines_writer()
            with gc_paused():
                for oks, lines in vm.translate_json_blocks(addresses, cr3, kvm=kvm_facts):
                    vm.check_live()
                    if not all(oks):
                        status = EXIT_FAULT
                    write(lines)
            return status
        results = vm.translate_many(addresses, cr3)
        if slat_spec is not None:
            from ..commands.second_level import with_second_level
            results = with_second_level(vm, results, slat_spec, slat_progress)
        first = True
        for t in checked(vm, results):
            t.kvm = kvm_facts
            if not t.ok or _slat_failed(t):
                status = EXIT_FAULT
            if pictures.add(t):             # --mermaid: the flowchart alone, at the end
                continue
            if args.json:
                print(render.json_line(t.to_dict()), flush=True)
            else:
                if not first:
                    print()
                print(render.translation_text(t, show_bits=not args.no_bits), flush=True)
            first = False
    pictures.finish()
    return status


BRIEF_CHUNK = 65536
SLAT_PROBES = 64          # (GPA, host address) pairs the second-level table is found with


def _slat_spec(args):
    eptp = getattr(args, "eptp", None)
    if not (eptp or args.slat):
        return None
    from .. import slat
    if eptp:   # the older spelling of --slat ept:EPTP
        if args.slat:
            raise UsageError("--eptp and --slat exclude each other (--eptp X is --slat ept:X)")
        return slat.parse_slat(f"ept:{parse_number(args.eptp, '--eptp'):#x}")
    return slat.parse_slat(args.slat) if args.slat else None


def _slat_failed(t) -> bool:
    """The second-level walk disagrees with the pagemap path, or no table was found."""
    return t.slat is not None and (t.slat.agrees is False or t.slat.spec.root is None)


def _translate_brief(vm, addresses, cr3, slat_spec=None) -> int:
    """The fast batch path: the chain's summary per address (no levels), JSON Lines; with
    --slat, each GPA also walked through the second-level table, all at once (slat_* keys)."""
    import itertools
    from ..present.brieflines import brief_lines
    status = EXIT_OK
    grow_stdout_pipe()
    write = lines_writer()
    it = iter(addresses)
    second = None
    while True:
        chunk = list(itertools.islice(it, BRIEF_CHUNK))
        if not chunk:
            return status
        result = vm.translate_batch(chunk, cr3)
        if slat_spec is not None:
            if second is None:
                second = _brief_second_level(vm, slat_spec, result)
                if second is None:
                    return EXIT_FAULT
            result.slat = second.walk_batch(result.gpa)
            result.slat_marker = second.markers(result.slat)
            if result.slat_disagrees.any():
                status = EXIT_FAULT          # the table and the pagemap path disagree
        vm.check_live()
        if not result.ok.all():
            status = EXIT_FAULT
        for lines in brief_lines(result):
            write(lines)


def _brief_second_level(vm, spec, result):
    """The second-level table for translate --brief --slat, found once with the first chunk's
    (GPA, host address) pairs as keys; said on stderr. None (and why, said) if none is."""
    from .. import slat
    from ..commands.second_level import second_level
    from ..memory.host import HOST_PRESENT
    ok = result.ok & (result.host_status == HOST_PRESENT)
    pairs = list(zip(result.gpa[ok].tolist(), result.hpa[ok].tolist()))[:SLAT_PROBES]
    progress = slat_progress()
    try:
        second = second_level(vm, spec, progress=progress, pairs=pairs)
    finally:
        progress.close()
    if second.spec is None:
        print(f"qintrospect: --slat: {second.how.get('note', 'no second-level table')}",
              file=sys.stderr)
        return None
    print(f"# second level: {second.spec.format.upper()} root {second.spec.root:#x}"
          f"{slat.found_how(second.how)}", file=sys.stderr)
    return second


def _translate_nested(args, addresses, cr3, slat_spec) -> int:
    from ..commands import nested
    if cr3 is not None or args.find_cr3:
        raise UsageError("--outer takes the innermost VM's own CR3; --cr3/--find-cr3 do not "
                         "apply")
    if not args.qmp:
        raise UsageError("need --qmp (and usually --gdb) for the innermost VM")
    outers = [nested.parse_outer(text) for text in args.outer]
    from ..present.picture import TranslatePictures
    pictures = TranslatePictures(args)      # --html/--svg/--mermaid: written after the text
    from ..present.progress import Progress
    progress = Progress("--slat: scanning the outer VM's RAM for the second-level root", 0)
    try:
        results = nested.translate_nested(
            nested.HopSpec(args.qmp, args.gdb, args.pid, args.vcpu), outers, list(addresses),
            slat_spec, progress if slat_spec is not None else None, via=args.via,
            allow_remote=args.allow_remote, timeout=args.timeout)
    finally:
        progress.close()
    status = EXIT_OK
    for r in results:
        if not r.ok or any(h.translation is not None and _slat_failed(h.translation)
                           for h in r.hops):
            status = EXIT_FAULT
        if pictures.add(r):                 # --mermaid: the flowchart alone, at the end
            continue
        if args.json:
            print(render.json_line(r.to_dict()), flush=True)
        else:
            print(render.nested_text(r, verbose=args.verbose), flush=True)
    pictures.finish()
    return status


def cmd_cpus(args) -> int:
    from ..machine.cpu import CR0_BITS, CR4_BITS, EFER_BITS, bit_names
    from ..present import cpus
    with attached(args) as vm:
        vcpus = vm.vcpu_info
    for v in vcpus:
        if args.json:
            print(render.json_line(v.to_dict()))
            continue
        if hasattr(v, "satp"):                     # riscv64 (machine.riscv.RiscvVcpu)
            print(cpus.riscv_cpu_text(v))
            continue
        if not hasattr(v, "cr0"):                  # aarch64 (machine.arm64.Arm64Vcpu)
            print(cpus.arm64_cpu_text(v))
            continue
        pcid = f" PCID {v.pcid:#x}" if v.pcid is not None else ""
        print(f"vCPU {v.index}  host thread {v.thread_id}  CPL {v.cpl}  {v.mode} paging  "
              f"CR3 {v.cr3:#x} (root {v.root:#x}{pcid})")
        print(f"  CR0  {v.cr0:#018x}  {' '.join(bit_names(v.cr0, CR0_BITS))}")
        print(f"  CR4  {v.cr4:#018x}  {' '.join(bit_names(v.cr4, CR4_BITS))}")
        print(f"  EFER {v.efer:#018x}  {' '.join(bit_names(v.efer, EFER_BITS))}")
    return EXIT_OK


def _find_cr3(vm, gva, expect, label="find-cr3"):
    from ..present.progress import Progress
    progress = Progress(f"{label}: scanning guest RAM", vm.ram_map.ram_bytes)
    try:
        return vm.find_cr3(gva, expect, progress)
    finally:
        progress.close()


def cmd_find_cr3(args) -> int:
    gva = parse_number(args.gva, "--gva") if args.gva else None
    expect = parse_number(args.expect, "--expect") if args.expect else None
    if expect is not None and gva is None:
        raise UsageError("--expect VALUE needs --gva ADDR (the address whose 8 bytes to check)")
    with attached(args) as vm:
        if guest_named(args):
            candidates = guest_candidates(vm, args, gva, expect)
        else:
            candidates = _find_cr3(vm, gva, expect)
        # what --cr3 takes there: CR3, TTBR0_EL1, or (riscv64) the root table's address
        reg = {"x86_64": "CR3", "aarch64": "TTBR0"}.get(paging.arch_of(vm.cpu), "root")
    if expect is not None:
        shown = [c for c in candidates if c.value_matches]
    elif gva is not None:
        shown = [c for c in candidates if c.maps_gva]
    else:
        shown = candidates
    if args.json:
        for c in shown:
            print(render.json_line(c.to_dict()))
    else:
        print(f"{len(candidates)} candidate page-table root(s) in guest RAM; "
              f"{len(shown)} shown" + (f" (mapping {gva:#x})" if gva is not None else "")
              + (f" (holding {expect:#x} there)" if expect is not None else ""))
        for c in shown:
            extra = ""
            if c.maps_gva:
                extra = f"  maps it: GPA {c.gpa:#x}, value {c.value:#x}" if c.value is not None \
                    else f"  maps it: GPA {c.gpa:#x}"
            elif c.maps_gva is False:
                extra = "  does not map it"
            current = f"  [current {'satp' if reg == 'root' else reg}]" if c.is_current else ""
            print(f"  {reg} {c.root:#014x}  {c.how}{current}{extra}")
    return EXIT_OK if shown else EXIT_FAULT


def cmd_vmmap(args) -> int:
    from ..commands import vmmap
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    start, end = _range(args.range)
    show_hpa = args.hpa
    show_gpa = args.gpa or show_hpa or args.leaf
    out = sys.stdout
    from ..present.picture import VmmapPictures
    pictures = VmmapPictures(args)          # --html/--svg: the map, written after the rows
    named = guest_named(args)
    with attached(args) as vm:
        task = None
        if named:
            cr3, task = guest_root(vm, args)
        use_guest_vm(vm, args)
        leaves = vm.leaf_arrays(cr3, start, end)
        pictures.begin(vm, leaves)
        rows = vmmap.keep(vmmap.from_leaves(leaves), args.user, args.kernel, args.writable,
                          args.exec)
        if show_hpa:
            chunks = vmmap.with_host(rows, vm.ram_map, vm.process, leaf=args.leaf)
        else:
            chunks = [rows if args.leaf else vmmap.merge(rows, physical=show_gpa)]
        if not args.json:
            out.write(vmmap.header(show_gpa, show_hpa, args.leaf) + "\n")
        fmt = leaves.format if args.leaf else None
        if args.json:
            from ..present.maplines import map_lines
            write = lines_writer()
        for chunk in chunks:
            pictures.add(chunk)
            if args.json:
                lines = map_lines(chunk, fmt, args.leaf)
                vm.check_live()   # a VM that runs may have reset meanwhile: say so, not rows
                write(lines)
                continue
            lines = [vmmap.row_text(row, show_gpa, show_hpa, args.leaf)
                     for row in vmmap.iter_rows(chunk, fmt)]
            vm.check_live()
            out.write("".join(line + "\n" for line in lines))
        skipped = vm.unreadable_tables
        if task is not None:
            vmmap_vmas(vm, args, task, cr3, leaves, start, end, pictures)
    if skipped:
        print(f"qintrospect: {len(skipped)} page table(s) could not be read (not RAM) and were "
              f"skipped, e.g. {skipped[0][0]} table at {skipped[0][1]:#x}", file=sys.stderr)
    pictures.finish()
    return EXIT_OK


MAX_READ = 64 << 20


def cmd_read(args) -> int:
    address = parse_number(args.address)
    length = parse_number(args.length, "length")
    if length == 0 or length > MAX_READ:
        raise UsageError(f"length {length}: give 1 to {MAX_READ} bytes ({MAX_READ >> 20} MiB)")
    if address + length - 1 > MASK64:
        raise UsageError(f"{address:#x}+{length} runs past the top of the address space")
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    if args.phys and (cr3 is not None or guest_named(args) or vm_named(args)):
        raise UsageError("--phys and --cr3/--guest-pid/--guest-comm/--kvm-vcpu/--stage2 "
                         "exclude each other")
    status = EXIT_OK
    with attached(args) as vm:
        if guest_named(args):
            cr3, _ = guest_root(vm, args, [address])
        use_guest_vm(vm, args)
        for piece in checked(vm, vm.read_pieces(address, length, physical=args.phys, cr3=cr3)):
            if piece.data is None:
                status = EXIT_FAULT
            if args.json:
                print(render.json_line(piece.to_dict()))
            else:
                print(render.hexdump_piece(piece))
    return status


def cmd_search(args) -> int:
    """Every place a byte pattern starts in one address space, or in guest-physical RAM."""
    from ..commands import search
    from ..present.progress import Progress
    pattern = search.pattern_bytes(args.pattern, args.kind)
    align, limit = parse_number(args.align, "--align"), parse_number(args.max, "--max")
    if align < 1 or limit < 1:
        raise UsageError("--align and --max must be at least 1")
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    start, end = _range(args.range)
    if args.phys and (cr3 is not None or guest_named(args) or args.range or args.user or
                      args.kernel or args.writable or args.exec or vm_named(args)):
        raise UsageError("--phys searches guest RAM: --cr3, --guest-pid/--guest-comm, "
                         "--kvm-vcpu/--stage2, --range and the page filters are for an address "
                         "space")
    with attached(args) as vm:
        if guest_named(args):
            # under KPTI: the user copy when the search stays in user space, else the kernel
            # copy (both halves)
            cr3, _ = guest_root(vm, args, [0] if args.user else [1 << 63])
        use_guest_vm(vm, args)
        progress = Progress("search", None)
        try:
            if args.phys:
                result = vm.search_physical(pattern, align, limit, progress)
            else:
                result = vm.search(pattern, cr3, start, end, args.user, args.kernel,
                                   args.writable, args.exec, align, limit, progress)
        finally:
            progress.close()
    if args.json:
        for m in result.matches:
            print(render.json_line(m.to_dict()))
        if result.truncated:
            print(f"qintrospect: stopped at --max {limit}: there may be more matches",
                  file=sys.stderr)
    else:
        print(search.text(result))
    return EXIT_OK if result.matches else EXIT_FAULT


def _range(text):
    """--range START-END: (start, end), or (0, None) without one."""
    if not text:
        return 0, None
    a, sep, b = text.partition("-")
    if not sep:
        raise UsageError(f"--range {text!r}: expected START-END")
    start, end = parse_number(a, "range start"), parse_number(b, "range end")
    if end <= start:
        raise UsageError(f"--range {text!r}: END must be above START")
    return start, end


def cmd_who_maps(args) -> int:
    """Every mapping that reaches a frame: GVAs in every address space, page-table use, and
    (from a host address) the QEMU processes that hold it."""
    from ..commands import whomaps
    from ..present.progress import Progress
    given = [(k, getattr(args, k)) for k in ("gpa", "hva", "hpa") if getattr(args, k)]
    if len(given) != 1:
        raise UsageError("give exactly one of --gpa, --hva, --hpa")
    kind, text = given[0]
    address = parse_number(text, f"--{kind}")
    given_roots = [parse_number(c, "--cr3") for c in args.cr3 or ()]
    with attached(args) as vm:
        progress = Progress("who-maps: scanning guest RAM for page-table roots",
                            vm.ram_map.ram_bytes)
        try:
            root, task = guest_root(vm, args)
            roots = given_roots or None if task is None else \
                [r for r in (task.root, task.user_root) if r is not None]
            results = vm.who_maps(**{kind: address}, progress=progress,
                                  slat=_slat_spec(args), roots=roots,
                                  names=not args.no_names)
        finally:
            progress.close()
    for w in results:
        print(render.json_line(w.to_dict()) if args.json else whomaps.text(w))
    return EXIT_OK if any(w.found for w in results) else EXIT_FAULT


def cmd_kvm(args) -> int:
    """KVM's own facts about the VM: accelerator, debugfs statistics, vCPUs, query-stats."""
    from ..slat import kvm
    with attached(args) as vm:
        facts = vm.kvm_facts(roots=True)
    print(render.json_line(facts) if args.json else kvm.text(facts))
    return EXIT_OK


def cmd_list(args) -> int:
    """The QEMU VMs on this host and how to attach to each."""
    from ..connect import discover
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    if args.connect and args.no_libvirt:
        raise UsageError("--connect and --no-libvirt contradict each other")
    from ..connect import targets
    vms, notes = targets.list_vms(args.connect, False if args.no_libvirt else None,
                                   args.timeout)
    from ..present.textsafe import printable
    if args.verbose:
        for note in notes:
            print(f"qintrospect: note: {printable(note)}", file=sys.stderr)
    if args.json:
        # JSON escapes controls and lone surrogates (a name that is not UTF-8) itself: the
        # lines are ASCII
        for vm in vms:
            print(render.json_line(vm.to_dict()))
    elif vms:
        # every cell is made printable (discover.table); a character the terminal's encoding
        # has not (a name in another script) is escaped too, never an encoding error
        if callable(getattr(sys.stdout, "reconfigure", None)):
            sys.stdout.reconfigure(errors="backslashreplace")
        print(discover.table(vms))
    else:
        print("no QEMU process found (none runs, or none this user may see)", file=sys.stderr)
    return EXIT_OK if vms else EXIT_FAULT


def cmd_resume(args) -> int:
    """Resume a VM (QMP only): the way out after a killed qintrospect left it paused."""
    from ..connect import runstate
    from ..connect.qmp import QmpMonitor, parse_address
    if not args.qmp:
        raise UsageError("need --qmp (or QI_QMP in the environment)")
    address = parse_address(args.qmp, "--qmp", args.allow_remote)
    key = runstate.vm_key(address)
    qmp = QmpMonitor(address, args.timeout).connect()
    locked = False
    try:
        try:          # not under a qintrospect that is working on the VM now
            runstate.lock(key, args.timeout)
            locked = True
        except (runstate.RunStateError, OSError):
            pass
        status = qmp.command("query-status")
        try:
            marker = runstate.load(key)
        except runstate.RunStateError:
            marker = None
        record = runstate.left_paused(marker, bool(status.get("running")))
        if status.get("running"):
            print("the VM is already running")
        elif status.get("status") not in ("paused", "debug"):
            raise UsageError(f"the VM is {status.get('status')!r}, not paused; `cont` would not "
                             "help (QEMU only resumes a paused VM)")
        else:
            qmp.command("cont")
            why = (f" (paused since {record.get('since')} by qintrospect pid {record.get('pid')})"
                   if record else "")
            print(f"resumed the VM{why}")
        try:   # the paused VM is dealt with; a memory mode left to put back stays noted
            runstate.release(key, None, runstate.phys_mode_left(marker))
        except runstate.RunStateError:
            pass
    finally:
        qmp.close()
        if locked:
            runstate.unlock(key)
    return EXIT_OK


def cmd_parse_log(args) -> int:
    """Offline: what a module log says, and whether it agrees with itself."""
    from .. import modlog
    logs = [modlog.parse_log_file(path) for path in args.logs]
    checks = [modlog.check_log(log) for log in logs]
    joined = None
    if len(logs) == 2:
        guest, host = sorted(logs, key=lambda log: log.kind != "gpt_dump")
        joined = modlog.chain(guest, host)
    disagree = any(f.agree is False for fs in checks for f in fs) or \
        (joined is not None and (joined.gpa_agree is False or joined.value_agree is False))
    if args.json:
        for path, log, fs in zip(args.logs, logs, checks):
            print(render.json_line({"file": path, "log": log.to_dict(),
                                    "checks": [f.to_dict() for f in fs]}))
        if joined is not None:
            print(render.json_line({"chain": joined.to_dict()}))
    else:
        for path, log, fs in zip(args.logs, logs, checks):
            print(render.modlog_text(path, log, fs))
            print()
        if joined is not None:
            print(render.chain_text(joined))
    return EXIT_FAULT if disagree else EXIT_OK


def cmd_compare(args) -> int:
    """A module log against the live outside view of the same address."""
    from .. import modlog
    from ..commands.compare import compare
    log = modlog.parse_log_file(args.log)
    if log.address is None:
        raise UsageError(f"{args.log}: the log does not say which address it walked")
    with attached(args) as vm:
        c = compare(vm, log, args.log)
    if args.json:
        print(render.json_line({"agree": c.agree, "compared": c.compared,
                                "kind": log.kind, "rows": [r.to_dict() for r in c.comparison.rows],
                                "explain": c.explain, "outside": c.outside, "log": log.to_dict()}))
    else:
        print(render.comparison_text(log, c.comparison, c.outside, c.explain))
        if not c.compared:
            print("  => nothing could be compared: the outside view has none of the log's "
                  "numbers (see the rows' reasons)")
    return EXIT_OK if c.agree else EXIT_FAULT


def cmd_report(args) -> int:
    """A self-contained page to hand in: vCPUs, addresses drawn, module logs compared."""
    from . import report
    return report.run(args)
