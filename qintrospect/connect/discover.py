"""Finding the VMs on this host: every QEMU process this user can see, what its command line
says (read by cmdline.py), and whether its endpoints answer.

Whether an endpoint answers: a QMP socket is connected to, its greeting read and, when it
greets, `query-status` and `query-kvm` asked (every message through qmp.check_allowed). A QMP
socket serves one client at a time, so one with a client already connected (seen in
/proc/PID/net) is "in use" and is not connected to. A gdbstub is never connected to (a debugger
connecting stops the VM): it is "listening" when QEMU holds a listening socket on it
(/proc/PID/net/tcp, tcp6, unix + /proc/PID/fd), "in use" when a debugger is connected.
"""

import json
import os
import pwd
import re
import socket
import time
from typing import Dict, List, Optional, Tuple

from ..errors import AttachError, QIError, UsageError
from .cmdline import Endpoint, QemuConfig, connect_host, is_local_bind, parse_command_line
from .jsonl_socket import JsonLines, ProtocolError
from .libvirt_monitor import DEFAULT_URI
from .qmp import (GREETING_TIMEOUT, await_reply, check_allowed, check_greeting, greeting_version,
                  sample as qmp_sample)
from ..record import field, record
from ..present.textsafe import printable

PROBE_MAX_LINE = 1 << 20         # the longest line the QMP probe takes (a greeting is ~150 bytes)


QEMU_PROGRAM = re.compile(r"^(qemu-system-[A-Za-z0-9_.-]+|qemu-kvm|qemu)$")


# ---- QEMU's option syntax -----------------------------------------------------------------------


# ---- what one QEMU command line says ------------------------------------------------------------


# ---- the QEMU processes on this host ------------------------------------------------------------

@record
class QemuProcess:
    pid: int
    argv: List[str]
    exe: Optional[str]
    uid: Optional[int]
    user: Optional[str]
    config: QemuConfig
    libvirt: Optional[dict] = None      # {"uri", "domain", "id", "state"} when libvirt says
    notes: List[str] = field(default_factory=list)
    exe_qemu: Optional[bool] = None     # /proc/PID/exe is a QEMU program (None: not readable)

    @property
    def name(self) -> Optional[str]:
        return self.config.name

    @property
    def run_state(self) -> Optional[str]:
        if self.libvirt and self.libvirt.get("state"):
            return self.libvirt["state"]
        for ep in self.config.qmp:
            if ep.run_state:
                return ep.run_state
        return None

    @property
    def accel(self) -> str:
        """The accelerator in use when QMP said (query-kvm), else what was asked for."""
        for ep in self.config.qmp:
            if ep.kvm is not None:
                return "kvm" if ep.kvm else next(
                    (a for a in self.config.accel if a != "kvm"), "tcg")
        return self.config.accel[0] if len(self.config.accel) == 1 else \
            ":".join(self.config.accel) + ("?" if self.config.accel_source == "default" else "")

    def to_dict(self) -> dict:
        c = self.config
        return {"pid": self.pid, "name": c.name, "uuid": c.uuid, "exe": self.exe,
                "uid": self.uid, "user": self.user, "accel": self.accel,
                "accel_requested": c.accel, "accel_source": c.accel_source,
                "ram": c.ram, "ram_source": c.ram_source, "maxmem": c.maxmem,
                "state": self.run_state, "paused_at_start": c.paused_at_start,
                "qmp": [e.to_dict() for e in c.qmp], "hmp": [e.to_dict() for e in c.hmp],
                "gdb": c.gdb.to_dict() if c.gdb else None,
                "libvirt": self.libvirt, "libvirt_started": c.libvirt,
                "attach": self.attach_hint(), "exe_is_qemu": self.exe_qemu,
                "notes": c.notes + self.notes}

    def attach_hint(self) -> Optional[str]:
        if self.libvirt and self.libvirt.get("domain"):
            uri = self.libvirt.get("uri")
            return f"--domain {self.libvirt['domain']}" + (f" --connect {uri}" if uri and
                                                          uri != DEFAULT_URI else "")
        if any(e.state == "answers" for e in self.config.qmp):
            return f"--pid {self.pid}"
        return None


