"""Commands typed as lines (the shell's, and qi's inside gdb): each line parsed by the command
line's own parser for that command (no second copy of any option), the options that attach
refused (the front end attached once), split as a POSIX shell splits it, completed."""

import os
import re
import shlex

from ..errors import UsageError
from .options import build_parser, commands, session_dests

# Options set once for the shell (options.session_options: the attaching group), not per
# command. --vcpu is the one a command may still give: that command then runs with that vCPU's
# registers.
PER_COMMAND = ("vcpu",)


def command_parsers(names, parser=None) -> dict:
    """{name: its parser} for the commands `names`, from the command line's own parser, with
    the attach options' defaults set to None so that a line that gives one can be told."""
    made = commands(parser or build_parser())
    out = {}
    for name in names:
        if name not in made:
            continue
        sub, summary = made[name]
        attaching = session_dests(sub)
        sub.qi_session_dests = tuple(d for d in attaching if d not in PER_COMMAND)
        sub.set_defaults(**{dest: None for dest in attaching})
        sub.qi_summary = summary
        out[name] = sub
    return out


OWN_OPTION = ("is the shell's own option, given once when it starts; a command in the shell "
              "cannot change it")


def parse_command(parsers: dict, words, own_option: str = OWN_OPTION, builtins=()):
    """argparse.Namespace for one line (words[0] is the command). argparse's own errors exit
    (SystemExit 2) after saying why, as on the command line. An attach option on the line is
    refused (UsageError: the option, then `own_option`)."""
    name, rest = words[0], words[1:]
    sub = parsers.get(name)
    if sub is None:
        known = ", ".join(list(parsers) + list(builtins))
        raise UsageError(f"unknown command {name!r}; the shell knows {known} (`help`)")
    args = sub.parse_args(rest)
    given = [d for d in session_dests(sub) if getattr(args, d, None) is not None]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise UsageError(f"{option} {own_option}")
    if not hasattr(args, "verbose"):
        args.verbose = False
    if name == "translate":
        if getattr(args, "outer", None):
            raise UsageError("--outer opens sessions of its own (one per VM); run it from the "
                             "command line, not inside a shell attached to this VM")
        if "-" in args.addresses:
            raise UsageError("'-' (addresses from stdin) is for the command line; in the shell "
                             "give the addresses on the line")
    return args


# what shlex gives a meaning (quotes, escape, comment) or does not split at (whitespace
# other than its own four)
_NOT_PLAIN = re.compile(r"""['"\\#]|[^\S \t\r\n]""")


def split_line(line: str) -> list:
    """shlex.split(line, comments=True). A plain line (nothing shlex treats specially) is split
    by str.split, the same words: shlex reads a character at a time, a tenth of a command's
    time in the shell."""
    if _NOT_PLAIN.search(line) is None:
        return line.split()
    return shlex.split(line, comments=True)


def file_names(text: str) -> list:
    """Completions of a file name being typed (folders end in /)."""
    import glob
    out = []
    for path in glob.glob(os.path.expanduser(text) + "*"):
        out.append(path + "/" if os.path.isdir(path) else path)
    return out
