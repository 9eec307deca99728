"""The gallery store: one interface over a transactional metadata database and
immutable, checksummed ciphertext blocks.

A gallery's state is a list of slots (``None`` free, ``""`` dead for the Paillier
layout, else an identity), a map of named blocks (numpy arrays, one immutable
*version* each) and ``ids_version``. Engines (:mod:`cipherface.store.sqlite`,
:mod:`cipherface.store.postgres`) keep it in one database; every change is one
transaction, and the in-memory copy changes only after that transaction commits.

Integrity does not rely on the engine: every row carries a 63-bit BLAKE2b check of
its own fields, the gallery row holds the count and the sum of those checks (so a
lost or added row is seen as well as a flipped one), and every block carries the
BLAKE2b-256 digest of its bytes, verified at open and again on every load. A block
verified at open is read and hashed once: the ones the gallery asked to keep
(``preload``) are handed to its first :meth:`GalleryStore.load_block` from memory.
"""

from __future__ import annotations

import logging
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import msgpack
import numpy.typing as npt

from cipherface.errors import (
    AlreadyAnsweredError,
    GalleryError,
    StorageConflictError,
    StorageCorruptError,
    StorageError,
)
from cipherface.store.replies import Reply, ReplyKey
from cipherface.store.rows import (
    FORMAT,
    ROW_MASK,
    BlockRef,
    GalleryRow,
    SlotRow,
    Snapshot,
    StagedBlock,
    block_digest,
    block_number,
    decode_array,
    encode_array,
    row_check,
    slot_check,
    slots_per_block,
)

log = logging.getLogger(__name__)


