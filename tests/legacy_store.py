"""The gallery store as it was before cipherface.store (journal + checkpoint + block files).

Kept verbatim (only this docstring line changed) so the migration tests can write a
gallery exactly as deployed clouds did. Not used by the project.

Original first line: Crash-safe on-disk storage for encrypted galleries.

Layout of a gallery directory::

    meta.msgpack             scheme, key id, parameters (written once, atomically)
    journal.log              append-only records, each: u32 length | u32 crc32 | msgpack;
                             every record carries a sequence number ``seq``
    checkpoint.msgpack       optional snapshot of the state up to a ``seq`` (atomic);
                             after writing it the journal is emptied, so deleted
                             identities do not linger in old records
    .lock                    flock held by the one process that has the gallery open
    blocks/<kind>-<no>.<ver>.npy   immutable array files, one per block version

A block is never modified in place: a change writes a *new version* file, fsyncs
it, then appends one journal record that names the new version and its BLAKE2b
digest together with the slot changes. The record is the commit point: a crash
before it leaves an orphan file (ignored and removed on open), a crash inside it
leaves a torn tail record (dropped: it was never acknowledged). Anything else that
does not check out -- a bad CRC before the tail, a block whose size or digest
differs from its record -- raises :class:`~cipherface.errors.StorageCorruptError`.

Block files are ``.npy`` so they load with ``np.load(mmap_mode="r")``: reopening a
million-template gallery maps files instead of parsing them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from cipherface.crypto.keyfile import write_atomic
from cipherface.errors import GalleryError, KeyFileError, StorageCorruptError, StorageError

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_MAX_RECORD = 256 * 1024 * 1024
CHECKPOINT_EVERY = 512  # records; bounds replay time after many single enrollments


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data, mode=0o600)
    except KeyFileError as exc:  # write_atomic speaks for key files; this is storage
        raise StorageError(str(exc)) from exc


def _digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class BlockRef:
    """One committed block version."""

    version: int
    digest: str
    nbytes: int


class GalleryStore:
    """Journal + versioned block files. Not thread-safe for writers: one writer per gallery.

    Args:
        path: the gallery directory.
        meta: required when creating a new gallery; checked against the stored meta otherwise
            (``scheme``, ``key_id`` and ``dim`` must match).
        verify: check every block's digest on open (detects corrupted/truncated files).

    Raises:
        StorageCorruptError: the journal or a block file fails its checks.
        GalleryError: ``meta`` does not match the stored gallery, or no gallery and no meta.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        meta: dict[str, Any] | None = None,
        verify: bool = True,
        preload: tuple[str, ...] = (),  # accepted as the new store's; blocks are mapped
    ) -> None:
        self.path = Path(path)
        self._blocks_dir = self.path / "blocks"
        self._lock = threading.Lock()
        self.path.mkdir(parents=True, exist_ok=True)
        # One process per gallery: a second opener would delete the first one's staged
        # files as orphans and could truncate a journal record being appended.
        self._lockfile = open(self.path / ".lock", "a+b")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lockfile.close()
            raise StorageError(f"gallery {self.path} is open in another process") from None
        meta_path = self.path / "meta.msgpack"
        if meta_path.exists():
            stored = self._unpack_file(meta_path)
            if meta is not None:
                for k in ("scheme", "key_id", "dim"):
                    if k in meta and stored.get(k) != meta[k]:
                        raise GalleryError(
                            f"gallery {self.path} holds {k}={stored.get(k)!r}, "
                            f"not {meta[k]!r}: re-enroll under the new key or use another directory"
                        )
            self.meta: dict[str, Any] = stored
        elif meta is None:
            raise GalleryError(f"no gallery at {self.path}")
        else:
            self._blocks_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(meta_path, msgpack.packb(meta, use_bin_type=True))
            self.meta = dict(meta)
        self._blocks_dir.mkdir(parents=True, exist_ok=True)
        self.blocks: dict[str, BlockRef] = {}
        self.slots: list[str | None] = []
        self.ids_version = 0
        self.seq = 0
        self._records_since_checkpoint = 0
        self._replay()
        self._remove_orphans()
        if verify:
            self.verify_blocks()
        jpath = self.path / "journal.log"
        created = not jpath.exists()
        self._journal = open(jpath, "ab", buffering=0)
        if created:
            _fsync_dir(self.path)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _unpack_file(path: Path) -> dict[str, Any]:
        try:
            obj = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        except Exception as exc:
            raise StorageCorruptError(f"{path} is corrupt: {exc}") from exc
        if not isinstance(obj, dict):
            raise StorageCorruptError(f"{path} is corrupt: not a map")
        return obj

    def _records(self) -> Iterator[dict[str, Any]]:
        jpath = self.path / "journal.log"
        if not jpath.exists():
            return
        data = jpath.read_bytes()
        pos, end = 0, len(data)
        while pos < end:
            if end - pos < _HEADER.size:
                self._truncate_tail(jpath, pos)
                return
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if length > _MAX_RECORD or len(body) < length:
                # A record cut short by a crash is the tail; it was never acknowledged.
                self._truncate_tail(jpath, pos)
                return
            if zlib.crc32(body) != crc:
                if pos + _HEADER.size + length == end:
                    self._truncate_tail(jpath, pos)
                    return
                raise StorageCorruptError(
                    f"{jpath} is corrupt at byte {pos}: record checksum mismatch"
                )
            pos += _HEADER.size + length
            rec = msgpack.unpackb(body, raw=False, strict_map_key=False)
            if not isinstance(rec, dict):
                raise StorageCorruptError(f"{jpath} is corrupt at byte {pos}: not a record")
            yield rec

    @staticmethod
    def _truncate_tail(jpath: Path, pos: int) -> None:
        with open(jpath, "r+b") as fh:
            fh.truncate(pos)
            fh.flush()
            os.fsync(fh.fileno())

    def _apply(self, rec: dict[str, Any]) -> None:
        self.seq = int(rec.get("seq", self.seq + 1))
        for name, (ver, digest, nbytes) in rec.get("blocks", {}).items():
            self.blocks[name] = BlockRef(version=ver, digest=digest, nbytes=nbytes)
        for slot, ident in rec.get("slots", []):
            if slot >= len(self.slots):
                self.slots.extend([None] * (slot + 1 - len(self.slots)))
            self.slots[slot] = ident
        for name in rec.get("drop_blocks", []):
            self.blocks.pop(name, None)
        if "ids_version" in rec:
            self.ids_version = rec["ids_version"]

    def _replay(self) -> None:
        ck = self.path / "checkpoint.msgpack"
        if ck.exists():
            snap = self._unpack_file(ck)
            try:
                self.slots = list(snap["slots"])
                self.ids_version = int(snap["ids_version"])
                self.seq = int(snap["seq"])
                self.blocks = {
                    k: BlockRef(version=v[0], digest=v[1], nbytes=v[2])
                    for k, v in snap["blocks"].items()
                }
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise StorageCorruptError(f"{ck} is corrupt: {exc}") from exc
        expected = self.seq + 1
        for rec in self._records():
            seq = rec.get("seq")
            if not isinstance(seq, int):
                raise StorageCorruptError(f"{self.path / 'journal.log'}: record without seq")
            if seq <= self.seq:
                continue  # already in the checkpoint (crash before the journal was emptied)
            if seq != expected:
                raise StorageCorruptError(
                    f"{self.path / 'journal.log'}: record {seq} follows {expected - 1} "
                    "(records lost)"
                )
            self._apply(rec)
            expected += 1
            self._records_since_checkpoint += 1

    def _block_path(self, name: str, version: int) -> Path:
        return self._blocks_dir / f"{name}.{version}.npy"

    def _remove_orphans(self) -> None:
        live = {self._block_path(n, r.version).name for n, r in self.blocks.items()}
        for f in self._blocks_dir.iterdir():
            if f.name not in live:
                f.unlink(missing_ok=True)

    def verify_blocks(self) -> None:
        """Check every committed block file's size and digest (in parallel).

        Raises:
            StorageCorruptError: a block is missing, truncated or altered.
        """

        def check(item: tuple[str, BlockRef]) -> None:
            name, ref = item
            p = self._block_path(name, ref.version)
            if not p.exists():
                raise StorageCorruptError(f"gallery block {p} is missing")
            if p.stat().st_size != ref.nbytes:
                raise StorageCorruptError(
                    f"gallery block {p} is {p.stat().st_size} bytes, "
                    f"expected {ref.nbytes} (truncated?)"
                )
            if _digest_file(p) != ref.digest:
                raise StorageCorruptError(f"gallery block {p} fails its checksum (corrupted)")

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
            list(ex.map(check, self.blocks.items()))

    def load_block(self, name: str) -> npt.NDArray[Any]:
        """Memory-map a committed block read-only."""
        ref = self.blocks[name]
        try:
            arr = np.load(self._block_path(name, ref.version), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StorageCorruptError(f"gallery block {name} cannot be read: {exc}") from exc
        return arr

    # ------------------------------------------------------------------ writing
    def stage_block(self, name: str, array: npt.NDArray[Any]) -> tuple[str, tuple[int, str, int]]:
        """Write a new version of block ``name`` (not visible until :meth:`commit`)."""
        version = self.blocks[name].version + 1 if name in self.blocks else 1
        p = self._block_path(name, version)
        tmp = p.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        _fsync_dir(self._blocks_dir)  # the journal record must never name a lost entry
        return name, (version, _digest_file(p), p.stat().st_size)

    def commit(
        self,
        *,
        blocks: Iterable[tuple[str, tuple[int, str, int]]] = (),
        slots: Iterable[tuple[int, str | None]] = (),
        drop_blocks: Iterable[str] = (),
    ) -> None:
        """Atomically publish staged blocks and slot changes; durable on return."""
        with self._lock:
            blocks = list(blocks)
            old = {n: self.blocks.get(n) for n, _ in blocks}
            rec: dict[str, Any] = {
                "seq": self.seq + 1,
                "blocks": {n: list(v) for n, v in blocks},
                "slots": [[s, i] for s, i in slots],
                "drop_blocks": list(drop_blocks),
            }
            if rec["slots"] or rec["drop_blocks"]:
                rec["ids_version"] = self.ids_version + 1
            body = msgpack.packb(rec, use_bin_type=True)
            offset = self._journal.tell()
            try:
                self._journal.write(_HEADER.pack(len(body), zlib.crc32(body)) + body)
                os.fsync(self._journal.fileno())
            except OSError as exc:
                # Never leave a partial record in the middle of the journal.
                with contextlib.suppress(OSError):
                    self._journal.truncate(offset)
                raise StorageError(f"cannot append to {self.path / 'journal.log'}: {exc}") from exc
            self._apply(rec)
            for n, ref in old.items():  # superseded versions are garbage now
                if ref is not None:
                    self._block_path(n, ref.version).unlink(missing_ok=True)
            for n in rec["drop_blocks"]:
                for f in self._blocks_dir.glob(f"{n}.*.npy"):
                    f.unlink(missing_ok=True)
            self._records_since_checkpoint += 1
            if self._records_since_checkpoint >= CHECKPOINT_EVERY:
                try:
                    self._checkpoint()
                except (OSError, StorageError) as exc:  # the record is durable already
                    log.warning("gallery %s: checkpoint failed (%s); will retry", self.path, exc)

    def _checkpoint(self) -> None:
        """Snapshot the state, then empty the journal (its records are all in the snapshot)."""
        snap = {
            "seq": self.seq,
            "slots": self.slots,
            "ids_version": self.ids_version,
            "blocks": {n: [r.version, r.digest, r.nbytes] for n, r in self.blocks.items()},
        }
        _write_atomic(self.path / "checkpoint.msgpack", msgpack.packb(snap, use_bin_type=True))
        self._journal.close()
        _write_atomic(self.path / "journal.log", b"")
        self._journal = open(self.path / "journal.log", "ab", buffering=0)
        self._records_since_checkpoint = 0

    def close(self) -> None:
        """Close the journal and release the gallery's lock."""
        self._journal.close()
        self._lockfile.close()