_HELPERS = ("qemu-img", "qemu-nbd", "qemu-ga", "qemu-storage", "qemu-io", "qemu-pr-helper")


def _is_qemu(pid: str, argv: List[str]) -> Tuple[bool, Optional[str], Optional[bool]]:
    """(argv[0], comm or the executable call it QEMU, its executable, whether that executable
    is a QEMU program: None when /proc/PID/exe cannot be read, e.g. another user's process).

    A process names itself: argv[0] and comm are whatever it chose, so they only make it a
    candidate. /proc/PID/exe is the file that really runs: when its name is no QEMU's (a
    script, an interpreter, any program started as `exec -a qemu-system-x86_64`), read_process
    notes it on the row. A name, not a proof: a copy of any program can be named as QEMU. That
    a process holds a VM's RAM is proved where it matters (README, Safety: the pagemap
    process is used only after pages read the same through it and through QMP or gdb)."""
    exe = None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        if exe.endswith(" (deleted)"):          # QEMU upgraded under a running VM
            exe = exe[:-10]
    except OSError:
        pass
    names = [os.path.basename(exe)] if exe else []
    if argv:
        names.append(os.path.basename(argv[0]))
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:      # any bytes: prctl(PR_SET_NAME)
            names.append(f.read().rstrip(b"\n").decode("utf-8", "surrogateescape"))
    except OSError:
        pass
    # "qemu-system-x86" is what comm keeps of qemu-system-x86_64 (15 characters)
    ok = any(QEMU_PROGRAM.fullmatch(n) for n in names) and \
        not any(n.startswith(_HELPERS) for n in names)
    return ok, exe, None if exe is None else _qemu_executable(os.path.basename(exe))


def _qemu_executable(name: str) -> bool:
    """Whether an executable's file name is a QEMU system emulator's: qemu-system-*,
    qemu-kvm, qemu, and wrapped ones that keep the name (Nix's .qemu-system-x86_64-wrapped)."""
    if name.startswith(_HELPERS):
        return False
    return bool(QEMU_PROGRAM.fullmatch(name) or re.search(r"qemu-(system-|kvm)", name))


