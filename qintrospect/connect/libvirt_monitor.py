"""QMP through libvirt, for VMs that libvirt manages (`--domain NAME`).

libvirt keeps QEMU's own monitor socket to itself, so qintrospect reaches QMP through libvirt's
interface: virDomainQemuMonitorCommand (virsh qemu-monitor-command) carries one QMP command and
brings back QEMU's answer. LibvirtMonitor offers QmpMonitor's interface (command, hmp,
listeners, poll, close) so a Session uses it unchanged, and every message
passes qmp.check_allowed first: the read-only allowlist holds here too. `stop` and `cont` (only
ever sent to put the run state back as found) go through libvirt's own virDomainSuspend /
virDomainResume, so libvirt's idea of the domain's state stays right.

Events are seen as with QMP: QEMU's events (RESUME, RESET, SHUTDOWN...), which libvirt forwards
(virConnectDomainQemuMonitorEventRegister, delivered by libvirt's default event loop on a
background thread), go to the listeners (runguard.RunGuard) as they come.

libvirt commands with a custom monitor command mark the domain "tainted: custom-monitor" in
its log; that is libvirt's bookkeeping, nothing changes in the guest.
"""

import json
import threading
from typing import Callable, List, Optional

from ..errors import AttachError, UsageError, VMGoneError
from ..present.textsafe import printable
from .qmp import Monitor, QmpCommandError, check_allowed, check_reply

DEFAULT_URI = "qemu:///system"
STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
          5: "shut off", 6: "crashed", 7: "suspended (PM)"}

_loop_lock = threading.Lock()
_loop_started = False


def bindings():
    """(libvirt, libvirt_qemu), or UsageError saying how to install them."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise UsageError("libvirt support needs the libvirt Python bindings: "
                         "pip install libvirt-python (it builds against libvirt-dev with "
                         "pkg-config)") from None
    # libvirt prints every error on stderr by default; ours are raised with a message instead
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt, libvirt_qemu


def _start_event_loop(libvirt) -> None:
    """libvirt's default event loop on a daemon thread (events, keepalive). Must run before a
    connection that wants events is opened; once per process."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while libvirt.virEventRunDefaultImpl() >= 0:
                pass

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def open_connection(uri: Optional[str], read_only: bool = False, events: bool = False):
    libvirt, _ = bindings()
    uri = uri or DEFAULT_URI
    if events:
        _start_event_loop(libvirt)
    try:
        return libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise AttachError(f"libvirt at {uri} cannot be reached: {_message(exc)}; is libvirtd "
                          "running there, and may this user use it? (--connect URI names "
                          "another)") from None


def _message(exc) -> str:
    try:
        return exc.get_error_message() or str(exc)
    except Exception:
        return str(exc)


