"""A hostile QMP monitor against each of qintrospect's QMP clients, on real sockets: the QMP
client (QmpMonitor), discovery's probe (`list`, --pid, --name) and a command run as a process
(`qintrospect cpus --qmp SOCK`).

Each play (tests/hostile/fakeqmp.py) is QEMU's conversation with one thing wrong: nesting 100k
deep, fields of the wrong type, a line over the cap, a line cut by the end of the connection,
bytes that are not UTF-8, events between replies (and events that are not events), replies of
other ids first, no greeting at all (a serial line). Each client must end in a clear error
with its documented exit status (3: the monitor broke the protocol; 1: QEMU refused a
command) or with the right answer: never exit 4, never a traceback, never a hang, and never a
byte from the monitor that drives a terminal in what it prints.
"""

import re
import time

import pytest

from qintrospect.connect import discover
from qintrospect.connect.discover import Endpoint
from qintrospect.errors import AttachError, QIError, VMGoneError
from qintrospect.connect.jsonl_socket import PeerClosed, ProtocolError
from qintrospect.connect.qmp import QmpCommandError, QmpMonitor
from qintrospect.present.textsafe import printable

from .conftest import assert_clean, run_qi
from .fakeqmp import PWNED, plays

OK = None
# play: (QmpMonitor: OK, or (error class, what its message says)),
#       (the probe: state, what its detail says), `cpus --qmp`: exit status
EXPECT = {
    "good": (OK, ("answers", "QEMU 7.2.22"), 0),
    "paused": (OK, ("answers", "QEMU 7.2.22"), 0),
    "deep-greeting": ((ProtocolError, "JSON nested too deeply"),
                      ("no answer", "nested too deeply"), 3),
    "deep-reply": ((ProtocolError, "JSON nested too deeply"),
                   ("no answer", "nested too deeply"), 3),
    "deep-unclosed": ((ProtocolError, "JSON nested too deeply"),
                      ("no answer", "nested too deeply"), 3),
    "greeting-qmp-text": ((ProtocolError, r'malformed greeting \("QMP" is not an object\): '
                                          r'\{"QMP": "x"\}'),
                          ("no answer", "malformed greeting"), 3),
    "greeting-version-text": ((ProtocolError, r'malformed greeting \("version" is not an '),
                              ("no answer", "malformed greeting"), 3),
    "greeting-major-text": ((ProtocolError, r'malformed greeting \("qemu" "major" is not an '
                                            r'integer\)'),
                            ("no answer", "malformed greeting"), 3),
    "greeting-array": ((ProtocolError, "a message that is not a JSON object"),
                       ("no answer", "not a QMP greeting"), 3),
    "return-5": ((ProtocolError, r'malformed reply to query-status \("return" is not an '
                                 r'object\): \{"return": 5'),
                 ("no answer", "malformed reply to query-status"), 3),
    "status-number": ((ProtocolError, r'query-status \("status" is not a string\)'),
                      ("no answer", '"status" is not a string'), 3),
    # (cpus asks query-kvm for a fact it can do without, then goes on: the monitor is closed)
    "kvm-enabled-text": ((ProtocolError, r'query-kvm \("enabled" is not true or false\)'),
                         ("no answer", '"enabled" is not true or false'), 3),
    "cpus-item-number": ((ProtocolError, r'query-cpus-fast \("return" item 0: not an '),
                         ("answers", "QEMU 7.2.22"), 3),
    "cpus-index-text": ((ProtocolError, r'item 0: "cpu-index" is not an integer'),
                        ("answers", "QEMU 7.2.22"), 3),
    "hmp-object": ((ProtocolError, r'human-monitor-command \("return" is not a string\)'),
                   ("answers", "QEMU 7.2.22"), 3),
    "capabilities-error-text": ((ProtocolError, r'reply to qmp_capabilities \("error" is not '
                                                r'an object\): \{"error": "boom"'),
                                ("no answer", '"error" is not an object'), 3),
    "error-desc-number": ((ProtocolError, r'\("error" "desc" is not a string\)'),
                          ("no answer", '"desc" is not a string'), 3),
    "error-array": ((ProtocolError, r'\("error" is not an object\)'),
                    ("no answer", '"error" is not an object'), 3),
    "no-return": ((ProtocolError, r'query-status \(neither "return" nor "error"\)'),
                  ("no answer", 'neither "return" nor "error"'), 3),
    "reply-not-object": ((ProtocolError, "a message that is not a JSON object: \\[\\]"),
                         ("no answer", "not a JSON object"), 3),
    "escape-in-error": ((QmpCommandError, re.escape(r"QEMU refused QMP query-status: "
                                                    r"\x1b]0;pwned\x07\x9b2J")),
                        ("answers", "QEMU 7.2.22"), 1),
    "escape-in-capabilities-error": ((AttachError, re.escape(
        r"refused qmp_capabilities: \x1b]0;pwned\x07\x9b2J")), ("answers", "QEMU"), 3),
    "escape-in-status": (OK, ("answers", "QEMU 7.2.22"), 0),
    "huge-greeting": ((ProtocolError, "a line that is not JSON"),
                      ("no answer", "more than 1 MiB without a line end"), 3),
    "partial-then-eof": ((PeerClosed, "closed the connection in the middle of a message "
                                       r"\(26 bytes without a line end\)"),
                         ("no answer", "closed the connection in the middle"), 3),
    "eof-in-greeting": ((PeerClosed, "closed the connection in the middle of a message"),
                        ("in use", "no greeting within"), 3),
    "closes-at-once": ((PeerClosed, "closed the connection$"),
                       ("no answer", "closed the connection"), 3),
    "non-utf8": ((ProtocolError, r"bytes that are not UTF-8 \(at byte 23 of a line\): "
                                 r"b'\{\"return\": \{\"status\": \"\\xff\\xfe\""),
                 ("no answer", "not UTF-8"), 3),
    "non-utf8-greeting": ((ProtocolError, "bytes that are not UTF-8"),
                          ("no answer", "not UTF-8"), 3),
    "not-json": ((ProtocolError, r"a line that is not JSON \(Expecting value.*\): "
                                 r"b'hello\\r'"), ("no answer", "not JSON"), 3),
    "blank-line": ((ProtocolError, "a line that is not JSON"), ("no answer", "not JSON"), 3),
    "long-number": ((ProtocolError, "a line that is not JSON"), ("no answer", "not JSON"), 3),
    "events-between": (OK, ("answers", "QEMU 7.2.22"), 0),
    "event-flood": (OK, ("answers", "QEMU 7.2.22"), 0),
    "event-not-object": ((ProtocolError, "a message that is not a JSON object: 5"),
                         ("no answer", "not a JSON object"), 3),
    "event-name-number": ((ProtocolError, r'malformed event \("event" is not a string\)'),
                          ("no answer", "malformed event"), 3),
    "event-name-missing": ((ProtocolError, r'malformed event \("event" is not a string\)'),
                           ("no answer", "malformed event"), 3),
    "event-data-text": ((ProtocolError, r'malformed event \("data" is not an object\)'),
                        ("no answer", "malformed event"), 3),
    "trailing-events": (OK, ("answers", "QEMU 7.2.22"), 0),
    "trailing-bad-event": ((ProtocolError, r'malformed event \("event" is not a string\): '
                                           r'\{"event": \["RESET"\]\}'),
                           ("no answer", "malformed event"), 3),
    "wrong-id-first": (OK, ("answers", "QEMU 7.2.22"), 0),
    "no-greeting": (OK, ("in use", "no greeting within"), 0),
    "no-greeting-stale-error": (OK, ("in use", "no greeting within"), 0),
    "silent": ((AttachError, r"did not answer within 1 s"), ("in use", "no greeting"), 3),
}
SLOW = {"huge-line"}       # 64 MiB through the socket: its own tests below


