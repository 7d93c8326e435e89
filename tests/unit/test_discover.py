"""Finding VMs without a VM: QEMU command lines as QEMU reads them (libvirt's, virt-manager's,
the project's own rigs', hand-written ones), the socket tables, the QMP probe against a fake
QMP server, and the libvirt monitor against a fake libvirt binding.

Out of scope, and said so by the parser: options inside `-readconfig FILE`, and `-set`.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types

import pytest
from hypothesis import given, settings, strategies as st

from qintrospect.connect import discover, targets
from qintrospect.connect.cmdline import Endpoint, parse_command_line, parse_opts, parse_size
from qintrospect.connect.discover import QemuProcess, check_endpoints
from qintrospect.errors import AttachError, UsageError, VMGoneError
from qintrospect.connect.qmp import ALLOWED_QMP, QmpCommandError

MiB, GiB = 1 << 20, 1 << 30


def cl(text, cwd=None, program="qemu-system-x86_64"):
    """A command line written as a shell would split it (no quotes needed in these)."""
    argv = [program] + (text if isinstance(text, list) else text.split())
    return parse_command_line(argv, cwd)


# ---- QEMU's option syntax -----------------------------------------------------------------------

@pytest.mark.parametrize("text,implied,expected", [
    ("guest=vm1,debug-threads=on", "guest", {"guest": "vm1", "debug-threads": "on"}),
    ("vm1", "guest", {"guest": "vm1"}),
    ("my,,vm,process=qemu-my", "guest", {"guest": "my,vm", "process": "qemu-my"}),
    ("socket,id=c,path=/tmp/a,,b,server,nowait", "backend",
     {"backend": "socket", "id": "c", "path": "/tmp/a,b", "server": "on", "wait": "off"}),
    ("size=2G,slots=4,maxmem=8G", "size", {"size": "2G", "slots": "4", "maxmem": "8G"}),
    ("a=1,a=2", None, {"a": "2"}),
    ("path=/x=y", None, {"path": "/x=y"}),
    ("", "guest", {}),
])
def test_opts_as_qemu_reads_them(text, implied, expected):
    assert parse_opts(text, implied) == expected


@pytest.mark.parametrize("text,shift,expected", [
    ("256", 20, 256 * MiB), ("256M", 0, 256 * MiB), ("1G", 0, GiB), ("1g", 0, GiB),
    ("1.5G", 0, 3 * GiB // 2), ("0x400", 20, 1024 * MiB), ("4096", 0, 4096), ("2T", 0, 2 << 40),
    ("262144k", 0, 256 * MiB), ("1.k", 0, 1024), (268435456, 0, 256 * MiB),
    ("1GB", 0, None), ("-1", 0, None), ("", 0, None), ("1.5", 0, None), ("abc", 20, None),
    ("0x10M", 0, None), (True, 0, None),
])
def test_sizes_as_qemu_reads_them(text, shift, expected):
    assert parse_size(text, shift) == expected


# ---- real command lines -------------------------------------------------------------------------

# libvirt 9.0 (Debian 12), a transient TCG domain, as this project's test started it
LIBVIRT_9 = [
    "-name", "guest=qi-lv-test,debug-threads=on", "-S", "-object",
    '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/'
    'domain-1-qi-lv-test/master-key.aes"}',
    "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
    "-accel", "tcg", "-cpu", "qemu64", "-m", "256", "-object",
    '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}',
    "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
    "-uuid", "905409DD-96a1-452e-bb59-51c72fe3650a", "-display", "none", "-no-user-config",
    "-nodefaults", "-chardev", "socket,id=charmonitor,fd=24,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control", "-rtc", "base=utc", "-no-shutdown",
    "-no-acpi", "-boot", "strict=on", "-kernel", "/tmp/img/vmlinuz", "-initrd",
    "/tmp/img/initramfs.cpio.gz", "-append", "console=ttyS0 panic=-1", "-device",
    '{"driver":"piix3-usb-uhci","id":"usb","bus":"pci.0","addr":"0x1.0x2"}',
    "-add-fd", "set=0,fd=25,opaque=serial0-source", "-chardev",
    "file,id=charserial0,path=/dev/fdset/0,append=on", "-device",
    '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
    "-audiodev", '{"id":"audio1","driver":"none"}', "-sandbox",
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-msg", "timestamp=on"]

# libvirt 4.0 (Ubuntu 18.04), KVM: the monitor on a path, accel in -machine, old flag forms
LIBVIRT_4 = (
    "-name guest=ubuntu18,debug-threads=on -S -object secret,id=masterKey0,format=raw,"
    "file=/var/lib/libvirt/qemu/domain-3-ubuntu18/master-key.aes -machine "
    "pc-i440fx-bionic,accel=kvm,usb=off,vmport=off,dump-guest-core=off -cpu "
    "Skylake-Client-IBRS,ss=on,hypervisor=on -m 2048 -realtime mlock=off -smp "
    "2,sockets=2,cores=1,threads=1 -uuid 6a2e0b43-2d3a-4b4c-9d1e-1f2a3b4c5d6e "
    "-no-user-config -nodefaults -chardev socket,id=charmonitor,path=/var/lib/libvirt/qemu/"
    "domain-3-ubuntu18/monitor.sock,server,nowait -mon chardev=charmonitor,id=monitor,"
    "mode=control -rtc base=utc,driftfix=slew -global kvm-pit.lost_tick_policy=delay -no-hpet "
    "-no-shutdown -global PIIX4_PM.disable_s3=1 -global PIIX4_PM.disable_s4=1 -boot strict=on "
    "-drive file=/var/lib/libvirt/images/ubuntu18.qcow2,format=qcow2,if=none,"
    "id=drive-virtio-disk0 -device virtio-blk-pci,scsi=off,bus=pci.0,addr=0x7,"
    "drive=drive-virtio-disk0,id=virtio-disk0,bootindex=1 -netdev tap,fd=26,id=hostnet0,"
    "vhost=on,vhostfd=28 -device virtio-net-pci,netdev=hostnet0,id=net0,"
    "mac=52:54:00:aa:bb:cc,bus=pci.0,addr=0x3 -chardev pty,id=charserial0 -device "
    "isa-serial,chardev=charserial0,id=serial0 -chardev spicevmc,id=charchannel0,name=vdagent "
    "-spice port=5900,addr=127.0.0.1,disable-ticketing,image-compression=off,"
    "seamless-migration=on -device qxl-vga,id=video0,ram_size=67108864,bus=pci.0,addr=0x2 "
    "-msg timestamp=on")

# virt-manager through libvirt 10 (q35, KVM, guest agent socket, memory hotplug, -m size=...k)
VIRT_MANAGER = [
    "-name", "guest=win11,debug-threads=on", "-S", "-object",
    '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/'
    'domain-7-win11/master-key.aes"}', "-blockdev",
    '{"driver":"file","filename":"/usr/share/OVMF/OVMF_CODE_4M.ms.fd","node-name":'
    '"libvirt-pflash0-storage","auto-read-only":true,"discard":"unmap"}',
    "-machine", "pc-q35-8.2,usb=off,vmport=off,smm=on,dump-guest-core=off,memory-backend=pc.ram,"
    "hpet=off,acpi=on", "-accel", "kvm", "-cpu", "host,migratable=on,hv-time=on",
    "-m", "size=4194304k,slots=16,maxmem=16777216k", "-object",
    '{"qom-type":"memory-backend-ram","id":"pc.ram","size":4294967296}',
    "-overcommit", "mem-lock=off", "-smp", "4,sockets=1,dies=1,cores=4,threads=1",
    "-uuid", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "-display", "none", "-no-user-config",
    "-nodefaults", "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control", "-rtc",
    "base=localtime,driftfix=slew", "-global", "kvm-pit.lost_tick_policy=delay",
    "-no-shutdown", "-boot", "strict=on", "-chardev", "pty,id=charserial0", "-device",
    '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
    "-chardev", "socket,id=charchannel0,fd=29,server=on,wait=off", "-device",
    '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0",'
    '"id":"channel0","name":"org.qemu.guest_agent.0"}',
    "-audiodev", '{"id":"audio1","driver":"spice"}', "-spice",
    "port=5900,addr=127.0.0.1,disable-ticketing=on,image-compression=off,seamless-migration=on",
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-msg", "timestamp=on"]


def test_libvirt_9_command_line():
    c = cl(LIBVIRT_9)
    assert c.name == "qi-lv-test" and c.uuid == "905409dd-96a1-452e-bb59-51c72fe3650a"
    assert c.ram == 256 * MiB and c.ram_source == "-m"
    assert c.accel == ["tcg"] and c.accel_source == "-accel"
    assert c.libvirt and c.paused_at_start
    assert c.gdb is None and c.hmp == []
    (qmp,) = c.qmp
    assert qmp.owner == "libvirt" and qmp.transport == "fd" and qmp.fd == 24
    assert qmp.chardev == "charmonitor" and not qmp.usable
    assert "--domain qi-lv-test" in qmp.problem


def test_libvirt_4_command_line():
    c = cl(LIBVIRT_4)
    assert c.name == "ubuntu18" and c.ram == 2048 * MiB
    assert c.accel == ["kvm"] and c.accel_source == "-machine accel="
    (qmp,) = c.qmp
    assert qmp.owner == "libvirt" and qmp.transport == "unix" and qmp.server
    assert qmp.path == "/var/lib/libvirt/qemu/domain-3-ubuntu18/monitor.sock"
    assert "--domain ubuntu18" in qmp.problem
    assert c.gdb is None


def test_virt_manager_command_line():
    c = cl(VIRT_MANAGER)
    assert c.name == "win11" and c.accel == ["kvm"]
    # size=4194304k ends in a unit, so it is bytes (times 1024): 4 GiB; maxmem likewise
    assert c.ram == 4 * GiB and c.maxmem == 16 * GiB
    assert c.libvirt and [e.owner for e in c.qmp] == ["libvirt"]
    # the guest agent's socket is a chardev nobody made a monitor: not listed
    assert len(c.qmp) == 1 and c.hmp == []


def test_libvirt_domain_with_a_gdbstub_from_qemu_commandline():
    c = cl(LIBVIRT_9 + ["-gdb", "tcp:127.0.0.1:5555"])
    assert c.gdb.transport == "tcp" and c.gdb.port == 5555 and c.gdb.server
    assert c.gdb.usable and c.gdb.address == "127.0.0.1:5555"


def test_the_bundled_guest_command_line():
    c = cl("-nodefaults -no-user-config -name qintrospect-test-guest -accel tcg -cpu max "
           "-m 256M -smp 1 -kernel /c/vmlinuz -initrd /c/initramfs.cpio.gz -append "
           "console=ttyS0 -display none -monitor none -chardev stdio,id=qi-serial,signal=off "
           "-serial chardev:qi-serial -qmp unix:/tmp/qi-vm-x/qmp.sock,server=on,wait=off "
           "-gdb tcp:127.0.0.1:40000 -no-reboot -name other-name")
    assert c.name == "other-name"     # -name merges: the later value wins
    assert c.ram == 256 * MiB and c.accel == ["tcg"] and not c.libvirt
    (qmp,) = c.qmp
    assert qmp.usable and qmp.address == "unix:/tmp/qi-vm-x/qmp.sock"
    assert c.gdb.address == "127.0.0.1:40000"
    assert c.hmp == []                # -monitor none


def test_the_oracle_and_rig_command_lines():
    c = cl("-accel tcg -m 64M -cpu max -serial file:/tmp/o/serial.log -qmp "
           "unix:/tmp/o/qmp.sock,server=on,wait=off -chardev socket,id=oracleqmp,"
           "path=/tmp/o/own.sock,server=on,wait=off -mon chardev=oracleqmp,mode=control "
           "-gdb tcp:127.0.0.1:4321")
    assert [e.address for e in c.qmp] == ["unix:/tmp/o/qmp.sock", "unix:/tmp/o/own.sock"]
    assert c.qmp[1].chardev == "oracleqmp"
    # the KVM rig's L2 inside L1: monitors on serial lines, which cannot be used from here
    c = cl("-name qi-l2-oracle -accel kvm -m 64M -qmp unix:/run/l2-qmp.sock,server=on,wait=off "
           "-chardev serial,id=l0qmp,path=/dev/ttyS1 -mon chardev=l0qmp,mode=control "
           "-gdb /dev/ttyS2 -serial /dev/ttyS3")
    assert c.qmp[0].usable and not c.qmp[1].usable and "serial line" in c.qmp[1].problem
    assert c.gdb.transport == "serial" and not c.gdb.usable
    # the nested rig's L1: serial ports on sockets are not monitors
    c = cl("-m 1G -serial unix:/tmp/n/s1.sock,server=on,wait=off -serial "
           "unix:/tmp/n/s2.sock,server=on,wait=off -qmp unix:/tmp/n/qmp.sock,server=on,wait=off")
    assert len(c.qmp) == 1 and c.hmp == [] and c.gdb is None


def test_hand_written_kvm_with_stdio_monitor_and_s():
    c = cl("-enable-kvm -m 4G -smp 4 -hda disk.img -monitor stdio -s")
    assert c.accel == ["kvm"] and c.accel_source == "-enable-kvm" and c.ram == 4 * GiB
    assert c.qmp == [] and len(c.hmp) == 1 and not c.hmp[0].usable
    assert c.gdb.port == 1234 and c.gdb.host == "" and c.gdb.address == "127.0.0.1:1234"


def test_hand_written_tcp_qmp_and_mux_serial_monitor():
    c = cl("-M q35,accel=kvm:tcg -m 2048 -qmp tcp:localhost:4444,server,nowait -serial "
           "mon:stdio -gdb tcp::9000")
    assert c.accel == ["kvm", "tcg"] and c.ram == 2 * GiB
    (qmp,) = c.qmp
    assert qmp.usable and qmp.address == "localhost:4444"
    assert "HMP" in c.hmp[0].problem or "multiplexed" in c.hmp[0].problem
    assert c.gdb.address == "127.0.0.1:9000"


def test_relative_socket_paths_are_qemus_folder():
    c = cl("-chardev socket,id=mon0,path=run/qmp.sock,server=on,wait=off -mon "
           "chardev=mon0,mode=control,pretty=on -gdb unix:gdb.sock,server=on,wait=off",
           cwd="/srv/vm")
    assert c.qmp[0].path == "/srv/vm/run/qmp.sock" and c.qmp[0].usable
    assert c.gdb.path == "/srv/vm/gdb.sock" and c.gdb.usable


def test_hmp_monitors_and_unusable_qmps_say_why():
    c = cl("-qmp-pretty unix:/tmp/q.sock,server,nowait -monitor unix:/tmp/hmp.sock,server,"
           "nowait -qmp pty -qmp tcp:127.0.0.1:4444 -qmp telnet::4445,server,nowait "
           "-chardev socket,id=a,path=qmp,abstract=on,server=on,wait=off -mon a,mode=control "
           "-chardev socket,id=h,path=/tmp/h,server=on,wait=off -mon chardev=h -qmp stdio "
           "-qmp chardev:nosuch")
    q = c.qmp
    assert q[0].usable and q[0].path == "/tmp/q.sock"
    assert "pseudo-terminal" in q[1].problem
    assert "connects out" in q[2].problem
    assert "telnet" in q[3].problem
    assert "abstract" in q[4].problem        # in the order given
    assert "standard input" in q[5].problem
    assert "no -chardev" in q[6].problem
    assert [e.path for e in c.hmp] == ["/tmp/hmp.sock", "/tmp/h"]
    assert all("HMP" in e.problem for e in c.hmp)


def test_chardev_defined_after_its_use_and_ipv6():
    c = cl("-qmp chardev:c1 -chardev socket,id=c1,host=::1,port=5555,server=on,wait=off "
           "-qmp unix:/tmp/a,,b.sock,server")
    assert c.qmp[0].host == "::1" and c.qmp[0].port == 5555 and c.qmp[0].usable
    assert c.qmp[0].address == "::1:5555"
    assert c.qmp[1].path == "/tmp/a,b.sock"


def test_gdb_last_one_wins_and_none():
    assert cl("-s -gdb tcp::2000").gdb.port == 2000
    assert cl("-gdb tcp::2000 -s").gdb.port == 1234
    assert cl("-s -gdb none").gdb is None
    c = cl("-gdb chardev:g -chardev socket,id=g,path=/tmp/g,server=on,wait=off")
    assert c.gdb.address == "unix:/tmp/g" and c.gdb.chardev == "g"
    # -gdb unix: without server=on: QEMU would connect out
    assert "connects out" in cl("-gdb unix:/tmp/gdb.sock").gdb.problem


def test_option_values_are_never_options():
    c = cl(["-append", "console=ttyS0 -m 512 -qmp unix:/x,server", "-name", "real",
            "-device", "-m", "disk.qcow2"])
    assert c.name == "real" and c.ram == 128 * MiB and c.ram_source == "default"
    assert c.qmp == []


def test_double_dash_options_and_unknown_future_options():
    c = cl("--name foo --m 1G --run-with async-teardown=on --qmp unix:/q,server=on,wait=off "
           "--some-future-option -m -nographic -S")
    assert c.name == "foo" and c.ram == GiB and c.paused_at_start
    assert c.qmp[0].address == "unix:/q"


@pytest.mark.parametrize("text,ram,source", [
    ("-m 512", 512 * MiB, "-m"),
    ("-m 1.5G", 1536 * MiB, "-m"),
    ("-m 0x400", 1024 * MiB, "-m"),
    ("-m size=2G,slots=4,maxmem=8G", 2 * GiB, "-m"),
    ("-m 100k", 106496, "-m"),             # bytes (a unit letter), rounded up to 8 KiB
    ("-m 1G -m slots=2", GiB, "-m"),       # -m merges
    ("-object memory-backend-memfd,id=mem,size=8G,share=on -numa node,memdev=mem -m 8G",
     8 * GiB, "-m"),
    ("-object memory-backend-ram,id=pc.ram,size=512M -machine q35,memory-backend=pc.ram",
     512 * MiB, "memory-backend pc.ram"),
    ("-object memory-backend-ram,id=m0,size=1G -object memory-backend-ram,id=m1,size=1G "
     "-numa node,memdev=m0 -numa node,memdev=m1", 2 * GiB, "NUMA memdevs"),
    ("", 128 * MiB, "default"),
])
def test_ram_sizes(text, ram, source):
    c = cl(text)
    assert (c.ram, c.ram_source) == (ram, source)


def test_ram_from_a_json_backend_and_a_bad_size():
    c = cl(["-object", '{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":'
            '"/dev/hugepages/x","size":1073741824,"share":true}', "-machine",
            "memory-backend=pc.ram"])
    assert c.ram == GiB and c.ram_source == "memory-backend pc.ram"
    c = cl("-m 1GB")
    assert c.ram is None and "not a size QEMU accepts" in c.notes[0]


@pytest.mark.parametrize("text,program,accel", [
    ("-accel kvm -accel tcg", "qemu-system-x86_64", ["kvm", "tcg"]),
    ("-accel tcg,thread=single", "qemu-system-x86_64", ["tcg"]),
    ("-machine type=q35,accel=kvm", "qemu-system-x86_64", ["kvm"]),
    ("", "qemu-system-x86_64", ["tcg", "kvm"]),
    ("", "/usr/libexec/qemu-kvm", ["kvm", "tcg"]),
])
def test_accelerators_in_the_order_qemu_tries_them(text, program, accel):
    assert cl(text, program=program).accel == accel


def test_readconfig_is_out_of_scope_and_said_so():
    c = cl("-readconfig /etc/vm.cfg -name x")
    assert any("-readconfig /etc/vm.cfg" in n and "not read" in n for n in c.notes)


def test_names_with_commas_and_process_names():
    c = cl(["-name", "my,,vm,process=qemu-my,debug-threads=on"])
    assert c.name == "my,vm" and c.process_name == "qemu-my"
    assert cl(["-name", "a", "-name", "guest=b"]).name == "b"


def test_a_missing_last_argument_is_noted():
    c = cl("-m")
    assert "no argument" in c.notes[0]


# ---- the socket tables and the QMP probe, on sockets this test owns -----------------------------

class FakeQmp:
    """A QMP server on a Unix socket: greets (or not), answers query-status/query-kvm, records
    every command. One client at a time, as QEMU."""

    def __init__(self, path, greet=True, status="running"):
        self.path, self.greet, self.status = path, greet, status
        self.commands, self.accepted = [], 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.held = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)
            f = conn.makefile("rwb")
            try:
                if not self.greet:
                    continue
                f.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}, '
                        b'"capabilities": []}}\r\n')
                f.flush()
                for line in f:
                    msg = json.loads(line)
                    self.commands.append(msg)
                    ret = {"query-status": {"status": self.status,
                                            "running": self.status == "running"},
                           "query-kvm": {"enabled": False, "present": True}}.get(
                        msg["execute"], {})
                    f.write(json.dumps({"return": ret, "id": msg.get("id")}).encode() + b"\n")
                    f.flush()
            except OSError:
                pass
            f.close()          # QEMU closes its side when the client leaves
            conn.close()
            self.held.remove(conn)

    def close(self):
        self.server.close()
        for c in self.held:
            c.close()


def me_as_qemu(args):
    """This test process dressed as a QEMU with the given command line (its sockets are ours)."""
    argv = ["qemu-system-x86_64"] + args
    return QemuProcess(os.getpid(), argv, None, os.getuid(), "me", parse_command_line(argv))


@pytest.fixture
def folder():
    with tempfile.TemporaryDirectory(prefix="qi-discover-") as d:
        yield d


def test_a_free_qmp_socket_answers_with_its_run_state(folder):
    path = os.path.join(folder, "qmp.sock")
    fake = FakeQmp(path, status="paused")
    try:
        proc = me_as_qemu(["-qmp", f"unix:{path},server=on,wait=off"])
        check_endpoints(proc, timeout=2)
        (ep,) = proc.config.qmp
        assert ep.state == "answers" and ep.detail == "QEMU 7.2.22"
        assert ep.run_state == "paused" and ep.kvm is False
        assert proc.run_state == "paused" and proc.accel == "tcg"
        sent = [c["execute"] for c in fake.commands]
        assert sent == ["qmp_capabilities", "query-status", "query-kvm"]
        assert set(sent) <= ALLOWED_QMP
    finally:
        fake.close()


def test_a_busy_qmp_socket_is_in_use_and_not_connected_to(folder):
    path = os.path.join(folder, "qmp.sock")
    fake = FakeQmp(path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        client.recv(4096)                   # the greeting: someone holds the monitor
        proc = me_as_qemu(["-qmp", f"unix:{path},server=on,wait=off"])
        check_endpoints(proc, timeout=2)
        (ep,) = proc.config.qmp
        assert ep.state == "in use" and fake.accepted == 1
    finally:
        client.close()
        fake.close()


def test_a_socket_that_never_greets_is_in_use_after_the_timeout(folder):
    path = os.path.join(folder, "qmp.sock")
    fake = FakeQmp(path, greet=False)
    try:
        proc = me_as_qemu(["-qmp", f"unix:{path},server=on,wait=off"])
        discover._probe_qmp(proc.config.qmp[0], 0.3)
        assert proc.config.qmp[0].state == "in use"
        assert "no greeting" in proc.config.qmp[0].detail
    finally:
        fake.close()


def test_gdbstubs_are_only_looked_up_never_connected_to():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        proc = me_as_qemu(["-gdb", f"tcp:127.0.0.1:{port}"])
        check_endpoints(proc)
        assert proc.config.gdb.state == "listening"
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()                  # nobody knocked
        # a debugger connected: in use
        debugger = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        proc = me_as_qemu(["-gdb", f"tcp:127.0.0.1:{port}"])
        check_endpoints(proc)
        assert proc.config.gdb.state == "in use"
        debugger.close()
        conn.close()
    finally:
        server.close()
    proc = me_as_qemu(["-gdb", f"tcp:127.0.0.1:{port}", "-qmp",
                       "unix:/nonexistent/qmp.sock,server=on,wait=off"])
    check_endpoints(proc)
    assert proc.config.gdb.state == "not listening"
    assert proc.config.qmp[0].state == "not listening"


def test_endpoints_for_picks_an_answering_qmp_and_a_free_gdbstub(folder):
    path = os.path.join(folder, "qmp.sock")
    fake = FakeQmp(path)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        args = ["-qmp", "pty", "-qmp", f"unix:{path},server=on,wait=off",
                "-gdb", f"tcp::{port}"]
        qmp, gdb, notes = discover.endpoints_for(me_as_qemu(args), True, 2)
        assert (qmp, gdb, notes) == (f"unix:{path}", f"127.0.0.1:{port}", [])
        for _ in range(100):                 # the fake closes its side of the probe
            if not fake.held:
                break
            time.sleep(0.01)
        qmp, gdb, notes = discover.endpoints_for(me_as_qemu(args), False, 2)
        assert gdb is None
    finally:
        server.close()
        fake.close()


@pytest.mark.parametrize("args,words", [
    ([], "no QMP monitor"),
    (["-monitor", "stdio"], "HMP monitor"),
    (["-qmp", "pty"], "pseudo-terminal"),
    (LIBVIRT_9, "--domain qi-lv-test"),
    (["-qmp", "unix:/nonexistent/q.sock,server=on,wait=off"], "not listening"),
])
def test_no_usable_qmp_is_exit_3_saying_why(args, words):
    with pytest.raises(AttachError, match=words.replace("-", r"\-")) as e:
        discover.endpoints_for(me_as_qemu(args), True, 0.5)
    assert e.value.exit_status == 3


def test_the_table_has_a_row_per_vm():
    p = me_as_qemu(["-name", "vm1", "-m", "1G", "-qmp", "unix:/q,server=on,wait=off"])
    p.config.qmp[0].state = "answers"
    text = discover.table([p])
    header, row = text.splitlines()
    assert header.split()[:5] == ["PID", "NAME", "ACCEL", "RAM", "STATE"]
    assert str(os.getpid()) in row and "vm1" in row and "1 GiB" in row
    assert "unix:/q (answers)" in row


# ---- the command line ---------------------------------------------------------------------------

def run(*args):
    proc = subprocess.run([sys.executable, "-m", "qintrospect", *args], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args,words", [
    (("translate", "--pid", str(os.getpid()), "0x1000"), "not a QEMU process"),
    (("translate", "--pid", "999999999", "0x1000"), "no such process"),
    (("translate", "--name", "qi-no-such-vm-name", "0x1000"), "no QEMU process"),
    (("cpus", "--domain", "x", "--qmp", "/x"), "--domain"),
    (("list", "--connect", "qemu:///x", "--no-libvirt"), "contradict"),
])
def test_usage_errors(args, words):
    rc, out, err = run(*args)
    assert rc == 2, (rc, err)
    assert words in err and "Traceback" not in err


def test_no_libvirt_bindings_is_a_usage_error(monkeypatch, capsys):
    from qintrospect.cli import main
    monkeypatch.setitem(sys.modules, "libvirt", None)
    assert main(["cpus", "--domain", "x"]) == 2
    assert "pip install libvirt-python" in capsys.readouterr().err
    # list asks libvirt only when it can: without the bindings, quietly not (unless --connect)
    monkeypatch.setattr(discover, "processes", lambda: [])
    vms, notes = targets.list_vms()
    assert vms == [] and "pip install libvirt-python" in notes[0]
    with pytest.raises(UsageError, match="libvirt-python"):
        targets.list_vms("qemu:///system")
    assert main(["list"]) == 1 and "no QEMU process" in capsys.readouterr().err


# ---- the libvirt monitor, against a fake binding ------------------------------------------------

class FakeLibvirtError(Exception):
    def get_error_message(self):
        return str(self)


class FakeDomain:
    def __init__(self):
        self.state_calls = []

    def name(self):
        return "vm1"

    def isActive(self):
        return True

    def suspend(self):
        self.state_calls.append("suspend")

    def resume(self):
        self.state_calls.append("resume")


@pytest.fixture
def fake_libvirt(monkeypatch):
    sent, callbacks = [], []
    dom = FakeDomain()
    lv = types.SimpleNamespace(
        libvirtError=FakeLibvirtError, VIR_CONNECT_LIST_DOMAINS_ACTIVE=1,
        registerErrorHandler=lambda *a: None, virEventRegisterDefaultImpl=lambda: 0,
        virEventRunDefaultImpl=lambda: -1)
    conn = types.SimpleNamespace(lookupByName=lambda name: dom, setKeepAlive=lambda *a: 0,
                                 close=lambda: 0)
    lv.open = lambda uri: conn
    replies = {}

    def monitor_command(d, text, flags):
        msg = json.loads(text)
        sent.append(msg)
        if msg["execute"] in replies:
            r = replies[msg["execute"]]
            if isinstance(r, Exception):
                raise r
            return json.dumps(r)
        if msg["execute"] == "human-monitor-command":
            return json.dumps({"return": "", "id": "libvirt-9"})
        return json.dumps({"return": {"status": "running", "running": True}, "id": "libvirt-9"})

    def register(c, d, event, cb, opaque, flags):
        callbacks.append(cb)
        return 7

    lq = types.SimpleNamespace(qemuMonitorCommand=monitor_command,
                               qemuMonitorEventRegister=register,
                               qemuMonitorEventDeregister=lambda c, i: 0)
    monkeypatch.setitem(sys.modules, "libvirt", lv)
    monkeypatch.setitem(sys.modules, "libvirt_qemu", lq)
    return types.SimpleNamespace(sent=sent, callbacks=callbacks, dom=dom, replies=replies)


def test_libvirt_monitor_sends_qmp_as_json(fake_libvirt):
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    m = LibvirtMonitor("vm1", "qemu:///system").connect()
    assert m.command("query-status") == {"status": "running", "running": True}
    m.hmp("info registers", cpu_index=1)
    assert fake_libvirt.sent == [
        {"execute": "query-status"},
        {"execute": "human-monitor-command",
         "arguments": {"command-line": "info registers", "cpu-index": 1}}]
    m.close()


def test_the_allowlist_holds_through_libvirt(fake_libvirt):
    """Nothing off the read-only allowlist reaches libvirt, QMP or HMP."""
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    m = LibvirtMonitor("vm1").connect()
    for name, args in (("system_reset", {}), ("quit", {}), ("migrate", {"uri": "exec:x"}),
                       ("human-monitor-command", {"command-line": "gpa2hpa 0x1000"}),
                       ("human-monitor-command", {"command-line": "info registers; quit"})):
        with pytest.raises(ValueError, match="allowlist"):
            m.command(name, **args)
    with pytest.raises(ValueError, match="allowlist"):
        m.hmp("x /8gx 0x1000")
    assert fake_libvirt.sent == [] and fake_libvirt.dom.state_calls == []


def test_stop_and_cont_go_through_libvirts_own_calls(fake_libvirt):
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    m = LibvirtMonitor("vm1").connect()
    m.command("stop")
    m.command("cont")
    assert fake_libvirt.dom.state_calls == ["suspend", "resume"] and fake_libvirt.sent == []
    with pytest.raises(QmpCommandError, match="no arguments"):
        m.command("stop", x=1)
    assert fake_libvirt.dom.state_calls == ["suspend", "resume"]


def test_libvirt_monitor_errors(fake_libvirt):
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    m = LibvirtMonitor("vm1").connect()
    fake_libvirt.replies["query-kvm"] = {"error": {"class": "GenericError", "desc": "nope"}}
    with pytest.raises(QmpCommandError, match="nope"):
        m.command("query-kvm")
    fake_libvirt.replies["query-kvm"] = FakeLibvirtError("domain is not running")
    with pytest.raises(VMGoneError, match="not running"):
        m.command("query-kvm")
    m.close()
    with pytest.raises(VMGoneError, match="not connected"):
        m.command("query-status")


def test_libvirts_events_reach_the_run_state_guard(fake_libvirt):
    """QEMU's events, forwarded by libvirt on its own thread, go to the listeners: the run-state
    guard then says a reset while a running VM was read, and a resume behind the back of a
    paused one, once each; an event before the read began spoils nothing."""
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    from qintrospect.connect.runguard import RunGuard
    m = LibvirtMonitor("vm1").connect()
    (cb,) = fake_libvirt.callbacks
    guard = RunGuard(lambda: m, "libvirt:vm1", None, 1.0, [])
    guard.observe(m, {"status": "running", "running": True})
    cb(None, None, "STOP", 0, 0, None, None)          # not a lifecycle event
    guard.check()
    cb(None, None, "RESET", 0, 0, None, None)
    with pytest.raises(VMGoneError, match="reset"):
        guard.check()
    guard.check()                                      # said once
    cb(None, None, "SHUTDOWN", 0, 0, None, None)
    guard.begin({"status": "running", "running": True})    # a new read: before it, nothing
    guard.check()
    guard.begin({"status": "paused", "running": False})
    cb(None, None, "RESUME", 0, 0, None, None)
    with pytest.raises(VMGoneError, match="resumed by someone else"):
        guard.check()


def test_unknown_domain_is_a_usage_error_listing_the_running_ones(fake_libvirt, monkeypatch):
    from qintrospect.connect import libvirt_monitor
    lv = sys.modules["libvirt"]

    class Named:
        def __init__(self, n):
            self.n = n

        def name(self):
            return self.n

    def lookup(name):
        raise FakeLibvirtError("Domain not found")

    conn = types.SimpleNamespace(lookupByName=lookup, close=lambda: 0,
                                 listAllDomains=lambda flags: [Named("b"), Named("a")])
    monkeypatch.setattr(lv, "open", lambda uri: conn)
    with pytest.raises(UsageError, match="no domain of that name; running: a, b"):
        targets.domain_target("zz", None, 5)


def test_endpoint_spellings():
    e = Endpoint("qmp", "-qmp tcp::4444,server", "tcp", host="", port=4444, server=True)
    assert e.address == "127.0.0.1:4444" and e.describe() == "tcp:*:4444"
    e = Endpoint("qmp", "x", "unix", path="/a", server=True, state="in use")
    assert e.short() == "unix:/a (in use)" and e.to_dict()["usable"] is True


# ---- hostile command lines, names and monitors (issue 21, finding 4) -----------------------------

PWN = "\x1b]0;pwned\x07"


def test_the_table_makes_every_cell_printable():
    """Names, paths, accelerators, states: anyone's text. None of it reaches the terminal raw."""
    p = me_as_qemu(["-name", PWN + "\u202e", "-accel", "\x1b[2Jtcg", "-qmp",
                    "unix:/q\x9b,server=on,wait=off", "-gdb", "unix:/g\x7f,server=on,wait=off"])
    p.config.qmp[0].state, p.config.qmp[0].run_state = "answers", "\x1b[31mrunning\ud800"
    q = me_as_qemu(["-name", os.fsdecode(b"vm-\xff"), "-qmp", "unix:/r,server=on,wait=off"])
    q.config.qmp[0].state, q.config.qmp[0].detail = "no answer", "malformed greeting\x1b[H"
    text = discover.table([p, q])
    assert all(line.isprintable() for line in text.splitlines()), text
    text.encode("utf-8")
    header, row, row2 = text.splitlines()
    for shown in (r"\x1b]0;pwned\x07\u202e", r"\x1b[2Jtcg", r"unix:/q\x9b (answers)",
                  r"\x1b[31mrunning\ud800", r"unix:/g\x7f"):
        assert shown in row, (shown, row)
    assert r"vm-\xff" in row2 and r"unix:/r (no answer: malformed greeting\x1b[H)" in row2


