"""Walk L2's stage-2 table by hand, from L0, through L1's QEMU gdbstub (vm/kvm_arm64).

L1 (aarch64 Linux at EL2, VHE KVM) runs the rig's VMM; L2's memory goes through the stage-2
table L1's KVM built. From the outer QEMU's gdbstub this script

  * stops L1 several times (connect = stop, `D` = resume) and records, for each vCPU, PC, CPSR
    (CurrentEL, SP select), VTTBR_EL2, VTCR_EL2 and HCR_EL2 (register numbers from QEMU's
    `system-registers.xml`), i.e. in which context (L1 at EL2/EL0, or L2 at EL1) it stopped;
  * decodes VTCR_EL2 (T0SZ, SL0, TG0, PS, ...) and VTTBR_EL2 (BADDR, VMID, CnP);
  * walks the VMSAv8-64 stage-2 table (4 KiB, 16 KiB or 64 KiB granule; start level from SL0
    and T0SZ, concatenated root tables) for each marker IPA, reading L1's physical memory in
    the gdbstub's physical mode (`Qqemu.PhyMemMode:1`), and checks the 8 bytes at the resulting
    L1 physical address against the marker value;
  * with --pagemap (or when it boots the rig itself) checks the L1 page against L1's own
    /proc/VMM_PID/pagemap entry of the slot's HVA (read on L1's console).

    python -m vm.kvm_arm64.probe_stage2                    # boots the rig, does everything
    python -m vm.kvm_arm64.probe_stage2 --gdb PATH --ready 'KVMARM-READY ...'   # a running rig

A raw RSP client (no gdb): a few ms a stop instead of ~1 s for gdb-multiarch.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import struct
import sys
import time
from typing import Dict, List, Optional

# ---------------------------------------------------------------------------------- RSP


class Rsp:
    """Minimal GDB remote protocol client for QEMU's gdbstub (Unix socket path or host:port).
    Connecting stops the VM; detach() resumes it."""

    def __init__(self, address: str, timeout: float = 30.0):
        if address.startswith("unix:"):
            address = address[5:]
        if ":" in address and not address.startswith("/"):
            host, port = address.rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.buf = b""
        self.regnums: Dict[str, int] = {}
        self.regbits: Dict[str, int] = {}
        self._phys: Optional[bool] = None
        self._read_features()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def packet(self, data: str) -> str:
        raw = data.encode()
        self.sock.sendall(b"$" + raw + b"#%02x" % (sum(raw) & 0xFF))
        while True:
            m = re.search(rb"\$([^#]*)#[0-9a-fA-F]{2}", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                self.sock.sendall(b"+")
                reply = m.group(1).decode("latin-1")
                # QEMU's stop notification for the connect-time stop may come before (or
                # instead of the answer to) the first request: skip stop replies
                if data != "?" and re.fullmatch(r"[TS][0-9a-fA-F]{2}.*", reply):
                    continue
                return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("gdbstub closed the connection")
            self.buf += chunk

    def _xfer(self, name: str) -> str:
        out, off = "", 0
        while True:
            r = self.packet(f"qXfer:features:read:{name}:{off:x},ffb")
            if not r or r[0] not in "lm":
                raise RuntimeError(f"qXfer {name}: {r!r}")
            out += r[1:]
            off += len(r) - 1
            if r[0] == "l":
                return out

    def _read_features(self) -> None:
        """Register numbers: aarch64-core.xml has none (x0-x30, sp, pc, cpsr = 0..33, in
        order); QEMU's system-registers.xml names each with regnum=."""
        target = self._xfer("target.xml")
        n = 0
        for href in re.findall(r'href="([^"]+)"', target):
            xml = self._xfer(href)
            for m in re.finditer(r"<reg ([^>]*)>", xml):
                attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                if "regnum" in attrs:
                    n = int(attrs["regnum"])
                self.regnums[attrs["name"]] = n
                self.regbits[attrs["name"]] = int(attrs.get("bitsize", 64))
                n += 1

    def threads(self) -> List[str]:
        out: List[str] = []
        r = self.packet("qfThreadInfo")
        while r.startswith("m"):
            out += r[1:].split(",")
            r = self.packet("qsThreadInfo")
        return out

    def select(self, tid: str) -> None:
        if self.packet(f"Hg{tid}") != "OK":
            raise RuntimeError(f"Hg{tid} refused")

    def reg(self, name: str) -> int:
        r = self.packet(f"p{self.regnums[name]:x}")
        if not r or r.startswith("E"):
            raise RuntimeError(f"register {name}: {r!r}")
        return int.from_bytes(bytes.fromhex(r), "little")

    def phys_mode(self, on: bool) -> None:
        if self._phys is not on:
            r = self.packet(f"Qqemu.PhyMemMode:{int(on)}")
            if r != "OK":
                raise RuntimeError(f"Qqemu.PhyMemMode: {r!r}")
            self._phys = on

    def read_phys(self, addr: int, size: int) -> bytes:
        self.phys_mode(True)
        out = b""
        while size:
            n = min(size, 2048)
            r = self.packet(f"m{addr:x},{n:x}")
            if not r or r.startswith("E"):
                raise RuntimeError(f"m{addr:x},{n:x}: {r!r}")
            out += bytes.fromhex(r)
            addr += n
            size -= n
        return out

    def u64(self, pa: int) -> int:
        return struct.unpack("<Q", self.read_phys(pa, 8))[0]

    def detach(self) -> None:
        """Resume the VM (D) and close. Leaves the stub in virtual mode for the next client."""
        try:
            if self._phys:
                self.phys_mode(False)
            self.packet("D")
        finally:
            self.close()


