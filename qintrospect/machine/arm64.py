"""aarch64 vCPU facts: the EL1&0 translation regime's registers as QEMU's gdbstub gives them
(its "cp_regs" feature names them after the Arm ARM; QEMU 7.2 calls SCTLR_EL1 plain "SCTLR"),
decoded. QEMU's monitor shows none of them (`info registers` has PC, X0-X30 and PSTATE), so an
aarch64 guest is read through a gdbstub."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from ..record import record

# field -> the names a gdbstub may give the register, first found wins
REQUIRED: Dict[str, Tuple[str, ...]] = {
    "ttbr0": ("TTBR0_EL1",), "ttbr1": ("TTBR1_EL1",), "tcr": ("TCR_EL1",),
    "sctlr": ("SCTLR_EL1", "SCTLR"), "mair": ("MAIR_EL1",), "cpsr": ("cpsr",),
}
OPTIONAL: Dict[str, Tuple[str, ...]] = {
    "id_aa64mmfr0": ("ID_AA64MMFR0_EL1",), "id_aa64mmfr1": ("ID_AA64MMFR1_EL1",),
    "id_aa64mmfr2": ("ID_AA64MMFR2_EL1",),
    # EL2, where the CPU has it (QEMU's -M virt,virtualization=on): the hypervisor's
    # configuration, its stage 2 for its guests, and its own regime's registers
    "hcr": ("HCR_EL2",), "vttbr": ("VTTBR_EL2",), "vtcr": ("VTCR_EL2",),
    "ttbr0_el2": ("TTBR0_EL2",), "ttbr1_el2": ("TTBR1_EL2",), "tcr_el2": ("TCR_EL2",),
    "sctlr_el2": ("SCTLR_EL2",), "mair_el2": ("MAIR_EL2",),
}
SCTLR_BITS = {0: "M", 1: "A", 2: "C", 12: "I", 19: "WXN", 23: "SPAN", 25: "EE"}
HCR_VM, HCR_DC, HCR_TGE, HCR_E2H = 1 << 0, 1 << 12, 1 << 27, 1 << 34
HCR_BITS = {0: "VM", 12: "DC", 27: "TGE", 31: "RW", 34: "E2H", 46: "FWB"}


@record(frozen=True)
class Stage2Regs:
    """What the stage 2 of the EL1&0 regime is made of on a vCPU that runs a guest of its
    hypervisor: VTTBR_EL2 (root, VMID), VTCR_EL2 (layout), HCR_EL2 (VM/DC, FWB) and the ID
    registers that bound them."""
    vttbr: int
    vtcr: int
    hcr: int
    id_aa64mmfr0: Optional[int] = None
    id_aa64mmfr1: Optional[int] = None
    id_aa64mmfr2: Optional[int] = None
    source: Optional[str] = None        # None: the vCPU's own VTTBR_EL2; else where from

    def walk(self, read_phys, ipa: int):
        from ..paging.arm64_stage2 import walk_stage2
        return walk_stage2(read_phys, self.vttbr, self.vtcr, ipa,
                           id_aa64mmfr0=self.id_aa64mmfr0, id_aa64mmfr1=self.id_aa64mmfr1,
                           id_aa64mmfr2=self.id_aa64mmfr2, hcr=self.hcr)

    def leaf_arrays(self, read_phys, start: int = 0, end: Optional[int] = None,
                    on_unreadable=None):
        """Every valid leaf of the IPA space in [start, end), as vector.LeafArrays."""
        from ..paging.arm64_vector import leaf_arrays_stage2
        return leaf_arrays_stage2(read_phys, self.vttbr, self.vtcr, start, end,
                                  id_aa64mmfr0=self.id_aa64mmfr0, id_aa64mmfr1=self.id_aa64mmfr1,
                                  id_aa64mmfr2=self.id_aa64mmfr2, hcr=self.hcr,
                                  on_unreadable=on_unreadable)

    def to_dict(self) -> dict:
        from ..paging.arm64_stage2 import decode_vtcr, decode_vttbr
        ids = dict(id_aa64mmfr0=self.id_aa64mmfr0, id_aa64mmfr1=self.id_aa64mmfr1,
                   id_aa64mmfr2=self.id_aa64mmfr2)
        vttbr = decode_vttbr(self.vttbr, self.vtcr, **ids)
        root = vttbr.get("root")
        return {"vttbr_el2": f"{self.vttbr:#x}", "vtcr_el2": f"{self.vtcr:#x}",
                "hcr_el2": f"{self.hcr:#x}", "root": None if root is None else f"{root:#x}",
                "vmid": vttbr.get("vmid"), "vttbr_problems": vttbr.get("problems", []),
                "source": self.source or "the vCPU's VTTBR_EL2",
                "vtcr": decode_vtcr(self.vtcr, **ids)}


@record(frozen=True)
class Arm64Vcpu:
    index: int
    thread_id: Optional[int]
    qom_path: Optional[str]
    ttbr0: int
    ttbr1: int
    tcr: int
    sctlr: int
    mair: int
    cpsr: int
    id_aa64mmfr0: Optional[int] = None
    id_aa64mmfr1: Optional[int] = None
    id_aa64mmfr2: Optional[int] = None
    hcr: Optional[int] = None           # None: no EL2 (or the stub does not show it)
    vttbr: Optional[int] = None
    vtcr: Optional[int] = None
    ttbr0_el2: Optional[int] = None
    ttbr1_el2: Optional[int] = None
    tcr_el2: Optional[int] = None
    sctlr_el2: Optional[int] = None
    mair_el2: Optional[int] = None
    # where VTTBR/VTCR came from when not the vCPU's own registers (guestos.kvm_arm64: a VM
    # the guest's KVM holds, its vCPU's registers as KVM keeps them)
    stage2_source: Optional[str] = None

    @property
    def regime(self) -> str:
        """The translation regime the vCPU's accesses use now (Arm ARM D8.1): "EL1&0"; on a
        VHE host (HCR_EL2.E2H=1) "EL2&0" at EL2, and at EL0 when HCR_EL2.TGE=1 (the host's
        own processes); "EL2" at EL2 without VHE (its own one-range regime); "EL3"."""
        hcr = self.hcr or 0
        if self.cpl == 3:
            return "EL3"
        if self.cpl == 2 or (self.cpl == 0 and hcr & HCR_E2H and hcr & HCR_TGE):
            return "EL2&0" if hcr & HCR_E2H else "EL2"
        return "EL1&0"

    @property
    def stage2(self) -> Optional[Stage2Regs]:
        """The stage 2 the vCPU's EL1&0 accesses go through now, or None: live when the vCPU
        runs a guest of its hypervisor (at EL1/EL0 with HCR_EL2.VM or DC set, TGE clear).
        VTTBR_EL2 keeps its last value after the guest stops running (even after its VM is
        gone), so the register alone says nothing: HCR_EL2 does."""
        hcr = self.hcr
        if hcr is None or self.vttbr is None or self.vtcr is None or \
                self.regime != "EL1&0" or hcr & HCR_TGE or not hcr & (HCR_VM | HCR_DC):
            return None
        return Stage2Regs(self.vttbr, self.vtcr, hcr, self.id_aa64mmfr0, self.id_aa64mmfr1,
                          self.id_aa64mmfr2, self.stage2_source)

    def stage2_root_pages(self) -> Tuple[int, ...]:
        """The pages of the stage 2 first level VTTBR_EL2 names (live or the last loaded):
        KVM's table, never a process's, though shaped like one."""
        if not self.vttbr or self.vtcr is None:
            return ()
        from ..paging.arm64_stage2 import decode_vtcr, decode_vttbr
        ids = dict(id_aa64mmfr0=self.id_aa64mmfr0, id_aa64mmfr1=self.id_aa64mmfr1,
                   id_aa64mmfr2=self.id_aa64mmfr2)
        root = decode_vttbr(self.vttbr, self.vtcr, **ids).get("root")
        v = decode_vtcr(self.vtcr, **ids)
        size = {"4k": 1 << 12, "16k": 1 << 14, "64k": 1 << 16}.get(v.get("granule"))
        if root is None or size is None:
            return ()
        return tuple(root + k * size for k in range(v.get("root_tables") or 1))

    @property
    def state(self):
        """The registers of the regime in effect, for the stage 1 walk: the EL1 ones, or a
        VHE host's EL2 ones (the same formats under E2H=1). Without VHE, EL2's own regime
        is not walked: the EL1 registers are given and the regime says "EL2"."""
        from ..paging.arm64 import Arm64State
        ids = dict(cpsr=self.cpsr, id_aa64mmfr0=self.id_aa64mmfr0,
                   id_aa64mmfr1=self.id_aa64mmfr1, id_aa64mmfr2=self.id_aa64mmfr2)
        if self.regime == "EL2&0" and self.host_state is not None:
            return self.host_state
        regime = self.regime if self.regime in ("EL1&0", "EL3") else "EL2"
        return Arm64State(ttbr0=self.ttbr0, ttbr1=self.ttbr1, tcr=self.tcr, sctlr=self.sctlr,
                          mair=self.mair, regime=regime, **ids)

    @property
    def host_state(self):
        """A VHE host's own EL2&0 registers (TTBR1_EL2: its kernel; TTBR0_EL2: its process
        that ran last, the VMM while a guest runs) whatever the vCPU runs now; None without
        VHE (HCR_EL2.E2H clear) or when the stub does not show them."""
        from ..paging.arm64 import Arm64State
        if not (self.hcr or 0) & HCR_E2H or None in (self.ttbr0_el2, self.ttbr1_el2,
                                                      self.tcr_el2, self.sctlr_el2,
                                                      self.mair_el2):
            return None
        return Arm64State(ttbr0=self.ttbr0_el2, ttbr1=self.ttbr1_el2, tcr=self.tcr_el2,
                          sctlr=self.sctlr_el2, mair=self.mair_el2, regime="EL2&0",
                          cpsr=self.cpsr, id_aa64mmfr0=self.id_aa64mmfr0,
                          id_aa64mmfr1=self.id_aa64mmfr1, id_aa64mmfr2=self.id_aa64mmfr2)

    @property
    def mode(self) -> str:
        """'aarch64-4k-48' (the TTBR0 range's; the TTBR1 range's too when it differs)."""
        from ..paging.arm64 import arm64_mode
        if self.state.regime in ("EL2", "EL3"):
            return f"{self.state.regime} regime (not walked)"
        low = arm64_mode(self.state, 0)
        if low is None:
            return "MMU off"
        high = arm64_mode(self.state, (1 << 64) - 1)
        return low.name if high is None or high.name == low.name \
            else f"{low.name} / {high.name}"

    @property
    def cpl(self) -> int:
        """The exception level (PSTATE.EL: gdb's cpsr M[3:2])."""
        return self.cpsr >> 2 & 3

    @property
    def cr3(self) -> int:
        """The per-process root register, as CR3 is on x86: TTBR0_EL1 (Linux switches it
        with the process; TTBR1_EL1 holds the kernel's tables); a VHE host's TTBR0_EL2."""
        return self.state.ttbr0

    @property
    def pcid(self) -> Optional[int]:
        """The ASID: in TTBR1 when TCR.A1=1 (Linux's choice), else TTBR0 (the regime's)."""
        s = self.state
        return (s.ttbr1 if s.tcr >> 22 & 1 else s.ttbr0) >> 48

    def table(self, select: int) -> int:
        """TTBR0's (select 0) or TTBR1's (1) first table, as the walk takes it."""
        from ..paging.arm64_format import range_params, ttbr_base
        return ttbr_base(range_params(self.state, select))

    @property
    def root(self) -> int:
        """A table this vCPU surely uses: TTBR1's (the kernel's), else TTBR0's."""
        return self.table(1) or self.table(0)

    def to_dict(self) -> dict:
        h = lambda v: None if v is None else f"{v:#x}"   # noqa: E731
        return {"index": self.index, "thread_id": self.thread_id, "qom_path": self.qom_path,
                "cpl": self.cpl, "mode": self.mode, "cr3": h(self.cr3),
                "root": h(self.table(0)), "pcid": h(self.pcid),
                "ttbr0_el1": h(self.ttbr0), "ttbr1_el1": h(self.ttbr1), "tcr_el1": h(self.tcr),
                "sctlr_el1": h(self.sctlr),
                "sctlr_bits": [n for b, n in sorted(SCTLR_BITS.items()) if self.sctlr >> b & 1],
                "mair_el1": h(self.mair), "cpsr": h(self.cpsr),
                "pan": bool(self.cpsr >> 22 & 1),
                "id_aa64mmfr0_el1": h(self.id_aa64mmfr0),
                "id_aa64mmfr1_el1": h(self.id_aa64mmfr1),
                "id_aa64mmfr2_el1": h(self.id_aa64mmfr2),
                "regime": self.regime, "el2": self._el2_dict()}

    def _el2_dict(self) -> Optional[dict]:
        """EL2's part (None without EL2): HCR_EL2 and its bits, and the stage 2 the vCPU's
        EL1&0 accesses go through now (None when no guest runs on it)."""
        if self.hcr is None:
            return None
        h = lambda v: None if v is None else f"{v:#x}"   # noqa: E731
        s2 = self.stage2
        return {"hcr_el2": h(self.hcr),
                "hcr_bits": [n for b, n in sorted(HCR_BITS.items()) if self.hcr >> b & 1],
                "vttbr_el2": h(self.vttbr), "vtcr_el2": h(self.vtcr),
                "ttbr0_el2": h(self.ttbr0_el2), "ttbr1_el2": h(self.ttbr1_el2),
                "tcr_el2": h(self.tcr_el2), "sctlr_el2": h(self.sctlr_el2),
                "mair_el2": h(self.mair_el2),
                "stage2_live": s2 is not None, "stage2": s2.to_dict() if s2 else None}


VCPU = Arm64Vcpu     # what vcpus.Vcpus makes of these registers
