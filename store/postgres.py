"""PostgreSQL engine (psycopg 3): many cloud workers share one database.

All galleries live in three tables (``cf_galleries``, ``cf_slots``, ``cf_blocks``),
blocks as ``bytea`` (stored EXTERNAL: ciphertext does not compress). Every commit
locks the gallery row (``SELECT ... FOR UPDATE``) and checks ``seq``: a worker whose
copy is older gets :class:`~cipherface.errors.StorageConflictError` (retryable) and
never overwrites another worker's commit; :meth:`GalleryStore.stale` tells a worker
to reload. One connection per process and database URL serves every gallery.
``cf_replies`` keeps the replies of the writes, of every gallery and worker, each
written in the transaction of its change (:mod:`cipherface.store.replies`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import msgpack

from cipherface.errors import (
    AlreadyAnsweredError,
    KeyRetiredError,
    StorageConflictError,
    StorageCorruptError,
    StorageError,
    StorageFullError,
)
from cipherface.store.anchor import ANCHOR_NAME, Anchor
from cipherface.store.base import BlockRef, Engine, GalleryRow, SlotRow, Snapshot, StagedBlock
from cipherface.store.replies import PRUNE_BATCH, ReplyKey, checked_reply, reply_check

_T = TypeVar("_T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cf_galleries (
    gid BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    format INTEGER NOT NULL, meta BYTEA NOT NULL, ids_version BIGINT NOT NULL,
    seq BIGINT NOT NULL, nslots BIGINT NOT NULL, slot_sum BIGINT NOT NULL,
    block_sum BIGINT NOT NULL, nblocks BIGINT NOT NULL, chk BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cf_slots (
    gid BIGINT NOT NULL REFERENCES cf_galleries (gid), slot BIGINT NOT NULL,
    ident TEXT, dead BOOLEAN NOT NULL, chk BIGINT NOT NULL, PRIMARY KEY (gid, slot));
CREATE TABLE IF NOT EXISTS cf_blocks (
    gid BIGINT NOT NULL REFERENCES cf_galleries (gid), name TEXT NOT NULL,
    version INTEGER NOT NULL, nbytes BIGINT NOT NULL, digest TEXT NOT NULL,
    chk BIGINT NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (gid, name));
ALTER TABLE cf_blocks ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS cf_commits (
    gid BIGINT NOT NULL, seq BIGINT NOT NULL, chk BIGINT NOT NULL, PRIMARY KEY (gid, seq));
CREATE TABLE IF NOT EXISTS cf_retired (
    name TEXT PRIMARY KEY, successor TEXT NOT NULL,
    retired_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS cf_replies (
    site TEXT NOT NULL, gw TEXT NOT NULL, rid TEXT NOT NULL, reply BYTEA NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (site, gw, rid));
CREATE INDEX IF NOT EXISTS cf_replies_at ON cf_replies (stored_at);
CREATE SEQUENCE IF NOT EXISTS cf_keys_seq;
CREATE TABLE IF NOT EXISTS cf_keys (
    name TEXT PRIMARY KEY, site TEXT NOT NULL, public_key BYTEA NOT NULL, seq BIGINT NOT NULL);
"""
#: libpq settings of every connection, unless its URL sets them: a database host that
#: vanishes (power, network: no FIN, no RST) fails the statement in flight within
#: about 20 s and an idle connection within about 25 s, as ``storage_error``, instead
#: of holding the worker's galleries for the kernel's 15 minutes of retransmissions.
CONNECT_DEFAULTS: Final = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
}
_LIVE_KEY = "NOT EXISTS (SELECT 1 FROM cf_retired r WHERE r.name = k.name)"
# Each reply's row check and the gallery (gid) whose commit stored it: a reply whose
# gallery is gone (retired, or lost and imported again under a new gid) answers nothing.
_REPLY_COLUMNS = (
    "ALTER TABLE cf_replies ADD COLUMN IF NOT EXISTS gid BIGINT",
    "ALTER TABLE cf_replies ADD COLUMN IF NOT EXISTS chk BIGINT",
    "CREATE INDEX IF NOT EXISTS cf_replies_gid ON cf_replies (gid)",
)
#: The relations :data:`_SCHEMA` and :data:`_REPLY_COLUMNS` make, and the columns the
#: latter add, to tell whether they must run (see :func:`_schema_ready`).
_OBJECTS: Final = tuple(
    re.findall(r"(?:TABLE|INDEX|SEQUENCE) IF NOT EXISTS (\w+)", _SCHEMA + ";".join(_REPLY_COLUMNS))
)
_REPLY_ADDED: Final = tuple(re.findall(r"ADD COLUMN IF NOT EXISTS (\w+)", ";".join(_REPLY_COLUMNS)))
_SCHEMA_READY = (
    "SELECT (SELECT count(*) FROM pg_class c WHERE c.relname = ANY(%s) "
    "AND c.relnamespace = current_schema()::regnamespace) = %s "
    "AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = to_regclass('cf_replies') "
    "AND a.attname = ANY(%s) AND NOT a.attisdropped) = %s "
    "AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass('cf_blocks') "
    "AND a.attname = 'data' AND a.attstorage = 'e')"
)
#: Commits kept in ``cf_commits``: an anchor lagging further behind is checked by seq only.
COMMIT_HISTORY = 100_000
_GCOLS = "format, meta, ids_version, seq, nslots, slot_sum, block_sum, nblocks, chk"
_SELECT_GALLERY = f"SELECT gid, {_GCOLS} FROM cf_galleries WHERE name = %s"  # noqa: S608
# A reply is live while the gallery that stored it exists (gid NULL: stored alone).
_LIVE = "(r.gid IS NULL OR EXISTS (SELECT 1 FROM cf_galleries g WHERE g.gid = r.gid))"
_FIND_REPLY = (
    f"SELECT r.reply, r.chk, r.gid, {_LIVE} FROM cf_replies r "  # noqa: S608 - constants
    "WHERE r.site = %s AND r.gw = %s AND r.rid = %s"
)
# A row of a gone gallery is replaced; a live one stays (rowcount 0: taken).
_INSERT_REPLY = (
    "INSERT INTO cf_replies AS r (site, gw, rid, reply, gid, chk) "  # noqa: S608 - constants
    "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (site, gw, rid) DO UPDATE SET "
    "reply = EXCLUDED.reply, gid = EXCLUDED.gid, chk = EXCLUDED.chk, stored_at = now() "
    f"WHERE NOT {_LIVE}"
)
# One short statement a batch; SKIP LOCKED: workers pruning at once never wait on each other.
_PRUNE_REPLIES = (
    "DELETE FROM cf_replies WHERE ctid = ANY(ARRAY(SELECT ctid FROM cf_replies "
    "WHERE stored_at < now() - make_interval(secs => %s) LIMIT %s FOR UPDATE SKIP LOCKED))"
)
_INSERT_GALLERY = (
    f"INSERT INTO cf_galleries (name, {_GCOLS}) "  # noqa: S608 - constant column list
    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (name) DO NOTHING"
)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise StorageError(
            'the PostgreSQL store needs psycopg 3: pip install "cipherface-mqtt[postgres]"'
        ) from exc
    return psycopg


