"""Private files: what alignloop writes (database, WAL/SHM, backups, run logs, config) is readable by its owner
only, 0600 files in 0700 folders, whatever the user's umask (issue #13 L1).

Two layers, because either alone leaves gaps: a 0o077 umask while creating (no window in which a new file is
world-readable, and files made by libraries we call, such as SQLite's -wal/-shm or a trainer's checkpoints,
get it too), then an explicit chmod of what we made, for files that existed before or were made elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PRIVATE_UMASK = 0o077
FILE_MODE, DIR_MODE = 0o600, 0o700


@contextmanager
def private_umask() -> Iterator[None]:
    """umask 077 for the block (process-wide: only for short, single-threaded steps such as init or backup)."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def make_private(path: str | os.PathLike) -> None:
    """chmod 0700 on folders and 0600 on files, recursively; links are left alone."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return
    if path.is_dir():
        path.chmod(DIR_MODE)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), DIR_MODE)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), FILE_MODE)
    else:
        path.chmod(FILE_MODE)


def private_file(path: str | os.PathLike) -> Path:
    """Create `path` empty and 0600 if it does not exist, else chmod it 0600."""
    path = Path(path)
    if path.exists():
        path.chmod(FILE_MODE)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
    return path


def private_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    path.chmod(DIR_MODE)
    return path


def private_opener(path, flags):
    """`open(..., opener=private_opener)`: a file created 0600 (an existing one keeps its mode)."""
    return os.open(path, flags, FILE_MODE)
