"""VMs that libvirt manages, through libvirt's own interface, with a real libvirtd.

The test starts its own libvirtd: a session daemon (qemu:///session) with private HOME and
XDG_RUNTIME_DIR in a temporary folder, run as `nobody` when the tests run as root (a root
libvirtd is always the system one), as the test's user otherwise. It touches no system
libvirt, no other user's, and stops everything it started. Its domains are transient TCG
domains (type='qemu') booting the bundled guest's kernel and initramfs (copied next to the
daemon, which cannot read root's cache) on the system's QEMU, 256 MiB, serial on a file.

What is checked: `list` shows the domain (from /proc and from libvirt), `translate --domain`
(registers through QMP through libvirt, memory read straight from the QEMU process) agrees
with QEMU's own gva2gpa asked through `virsh qemu-monitor-command --hmp`, `cpus --domain`, the
run state is as found afterwards (running, and paused), a gdbstub given by the domain's
<qemu:commandline> is used, the allowlist holds through libvirt, and a reset while reading
is an error. If libvirtd cannot be started here, the tests fail, saying why.
"""

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from qintrospect.machine.monitor_text import parse_gva2gpa, parse_registers
from vm.guest import Guest, PROMPT, default_cache_dir

from .conftest import run_cli, run_json

pytestmark = pytest.mark.vm

NOBODY = 65534
SYSTEM_QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
SETUP_HINT = ("scripts/setup installs it: apt-get install --no-install-recommends "
              "libvirt-daemon-system libvirt-clients libvirt-dev pkg-config python3-dev; "
              ".venv/bin/pip install libvirt-python")


