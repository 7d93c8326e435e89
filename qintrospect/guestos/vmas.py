"""A guest process's VMAs, as its /proc/PID/maps lists them, from the kernel's own memory.

The VMAs are the entries of mm_struct.mm_mt (a maple tree, Linux 6.1 and later), each a
vm_area_struct: start, end, flags (VM_READ 1, VM_WRITE 2, VM_EXEC 4, VM_MAYSHARE 0x80: the
#define values of include/linux/mm.h), the file offset (vm_pgoff pages) and file. Names as
fs/proc/task_mmu.c's show_map_vma gives them: the file's path (d_path: dentry names up to
the mount's root, then on through the mount points), a special mapping's own name ([vdso],
[vvar]: vm_ops is special_mapping_vmops and vm_private_data its vm_special_mapping), [heap]
(overlapping start_brk..brk), [stack] (holding start_stack), and after the tree the gate
area ([vsyscall]) unless vsyscall=none. Offsets from BTF only (guestos.layout); every walk
is bounded.
"""

from __future__ import annotations

from typing import List, Optional

from ..errors import QIError
from ..record import field, record
from .layout import Snapshot

VM_READ, VM_WRITE, VM_EXEC, VM_MAYSHARE = 0x1, 0x2, 0x4, 0x80
MINORBITS = 20              # the kernel's dev_t: major << 20 | minor
MAX_VMAS = 1 << 16
MAX_PATH_DEPTH = 256
# arch/x86/entry/vsyscall/vsyscall_64.c: static enum { EMULATE, XONLY, NONE } vsyscall_mode
VSYSCALL_NONE = 2
VMA_FIELDS = ("vma.vm_start", "vma.vm_end", "vma.vm_flags", "vma.vm_pgoff", "vma.vm_file",
              "vma.vm_ops", "vma.vm_private_data")


@record(frozen=True)
class GuestVma:
    start: int
    end: int                         # exclusive, as maps prints it
    perms: str                       # rwxp / rwxs
    offset: int
    dev: str                         # MAJOR:MINOR in hex, as maps prints it
    inode: int
    path: str                        # "" for an anonymous mapping
    vm_flags: int
    address: Optional[int] = None    # the vm_area_struct (None for the gate area)

    def maps_line(self) -> str:
        """The line /proc/PID/maps shows (its padding before the name included)."""
        head = (f"{self.start:08x}-{self.end:08x} {self.perms} {self.offset:08x} {self.dev} "
                f"{self.inode} ")
        return (head.ljust(73) + self.path) if self.path else head

    def to_dict(self) -> dict:
        return {"start": f"{self.start:#x}", "end": f"{self.end:#x}", "perms": self.perms,
                "offset": f"{self.offset:#x}", "dev": self.dev, "inode": self.inode,
                "path": self.path, "vm_flags": f"{self.vm_flags:#x}",
                "vma": None if self.address is None else f"{self.address:#x}"}


@record
class VmaList:
    vmas: List[GuestVma] = field(default_factory=list)
    cut: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.cut is None


def perms(flags: int) -> str:
    return ("r" if flags & VM_READ else "-") + ("w" if flags & VM_WRITE else "-") + \
        ("x" if flags & VM_EXEC else "-") + ("s" if flags & VM_MAYSHARE else "p")


def vmas(kernel, task, max_vmas: int = MAX_VMAS) -> VmaList:
    """The VMAs of a guest task (guestos.GuestTask with an mm), in address order."""
    from ..btf import MapleTree
    from .errors import GuestOSUnavailable
    f, out = kernel.fields, VmaList()
    if task.mm is None:
        return out
    if kernel.maple is None or not f.has(*VMA_FIELDS[:5], "mm.mm_mt"):
        raise GuestOSUnavailable(f"the guest kernel {kernel.osrelease} keeps no maple tree of "
                                 "VMAs this reader knows (mm_struct.mm_mt: Linux 6.1 and later)")
    mm = task.mm
    tree = MapleTree(None, kernel.mem.read, mm + f.offset("mm.mm_mt"), facts=kernel.maple)
    items = tree.items(max_entries=max_vmas)
    if items.cut:
        out.cut = f"the VMA tree of {task.pid} ({task.comm}): {items.cut}"
    try:
        brk = (f.get(mm, "mm.start_brk"), f.get(mm, "mm.brk")) \
            if f.has("mm.start_brk", "mm.brk") else None
        stack = f.get(mm, "mm.start_stack") if f.has("mm.start_stack") else None
    except (QIError, OSError) as e:
        brk = stack = None
        out.notes.append(f"mm {mm:#x}: brk and stack unreadable ({e})")
    lo, hi = f.span(VMA_FIELDS)
    special = kernel.symbols.get("special_mapping_vmops")
    if special is None:
        special = _special_ops(kernel, mm, items)
    for first, last, entry in items:
        try:
            out.vmas.append(_vma(kernel, entry, lo, hi, special, brk, stack))
        except (QIError, OSError) as e:
            out.notes.append(f"VMA {entry:#x} ({first:#x}-{last + 1:#x}) unreadable: {e}")
    gate = _gate(kernel)
    if gate is not None:
        out.vmas.append(gate)
    return out


