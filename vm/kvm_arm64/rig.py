"""The arm64 KVM rig (built by vm/kvm_arm64/build.sh; see vm/kvm_arm64/README.md).

L1 = Debian's arm64 cloud kernel (vm/arm64's) under ``qemu-system-aarch64 -M
virt,virtualization=on -cpu max`` (TCG): it boots at EL2 and its built-in KVM runs in VHE mode.
Its /init starts a tiny static VMM (vm/kvm_arm64/vmm.c) that runs L2 (payload.S: stores marker
values, rings an MMIO doorbell, then spins at EL1) under L1's KVM, so L2's memory goes through a
real stage-2 table (VTTBR_EL2/VTCR_EL2) built by L1's KVM::

    from vm.kvm_arm64.rig import KvmArm64Rig
    with KvmArm64Rig() as rig:             # boots L1, waits for the VMM's KVMARM-READY line
        rig.qmp_path, rig.gdb_address, rig.pid   # L1's QEMU at L0 (gdb_address: "unix:PATH")
        rig.vmm_pid                              # the VMM's pid inside L1
        rig.ready          # {"pid", "ipa_bits", "slots": [{name, ipa, size, hva, backing}],
                           #  "markers": {ipa: value}, "untouched": [ipa], "counter", ...}
        rig.slot_hva(ipa)                         # the VMM's HVA of an L2 IPA
        rig.pagemap(rig.vmm_pid, hva)             # L1's own /proc/PID/pagemap entry
        rig.l1_pa_of_ipa(ipa)                     # ... as an L1 physical address (or None)
        rig.run("cat /run/vmm.log")               # L1's console shell (prompt 'qi# ')
        rig.contexts(stops=6)                     # where L1's vCPUs stop + VTTBR/VTCR/HCR
        rig.stage2_walks()                        # the hand stage-2 walk of every marker
        rig.hmp("info registers"), rig.qmp("query-status")

CLI: ``python -m vm.kvm_arm64.rig [--smp N] [--ipa-bits N] [--interact]`` boots, prints the
facts as JSON and keeps the rig up until killed (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from typing import Iterable, Optional

from vm.foreign_guest import ForeignGuest
from vm.guest import GuestError, GuestNotBuilt, default_cache_dir
from vm.kvm_arm64.probe_stage2 import ipa_to_hva, parse_ready

HERE = os.path.dirname(os.path.abspath(__file__))
_READY_RE = re.compile(r"KVMARM-READY [^\r\n]*")


class KvmArm64RigNotBuilt(GuestNotBuilt):
    pass


class KvmArm64Rig(ForeignGuest):
    ARCH = "arm64"                 # the kernel: vm/arm64's
    QEMU = "qemu-system-aarch64"
    QEMU_ENV = "QI_QEMU_AARCH64"
    CONSOLE = "ttyAMA0"
    CPU = "max"

    def __init__(self, smp: int = 1, memory: str = "512M", ipa_bits: int = 0,
                 slot1: bool = True, start_vmm: bool = True, append: str = "",
                 cache_dir: Optional[str] = None, timeout: float = 240, **kwargs):
        """ipa_bits: the L2 VM's IPA size (0: KVM's default, 40; 48 = the L1 limit under
        -cpu max); slot1=False: one memslot only; start_vmm=False: /init does not start the
        VMM (run /start-vmm.sh on the console, then wait_ready())."""
        base = default_cache_dir()
        self.rig_cache = os.path.abspath(cache_dir) if cache_dir else os.path.join(base, "kvm-arm64")
        self.kernel_cache = os.path.join(os.path.dirname(self.rig_cache), "arm64")
        extra = []
        if ipa_bits:
            extra.append(f"qi_ipa_bits={int(ipa_bits)}")
        if not slot1:
            extra.append("qi_slot1=0")
        if not start_vmm:
            extra.append("qi_vmm=0")
        if append:
            extra.append(append)
        kwargs.setdefault("gdb_unix", True)
        super().__init__(memory=memory, smp=smp, machine="virt,virtualization=on",
                         cache_dir=self.rig_cache, kernel=self.kernel_cache,
                         append_extra=" ".join(extra), **kwargs)
        self.start_vmm = start_vmm
        self.timeout = timeout
        self.ready: Optional[dict] = None
        self.l1_booted: Optional[str] = None
        self.timings: dict = {}

    # ------------------------------------------------------------------ build
    @classmethod
    def build_script(cls) -> str:
        return os.path.join(HERE, "build.sh")

    def check_built(self, cache_dir=None) -> None:  # type: ignore[override]
        missing = [os.path.join(self.rig_cache, f) for f in ("initramfs.cpio.gz", "vmm", "payload.bin")
                   if not os.path.isfile(os.path.join(self.rig_cache, f))]
        missing += [os.path.join(self.kernel_cache, f) for f in ("vmlinuz", "kernel-release")
                    if not os.path.isfile(os.path.join(self.kernel_cache, f))]
        if missing:
            raise KvmArm64RigNotBuilt(f"the arm64 KVM rig is not built: {', '.join(missing)} "
                                      f"missing. Run `bash {self.build_script()}` first.")

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout=None) -> "KvmArm64Rig":
        timeout = timeout or self.timeout
        t0 = time.monotonic()
        super().start(timeout=timeout)          # to L1's shell prompt (after the READY line)
        self.timings["prompt"] = self.boot_seconds
        text = self.transcript
        m = re.search(r"KVMARM L1-BOOTED [^\r\n]*", text)
        self.l1_booted = m.group(0) if m else None
        for key, pat in (("l1_uptime_booted", r"KVMARM L1-BOOTED uptime=([\d.]+)"),
                         ("l1_uptime_ready", r"KVMARM L1-READY uptime=([\d.]+)")):
            u = re.search(pat, text)
            if u:
                self.timings[key] = float(u.group(1))
        if self.start_vmm:
            try:
                self._parse_ready(text)
            except BaseException:
                self.stop()
                raise
        self.timings["ready"] = self.timings["prompt"]
        self.timings["total"] = time.monotonic() - t0
        return self

    def _parse_ready(self, text: str) -> dict:
        m = _READY_RE.search(text)
        if not m:
            err = re.findall(r"KVMARM-(?:ERROR|EXIT)[^\r\n]*", text)
            raise GuestError(f"the VMM in L1 did not print KVMARM-READY ({err}):\n"
                             f"{self._transcript.tail()}")
        self.ready = parse_ready(m.group(0))
        if self.ready.get("bad"):
            raise GuestError(f"the VMM saw {self.ready['bad']} marker(s) missing: {m.group(0)}")
        return self.ready

    def wait_ready(self, timeout=120) -> dict:
        """After /start-vmm.sh by hand (start_vmm=False): wait for /run/vmm.log's READY."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("grep -E '^KVMARM-(READY|ERROR|EXIT)' /run/vmm.log 2>/dev/null")
            if "KVMARM-" in out:
                return self._parse_ready(out)
            time.sleep(1)
        raise GuestError("the VMM did not print KVMARM-READY in /run/vmm.log")

    # ------------------------------------------------------------------ facts
    @property
    def vmm_pid(self) -> Optional[int]:
        return self.ready["pid"] if self.ready else None

    @property
    def gdb_path(self) -> Optional[str]:
        return self.gdb_address[5:] if self.gdb_address and self.gdb_address.startswith("unix:") else None

    def slot_hva(self, ipa: int) -> int:
        return ipa_to_hva(self.ready, ipa)

    def l1_pa_of_ipa(self, ipa: int) -> Optional[int]:
        """L1's own view (its /proc/VMM_PID/pagemap of the slot's HVA): the L1 physical
        address behind L2's IPA, or None if the page is not present in L1."""
        e = self.pagemap(self.vmm_pid, self.slot_hva(ipa))
        if not e >> 63 & 1:
            return None
        return (e & ((1 << 55) - 1)) << 12 | (ipa & 0xFFF)

    def contexts(self, stops: int = 6, pause: float = 0.5) -> list:
        """Stop L1 `stops` times through the outer gdbstub; per stop and vCPU: pc, cpsr, EL,
        context (L2 at EL1 / L1 at EL2), VTTBR_EL2, VTCR_EL2, HCR_EL2 (probe_stage2.sample)."""
        from vm.kvm_arm64.probe_stage2 import sample
        return sample(self.gdb_address, stops, pause)

    def stage2_walks(self) -> dict:
        """The hand walk of L2's stage-2 table from a stop in L2's context (VTTBR_EL2 and
        VTCR_EL2 of that vCPU) for every marker, untouched, counter and entry IPA
        (probe_stage2.walk_markers): {"vtcr", "vttbr", "hcr", "stop", "walks": {ipa: {"pa",
        "level", "size", "attrs", "steps", "read", "match"} or {"fault", "steps"}}}."""
        from vm.kvm_arm64.probe_stage2 import walk_markers
        return walk_markers(self.gdb_address, self.ready)

    def facts(self) -> dict:
        return {"l1_qemu_pid": self.pid, "qmp": self.qmp_path, "gdb": self.gdb_address,
                "gdb_path": self.gdb_path, "vmm_pid": self.vmm_pid, "l1": self.l1_booted,
                "ready": self.ready, "timings": self.timings, "argv": self.argv}


def main(argv: Optional[Iterable[str]] = None) -> int:
    import argparse
    from vm.guest import hold
    ap = argparse.ArgumentParser(prog="python -m vm.kvm_arm64.rig",
                                 description="Boot the arm64 KVM rig (L1 with KVM, L2 under it), "
                                             "print its facts as JSON and keep it up.")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--ipa-bits", type=int, default=0)
    ap.add_argument("--no-slot1", action="store_true")
    ap.add_argument("--console-log", default=None)
    ap.add_argument("--interact", action="store_true", help="this terminal as L1's console")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        with KvmArm64Rig(smp=args.smp, memory=args.memory, ipa_bits=args.ipa_bits,
                         slot1=not args.no_slot1, console_log=args.console_log) as rig:
            facts = rig.facts()
            if facts["ready"]:
                facts["ready"] = dict(facts["ready"],
                                      markers={hex(k): hex(v) for k, v in rig.ready["markers"].items()})
            print(json.dumps(facts, indent=1, default=str))
            hold(rig, args.interact, "L1's console (prompt 'qi# ')")
    except KeyboardInterrupt:
        print("\nstopping")
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
