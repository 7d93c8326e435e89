"""docs/ against the code.

* Every key path of every JSON output (translate --json, --brief, --outer; cpus, find-cr3,
  vmmap, read, who-maps, kvm, parse-log, compare, list) is documented in docs/json.md.
* Every option of every command is in docs/commands.md.
* Every link in README.md and docs/*.md leads to a file of the repository.

The JSON is not copied from anywhere: the commands make it here (qintrospect.cli.main, in
this process), against a machine this test builds. Its guest RAM is an anonymous mapping of
this process, page tables and values laid out by hand; a fake QMP monitor on a Unix socket
answers as QEMU 7.2 does, and since its peer is this process, this process is "the QEMU
process" whose memory and pagemap qintrospect reads (and proves to hold the RAM). On a KVM
host's side: a second-level table (NPT) in a fake /proc/kcore that maps the guest's pages to
their real frames, and KVM's vCPU as kvm_vcpu reads it. No VM, no file from outside the
repository.

Key paths, as docs/json.md writes them: `a.b` is key b of the object under key a; `a[].b` is
key b of each object in the list under a; `*` stands for keys that are data rather than names
(an access kind, a debugfs file). A path is documented when it is the first cell of a table
row, in backticks, in that output's section of docs/json.md (a heading that names the
command); a few sections say "as in translate --json" and the test follows them (ALIASES).
"""

import argparse
import ast
import contextlib
import ctypes
import importlib
import json
import mmap
import os
import pkgutil
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import types

import pytest

import qintrospect

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(REPO, "docs")
DATA = os.path.join(REPO, "tests", "data")
PAGE = 4096
MIB = 1 << 20

# ---- the package's names, wherever its rooms keep them -------------------------------------

_DEFINED = None
_NOT_IMPORTED = {}


def _definitions():
    """Every class and function defined in qintrospect, by name (a module that does not import
    here, such as gdb.py outside gdb, is left out)."""
    global _DEFINED
    if _DEFINED is None:
        _DEFINED = {}
        for info in pkgutil.walk_packages(qintrospect.__path__, "qintrospect."):
            if info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception as exc:            # noqa: BLE001 (gdb.py needs gdb)
                _NOT_IMPORTED[info.name] = f"{type(exc).__name__}: {exc}"
                continue
            for name, obj in vars(module).items():
                if getattr(obj, "__module__", None) == module.__name__ and callable(obj):
                    _DEFINED.setdefault(name, []).append(obj)
    return _DEFINED


def find(name, where=""):
    """The class or function `name` that qintrospect defines (in a module whose name contains
    `where` when several have that name). The rooms move; the names stay."""
    found = [o for o in _definitions().get(name, ()) if where in o.__module__]
    assert len(found) == 1, (f"{name!r} (in a module named like {where!r}): found {found}; "
                             f"modules that did not import: {_NOT_IMPORTED}")
    return found[0]


def patch(monkeypatch, original, replacement):
    """Replace `original` (a function or class) by `replacement` in the module that defines it
    and in every qintrospect module that imported it by name."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("qintrospect"):
            for name, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, name, replacement)


# ---- key paths ------------------------------------------------------------------------------

def _data_keys(path):
    """Where an object's keys are data, not names: what each is shown as. None = not."""
    if path.rsplit(".", 1)[-1] in ("access", "stats"):
        return "*"                               # access kinds; debugfs statistics files
    if path == "vcpus[]" or (path.endswith("kvm.vcpus[]") and ".how." not in path):
        return "*"                               # a vCPU's debugfs files (index is named)
    return None


OPAQUE = ("query_stats",)       # QEMU's own query-stats reply, passed on as it is


def key_paths(obj, prefix=""):
    """Every key path in a JSON value."""
    out = set()
    if isinstance(obj, dict):
        data = _data_keys(prefix)
        for k, v in obj.items():
            name = "*" if data and k != "index" else k
            path = f"{prefix}.{name}" if prefix else name
            out.add(path)
            if name not in OPAQUE:
                out |= key_paths(v, path)
    elif isinstance(obj, list):
        for v in obj:
            out |= key_paths(v, prefix + "[]")
    return out


