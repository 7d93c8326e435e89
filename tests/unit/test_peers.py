"""The owner of a socket, from the kernel's tables, never by connecting (peers.py): real
listening sockets held by real processes; a second connection is never queued."""

import socket
import subprocess
import sys
import time

from qintrospect.connect.peers import connected_peer, socket_owner

SERVE = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX if sys.argv[1] == 'unix' else socket.AF_INET)
s.bind(sys.argv[2] if sys.argv[1] == 'unix' else ('127.0.0.1', 0))
s.listen(1)
print(s.getsockname() if sys.argv[1] == 'unix' else s.getsockname()[1], flush=True)
time.sleep(60)
"""


def serve(kind, where, cwd=None):
    p = subprocess.Popen([sys.executable, "-c", SERVE, kind, where], stdout=subprocess.PIPE,
                         text=True, cwd=cwd)
    name = p.stdout.readline().strip()
    return p, name


def test_a_unix_listener_is_found_without_a_connection(tmp_path):
    path = str(tmp_path / "qmp.sock")
    p, _ = serve("unix", path)
    try:
        assert socket_owner(path) == p.pid
        # nothing was queued: the first client is accepted as the first (no probe before it)
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        assert connected_peer(c) == p.pid
        c.close()
    finally:
        p.kill()
        p.wait()


def test_a_relative_bound_path_counts_only_from_its_owners_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa, _ = serve("unix", "gdb.sock", cwd=str(tmp_path / "a"))
    pb, _ = serve("unix", "gdb.sock", cwd=str(tmp_path / "b"))
    try:
        assert socket_owner(str(tmp_path / "a" / "gdb.sock")) == pa.pid
        assert socket_owner(str(tmp_path / "b" / "gdb.sock")) == pb.pid
        assert socket_owner(str(tmp_path / "gdb.sock")) is None
    finally:
        for p in (pa, pb):
            p.kill()
            p.wait()


def test_a_tcp_listener_and_nothing_there(tmp_path):
    p, port = serve("tcp", "")
    try:
        assert socket_owner(("127.0.0.1", int(port))) == p.pid
    finally:
        p.kill()
        p.wait()
    time.sleep(0.1)
    assert socket_owner(("127.0.0.1", int(port))) is None
    assert socket_owner(str(tmp_path / "missing.sock")) is None
    assert connected_peer(None) is None


def test_two_processes_holding_one_listener_are_not_guessed_between(tmp_path):
    """A listening socket inherited by a child is held by two processes: no answer, not the
    first one found."""
    path = str(tmp_path / "shared.sock")
    code = ("import os, socket, time\n"
            f"s = socket.socket(socket.AF_UNIX); s.bind({path!r}); s.listen(1)\n"
            "os.set_inheritable(s.fileno(), True)\n"
            "pid = os.fork()\n"
            "print('ready', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() and p.stdout.readline()
        assert socket_owner(path) is None
    finally:
        subprocess.run(["pkill", "-f", path], check=False)   # the parent and its child
        p.wait()