def test_a_bad_monitor_says_why_in_its_cell_cut_short():
    e = Endpoint("qmp", "x", "unix", path="/a", server=True, state="no answer",
                 detail="malformed greeting (\"QMP\" is not an object): " + "x" * 100)
    assert e.short() == "unix:/a (no answer: " + e.detail[:57] + "...)"
    e.detail = "closed the connection"
    assert e.short() == "unix:/a (no answer: closed the connection)"


def test_a_process_that_only_calls_itself_qemu_is_said_to_be_so():
    """argv[0] says qemu-system-x86_64, the executable is Python: listed, with a note on its
    row, never as a plain QEMU."""
    child = subprocess.Popen(["qemu-system-x86_64", "-c", "import sys; sys.stdin.read()",
                              "-name", "impostor", "-m", "64M"], executable=sys.executable,
                             stdin=subprocess.PIPE)
    try:
        proc = None
        for _ in range(200):          # until the child has exec'd
            proc = discover.read_process(child.pid)
            if proc is not None:
                break
            time.sleep(0.01)
        assert proc is not None and proc.name == "impostor" and proc.exe_qemu is False
        assert proc.exe == os.path.realpath(sys.executable)
        (note,) = [n for n in proc.notes if n.startswith("not QEMU?")]
        assert proc.exe in note and proc.to_dict()["exe_is_qemu"] is False
        assert note in proc.to_dict()["notes"]
        text = discover.table([proc])
        header, row, under = text.splitlines()
        assert row.split()[0] == str(child.pid) and under == f"  ^ {note}"
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    # the process running these tests: its own name is no QEMU's, whatever its executable
    assert discover.read_process(os.getpid()) is None


