"""Commit anchors: the last commit a gallery acknowledged, kept outside its database.

A database put back from an older backup is a whole, consistent, *older* gallery: every
row check passes, and the identities deleted since come back. Only something the
restore did not touch can tell. After every commit (before the acknowledgement) and
after every open that checked out, the gallery's ``seq`` and gallery-row check are
written to a small file; at open a database whose ``seq`` is below the anchored one,
or equal with another check (another history), is refused as ``storage_corrupt``.

File format (ASCII, one line): ``SEQ CHECK`` or, for engines whose galleries have an
identity that survives a restore (PostgreSQL's ``gid``), ``SEQ CHECK INCARNATION``. A
gallery with another incarnation under the same name was created again (``gallery
import``): its lower ``seq`` is not a rollback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cipherface.errors import StorageCorruptError, StorageError, StorageFullError

log = logging.getLogger(__name__)
ANCHOR_NAME = "gallery.anchor"  # in the directory a location's ``;anchor=DIR`` names


@dataclass(frozen=True)
class Mark:
    """One anchored commit."""

    seq: int
    check: int
    incarnation: int | None = None


class Anchor:
    """The anchor file at ``path`` of the gallery named ``label`` (in errors).

    Args:
        path: the file (its directory is created on the first write).
        label: how errors name the gallery (never the path).
    """

    def __init__(self, path: str | os.PathLike[str], *, label: str) -> None:
        self.path = Path(path)
        self.label = label
        self._behind: tuple[int, int, int | None] | None = None  # a mark not yet written
        self._failure: OSError | None = None

    def read(self) -> Mark | None:
        """The anchored commit, or None when none was recorded.

        Raises:
            StorageCorruptError: the file exists but cannot be read or parsed.
        """
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError) as exc:
            raise StorageCorruptError(f"gallery {self.label}: commit anchor unreadable") from exc
        parts = text.split()
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            raise StorageCorruptError(f"gallery {self.label}: commit anchor damaged")
        inc = int(parts[2]) if len(parts) == 3 else None
        return Mark(seq=int(parts[0]), check=int(parts[1]), incarnation=inc)

    def exists(self) -> bool:
        return self.path.exists()

    def check(
        self,
        seq: int,
        check: int,
        incarnation: int | None = None,
        *,
        restored: bool = False,
        recorded: int | None = None,
    ) -> None:
        """Refuse a database older than (or forked from) the anchored commit.

        Args:
            restored: the gallery says it was made by ``gallery import``: another
                incarnation of it is a deliberate restore, not a loss.
            recorded: the gallery check the database's commit history holds for the
                anchored ``seq`` when ``seq`` is past it (None: not recorded): another
                value is a rollback that was committed on past this anchor.

        Raises:
            StorageCorruptError: rolled back, created again without an import (its rows
                were lost and a process without this anchor started it empty), or the
                anchor is damaged.
        """
        m = self.read()
        if m is None:
            return
        if m.incarnation is not None and incarnation is not None and m.incarnation != incarnation:
            if not restored:
                raise StorageCorruptError(
                    f"gallery {self.label}: created again after commit {m.seq} without an "
                    "import (its rows were lost): restore it with gallery import"
                )
            log.warning(
                "gallery %s was created again by an import: its commit anchor restarts",
                self.label,
            )
            return
        if m.seq < seq and recorded is not None and recorded != m.check:
            # Rolled back behind this anchor, then committed on past it (a worker whose
            # anchor lagged, or none): the history at our commit is another one.
            raise StorageCorruptError(
                f"gallery {self.label}: rolled back (commit {m.seq} was acknowledged with "
                "another history) and committed on since"
            )
        if m.seq > seq or (m.seq == seq and m.check != check):
            # An older copy of the database (or of its log) was put back, or the log was
            # lost: serving it would bring deleted identities back.
            raise StorageCorruptError(
                f"gallery {self.label}: rolled back (commit {seq} found, {m.seq} was acknowledged)"
            )

    def advance(self, seq: int, check: int, incarnation: int | None = None) -> bool:
        """Record a commit (fsync + rename) unless the anchor already holds it or a later
        one of the same incarnation.

        Returns:
            False when the file could not be written (logged; the commit stands): the
            engine then refuses its next commit until :meth:`catch_up` succeeds, so at
            most one acknowledged commit is ever missing from the anchor.
        """
        try:
            m = self.read()
        except StorageCorruptError:
            m = None  # a damaged anchor was reported at open; the commit stands
        if m is not None and m.incarnation == incarnation and m.seq >= seq:
            self._behind = None
            return True
        tail = "" if incarnation is None else f" {incarnation}"
        # Per process: a cloud and a `gallery` command may advance one anchor together.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(f"{seq} {check}{tail}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("gallery %s: commit anchor not updated: %s", self.label, exc)
            self._behind = (seq, check, incarnation)
            self._failure = exc
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        self._behind = None
        return True

    def catch_up(self) -> None:
        """Before a commit: write the commit a failed :meth:`advance` left out.

        Raises:
            StorageFullError: still no space for it (retryable; nothing was committed).
            StorageError: it still cannot be written.
        """
        behind = self._behind
        if behind is None or self.advance(*behind):
            return
        # Committing on would leave acknowledged commits (deletes) that a restored
        # backup could undo unseen.
        if self._failure is not None and self._failure.errno == errno.ENOSPC:
            raise StorageFullError(f"gallery {self.label}: no space left for its commit anchor")
        raise StorageError(f"gallery {self.label}: its commit anchor cannot be written")

    def drop(self) -> None:
        """Forget the anchored commit (a deliberate restore: ``gallery import``)."""
        self.path.unlink(missing_ok=True)


__all__ = ["ANCHOR_NAME", "Anchor", "Mark"]
