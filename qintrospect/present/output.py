"""Bulk output: JSON Lines written straight to stdout's descriptor (os.writev from the lines
themselves), a bigger pipe, and a stdout a parent left non-blocking waited on."""

import os
import sys


def grow_stdout_pipe() -> None:
    """Bulk JSON Lines reach a reader faster through a bigger pipe (fewer switches between
    the two processes): 1 MiB where stdout is a pipe and the kernel allows it."""
    try:
        import fcntl
        import stat
        if stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            fcntl.fcntl(sys.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (OSError, ValueError, AttributeError):
        pass


def lines_writer():
    """A function that writes a block of lines (bytes, each ending in a newline) to stdout:
    straight to its file descriptor by os.writev, so hundreds of MB are not copied once more
    to be joined; through sys.stdout where it has no descriptor (the shell's StringIO)."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):     # io.UnsupportedOperation is both
        return lambda lines: sys.stdout.write(b"".join(lines).decode())

    def write(lines):
        for k in range(0, len(lines), IOV_MAX):
            part = lines[k:k + IOV_MAX]
            done = _when_writable(fd, os.writev, part)
            if done < sum(map(len, part)):      # a short write (a signal): the rest in turn
                rest = b"".join(part)[done:]
                while rest:
                    rest = rest[_when_writable(fd, os.write, rest):]
    return write


def _when_writable(fd, write, data):
    """write(fd, data), waiting while a non-blocking stdout (one a parent set so) is full."""
    while True:
        try:
            return write(fd, data)
        except BlockingIOError:
            import select
            select.select([], [fd], [])


IOV_MAX = 1024      # buffers one writev takes (Linux)