def pg_error(exc: BaseException, label: str, doing: str) -> StorageError:
    """Map a psycopg error to the project's storage errors (no DSN or host in the text)."""
    state = getattr(exc, "sqlstate", None) or ""
    if state == "53100":  # disk_full
        return StorageFullError(f"gallery {label}: no space left while {doing}")
    if state.startswith("XX0"):  # data_corrupted, index_corrupted
        return StorageCorruptError(f"gallery {label}: database damaged ({state})")
    return StorageError(f"gallery {label}: {doing} failed ({type(exc).__name__} {state})".strip())


class _Shared:
    """One connection per database URL per process (galleries come and go, 64 at once)."""

    _lock = threading.Lock()
    _conns: dict[str, tuple[Any, threading.RLock]] = {}  # noqa: RUF012

    @classmethod
    def get(cls, dsn: str) -> tuple[Any, threading.RLock]:
        with cls._lock:
            got = cls._conns.get(dsn)
            if got is not None and not got[0].closed:
                return got
            pg = _psycopg()
            given = pg.conninfo.conninfo_to_dict(dsn)
            extra = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
            conn = pg.connect(dsn, autocommit=True, **extra)
            if not _schema_ready(conn):
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(7305716)")  # one schema creator
                    conn.execute(_SCHEMA)
                    _check_old_replies(conn)
            got = (conn, threading.RLock())
            cls._conns[dsn] = got
            return got

    @classmethod
    def drop(cls, dsn: str, conn: Any) -> None:
        with cls._lock:
            if cls._conns.get(dsn, (None,))[0] is conn:
                del cls._conns[dsn]
        try:
            conn.close()
        except Exception:  # noqa: S110 - a broken connection may fail to close
            pass

    @classmethod
    def close_all(cls) -> None:
        with cls._lock:
            conns, cls._conns = list(cls._conns.values()), {}
        for conn, _ in conns:
            conn.close()


