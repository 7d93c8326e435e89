"""Pictures: the chain and the address space drawn (SVG), on self-contained pages (HTML), as
mermaid flowcharts, and a report a student can hand in.

* ``translate ... --html FILE``: one page, one figure per address (the walk, the fault where it
  stopped, the second-level walk with --slat, the chain; nested hops side by side with --outer),
  the text view and the mermaid chain under each.
* ``translate ... --svg FILE``: one SVG file per address. With one address FILE itself; with
  several, FILE's name with -1, -2, ... before the suffix (walk.svg -> walk-1.svg, walk-2.svg),
  in the order the addresses were given.
* ``translate ... --mermaid``: stdout is one mermaid flowchart of every address's chain.
* ``vmmap ... --html FILE`` / ``--svg FILE``: the address space as a map (spacemap.py: user and
  kernel halves, holes of 2 MiB or more folded, colours by permission, height by page size).
* ``report ... --out DIR|FILE.html`` (report.py).

Pages and files are written after the text or JSON output, which stays on stdout as usual. This
module stays light (the CLI imports it to add options); the drawing modules load on use.
"""

import os
import sys
from typing import List

from ... import paging
from ...errors import UsageError

MAX_PICTURES = 256       # addresses drawn in one translate --html / --svg


def translate_options(p) -> None:
    """translate's picture options."""
    g = p.add_argument_group("pictures")
    g.add_argument("--html", metavar="FILE",
                   help="also write a self-contained page drawing each address's walk and chain")
    g.add_argument("--svg", metavar="FILE",
                   help="also write the drawing as SVG: FILE for one address; FILE-1.svg, "
                        "FILE-2.svg, ... (one per address, in order) for several")
    g.add_argument("--mermaid", action="store_true",
                   help="print only a mermaid flowchart of the chain (GVA -> GPA -> HVA -> HPA, "
                        "with the values), for Markdown reports")


def vmmap_options(p) -> None:
    """vmmap's picture options."""
    g = p.add_argument_group("pictures")
    g.add_argument("--html", metavar="FILE",
                   help="also write the address space as a map on a self-contained page (hover "
                        "for a range's row; rows a page at a time)")
    g.add_argument("--svg", metavar="FILE", help="also write the map as one SVG file")


def svg_names(path: str, count: int) -> List[str]:
    """FILE for one figure; FILE-1.svg ... FILE-N.svg (before FILE's suffix) for several."""
    if count <= 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}-{k}{ext or '.svg'}" for k in range(1, count + 1)]


def write_text(path: str, text: str) -> None:
    """Write a whole file safely (outfile.write_file), or say plainly why not (exit 2)."""
    from ..outfile import write_file
    write_file(path, text)


def _check_writable(path: str, what: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{what} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path}: is a folder; give a file name")


class TranslatePictures:
    """What translate --html/--svg/--mermaid collect: add() each result (a Translation or a
    NestedTranslation) as it is printed; finish() writes the files and prints the flowchart."""

    def __init__(self, args):
        self.html = getattr(args, "html", None)
        self.svg = getattr(args, "svg", None)
        self.mermaid = bool(getattr(args, "mermaid", False))
        self.results: List = []
        if (self.html or self.svg or self.mermaid) and getattr(args, "brief", False):
            raise UsageError("--html, --svg and --mermaid draw the levels, which --brief does "
                             "not compute")
        for path, what in ((self.html, "--html"), (self.svg, "--svg")):
            if path:
                _check_writable(path, what)

    @property
    def wanted(self) -> bool:
        return bool(self.html or self.svg or self.mermaid)

    def add(self, result) -> bool:
        """Keep the result; True when stdout is for the flowchart alone (--mermaid)."""
        if self.wanted:
            if len(self.results) >= MAX_PICTURES:
                raise UsageError(f"--html/--svg/--mermaid draw at most {MAX_PICTURES} addresses "
                                 "at a time")
            if getattr(result, "stage2", None) is not None:
                raise UsageError("--html/--svg/--mermaid do not draw a two-stage translation "
                                 "(a guest of the vCPU's hypervisor) yet: the text and --json "
                                 "show both stages")
            self.results.append(result)
        return self.mermaid

    def finish(self) -> None:
        if not self.wanted:
            return
        if self.html:
            from .html import translate_page
            write_text(self.html, translate_page(self.results))
        if self.svg and self.results:
            from .walk import nested_svg, translation_svg
            names = svg_names(self.svg, len(self.results))
            for name, r in zip(names, self.results):
                fig = nested_svg(r) if getattr(r, "hops", None) is not None \
                    else translation_svg(r)
                write_text(name, fig.render())
            if len(names) > 1:
                print(f"qintrospect: wrote {len(names)} SVG files: {names[0]} ... {names[-1]}",
                      file=sys.stderr)
        if self.mermaid:
            from .mermaid import flowchart
            sys.stdout.write(flowchart(self.results))
            sys.stdout.flush()


