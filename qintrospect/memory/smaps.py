"""The QEMU process's mappings as /proc/PID/smaps lists them: where each starts and ends, what
backs it, its page size and flags."""

from __future__ import annotations

import bisect
import re
from typing import List

from ..record import record

PAGE = 4096


@record(frozen=True)
class Vma:
    """One mapping of the QEMU process (a line of /proc/PID/smaps)."""
    start: int
    end: int                        # exclusive
    perms: str                      # "rw-p", "rw-s", ...
    offset: int                     # file offset of `start`
    inode: int
    path: str                       # "" for anonymous memory
    flags: frozenset = frozenset()  # VmFlags ("um": userfaultfd handles missing pages)
    kernel_page_size: int = PAGE

    @property
    def shared(self) -> bool:
        return self.perms[3:4] == "s"

    @property
    def absent_reads_zero(self) -> bool:
        """A page here that pagemap shows neither present nor swapped holds zeros: private
        anonymous memory that was never touched (or was discarded), unless userfaultfd fills
        missing pages (postcopy migration)."""
        return not self.shared and self.inode == 0 and "um" not in self.flags

    def describe(self) -> str:
        what = "shared" if self.shared else "private"
        if self.inode == 0:
            return f"{what} anonymous memory" + (f" {self.path}" if self.path else "")
        return f"{what} file mapping of {self.path or f'inode {self.inode}'}"


# an entry of /proc/PID/smaps: its header line ("START-END PERMS OFFSET DEV INODE [PATH]"),
# then "Name: value" lines, of which two matter here. Each is found after a newline: a
# pattern that starts with one is searched for at C speed (one anchored at ^ is tried at
# every position)
_SMAPS_HEAD = re.compile(r"\n([0-9a-f]+)-([0-9a-f]+)[ \t]([^\n]*)")
_SMAPS_PAGE_SIZE = re.compile(r"\nKernelPageSize:[ \t]*(\d+)")
_SMAPS_FLAGS = re.compile(r"\nVmFlags:([^\n]*)")


def parse_smaps(text: str) -> List[Vma]:
    """The mappings of a smaps text. Its few lines that matter are found by regular
    expressions over the whole text (a QEMU has thousands of lines: read one by one they
    took 8 ms of a 70 ms command), each field given to the entry whose header precedes it."""
    text = "\n" + text
    heads = list(_SMAPS_HEAD.finditer(text))
    starts = [m.start() for m in heads]
    page_size, flags = [PAGE] * len(heads), [frozenset()] * len(heads)
    for m in _SMAPS_PAGE_SIZE.finditer(text):
        at = bisect.bisect_right(starts, m.start()) - 1
        if at >= 0:
            page_size[at] = int(m.group(1)) * 1024
    for m in _SMAPS_FLAGS.finditer(text):
        at = bisect.bisect_right(starts, m.start()) - 1
        if at >= 0:
            flags[at] = frozenset(m.group(1).split())
    vmas = []
    for m, f, size in zip(heads, flags, page_size):
        perms, offset, _dev, inode, *path = m.group(3).split(None, 4)
        vmas.append(Vma(int(m.group(1), 16), int(m.group(2), 16), perms, int(offset, 16),
                        int(inode), path[0].strip() if path else "", flags=f,
                        kernel_page_size=size))
    return vmas
