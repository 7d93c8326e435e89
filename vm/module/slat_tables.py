"""Second-level tables made by hand, for slat_dump.ko to walk (tests and captured logs).

Run on the host that loads slat_dump.ko (the KVM rig's L1, as root: /proc/self/pagemap must
show frame numbers):

    python3 slat_tables.py ept|npt 4|5 OUT

It lays out one table per level and a data page in this process's memory (4 KiB pages, no THP),
writes entries in the chosen format, writes to OUT one line

    root=0x... value=0x... 4k=0x... 2m=0x... 1g=0x... notpresent=0x... invalid=0x...

(the physical address of the top table, the 8 bytes at the data address, and one GPA per
case), then waits, holding the pages, until OUT.done exists. The GPAs:

    4k          index 1 at every level above the last four, then 1, 2, 3, 4: a 4 KiB leaf on
                the data page
    2m          PD index 5: a 2 MiB leaf on the 2 MiB frame around the data page
    1g          PDPT index 3: a 1 GiB leaf on the 1 GiB frame around it
    notpresent  PD index 6: a zero entry
    invalid     PD index 7: EPT W=1 without R (a misconfiguration); NPT a 2 MiB leaf with
                bit 13 set (a reserved bit)

The three leaves reach the same host address, so slat_dump prints the same value for each.
Python 3 standard library only (L1's Python has no qintrospect dependencies to spare).
"""
import ctypes
import mmap
import os
import struct
import sys
import time

PAGE = 4096
VALUE = 0x5441445F54414C53          # "SLAT_DAT" in memory
OFFSET = 0x5A8                      # where the value lies in the data page


def main(argv):
    fmt, levels, out = argv[0], int(argv[1]), argv[2]
    if fmt not in ("ept", "npt") or levels not in (4, 5):
        raise SystemExit("usage: slat_tables.py ept|npt 4|5 OUT")
    buf = mmap.mmap(-1, (levels + 1) * PAGE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(levels + 1):
        buf[i * PAGE] = 1                     # fault every page in
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def phys(i):
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((base + i * PAGE) // PAGE * 8)
            e = struct.unpack("<Q", f.read(8))[0]
        if not e >> 63 or not e & ((1 << 55) - 1):
            raise SystemExit("no frame number in /proc/self/pagemap (run as root)")
        return (e & ((1 << 55) - 1)) * PAGE

    tables = [phys(i) for i in range(levels)]
    data = phys(levels) + OFFSET
    struct.pack_into("<Q", buf, levels * PAGE + OFFSET, VALUE)
    if fmt == "ept":
        table_bits = 7                                   # R W X
        leaf_bits = 7 | 6 << 3 | 1 << 8 | 1 << 9         # R W X, memory type WB, A, D
    else:
        table_bits = 0x27                                # P RW US A
        leaf_bits = 0x67                                 # P RW US A D
    ps = 1 << 7

    def put(level, index, value):
        struct.pack_into("<Q", buf, level * PAGE + 8 * index, value)

    idx = [1] * (levels - 4) + [1, 2, 3, 4]
    shifts = [12 + 9 * (levels - 1 - k) for k in range(levels)]

    def gpa(indexes, low):
        return sum(i << s for i, s in zip(indexes, shifts)) | low

    for k in range(levels - 1):
        put(k, idx[k], tables[k + 1] | table_bits)
    put(levels - 1, idx[-1], (data & ~0xFFF) | leaf_bits)
    gpas = {"4k": gpa(idx, OFFSET)}
    pd, pdpt = levels - 2, levels - 3
    put(pd, 5, (data & ~0x1FFFFF) | leaf_bits | ps)
    gpas["2m"] = gpa(idx[:-2] + [5], data & 0x1FFFFF)
    put(pdpt, 3, (data & ~0x3FFFFFFF) | leaf_bits | ps)
    gpas["1g"] = gpa(idx[:-3] + [3], data & 0x3FFFFFFF)
    put(pd, 6, 0)
    gpas["notpresent"] = gpa(idx[:-2] + [6], 0x123)
    if fmt == "ept":
        put(pd, 7, tables[levels - 1] | 2)
    else:
        put(pd, 7, (data & ~0x1FFFFF) | leaf_bits | ps | 1 << 13)
    gpas["invalid"] = gpa(idx[:-2] + [7], 0x456)
    with open(out + ".tmp", "w") as f:
        f.write(f"root={tables[0]:#x} value={VALUE:#x} "
                + " ".join(f"{k}={v:#x}" for k, v in gpas.items()) + "\n")
    os.rename(out + ".tmp", out)
    while not os.path.exists(out + ".done"):
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1:])
