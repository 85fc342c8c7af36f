"""Files the gateway holds open while others may move them: the decision log, the ledger."""

from __future__ import annotations

import os
from pathlib import Path

FileId = tuple[int, int]  # (st_dev, st_ino): which file, whatever its name


def file_id(fd: int) -> FileId:
    """The identity of the file open as ``fd``. Held open, its inode number cannot be given to
    another, so it is taken once, when the file is opened."""
    opened = os.fstat(fd)
    return opened.st_dev, opened.st_ino


def still_at(path: Path, opened: FileId) -> bool:
    """Whether ``path`` still names the file ``opened`` (not removed, renamed or replaced):
    one ``stat``."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    return (at_path.st_dev, at_path.st_ino) == opened


def short_of_space(path: Path, needed: int) -> bool:
    """Whether the filesystem holding ``path`` has less than ``needed`` bytes free. One without
    blocks at all has no size (ramfs, tmpfs with size=0), and is never short (found in review:
    both were called full)."""
    space = os.statvfs(path)
    return bool(space.f_blocks) and space.f_bavail * space.f_frsize < needed


def cannot_make(path: Path) -> str | None:
    """Why this process could not create ``path`` (a file, its missing folders made on the way,
    as the gateway does at start), or None. Found by QA: ``check`` said ok for a decision log
    under a folder the gateway's user could not write, and ``serve`` then failed to start. A
    symbolic link on the way is followed as the gateway follows it; one that leads nowhere is
    in the way (found in review: the gateway cannot make a folder where it stands)."""
    if os.path.islink(path):  # leading nowhere yet: the file is made where it leads, and
        target = path.resolve()  # only there (no folder is made on the way; found in review)
        if not target.parent.is_dir():
            return f"{path} leads to {target}, whose folder is not there"
        path = target
    folder = path.parent
    while not os.path.lexists(folder):
        if folder == folder.parent:
            return None
        folder = folder.parent
    if not folder.is_dir():  # (follows a link: a dangling one is no folder either)
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create {path}: {folder} is not writable by this user"
    return None


def cannot_write(path: Path) -> str | None:
    """Why this process could not write the file at ``path`` in place, with files of its own
    beside it (SQLite's write-ahead log), or None. A symbolic link is judged by its target, as
    SQLite follows it (found in review: a link into a writable folder was refused)."""
    target = path.resolve()
    if not os.access(target, os.R_OK | os.W_OK) or not os.access(target.parent, os.W_OK | os.X_OK):
        return f"{path}: the ledger or its folder is not writable by this user"
    return None
