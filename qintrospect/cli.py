"""The shell face of qintrospect: subcommands, --json, exit statuses. No logic of its own.

Exit status: 0 success; 1 an address faulted or a comparison disagreed; 2 bad usage or input;
3 could not attach or the VM went away; 4 a bug in qintrospect (please report it); 130 Ctrl-C.
"""

import argparse
import os
import signal
import sys
import traceback

from . import render
from .errors import QIError, UsageError

EXIT_OK, EXIT_FAULT, EXIT_USAGE, EXIT_ATTACH, EXIT_BUG = 0, 1, 2, 3, 4
MASK64 = (1 << 64) - 1


def parse_number(text: str, what: str = "address") -> int:
    """gdb/QEMU conventions: 0x... is hex, plain digits are decimal. Refuse anything else
    rather than guess (a bare 'ffff8880' is not silently read as hex)."""
    t = text.strip().replace("_", "").replace("`", "")
    try:
        if t.lower().startswith("0x"):
            value = int(t[2:], 16)
        elif t.isdigit():
            value = int(t, 10)
        elif t.startswith("-"):
            raise UsageError(f"{what} {text!r} is negative; give a value from 0 to 0xffffffffffffffff")
        else:
            hint = " (hex needs a 0x prefix)" if all(c in "0123456789abcdefABCDEF" for c in t) \
                and t else ""
            raise UsageError(f"{what} {text!r} is not a number{hint}")
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number") from None
    if value > MASK64:
        raise UsageError(f"{what} {text!r} does not fit in 64 bits")
    return value


def _session_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attaching")
    g.add_argument("--qmp", default=os.environ.get("QI_QMP"),
                   help="QMP socket: a Unix socket path or HOST:PORT (env QI_QMP)")
    g.add_argument("--gdb", default=os.environ.get("QI_GDB"),
                   help="gdbstub: HOST:PORT or a Unix socket path (env QI_GDB)")
    g.add_argument("--pid", type=int, help="the QEMU process (default: the QMP socket's peer)")
    g.add_argument("--vcpu", type=int, default=0, help="vCPU index whose registers to use (0)")
    g.add_argument("--via", choices=("gdb", "direct"), default="gdb",
                   help="where guest-physical memory is read: the gdbstub, or the QEMU "
                        "process's memory directly")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow QMP/gdb addresses that are not on loopback")
    g.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for any answer from QEMU or gdb (10)")


def _attach(args):
    from .session import Session
    if not args.qmp or not args.gdb:
        raise UsageError("need both --qmp and --gdb (or QI_QMP and QI_GDB in the environment)")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    return Session(args.qmp, args.gdb, pid=args.pid, vcpu=args.vcpu, via=args.via,
                   allow_remote=args.allow_remote, timeout=args.timeout,
                   verbose=args.verbose)


def cmd_translate(args) -> int:
    cr3 = parse_number(args.cr3, "--cr3") if args.cr3 else None
    if args.addresses == ["-"]:
        addresses = (parse_number(line) for line in sys.stdin if line.strip())
        args.json = True  # a stream in, JSON Lines out
    else:
        if "-" in args.addresses:
            raise UsageError("'-' (read addresses from stdin) must be the only address")
        addresses = [parse_number(a) for a in args.addresses]
    status = EXIT_OK
    with _attach(args) as vm:
        if args.verbose:
            info = vm.describe()
            print(f"# attached: QMP {info['qmp']}, gdb {info['gdb']}, VM was "
                  f"{info['status_found']}; {info['process_note']}; memory via "
                  f"{info['memory_path']}", file=sys.stderr)
        first = True
        for t in vm.translate_many(addresses, cr3):
            if not t.ok:
                status = EXIT_FAULT
            if args.json:
                print(render.json_line(t.to_dict()), flush=True)
            else:
                if not first:
                    print()
                print(render.translation_text(t, show_bits=not args.no_bits), flush=True)
            first = False
    return status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qintrospect",
        description="Explain how a running QEMU guest's memory maps, from the outside: "
                    "GVA -> GPA -> HVA -> HPA. Read-only; the VM is left as found.",
        epilog="exit status: 0 ok, 1 an address faulted or a comparison disagreed, 2 bad usage "
               "or input, 3 could not attach or the VM went away, 4 internal error")
    p.add_argument("-v", "--verbose", action="store_true", help="say what was attached and how")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("translate", help="follow guest virtual addresses down to the host",
                       description="Walk the guest's page tables for each address (with the "
                                   "vCPU's CR3 unless --cr3), then GPA -> RAM block -> HVA -> "
                                   "HPA. '-' reads addresses from stdin, one per line, and "
                                   "writes JSON Lines.")
    t.add_argument("addresses", nargs="+", metavar="ADDR", help="0x-prefixed hex or decimal")
    t.add_argument("--cr3", help="use this page-table root instead of the vCPU's CR3")
    t.add_argument("--json", action="store_true", help="one JSON object per address, per line")
    t.add_argument("--no-bits", action="store_true", help="omit the binary view of entries")
    t.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    _session_options(t)
    t.set_defaults(func=cmd_translate)
    return p


def main(argv=None) -> int:
    parser = build_parser()
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
            traceback.print_exc()
        print(f"qintrospect: internal error: {type(exc).__name__}: {exc} (this is a bug; "
              "run with -v for the traceback)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
