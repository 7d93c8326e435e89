"""Files qintrospect writes for a person (--html, --svg, report --out), written safely as root.

A file is written whole to a new temporary file beside it (O_CREAT|O_EXCL|O_NOFOLLOW: never an
existing file, never through a symlink), then renamed over the name asked for: a symlink
planted at that name is replaced, not followed, and a reader never sees half a file. An
output folder is taken only if it is a real folder (not a symlink) of this user's own, and
its files are written relative to it, opened once (a descriptor): renaming its path away
cannot send them elsewhere.
"""

import os
import stat
from typing import Optional

from ..errors import UsageError


def write_file(path: str, text: str, folder: Optional[int] = None) -> None:
    """Write `text` (UTF-8) as the whole file `path` (a name inside the open `folder` when
    given): new temporary file, then rename. UsageError (exit 2) saying why when it cannot."""
    data = text.encode("utf-8")
    name = path
    own = folder is None
    if own:
        parent = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(path)
        try:
            folder = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: the folder {parent}: "
                             f"{exc.strerror or exc}") from None
    try:
        try:
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise UsageError(f"cannot write {path}: it is a folder; give a file name")
        except FileNotFoundError:
            pass
        tmp = f".{name[:64]}.qi-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o666, dir_fd=folder)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException as exc:
            try:
                os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
            raise
    finally:
        if own:
            os.close(folder)


def output_folder(path: str) -> int:
    """The folder `path`, made if missing (its parents too), open: refused (UsageError) when
    it is a symlink, not a folder, or another user's."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot make the folder: {exc.strerror or exc}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"--out {path}: not a folder of its own (a symlink or a file?): "
                         f"{exc.strerror or exc}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise UsageError(f"--out {path}: the folder belongs to uid {st.st_uid}, not to this "
                         f"user ({os.geteuid()}); give a folder of your own or a new name")
    return fd
