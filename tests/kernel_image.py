"""The bundled guest kernel as test data: its vmlinux (decompressed from the cached bzImage),
its modules' ELF files, and the kallsyms tables inside it, found without a symbol table.

vm/build.sh caches Debian's cloud kernel at $QI_VM_CACHE/vmlinuz (default
~/.cache/qintrospect/vm) and the KVM rig's modules under kvm/modules/. Nothing here is
committed: tests that need it skip, saying why, when the cache is not built.

A bzImage's setup header gives the compressed payload (payload_offset at 0x248,
payload_length at 0x24c, from the end of the setup sectors); the payload's magic says the
method. Debian's cloud kernel uses LZ4 (the legacy frame: magic 0x184c2102, then blocks of
u32 length + LZ4 block), which Python's standard library lacks, so a small LZ4 block decoder
is here; gzip, xz/lzma and bzip2 come from the standard library, zstd from the `zstandard`
module or the zstd command when present.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
from typing import Dict, List, Optional, Tuple

from qintrospect.btf.elf import Section, elf_sections

MAGICS = [(b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
          (b"\x02\x21\x4c\x18", "lz4"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma")]


def cache_dir() -> str:
    """Where vm/build.sh caches the guest ($QI_VM_CACHE or ~/.cache/qintrospect/vm)."""
    env = os.environ.get("QI_VM_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "qintrospect", "vm")


def module_path(name: str) -> str:
    """A module of the KVM rig's kernel (kvm.ko, kvm-amd.ko), in the cache."""
    return os.path.join(cache_dir(), "kvm", "modules", name)


