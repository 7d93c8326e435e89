"""scripts/bench.py starts and explains itself without a VM (the bench itself boots guests)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "scripts", "bench.py")


def test_bench_help_runs_without_a_vm():
    out = subprocess.run([sys.executable, BENCH, "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for option in ("--json", "--quick", "--cpu", "--profile"):
        assert option in out.stdout


def test_bench_refuses_an_unknown_profile_name():
    out = subprocess.run([sys.executable, BENCH, "--profile", "nosuch"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "nosuch" in out.stderr
