"""Fixtures of the hostile tests: short private folders (a Unix socket path has at most 107
bytes), fake QMP servers in the test process, and the real `qintrospect` run as a process."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from .fakeqmp import FakeQmp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="qi-h-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(folder):
    """serve(play) -> the socket path of a FakeQmp playing it (closed after the test)."""
    servers = []

    def start(play, name="qmp.sock"):
        path = os.path.join(folder, name)
        servers.append(FakeQmp(path, play))
        return path
    yield start
    for s in servers:
        s.close()


def run_qi(*args, folder, timeout=60):
    """`python -m qintrospect ARGS` as a process, with its own run-state folder: (exit status,
    stdout, stderr, seconds)."""
    env = dict(os.environ, XDG_RUNTIME_DIR=folder, PYTHONIOENCODING="utf-8")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qintrospect", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def assert_clean(rc, out, err):
    """No bug exit, no traceback, nothing that drives a terminal."""
    assert rc != 4 and "Traceback" not in err and "internal error" not in err, (rc, err)
    for text in (out, err):
        bad = [c for c in text if (ord(c) < 0x20 and c not in "\n") or 0x7F <= ord(c) < 0xA0]
        assert not bad, (bad, text)
