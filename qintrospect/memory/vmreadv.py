"""Many pieces of another process's memory in few system calls: process_vm_readv with up to
IOV_MAX iovecs a call, the iovec arrays built by numpy (no Python object per piece). ctypes
is loaded on first use: a command that reads one piece at a time never needs it."""

IOV_MAX = 1024   # iovecs per process_vm_readv call (the kernel's UIO_MAXIOV)

_VM_READV = []


def read_pieces(pid: int, buf, offsets, addresses, lengths, read_one) -> None:
    """Piece i of buf (at offsets[i], lengths[i] bytes) from addresses[i] of process pid.
    Pieces a call could not read are read one by one by read_one(address, length) -> bytes
    (which says why when it fails too)."""
    import ctypes
    import numpy as np
    libc, iovec = _process_vm_readv()
    offsets = np.asarray(offsets, dtype=np.uint64)
    addresses = np.asarray(addresses, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.uint64)
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    try:
        base = np.uint64(ctypes.addressof(view))
        for k in range(0, len(addresses), IOV_MAX):
            part = slice(k, k + IOV_MAX)
            n = len(addresses[part])
            local = np.stack([base + offsets[part], lengths[part]], axis=1)
            remote = np.stack([addresses[part], lengths[part]], axis=1)
            got = -1 if libc is None else libc.process_vm_readv(
                pid, local.ctypes.data_as(ctypes.POINTER(iovec)), n,
                remote.ctypes.data_as(ctypes.POINTER(iovec)), n, 0)
            if got == int(lengths[part].sum()):
                continue
            for off, address, length in zip(offsets[part].tolist(), addresses[part].tolist(),
                                            lengths[part].tolist()):
                buf[off:off + length] = read_one(address, length)
    finally:
        del view   # release buf's export


def _process_vm_readv():
    """(libc with process_vm_readv typed, its iovec struct), or (None, iovec) where there is
    none (not Linux/glibc: read_one reads every piece)."""
    if not _VM_READV:
        import ctypes

        class Iovec(ctypes.Structure):
            _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.process_vm_readv.restype = ctypes.c_ssize_t
            libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(Iovec),
                                              ctypes.c_ulong, ctypes.POINTER(Iovec),
                                              ctypes.c_ulong, ctypes.c_ulong]
        except (OSError, AttributeError):
            libc = None
        _VM_READV.append((libc, Iovec))
    return _VM_READV[0]
