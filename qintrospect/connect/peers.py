"""Which local process serves a socket: the one peer lookup every front end uses.

Never by connecting to it. QEMU's chardev servers (QMP, the gdbstub) take one client at a
time: a second connection waits in the backlog, and when the client before it leaves, QEMU
accepts it; for a gdbstub that means `vm_stop` (QEMU's gdb_chr_event), a VM paused by a
probe that is long gone. So a socket's owner is read from the kernel's tables: the listening
socket bound to that path or port (/proc/net/unix, /proc/net/tcp, tcp6) and the process that
holds it (/proc/PID/fd). A connection qintrospect already holds asks SO_PEERCRED instead.
"""

import os
import socket
import struct
from typing import Iterable, Optional, Set, Tuple, Union

SocketAddress = Union[str, Tuple[str, int]]
LISTENING = 0x10000          # __SO_ACCEPTCON in /proc/net/unix's Flags
TCP_LISTEN = 0x0A


def connected_peer(sock: Optional[socket.socket]) -> Optional[int]:
    """The pid at the other end of a connected Unix socket (SO_PEERCRED), or None (TCP,
    closed, or the kernel will not say)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[0] or None


def socket_owner(address: SocketAddress) -> Optional[int]:
    """The pid of the one process holding the listening socket at `address` (a Unix socket
    path, or a (host, port) pair on this host), without connecting to it; None when no
    process or more than one is found (never a guess)."""
    if isinstance(address, str):
        inodes = _unix_listeners(address)
    else:
        inodes = _tcp_listeners(address[1])
    if not inodes:
        return None
    owners = set(_holders(inodes, address if isinstance(address, str) else None))
    return owners.pop() if len(owners) == 1 else None


def _unix_listeners(path: str) -> dict:
    """{socket inode: the path as bound} of listening Unix sockets that may be `path`: the
    same absolute path, or a relative one with the same last part (checked against the
    owner's folder later)."""
    want = os.path.abspath(path)
    name = os.path.basename(want)
    out = {}
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) < 8:
                    continue
                try:
                    flags, inode = int(fields[3], 16), int(fields[6])
                except ValueError:
                    continue
                bound = os.fsdecode(fields[7].rstrip(b"\n"))
                if not flags & LISTENING or bound.startswith("@"):
                    continue
                if bound == want or (not os.path.isabs(bound)
                                     and os.path.basename(bound) == name):
                    out[inode] = bound
    except OSError:
        pass
    return out


def _tcp_listeners(port: int) -> dict:
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    try:
                        local, state, inode = fields[1], int(fields[3], 16), int(fields[9])
                        if state == TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                            out[inode] = None
                    except (IndexError, ValueError):
                        continue
        except OSError:
            continue
    return out


def _holders(inodes: dict, path: Optional[str]) -> Iterable[int]:
    """The pids with one of `inodes` open; a relative Unix path counts only where it names
    `path` from that process's folder."""
    links = {f"socket:[{inode}]": bound for inode, bound in inodes.items()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        seen: Set[str] = set()
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link in links and link not in seen:
                seen.add(link)
                if _same_path(entry, links[link], path):
                    yield int(entry)


def _same_path(pid: str, bound: Optional[str], path: Optional[str]) -> bool:
    if path is None or bound is None or os.path.isabs(bound):
        return True
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return os.path.realpath(os.path.join(cwd, bound)) == os.path.realpath(path)
