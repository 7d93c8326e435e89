"""One address through nested VMs, with no agent at any level.

Hop 0 is the innermost VM: its own walk gives GVA -> GPA, its QMP gives the HVA in its QEMU
process. That QEMU is a process of the next VM out, so the HVA is a virtual address there: the
next hop finds that process's page-table root in its guest RAM (the finder, keyed by the 8 bytes
hop 0 read), walks the HVA to its GPA, and so on, until the outermost hop, whose QEMU is local
and whose pagemap gives the host physical address.

Order matters: an inner VM's monitors may be reachable only through the outer VM (serial lines),
so each hop is done before the next one out is attached, and each inner VM is held paused
(close(hold=True)) until all hops are done, then put back innermost last.
"""

import time
from typing import Dict, List, Optional

from . import finder
from ..errors import AttachError, QIError, UsageError
from ..record import field, record
from ..connect.session import Session
from .translate import Translation
from ..slat import SecondLevel, SlatSpec

PAGE = 4096


@record
class HopSpec:
    qmp: str
    gdb: Optional[str] = None
    pid: Optional[int] = None
    vcpu: int = 0


def parse_outer(text: str) -> HopSpec:
    """'qmp=PATH,gdb=HOST:PORT[,pid=N][,vcpu=N]' -> HopSpec."""
    fields: Dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("qmp", "gdb", "pid", "vcpu") or not value.strip():
            raise UsageError(f"--outer {text!r}: expected qmp=ADDR,gdb=ADDR[,pid=N][,vcpu=N]")
        fields[key.strip()] = value.strip()
    if "qmp" not in fields:
        raise UsageError(f"--outer {text!r}: qmp=ADDR is required")
    try:
        return HopSpec(fields["qmp"], fields.get("gdb"),
                       int(fields["pid"]) if "pid" in fields else None,
                       int(fields.get("vcpu", 0)))
    except ValueError:
        raise UsageError(f"--outer {text!r}: pid and vcpu must be numbers") from None


@record
class Hop:
    """One level's part of the chain for one address."""
    level: str                          # "L2", "L1", ...
    translation: Optional[Translation]  # this level's walk of the address (None: not reached)
    root_how: str = ""                  # how the page-table root was chosen
    note: str = ""                      # why the chain stops here, or a disagreement
    seconds: float = 0.0

    def to_dict(self, next_gpa: Optional[int]) -> dict:
        out = {"level": self.level, "root_how": self.root_how or None, "note": self.note or None,
               "seconds": round(self.seconds, 4)}
        if self.translation is not None:
            out = dict(self.translation.to_dict(), **out)
            if next_gpa is not None and out.get("hpa") is None:
                out["hpa"] = f"{next_gpa:#x}"   # a hop's hpa is the next hop's gpa
        return out


@record
class NestedTranslation:
    gva: int
    hops: List[Hop] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.hops) and all(h.translation is not None and h.translation.ok
                                       for h in self.hops) and not self.hops[-1].note

    def to_dict(self) -> dict:
        hops = []
        for i, hop in enumerate(self.hops):
            nxt = self.hops[i + 1].translation if i + 1 < len(self.hops) else None
            hops.append(hop.to_dict(nxt.gpa if nxt is not None and nxt.ok else None))
        out = dict(hops[0]) if hops else {"gva": f"{self.gva:#x}"}
        out.pop("level", None)
        out["hops"] = hops
        out["hpa"] = hops[-1].get("hpa") if hops else None
        stop = next((h for h in self.hops if h.note), None)
        if stop is not None and "fault" not in out:
            out["stopped"] = {"level": stop.level, "reason": stop.note}
        return out


def level_names(outer_count: int) -> List[str]:
    n = outer_count + 1
    return [f"L{n - k}" for k in range(n)]


