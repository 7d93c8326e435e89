"""compare: a module's log (gpt_dump in the guest, ept_dump/slat_dump on the host) against
the live outside view of the same address, row by row; the logic behind compare --log and the
report's logs."""

from typing import Optional

from .. import modlog, slat
from ..errors import QIError, UsageError
from ..paging.formats import ADDR_51_12
from ..record import field, record, replace
from .finder import find_cr3


@record
class LogComparison:
    """A module log set against the outside view: the rows, why bits are shared, what the
    outside walk found (and, for a gpt_dump log, that walk)."""
    comparison: object                    # modlog.Comparison
    explain: Optional[str] = None
    outside: dict = field(default_factory=dict)
    translation: object = None            # commands.translate.Translation

    @property
    def compared(self) -> bool:
        """Some number of the log could be compared at all."""
        return any(r.agree is True for r in self.comparison.rows)

    @property
    def agree(self) -> bool:
        return bool(self.comparison.agree and self.compared)


def compare(vm, log, path: str) -> LogComparison:
    """A parsed module log against the live outside view: an ept_dump/slat_dump log's GPA
    on this host (compare_host), a gpt_dump log's GVA walked from outside with the root the
    log prints, or the process finder's. UsageError when the log names no address, or its
    process cannot be found."""
    if log.address is None:
        raise UsageError(f"{path}: the log does not say which address it walked")
    if log.kind == "ept_dump":
        return LogComparison(*compare_host(vm, log))
    cr3, how = root_for_log(vm, log, path)
    t = vm.translate(log.address, cr3)
    value = int.from_bytes(t.value, "little") if t.value and len(t.value) == 8 else None
    return LogComparison(modlog.compare(log, t.walk, value),
                         modlog.explain_direct_map(log.address, t.gpa) if t.ok else None,
                         dict(t.to_dict(), root_found_by=how), t)


def root_for_log(vm, log, path: str):
    """The page-table root to walk a gpt_dump log's address with: the one the log printed,
    else the finder's (the root whose 8 bytes at the address are the log's value)."""
    if log.root is not None and log.root_known_mask & ADDR_51_12 == ADDR_51_12:
        return log.root, "printed in the log"
    if log.value is None:
        raise UsageError(f"{path}: the log prints neither its page-table root nor the value "
                         "at the address, so the process cannot be found from outside")
    found = [c for c in find_cr3(vm, log.address, log.value, label="compare")
             if c.value_matches]
    if not found:
        raise UsageError(f"no page-table root in guest RAM maps {log.address:#x} to the log's "
                         f"value {log.value:#x}: the log is from another boot, or the page "
                         "changed since")
    return found[0].root, f"find-cr3 (the 8 bytes at {log.address:#x} equal the log's value)"


def compare_host(vm, log):
    """An ept_dump/slat_dump log (a GPA on the host) against the pagemap path, and, where
    the log names its table, against the same table walked here: (Comparison, explanation,
    what the outside says)."""
    gpa = log.address
    region = vm.ram_map.ram_at(gpa)
    outside = {"gpa": f"{gpa:#x}", "ram_block": region.block if region else None}
    hpa, value, why = None, None, ""
    if region is None:
        why = vm.ram_map.describe(gpa)
    elif vm.process is None:
        why = vm.process_note
    else:
        hva = region.hva_of(gpa)
        page = vm.process.host_page(hva)
        outside.update(hva=f"{hva:#x}", host=page.to_dict())
        hpa, why = page.hpa, page.detail
        try:
            value = int.from_bytes(vm.read_phys(gpa, 8), "little")
        except QIError as exc:
            why = why or str(exc)
    outside.update(hpa=None if hpa is None else f"{hpa:#x}",
                   value=None if value is None else f"{value:#x}")
    explain = None
    if hpa is not None:
        explain = modlog.explain_shared_bits(gpa, hpa)
    cmp = modlog.compare_host(log, hpa, value, why)
    if log.root is None:
        return cmp, explain, outside
    # The log names its table (nCR3 / EPTP): walk that table here too, row by row. The pagemap
    # rows stay, renamed host_hpa / host_value beside the walk's own final / value.
    slat_cmp, outside["slat"] = compare_second_level(vm, log, hpa)
    outside.update(root=f"{log.root:#x}", root_found_by=f"{log.root_name} printed in the log")
    if hpa is not None and outside["slat"].get("page_size"):
        explain = modlog.explain_shared_bits(gpa, hpa, page_size=outside["slat"]["page_size"])
    host_rows = [replace(r, field={"final": "host_hpa", "value": "host_value"}.get(r.field,
                                                                                  r.field))
                 for r in cmp.rows]
    return modlog.Comparison(tuple(host_rows) + slat_cmp.rows), explain, outside


def compare_second_level(vm, log, hpa):
    """The log's GPA walked through the second-level table the log prints (its root, format
    and depth), in this host's memory (/proc/kcore): (Comparison, what the walk found)."""
    fmt, depth = log.format or "ept", log.paging_levels
    root = log.root
    if log.root_known_mask & ADDR_51_12 != ADDR_51_12:
        missing = modlog.bit_ranges(ADDR_51_12 & ~log.root_known_mask)
        return modlog.Comparison((modlog.Row(
            "slat", None, root, None, log.root_known_mask, None,
            f"the {fmt.upper()} was not walked: the log's {log.root_name} is cut (bits "
            f"{missing} not printed)"),)), {"format": fmt, "note": "root cut"}
    spec = slat.SlatSpec(fmt, root, depth, root | 6 | (depth - 1) << 3 if fmt == "ept" else None)
    try:
        second = vm.second_level(spec)
        result = second.result(log.address, hpa)
    except QIError as exc:
        return modlog.Comparison((modlog.Row(
            "slat", None, root, None, log.root_known_mask, None,
            f"the {fmt.upper()} at {root:#x} was not walked: {exc}"),)), \
            {"format": fmt, "depth": depth, "root": f"{root:#x}", "note": str(exc)}
    walk, value = result.walk, None
    if walk.ok:
        try:
            value = int.from_bytes(second.memory.read(walk.pa, 8), "little")
        except QIError:
            value = None
    found = dict(result.to_dict(), value=None if value is None else f"{value:#x}")
    return modlog.compare_second_level(log, walk, value), found