def _read_argv(pid: str) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw:
        return None     # a zombie or a kernel thread
    return [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def _uid(pid: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _user(uid: Optional[int]) -> Optional[str]:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def read_process(pid: int) -> Optional[QemuProcess]:
    """The QEMU process `pid` with its command line parsed, or None if it is not QEMU (or
    gone, or hidden from this user)."""
    p = str(pid)
    argv = _read_argv(p)
    if not argv:
        return None
    ok, exe, exe_qemu = _is_qemu(p, argv)
    if not ok:
        return None
    try:
        cwd = os.readlink(f"/proc/{p}/cwd")
    except OSError:
        cwd = None
    uid = _uid(p)
    proc = QemuProcess(pid, argv, exe, uid, _user(uid), parse_command_line(argv, cwd),
                       exe_qemu=exe_qemu)
    if exe_qemu is False:
        proc.notes.append(f"not QEMU? its executable is {exe}: only its own name (argv[0] or "
                          "comm) says QEMU")
    if cwd is None and any(e.transport == "unix" and e.path and not os.path.isabs(e.path)
                           for e in proc.config.qmp + ([proc.config.gdb] if proc.config.gdb
                                                       else [])):
        proc.notes.append("a socket path is relative to QEMU's folder, which this user cannot "
                          "see")
    return proc


def processes() -> List[QemuProcess]:
    """Every QEMU process whose command line this user can read, by pid."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        proc = read_process(int(entry))
        if proc is not None:
            out.append(proc)
    return sorted(out, key=lambda p: p.pid)


# ---- sockets: who listens, who is connected -----------------------------------------------------

@record
class SocketTables:
    """One QEMU process's view of sockets: its own socket inodes (None when its fds cannot be
    read), and its network namespace's TCP and Unix tables."""
    inodes: Optional[set]
    tcp: List[Tuple[int, int, int]]          # (local port, state, inode)
    unix: List[Tuple[int, int, int, str]]    # (flags, state, inode, path)
    same_netns: bool = True

    @classmethod
    def of(cls, pid: int) -> "SocketTables":
        inodes: Optional[set] = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        except OSError:
            inodes = None
        tcp = []
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{pid}/net/{table}") as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        tcp.append((int(fields[1].rsplit(":", 1)[1], 16), int(fields[3], 16),
                                    int(fields[9])))
            except (OSError, StopIteration, IndexError, ValueError):
                continue
        unix = []
        try:
            with open(f"/proc/{pid}/net/unix") as f:
                next(f)
                for line in f:
                    fields = line.split(None, 7)
                    if len(fields) < 7:
                        continue
                    path = fields[7].rstrip("\n") if len(fields) > 7 else ""
                    unix.append((int(fields[3], 16), int(fields[5], 16), int(fields[6]), path))
        except (OSError, StopIteration, ValueError):
            pass
        same = True
        try:
            same = os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
        except OSError:
            pass
        return cls(inodes, tcp, unix, same)

    def _mine(self, inode: int) -> bool:
        return self.inodes is None or inode in self.inodes

    def tcp_state(self, port: int) -> Tuple[bool, int]:
        """(QEMU listens on the port, connections QEMU has accepted on it)."""
        listening = any(p == port and st == 0x0A and self._mine(ino) for p, st, ino in self.tcp)
        clients = sum(1 for p, st, ino in self.tcp
                      if p == port and st == 0x01 and self.inodes is not None
                      and ino in self.inodes)
        return listening, clients

    def unix_state(self, path: str) -> Tuple[bool, int]:
        listening = any(pth == path and flags & 0x10000 and self._mine(ino)
                        for flags, st, ino, pth in self.unix)
        clients = sum(1 for flags, st, ino, pth in self.unix
                      if pth == path and st == 3 and not flags & 0x10000
                      and self.inodes is not None and ino in self.inodes)
        return listening, clients

    def fd_socket(self, pid: int, fd: int) -> Optional[Tuple[int, str]]:
        """(flags, path) of the Unix socket behind QEMU's fd, if it is one."""
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            return None
        if not link.startswith("socket:["):
            return None
        inode = int(link[8:-1])
        for flags, st, ino, pth in self.unix:
            if ino == inode:
                return flags, pth
        return None


def check_endpoints(proc: QemuProcess, timeout: float = GREETING_TIMEOUT,
                    qmp: bool = True) -> None:
    """Fill in each endpoint's state: QMP ones asked (greeting, query-status, query-kvm) when
    free, gdbstubs only looked up in the socket tables (never connected to)."""
    tables = SocketTables.of(proc.pid)
    owner_note = "" if tables.inodes is not None else \
        " (QEMU's sockets cannot be listed by this user: whose socket it is was not checked)"
    for ep in proc.config.qmp + ([proc.config.gdb] if proc.config.gdb else []):
        if ep.transport == "fd" and ep.fd is not None:
            found = tables.fd_socket(proc.pid, ep.fd)
            if found is not None and found[1] and found[1] != "@":
                ep.path = found[1]
                if found[1].startswith("@"):
                    ep.abstract = True
            if ep.owner is None and ep.problem is None:
                if found is None:
                    ep.problem = f"a file descriptor (fd={ep.fd}) this user cannot follow"
                elif not found[0] & 0x10000 or not found[1]:
                    ep.problem = ("a socket handed over by the process that started QEMU "
                                  "(fd=N, not listening on a path): only that process talks "
                                  "to it")
                else:
                    ep.transport = "unix"     # a listening socket on a path: reachable
        if not ep.usable:
            ep.state = "libvirt" if ep.owner == "libvirt" else None
            continue
        if not tables.same_netns and ep.transport == "tcp":
            ep.state, ep.detail = "not checked", "QEMU is in another network namespace"
            continue
        if ep.transport == "tcp":
            if not is_local_bind(ep.host):
                ep.state, ep.detail = "not checked", (f"bound to {ep.host}, not loopback: "
                                                      "qintrospect needs --allow-remote")
                continue
            listening, clients = tables.tcp_state(ep.port)
        else:
            listening, clients = tables.unix_state(ep.path)
        if not listening:
            ep.state = "not listening"
            ep.detail = ("QEMU holds no listening socket there" if tables.inodes is not None
                         else "no listening socket there")
            continue
        if clients:
            ep.state = "in use"
            ep.detail = ("a debugger is connected" if ep.role == "gdb" else
                         "another client is connected (QEMU serves one at a time)")
            continue
        if ep.role == "gdb" or not qmp:
            ep.state, ep.detail = "listening", "not connected to" + owner_note
            continue
        _probe_qmp(ep, timeout)
        if owner_note and ep.detail:
            ep.detail += owner_note


