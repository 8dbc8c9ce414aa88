"""Files that hold secrets: created 0600 in 0700 directories whatever the process umask.

Every actor writes its secrets through these helpers (private keys, databases, payloads): the
mode is given at creation and set again with fchmod/chmod, because ``open(..., 0o600)`` is
only an upper bound that the umask narrows, and a file that already existed keeps its mode.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """Create ``path`` (and its missing parents) with ``mode`` and make ``path`` itself ``mode``.

    Parents that already exist are left as they are (they may be shared, like /var/lib);
    parents created here get ``mode`` too (``Path.mkdir(parents=True)`` would give them the
    umask's default).
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:
            pass
        os.chmod(d, mode)
    try:
        os.chmod(path, mode)
    except PermissionError:
        # not ours (e.g. a directory a service manager made): fine if nobody else may enter it
        if os.stat(path).st_mode & 0o077:
            raise
    return path


def write_private(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Atomically replace ``path`` with ``data``: a temporary file made ``mode`` before any byte
    is written, fsynced, then renamed (a crash leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink()  # a leftover of a crash may carry another mode: never write into it
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_file(path: Path, mode: int = FILE_MODE) -> Path:
    """Make sure ``path`` exists with ``mode`` without touching its content (SQLite creates its
    -wal and -shm files with the mode of the database file, so the database is made first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return Path(path)
