"""qintrospect inside gdb: `qi translate|vmmap|find-cr3|read|ps`, on gdb's own connection.

A gdbstub takes one client, so a gdb already attached to QEMU (pwndbg, gef, gdb-pt-dump) gets
the commands itself:

    (gdb) target remote 127.0.0.1:1234
    (gdb) source /path/to/qintrospect/gdb.py     # puts the repository on sys.path itself
    (gdb) qi translate 0xffff888000100000
    (gdb) qi vmmap --user
    (gdb) qi find-cr3 --gva 0x55d0c0de1000 --expect 0x1234
    (gdb) qi read 0x7ffd5e8c1000 64 [--phys]
    (gdb) qi ps
    (gdb) qi translate --guest-comm probe 0x4b316d0

(`python import qintrospect.gdb` does the same when gdb's Python can import qintrospect.)

The options and output are the command line's (its own argparse subparsers and command
functions, run on a session built from gdb's connection):
- registers: cr0, cr3, cr4, efer (and cs) of gdb's selected thread (= vCPU), read through
  gdb before anything else;
- guest-physical memory: gdb's own reads with the stub in QEMU's physical mode
  (`Qqemu.PhyMemMode:1` for the length of one qi command, then the mode found put back), or,
  when QEMU runs on this host and its memory proves to hold this VM's RAM, the QEMU process
  itself (`qi set via gdb` keeps to the stub);
- the RAM map: `monitor info mtree -f` and `monitor gpa2hva 0x...` (every monitor line is
  checked against qintrospect's read-only allowlist first); only RAM regions are ever read,
  never a device;
- the host side: /proc/PID/pagemap of the local QEMU (its pid from the gdbstub's socket peer,
  or `qi set pid N`), and QMP only when given (`qi set qmp PATH`: phys-bits, pdpe1gb,
  query-kvm).
qi never continues, detaches or writes: the VM stays as gdb holds it. `$qi_status` holds the
last qi command's exit status (the command line's: 0, 1 fault, 2 usage, 3 attach).
"""

if __name__ != "qintrospect.gdb":       # sourced into gdb's __main__: what we add goes again
    _qi_names_before = set(globals())

import os as _os                         # noqa: E402
import sys as _sys                       # noqa: E402


def _qi_bootstrap(path: str) -> None:
    """Sourced by path: the repository on sys.path, and, when gdb's Python lacks qintrospect's
    dependencies (numpy), the repository's .venv of the same Python version after gdb's own."""
    repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(path)))
    if repo not in _sys.path:
        _sys.path.insert(0, repo)
    try:
        import numpy  # noqa: F401
    except ImportError:
        import glob
        version = f"python{_sys.version_info[0]}.{_sys.version_info[1]}"
        for site in glob.glob(_os.path.join(repo, ".venv", "lib*", version, "site-packages")):
            if site not in _sys.path:
                _sys.path.append(site)
        try:    # now, not in a command: a Ctrl-C inside numpy's import would break it for good
            import numpy  # noqa: F401,F811
        except ImportError:
            pass        # each command says what is missing


def _forget_imports_since(before: set) -> None:
    """A Ctrl-C that lands inside an import can leave a package half built in sys.modules, and
    every later command would fail on it. qintrospect's own modules that the command brought in
    are dropped, to be imported afresh. (numpy's cannot be: its C core loads once per process;
    it is imported when this file is sourced, before any command.)"""
    for name in set(_sys.modules) - before:
        if name == "qintrospect" or name.startswith("qintrospect."):
            _sys.modules.pop(name, None)


if __name__ != "qintrospect.gdb":       # `source .../qintrospect/gdb.py`: gdb's __main__
    _qi_bootstrap(__file__)
    _qi_fresh = "qintrospect.gdb" not in _sys.modules

import re as _re                         # noqa: E402
from typing import Optional as _Optional  # noqa: E402

import gdb                               # noqa: E402  (only inside gdb)