def translate_nested(inner: HopSpec, outers: List[HopSpec], addresses: List[int],
                     slat_spec: Optional[SlatSpec] = None, progress=None,
                     **session_options) -> List[NestedTranslation]:
    """Follow each address from the innermost VM out to this host. The root found at a hop is
    reused for every address (one finder scan per hop, not per address). With slat_spec, each
    hop's GPA is also walked through the second-level table the next VM out keeps for it (found
    in that VM's RAM when auto; a given root belongs to the first hypervisor out)."""
    names = level_names(len(outers))
    results = [NestedTranslation(a) for a in addresses]
    held: List[Session] = []
    try:
        # hop 0: the innermost VM's own walk
        t0 = time.perf_counter()
        session = _open(inner, names[0], session_options)
        held.append(session)
        for r, t in zip(results, session.translate_many(addresses)):
            r.hops.append(Hop(names[0], t, root_how=f"vCPU {inner.vcpu}'s CR3"))
        session.close(hold=True)
        _stamp(results, 0, time.perf_counter() - t0)

        # each outer VM: the inner QEMU's HVA is a virtual address in one of its processes
        for k, spec in enumerate(outers, start=1):
            t0 = time.perf_counter()
            pending = [r for r in results if _next_address(r) is not None]
            for r in results:
                if _next_address(r) is None:
                    _stop(r, names[k - 1])
            if not pending:
                break
            session = _open(spec, names[k], session_options)
            held.append(session)
            spec_k = slat_spec if slat_spec is not None and (slat_spec.auto or k == 1) else None
            _walk_outer(session, pending, names[k], spec_k, _root_probe(held[-2], pending),
                        progress, held[-2].ram_map)
            session.close(hold=True)
            _stamp(pending, k, time.perf_counter() - t0)
    finally:
        # put the run states back, outermost first: the inner VMs' monitors may need it running
        for session in reversed(held):
            try:
                session.resume_held()
            except QIError as exc:
                session.warnings.append(str(exc))
    return results


def _open(spec: HopSpec, name: str, options) -> Session:
    try:
        return Session(spec.qmp, spec.gdb, pid=spec.pid, vcpu=spec.vcpu, **options).open()
    except AttachError as exc:
        raise type(exc)(f"{name}: {exc}") from None


def _next_address(r: NestedTranslation):
    """(the address the next hop out must walk, the 8 bytes expected there), or None."""
    t = r.hops[-1].translation
    if t is None or not t.ok or t.hva is None or t.value is None or len(t.value) != 8:
        return None
    if r.hops[-1].note:
        return None
    return t.hva, int.from_bytes(t.value, "little")


def _stop(r: NestedTranslation, level: str) -> None:
    hop = r.hops[-1]
    t = hop.translation
    if hop.note or t is None:
        return
    if not t.ok:
        hop.note = f"the address faulted at {level}"
    elif t.hva is None:
        hop.note = f"{level}'s QEMU gave no host address: {t.gpa_note}"
    elif t.value is None:
        hop.note = f"the 8 bytes at {level}'s GPA could not be read: {t.value_note}"


def _root_probe(inner: Session, pending: List[NestedTranslation]):
    """(GPA, HVA) of the page-table root the inner hop walked with: a page its vCPU surely
    touched, so the best key for finding the outer hypervisor's second-level table."""
    root = pending[0].hops[-1].translation.walk.root
    region = inner.ram_map.ram_at(root) if inner.ram_map else None
    hva = region.hva_of(root) if region is not None else None
    return (root, hva) if hva is not None else None


