"""Guest RAM that is not in QEMU's page tables is read for real (issue 11, item 1).

The direct path (reading QEMU's process at the HVA) once gave zeros wherever the host's
pagemap said "not present". That is only right for private anonymous memory that was never
touched. Two real cases where it is wrong, each with a real QEMU and gdb:

- RAM in a shared file that the test prefilled and the guest never touched
  (`-object memory-backend-file,share=on`): QEMU never faulted those pages in, yet they hold
  the file's bytes. Page tables are built there too (through the file, from outside the
  guest), so that a walk, a batch and the find-cr3 scan all meet absent pages with data.
- A guest page pushed out to swap (process_madvise MADV_PAGEOUT on QEMU's RAM, with a swap
  file the test turns on; skipped, with the reason, where the machine refuses swapon).
"""

import ctypes
import os
import struct
import subprocess

import pytest

from qintrospect.machine.monitor_text import parse_gpa2hva, parse_registers

from .conftest import attach_args, booted, run_cli, run_json

pytestmark = pytest.mark.vm

MiB = 1 << 20
RAM = 256 * MiB
AREA = 192 * MiB          # the guest boots with mem=192M: it never touches RAM from here up
ROOT, PDPT, PD, PT = AREA, AREA + 0x1000, AREA + 0x2000, AREA + 0x3000
DATA = AREA + 0x10000     # 16 data pages mapped at VA 0..0xffff by the crafted tables
PAGES = 16


def word(gpa: int) -> int:
    """The prefilled value of the 8 bytes at gpa: distinct everywhere, never zero."""
    return 0x5145_4D55_0000_0000 | gpa


