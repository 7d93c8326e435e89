"""The shell face of qintrospect: subcommands, --json, exit statuses. No logic of its own.

Exit status: 0 success; 1 an address faulted or a comparison disagreed; 2 bad usage or input;
3 could not attach or the VM went away; 4 a bug in qintrospect (please report it); 130 Ctrl-C.
"""

import argparse
import contextlib
import os
import signal
import sys
import time

from typing import Optional

from .present import render
from .errors import QIError, UsageError

EXIT_OK, EXIT_FAULT, EXIT_USAGE, EXIT_ATTACH, EXIT_BUG = 0, 1, 2, 3, 4
MASK64 = (1 << 64) - 1


def parse_number(text: str, what: str = "address") -> int:
    """gdb/QEMU conventions: 0x... is hex, plain digits are decimal. Refuse anything else
    rather than guess (a bare 'ffff8880' is not silently read as hex)."""
    shown = _quoted(text)
    t = text.strip().replace("_", "").replace("`", "")
    try:
        if t.lower().startswith("0x"):
            value = int(t[2:], 16)
        elif t.isdigit():
            value = int(t, 10)
        elif t.startswith("-"):
            raise UsageError(f"{what} {shown} is negative; give a value from 0 to 0xffffffffffffffff")
        else:
            hint = " (hex needs a 0x prefix)" if all(c in "0123456789abcdefABCDEF" for c in t) \
                and t else ""
            raise UsageError(f"{what} {shown} is not a number{hint}")
    except ValueError:
        raise UsageError(f"{what} {shown} is not a number") from None
    if value > MASK64:
        raise UsageError(f"{what} {shown} does not fit in 64 bits")
    return value


def _quoted(text: str, most: int = 64) -> str:
    """text as a message quotes it: repr, cut short (a line of a file may be megabytes)."""
    if len(text) <= most:
        return repr(text)
    return f"{text[:most]!r}... ({len(text):,} characters)"


def _read_addresses(lines):
    """parse_number() of each non-blank line (text, or bytes as read from stdin's buffer),
    lazily, a batch of lines at a time (flattened in C, not passed one by one through a
    generator). A batch of lines that are all plain 0x-hex (most of a long stream) is read
    by int() alone, which reads them the same: every line holds "0x" once (int(line, 16)
    takes "0x" only as a prefix, so a line that has it twice fails), and no sign."""
    import itertools
    return itertools.chain.from_iterable(_address_batches(iter(lines)))


def _address_batches(lines):
    import itertools
    seen = 0            # lines before this batch
    while True:
        batch = list(itertools.islice(lines, 4096))
        if not batch:
            return
        seen += len(batch)
        joined = (b"" if isinstance(batch[0], bytes) else "").join(batch)
        x, minus, plus = ((b"0x", b"-", b"+") if isinstance(joined, bytes) else ("0x", "-", "+"))
        if joined.count(x) == len(batch) and minus not in joined and plus not in joined:
            try:
                values = [int(line, 16) for line in batch]
            except ValueError:
                values = None
            if values is not None and max(values) <= MASK64:
                yield values
                continue
        values = []
        for number, line in enumerate(batch, seen - len(batch) + 1):
            if isinstance(line, bytes):
                line = line.decode("utf-8", "replace")
            if line.strip():
                try:
                    values.append(parse_number(line.strip()))
                except UsageError as exc:
                    yield values        # the lines before it, as one by one would give them
                    raise UsageError(f"line {number} of the addresses: {exc}") from None
        yield values


def _session_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="say what was attached and how")
    g = p.add_argument_group("attaching")
    g.add_argument("--qmp", default=os.environ.get("QI_QMP"),
                   help="QMP socket: a Unix socket path or HOST:PORT (env QI_QMP)")
    g.add_argument("--gdb", default=os.environ.get("QI_GDB"),
                   help="gdbstub: HOST:PORT or a Unix socket path (env QI_GDB). Attaching it "
                        "stops the VM while qintrospect looks. Without it, registers come "
                        "from QMP and the VM keeps running (see --freeze)")
    g.add_argument("--freeze", action="store_true",
                   help="without --gdb: pause the VM for the command (one consistent view), "
                        "then put the run state back")
    g.add_argument("--pid", type=int, help="the QEMU process (default: the QMP socket's peer); "
                   "alone, its QMP socket and gdbstub are taken from its command line")
    g.add_argument("--name", help="the QEMU process whose -name is NAME (as --pid alone)")
    g.add_argument("--domain", help="a libvirt domain: QMP through libvirt "
                   "(qemu-monitor-command), the QEMU process found from libvirt")
    g.add_argument("--connect", metavar="URI", help="with --domain: libvirt's URI "
                   "(default qemu:///system)")
    g.add_argument("--vcpu", type=int, default=0, help="vCPU index whose registers to use (0)")
    g.add_argument("--via", choices=("auto", "gdb", "direct", "qmp"), default="auto",
                   help="where guest-physical memory is read: the QEMU process's memory "
                        "directly when it is local and readable (auto), the gdbstub, or QMP "
                        "xp (slow)")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow QMP/gdb addresses that are not on loopback")
    g.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for any answer from QEMU or gdb (5)")


