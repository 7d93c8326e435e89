"""The guest kernel, from its own memory: no symbol files.

1. The vmcoreinfo note, found by a scan of guest RAM (guestos.locate), and proven to be the
   running kernel's: its SYMBOL(init_uts_ns), read through the vCPU's page tables, holds its
   own OSRELEASE. KERNELOFFSET (KASLR) and the addresses it gives are the running ones.
2. kallsyms, decoded from the tables the note names (Linux 6.0 and later).
3. The kernel's BTF, between __start_BTF and __stop_BTF, parsed; from it the layout of what
   this room reads (guestos.layout), nothing written in code.
4. Kernel virtual reads: guestos.kmem over the kernel's own table (init_top_pgt, found
   through the vCPU's root: a process's table may be freed while a running VM is read).

x86-64 and aarch64 guests; what differs on aarch64 (TTBR1's tables, the BTF and init_task
found in the kernel image when kallsyms names functions only) is guestos.arm64.

What 2 and 3 give (a few symbols and the offsets) is kept per guest boot (connect.runstate's
cache: key the note's hash and where the kernel's text is loaded), with where the note lies:
a second command reads that page, finds the same bytes, and pays neither the scan, the
kallsyms decode nor the BTF parse.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

from .. import paging
from ..btf import Vmcoreinfo
from ..btf.errors import BtfError, KallsymsError, VmcoreinfoError
from ..errors import MemoryReadError
from . import locate
from .errors import GuestOSUnavailable
from .kmem import KernelMemory, kernel_cpu
from .layout import Fields, layout

CACHE = "guest-kernel"
CACHE_VERSION = 4               # 2-4: the layout has KVM/arm64's fields
# the kernel's symbols this room uses (init_uts_ns comes from vmcoreinfo itself)
SYMBOLS = ("init_task", "special_mapping_vmops", "gate_vma", "vsyscall_mode",
           "current_task", "pcpu_hot", "__per_cpu_offset")
UTS_RELEASE = 2 * 65        # struct new_utsname (uname(2)'s ABI): sysname[65], nodename[65]
MAX_BTF = 64 << 20


def _sha(text: str) -> str:
    try:
        from _sha1 import sha1
    except ImportError:
        from hashlib import sha1
    return sha1(text.encode()).hexdigest()


class GuestKernel:
    """The facts of one guest kernel and reads of its memory. Build with open_kernel()."""

    def __init__(self, vmcoreinfo: Vmcoreinfo, note_gpa: int, facts: dict,
                 mem: KernelMemory, how: str):
        self.vmcoreinfo, self.note_gpa, self.facts = vmcoreinfo, note_gpa, facts
        self.mem, self.how = mem, how
        self.fields = Fields(mem.read, facts["fields"])
        self.symbols: Dict[str, int] = facts["symbols"]
        self.seconds = 0.0
        self.notes: List[str] = []

    @property
    def osrelease(self) -> str:
        return self.vmcoreinfo.osrelease or "?"

    @property
    def kaslr_offset(self) -> Optional[int]:
        return self.vmcoreinfo.kerneloffset

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise GuestOSUnavailable(f"the guest kernel {self.osrelease} has no symbol "
                                     f"{name!r} in its kallsyms") from None

    @property
    def maple(self) -> Optional[dict]:
        return self.facts.get("maple")

    def describe(self) -> dict:
        out = {"osrelease": self.osrelease, "kerneloffset": _hex(self.kaslr_offset),
               "vmcoreinfo_gpa": _hex(self.note_gpa), "kernel_root": _hex(self.mem.root),
               "how": self.how, "kallsyms": self.facts.get("kallsyms"),
               "btf_bytes": self.facts.get("btf_bytes"), "seconds": round(self.seconds, 4)}
        if self.facts.get("located"):        # aarch64: what kallsyms did not name
            out["located"] = self.facts["located"]
        return out


def _hex(v):
    return None if v is None else f"{v:#x}"


# ---- the kernel's root and the proof the note is the running kernel's ---------------------

def _roots(vm, vi: Optional[Vmcoreinfo] = None, cpu=None) -> List[int]:
    """Page-table roots to read the kernel through: each vCPU's (the session's first), and
    under KPTI the kernel copy 4 KiB below a user copy; on aarch64 swapper_pg_dir (from the
    note `vi`) and each vCPU's TTBR1 (guestos.arm64.kernel_roots)."""
    from . import arm64
    if arm64.is_arm64(cpu):
        return arm64.kernel_roots(vm, vi)
    out: List[int] = []
    order = [vm.vcpu] + [i for i in range(len(vm.vcpu_info)) if i != vm.vcpu]
    for i in order:
        root = vm.vcpu_info[i].root
        for r in (root, root & ~0x1FFF):
            if r not in out:
                out.append(r)
    return out