# docs/json.md: the sections, by the words their heading starts with
SECTIONS = {
    "translate": "translate --json",
    "brief": "translate --brief",
    "nested": "translate --outer",
    "cpus": "cpus --json",
    "find-cr3": "find-cr3 --json",
    "ps": "ps --json",
    "vmmap": "vmmap --json",
    "read": "read --json",
    "who-maps": "who-maps --json",
    "search": "search --json",
    "kvm": "kvm --json",
    "parse-log": "parse-log --json",
    "compare": "compare --json",
    "list": "list --json",
}

# "as in translate --json": (section, path prefix) -> (section, the prefix it stands for)
ALIASES = {
    ("translate", "kvm."): ("kvm", ""),
    ("translate", "slat.how.kvm."): ("kvm", "roots."),
    ("nested", "hops[]."): ("translate", ""),
    ("nested", ""): ("translate", ""),
    ("compare", "outside."): ("translate", ""),
    ("who-maps", "slat.how."): ("translate", "slat.how."),
    ("who-maps", "slat.how.kvm."): ("kvm", "roots."),
    ("compare", "log."): ("parse-log", "log."),
    ("list", "hmp[]."): ("list", "qmp[]."),
    ("list", "gdb."): ("list", "qmp[]."),
}


def documented():
    """{section: key paths} from docs/json.md: the first cell of each table row, in backticks,
    under the ## heading that names the section (### headings divide a section)."""
    with open(os.path.join(DOCS, "json.md")) as f:
        text = f.read()
    out = {s: set() for s in SECTIONS}
    current = None
    for line in text.splitlines():
        m = re.match(r"##\s+(?:`([^`]+)`|(.*))", line)        # ## only: a ### heading stays
        if m:
            title = (m.group(1) or m.group(2)).strip()
            current = next((s for s, words in SECTIONS.items() if title == words), None)
            continue
        m = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if m and current is not None:
            out[current].add(m.group(1))
    return out


def undocumented(section, paths, docs):
    """The paths of `section` that docs/json.md does not document there (nor where an alias
    sends them)."""
    missing = set()
    for path in paths:
        if path in docs[section]:
            continue
        ok = False
        for (sec, prefix), (other, new) in ALIASES.items():
            if sec == section and path.startswith(prefix) and \
                    new + path[len(prefix):] in docs[other]:
                ok = True
                break
        if not ok:
            missing.add(path)
    return missing


# ---- the machine ----------------------------------------------------------------------------

P, RW, US, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63
VALUE = 0x51494E54524F0001
RAM = 128 * MIB
PML4, PDPT, PD, PT, KPDPT, KPD, ROOT2 = (0x1000 * k for k in range(1, 8))
USER_VA, USER_GPA = 0x4006D0, 0x1006D0           # a 4 KiB page, holding VALUE
BIG_VA, BIG_GPA = 0x600000, 0x200000             # a 2 MiB page
DEVICE_VA, DEVICE_GPA = 0x900000, 0xFED00000     # a 2 MiB page over the HPET (not RAM)
KERNEL_VA = 0xFFFF888000000000                   # a 2 MiB kernel page over GPA 0
RANDOM = (8 * MIB, 16 * MIB)                     # pages of random bytes (the identity proof)
MTREE = ("FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n"
         f"  0000000000000000-{RAM - 1:016x} (prio 0, ram): pc.ram\n"
         "  00000000fed00000-00000000fed003ff (prio 0, i/o): hpet\n")


