"""vCPU facts: control registers decoded into named bits, CPL, paging mode."""

from typing import Dict, List, Optional

from ..paging import CpuState, cr3_root, paging_mode
from ..paging.formats import ADDR_51_12
from ..record import record

CR0_BITS = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
            29: "NW", 30: "CD", 31: "PG"}
CR4_BITS = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
            8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
            14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP",
            21: "SMAP", 22: "PKE", 23: "CET", 24: "PKS", 25: "UINTR"}
EFER_BITS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE", 14: "FFXSR",
             15: "TCE"}
CR4_PCIDE = 1 << 17


def bit_names(value: int, names: Dict[int, str]) -> List[str]:
    return [name for bit, name in sorted(names.items()) if value >> bit & 1]


@record(frozen=True)
class Vcpu:
    index: int
    thread_id: Optional[int]   # the host thread running this vCPU
    qom_path: Optional[str]
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: int
    pkru: Optional[int] = None   # where QEMU exposes it (it does not, up to 10.0)
    pkrs: Optional[int] = None

    @property
    def state(self) -> CpuState:
        return CpuState(self.cr0, self.cr3, self.cr4, self.efer)

    @property
    def mode(self) -> str:
        mode = paging_mode(self.state)
        return mode.name if mode else "no paging"

    @property
    def cpl(self) -> int:
        # Protected/long mode: the CPL is CS's RPL. Real mode (CR0.PE=0) runs at 0.
        return self.cs & 3 if self.cr0 & 1 else 0

    @property
    def pcid(self) -> Optional[int]:
        return self.cr3 & 0xFFF if self.cr4 & CR4_PCIDE else None

    @property
    def root(self) -> int:
        """The first table's physical base, exactly as the walker takes it from CR3."""
        mode = paging_mode(self.state)
        return cr3_root(self.state, mode)[0] if mode else self.cr3 & ADDR_51_12

    def to_dict(self) -> dict:
        return {"index": self.index, "thread_id": self.thread_id, "qom_path": self.qom_path,
                "cpl": self.cpl, "mode": self.mode, "cr3": f"{self.cr3:#x}",
                "root": f"{self.root:#x}",
                "pcid": None if self.pcid is None else f"{self.pcid:#x}",
                "cr0": f"{self.cr0:#x}", "cr0_bits": bit_names(self.cr0, CR0_BITS),
                "cr4": f"{self.cr4:#x}", "cr4_bits": bit_names(self.cr4, CR4_BITS),
                "efer": f"{self.efer:#x}", "efer_bits": bit_names(self.efer, EFER_BITS),
                "pkru": None if self.pkru is None else f"{self.pkru:#x}",
                "pkrs": None if self.pkrs is None else f"{self.pkrs:#x}"}