@pytest.mark.parametrize("name,qemu", [
    ("qemu-system-x86_64", True), ("qemu-system-aarch64", True), ("qemu-kvm", True),
    ("qemu", True), (".qemu-system-x86_64-wrapped", True), ("python3.11", False),
    ("qemu-img", False), ("qemu-system-x86_64-evil.sh", True), ("bash", False),
])
def test_which_executables_are_qemus(name, qemu):
    assert discover._qemu_executable(name) is qemu


@pytest.mark.parametrize("args,check", [
    # str.isdigit() takes "²", int() does not: this ended `list` for every VM
    (["-qmp", "tcp:localhost:²,server=on,wait=off"],
     lambda c: c.qmp[0].port is None and "not a port number" in c.qmp[0].problem),
    (["-chardev", "socket,id=m,fd=³,server=on", "-mon", "chardev=m,mode=control"],
     lambda c: c.qmp[0].fd is None),
    (["-qmp", "tcp:127.0.0.1:99999,server=on"],
     lambda c: c.qmp[0].port is None and not c.qmp[0].usable),
    # JSON nested past the parser (RecursionError)
    (["-object", '{"id": "a", "x": ' + "[" * 100_000, "-m", "1G"],
     lambda c: c.ram == 1 << 30),
    (["-machine", '{"type": ' + "[" * 100_000 + "}"], lambda c: c.accel == ["tcg", "kvm"]),
    # past int()'s 4300 digits; past 2^64 (QEMU refuses those: ERANGE)
    (["-m", "1." + "5" * 5000 + "G"], lambda c: c.ram == 1670266880),
    (["-m", "9" * 5000], lambda c: c.ram is None and "not a size" in c.notes[0]),
    (["-m", "16E"], lambda c: c.ram is None),
    (["-m", "size=1G,maxmem=0x" + "f" * 400], lambda c: c.ram == 1 << 30 and c.maxmem is None),
    (["-object", '{"qom-type": "memory-backend-ram", "id": "r", "size": 1' + "0" * 400 + "}",
      "-machine", "memory-backend=r"], lambda c: c.ram is None),
])
def test_hostile_command_lines_parse(args, check):
    assert check(cl(args))