MASK64 = (1 << 64) - 1
QI_COMMANDS = ("translate", "vmmap", "find-cr3", "read", "search", "ps")
_QI_WORDS = QI_COMMANDS + ("set", "show", "help")
_SETTINGS = ("qmp", "pid", "via", "timeout")
OWN_OPTION = ("does not apply inside gdb: qi uses gdb's own connection (`qi set qmp|pid|via` "
              "for the rest; the vCPU is gdb's selected thread)")


class _QiSettings:
    """`qi set NAME VALUE`: kept for the gdb session."""

    def __init__(self):
        self.qmp: _Optional[str] = None
        self.pid: _Optional[int] = None
        self.via = "auto"
        self.timeout = 5.0
        self.proven = {}          # (connection, pid) -> True: that QEMU holds this VM's RAM

    def show(self) -> str:
        return (f"qmp {self.qmp or 'none (the host side from the gdbstub peer and pagemap)'}\n"
                f"pid {self.pid if self.pid is not None else 'auto (the gdbstub socket peer)'}\n"
                f"via {self.via}\ntimeout {self.timeout:g}")


_qi_settings = _QiSettings()


# ---- gdb's connection to QEMU's gdbstub ---------------------------------------------------------

class _QiStub:
    """Packets, monitor lines and registers through gdb's own connection, and the stub's
    memory mode, switched to physical for one qi command at the most."""

    def __init__(self):
        from qintrospect.errors import AttachError
        inferior = gdb.selected_inferior()
        self.connection = getattr(inferior, "connection", None)
        if hasattr(inferior, "connection"):          # gdb 12 and later
            attached = self.connection is not None and \
                getattr(self.connection, "type", "remote") in ("remote", "extended-remote")
        else:                                        # older: no connection objects, no peer
            attached = bool(inferior.threads())
        if not attached:
            raise AttachError("gdb is not attached to a gdbstub: `target remote HOST:PORT` "
                              "first (QEMU's -gdb)")
        self.inferior = inferior
        self._found: _Optional[str] = None     # the memory mode found, once we changed it

    @property
    def details(self) -> _Optional[str]:
        return getattr(self.connection, "details", None)

    def key(self):
        return (getattr(self.connection, "num", None), self.details)

    def packet(self, text: str) -> str:
        """One raw packet and the stub's reply."""
        from qintrospect.connect.gdbstub import one_line
        one_line(text)
        send = getattr(self.connection, "send_packet", None)
        if send is not None:
            reply = send(text)
            return reply.decode("latin-1") if isinstance(reply, (bytes, bytearray)) else reply
        out = gdb.execute(f"maint packet {text}", to_string=True)
        m = _re.search(r'received: "(.*)"', out)
        return m.group(1) if m else ""

    def monitor(self, line: str) -> str:
        """One HMP line through the stub (QEMU's gdbstub passes `monitor` to HMP), checked
        against the read-only allowlist before it is sent."""
        from qintrospect.errors import AttachError
        from qintrospect.connect.gdbstub import one_line
        from qintrospect.connect.qmp import check_allowed
        check_allowed("human-monitor-command", {"command-line": line})
        one_line(line)
        try:
            return gdb.execute(f"monitor {line}", to_string=True)
        except gdb.error as exc:
            if str(exc).strip() == "Quit":
                raise KeyboardInterrupt() from None
            raise AttachError(f"`monitor {line}` failed: {exc}; qi needs QEMU's gdbstub, "
                              "which passes monitor commands to its HMP") from None

    def registers(self) -> dict:
        """The selected thread's control registers (and cs), read through gdb's frame 0."""
        from qintrospect.errors import AttachError, UsageError
        thread = gdb.selected_thread()
        if thread is None:
            raise AttachError("gdb has no thread selected: `target remote` to QEMU's gdbstub")
        if thread.is_running():
            raise UsageError("the selected thread is running (background or non-stop "
                             "execution); interrupt it first: qi reads a stopped VM")
        frame = gdb.newest_frame()
        out = {}
        for name in ("cr0", "cr3", "cr4", "efer", "cs", "pkru", "pkrs"):
            try:
                out[name] = int(frame.read_register(name)) & MASK64
            except (ValueError, gdb.error):
                if name in ("pkru", "pkrs"):
                    continue        # QEMU's stub shows neither (up to 10.0): said per access
                raise AttachError(f"gdb's target shows no {name} register; qi needs "
                                  "qemu-system-x86_64's gdbstub") from None
        return out

    def ensure_physical(self) -> None:
        """Memory packets to guest-physical addresses, the mode found written down first."""
        from qintrospect.errors import AttachError
        if self._found is not None:
            return
        found = self.packet("qqemu.PhyMemMode")
        if found not in ("0", "1"):
            raise AttachError("this gdbstub has no physical-memory mode (qqemu.PhyMemMode "
                              f"answered {found!r}); qi needs QEMU's gdbstub")
        self._found = found
        if found != "1" and self.packet("Qqemu.PhyMemMode:1") != "OK":
            self._found = None
            raise AttachError("the gdbstub refused Qqemu.PhyMemMode:1")

    def restore(self) -> None:
        """The memory mode put back as found (nothing to do if we never changed it)."""
        found, self._found = self._found, None
        if found is not None and found != "1":
            reply = self.packet(f"Qqemu.PhyMemMode:{found}")
            if reply != "OK":
                raise gdb.GdbError(f"qintrospect: the gdbstub did not go back to memory mode "
                                   f"{found} ({reply!r}); `maint packet Qqemu.PhyMemMode:"
                                   f"{found}` puts it back")


