"""The VM's vCPUs as QEMU gives them: the target (x86, aarch64 or riscv64), the list
(QMP query-cpus-fast), each one's control registers (from a gdbstub, or QMP's `info
registers` on x86), its MAXPHYADDR and CPUID facts (QOM), and Page1GB as the processor that
walks the guest's tables applies it."""

from __future__ import annotations

from typing import List, Optional, Tuple

from .. import paging
from ..record import replace
from ..errors import AttachError, QIError, UsageError
from . import hostcpu
from .cpu import Vcpu
from .monitor_text import parse_registers


# query-cpus-fast's "target" (QEMU's SysEmuTarget) -> the walker that reads its tables
ARCH_OF_TARGET = {"x86_64": "x86_64", "i386": "x86_64", "aarch64": "aarch64",
                  "riscv64": "riscv64"}


def target_of(listing) -> str:
    """"x86_64", "aarch64" or "riscv64", from query-cpus-fast (every entry names the target,
    QEMU 3.0 on); a listing without it is taken as x86 (as before targets were told apart);
    another target is an AttachError that names it."""
    first = listing[0] if isinstance(listing, list) and listing and \
        isinstance(listing[0], dict) else {}
    target = first.get("target")
    if target is None:
        return "x86_64"
    if target not in ARCH_OF_TARGET:
        from ..present.textsafe import printable
        raise AttachError(f"this QEMU emulates {printable(str(target))[:40]}: qintrospect "
                          "reads x86, aarch64 and riscv64 guests")
    return ARCH_OF_TARGET[target]


