"""The seam between the galleries and their storage (see :mod:`cipherface.store`).

``GalleryStore(location, meta=...)`` opens a gallery's store: a directory path (SQLite,
old layouts migrated on first open), ``sqlite:DIR#label`` or
``postgresql://...#name``. The galleries use only ``.meta``, ``.slots``, ``.blocks``
(name -> ref with ``.version``), ``.ids_version``, ``load_block``, ``stage_block``,
``commit(blocks=, slots=, drop_blocks=)`` and ``close``; ``preload`` at open.
"""

from __future__ import annotations

import os
from typing import Any

from cipherface.store import open_store
from cipherface.store.base import GalleryStore as Store


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


__all__ = ["GalleryStore", "Store"]