def kernel_memory(read_phys, cpu, roots: List[int], vi: Vmcoreinfo
                  ) -> Tuple[Optional[KernelMemory], Optional[str]]:
    """(KernelMemory through the first root under which vmcoreinfo's init_uts_ns holds the
    note's own OSRELEASE, None) or (None, why not)."""
    try:
        uts = vi.symbol("init_uts_ns") + vi.offsets.get("uts_namespace.name", 0)
    except VmcoreinfoError as e:
        return None, str(e)
    if not vi.osrelease:
        return None, "no OSRELEASE"
    want = vi.osrelease.encode()
    why = "no root"
    for root in roots:
        mem = KernelMemory(read_phys, kernel_cpu(cpu, root))
        try:
            got = mem.read(uts + UTS_RELEASE, 65).split(b"\0", 1)[0]
        except MemoryReadError as e:
            why = f"init_uts_ns ({uts:#x}) unreadable through root {root:#x}: {e}"
            continue
        if got == want:
            return _on_swapper(read_phys, cpu, vi, mem, uts, want), None
        why = (f"init_uts_ns says {got[:64]!r}, the note {vi.osrelease!r}: another "
               "kernel's note")
    return None, why


def _on_swapper(read_phys, cpu, vi: Vmcoreinfo, mem: KernelMemory, uts: int,
                want: bytes) -> KernelMemory:
    """Kernel reads through the kernel's own top-level table (init_mm's: SYMBOL(init_top_pgt)
    or SYMBOL(swapper_pg_dir)) rather than a process's: a process may exit while a running VM
    is read, and its table be freed and used again; the kernel's never is. `mem` itself when
    the note names neither or its table does not read the kernel as `mem` does."""
    for name in ("init_top_pgt", "swapper_pg_dir"):
        va = vi.symbols.get(name)
        if va is None:
            continue
        try:
            pa = mem.translate(va)
            if pa % 4096:
                continue
            own = KernelMemory(read_phys, kernel_cpu(cpu, pa))
            if own.read(uts + UTS_RELEASE, 65).split(b"\0", 1)[0] == want:
                return own
        except MemoryReadError:
            continue
    return mem


# ---- opening ------------------------------------------------------------------------------

def _identity(vm) -> Tuple[str, str]:
    label = getattr(vm.source, "label", None) or "?"
    pid = vm.process.pid if vm.process is not None else None
    start = None
    if pid is not None:
        try:
            from ..memory.host import process_start_time
            start = process_start_time(pid)
        except Exception:       # only a cache key: a miss costs one scan
            start = None
    return f"{CACHE} {label}", f"qemu pid={pid} start={start}"


def _boot(text: str, mem: KernelMemory, vi: Vmcoreinfo) -> str:
    """A guest boot's key: the note's hash and where the kernel's text is loaded."""
    try:
        load = f"{mem.translate(vi.symbol('_stext')):#x}"
    except (MemoryReadError, VmcoreinfoError):
        load = "?"
    return f"{_sha(text)} stext_gpa={load}"