def _qi_memory_class():
    from qintrospect.errors import MemoryReadError, VMGoneError
    from qintrospect.memory.guest import PhysicalMemory

    class GdbPhysicalMemory(PhysicalMemory):
        """Guest-physical reads through gdb's own connection (RamMap-checked: RAM only)."""

        name = "gdb"
        CHUNK = 4096

        def __init__(self, ram_map, stub):
            super().__init__(ram_map)
            self.stub = stub

        def _read(self, gpa, length):
            self.stub.ensure_physical()
            parts = []
            for off in range(0, length, self.CHUNK):
                n = min(self.CHUNK, length - off)
                try:
                    parts.append(bytes(self.stub.inferior.read_memory(gpa + off, n)))
                except gdb.MemoryError as exc:
                    raise MemoryReadError(f"gdb could not read {n} bytes at guest-physical "
                                          f"{gpa + off:#x}: {exc}", gpa + off) from None
                except gdb.error as exc:
                    if str(exc).strip() == "Quit":      # Ctrl-C reached gdb's own code
                        raise KeyboardInterrupt() from None
                    raise VMGoneError(f"gdb lost the gdbstub while reading: {exc}") from None
            return b"".join(parts)

    return GdbPhysicalMemory


class _QiMonitor:
    """What Session asks of a monitor, answered on gdb's connection: HMP lines through
    `monitor`, QMP commands only when `qi set qmp` gave a socket. Never stop or cont."""

    def __init__(self, stub, qmp=None):
        self.stub = stub
        self.qmp = qmp
        # QMP's events when a socket was given (a resume behind gdb's back), else none
        self.listeners = qmp.listeners if qmp is not None else []
        self.after_reply = qmp.after_reply if qmp is not None else []

    def poll(self) -> None:
        if self.qmp is not None:
            self.qmp.poll()

    def sync(self) -> None:
        if self.qmp is not None:        # (without QMP there are no events to wait for)
            self.qmp.sync()

    def command(self, name: str, **arguments):
        from qintrospect.connect.qmp import QmpCommandError, check_allowed
        check_allowed(name, arguments)
        if name in ("stop", "cont"):
            raise QmpCommandError(f"qi never sends {name}: the VM stays as gdb holds it")
        if name == "human-monitor-command":
            if arguments.get("cpu-index") is not None:
                raise QmpCommandError("HMP through the gdbstub has no cpu-index")
            return self.stub.monitor(arguments["command-line"])
        if self.qmp is None:
            raise QmpCommandError(f"QMP {name} needs a QMP socket (`qi set qmp PATH`)")
        return self.qmp.command(name, **arguments)

    def hmp(self, command_line: str, cpu_index=None) -> str:
        args = {"command-line": command_line}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        return self.command("human-monitor-command", **args)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None


