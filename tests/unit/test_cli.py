"""The command line without a VM: numbers, usage errors and their exit statuses."""

import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from qintrospect.cli import main
from qintrospect.frontend.addresses import read_addresses, parse_number
from qintrospect.errors import UsageError


@pytest.mark.parametrize("text,value", [
    ("0x7f12345673e8", 0x7F12345673E8), ("0XFFFF888000100000", 0xFFFF888000100000),
    ("4096", 4096), ("0xffff_8880_0010_0000", 0xFFFF888000100000), ("0", 0),
    ("0xffffffffffffffff", (1 << 64) - 1),
])
def test_numbers_follow_gdb_and_qemu(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text,words", [
    ("ffff8880", "0x prefix"), ("-5", "negative"), ("0x1ffffffffffffffff", "64 bits"),
    ("12ab", "0x prefix"), ("0xzz", "not a number"), ("", "not a number"), ("1.5", "not a number"),
])
def test_bad_numbers_say_why(text, words):
    with pytest.raises(UsageError, match=words):
        parse_number(text)


@given(st.one_of(
    st.integers(0, (1 << 66)).map(hex),
    st.text(alphabet="0123456789abcdefxX_` +-\t", max_size=24),
    st.text(max_size=12).map(lambda t: "0x" + t)))
@settings(max_examples=600, deadline=None)
def test_the_stream_reader_reads_as_parse_number(text):
    """translate -'s reader takes plain 0x-hex by int() alone: the same value or the same
    refusal as parse_number, whatever the line."""
    try:
        want = parse_number(text) if text.strip() else None
    except UsageError:
        for line in (text + "\n", (text + "\n").encode()):
            with pytest.raises(UsageError):
                list(read_addresses([line]))
        return
    assert list(read_addresses([text + "\n"])) == ([] if want is None else [want])
    assert list(read_addresses([(text + "\n").encode()])) == ([] if want is None else [want])


def _read_all(lines):
    """What a reader gives: the values up to the first refusal, and whether there was one."""
    got = []
    try:
        for value in lines:
            got.append(value)
    except UsageError:
        return got, True
    return got, False


_LINE = st.one_of(st.integers(0, (1 << 66)).map(hex),
                  st.text(alphabet="0123456789abcdefxX_` +-\t", max_size=24),
                  st.text(max_size=12).map(lambda t: "0x" + t))


@given(st.lists(_LINE, max_size=8))
@settings(max_examples=600, deadline=None)
def test_the_stream_reader_reads_a_batch_as_parse_number_reads_each_line(texts):
    """A batch of lines read at once (the fast path looks at them together) gives what
    parse_number gives line by line, up to the same first refusal."""
    def one_by_one():
        for text in texts:
            if text.strip():
                yield parse_number(text)
    want = _read_all(one_by_one())
    assert _read_all(read_addresses([t + "\n" for t in texts])) == want
    assert _read_all(read_addresses([(t + "\n").encode() for t in texts])) == want


def test_a_bad_address_in_a_stream_is_named_by_its_line():
    lines = ["0x1000\n"] * 5000 + ["\n", "0x2000\n", "  ffff8880 \n", "0x3000\n"]
    with pytest.raises(UsageError, match=r"^line 5003 of the addresses: address 'ffff8880' "
                                         r"is not a number \(hex needs a 0x prefix\)$"):
        list(read_addresses(lines))


