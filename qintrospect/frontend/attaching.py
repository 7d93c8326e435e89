"""A command's session: opened from its options (--qmp/--gdb/--pid/--name/--domain), warnings
said, and its results given out only once nothing spoiled them (a reset, a resume behind our
back). In a shell or inside gdb, the front end's own open session (args.session)."""

import contextlib
import sys
import time

from ..errors import UsageError


@contextlib.contextmanager
def attached(args):
    """The session for one command: warnings said, and a last check that nothing spoiled what
    was read (a VM that kept running rebooted, a paused one was resumed by someone else). In
    a shell, the shell's own open session (args.session), left open: the shell checks."""
    if getattr(args, "session", None) is not None:
        yield args.session
        return
    vm = open_session(args)
    with vm:
        yield vm
        vm.check_live(final=True)


def checked(vm, items, batch: int = 256, seconds: float = 0.25):
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


def open_session(args):
    """The Session a command's options name, opened; its warnings said (and, with -v, what
    was attached and how)."""
    from ..connect.session import Session
    if args.freeze and args.gdb:
        raise UsageError("--freeze is for sessions without --gdb (attaching gdb already "
                         "stops the VM)")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    qmp, gdb, pid, monitor = args.qmp, args.gdb, args.pid, None
    if getattr(args, "domain", None) or getattr(args, "name", None) or \
            (not qmp and pid is not None):
        from ..connect import targets  # the endpoints from the VM's command line, or libvirt's
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


def slat_progress():
    """The progress shown while the second-level table is found (a scan of host memory)."""
    from ..present.progress import Progress
    return Progress("--slat: scanning host memory for the second-level root", 0)
