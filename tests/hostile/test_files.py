"""Files written as root, against a user who plants symlinks and folders: the pictures and
reports (outfile) and the run-state folder (runstate). Each planted thing is left as it was and
nothing is written through it."""

import os

import pytest

from qintrospect.present import outfile

from qintrospect.connect import runstate
from qintrospect.errors import UsageError

NOBODY = 65534


def test_a_symlink_planted_at_an_output_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root:x:0:0\n")
    out = tmp_path / "walks.html"
    out.symlink_to(victim)
    outfile.write_file(str(out), "<html>walks</html>")
    assert victim.read_text() == "root:x:0:0\n"
    assert not out.is_symlink() and out.read_text() == "<html>walks</html>"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_file_is_never_left_half_written(tmp_path):
    """The old file stays whole until the new one is complete (a new file, then a rename)."""
    out = tmp_path / "map.svg"
    out.write_text("old")
    inode = out.stat().st_ino
    outfile.write_file(str(out), "new" * 1000)
    assert out.read_text() == "new" * 1000 and out.stat().st_ino != inode


@pytest.mark.parametrize("make, why", [
    (lambda p: p.mkdir(), "it is a folder"),
    (lambda p: None, "the folder"),              # its parent does not exist
])
def test_unwritable_output_names_are_said(tmp_path, make, why):
    target = tmp_path / "x.html" if why != "the folder" else tmp_path / "missing" / "x.html"
    make(target)
    with pytest.raises(UsageError, match=why):
        outfile.write_file(str(target), "x")


def test_a_symlinked_report_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "report"
    out.symlink_to(elsewhere)
    with pytest.raises(UsageError, match="not a folder of its own"):
        outfile.output_folder(str(out))
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's folder")
def test_another_users_report_folder_is_refused(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"belongs to uid {NOBODY}"):
        outfile.output_folder(str(out))


def test_a_report_folder_swapped_after_opening_keeps_its_files(tmp_path):
    """Files go to the folder that was checked, through its descriptor: a path renamed away
    and replaced by a symlink meanwhile sends nothing elsewhere."""
    out = tmp_path / "report"
    fd = outfile.output_folder(str(out))
    try:
        out.rename(tmp_path / "moved")
        victim = tmp_path / "victim"
        victim.mkdir()
        out.symlink_to(victim)
        outfile.write_file("report.html", "<html/>", fd)
    finally:
        os.close(fd)
    assert list(victim.iterdir()) == []
    assert (tmp_path / "moved" / "report.html").read_text() == "<html/>"


# ---- the run-state folder ----------------------------------------------------------------

@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return base


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's folder")
def test_another_users_runtime_dir_is_not_trusted(runtime_dir, tmp_path):
    """Under `su`, XDG_RUNTIME_DIR is the other user's folder: that user could swap what is
    in it. The marker then lives in the temporary folder instead."""
    os.chown(runtime_dir, NOBODY, NOBODY)
    runstate.record("vm", True)
    assert not list(runtime_dir.iterdir())
    folder = tmp_path / "tmp" / f"qintrospect-{os.geteuid()}"
    assert runstate.load("vm")["found_running"] is True and any(folder.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root-owned files elsewhere to matter")
def test_a_marker_folder_swapped_for_a_symlink_sends_no_unlink_elsewhere(runtime_dir,
                                                                         tmp_path):
    """The folder is checked once, then used through its descriptor. A path swapped for a
    symlink to another folder is noticed (a new check refuses it), and lock files there (root's
    own, as the pruner would accept) are left alone."""
    runstate.record("vm", True)
    folder = runtime_dir / f"qintrospect-{os.geteuid()}"
    folder.rename(runtime_dir / "away")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "0123456789abcdef.lock").write_text("")
    (victim / "fact-0123456789abcdef.json").write_text('{"fact": "x", "pid": 999999999}')
    folder.symlink_to(victim)
    with pytest.raises(runstate.RunStateError, match="symlink"):
        runstate.remember("a fact", os.getpid())
    assert sorted(p.name for p in victim.iterdir()) == ["0123456789abcdef.lock",
                                                         "fact-0123456789abcdef.json"]
