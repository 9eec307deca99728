"""Read-only reader of the pre-database gallery layout, and its one-shot migration.

The old layout (``meta.msgpack``, ``journal.log``, ``checkpoint.msgpack``,
``blocks/<name>.<version>.npy``) is read strictly: unlike the old store, this reader
never truncates, deletes or guesses. A torn or failing journal record, a record
gap, a missing or altered block, or block files with no record at all (journal and
checkpoint lost) all raise :class:`~cipherface.errors.StorageCorruptError`, and the
files stay exactly as they were. A torn *last* record is accepted only when the
caller says so (``accept_torn_tail``): the old store could acknowledge a short write
on a full disk, so dropping it might undo an acknowledged change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from cipherface.errors import StorageCorruptError

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_MAX_RECORD = 256 * 1024 * 1024
LEGACY_FILES = ("meta.msgpack", "journal.log", "checkpoint.msgpack")


def is_legacy(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / "meta.msgpack").exists()


@dataclass
class LegacyGallery:
    meta: dict[str, Any]
    slots: list[str | None] = field(default_factory=list)
    ids_version: int = 0
    blocks: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # version, digest, nbytes
    torn_tail: bool = False
    orphans: list[str] = field(default_factory=list)  # block files no record names

    def block_path(self, directory: Path, name: str) -> Path:
        return directory / "blocks" / f"{name}.{self.blocks[name][0]}.npy"


def _unpack(path: Path, label: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except Exception as exc:
        raise StorageCorruptError(f"gallery {label}: {path.name} is corrupt ({exc})") from exc
    if not isinstance(obj, dict):
        raise StorageCorruptError(f"gallery {label}: {path.name} is not a map")
    return obj


def read_legacy(
    directory: str | os.PathLike[str], *, label: str, accept_torn_tail: bool = False
) -> LegacyGallery:
    """Read an old-layout gallery without changing a byte of it.

    Raises:
        StorageCorruptError: anything does not check out (see the module docstring).
    """
    d = Path(directory)
    g = LegacyGallery(meta=_unpack(d / "meta.msgpack", label))
    seq = 0
    ck = d / "checkpoint.msgpack"
    try:
        if ck.exists():
            snap = _unpack(ck, label)
            g.slots = [None if s is None else str(s) for s in snap["slots"]]
            g.ids_version = int(snap["ids_version"])
            seq = int(snap["seq"])
            g.blocks = {
                str(k): (int(v[0]), str(v[1]), int(v[2])) for k, v in snap["blocks"].items()
            }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StorageCorruptError(f"gallery {label}: checkpoint is corrupt ({exc})") from exc
    jpath = d / "journal.log"
    data = jpath.read_bytes() if jpath.exists() else b""
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            body, length, crc = b"", -1, 0
        else:
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        complete = 0 <= length <= _MAX_RECORD and len(body) == length
        if not complete or zlib.crc32(body) != crc:
            last = not complete or pos + _HEADER.size + length == len(data)
            if last and not complete and accept_torn_tail:
                log.warning("gallery %s: dropping a torn last journal record (accepted)", label)
                g.torn_tail = True
                break
            raise StorageCorruptError(
                f"gallery {label}: journal record at byte {pos} is "
                f"{'torn' if not complete else 'damaged'}; refusing to guess (nothing changed)"
            )
        try:
            rec = msgpack.unpackb(body, raw=False, strict_map_key=False)
            rseq = int(rec["seq"])
        except Exception as exc:
            raise StorageCorruptError(f"gallery {label}: journal record unreadable") from exc
        pos += _HEADER.size + length
        if rseq <= seq:
            continue
        if rseq != seq + 1:
            raise StorageCorruptError(f"gallery {label}: journal records lost after {seq}")
        seq = rseq
        try:
            for name, (ver, digest, nbytes) in rec.get("blocks", {}).items():
                g.blocks[str(name)] = (int(ver), str(digest), int(nbytes))
            for slot, ident in rec.get("slots", []):
                if slot >= len(g.slots):
                    g.slots.extend([None] * (slot + 1 - len(g.slots)))
                g.slots[slot] = ident
            for name in rec.get("drop_blocks", []):
                g.blocks.pop(name, None)
            if "ids_version" in rec:
                g.ids_version = int(rec["ids_version"])
        except (TypeError, ValueError) as exc:
            raise StorageCorruptError(f"gallery {label}: journal record malformed") from exc
    bdir = d / "blocks"
    named = {f"{n}.{v[0]}.npy" for n, v in g.blocks.items()}
    files = sorted(p.name for p in bdir.iterdir()) if bdir.is_dir() else []
    g.orphans = [f for f in files if f not in named]
    if files and not g.blocks:
        raise StorageCorruptError(
            f"gallery {label}: {len(files)} block files but no state names them "
            "(journal/checkpoint lost); refusing to start empty"
        )
    for name in g.blocks:
        p = g.block_path(d, name)
        ver, digest, nbytes = g.blocks[name]
        if not p.exists():
            raise StorageCorruptError(f"gallery {label}: block {name} is missing")
        if p.stat().st_size != nbytes:
            raise StorageCorruptError(f"gallery {label}: block {name} is truncated or grown")
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise StorageCorruptError(f"gallery {label}: block {name} fails its checksum")
    return g


def retire_legacy(directory: str | os.PathLike[str], g: LegacyGallery, *, label: str) -> None:
    """After a verified migration: delete the old files, or keep them in ``legacy/``
    when anything was in doubt (orphan block files, an accepted torn tail)."""
    d = Path(directory)
    doubt = g.torn_tail or bool(g.orphans)
    keep = d / "legacy"
    if doubt:
        keep.mkdir(exist_ok=True)
        log.warning(
            "gallery %s: migrated; old files kept in legacy/ for inspection (%s)",
            label,
            "torn tail" if g.torn_tail else f"{len(g.orphans)} unreferenced block files",
        )
    for name in LEGACY_FILES:
        p = d / name
        if p.exists():
            if doubt:
                os.replace(p, keep / name)
            else:
                p.unlink()
    bdir = d / "blocks"
    if bdir.is_dir():
        if doubt:
            os.replace(bdir, keep / "blocks")
        else:
            shutil.rmtree(bdir)