def _schema_ready(conn: Any) -> bool:
    """Whether every object of :data:`_SCHEMA` exists already (a catalog read, no lock).

    The DDL is not free to run again: ``ALTER TABLE ... SET STORAGE`` waits for every
    open reader of ``cf_blocks`` (a ``pg_dump`` holds one for the whole backup), and
    every other worker's block read then queues behind it -- one worker reconnecting
    during a backup froze the fleet until the backup ended.
    """
    args = (list(_OBJECTS), len(_OBJECTS), list(_REPLY_ADDED), len(_REPLY_ADDED))
    got = conn.execute(_SCHEMA_READY, args).fetchone()
    return bool(got and got[0])


class PostgresEngine(Engine):
    """A gallery named ``name`` in the PostgreSQL database at ``dsn``.

    Args:
        dsn: ``postgresql://...`` URL.
        name: the gallery's unique name (the cloud uses ``site/kid``); also its label.
        anchor_dir: this worker's directory for the gallery's commit anchor (the cloud
            uses the key directory): a database restored from an older backup, or the
            gallery's rows lost, is refused at open (:mod:`cipherface.store.anchor`).

    Raises:
        StorageError: the database is unreachable.
    """

    def __init__(
        self, dsn: str, *, name: str, anchor_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.dsn = dsn
        self.name = name
        self.label = name
        self.gid: int | None = None
        # (seq, gallery check) this process last read or wrote: the same seq with another
        # check is another history (the database rolled back and committed on since).
        self._seen: tuple[int, int] | None = None
        self.anchor = (
            None if anchor_dir is None else Anchor(Path(anchor_dir) / ANCHOR_NAME, label=name)
        )
        self._run(lambda c: None, "connecting")

    def _run(self, fn: Callable[[Any], _T], doing: str) -> _T:
        pg = _psycopg()
        try:
            conn, lock = _Shared.get(self.dsn)
        except pg.Error as exc:
            raise pg_error(exc, self.label, "connecting") from exc
        with lock:
            try:
                return fn(conn)
            except pg.OperationalError as exc:
                if conn.broken or conn.closed:
                    _Shared.drop(self.dsn, conn)
                raise pg_error(exc, self.label, doing) from exc
            except pg.Error as exc:
                raise pg_error(exc, self.label, doing) from exc

    @contextmanager
    def _tx(self, conn: Any) -> Iterator[Any]:
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    # ------------------------------------------------------------------ reading
    def read(self) -> Snapshot | None:
        def go(conn: Any) -> Snapshot | None:
            with self._tx(conn) as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur.execute(_SELECT_GALLERY, (self.name,))
                g = cur.fetchone()
                if g is None:
                    return None
                self.gid = int(g[0])
                row = GalleryRow.from_db(g[1:9])
                cur.execute(
                    "SELECT slot, ident, dead, chk FROM cf_slots WHERE gid = %s", (self.gid,)
                )
                slots = cur.fetchall()
                cur.execute(  # octet_length of a TOASTed value reads only its pointer
                    "SELECT name, version, nbytes, digest, chk, octet_length(data) "
                    "FROM cf_blocks WHERE gid = %s",
                    (self.gid,),
                )
                blocks = [
                    (BlockRef(name=n, version=v, nbytes=b, digest=d), c, size)
                    for n, v, b, d, c, size in cur.fetchall()
                ]
                if mark is not None and mark.seq < row.seq:
                    # The check this database recorded at our anchored commit: another
                    # value means it was rolled back behind us and committed on again.
                    cur.execute(
                        "SELECT chk FROM cf_commits WHERE gid = %s AND seq = %s",
                        (self.gid, mark.seq),
                    )
                    got = cur.fetchone()
                    then[0] = None if got is None else int(got[0])
            return Snapshot(gallery=row, gallery_check=g[9], slots=slots, blocks=blocks)

        mark = None if self.anchor is None else self.anchor.read()
        then: list[int | None] = [None]
        snap = self._run(go, "reading")
        if snap is not None:
            self._seen = (snap.gallery.seq, snap.gallery_check)
        if self.anchor is not None:
            if snap is None:
                if self.anchor.exists():  # it committed here before: never start it empty
                    raise StorageCorruptError(f"gallery {self.label}: gallery rows missing")
            else:  # the gid survives pg_dump/restore and PITR; `gallery import` makes a new one
                self.anchor.check(
                    snap.gallery.seq,
                    snap.gallery_check,
                    self.gid,
                    restored=_restored(snap.gallery.meta),
                    recorded=then[0],
                )
        return snap

    def read_block(self, name: str) -> tuple[BlockRef, int, bytes] | None:
        def go(conn: Any) -> tuple[BlockRef, int, bytes] | None:
            with conn.cursor(binary=True) as cur:
                cur.execute(
                    "SELECT version, nbytes, digest, chk, data FROM cf_blocks "
                    "WHERE gid = %s AND name = %s",
                    (self.gid, name),
                )
                got = cur.fetchone()
            if got is None:
                return None
            v, nb, d, c, data = got
            return BlockRef(name=name, version=v, nbytes=nb, digest=d), c, bytes(data)

        return self._run(go, f"reading block {name}")

    def current_seq(self) -> int | None:
        def go(conn: Any) -> int | None:
            got = conn.execute(
                "SELECT g.seq, g.chk, EXISTS (SELECT 1 FROM cf_retired r WHERE r.name = g.name) "
                "FROM cf_galleries g WHERE g.name = %s",
                (self.name,),
            ).fetchone()
            if got is None:
                return None
            if got[2]:
                return -1  # its key was retired (by any worker): we reload, and refuse
            seq = int(got[0])
            if self._seen is not None and seq == self._seen[0] and int(got[1]) != self._seen[1]:
                return -1  # our seq, another history: never equal to ours, so we reload
            return seq

        return self._run(go, "reading")

    # ------------------------------------------------------------------ writing
    def create(self, gallery: GalleryRow) -> None:
        def go(conn: Any) -> None:
            with self._tx(conn) as cur:
                # A retired key's gallery never comes back, through whichever worker
                # (the tombstone is shared: each worker's data directory is its own).
                cur.execute("SELECT 1 FROM cf_retired WHERE name = %s", (self.name,))
                if cur.fetchone() is not None:
                    raise KeyRetiredError(f"gallery {self.label}: its key was retired")
                cur.execute(_INSERT_GALLERY, (self.name, *_gvals(gallery)))

        self._run(go, "creating the gallery")

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
        def apply(conn: Any) -> None:
            with self._tx(conn) as cur:
                cur.execute(
                    "SELECT seq, chk FROM cf_galleries WHERE gid = %s FOR UPDATE", (self.gid,)
                )
                got = cur.fetchone()
                if got is None:
                    raise StorageCorruptError(f"gallery {self.label}: gallery row missing")
                seen = self._seen
                if seen is not None and got[0] == seen[0] == expect_seq and got[1] != seen[1]:
                    # Committing on would mix our rows into another history's.
                    raise StorageCorruptError(
                        f"gallery {self.label}: rolled back (commit {expect_seq} has another "
                        "history)"
                    )
                if reply is not None:
                    # Under the gallery row's lock: a worker that committed this request
                    # first has committed its reply too, and we see it here.
                    cur.execute(_FIND_REPLY, reply[0])
                    earlier = self._checked(reply[0], cur.fetchone())
                    if earlier is not None:
                        raise AlreadyAnsweredError(
                            f"gallery {self.label}: answered before", reply=earlier
                        )
                if got[0] != expect_seq:
                    raise StorageConflictError(
                        f"gallery {self.label} was changed by another worker; retry"
                    )
                if slots:
                    cur.executemany(
                        "INSERT INTO cf_slots (gid, slot, ident, dead, chk) "
                        "VALUES (%s,%s,%s,%s,%s) "
                        "ON CONFLICT (gid, slot) DO UPDATE SET ident = EXCLUDED.ident, "
                        "dead = EXCLUDED.dead, chk = EXCLUDED.chk",
                        [(self.gid, r.slot, r.ident, r.dead, r.check) for r in slots],
                    )
                if drop:
                    cur.execute(
                        "DELETE FROM cf_blocks WHERE gid = %s AND name = ANY(%s)", (self.gid, drop)
                    )
                for st in blocks:
                    r = st.ref
                    cur.execute(
                        "INSERT INTO cf_blocks (gid, name, version, nbytes, digest, chk, data) "
                        "VALUES (%s,%s,%s,%s,%s,%s,%b) ON CONFLICT (gid, name) DO UPDATE SET "
                        "version = EXCLUDED.version, nbytes = EXCLUDED.nbytes, "
                        "digest = EXCLUDED.digest, chk = EXCLUDED.chk, data = EXCLUDED.data",
                        (self.gid, r.name, r.version, r.nbytes, r.digest, r.check, st.data),
                    )
                cur.execute(  # the history an anchor lagging behind is checked against
                    "INSERT INTO cf_commits (gid, seq, chk) VALUES (%s,%s,%s) "
                    "ON CONFLICT (gid, seq) DO UPDATE SET chk = EXCLUDED.chk",
                    (self.gid, gallery.seq, gallery.check),
                )
                cur.execute(  # bounded: one row out for each row in
                    "DELETE FROM cf_commits WHERE gid = %s AND seq = %s",
                    (self.gid, gallery.seq - COMMIT_HISTORY),
                )
                cur.execute(
                    "UPDATE cf_galleries SET format=%s, meta=%s, ids_version=%s, seq=%s, "
                    "nslots=%s, slot_sum=%s, block_sum=%s, nblocks=%s, chk=%s WHERE gid = %s",
                    (*_gvals(gallery), self.gid),
                )
                if reply is not None:
                    cur.execute(_INSERT_REPLY, self._reply_row(reply[0], reply[1]))
                    if cur.rowcount != 1:
                        raise _ReplyTaken

        def go(conn: Any) -> None:
            try:
                apply(conn)
            except _ReplyTaken:  # a commit of another gallery stored it first
                assert reply is not None
                got = self._checked(reply[0], conn.execute(_FIND_REPLY, reply[0]).fetchone())
                if got is None:  # pruned meanwhile: nothing was changed, retryable
                    raise StorageConflictError(
                        f"gallery {self.label}: the request was answered elsewhere; retry"
                    ) from None
                raise AlreadyAnsweredError(
                    f"gallery {self.label}: answered before", reply=got
                ) from None

        if self.anchor is not None:  # a commit whose anchor failed is written first
            self.anchor.catch_up()
        self._run(go, "committing")
        self._seen = (gallery.seq, gallery.check)
        if self.anchor is not None:  # after COMMIT, before the acknowledgement
            self.anchor.advance(gallery.seq, gallery.check, self.gid)

    def _reply_row(self, key: ReplyKey, data: bytes) -> tuple[Any, ...]:
        """``_INSERT_REPLY``'s values: the reply belongs to this gallery (None: to none)."""
        return (*key, data, self.gid, reply_check(key, self.gid, data))

    def _checked(self, key: ReplyKey, got: Any) -> bytes | None:
        """The reply a ``_FIND_REPLY`` row holds, checked; None when there is none or its
        gallery is gone (its change went with it: the request may run again).

        Raises:
            StorageCorruptError: the row fails its check.
        """
        if got is None:
            return None
        data = checked_reply(self.label, key, got[2], got[0], got[1])
        return data if got[3] else None

    def find_reply(self, key: ReplyKey) -> bytes | None:
        got = self._run(lambda c: c.execute(_FIND_REPLY, key).fetchone(), "reading a reply")
        return self._checked(key, got)

    def put_reply(self, key: ReplyKey, data: bytes) -> bytes | None:
        def go(conn: Any) -> bytes | None:
            for _ in range(2):  # the row we collided with may be pruned in between
                if conn.execute(_INSERT_REPLY, self._reply_row(key, data)).rowcount == 1:
                    return None
                got = self._checked(key, conn.execute(_FIND_REPLY, key).fetchone())
                if got is not None:
                    return got
            raise StorageConflictError(f"gallery {self.label}: storing a reply raced; retry")

        return self._run(go, "storing a reply")

    def prune_replies(self, max_age_s: float) -> int:
        total = 0
        while True:  # the connection is shared: released between batches
            n = self._run(
                lambda c: c.execute(_PRUNE_REPLIES, (max_age_s, PRUNE_BATCH)).rowcount,
                "pruning replies",
            )
            total += n
            if n < PRUNE_BATCH:
                return total

    def opened(self, gallery: GalleryRow) -> None:
        if self.anchor is not None:  # also learns the commits of the other workers
            self.anchor.advance(gallery.seq, gallery.check, self.gid)

    def vacuum(self) -> None:
        """VACUUM the block table: dead block versions' pages become reusable."""
        self._run(lambda c: c.execute("VACUUM cf_blocks"), "vacuuming")

    def block_bytes(self) -> int:
        def go(conn: Any) -> int:
            got = conn.execute(
                "SELECT coalesce(sum(pg_column_size(data)), 0) FROM cf_blocks WHERE gid = %s",
                (self.gid,),
            ).fetchone()
            return int(got[0])

        return self._run(go, "measuring")

    def close(self) -> None:
        pass  # the connection is shared by the process's galleries


class _ReplyTaken(Exception):
    """Inside a commit: another transaction stored a reply under our key (rolled back)."""


def replies(dsn: str) -> PostgresEngine:
    """An engine for the shared reply table only (``find_reply``, ``put_reply``,
    ``prune_replies``): no gallery needs to be open to answer from it."""
    return PostgresEngine(dsn, name="replies")


def _check_old_replies(conn: Any) -> None:
    """Add the reply columns to a database made before them; the replies stored then
    get their checks (once, under the schema lock). Nothing when they exist: an ALTER
    would take an exclusive lock on ``cf_replies`` at every worker's start."""
    have = {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE "
            "table_schema = current_schema() AND table_name = 'cf_replies'"
        ).fetchall()
    }
    if {"gid", "chk"} <= have:
        return
    for ddl in _REPLY_COLUMNS:
        conn.execute(ddl)
    if "chk" in have:
        return
    rows = conn.execute("SELECT site, gw, rid, reply FROM cf_replies").fetchall()
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE cf_replies SET chk = %s WHERE site = %s AND gw = %s AND rid = %s",
            [(reply_check((s, g, r), None, bytes(b)), s, g, r) for s, g, r, b in rows],
        )


