"""Gallery storage engines: SQLite on one host, PostgreSQL for a fleet.

``open_store(location, meta=...)`` returns a :class:`GalleryStore`; a location is

* a directory path, or ``sqlite:DIR`` -- one SQLite file ``DIR/gallery.sqlite3``;
  a directory holding the old journal layout is migrated on first open;
* ``postgresql://USER@HOST:PORT/DB#NAME`` -- gallery ``NAME`` in that database.

A ``#label`` fragment names the gallery in errors (the cloud uses ``site/kid``), so
errors that reach a gateway never carry a server path or database URL. A
``;anchor=DIR`` after the label keeps the gallery's commit anchor in ``DIR`` (the cloud
uses the key directory): a database rolled back behind it is refused at open
(:mod:`cipherface.store.anchor`).
See docs/storage.md for the design and guarantees.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cipherface.errors import InvalidArgumentError, StorageCorruptError, StorageError
from cipherface.store.base import BlockRef, Engine, GalleryStore, StagedBlock
from cipherface.store.legacy import is_legacy, read_legacy, retire_legacy
from cipherface.store.sqlite import DB_NAME, SqliteEngine, gallery_exists

log = logging.getLogger(__name__)
MIGRATING_NAME = "gallery.migrating.sqlite3"
ANCHOR_PARAM = ";anchor="
PG_SCHEMES = ("postgresql://", "postgres://")


def location_anchor(location: str | os.PathLike[str]) -> tuple[str, Path | None]:
    """``(location without its anchor, anchor directory or None)``."""
    text = os.fspath(location)
    head, sep, frag = text.partition("#")
    label, found, anchor = frag.partition(ANCHOR_PARAM)
    if not sep or not found or not anchor:
        return text, None
    return f"{head}#{label}", Path(anchor)


def split_location(location: str | os.PathLike[str]) -> tuple[str, str, str]:
    """``(engine, where, label)``: engine is ``sqlite`` or ``postgresql``."""
    text, _ = location_anchor(location)
    if text.startswith(PG_SCHEMES):
        dsn, _, name = text.partition("#")
        if not name:
            raise InvalidArgumentError("a PostgreSQL gallery location needs '#name'")
        return "postgresql", dsn, name
    if text.startswith("sqlite:"):
        text = text[len("sqlite:") :]
    where, sep, label = text.partition("#")
    return "sqlite", where, label if sep else where


def gallery_location(store: str, site: str, kid: str, data_dir: str | os.PathLike[str]) -> str:
    """Where the cloud keeps site ``site``'s gallery for key ``kid``.

    Args:
        store: ``sqlite:`` / ``sqlite:ROOT`` (ROOT defaults to ``data_dir``) or a
            ``postgresql://`` URL.

    Returns:
        The location, with the key directory under ``data_dir`` as its anchor directory.
    """
    label = f"{site}/{kid}"
    anchor = f"{ANCHOR_PARAM}{Path(data_dir) / site / 'keys' / kid}"
    if store.startswith(PG_SCHEMES):
        return f"{store.partition('#')[0]}#{label}{anchor}"
    root = store[len("sqlite:") :] if store.startswith("sqlite:") else store
    base = Path(root or data_dir)
    return f"sqlite:{base / site / 'keys' / kid / 'gallery'}#{label}{anchor}"


def store_exists(location: str | os.PathLike[str]) -> bool:
    """Whether a gallery was ever created there (new database or old layout)."""
    engine, where, label = split_location(location)
    if engine == "sqlite":
        return gallery_exists(where) or is_legacy(where)
    from cipherface.store.postgres import PostgresEngine

    return PostgresEngine(where, name=label).current_seq() is not None


def open_engine(location: str | os.PathLike[str]) -> Engine:
    engine, where, label = split_location(location)
    _, anchor = location_anchor(location)
    if engine == "postgresql":
        from cipherface.store.postgres import PostgresEngine

        return PostgresEngine(where, name=label, anchor_dir=anchor)
    return SqliteEngine(where, label=label, anchor_dir=anchor)


def open_store(
    location: str | os.PathLike[str],
    *,
    meta: dict[str, Any] | None = None,
    verify: bool = True,
    preload: tuple[str, ...] = (),
    accept_torn_tail: bool = False,
) -> GalleryStore:
    """Open (or create, when ``meta`` is given) the gallery at ``location``.

    ``verify`` and ``preload`` as :class:`GalleryStore`.

    Raises:
        StorageCorruptError: the gallery (or the old layout being migrated) is damaged.
        StorageFullError: no space left (e.g. while migrating).
        GalleryError: ``meta`` disagrees with the stored gallery, or no gallery and no meta.
        StorageError: locked by another process, or the database is unreachable.
    """
    eng = open_engine(location)
    try:
        if isinstance(eng, SqliteEngine) and is_legacy(eng.dir):
            if not gallery_exists(eng.dir):
                migrate_legacy(eng.dir, label=eng.label, accept_torn_tail=accept_torn_tail)
                eng.reopen()
            else:
                log.warning(
                    "gallery %s: old layout files beside the database are ignored", eng.label
                )
        return GalleryStore(eng, meta=meta, verify=verify, preload=preload)
    except BaseException as exc:
        if isinstance(exc, StorageCorruptError):
            eng.preserve_evidence()
        eng.close()
        raise


def migrate_legacy(
    directory: str | os.PathLike[str], *, label: str, accept_torn_tail: bool = False
) -> None:
    """One-shot migration of an old-layout gallery into ``gallery.sqlite3``.

    The database is built under another name and renamed into place only when whole
    and verified; the old files are removed afterwards (kept in ``legacy/`` when
    anything was in doubt). A crash at any point leaves the old gallery readable.

    Raises:
        StorageCorruptError: the old gallery fails a check (nothing is changed).
    """
    d = Path(directory)
    old = read_legacy(d, label=label, accept_torn_tail=accept_torn_tail)
    for suffix in ("", "-wal", "-shm", ".new", ".lock"):
        Path(str(d / MIGRATING_NAME) + suffix).unlink(missing_ok=True)  # our own leftovers
    eng = SqliteEngine(d, label=label, db_name=MIGRATING_NAME)
    try:
        st = GalleryStore(eng, meta=old.meta, verify=False)
        k = _per_block(old.meta)
        live_blocks = {int(n.rpartition("-")[2]) for n in old.blocks if n[-1:].isdigit()}
        suspect = [
            s
            for s, ident in enumerate(old.slots)
            if not ident and (k is None or s // k in live_blocks)
        ]
        for name in sorted(old.blocks):
            arr = np.load(old.block_path(d, name), allow_pickle=False)
            st.commit(blocks=[st.stage_block(name, arr)])
        st.commit(
            slots=list(enumerate(old.slots)),
            mark_dead=suspect,
            ids_version=old.ids_version + 1,  # edges holding the old list refresh it
        )
        st.verify_blocks()
    finally:
        eng.close()
    src = d / MIGRATING_NAME
    os.replace(src, d / DB_NAME)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    Path(str(src) + ".lock").unlink(missing_ok=True)
    retire_legacy(d, old, label=label)
    log.info("gallery %s: migrated %d slots, %d blocks", label, len(old.slots), len(old.blocks))


def _per_block(meta: dict[str, Any]) -> int | None:
    from cipherface.store.base import slots_per_block

    return slots_per_block(meta)


__all__ = [
    "BlockRef",
    "Engine",
    "GalleryStore",
    "StagedBlock",
    "StorageError",
    "gallery_location",
    "location_anchor",
    "migrate_legacy",
    "open_store",
    "split_location",
    "store_exists",
]