def lookup(conn, name: str, uri: str):
    """The running domain `name`: UsageError (exit 2) when libvirt has no such domain, with
    the running ones listed; AttachError (exit 3) when it is not running."""
    libvirt, _ = bindings()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        try:
            running = sorted(d.name() for d in conn.listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
        except libvirt.libvirtError:
            running = []
        raise UsageError(f"--domain {name}: libvirt at {uri} has no domain of that name"
                         + (f"; running: {', '.join(running)}" if running else
                            "; it runs none")) from None
    if not dom.isActive():
        state = STATES.get(dom.state()[0], "?")
        raise AttachError(f"--domain {name}: the domain is not running ({state})")
    return dom


class LibvirtMonitor(Monitor):
    """QmpMonitor's interface over libvirt's qemu-monitor-command for one domain."""

    def __init__(self, domain: str, uri: Optional[str] = None, timeout: float = 5.0):
        self.domain_name = domain
        self.uri = uri or DEFAULT_URI
        self.timeout = timeout
        self.listeners: List[Callable] = []    # called with each event's name
        self.after_reply: List[Callable] = []  # called after each reply (QmpMonitor's)
        self.greeting = None
        self._conn = None
        self._dom = None
        self._callback = None

    @property
    def address(self) -> str:
        return f"libvirt:{self.domain_name}"

    def connect(self) -> "LibvirtMonitor":
        libvirt, libvirt_qemu = bindings()
        self._conn = open_connection(self.uri, events=True)
        try:
            self._dom = lookup(self._conn, self.domain_name, self.uri)
            try:   # notice a daemon that went away instead of waiting on it
                self._conn.setKeepAlive(max(1, int(self.timeout)), 3)
            except libvirt.libvirtError:
                pass
            self._callback = libvirt_qemu.qemuMonitorEventRegister(
                self._conn, self._dom, None, self._on_event, None, 0)
        except BaseException:
            self.close()
            raise
        return self

    def _on_event(self, _conn, _dom, event, _seconds, _micros, _details, _opaque) -> None:
        if isinstance(event, str):
            for listener in list(self.listeners):
                listener(event)

    def poll(self) -> None:
        """(Events come on libvirt's own thread, as they are sent: nothing to take in.)"""

    def command(self, name: str, **arguments) -> object:
        """Run one allowlisted QMP command through libvirt and return its 'return' value."""
        check_allowed(name, arguments)
        libvirt, libvirt_qemu = bindings()
        if self._dom is None:
            raise VMGoneError("the libvirt monitor is not connected")
        try:
            if name in ("stop", "cont"):
                # libvirt's own calls, so that its record of the domain's state stays right
                if arguments:
                    raise QmpCommandError(f"QMP {name} takes no arguments")
                (self._dom.suspend if name == "stop" else self._dom.resume)()
                result = {}
            else:
                message = {"execute": name}
                if arguments:
                    message["arguments"] = arguments
                text = libvirt_qemu.qemuMonitorCommand(self._dom, json.dumps(message), 0)
                reply = json.loads(text)
                if not isinstance(reply, dict):
                    raise ValueError(f"a {type(reply).__name__}, not an object")
                # the checks QMP's own replies pass (qmp.check_reply): the same shapes
                check_reply(reply, name, f"libvirt domain {printable(self.domain_name)}")
                if "error" in reply:
                    raise QmpCommandError(f"QEMU refused QMP {name}: "
                                          f"{printable(reply['error']['desc'])}")
                result = reply["return"]
        except libvirt.libvirtError as exc:
            raise VMGoneError(f"libvirt could not run QMP {name} on domain {self.domain_name}: "
                              f"{_message(exc)}") from None
        except (ValueError, RecursionError) as exc:       # not JSON, or not QMP's
            raise VMGoneError(f"libvirt gave an answer to QMP {name} that is not QMP's JSON: "
                              f"{exc}") from None
        for hook in tuple(self.after_reply):
            hook()
        return result

    def close(self) -> None:
        if self._conn is not None:
            if self._callback is not None:
                try:
                    _, libvirt_qemu = bindings()
                    libvirt_qemu.qemuMonitorEventDeregister(self._conn, self._callback)
                except Exception:
                    pass
                self._callback = None
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
        self._dom = None


# ---- from a domain name to what a Session needs --------------------------------------------------


def running_domains(uri: Optional[str]) -> List[dict]:
    """libvirt's running domains at `uri`: name, id, uuid, state, RAM (bytes)."""
    libvirt, _ = bindings()
    uri = uri or DEFAULT_URI
    conn = open_connection(uri, read_only=True)
    out = []
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                state, _max_kib, mem_kib, _vcpus, _cpu = dom.info()
                out.append({"uri": uri, "domain": dom.name(), "id": dom.ID(),
                            "uuid": dom.UUIDString().lower(),
                            "state": STATES.get(state, str(state)), "ram": mem_kib * 1024})
            except libvirt.libvirtError:
                continue      # it went away meanwhile
    finally:
        conn.close()
    return sorted(out, key=lambda d: d["domain"])