def prefill(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(RAM)
        f.seek(AREA)
        f.write(struct.pack(f"<{(32 * MiB) // 8}Q",
                            *(word(AREA + 8 * i) for i in range((32 * MiB) // 8))))


def pagemap_present(pid: int, hva: int) -> bool:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(hva // 4096 * 8)
        return bool(struct.unpack("<Q", f.read(8))[0] >> 63)


@pytest.fixture(scope="module")
def shared_guest():
    # a '%' in the name: it is written into lines made by %-formats (translate --json -)
    path = f"/dev/shm/qi-ram-%d%%s-{os.getpid()}"
    prefill(path)
    backend = ["-object", f"memory-backend-file,id=ram0,size={RAM},mem-path={path},share=on",
               "-machine", "memory-backend=ram0"]
    try:
        with booted("qemu64", probe=None, append_extra="mem=192M", extra_args=backend) as g:
            # tables in the untouched area, written through the file: kernel half copied from
            # the live root so the finder recognises this root as one of the guest's
            cr3 = parse_registers(g.hmp("info registers"))["CR3"] & ~0xFFF
            words = []
            for line in g.hmp(f"xp /512gx {cr3:#x}").splitlines():
                words += [int(w, 16) for w in line.split(":")[1].split()]
            assert len(words) == 512
            with open(path, "r+b") as f:
                f.seek(ROOT)
                f.write(struct.pack("<512Q", *([PDPT | 7] + [0] * 255 + words[256:])))
                for table, nxt in ((PDPT, PD), (PD, PT)):
                    f.seek(table)
                    f.write(struct.pack("<512Q", *([nxt | 7] + [0] * 511)))
                f.seek(PT)
                f.write(struct.pack("<512Q", *([(DATA + i * 4096) | 7 for i in range(PAGES)]
                                               + [0] * (512 - PAGES))))
            g.ram_file = path
            g.hva_of = lambda gpa: parse_gpa2hva(g.hmp(f"gpa2hva {gpa:#x}"))[2]
            yield g
    finally:
        os.unlink(path)


def test_the_area_is_absent_from_qemus_page_table(shared_guest):
    g = shared_guest
    for gpa in (ROOT, PT, DATA, DATA + 15 * 4096):
        assert not pagemap_present(g.pid, g.hva_of(gpa)), hex(gpa)


# Reading through the gdbstub makes QEMU touch the page, and the host kernel then maps the
# file's cached neighbours too (fault-around, 64 KiB): so the gdb read is kept far away from
# the tables and data pages that must stay absent for the other tests.
@pytest.mark.parametrize("via,gpa", [("direct", DATA + 0x2ff8), ("gdb", AREA + 16 * MiB - 8)])
def test_physical_read_gives_the_files_bytes(shared_guest, via, gpa):
    rc, out, err = run_json("read", *attach_args(shared_guest), "--phys", "--via", via,
                            hex(gpa), "16")
    assert rc == 0, err
    data = b"".join(bytes.fromhex(p["data"]) for p in out)
    assert data == struct.pack("<2Q", word(gpa), word(gpa + 8))


def test_walk_through_absent_tables_to_absent_data(shared_guest):
    rc, out, err = run_json("translate", *attach_args(shared_guest), "--via", "direct",
                            "--cr3", hex(ROOT), "0x1008", "0xf000")
    assert rc == 0, err
    for t, va in zip(out, (0x1008, 0xF000)):
        gpa = DATA + va
        assert t["memory_path"] == "direct"
        assert int(t["gpa"], 16) == gpa
        assert [lvl["entry_addr"] for lvl in t["levels"]] == [
            hex(ROOT), hex(PDPT), hex(PD), hex(PT + (va >> 12) * 8)]
        assert int(t["value"], 16) == word(gpa)
        assert t["host"]["status"] == "not-present"
        assert "file" in t["host"]["detail"]


def test_batch_values_from_absent_pages(shared_guest):
    addresses = "".join(f"{va:#x}\n" for va in range(0x8, PAGES * 4096, 0x1000))
    rc, out, err = run_cli("translate", *attach_args(shared_guest), "--via", "direct", "--cr3",
                           hex(ROOT), "--brief", "-", input=addresses)
    assert rc == 0, err
    import json
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == PAGES
    for row in rows:
        assert int(row["value"], 16) == word(int(row["gpa"], 16)), row


def test_many_address_json_of_absent_pages_is_the_one_address_json(shared_guest):
    """The full lines of many addresses (arrays, %-formats filled in C) through tables and
    data QEMU never faulted in are the one-address lines; the RAM file's name, with '%' in
    it, is in each line's host detail."""
    import qintrospect
    from qintrospect.present.render import json_line
    g = shared_guest
    addrs = list(range(0x8, PAGES * 4096, 0x200)) + [PAGES * 4096 + 8, 1 << 47]
    with qintrospect.attach(qmp=g.qmp_path, gdb=g.gdb_address, via="direct") as vm:
        fast = list(vm.translate_json(addrs, ROOT))
        slow = [json_line(vm.translate(a, ROOT).to_dict()) for a in addrs]
    assert [line for _, line in fast] == slow
    assert [ok for ok, _ in fast] == [True] * (len(addrs) - 2) + [False, False]
    assert "%" in g.ram_file and all(g.ram_file in line for line in slow[:-2])


def test_find_cr3_scans_absent_pages_that_hold_a_table(shared_guest):
    rc, out, err = run_json("find-cr3", *attach_args(shared_guest), "--via", "direct",
                            "--gva", "0x1008", "--expect", hex(word(DATA + 0x1008)))
    assert rc == 0, err
    assert [c["cr3"] for c in out] == [hex(ROOT)]


def test_reading_did_not_fault_the_file_pages_in(shared_guest):
    g = shared_guest
    for gpa in (ROOT, PT, DATA, DATA + 0x1000, DATA + 15 * 4096):
        assert not pagemap_present(g.pid, g.hva_of(gpa)), hex(gpa)


# ---- a page in swap ----------------------------------------------------------------------

class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def page_out(pid: int, hva: int, length: int) -> None:
    """Ask the kernel to push QEMU's pages [hva, hva+length) out (MADV_PAGEOUT)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, pid, 0)                      # pidfd_open
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        iov = _Iovec(hva, length)
        got = libc.syscall(440, pidfd, ctypes.byref(iov), 1, 21, 0)  # process_madvise PAGEOUT
        assert got == length, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)


@pytest.fixture
def swap(tmp_path_factory):
    path = "/var/tmp/qi-test-swap"
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=128", "status=none"],
                   check=True)
    os.chmod(path, 0o600)
    subprocess.run(["mkswap", path], check=True, capture_output=True)
    on = subprocess.run(["swapon", path], capture_output=True, text=True)
    if on.returncode != 0:
        os.unlink(path)
        pytest.skip(f"this machine refuses swapon ({on.stderr.strip()}): no swapped page to test")
    try:
        yield path
    finally:
        subprocess.run(["swapoff", path], capture_output=True)
        os.unlink(path)


def test_a_swapped_page_is_read_not_zeroed(swap):
    with booted("qemu64") as g:
        heap = g.probe["regions"]["heap"]
        hva = parse_gpa2hva(g.hmp(f"gpa2hva {heap['gpa']:#x}"))[2]
        g.qmp("stop")
        try:
            page_out(g.pid, hva & ~(2 * MiB - 1), 2 * MiB)
            with open(f"/proc/{g.pid}/pagemap", "rb") as f:
                f.seek(hva // 4096 * 8)
                assert struct.unpack("<Q", f.read(8))[0] >> 62 & 1, "the page did not go to swap"
            rc, out, err = run_json("translate", *attach_args(g), "--via", "direct",
                                    hex(heap["gva"]))
            assert rc == 0, err
            t = out[0]
            assert t["host"]["status"] == "swapped" and t["memory_path"] == "direct"
            assert int(t["gpa"], 16) == heap["gpa"]
            assert int(t["value"], 16) == heap["value"]
        finally:
            g.qmp("cont")