# ---------------------------------------------------------------------------------- decoding

HCR_BITS = {0: "VM", 1: "SWIO", 2: "PTW", 3: "FMO", 4: "IMO", 5: "AMO", 6: "VF", 7: "VI",
            8: "VSE", 9: "FB", 10: "BSU0", 11: "BSU1", 12: "DC", 13: "TWI", 14: "TWE",
            15: "TID0", 16: "TID1", 17: "TID2", 18: "TID3", 19: "TSC", 20: "TIDCP",
            21: "TACR", 22: "TSW", 23: "TPCP", 24: "TPU", 25: "TTLB", 26: "TVM", 27: "TGE",
            28: "TDZ", 29: "HCD", 30: "TRVM", 31: "RW", 32: "CD", 33: "ID", 34: "E2H",
            35: "TLOR", 36: "TERR", 37: "TEA", 38: "MIOCNCE", 39: "TME", 40: "APK", 41: "API",
            42: "NV", 43: "NV1", 44: "AT", 45: "NV2", 46: "FWB", 47: "FIEN", 48: "GPF",
            49: "TID4", 50: "TICAB", 51: "AMVOFFEN", 52: "TOCU", 53: "EnSCXT", 54: "TTLBIS",
            55: "TTLBOS", 56: "ATA", 57: "DCT", 58: "TID5", 59: "TWEDEn"}
PS_BITS = {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52}
GRANULE = {0: 12, 1: 16, 2: 14}   # VTCR_EL2.TG0: 4 KiB, 64 KiB, 16 KiB (page shift)


def decode_hcr(v: int) -> List[str]:
    return [HCR_BITS.get(b, str(b)) for b in range(64) if v >> b & 1]


def decode_vtcr(v: int) -> dict:
    t0sz = v & 0x3F
    sl0 = v >> 6 & 3
    tg0 = v >> 14 & 3
    shift = GRANULE[tg0]
    # starting level (Arm ARM, VTCR_EL2.SL0; SL2 = bit 33 with 4 KiB and LPA2 -> level -1)
    if shift == 12:
        start = {0: 2, 1: 1, 2: 0, 3: 3}[sl0]
    else:
        start = {0: 3, 1: 2, 2: 1, 3: 0}[sl0]
    return {"T0SZ": t0sz, "ipa_bits": 64 - t0sz, "SL0": sl0, "start_level": start,
            "IRGN0": v >> 8 & 3, "ORGN0": v >> 10 & 3, "SH0": v >> 12 & 3,
            "TG0": tg0, "granule": 1 << shift, "PS": v >> 16 & 7,
            "pa_bits": PS_BITS.get(v >> 16 & 7), "VS": v >> 19 & 1, "HA": v >> 21 & 1,
            "HD": v >> 22 & 1}


def decode_vttbr(v: int) -> dict:
    return {"BADDR": v & 0x0000FFFFFFFFFFFE, "VMID": v >> 48, "CnP": v & 1}