def _gvals(g: GalleryRow) -> tuple[Any, ...]:
    return (
        g.format,
        g.meta,
        g.ids_version,
        g.seq,
        g.nslots,
        g.slot_sum,
        g.block_sum,
        g.nblocks,
        g.check,
    )


def _restored(meta: bytes) -> bool:
    """Whether a gallery row was made by ``gallery import`` (its meta says so)."""
    try:
        m = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    except Exception:  # a damaged row is reported by the row checks
        return False
    return isinstance(m, dict) and bool(m.get("restored"))


def drop_gallery(dsn: str, name: str, *, retired_by: str | None = None) -> bool:
    """Delete a gallery and all its rows (import's rollback, key.retire, tests).

    Args:
        retired_by: the successor key when the gallery's key is retired: a tombstone
            is recorded in the same transaction, so no worker ever creates it again.
    """
    eng = PostgresEngine(dsn, name=name)

    def go(conn: Any) -> bool:
        with conn.transaction():
            if retired_by is not None:
                conn.execute(
                    "INSERT INTO cf_retired (name, successor) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO NOTHING",
                    (name, retired_by),
                )
                conn.execute("DELETE FROM cf_keys WHERE name = %s", (name,))
            got = conn.execute("SELECT gid FROM cf_galleries WHERE name = %s", (name,)).fetchone()
            if got is None:
                return False
            for t in ("cf_blocks", "cf_slots", "cf_commits", "cf_replies"):
                conn.execute(f"DELETE FROM {t} WHERE gid = %s", (got[0],))  # noqa: S608
            conn.execute("DELETE FROM cf_galleries WHERE gid = %s", (got[0],))
            return True

    return eng._run(go, "dropping")