HOSTILE = ["-name", "-m", "-qmp", "-chardev", "-mon", "-object", "-machine", "-M", "-accel",
           "-gdb", "-s", "-S", "-monitor", "-serial", "-numa", "-uuid", "-readconfig",
           "-enable-kvm",
           "unix:/q,server=on,wait=off", "tcp::²,server", "tcp:[::1]:99999,server=on",
           "socket,id=m,fd=³,server=on", "socket,id=m,path=/x,server=on", "chardev=m,mode=control",
           "{" + "[" * 3000, '{"id": "x", "qom-type": "memory-backend-ram", "size": "1G"}',
           '{"id": [1], "size": {}}', PWN, "vm-\udcff", "size=1G,maxmem=²G", "memdev=x",
           "node,memdev=x", "type=q35,accel=kvm:tcg,memory-backend=x", "mon:unix:/m,server",
           "chardev:m", ",,,", "=", "guest=\x9b,process=\x00", "1." + "5" * 5000 + "G",
           "9" * 5000, "0x" + "f" * 400, "size=16E", "٣G"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12)), max_size=24))
def test_any_command_line_parses_and_lists(argv):
    """Whatever a process puts on its command line: parsed without an exception, its row
    printable, its JSON ASCII."""
    p = me_as_qemu(argv)
    for line in discover.table([p]).splitlines():
        assert line.isprintable()
    assert json.dumps(p.to_dict()).isascii()


