"""What state a VM was found in, remembered on disk while qintrospect is attached.

Attaching gdb pauses the VM and switches its gdbstub to physical-memory mode; a clean exit puts
both back. A qintrospect killed with SIGKILL cannot, and QEMU reports the VM as plainly
"paused" (and the mode as plainly 1) either way, so the marker written here is how the next
command knows the pause was ours (`qintrospect resume`) and which memory mode to put back.

qintrospect often runs as root, so the marker lives in a folder that must be this user's own
(mode 0700, checked, never followed through a symlink), inside $XDG_RUNTIME_DIR only when that
is this user's own too (under `su` it is the other user's: the temporary folder then), and
every file in it is reached relative to the folder opened once (a descriptor: renaming the
folder's path away cannot redirect a write or an unlink elsewhere). A marker is written to a
fresh file (O_EXCL|O_NOFOLLOW) that is then renamed over the old one.

Beside it, a lock (flock) that one qintrospect holds while it relies on or changes the VM's run
state, so that two never interleave: one finding the VM paused by the other and reading on
while that one resumes it. The kernel drops the lock of a killed process. Its file is removed
by the holder as it lets go (so none pile up, one per QEMU process ever attached): whoever
then gets the lock of a file no longer there takes the one there now instead.
"""

import json
import os
import stat
import time
from typing import Optional

from ..errors import AttachError, QIError

MAX_MARKER = 64 << 10


class RunStateError(QIError):
    """The marker folder cannot be trusted (not ours, not private, a symlink)."""


def _temp_base() -> str:
    """tempfile.gettempdir(), without loading tempfile (and shutil and random) where the
    answer is plain: the first of TMPDIR, TEMP, TMP that is set, else /tmp, when this user
    may write there; tempfile itself for its other fallbacks."""
    folder = next((os.environ[n] for n in ("TMPDIR", "TEMP", "TMP") if os.environ.get(n)),
                  "/tmp")
    if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
        return os.path.abspath(folder)
    import tempfile
    return tempfile.gettempdir()


def _base() -> str:
    """$XDG_RUNTIME_DIR when it is a folder of this user's own, else the temporary folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            st = os.lstat(runtime)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                return runtime
        except OSError:
            pass
    return _temp_base()


_opened: dict = {}          # folder path -> its open descriptor (checked when opened)


def _dir() -> int:
    """The private folder, open (a descriptor every file operation here is relative to):
    created 0700 if missing; a symlink, another user's folder or one open to others is
    refused (RunStateError)."""
    folder = os.path.join(_base(), f"qintrospect-{os.geteuid()}")
    fd = _opened.get(folder)
    if fd is not None:
        try:                               # still the folder at that path?
            here, there = os.fstat(fd), os.stat(folder, follow_symlinks=False)
            if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                return fd
        except OSError:
            pass
        del _opened[folder]
        os.close(fd)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RunStateError(f"cannot create {folder}: {exc.strerror or exc}") from None
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise RunStateError(f"{folder} is not a folder (a symlink or a file); "
                            "remove it") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise RunStateError(f"{folder} belongs to uid {st.st_uid} with mode "
                            f"{stat.S_IMODE(st.st_mode):o}, not to this user with mode 700; "
                            "remove it (or set XDG_RUNTIME_DIR to a private folder)")
    _opened[folder] = fd
    return fd


def _name(qmp_key: str, kind: str = "", suffix: str = ".json") -> str:
    try:
        from _sha1 import sha1      # CPython's own: the same digest without loading OpenSSL
    except ImportError:
        from hashlib import sha1
    return kind + sha1(qmp_key.encode()).hexdigest()[:16] + suffix


def remembered(fact: str) -> bool:
    """Whether remember(fact) was said (by this user, in the private folder)."""
    try:
        data = _read_own(_name(fact, "fact-"))
    except RunStateError:
        return False
    return data is not None and data.get("fact") == fact


def remember(fact: str, pid: int) -> None:
    """Keep a fact about process `pid` for its lifetime; facts of processes gone are
    forgotten here, and lock files no one holds removed."""
    folder = _dir()
    for name in os.listdir(folder):
        if name.startswith("fact-"):
            owner = (_read_own(name) or {}).get("pid")
            if isinstance(owner, int) and not alive(owner):
                try:
                    os.unlink(name, dir_fd=folder)
                except OSError:
                    pass
    _prune_locks(folder)
    _write(fact, {"fact": fact, "pid": pid}, "fact-")


def cached(purpose: str, key: str) -> Optional[object]:
    """What cache(purpose, key, value) kept, if it was kept under this very key; else None."""
    try:
        data = _read_own(_name(purpose, "cache-"))
    except RunStateError:
        return None
    if data is None or data.get("key") != key:
        return None
    return data.get("value")


def cache(purpose: str, key: str, value) -> None:
    """Keep one JSON value per purpose (the newest key replaces the last), in the private
    folder: facts worth a second command not computing again (e.g. offsets read from BTF,
    keyed by the boot they hold for)."""
    _write(purpose, {"key": key, "value": value}, "cache-")


def vm_key(address, label: bool = False) -> str:
    """The name a VM's marker and lock are kept under: its QMP socket's real path (however
    the path was written), HOST:PORT, or the label of a monitor reached another way."""
    if isinstance(address, str):
        return address if label else os.path.realpath(address)
    return f"{address[0]}:{address[1]}"


class Busy(AttachError):
    """Another qintrospect held the VM's lock for longer than this one would wait."""