def _probe_qmp(ep: Endpoint, timeout: float) -> None:
    """Connect, read the greeting; when it greets, negotiate and ask query-status and
    query-kvm (all on the allowlist). Never more. Every message is checked as the QMP client
    checks it (qmp.check_greeting, qmp.await_reply): an endpoint that breaks the protocol is
    "no answer", saying what was wrong, and nothing it said is kept."""
    if ep.transport == "unix":
        family, target = socket.AF_UNIX, ep.path
    else:
        host = connect_host(ep.host).strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        target = (host, ep.port)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(target)
    except PermissionError:
        ep.state, ep.detail = "permission denied", "run as the user that started QEMU (or root)"
        s.close()
        return
    except (OSError, OverflowError) as exc:
        ep.state, ep.detail = "not listening", getattr(exc, "strerror", None) or str(exc)
        s.close()
        return
    reader = JsonLines(s, PROBE_MAX_LINE, f"QMP at {ep.describe()}")
    asking = "the greeting"
    try:
        try:
            greeting = reader.read(time.monotonic() + timeout)
        except socket.timeout:
            ep.state = "in use"
            ep.detail = (f"no greeting within {timeout:g} s: another client is connected "
                         "(QEMU serves one at a time), or it is not a QMP socket")
            return
        if type(greeting) is not dict:
            raise ProtocolError(reader.where, "not a QMP greeting", qmp_sample(greeting))
        version = greeting_version(check_greeting(greeting, reader.where))
        ep.state = "answers"
        ep.detail = f"QEMU {version}" if version else "QMP"
        for n, command in enumerate(("qmp_capabilities", "query-status", "query-kvm"), 1):
            asking = command
            check_allowed(command)
            ident = f"qi-probe-{n}"
            s.settimeout(timeout)
            s.sendall(json.dumps({"execute": command, "id": ident}).encode() + b"\n")
            reply = await_reply(reader, ident, command, time.monotonic() + timeout)
            if "error" in reply:
                break
            if command == "query-status":
                ep.run_state = reply["return"]["status"]
            elif command == "query-kvm":
                ep.kvm = reply["return"]["enabled"]
    except socket.timeout:
        ep.detail += f" (no answer to {asking} within {timeout:g} s)"
    except QIError as exc:       # ProtocolError, PeerClosed: what was wrong, on this row only
        ep.state, ep.run_state, ep.kvm = "no answer", None, None
        ep.detail = getattr(exc, "problem", None) or str(exc)
        if getattr(exc, "sample", ""):
            ep.detail += f": {exc.sample}"
    except OSError as exc:
        ep.state, ep.run_state, ep.kvm = "no answer", None, None
        ep.detail = f"the connection failed during {asking}: {exc.strerror or exc}"
    finally:
        s.close()


# ---- finding one VM for --pid / --name ----------------------------------------------------------

def find_by_name(name: str) -> QemuProcess:
    """The one QEMU process whose -name is `name`: UsageError (exit 2) listing the candidates
    when there is none or more than one."""
    procs = processes()
    found = [p for p in procs if p.name == name]
    if len(found) == 1:
        return found[0]
    if not found:
        named = sorted({f"{p.name} (pid {p.pid})" for p in procs if p.name})
        raise UsageError(printable(
            f"--name {name}: no QEMU process of this user's sight is named {name!r}"
            + (f"; named ones: {', '.join(named)}" if named else
               "; `qintrospect list` shows the VMs found")))
    raise UsageError(printable(
        f"--name {name}: {len(found)} QEMU processes are named {name!r} (pids "
        f"{', '.join(str(p.pid) for p in found)}); say which with --pid"))