def test_names_that_are_not_utf8_survive_json():
    p = me_as_qemu(["-name", os.fsdecode(b"vm-\xff\xfe"), "-qmp",
                    os.fsdecode(b"unix:/tmp/\xff.sock,server=on,wait=off")])
    from qintrospect.present import render
    text = render.json_line(p.to_dict())
    assert text.isascii()
    back = json.loads(text)
    assert os.fsencode(back["name"]) == b"vm-\xff\xfe"
    assert os.fsencode(back["qmp"][0]["path"]) == b"/tmp/\xff.sock"


@pytest.mark.parametrize("reply, says", [
    ({"error": "boom"}, '"error" is not an object'),
    ({"error": {"desc": ["x"]}}, '"error" "desc" is not a string'),
    ({"id": "libvirt-9"}, 'neither "return" nor "error"'),
    ({"return": ["running"]}, '"return" is not an object'),
    ({"return": {"status": 7, "running": True}}, '"status" is not'),
])
def test_a_hostile_reply_through_libvirt_is_refused_as_qmps_own_would_be(fake_libvirt, reply,
                                                                      says):
    """libvirt hands QEMU's reply over as text: it passes the same shape checks as a reply on
    our own QMP socket (exit 3 with what was wrong), never an AttributeError later."""
    from qintrospect.connect.jsonl_socket import ProtocolError
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    fake_libvirt.replies["query-status"] = reply
    m = LibvirtMonitor("vm1").connect()
    with pytest.raises(ProtocolError, match="libvirt domain vm1") as e:
        m.command("query-status")
    assert says in str(e.value) and e.value.exit_status == 3
    m.close()


def test_qemus_refusal_through_libvirt_is_printed_escaped(fake_libvirt):
    from qintrospect.connect.libvirt_monitor import LibvirtMonitor
    fake_libvirt.replies["query-status"] = {"error": {"class": "GenericError",
                                                      "desc": "no\x1b]0;title\x07"}}
    m = LibvirtMonitor("vm1").connect()
    with pytest.raises(QmpCommandError) as e:
        m.command("query-status")
    assert "\x1b" not in str(e.value) and "\\x1b" in str(e.value)
    m.close()
