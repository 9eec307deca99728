"""Destroying data for good: a retired key's gallery (cloud) and key directory (edge).

A file is *shredded*: overwritten in place with zeros, flushed to disk, then unlinked,
and its directory entry removal is made durable. On an ordinary filesystem over a disk
that rewrites in place this leaves nothing to read back; on copy-on-write filesystems
(btrfs, ZFS), SSDs with wear levelling, snapshots and backups the old blocks may survive
the overwrite (docs/security.md, "Deletion"): use encrypted storage where that matters.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

from cipherface.errors import StorageError

log = logging.getLogger(__name__)

_CHUNK: Final = 1 << 20


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the directory went away too: nothing left to make durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shred_file(path: str | os.PathLike[str]) -> bool:
    """Overwrite a regular file with zeros, fsync it, unlink it (a link is only unlinked).

    Args:
        path: the file.

    Returns:
        True when there was a file to destroy, False when it was gone already.

    Raises:
        OSError: it cannot be overwritten or unlinked.
    """
    p = Path(path)
    try:
        info = p.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISREG(info.st_mode):
        # O_NOFOLLOW: never write through a link swapped in meanwhile.
        fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            left = info.st_size
            zeros = bytes(min(_CHUNK, max(left, 1)))
            while left > 0:
                left -= os.write(fd, zeros[: min(left, len(zeros))])
            os.fsync(fd)
        finally:
            os.close(fd)
    p.unlink(missing_ok=True)
    _fsync_dir(p.parent)
    return True


def shred_tree(path: str | os.PathLike[str]) -> bool:
    """Shred every file under a directory (links are unlinked, not followed), then
    remove the directories. Idempotent: a tree already gone is not an error.

    Args:
        path: the directory (or a single file).

    Returns:
        True when there was anything to destroy.

    Raises:
        OSError: a file cannot be overwritten or removed.
    """
    root = Path(path)
    try:
        info = root.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return shred_file(root)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            shred_file(here / name)
        for name in dirnames:
            sub = here / name
            if sub.is_symlink():
                sub.unlink()
            else:
                sub.rmdir()
    root.rmdir()
    _fsync_dir(root.parent)
    return True


def destroy_gallery(location: str | os.PathLike[str], *, retired_by: str | None = None) -> bool:
    """Destroy a gallery (close it first): SQLite files shredded and their directory
    removed; PostgreSQL rows deleted (the freed tuples stay on disk until vacuum).
    Idempotent.

    Args:
        location: as :func:`cipherface.store.open_store` takes it.
        retired_by: the successor when the gallery's key is retired: PostgreSQL records
            a tombstone shared by every worker in the same transaction.

    Returns:
        True when there was a gallery to destroy.

    Raises:
        StorageError: the files or rows cannot be removed (named by the location's
            label, never a path).
    """
    from cipherface.store import split_location

    engine, where, label = split_location(location)
    if engine == "postgresql":
        from cipherface.store.postgres import drop_gallery

        return drop_gallery(where, label, retired_by=retired_by)
    try:
        return shred_tree(where)
    except OSError as exc:
        log.error("destroying gallery %s at %s failed: %s", label, where, exc)
        raise StorageError(f"gallery {label}: destroying it failed ({exc.strerror})") from None


__all__ = ["destroy_gallery", "shred_file", "shred_tree"]
