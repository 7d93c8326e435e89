"""A small Linux laid out in guest-physical memory, for tests of qintrospect.guestos: a
vmcoreinfo note, kallsyms tables (tests.unit.test_kallsyms.build_tables), a BTF blob
(tests.btf_encoder) describing task_struct, cred, mm_struct, the maple tree, vm_area_struct,
file, dentry, mount, ..., with the layout of Linux 6.1 or of 6.12 (other offsets, __state,
vm_flags in a union, pcpu_hot), and the objects themselves: init_task and a task list,
processes with mm, page-table roots (KPTI pairs optional), VMAs in a maple tree, files with
paths. Kernel virtual addresses map linearly (KVA = DIRECT + GPA) through a PML4 slot of the
caller's root, with 2 MiB pages.

Tests then damage it (a loop in the task list, a pointer into nowhere, a truncated BTF) and
check that the readers stop with a note.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

from tests.btf_encoder import BtfBuilder

P, RW, US, A, D, PS, NX = 1, 2, 4, 0x20, 0x40, 0x80, 1 << 63
DIRECT = 0xFFFF900000000000          # PML4 slot 288
DIRECT_SLOT = 288
PF_KTHREAD = 0x00200000
RELEASES = {"6.1": "6.1.0-57-cloud-amd64", "6.12": "6.12.57+deb12-cloud-amd64"}


def _layouts(version: str) -> Dict[str, Dict[str, Tuple[int, str]]]:
    """struct -> {member: (byte offset, type name)}; sizes in SIZES. 6.12 moves members."""
    shift = 0x40 if version == "6.12" else 0
    state = "__state"
    return {
        "task_struct": {"flags": (0x2c, "u32"), state: (0x18, "u32"),
                        "tasks": (0x400 + shift, "list_head"),
                        "mm": (0x450 + shift, "mm_p"), "exit_state": (0x460 + shift, "int"),
                        "pid": (0x4a0 + shift, "int"), "tgid": (0x4a4 + shift, "int"),
                        "real_parent": (0x4b0 + shift, "task_p"),
                        "thread_node": (0x500 + shift, "list_head"),
                        "real_cred": (0x700 + shift, "cred_p"),
                        "comm": (0x710 + shift, "comm"), "signal": (0x760 + shift, "void_p")},
        "cred": {"uid": (4 + (8 if version == "6.12" else 0), "kuid_t"),
                 "gid": (8 + (8 if version == "6.12" else 0), "kgid_t")},
        "mm_struct": {"mm_mt": (0x40, "maple_tree"), "pgd": (0x68 + shift, "void_p"),
                      "start_brk": (0x120, "ulong"), "brk": (0x128, "ulong"),
                      "start_stack": (0x130, "ulong")},
        "vm_area_struct": {"vm_start": (0, "ulong"), "vm_end": (8, "ulong"),
                           "vm_mm": (0x10, "void_p"), "vm_flags": (0x20, "ulong"),
                           "vm_pgoff": (0x78 + shift, "ulong"),
                           "vm_file": (0x80 + shift, "file_p"),
                           "vm_ops": (0x70 + shift, "void_p"),
                           "vm_private_data": (0x88 + shift, "void_p")},
        "file": {"f_path": (0x10, "path"), "f_inode": (0x20, "inode_p")},
        "path": {"mnt": (0, "vfsmount_p"), "dentry": (8, "dentry_p")},
        "dentry": {"d_parent": (0x18, "dentry_p"), "d_name": (0x20, "qstr")},
        "qstr": {"hash": (0, "u32"), "len": (4, "u32"), "hash_len": (0, "u64"),
                 "name": (8, "uchar_p")},
        "vfsmount": {"mnt_root": (0, "dentry_p"), "mnt_sb": (8, "void_p")},
        "mount": {"mnt_parent": (0x10, "mount_p"), "mnt_mountpoint": (0x18, "dentry_p"),
                  "mnt": (0x20, "vfsmount")},
        "inode": {"i_ino": (0x40, "ulong"), "i_sb": (0x28, "sb_p")},
        "super_block": {"s_dev": (0x10, "u32")},
        "vm_special_mapping": {"name": (0, "char_p")},
        "new_utsname": {"sysname": (0, "uts"), "nodename": (65, "uts"),
                        "release": (130, "uts")},
        "uts_namespace": {"name": (0, "new_utsname")},
        "pcpu_hot": {"current_task": (0, "task_p")},
        "signal_struct": {"nr_threads": (8, "int"), "thread_head": (0x10 + shift, "list_head")},
        "list_head": {"next": (0, "list_p"), "prev": (8, "list_p")},
    }


SIZES = {"task_struct": 0x1000, "cred": 0xa0, "mm_struct": 0x400, "vm_area_struct": 0x100,
         "file": 0x100, "path": 16, "dentry": 0xc0, "qstr": 16, "vfsmount": 0x18,
         "mount": 0x100, "inode": 0x100, "super_block": 0x100, "vm_special_mapping": 0x40,
         "new_utsname": 390, "uts_namespace": 0x200, "pcpu_hot": 0x40, "list_head": 16,
         "signal_struct": 0x100}


def build_btf(version: str) -> bytes:
    """The BTF blob of the small Linux's types, in `version`'s layout."""
    b = BtfBuilder()
    t = {}
    t["u8"] = b.int_("unsigned char", 1)
    t["uchar"] = t["u8"]
    t["char"] = b.int_("char", 1, signed=True, char=True)
    t["u16"] = b.int_("short unsigned int", 2)
    t["u32"] = b.int_("unsigned int", 4)
    t["int"] = b.int_("int", 4, signed=True)
    t["ulong"] = b.int_("long unsigned int", 8)
    t["u64"] = b.int_("long long unsigned int", 8)
    t["void_p"] = b.ptr(0)
    t["char_p"] = b.ptr(t["char"])
    t["uchar_p"] = b.ptr(t["uchar"])
    t["comm"] = b.array(t["char"], 16)
    t["uts"] = b.array(t["char"], 65)
    t["kuid_t"] = b.struct("", 4, [("val", t["u32"], 0)])
    t["kgid_t"] = b.struct("", 4, [("val", t["u32"], 0)])
    # forward ids for the pointers to structs laid out below
    names = ["task_struct", "cred", "mm_struct", "file", "inode", "dentry", "vfsmount",
             "mount", "super_block", "list_head"]
    fwd = {n: b.fwd(n) for n in names}
    for n, key in (("task_struct", "task_p"), ("cred", "cred_p"), ("mm_struct", "mm_p"),
                   ("file", "file_p"), ("inode", "inode_p"), ("dentry", "dentry_p"),
                   ("vfsmount", "vfsmount_p"), ("mount", "mount_p"),
                   ("super_block", "sb_p"), ("list_head", "list_p")):
        t[key] = b.ptr(fwd[n])
    # the maple tree (6.1's x86-64 layout, as tests/unit/test_btf_typed.py)
    void_p, ulong, u8 = t["void_p"], t["ulong"], t["u8"]
    t["maple_tree"] = b.struct("maple_tree", 16, [("ma_lock", t["u32"], 0),
                                                  ("ma_flags", t["u32"], 32),
                                                  ("ma_root", void_p, 64)])
    meta = b.struct("maple_metadata", 2, [("end", u8, 0), ("gap", u8, 8)])
    piv15, slot16, pad15 = b.array(ulong, 15), b.array(void_p, 16), b.array(void_p, 15)
    padmeta = b.struct("", 128, [("pad", pad15, 0), ("meta", meta, 960)])
    slots_u = b.union("", 128, [("slot", slot16, 0), ("", padmeta, 0)])
    r64 = b.struct("maple_range_64", 256, [("parent", void_p, 0), ("pivot", piv15, 64),
                                           ("", slots_u, 1024)])
    piv9, slot10, gap10 = b.array(ulong, 9), b.array(void_p, 10), b.array(ulong, 10)
    a64 = b.struct("maple_arange_64", 248, [("parent", void_p, 0), ("pivot", piv9, 64),
                                            ("slot", slot10, 640), ("gap", gap10, 1280),
                                            ("meta", meta, 1920)])
    slot31 = b.array(void_p, 31)
    dense = b.struct("", 256, [("parent", void_p, 0), ("slot", slot31, 64)])
    nu = b.union("", 256, [("", dense, 0), ("mr64", r64, 0), ("ma64", a64, 0)])
    b.struct("maple_node", 256, [("", nu, 0)])
    b.enum("maple_type", [("maple_dense", 0), ("maple_leaf_64", 1), ("maple_range_64", 2),
                          ("maple_arange_64", 3)])
    layouts = _layouts(version)
    order = ["list_head", "signal_struct", "qstr", "path", "vfsmount", "new_utsname",
             "uts_namespace",
             "pcpu_hot", "vm_special_mapping", "super_block", "inode", "dentry", "mount",
             "file", "cred", "mm_struct", "vm_area_struct", "task_struct"]
    order = list(dict.fromkeys(order))
    for name in order:
        members = [(m, t[ty], 8 * off) for m, (off, ty) in layouts[name].items()]
        if name == "vm_area_struct" and version == "6.12":
            # 6.12: union { const vm_flags_t vm_flags; vm_flags_t __vm_flags; }
            off = layouts[name]["vm_flags"][0]
            u = b.union("", 8, [("vm_flags", b.const(ulong), 0), ("__vm_flags", ulong, 0)])
            members = [m for m in members if m[0] != "vm_flags"] + [("", u, 8 * off)]
        t[name] = b.struct(name, SIZES[name], members)
    return b.blob()


class Ram:
    """Guest-physical memory as a bytearray (or anything with put/read at GPAs)."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def put(self, gpa: int, data: bytes) -> None:
        self.data[gpa:gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        if gpa < 0 or gpa + n > len(self.data):
            from qintrospect.errors import MemoryReadError
            raise MemoryReadError(f"{gpa:#x}+{n} is beyond RAM", gpa)
        return bytes(self.data[gpa:gpa + n])


class Linux:
    """The small Linux, written into `ram` (put/read) at GPAs from `base` on; its kernel
    half mapped through PML4 slot DIRECT_SLOT of the table at `pml4` (2 MiB pages covering
    `span` bytes of RAM from GPA 0)."""

    def __init__(self, ram, pml4: int, base: int, span: int, version: str = "6.1",
                 kpti: bool = False, note_at: Optional[int] = None):
        self.ram, self.pml4, self.version, self.kpti = ram, pml4, version, kpti
        self.L = _layouts(version)
        self.next = base
        self.span = span
        self.release = RELEASES[version]
        self.tasks: List[dict] = []
        self._map_kernel()
        self.btf = build_btf(version)
        self.btf_kva = self.alloc(len(self.btf), 4096)
        self.put(self.btf_kva, self.btf)
        self.uts = self.alloc(SIZES["uts_namespace"], 64)
        self.put(self.uts + 130, self.release.encode() + b"\0")
        self.special_ops = self.alloc(64, 64)
        self.percpu_offsets = self.alloc(64, 64)
        self.percpu_area = self.alloc(0x1000, 4096)
        # a per-CPU variable (an 'A' symbol: its offset in each CPU's area): current_task in
        # 6.1, pcpu_hot (current_task its first member) in 6.12
        self.percpu_var = 0x1fb80 if version == "6.1" else 0x1fb00
        self.init_task = self.new_task(0, "swapper/0", kthread=True, parent=None)
        self.note_at = note_at

    # ---- memory ------------------------------------------------------------------------
    def alloc(self, n: int, align: int = 64) -> int:
        self.next = (self.next + align - 1) & ~(align - 1)
        gpa = self.next
        self.next += n
        return DIRECT + gpa

    def gpa(self, kva: int) -> int:
        return kva - DIRECT

    def put(self, kva: int, data: bytes) -> None:
        self.ram.put(self.gpa(kva), data)

    def u64(self, kva: int, value: int) -> None:
        self.put(kva, struct.pack("<Q", value & (1 << 64) - 1))

    def field(self, struct_name: str, base: int, member: str, value, size: int = 8) -> None:
        off = self.L[struct_name][member][0]
        if isinstance(value, (bytes, bytearray)):
            self.put(base + off, value)
        else:
            self.put(base + off, value.to_bytes(size, "little", signed=value < 0))

    def _map_kernel(self) -> None:
        pdpt = self.gpa(self.alloc(4096, 4096))
        pd = self.gpa(self.alloc(4096, 4096))
        self.ram.put(self.pml4 + 8 * DIRECT_SLOT, struct.pack("<Q", pdpt | P | RW | A))
        self.ram.put(pdpt, struct.pack("<Q", pd | P | RW | A))
        for i in range(self.span >> 21):
            self.ram.put(pd + 8 * i, struct.pack("<Q", (i << 21) | P | RW | A | D | PS | NX))
        self.kernel_half = self.ram.read(self.pml4 + 2048, 2048)
        # init_mm's own table (init_top_pgt): the kernel half alone
        self.init_top_pgt = self.alloc(4096, 4096)
        self.put(self.init_top_pgt + 2048, self.kernel_half)

    # ---- objects -----------------------------------------------------------------------
    def new_cred(self, uid: int) -> int:
        c = self.alloc(SIZES["cred"])
        self.field("cred", c, "uid", uid, 4)
        self.field("cred", c, "gid", uid, 4)
        return c

    def new_root(self) -> Tuple[int, Optional[int]]:
        """A process's top-level table (KVA of its pgd): the kernel half of the caller's
        root, a user half of its own; under KPTI the user copy 4 KiB above."""
        pgd = self.alloc(8192 if self.kpti else 4096, 8192 if self.kpti else 4096)
        g = self.gpa(pgd)
        self.ram.put(g + 2048, self.kernel_half)
        user_pdpt = self.gpa(self.alloc(4096, 4096))
        self.ram.put(g, struct.pack("<Q", user_pdpt | P | RW | US | A | (NX if self.kpti
                                                                        else 0)))
        if self.kpti:
            self.ram.put(g + 4096, struct.pack("<Q", user_pdpt | P | RW | US | A))
            return pgd, g + 4096
        return pgd, None

    def new_task(self, pid: int, comm: str, kthread: bool = False, parent: Optional[int] = None,
                 uid: int = 0, state: int = 1, tgid: Optional[int] = None,
                 vmas: Optional[List[tuple]] = None) -> int:
        """A task_struct on the task list (after the last one). vmas: (start, end, flags,
        pgoff, path or special name or None)."""
        t = self.alloc(SIZES["task_struct"], 64)
        f = lambda m, v, size=8: self.field("task_struct", t, m, v, size)  # noqa: E731
        f("pid", pid, 4)
        f("tgid", pid if tgid is None else tgid, 4)
        f("comm", comm.encode()[:15].ljust(16, b"\0"))
        f("__state", state, 4)
        f("exit_state", 0, 4)
        f("flags", (PF_KTHREAD if kthread else 0) | 0x40, 4)
        f("real_parent", parent if parent is not None else t)
        f("real_cred", self.new_cred(uid))
        info = {"task": t, "pid": pid, "comm": comm, "kthread": kthread, "mm": None,
                "root": None, "user_root": None}
        sig = self.alloc(SIZES["signal_struct"], 64)
        head = sig + self.L["signal_struct"]["thread_head"][0]
        node = t + self.L["task_struct"]["thread_node"][0]
        self.u64(head, node)
        self.u64(head + 8, node)
        self.u64(node, head)
        self.u64(node + 8, head)
        f("signal", sig)
        info["signal"] = sig
        if not kthread:
            mm = self.alloc(SIZES["mm_struct"], 64)
            pgd, user = self.new_root()
            self.field("mm_struct", mm, "pgd", pgd)
            f("mm", mm)
            info.update(mm=mm, root=self.gpa(pgd), user_root=user)
            self.write_vmas(mm, vmas or [])
        # the list: init_task's prev's next -> t -> init_task
        link = self.L["task_struct"]["tasks"][0]
        if not self.tasks:
            self.u64(t + link, t + link)
            self.u64(t + link + 8, t + link)
        else:
            head = self.tasks[0]["task"] + link
            last = self.tasks[-1]["task"] + link
            self.u64(last, t + link)
            self.u64(t + link, head)
            self.u64(t + link + 8, last)
            self.u64(head + 8, t + link)
        self.tasks.append(info)
        return t

    def new_thread(self, leader: dict, tid: int, comm: Optional[str] = None) -> int:
        """Another thread of the process `leader` (a dict of self.tasks): the same mm,
        signal and parent, on the signal's thread list, not on the task list."""
        t = self.alloc(SIZES["task_struct"], 64)
        f = lambda m, v, size=8: self.field("task_struct", t, m, v, size)  # noqa: E731
        lt = leader["task"]
        f("pid", tid, 4)
        f("tgid", leader["pid"], 4)
        f("comm", (comm or leader["comm"]).encode()[:15].ljust(16, b"\0"))
        f("__state", 1, 4)
        f("flags", 0x40, 4)
        parent = int.from_bytes(self.ram.read(self.gpa(lt + self.L["task_struct"]
                                                       ["real_parent"][0]), 8), "little")
        f("real_parent", parent)
        f("real_cred", self.new_cred(0))
        if leader["mm"]:
            f("mm", leader["mm"])
        f("signal", leader["signal"])
        head = leader["signal"] + self.L["signal_struct"]["thread_head"][0]
        node = t + self.L["task_struct"]["thread_node"][0]
        last = int.from_bytes(self.ram.read(self.gpa(head + 8), 8), "little")
        self.u64(last, node)
        self.u64(node, head)
        self.u64(node + 8, last)
        self.u64(head + 8, node)
        return t

    def link_of(self, task: int) -> int:
        return task + self.L["task_struct"]["tasks"][0]

    def write_vmas(self, mm: int, vmas: List[tuple]) -> None:
        """The VMAs in one maple_leaf_64 node (at most 15), ma_root pointing at it."""
        mt = mm + self.L["mm_struct"]["mm_mt"][0]
        if not vmas:
            return
        node = self.alloc(256, 256)
        pivots, slots, pos = [], [], 0
        for start, end, flags, pgoff, name in vmas:
            if start > pos:
                pivots.append(start - 1)
                slots.append(0)
            pivots.append(end - 1)
            slots.append(self.new_vma(mm, start, end, flags, pgoff, name))
            pos = end
        if len(slots) > 15:
            raise ValueError("more VMAs than one leaf holds")
        for i, p in enumerate(pivots):
            self.u64(node + 8 + 8 * i, p)
        for i, s in enumerate(slots):
            self.u64(node + 128 + 8 * i, s)
        self.put(node + 248, bytes([len(slots) - 1]))       # meta.end (last pivot not max)
        self.u64(node, mt | 1)                                # parent: the tree (root node)
        self.u64(mt + 8, node | (1 << 3) | 4 | 2)             # ma_root: a leaf_64, the root

    def new_vma(self, mm, start, end, flags, pgoff, name) -> int:
        v = self.alloc(SIZES["vm_area_struct"], 64)
        f = lambda m, val: self.field("vm_area_struct", v, m, val)  # noqa: E731
        f("vm_start", start)
        f("vm_end", end)
        f("vm_mm", mm)
        f("vm_flags", flags)
        if name and name.startswith("/"):
            f("vm_pgoff", pgoff)
            f("vm_file", self.new_file(name))
        elif name and name.startswith("["):
            sm = self.alloc(SIZES["vm_special_mapping"])
            s = self.alloc(len(name) + 1)
            self.put(s, name.encode() + b"\0")
            self.field("vm_special_mapping", sm, "name", s)
            f("vm_ops", self.special_ops)
            f("vm_private_data", sm)
        return v

    def new_file(self, path: str) -> int:
        root_mnt = getattr(self, "_mount", None)
        if root_mnt is None:
            self._mount = root_mnt = self.alloc(SIZES["mount"])
            self._root = self.new_dentry("/", None)
            self.field("mount", root_mnt, "mnt_parent", root_mnt)
            self.field("mount", root_mnt, "mnt_mountpoint", self._root)
            vfs = root_mnt + self.L["mount"]["mnt"][0]
            self.field("vfsmount", vfs, "mnt_root", self._root)
            self._sb = self.alloc(SIZES["super_block"])
            self.field("super_block", self._sb, "s_dev", 2, 4)
        parent = self._root
        for part in path.strip("/").split("/"):
            parent = self.new_dentry(part, parent)
        inode = self.alloc(SIZES["inode"])
        self.field("inode", inode, "i_ino", 92)
        self.field("inode", inode, "i_sb", self._sb)
        filp = self.alloc(SIZES["file"])
        fpath = filp + self.L["file"]["f_path"][0]
        self.field("path", fpath, "mnt", root_mnt + self.L["mount"]["mnt"][0])
        self.field("path", fpath, "dentry", parent)
        self.field("file", filp, "f_inode", inode)
        return filp

    def new_dentry(self, name: str, parent: Optional[int]) -> int:
        d = self.alloc(SIZES["dentry"])
        s = self.alloc(len(name) + 1)
        self.put(s, name.encode() + b"\0")
        self.field("dentry", d, "d_parent", d if parent is None else parent)
        q = d + self.L["dentry"]["d_name"][0]
        self.field("qstr", q, "hash_len", len(name) << 32)
        self.field("qstr", q, "name", s)
        return d

    def set_current(self, cpu: int, task: int) -> None:
        """CPU `cpu`'s current task (its per-CPU offset in __per_cpu_offset[cpu])."""
        area = self.percpu_area + cpu * 0x100
        self.u64(self.percpu_offsets + 8 * cpu, area - self.percpu_var)
        self.u64(area, task)

    # ---- the tables and the note ---------------------------------------------------------
    def symbols(self) -> List[Tuple[int, str, str]]:
        syms = [(self.init_task, "D", "init_task"), (self.btf_kva, "R", "__start_BTF"),
                (self.btf_kva + len(self.btf), "R", "__stop_BTF"),
                (self.uts, "D", "init_uts_ns"), (self.special_ops, "d",
                                                 "special_mapping_vmops"),
                (self.percpu_offsets, "D", "__per_cpu_offset"),
                (DIRECT + 0x100000, "T", "_stext")]
        syms.append((self.percpu_var, "A", "current_task" if self.version == "6.1"
                     else "pcpu_hot"))
        syms += [(DIRECT + 0x100000 + 0x10 * i, "t", f"filler_{i}") for i in range(1, 40)]
        return sorted(syms)

    def finish(self, kallsyms: bool = True, note_text: Optional[str] = None,
               omit: Tuple[str, ...] = ()) -> int:
        """Write the kallsyms tables (without the symbols named in `omit`) and the
        vmcoreinfo note; the note's GPA."""
        from tests.unit.test_kallsyms import build_tables
        lines = [f"OSRELEASE={self.release}", "PAGESIZE=4096",
                 f"SYMBOL(init_uts_ns)={self.uts:x}", "OFFSET(uts_namespace.name)=0",
                 f"SYMBOL(_stext)={DIRECT + 0x100000:x}",
                 f"SYMBOL(init_top_pgt)={self.init_top_pgt:x}"]
        if kallsyms:
            mode = "absolute_percpu"
            base = self.alloc(0, 4096)
            syms = [x for x in self.symbols() if x[2] not in omit]
            mem, where = build_tables(syms, mode, self.version, base=base)
            start, blob = mem.regions[0]
            self.alloc(len(blob), 8)
            self.put(start, blob)
            lines += [f"SYMBOL({k})={v:x}" for k, v in sorted(where.items())]
        lines += ["NUMBER(phys_base)=0", "KERNELOFFSET=2a00000"]
        text = (note_text if note_text is not None else "\n".join(lines) + "\n").encode()
        gpa = self.note_at if self.note_at is not None else self.gpa(self.alloc(4096, 4096))
        desc = text + b"\0"
        note = struct.pack("<III", 11, len(desc), 0) + b"VMCOREINFO\0\0" + desc
        self.ram.put(gpa, note)
        return gpa