def endpoints_for(proc: QemuProcess, want_gdb: bool = True,
                  timeout: float = GREETING_TIMEOUT) -> Tuple[str, Optional[str], List[str]]:
    """(QMP address, gdbstub address or None, warnings) to attach to `proc` with, from its
    command line: the first QMP socket that answers; its gdbstub when it listens and is free
    (and want_gdb). AttachError (exit 3) saying why when no QMP can be used."""
    check_endpoints(proc, timeout)
    warnings: List[str] = []
    qmp = next((e for e in proc.config.qmp if e.state == "answers"), None)
    if qmp is None:
        raise AttachError(printable(_no_qmp_reason(proc)))
    gdb = None
    g = proc.config.gdb
    if want_gdb and g is not None:
        if g.usable and g.state == "listening":
            gdb = g.address
        elif g.state == "in use":
            warnings.append(f"the gdbstub {g.describe()} is in use (a debugger is connected): "
                            "registers come from QMP instead")
        elif g.problem:
            warnings.append(f"the gdbstub ({g.option}) cannot be used: {g.problem}; registers "
                            "come from QMP instead")
        elif g.state:
            warnings.append(f"the gdbstub {g.describe()} is {g.state}"
                            + (f" ({g.detail})" if g.detail else "")
                            + ": registers come from QMP instead")
    # names, paths and details come from the command line and the monitor: made printable
    return qmp.address, gdb, [printable(w) for w in warnings]


def _no_qmp_reason(proc: QemuProcess) -> str:
    who = f"QEMU process {proc.pid}" + (f" ({proc.name})" if proc.name else "")
    if not proc.config.qmp:
        extra = ""
        if proc.config.hmp:
            extra = f" (it has an HMP monitor, {proc.config.hmp[0].option}, which is not QMP)"
        return (f"{who} has no QMP monitor on its command line{extra}; start QEMU with "
                "-qmp unix:PATH,server=on,wait=off (or -chardev socket,...,server=on + -mon "
                "chardev=ID,mode=control), or pass --qmp")
    reasons = []
    for e in proc.config.qmp:
        if e.owner == "libvirt":
            return (f"{who} is managed by libvirt and its monitor is libvirt's: use "
                    f"--domain {proc.name or 'NAME'}")
        why = e.problem or (e.state + (f": {e.detail}" if e.detail else "") if e.state else "?")
        reasons.append(f"{e.option}: {why}")
    return f"{who}: no QMP monitor that can be used: " + "; ".join(reasons)


# ---- the `list` view ----------------------------------------------------------------------------


def table(procs: List[QemuProcess]) -> str:
    """The `list` table: a row per VM, every cell made printable (names, paths and states come
    from command lines and monitors, which anyone may write: textsafe.printable), and under the
    row of a process that only calls itself QEMU, a note saying so."""
    from ..paging.formats import size_name
    rows = [("PID", "NAME", "ACCEL", "RAM", "STATE", "QMP", "GDB")]
    warnings: Dict[int, List[str]] = {}
    for p in procs:
        qmp = "; ".join(e.short() for e in p.config.qmp) or "-"
        if p.libvirt:
            qmp = f"libvirt: --domain {p.libvirt.get('domain')}"
        gdb = p.config.gdb.short() if p.config.gdb else "-"
        rows.append(tuple(printable(cell) for cell in (
            str(p.pid or "?"), p.name or "-", p.accel,
            size_name(p.config.ram) if p.config.ram else "?", p.run_state or "?", qmp, gdb)))
        if p.exe_qemu is False:
            warnings[len(rows) - 1] = [printable(n) for n in p.notes if n.startswith("not QEMU?")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        lines.extend(f"  ^ {note}" for note in warnings.get(n, ()))
    return "\n".join(line.rstrip() for line in lines)
