"""Print docs/commands.md: the command reference, made from the command line's own parser
(qintrospect.cli.build_parser()), so that it says what the code accepts.

    .venv/bin/python scripts/docs_commands.py > docs/commands.md

Run it again after adding or changing an option; tests/unit/test_docs.py fails while an option
of a command is missing from docs/commands.md.
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["COLUMNS"] = "100"           # argparse's usage lines: the same width everywhere

try:                                    # where the front ends share their options
    from qintrospect.frontend.options import build_parser  # noqa: E402
except ImportError:
    from qintrospect.frontend.options import build_parser

ATTACHING = "attaching"

HEAD = """\
# Command reference

Every command and option of `qintrospect`, printed from the command line's own parser by
`scripts/docs_commands.py` (run `.venv/bin/python scripts/docs_commands.py > docs/commands.md`
after changing an option). The JSON each command prints is in [json.md](json.md); what the
words mean (GVA, GPA, HVA, HPA, NPT, EPT) is in the [lab walk-through](lab-walkthrough.md).

Numbers follow gdb and QEMU: `0x...` is hex, plain digits are decimal; a bare `ffff8880` is
refused rather than guessed. `QI_QMP` and `QI_GDB` in the environment stand for `--qmp` and
`--gdb`.

{exit}

## Attaching options

The commands that look at a VM share these options (the table lists them once; each command's
usage line below shows them again). Which ones you need: `--qmp` always (or `--pid`, `--name`,
`--domain`, which find it); `--gdb` when the QEMU process is not local or not readable by you.

{attaching}
"""

SHELL_AND_GDB = """\
## Inside `qintrospect shell`

The shell attaches once, then takes lines: `translate`, `vmmap`, `read`, `cpus`, `find-cr3`,
`compare`, `who-maps` and `kvm` with the options above (`--json` per command; the attaching
options are the shell's own), and:

```
cr3 HEX          translate/vmmap/read use this root when given no --cr3
cr3 vcpu         back to the vCPU's CR3 (`cr3` alone says which)
vcpu N           use vCPU N's registers (`vcpu` alone says which)
help [COMMAND]   the commands, or a command's options
quit, exit, EOF  leave: the VM is put back as found
```

## Inside gdb (`qi`)

In a gdb already attached to QEMU's gdbstub, `source qintrospect/gdb.py` adds `qi`, on gdb's
own connection (`qi help` prints this):

```
qi translate ADDR... [--cr3 HEX] [--find-cr3 --expect V] [--json] [--no-bits] [--brief]
qi vmmap [--cr3 HEX] [--leaf] [--user|--kernel] [--writable] [--exec] [--range A-B]
         [--gpa] [--hpa] [--json]
qi find-cr3 [--gva ADDR [--expect VALUE]] [--json]
qi read ADDR LEN [--phys | --cr3 HEX] [--json]
qi help [COMMAND]          a command's options (the command line's own)
qi set qmp PATH|none       QMP for the host side (phys-bits, pdpe1gb, query-kvm)
qi set pid N|auto          the QEMU process (default: the gdbstub's local socket peer)
qi set via auto|gdb|direct where guest-physical memory is read
qi set timeout SECONDS     for QMP
qi show                    the settings
```
"""


def cell(text):
    return " ".join((text or "").split()).replace("|", "\\|")


def name_of(action):
    """How an option is written in the table: `--slat auto|kvm|...`, `-v, --verbose`, `ADDR`."""
    if not action.option_strings:
        return action.metavar or action.dest
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar
    if metavar is None and action.choices:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    return f"{names} {metavar or action.dest.upper()}"


def meaning(action):
    text = cell(action.help if action.help != argparse.SUPPRESS else "")
    default = action.default
    if action.option_strings and action.nargs != 0 and default not in (None, argparse.SUPPRESS) \
            and not isinstance(default, (bool, list)) and not re.search(r"\([^()]*\)$", text) \
            and "default" not in text:
        text += f" (default {default})"
    if action.required and action.option_strings:
        text += " (required)"
    return text or "-"


def table(actions):
    rows = ["| option | meaning |", "|---|---|"]
    for a in actions:
        if isinstance(a, argparse._HelpAction):
            continue
        rows.append(f"| `{cell(name_of(a))}` | {meaning(a)} |")
    return "\n".join(rows)


def main():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    attaching = None
    parts = []
    for name, p in sub.choices.items():
        groups = [g for g in p._action_groups if g._group_actions]
        lines = [f"## `qintrospect {name}`", "", cell(helps.get(name)) + ".", ""]
        if p.description:
            lines += [cell(p.description), ""]
        lines += ["```", p.format_usage().strip(), "```", ""]
        for g in groups:
            if g.title == ATTACHING:
                attaching = attaching or table(g._group_actions)
                lines += ["Attaching: " + ", ".join(f"`{a.option_strings[0]}`"
                                                    for a in g._group_actions)
                          + " ([attaching options](#attaching-options)).", ""]
                continue
            title = {"positional arguments": "Arguments", "options": "Options"}.get(
                g.title, g.title.capitalize())
            actions = [a for a in g._group_actions if not isinstance(a, argparse._HelpAction)]
            if actions:
                lines += [f"{title}:", "", table(actions), ""]
        parts.append("\n".join(lines))
    exit_text = ("Exit status (every command): " + cell(parser.epilog).replace(
        "exit status: ", "") + "; 130 interrupted (the VM is still put back as found).")
    print(HEAD.format(exit=exit_text, attaching=attaching).rstrip() + "\n")
    print("\n".join(parts).rstrip() + "\n")
    print(SHELL_AND_GDB.rstrip())


if __name__ == "__main__":
    main()