def _qi_source(stub, settings):
    """The Session source of a gdb already attached (connect.sources has the sockets' one):
    registers from gdb's selected thread, memory through gdb's connection (or the QEMU
    process, once it proves to hold this VM's RAM), the stub's monitor for HMP and QMP when
    `qi set qmp` gave a socket. It never changes the run state: gdb holds the VM."""
    from qintrospect.connect.peers import socket_owner
    from qintrospect.connect.qmp import QmpMonitor, parse_address
    from qintrospect.connect.runguard import RunGuard
    from qintrospect.connect.sources import find_process, use_memory
    from qintrospect.errors import AttachError, QIError, UsageError
    from qintrospect.machine.cpu import Vcpu
    from qintrospect.machine.rammap import RamMap
    from qintrospect.machine.vcpus import Vcpus

    memory_class = _qi_memory_class()

    class GdbSource:
        via_option = "qi set via"

        def __init__(self):
            target = stub.details or "gdb's connection"
            self.label = f"gdb {target}"
            try:
                self.gdb_address = parse_address(target, "gdb's target", allow_remote=True)
            except UsageError:
                self.gdb_address = target

        def monitor(self):
            qmp = None
            if settings.qmp:
                qmp = QmpMonitor(parse_address(settings.qmp, "qi set qmp"),
                                 settings.timeout).connect()
            return _QiMonitor(stub, qmp)

        def hold(self, vm):
            """gdb holds the run state: watched (a resume through QMP), never changed."""
            status = {"status": "debug", "running": False}
            if vm.qmp.qmp is not None:
                status = vm.qmp.command("query-status")
                if status.get("running"):      # no cache: it may change under us
                    vm.warnings.append("the VM runs although gdb is attached (resumed "
                                       "through QMP?): what qi reads may change meanwhile")
            guard = RunGuard(self.monitor, self.label, None, settings.timeout, vm.warnings)
            guard.observe(vm.qmp, status)
            return guard

        def attach(self, vm):
            regs = stub.registers()        # first: gdb may read at PC (virtual mode)
            threads = sorted(stub.inferior.threads(), key=lambda t: t.ptid[1])
            thread = gdb.selected_thread()
            index = thread.ptid[1] - 1 if thread.ptid[1] > 0 else thread.num - 1
            try:
                listing = vm.qmp.command("query-cpus-fast")
            except QIError:
                listing = [{"cpu-index": t.ptid[1] - 1} for t in threads]
            if not 0 <= index < len(listing):
                raise AttachError(f"gdb's thread {thread.num} is not a vCPU QEMU lists")
            vm.facts = Vcpus(vm.qmp, listing)
            vm.vcpu = index
            info = listing[index]
            vcpu = Vcpu(index, info.get("thread-id"), info.get("qom-path"), regs["cr0"],
                        regs["cr3"], regs["cr4"], regs["efer"], regs["cs"],
                        regs.get("pkru"), regs.get("pkrs"))
            vm.vcpu_info = [None] * len(listing)
            vm.vcpu_info[index] = vcpu
            vm.cpu = vm.facts.cpu_state(vcpu)
            vm.ram_map = RamMap.from_qmp(vm.qmp)     # monitor info mtree -f, gpa2hva
            pid, how = settings.pid, "qi set pid"
            if pid is None:
                how = "the gdbstub's socket peer"
                try:   # only a local stub's owner is this host's process (read from the
                    # kernel's socket tables: connecting would queue behind gdb, and QEMU
                    # would stop the VM when it took that connection after gdb left)
                    pid = socket_owner(parse_address(stub.details or "", "gdb's target"))
                except (UsageError, OSError):
                    pid = None
            find_process(vm, pid, how, "QEMU's process was not found (a remote gdbstub?); "
                                      "`qi set pid N` gives it")
            use_memory(vm, memory_class(vm.ram_map, stub), self)

        def proved(self, vm) -> bool:
            """A proof made earlier in this gdb session, for this connection and process."""
            return bool(settings.proven.get((stub.key(), vm.process.pid)))

        def remember(self, vm) -> None:
            settings.proven[(stub.key(), vm.process.pid)] = True

        def monitor_memory(self, vm):
            return memory_class(vm.ram_map, stub)     # (qi never takes --via qmp)

        def refresh(self, vm):
            raise AttachError("qi reads afresh at every command")

        def detach(self, vm):
            pass

    return GdbSource()


