"""Files only their owner can read: the policy and RM weights a run writes (checkpoints, the shared-memory
weight slots) are private data, on nodes that other users may share.

Directories are made 0700 before anything is written into them (so nothing inside is reachable by others
while it is written, whatever mode a library creates its files with), and the files end up 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: str | Path) -> Path:
    """``path`` (and missing parents) as a directory only its owner can enter; an existing one of
    ours is restricted too. Returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path, DIR_MODE)
    except PermissionError:  # an existing directory of another owner (shared storage): not ours to restrict
        pass
    return path


def make_private(path: str | Path) -> Path:
    """Restrict ``path`` and everything under it: directories 0700, files 0600 (symbolic links are
    left alone, and not followed). Returns it."""
    path = Path(path)
    if path.is_symlink():
        return path
    if path.is_dir():
        os.chmod(path, DIR_MODE)
        for root, dirs, files in os.walk(path):  # (os.walk does not descend into linked directories)
            for names, mode in ((dirs, DIR_MODE), (files, FILE_MODE)):
                for p in (os.path.join(root, n) for n in names):
                    if not os.path.islink(p):
                        os.chmod(p, mode)
    elif path.exists():
        os.chmod(path, FILE_MODE)
    return path


def create_private_file(path: str | Path):
    """A new file at ``path`` created 0600 (it must not exist), open for binary writing."""
    return os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE), "wb")
