"""`qintrospect shell`: one attached session, many commands.

Each line is parsed by the command line's own argparse subparsers (no second copy of any
option) and run by the command line's own functions, on the session the shell opened once
(frontend.attaching hands it over instead of opening one). The attach options are the shell's, given
once when it starts; a command line that repeats one is refused.

The VM's run state, as on the command line:
- without --gdb or --freeze, the VM is paused only while a command runs: QMP `stop` before it
  (only if it was found running then), the vCPUs' registers read again (it ran since the last
  command), `cont` after. Between commands it runs. A VM found paused (by someone else) is
  left paused, and its registers are read again only after QEMU reported an event (resume,
  stop, reset...) since they were read: a paused VM costs a command nothing but its own work.
  (A debugger that writes registers through the gdbstub while the VM stays paused makes no
  event: as with --freeze, the shell goes on with the registers it read; the command line
  reads them anew each time.)
- with --freeze, it stays paused for the whole shell; with --gdb too, since QEMU's gdbstub
  stops the VM when gdb connects, and QMP `cont` under a gdb that believes the target stopped
  would leave gdb and the stub disagreeing. Either way the banner says so. If its owner
  resumes it meanwhile, it is theirs: paused only while a command runs from then on.
- on exit (quit, EOF, SIGTERM) qintrospect's own pause, if any, is undone; a VM its owner
  resumed or paused meanwhile is left as the owner left it (runguard's rules: `stop` is never
  sent to put a state back). Ctrl-C interrupts the running command (its pause is undone) and
  the shell goes on; at the prompt it only clears the line.
- the VM's lock (runstate) is held while attaching, while a command runs and while leaving:
  between commands another qintrospect may work on the VM, and never has it resumed under it.

Exit status: 0 if every command succeeded, else the status of the last one that failed (130
for an interrupted one; 143 after SIGTERM). With stdin not a terminal there is no prompt, no
banner and no history: `qintrospect shell < commands.txt` prints only what the commands print.
"""

import contextlib
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback

from .errors import QIError, UsageError, VMGoneError
from .frontend.lines import command_parsers, file_names, parse_command, split_line
from .frontend.options import option_strings

# The command-line commands a shell runs (kvm where the command line has it).
COMMANDS = ("translate", "vmmap", "read", "search", "cpus", "ps", "find-cr3", "compare",
            "who-maps",
            "kvm")
BUILTINS = ("cr3", "vcpu", "help", "quit", "exit")
# Commands whose --cr3 the shell's `cr3 HEX` stands in for when they give none.
ROOTED = ("translate", "vmmap", "read", "search")
HISTORY = "~/.qintrospect_history"
HISTORY_LENGTH = 2000
PROMPT = "qi> "
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminate(BaseException):
    """SIGTERM: leave the VM as found and exit (not caught as an ordinary error)."""


FILE_OPTIONS = ("--log", "--html", "--svg", "--out")


def completions(parsers: dict, line: str, begidx: int, text: str) -> list:
    """Candidates for the word being completed: command names first, then that command's
    options (file names after an option that takes a file)."""
    try:
        before = shlex.split(line[:begidx])
    except ValueError:
        before = line[:begidx].split()
    if not before:
        names = list(parsers) + list(BUILTINS)
    elif before[0] in parsers:
        if before[-1] in FILE_OPTIONS:
            return file_names(text)
        names = option_strings(parsers[before[0]]) if text.startswith("-") or not text else []
    elif before[0] == "cr3" and len(before) == 1:
        names = ["vcpu", "pid", "comm"]
    elif before[0] == "help" and len(before) == 1:
        names = list(parsers) + list(BUILTINS)
    else:
        names = []
    return sorted(n for n in names if n.startswith(text))