def open_kernel(vm, use_cache: bool = True, progress=None) -> GuestKernel:
    """The guest kernel of an attached VM. Raises GuestOSUnavailable (exit 3) with the reason
    when it cannot be read without symbol files (not Linux, older than 6.0, no BTF).
    progress: advanced over the RAM scanned, when the note must be looked for."""
    from ..connect import runstate
    vm.check_open()
    t0 = time.perf_counter()
    read = vm.cached_memory().read
    cpu = vm.cpu_state()
    # x86-64's and arm64's Linux (what differs on arm64: guestos.arm64)
    paging.require(cpu, "reading the guest's processes", "x86_64", "aarch64")
    if getattr(vm, "stage2", None) is not None:      # a vCPU inside its hypervisor's guest
        from .arm64 import reading_state
        cpu = reading_state(vm.vcpu_info[vm.vcpu])    # a VHE host's kernel: TTBR1_EL2
        if cpu is None:
            vm.require_one_stage("reading the guest's processes (ps, --guest-pid)")
    purpose, ident = _identity(vm)
    if use_cache:
        try:
            kept = runstate.cached(purpose, ident)
        except (runstate.RunStateError, OSError):
            kept = None
        kernel = _from_cache(kept, read, cpu, lambda vi: _roots(vm, vi, cpu))
        if kernel is not None:
            kernel.seconds = time.perf_counter() - t0
            return kernel

    chosen: Dict[str, object] = {}

    def accept(gpa: int, text: str) -> Optional[str]:
        try:
            vi = Vmcoreinfo.parse(text, source=f"vmcoreinfo note at {gpa:#x}")
        except VmcoreinfoError as e:
            return str(e)
        mem, why = kernel_memory(read, cpu, _roots(vm, vi, cpu), vi)
        if mem is not None:
            chosen.update(vi=vi, mem=mem)
        return why

    found = locate.scan(vm.memory, vm.ram_map.ram, accept, progress=progress)
    if found.note is None:
        more = ("; notes seen but refused: " + "; ".join(found.rejected[:3])) \
            if found.rejected else ""
        raise GuestOSUnavailable(
            f"no vmcoreinfo note of the running kernel in guest RAM ({found.scanned >> 20} "
            f"MiB scanned{more}): the guest is not running Linux, or a Linux built without "
            "CONFIG_VMCORE_INFO/CRASH_CORE. Use --cr3 or --find-cr3 instead")
    gpa, text = found.note
    vi, mem = chosen["vi"], chosen["mem"]
    facts = _facts(vi, mem, paging.arch_of(cpu))
    facts.update(version=CACHE_VERSION, note_gpa=gpa, boot=_boot(text, mem, vi))
    kernel = GuestKernel(vi, gpa, facts, mem, f"scan ({found.scanned >> 20} MiB read)")
    try:
        runstate.cache(purpose, ident, facts)
    except (runstate.RunStateError, OSError):
        pass
    kernel.seconds = time.perf_counter() - t0
    return kernel


def _from_cache(kept, read, cpu, roots) -> Optional[GuestKernel]:
    if not isinstance(kept, dict) or kept.get("version") != CACHE_VERSION \
            or not isinstance(kept.get("note_gpa"), int) \
            or not isinstance(kept.get("fields"), dict) \
            or not isinstance(kept.get("symbols"), dict):
        return None
    text = locate.read_note(read, kept["note_gpa"])
    if text is None:
        return None
    try:
        vi = Vmcoreinfo.parse(text)
    except VmcoreinfoError:
        return None
    mem, _ = kernel_memory(read, cpu, roots(vi), vi)
    if mem is None or _boot(text, mem, vi) != kept.get("boot"):
        return None
    return GuestKernel(vi, kept["note_gpa"], kept, mem, "cached for this boot")