def _lock_name(qmp_key: str) -> str:
    return _name(qmp_key, suffix=".lock")


def lock_file(qmp_key: str) -> int:
    """The open lock file of the VM behind qmp_key (this user's own, never a symlink)."""
    return _open_lock(_lock_name(qmp_key), _dir(), os.O_CREAT)


def _open_lock(name: str, folder: int, create: int = 0) -> int:
    fd = os.open(name, os.O_RDWR | create | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=folder)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise RunStateError(f"{name} in the marker folder is not this user's own file; "
                            "remove it")
    return fd


def _names(name: str, fd: int) -> bool:
    """Whether `name` in the folder is (still) the file open as fd."""
    try:
        st = os.stat(name, dir_fd=_dir(), follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def acquire(fd: int, wait: float) -> None:
    """Take the lock, waiting up to `wait` seconds for the qintrospect that holds it; Busy
    (naming it) if it does not let go."""
    import fcntl
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                raise Busy(f"another qintrospect (pid {holder or '?'}) is working on this VM "
                           f"and did not finish within {wait:g} s; run this again when it "
                           "has (or give a longer --timeout)") from None
            time.sleep(0.01)


def _holder(fd: int) -> Optional[int]:
    """The pid holding the flock on the file open as fd, from /proc/locks (the file holds
    nothing: writing into it made every close on ext4 wait for the disk)."""
    st = os.fstat(fd)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read(1 << 20).decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146597 0 EOF"
        words = line.split()
        if len(words) < 6 or words[1] != "FLOCK":       # ("1: -> FLOCK ..." waits for it)
            continue
        try:
            major, minor, inode = words[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                return int(words[4])
        except ValueError:
            continue
    return None


def let_go(fd: int) -> None:
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_UN)


_held: dict = {}     # key -> [fd, count]: the locks this process holds


def lock(key: str, wait: float) -> None:
    """Hold the lock named `key` (lock_file, acquire). Within one process it is counted, not
    waited for: sessions of one process (a nested translation holds an inner VM while it walks
    the outer one) do not wait for each other."""
    entry = _held.get(key)
    if entry is not None:
        entry[1] += 1
        return
    name, deadline = _lock_name(key), time.monotonic() + wait
    while True:
        fd = lock_file(key)
        try:
            acquire(fd, max(0.0, deadline - time.monotonic()))
            if _names(name, fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)        # its holder removed it as it let go: the file there now
    _held[key] = [fd, 1]


def unlock(key: str) -> None:
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        try:
            _remove_held(_lock_name(key), entry[0])
        finally:
            os.close(entry[0])              # (closing lets go of the lock)


def _remove_held(name: str, fd: int) -> None:
    """Remove the lock file held as fd: while it is held, no one else holds it, and whoever
    waits on it sees it gone (lock)."""
    try:
        if _names(name, fd):
            os.unlink(name, dir_fd=_dir())
    except (OSError, RunStateError):
        pass


def _prune_locks(folder: int) -> None:
    """Lock files no one holds (left by a killed qintrospect): removed, each while held."""
    import fcntl
    for name in os.listdir(folder):
        if not name.endswith(".lock"):
            continue
        try:
            fd = _open_lock(name, folder)
        except (OSError, RunStateError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _remove_held(name, fd)
        except OSError:
            pass                        # held: in use
        finally:
            os.close(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def load(qmp_key: str) -> Optional[dict]:
    """The marker for this VM, or None (none, unreadable, or not this user's own file)."""
    return _read_own(_name(qmp_key))


def _read_own(name: str) -> Optional[dict]:
    """A JSON object in a regular file of this user's own in the folder, never through a
    symlink, read up to MAX_MARKER bytes; None otherwise."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=_dir())
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        data = json.loads(os.read(fd, MAX_MARKER))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)


def left_paused(marker: Optional[dict], running_now: bool) -> Optional[dict]:
    """From a loaded marker: the record of a qintrospect that found this VM running and died
    while attached, if the VM is still paused; None otherwise."""
    if not marker or running_now:
        return None
    if marker.get("left_paused"):
        return marker["left_paused"]
    owner = marker.get("owner")
    if owner and not alive(owner) and marker.get("found_running"):
        return {"pid": owner, "since": marker.get("since")}
    return None


def phys_mode_left(marker: Optional[dict]) -> Optional[str]:
    """From a loaded marker: the gdbstub memory mode a killed qintrospect found before it
    switched it (so the next one puts that back, not the mode the killed one left)."""
    if not marker:
        return None
    mode = marker.get("phys_mode_found")
    owner = marker.get("owner")
    if mode in ("0", "1") and (owner is None or not alive(owner)):
        return mode
    return None


def record(qmp_key: str, found_running: bool, carried: Optional[dict] = None,
           phys_mode_found: Optional[str] = None) -> None:
    data = {"qmp": qmp_key, "owner": os.getpid(), "found_running": found_running,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    if carried:
        data["left_paused"] = carried
    if phys_mode_found is not None:
        data["phys_mode_found"] = phys_mode_found
    _write(qmp_key, data)


def release(qmp_key: str, carried: Optional[dict] = None,
            phys_mode_pending: Optional[str] = None) -> None:
    """A clean exit: forget us, but keep what an earlier killed session left undone: its
    record while the VM it left paused is still paused (the user has not decided to resume it
    yet), and the memory mode to put back if this session did not touch the gdbstub."""
    data = {"qmp": qmp_key}
    if carried:
        data["left_paused"] = carried
    if phys_mode_pending is not None:
        data["phys_mode_found"] = phys_mode_pending
    if len(data) > 1:
        _write(qmp_key, data)
    else:
        forget(qmp_key)


def forget(qmp_key: str) -> None:
    try:
        os.unlink(_name(qmp_key), dir_fd=_dir())
    except (OSError, RunStateError):
        pass


def _write(qmp_key: str, data: dict, kind: str = "") -> None:
    folder = _dir()
    name = _name(qmp_key, kind)
    tmp = f"{name}.{os.getpid()}.{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        # replaces the name itself, never what a symlink points to
        os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=folder)
        except OSError:
            pass
        raise
