"""`scripts/bench --quick --json` on the bundled guest: it boots the 256 MiB guest, runs every
measurement once with small N (no 2 GiB guest) and prints one JSON object. Checked: every field
the table is built from is there with the right type and sign, every comparison with QEMU's own
monitor in the same run agrees, every target is a boolean (tests/unit/test_bench_smoke.py,
check_bench_json). Not checked: how fast anything is (two shared cores, other guests running).
"""

import json
import os
import subprocess

import pytest

from tests.unit.test_bench_smoke import check_bench_json
from vm.guest import Guest

pytestmark = pytest.mark.vm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_quick_json():
    Guest.check_built()      # fails (not skips) with "run vm/build.sh" when the guest is missing
    proc = subprocess.run([os.path.join(REPO, "scripts", "bench"), "--quick", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    obj = json.loads(proc.stdout)
    check_bench_json(obj, quick=True)
    assert obj["bench"]["params"]["batch_n"] == 20_000
    # The guest QEMU booted is the one this run is about (QI_QEMU, or the system's).
    qemu = obj["bench"]["guests"][0].get("qemu", "")
    want = os.environ.get("QI_QEMU_VERSION")
    assert qemu and (not want or qemu.split(".")[0] == want), (qemu, want)
