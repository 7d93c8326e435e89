"""riscv64 vCPU facts: the registers that govern supervisor translation as QEMU's gdbstub
gives them (satp, mstatus and menvcfg from its CSR feature, the privilege level from its
"virtual" one), and the extensions QOM says the hart has. QEMU's monitor shows satp in
`info registers` but not the privilege level, so a riscv64 guest is read through a gdbstub."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from ..record import record

# field -> the names a gdbstub may give the register, first found wins
REQUIRED: Dict[str, Tuple[str, ...]] = {"satp": ("satp",), "priv": ("priv",),
                                        "mstatus": ("mstatus",)}
OPTIONAL: Dict[str, Tuple[str, ...]] = {"menvcfg": ("menvcfg",)}
#: CPU properties (QOM) that change how a PTE reads; absent = unknown
EXTENSIONS = ("svnapot", "svpbmt")
MSTATUS_BITS = {17: "MPRV", 18: "SUM", 19: "MXR"}


@record(frozen=True)
class RiscvVcpu:
    index: int
    thread_id: Optional[int]
    qom_path: Optional[str]
    satp: int
    priv: int
    mstatus: int
    menvcfg: Optional[int] = None
    svnapot: Optional[bool] = None
    svpbmt: Optional[bool] = None

    @property
    def state(self):
        from ..paging.riscv_format import RiscvState
        return RiscvState(satp=self.satp, priv=self.priv & 3, mstatus=self.mstatus,
                          menvcfg=self.menvcfg, svpbmt=self.svpbmt, svnapot=self.svnapot)

    @property
    def mode(self) -> str:
        from ..paging.riscv_format import riscv_mode
        mode = riscv_mode(self.state)
        return mode.name if mode is not None else "bare"

    @property
    def cpl(self) -> int:
        """The privilege level (gdbstub "priv": 0 U, 1 S, 3 M; bit 2 would be QEMU's V)."""
        return self.priv & 3

    @property
    def cr3(self) -> int:
        """The per-process root register, as CR3 is on x86: satp."""
        return self.satp

    @property
    def pcid(self) -> Optional[int]:
        from ..paging.riscv_format import satp_asid
        return satp_asid(self.satp)

    @property
    def root(self) -> int:
        from ..paging.riscv_format import satp_root
        return satp_root(self.satp)

    def to_dict(self) -> dict:
        h = lambda v: None if v is None else f"{v:#x}"   # noqa: E731
        from ..paging.riscv_format import PRIV_NAMES
        return {"index": self.index, "thread_id": self.thread_id, "qom_path": self.qom_path,
                "cpl": self.cpl, "privilege": PRIV_NAMES.get(self.cpl, str(self.cpl)),
                "mode": self.mode, "cr3": h(self.satp), "root": h(self.root),
                "pcid": h(self.pcid), "satp": h(self.satp), "mstatus": h(self.mstatus),
                "mstatus_bits": [n for b, n in sorted(MSTATUS_BITS.items())
                                 if self.mstatus >> b & 1],
                "menvcfg": h(self.menvcfg), "svnapot": self.svnapot, "svpbmt": self.svpbmt}


VCPU = RiscvVcpu     # what vcpus.Vcpus makes of these registers