def run(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "qintrospect", *args], capture_output=True,
                          text=True, timeout=60, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args,words", [
    ((), "usage"),
    (("translate", "0x1000"), "--qmp"),
    (("translate", "--qmp", "/x", "--gdb", "10.1.2.3:1234", "0x1000"), "--allow-remote"),
    (("translate", "--qmp", "/x", "--gdb", "127.0.0.1:99999", "0x1000"), "port"),
    (("translate", "--qmp", "/x", "--gdb", "127.0.0.1:1", "--freeze", "0x1000"), "--freeze"),
    (("translate", "--qmp", "/x", "--expect", "1", "0x1000"), "--find-cr3"),
    (("translate", "--qmp", "/x", "--find-cr3", "0x1000"), "--expect"),
    (("translate", "--qmp", "/x", "0x1000", "-"), "only address"),
    (("vmmap", "--qmp", "/x", "--range", "0x2000"), "START-END"),
    (("read", "--qmp", "/x", "0x1000", "0"), "length"),
    (("read", "--qmp", "/x", "--phys", "--cr3", "0x1000", "0x1000", "8"), "exclude"),
    (("find-cr3", "--qmp", "/x", "--expect", "5"), "--gva"),
    (("parse-log", "/nonexistent.log"), "cannot read"),
    (("translate", "--qmp", "/x", "--outer", "gdb=1", "0x1000"), "--outer"),
])
def test_usage_errors_exit_2_with_a_reason(args, words):
    rc, out, err = run(*args)
    assert rc == 2, (rc, err)
    assert words in err and "Traceback" not in err


def test_missing_socket_is_exit_3():
    rc, out, err = run("cpus", "--qmp", "/nonexistent/qmp.sock")
    assert rc == 3 and "does not exist" in err


def test_main_returns_statuses_in_process():
    assert main(["parse-log", "/nonexistent.log"]) == 2


class _LiveVM:
    """A session of a VM that runs while we read, which resets after `ok_checks` checks (or,
    live=False, a paused one that someone else resumes)."""

    def __init__(self, ok_checks, live=True):
        self.live, self.ok_checks, self.checks = live, ok_checks, 0

    def check_live(self, final=False):
        from qintrospect.errors import VMGoneError
        self.checks += 1
        if self.checks > self.ok_checks:
            raise VMGoneError("the guest reset (rebooted) while qintrospect was reading it")


def test_results_are_given_out_only_after_the_vm_was_seen_alive():
    from qintrospect.frontend.attaching import checked
    from qintrospect.errors import VMGoneError
    given = []
    with pytest.raises(VMGoneError):
        for item in checked(_LiveVM(ok_checks=1), range(600), batch=256):
            given.append(item)
    assert given == list(range(256))          # the batch read after the reset never came out
    vm = _LiveVM(ok_checks=0)
    with pytest.raises(VMGoneError):
        next(iter(checked(vm, [1])))         # one result: checked before it is given
    paused = _LiveVM(ok_checks=1, live=False)
    assert list(checked(paused, range(3))) == [0, 1, 2] and paused.checks == 1
    resumed = _LiveVM(ok_checks=0, live=False)      # a paused VM resumed behind our back
    with pytest.raises(VMGoneError):
        next(iter(checked(resumed, [1])))


def test_the_lines_writer_waits_on_a_full_nonblocking_stdout(monkeypatch):
    """translate -'s writer: every byte in order, through short writes and a pipe that a
    parent left non-blocking (writev would say EAGAIN), to a reader slower than the writer."""
    import os
    import threading
    import time
    from qintrospect.present import output
    r, w = os.pipe()
    os.set_blocking(w, False)
    got = []

    def slow_reader():
        while True:
            time.sleep(0.001)
            piece = os.read(r, 1 << 16)
            if not piece:
                return
            got.append(piece)
    reader = threading.Thread(target=slow_reader)
    reader.start()
    lines = [b"%d %s\n" % (i, b"x" * (i % 3000)) for i in range(3000)]
    with open(w, "w", closefd=True) as out:
        monkeypatch.setattr(sys, "stdout", out)
        write = output.lines_writer()
        for k in range(0, len(lines), 700):
            write(lines[k:k + 700])
    reader.join(timeout=30)
    os.close(r)
    assert b"".join(got) == b"".join(lines)


def test_a_huge_bad_line_is_quoted_short():
    """A line of megabytes (a binary file given as addresses) is not echoed whole."""
    with pytest.raises(UsageError) as err:
        list(read_addresses([b"0x10\n", b"zz" * 500_000 + b"\n"]))
    message = str(err.value)
    assert message.startswith("line 2 of the addresses: address 'zzzz")
    assert len(message) < 200 and "(1,000,000 characters)" in message
