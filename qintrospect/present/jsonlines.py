"""translate --json for many addresses: exactly the one-address line (every level, flag and
access rule, json_line(session.translate(a).to_dict())), made from the vectorized walk.

The one-address path costs about 100 us per address; the arrays of a batch walk
(batch.translate_batch) hold the same facts. What repeats is serialized once: per 4 KiB virtual
page, everything in the line but the offsets inside the page (levels, RAM block, host page,
rights, access table); per fault (the path down to the entry that stopped the walk), the whole
line but the address. Whatever the arrays do not cover exactly takes the one-address path:
non-canonical addresses, GPAs outside RAM, values that cross a page, host pages swapped out,
memory read through gdb or QMP. numpy is imported only for chunks big enough to pay for it.
Each line is its group's %-format filled with the row's numbers: in C (_rowformat.c) where it
was built, else by bytes.__mod__ (the same bytes; the tests compare the two).
"""

import contextlib
import gc
import itertools
import json
from typing import Iterator, Optional, Tuple

from .. import paging
from ..memory.guest import DirectMemory
from ..paging.model import NON_CANONICAL as NON_CANONICAL_REASON
from ..paging.walker import present_step
from ..paging.x86 import x86_format
from .render import json_line

from .rowlines import fill_rows, parse_templates

CHUNK = 65536       # addresses walked together: bounded memory whatever the stream
MIN_ARRAYS = 32     # fewer addresses: the arrays would cost more than they save
PAGE = 4096
VALUE_SIZE = 8
# the bits of an entry that decide the access table and its notes (RW, US, PS, XD, PK)
RIGHTS_BITS = 0x2 | 0x4 | 0x80 | (1 << 63) | (0xF << 59)
_BOOL = {True: "true", False: "false"}


def json_lines(session, addresses, cr3: Optional[int] = None,
               kvm: Optional[dict] = None) -> Iterator[Tuple[bool, str]]:
    """(translated?, line) for each address, in order: the line the one-address path prints,
    with `kvm` set to the facts given."""
    for oks, lines in json_blocks(session, addresses, cr3, kvm):
        yield from zip(oks, (line[:-1].decode() for line in lines))


def json_blocks(session, addresses, cr3: Optional[int] = None, kvm: Optional[dict] = None,
                size: int = 256) -> Iterator[Tuple[list, list]]:
    """json_lines() a block of up to `size` addresses at a time: (translated? of each, the
    lines as ASCII bytes, each ending in a newline): bytes are formatted several times faster
    than str, and written as they are (os.writev: not copied again to be joined)."""
    it = iter(addresses)
    while True:
        chunk = list(itertools.islice(it, CHUNK))
        if not chunk:
            return
        cpu = session.cpu_state(cr3)
        # (the arrays know x86 paging; an aarch64 guest's lines come one walk at a time)
        if len(chunk) < MIN_ARRAYS or not paging.is_x86(cpu) or \
                paging.paging_mode(cpu) is None or \
                not isinstance(session.memory, DirectMemory) or session.process is None:
            for start in range(0, len(chunk), size):
                oks, lines = [], []
                for va in chunk[start:start + size]:
                    ok, line = _scalar(session, va, cr3, kvm)
                    oks.append(ok)
                    lines.append(line.encode() + b"\n")
                yield oks, lines
            continue
        yield from _Chunk(session, cpu, cr3, kvm).blocks(chunk, size)


def _scalar(session, va, cr3, kvm):
    t = session.translate(va, cr3)
    t.kvm = kvm
    return t.ok, json_line(t.to_dict())


def _members(d: dict) -> str:
    """A dict's members as json_line writes them, without the braces."""
    return json_line(d)[1:-1]