def cpsr_context(cpsr: int) -> dict:
    el = cpsr >> 2 & 3
    return {"EL": el, "SP": "h" if cpsr & 1 else "t", "nRW": cpsr >> 4 & 1,
            "DAIF": cpsr >> 6 & 0xF}


# ---------------------------------------------------------------------------------- walk

def walk_stage2(u64, vttbr: int, vtcr: int, ipa: int) -> dict:
    """The VMSAv8-64 stage-2 walk of `ipa` (no LPA2/52-bit OA). u64(pa) reads 8 bytes of L1
    physical memory. Returns {"steps": [{level, index, table, entry_pa, desc}], "pa",
    "level", "size", "attrs"} or with "fault" instead of "pa"."""
    c = decode_vtcr(vtcr)
    shift = {4096: 12, 16384: 14, 65536: 16}[c["granule"]]
    stride = shift - 3
    ipa_bits = c["ipa_bits"]
    oa_mask = ((1 << 48) - 1) & ~((1 << shift) - 1)
    level = c["start_level"]
    if ipa >> ipa_bits:
        return {"fault": f"IPA {ipa:#x} beyond the {ipa_bits}-bit IPA space", "steps": []}
    lsb = shift + stride * (3 - level)               # lowest IPA bit the start level resolves
    top_bits = ipa_bits - lsb                          # bits the (concatenated) root resolves
    concat = max(1, 1 << max(0, top_bits - stride))
    root_size = 8 << top_bits
    table = decode_vttbr(vttbr)["BADDR"] & ~(root_size - 1) & ((1 << 48) - 1)
    steps = []
    out = {"start_level": level, "concatenated_roots": concat, "root": table,
           "root_bytes": root_size, "steps": steps}
    while True:
        lsb = shift + stride * (3 - level)
        nbits = top_bits if not steps else stride
        index = ipa >> lsb & ((1 << nbits) - 1)
        entry_pa = table + 8 * index
        desc = u64(entry_pa)
        steps.append({"level": level, "index": index, "table": table, "entry_pa": entry_pa,
                      "desc": desc})
        if not desc & 1:
            out["fault"] = f"translation fault at level {level} (descriptor {desc:#x})"
            return out
        if level == 3 or not desc & 2:               # page (level 3) or block
            if level == 3 and not desc & 2:
                out["fault"] = f"reserved descriptor at level 3 ({desc:#x})"
                return out
            size = 1 << lsb
            base = desc & oa_mask & ~(size - 1)
            out.update(pa=base | (ipa & (size - 1)), level=level, size=size,
                       attrs={"MemAttr": desc >> 2 & 0xF, "S2AP": desc >> 6 & 3,
                              "SH": desc >> 8 & 3, "AF": desc >> 10 & 1,
                              "DBM": desc >> 51 & 1, "XN": desc >> 53 & 3,
                              "sw": desc >> 55 & 0xF})
            return out
        table = desc & oa_mask
        level += 1


# ---------------------------------------------------------------------------------- READY

def parse_ready(line: str) -> dict:
    """The VMM's KVMARM-READY line -> {"pid", "ipa_bits", "slots": [{name, ipa, size, hva,
    backing}], "markers": {ipa: value}, "untouched": [...], "counter", "mmio", "vcpus",
    "s1root", "s1": [{va, ipa, kind}], "counter1", ...}"""
    m = re.search(r"KVMARM-READY (.*)", line)
    if not m:
        raise ValueError(f"not a KVMARM-READY line: {line!r}")
    kv = dict(re.findall(r"(\w+)=(\S+)", m.group(1)))
    out = {"pid": int(kv["pid"]), "ipa_bits": int(kv["ipa_bits"]), "slots": [],
           "markers": {}, "untouched": [int(x, 16) for x in kv.get("untouched", "").split(",") if x],
           "line": "KVMARM-READY " + m.group(1).strip()}
    for k in ("entry", "table", "mmio", "counter"):
        out[k] = int(kv[k], 16)
    for name in ("slot0", "slot1"):
        if name in kv:
            s = re.fullmatch(r"(0x[0-9a-f]+)\+(0x[0-9a-f]+)@(0x[0-9a-f]+):(\w+)", kv[name])
            out["slots"].append({"name": name, "ipa": int(s.group(1), 16),
                                 "size": int(s.group(2), 16), "hva": int(s.group(3), 16),
                                 "backing": s.group(4)})
    for item in kv["markers"].split(","):
        ipa, value = item.split(":")
        out["markers"][int(ipa, 16)] = int(value, 16)
    # vCPU 1's stage 1 (MMU on): its root, and what it maps: [{va, ipa, kind}]
    out["vcpus"] = int(kv.get("vcpus", "1"))
    if "s1root" in kv:
        out["s1root"] = int(kv["s1root"], 16)
        out["counter1"] = int(kv["counter1"], 16)
        out["s1"] = [{"va": int(va, 16), "ipa": int(ipa, 16), "kind": kind}
                     for va, ipa, kind in (item.split(":") for item in kv["s1"].split(","))]
    if "bad" in kv:
        out["bad"] = int(kv["bad"])
    return out


