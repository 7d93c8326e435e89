"""`qintrospect report`: the VM attached once, each address translated (and drawn), each module
log parsed, checked and compared with the live outside view; written as one page
(present.picture.report) a student can hand in."""

import os
import sys

from .. import modlog, slat
from ..commands.compare import compare
from ..commands.second_level import with_second_level
from ..errors import UsageError
from ..present.outfile import output_folder
from ..present.picture.report import LogEntry, Report, single_page, write
from .addresses import parse_number
from .attaching import attached, slat_progress



def _addresses(args) -> list:
    if args.addresses == ["-"]:
        return [parse_number(line) for line in sys.stdin if line.strip()]
    if "-" in args.addresses:
        raise UsageError("'-' (read addresses from stdin) must be the only address")
    return [parse_number(a) for a in args.addresses]


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _compare(vm, entry: LogEntry) -> None:
    """As `compare --log` does (commands.compare.compare); a log that cannot be compared
    says why in the report, and the report goes on."""
    if entry.log.address is None:
        entry.error = "the log does not say which address it walked"
        return
    try:
        c = compare(vm, entry.log, entry.path)
    except UsageError as exc:
        entry.error = str(exc)
        return
    entry.comparison, entry.explain, entry.outside = c.comparison, c.explain, c.outside
    entry.translation = c.translation


def collect(args) -> Report:
    addresses = _addresses(args)
    if not addresses and not args.log:
        raise UsageError("report: give addresses to draw, --log FILE, or both")
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    spec = slat.parse_slat(args.slat) if args.slat else None
    entries = []
    for path in args.log:        # offline first: a bad log is said before attaching
        log = modlog.parse_log_file(path)
        entries.append(LogEntry(path, log, modlog.check_log(log), _read(path)))
    from .guest import guest_named, guest_root
    named = guest_named(args)
    with attached(args) as vm:
        facts = vm.describe()
        vcpus = [v.to_dict() for v in vm.vcpu_info]
        if named:
            cr3, task = guest_root(vm, args, addresses)
            facts["guest_process"] = f"pid {task.pid} ({task.comm}), root {cr3:#x}"
        results = list(vm.translate_many(addresses, cr3))
        if spec is not None:
            results = list(with_second_level(vm, results, spec, slat_progress))
        for e in entries:
            _compare(vm, e)
    guest = next((e.log for e in entries if e.log.kind == "gpt_dump"), None)
    host = next((e.log for e in entries if e.log.kind == "ept_dump"), None)
    joined = modlog.chain(guest, host) if guest is not None and host is not None else None
    return Report(args.title, facts, vcpus, results, entries, joined)


def run(args) -> int:
    """The report subcommand: collect, write, say where. Exit 1 when an address faulted or a
    log disagrees with the outside view (the report is written all the same). An output
    folder is checked (and opened) before the VM is attached to."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out) and not single_page(out):
        raise UsageError(f"--out {out}: exists and is not a folder; give a folder or a .html file")
    folder = None if single_page(out) else output_folder(out)
    try:
        rep = collect(args)
        files = write(rep, out, folder)
    finally:
        if folder is not None:
            os.close(folder)
    print(f"report: {files[0]}" + (f" (+ {len(files) - 1} file(s) beside it)"
                                   if len(files) > 1 else ""))
    return rep.status
