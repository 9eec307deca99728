"""Attacks on the replies stored with their change (store/replies.py, issue 11 review).

Each case was a failing test first: a flipped byte in a stored reply, a PostgreSQL
gallery restored by ``gallery import`` answering writes the restore undid, a copy of
a write older than the reply TTL run again, plus guards that held (other gateways'
ids, names in reply bytes, a full filesystem, torn WAL frames, pruning beside
commits). Real SQLite, real PostgreSQL, real CKKS; ``pytest -m faults`` runs the long
kill -9 version.
"""

from __future__ import annotations

import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import storekit
from vectors import unit

from cipherface.agents import cloud as cloud_mod
from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import AlreadyAnsweredError, StorageCorruptError, StorageFullError
from cipherface.protocol import (
    Delete,
    Enroll,
    Error,
    KeyPublish,
    Result,
    decode,
    encode,
    request_topic,
)
from cipherface.store import gallery_location, open_store, split_location
from cipherface.store.replies import REPLY_TTL_S, Reply, ReplyKey

location = storekit.location  # fixtures
pg_url = storekit.pg_url
META = {"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}}
GW = "door"


@pytest.fixture(autouse=True)
def _faults_only_when_asked(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("faults") and "faults" not in str(
        request.config.getoption("markexpr", "")
    ):
        pytest.skip("long fault run: pytest -m faults tests/test_replies_attack.py")


def _key(gw: str = "gw1") -> ReplyKey:
    return ("site-a", gw, secrets.token_hex(16))


def _reply(key: ReplyKey, count: int = 1) -> Reply:
    r = Reply(key, lambda n, v: f"reply {key[2]} n={n} v={v}".encode())
    r.count = count
    return r


def _sql(loc: str, sqlite_sql: str, pg_sql: str, *args: Any) -> None:
    """Run a statement on a gallery's database behind the store's back."""
    engine, where, _ = split_location(loc)
    if engine == "sqlite":
        db = sqlite3.connect(Path(where) / "gallery.sqlite3", isolation_level=None)
        try:
            db.execute(sqlite_sql, args)
        finally:
            db.close()
        return
    import psycopg

    with psycopg.connect(where, autocommit=True) as conn:
        conn.execute(pg_sql, args)


def _flip_on_disk(path: Path, needle: bytes, at: int) -> None:
    """Flip one bit of the first copy of ``needle`` in a file (a bad sector, a cosmic ray)."""
    raw = bytearray(path.read_bytes())
    i = raw.index(needle)
    raw[i + at] ^= 0x02
    path.write_bytes(bytes(raw))


# ------------------------------------------------------ (1) a damaged reply row
def test_a_flipped_byte_in_a_stored_reply_is_refused_never_answered(location: str) -> None:
    """Before: the flipped bytes came back as the reply (find_reply, the commit's
    AlreadyAnsweredError, put_reply): a gateway got a valid-looking wrong answer."""
    st = open_store(location, meta=META)
    key, alone = _key(), _key()
    st.commit(slots=[(0, "a")], reply=_reply(key))
    st.commit(reply=_reply(alone, count=0))
    before = (list(st.slots), st.ids_version, st.seq)
    st.close()
    engine, where, _ = split_location(location)
    for k in (key, alone):
        if engine == "sqlite":  # the bit flips in the file, under SQLite's own checks
            _flip_on_disk(Path(where) / "gallery.sqlite3", f"reply {k[2]} n=".encode(), 22)
        else:
            _sql(
                location,
                "",
                "UPDATE cf_replies SET reply = set_byte(reply, 22, get_byte(reply, 22) # 2) "
                "WHERE site = %s AND gw = %s AND rid = %s",
                *k,
            )
    st = open_store(location, meta=META)
    try:
        for k in (key, alone):
            with pytest.raises(StorageCorruptError):
                st.find_reply(k)
            with pytest.raises(StorageCorruptError):  # the commit's own lookup
                st.commit(slots=[(1, "b")], reply=_reply(k))
            with pytest.raises(StorageCorruptError):  # a reply alone
                st.commit(reply=_reply(k, count=0))
        assert (list(st.slots), st.ids_version, st.seq) == before  # nothing changed
        fresh = _reply(_key())
        st.commit(slots=[(1, "b")], reply=fresh)  # other requests still go through
        assert st.find_reply(fresh.key) == fresh.data
    finally:
        st.close()


# ------------------------------------------------------- the cloud, without a broker
def _agent(data: Path, site: str, store: str) -> CloudAgent:
    return CloudAgent(broker=BrokerConfig(), data_dir=data, sites=[site], store=store)


def _ask(agent: CloudAgent, msg: Any) -> Result | Error:
    [out] = agent.handle(request_topic(msg.site, msg.gw, msg.TYPE), encode(msg))
    reply = decode(out.payload)
    assert isinstance(reply, Result | Error)
    return reply


def _setup(
    agent: CloudAgent, cipher: EdgeCipher, site: str, people: np.ndarray, names: list[str]
) -> None:
    pub = KeyPublish(site=site, gw=GW, kid=cipher.key_id, scheme="ckks",
                     public_key=cipher.public_key_bytes())  # fmt: skip
    assert isinstance(_ask(agent, pub), Result)
    enroll = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=tuple(names),
                    payload=cipher.encrypt_templates(people[: len(names)]))  # fmt: skip
    assert isinstance(_ask(agent, enroll), Result)


def _ids(agent: CloudAgent, site: str, kid: str) -> list[str]:
    """The gallery's live identities, sorted."""
    return sorted(i for i in agent.keys.gallery(site, kid).ids() if i)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> str:
    return "sqlite:" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_a_flipped_stored_reply_reaches_no_gateway(
    store: str, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """Before: the retry of an enroll got ``enrolled: 3`` (one flipped bit of the stored
    reply) as a valid result; now it gets ``storage_corrupt`` and nothing runs."""
    site = f"f{secrets.token_hex(4)}"
    people = unit(np.random.default_rng(5), 3)
    first = _agent(tmp_path, site, store)
    _setup(first, cipher, site, people, ["ann"])
    msg = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=("bob",),
                 payload=cipher.encrypt_templates(people[1:2]))  # fmt: skip
    sent = _ask(first, msg)
    assert isinstance(sent, Result) and sent.enrolled == 1
    first.keys.close()
    where = gallery_location(store, site, cipher.key_id, tmp_path)
    rows = ("site = ? AND gw = ? AND rid = ?", "site = %s AND gw = %s AND rid = %s")
    _sql(  # b"enrolled" then its value (fixint 1): 1 -> 3, still a well-formed result
        where,
        "UPDATE replies SET reply = CAST(substr(reply, 1, instr(reply, X'a8656e726f6c6c6564') "
        "+ 8) || X'03' || substr(reply, instr(reply, X'a8656e726f6c6c6564') + 10) AS BLOB) "
        "WHERE " + rows[0],
        "UPDATE cf_replies SET reply = set_byte(reply, position('\\xa8656e726f6c6c6564'::bytea "
        "in reply) + 8, 3) WHERE " + rows[1],
        site,
        GW,
        msg.id,
    )
    second = _agent(tmp_path, site, store)  # a restart, or another worker
    try:
        again = _ask(second, msg)
        assert isinstance(again, Error) and again.code == "storage_corrupt", again
        assert _ids(second, site, cipher.key_id) == ["ann", "bob"]  # not run again
    finally:
        second.keys.close()


# -------------------------------------- (2) a restore must not answer what it undid
def test_a_postgres_import_does_not_answer_the_writes_it_undid(
    pg_url: str, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """The gallery is exported, then ``dan`` enrolled and ``ann`` deleted; its rows are
    lost and the export imported (the operator's restore). Before: the gateways'
    retries of both writes were answered from ``cf_replies`` (``enrolled: 1``, ``deleted:
    1``) though the restored gallery has no ``dan`` and has ``ann`` again. Now the
    replies of the lost incarnation answer nothing: the retries run on the restored
    gallery."""
    from cipherface.store.postgres import drop_gallery
    from cipherface.store.tools import export_gallery, import_gallery

    site = f"i{secrets.token_hex(4)}"
    people = unit(np.random.default_rng(6), 4)
    agent = _agent(tmp_path, site, pg_url)
    _setup(agent, cipher, site, people, ["ann", "bob"])
    where = gallery_location(pg_url, site, cipher.key_id, tmp_path)
    agent.keys.close()
    export_gallery(where, tmp_path / "backup.cfg")
    enroll = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=("dan",),
                    payload=cipher.encrypt_templates(people[3:4]))  # fmt: skip
    delete = Delete(site=site, gw=GW, kid=cipher.key_id, ids=("ann",))
    agent = _agent(tmp_path, site, pg_url)
    assert isinstance(_ask(agent, enroll), Result)
    assert isinstance(_ask(agent, delete), Result)
    assert _ids(agent, site, cipher.key_id) == ["bob", "dan"]
    agent.keys.close()
    drop_gallery(pg_url, f"{site}/{cipher.key_id}")  # the rows are lost
    import_gallery(tmp_path / "backup.cfg", where)
    restored = _agent(tmp_path, site, pg_url)  # a fresh worker: no reply in memory
    try:
        assert _ids(restored, site, cipher.key_id) == ["ann", "bob"]
        got = _ask(restored, enroll)
        assert isinstance(got, Result) and got.enrolled == 1
        got = _ask(restored, delete)
        assert isinstance(got, Result) and got.deleted == 1
        assert _ids(restored, site, cipher.key_id) == ["bob", "dan"]
        assert restored.stats["duplicates"] == 0
    finally:
        restored.keys.close()


# ----------------------------------------------- (3) past the TTL of the stored replies
def test_a_write_older_than_the_reply_ttl_is_refused_not_run_again(
    store: str, tmp_path: Path, cipher: EdgeCipher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dan`` is enrolled, then deleted. A copy of the enroll (no ``exp``: the protocol
    allows it) arrives after the replies expired. Before: it ran again and ``dan`` was
    back, a deleted identity returned. Now a write older than the replies are kept is
    refused as ``expired``."""
    site = f"t{secrets.token_hex(4)}"
    people = unit(np.random.default_rng(7), 4)
    agent = _agent(tmp_path, site, store)
    _setup(agent, cipher, site, people, ["ann"])
    enroll = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=("dan",),
                    payload=cipher.encrypt_templates(people[3:4]))  # fmt: skip
    assert isinstance(_ask(agent, enroll), Result)
    delete = Delete(site=site, gw=GW, kid=cipher.key_id, ids=("dan",))
    assert isinstance(_ask(agent, delete), Result)
    agent.keys.close()
    where = gallery_location(store, site, cipher.key_id, tmp_path)
    day = REPLY_TTL_S + 3600  # a day and an hour on
    _sql(
        where,
        "UPDATE replies SET stored_at = stored_at - ?",
        "UPDATE cf_replies SET stored_at = stored_at - make_interval(secs => %s) WHERE site = %s",
        *((day,) if store.startswith("sqlite") else (day, site)),
    )
    later = _agent(tmp_path, site, store)  # its clock a day and an hour on
    monkeypatch.setattr(cloud_mod, "now_ms", lambda: int((time.time() + day) * 1000))
    try:
        assert "dan" not in _ids(later, site, cipher.key_id)
        later._prune_replies()
        assert later.keys.find_reply(site, cipher.key_id, (site, GW, enroll.id)) is None
        got = _ask(later, enroll)
        assert isinstance(got, Error) and got.code == "expired", got
        assert "dan" not in _ids(later, site, cipher.key_id)
    finally:
        later.keys.close()


# ---------------------------------------- replies stored before rows had checks
def test_replies_stored_before_their_checks_get_them_and_still_answer(
    tmp_path: Path, pg_url: str
) -> None:
    """A gallery (SQLite) or database (PostgreSQL) written by the version without reply
    checks: its replies get their checks once, at open, and answer as before."""
    import psycopg

    from cipherface.store.postgres import _Shared

    name = f"cf_old_{secrets.token_hex(4)}"
    with storekit._admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    old_pg = f"{pg_url.rsplit('/', 1)[0]}/{name}"
    try:
        for loc in (f"sqlite:{tmp_path / 'g'}#site-a/k1", f"{old_pg}#t-old"):
            st = open_store(loc, meta=META)
            key = _key()
            st.commit(slots=[(0, "a")], reply=_reply(key))
            stored = st.find_reply(key)
            st.close()
            if loc.startswith("sqlite"):  # the table as 8c5c572 made it
                _sql(loc, "ALTER TABLE replies DROP COLUMN chk", "")
            else:
                _Shared.close_all()
                with psycopg.connect(old_pg, autocommit=True) as conn:
                    conn.execute("ALTER TABLE cf_replies DROP COLUMN chk, DROP COLUMN gid")
            st = open_store(loc, meta=META)
            try:
                assert stored is not None and st.find_reply(key) == stored
                with pytest.raises(AlreadyAnsweredError):
                    st.commit(slots=[(1, "b")], reply=_reply(key))
            finally:
                st.close()
    finally:
        _Shared.close_all()
        with storekit._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------- (4) one gateway fills the store
def _count_replies(store: str, where: str, site: str) -> int:
    engine, db, _ = split_location(where)
    if engine == "sqlite":
        with sqlite3.connect(Path(db) / "gallery.sqlite3") as conn:
            return int(conn.execute("SELECT count(*) FROM replies").fetchone()[0])
    import psycopg

    with psycopg.connect(db) as conn:
        got = conn.execute("SELECT count(*) FROM cf_replies WHERE site = %s", (site,)).fetchone()
        return int(got[0])


def test_a_gateway_cannot_fill_the_store_with_replies(
    store: str, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """Before: every delete of an absent id stored a reply for a day, without a bound
    (measured 260 a second from one gateway, ~10 GB a day). Now writes are counted per
    gateway: past the quota, ``rate_limited`` and nothing stored; a retry answered from
    the store costs nothing; another gateway has its own quota."""
    from cipherface.agents.quota import QuotaPolicy

    site = f"q{secrets.token_hex(4)}"
    agent = CloudAgent(broker=BrokerConfig(), data_dir=tmp_path, sites=[site], store=store,
                       quotas=QuotaPolicy(writes_per_hour=3600, writes_burst=5))  # fmt: skip
    try:
        pub = KeyPublish(site=site, gw=GW, kid=cipher.key_id, scheme="ckks",
                         public_key=cipher.public_key_bytes())  # fmt: skip
        assert isinstance(_ask(agent, pub), Result)
        where = gallery_location(store, site, cipher.key_id, tmp_path)
        sent = [Delete(site=site, gw=GW, kid=cipher.key_id, ids=("nobody",)) for _ in range(8)]
        got = [_ask(agent, m) for m in sent]
        assert [isinstance(g, Result) for g in got] == [True] * 5 + [False] * 3
        assert {g.code for g in got[5:] if isinstance(g, Error)} == {"rate_limited"}
        assert _count_replies(store, where, site) == 5
        agent.cache.expire(now=time.monotonic() + 3600)  # the retry is answered by the store
        assert encode(got[0]) != b"" and _ask(agent, sent[0]) == got[0]
        other = Delete(site=site, gw="gate", kid=cipher.key_id, ids=("nobody",))
        assert isinstance(_ask(agent, other), Result)
        assert _count_replies(store, where, site) == 6
    finally:
        agent.keys.close()


# ------------------------------------------------ guards: what held (no fix needed)
def test_another_gateway_reusing_a_request_id_gets_nothing_of_the_first(
    store: str, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """Gateway ``gate`` (and a gateway ``door`` of another site) send writes with the id
    of ``door``'s enroll: each runs, is answered on its own, and ``door``'s retry still
    gets ``door``'s bytes. No reply holds a server path."""
    site, other_site = f"x{secrets.token_hex(4)}", f"y{secrets.token_hex(4)}"
    people = unit(np.random.default_rng(8), 4)
    agents = {s: _agent(tmp_path, s, store) for s in (site, other_site)}
    try:
        for s in (site, other_site):
            _setup(agents[s], cipher, s, people, ["ann"])
        first = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=("dan",),
                       payload=cipher.encrypt_templates(people[1:2]))  # fmt: skip
        mine = _ask(agents[site], first)
        rid = first.id
        theirs = [
            Enroll(site=site, gw="gate", kid=cipher.key_id, id=rid, ids=("eve",),
                   payload=cipher.encrypt_templates(people[2:3])),
            Delete(site=other_site, gw=GW, kid=cipher.key_id, id=rid, ids=("ann",)),
        ]  # fmt: skip
        for msg in theirs:
            got = _ask(agents[msg.site], msg)
            assert isinstance(got, Result) and (got.site, got.gw) == (msg.site, msg.gw)
            assert (got.enrolled or got.deleted) == 1
        assert _ids(agents[site], site, cipher.key_id) == ["ann", "dan", "eve"]
        assert _ids(agents[other_site], other_site, cipher.key_id) == []
        for s in (site, other_site):
            agents[s].keys.close()
        retry = _agent(tmp_path, site, store)  # no reply in memory
        try:
            assert _ask(retry, first) == mine
        finally:
            retry.keys.close()
        where = gallery_location(store, site, cipher.key_id, tmp_path)
        for data in _stored(store, where, site):
            assert str(tmp_path).encode() not in data and b"/" not in data
    finally:
        for a in agents.values():
            a.keys.close()


def _stored(store: str, where: str, site: str) -> list[bytes]:
    """Every stored reply of a site's gallery (SQLite) or of the site (PostgreSQL)."""
    engine, db, _ = split_location(where)
    if engine == "sqlite":
        with sqlite3.connect(Path(db) / "gallery.sqlite3") as conn:
            return [bytes(r[0]) for r in conn.execute("SELECT reply FROM replies")]
    import psycopg

    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT reply FROM cf_replies WHERE site = %s", (site,))
        return [bytes(r[0]) for r in rows.fetchall()]


def test_no_stored_reply_names_a_person_and_a_retire_leaves_none_of_its_gallery(
    store: str, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """Enroll and delete ``zelda-q``: no stored reply holds the name, and after the
    delete the SQLite file has no trace of it (secure_delete). A retired key's
    gallery takes its replies with it (PostgreSQL: ``cf_replies`` rows of its gid)."""
    from cipherface.protocol import KeyRetire

    site = f"n{secrets.token_hex(4)}"
    people = unit(np.random.default_rng(9), 4)
    agent = _agent(tmp_path, site, store)
    name = "zelda-q"
    try:
        _setup(agent, cipher, site, people, ["ann"])
        add = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=(name,),
                     payload=cipher.encrypt_templates(people[1:2]))  # fmt: skip
        assert isinstance(_ask(agent, add), Result)
        assert isinstance(_ask(agent, Delete(site=site, gw=GW, ids=(name,))), Result)
        where = gallery_location(store, site, cipher.key_id, tmp_path)
        agent.keys.close()
        stored = _stored(store, where, site)
        assert len(stored) == 3 and not any(name.encode() in r for r in stored)
        if store.startswith("sqlite"):
            raw = (Path(split_location(where)[1]) / "gallery.sqlite3").read_bytes()
            assert name.encode() not in raw
        # A second key, then the first one retired: its gallery's replies go with it.
        new_dir = tmp_path / "k2"
        from cipherface.crypto import sites

        sites.generate_key_dir(new_dir, dim=128)
        new = sites.load_edge_cipher(new_dir)
        agent = _agent(tmp_path, site, store)
        pub = KeyPublish(site=site, gw=GW, kid=new.key_id, scheme="ckks",
                         public_key=new.public_key_bytes())  # fmt: skip
        assert isinstance(_ask(agent, pub), Result)
        retire = KeyRetire(site=site, gw=GW, kid=cipher.key_id, successor=new.key_id)
        assert isinstance(_ask(agent, retire), Result)
        agent.keys.close()
        if store.startswith("sqlite"):
            assert not Path(split_location(where)[1]).exists()
        else:  # only the retire's own reply, in the successor's gallery
            left = _stored(store, where, site)
            assert len(left) == 1 and decode(left[0]).op == "key.retire"  # type: ignore[union-attr]
    finally:
        agent.keys.close()


def test_a_full_filesystem_stores_no_reply_without_its_change(tmp_path: Path) -> None:
    """SQLite on a 2 MB tmpfs: commits carrying replies until ``storage_full``. Every
    refused one left neither its change nor its reply (a reply alone too); every one
    that returned has both; after the filesystem grows, the refused request goes
    through once."""
    from test_store_faults import _tmpfs, _umount

    fs = tmp_path / "fs"
    _tmpfs(fs, "2m")
    try:
        loc = f"sqlite:{fs / 'g'}#site-a/k1"
        st = open_store(loc, meta=META)
        rng = np.random.default_rng(0)
        acked, refused = [], []
        for _ in range(200):
            slot, key = len(st.slots), _key()
            before = (list(st.slots), st.seq)
            arr = rng.integers(0, 255, (4, 16384), dtype=np.uint8)  # 64 KB, incompressible
            try:
                st.commit(blocks=[st.stage_block(f"phe-{slot // 4:06d}", arr)],
                          slots=[(slot, key[2])], reply=_reply(key))  # fmt: skip
            except StorageFullError:
                assert (list(st.slots), st.seq) == before
                refused.append(key)
                if len(refused) == 3:
                    break
                continue
            acked.append(key)
        assert refused, "the filesystem never filled up"
        alone = _key()
        try:  # a reply alone: stored whole, or refused and absent
            st.commit(reply=_reply(alone, count=0))
        except StorageFullError:
            assert st.find_reply(alone) is None
        st.close()
        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
        st = open_store(loc, meta=META)
        try:
            for key in acked:
                assert key[2] in st.slots and st.find_reply(key) is not None
            for key in refused:
                assert key[2] not in st.slots and st.find_reply(key) is None
            again = _reply(refused[0])
            st.commit(slots=[(len(st.slots), refused[0][2])], reply=again)
            with pytest.raises(AlreadyAnsweredError):
                st.commit(slots=[(len(st.slots), "twice")], reply=_reply(refused[0]))
        finally:
            st.close()
    finally:
        _umount(fs)


def test_a_torn_wal_holds_a_change_and_its_reply_or_neither(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power lost during a SQLite commit: the WAL on disk ends anywhere in the commit's
    frames. Every such copy opens as the gallery before the commit or after it, the
    reply present exactly when the change is."""
    from cipherface.store.sqlite import SqliteEngine

    loc = f"sqlite:{tmp_path / 'g'}#site-a/k1"
    st = open_store(loc, meta=META)
    for i in range(3):
        st.commit(slots=[(i, f"p{i}")], reply=_reply(_key()))
    db = tmp_path / "g" / "gallery.sqlite3"
    anchor = Path(str(db) + ".seq").read_bytes()  # the crash comes before it advances
    monkeypatch.setattr(SqliteEngine, "after_commit", lambda self: None)  # WAL kept
    key = _key()
    arr = np.random.default_rng(1).integers(0, 255, (4, 8192), dtype=np.uint8)
    st.commit(blocks=[st.stage_block("phe-000000", arr)], slots=[(3, key[2])],
              reply=_reply(key))  # fmt: skip
    main, wal = db.read_bytes(), Path(str(db) + "-wal").read_bytes()
    st.close()
    monkeypatch.undo()
    rnd, seen = random.Random(5), set()
    cuts = sorted({0, 32, len(wal), len(wal) - 1} | {rnd.randrange(len(wal)) for _ in range(40)})
    for cut in cuts:
        d = tmp_path / f"crash-{cut}"
        d.mkdir()
        (d / "gallery.sqlite3").write_bytes(main)
        (d / "gallery.sqlite3-wal").write_bytes(wal[:cut])
        (d / "gallery.sqlite3.seq").write_bytes(anchor)
        got = open_store(f"sqlite:{d}#site-a/k1", meta=META)
        try:
            stored = got.find_reply(key)
            assert (key[2] in got.slots) == (stored is not None), cut
            assert got.slots[:3] == ["p0", "p1", "p2"]
            seen.add(stored is not None)
        finally:
            got.close()
        shutil.rmtree(d)
    assert seen == {False, True}  # both outcomes were reached


def test_pruning_on_one_postgres_worker_while_another_commits(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A prunes 2,000 expired replies in batches of 100 while worker B commits 40
    writes with replies: every commit goes through, every fresh reply stays, every
    expired one goes."""
    import psycopg

    from cipherface.store import postgres

    monkeypatch.setattr(postgres, "PRUNE_BATCH", 100)
    name = f"t-{secrets.token_hex(6)}"
    a = open_store(f"{pg_url}?application_name=cf_a#{name}", meta=META)
    b = open_store(f"{pg_url}?application_name=cf_b#{name}", meta=META)
    site = f"p{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO cf_replies (site, gw, rid, reply, stored_at) SELECT %s, 'old', "
            "md5(i::text), 'x', now() - make_interval(secs => %s) "
            "FROM generate_series(1, 2000) i",
            (site, REPLY_TTL_S + 60),
        )
    pruned: list[int] = []
    t = threading.Thread(target=lambda: pruned.append(a.prune_replies(REPLY_TTL_S)))
    keys = [(site, "gw1", secrets.token_hex(16)) for _ in range(40)]
    try:
        t.start()
        for i, key in enumerate(keys):
            b.commit(slots=[(i, key[2])], reply=_reply(key))
        t.join(60)
        assert not t.is_alive() and pruned == [2000]
        assert all(b.find_reply(k) is not None for k in keys)
        with psycopg.connect(pg_url) as conn:
            left = conn.execute(
                "SELECT count(*) FROM cf_replies WHERE site = %s AND gw = 'old'", (site,)
            ).fetchone()
        assert left == (0,)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------- kill -9, both directions
WRITER = r"""
import sys
import numpy as np
from cipherface.store import open_store
from cipherface.store.replies import Reply
loc, run = sys.argv[1], sys.argv[2]
st = open_store(loc, meta={"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}})
live = {i: s for s, i in enumerate(st.slots) if i}
n = 0
while True:
    n += 1
    rid = f"{run}-{n}"
    if n % 3 == 0 and live:  # a delete of an earlier identity, with its reply
        target = sorted(live)[0]
        changes, staged = [(live[target], "")], []
    else:
        target, slot = rid, len(st.slots)
        changes = [(slot, rid)]
        arr = np.full((3, 2048), n % 251, np.uint8)
        staged = [st.stage_block(f"phe-{slot // 4:06d}", arr)]
    reply = Reply(("site-a", "gw1", rid), lambda c, v: f"{rid} {c} {v}".encode())
    reply.count = 1
    print("BEGIN", rid, target, flush=True)
    st.commit(blocks=staged, slots=changes, reply=reply)
    print("ACK", rid, target, flush=True)
    if target == rid:
        live[rid] = changes[0][0]
    else:
        del live[target]
"""


def _kill_writes(location: str, tmp_path: Path, runs: int) -> set[bool]:
    """Kill a writer of enrolls and deletes (each with its reply) at random moments;
    after each kill, for every write ever begun: its reply is stored exactly when its
    change is in the gallery (an enroll: the identity there or deleted by a stored
    delete; a delete: its target gone, else there or taken by another stored delete).

    Returns:
        Whether the write in flight at each kill landed (both, over enough runs).
    """
    from test_store_replies import _writer_gone

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    head, _, name = location.partition("#")
    writer_loc = (
        f"{head}?application_name=cf_writer#{name}" if head.startswith("postgres") else location
    )
    rnd = random.Random(11)
    begun: dict[str, str] = {}  # rid -> target (itself for an enroll)
    landed: set[bool] = set()
    for run in range(runs):
        proc = subprocess.Popen(
            [sys.executable, str(script), writer_loc, f"r{run}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        want, acks, inflight = rnd.randint(1, 9), 0, None
        for line in proc.stdout:
            if not line.endswith("\n"):
                break
            kind, rid, target = line.split()
            if kind == "BEGIN":
                begun[rid], inflight = target, rid
                if acks == want:
                    time.sleep(rnd.random() * 0.02)
                    proc.send_signal(signal.SIGKILL)
            else:
                acks, inflight = acks + 1, None
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        _writer_gone(location)
        st = open_store(location, meta=META)
        try:
            has = {rid: st.find_reply(("site-a", "gw1", rid)) is not None for rid in begun}
            deleted_by = {t: r for r, t in begun.items() if t != r and has[r]}
            for rid, target in begun.items():
                if target == rid:
                    assert has[rid] == (rid in st.slots or rid in deleted_by), rid
                elif has[rid]:
                    assert target not in st.slots, rid
                else:  # not carried out: its target is there, or another delete took it
                    assert target in st.slots or target in deleted_by, rid
            if inflight is not None:
                landed.add(has[inflight])
        finally:
            st.close()
    return landed


def test_kill_9_keeps_enrolls_deletes_and_their_replies_together(
    location: str, tmp_path: Path
) -> None:
    _kill_writes(location, tmp_path, 3)


@pytest.mark.faults
def test_kill_9_keeps_enrolls_deletes_and_their_replies_together_long(
    location: str, tmp_path: Path
) -> None:
    assert _kill_writes(location, tmp_path, 30) == {False, True}


# ------------------------------------- a restored backup answers no write it undid
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_restored_backup_never_answers_a_write_it_undid(
    engine: str, tmp_path: Path, cipher: EdgeCipher, request: pytest.FixtureRequest
) -> None:
    """A backup taken, then ``ann`` deleted, then the backup put back (PostgreSQL: the
    database; SQLite: the gallery directory with its own anchor). The delete's reply
    went with the restore, so its retry is not answered ``deleted: 1`` over a gallery
    that holds ``ann`` again: it runs, and the anchors refuse the rolled-back gallery
    (``storage_corrupt``). A write the backup holds is answered with its bytes (its
    reply and its change came back together)."""
    site = f"b{secrets.token_hex(4)}"
    people = unit(np.random.default_rng(10), 3)
    if engine == "postgresql":
        from test_store_rollback import PgDb

        admin = storekit._admin()
        pg: Any = PgDb(admin, storekit.PG_ADMIN.rsplit("/", 1)[0])
        store = pg.url
    else:
        store = "sqlite:"
    try:
        agent = _agent(tmp_path, site, store)
        _setup(agent, cipher, site, people, ["ann"])
        enroll = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=("bob",),
                        payload=cipher.encrypt_templates(people[1:2]))  # fmt: skip
        kept = _ask(agent, enroll)
        agent.keys.close()
        where = gallery_location(store, site, cipher.key_id, tmp_path)
        gdir = Path(split_location(where)[1])
        if engine == "postgresql":
            nightly = pg.backup()
        else:
            shutil.copytree(gdir, tmp_path / "nightly")
        agent = _agent(tmp_path, site, store)
        delete = Delete(site=site, gw=GW, kid=cipher.key_id, ids=("ann",))
        assert isinstance(_ask(agent, delete), Result)
        agent.keys.close()
        if engine == "postgresql":
            pg.restore(nightly)
        else:
            shutil.rmtree(gdir)
            shutil.copytree(tmp_path / "nightly", gdir)
        later = _agent(tmp_path, site, store)
        try:
            got = _ask(later, delete)
            assert isinstance(got, Error) and got.code == "storage_corrupt", got
            if engine == "postgresql":  # answered from the shared table, consistent
                assert _ask(later, enroll) == kept
        finally:
            later.keys.close()
    finally:
        if engine == "postgresql":
            pg.drop_all()
            admin.close()