def mark_retired(dsn: str, name: str, successor: str) -> None:
    """Record that gallery ``name``'s key is retired (before anything is destroyed, so a
    retire cut short still stops every worker from serving it). Idempotent."""
    eng = PostgresEngine(dsn, name=name)
    eng._run(
        lambda c: c.execute(
            "INSERT INTO cf_retired (name, successor) VALUES (%s, %s) "
            "ON CONFLICT (name) DO NOTHING",
            (name, successor),
        ),
        "retiring",
    )


def is_retired(dsn: str, name: str) -> bool:
    """Whether the gallery ``name`` belongs to a retired key (any worker retired it)."""
    eng = PostgresEngine(dsn, name=name)
    return eng._run(
        lambda c: (
            c.execute("SELECT 1 FROM cf_retired WHERE name = %s", (name,)).fetchone() is not None
        ),
        "reading",
    )


def publish_key(dsn: str, site: str, kid: str, public_key: bytes) -> None:
    """Record a site's public key as published (``key.publish``, through any worker).

    Workers that did not receive the publication load the key from here, and the
    publication order says which key is the site's current one (the last published),
    whichever worker is asked. Idempotent; a republication makes the key current again.

    Args:
        dsn: the database.
        site: the site.
        kid: the key's id (the caller checked that ``public_key`` has this id).
        public_key: the key's bytes, as published.
    """
    name = f"{site}/{kid}"
    PostgresEngine(dsn, name=name)._run(
        lambda c: c.execute(
            "INSERT INTO cf_keys (name, site, public_key, seq) "
            "VALUES (%s, %s, %s, nextval('cf_keys_seq')) "
            "ON CONFLICT (name) DO UPDATE SET seq = nextval('cf_keys_seq')",
            (name, site, public_key),
        ),
        "recording its key",
    )


