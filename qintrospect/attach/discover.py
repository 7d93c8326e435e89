"""Finding the VMs on this host: every QEMU process this user can see, what its command line
says (name, RAM, accelerator, monitors, gdbstub), and whether its endpoints answer.

The command line is read as QEMU reads it: options with and without an argument (so a value
such as `-append "... -m 512"` is never taken for an option), `-opt` and `--opt` alike,
QemuOpts/keyval values (`,,` is a comma, a bare key is `on`, the implied first key), JSON
`-object`/`-device`, options that merge (`-name`, `-m`, `-machine`: the later key wins), the
legacy chardev spellings of `-qmp`/`-monitor`/`-serial`/`-gdb` (`unix:PATH,server=on`,
`tcp:HOST:PORT`, `mon:`, `chardev:ID`, `/dev/...`), and `-chardev` + `-mon mode=control`.
Not read: `-readconfig FILE` (its options are not shown: said in the notes) and `-set`.

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
from .jsonl_socket import JsonLines, ProtocolError
from .libvirt_monitor import DEFAULT_URI
from .qmp import (GREETING_TIMEOUT, await_reply, check_allowed, check_greeting, greeting_version,
                  sample as qmp_sample)
from ..record import field, record
from ..present.textsafe import printable

MiB = 1 << 20
DEFAULT_RAM = 128 * MiB          # x86 pc/q35 default_ram_size
DEFAULT_GDB_PORT = 1234          # -s
PROBE_MAX_LINE = 1 << 20         # the longest line the QMP probe takes (a greeting is ~150 bytes)

# Options that take no argument, from QEMU's qemu-options.hx (QEMU 2.x to 10.x, every target:
# measured on 7.2 and 10.0 by asking each option for its argument). Every other option takes
# exactly one: an option QEMU does not know makes it refuse to start, so a running QEMU has none.
NO_ARG = frozenset({
    "h", "help", "version", "S", "s", "snapshot", "nographic", "nodefaults", "no-user-config",
    "nodefconfig", "enable-kvm", "no-kvm", "no-kvm-irqchip", "no-kvm-pit",
    "no-kvm-pit-reinjection", "no-reboot", "no-shutdown", "no-acpi", "no-hpet",
    "no-fd-bootchk", "daemonize", "full-screen", "portrait", "alt-grab", "ctrl-grab", "no-frame",
    "no-quit", "sdl", "curses", "show-cursor", "tdf", "localtime", "win2k-hack", "rtc-td-hack",
    "usb", "semihosting", "old-param", "enable-fips", "only-migratable", "preconfig",
    "xen-attach", "xen-create", "xen-domid-restrict", "mem-prealloc", "singlestep",
    "one-insn-per-tb", "enable-sync-profile", "async-teardown", "audio-help", "perfmap",
    "jitdump", "enable-nesting",
})

QEMU_PROGRAM = re.compile(r"^(qemu-system-[A-Za-z0-9_.-]+|qemu-kvm|qemu)$")


# ---- QEMU's option syntax -----------------------------------------------------------------------

def parse_opts(text: str, implied: Optional[str] = None) -> Dict[str, str]:
    """QemuOpts / keyval `a=b,c=d` as QEMU reads it: `,,` is a literal comma, the first item
    without `=` is the implied key's value (when there is one), a bare key is "on" and a bare
    `noKEY` is KEY=off (QemuOpts' old flag form). Later keys win."""
    out: Dict[str, str] = {}
    i, n, first = 0, len(text), True
    while i < n:
        # the name runs to '=' or ','
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        if j < n and text[j] == "=":
            key = text[i:j]
            value, i = _opt_value(text, j + 1)
        elif first and implied:
            key = implied
            value, i = _opt_value(text, i)
        else:
            key = text[i:j]
            i = j + 1
            if not key:
                first = False
                continue
            if key.startswith("no") and len(key) > 2:
                out[key[2:]] = "off"
                first = False
                continue
            value = "on"
        out[key] = value
        first = False
    return out


def _opt_value(text: str, i: int) -> Tuple[str, int]:
    """A value up to the next single ',' (',,' stands for ','); returns (value, next index)."""
    buf = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == ",":
            if i + 1 < n and text[i + 1] == ",":
                buf.append(",")
                i += 2
                continue
            return "".join(buf), i + 1
        buf.append(c)
        i += 1
    return "".join(buf), i


def parse_bool(value: Optional[str]) -> Optional[bool]:
    if value is None:
        return None
    v = value.lower()
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    return None


def parse_object(text: str, implied: str) -> Dict[str, object]:
    """-object / -device / -audiodev / -blockdev: JSON when it starts with '{', keyval else."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
            return value if isinstance(value, dict) else {}
        except (ValueError, RecursionError):     # not JSON, or nested past the parser
            return {}
    return parse_opts(text, implied)


_SUFFIX = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def parse_size(text, default_shift: int = 0) -> Optional[int]:
    """QEMU's qemu_strtosz: decimal (a fraction allowed when a unit follows), or 0x hex without
    fraction or unit; one unit letter B K M G T P E (either case), else `default_shift`.
    None where QEMU would refuse it ("1GB", "-1", "", ASCII digits only, 2^64 bytes or more)."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return text if 0 <= text < _TOO_BIG else None
    if not isinstance(text, str):
        return None
    t = text.strip()
    m = re.fullmatch(r"0[xX]([0-9a-fA-F]{1,17})", t)
    if m:
        value = int(m.group(1), 16) << default_shift
        return value if value < _TOO_BIG else None
    m = re.fullmatch(r"([0-9]{1,20})(?:\.([0-9]*))?([bBkKmMgGtTpPeE])?", t)
    if not m:
        return None
    whole, frac, unit = m.groups()
    shift = _SUFFIX[unit.upper()] if unit else default_shift
    if frac and shift == 0:
        return None       # a fraction of a byte
    value = int(whole) << shift
    if frac:
        frac = frac[:30]  # (QEMU reads it as a double: digits past these change nothing)
        value += int(frac) * (1 << shift) // 10 ** len(frac)
    return value if value < _TOO_BIG else None


_TOO_BIG = 1 << 64        # qemu_strtosz refuses sizes past uint64_t (ERANGE)


def parse_memory_option(opts: Dict[str, str]) -> Optional[int]:
    """-m [size=]N: bytes by qemu_strtosz, then QEMU's legacy fix-up: a value that ends in a
    digit is MiB. Rounded up to 8 KiB as QEMU does."""
    text = opts.get("size")
    if text is None or not text:
        return None
    size = parse_size(text, 0)
    if size is None:
        return None
    if text[-1].isdigit():
        size *= MiB
    return (size + 8191) // 8192 * 8192


# ---- what one QEMU command line says ------------------------------------------------------------

@record
class Endpoint:
    """A monitor or gdbstub as the command line gives it, and (after probing) its state."""
    role: str                       # "qmp", "hmp" or "gdb"
    option: str                     # as written: "-qmp unix:/run/vm/qmp.sock,server=on,..."
    transport: str                  # "unix", "tcp", "fd", "pty", "stdio", "serial", ...
    path: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    fd: Optional[int] = None
    server: bool = False
    abstract: bool = False
    chardev: Optional[str] = None   # the -chardev id behind it
    owner: Optional[str] = None     # "libvirt" for libvirt's own monitor
    problem: Optional[str] = None   # why qintrospect cannot use it
    state: Optional[str] = None     # answers, in use, listening, not listening, no answer, ...
    detail: Optional[str] = None    # what the probe saw
    run_state: Optional[str] = None  # QMP query-status, when it answered
    kvm: Optional[bool] = None       # QMP query-kvm "enabled", when it answered

    @property
    def usable(self) -> bool:
        return self.problem is None and self.transport in ("unix", "tcp")

    @property
    def address(self) -> Optional[str]:
        """The spelling --qmp/--gdb take: "unix:PATH" or "HOST:PORT" (a wildcard bind is
        reached on loopback)."""
        if self.transport == "unix" and self.path and not self.abstract:
            return f"unix:{self.path}"
        if self.transport == "tcp" and self.port:
            return f"{_connect_host(self.host)}:{self.port}"
        return None

    def describe(self) -> str:
        if self.transport == "unix":
            where = f"unix:{'@' if self.abstract else ''}{self.path}"
        elif self.transport == "tcp":
            where = f"tcp:{self.host or '*'}:{self.port}"
        elif self.transport == "fd":
            where = f"fd {self.fd}" + (f" (unix:{self.path})" if self.path else "")
        else:
            where = self.transport + (f" {self.path}" if self.path else "")
        return where

    def short(self) -> str:
        """One table cell: where, and its state or problem (and, when it gave no answer that
        can be used, why, cut short). Not made printable: table() does that."""
        if self.owner == "libvirt":
            return "libvirt's (--domain)"
        what = self.state or ("unusable" if self.problem else "?")
        if self.state == "no answer" and self.detail:
            why = self.detail if len(self.detail) <= 60 else self.detail[:57] + "..."
            what += f": {why}"
        return f"{self.describe()} ({what})"

    def to_dict(self) -> dict:
        return {"role": self.role, "option": self.option, "transport": self.transport,
                "address": self.address, "path": self.path, "host": self.host,
                "port": self.port, "fd": self.fd, "server": self.server,
                "abstract": self.abstract or None, "chardev": self.chardev, "owner": self.owner,
                "usable": self.usable, "problem": self.problem, "state": self.state,
                "detail": self.detail, "run_state": self.run_state, "kvm": self.kvm}


@record
class QemuConfig:
    """What a QEMU command line says about the VM."""
    name: Optional[str] = None
    process_name: Optional[str] = None
    uuid: Optional[str] = None
    ram: Optional[int] = None            # bytes of boot RAM
    ram_source: str = ""                 # "-m", "memory-backend", "default", ...
    maxmem: Optional[int] = None
    accel: List[str] = field(default_factory=list)   # in the order QEMU tries them
    accel_source: str = ""
    qmp: List[Endpoint] = field(default_factory=list)
    hmp: List[Endpoint] = field(default_factory=list)
    gdb: Optional[Endpoint] = None
    libvirt: bool = False                # started by libvirt (its -name guest=, -uuid, secret)
    paused_at_start: bool = False        # -S
    notes: List[str] = field(default_factory=list)


def parse_command_line(argv: List[str], cwd: Optional[str] = None) -> QemuConfig:
    """A QEMU command line (argv[0] first) as QEMU reads it; see the module docstring."""
    cfg = QemuConfig()
    program = os.path.basename(argv[0]) if argv else ""
    name_opts: Dict[str, str] = {}
    mem_opts: Dict[str, str] = {}
    machine: Dict[str, str] = {}
    accels: List[str] = []
    enable_kvm = False
    objects: Dict[str, dict] = {}
    numa_memdevs: List[str] = []
    chardevs: Dict[str, Dict[str, str]] = {}
    # monitors in the order given: ("mon", option text, -mon opts) or ("qmp"/"hmp", text, spec)
    monitors: List[Tuple[str, str, object]] = []
    gdb_spec: Optional[Tuple[str, str]] = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            continue                                  # a disk image (-hda)
        opt = arg[2:] if arg.startswith("--") else arg[1:]
        if opt in NO_ARG:
            if opt == "S":
                cfg.paused_at_start = True
            elif opt == "enable-kvm":
                enable_kvm = True
            elif opt == "s":
                gdb_spec = ("-s", f"tcp::{DEFAULT_GDB_PORT}")
            continue
        if i >= len(argv):
            cfg.notes.append(f"{arg} has no argument (QEMU would not have started)")
            break
        value = argv[i]
        i += 1
        shown = f"{arg} {value}"
        if opt == "name":
            name_opts.update(parse_opts(value, "guest"))
        elif opt in ("m", "memory"):
            mem_opts.update(parse_opts(value, "size"))
        elif opt in ("machine", "M"):
            if value.lstrip().startswith("{"):
                machine.update({k: str(v) for k, v in parse_object(value, "type").items()})
            else:
                machine.update(parse_opts(value, "type"))
        elif opt == "accel":
            accels.append(parse_opts(value, "accel").get("accel", ""))
        elif opt == "object":
            obj = parse_object(value, "qom-type")
            if obj.get("id") is not None:
                objects[str(obj["id"])] = obj
        elif opt == "numa":
            numa = parse_opts(value, "type")
            if numa.get("type", "node") == "node" and numa.get("memdev"):
                numa_memdevs.append(numa["memdev"])
        elif opt == "chardev":
            cd = parse_opts(value, "backend")
            if cd.get("id"):
                chardevs[cd["id"]] = cd
        elif opt == "mon":
            monitors.append(("mon", shown, parse_opts(value, "chardev")))
        elif opt in ("qmp", "qmp-pretty"):
            monitors.append(("qmp", shown, value))
        elif opt == "monitor":
            if value != "none":
                monitors.append(("hmp", shown, value))
        elif opt in ("serial", "parallel", "debugcon"):
            if value.startswith("mon:"):
                monitors.append(("hmp", shown, value))
        elif opt == "gdb":
            gdb_spec = (shown, value) if value != "none" else None
        elif opt == "uuid":
            cfg.uuid = value.lower()
        elif opt == "readconfig":
            cfg.notes.append(f"-readconfig {value}: options in that file are not read here "
                             "(monitors, RAM or name given there are not shown)")

    # name
    cfg.name = name_opts.get("guest")
    cfg.process_name = name_opts.get("process")

    # accelerator, in the order QEMU tries them
    if accels:
        cfg.accel, cfg.accel_source = [a for a in accels if a], "-accel"
    elif machine.get("accel"):
        cfg.accel, cfg.accel_source = [a for a in machine["accel"].split(":") if a], \
            "-machine accel="
    elif enable_kvm:
        cfg.accel, cfg.accel_source = ["kvm"], "-enable-kvm"
    else:
        # QEMU's default: TCG first, unless the program's name ends in "kvm"
        cfg.accel = ["kvm", "tcg"] if program.endswith("kvm") else ["tcg", "kvm"]
        cfg.accel_source = "default"

    # RAM
    if mem_opts.get("maxmem"):
        cfg.maxmem = parse_size(mem_opts["maxmem"], 20)
    ram = parse_memory_option(mem_opts)
    backend_id = machine.get("memory-backend")
    if ram is not None:
        cfg.ram, cfg.ram_source = ram, "-m"
    elif mem_opts.get("size") is not None:
        cfg.notes.append(f"-m {mem_opts['size']!r} is not a size QEMU accepts")
    elif backend_id and backend_id in objects:
        cfg.ram = parse_size(objects[backend_id].get("size"), 0)
        cfg.ram_source = f"memory-backend {backend_id}"
    elif numa_memdevs and all(m in objects for m in numa_memdevs):
        sizes = [parse_size(objects[m].get("size"), 0) for m in numa_memdevs]
        if all(s is not None for s in sizes):
            cfg.ram, cfg.ram_source = sum(sizes), "NUMA memdevs"
    else:
        cfg.ram, cfg.ram_source = DEFAULT_RAM, "default"

    # monitors and the gdbstub
    def chardev_endpoint(role: str, shown: str, chardev_id: str) -> Endpoint:
        cd = chardevs.get(chardev_id)
        if cd is None:
            return Endpoint(role, shown, "unknown", chardev=chardev_id,
                            problem=f"no -chardev with id={chardev_id} on the command line")
        ep = _endpoint(role, shown, cd, cwd)
        ep.chardev = chardev_id
        return ep

    for kind, shown, value in monitors:
        if kind == "mon":
            role = "qmp" if value.get("mode") == "control" else "hmp"
            ep = chardev_endpoint(role, shown, value.get("chardev", ""))
            if role == "qmp" and ep.chardev == "charmonitor" and value.get("id") == "monitor":
                ep.owner = "libvirt"
        elif value.startswith("chardev:"):
            ep = chardev_endpoint(kind, shown, value[8:])
        else:
            ep = _endpoint(kind, shown, parse_chardev_spec(value), cwd)
        (cfg.qmp if ep.role == "qmp" else cfg.hmp).append(ep)
    if gdb_spec is not None:
        shown, spec = gdb_spec
        if spec.startswith("chardev:"):
            cfg.gdb = chardev_endpoint("gdb", shown, spec[8:])
        else:
            cd = parse_chardev_spec(spec)
            if spec.startswith("tcp:"):     # gdbserver_start: tcp gets server=on,wait=off
                cd.update(server="on", wait="off")
            cfg.gdb = _endpoint("gdb", shown, cd, cwd)

    # libvirt's signature: its master-key secret and -uuid, or its monitor (charmonitor)
    cfg.libvirt = any(ep.owner == "libvirt" for ep in cfg.qmp) or bool(
        cfg.uuid and any(o.get("qom-type") == "secret" and
                         str(o.get("id", "")).startswith("masterKey") for o in objects.values()))
    for ep in cfg.qmp:
        if ep.owner is None and cfg.libvirt and ep.chardev == "charmonitor":
            ep.owner = "libvirt"
        if ep.owner == "libvirt":
            ep.problem = ("libvirt's own monitor: libvirt stays connected to it; use "
                          f"--domain {cfg.name or 'NAME'}")
    for ep in cfg.hmp:
        ep.problem = "an HMP (human) monitor, not QMP: qintrospect needs QMP" + (
            f" (and {ep.problem[0].lower()}{ep.problem[1:]})" if ep.problem else "")
    return cfg


def parse_chardev_spec(spec: str) -> Dict[str, str]:
    """A legacy chardev spelling (-qmp, -monitor, -serial, -gdb) as QEMU's
    qemu_chr_parse_compat reads it, into -chardev options."""
    opts: Dict[str, str] = {}
    if spec.startswith("mon:"):
        spec = spec[4:]
        opts["mux"] = "on"
    if spec in ("null", "stdio", "pty", "msmouse", "wctablet", "braille", "testdev") \
            or spec.startswith("vc"):
        opts["backend"] = "vc" if spec.startswith("vc") else spec
        return opts
    for prefix, backend in (("file:", "file"), ("pipe:", "pipe")):
        if spec.startswith(prefix):
            opts.update(backend=backend, path=spec[len(prefix):])
            return opts
    for prefix in ("tcp:", "telnet:", "tn3270:", "websocket:"):
        if spec.startswith(prefix):
            rest = spec[len(prefix):]
            m = re.match(r"([^:]{1,64}):([^,]{1,32})", rest) or re.match(r"():([^,]{1,32})", rest)
            if not m:
                opts.update(backend="invalid", spec=spec)
                return opts
            opts.update(backend="socket", host=m.group(1), port=m.group(2))
            after = rest[m.end():]
            if after.startswith(","):
                opts.update(parse_opts(after[1:]))
            if prefix != "tcp:":
                opts[prefix[:-1]] = "on"
            return opts
    if spec.startswith("udp:"):
        opts.update(backend="udp", spec=spec)
        return opts
    if spec.startswith("unix:"):
        opts["backend"] = "socket"
        opts.update(parse_opts(spec[5:], "path"))
        return opts
    if spec.startswith("/dev/parport") or spec.startswith("/dev/parallel"):
        opts.update(backend="parallel", path=spec)
        return opts
    if spec.startswith("/dev/"):
        opts.update(backend="serial", path=spec)
        return opts
    opts.update(backend="invalid", spec=spec)
    return opts


def _endpoint(role: str, shown: str, cd: Dict[str, str], cwd: Optional[str]) -> Endpoint:
    backend = cd.get("backend", "")
    ep = Endpoint(role, shown, backend or "unknown")
    if backend == "socket":
        ep.server = bool(parse_bool(cd.get("server")))
        if cd.get("fd") is not None:
            ep.transport = "fd"
            ep.fd = int(cd["fd"]) if _is_number(cd["fd"]) else None
        elif cd.get("path") is not None:
            ep.transport = "unix"
            path = cd["path"]
            ep.abstract = bool(parse_bool(cd.get("abstract")))
            if not ep.abstract and cwd and not os.path.isabs(path):
                path = os.path.normpath(os.path.join(cwd, path))
            ep.path = path
            if ep.abstract and ep.problem is None:
                ep.problem = "an abstract Unix socket: qintrospect takes socket paths only"
        else:
            ep.transport = "tcp"
            ep.host = cd.get("host", "")
            port = cd.get("port", "")
            ep.port = int(port) if _is_number(port) and int(port) < 65536 else None
            if ep.port is None and ep.problem is None:
                ep.problem = f"port {port!r} is not a port number"
        for proto in ("telnet", "websocket", "tn3270"):
            if parse_bool(cd.get(proto)) and ep.problem is None:
                ep.problem = f"{proto} framing on the socket: qintrospect speaks plain sockets"
        if cd.get("tls-creds") and ep.problem is None:
            ep.problem = "TLS on the socket: not supported"
        if not ep.server and ep.problem is None and ep.transport != "fd":
            ep.problem = ("QEMU connects out to it (no server=on): there is nothing to "
                          "connect to")
    elif backend == "pty":
        ep.problem = "a pseudo-terminal: cannot be used (qintrospect needs a socket)"
    elif backend in ("serial", "tty"):
        ep.transport, ep.path = "serial", cd.get("path")
        ep.problem = (f"a serial line ({cd.get('path')}): cannot be used from here (reach its "
                      "other end, e.g. a socket on the outer VM's serial port)")
    elif backend == "stdio":
        ep.problem = "QEMU's standard input/output: cannot be used"
    elif backend == "invalid":
        ep.transport = "unknown"
        ep.problem = f"{cd.get('spec')!r}: not a chardev QEMU accepts"
    else:
        ep.path = cd.get("path")
        ep.problem = f"a {backend or 'unknown'} chardev: cannot be used"
    if parse_bool(cd.get("mux")) and ep.problem is None:
        ep.problem = "multiplexed with a serial console (mux=on / mon:): cannot be used"
    return ep


def _is_number(text: str) -> bool:
    """ASCII digits only, and not too many (str.isdigit() takes "²", which int() refuses)."""
    return 0 < len(text) <= 10 and text.isascii() and text.isdigit()


def _connect_host(host: Optional[str]) -> str:
    if not host or host in ("0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return host


def _is_local_bind(host: Optional[str]) -> bool:
    import ipaddress
    h = (host or "").strip("[]")
    if h in ("", "localhost", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


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
            if not _is_local_bind(ep.host):
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
        host = _connect_host(ep.host).strip("[]")
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


def resolve(args) -> Tuple[Optional[str], Optional[str], Optional[int], object, List[str]]:
    """The endpoints for a command's --pid/--name/--domain when --qmp was not given:
    (qmp, gdb, pid, monitor factory or None, notes). Explicit --qmp/--gdb win."""
    qmp, gdb, pid = args.qmp, args.gdb, args.pid
    name, domain = getattr(args, "name", None), getattr(args, "domain", None)
    want_gdb = gdb is None and not getattr(args, "freeze", False)
    if domain:
        if qmp or name:
            raise UsageError("--domain names the VM and its monitor (libvirt's): leave out "
                             + ("--qmp" if qmp else "--name"))
        from . import libvirt_monitor
        target = libvirt_monitor.resolve(domain, getattr(args, "connect", None), args.timeout)
        if pid is not None and target.pid is not None and pid != target.pid:
            raise UsageError(f"--pid {pid}: libvirt's domain {domain} runs in QEMU process "
                             f"{target.pid}")
        notes = list(target.notes)
        if want_gdb and target.gdb:
            gdb = target.gdb
        elif want_gdb and target.gdb_warning:
            notes.append(target.gdb_warning)
        return target.label, gdb, pid if pid is not None else target.pid, target.monitor, notes
    if qmp:
        if name and pid is None:
            pid = find_by_name(name).pid
        return qmp, gdb, pid, None, []
    if name:
        proc = find_by_name(name)
        if pid is not None and pid != proc.pid:
            raise UsageError(f"--name {name} is QEMU process {proc.pid}, not --pid {pid}")
    elif pid is not None:
        proc = read_process(pid)
        if proc is None:
            if not os.path.exists(f"/proc/{pid}"):
                raise UsageError(f"--pid {pid}: no such process")
            raise UsageError(f"--pid {pid}: not a QEMU process (or its command line cannot "
                             "be read by this user)")
    else:
        return None, gdb, None, None, []
    qmp, found_gdb, notes = endpoints_for(proc, want_gdb, min(args.timeout, GREETING_TIMEOUT))
    return qmp, gdb or found_gdb, proc.pid, None, notes


# ---- the `list` view ----------------------------------------------------------------------------

def list_vms(connect: Optional[str] = None, libvirt: Optional[bool] = None,
             timeout: float = GREETING_TIMEOUT) -> Tuple[List[QemuProcess], List[str]]:
    """Every QEMU process with its endpoints checked, plus libvirt's running domains when
    libvirt-python and a connection are available (`connect`, else qemu:///system). Returns
    (VMs, notes). libvirt=True makes an unreachable libvirt an error."""
    procs = processes()
    for p in procs:
        check_endpoints(p, timeout)
    notes: List[str] = []
    if libvirt is False:
        return procs, notes
    from . import libvirt_monitor
    try:
        domains = libvirt_monitor.running_domains(connect or DEFAULT_URI)
    except (AttachError, UsageError) as exc:    # unreachable, or no libvirt-python
        if connect:
            raise
        notes.append(str(exc))
        return procs, notes
    by_uuid = {p.config.uuid: p for p in procs if p.config.uuid}
    for d in domains:
        proc = by_uuid.get(d["uuid"])
        if proc is None and d.get("pid"):
            proc = next((p for p in procs if p.pid == d["pid"]), None)
        if proc is not None:
            proc.libvirt = d
            continue
        # a domain whose QEMU this user cannot see (remote libvirt, another namespace)
        cfg = QemuConfig(name=d["domain"], uuid=d["uuid"], ram=d.get("ram"), ram_source="libvirt",
                         libvirt=True)
        ghost = QemuProcess(d.get("pid") or 0, [], None, None, None, cfg, libvirt=d,
                            notes=["QEMU process not visible from here"])
        procs.append(ghost)
    return procs, notes


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