def test_every_play_has_an_expectation():
    assert set(EXPECT) | SLOW == set(plays())


def converse(path, timeout=1.0):
    """What a session asks first, through QmpMonitor: (answers, event names seen)."""
    m = QmpMonitor(path, timeout)
    m.connect()
    seen = []
    m.listeners.append(seen.append)
    try:
        answers = (m.command("query-status"), m.command("query-kvm"),
                   m.command("query-cpus-fast"), m.hmp("info registers"))
        return answers, seen
    finally:
        m.close()


@pytest.mark.parametrize("play", sorted(EXPECT))
def test_the_qmp_client(play, serve):
    path = serve(play)
    expected = EXPECT[play][0]
    t0 = time.monotonic()
    if expected is OK:
        (status, kvm, cpus, regs), seen = converse(path)
        assert status["status"] in ("running", "paused", PWNED + "\ud800")
        assert kvm == {"enabled": False, "present": True}
        assert cpus[0]["cpu-index"] == 0 and "CR3=" in regs
        if play == "events-between":
            assert seen == ["STOP", "RESUME", "VNC_CONNECTED"] * 4
        if play == "event-flood":
            assert len(seen) == 20000
    else:
        cls, words = expected
        with pytest.raises(QIError) as info:
            converse(path)
        exc = info.value
        assert type(exc) is cls, (type(exc), exc)
        assert re.search(words, str(exc)), str(exc)
        assert exc.exit_status == (1 if cls is QmpCommandError else 3)
        assert printable(str(exc)) == str(exc)           # nothing that drives a terminal
        if cls is not QmpCommandError:
            assert path in str(exc)                      # names the socket
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("play", sorted(EXPECT))
def test_the_discovery_probe(play, serve):
    path = serve(play)
    state, words = EXPECT[play][1]
    ep = Endpoint("qmp", f"-qmp unix:{path},server=on,wait=off", "unix", path=path, server=True)
    t0 = time.monotonic()
    discover._probe_qmp(ep, 1.0)
    assert time.monotonic() - t0 < 4
    assert ep.state == state and words in ep.detail, (ep.state, ep.detail)
    if state == "answers" and play in ("good", "events-between", "wrong-id-first",
                                       "event-flood"):
        assert ep.run_state == "running" and ep.kvm is False
    if state == "no answer":
        assert ep.run_state is None and ep.kvm is None   # nothing it said is kept
        assert f"(no answer: {ep.detail[:20]}" in ep.short()
    assert printable(ep.detail) == ep.detail


