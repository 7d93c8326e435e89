"""The command line: `qintrospect COMMAND ...` parsed (frontend.options), its action run
(frontend.actions; `shell` starts the shell), every expected failure said in one line with its
exit status, a bug said as one.

Exit status: 0 success; 1 an address faulted or a comparison disagreed; 2 bad usage or input;
3 could not attach or the VM went away; 4 a bug in qintrospect (please report it); 130 Ctrl-C.
"""

import os
import signal
import sys

from .errors import QIError
from .frontend.actions import EXIT_BUG, EXIT_OK, EXIT_USAGE
from .frontend.options import build_parser


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
    func = getattr(args, "func", None)
    if getattr(args, "front_end", None) == "shell":
        from . import shell
        func = shell.run
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # SIGTERM unwinds like Ctrl-C, so `with` blocks put the VM back as it was found.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return func(args)
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
