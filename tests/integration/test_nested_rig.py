"""The nested rig (vm/nested): L0 = this machine, L1 = Linux running QEMU, L2 = the oracle guest.

From L0 only: L2's QMP and gdbstub through L1's serial lines (Unix sockets at L0), L1's own QMP,
and one L2 value followed by hand down to L0 (GVA -> L2 GPA -> L2-QEMU HVA = L1 GVA -> L1 GPA
-> L1-QEMU HVA at L0 -> HPA), with the same 8 bytes at every step.

These tests FAIL (not skip) when the rig is not built: run vm/nested/build.sh first.
Every socket read has a timeout; gdb runs with a subprocess timeout.
"""

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import time

import pytest

from vm.nested.rig import NestedNotBuilt, NestedRig, SerialQMP, SerialRSP, drain_socket

pytestmark = pytest.mark.vm

PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1
GDB_TIMEOUT = 120


def _require_built():
    try:
        NestedRig.check_built()
    except NestedNotBuilt as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def rig():
    _require_built()
    r = NestedRig()
    t0 = time.monotonic()
    try:
        r.start()
    except BaseException:
        r.stop()
        raise
    print(f"\nnested rig up in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{k}={v:.2f}" for k, v in r.timings.items()))
    try:
        yield r
    finally:
        r.stop()


def _mapping(rig, name):
    for m in rig.l2_maps:
        if m.name == name:
            return m
    raise AssertionError(f"the oracle listed no mapping named {name!r}")