def lz4_block(src: bytes, out: bytearray) -> None:
    """Decode one LZ4 block (the format's sequences: token, literals, offset, match) onto
    the end of `out`."""
    i, n = 0, len(src)
    while i < n:
        tok = src[i]
        i += 1
        lit = tok >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        out += src[i:i + lit]
        i += lit
        if i >= n:                       # the last sequence has literals only
            break
        off = src[i] | (src[i + 1] << 8)
        i += 2
        ml = tok & 15
        if ml == 15:
            while True:
                b = src[i]
                i += 1
                ml += b
                if b != 255:
                    break
        ml += 4
        if not 0 < off <= len(out):
            raise ValueError(f"LZ4 match offset {off} before the output's start")
        start = len(out) - off
        if off >= ml:
            out += out[start:start + ml]
        else:                            # overlapping copy: the pattern repeats
            out += (out[start:] * (ml // off + 1))[:ml]


def lz4_legacy(data: bytes) -> bytes:
    """Decode the LZ4 legacy frame the kernel's build uses (lz4 -l)."""
    out, mv, i = bytearray(), memoryview(data), 4
    while i + 4 <= len(data):
        size, = struct.unpack_from("<I", data, i)
        i += 4
        if size == 0x184C2102:           # another frame follows
            continue
        if i + size > len(data):         # the trailing u32 is the uncompressed size
            break
        lz4_block(mv[i:i + size], out)
        i += size
    return bytes(out)


def bzimage_payload(image: bytes) -> Tuple[str, bytes]:
    """(method, compressed payload) of a bzImage."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS setup header)")
    setup_sects = image[0x1F1] or 4
    off, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + off
    payload = image[start:start + length]
    for magic, method in MAGICS:
        if payload.startswith(magic):
            return method, payload
    raise ValueError(f"unknown compression (payload starts {payload[:6].hex()})")


def decompress(method: str, payload: bytes) -> bytes:
    if method == "gzip":
        return gzip.decompress(payload)
    if method in ("xz", "lzma"):
        return lzma.LZMADecompressor().decompress(payload)
    if method == "bzip2":
        return bz2.decompress(payload)
    if method == "lz4":
        return lz4_legacy(payload)
    if method == "zstd":
        try:
            import zstandard
            return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        except ImportError:
            if shutil.which("zstd"):
                return subprocess.run(["zstd", "-dc"], input=payload, capture_output=True,
                                      check=True).stdout
            raise
    raise ValueError(f"cannot decompress {method}")


class KernelImage:
    """A vmlinux ELF image with its allocated sections readable by virtual address."""

    def __init__(self, data: bytes, source: str):
        self.data, self.source = data, source
        self.sections: List[Section] = elf_sections(data)
        self.by_name: Dict[str, Section] = {s.name: s for s in self.sections}
        self._loaded = [s for s in self.sections if s.type == 1 and s.addr and s.size]

    def section(self, name: str) -> bytes:
        s = self.by_name[name]
        return self.data[s.offset:s.offset + s.size]

    def cstring(self, addr: int, limit: int = 512) -> str:
        """The NUL-terminated string at a kernel virtual address."""
        for s in self._loaded:
            if s.addr <= addr < s.addr + s.size:
                o = s.offset + addr - s.addr
                end = min(s.offset + s.size, o + limit)
                return self.data[o:end].split(b"\0", 1)[0].decode("latin-1")
        raise ValueError(f"{addr:#x} is in no section of {self.source}")

    def read(self, addr: int, n: int) -> bytes:
        """Bytes at a kernel virtual address, from the section that holds them."""
        for s in self._loaded:
            if s.addr <= addr and addr + n <= s.addr + s.size:
                o = s.offset + addr - s.addr
                return self.data[o:o + n]
        raise ValueError(f"{addr:#x}+{n} is in no section of {self.source}")


@functools.lru_cache(maxsize=1)
def vmlinux() -> Optional[KernelImage]:
    """The bundled guest's vmlinux, decompressed from the cache (about 1.5 s), or None."""
    path = os.path.join(cache_dir(), "vmlinuz")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        method, payload = bzimage_payload(f.read())
    return KernelImage(decompress(method, payload), path + " (decompressed)")


def release() -> Optional[str]:
    """The cached kernel's release string (kernel-release beside vmlinuz), or None."""
    try:
        with open(os.path.join(cache_dir(), "kernel-release")) as f:
            return f.read().strip()
    except OSError:
        return None


# ---- kallsyms tables, found by their shape ------------------------------------------------
_TOKEN_RUN = re.compile(rb"(?:[\x21-\x7e]{1,64}\x00){256,}")


def find_token_tables(img: KernelImage) -> Tuple[int, int]:
    """(kallsyms_token_table, kallsyms_token_index) addresses: a run of 256 short
    NUL-terminated tokens, followed (after alignment) by 256 u16 that are exactly the
    tokens' offsets in it."""
    ro = img.by_name[".rodata"]
    rodata = img.section(".rodata")
    hits = []
    for m in _TOKEN_RUN.finditer(rodata):
        run_end = m.end()
        for pad in range(0, 8):
            ipos = run_end + pad
            if ipos + 512 > len(rodata) or ipos % 2:
                continue
            idx = struct.unpack_from("<256H", rodata, ipos)
            if idx[0] != 0 or any(idx[i] >= idx[i + 1] for i in range(255)):
                continue
            last = rodata.rfind(b"\0", 0, run_end - 1) + 1    # start of the last token
            start = last - idx[255]
            if start < m.start() - 1 or start < 0:
                continue
            if all(rodata[start + o - 1] == 0 for o in idx[1:]) and \
                    rodata.find(b"\0", start) == start + idx[1] - 1:
                hits.append((ro.addr + start, ro.addr + ipos))
    if len(hits) != 1:
        raise LookupError(f"found {len(hits)} kallsyms token tables")
    return hits[0]


def find_kallsyms_tables(img: KernelImage) -> Dict[str, int]:
    """The addresses vmcoreinfo would give for the kallsyms tables of this image (Linux 6.1's
    order: offsets, relative_base, num_syms, names, markers, seqs_of_names, token_table,
    token_index): the relative_base + num_syms pair is the one whose names, decoded with
    the tokens, end before the token table."""
    table, index = find_token_tables(img)
    ro = img.by_name[".rodata"]
    rodata = img.section(".rodata")
    t = table - ro.addr
    q = t & ~7
    while q > max(0, t - (32 << 20)):
        q -= 8
        rb, n = struct.unpack_from("<QI", rodata, q)
        if rb >> 31 != 0x1FFFFFFFF or not 1000 < n < 1 << 22:
            continue
        p, ok = q + 16, True
        for _ in range(n):
            ln = rodata[p]
            p += 1
            if ln & 0x80:
                ln = (ln & 0x7F) | (rodata[p] << 7)
                p += 1
            if ln == 0 or p + ln > t:
                ok = False
                break
            p += ln
        if ok:
            return {"kallsyms_offsets": ro.addr + ((q - 4 * n) & ~7),
                    "kallsyms_relative_base": ro.addr + q,
                    "kallsyms_num_syms": ro.addr + q + 8,
                    "kallsyms_names": ro.addr + q + 16,
                    "kallsyms_token_table": table, "kallsyms_token_index": index}
    raise LookupError("no kallsyms_num_syms before the token table")


def ksymtab(img: KernelImage) -> Dict[str, int]:
    """Exported symbols from __ksymtab and __ksymtab_gpl (struct kernel_symbol with
    place-relative ints: value_offset, name_offset, namespace_offset): name -> address.
    An independent source of symbol addresses, written by the linker, not by kallsyms."""
    out = {}
    for sec in ("__ksymtab", "__ksymtab_gpl"):
        s = img.by_name.get(sec)
        if s is None:
            continue
        raw = img.section(sec)
        for i in range(0, len(raw) - 11, 12):
            voff, noff, _ns = struct.unpack_from("<iii", raw, i)
            value = (s.addr + i + voff) & (2 ** 64 - 1)
            name_addr = s.addr + i + 4 + noff
            name = img.cstring(name_addr)
            out[name] = value
    return out
