"""Replies stored with the commit they answer (cipherface.store.replies), both engines."""

from __future__ import annotations

import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import storekit

from cipherface.errors import AlreadyAnsweredError, StorageConflictError
from cipherface.store import open_store, split_location
from cipherface.store.base import GalleryStore
from cipherface.store.replies import REPLY_TTL_S, Reply, ReplyKey

location = storekit.location  # fixtures
pg_url = storekit.pg_url
META = {"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}}


def _key() -> ReplyKey:
    return ("site-a", "gw1", secrets.token_hex(16))


def _reply(key: ReplyKey, count: int = 1) -> Reply:
    r = Reply(key, lambda n, v: f"{secrets.token_hex(4)} n={n} v={v}".encode())
    r.count = count
    return r


def _state(st: GalleryStore) -> tuple[object, ...]:
    return list(st.slots), st.ids_version, st.seq


def test_a_commit_stores_its_reply_and_the_same_request_again_changes_nothing(
    location: str,
) -> None:
    st = open_store(location, meta=META)
    key = _key()
    first = _reply(key)
    st.commit(slots=[(0, "a")], reply=first)
    assert first.data is not None and first.data.endswith(b"n=1 v=1")  # the new version
    assert st.find_reply(key) == first.data
    before = _state(st)
    with pytest.raises(AlreadyAnsweredError) as err:
        st.commit(slots=[(1, "b")], reply=_reply(key))
    assert err.value.reply == first.data
    assert _state(st) == before
    st.close()
    again = open_store(location, meta=META)  # nothing of the refused commit on disk either
    try:
        assert _state(again) == before and again.find_reply(key) == first.data
        assert again.find_reply(_key()) is None
    finally:
        again.close()


def test_a_reply_alone_is_stored_without_a_commit(location: str) -> None:
    """A request that changed nothing (a delete of absent ids): its reply is stored, and
    the gallery's seq stays, so other workers need not reload it."""
    st = open_store(location, meta=META)
    try:
        st.commit(slots=[(0, "a")])
        before = _state(st)
        key = _key()
        alone = _reply(key, count=0)
        st.commit(reply=alone)
        assert _state(st) == before and st.find_reply(key) == alone.data
        with pytest.raises(AlreadyAnsweredError) as err:
            st.commit(reply=_reply(key, count=0))
        assert err.value.reply == alone.data
    finally:
        st.close()


def test_a_stale_worker_gets_the_winners_reply_not_a_conflict(pg_url: str) -> None:
    """Two workers (two connections) ran the same request: the second's commit finds the
    first one's reply under the gallery row's lock. Another request is a plain conflict."""
    name = f"t-{secrets.token_hex(6)}"
    a = open_store(f"{pg_url}?application_name=cf_a#{name}", meta=META)
    b = open_store(f"{pg_url}?application_name=cf_b#{name}", meta=META)
    try:
        key = _key()
        won = _reply(key)
        a.commit(slots=[(0, "a")], reply=won)
        with pytest.raises(AlreadyAnsweredError) as err:
            b.commit(slots=[(0, "a")], reply=_reply(key))  # b's copy is older
        assert err.value.reply == won.data
        with pytest.raises(StorageConflictError) as other:
            b.commit(slots=[(1, "b")], reply=_reply(_key()))
        assert type(other.value) is StorageConflictError
        assert b.stale() and a.seq == 1
    finally:
        a.close()
        b.close()


def _age(loc: str, key: ReplyKey, seconds: float) -> None:
    """Make a stored reply ``seconds`` older (as time passing would)."""
    engine, where, _ = split_location(loc)
    if engine == "sqlite":
        db = sqlite3.connect(Path(where) / "gallery.sqlite3", isolation_level=None)
        try:
            db.execute(
                "UPDATE replies SET stored_at = stored_at - ? WHERE site=? AND gw=? AND rid=?",
                (seconds, *key),
            )
        finally:
            db.close()
        return
    import psycopg

    with psycopg.connect(where, autocommit=True) as conn:
        conn.execute(
            "UPDATE cf_replies SET stored_at = stored_at - make_interval(secs => %s) "
            "WHERE site=%s AND gw=%s AND rid=%s",
            (seconds, *key),
        )


def test_replies_expire_in_short_batches(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cipherface.store import postgres, sqlite

    for mod in (postgres, sqlite):
        monkeypatch.setattr(mod, "PRUNE_BATCH", 2)  # several batches for three rows
    st = open_store(location, meta=META)
    try:
        keys = [_key() for _ in range(4)]
        for i, key in enumerate(keys):
            st.commit(slots=[(i, f"p{i}")], reply=_reply(key))
        for key in keys[:3]:
            _age(location, key, REPLY_TTL_S + 60)
        assert st.prune_replies(REPLY_TTL_S) == 3
        assert [st.find_reply(k) is not None for k in keys] == [False, False, False, True]
        assert st.prune_replies(REPLY_TTL_S) == 0
        assert st.slots[:4] == ["p0", "p1", "p2", "p3"]  # pruning touches no gallery row
    finally:
        st.close()


def test_a_sqlite_gallery_from_before_replies_gets_the_table(tmp_path: Path) -> None:
    loc = f"sqlite:{tmp_path / 'g'}#site-a/k1"
    st = open_store(loc, meta=META)
    st.commit(slots=[(0, "a")])
    st.close()
    db = sqlite3.connect(tmp_path / "g" / "gallery.sqlite3", isolation_level=None)
    db.execute("DROP TABLE replies")
    db.close()
    st = open_store(loc, meta=META)
    try:
        key = _key()
        assert st.find_reply(key) is None
        st.commit(slots=[(1, "b")], reply=_reply(key))
        assert st.find_reply(key) is not None and st.slots == ["a", "b"]
    finally:
        st.close()


# A writer that commits one new identity per write, each with its reply; it prints
# BEGIN before and ACK after each commit, and the test kills it at random moments.
WRITER = r"""
import sys
import numpy as np
from cipherface.store import open_store
from cipherface.store.replies import Reply
loc, run = sys.argv[1], sys.argv[2]
st = open_store(loc, meta={"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}})
n = 0
while True:
    n += 1
    rid, slot = f"{run}-{n}", len(st.slots)
    staged = [st.stage_block(f"phe-{slot // 4:06d}", np.full((3, 2048), n % 251, np.uint8))]
    reply = Reply(("site-a", "gw1", rid), lambda c, v: f"{rid} {c} {v}".encode())
    reply.count = 1
    print("BEGIN", rid, flush=True)
    st.commit(blocks=staged, slots=[(slot, rid)], reply=reply)
    print("ACK", rid, flush=True)
"""


def _writer_gone(loc: str) -> None:
    """PostgreSQL may still finish a dead client's COMMIT: wait for its backend to end."""
    engine, where, _ = split_location(loc)
    if engine != "postgresql":
        return
    import psycopg

    with psycopg.connect(where, autocommit=True) as conn:
        for _ in range(200):
            (n,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cf_writer'"
            ).fetchone()
            if n == 0:
                return
            time.sleep(0.05)
    raise AssertionError("the killed writer's backend never ended")


def test_kill_9_keeps_each_change_and_its_reply_together(location: str, tmp_path: Path) -> None:
    """Killed anywhere in a commit: the in-flight write is on disk with its reply, or
    neither is; every acknowledged write has its reply."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    head, _, name = location.partition("#")
    writer_loc = (
        f"{head}?application_name=cf_writer#{name}" if head.startswith("postgres") else location
    )
    rnd, acked = random.Random(3), []
    for run in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), writer_loc, f"r{run}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        want, acks, inflight = rnd.randint(2, 12), 0, None
        for line in proc.stdout:  # after the kill: what it printed before dying
            if not line.endswith("\n"):
                break  # torn by the kill
            kind, _, rid = line.strip().partition(" ")
            if kind == "ACK":
                acked.append(rid)
                acks, inflight = acks + 1, None
            elif kind == "BEGIN":
                inflight = rid
                if acks == want:
                    time.sleep(rnd.random() * 0.02)  # somewhere inside the commit
                    proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        _writer_gone(location)
        st = open_store(location, meta=META)
        try:
            for rid in acked:
                assert st.find_reply(("site-a", "gw1", rid)) is not None, rid
            if inflight is not None:
                stored = st.find_reply(("site-a", "gw1", inflight))
                assert (inflight in st.slots) == (stored is not None), inflight
                assert stored is None or stored.split()[0].decode() == inflight
        finally:
            st.close()