@contextlib.contextmanager
def _attach(args):
    """The session for one command: warnings said, and a last check that nothing spoiled what
    was read (a VM that kept running rebooted, a paused one was resumed by someone else). In
    a shell, the shell's own open session (args.session), left open: the shell checks."""
    if getattr(args, "session", None) is not None:
        yield args.session
        return
    vm = _open_session(args)
    with vm:
        yield vm
        vm.check_live(final=True)


def _checked(vm, items, batch: int = 256, seconds: float = 0.25):
    """The items, each given out only after a check that nothing spoiled it since it was read
    (Session.check_live: for a VM that runs, a reset; for a paused one, a resume by someone
    else). Checked in small batches, the last one with QEMU asked."""
    buf, deadline = [], time.monotonic() + seconds
    for item in items:
        buf.append(item)
        if len(buf) >= batch or time.monotonic() > deadline:
            vm.check_live()
            yield from buf
            buf, deadline = [], time.monotonic() + seconds
    vm.check_live(final=True)
    yield from buf


def _grow_stdout_pipe() -> None:
    """Bulk JSON Lines reach a reader faster through a bigger pipe (fewer switches between
    the two processes): 1 MiB where stdout is a pipe and the kernel allows it."""
    try:
        import fcntl
        import stat
        if stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            fcntl.fcntl(sys.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (OSError, ValueError, AttributeError):
        pass


def _lines_writer():
    """A function that writes a block of lines (bytes, each ending in a newline) to stdout:
    straight to its file descriptor by os.writev, so hundreds of MB are not copied once more
    to be joined; through sys.stdout where it has no descriptor (the shell's StringIO)."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):     # io.UnsupportedOperation is both
        return lambda lines: sys.stdout.write(b"".join(lines).decode())

    def write(lines):
        for k in range(0, len(lines), IOV_MAX):
            part = lines[k:k + IOV_MAX]
            done = _when_writable(fd, os.writev, part)
            if done < sum(map(len, part)):      # a short write (a signal): the rest in turn
                rest = b"".join(part)[done:]
                while rest:
                    rest = rest[_when_writable(fd, os.write, rest):]
    return write


def _when_writable(fd, write, data):
    """write(fd, data), waiting while a non-blocking stdout (one a parent set so) is full."""
    while True:
        try:
            return write(fd, data)
        except BlockingIOError:
            import select
            select.select([], [fd], [])


IOV_MAX = 1024      # buffers one writev takes (Linux)


def _open_session(args):
    from .attach.session import Session
    if args.freeze and args.gdb:
        raise UsageError("--freeze is for sessions without --gdb (attaching gdb already "
                         "stops the VM)")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    qmp, gdb, pid, monitor = args.qmp, args.gdb, args.pid, None
    if getattr(args, "domain", None) or getattr(args, "name", None) or \
            (not qmp and pid is not None):
        from .attach import targets  # the endpoints from the VM's command line, or libvirt's
        qmp, gdb, pid, monitor, notes = targets.resolve(args)
        for note in notes:
            print(f"qintrospect: note: {note}", file=sys.stderr)
    if not qmp:
        raise UsageError("need --qmp (or QI_QMP in the environment), --pid, --name or "
                         "--domain, and usually --gdb")
    vm = Session(qmp, gdb, pid=pid, vcpu=args.vcpu, via=args.via,
                 allow_remote=args.allow_remote, timeout=args.timeout,
                 freeze=args.freeze, monitor=monitor).open()
    for warning in vm.warnings:
        print(f"qintrospect: warning: {warning}", file=sys.stderr)
    if args.verbose:
        info = vm.describe()
        gdb = info['gdb'] or f"(none: {info['gdb_note'] or 'registers via QMP'})"
        print(f"# attached: QMP {info['qmp']}, gdb {gdb}, VM was "
              f"{info['status_found']}; {info['process_note']}; memory via "
              f"{info['memory_path']}; 1 GiB pages: {info['page1gb']} (from "
              f"{info['page1gb_source']}); {vm.timings['attach'] * 1000:.0f} ms",
              file=sys.stderr, flush=True)
    return vm


def cmd_translate(args) -> int:
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    if args.addresses == ["-"]:
        addresses = _read_addresses(getattr(sys.stdin, "buffer", sys.stdin))
        args.json = True  # a stream in, JSON Lines out
    else:
        if "-" in args.addresses:
            raise UsageError("'-' (read addresses from stdin) must be the only address")
        addresses = [parse_number(a) for a in args.addresses]
    if args.find_cr3:
        if cr3 is not None:
            raise UsageError("--find-cr3 and --cr3 exclude each other")
        if not args.expect or not isinstance(addresses, list) or len(addresses) != 1:
            raise UsageError("--find-cr3 needs --expect VALUE and exactly one ADDR")
    elif args.expect:
        raise UsageError("--expect goes with --find-cr3")
    slat_spec = _slat_spec(args)
    if slat_spec is not None and args.brief:
        raise UsageError("--slat does not go with --brief (the brief rows have no levels)")
    if args.outer:
        if args.brief:
            raise UsageError("--brief does not go with --outer")
        return _translate_nested(args, addresses, cr3, slat_spec)
    status = EXIT_OK
    from .present.picture import TranslatePictures
    pictures = TranslatePictures(args)      # --html/--svg/--mermaid: written after the text
    with _attach(args) as vm:
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
            return _translate_brief(vm, addresses, cr3)
        kvm_facts = vm.kvm_facts() if args.json and vm.process and vm.kvm_enabled else None
        if args.json and slat_spec is None and not pictures.wanted:
            # every level and flag of many addresses at once, the same lines, streamed
            _grow_stdout_pipe()
            # a few hundred lines at a time, each block written once the VM is known to have
            # stayed up (a VM that runs while we read), by this thread: a writer thread of
            # its own took more from the GIL and the two cores than it gave. The garbage
            # collector is off for the whole stream: collections counted while the chunks'
            # own steps ran would otherwise all run here, between blocks, each over every
            # object a chunk holds.
            from .present.jsonlines import gc_paused
            write = _lines_writer()
            with gc_paused():
                for oks, lines in vm.translate_json_blocks(addresses, cr3, kvm=kvm_facts):
                    vm.check_live()
                    if not all(oks):
                        status = EXIT_FAULT
                    write(lines)
            return status
        results = vm.translate_many(addresses, cr3)
        if slat_spec is not None:
            results = _with_second_level(vm, results, slat_spec)
        first = True
        for t in _checked(vm, results):
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
SLAT_CHUNK = 4096


def _slat_spec(args):
    eptp = getattr(args, "eptp", None)
    if not (eptp or args.slat):
        return None
    from . import slat
    if eptp:   # the older spelling of --slat ept:EPTP
        if args.slat:
            raise UsageError("--eptp and --slat exclude each other (--eptp X is --slat ept:X)")
        return slat.parse_slat(f"ept:{parse_number(args.eptp, '--eptp'):#x}")
    return slat.parse_slat(args.slat) if args.slat else None


def _slat_failed(t) -> bool:
    """The second-level walk disagrees with the pagemap path, or no table was found."""
    return t.slat is not None and (t.slat.agrees is False or t.slat.spec.root is None)


def _with_second_level(vm, translations, spec):
    """Each translation with its walk through the second-level table KVM keeps for this VM on
    this host: the root found once (from the first chunk of addresses), then one walk each."""
    import itertools
    from .present.progress import Progress
    it = iter(translations)
    second = None
    while True:
        chunk = list(itertools.islice(it, SLAT_CHUNK))
        if not chunk:
            return
        if second is None:
            progress = Progress("--slat: scanning host memory for the second-level root", 0)
            try:
                second = vm.second_level(spec, chunk, progress)
            finally:
                progress.close()
        for t in chunk:
            if t.ok:
                t.slat = second.result(t.gpa, t.hpa)
            yield t


def _translate_brief(vm, addresses, cr3) -> int:
    """The fast batch path: the chain's summary per address (no levels), JSON Lines."""
    import itertools
    status = EXIT_OK
    _grow_stdout_pipe()
    it = iter(addresses)
    while True:
        chunk = list(itertools.islice(it, BRIEF_CHUNK))
        if not chunk:
            return status
        result = vm.translate_batch(chunk, cr3)
        vm.check_live()
        if not result.ok.all():
            status = EXIT_FAULT
        sys.stdout.write("".join(render.json_line(d) + "\n" for d in result.to_dicts()))
        sys.stdout.flush()


def _translate_nested(args, addresses, cr3, slat_spec) -> int:
    from .commands import nested
    if cr3 is not None or args.find_cr3:
        raise UsageError("--outer takes the innermost VM's own CR3; --cr3/--find-cr3 do not "
                         "apply")
    if not args.qmp:
        raise UsageError("need --qmp (and usually --gdb) for the innermost VM")
    outers = [nested.parse_outer(text) for text in args.outer]
    from .present.picture import TranslatePictures
    pictures = TranslatePictures(args)      # --html/--svg/--mermaid: written after the text
    from .present.progress import Progress
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
    from .machine.cpu import CR0_BITS, CR4_BITS, EFER_BITS, bit_names
    with _attach(args) as vm:
        vcpus = vm.vcpu_info
    for v in vcpus:
        if args.json:
            print(render.json_line(v.to_dict()))
            continue
        pcid = f" PCID {v.pcid:#x}" if v.pcid is not None else ""
        print(f"vCPU {v.index}  host thread {v.thread_id}  CPL {v.cpl}  {v.mode} paging  "
              f"CR3 {v.cr3:#x} (root {v.root:#x}{pcid})")
        print(f"  CR0  {v.cr0:#018x}  {' '.join(bit_names(v.cr0, CR0_BITS))}")
        print(f"  CR4  {v.cr4:#018x}  {' '.join(bit_names(v.cr4, CR4_BITS))}")
        print(f"  EFER {v.efer:#018x}  {' '.join(bit_names(v.efer, EFER_BITS))}")
    return EXIT_OK


def _find_cr3(vm, gva, expect, label="find-cr3"):
    from .present.progress import Progress
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
    with _attach(args) as vm:
        candidates = _find_cr3(vm, gva, expect)
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
            current = "  [current CR3]" if c.is_current else ""
            print(f"  CR3 {c.root:#014x}  {c.how}{current}{extra}")
    return EXIT_OK if shown else EXIT_FAULT


def cmd_vmmap(args) -> int:
    from .commands import vmmap
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    start, end = 0, None
    if args.range:
        a, sep, b = args.range.partition("-")
        if not sep:
            raise UsageError(f"--range {args.range!r}: expected START-END")
        start, end = parse_number(a, "range start"), parse_number(b, "range end")
        if end <= start:
            raise UsageError(f"--range {args.range!r}: END must be above START")
    show_hpa = args.hpa
    show_gpa = args.gpa or show_hpa or args.leaf
    out = sys.stdout
    from .present.picture import VmmapPictures
    pictures = VmmapPictures(args)          # --html/--svg: the map, written after the rows
    with _attach(args) as vm:
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
        for chunk in chunks:
            pictures.add(chunk)
            lines = [render.json_line(row.to_dict(leaf=args.leaf)) if args.json else
                     vmmap.row_text(row, show_gpa, show_hpa, args.leaf)
                     for row in vmmap.iter_rows(chunk, fmt)]
            vm.check_live()   # a VM that runs may have reset meanwhile: say so, not the rows
            out.write("".join(line + "\n" for line in lines))
        skipped = vm.unreadable_tables
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
    if args.phys and cr3 is not None:
        raise UsageError("--phys and --cr3 exclude each other")
    status = EXIT_OK
    with _attach(args) as vm:
        for piece in _checked(vm, vm.read_pieces(address, length, physical=args.phys, cr3=cr3)):
            if piece.data is None:
                status = EXIT_FAULT
            if args.json:
                print(render.json_line(piece.to_dict()))
            else:
                print(render.hexdump_piece(piece))
    return status


def cmd_who_maps(args) -> int:
    """Every mapping that reaches a frame: GVAs in every address space, page-table use, and
    (from a host address) the QEMU processes that hold it."""
    from .commands import whomaps
    from .present.progress import Progress
    given = [(k, getattr(args, k)) for k in ("gpa", "hva", "hpa") if getattr(args, k)]
    if len(given) != 1:
        raise UsageError("give exactly one of --gpa, --hva, --hpa")
    kind, text = given[0]
    address = parse_number(text, f"--{kind}")
    with _attach(args) as vm:
        progress = Progress("who-maps: scanning guest RAM for page-table roots",
                            vm.ram_map.ram_bytes)
        try:
            results = vm.who_maps(**{kind: address}, progress=progress,
                                  slat=_slat_spec(args))
        finally:
            progress.close()
    for w in results:
        print(render.json_line(w.to_dict()) if args.json else whomaps.text(w))
    return EXIT_OK if any(w.found for w in results) else EXIT_FAULT


def cmd_kvm(args) -> int:
    """KVM's own facts about the VM: accelerator, debugfs statistics, vCPUs, query-stats."""
    from .slat import kvm
    with _attach(args) as vm:
        facts = vm.kvm_facts(roots=True)
    print(render.json_line(facts) if args.json else kvm.text(facts))
    return EXIT_OK


def cmd_shell(args) -> int:
    """One attached session, many commands (qintrospect.shell)."""
    from . import shell
    return shell.run(args)


def cmd_list(args) -> int:
    """The QEMU VMs on this host and how to attach to each."""
    from .attach import discover
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    if args.connect and args.no_libvirt:
        raise UsageError("--connect and --no-libvirt contradict each other")
    from .attach import targets
    vms, notes = targets.list_vms(args.connect, False if args.no_libvirt else None,
                                   args.timeout)
    from .present.textsafe import printable
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
    from .attach import runstate
    from .attach.qmp import QmpMonitor, parse_address
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
    from . import modlog
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
    from . import modlog
    log = modlog.parse_log_file(args.log)
    if log.address is None:
        raise UsageError(f"{args.log}: the log does not say which address it walked")
    with _attach(args) as vm:
        if log.kind == "ept_dump":
            cmp, explain, outside = _compare_host(vm, log)
        else:
            cr3, how = _root_for_log(vm, log, args)
            t = vm.translate(log.address, cr3)
            value = int.from_bytes(t.value, "little") if t.value and len(t.value) == 8 else None
            cmp = modlog.compare(log, t.walk, value)
            explain = modlog.explain_direct_map(log.address, t.gpa) if t.ok else None
            outside = dict(t.to_dict(), root_found_by=how)
    compared = any(r.agree is True for r in cmp.rows)
    if args.json:
        print(render.json_line({"agree": cmp.agree and compared, "compared": compared,
                                "kind": log.kind, "rows": [r.to_dict() for r in cmp.rows],
                                "explain": explain, "outside": outside, "log": log.to_dict()}))
    else:
        print(render.comparison_text(log, cmp, outside, explain))
        if not compared:
            print("  => nothing could be compared: the outside view has none of the log's "
                  "numbers (see the rows' reasons)")
    return EXIT_OK if cmp.agree and compared else EXIT_FAULT


def cmd_report(args) -> int:
    """A self-contained page to hand in: vCPUs, addresses drawn, module logs compared."""
    from .present.picture import report
    return report.run(args)


def _root_for_log(vm, log, args):
    """The page-table root to walk with: the one the log printed, else the finder's."""
    from .paging.formats import ADDR_51_12
    if log.root is not None and log.root_known_mask & ADDR_51_12 == ADDR_51_12:
        return log.root, "printed in the log"
    if log.value is None:
        raise UsageError(f"{args.log}: the log prints neither its page-table root nor the value "
                         "at the address, so the process cannot be found from outside")
    found = [c for c in _find_cr3(vm, log.address, log.value, "compare") if c.value_matches]
    if not found:
        raise UsageError(f"no page-table root in guest RAM maps {log.address:#x} to the log's "
                         f"value {log.value:#x}: the log is from another boot, or the page "
                         "changed since")
    return found[0].root, f"find-cr3 (the 8 bytes at {log.address:#x} equal the log's value)"


def _compare_host(vm, log):
    from . import modlog
    gpa = log.address
    region = vm.ram_map.ram_at(gpa)
    outside = {"gpa": f"{gpa:#x}", "ram_block": region.block if region else None}
    hpa, value, why = None, None, ""
    if region is None:
        why = vm.ram_map.describe(gpa)
    elif vm.process is None:
        why = vm.process_note
    else:
        hva = region.hva_of(gpa)
        page = vm.process.host_page(hva)
        outside.update(hva=f"{hva:#x}", host=page.to_dict())
        hpa, why = page.hpa, page.detail
        try:
            value = int.from_bytes(vm.read_phys(gpa, 8), "little")
        except QIError as exc:
            why = why or str(exc)
    outside.update(hpa=None if hpa is None else f"{hpa:#x}",
                   value=None if value is None else f"{value:#x}")
    explain = None
    if hpa is not None:
        explain = modlog.explain_shared_bits(gpa, hpa)
    cmp = modlog.compare_host(log, hpa, value, why)
    if log.root is None:
        return cmp, explain, outside
    # The log names its table (nCR3 / EPTP): walk that table here too, row by row. The pagemap
    # rows stay, renamed host_hpa / host_value beside the walk's own final / value.
    from .record import replace
    slat_cmp, outside["slat"] = _compare_second_level(vm, log, hpa)
    outside.update(root=f"{log.root:#x}", root_found_by=f"{log.root_name} printed in the log")
    if hpa is not None and outside["slat"].get("page_size"):
        explain = modlog.explain_shared_bits(gpa, hpa, page_size=outside["slat"]["page_size"])
    host_rows = [replace(r, field={"final": "host_hpa", "value": "host_value"}.get(r.field,
                                                                                  r.field))
                 for r in cmp.rows]
    return modlog.Comparison(tuple(host_rows) + slat_cmp.rows), explain, outside


def _compare_second_level(vm, log, hpa):
    """The log's GPA walked through the second-level table the log prints (its root, format
    and depth), in this host's memory (/proc/kcore): (Comparison, what the walk found)."""
    from . import modlog, slat
    from .paging.formats import ADDR_51_12
    fmt, depth = log.format or "ept", log.paging_levels
    root = log.root
    if log.root_known_mask & ADDR_51_12 != ADDR_51_12:
        missing = modlog.bit_ranges(ADDR_51_12 & ~log.root_known_mask)
        return modlog.Comparison((modlog.Row(
            "slat", None, root, None, log.root_known_mask, None,
            f"the {fmt.upper()} was not walked: the log's {log.root_name} is cut (bits "
            f"{missing} not printed)"),)), {"format": fmt, "note": "root cut"}
    spec = slat.SlatSpec(fmt, root, depth, root | 6 | (depth - 1) << 3 if fmt == "ept" else None)
    try:
        second = vm.second_level(spec)
        result = second.result(log.address, hpa)
    except QIError as exc:
        return modlog.Comparison((modlog.Row(
            "slat", None, root, None, log.root_known_mask, None,
            f"the {fmt.upper()} at {root:#x} was not walked: {exc}"),)), \
            {"format": fmt, "depth": depth, "root": f"{root:#x}", "note": str(exc)}
    walk, value = result.walk, None
    if walk.ok:
        try:
            value = int.from_bytes(second.memory.read(walk.pa, 8), "little")
        except QIError:
            value = None
    found = dict(result.to_dict(), value=None if value is None else f"{value:#x}")
    return modlog.compare_second_level(log, walk, value), found


class _Help(argparse.HelpFormatter):
    """argparse's help, as wide as the terminal, without loading shutil for that (argparse
    makes a formatter for every option it adds: a few ms of every command's start)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                width = 0
            if width <= 0:
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 0
            width = (width or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line's parser. With `only` (a command's name, or "" for none), only that
    command's options are built, the others listed with their help: a command does not pay
    for every other's."""
    p = argparse.ArgumentParser(
        prog="qintrospect", formatter_class=_Help,
        description="Explain how a running QEMU guest's memory maps, from the outside: "
                    "GVA -> GPA -> HVA -> HPA. Read-only; the VM is left as found.",
        epilog="exit status: 0 ok, 1 an address faulted or a comparison disagreed, 2 bad usage "
               "or input, 3 could not attach or the VM went away, 4 internal error")
    p.add_argument("-v", "--verbose", action="store_true", help="say what was attached and how")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, **kwargs):
        parser = sub.add_parser(name, formatter_class=_Help, **kwargs)
        return parser if only in (None, name) else None

    t = command("translate", help="follow guest virtual addresses down to the host",
                description="Walk the guest's page tables for each address (with the "
                            "vCPU's CR3 unless --cr3), then GPA -> RAM block -> HVA -> "
                            "HPA. '-' reads addresses from stdin, one per line, and "
                            "writes JSON Lines.")
    if t is not None:
        t.add_argument("addresses", nargs="+", metavar="ADDR", help="0x-prefixed hex or decimal")
        t.add_argument("--cr3", help="use this page-table root instead of the vCPU's CR3")
        t.add_argument("--find-cr3", action="store_true",
                       help="find the root that maps the (single) ADDR holding --expect VALUE")
        t.add_argument("--expect", help="with --find-cr3: the 8-byte value at ADDR")
        t.add_argument("--outer", action="append", metavar="qmp=ADDR,gdb=ADDR[,pid=N]",
                       help="the VM that runs this VM's QEMU (repeat, innermost first): follow the "
                            "address on down through it to this host")
        t.add_argument("--slat", metavar="auto|kvm|scan|npt:HEX|npt5:HEX|ept:HEX",
                       help="walk each GPA through the hypervisor's second-level table too (AMD "
                            "NPT, Intel EPT). When the VM runs under KVM on this host (root): "
                            "auto reads the root from KVM's own vCPU (kallsyms + BTF + "
                            "/proc/kcore) and falls back to a scan of host memory, saying why; "
                            "kvm or scan take only that way. With --outer: found in the outer "
                            "VM's RAM. Or the nCR3 / EPTP given")
        t.add_argument("--eptp", help="with --outer: the outer hypervisor's EPTP for this VM "
                                      "(the same as --slat ept:EPTP); its EPT walk is shown "
                                      "beside the process-table answer")
        t.add_argument("--json", action="store_true", help="one JSON object per address, per line")
        t.add_argument("--no-bits", action="store_true", help="omit the binary view of entries")
        t.add_argument("--brief", action="store_true",
                       help="JSON Lines with the chain only (gva, gpa, page_size, ram_block, hva, "
                            "hpa, host, writable, user, executable, value; or fault), computed for "
                            "all addresses at once: the fast way for large batches")
        from .present.picture import translate_options
        translate_options(t)                    # --html FILE, --svg FILE, --mermaid
        _session_options(t)
        t.set_defaults(func=cmd_translate)

    c = command("cpus", help="every vCPU: host thread, CPL, paging mode, CR3, CR0/CR4/EFER")
    if c is not None:
        c.add_argument("--json", action="store_true", help="one JSON object per vCPU")
        _session_options(c)
        c.set_defaults(func=cmd_cpus)

    f = command("find-cr3", help="find page-table roots in guest RAM (no symbols needed)",
                description="Scan guest RAM for top-level page tables that share the "
                            "kernel half of the current one (one per process; KPTI "
                            "copies paired), optionally keeping those that map --gva "
                            "and hold --expect there. Exit 1 when none is left.")
    if f is not None:
        f.add_argument("--gva", help="keep roots that map this address")
        f.add_argument("--expect", help="keep roots whose 8 bytes at --gva equal this value")
        f.add_argument("--json", action="store_true", help="one JSON object per candidate")
        _session_options(f)
        f.set_defaults(func=cmd_find_cr3)

    m = command("vmmap", help="the whole address space as ranges (or --leaf pages)")
    if m is not None:
        m.add_argument("--cr3", help="map this page-table root instead of the vCPU's")
        m.add_argument("--leaf", action="store_true", help="one row per mapped page, with its GPA")
        m.add_argument("--user", action="store_true", help="only user-accessible ranges")
        m.add_argument("--kernel", action="store_true", help="only supervisor-only ranges")
        m.add_argument("--writable", action="store_true", help="only writable ranges")
        m.add_argument("--exec", action="store_true", help="only executable ranges")
        m.add_argument("--range", help="only START-END (virtual, end exclusive)")
        m.add_argument("--gpa", action="store_true", help="add a GPA column (merge only if linear)")
        m.add_argument("--hpa", action="store_true", help="add GPA and HPA columns")
        m.add_argument("--json", action="store_true", help="one JSON object per row")
        from .present.picture import vmmap_options
        vmmap_options(m)                        # --html FILE, --svg FILE
        _session_options(m)
        m.set_defaults(func=cmd_vmmap)

    r = command("read", help="hexdump guest memory, virtual or --phys",
                description="Unmapped pages are marked, MMIO is never read.")
    if r is not None:
        r.add_argument("address", metavar="ADDR")
        r.add_argument("length", metavar="LEN")
        r.add_argument("--phys", action="store_true", help="ADDR is guest-physical")
        r.add_argument("--cr3", help="translate with this page-table root")
        r.add_argument("--json", action="store_true", help="one JSON object per page piece")
        _session_options(r)
        r.set_defaults(func=cmd_read)

    pl = command("parse-log", help="read gpt_dump/ept_dump module logs, offline",
                 description="Parse one module log (or a gpt_dump and an ept_dump log of "
                             "one experiment, chained), recompute what the log implies "
                             "and say where it agrees with itself. Exit 1 on any "
                             "disagreement.")
    if pl is not None:
        pl.add_argument("logs", nargs="+", metavar="FILE")
        pl.add_argument("--json", action="store_true", help="one JSON object per log (+ the chain)")
        pl.set_defaults(func=cmd_parse_log)

    cp = command("compare", help="compare a module log with the live outside walk",
                 description="Walk the log's address from outside (with the CR3 the log "
                             "prints, or the process finder) and set the two side by "
                             "side, level by level. Exit 1 on any difference.")
    if cp is not None:
        cp.add_argument("--log", required=True, metavar="FILE", help="gpt_dump or ept_dump output")
        cp.add_argument("--json", action="store_true", help="one JSON object")
        _session_options(cp)
        cp.set_defaults(func=cmd_compare)

    w = command("who-maps", help="every mapping that reaches a frame (GPA, HVA or HPA)",
                description="The reverse map: for every page-table root in the guest "
                            "(each vCPU's, and every process's found by the finder, KPTI "
                            "copies included), the virtual addresses whose leaf holds the "
                            "frame (page size, rights, level), and whether the frame is a "
                            "page-table page itself. --hpa first finds which local QEMU "
                            "process and RAM block hold the host frame. Exit 1 when "
                            "nothing maps it.")
    if w is not None:
        w.add_argument("--gpa", help="a guest-physical address")
        w.add_argument("--hva", help="a host virtual address in this VM's QEMU process")
        w.add_argument("--hpa", help="a host physical address (root: frame numbers)")
        w.add_argument("--slat", metavar="auto|kvm|scan|npt:HEX|npt5:HEX|ept:HEX",
                       help="on a KVM host: the hypervisor's second-level table too (the GPAs "
                            "whose leaf holds the host frame, and whether the frame is a page of "
                            "the table)")
        w.add_argument("--json", action="store_true", help="one JSON object per frame")
        _session_options(w)
        w.set_defaults(func=cmd_who_maps)

    k = command("kvm", help="KVM's own facts about a local VM (debugfs stats, vCPUs)",
                description="The accelerator (QMP query-kvm), the VM's folder in KVM's "
                            "debugfs (found from QEMU's pid: PID-FD) with its statistics "
                            "(pages_4k/2m/1g, nx_lpage_splits, pf_fixed, tlb_flush, ...) "
                            "and each vCPU's files (guest_mode, ...), the host's EPT/NPT "
                            "setting, and QMP query-stats where QEMU has it.")
    if k is not None:
        k.add_argument("--json", action="store_true", help="one JSON object")
        _session_options(k)
        k.set_defaults(func=cmd_kvm)

    sh = command("shell", help="one attached session, many commands (history, Tab)",
                 description="Attach once, then run translate, vmmap, read, cpus, "
                             "find-cr3, compare, who-maps and kvm lines with their own "
                             "options, plus `cr3 HEX|vcpu`, `vcpu N`, `help`, `quit`. "
                             "The VM is paused only while a command runs (with --freeze "
                             "or a gdb attached: for the whole shell) and left as found "
                             "on exit. "
                             "No prompt when stdin is not a terminal; exit status: 0, or "
                             "the last failing command's.")
    if sh is not None:
        _session_options(sh)
        sh.set_defaults(func=cmd_shell)

    rp = command("report", help="a self-contained page to hand in: the vCPUs, addresses "
                                "drawn, module logs parsed and compared",
                 description="Write one page (--out FILE.html) or a folder (--out DIR: "
                             "report.html, report.md, one SVG per address) with the VM's "
                             "vCPUs, each ADDR drawn as translate --html draws it, each "
                             "--log parsed, checked and compared with the outside view "
                             "(as compare --log), and the chain as mermaid. Exit 1 when "
                             "an address faulted or a log disagrees (the report is "
                             "written all the same).")
    if rp is not None:
        from .present.picture import report as picture_report
        picture_report.options(rp)              # ADDR..., --out, --log, --cr3, --slat, --title
        _session_options(rp)
        rp.set_defaults(func=cmd_report)

    z = command("resume", help="resume a VM left paused (e.g. by a killed qintrospect)",
                description="Sends QMP `cont`. Needs only --qmp.")
    if z is not None:
        z.add_argument("--qmp", default=os.environ.get("QI_QMP"),
                       help="QMP socket: a Unix socket path or HOST:PORT (env QI_QMP)")
        z.add_argument("--allow-remote", action="store_true")
        z.add_argument("--timeout", type=float, default=5.0)
        z.set_defaults(func=cmd_resume)

    ls = command("list", help="the QEMU VMs on this host: pid, name, accelerator, RAM, "
                              "QMP and gdbstub (and whether they answer), run state",
                 description="Every QEMU process this user can see, its command line "
                             "read as QEMU reads it; a QMP socket is asked for its "
                             "greeting and run state when free (a busy one is 'in "
                             "use'), a gdbstub is never connected to (that would stop "
                             "the VM): 'listening' comes from the socket tables. "
                             "libvirt's running domains too, when libvirt-python is "
                             "installed and libvirt answers (qemu:///system, or "
                             "--connect). Exit 1 when no VM is found.")
    if ls is not None:
        ls.add_argument("--json", action="store_true", help="one JSON object per VM")
        ls.add_argument("--connect", metavar="URI",
                        help="libvirt's URI (default qemu:///system, skipped quietly if absent)")
        ls.add_argument("--no-libvirt", action="store_true", help="do not ask libvirt")
        ls.add_argument("--timeout", type=float, default=1.5,
                        help="seconds to wait for each QMP greeting (1.5)")
        ls.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="say why libvirt was not asked")
        ls.set_defaults(func=cmd_list)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # numpy's OpenBLAS starts a spinning thread per core when imported; the commands do no
    # linear algebra, and those threads took a core's worth of time from the reader of our
    # output (set before numpy is imported; a value the user set is kept)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # the command's name: the first word that is not an option (the only options before it
    # are -v and -h, which take no value)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # SIGTERM unwinds like Ctrl-C, so `with` blocks put the VM back as it was found.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return args.func(args)
    except QIError as exc:
        print(f"qintrospect: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("qintrospect: interrupted; the VM was left as found", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:  # a bug: say so briefly; the traceback only with -v
        if getattr(args, "verbose", False):
            import traceback
            traceback.print_exc()
        print(f"qintrospect: internal error: {type(exc).__name__}: {exc} (this is a bug; "
              "run with -v for the traceback)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
