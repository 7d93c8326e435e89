"""cpus' text for the vCPUs that are not x86: a riscv64 hart's and an aarch64 vCPU's
registers, and an aarch64 vCPU's EL2 part (its regime and the stage 2 it runs a guest on)."""


def riscv_cpu_text(v) -> str:
    d = v.to_dict()
    extensions = ", ".join(f"{e} {'on' if d[e] else 'off'}" for e in ("svnapot", "svpbmt")
                           if d[e] is not None) or "extensions unknown"
    return "\n".join([
        f"vCPU {v.index}  host thread {v.thread_id}  {d['privilege']}-mode  {v.mode}  "
        f"ASID {v.pcid:#x}  ({extensions})",
        f"  satp    {v.satp:#018x}   root {v.root:#x}",
        f"  mstatus {v.mstatus:#018x}  {' '.join(d['mstatus_bits'])}",
        f"  menvcfg {'-' if v.menvcfg is None else f'{v.menvcfg:#018x}'}"])


def arm64_cpu_text(v) -> str:
    d = v.to_dict()
    pan = ", PAN" if d["pan"] else ""
    return "\n".join([
        f"vCPU {v.index}  host thread {v.thread_id}  EL{v.cpl}{pan}  {v.mode}  "
        f"ASID {v.pcid:#x}",
        f"  TTBR0_EL1 {v.ttbr0:#018x}   TTBR1_EL1 {v.ttbr1:#018x}",
        f"  TCR_EL1   {v.tcr:#018x}   MAIR_EL1  {v.mair:#018x}",
        f"  SCTLR_EL1 {v.sctlr:#018x}  {' '.join(d['sctlr_bits'])}"] + _el2_lines(v, d))


def _el2_lines(v, d) -> list:
    """An aarch64 vCPU's EL2 part: the regime in effect, HCR_EL2, and the stage 2 a guest of
    the hypervisor runs through (live only while the vCPU runs that guest)."""
    el2 = d["el2"]
    if el2 is None:
        return []
    s2 = el2["stage2"]
    what = {"EL2&0": "the VHE host's own (TTBR0/1_EL2, TCR_EL2 walked)",
            "EL2": "EL2's own, not walked"}.get(v.regime, "EL1&0")
    out = [f"  regime    {what}" + ("; a guest of the hypervisor runs: stage 2 live"
                                    if s2 else ""),
           f"  HCR_EL2   {v.hcr:#018x}  {' '.join(el2['hcr_bits'])}"]
    if s2:
        t = s2["vtcr"]
        out.append(f"  VTTBR_EL2 {v.vttbr:#018x}   root {s2['root']}, VMID {s2['vmid']}")
        out.append(f"  VTCR_EL2  {v.vtcr:#018x}  {t['ia_bits']}-bit IPA, {t['granule']} "
                   f"granule, start level {t['start_level']}, {t['root_tables']} root "
                   f"table(s), {t['oa_bits']}-bit PA")
    elif v.vttbr:
        out.append(f"  VTTBR_EL2 {v.vttbr:#018x}   (the last one loaded: no guest runs on "
                   f"this vCPU now, it may be stale)")
    return out