class Guest:
    """Guest RAM in this process: 4-level page tables (two roots sharing a kernel half), a
    4 KiB user page holding VALUE, a 2 MiB page, a page over a device, a kernel page."""

    def __init__(self):
        self.ram = mmap.mmap(-1, RAM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._export = ctypes.c_char.from_buffer(self.ram)
        self.hva = ctypes.addressof(self._export)
        e = self.put
        e(PML4 + 8 * 0, PDPT | P | RW | US | A)
        e(PDPT + 8 * 0, PD | P | RW | US | A)
        e(PD + 8 * 2, PT | P | RW | US | A)
        e(PT + 8 * 0, (USER_GPA & ~0xFFF) | P | RW | US | A | D | NX)
        e(PD + 8 * 3, BIG_GPA | P | RW | US | A | D | PS)
        e(PD + 8 * 4, (DEVICE_GPA & ~0x1FFFFF) | P | RW | US | A | PS | NX)
        e(PML4 + 8 * 273, KPDPT | P | RW | A)      # 0xffff888000000000: PML4 index 273
        e(KPDPT, KPD | P | RW | A)
        e(KPD, 0 | P | RW | A | D | PS | G)
        self.ram[ROOT2 + 2048:ROOT2 + 4096] = self.ram[PML4 + 2048:PML4 + 4096]
        e(ROOT2, PDPT | P | RW | US | A)           # another "process", the same user page
        e(USER_GPA, VALUE)
        e(BIG_GPA + 0x3E8, VALUE + 3)
        rng = __import__("random").Random(7)
        for page in range(RANDOM[0], RANDOM[1], PAGE):
            self.ram[page:page + PAGE] = rng.randbytes(PAGE)
        for page in range(0, 8 * MIB, PAGE):       # present in this process's pagemap
            self.ram[page] = self.ram[page]

    def put(self, gpa, value, size=8):
        self.ram[gpa:gpa + size] = value.to_bytes(size, "little")

    def read(self, gpa, n):
        return bytes(self.ram[gpa:gpa + n])

    def frame(self, gpa):
        """The host physical address of a GPA (this process's pagemap), or None (hidden)."""
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((self.hva + gpa) // PAGE * 8)
            entry = struct.unpack("<Q", f.read(8))[0]
        pfn = entry & ((1 << 55) - 1)
        return pfn * PAGE + gpa % PAGE if entry >> 63 and pfn else None

    def close(self):
        del self._export
        self.ram.close()


class _RamView:
    """The guest's RAM as tests.guest_linux writes it (put bytes, read bytes)."""

    def __init__(self, guest):
        self.guest = guest

    def put(self, gpa, data):
        self.guest.ram[gpa:gpa + len(data)] = bytes(data)

    def read(self, gpa, n):
        return self.guest.read(gpa, n)


def small_linux(guest):
    """A small Linux in the guest's RAM (tests/guest_linux.py), its kernel half reachable
    through the vCPU's root: ps, --guest-pid and who-maps's names have something to read."""
    from tests.guest_linux import Linux
    lx = Linux(_RamView(guest), PML4, 32 * MIB, RAM)
    init = lx.new_task(1, "init", parent=lx.init_task)
    lx.new_task(2, "kthreadd", kthread=True, parent=lx.init_task)
    probe = lx.new_task(51, "probe", parent=init, vmas=[
        (0x400000, 0x401000, 1, 0, "/probe"), (0x600000, 0x800000, 3, 0, None),
        (0x7fff931e8000, 0x7fff931ea000, 5, 0, "[vdso]")])
    guest.put(lx.tasks[-1]["root"], PDPT | P | RW | US | A)   # the user pages, and more
    lx.set_current(0, probe)
    lx.finish()
    guest.ram[ROOT2 + 2048:ROOT2 + 4096] = guest.ram[PML4 + 2048:PML4 + 4096]
    return lx


def host_phys_bits():
    """This CPU's physical address width, as KVM's MMIO markers use it (52 if unknown)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("address sizes"):
                return int(line.split(":", 1)[1].split()[0])
    return 52


def registers():
    """QEMU 7.2's `info registers` (tests/data) with this machine's CR3 and 4-level paging."""
    with open(os.path.join(DATA, "qemu", "info_registers_7.2.txt")) as f:
        text = f.read()
    text = re.sub(r"CR3=[0-9a-f]{16}", f"CR3={PML4:016x}", text)
    return re.sub(r"CR4=[0-9a-f]{8}", f"CR4={0x751EB0 & ~0x1000:08x}", text)   # LA57 off


class Monitor:
    """A QMP monitor that answers as QEMU 7.2 does, for this Guest, on a Unix socket; every
    connection served by a thread of its own."""

    def __init__(self, path, guest):
        self.guest, self.path = guest, path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        def send(obj):
            conn.sendall(json.dumps(obj).encode() + b"\r\n")
        try:
            send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22},
                                      "package": ""}, "capabilities": ["oob"]}})
            for line in conn.makefile("rb"):
                cmd = json.loads(line)
                send({"return": self.answer(cmd["execute"], cmd.get("arguments") or {}),
                      "id": cmd.get("id")})
        except (OSError, ValueError):
            pass

    def answer(self, name, args):
        if name == "query-status":
            return {"status": "paused", "running": False, "singlestep": False}
        if name == "query-kvm":
            return {"enabled": True, "present": True}
        if name == "query-cpus-fast":
            return [{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                     "thread-id": os.getpid(), "target": "x86_64"}]
        if name == "query-memory-size-summary":
            return {"base-memory": RAM, "plugged-memory": 0}
        if name == "query-stats":
            return [{"provider": "kvm", "stats": [{"name": "pages_4k", "value": 476}]}]
        if name == "qom-get":
            return 40 if args.get("property") == "phys-bits" else True
        if name != "human-monitor-command":
            return {}
        text = args.get("command-line", "")
        if text == "info mtree -f":
            return MTREE
        if text == "info registers":
            return registers()
        if text.startswith("gpa2hva "):
            gpa = int(text.split()[1], 16)
            return f"Host virtual address for {gpa:#x} (pc.ram) is {self.guest.hva + gpa:#x}\r\n"
        if text.startswith("xp "):
            count, start = int(text.split()[1][1:-2]), int(text.split()[2], 16)
            words = struct.unpack(f"<{count}Q", self.guest.read(start, 8 * count))
            return "".join(f"{start + 16 * i:016x}: " + " ".join(f"{w:#018x}" for w in
                                                                  words[2 * i:2 * i + 2]) + "\r\n"
                           for i in range((count + 1) // 2))
        return ""

    def close(self):
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()


class Kcore:
    """This host's physical memory as /proc/kcore shows it to qintrospect: an NPT (4 levels)
    at made-up host addresses that maps every guest page to its real frame, an MMIO marker
    for the device page, and the guest's pages at their frames. twin: a second root with the
    same entries (two roots that tie)."""

    name = "kcore"

    def __init__(self, guest, phys_bits, twin=False):
        self.guest = guest
        self.tables = {}
        base = 1 << (phys_bits - 2)                # above any real frame of a test machine
        self.next = base
        self.root = self._table()
        self.frames = {}
        for gpa in range(0, 8 * MIB, PAGE):
            hpa = guest.frame(gpa)
            if hpa is not None:
                self.frames[hpa] = gpa
                self._map(gpa, hpa | P | RW | US | A | D)
        marker = ((1 << 52) - 1) & ~((1 << phys_bits) - 1)
        self._map(DEVICE_GPA, marker | P | RW | US)    # KVM's NPT MMIO marker
        if twin:
            self.twin = self._table()
            self.tables[self.twin][:] = self.tables[self.root]

    def _table(self):
        addr, self.next = self.next, self.next + PAGE
        self.tables[addr] = bytearray(PAGE)
        return addr

    def _map(self, gpa, leaf):
        table = self.root
        for shift in (39, 30, 21):
            i = (gpa >> shift) & 511
            e = struct.unpack_from("<Q", self.tables[table], 8 * i)[0]
            if not e:
                e = self._table() | P | RW | US
                struct.pack_into("<Q", self.tables[table], 8 * i, e)
            table = e & ~0xFFF & ((1 << 52) - 1)
        struct.pack_into("<Q", self.tables[table], 8 * ((gpa >> 12) & 511), leaf)

    def _page(self, base):
        if base in self.tables:
            return bytes(self.tables[base])
        if base in self.frames:
            return self.guest.read(self.frames[base], PAGE)
        return bytes(PAGE)

    def read(self, pa, n):
        out = b""
        while n:
            k = min(n, PAGE - pa % PAGE)
            out += self._page(pa - pa % PAGE)[pa % PAGE:pa % PAGE + k]
            pa, n = pa + k, n - k
        return out

    @property
    def ram_bytes(self):
        return PAGE * (len(self.tables) + len(self.frames))

    def scan_chunks(self, chunk=0, skip=()):
        for base in sorted(set(self.tables) | set(self.frames)):
            if not any(a <= base < b for a, b in skip):
                yield base, self._page(base)

    def scan_bytes(self, skip=()):
        return sum(len(p) for _, p in self.scan_chunks(skip=skip))

    def close(self):
        pass


@pytest.fixture
def machine(tmp_path, monkeypatch, capsys):
    """The guest, its monitor, KVM's side; run(*argv) -> (exit status, [JSON objects])."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("QI_QMP", raising=False)
    monkeypatch.delenv("QI_GDB", raising=False)
    guest = Guest()
    guest.linux = small_linux(guest)
    monitor = Monitor(str(tmp_path / "qmp.sock"), guest)
    m = argparse.Namespace(guest=guest, qmp=monitor.path, tmp=tmp_path, kvm_readable=True)
    phys_bits = host_phys_bits()
    m.frames = guest.frame(USER_GPA) is not None     # frame numbers need root
    m.kcore = Kcore(guest, phys_bits) if m.frames else None

    KvmVm, VcpuRoot = find("KvmVm"), find("VcpuRoot")
    Unavailable = find("Unavailable", "kvm_vcpu")

    def read_vm(pid, memory=None, debugfs_vcpus=None, **kw):
        if not m.kvm_readable or m.kcore is None:
            raise Unavailable("kallsyms hidden (kptr_restrict) (the test's KVM)")
        root = m.kcore.root
        return KvmVm(0xFFFF888812340000, pid, "amd", [VcpuRoot(
            0, 0, 0xFFFF888812350000, root, 4, False, "root_mmu", root, False)], [], 0.01)

    patch(monkeypatch, find("read_vm"), read_vm)
    patch(monkeypatch, find("KcoreMemory"), lambda *a, **k: m.kcore)
    if _definitions().get("slat_formats"):      # the AMD format first, whatever this CPU is
        patch(monkeypatch, find("slat_formats"), lambda: ("npt", "ept"))
    debugfs = tmp_path / "kvm" / f"{os.getpid()}-11"
    (debugfs / "vcpu0").mkdir(parents=True)
    for name, value in (("pages_4k", "476"), ("pages_2m", "62"), ("tlb_flush", "55")):
        (debugfs / name).write_text(value + "\n")
    (debugfs / "vcpu0" / "guest_mode").write_text("0\n")
    patch(monkeypatch, find("debugfs_dir"), lambda pid, root=None: (str(debugfs), ""))
    patch(monkeypatch, find("qemu_pids"), lambda: [os.getpid()])
    main = find("main", "cli")

    def run(*argv):
        """`qintrospect ARGV` in this process (main() sets a SIGTERM handler: put back)."""
        old = signal.getsignal(signal.SIGTERM)
        try:
            capsys.readouterr()
            status = main([str(a) for a in argv])
        finally:
            signal.signal(signal.SIGTERM, old)
        out, err = capsys.readouterr()
        objs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert status in (0, 1), (argv, status, err)
        assert objs, (argv, status, out, err)
        return status, objs
    m.run = run
    try:
        yield m
    finally:
        monitor.close()
        guest.close()


# ---- what the commands emit -----------------------------------------------------------------

def emitted(m):
    """{section: key paths}, from the commands run against the machine."""
    q = ["--qmp", m.qmp]
    out = {s: set() for s in SECTIONS}

    def add(section, objs):
        for o in objs:
            out[section] |= key_paths(o)
        return objs

    addresses = [hex(a) for a in (USER_VA, BIG_VA, DEVICE_VA, KERNEL_VA, 0x10,
                                  0x0000800000000000)]
    add("translate", m.run("translate", *q, "--json", *addresses)[1])
    if m.frames:
        for slat in ("auto", "scan", f"npt:{m.kcore.root:#x}"):
            add("translate", m.run("translate", *q, "--json", "--slat", slat,
                                   hex(USER_VA), hex(DEVICE_VA))[1])
        m.kvm_readable = False                        # auto falls back to a scan, and says so
        add("translate", m.run("translate", *q, "--json", "--slat", "auto", hex(USER_VA))[1])
        m.kcore = Kcore(m.guest, host_phys_bits(), twin=True)      # roots that tie
        add("translate", m.run("translate", *q, "--json", "--slat", "scan", hex(USER_VA))[1])
        add("who-maps", m.run("who-maps", *q, "--gpa", hex(USER_GPA), "--slat", "scan",
                              "--json")[1])
        m.kcore = Kcore(m.guest, host_phys_bits())
        m.kvm_readable = True
        hpa = m.guest.frame(USER_GPA)
        add("who-maps", m.run("who-maps", *q, "--hpa", hex(hpa), "--slat", "auto",
                              "--json")[1])
    add("brief", m.run("translate", *q, "--brief", *addresses)[1])
    if m.frames:
        add("brief", m.run("translate", *q, "--brief", "--slat", f"npt:{m.kcore.root:#x}",
                           *addresses)[1])
    add("cpus", m.run("cpus", *q, "--json")[1])
    add("find-cr3", m.run("find-cr3", *q, "--json", "--gva", hex(USER_VA), "--expect",
                          hex(VALUE))[1])
    add("find-cr3", m.run("find-cr3", *q, "--json")[1])
    add("ps", m.run("ps", *q, "--json")[1])
    add("vmmap", m.run("vmmap", *q, "--json", "--guest-pid", "51")[1])
    add("find-cr3", m.run("find-cr3", *q, "--json", "--guest-comm", "probe")[1])
    add("vmmap", m.run("vmmap", *q, "--json")[1])
    add("vmmap", m.run("vmmap", *q, "--json", "--hpa")[1])
    add("vmmap", m.run("vmmap", *q, "--json", "--leaf", "--hpa")[1])
    add("read", m.run("read", *q, "--json", hex(USER_VA + 0x900), 0x1000)[1])
    add("read", m.run("read", *q, "--json", "--phys", hex(USER_GPA), 16)[1])
    add("search", m.run("search", *q, "--u64", hex(VALUE), "--json")[1])
    add("search", m.run("search", *q, "--phys", "--u64", hex(VALUE), "--json")[1])
    add("who-maps", m.run("who-maps", *q, "--gpa", hex(USER_GPA), "--json")[1])
    add("who-maps", m.run("who-maps", *q, "--gpa", hex(PML4), "--json")[1])
    add("who-maps", m.run("who-maps", *q, "--hva", hex(m.guest.hva + USER_GPA), "--json")[1])
    add("kvm", m.run("kvm", *q, "--json")[1])
    for log in ("guest_gpt_dump.log", "slat_dump_npt5_rig_2m.log", "seed_ept_dump.log"):
        add("compare", m.run("compare", *q, "--log", os.path.join(DATA, log), "--json")[1])
    for logs in (["seed_gpt_dump.log", "seed_ept_dump.log"], ["slat_dump_npt5_rig_edge.log"],
                 ["slat_dump_npt5_rig_notpresent.log"], ["guest_gpt_dump_untouched.log"]):
        add("parse-log", m.run("parse-log", "--json", *[os.path.join(DATA, n) for n in logs])[1])
    add("nested", [nested(m)])
    add("list", listed(m))
    return out


def nested(m):
    """translate --outer's object: hops made of this machine's own translations (an outer
    VM's hop is a translation like any other), the last one stopped."""
    Session, Hop, Nested = find("Session"), find("Hop"), find("NestedTranslation")
    with Session(m.qmp) as vm:
        inner, outer = vm.translate(USER_VA), vm.translate(BIG_VA)
    ok = Nested(USER_VA, [Hop("L2", inner, "the vCPU's CR3"),
                          Hop("L1", outer, "find-cr3: the root whose ... holds ...")])
    stopped = Nested(USER_VA, [Hop("L2", inner, "the vCPU's CR3"),
                               Hop("L1", None, "", "the outer VM's QEMU was not found")])
    out = ok.to_dict()
    out.update(stopped.to_dict())
    return out


def listed(m):
    """list --json, for a QEMU command line whose QMP socket is this machine's monitor, and
    a libvirt that knows the VM."""
    QemuProcess, parse_command_line = find("QemuProcess"), find("parse_command_line")
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web1", "-uuid",
            "6b3c1a6e-8c1d-4c43-9a47-0f0b1c2d3e4f", "-accel", "kvm", "-m", "256M",
            "-qmp", f"unix:{m.qmp},server=on,wait=off", "-gdb", "tcp:127.0.0.1:1",
            "-chardev", f"socket,id=mon1,path={m.tmp}/hmp.sock,server=on,wait=off",
            "-mon", "chardev=mon1,mode=readline"]
    proc = QemuProcess(os.getpid(), argv, argv[0], os.getuid(), "me", parse_command_line(argv),
                       exe_qemu=True)
    patch_list = pytest.MonkeyPatch()
    dom = types.SimpleNamespace(info=lambda: (1, 262144, 262144, 1, 0), name=lambda: "web1",
                                ID=lambda: 3, UUIDString=lambda: proc.config.uuid)
    conn = types.SimpleNamespace(listAllDomains=lambda flags: [dom], close=lambda: 0,
                                 setKeepAlive=lambda *a: 0)
    libvirt = types.SimpleNamespace(libvirtError=RuntimeError, VIR_CONNECT_LIST_DOMAINS_ACTIVE=1,
                                    openReadOnly=lambda uri: conn, open=lambda uri: conn,
                                    registerErrorHandler=lambda *a: None)
    try:
        patch_list.setitem(sys.modules, "libvirt", libvirt)
        patch_list.setitem(sys.modules, "libvirt_qemu", types.SimpleNamespace())
        patch(patch_list, find("processes", "discover"), lambda: [proc])
        return m.run("list", "--json")[1]
    finally:
        patch_list.undo()


# ---- the tests ------------------------------------------------------------------------------

def test_every_json_key_the_commands_emit_is_documented(machine):
    docs = documented()
    paths = emitted(machine)
    missing = {s: sorted(undocumented(s, p, docs)) for s, p in paths.items()}
    missing = {s: p for s, p in missing.items() if p}
    total = sum(len(p) for p in paths.values())
    print(f"\n{total} key paths checked in {len(paths)} outputs")
    assert all(paths.values()), {s: len(p) for s, p in paths.items()}
    assert not missing, ("key paths the commands emit and docs/json.md does not document "
                         f"(in that output's section): {json.dumps(missing, indent=1)}")


def test_every_documented_key_path_is_emitted(machine):
    """The other way: every key path docs/json.md documents is one the commands emit here (a
    row left behind when a key is renamed or dropped fails)."""
    paths = emitted(machine)
    docs = documented()
    if not machine.frames:
        pytest.skip("frame numbers are hidden (not root): the second-level paths are not made")
    stale = {}
    for section, documented_paths in docs.items():
        made = set(paths[section])
        for (sec, prefix), (other, new) in ALIASES.items():
            if other == section:
                made |= {new + p[len(prefix):] for p in paths[sec] if p.startswith(prefix)}
        gone = sorted(p for p in documented_paths if p not in made)
        if gone:
            stale[section] = gone
    assert not stale, f"documented in docs/json.md but emitted by no command here: {stale}"


def _sections(text):
    """{command name: its section's text} of docs/commands.md (## `name`)."""
    parts = re.split(r"^## `?qintrospect ([a-z0-9-]+)`?\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_command_and_option_is_in_the_reference():
    parser = find("build_parser")()
    with open(os.path.join(DOCS, "commands.md")) as f:
        sections = _sections(f.read())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        if name not in sections:
            missing.append(f"the command {name}")
            continue
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for opt in action.option_strings or [action.metavar or action.dest]:
                if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", sections[name]):
                    missing.append(f"{name} {opt}")
    assert not missing, f"docs/commands.md lacks: {missing}"


def test_the_reference_is_what_the_parser_says():
    """docs/commands.md is scripts/docs_commands.py's output: regenerate it after changing an
    option (.venv/bin/python scripts/docs_commands.py > docs/commands.md)."""
    made = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "docs_commands.py")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert made.returncode == 0, made.stderr
    with open(os.path.join(DOCS, "commands.md")) as f:
        assert f.read() == made.stdout, ("docs/commands.md is not what scripts/docs_commands.py "
                                         "prints now: regenerate it")


def _markdown_files():
    files = [os.path.join(REPO, "README.md")]
    for folder, _, names in os.walk(DOCS):
        files += [os.path.join(folder, n) for n in names if n.endswith(".md")]
    return files


def test_every_link_leads_to_a_file():
    bad = []
    for path in _markdown_files():
        with open(path) as f:
            text = f.read()
        text = re.sub(r"```.*?```", "", text, flags=re.S)          # not links in code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            where = os.path.normpath(os.path.join(os.path.dirname(path),
                                                  target.split("#", 1)[0]))
            if not where.startswith(REPO) or not os.path.exists(where):
                bad.append(f"{os.path.relpath(path, REPO)}: {target}")
    assert not bad, f"links to nothing: {bad}"
    assert len(_markdown_files()) >= 8