class Engine(ABC):
    """What a database must do for :class:`GalleryStore` (one gallery per instance)."""

    label: str  # names the gallery in errors: never a server path

    @abstractmethod
    def read(self) -> Snapshot | None:
        """The committed state, or None when the gallery does not exist."""

    @abstractmethod
    def create(self, gallery: GalleryRow) -> None:
        """Create the gallery (one transaction)."""

    @abstractmethod
    def read_block(self, name: str) -> tuple[BlockRef, int, bytes] | None:
        """A block's row, its stored check and its bytes; None if the row is missing."""

    @abstractmethod
    def write(
        self,
        *,
        expect_seq: int,
        gallery: GalleryRow,
        slots: list[SlotRow],
        blocks: list[StagedBlock],
        drop: list[str],
        reply: tuple[ReplyKey, bytes] | None = None,
    ) -> None:
        """Apply one change in one transaction; raise on any failure (nothing applied).

        ``reply``: the reply of the request the change carries out, stored in the same
        transaction (:mod:`cipherface.store.replies`).

        Raises:
            AlreadyAnsweredError: a reply is stored under ``reply``'s key already.
        """

    @abstractmethod
    def find_reply(self, key: ReplyKey) -> bytes | None:
        """The reply stored under ``key``, or None."""

    @abstractmethod
    def put_reply(self, key: ReplyKey, data: bytes) -> bytes | None:
        """Store the reply of a request that changed nothing (no commit, no ``seq``).

        Returns:
            None when ``data`` was stored; the reply stored under ``key`` before otherwise
            (which stays).
        """

    @abstractmethod
    def prune_replies(self, max_age_s: float) -> int:
        """Delete the replies stored more than ``max_age_s`` ago, in short transactions.

        Returns:
            How many were deleted.
        """

    @abstractmethod
    def current_seq(self) -> int | None:
        """The committed ``seq`` (cheap): differs from ours when another worker wrote."""

    def opened(self, gallery: GalleryRow) -> None:  # noqa: B027 - optional hook
        """The gallery at ``gallery`` passed every check at open (anchors advance)."""

    def after_commit(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Fold the commit into the main files and push freed block bytes out of them."""

    def block_bytes(self) -> int:
        """Bytes the gallery takes on disk (approximate for shared databases)."""
        return 0

    def preserve_evidence(self) -> None:  # noqa: B027 - optional hook
        """Damage was found: keep a copy of the engine's files before anything touches them."""

    @abstractmethod
    def close(self) -> None: ...


class GalleryStore:
    """One gallery: slots, blocks and ``ids_version`` over an :class:`Engine`.

    Not thread-safe for writers (one writer per gallery object; the galleries lock).

    Args:
        engine: the database holding this gallery.
        meta: required to create a gallery; checked against the stored one otherwise
            (``scheme``, ``key_id``, ``dim`` must match).
        verify: read every block and check its digest at open (every block's row and
            size are checked at open in any case, and its digest on every load).
        preload: name prefixes of the blocks to keep in memory from that check (e.g.
            ``("col-",)``: the blocks every identify reads): the first
            :meth:`load_block` of each gets the verified array instead of reading and
            hashing it again. Other blocks are checked and dropped.

    Raises:
        StorageCorruptError: a row or block fails its check, or rows are missing.
        GalleryError: ``meta`` disagrees with the stored gallery, or no gallery and no meta.
        StorageError: the database cannot be read.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        meta: dict[str, Any] | None = None,
        verify: bool = True,
        preload: tuple[str, ...] = (),
    ) -> None:
        self.engine = engine
        self.label = engine.label
        self._lock = threading.Lock()
        # name -> (version, array) checked at open, given to the first load_block.
        self._verified: dict[str, tuple[int, npt.NDArray[Any]]] = {}
        snap = engine.read()
        if snap is None:
            if meta is None:
                raise GalleryError(f"no gallery {self.label}")
            row = GalleryRow(
                format=FORMAT,
                meta=msgpack.packb(meta, use_bin_type=True),
                ids_version=0,
                seq=0,
                nslots=0,
                slot_sum=0,
                block_sum=0,
                nblocks=0,
            )
            engine.create(row)
            snap = engine.read()
            if snap is None:
                raise StorageCorruptError(f"gallery {self.label} vanished after creation")
        self._load_head(snap)
        if meta is not None:
            for k in ("scheme", "key_id", "dim"):
                if k in meta and self.meta.get(k) != meta[k]:
                    raise GalleryError(
                        f"gallery {self.label} holds {k}={self.meta.get(k)!r}, not "
                        f"{meta[k]!r}: re-enroll under the new key or use another gallery"
                    )
        # The blocks are read and hashed (threads, GIL released) while this thread checks
        # the slot rows (Python): at a million templates both take seconds.
        pending = self._verify_start(preload) if verify else None
        try:
            self._load_slots(snap)
        except BaseException:
            if pending is not None:
                pending[0].shutdown(wait=True, cancel_futures=True)
            raise
        if pending is not None:
            self._verify_finish(*pending)
        engine.opened(self._row)

    def _verify_start(
        self, preload: tuple[str, ...]
    ) -> tuple[ThreadPoolExecutor, list[tuple[str, Future[npt.NDArray[Any] | None]]]]:
        """Submit every block to be read and checked; the ``preload`` ones come back
        decoded."""

        def one(name: str) -> npt.NDArray[Any] | None:
            data = self._block_bytes(name)
            if not name.startswith(preload):  # () keeps none
                return None
            return decode_array(data, f"gallery {self.label}: block {name}")

        names = sorted(self.blocks)
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cf-verify")
        return pool, [(n, pool.submit(one, n)) for n in names]

    def _verify_finish(
        self,
        pool: ThreadPoolExecutor,
        jobs: list[tuple[str, Future[npt.NDArray[Any] | None]]],
    ) -> None:
        """Wait for :meth:`_verify_start`'s checks; keep the decoded blocks.

        Raises:
            StorageCorruptError: a block is missing, truncated or altered.
        """
        try:
            for name, job in jobs:
                arr = job.result()
                if arr is not None:
                    self._verified[name] = (self.blocks[name].version, arr)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ reading
    def _corrupt(self, what: str) -> StorageCorruptError:
        self.engine.preserve_evidence()
        return StorageCorruptError(f"gallery {self.label}: {what}")

    def _load_head(self, snap: Snapshot) -> None:
        """Check the gallery row, its meta and the block rows; set all but the slots."""
        g = snap.gallery
        if snap.gallery_check != g.check:
            raise self._corrupt("the gallery row fails its check")
        if g.format != FORMAT:
            raise self._corrupt(f"unknown store format {g.format}")
        try:
            meta = msgpack.unpackb(g.meta, raw=False, strict_map_key=False)
        except Exception as exc:
            raise self._corrupt(f"meta cannot be read: {exc}") from exc
        if not isinstance(meta, dict):
            raise self._corrupt("meta is not a map")
        blocks: dict[str, BlockRef] = {}
        total = 0
        for ref, stored, size in snap.blocks:
            if stored != ref.check or ref.name in blocks:
                raise self._corrupt(f"block row {ref.name!r} fails its check")
            if size != ref.nbytes:  # the database knows the size without reading the bytes
                raise self._corrupt(f"block {ref.name} is {size} bytes, expected {ref.nbytes}")
            blocks[ref.name] = ref
            total += stored
        if len(blocks) != g.nblocks or total & ROW_MASK != g.block_sum:
            raise self._corrupt(
                f"{g.nblocks} block rows expected, {len(blocks)} found (rows lost or altered)"
            )
        self.meta: dict[str, Any] = meta
        self.blocks: dict[str, BlockRef] = blocks
        self.ids_version = g.ids_version
        self._row = g

    def _load_slots(self, snap: Snapshot) -> None:
        """Check every slot row against its check and the gallery row's count and sum."""
        g = snap.gallery
        slots: list[str | None] = [None] * g.nslots
        dead = bytearray(g.nslots)
        seen = bytearray(g.nslots)
        total = 0
        n = g.nslots
        check = slot_check
        try:  # one tight loop: a million rows are checked on every open
            for s, ident, d, stored in snap.slots:
                if not 0 <= s < n or seen[s] or stored != check(s, ident, d):
                    raise self._corrupt(f"slot row {s} fails its check")
                seen[s] = 1
                slots[s] = ident
                dead[s] = 1 if d else 0
                total += stored
        except (TypeError, ValueError, AttributeError, struct.error) as exc:
            raise self._corrupt(f"a slot row cannot be read ({type(exc).__name__})") from exc
        if len(snap.slots) != g.nslots or total & ROW_MASK != g.slot_sum:
            raise self._corrupt(
                f"{g.nslots} slot rows expected, {len(snap.slots)} found (rows lost or altered)"
            )
        self.slots: list[str | None] = slots
        self._dead = dead

    @property
    def seq(self) -> int:
        return self._row.seq

    def stale(self) -> bool:
        """True when another process committed since we read (shared engines)."""
        cur = self.engine.current_seq()
        return cur != self._row.seq

    def _moved(self) -> bool:
        """Whether the committed gallery is no longer the one we read (shared engines)."""
        try:
            return self.stale()
        except StorageError:  # cannot tell: the caller reports what it found
            return False

    def dead_slots(self) -> int:
        """Slots whose identity was deleted or replaced while its block still exists."""
        k = slots_per_block(self.meta)
        if k is None:
            return sum(self._dead)
        live = {n for n in (block_number(b) for b in self.blocks) if n is not None}
        return sum(1 for s, d in enumerate(self._dead) if d and s // k in live)

    def live_count(self) -> int:
        return sum(1 for s in self.slots if s)

    def load_block(self, name: str) -> npt.NDArray[Any]:
        """Read a committed block into memory, verifying its digest (read-only array).

        A block kept from the check at open (``preload``) is returned from memory once:
        those bytes were checked then, and later damage on disk cannot reach them.

        Raises:
            KeyError: no such block.
            StorageCorruptError: the block is missing, truncated or altered.
        """
        version = self.blocks[name].version
        kept = self._verified.pop(name, None)
        if kept is not None and kept[0] == version:
            return kept[1]
        return decode_array(self._block_bytes(name), f"gallery {self.label}: block {name}")

    def _block_bytes(self, name: str) -> bytes:
        ref = self.blocks[name]
        got = self.engine.read_block(name)
        if got is None or got[0] != ref or got[1] != ref.check:
            if self._moved():
                # Another worker committed since we read the rows (a new version of this
                # block, or it dropped it): not damage. Retryable; the caller reloads.
                raise StorageConflictError(
                    f"gallery {self.label} was changed by another worker while block "
                    f"{name} was read; retry"
                )
            if got is None:
                raise self._corrupt(f"block {name} is missing")
            raise self._corrupt(f"block {name} row changed under us (version {got[0].version})")
        data = got[2]
        if len(data) != ref.nbytes:
            raise self._corrupt(f"block {name} is {len(data)} bytes, expected {ref.nbytes}")
        if block_digest(data) != ref.digest:
            raise self._corrupt(f"block {name} fails its checksum")
        return data

    def verify_blocks(self, *, preload: tuple[str, ...] = ()) -> None:
        """Read every block and check its size and digest (two threads: hashing and
        SQLite/psycopg reads release the GIL); keep those named by ``preload`` for their
        first :meth:`load_block`.

        Raises:
            StorageCorruptError: a block is missing, truncated or altered.
        """
        self._verify_finish(*self._verify_start(preload))

    # ------------------------------------------------------------------ writing
    def stage_block(self, name: str, array: npt.NDArray[Any]) -> StagedBlock:
        """Prepare a new version of block ``name`` (nothing is written until :meth:`commit`)."""
        data = encode_array(array)
        version = self.blocks[name].version + 1 if name in self.blocks else 1
        ref = BlockRef(name=name, version=version, nbytes=len(data), digest=block_digest(data))
        return StagedBlock(ref=ref, data=data)

    def commit(
        self,
        *,
        blocks: Iterable[StagedBlock] = (),
        slots: Iterable[tuple[int, str | None]] = (),
        drop_blocks: Iterable[str] = (),
        mark_dead: Iterable[int] = (),
        ids_version: int | None = None,
        reply: Reply | None = None,
    ) -> None:
        """Publish staged blocks, slot changes and block drops in one transaction.

        ``mark_dead`` (migration, import) flags free slots whose old ciphertext may still
        be in their block; ``ids_version`` sets the version (never lower than now).
        ``reply`` is the reply of the request this commit carries out: rendered with the
        new ``ids_version`` and stored in the same transaction (``reply.data`` on
        return). With a reply and nothing to change, only the reply is stored: no
        commit, ``seq`` stays (other workers need not reload).

        Durable on return; on any exception nothing changed, in memory or on disk.

        Raises:
            AlreadyAnsweredError: a reply is stored under ``reply.key`` already (this
                request was carried out before): it carries that reply.
            StorageFullError: no space left (retryable).
            StorageConflictError: another worker wrote this gallery first (retryable).
            StorageError: the database failed.
        """
        staged = list(blocks)
        changes = list(slots)
        drops = [n for n in dict.fromkeys(drop_blocks) if n in self.blocks]
        marks = list(mark_dead)
        if reply is not None and not (staged or changes or drops or marks):
            if ids_version is None or ids_version <= self.ids_version:
                self._answer(reply)
                return
        with self._lock:
            g = self._row
            nslots = g.nslots
            for s, _ in changes:
                if s < 0:
                    raise ValueError(f"slot {s} < 0")
                nslots = max(nslots, s + 1)
            rows: dict[int, SlotRow] = {
                s: SlotRow(slot=s, ident=None, dead=False) for s in range(g.nslots, nslots)
            }

            def current(s: int) -> SlotRow:
                if s in rows:
                    return rows[s]
                return SlotRow(slot=s, ident=self.slots[s], dead=bool(self._dead[s]))

            slot_sum = g.slot_sum
            old_checks: dict[int, int] = {}
            for s, ident in changes:
                prev = current(s)
                if s < g.nslots and s not in old_checks:
                    old_checks[s] = prev.check
                dead = not ident and (bool(prev.ident) or prev.dead)
                rows[s] = SlotRow(slot=s, ident=ident, dead=dead)
            for s in marks:
                prev = current(s)
                if not prev.ident and not prev.dead:
                    if s < g.nslots and s not in old_checks:
                        old_checks[s] = prev.check
                    rows[s] = replace(prev, dead=True)
            k = slots_per_block(self.meta)
            if k is not None:  # a dropped block takes its dead slots' ciphertext with it
                for name in drops:
                    b = block_number(name)
                    if b is None:
                        continue
                    for s in range(b * k, min((b + 1) * k, nslots)):
                        prev = current(s)
                        if prev.dead:
                            if s < g.nslots and s not in old_checks:
                                old_checks[s] = prev.check
                            rows[s] = replace(prev, dead=False)
            slot_sum = slot_sum - sum(old_checks.values()) + sum(r.check for r in rows.values())
            new_blocks = dict(self.blocks)
            block_sum = g.block_sum
            for name in drops:
                block_sum -= new_blocks.pop(name).check
            for st in staged:
                old = new_blocks.get(st.ref.name)
                if old is not None:
                    block_sum -= old.check
                new_blocks[st.ref.name] = st.ref
                block_sum += st.ref.check
            row = GalleryRow(
                format=FORMAT,
                meta=g.meta,
                ids_version=max(
                    g.ids_version + (1 if changes or drops else 0),
                    g.ids_version if ids_version is None else ids_version,
                ),
                seq=g.seq + 1,
                nslots=nslots,
                slot_sum=slot_sum & ROW_MASK,
                block_sum=block_sum & ROW_MASK,
                nblocks=len(new_blocks),
            )
            answer = None if reply is None else (reply.key, reply.render(row.ids_version))
            self.engine.write(
                expect_seq=g.seq,
                gallery=row,
                slots=sorted(rows.values(), key=lambda r: r.slot),
                blocks=staged,
                drop=drops,
                reply=answer,
            )
            # Committed: only now does the in-memory state follow.
            if reply is not None and answer is not None:
                reply.data = answer[1]
            if nslots > len(self.slots):
                self.slots.extend([None] * (nslots - len(self.slots)))
                self._dead.extend(bytes(nslots - len(self._dead)))
            for s, r in rows.items():
                self.slots[s] = r.ident
                self._dead[s] = r.dead
            self.blocks = new_blocks
            self.ids_version = row.ids_version
            self._row = row
            for name in [*drops, *(st.ref.name for st in staged)]:
                self._verified.pop(name, None)  # a name can come back at version 1
        try:
            self.engine.after_commit()
        except Exception as exc:  # the commit stands; erasure is retried by compact
            log.warning("gallery %s: checkpoint after commit failed: %s", self.label, exc)

    def _answer(self, reply: Reply) -> None:
        """Store the reply of a request that changed nothing (see :meth:`commit`)."""
        with self._lock:
            data = reply.render(self.ids_version)
            earlier = self.engine.put_reply(reply.key, data)
        if earlier is not None:
            raise AlreadyAnsweredError(f"gallery {self.label}: answered before", reply=earlier)
        reply.data = data

    # ------------------------------------------------------------------ replies
    def find_reply(self, key: ReplyKey) -> bytes | None:
        """The reply stored with the change that answered request ``key``, or None.

        Raises:
            StorageError: the database cannot be read.
        """
        return self.engine.find_reply(key)

    def prune_replies(self, max_age_s: float) -> int:
        """Delete the replies older than ``max_age_s`` (short transactions); how many."""
        return self.engine.prune_replies(max_age_s)

    def close(self) -> None:
        """Release the database connection and any lock."""
        self._verified.clear()
        self.engine.close()


__all__ = [  # the row types live in cipherface.store.rows; imported from here as before
    "FORMAT",
    "BlockRef",
    "Engine",
    "GalleryRow",
    "GalleryStore",
    "SlotRow",
    "Snapshot",
    "StagedBlock",
    "block_digest",
    "block_number",
    "decode_array",
    "encode_array",
    "row_check",
    "slot_check",
    "slots_per_block",
]
