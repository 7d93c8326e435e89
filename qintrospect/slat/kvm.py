"""KVM's own facts about a local VM: the accelerator (QMP query-kvm), the VM's debugfs folder
(/sys/kernel/debug/kvm/PID-FD: QEMU's pid and the VM's file descriptor), its statistics
(pages_4k/2m/1g, nx_lpage_splits, pf_fixed, pf_taken, tlb_flush, ...), each vCPU's files
(guest_mode, pid, ...), the host's two-dimensional paging (EPT/NPT), and QMP query-stats where
QEMU has it (7.1 and later). Read-only: debugfs files are only read."""

from __future__ import annotations

import os
from typing import Optional

from ..errors import QIError
from ..machine import hostcpu

DEBUGFS = "/sys/kernel/debug"
MAX_FILE = 1 << 16


def _read(path: str):
    with open(path, "rb") as f:
        text = f.read(MAX_FILE).decode(errors="replace").strip()
    try:
        return int(text, 0)
    except ValueError:
        return text


def _files(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                out[name] = _read(path)
            except OSError as exc:
                out[name] = f"unreadable: {exc.strerror or exc}"
    return out


def debugfs_dir(pid: int, root: str = DEBUGFS) -> tuple:
    """(the VM's folder or None, a sentence when it cannot be found)."""
    kvm = os.path.join(root, "kvm")
    if not os.path.isdir(kvm):
        mounted = os.path.ismount(root)
        if not mounted:
            return None, (f"debugfs is not mounted at {root}: `mount -t debugfs none {root}` "
                          "(as root) shows KVM's statistics")
        if not os.access(root, os.R_OK | os.X_OK):
            return None, f"{root} cannot be read by this user: KVM's statistics need root"
        return None, f"{kvm} does not exist: KVM is not loaded on this host"
    try:
        names = [n for n in os.listdir(kvm) if n.split("-", 1)[0] == str(pid)]
    except PermissionError:
        return None, f"{kvm} cannot be read by this user: KVM's statistics need root"
    if not names:
        return None, (f"no folder {pid}-FD in {kvm}: QEMU process {pid} has no KVM VM (is it "
                      "running under TCG?)")
    return os.path.join(kvm, sorted(names)[0]), ""


def debugfs_vcpus(pid: int, root: str = DEBUGFS) -> dict:
    """{vCPU index: its debugfs files (guest_mode, pid, ...)} of QEMU process pid's VM; {}
    where debugfs cannot be read."""
    folder, _ = debugfs_dir(pid, root)
    out = {}
    try:
        for name in os.listdir(folder) if folder else ():
            path = os.path.join(folder, name)
            if name.startswith("vcpu") and name[4:].isdigit() and os.path.isdir(path):
                out[int(name[4:])] = _files(path)
    except OSError:
        return {}
    return out


def facts(qmp, pid: Optional[int], root: str = DEBUGFS, roots: bool = False) -> dict:
    """Everything KVM says about the VM of QEMU process `pid` (local), as one JSON-ready dict;
    with roots, each vCPU's second-level root read from KVM's own structures (kvm_vcpu)."""
    out = {"accelerator": None, "kvm": None, "tdp": hostcpu.tdp(), "qemu_pid": pid,
           "debugfs": None, "stats": None, "vcpus": [], "query_stats": None, "notes": []}
    if roots:
        out["roots"] = None
    try:
        q = qmp.command("query-kvm")
        out["kvm"] = q
        out["accelerator"] = "kvm" if q.get("enabled") else "tcg (or another, not KVM)"
    except QIError as exc:
        out["notes"].append(f"query-kvm failed: {exc}")
    if out["kvm"] and out["kvm"].get("enabled"):
        try:
            out["query_stats"] = qmp.command("query-stats", target="vm")
        except QIError as exc:
            out["notes"].append(f"QMP query-stats is not available here ({exc}); QEMU has it "
                                "from 7.1")
    if pid is None:
        out["notes"].append("the QEMU process is not local: KVM's debugfs cannot be read")
        return out
    folder, why = debugfs_dir(pid, root)
    if folder is None:
        if out["kvm"] and out["kvm"].get("enabled"):
            out["notes"].append(why)
        return out
    out["debugfs"] = folder
    try:
        out["stats"] = _files(folder)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith("vcpu") and os.path.isdir(path):
                out["vcpus"].append(dict(index=int(name[4:]) if name[4:].isdigit() else name,
                                         **_files(path)))
    except PermissionError:
        out["notes"].append(f"{folder} cannot be read by this user: KVM's statistics need root")
    if roots:
        from . import kvm_vcpu
        try:
            debug = {v["index"]: v for v in out["vcpus"] if isinstance(v["index"], int)}
            out["roots"] = kvm_vcpu.read_vm(pid, debugfs_vcpus=debug).to_dict()
        except kvm_vcpu.Unavailable as exc:
            out["notes"].append(f"the vCPUs' second-level roots cannot be read: {exc}")
    return out


def text(f: dict) -> str:
    """The facts as a short report."""
    lines = [f"accelerator: {f['accelerator'] or 'unknown'}"]
    t = f["tdp"]
    if t["kind"]:
        lines.append(f"host second-level paging: {t['kind'].upper()} "
                     f"{'on' if t['enabled'] else 'off'} ({t['parameter']})")
    if f["debugfs"]:
        lines.append(f"KVM debugfs: {f['debugfs']}")
        s = f["stats"] or {}
        keys = [k for k in ("pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits",
                            "pf_fixed", "pf_taken", "pf_spurious", "tlb_flush", "exits",
                            "mmu_shadow_zapped", "remote_tlb_flush") if k in s]
        if keys:
            lines.append("  " + "  ".join(f"{k} {s[k]}" for k in keys))
        for v in f["vcpus"]:
            extra = "  ".join(f"{k} {v[k]}" for k in ("guest_mode", "pid") if k in v)
            lines.append(f"  vCPU {v['index']}: {extra}")
    if f.get("roots"):
        r = f["roots"]
        kind = "EPT" if r["vendor"] == "intel" else "NPT"
        lines.append(f"KVM's own structures: struct kvm {r['struct_kvm']} (pid {r['pid']}), "
                     f"read in {r['seconds'] * 1000:.0f} ms")
        for v in r["vcpus"]:
            root = (f"{kind} root {v['root']}, {v['level']} levels" if v["root"]
                    else f"no {kind} root loaded")
            eptp = f", EPTP {v['eptp']}" if v.get("eptp") else ""
            smm = " (SMM)" if v.get("smm") else ""
            active = v["active_mmu"] + (f" (root {v['active_root']})"
                                        if v["active_mmu"] != "root_mmu" else "")
            lines.append(f"  vCPU {v['index']}: {root}{eptp}{smm}; runs with {active}; "
                         f"guest_mode {v['guest_mode']}")
    if f["query_stats"]:
        for provider in f["query_stats"]:
            stats = {s["name"]: s["value"] for s in provider.get("stats", [])}
            picked = {k: stats[k] for k in ("pages_4k", "pages_2m", "pages_1g") if k in stats}
            if picked:
                lines.append(f"QMP query-stats ({provider.get('provider')}): "
                             + "  ".join(f"{k} {v}" for k, v in picked.items()))
    lines += [f"note: {n}" for n in f["notes"]]
    return "\n".join(lines)
