"""What run state a VM was found in, remembered on disk while qintrospect is attached.

Attaching gdb pauses the VM; a clean exit puts the found state back. A qintrospect killed with
SIGKILL cannot, and QEMU reports the VM as plainly "paused" either way, so the marker written
here is how the next command knows the pause was ours and can say so (`qintrospect resume`).
"""

import hashlib
import json
import os
import tempfile
import time
from typing import Optional


def _path(qmp_key: str) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = os.path.join(base, f"qintrospect-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return os.path.join(folder, hashlib.sha1(qmp_key.encode()).hexdigest()[:16] + ".json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def load(qmp_key: str) -> Optional[dict]:
    try:
        with open(_path(qmp_key)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def left_paused(qmp_key: str, running_now: bool) -> Optional[dict]:
    """The record of a qintrospect that found this VM running and died while attached, if the
    VM is still paused; None otherwise."""
    m = load(qmp_key)
    if not m or running_now:
        return None
    if m.get("left_paused"):
        return m["left_paused"]
    owner = m.get("owner")
    if owner and not _alive(owner) and m.get("found_running"):
        return {"pid": owner, "since": m.get("since")}
    return None


def record(qmp_key: str, found_running: bool, carried: Optional[dict] = None) -> None:
    data = {"qmp": qmp_key, "owner": os.getpid(), "found_running": found_running,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    if carried:
        data["left_paused"] = carried
    _write(qmp_key, data)


def release(qmp_key: str, carried: Optional[dict] = None) -> None:
    """A clean exit: forget us, but keep an earlier killed session's record while the VM it
    left paused is still paused (the user has not decided to resume it yet)."""
    if carried:
        _write(qmp_key, {"qmp": qmp_key, "left_paused": carried})
    else:
        forget(qmp_key)


def forget(qmp_key: str) -> None:
    try:
        os.unlink(_path(qmp_key))
    except OSError:
        pass


def _write(qmp_key: str, data: dict) -> None:
    path = _path(qmp_key)
    tmp = path + f".{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
