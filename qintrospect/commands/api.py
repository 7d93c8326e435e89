"""The commands as methods of an attached VM: the Python API (`vm.translate(0x...)`). Each
method calls its command's function with the session it belongs to (connect.session.Session)."""

from __future__ import annotations

from typing import Optional

from .. import paging


class Commands:
    """Mixed into connect.session.Session."""

    def require_x86(self, what: str) -> None:
        """UsageError (exit 2) for a command that does not read an aarch64 guest yet."""
        paging.require_x86(self.cpu, what)

    @property
    def stage2(self):
        """The stage 2 the selected vCPU's accesses go through now (machine.arm64.Stage2Regs:
        an aarch64 vCPU that runs a guest of its hypervisor), or None."""
        return getattr(self.vcpu_info[self.vcpu], "stage2", None)

    def require_one_stage(self, what: str) -> None:
        """UsageError (exit 2) for a command that walks one stage only, on a vCPU whose
        accesses go through two (or whose regime is not walked)."""
        paging.require_walkable(self.cpu)
        if self.stage2 is not None:
            from ..errors import UsageError
            raise UsageError(f"{what}: vCPU {self.vcpu} runs a guest of its hypervisor "
                             "(HCR_EL2.VM=1: its tables are at IPAs, behind stage 2), and "
                             f"{what} walks one stage so far; translate follows both")

    def translate(self, gva: int, cr3: Optional[int] = None):
        """commands.translate.translate: one address down the chain."""
        from .translate import translate
        return translate(self, gva, cr3)

    def translate_many(self, addresses, cr3: Optional[int] = None):
        from .translate import translate_many
        return translate_many(self, addresses, cr3)

    def translate_batch(self, addresses, cr3: Optional[int] = None):
        from .translate import translate_batch
        return translate_batch(self, addresses, cr3)

    def translate_json(self, addresses, cr3: Optional[int] = None, kvm: Optional[dict] = None):
        """(translated?, JSON line) per address, made from arrays (present.jsonlines)."""
        from ..present.jsonlines import json_lines
        self.check_open()
        return json_lines(self, addresses, cr3, kvm)

    def translate_json_blocks(self, addresses, cr3: Optional[int] = None,
                              kvm: Optional[dict] = None, size: int = 256):
        from ..present.jsonlines import json_blocks
        self.check_open()
        return json_blocks(self, addresses, cr3, kvm, size)

    def read_pieces(self, address: int, length: int, physical: bool = False,
                    cr3: Optional[int] = None):
        from .read import read_pieces
        return read_pieces(self, address, length, physical, cr3)

    def find_cr3(self, gva: Optional[int] = None, expect: Optional[int] = None,
                 progress=None):
        """commands.finder.find_cr3: candidate page-table roots in guest RAM (no symbols)."""
        from .finder import find_cr3
        return find_cr3(self, gva, expect, progress)

    def find_stage2(self, vtcr: Optional[int] = None, progress=None):
        """commands.stage2_scan.find_stage2: KVM/arm64 stage 2 first levels in an aarch64
        guest's RAM (no symbols), each confirmed by its VMM's own mapping of its pages."""
        from .stage2_scan import find_stage2
        return find_stage2(self, vtcr, progress)

    def search(self, pattern: bytes, cr3: Optional[int] = None, start: int = 0,
               end: Optional[int] = None, user: bool = False, kernel: bool = False,
               writable: bool = False, executable: bool = False, align: int = 1,
               limit: int = 1000, progress=None):
        """commands.search.search_virtual: where pattern starts in one address space."""
        from .search import search_virtual
        self.check_open()
        return search_virtual(self, pattern, cr3, start, end, user, kernel, writable,
                              executable, align, limit, progress)

    def search_physical(self, pattern: bytes, align: int = 1, limit: int = 1000,
                        progress=None):
        """commands.search.search_physical: where pattern starts in guest-physical RAM."""
        from .search import search_physical
        self.check_open()
        return search_physical(self, pattern, align, limit, progress)

    def leaf_arrays(self, cr3: Optional[int] = None, start: int = 0,
                    end: Optional[int] = None) -> paging.LeafArrays:
        """Every present leaf of the address space as numpy columns (paging.leaf_arrays);
        tables that cannot be read (not RAM) are skipped and listed in unreadable_tables."""
        self.check_open()
        self.unreadable_tables = []

        def unreadable(level, addr, exc):
            self.unreadable_tables.append((level, addr, str(exc)))
        s2 = self.stage2
        if s2 is None:
            paging.require_walkable(self.cpu)
            return paging.leaf_arrays(self.memory.read, self.cpu_state(cr3), start, end,
                                      unreadable)
        # a guest of the hypervisor (aarch64): with its MMU off its addresses are its IPAs
        # and its map is stage 2's; else its stage 1 (tables at IPAs, read through stage 2)
        # composed with stage 2
        paging.require_walkable(self.cpu)
        if cr3 is None and not self.cpu.sctlr & 1:
            return s2.leaf_arrays(self.memory.read, start, end, unreadable)
        from ..memory.stage2 import Stage2Memory
        from ..paging.arm64_vector import compose_stages
        s1 = paging.leaf_arrays(Stage2Memory(self.memory, s2).read, self.cpu_state(cr3),
                                start, end, unreadable)
        return compose_stages(s1, s2.leaf_arrays(self.memory.read, 0, None, unreadable))

    def mappings(self, cr3: Optional[int] = None, start: int = 0, end: Optional[int] = None):
        """Every present leaf of the address space as paging.Mapping objects, in VA order."""
        return self.leaf_arrays(cr3, start, end).mappings()

    def who_maps(self, gpa: Optional[int] = None, hva: Optional[int] = None,
                 hpa: Optional[int] = None, progress=None, slat=None, roots=None,
                 names: bool = True):
        """commands.whomaps.who_maps: every mapping that reaches the frame (over `roots` only,
        when given), with the guest processes behind each root named (names=True: read
        from the guest kernel's own memory when it can be; a note when not)."""
        from . import whomaps
        from ..slat import parse_slat
        self.check_open()
        spec = parse_slat(slat) if isinstance(slat, str) else slat
        results = whomaps.who_maps(self, gpa, hva, hpa, progress, spec, roots)
        if names:
            from .guest import name_processes
            name_processes(self, results)
        return results

    def second_level(self, spec, translations=(), progress=None):
        """commands.second_level.second_level: this VM's second-level table on this host."""
        from .second_level import second_level
        return second_level(self, spec, translations, progress)

    def kvm_facts(self, roots: bool = False) -> dict:
        """KVM's own facts about this VM (slat.kvm.facts)."""
        from ..slat import kvm
        self.check_open()
        return kvm.facts(self.qmp, self.process.pid if self.process else None, roots=roots)

    # ---- the guest's own processes (qintrospect.guestos: no symbol files) -----------------

    def processes(self, include_idle: bool = False, threads: bool = False, progress=None):
        """commands.guest.processes: the guest's processes (guestos.TaskList), read from its
        kernel's task list with offsets from its own BTF (threads=True: every thread too)."""
        from .guest import processes
        return processes(self, include_idle, threads, progress)

    def guest_process(self, pid: Optional[int] = None, comm: Optional[str] = None,
                      progress=None):
        """commands.guest.process: the one guest process with this pid or comm
        (guestos.GuestTask: its roots, .root_for(address))."""
        from .guest import process
        return process(self, pid, comm, progress)

    def guest_vmas(self, task):
        """commands.guest.vmas: a guest process's VMAs, as its /proc/PID/maps lists them."""
        from .guest import vmas
        return vmas(self, task)
