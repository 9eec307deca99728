"""Crash-safe on-disk storage for encrypted galleries.

Layout of a gallery directory::

    meta.msgpack             scheme, key id, parameters (written once, atomically)
    journal.log              append-only records, each: u32 length | u32 crc32 | msgpack
    checkpoint.msgpack       optional snapshot of the replayed journal (atomic)
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

import hashlib
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
from cipherface.errors import GalleryError, StorageCorruptError

_HEADER = struct.Struct("<II")
_MAX_RECORD = 256 * 1024 * 1024
CHECKPOINT_EVERY = 512  # records; bounds replay time after many single enrollments


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
    ) -> None:
        self.path = Path(path)
        self._blocks_dir = self.path / "blocks"
        self._lock = threading.Lock()
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
            write_atomic(meta_path, msgpack.packb(meta, use_bin_type=True), mode=0o600)
            self.meta = dict(meta)
        self._blocks_dir.mkdir(parents=True, exist_ok=True)
        self.blocks: dict[str, BlockRef] = {}
        self.slots: list[str | None] = []
        self.ids_version = 0
        self._records_since_checkpoint = 0
        self._replay()
        self._remove_orphans()
        if verify:
            self.verify_blocks()
        self._journal = open(self.path / "journal.log", "ab", buffering=0)

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
            self.slots = list(snap["slots"])
            self.ids_version = snap["ids_version"]
            self.blocks = {
                k: BlockRef(version=v[0], digest=v[1], nbytes=v[2])
                for k, v in snap["blocks"].items()
            }
            start = snap["journal_records"]
        else:
            start = 0
        for i, rec in enumerate(self._records()):
            if i >= start:
                self._apply(rec)
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
                "blocks": {n: list(v) for n, v in blocks},
                "slots": [[s, i] for s, i in slots],
                "drop_blocks": list(drop_blocks),
            }
            if rec["slots"] or rec["drop_blocks"]:
                rec["ids_version"] = self.ids_version + 1
            body = msgpack.packb(rec, use_bin_type=True)
            self._journal.write(_HEADER.pack(len(body), zlib.crc32(body)) + body)
            os.fsync(self._journal.fileno())
            self._apply(rec)
            for n, ref in old.items():  # superseded versions are garbage now
                if ref is not None:
                    self._block_path(n, ref.version).unlink(missing_ok=True)
            for n in rec["drop_blocks"]:
                for f in self._blocks_dir.glob(f"{n}.*.npy"):
                    f.unlink(missing_ok=True)
            self._records_since_checkpoint += 1
            if self._records_since_checkpoint >= CHECKPOINT_EVERY:
                self._checkpoint()

    def _checkpoint(self) -> None:
        total = sum(1 for _ in self._records())
        snap = {
            "slots": self.slots,
            "ids_version": self.ids_version,
            "blocks": {n: [r.version, r.digest, r.nbytes] for n, r in self.blocks.items()},
            "journal_records": total,
        }
        write_atomic(self.path / "checkpoint.msgpack", msgpack.packb(snap, use_bin_type=True))
        self._records_since_checkpoint = 0

    def close(self) -> None:
        """Close the journal."""
        self._journal.close()