def test_the_readme_keeps_the_two_commands():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    assert re.search(r"^scripts/demo\b", text, re.M) and re.search(r"^scripts/test\b", text,
                                                                   re.M)


def test_this_test_builds_its_own_objects():
    """Nothing is read from outside the repository (CI has only the checkout): no output
    captured elsewhere is named in this module (no absolute path but the kernel's /proc and
    the QEMU path of a command line); the machine, its monitor and its outputs are made
    above, and the module logs come from tests/data."""
    with open(__file__) as f:
        tree = ast.parse(f.read())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    outside = tuple("/" + top for top in ("work", "tmp", "home", "root", "var", "srv", "mnt",
                                          "opt"))
    assert not [s for s in strings if s.startswith(outside) or ("scr" + "atch") in s.lower()]
    assert DATA.startswith(REPO) and DOCS.startswith(REPO)


def test_the_architecture_names_only_files_that_exist():
    """docs/architecture.md's rooms and files are the tree's: a module moved or renamed without
    the map fails here. Files named in backquotes, and every file of the rooms' picture."""
    with open(os.path.join(DOCS, "architecture.md")) as f:
        text = f.read()
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.(?:py|c|sh|md))`", text))
    tree = text[text.index("qintrospect/\n"):text.index("## One command")]
    room = None
    for line in tree.splitlines():
        m = re.match(r"^  ([a-z_]+/)", line)
        if m:
            room = m.group(1)
        for name in re.findall(r"^ {4}((?:[a-z_]+\.py(?:, )?)+)", line):
            named.update(room + n for n in name.split(", ") if room)
    missing = sorted(n for n in named
                     if not any(os.path.exists(os.path.join(REPO, top, n))
                                for top in ("qintrospect", "", "vm", "tests")))
    assert named and not missing, missing