def ipa_to_hva(ready: dict, ipa: int) -> int:
    for s in ready["slots"]:
        if s["ipa"] <= ipa < s["ipa"] + s["size"]:
            return s["hva"] + ipa - s["ipa"]
    raise KeyError(f"IPA {ipa:#x} is in no slot")


# ---------------------------------------------------------------------------------- sampling

REGS = ("VTTBR_EL2", "VTCR_EL2", "HCR_EL2")


def sample(address: str, stops: int = 6, pause: float = 0.7) -> List[dict]:
    """Stop L1 `stops` times; for each stop and vCPU: pc, cpsr, context, VTTBR/VTCR/HCR."""
    out = []
    for i in range(stops):
        r = Rsp(address)
        try:
            for tid in r.threads():
                r.select(tid)
                cpsr = r.reg("cpsr")
                ctx = cpsr_context(cpsr)
                row = {"stop": i, "thread": tid, "pc": r.reg("pc"), "cpsr": cpsr,
                       "EL": ctx["EL"], "SP": ctx["SP"]}
                for name in REGS:
                    row[name] = r.reg(name)
                # which world: EL1 = L2's kernel context (L1 runs VHE: its kernel is at EL2,
                # its user space at EL0 with HCR.TGE=1); EL2 with HCR.VM=1 and TGE=0 = KVM's
                # world switch with the guest's configuration loaded
                hcr = row["HCR_EL2"]
                if ctx["EL"] == 1:
                    row["context"] = "L2 (guest EL1)"
                elif ctx["EL"] == 0:
                    row["context"] = "L1 user (EL0)" if hcr >> 27 & 1 else "L2 user (EL0)"
                else:
                    row["context"] = ("L1 kernel (EL2), guest HCR loaded" if hcr & 1 and
                                      not hcr >> 27 & 1 else "L1 kernel (EL2), host HCR")
                out.append(row)
        finally:
            r.detach()
        time.sleep(pause)
    return out


def walk_markers(address: str, ready: dict, want_l2_stop: int = 20) -> dict:
    """Stop L1 until one vCPU is in L2's context (at most want_l2_stop tries; else take the
    last stop's VTTBR), then walk every marker, untouched and counter IPA."""
    tries = 0
    while True:
        tries += 1
        r = Rsp(address)
        chosen = None
        for tid in r.threads():
            r.select(tid)
            cpsr = r.reg("cpsr")
            regs = {n: r.reg(n) for n in REGS}
            if cpsr >> 2 & 3 == 1 or chosen is None:
                chosen = dict(regs, thread=tid, cpsr=cpsr, pc=r.reg("pc"))
        if chosen["cpsr"] >> 2 & 3 == 1 or tries >= want_l2_stop:
            break
        r.detach()
        time.sleep(0.3)
    try:
        vttbr, vtcr = chosen["VTTBR_EL2"], chosen["VTCR_EL2"]
        res = {"tries": tries, "stop": {k: (hex(v) if isinstance(v, int) else v)
                                        for k, v in chosen.items()},
               "vtcr": decode_vtcr(vtcr), "vttbr": decode_vttbr(vttbr),
               "hcr": decode_hcr(chosen["HCR_EL2"]), "walks": {}}
        targets = [(ipa, v) for ipa, v in ready["markers"].items()]
        targets += [(ipa, None) for ipa in ready["untouched"]]
        targets += [(ready["counter"], None), (ready["entry"], None)]
        for ipa, value in targets:
            w = walk_stage2(r.u64, vttbr, vtcr, ipa)
            if "pa" in w:
                w["read"] = r.u64(w["pa"] & ~7)
                if value is not None:
                    w["match"] = w["read"] == value
            w["expected"] = value
            res["walks"][ipa] = w
        return res
    finally:
        r.detach()