class Vcpus:
    """What a session asks about its VM's vCPUs, through its monitor: answers that cannot
    change while the VM lives (phys-bits, query-kvm) are asked once."""

    def __init__(self, monitor, listing: List[dict]):
        self.monitor = monitor
        self.listing = listing                 # query-cpus-fast
        self._phys_bits: dict = {}
        self._kvm: Optional[dict] = None
        self.arch = target_of(listing)

    @classmethod
    def of(cls, monitor, wanted: int) -> "Vcpus":
        """The VM's vCPUs; UsageError when vCPU `wanted` is not one of them."""
        listing = monitor.command("query-cpus-fast")
        if wanted >= len(listing):
            raise UsageError(f"--vcpu {wanted}: this VM has {len(listing)} vCPU(s), numbered "
                             f"0-{len(listing) - 1}")
        return cls(monitor, listing)

    def from_gdbstub(self, gdb, selected: int) -> list:
        """Every vCPU's registers through a gdbstub (each selected in turn, `selected` last)."""
        from ..connect import gdbstub
        if self.arch == "aarch64":
            return self._arm64_from_gdbstub(gdb, selected)
        if self.arch == "riscv64":
            return self._riscv_from_gdbstub(gdb, selected)
        out = []
        for i, info in enumerate(self.listing):
            gdb.select_vcpu(i)
            # the protection-key registers too, where the stub describes them (QEMU 7.2 to
            # 10.0 do not: the walk then says "unknown" for keyed pages)
            keys = tuple(k for k in gdbstub.KEY_REGISTERS if gdb.has_register(k))
            regs = gdb.registers(gdbstub.CONTROL_REGISTERS + ("cs",) + keys)
            out.append(Vcpu(i, info.get("thread-id"), info.get("qom-path"), regs["cr0"],
                            regs["cr3"], regs["cr4"], regs["efer"], regs["cs"],
                            regs.get("pkru"), regs.get("pkrs")))
        gdb.select_vcpu(selected)
        return out

    def _registers_by_name(self, gdb, selected: int, kind, what: str) -> list:
        """Every vCPU as `kind` (machine.arm64 or machine.riscv: REQUIRED/OPTIONAL register
        names and the vCPU record) from the gdbstub's registers of those names."""
        names = {}
        for field, options in list(kind.REQUIRED.items()) + list(kind.OPTIONAL.items()):
            found = next((n for n in options if gdb.has_register(n)), None)
            if found is not None:
                names[field] = found
        missing = [options[0] for f, options in kind.REQUIRED.items() if f not in names]
        if missing:
            raise AttachError(f"the gdbstub does not expose {', '.join(missing)}: qintrospect "
                              f"needs {what}")
        out = []
        for i, info in enumerate(self.listing):
            gdb.select_vcpu(i)
            regs = gdb.registers(tuple(names.values()))
            out.append(kind.VCPU(i, info.get("thread-id"), info.get("qom-path"),
                                 **{f: regs[name] for f, name in names.items()}))
        gdb.select_vcpu(selected)
        return out

    def _arm64_from_gdbstub(self, gdb, selected: int) -> list:
        from . import arm64
        return self._registers_by_name(gdb, selected, arm64, "qemu-system-aarch64's gdbstub "
                                       "with its system registers")

    def _riscv_from_gdbstub(self, gdb, selected: int) -> list:
        from . import riscv
        out = self._registers_by_name(gdb, selected, riscv, "qemu-system-riscv64's gdbstub "
                                      "with its CSRs")
        # the extensions that give PTE bits 63:61 a meaning (QOM: fixed for the VM's life)
        for k, v in enumerate(out):
            known = {e: self.qom(v, e) for e in riscv.EXTENSIONS}
            out[k] = replace(v, **{e: x for e, x in known.items() if isinstance(x, bool)})
        return out

    def from_monitor(self) -> List[Vcpu]:
        """Without a gdbstub: every vCPU's registers from HMP `info registers` (x86 only)."""
        if self.arch == "aarch64":
            raise AttachError("an aarch64 guest's translation registers (TTBR0_EL1, TCR_EL1, "
                              "...) are not in QEMU's monitor: pass --gdb (QEMU's -gdb/-s)")
        if self.arch == "riscv64":
            raise AttachError("a riscv64 guest's privilege level and translation registers "
                              "(satp, mstatus) come from the gdbstub: pass --gdb (QEMU's -gdb/-s)")
        out = []
        for i, info in enumerate(self.listing):
            regs = parse_registers(self.monitor.hmp("info registers",
                                                    cpu_index=info["cpu-index"]))
            out.append(Vcpu(i, info.get("thread-id"), info.get("qom-path"), regs["CR0"],
                            regs["CR3"], regs["CR4"], regs["EFER"], regs.get("CPL", 0),
                            regs.get("PKRU"), regs.get("PKRS")))
        return out

    def cpu_state(self, vcpu: Vcpu) -> paging.CpuState:
        """The vCPU's registers plus its MAXPHYADDR (QOM phys-bits), which reserved-bit checks
        need; None (the walker then assumes 52 and says so) when QEMU will not tell.
        An aarch64 vCPU's state is its registers (the ID registers say the sizes)."""
        if not isinstance(vcpu, Vcpu):      # machine.arm64's or machine.riscv's
            return vcpu.state
        phys_bits = self._phys_bits.get(vcpu.index)
        if phys_bits is None:         # fixed for the VM's life: asked once per vCPU
            phys_bits = self._phys_bits[vcpu.index] = self.qom(vcpu, "phys-bits")
        return paging.CpuState(cr0=vcpu.cr0, cr3=vcpu.cr3, cr4=vcpu.cr4, efer=vcpu.efer,
                               maxphyaddr=int(phys_bits) if isinstance(phys_bits, int) else None,
                               pkru=vcpu.pkru, pkrs=vcpu.pkrs)

    def qom(self, vcpu: Vcpu, prop: str):
        """A property of the vCPU's QOM object (a CPUID feature, phys-bits...), or None."""
        if not vcpu.qom_path:
            return None
        try:
            return self.monitor.command("qom-get", path=vcpu.qom_path, property=prop)
        except QIError:
            return None

    @property
    def kvm_enabled(self) -> Optional[bool]:
        """Whether the VM runs under KVM (QMP query-kvm); None if QEMU will not say."""
        if self._kvm is None:
            try:
                self._kvm = self.monitor.command("query-kvm")
            except QIError:
                self._kvm = {}
        return self._kvm.get("enabled")

    def page1gb(self, vcpu: Vcpu, local: bool) -> Tuple[Optional[bool], str]:
        """(Page1GB, where it comes from): whether PS in a PDPTE maps a 1 GiB page for this
        vCPU. Under TCG and under KVM without two-dimensional paging, the guest's CPUID says
        (QOM "pdpe1gb"); under KVM with EPT/NPT the processor walks the guest's tables itself,
        so the host CPU's Page1GB decides, known only when QEMU runs on this host (local)."""
        if self.arch != "x86_64":
            return None, "not x86"
        kvm = self.kvm_enabled
        cpuid = self.qom(vcpu, "pdpe1gb")
        cpuid = cpuid if isinstance(cpuid, bool) else None
        if not kvm:
            return cpuid, "the vCPU's CPUID (QOM pdpe1gb)" if cpuid is not None else "unknown"
        if hostcpu.tdp()["enabled"] is False:
            return cpuid, "the vCPU's CPUID (KVM shadow paging emulates it)"
        if not local:
            return None, "unknown: KVM walks with the host CPU's Page1GB, and QEMU is not local"
        return hostcpu.page1gb(), "the host CPU (KVM with EPT/NPT: the processor walks)"
