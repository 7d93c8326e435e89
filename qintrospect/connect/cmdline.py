"""A QEMU command line read as QEMU reads it: options with and without an argument (so a value
such as `-append "... -m 512"` is never taken for an option), `-opt` and `--opt` alike,
QemuOpts/keyval values (`,,` is a comma, a bare key is `on`, the implied first key), JSON
`-object`/`-device`, options that merge (`-name`, `-m`, `-machine`: the later key wins), the
legacy chardev spellings of `-qmp`/`-monitor`/`-serial`/`-gdb` (`unix:PATH,server=on`,
`tcp:HOST:PORT`, `mon:`, `chardev:ID`, `/dev/...`), and `-chardev` + `-mon mode=control`.
Not read: `-readconfig FILE` (its options are not shown: said in the notes) and `-set`.
"""

import json
import os
import re
from typing import Dict, List, Optional, Tuple

from ..record import field, record



MiB = 1 << 20


DEFAULT_RAM = 128 * MiB          # x86 pc/q35 default_ram_size


DEFAULT_GDB_PORT = 1234          # -s


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
            return f"{connect_host(self.host)}:{self.port}"
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


def connect_host(host: Optional[str]) -> str:
    if not host or host in ("0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return host


def is_local_bind(host: Optional[str]) -> bool:
    import ipaddress
    h = (host or "").strip("[]")
    if h in ("", "localhost", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