@pytest.mark.parametrize("play", sorted(EXPECT))
def test_a_command_as_a_process(play, serve, folder):
    path = serve(play)
    rc, out, err, seconds = run_qi("cpus", "--qmp", path, "--timeout", "1", folder=folder)
    assert_clean(rc, out, err)
    assert rc == EXPECT[play][2], (rc, err)
    assert seconds < 20
    if rc == 0:
        assert out.startswith("vCPU 0  host thread") and "CR3 0x28f4000" in out, out
    else:
        assert err.startswith("qintrospect: ") and len(err.splitlines()) == 1, err
        words = EXPECT[play][0][1]
        # the message as the client said it, escapes and all
        assert re.search(words.replace("$", ""), err), err


def test_resume_says_a_hostile_status_safely(serve, folder):
    """`resume` prints the run state QMP gave: escaped, whatever it holds."""
    rc, out, err, _ = run_qi("resume", "--qmp", serve("escape-in-status"), folder=folder)
    assert_clean(rc, out, err)
    assert rc == 2 and r"\x1b]0;pwned\x07" in err, err
    rc, out, err, _ = run_qi("resume", "--qmp", serve("wrong-id-first", "q2.sock"),
                             folder=folder)
    assert_clean(rc, out, err)
    assert rc == 0 and out == "the VM is already running\n", (rc, out, err)


# ---- a line over the 64 MiB cap ------------------------------------------------------------

def test_a_line_over_the_cap_is_refused_in_linear_time(serve, folder):
    """64 MiB and a byte without a line end: refused as soon as the cap is passed. The line
    end is searched for only in new bytes (this took 35 s when each 64 KiB piece made the
    whole buffer be searched and copied again)."""
    path = serve("huge-line")
    m = QmpMonitor(path, 20).connect()
    t0 = time.monotonic()
    try:
        with pytest.raises(ProtocolError, match="more than 64 MiB without a line end"):
            m.command("query-status")
    finally:
        m.close()
    assert time.monotonic() - t0 < 8
    rc, out, err, seconds = run_qi("cpus", "--qmp", serve("huge-line", "q2.sock"), "--timeout",
                                   "20", folder=folder)
    assert_clean(rc, out, err)
    assert rc == 3 and "more than 64 MiB without a line end" in err, err
    assert seconds < 10


def test_the_probe_takes_1_mib_at_most(serve):
    ep = Endpoint("qmp", "-qmp x", "unix", path=serve("huge-line"), server=True)
    discover._probe_qmp(ep, 2.0)
    assert ep.state == "no answer" and "more than 1 MiB without a line end" in ep.detail


# ---- between commands ---------------------------------------------------------------------

def test_events_between_commands_are_taken_without_waiting(serve):
    m = QmpMonitor(serve("trailing-events"), 2).connect()
    seen = []
    m.listeners.append(seen.append)
    try:
        m.command("query-status")
        for _ in range(100):
            m.poll()
            if len(seen) == 2:
                break
            time.sleep(0.01)
        assert seen == ["STOP", "RESET"]
    finally:
        m.close()


def test_a_bad_event_between_commands_ends_the_connection(serve):
    """After a protocol error the monitor is not talked to again: its lines can no longer be
    told apart (a line over the cap goes on after the error)."""
    m = QmpMonitor(serve("trailing-bad-event"), 2).connect()
    m.command("query-status")
    with pytest.raises(ProtocolError, match="malformed event"):
        for _ in range(100):
            m.poll()
            time.sleep(0.01)
    with pytest.raises(VMGoneError, match="not talked to since it broke the protocol: "
                                          "malformed event"):
        m.command("query-status")


@pytest.mark.parametrize("play", ["deep-reply", "return-5", "not-json"])
def test_after_a_protocol_error_the_monitor_is_closed(play, serve):
    m = QmpMonitor(serve(play), 2).connect()
    with pytest.raises(ProtocolError):
        m.command("query-status")
    assert m._sock is None
    with pytest.raises(VMGoneError, match="not talked to since it broke the protocol") as e:
        m.command("query-kvm")
    assert e.value.exit_status == 3 and m._where in str(e.value)