# ---------------------------------------------------------------------------------- report

def fmt_walk(ipa: int, w: dict) -> str:
    chain = " -> ".join(f"L{s['level']}[{s['index']}]@{s['entry_pa']:#x}={s['desc']:#x}"
                        for s in w["steps"])
    if "pa" not in w:
        return f"  IPA {ipa:#x}: {w.get('fault')}   {chain}"
    ok = {True: "MATCH", False: "MISMATCH", None: ""}[w.get("match")]
    return (f"  IPA {ipa:#x} -> L1 PA {w['pa']:#x} ({w['size'] >> 10} KiB leaf at L{w['level']}, "
            f"S2AP={w['attrs']['S2AP']} AF={w['attrs']['AF']} MemAttr={w['attrs']['MemAttr']:#x} "
            f"XN={w['attrs']['XN']}) reads {w['read']:#x} {ok}\n      {chain}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vm.kvm_arm64.probe_stage2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gdb", help="L1's gdbstub (unix socket path or host:port); "
                                  "default: boot the rig")
    ap.add_argument("--ready", help="the VMM's KVMARM-READY line (with --gdb)")
    ap.add_argument("--stops", type=int, default=8, help="context samples (default 8)")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--ipa-bits", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rig = None
    if args.gdb:
        if not args.ready:
            ap.error("--gdb needs --ready")
        gdb, ready = args.gdb, parse_ready(args.ready)
    else:
        from vm.kvm_arm64.rig import KvmArm64Rig
        rig = KvmArm64Rig(smp=args.smp, ipa_bits=args.ipa_bits).start()
        gdb, ready = rig.gdb_address, rig.ready
        print(f"rig up in {rig.timings['ready']:.1f} s: {ready['line']}")
    try:
        result = {"ready": ready, "samples": sample(gdb, args.stops)}
        result["walk"] = walk_markers(gdb, ready)
        if rig is not None:
            pm = {}
            for ipa in list(ready["markers"]) + ready["untouched"]:
                hva = ipa_to_hva(ready, ipa)
                pm[ipa] = rig.pagemap(ready["pid"], hva)
            result["pagemap"] = pm
        if args.json:
            print(json.dumps(result, default=lambda o: hex(o) if isinstance(o, int) else str(o),
                             indent=1))
            return 0
        print("context samples (outer gdbstub):")
        for s in result["samples"]:
            print(f"  stop {s['stop']} thread {s['thread']}: pc={s['pc']:#x} cpsr={s['cpsr']:#x} "
                  f"EL{s['EL']}{s['SP']} {s['context']}: VTTBR={s['VTTBR_EL2']:#x} "
                  f"VTCR={s['VTCR_EL2']:#x} HCR={s['HCR_EL2']:#x}")
        w = result["walk"]
        print(f"walk from stop (after {w['tries']} tries): {w['stop']}")
        print(f"  VTCR_EL2 {w['vtcr']}")
        print(f"  VTTBR_EL2 BADDR={w['vttbr']['BADDR']:#x} VMID={w['vttbr']['VMID']} "
              f"CnP={w['vttbr']['CnP']}")
        print(f"  HCR_EL2 {' '.join(w['hcr'])}")
        ok = True
        for ipa, wk in w["walks"].items():
            print(fmt_walk(ipa, wk))
            if wk.get("expected") is not None and not wk.get("match"):
                ok = False
            if ipa in result.get("pagemap", {}):
                e = result["pagemap"][ipa]
                pfn = e & ((1 << 55) - 1)
                present = e >> 63 & 1
                same = "pa" in wk and present and pfn == wk["pa"] >> 12
                print(f"      L1 pagemap of HVA {ipa_to_hva(ready, ipa):#x}: {e:#018x} "
                      f"(present={present} pfn={pfn:#x}) "
                      f"{'== stage-2 leaf' if same else ('(no stage-2 mapping)' if 'pa' not in wk else '!= stage-2 leaf')}")
                if "pa" in wk and not same:
                    ok = False
        print("ALL MARKERS MATCH" if ok else "SOME MARKERS DO NOT MATCH")
        return 0 if ok else 1
    finally:
        if rig is not None:
            rig.stop()


if __name__ == "__main__":
    sys.exit(main())
