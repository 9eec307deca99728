"""The seam between the galleries and their storage (see :mod:`cipherface.store`).

``GalleryStore(location, meta=...)`` opens a gallery's store: a directory path (SQLite,
old layouts migrated on first open), ``sqlite:DIR#label`` or
``postgresql://...#name``. The galleries use only ``.meta``, ``.slots``, ``.blocks``
(name -> ref with ``.version``), ``.ids_version``, ``load_block``, ``stage_block``,
``commit(blocks=, slots=, drop_blocks=, reply=)`` and ``close``; ``preload`` at open.
A :class:`Reply` handed to ``enroll``/``delete`` goes to that commit: the reply of the
request is stored in the same transaction as the change (:mod:`cipherface.store.replies`).
"""

from __future__ import annotations

import os
from typing import Any, TypedDict

from cipherface.store import open_store
from cipherface.store.base import GalleryStore as Store
from cipherface.store.replies import Reply


def GalleryStore(
    location: str | os.PathLike[str],
    *,
    meta: dict[str, Any] | None = None,
    verify: bool = True,
    preload: tuple[str, ...] = (),
) -> Store:
    """Open (or create, with ``meta``) a gallery's store; see :func:`open_store`.

    ``preload``: prefixes of the blocks to keep in memory from the check at open (the
    ones every identify reads), so a reload reads and hashes them once.
    """
    return open_store(location, meta=meta, verify=verify, preload=preload)


class ReplyArg(TypedDict, total=False):
    """The ``reply`` keyword of ``commit``, when there is one."""

    reply: Reply


def with_reply(reply: Reply | None) -> ReplyArg:
    """``commit`` keywords for ``reply``: none without one, so the galleries also run on
    stores that know no replies (the old layout, which the migration tests write)."""
    return {} if reply is None else {"reply": reply}


__all__ = ["GalleryStore", "Reply", "ReplyArg", "Store", "with_reply"]
