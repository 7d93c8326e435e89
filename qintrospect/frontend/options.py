"""The command line's parser: every command and option, built once and shared by every front
end (the shell parses its lines with it, qi inside gdb too). Each command's options say which
action runs it (frontend.actions); the options that attach are recorded per command
(session_dests), so a shell can refuse them on its lines."""

import argparse
import os
import sys
from typing import Optional

from . import actions
from . import guest as guest_actions

ATTACHING = "attaching"


def session_options(p: argparse.ArgumentParser) -> None:
    """The options that say which VM and how to attach to it (the "attaching" group). The
    command's parser records their names (session_dests), and --vcpu's."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="say what was attached and how")
    g = _RecordingGroup(p.add_argument_group(ATTACHING))
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
    p.qi_session_dests = tuple(g.dests)


class _RecordingGroup:
    """An argument group that remembers the names (dests) of the options added to it."""

    def __init__(self, group):
        self.group, self.dests = group, []

    def add_argument(self, *args, **kwargs):
        action = self.group.add_argument(*args, **kwargs)
        self.dests.append(action.dest)
        return action


def guest_options(p: argparse.ArgumentParser, what: str = "translate with") -> None:
    """--guest-pid / --guest-comm: a guest process named instead of a --cr3 (its root read
    from the guest kernel's own memory: see the ps command)."""
    p.add_argument("--guest-pid", type=int, metavar="PID",
                   help=f"{what} this guest process's page-table root (found in the guest "
                        "kernel's memory, as `ps` lists it; under KPTI its user copy for user "
                        "addresses) instead of the vCPU's CR3")
    p.add_argument("--guest-comm", metavar="NAME",
                   help="as --guest-pid, the one guest process called NAME (several: exit 2, "
                        "listing them)")


def guest_vm_options(p: argparse.ArgumentParser, what: str = "translate as") -> None:
    """--kvm-vcpu PID[:N], --stage2 ROOT [--vtcr HEX]: an aarch64 guest that runs KVM itself;
    one of its VMs instead of the vCPU's own registers (guestos.kvm_arm64, or a stage 2 root
    that find-stage2 lists)."""
    p.add_argument("--kvm-vcpu", metavar="PID[:N]",
                   help=f"aarch64 guest running KVM: {what} vCPU N (0) of the VM that guest "
                        "process PID (its VMM) runs: that vCPU's EL1 registers and its VM's "
                        "stage 2 root (kvm_s2_mmu.pgd_phys), read in the guest kernel's memory. "
                        "Addresses are then that VM's (its IPAs while its MMU is off)")
    p.add_argument("--stage2", metavar="ROOT",
                   help=f"aarch64 guest running KVM, no symbols needed: {what} a vCPU of the "
                        "VM whose stage 2 first level is at guest-physical ROOT (as "
                        "find-stage2 lists them), its MMU taken as off: addresses are that "
                        "VM's IPAs")
    p.add_argument("--vtcr", metavar="HEX",
                   help="with --stage2: the stage 2 layout (VTCR_EL2); default: the vCPU's")


def session_dests(sub) -> tuple:
    """The attaching options' names of a command's parser (session_options)."""
    return getattr(sub, "qi_session_dests", ())


def commands(parser) -> dict:
    """{name: (its parser, its one-line help)} of every command build_parser made whole."""
    return dict(getattr(parser, "qi_commands", {}))


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

    p.qi_commands = {}

    def command(name, **kwargs):
        parser = sub.add_parser(name, formatter_class=_Help, **kwargs)
        if only not in (None, name):
            return None
        p.qi_commands[name] = (parser, kwargs.get("help") or "")
        return parser

    t = command("translate", help="follow guest virtual addresses down to the host",
                description="Walk the guest's page tables for each address (with the "
                            "vCPU's CR3 unless --cr3), then GPA -> RAM block -> HVA -> "
                            "HPA. '-' reads addresses from stdin, one per line, and "
                            "writes JSON Lines.")
    if t is not None:
        t.add_argument("addresses", nargs="+", metavar="ADDR", help="0x-prefixed hex or decimal")
        t.add_argument("--cr3", help="use this page-table root instead of the vCPU's CR3")
        guest_options(t)
        guest_vm_options(t)
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
                            "hpa, host, writable, user, executable, value; or fault; with --slat "
                            "slat_out, slat_page_size, slat_agrees, slat_fault), computed for all "
                            "addresses at once: the fast way for large batches")
        from ..present.picture import translate_options
        translate_options(t)                    # --html FILE, --svg FILE, --mermaid
        session_options(t)
        t.set_defaults(func=actions.cmd_translate)

    c = command("cpus", help="every vCPU: host thread, CPL, paging mode, CR3, CR0/CR4/EFER")
    if c is not None:
        c.add_argument("--json", action="store_true", help="one JSON object per vCPU")
        session_options(c)
        c.set_defaults(func=actions.cmd_cpus)

    ps = command("ps", help="the guest's processes, from its kernel's own memory (no symbol "
                            "files): pid, ppid, uid, state, page-table roots, vCPU",
                 description="Find the guest kernel's vmcoreinfo note in guest RAM, decode "
                             "kallsyms from the tables it names (Linux 6.0 and later) and "
                             "read the kernel's BTF, then walk the task list from init_task "
                             "with BTF's offsets: every process (as /proc lists them) with "
                             "pid, tgid, ppid, uid, state, kernel thread or not, mm->pgd as "
                             "a guest-physical root (and its KPTI user copy), the vCPU that "
                             "runs it and the vCPUs whose CR3 holds its root. What was found "
                             "is kept for this guest boot: a second command pays almost "
                             "nothing. Exit 1 when the task list could be read only in part "
                             "(a note says where it broke: a VM that runs may change it "
                             "meanwhile); exit 3 when the guest kernel cannot be read this "
                             "way (not Linux, older than 6.0, no BTF).")
    if ps is not None:
        ps.add_argument("--json", action="store_true", help="one JSON object per process "
                                                            "(JSON Lines)")
        ps.add_argument("--kvm", action="store_true",
                        help="aarch64 guest running KVM: the VMs its processes hold (their "
                             "kvm-vm and kvm-vcpu descriptors): stage 2 root, VMID, VTCR_EL2, "
                             "each vCPU and where its registers are (--kvm-vcpu takes one)")
        ps.add_argument("--threads", action="store_true",
                        help="every thread too, after its process (pid = the thread's id, "
                             "tgid = its process's), as /proc/PID/task lists them")
        session_options(ps)
        ps.set_defaults(func=guest_actions.cmd_ps)

    f = command("find-cr3", help="find page-table roots in guest RAM (no symbols needed)",
                description="Scan guest RAM for top-level page tables that share the "
                            "kernel half of the current one (one per process; KPTI "
                            "copies paired), optionally keeping those that map --gva "
                            "and hold --expect there. Exit 1 when none is left.")
    if f is not None:
        f.add_argument("--gva", help="keep roots that map this address")
        f.add_argument("--expect", help="keep roots whose 8 bytes at --gva equal this value")
        f.add_argument("--json", action="store_true", help="one JSON object per candidate")
        guest_options(f, "instead of scanning, give")
        session_options(f)
        f.set_defaults(func=actions.cmd_find_cr3)

    f2 = command("find-stage2", help="aarch64 guest running KVM: its VMs' stage 2 tables in "
                                     "guest RAM (no symbols needed)",
                 description="Scan guest RAM for KVM/arm64's stage 2 first levels (tables no "
                             "other table points to, whose leaves read in VTCR_EL2's stage 2 "
                             "format carry no nG bit), each kept only when a process's own "
                             "table maps (nearly) all its pages at HVA = IPA + a few offsets, "
                             "as a VMM maps its VM's memory (its memslots). The fallback when "
                             "ps --kvm cannot read KVM's structures (no BTF). --stage2 ROOT "
                             "then translates that VM's IPAs. Exit 1 when none is found.")
    if f2 is not None:
        f2.add_argument("--vtcr", metavar="HEX",
                        help="the stage 2 layout (VTCR_EL2) to read tables in; default: the "
                             "vCPU's (KVM writes it per VM from its IPA size)")
        f2.add_argument("--json", action="store_true", help="one JSON object per table")
        session_options(f2)
        f2.set_defaults(func=guest_actions.cmd_find_stage2)

    m = command("vmmap", help="the whole address space as ranges (or --leaf pages)")
    if m is not None:
        m.add_argument("--cr3", help="map this page-table root instead of the vCPU's")
        guest_options(m, "map (and list its VMAs, as /proc/PID/maps does, beside) ")
        guest_vm_options(m, "map the address space of")
        m.add_argument("--leaf", action="store_true", help="one row per mapped page, with its GPA")
        m.add_argument("--user", action="store_true", help="only user-accessible ranges")
        m.add_argument("--kernel", action="store_true", help="only supervisor-only ranges")
        m.add_argument("--writable", action="store_true", help="only writable ranges")
        m.add_argument("--exec", action="store_true", help="only executable ranges")
        m.add_argument("--range", help="only START-END (virtual, end exclusive)")
        m.add_argument("--gpa", action="store_true", help="add a GPA column (merge only if linear)")
        m.add_argument("--hpa", action="store_true", help="add GPA and HPA columns")
        m.add_argument("--json", action="store_true", help="one JSON object per row")
        from ..present.picture import vmmap_options
        vmmap_options(m)                        # --html FILE, --svg FILE
        session_options(m)
        m.set_defaults(func=actions.cmd_vmmap)

    se = command("search", help="find bytes in one address space (or guest-physical RAM)",
                 description="Read the address space's pages (or --phys: guest RAM) from the "
                             "VM's own memory and list every place PATTERN starts, with its "
                             "GPA, HVA and HPA. Matches may cross from one page into the "
                             "next. Exit 1 when nothing is found.")
    if se is not None:
        se.add_argument("pattern", metavar="PATTERN",
                        help="text (UTF-8), or hex bytes with --hex, or an integer with "
                             "--u16/--u32/--u64 (as the guest stores it: little-endian)")
        kind = se.add_mutually_exclusive_group()
        for k, says in (("hex", "hex bytes ('de ad be ef')"), ("u16", "a 2-byte integer"),
                        ("u32", "a 4-byte integer"), ("u64", "an 8-byte integer")):
            kind.add_argument(f"--{k}", dest="kind", action="store_const", const=k,
                              help=f"PATTERN is {says}")
        se.set_defaults(kind="text")
        se.add_argument("--phys", action="store_true", help="search guest-physical RAM")
        se.add_argument("--cr3", help="search this page-table root's address space")
        guest_options(se, "search the address space of")
        guest_vm_options(se, "search the address space of")
        se.add_argument("--user", action="store_true", help="only user-accessible pages")
        se.add_argument("--kernel", action="store_true", help="only supervisor-only pages")
        se.add_argument("--writable", action="store_true", help="only writable pages")
        se.add_argument("--exec", action="store_true", help="only executable pages")
        se.add_argument("--range", help="only START-END (virtual, end exclusive)")
        se.add_argument("--align", default="1", help="only matches at a multiple of N")
        se.add_argument("--max", default="1000", help="stop after N matches (default 1000)")
        se.add_argument("--json", action="store_true", help="one JSON object per match")
        session_options(se)
        se.set_defaults(func=actions.cmd_search)

    r = command("read", help="hexdump guest memory, virtual or --phys",
                description="Unmapped pages are marked, MMIO is never read.")
    if r is not None:
        r.add_argument("address", metavar="ADDR")
        r.add_argument("length", metavar="LEN")
        r.add_argument("--phys", action="store_true", help="ADDR is guest-physical")
        r.add_argument("--cr3", help="translate with this page-table root")
        guest_options(r)
        guest_vm_options(r, "read as")
        r.add_argument("--json", action="store_true", help="one JSON object per page piece")
        session_options(r)
        r.set_defaults(func=actions.cmd_read)

    pl = command("parse-log", help="read gpt_dump/ept_dump module logs, offline",
                 description="Parse one module log (or a gpt_dump and an ept_dump log of "
                             "one experiment, chained), recompute what the log implies "
                             "and say where it agrees with itself. Exit 1 on any "
                             "disagreement.")
    if pl is not None:
        pl.add_argument("logs", nargs="+", metavar="FILE")
        pl.add_argument("--json", action="store_true", help="one JSON object per log (+ the chain)")
        pl.set_defaults(func=actions.cmd_parse_log)

    cp = command("compare", help="compare a module log with the live outside walk",
                 description="Walk the log's address from outside (with the CR3 the log "
                             "prints, or the process finder) and set the two side by "
                             "side, level by level. Exit 1 on any difference.")
    if cp is not None:
        cp.add_argument("--log", required=True, metavar="FILE", help="gpt_dump or ept_dump output")
        cp.add_argument("--json", action="store_true", help="one JSON object")
        session_options(cp)
        cp.set_defaults(func=actions.cmd_compare)

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
        w.add_argument("--cr3", action="append", metavar="HEX",
                       help="only the mappings of this page-table root (repeat for several), "
                            "with no scan of guest RAM for the others")
        guest_options(w, "keep only the mappings of")
        w.add_argument("--no-names", action="store_true",
                       help="do not name the guest processes behind each root (ps's reading "
                            "of the guest kernel)")
        session_options(w)
        w.set_defaults(func=actions.cmd_who_maps)

    k = command("kvm", help="KVM's own facts about a local VM (debugfs stats, vCPUs)",
                description="The accelerator (QMP query-kvm), the VM's folder in KVM's "
                            "debugfs (found from QEMU's pid: PID-FD) with its statistics "
                            "(pages_4k/2m/1g, nx_lpage_splits, pf_fixed, tlb_flush, ...) "
                            "and each vCPU's files (guest_mode, ...), the host's EPT/NPT "
                            "setting, and QMP query-stats where QEMU has it.")
    if k is not None:
        k.add_argument("--json", action="store_true", help="one JSON object")
        session_options(k)
        k.set_defaults(func=actions.cmd_kvm)

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
        session_options(sh)
        sh.set_defaults(front_end="shell")      # (cli.main starts the shell)

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
        report_options(rp)                      # ADDR..., --out, --log, --cr3, --slat, --title
        session_options(rp)
        rp.set_defaults(func=actions.cmd_report)

    z = command("resume", help="resume a VM left paused (e.g. by a killed qintrospect)",
                description="Sends QMP `cont`. Needs only --qmp.")
    if z is not None:
        z.add_argument("--qmp", default=os.environ.get("QI_QMP"),
                       help="QMP socket: a Unix socket path or HOST:PORT (env QI_QMP)")
        z.add_argument("--allow-remote", action="store_true")
        z.add_argument("--timeout", type=float, default=5.0)
        z.set_defaults(func=actions.cmd_resume)

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
        ls.set_defaults(func=actions.cmd_list)
    return p