def _facts(vi: Vmcoreinfo, mem: KernelMemory, arch: str = "x86_64") -> dict:
    """kallsyms decoded and BTF parsed: the symbols and layout this room needs (on aarch64,
    what kallsyms does not name is looked for in the kernel image: guestos.arm64.locate)."""
    release = vi.osrelease or "?"
    if not vi.kallsyms_tables():
        raise GuestOSUnavailable(
            f"no vmcoreinfo kallsyms: kernel {release} (vmcoreinfo names the kallsyms tables "
            "since Linux 6.0); without them this guest's processes cannot be found. Use "
            "--cr3 or --find-cr3 instead")
    try:
        ks = vi.decode_kallsyms(mem.read)
    except KallsymsError as e:
        raise GuestOSUnavailable(f"the guest kernel {release}'s kallsyms tables do not "
                                 f"decode: {e}") from None
    symbols = {}
    for name in SYMBOLS + ("__start_BTF", "__stop_BTF"):
        hits = {s.address for s in ks.lookup(name)}
        if len(hits) == 1:
            symbols[name] = hits.pop()
    located, btf = {}, None
    if arch == "aarch64" and ("init_task" not in symbols or "__start_BTF" not in symbols
                              or "__stop_BTF" not in symbols):
        symbols, btf, located = _locate_arm64(mem, ks, symbols, release)
    if "init_task" not in symbols:
        raise GuestOSUnavailable(f"the guest kernel {release}'s kallsyms has no init_task")
    start, stop = symbols.get("__start_BTF"), symbols.get("__stop_BTF")
    if start is None or stop is None:
        raise GuestOSUnavailable(
            f"the guest kernel {release} has no BTF (no __start_BTF/__stop_BTF in its "
            "kallsyms: built without CONFIG_DEBUG_INFO_BTF); its structures cannot be read "
            "without it. Use --cr3 or --find-cr3 instead")
    if not 0 < stop - start <= MAX_BTF:
        raise GuestOSUnavailable(f"the guest kernel's BTF would be {stop - start} bytes "
                                 f"({start:#x}..{stop:#x}): not plausible")
    from ..btf import Btf, MapleTree
    try:
        if btf is None:
            blob = mem.read(start, stop - start)
            btf = Btf.parse(blob, name=f"the guest kernel's BTF ({start:#x}..{stop:#x})")
    except MemoryReadError as e:
        raise GuestOSUnavailable(f"the guest kernel's BTF ({start:#x}..{stop:#x}) cannot be "
                                 f"read: {e}") from None
    fields = layout(btf)
    maple = None
    if "mm.mm_mt" in fields:
        try:
            maple = MapleTree.facts(btf)
        except BtfError:
            maple = None
    out = {"symbols": symbols, "fields": fields, "maple": maple, "osrelease": release,
           "kallsyms": {"mode": ks.mode, "count": len(ks)}, "btf_bytes": stop - start}
    if located:
        out["located"] = located
    return out


def _locate_arm64(mem: KernelMemory, ks, symbols: dict, release: str):
    """(symbols, BTF or None, how): an arm64 kernel whose kallsyms names functions only
    (no CONFIG_KALLSYMS_ALL, as Debian's): its BTF and init_task found in its image."""
    from ..btf import Btf
    from . import arm64

    def parse(blob, name):
        return Btf.parse(blob, name=name)
    try:
        return arm64.locate(mem, ks, symbols, parse, layout)
    except LookupError as e:
        raise GuestOSUnavailable(
            f"the guest kernel {release}'s kallsyms names functions only (built without "
            f"CONFIG_KALLSYMS_ALL) and the kernel image did not give the rest: {e}. Use "
            "--cr3 or --find-cr3 instead") from None
    except (BtfError, MemoryReadError) as e:
        raise GuestOSUnavailable(f"the guest kernel {release}'s BTF, found by a scan of its "
                                 f"image, cannot be read: {e}") from None