# ---- the qi command -----------------------------------------------------------------------------

_QI_HELP = """qi COMMAND ...: qintrospect on gdb's own connection to QEMU's gdbstub
  qi translate ADDR... [--cr3 HEX | --guest-pid N | --guest-comm NAME]
                       [--find-cr3 --expect V] [--json] [--no-bits] [--brief]
  qi vmmap [--cr3 HEX | --guest-pid N] [--leaf] [--user|--kernel] [--writable] [--exec]
           [--range A-B] [--gpa] [--hpa] [--json]
  qi find-cr3 [--gva ADDR [--expect VALUE]] [--guest-pid N] [--json]
  qi read ADDR LEN [--phys | --cr3 HEX | --guest-pid N] [--json]
  qi search PATTERN [--hex|--u16|--u32|--u64] [--phys | --cr3 HEX | --guest-pid N]
           [--user|--kernel] [--writable] [--exec] [--range A-B] [--align N] [--max N]
           [--json]
  qi ps [--json]             the guest's processes, from its kernel's own memory
  qi help [COMMAND]          a command's options (the command line's own)
  qi set qmp PATH|none       QMP for the host side (phys-bits, pdpe1gb, query-kvm)
  qi set pid N|auto          the QEMU process (default: the gdbstub's local socket peer)
  qi set via auto|gdb|direct where guest-physical memory is read (auto: the local QEMU
                             process when it proves to hold this VM's RAM, else the stub)
  qi set timeout SECONDS     for QMP
  qi show                    the settings
The vCPU is gdb's selected thread (`thread N`). qi never continues, detaches or writes;
$qi_status holds the last command's exit status."""