@contextlib.contextmanager
def deferred_signals():
    """SIGINT and SIGTERM held back (not lost) for the length of a run-state change: a pause
    and its resume are never cut in two; the signal is delivered right after."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Shell:
    """The loop. `vm` is an open Session; `hold` says the VM stays paused for the whole shell
    (--freeze, or gdb attached), else it is paused only while a command runs."""

    def __init__(self, vm, hold: bool, stdin=None, stdout=None, stderr=None,
                 interactive=None, parsers=None, verbose: bool = False):
        self.vm = vm
        self.hold = hold
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = _isatty(self.stdin) if interactive is None else interactive
        self.parsers = parsers or command_parsers(COMMANDS)
        self.verbose = verbose
        self.root = None            # `cr3 HEX`: the root translate/vmmap/read use by default
        self.guest = None           # `cr3 pid N` / `cr3 comm NAME`: ("pid"|"comm", value)
        self.status = 0             # the last failing command's status
        self.timings = []           # (command, seconds) of each command run
        self._readline = None
        self._paused_as_read = False   # the VM was paused when its registers were last read

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        if self.interactive:
            self._setup_readline()
            self._print(self.banner())
        try:
            while True:
                try:
                    line = self._read_line()
                except KeyboardInterrupt:
                    # Ctrl-C at the prompt clears the line (a second one: the same)
                    if self.interactive:
                        self._print("")
                    continue
                if line is None:                     # EOF
                    if self.interactive:
                        self._print("")
                    break
                if not self.execute(line):
                    break
        except Terminate:
            self.status = EXIT_TERMINATED
            print("qintrospect: terminated; the VM is left as found", file=self.stderr)
        finally:
            self._save_history()
        return self.status

    def execute(self, line: str) -> bool:
        """Run one line; False when the shell should end (quit/exit, or the VM is gone)."""
        try:
            words = split_line(line)
        except ValueError as exc:
            self._failed(2, f"qintrospect: cannot split the line: {exc}")
            return True
        if not words:
            return True
        if words[0] in ("quit", "exit"):
            if len(words) > 1:
                self._failed(2, f"qintrospect: {words[0]} takes no arguments")
                return True
            return False
        t0 = time.perf_counter()
        try:
            status = self._run(words)
        except SystemExit as exc:              # argparse: --help (0) or a usage error (2)
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        except QIError as exc:
            status = exc.exit_status
            print(f"qintrospect: {exc}", file=self.stderr)
            if isinstance(exc, VMGoneError) and not self._vm_reachable():
                self._failed(status, "qintrospect: the VM cannot be reached any more; "
                                     "leaving the shell")
                return False
        except KeyboardInterrupt:
            status = EXIT_INTERRUPTED
            print("qintrospect: interrupted; the VM was left as found", file=self.stderr)
        except BrokenPipeError:
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            return False
        except Exception as exc:   # a bug: say so; the shell goes on
            if self.verbose:
                traceback.print_exc(file=self.stderr)
            print(f"qintrospect: internal error: {type(exc).__name__}: {exc} (this is a bug; "
                  "start the shell with -v for the traceback)", file=self.stderr)
            status = 4
        seconds = time.perf_counter() - t0
        self.timings.append((words[0], seconds))
        if self.verbose:
            print(f"# {words[0]}: {seconds * 1000:.2f} ms, status {status}", file=self.stderr)
        try:
            self.stdout.flush()
        except BrokenPipeError:
            return False
        if status:
            self.status = status
        return True

    def _run(self, words) -> int:
        name = words[0]
        if name in BUILTINS:
            return self._builtin(name, words[1:])
        args = parse_command(self.parsers, words, builtins=BUILTINS)
        if self.verbose:
            args.verbose = True
        args.session = self.vm
        own_root = getattr(args, "cr3", None) or getattr(args, "phys", False) \
            or getattr(args, "find_cr3", False) or getattr(args, "guest_pid", None) is not None \
            or getattr(args, "guest_comm", None) is not None \
            or getattr(args, "kvm_vcpu", None) or getattr(args, "stage2", None)
        if self.root is not None and name in ROOTED and not own_root:
            args.cr3 = f"{self.root:#x}"
        elif self.guest is not None and name in ROOTED and not own_root:
            setattr(args, f"guest_{self.guest[0]}", self.guest[1])
        with self.paused():
            try:
                vcpu = args.vcpu
                if vcpu is None or vcpu == self.vm.vcpu:
                    return args.func(args)
                mine = self.vm.vcpu
                self._select_vcpu(vcpu)
                try:
                    return args.func(args)
                finally:
                    self._select_vcpu(mine)
            finally:
                self.vm.own_registers()     # --kvm-vcpu/--stage2 were for that command only

    # ---- the run state ------------------------------------------------------------------------

    @contextlib.contextmanager
    def paused(self):
        """The VM paused for one command: `stop` only if it runs now, the registers read
        again, `cont` after, only if our pause is still there (runguard's rules). A shell
        that holds the VM (--freeze, gdb) skips all that while the pause is still its own; a
        VM its owner resumed meanwhile is theirs again: paused per command from then on. A
        resume by someone else during the command is said after its output (exit 3): what
        QEMU sent by then is looked at (it tells every monitor at once), without a round
        trip, which a command on a paused VM would otherwise pay for nothing."""
        vm = self.vm
        guard = vm.guard
        guard.poll()                   # what QEMU said between commands
        if self.hold and guard.ours or \
                self._paused_as_read and guard.events_since_mark() == 0:
            # held by us; or found paused at the last command, with no event from QEMU since
            # (it tells every monitor of each resume, stop, reset...): it has not run, its
            # registers hold
            guard.begin()
            try:
                yield
            finally:
                guard.end()
            guard.check(sync=False)
            return
        self._paused_as_read = False
        guard.take_lock()        # (between commands another qintrospect may have held it)
        ours = fresh = done = False
        try:
            guard.mark()
            # a signal held back here is raised on leaving the block: inside the try, so
            # that a VM just stopped is resumed all the same
            with deferred_signals():
                status = guard.status()
                ours = guard.pause(status)
            guard.begin(status)
            vm.refresh()         # it may have run since the last command
            fresh = True
            yield
            done = True
        finally:
            guard.end()
            try:
                if ours:
                    with deferred_signals():
                        guard.resume()
                else:
                    self._paused_as_read = fresh
            finally:
                guard.release_lock()
        if done:     # what QEMU already said (with our resume, after a round trip)
            guard.check(sync=False)

    def _select_vcpu(self, index: int) -> None:
        """Session.select_vcpu; with gdb attached the stub goes back to virtual addresses for
        the thread switch (gdb reads memory at the new thread's PC, which must not be read as
        a guest-physical address: it could be a device's), then to physical again."""
        gdb = getattr(self.vm, "gdb", None)
        if gdb is None:
            self.vm.select_vcpu(index)
            return
        try:
            with deferred_signals():
                gdb.monitor_packet("Qqemu.PhyMemMode:0")
            self.vm.select_vcpu(index)
        finally:
            with deferred_signals():
                reply = gdb.monitor_packet("Qqemu.PhyMemMode:1")
            if reply != "OK":
                raise VMGoneError("the gdbstub refused to go back to physical addresses")

    def _vm_reachable(self) -> bool:
        try:
            self.vm.qmp.command("query-status")
            return True
        except Exception:
            return False

    # ---- built-in commands --------------------------------------------------------------------

    def _guest_root(self, kind: str, value: str) -> int:
        """`cr3 pid N` / `cr3 comm NAME`: that guest process's root (read from the guest
        kernel now, and again by each command: under KPTI the user copy for user addresses)."""
        from .frontend.addresses import parse_number
        key = parse_number(value, "pid") if kind == "pid" else value
        with self.paused():
            task = self.vm.guest_process(**{kind: key})
        self.root, self.guest = None, ("pid", task.pid)
        user = f", KPTI user copy {task.user_root:#x}" if task.user_root is not None else ""
        self._print(f"root: guest process {task.pid} ({task.comm}): {task.root:#x}{user}, for "
                    "translate, vmmap and read without --cr3")
        return 0

    def _builtin(self, name: str, rest) -> int:
        from .frontend.addresses import parse_number
        if name == "help":
            return self._help(rest)
        if name == "cr3":
            if not rest:
                self._print(f"root: {self.root:#x} (set by `cr3`)" if self.root is not None
                            else f"root: guest process {self.guest[1]}'s" if self.guest
                            else f"root: vCPU {self.vm.vcpu}'s {self._root_register()}")
                return 0
            if len(rest) == 2 and rest[0] in ("pid", "comm"):
                return self._guest_root(rest[0], rest[1])
            if len(rest) != 1:
                raise UsageError("cr3 HEX sets the root for translate/vmmap/read; `cr3 pid N` "
                                 "or `cr3 comm NAME` a guest process's; `cr3 vcpu` goes back "
                                 f"to the vCPU's {self._root_register()}")
            if rest[0] == "vcpu":
                self.root = self.guest = None
                self._print(f"root: vCPU {self.vm.vcpu}'s {self._root_register()}")
            else:
                self.root, self.guest = parse_number(rest[0], "cr3"), None
                self._print(f"root: {self.root:#x} for translate, vmmap and read without --cr3")
            return 0
        if name == "vcpu":
            if not rest:
                self._print(f"vCPU {self.vm.vcpu} of {len(self.vm.vcpu_info)}")
                return 0
            if len(rest) != 1:
                raise UsageError("vcpu N: whose registers the commands use")
            index = parse_number(rest[0], "vCPU")
            with self.paused():
                self._select_vcpu(index)
            self._print(f"vCPU {self.vm.vcpu}")
            return 0
        raise UsageError(f"unknown command {name!r}")

    def _root_register(self) -> str:
        """The register `cr3 HEX` stands in for (what --cr3 replaces): CR3, satp, or the
        process half's TTBR0 of the vCPU's regime (TTBR0_EL1; TTBR0_EL2 on a VHE host at
        EL2), from the registers the shell last read."""
        from . import paging
        return paging.root_register_name(self.vm.cpu, 0)

    def _help(self, rest) -> int:
        if rest:
            if rest[0] in self.parsers:
                self._print(self.parsers[rest[0]].format_help().rstrip()
                            + "\n\n(in the shell the attaching options are the shell's own)")
                return 0
            if rest[0] not in BUILTINS:
                raise UsageError(f"no command {rest[0]!r}")
        width = max(map(len, self.parsers))
        lines = ["commands (the command line's options; `help COMMAND` for them):"]
        for name, sub in self.parsers.items():
            lines.append(f"  {name:<{width}}  {getattr(sub, 'qi_summary', '')}")
        lines += ["",
                  "  cr3 HEX          translate/vmmap/read use this root when given no --cr3",
                  "  cr3 pid N        ... this guest process's root (`cr3 comm NAME` by name)",
                  "  cr3 vcpu         back to the vCPU's own root register (`cr3` alone says "
                  "which)",
                  "  vcpu N           use vCPU N's registers (`vcpu` alone says which)",
                  "  help [COMMAND]   this, or a command's options",
                  "  quit, exit, EOF  leave: the VM is put back as found"]
        self._print("\n".join(lines))
        return 0

    def banner(self) -> str:
        vm = self.vm
        info = vm.describe()
        found = info.get("status_found") or "?"
        if vm.gdb is not None:
            how = ("the gdbstub is attached for the whole shell, so the VM stays paused until "
                   "you leave (gdb's connection stops it; QEMU's stub and QMP `cont` do not mix "
                   "while gdb holds it)")
        elif self.hold:
            how = "the VM stays paused for the whole shell (--freeze)"
        else:
            how = "the VM is paused only while a command runs"
        put_back = "resumed" if found == "running" else "left as it was"
        gdb = info.get("gdb") or (f"none ({info['gdb_note']})" if info.get("gdb_note")
                                  else "none")
        return (f"qintrospect shell: QMP {info.get('qmp')}, gdb {gdb}, "
                f"vCPU {info.get('vcpu')} of {info.get('vcpus')}, memory via "
                f"{info.get('memory_path')}. The VM was {found}; {how}; on exit it is "
                f"{put_back}.\n`help` lists the commands; Tab completes; Ctrl-D or `quit` "
                "leaves.")

    # ---- input, history, completion -----------------------------------------------------------

    def prompt(self) -> str:
        if self.root is not None:
            return f"qi cr3={self.root:#x}> "
        if self.guest is not None:
            return f"qi pid={self.guest[1]}> "
        return PROMPT

    def _read_line(self):
        if self.interactive:
            try:
                return input(self.prompt())
            except EOFError:
                return None
        line = self.stdin.readline()
        return line if line else None

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:
            return
        self._readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        path = os.path.expanduser(HISTORY)
        try:
            if _own_regular_file(path):
                readline.read_history_file(path)
        except OSError:
            pass
        readline.set_completer_delims(" \t\n")
        readline.set_completer(self._complete)
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")

    def _complete(self, text, state):
        try:
            rl = self._readline
            found = completions(self.parsers, rl.get_line_buffer(), rl.get_begidx(), text)
            if state >= len(found):
                return None
            # Python's readline appends nothing to a completion: a whole word gets its space
            return found[state] if found[state].endswith("/") else found[state] + " "
        except Exception:
            return None

    def _save_history(self) -> None:
        if self._readline is None:
            return
        try:
            save_history(self._readline, os.path.expanduser(HISTORY))
        except OSError as exc:
            print(f"qintrospect: history not saved: {exc}", file=self.stderr)

    # ---- output -------------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def _failed(self, status: int, message: str) -> None:
        print(message, file=self.stderr)
        self.status = status


def save_history(readline, path: str) -> None:
    """The history, written to a fresh file of mode 0600 in the same folder and renamed over
    the old one: never readable by others, never written through a symlink."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".qintrospect_history.", dir=folder)
    try:
        os.fchmod(fd, 0o600)
        os.close(fd)
        readline.write_history_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _own_regular_file(path: str) -> bool:
    import stat
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run(args) -> int:
    """`qintrospect shell`: attach once (frontend.attaching.open_session), then
    run lines until quit/EOF/SIGTERM; the VM is put back as found."""
    from .frontend.attaching import open_session
    freeze_given = args.freeze
    if not args.gdb:
        args.freeze = True     # paused while attaching: one consistent first read
    try:
        vm = open_session(args)
    finally:
        args.freeze = freeze_given
    said = len(vm.warnings)      # open_session said these
    # held paused for the whole shell: --freeze, or gdb attached (given --gdb, the session
    # may do without it: a local QEMU's memory is read directly)
    hold = getattr(vm, "gdb", None) is not None or bool(freeze_given)
    old_term = None
    try:
        with deferred_signals():
            if not hold:
                vm.guard.resume()    # between commands it runs, as found (if it ran)
            old_term = signal.signal(signal.SIGTERM, _terminate)
        vm.release_lock()    # other commands may work on the VM between this shell's commands
        shell = Shell(vm, hold, verbose=bool(getattr(args, "verbose", False)))
        return shell.run()
    except Terminate:                    # before the loop took over
        print("qintrospect: terminated; the VM is left as found", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        vm.close()
        for warning in vm.warnings[said:]:
            print(f"qintrospect: warning: {warning}", file=sys.stderr)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _terminate(signum, frame):
    raise Terminate()