class _Chunk:
    """One chunk's lines. The chunk is walked once (each table read once), so rows alike in
    what they read share their serialized pieces: grouped with numpy, made once per group."""

    def __init__(self, session, cpu, cr3, kvm):
        self.session, self.cpu, self.cr3, self.kvm = session, cpu, cr3, kvm
        self.mode = paging.paging_mode(cpu)
        self.fmt = x86_format(cpu, self.mode)
        root, pcid = paging.cr3_root(cpu, self.mode)
        # json_line's compact form, keys in Translation.to_dict's order: the tests hold every
        # line to json_line(translate(a).to_dict())
        self.head = '",' + _members({
            "vcpu": session.vcpu, "cr3": f"{cpu.cr3:#x}",
            "cr3_source": "vcpu" if cr3 is None else "given", "root": f"{root:#x}",
            "pcid": None if pcid is None else f"{pcid:#x}", "mode": self.mode.name})
        self.tail = ',"memory_path":' + json.dumps(session.memory.name)
        self.kvm_part = ',"kvm":' + json_line(kvm) if kvm is not None else ""
        self.rights_mask = RIGHTS_BITS | (1 << 5 if self.mode.name == "pae" else 0)

    def blocks(self, chunk, size):
        yield from _without_gc(self._walked(chunk, size))

    def _walked(self, chunk, size):
        from ..commands.batch import translate_batch
        s = self.session
        b = translate_batch(s, chunk, self.cr3)
        with s.page_cache():       # the walks made one by one below read tables once
            yield from self._blocks(b, size)

    def _blocks(self, b, size):
        import numpy as np
        from ..arrays import group_rows
        from ..memory.host import HOST_NOT_PRESENT, HOST_PFN_HIDDEN, HOST_PRESENT
        from ..paging.vector import FAULT_NON_CANONICAL
        s, mode, u64 = self.session, self.mode, np.uint64
        w = b.walk_result
        n, depth = len(w), len(mode.levels)
        ram = s.ram_map.ram

        # translated rows the arrays finish: in a RAM block with a host address, the 8 bytes
        # read, within one page, the host page present, absent or hidden (not swapped)
        off = b.hva & u64(PAGE - 1)
        has_hva = np.array([r.hva is not None for r in ram] + [False])[b.region]
        fast = w.ok & (b.region >= 0) & has_hva & b.has_value & (off <= PAGE - VALUE_SIZE) \
            & np.isin(b.host_status, (HOST_PRESENT, HOST_PFN_HIDDEN, HOST_NOT_PRESENT))
        rows = np.flatnonzero(fast)
        leaf = w.leaf_level[rows].astype(np.int64)
        entries, tables, va = w.entries[rows], w.tables[rows], w.va[rows]
        leaf_entry = entries[np.arange(len(rows)), leaf]
        leaf_table = tables[np.arange(len(rows)), leaf]
        shifts = np.array([lv.shift for lv in mode.levels], u64)
        counts = np.array([1 << lv.index_bits for lv in mode.levels], u64)
        index = (va >> shifts[leaf]) & (counts[leaf] - u64(1))
        psize = w.page_size[rows]
        # the host page's form (how host_page describes it, read in runs) and frame
        form, frame, self.forms = s.process.page_forms(
            (b.hva[rows] // u64(PAGE)).astype(np.int64), b.host_entry[rows])

        # the levels above the leaf: the same for rows alike in the address's bits from the
        # level above the leaf up, since one walk reads each table once; a table that could
        # only be read entry by entry might differ between rows, so each row's entries are
        # checked against its group's (a row that differs takes the one-address path)
        above = np.where(np.arange(depth)[None, :] < leaf[:, None], entries, u64(0))
        prefix_shift = shifts[np.maximum(leaf - 1, 0)]
        upper_first, upper_id = group_rows([leaf, np.where(leaf > 0, va >> prefix_shift,
                                                           u64(0))])
        same_above = (above == above[upper_first[upper_id]]).all(axis=1)
        uppers = [self._upper(int(va[r]), int(leaf[r]), tables[r].tolist(), entries[r].tolist())
                  for r in upper_first.tolist()]
        # the leaf step's fixed pieces: its level and the entry's bits outside the frame
        leaf_mask = np.array([self.fmt.leaf_addr[k] for k in range(depth)], u64)
        step_first, step_id = group_rows([leaf, leaf_entry & ~leaf_mask[leaf]])
        steps = [self._leaf_step(int(leaf[r]), int(leaf_entry[r]), int(psize[r]))
                 for r in step_first.tolist()]
        # what follows the addresses: fixed by the RAM block, the host page's form, the
        # entries' rights bits (the upper group holds the rest of the path) and, in PAE, the
        # PDPTE's slot
        slot = (va >> u64(30)) & u64(3) if mode.name == "pae" else np.zeros(len(rows), u64)
        rest_first, rest_id = group_rows([
            b.region[rows], form, upper_id, leaf_entry & u64(self.rights_mask), slot])
        rests = []
        for r in rest_first.tolist():
            i = int(rows[r])
            rests.append(self._rest(int(form[r]), int(va[r]), int(w.pa[i]), int(leaf[r]),
                                    entries[r].tolist(), (bool(w.writable[i]), bool(w.user[i]),
                                                          bool(w.executable[i])),
                                    int(psize[r]), ram[int(b.region[i])].block))
        finished = ~np.array([r is None for r in rests] + [False])[rest_id] & same_above

        # faults: everything after the address is fixed by the path down to the entry that
        # stopped the walk, but for that entry's index and address (in its step and in the
        # message): rows alike in the table and the entry's value share a %-format with
        # places for those two. Where the one-address line does not hold them in exactly
        # those places, rows are grouped by the entry itself. Non-canonical and paging-off
        # faults (level -1) go one by one.
        frows = np.flatnonzero(~w.ok & (w.fault_level >= 0))
        flevel = w.fault_level[frows].astype(np.int64)
        fva, freason = w.va[frows], w.fault_reason[frows]
        fentries = np.where(np.arange(depth)[None, :] <= flevel[:, None], w.entries[frows],
                            u64(0))
        bits = np.array([lv.index_bits for lv in mode.levels], u64)
        findex = (fva >> shifts[flevel]) & ((u64(1) << bits[flevel]) - u64(1))
        ftable = w.tables[frows, flevel]
        table_first, table_id = group_rows(
            [flevel, freason, fva >> (shifts[flevel] + bits[flevel])] + list(fentries.T))
        table_formats = [_taking_all(self._fault_format(int(fva[r]), int(flevel[r]),
                                                        int(freason[r]), int(findex[r]),
                                                        int(ftable[r])), 5)
                         for r in table_first.tolist()]
        by_entry = np.array([f is None for f in table_formats] + [False])[table_id]
        fault_first, fault_id = group_rows([table_id, np.where(by_entry, findex, u64(0))])
        fault_formats = []
        for r in fault_first.tolist():
            made_for_table = table_formats[table_id[r]]
            if made_for_table is None:
                rest = self._fault_rest(int(fva[r]), int(flevel[r]), int(freason[r]))
                made_for_table = None if rest is None else \
                    _taking_all(('{"gva":"%#x"' + _esc(rest) + "\n").encode(), 1)
            fault_formats.append(made_for_table)
        fgood = ~np.array([f is None for f in fault_formats] + [False])[fault_id]
        # non-canonical addresses: the line names the address twice (gva, message), and is
        # otherwise the same for all
        odd = np.flatnonzero(w.fault_reason == FAULT_NON_CANONICAL)
        noncanonical = self._noncanonical(int(w.va[odd[0]])) if len(odd) else None

        # Each row's line is one %-format (a template per group: the pieces above, with %#x,
        # %d and %016x where the row's own numbers go) filled with NUMBERS numbers from
        # columns (made in C by _rowformat, or by bytes.__mod__); a template takes all of
        # them, "%.0a" showing nothing ("null%.0a" where the line has null). Rows with no
        # template (-1) take the one-address path.
        combo_first, combo = group_rows([upper_id, step_id, rest_id])
        made = self._templates(combo_first, upper_id, step_id, rest_id, uppers, steps, rests,
                               leaf_table[upper_first].tolist())
        templates = made + fault_formats
        which = np.full(n, -1, np.int64)
        gva, c1, c2, c3, c4, gpa, block_off, hva, hpa, value, value_bytes = columns = \
            [np.zeros(n, u64) for _ in range(11)]
        # translated rows: gva, index, entry address, entry, frame, GPA, block offset, HVA,
        # HPA, HPA, value, value's bytes, value
        done, block_delta = rows[finished], np.array(
            [(r.block_offset - r.start) % (1 << 64) for r in ram] + [0], u64)
        which[done] = combo[finished]
        pa, found = w.pa[rows], b.value[rows]
        for column, values in zip(columns, (
                va, index, leaf_table + index * u64(mode.entry_size), leaf_entry,
                pa & ~(psize - u64(1)), pa, pa + block_delta[b.region[rows]], b.hva[rows],
                (frame << u64(12)) + off[rows], found, found.byteswap())):
            column[done] = values[finished]
        # faults: gva, then the index and address of the entry that stopped the walk, twice
        faulted = frows[fgood]
        which[faulted] = len(made) + fault_id[fgood]
        fentry_addr = ftable + findex * u64(mode.entry_size)
        for column, values in zip(columns, (fva, findex, fentry_addr, findex, fentry_addr)):
            column[faulted] = values[fgood]
        # non-canonical addresses: gva, gva
        if noncanonical is not None:
            templates.append(_taking_all(
                ("%#x".join(_esc(part) for part in noncanonical) + "\n").encode(), 2))
            which[odd] = len(templates) - 1
            gva[odd] = c1[odd] = w.va[odd]
        numbers = (gva, c1, c2, c3, c4, gpa, block_off, hva, hpa, hpa, value, value_bytes,
                   value)
        translated = np.zeros(n, bool)
        translated[done] = True
        ok = translated.tolist()
        parsed = parse_templates(templates)
        for start in range(0, n, size):
            end = min(n, start + size)
            chosen = which[start:end] >= 0
            picks = np.flatnonzero(chosen) + start
            lines = fill_rows(templates, parsed, which, numbers, picks)
            if len(picks) < end - start:
                for r in (np.flatnonzero(~chosen) + start).tolist():    # in order: each at r
                    ok[r], text = _scalar(s, int(w.va[r]), self.cr3, self.kvm)
                    lines.insert(r - start, text.encode() + b"\n")
            yield ok[start:end], lines

    def _templates(self, first, upper_id, step_id, rest_id, uppers, steps, rests,
                   upper_tables):
        """The %-format of each (upper levels, leaf step, rest) group of fast rows, `first`
        its first rows (a whole line, its newline too; None where the scalar walk disagreed:
        the one-address path); the numbers go in this order: gva, index, entry address,
        entry, frame, GPA, block offset, HVA, HPA, HPA, value, value's bytes, value. The leaf's
        table is written in: the levels above it (the upper group's) name it."""
        made = []
        for r in first.tolist():
            upper, step, rest = uppers[upper_id[r]], steps[step_id[r]], rests[rest_id[r]]
            table = upper_tables[upper_id[r]]
            if rest is None:              # the scalar walk disagreed: the one-address path
                made.append(None)
                continue
            p1, p3, p4, p5, present, framed, p6 = (_esc(x) if isinstance(x, str) else x
                                                   for x in rest)
            hpa = '"%#x"' if framed else "null%.0a"
            made.append("".join((
                '{"gva":"%#x', _esc(upper), _esc(step[0]),
                f'%d,"table_addr":"{table:#x}","entry_addr":"%#x","entry":"%#x',
                _esc(step[1]), "%#x", _esc(step[2]), "%#x", p1,
                '%#x","gpa_note":null,"hva":"%#x', p3, hpa, p4, hpa, p5,
                '"%#x","value_bytes":"%016x","value_at_hva":',
                '"%#x"' if present else "null%.0a", p6, "\n")).encode())
        return made

    def _upper(self, va, leaf, tables, entries):
        """The line up to the leaf step: the head and the levels above the leaf."""
        return self.head + ',"levels":[' + "".join(
            json_line(present_step(self.mode, self.fmt, k, tables[k],
                                   (va >> self.mode.levels[k].shift)
                                   & ((1 << self.mode.levels[k].index_bits) - 1),
                                   entries[k]).to_dict()) + "," for k in range(leaf))

    def _leaf_step(self, leaf, entry, psize):
        """The leaf step's pieces around its index, table, entry address, entry and frame
        (present_step's flags, leaf and page size are fixed by the entry's bits outside the
        frame), up to the GPA."""
        spec = self.mode.levels[leaf]
        step = present_step(self.mode, self.fmt, leaf, 0, 0, entry)
        return ('{"name":' + json.dumps(spec.name) + ',"linux_name":'
                + json.dumps(spec.linux_name) + ',"index":',
                '","flags":' + json_line(list(step.flags)) + ',"next_addr":"',
                '","leaf":' + _BOOL[step.leaf] + ',"page_size":' + json.dumps(step.page_size)
                + '}],"page_size":' + str(psize) + ',"gpa":"')

    def _rest(self, fm, va, pa, leaf, path, rights, psize, block):
        """The pieces after the GPA, around the block offset, HVA, HPA and value: (p1, p3, p4,
        p5, value read at the HVA?, HPA known?, p6); None when the scalar walk of va (whose
        access table and notes all rows of the group share) disagrees with the arrays."""
        walk = paging.walk(self.session.memory.read, self.cpu, va)
        if not walk.ok or walk.pa != pa or walk.page_size != psize:
            return None
        access = json_line({k: r.to_dict() for k, r in walk.access.items()})
        notes = "," + _members({"maxphyaddr": walk.maxphyaddr,
                                "assumed_maxphyaddr": walk.assumed_maxphyaddr,
                                "notes": list(walk.notes)})
        host = self.forms[fm].to_dict()
        present = host["status"] in ("present", "pfn-hidden")
        wr, us, ex = rights
        p1 = '","ram_block":' + json.dumps(block) + ',"ram_block_offset":"'
        p3 = '","qemu_pid":' + json.dumps(self.session.process.pid) + ',"hpa":'
        p4 = (',"host_page_size":' + json.dumps(host["page_size"]) + ',"host":{"status":'
              + json.dumps(host["status"]) + ',"hpa":')
        p5 = ("," + _members({k: host[k] for k in ("page_size", "page_kind", "detail", "flags")})
              + '},"writable":' + _BOOL[wr] + ',"user":' + _BOOL[us] + ',"executable":'
              + _BOOL[ex] + ',"access":' + access + ',"value":')
        p6 = (',"value_matches":' + ("true" if present else "null") + ',"value_note":null'
              + notes + self.tail + ',"guest_page_size":' + str(psize)
              + ',"slat_page_size":null' + self.kvm_part + "}")
        return p1, p3, p4, p5, present, host["status"] == "present", p6

    def _fault_format(self, va, level, reason, index, table):
        """The %-format of a fault's line with places for the address, then the index and
        address of the entry that stopped the walk, twice (its step, the message): from the
        one-address line of va, or None when that line does not hold them in exactly those
        two places."""
        rest = self._fault_rest(va, level, reason)
        if rest is None:
            return None
        entry_addr = table + index * self.mode.entry_size
        step = f'"index":{index},"table_addr":"{table:#x}","entry_addr":"{entry_addr:#x}"'
        said = f"(index {index} at {entry_addr:#x})"
        if rest.count(step) != 1 or rest.count(said) != 1 or rest.find(step) > rest.find(said):
            return None
        return ('{"gva":"%#x"' + _esc(rest).replace(
            step, f'"index":%d,"table_addr":"{table:#x}","entry_addr":"%#x"').replace(
            said, "(index %d at %#x)") + "\n").encode()

    def _fault_rest(self, va, level, reason):
        """A fault's line after the address, from the one-address path; None when that walk
        does not fault where the arrays say."""
        t = self.session.translate(va, self.cr3)
        t.kvm = self.kvm
        line = json_line(t.to_dict())
        prefix = '{"gva":"' + f"{va:#x}" + '"'
        fault = t.walk.fault
        if t.ok or fault is None or fault.level != self.mode.levels[level].name or \
                fault.reason != paging.FAULT_REASONS[reason] or not line.startswith(prefix):
            return None
        return line[len(prefix):]

    def _noncanonical(self, va):
        """A non-canonical address's line cut where the address is written (the gva, and the
        message that names it); None unless it is written exactly there."""
        t = self.session.translate(va, self.cr3)
        t.kvm = self.kvm
        if t.ok or t.walk.fault is None or t.walk.fault.reason != NON_CANONICAL_REASON:
            return None
        parts = json_line(t.to_dict()).split(f"{va:#x}")
        message = t.walk.fault.message
        if len(parts) != 3 or parts[0] != '{"gva":"' or message.count(f"{va:#x}") != 1:
            return None
        return parts


NUMBERS = 13    # a line's numbers (see _Chunk._templates), the most any template shows


def _taking_all(template: Optional[bytes], shown: int) -> Optional[bytes]:
    """A %-format that shows `shown` numbers, made to take NUMBERS: the rest taken by "%.0a",
    which shows nothing."""
    return None if template is None else template + b"%.0a" * (NUMBERS - shown)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for a while: a chunk makes hundreds of
    thousands of tuples and lists, none in a cycle, and the collections their making sets
    off cost a tenth of the time (as it was found: a caller that turned it off keeps it off)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _without_gc(steps):
    """A generator's own steps run with the collector off (gc_paused); whoever takes the
    items runs as before."""
    while True:
        with gc_paused():
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item


def _esc(text: str) -> str:
    """Text as a %-format that prints it."""
    return text.replace("%", "%%")