def report_options(p) -> None:
    """The report subcommand's own options (the session options are the CLI's)."""
    p.add_argument("addresses", nargs="*", metavar="ADDR",
                   help="addresses to draw, as translate takes them ('-': one per line on stdin)")
    p.add_argument("--out", required=True, metavar="DIR|FILE.html",
                   help="a FILE.html for the page alone, or a folder for report.html, "
                        "report.md and the figures as SVG files")
    p.add_argument("--log", action="append", default=[], metavar="FILE",
                   help="a gpt_dump or ept_dump log (repeatable): parsed, checked against "
                        "itself and compared with the live outside walk")
    p.add_argument("--cr3", help="translate with this page-table root instead of the vCPU's")
    guest_options(p)
    p.add_argument("--slat", metavar="auto|npt:HEX|npt5:HEX|ept:HEX",
                   help="draw each GPA's walk through the hypervisor's second-level table too "
                        "(as translate --slat)")
    p.add_argument("--title", default="qintrospect report", help="the page's title")



def option_strings(sub) -> list:
    """The options a command's parser takes, less its session_dests (for completion). (The
    one place that reads argparse's list of a parser's actions.)"""
    out = []
    for action in sub._actions:
        if action.dest in session_dests(sub):
            continue
        out.extend(o for o in action.option_strings if o.startswith("--"))
    return sorted(set(out))
