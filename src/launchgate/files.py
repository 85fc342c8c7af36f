"""Files the gateway holds open while others may move them: the decision log, the ledger."""

from __future__ import annotations

import os
from pathlib import Path


def same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, renamed or replaced).
    Held open, that file's inode number cannot be given to another."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)


def short_of_space(path: Path, needed: int) -> bool:
    """Whether the filesystem holding ``path`` has less than ``needed`` bytes free. One without
    blocks at all has no size (ramfs, tmpfs with size=0), and is never short (found in review:
    both were called full)."""
    space = os.statvfs(path)
    return bool(space.f_blocks) and space.f_bavail * space.f_frsize < needed
