"""Offline gallery tools: check, stats, export/import (backup), compact.

Export format (``cipherface-gallery-export`` version 1) is a stream of msgpack maps,
never pickle:

1. header ``{format, version, label, meta, ids_version, slots, dead, blocks}`` where
   ``slots`` is the slot list (``None`` free, ``""`` dead in the Paillier layout, else
   an identity), ``dead`` the slots whose deleted template may still be in its block,
   and ``blocks`` a list of ``[name, version, nbytes, blake2b-256 hex]``;
2. one ``{name, data}`` map per block, in the header's order (``data``: the ``.npy`` bytes);
3. trailer ``{end: true, digest}``: BLAKE2b-256 of every byte before the trailer.

Import checks the whole file (every block digest and the trailer) before creating
anything, builds the gallery under a temporary name and renames it into place.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgpack

from cipherface.errors import GalleryError, InvalidArgumentError, StorageCorruptError
from cipherface.store import (
    MIGRATING_NAME,
    location_anchor,
    open_engine,
    open_store,
    split_location,
    store_exists,
)
from cipherface.store.anchor import ANCHOR_NAME, Anchor
from cipherface.store.base import (
    Engine,
    GalleryStore,
    block_digest,
    block_number,
    decode_array,
    slots_per_block,
)
from cipherface.store.sqlite import ANCHOR_SUFFIX, DB_NAME, SqliteEngine

EXPORT_FORMAT = "cipherface-gallery-export"
EXPORT_VERSION = 1
_MAX_CHUNK = 1 << 30


def stats(store: GalleryStore) -> dict[str, Any]:
    """Per-gallery figures: live identities, dead slots awaiting erasure, blocks, bytes."""
    k = slots_per_block(store.meta)
    partial = 0
    if k is not None:
        for name in store.blocks:
            b = block_number(name)
            if b is None or not name.startswith(("col-", "phe-")):
                continue
            rng = range(b * k, min((b + 1) * k, len(store.slots)))
            if any(store._dead[s] for s in rng) and any(store.slots[s] for s in rng):
                partial += 1
    return {
        "gallery": store.label,
        "scheme": store.meta.get("scheme"),
        "key_id": store.meta.get("key_id"),
        "live": store.live_count(),
        "dead_slots": store.dead_slots(),
        "blocks_needing_edge_reencryption": partial,
        "slots": len(store.slots),
        "blocks": len(store.blocks),
        "block_bytes": sum(r.nbytes for r in store.blocks.values()),
        "disk_bytes": store.engine.block_bytes(),
        "ids_version": store.ids_version,
    }


def check(location: str) -> dict[str, Any]:
    """Open read-only-in-effect, verify every row and block (and SQLite's own structure).

    Returns:
        :func:`stats` plus ``ok`` (bool) and ``problems`` (list of messages).
    """
    _, _, label = split_location(location)
    if not store_exists(location):
        return {"gallery": label, "ok": False, "problems": ["no gallery there"]}
    try:
        st = open_store(location, verify=True)
    except StorageCorruptError as exc:
        return {"gallery": label, "ok": False, "problems": [str(exc)]}
    try:
        out = stats(st)
        problems = st.engine.integrity() if isinstance(st.engine, SqliteEngine) else []
        out.update(ok=not problems, problems=problems)
        return out
    finally:
        st.close()


def compact(location: str, *, vacuum: bool = False) -> dict[str, Any]:
    """What the cloud can erase alone: drop every block with no live slot, free its
    dead slots, and give freed pages back (SQLite VACUUM / PostgreSQL VACUUM).

    Blocks that still hold live templates beside dead ones are *not* touched: in the
    CKKS column layout the templates are summed into one ciphertext, so only the key
    holder (the edge) can re-encrypt them without the dead ones. ``vacuum`` also gives
    the freed space back to the filesystem (rewrites the whole SQLite file: slow); the
    freed bytes are zeroed already either way on SQLite.

    Returns:
        ``{"dropped_blocks": n, "freed_slots": n}`` plus :func:`stats` after.
    """
    st = open_store(location, verify=True)
    try:
        k = slots_per_block(st.meta)
        if k is None:
            raise GalleryError(f"gallery {st.label}: unknown block layout, cannot compact")
        drop, freed = [], []
        for name in sorted(st.blocks):
            b = block_number(name)
            if b is None:
                continue
            rng = range(b * k, min((b + 1) * k, len(st.slots)))
            if not any(st.slots[s] for s in rng):
                drop.append(name)
                freed += [s for s in rng if st.slots[s] is not None]
        if drop:
            st.commit(drop_blocks=drop, slots=[(s, None) for s in sorted(set(freed))])
        run_vacuum = getattr(st.engine, "vacuum", None)
        if run_vacuum is not None and (vacuum or not isinstance(st.engine, SqliteEngine)):
            run_vacuum()
        return {"dropped_blocks": len(drop), "freed_slots": len(set(freed)), **stats(st)}
    finally:
        st.close()


# ------------------------------------------------------------------ export / import
def export_gallery(location: str, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write a verified backup of one gallery to ``out`` (0600, atomically)."""
    st = open_store(location, verify=False)
    dest = Path(out)
    tmp = dest.with_name(dest.name + f".{secrets.token_hex(4)}.tmp")
    try:
        h = hashlib.blake2b(digest_size=32)
        names = sorted(st.blocks)
        header = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "label": st.label,
            "meta": st.meta,
            "ids_version": st.ids_version,
            "slots": st.slots,
            "dead": [s for s, d in enumerate(st._dead) if d],
            "blocks": [
                [n, st.blocks[n].version, st.blocks[n].nbytes, st.blocks[n].digest] for n in names
            ],
        }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:

            def put(obj: Any) -> None:
                data = msgpack.packb(obj, use_bin_type=True)
                h.update(data)
                fh.write(data)

            put(header)
            for n in names:
                arr = st.load_block(n)  # digest-checked: a backup never copies damage
                from cipherface.store.base import encode_array

                put({"name": n, "data": encode_array(arr)})
            fh.write(msgpack.packb({"end": True, "digest": h.hexdigest()}, use_bin_type=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        return {"gallery": st.label, "file": str(dest), "blocks": len(names), **stats(st)}
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        st.close()


def _read_export(fh: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Yield the header, then each block map; check the trailer digest at the end."""
    unpacker = msgpack.Unpacker(
        fh, raw=False, strict_map_key=False, max_buffer_size=_MAX_CHUNK, use_list=True
    )
    h = hashlib.blake2b(digest_size=32)
    count = 0
    header: dict[str, Any] | None = None
    for obj in unpacker:
        if not isinstance(obj, dict):
            raise StorageCorruptError("export: not a map")
        if obj.get("end") is True:
            if header is None or count != len(header["blocks"]):
                raise StorageCorruptError("export: blocks missing")
            if obj.get("digest") != h.hexdigest():
                raise StorageCorruptError("export: file digest mismatch (altered or truncated)")
            return
        h.update(msgpack.packb(obj, use_bin_type=True))
        if header is None:
            if obj.get("format") != EXPORT_FORMAT or obj.get("version") != EXPORT_VERSION:
                raise StorageCorruptError("export: not a cipherface gallery export v1")
            header = obj
        else:
            want = header["blocks"][count]
            data = obj.get("data")
            if obj.get("name") != want[0] or not isinstance(data, bytes):
                raise StorageCorruptError(f"export: block {count} is not {want[0]}")
            if len(data) != want[2] or block_digest(data) != want[3]:
                raise StorageCorruptError(f"export: block {want[0]} fails its checksum")
            count += 1
        yield obj
    raise StorageCorruptError("export: truncated (no trailer)")


def _check_header(h: dict[str, Any]) -> None:
    ok = (
        isinstance(h.get("meta"), dict)
        and isinstance(h.get("ids_version"), int)
        and isinstance(h.get("slots"), list)
        and all(s is None or isinstance(s, str) for s in h["slots"])
        and isinstance(h.get("dead"), list)
        and all(isinstance(s, int) and 0 <= s < len(h["slots"]) for s in h["dead"])
        and isinstance(h.get("blocks"), list)
    )
    if not ok:
        raise StorageCorruptError("export: malformed header")


def import_gallery(src: str | os.PathLike[str], location: str) -> dict[str, Any]:
    """Restore a gallery from an export into a location where none exists.

    Raises:
        InvalidArgumentError: a gallery exists there already.
        StorageCorruptError: the file fails a check (nothing is created).
    """
    if store_exists(location):
        raise InvalidArgumentError("a gallery exists there already: import into a new location")
    with open(src, "rb") as fh:  # pass 1: the whole file checks out
        for obj in _read_export(fh):
            if "format" in obj:
                _check_header(obj)
    engine, where, label = split_location(location)
    eng: Engine
    if engine == "sqlite":
        tmp_loc = f"sqlite:{where}#{label}"
        for suffix in ("", "-wal", "-shm", ".new"):  # an interrupted import's leftovers
            Path(str(Path(where) / MIGRATING_NAME) + suffix).unlink(missing_ok=True)
        eng = SqliteEngine(where, label=label, db_name=MIGRATING_NAME)
    else:
        tmp_loc = f"{where}#{label}.importing-{secrets.token_hex(4)}"
        eng = open_engine(tmp_loc)
    try:
        with open(src, "rb") as fh:
            it = _read_export(fh)
            header = next(it)
            # "restored" marks a deliberate restore: the workers' anchors of the lost
            # gallery accept this new incarnation (never one a worker started empty).
            meta = {**header["meta"], "restored": secrets.token_hex(8)}
            st = GalleryStore(eng, meta=meta, verify=False)
            for obj in it:
                arr = decode_array(obj["data"], f"export block {obj['name']}")
                st.commit(blocks=[st.stage_block(obj["name"], arr)])
            st.commit(
                slots=list(enumerate(header["slots"])),
                mark_dead=header["dead"],
                ids_version=int(header["ids_version"]) + 1,
            )
            st.verify_blocks()
    except BaseException:
        eng.close()
        if engine == "sqlite":
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(str(Path(where) / MIGRATING_NAME) + suffix).unlink(missing_ok=True)
        else:
            from cipherface.store.postgres import drop_gallery

            drop_gallery(where, tmp_loc.partition("#")[2])
        raise
    eng.close()
    # A restore is the operator's deliberate way back: the lost gallery's anchors go.
    _, anchor_dir = location_anchor(location)
    if anchor_dir is not None:
        Anchor(anchor_dir / ANCHOR_NAME, label=label).drop()
    if engine == "sqlite":
        Path(str(Path(where) / DB_NAME) + ANCHOR_SUFFIX).unlink(missing_ok=True)
        os.replace(Path(where) / MIGRATING_NAME, Path(where) / DB_NAME)
        Path(str(Path(where) / MIGRATING_NAME) + ".lock").unlink(missing_ok=True)
    else:
        from cipherface.store.postgres import rename_gallery

        rename_gallery(where, tmp_loc.partition("#")[2], label)
    st2 = open_store(location, verify=True)
    try:
        return {"imported": True, **stats(st2)}
    finally:
        st2.close()
