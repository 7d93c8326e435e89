"""Fixtures that boot the bundled guest in a real QEMU and run the real qintrospect command."""

import contextlib
import json
import os
import subprocess
import sys

import pytest

from vm.guest import Guest, default_qemu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, input=None, timeout=120):
    """Run `python -m qintrospect ARGS`; return (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "qintrospect", *map(str, args)], cwd=REPO,
                          input=input, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def run_json(*args, **kw):
    """Run a --json command; return (exit status, [objects], stderr)."""
    rc, out, err = run_cli(*args, "--json", **kw)
    return rc, [json.loads(line) for line in out.splitlines() if line.strip()], err


def boot(cpu, smp=1, probe="spin", memory="256M", append_extra="", extra_args=(),
         gdb_unix=False, kernel=None):
    Guest.check_built()  # fails (not skips) with "run vm/build.sh" when the guest is missing
    guest = Guest(cpu=cpu, smp=smp, memory=memory, append_extra=append_extra,
                  extra_args=extra_args, gdb_unix=gdb_unix, kernel=kernel)
    try:
        guest.start()
        if probe:
            guest.start_probe(probe)
    except BaseException:
        guest.stop()
        raise
    return guest


@contextlib.contextmanager
def booted(cpu="max", **options):
    """The bundled guest for the length of a `with` (or a fixture): see boot()."""
    guest = boot(cpu, **options)
    try:
        yield guest
    finally:
        guest.stop()


@pytest.fixture(scope="module", params=["max", "qemu64"])
def guest(request):
    """The bundled guest with the probe spinning, under -cpu max (5-level, SMEP/SMAP, PKE)
    and -cpu qemu64 (4-level)."""
    with booted(request.param) as g:
        yield g


def kernel_half_roots(root: str) -> list:
    """who-maps --cr3 arguments that reach an x86 guest's kernel half from a process's root:
    the root, and under KPTI (a user copy: bit 12 set) the kernel copy 4 KiB below it."""
    r = int(root, 16)
    out = ["--cr3", hex(r)]
    return out + (["--cr3", hex(r - 0x1000)] if r & 0x1000 else [])


def attach_args(g):
    return ["--qmp", g.qmp_path, "--gdb", g.gdb_address]


def pytest_terminal_summary(terminalreporter):
    """Say which QEMU the integration tests booted ($QI_QEMU or the system's), even under -q."""
    qemu = default_qemu()
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
        version = out.stdout.splitlines()[0] if out.stdout else f"--version failed: {out.stderr}"
    except (OSError, subprocess.TimeoutExpired) as e:
        version = f"not runnable: {e}"
    terminalreporter.write_line(f"integration tests' QEMU: {qemu}: {version}")
