"""RAM the guest's chipset switches (PAM) and RAM seen at two addresses (the BIOS), on a real
QEMU that has not started yet (-S: SeaBIOS has not shadowed itself into RAM).

Before the VM runs, 0xe0000-0xfffff is the BIOS ROM (pc.bios, the same bytes QEMU also maps
below 4 GiB); once SeaBIOS ran, PAM makes it RAM (pc.ram). A shell keeps its RAM map across
commands: it must read the map again before a look into that range, and who-maps must name
both GPAs of an aliased HVA."""

import json
import os
import subprocess
import sys
import time

import pytest

from vm.guest import default_qemu, qmp_once

from .conftest import REPO

pytestmark = pytest.mark.vm


@pytest.fixture
def bios_vm(tmp_path):
    """QEMU at reset, paused (-S), no guest kernel: SeaBIOS alone. Two QMP sockets: one for
    qintrospect, one for the test (the VM's owner)."""
    qmp, owner = str(tmp_path / "qmp.sock"), str(tmp_path / "owner.sock")
    proc = subprocess.Popen([default_qemu(), "-nodefaults", "-display", "none", "-S", "-m",
                             "64M", "-qmp", f"unix:{qmp},server=on,wait=off",
                             "-qmp", f"unix:{owner},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        if os.path.exists(qmp) and os.path.exists(owner):
            break
        time.sleep(0.05)
    try:
        yield qmp, owner
    finally:
        proc.kill()
        proc.wait()


def block_of(qmp, owner, gpa):
    return qmp_once(owner, "human-monitor-command", **{"command-line": f"gpa2hva {gpa:#x}"})


def test_who_maps_names_every_gpa_of_an_aliased_hva(bios_vm):
    qmp, owner = bios_vm
    text = block_of(qmp, owner, 0xF0000)
    assert "(pc.bios)" in text, text                      # the ROM, before SeaBIOS runs
    hva = int(text.rsplit(" ", 1)[1], 16)
    r = subprocess.run([sys.executable, "-m", "qintrospect", "who-maps", "--qmp", qmp,
                        "--hva", hex(hva), "--json"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode in (0, 1), r.stderr
    gpas = sorted(json.loads(line)["gpa"] for line in r.stdout.splitlines())
    assert gpas == ["0xf0000", "0xffff0000"], r.stdout      # isa-bios, and pc.bios below 4 GiB


def test_the_shell_reads_the_map_again_after_the_chipset_switched_it(bios_vm):
    """At -S, GPA 0xf0000 is the BIOS ROM; once SeaBIOS ran (its owner resumed the VM), PAM
    made it RAM. The shell's next look there reads QEMU's map again (before, it kept the map
    from its attach and named a block that is no longer there)."""
    qmp, owner = bios_vm
    sh = subprocess.Popen([sys.executable, "-m", "qintrospect", "shell", "--qmp", qmp],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, bufsize=1, cwd=REPO)
    try:
        def ask(line):
            sh.stdin.write(line + "\n")
            sh.stdin.flush()
            return sh.stdout.readline()

        before = json.loads(ask("who-maps --gpa 0xf0000 --json"))
        assert before["gpa"] == "0xf0000" and before["ram_block"] == "pc.bios", before
        # `cr3` (a builtin that reads nothing) answers only once who-maps is over, its look at
        # QEMU's events included: the owner's resume comes between two commands, as a user's
        # would, not during one (which the shell would rightly report)
        assert ask("cr3").startswith("root: vCPU 0's CR3")
        qmp_once(owner, "cont")
        for _ in range(50):                                  # SeaBIOS shadows itself
            if "(pc.ram)" in block_of(qmp, owner, 0xF0000):
                break
            time.sleep(0.1)
        after = json.loads(ask("who-maps --gpa 0xf0000 --json"))
        assert after["ram_block"] == "pc.ram", after
    finally:
        sh.stdin.close()
        rc = sh.wait(timeout=60)
    err = sh.stderr.read()
    assert rc in (0, 1) and "qintrospect:" not in err, err    # (1: no guest mapping found)
