"""The edge's key directories during a rotation: staging, progress, the atomic switch.

``cipherface rotate-key --keys DIR`` keeps everything it needs to resume beside ``DIR``
(the directory every edge command and daemon reads, ``--keys`` / ``CIPHERFACE_KEYS``)::

    DIR/                       the active key; the old one until the switch
    DIR.rotating/              the new key pair + trust.key while it fills; the old
                               key after the switch, until it is destroyed
    DIR.rotating/rotate.progress or DIR/rotate.progress
                               JSON {"old", "new", "next", "moved"} (0600, fsync):
                               where it lies tells the phase (it moves with the new key)
    DIR.rotating-partial/      a new key being generated (discarded if a crash left it)
    .DIR.rotate.lock           one rotation at a time (flock)

The switch exchanges ``DIR`` and ``DIR.rotating`` in one ``renameat2(RENAME_EXCHANGE)``
(Linux >= 3.15): a process that opens ``DIR`` sees the old key or the new one, never
neither. Where the call is missing (other systems, some filesystems) three renames
through ``DIR.rotating-swap`` are used instead, and :func:`recover_switch` finishes them
after a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cipherface.crypto import sites
from cipherface.errors import KeyFileError, LocalError
from cipherface.protocol import is_hex_id

PROGRESS_NAME: Final = "rotate.progress"
_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2
#: errno values saying "this system or filesystem cannot exchange": use the fallback.
_NO_EXCHANGE: Final = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV})


@dataclass(frozen=True)
class RotationPaths:
    """Where a rotation of ``keys`` keeps its files (see the module docstring).

    Args:
        keys: the active key directory (resolved: a symlink to it keeps pointing at it).
        stage: ``DIR.rotating``.
        partial: ``DIR.rotating-partial``.
        swap: ``DIR.rotating-swap`` (fallback switch only).
        lock: ``.DIR.rotate.lock``.
    """

    keys: Path
    stage: Path
    partial: Path
    swap: Path
    lock: Path

    @classmethod
    def of(cls, keys: str | os.PathLike[str]) -> RotationPaths:
        """The paths of a rotation of the key directory ``keys`` (not checked here:
        a crash in a fallback switch may have left it missing, see :func:`recover_switch`)."""
        p = Path(keys).resolve()
        return cls(
            keys=p,
            stage=p.with_name(p.name + ".rotating"),
            partial=p.with_name(p.name + ".rotating-partial"),
            swap=p.with_name(p.name + ".rotating-swap"),
            lock=p.with_name(f".{p.name}.rotate.lock"),
        )


@dataclass(frozen=True)
class Progress:
    """A rotation's progress file.

    Args:
        old: the key rotated away from.
        new: the key rotated to.
        next: the first pack of the old gallery not yet moved.
        moved: identities enrolled under the new key so far.
    """

    old: str
    new: str
    next: int
    moved: int


def read_progress(directory: Path) -> Progress | None:
    """The progress file in ``directory``, or None when there is none.

    Raises:
        KeyFileError: unreadable or malformed.
    """
    path = directory / PROGRESS_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path} is unreadable: {exc}") from None
    if not isinstance(raw, dict):
        raise KeyFileError(f"{path} is malformed")
    old, new, nxt, moved = (raw.get(k) for k in ("old", "new", "next", "moved"))
    if not (is_hex_id(old) and is_hex_id(new) and old != new):
        raise KeyFileError(f"{path} is malformed (key ids)")
    if not all(type(v) is int and v >= 0 for v in (nxt, moved)):
        raise KeyFileError(f"{path} is malformed (counts)")
    assert isinstance(old, str) and isinstance(new, str)
    assert isinstance(nxt, int) and isinstance(moved, int)
    return Progress(old=old, new=new, next=nxt, moved=moved)


def key_id_of(directory: Path) -> str | None:
    """The key id of the public key in ``directory``, or None when it has none.

    Raises:
        KeyFileError: the public key does not load.
    """
    try:
        data = (directory / sites.PUBLIC_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"{directory / sites.PUBLIC_NAME}: {exc.strerror}") from None
    try:
        return sites.open_public(data).key_id
    except Exception as exc:  # any parse failure of our own file is a key-file fault
        raise KeyFileError(f"{directory / sites.PUBLIC_NAME} does not load: {exc}") from None


@contextlib.contextmanager
def exclusive(paths: RotationPaths) -> Iterator[None]:
    """Hold the rotation lock of ``paths.keys`` (released by the OS if we die).

    Raises:
        LocalError: another rotate-key of this key directory is running.
    """
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LocalError(f"another rotate-key of {paths.keys} is running") from None
        yield
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically; False when the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a))


def switch(paths: RotationPaths) -> None:
    """Exchange ``DIR`` and ``DIR.rotating`` (the new key becomes the active one).

    Raises:
        OSError: a rename failed (:func:`recover_switch` finishes a fallback switch).
    """
    if not _exchange(paths.stage, paths.keys):
        os.rename(paths.keys, paths.swap)
        os.rename(paths.stage, paths.keys)
        os.rename(paths.swap, paths.stage)
    fsync_dir(paths.keys.parent)


def recover_switch(paths: RotationPaths) -> None:
    """Finish a fallback switch a crash interrupted (nothing to do otherwise)."""
    if not paths.swap.exists():
        return
    if not paths.keys.exists() and paths.stage.exists():
        os.rename(paths.stage, paths.keys)
    if paths.keys.exists() and not paths.stage.exists():
        os.rename(paths.swap, paths.stage)
    fsync_dir(paths.keys.parent)


__all__ = [
    "PROGRESS_NAME",
    "Progress",
    "RotationPaths",
    "exclusive",
    "fsync_dir",
    "key_id_of",
    "read_progress",
    "recover_switch",
    "switch",
]