def _walk_outer(session: Session, pending: List[NestedTranslation], name: str,
                slat_spec: Optional[SlatSpec] = None, root_probe=None, progress=None,
                inner_ram=None) -> None:
    first_hva, first_value = _next_address(pending[0])
    roots = [c for c in session.find_cr3(first_hva, first_value) if c.value_matches]
    if not roots:
        for r in pending:
            r.hops.append(Hop(name, None, note=(
                f"no page-table root in {name}'s RAM maps {first_hva:#x} to the value "
                f"{first_value:#x}: the inner QEMU process was not found")))
        return
    root = roots[0].root
    how = f"find-cr3: the root whose {first_hva:#x} holds {first_value:#x} ({roots[0].how})"
    ts = list(session.translate_many([_next_address(r)[0] for r in pending], cr3=root))
    for r, t in zip(pending, ts):
        hva, value = _next_address(r)
        hop = Hop(name, t, root_how=how)
        if t.ok and t.value is not None and int.from_bytes(t.value, "little") != value:
            hop.note = (f"the 8 bytes at {name} VA {hva:#x} ({t.value.hex()}) are not the inner "
                        f"hop's ({value:#x}): another process maps that address")
        inner = r.hops[-1].translation
        if inner.hpa is not None and t.ok and inner.hpa != t.gpa:
            hop.note = (f"the inner QEMU's local pagemap gives {inner.hpa:#x}, the walk "
                        f"{t.gpa:#x}: they disagree")
        r.hops.append(hop)
    if slat_spec is not None:
        _second_level(session, pending, ts, name, slat_spec, root, root_probe, progress,
                      inner_ram)


def _second_level(session: Session, pending, ts, name: str, spec: SlatSpec, root: int,
                  root_probe, progress, inner_ram) -> None:
    """The outer hypervisor's table for each inner GPA, over the outer VM's RAM, beside what
    the process tables say (the outer GPA of the inner QEMU's HVA)."""
    probes = []
    if root_probe is not None:
        t = session.translate(root_probe[1], cr3=root)
        if t.ok:
            probes.append((root_probe[0], t.gpa))
    probes += [(r.hops[-2].translation.gpa, t.gpa) for r, t in zip(pending, ts) if t.ok]
    if progress is not None:
        progress.total = session.ram_map.ram_bytes
    vendor = session.vcpu_property("vendor")
    formats = ("ept", "npt") if vendor == "GenuineIntel" else ("npt", "ept")
    second = SecondLevel.resolve(session.memory, finder.ram_chunks(session.memory,
                                                                   session.ram_map),
                                 spec, probes, formats, progress,
                                 lambda: _spread_probes(session, root, inner_ram))
    if second.spec is not None:   # 1 GiB leaves as the outer (virtual) CPU offers them
        cap = session.vcpu_property("pdpe1gb" if second.spec.format == "npt" else "vmx-ept-1gb")
        second.page1gb = cap if isinstance(cap, bool) else None
    second.maxphyaddr = session.cpu.maxphyaddr or 52     # the outer vCPU's width
    if inner_ram is not None:
        second.device = lambda gpa: None if inner_ram.ram_at(gpa) else inner_ram.describe(gpa)
    for r, t in zip(pending, ts):
        inner = r.hops[-2].translation
        inner.slat = second.result(inner.gpa, t.gpa if t.ok else None)
        if inner.slat.agrees is False and not r.hops[-1].note:
            r.hops[-1].note = inner.slat.note


def _spread_probes(session: Session, root: int, inner_ram, count: int = 64) -> list:
    """(inner GPA, outer GPA) of pages spread over the inner VM's RAM: the inner QEMU's HVA of
    each walked in the outer VM with that QEMU's root. More keys for roots that tie."""
    if inner_ram is None:
        return []
    regions = [r for r in inner_ram.ram if r.kind == "ram" and r.hva is not None]
    total = sum(r.end + 1 - r.start for r in regions)
    if not total:
        return []
    step = max(PAGE, total // count // PAGE * PAGE)
    gpas = [g for r in regions for g in range(r.start, r.end + 1, step)]
    hvas = [inner_ram.ram_at(g).hva_of(g) for g in gpas]
    return [(g, t.gpa) for g, t in zip(gpas, session.translate_many(hvas, cr3=root)) if t.ok]


def _stamp(results, k, seconds) -> None:
    for r in results:
        if len(r.hops) > k:
            r.hops[k].seconds = seconds
