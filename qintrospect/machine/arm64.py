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
}
SCTLR_BITS = {0: "M", 1: "A", 2: "C", 12: "I", 19: "WXN", 23: "SPAN", 25: "EE"}


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

    @property
    def state(self):
        from ..paging.arm64 import Arm64State
        return Arm64State(ttbr0=self.ttbr0, ttbr1=self.ttbr1, tcr=self.tcr, sctlr=self.sctlr,
                          mair=self.mair, cpsr=self.cpsr, id_aa64mmfr0=self.id_aa64mmfr0,
                          id_aa64mmfr1=self.id_aa64mmfr1, id_aa64mmfr2=self.id_aa64mmfr2)

    @property
    def mode(self) -> str:
        """'aarch64-4k-48' (the TTBR0 range's; the TTBR1 range's too when it differs)."""
        from ..paging.arm64 import arm64_mode
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
        with the process; TTBR1_EL1 holds the kernel's tables)."""
        return self.ttbr0

    @property
    def pcid(self) -> Optional[int]:
        """The ASID: in TTBR1_EL1 when TCR_EL1.A1=1 (Linux's choice), else TTBR0_EL1."""
        return (self.ttbr1 if self.tcr >> 22 & 1 else self.ttbr0) >> 48

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
                "cpl": self.cpl, "mode": self.mode, "cr3": h(self.ttbr0),
                "root": h(self.table(0)), "pcid": h(self.pcid),
                "ttbr0_el1": h(self.ttbr0), "ttbr1_el1": h(self.ttbr1), "tcr_el1": h(self.tcr),
                "sctlr_el1": h(self.sctlr),
                "sctlr_bits": [n for b, n in sorted(SCTLR_BITS.items()) if self.sctlr >> b & 1],
                "mair_el1": h(self.mair), "cpsr": h(self.cpsr),
                "pan": bool(self.cpsr >> 22 & 1),
                "id_aa64mmfr0_el1": h(self.id_aa64mmfr0),
                "id_aa64mmfr1_el1": h(self.id_aa64mmfr1),
                "id_aa64mmfr2_el1": h(self.id_aa64mmfr2)}


VCPU = Arm64Vcpu     # what vcpus.Vcpus makes of these registers