def published_key(dsn: str, site: str, kid: str) -> bytes | None:
    """The public key of ``site``'s key ``kid`` as published, or None (never published
    through a worker of this database, or retired)."""
    name = f"{site}/{kid}"
    row = PostgresEngine(dsn, name=name)._run(
        lambda c: c.execute(
            f"SELECT public_key FROM cf_keys k WHERE name = %s AND {_LIVE_KEY}",  # noqa: S608
            (name,),
        ).fetchone(),
        "reading its key",
    )
    return None if row is None else bytes(row[0])


def published_kids(dsn: str, site: str) -> list[str]:
    """The ids of ``site``'s published, unretired keys, the current one last."""
    rows = PostgresEngine(dsn, name=site)._run(
        lambda c: c.execute(
            f"SELECT name FROM cf_keys k WHERE site = %s AND {_LIVE_KEY} ORDER BY seq",  # noqa: S608
            (site,),
        ).fetchall(),
        "listing its keys",
    )
    return [str(r[0]).rpartition("/")[2] for r in rows]


def rename_gallery(dsn: str, old: str, new: str) -> None:
    """Give a gallery another name in one statement (import builds under a temp name)."""
    eng = PostgresEngine(dsn, name=old)
    eng._run(
        lambda c: c.execute("UPDATE cf_galleries SET name = %s WHERE name = %s", (new, old)),
        "renaming",
    )


__all__ = [
    "PostgresEngine",
    "drop_gallery",
    "is_retired",
    "mark_retired",
    "pg_error",
    "publish_key",
    "published_key",
    "published_kids",
    "rename_gallery",
    "replies",
]