class LibvirtRig:
    """A private libvirtd (qemu:///session) and the transient domains started through it."""

    def __init__(self):
        try:
            import libvirt  # noqa: F401
        except ImportError:
            pytest.fail(f"the libvirt Python bindings are missing; {SETUP_HINT}")
        self.libvirtd = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        if not os.path.exists(self.libvirtd):
            pytest.fail(f"libvirtd is not installed; {SETUP_HINT}")
        if not shutil.which("virsh"):
            pytest.fail(f"virsh is not installed; {SETUP_HINT}")
        Guest.check_built()
        self.uid = NOBODY if os.geteuid() == 0 else os.geteuid()
        self.gid = NOBODY if os.geteuid() == 0 else os.getegid()
        self.tmp = tempfile.mkdtemp(prefix="qi-libvirt-")
        self.home = os.path.join(self.tmp, "home")
        self.run = os.path.join(self.tmp, "run")
        self.img = os.path.join(self.tmp, "img")
        self.proc = None
        self.conn = None
        self.domains = {}          # name -> (virDomain, QEMU pid)
        self.log_path = os.path.join(self.tmp, "libvirtd.log")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        import libvirt
        os.chmod(self.tmp, 0o755)
        for d in (self.home, self.run, self.img):
            os.mkdir(d, 0o700 if d == self.run else 0o755)
        # QEMU's own output straight to a file: no virtlogd daemon to start and stop
        os.makedirs(os.path.join(self.home, ".config", "libvirt"))
        with open(os.path.join(self.home, ".config", "libvirt", "qemu.conf"), "w") as f:
            f.write('stdio_handler = "file"\n')
        cache = default_cache_dir()
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            shutil.copy(os.path.join(cache, f), os.path.join(self.img, f))
        for root, dirs, files in os.walk(self.tmp):
            for n in dirs + files:
                os.chown(os.path.join(root, n), self.uid, self.gid)
        os.chown(self.tmp, self.uid, self.gid)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": self.home,
               "XDG_RUNTIME_DIR": self.run, "XDG_CONFIG_HOME": f"{self.home}/.config",
               "XDG_CACHE_HOME": f"{self.home}/.cache",
               "XDG_DATA_HOME": f"{self.home}/.local/share", "LC_ALL": "C"}
        cmd = [self.libvirtd]
        if os.geteuid() == 0:
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"] \
                + cmd
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        sock = os.path.join(self.run, "libvirt", "libvirt-sock")
        self.uri = f"qemu+unix:///session?socket={sock}"
        deadline = time.monotonic() + 60
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if os.path.exists(sock):
                try:
                    self.conn = libvirt.open(self.uri)
                    return
                except libvirt.libvirtError as exc:
                    last = str(exc)
            time.sleep(0.1)
        pytest.fail(f"libvirtd could not be started here ({' '.join(cmd)}; exit status "
                    f"{self.proc.poll()}; {last}); its log:\n{self.log_tail()}\n{SETUP_HINT}")

    def log_tail(self, n=3000):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"

    def domain_xml(self, name, qemu_args=(), memory_mib=256):
        serial = os.path.join(self.img, f"{name}.console")
        extra = ""
        if qemu_args:
            extra = "<qemu:commandline>" + "".join(
                f"<qemu:arg value='{a}'/>" for a in qemu_args) + "</qemu:commandline>"
        return f"""
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.img}/vmlinuz</kernel>
    <initrd>{self.img}/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <devices>
    <emulator>{SYSTEM_QEMU}</emulator>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  {extra}
</domain>"""

    def start_domain(self, name, qemu_args=(), timeout=120):
        """createXML (transient), then wait for the guest's shell prompt on its serial file."""
        import libvirt
        try:
            dom = self.conn.createXML(self.domain_xml(name, qemu_args), 0)
        except libvirt.libvirtError as exc:
            pytest.fail(f"libvirt could not start domain {name}: {exc}\n{self.log_tail()}")
        pid = self.qemu_pid(name)
        self.domains[name] = (dom, pid)
        console = os.path.join(self.img, f"{name}.console")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(console, errors="replace") as f:
                    if PROMPT in f.read():
                        return dom, pid
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"domain {name} did not reach its shell prompt; console:\n"
                    f"{open(console, errors='replace').read()[-2000:]}")

    def qemu_pid(self, name):
        """libvirt's own record of the QEMU pid (its pid file), not qintrospect's finding."""
        with open(os.path.join(self.run, "libvirt", "qemu", "run", f"{name}.pid")) as f:
            return int(f.read().strip())

    def virsh(self, *args):
        out = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, f"virsh {' '.join(args)}: {out.stderr}"
        return out.stdout

    def hmp(self, name, line):
        return self.virsh("qemu-monitor-command", name, "--hmp", line)

    def qmp(self, name, command):
        return json.loads(self.virsh("qemu-monitor-command", name,
                                     json.dumps({"execute": command})))["return"]

    def stop(self):
        for name, (dom, pid) in list(self.domains.items()):
            try:
                dom.destroy()
            except Exception:
                pass
            _kill_if(pid, self.tmp)
        self.domains.clear()
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # libvirtd's helper daemon, started by it on its first domain
        try:
            with open(os.path.join(self.run, "libvirt", "virtlogd.pid")) as f:
                _kill_if(int(f.read().strip()), None, "virtlogd", self.uid)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _kill_if(pid, needle=None, comm=None, uid=None):
    """Kill pid only if it is still the process we started (its command line names our folder,
    or its name and owner match)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return
    owner = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    if needle is not None and needle not in cmdline:
        return
    if comm is not None and (comm not in cmdline or owner != uid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.fixture(scope="module")
def rig():
    r = LibvirtRig()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def domain(rig):
    name = f"qi-lv-{os.getpid()}"
    dom, pid = rig.start_domain(name)
    return name, dom, pid


def kernel_addresses(rig, name):
    """Addresses the guest kernel maps for good: its stack, code, GDT, IDT, TSS, per-CPU."""
    text = rig.hmp(name, "info registers")
    regs = parse_registers(text)
    out = [regs["RSP"], regs["RIP"]]
    for seg in ("GDT", "IDT", "TR", "GS"):
        m = re.search(rf"^{seg}\s*=\s*(?:[0-9a-f]{{4}} )?([0-9a-f]{{16}})", text, re.M)
        if m and int(m.group(1), 16) >> 47:
            out.append(int(m.group(1), 16))
    assert len(out) >= 4, text
    return out


def host_hpa(pid, hva):
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(hva // 4096 * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    return (entry & ((1 << 55) - 1)) * 4096 + hva % 4096 if entry >> 63 & 1 else None


def test_list_shows_the_domain_from_proc_and_from_libvirt(rig, domain):
    name, dom, pid = domain
    rc, vms, err = run_json("list", "--connect", rig.uri)
    assert rc == 0, err
    (vm,) = [v for v in vms if v["pid"] == pid]
    assert vm["name"] == name and vm["ram"] == 256 << 20 and vm["accel"] == "tcg"
    assert vm["state"] == "running" and vm["user"] == ("nobody" if os.geteuid() == 0 else
                                                      vm["user"])
    assert vm["libvirt"]["domain"] == name and vm["libvirt"]["uri"] == rig.uri
    assert vm["libvirt"]["uuid"] == dom.UUIDString().lower() == vm["uuid"]
    assert vm["attach"] == f"--domain {name} --connect {rig.uri}"
    (qmp,) = vm["qmp"]
    assert qmp["owner"] == "libvirt" and qmp["usable"] is False
    assert vm["gdb"] is None and vm["libvirt_started"] is True
    # from /proc alone: the name, and that its monitor is libvirt's
    rc, vms, err = run_json("list", "--no-libvirt")
    assert rc == 0, err
    (vm,) = [v for v in vms if v["pid"] == pid]
    assert vm["name"] == name and vm["libvirt"] is None
    assert f"--domain {name}" in vm["qmp"][0]["problem"]
    rc, out, err = run_cli("list", "--connect", rig.uri)
    assert rc == 0, err
    (row,) = [line for line in out.splitlines() if line.split()[0] == str(pid)]
    assert name in row and "256 MiB" in row and f"libvirt: --domain {name}" in row


def test_translate_through_libvirt_agrees_with_qemus_gva2gpa(rig, domain):
    name, dom, pid = domain
    addresses = kernel_addresses(rig, name)
    assert rig.qmp(name, "query-status")["status"] == "running"
    rc, out, err = run_json("translate", "-v", "--domain", name, "--connect", rig.uri,
                            *map(hex, addresses))
    assert rc == 0, err
    assert f"QMP libvirt:{name}" in err and "gdb (none" in err, err
    assert len(out) == len(addresses)
    for gva, t in zip(addresses, out):
        qemu_gpa = parse_gva2gpa(rig.hmp(name, f"gva2gpa {gva:#x}"))
        assert int(t["gpa"], 16) == qemu_gpa, (hex(gva), t)
        assert t["qemu_pid"] == pid and t["memory_path"] == "direct"
        assert t["value_matches"] is True
        assert int(t["hpa"], 16) == host_hpa(pid, int(t["hva"], 16))
    # left as found: running, for libvirt and for QEMU
    assert dom.state()[0] == 1
    assert rig.qmp(name, "query-status")["status"] == "running"


def test_a_paused_domain_stays_paused(rig, domain):
    name, dom, pid = domain
    gva = kernel_addresses(rig, name)[2]
    rig.virsh("suspend", name)
    try:
        rc, out, err = run_json("translate", "--domain", name, "--connect", rig.uri, hex(gva))
        assert rc == 0, err
        assert int(out[0]["gpa"], 16) == parse_gva2gpa(rig.hmp(name, f"gva2gpa {gva:#x}"))
        assert rig.qmp(name, "query-status")["status"] == "paused"
        assert rig.virsh("domstate", name).strip() == "paused"
        # --freeze on a paused VM: still paused after
        rc, out, err = run_json("translate", "--freeze", "--domain", name, "--connect",
                                rig.uri, hex(gva))
        assert rc == 0, err
        assert rig.qmp(name, "query-status")["status"] == "paused"
    finally:
        rig.virsh("resume", name)
    rc, out, err = run_json("translate", "--freeze", "--domain", name, "--connect", rig.uri,
                            hex(gva))
    assert rc == 0, err
    assert rig.virsh("domstate", name).strip() == "running"
    assert rig.qmp(name, "query-status")["status"] == "running"


def test_cpus_through_libvirt(rig, domain):
    name, dom, pid = domain
    rc, out, err = run_json("cpus", "--domain", name, "--connect", rig.uri)
    assert rc == 0, err
    (cpu,) = out
    (fast,) = rig.qmp(name, "query-cpus-fast")
    assert cpu["thread_id"] == fast["thread-id"]
    regs = parse_registers(rig.hmp(name, "info registers"))
    for reg in ("cr0", "cr4", "efer"):
        assert int(cpu[reg], 16) == regs[reg.upper()], reg
    assert cpu["mode"] == "4-level"
    rc, out, err = run_cli("cpus", "--domain", name, "--connect", rig.uri)
    assert rc == 0 and "4-level" in out, err
    assert rig.qmp(name, "query-status")["status"] == "running"


def test_domain_errors(rig, domain):
    name, dom, pid = domain
    rc, out, err = run_cli("cpus", "--domain", "qi-no-such-domain", "--connect", rig.uri)
    assert rc == 2 and "no domain of that name" in err and name in err, err
    defined = rig.conn.defineXML(rig.domain_xml(f"qi-lv-off-{os.getpid()}"))
    try:
        rc, out, err = run_cli("cpus", "--domain", defined.name(), "--connect", rig.uri)
        assert rc == 3 and "not running" in err, err
    finally:
        defined.undefine()
    rc, out, err = run_cli("cpus", "--domain", name, "--connect", rig.uri, "--qmp", "/x")
    assert rc == 2 and "--domain" in err
    rc, out, err = run_cli("cpus", "--domain", name, "--connect", "qemu+unix:///session?"
                           "socket=/nonexistent/libvirt-sock")
    assert rc == 3 and "cannot be reached" in err, err


def test_the_allowlist_holds_through_libvirt(rig, domain):
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    name, dom, pid = domain
    m = LibvirtMonitor(name, rig.uri).connect()
    seen = []
    m.listeners.append(seen.append)
    try:
        for command, args in (("system_reset", {}), ("quit", {}), ("migrate", {"uri": "x"}),
                              ("human-monitor-command", {"command-line": "gpa2hpa 0x1000"})):
            with pytest.raises(ValueError, match="allowlist"):
                m.command(command, **args)
        assert m.command("query-status")["status"] == "running"
        time.sleep(0.5)
        assert seen == []                # no RESET (nor anything else) reached QEMU
    finally:
        m.close()
    assert dom.state()[0] == 1


def test_a_gdbstub_from_the_domains_qemu_commandline_is_used(rig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"qi-lvg-{os.getpid()}"
    dom, pid = rig.start_domain(name, qemu_args=("-gdb", f"tcp:127.0.0.1:{port}"))
    rc, vms, err = run_json("list", "--connect", rig.uri)
    (vm,) = [v for v in vms if v["pid"] == pid]
    assert vm["gdb"]["address"] == f"127.0.0.1:{port}" and vm["gdb"]["state"] == "listening"
    addresses = kernel_addresses(rig, name)
    # --via gdb: memory through the gdbstub that --domain found (by default qintrospect may
    # leave it aside when QEMU's memory can be read directly)
    rc, out, err = run_json("translate", "-v", "--via", "gdb", "--domain", name, "--connect",
                            rig.uri, *map(hex, addresses))
    assert rc == 0, err
    assert f"gdb 127.0.0.1:{port}" in err, err
    for gva, t in zip(addresses, out):
        assert int(t["gpa"], 16) == parse_gva2gpa(rig.hmp(name, f"gva2gpa {gva:#x}"))
        assert t["qemu_pid"] == pid and t["memory_path"] == "gdb"
    assert rig.qmp(name, "query-status")["status"] == "running"
    rc, out2, err = run_json("translate", "--domain", name, "--connect", rig.uri,
                             *map(hex, addresses))
    assert rc == 0, err
    assert [t["gpa"] for t in out2] == [t["gpa"] for t in out]
    # gdb stopped it while attached; libvirt resumed it: running for libvirt and for QEMU
    assert rig.qmp(name, "query-status")["status"] == "running"
    assert rig.virsh("domstate", name).strip() == "running"
    dom.destroy()
    rig.domains.pop(name, None)


def test_a_reset_while_reading_is_an_error(rig, domain):
    """Last: the guest reboots."""
    import libvirt
    from qintrospect.errors import VMGoneError
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    name, dom, pid = domain
    from qintrospect.connect.runguard import RunGuard
    m = LibvirtMonitor(name, rig.uri).connect()
    try:
        guard = RunGuard(lambda: m, f"libvirt:{name}", None, 5.0, [])
        guard.observe(m, m.command("query-status"))     # a read of a running VM begins
        dom.reset(0)
        with pytest.raises(VMGoneError, match="reset"):
            for _ in range(200):
                guard.check()
                time.sleep(0.05)
    finally:
        m.close()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