def _vma(kernel, addr: int, lo: int, hi: int, special, brk, stack) -> GuestVma:
    f = kernel.fields
    s = Snapshot(f, addr, lo, hi)
    start, end, flags = s.get("vma.vm_start"), s.get("vma.vm_end"), s.get("vma.vm_flags")
    filp = s.get("vma.vm_file")
    offset, dev, ino, path = 0, "00:00", 0, ""
    if filp:
        offset = s.get("vma.vm_pgoff") << 12
        path = d_path(kernel, filp)
        inode = f.get(filp, "file.inode") if f.has("file.inode") else 0
        if inode and f.has("inode.ino", "inode.sb", "sb.dev"):
            ino = f.get(inode, "inode.ino")
            sb = f.get(inode, "inode.sb")
            d = f.get(sb, "sb.dev") if sb else 0
            dev = f"{d >> MINORBITS:02x}:{d & ((1 << MINORBITS) - 1):02x}"
    else:
        ops = s.get("vma.vm_ops") if f.has("vma.vm_ops") else 0
        if special is not None and ops == special and f.has("vma.vm_private_data",
                                                            "special.name"):
            sm = s.get("vma.vm_private_data")
            name = f.get(sm, "special.name") if sm else 0
            path = kernel.mem.string(name, 64) if name else ""
        if not path and brk is not None and start <= brk[1] and end >= brk[0]:
            path = "[heap]"
        if not path and stack is not None and start <= stack <= end:
            path = "[stack]"
    return GuestVma(start, end, perms(flags), offset, dev, ino, path, flags, addr)


def _special_ops(kernel, mm: int, items) -> Optional[int]:
    """special_mapping_vmops when kallsyms does not name it (a kernel without
    CONFIG_KALLSYMS_ALL, such as Debian's arm64 ones): the vm_ops of the VMA that begins at
    mm->context.vdso (the [vdso], installed by _install_special_mapping as [vvar] is)."""
    f = kernel.fields
    if not f.has("mm.context_vdso", "vma.vm_ops", "vma.vm_file"):
        return None
    try:
        vdso = f.get(mm, "mm.context_vdso")
        for first, _, entry in items:
            if vdso and first == vdso and not f.get(entry, "vma.vm_file"):
                return f.get(entry, "vma.vm_ops") or None
    except (QIError, OSError):
        return None
    return None


def d_path(kernel, filp: int) -> str:
    """The path of an open file (struct file), from the global root: dentry names up to the
    mount's root, then through the mount point into the parent mount. Bounded."""
    f = kernel.fields
    if not f.has("file.dentry", "file.mnt", "dentry.name", "dentry.len", "dentry.parent"):
        return "?"
    dentry, vfsmnt = f.get(filp, "file.dentry"), f.get(filp, "file.mnt")
    mounts = f.has("mount.mnt", "mount.parent", "mount.mountpoint", "vfsmount.root")
    parts: List[str] = []
    for _ in range(MAX_PATH_DEPTH):
        if mounts and vfsmnt and dentry == f.get(vfsmnt, "vfsmount.root"):
            mnt = vfsmnt - f.offset("mount.mnt")
            parent = f.get(mnt, "mount.parent")
            if not parent or parent == mnt:
                break
            dentry = f.get(mnt, "mount.mountpoint")
            vfsmnt = parent + f.offset("mount.mnt")
            continue
        up = f.get(dentry, "dentry.parent")
        if not up or up == dentry:
            break
        n = f.get(dentry, "dentry.len") & 0xFFFFFFFF
        name = f.get(dentry, "dentry.name")
        parts.append(kernel.mem.read(name, min(n, 255)).decode("utf-8", "replace"))
        dentry = up
    else:
        parts.append("...")
    return "/" + "/".join(reversed(parts))


def _gate(kernel) -> Optional[GuestVma]:
    """The gate area (vsyscall page) maps lists after the VMAs, unless vsyscall=none."""
    f, syms = kernel.fields, kernel.symbols
    gate, mode = syms.get("gate_vma"), syms.get("vsyscall_mode")
    if gate is None or mode is None or not f.has("vma.vm_start", "vma.vm_end", "vma.vm_flags"):
        return None
    try:
        if int.from_bytes(kernel.mem.read(mode, 4), "little") == VSYSCALL_NONE:
            return None
        start, end = f.get(gate, "vma.vm_start"), f.get(gate, "vma.vm_end")
        flags = f.get(gate, "vma.vm_flags")
    except (QIError, OSError):
        return None
    if not start or end <= start:
        return None
    return GuestVma(start, end, perms(flags), 0, "00:00", 0, "[vsyscall]", flags, None)