def _hex_after(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in {text!r}"
    return int(m.group(1), 16)


def _gdb(rig, *commands):
    """Run a real gdb at L0 against L2's gdbstub socket; return its stdout+stderr."""
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", "set remotetimeout 20", "-ex", f"target remote {rig.l2_gdb_path}"]
    for c in commands:
        argv += ["-ex", c]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=GDB_TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    return out


def _l2_qemu_alive(rig):
    out = rig.run_l1(f"cat /proc/{rig.l2_qemu_pid_in_l1}/comm")
    return rig.last_status == 0 and out.startswith("qemu-system")


def _l2_status(rig):
    with SerialQMP(rig.l2_qmp_path) as q:
        return q.cmd("query-status")["status"]


def _set_l2_running(rig, running):
    with SerialQMP(rig.l2_qmp_path) as q:
        if q.cmd("query-status")["running"] != running:
            q.cmd("cont" if running else "stop")


# ---------------------------------------------------------------------------------- the rig

def test_rig_is_up(rig):
    assert rig.l1_pid and os.path.exists(f"/proc/{rig.l1_pid}")
    for p in (rig.l1_qmp_path, rig.l2_qmp_path, rig.l2_gdb_path, rig.l2_console_path):
        assert os.path.exists(p), p
    assert re.fullmatch(r"127\.0\.0\.1:\d+", rig.l1_gdb_address)
    assert rig.l2_ready_line.startswith("ORACLE READY mode=4level")
    assert rig.l2_ready["mode"] == "4level"
    assert rig.l2_output.error is None
    names = {m.name for m in rig.l2_maps}
    assert {"4k", "read-only", "large-2m", "huge-1g", "upper"} <= names
    for key in ("l1_prompt", "l2_first_output", "l2_ready"):
        assert rig.timings[key] > 0, key
    # The greeting went by while only the rig listened.
    assert rig.l2_qmp_greeting["QMP"]["version"]["qemu"]["major"] >= 7
    # L2's QEMU is a process in L1, and its maps show the QEMU binary and the oracle image.
    assert _l2_qemu_alive(rig)
    maps = rig.run_l1(f"cat /proc/{rig.l2_qemu_pid_in_l1}/maps")
    assert "/usr/bin/qemu-system-x86_64" in maps
    out = rig.run_l1("echo $((6*7))")
    assert out.strip() == "42" and rig.last_status == 0


# ---------------------------------------------------------------------------------- L2 QMP

def test_l2_qmp_raw_json_without_greeting(rig):
    """Speak first: no greeting comes; qmp_capabilities then query-status, raw JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(rig.l2_qmp_path)
        assert b"QMP" not in drain_socket(s, quiet=0.3)   # no greeting for a late client
        buf = b""

        def call(obj):
            nonlocal buf
            s.sendall(json.dumps(obj).encode() + b"\n")
            deadline = time.monotonic() + 20
            while True:
                while b"\n" not in buf:
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = s.recv(65536)
                    assert chunk, "connection closed"
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                reply = json.loads(line)
                if reply.get("id") == obj["id"]:
                    return reply

        neg = call({"execute": "qmp_capabilities", "id": "neg"})
        # {} the first time; "already complete" if an earlier client negotiated: the monitor's
        # session outlives L0 connections.
        assert neg.get("return") == {} or "already complete" in neg["error"]["desc"], neg
        t = time.monotonic()
        st = call({"execute": "query-status", "id": "st"})
        print(f"\nL2 query-status over the serial line: {1000 * (time.monotonic() - t):.1f} ms")
        assert st["return"]["status"] in ("running", "paused")


def test_l2_qmp_gva2gpa_and_gpa2hva(rig):
    """HMP gva2gpa equals the oracle's pa for every mapping; gpa2hva lands in L2's QEMU."""
    with SerialQMP(rig.l2_qmp_path) as q:
        checked = 0
        for m in rig.l2_maps:
            if m.fault != "none":
                continue
            out = q.hmp(f"gva2gpa {m.va:#x}")
            assert _hex_after(r"gpa: (0x[0-9a-f]+)", out) == m.pa, (m, out)
            checked += 1
        assert checked >= 10
        m = _mapping(rig, "4k")
        t = time.monotonic()
        out = q.hmp(f"gpa2hva {m.pa:#x}")
        print(f"\nL2 gpa2hva {m.pa:#x}: {out.strip()} ({1000 * (time.monotonic() - t):.1f} ms)")
    hva = _hex_after(r"is (0x[0-9a-f]+)", out)
    # The HVA is inside an anonymous rw mapping of L2's QEMU (in L1) big enough for its RAM.
    maps = rig.run_l1(f"cat /proc/{rig.l2_qemu_pid_in_l1}/maps")
    for line in maps.splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= hva < hi:
            assert line.split()[1].startswith("rw"), line
            assert hi - lo >= 64 << 20, line
            break
    else:
        raise AssertionError(f"HVA {hva:#x} is in no mapping of L2's QEMU:\n{maps}")
    entry = rig.l1_pagemap_entry(rig.l2_qemu_pid_in_l1, hva)
    assert entry & PRESENT, f"pagemap entry {entry:#x}"


def test_l2_qmp_survives_junk_and_unread_replies(rig):
    """A client that left half a command or an unread reply does not confuse the next one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(rig.l2_qmp_path)
        s.sendall(b'{"execute": "query-name", "id": "unread"}\n{"execute": "query-')
    with SerialQMP(rig.l2_qmp_path) as q:
        assert q.cmd("query-status")["status"] in ("running", "paused")
        assert "gpa: 0x300000" in q.hmp("gva2gpa 0x10000000")


def test_l2_qmp_with_qemu_qmp_client(rig):
    """qemu.qmp's QMPClient works too with await_greeting=False, negotiate=False."""
    from qemu.qmp import ExecuteError, QMPClient

    async def go():
        client = QMPClient("l2-over-serial")
        client.await_greeting = False
        client.negotiate = False
        await asyncio.wait_for(client.connect(rig.l2_qmp_path), 20)
        try:
            try:
                await asyncio.wait_for(client.execute("qmp_capabilities"), 20)
            except ExecuteError as e:
                assert "already complete" in str(e)
            return await asyncio.wait_for(client.execute("query-status"), 20)
        finally:
            await asyncio.wait_for(client.disconnect(), 20)

    assert asyncio.run(go())["status"] in ("running", "paused")


# ---------------------------------------------------------------------------------- L2 gdbstub

def test_l2_gdb_reads_cr3_then_disconnects(rig):
    """gdb at L0 reads L2's CR3 through the serial gdbstub, twice in a row. It ends with
    `disconnect`, as qintrospect does: over a serial line the stub never sees a connection end,
    and after a `detach` the next debugger's first query crashes QEMU 7.2 (NULL CPU). L2 stays
    paused after a disconnect; QMP resumes it."""
    for _ in range(2):
        _set_l2_running(rig, True)
        out = _gdb(rig, "p/x $cr3", "disconnect")
        assert _hex_after(r"\$1 = (0x[0-9a-f]+)", out) == int(rig.l2_ready["cr3"], 16), out
        assert _l2_status(rig) == "paused"
    _set_l2_running(rig, True)
    assert _l2_qemu_alive(rig)
    assert _l2_status(rig) == "running"


def test_l2_gdb_physical_read_gives_fill_value(rig):
    m = _mapping(rig, "4k")
    fill = rig.l2_output.fills[m.pa]
    out = _gdb(rig,
               "maint packet qqemu.PhyMemMode",
               "maint packet Qqemu.PhyMemMode:1",
               f"x/gx {m.pa:#x}",
               f"x/gx {m.pa + 0x1000:#x}",
               "maint packet Qqemu.PhyMemMode:0",
               f"x/gx {m.va:#x}",
               "disconnect")
    before = re.search(r'received: "(\d)"', out)
    assert before, out
    values = [int(v, 16) for v in re.findall(r":\s+(0x[0-9a-f]+)", out)]
    assert values[0] == fill, out                                  # physical pa
    assert values[1] == rig.l2_output.fills[m.pa + 0x1000], out    # the next page: read-only's frame
    assert values[2] == fill, out                                  # virtual va, mode put back
    # The mode is put back to what it was (0 unless someone left it on).
    with SerialRSP(rig.l2_gdb_path) as r:
        r.wake()
        assert r.packet("qqemu.PhyMemMode") == before.group(1)
    _set_l2_running(rig, True)


def test_l2_raw_rsp_over_serial(rig):
    """A raw RSP client: sacrificial byte first, then packets; physical reads; L2 left running."""
    m = _mapping(rig, "large-2m")
    _set_l2_running(rig, True)
    with SerialRSP(rig.l2_gdb_path) as r:
        r.wake()
        assert _l2_status(rig) == "paused"        # the first byte stopped L2
        assert "PacketSize" in r.packet("qSupported:multiprocess+")
        r.packet("qXfer:features:read:target.xml:0,ffb")
        cr3 = int.from_bytes(bytes.fromhex(r.packet("p1d")), "little")
        assert cr3 == int(rig.l2_ready["cr3"], 16)
        old = r.packet("qqemu.PhyMemMode")
        assert r.packet("Qqemu.PhyMemMode:1") == "OK"
        try:
            t = time.monotonic()
            data = r.read_memory(m.pa, 0x1000)
            print(f"\n4 KiB physical read over the serial gdbstub: {1000 * (time.monotonic() - t):.1f} ms")
            last = r.read_memory(m.pa + m.size - 8, 8)
        finally:
            r.packet(f"Qqemu.PhyMemMode:{old}")
    assert struct.unpack_from("<Q", data)[0] == rig.l2_output.fills[m.pa]
    assert struct.unpack("<Q", last)[0] == rig.l2_output.fills[m.pa + m.size - 8]
    _set_l2_running(rig, True)


# ---------------------------------------------------------------------------------- L1 and the chain

def test_l1_qmp_answers(rig):
    assert rig.qmp("query-status")["status"] == "running"
    cpus = rig.qmp("query-cpus-fast")
    assert len(cpus) == 1 and cpus[0]["thread-id"] > 0
    assert "CR3=" in rig.hmp("info registers")


def test_l2_value_down_to_l0(rig):
    """L2 GVA -> L2 GPA -> HVA in L2's QEMU (= L1 GVA) -> L1 GPA -> HVA in L1's QEMU -> HPA,
    with the oracle's fill value at every step that can be read."""
    m = _mapping(rig, "4k")
    fill = rig.l2_output.fills[m.pa]
    steps = [f"L2 GVA {m.va:#x}"]

    # L2: GVA -> GPA (QEMU's walk) and GPA -> HVA in L2's QEMU, through L2's QMP.
    with SerialQMP(rig.l2_qmp_path) as q:
        assert _hex_after(r"gpa: (0x[0-9a-f]+)", q.hmp(f"gva2gpa {m.va:#x}")) == m.pa
        xp = q.hmp(f"xp /1gx {m.pa:#x}")
        hva2 = _hex_after(r"is (0x[0-9a-f]+)", q.hmp(f"gpa2hva {m.pa:#x}"))
    assert _hex_after(r":\s*(0x[0-9a-f]+)", xp) == fill
    steps.append(f"L2 GPA {m.pa:#x}")
    steps.append(f"HVA in L2's QEMU (pid {rig.l2_qemu_pid_in_l1} in L1) {hva2:#x}")

    # L1: that HVA -> L1 GPA, from L1's own /proc/PID/pagemap.
    entry = rig.l1_pagemap_entry(rig.l2_qemu_pid_in_l1, hva2)
    assert entry & PRESENT, f"{entry:#x}"
    l1_gpa = (entry & PFN_MASK) << 12 | (hva2 & 0xFFF)
    assert _hex_after(r":\s*(0x[0-9a-f]+)", rig.hmp(f"xp /1gx {l1_gpa:#x}")) == fill
    steps.append(f"L1 GPA {l1_gpa:#x}")

    # The same through L1's MMU: with L1 paused while L2's QEMU is its current process (L1
    # idles with the last user process's CR3: L2's QEMU wakes for its timers, nothing else
    # runs), L1's gva2gpa of the HVA gives the same L1 GPA.
    seen = []
    for attempt in range(20):
        time.sleep(0.05 * (1 + attempt % 4))
        rig.qmp("stop")
        try:
            regs = rig.hmp("info registers")
            out = rig.hmp(f"gva2gpa {hva2:#x}")
        finally:
            rig.qmp("cont")
        cr3 = _hex_after(r"CR3=([0-9a-f]+)", regs)
        got = re.search(r"gpa: (0x[0-9a-f]+)", out)
        seen.append((hex(cr3), out.strip()))
        if got and int(got.group(1), 16) == l1_gpa:
            steps.append(f"(L1 CR3 {cr3:#x}: gva2gpa agrees, attempt {attempt + 1})")
            break
    else:
        raise AssertionError(f"L1 never paused with L2's QEMU current: {seen}")

    # L0: L1 GPA -> HVA in L1's QEMU -> bytes and pagemap (HPA of this machine).
    hva1 = _hex_after(r"is (0x[0-9a-f]+)", rig.hmp(f"gpa2hva {l1_gpa:#x}"))
    with open(f"/proc/{rig.l1_pid}/pagemap", "rb") as f:
        f.seek((hva1 >> 12) * 8)
        pm = struct.unpack("<Q", f.read(8))[0]
    assert pm & PRESENT, f"{pm:#x}"     # look before reading: /proc/PID/mem would fault it in
    fd = os.open(f"/proc/{rig.l1_pid}/mem", os.O_RDONLY)
    try:
        value = struct.unpack("<Q", os.pread(fd, 8, hva1))[0]
    finally:
        os.close(fd)
    assert value == fill, f"{value:#x} != {fill:#x}"
    steps.append(f"HVA in L1's QEMU (pid {rig.l1_pid}) {hva1:#x}")
    if pm & PFN_MASK:
        steps.append(f"HPA {(pm & PFN_MASK) << 12 | (hva1 & 0xFFF):#x}")
    print("\n" + " -> ".join(steps) + f"; value {fill:#x} at each")