class _QiCommand(gdb.Command):
    """qintrospect on gdb's own connection to QEMU's gdbstub: `qi help` lists the commands."""

    def __init__(self):
        super().__init__("qi", gdb.COMMAND_DATA)
        self._parsers = None

    @property
    def parsers(self) -> dict:
        if self._parsers is None:
            from qintrospect.frontend.lines import command_parsers
            self._parsers = command_parsers(QI_COMMANDS)
        return self._parsers

    def invoke(self, argument, from_tty):
        from qintrospect.errors import QIError
        words = gdb.string_to_argv(argument)
        status = 0
        imported = set(_sys.modules)
        try:
            status = self._dispatch(words)
        except SystemExit as exc:        # argparse: --help (0), or a usage error it printed
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            if status:
                self._status(status)
                raise gdb.GdbError("qi: bad usage (see above; `qi help`)") from None
        except QIError as exc:
            self._status(exc.exit_status)
            raise gdb.GdbError(f"qintrospect: {exc}") from None
        except (gdb.GdbError, KeyboardInterrupt):
            if _sys.exc_info()[0] is KeyboardInterrupt:
                _forget_imports_since(imported)
            self._status(130 if _sys.exc_info()[0] is KeyboardInterrupt else 2)
            raise
        except ImportError as exc:       # gdb's own Python lacks a dependency
            self._status(3)
            version = f"{_sys.version_info[0]}.{_sys.version_info[1]}"
            raise gdb.GdbError(f"qintrospect: gdb's Python {version} cannot import "
                               f"{exc.name or exc}: install it for that Python (numpy: "
                               f"Debian's python3-numpy; qemu.qmp: pip), or give the "
                               f"repository a .venv of Python {version}") from None
        except Exception as exc:         # a bug: say so briefly
            self._status(4)
            raise gdb.GdbError(f"qintrospect: internal error: {type(exc).__name__}: {exc} "
                               "(this is a bug)") from None
        self._status(status)

    @staticmethod
    def _status(status: int) -> None:
        try:
            gdb.set_convenience_variable("qi_status", status)
        except Exception:
            pass

    def _dispatch(self, words) -> int:
        from qintrospect.errors import UsageError
        from qintrospect.frontend.lines import parse_command
        if not words or words[0] == "help":
            if len(words) > 1 and words[1] in self.parsers:
                print(self.parsers[words[1]].format_help().rstrip()
                      + "\n\n(in gdb, the attaching options do not apply: qi uses gdb's "
                        "connection; the vCPU is gdb's selected thread)")
            else:
                print(_QI_HELP)
            return 0
        name = words[0]
        if name == "set":
            return self._set(words[1:])
        if name == "show":
            print(_qi_settings.show())
            return 0
        if name not in self.parsers:
            raise UsageError(f"qi {name}: unknown; qi knows {', '.join(_QI_WORDS)} (`qi help`)")
        args = parse_command(self.parsers, words, OWN_OPTION)
        if args.vcpu is not None:
            raise UsageError("--vcpu: in gdb the vCPU is the selected thread (`thread N`)")
        return run_command(args)

    def _set(self, rest) -> int:
        from qintrospect.frontend.addresses import parse_number
        from qintrospect.errors import UsageError
        from qintrospect.connect.qmp import parse_address
        if len(rest) != 2 or rest[0] not in _SETTINGS:
            raise UsageError("qi set qmp PATH|none, qi set pid N|auto, qi set via "
                             "auto|gdb|direct, qi set timeout SECONDS")
        what, value = rest
        if what == "qmp":
            if value == "none":
                _qi_settings.qmp = None
            else:
                parse_address(value, "qi set qmp")
                _qi_settings.qmp = value
        elif what == "pid":
            _qi_settings.pid = None if value == "auto" else parse_number(value, "pid")
        elif what == "via":
            if value not in ("auto", "gdb", "direct"):
                raise UsageError(f"qi set via {value}: auto, gdb or direct")
            _qi_settings.via = value
        else:
            try:
                seconds = float(value)
            except ValueError:
                raise UsageError(f"qi set timeout {value}: a number of seconds") from None
            if seconds <= 0:
                raise UsageError(f"qi set timeout {value}: must be positive")
            _qi_settings.timeout = seconds
        return 0

    def complete(self, text, word):
        from qintrospect.frontend.lines import file_names
        from qintrospect.frontend.options import option_strings
        word = word or ""
        # gdb breaks words at '-' too: complete the whole token, hand back the part after word
        token = "" if not text.strip() or text.endswith((" ", "\t")) else text.split()[-1]
        cut = len(token) - len(word)
        if cut < 0:
            return []
        words = text[:len(text) - len(token)].split()
        if not words:
            names = _QI_WORDS
        elif words[0] == "set" and len(words) == 1:
            names = _SETTINGS
        elif words[0] == "set" and words[1:] == ["via"]:
            names = ("auto", "gdb", "direct")
        elif words[0] == "set" and words[1:] == ["qmp"]:
            names = file_names(token)
        elif words[0] == "help" and len(words) == 1:
            names = QI_COMMANDS
        elif words[0] in self.parsers:
            names = [o for o in option_strings(self.parsers[words[0]]) if o != "--vcpu"]
        else:
            return []
        return [n[cut:] for n in names if n.startswith(token)]


def run_command(args) -> int:
    """One command's action (frontend.actions.cmd_translate, ...) on a session built from
    gdb's connection; the stub's memory mode is put back whatever happens."""
    stub = _QiStub()
    try:
        from qintrospect.connect.session import Session
        vm = Session(pid=_qi_settings.pid, via=_qi_settings.via, timeout=_qi_settings.timeout,
                     source=_qi_source(stub, _qi_settings)).open()
        try:
            for warning in vm.warnings:
                print(f"qintrospect: warning: {warning}", file=_sys.stderr)
            args.session = vm
            return args.func(args)
        finally:
            vm.close()
    finally:
        stub.restore()


def register() -> None:
    """Define (or define again) the `qi` command in this gdb."""
    _QiCommand()


if __name__ == "qintrospect.gdb":
    register()
else:                                   # sourced: the module holds the command and settings
    import importlib as _importlib
    _qi_module = _importlib.import_module("qintrospect.gdb")   # defines `qi` when first imported
    if not _qi_fresh:
        _qi_module.register()           # sourced again: defined again
    for _qi_name in set(globals()) - _qi_names_before - {"_qi_name"}:
        del globals()[_qi_name]
    del _qi_name
