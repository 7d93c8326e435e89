"""What a command attaches to when it names a VM another way than by its sockets: --pid, --name
(the QEMU process, its QMP socket and gdbstub read from its command line: discover), --domain
(libvirt's monitor, the QEMU process found by the domain's UUID), and `list` (the QEMU processes
and libvirt's running domains, together)."""

import os
from typing import Callable, List, Optional, Tuple

from ..errors import AttachError, UsageError
from ..record import field, record
from . import discover
from .cmdline import QemuConfig
from .libvirt_monitor import (DEFAULT_URI, LibvirtMonitor, lookup, open_connection,
                              running_domains)
from .qmp import GREETING_TIMEOUT



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
        target = domain_target(domain, getattr(args, "connect", None), args.timeout)
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
            pid = discover.find_by_name(name).pid
        return qmp, gdb, pid, None, []
    if name:
        proc = discover.find_by_name(name)
        if pid is not None and pid != proc.pid:
            raise UsageError(f"--name {name} is QEMU process {proc.pid}, not --pid {pid}")
    elif pid is not None:
        proc = discover.read_process(pid)
        if proc is None:
            if not os.path.exists(f"/proc/{pid}"):
                raise UsageError(f"--pid {pid}: no such process")
            raise UsageError(f"--pid {pid}: not a QEMU process (or its command line cannot "
                             "be read by this user)")
    else:
        return None, gdb, None, None, []
    qmp, found_gdb, notes = discover.endpoints_for(proc, want_gdb,
                                                   min(args.timeout, GREETING_TIMEOUT))
    return qmp, gdb or found_gdb, proc.pid, None, notes


def list_vms(connect: Optional[str] = None, libvirt: Optional[bool] = None,
             timeout: float = GREETING_TIMEOUT) -> Tuple[List[discover.QemuProcess], List[str]]:
    """Every QEMU process with its endpoints checked, plus libvirt's running domains when
    libvirt-python and a connection are available (`connect`, else qemu:///system). Returns
    (VMs, notes). libvirt=True makes an unreachable libvirt an error."""
    procs = discover.processes()
    for p in procs:
        discover.check_endpoints(p, timeout)
    notes: List[str] = []
    if libvirt is False:
        return procs, notes
    try:
        domains = running_domains(connect or DEFAULT_URI)
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
        ghost = discover.QemuProcess(d.get("pid") or 0, [], None, None, None, cfg, libvirt=d,
                            notes=["QEMU process not visible from here"])
        procs.append(ghost)
    return procs, notes


@record
class Target:
    """What --domain attaches to."""
    label: str                           # "libvirt:NAME": messages and the run-state marker
    monitor: Callable[[], LibvirtMonitor]
    pid: Optional[int]                   # QEMU's pid on this host, when it runs here
    gdb: Optional[str] = None            # a gdbstub the domain gave QEMU (<qemu:commandline>)
    gdb_warning: Optional[str] = None
    uuid: Optional[str] = None
    notes: List[str] = field(default_factory=list)


def domain_target(domain: str, uri: Optional[str], timeout: float) -> Target:
    """What `--domain NAME` attaches to: libvirt's monitor, the QEMU process (found on this
    host by the domain's UUID on its command line), and a gdbstub when the domain's XML gave
    QEMU one (e.g. <qemu:commandline> -gdb tcp:127.0.0.1:PORT)."""
    uri = uri or DEFAULT_URI
    conn = open_connection(uri)
    try:
        dom = lookup(conn, domain, uri)
        uuid = dom.UUIDString().lower()
    finally:
        conn.close()
    target = Target(f"libvirt:{domain}", lambda: LibvirtMonitor(domain, uri, timeout).connect(),
                    None, uuid=uuid)
    proc = _process_of(uuid, domain, uri)
    if proc is None:
        target.notes.append(f"the QEMU process of domain {domain} is not visible on this host "
                            "(a remote libvirt?): host addresses are not shown")
        return target
    target.pid = proc.pid
    g = proc.config.gdb
    if g is not None:
        discover.check_endpoints(proc, qmp=False)
        if g.usable and g.state == "listening":
            target.gdb = g.address
        else:
            target.gdb_warning = (f"the domain's gdbstub ({g.option}) cannot be used: "
                                  f"{g.problem or g.state}; registers come from QMP")
    return target


def _process_of(uuid: str, domain: str, uri: str):
    """The local QEMU process running the domain: libvirt's pid file for qemu:///system, else
    the QEMU process whose -uuid is the domain's."""
    if uri.split("?")[0].rstrip("/") in ("qemu:///system",):
        try:
            with open(f"/run/libvirt/qemu/{domain}.pid") as f:
                proc = discover.read_process(int(f.read().strip()))
            if proc is not None and proc.config.uuid == uuid:
                return proc
        except (OSError, ValueError):
            pass
    for proc in discover.processes():
        if proc.config.uuid == uuid:
            return proc
    return None