class VmmapPictures:
    """What vmmap --html/--svg collect: begin() with the session's facts, add() each chunk of
    rows (vmmap.Rows) as it is printed, finish() writes the map."""

    def __init__(self, args):
        self.args = args
        self.html = getattr(args, "html", None)
        self.svg = getattr(args, "svg", None)
        self.chunks: List = []
        self.facts: dict = {}
        self.va_bits = 48
        self.vmas = None
        self.vma_rows = None
        for path, what in ((self.html, "--html"), (self.svg, "--svg")):
            if path:
                _check_writable(path, what)

    @property
    def wanted(self) -> bool:
        return bool(self.html or self.svg)

    def begin(self, vm, leaves) -> None:
        if not self.wanted:
            return
        a = self.args
        mode = leaves.mode
        self.va_bits = mode.va_bits if mode is not None else 64
        cpu = vm.cpu_state(None)
        if getattr(vm, "stage2", None) is not None:     # a guest with its MMU off: stage 2's map
            root = {"VTTBR_EL2": f"{vm.stage2.vttbr:#x}", "stage 1": "off (addresses are IPAs)"}
        elif paging.is_x86(cpu):
            root = {"CR3": a.cr3 or f"{cpu.cr3:#x}"}
        elif paging.arch_of(cpu) == "riscv64":
            root = {"satp": a.cr3 or f"{cpu.satp:#x}"}
        else:                   # both halves; --cr3 replaces TTBR0_EL1's
            root = {"TTBR0_EL1": a.cr3 or f"{cpu.ttbr0:#x}", "TTBR1_EL1": f"{cpu.ttbr1:#x}"}
        modes = getattr(leaves, "modes", None)      # aarch64: each range's, when they differ
        self.facts = {"vCPU": vm.vcpu, **root,
                      "paging": mode.name if mode is not None else
                      " / ".join(m.name for m in modes if m) if modes and any(modes) else "off",
                      "range": a.range,
                      "only": " ".join(k for k in ("user", "kernel", "writable", "exec")
                                       if getattr(a, k, False)) or None}

    def add(self, chunk) -> None:
        if self.wanted:
            self.chunks.append(chunk)

    def guest_vmas(self, task, covered, outside) -> None:
        """vmmap --guest-pid: label the map with the process's VMAs (commands.guest's
        coverage: each VMA and its mapped pages; the ranges in no VMA)."""
        if not self.wanted:
            return
        self.vmas = [(c.vma.start, c.vma.end, c.vma.path) for c in covered]
        self.facts["guest process"] = f"{task.pid} ({task.comm})"
        rows = [(c.vma.maps_line(), f"{c.mapped}/{c.pages}", "; ".join(c.differs))
                for c in covered]
        rows += [(f"{o.start:08x}-{o.end:08x} (in no VMA)", "-",
                  "mapped by the page tables, in no VMA") for o in outside]
        self.vma_rows = (f"VMAs of guest process {task.pid} ({task.comm}), as "
                         f"/proc/{task.pid}/maps lists them", rows)

    def finish(self) -> None:
        if not self.wanted:
            return
        from ...commands.vmmap import concat
        from .spacemap import SpaceMap
        rows = None
        for c in self.chunks:
            rows = c if rows is None else concat(rows, c)
        if rows is None:
            from ...commands.vmmap import Rows
            import numpy as np
            z = np.zeros(0, np.uint64)
            rows = Rows(z, z, z, np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, bool), z, z,
                        np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int8), z,
                        np.zeros(0, bool))
        a = self.args
        facts = dict(self.facts)
        smap = SpaceMap(rows, self.va_bits, show_gpa=bool(a.gpa or a.hpa or a.leaf),
                        show_hpa=bool(a.hpa), leaf=bool(a.leaf), facts=facts, vmas=self.vmas)
        if self.vma_rows is not None:
            smap.vma_rows = self.vma_rows
        title = "qintrospect vmmap"
        if self.html:
            from .html import vmmap_page
            write_text(self.html, vmmap_page(smap, title))
        if self.svg:
            write_text(self.svg, smap.svg(title).render())
