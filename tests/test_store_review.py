"""Third attack on the gallery store (anchors, retire, fleets): each test is one way the
review broke it, kept so it stays fixed.

* A PostgreSQL gallery whose rows were lost and then created again, empty, by a worker
  without an anchor (a new worker, a bare URL) was taken by the anchored workers for a
  deliberate ``gallery import`` (another ``gid``): every enrolled person silently gone.
* A key retired through one PostgreSQL worker came back as a fresh empty gallery through
  another worker (the tombstone lived only in the first worker's data directory).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest
import storekit
from test_rotate_cloud import Key, _ask, _code, _key, _publish

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.errors import StorageCorruptError
from cipherface.protocol import KeyRetire, Result
from cipherface.store import open_store
from cipherface.store.postgres import drop_gallery

pg_url = storekit.pg_url  # fixture: a PostgreSQL database of this session's own
META = {"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}}


def _filled(loc: str) -> None:
    st = open_store(loc, meta=META)
    block = np.random.default_rng(1).integers(0, 255, (3, 64), dtype=np.uint8)
    st.commit(blocks=[st.stage_block("phe-000000", block)], slots=list(enumerate("abcd")))
    st.close()


def test_postgres_gallery_recreated_empty_by_an_unanchored_worker_is_refused(
    pg_url: str, tmp_path: Path
) -> None:
    name = f"s{secrets.token_hex(3)}/k"
    w1 = f"{pg_url}#{name};anchor={tmp_path / 'w1'}"
    _filled(w1)
    assert drop_gallery(pg_url, name)  # the rows lost (a wrong dump restored)
    # A new worker (no anchor yet) is sent the key: it creates the gallery again, empty,
    # and even commits on it.
    st = open_store(f"{pg_url}#{name};anchor={tmp_path / 'w2'}", meta=META)
    st.commit(slots=[(0, "x")])
    st.close()
    with pytest.raises(StorageCorruptError, match="created again"):
        open_store(w1, meta=META)  # before: served, a, b, c, d silently gone
    with pytest.raises(StorageCorruptError):
        open_store(w1, meta=META)  # and the anchor was not moved to the new gallery


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Key, Key]:
    base = tmp_path_factory.mktemp("revkeys")
    return _key(base / "old"), _key(base / "new")


def test_key_retired_on_one_postgres_worker_stays_retired_on_the_others(
    pg_url: str, tmp_path: Path, keys: tuple[Key, Key]
) -> None:
    (ocipher, _, _), (ncipher, _, _) = keys
    site = f"s{secrets.token_hex(3)}"
    w1, w2 = (
        CloudAgent(broker=BrokerConfig(url="mqtt://127.0.0.1:1"), data_dir=tmp_path / w,
                   store=pg_url)
        for w in ("w1", "w2")
    )  # fmt: skip
    from cipherface.protocol import GalleryExport

    def export() -> GalleryExport:  # a new request each time (replies are replayed by id)
        return GalleryExport(site=site, gw="gw", kid=ocipher.key_id, first=0, count=1)

    try:
        _publish(w1, site, ocipher)
        w3 = CloudAgent(broker=BrokerConfig(url="mqtt://127.0.0.1:1"), data_dir=tmp_path / "w3",
                        store=pg_url)  # fmt: skip
        _publish(w3, site, ocipher)
        assert isinstance(_ask(w3, export()), Result)  # w3 holds the old gallery open
        _publish(w1, site, ncipher)
        done = _ask(w1, KeyRetire(site=site, gw="gw", kid=ocipher.key_id, successor=ncipher.key_id))
        assert isinstance(done, Result) and done.deleted == 1
        # A gateway still holding the old key reaches the other workers.
        assert _code(_ask(w2, _pub(site, ocipher))) == "key_retired"  # before: a new gallery
        assert _code(_ask(w3, export())) == "key_retired"  # before: served, the new gallery
        assert w3.keys.kids(site) == [ncipher.key_id]  # the new key, published through w1
        w3.keys.close()
    finally:
        w1.keys.close()
        w2.keys.close()


def _pub(site: str, cipher: object) -> object:
    from cipherface.protocol import KeyPublish

    return KeyPublish(site=site, gw="gw", kid=cipher.key_id, scheme="ckks",  # type: ignore[attr-defined]
                      public_key=cipher.public_key_bytes())  # type: ignore[attr-defined]  # fmt: skip


def test_retire_cut_short_after_its_tombstone_serves_nothing(
    tmp_path: Path, keys: tuple[Key, Key]
) -> None:
    """kill -9 right after key.retire wrote its tombstone: the public key and the gallery
    are still there until the edge retries. The retired key must not be served meanwhile
    (before: its gallery was exported and verified as ever)."""
    from cipherface.agents.cloud_rotate import retired_path
    from cipherface.crypto.keyfile import write_atomic
    from cipherface.protocol import GalleryExport

    (ocipher, _, _), (ncipher, _, _) = keys
    site, old, new = "s1", ocipher.key_id, ncipher.key_id
    agent = CloudAgent(
        broker=BrokerConfig(url="mqtt://127.0.0.1:1"), data_dir=tmp_path / "c", store="sqlite:"
    )
    try:
        _publish(agent, site, ocipher)
        _publish(agent, site, ncipher)
        agent.keys.close()  # the crash: the tombstone is all the retire did
        write_atomic(retired_path(agent.data_dir, site, old), f"{new}\n".encode(), mode=0o644)
        export = GalleryExport(site=site, gw="gw", kid=old, first=0, count=1)
        assert _code(_ask(agent, export)) == "key_retired"
        assert agent.keys.kids(site) == [new]  # a delete on every key skips it
        done = _ask(agent, KeyRetire(site=site, gw="gw", kid=old, successor=new))  # the retry
        assert isinstance(done, Result) and done.deleted == 1
        assert not agent.keys.key_dir(site, old).exists()
    finally:
        agent.keys.close()


def test_postgres_rollback_hidden_by_a_lagging_worker_is_refused(tmp_path: Path) -> None:
    """The database restored to the state a second worker last saw: that worker cannot
    tell (documented), but once it commits past the first worker's anchor the first one
    must still refuse (before: accepted, the deleted ``b`` back)."""
    from test_store_rollback import PgDb

    admin = storekit._admin()
    pg = PgDb(admin, storekit.PG_ADMIN.rsplit("/", 1)[0])
    try:
        w1, w2 = (f"{pg.url}#site/k;anchor={tmp_path / w}" for w in ("w1", "w2"))
        _filled(w1)
        open_store(w2, meta=META).close()  # worker 2 saw this state
        nightly = pg.backup()
        st = open_store(w1, meta=META)
        st.commit(slots=[(1, "")])  # b erased, acknowledged by worker 1
        st.close()
        pg.restore(nightly)
        st = open_store(w2, meta=META)  # the documented limit: worker 2 cannot tell
        assert st.slots[1] == "b"
        st.commit(slots=[(0, "a")])
        st.commit(slots=[(2, "c")])  # past worker 1's anchor
        st.close()
        with pytest.raises(StorageCorruptError, match="rolled back") as err:
            open_store(w1, meta=META)
        assert str(tmp_path) not in str(err.value) and "cf_rb" not in str(err.value)
    finally:
        pg.drop_all()
        admin.close()


def test_full_anchor_filesystem_stops_commits_after_one(tmp_path: Path) -> None:
    """The key directory (anchors) full, the gallery's filesystem not (``--store
    sqlite:ROOT`` elsewhere): before, every commit was acknowledged with its anchor left
    behind (a warning each), so a backup put back later undid any number of acknowledged
    deletes unseen. Now the commit after a failed anchor write is ``storage_full``
    (nothing changed) until the anchor catches up."""
    import shutil

    from test_store_faults import _tmpfs, _umount

    from cipherface.errors import StorageFullError

    keys = tmp_path / "keys"
    _tmpfs(keys, "64k")
    try:
        loc = f"sqlite:{tmp_path / 'g'}#site/k;anchor={keys}"
        _filled(loc)
        shutil.copytree(tmp_path / "g", tmp_path / "backup")  # with its own .seq
        filler = keys / "filler"
        with open(filler, "wb", buffering=0) as fh:  # fill the key directory's filesystem
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        st = open_store(loc, meta=META)
        st.commit(slots=[(1, "")])  # acknowledged; its anchor could not be written
        with pytest.raises(StorageFullError) as err:
            st.commit(slots=[(2, "")])  # before: acknowledged too, still unanchored
        assert err.value.code == "storage_full" and str(keys) not in str(err.value)
        assert st.slots[2] == "c"  # nothing changed
        filler.unlink()  # space back: the anchor catches up, the same write succeeds
        st.commit(slots=[(2, "")])
        st.close()
        shutil.rmtree(tmp_path / "g")
        shutil.copytree(tmp_path / "backup", tmp_path / "g")
        with pytest.raises(StorageCorruptError, match="rolled back"):
            open_store(loc, meta=META)
    finally:
        _umount(keys)


def _kill_with_anchors(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest, kills: int
) -> None:
    from test_store_faults import _kill_run

    keys = tmp_path / "keys"
    if engine == "sqlite":
        loc = f"sqlite:{tmp_path / 'g'}#site/k;anchor={keys}"
    else:
        loc = f"{request.getfixturevalue('pg_url')}#t-{secrets.token_hex(6)};anchor={keys}"
    _kill_run(loc, kills, tmp_path)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_kill_9_with_anchors_in_the_key_directory(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """kill -9 anywhere in a commit, anchors outside the database included: never a
    healthy gallery refused, never an acknowledged write lost."""
    _kill_with_anchors(engine, tmp_path, request, 3)


@pytest.mark.faults
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_kill_9_with_anchors_in_the_key_directory_long(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if "faults" not in str(request.config.getoption("markexpr", "")):
        pytest.skip("long fault run: pytest -m faults tests/test_store_review.py")
    _kill_with_anchors(engine, tmp_path, request, 25)


def test_running_postgres_worker_never_commits_onto_another_history(tmp_path: Path) -> None:
    """A worker holds commit 3 in memory; the database is restored to commit 2 and
    another process commits its own 3. Same ``seq``: before, the worker neither reloaded
    nor noticed and committed 4 on top (its sums over the other history's rows: a gallery
    that no longer opens, its acknowledged delete of ``b`` undone in the rows). Now it
    reloads (and its anchor refuses) and a commit is refused, nothing written."""
    from test_store_rollback import PgDb

    admin = storekit._admin()
    pg = PgDb(admin, storekit.PG_ADMIN.rsplit("/", 1)[0])
    try:
        w1 = f"{pg.url}#site/k;anchor={tmp_path / 'w1'}"
        _filled(w1)
        nightly = pg.backup()
        st = open_store(w1, meta=META)
        st.commit(slots=[(1, "")])  # b erased: commit 3, acknowledged
        from cipherface.store.postgres import _Shared

        pg.restore(nightly)  # (closes every connection; the worker reconnects)
        other = open_store(f"{pg.url}#site/k", meta=META)
        other.commit(slots=[(3, "x")])  # commit 3 of another history
        other.close()
        assert st.stale()  # the cloud reloads, and its anchor refuses
        with pytest.raises(StorageCorruptError, match="rolled back"):
            st.commit(slots=[(2, "")])
        st.close()
        _Shared.close_all()
        with pytest.raises(StorageCorruptError, match="rolled back"):
            open_store(w1, meta=META)
        check = open_store(f"{pg.url}#site/k", meta=META)  # nothing was mixed in
        assert check.slots == ["a", "b", "c", "x"]
        check.close()
    finally:
        pg.drop_all()
        admin.close()


@pytest.mark.parametrize("damage", ["empty", "garbage", "digit-up", "copied-from-another"])
def test_damaged_or_foreign_anchor_is_loud_and_changes_nothing(tmp_path: Path, damage: str) -> None:
    """A torn, bit-flipped or foreign anchor refuses the gallery (``storage_corrupt``,
    no path), changes nothing, and deleting it (the documented operator step) opens it."""
    keys = tmp_path / "site" / "keys" / "k"
    loc = f"sqlite:{keys / 'gallery'}#site/k;anchor={keys}"
    _filled(loc)
    anchor = keys / "gallery.anchor"
    seq, chk = anchor.read_text().split()
    if damage == "empty":
        anchor.write_text("")
    elif damage == "garbage":
        anchor.write_bytes(b"\xff\x00 7")
    elif damage == "digit-up":
        anchor.write_text(f"9{seq} {chk}\n")
    else:  # another gallery's anchor, further along
        other = tmp_path / "o" / "keys" / "k"
        ost = open_store(f"sqlite:{other / 'gallery'}#o/k;anchor={other}", meta=META)
        for s in range(6):
            ost.commit(slots=[(s, f"o{s}")])
        ost.close()
        anchor.write_bytes((other / "gallery.anchor").read_bytes())
    db = (keys / "gallery" / "gallery.sqlite3").read_bytes()
    with pytest.raises(StorageCorruptError) as err:
        open_store(loc, meta=META)
    assert str(err.value).startswith("gallery site/k:") and str(tmp_path) not in str(err.value)
    assert (keys / "gallery" / "gallery.sqlite3").read_bytes() == db
    anchor.unlink()
    st = open_store(loc, meta=META)
    assert st.slots == list("abcd")
    st.close()
    assert anchor.read_text().split() == [seq, chk]  # a new anchor from the database


def test_block_replaced_by_another_worker_while_reading_is_busy_not_corrupt(pg_url: str) -> None:
    """Worker A reads a block that worker B has just replaced (or dropped) in a commit:
    normal fleet concurrency, not damage. Before: ``storage_corrupt`` (not retryable,
    evidence hook fired) for a healthy gallery; now ``storage_busy`` (retryable), and
    the reload reads the new version."""
    from cipherface.errors import StorageConflictError

    loc = f"{pg_url}#t-{secrets.token_hex(6)}"
    _filled(loc)
    a = open_store(loc, meta=META)
    b = open_store(loc, meta=META)
    new = np.full((3, 64), 7, dtype=np.uint8)
    b.commit(blocks=[b.stage_block("phe-000000", new)])
    with pytest.raises(StorageConflictError) as err:
        a.load_block("phe-000000")
    assert err.value.code == "storage_busy" and a.stale()
    b.commit(drop_blocks=["phe-000000"], slots=[(s, None) for s in range(4)])
    with pytest.raises(StorageConflictError):
        a.load_block("phe-000000")
    a.close()
    b.close()
    # Damage with no commit between stays storage_corrupt (test_store.py, both engines).


def test_retire_cut_short_on_postgres_stops_every_worker(
    pg_url: str, tmp_path: Path, keys: tuple[Key, Key], monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 in key.retire before the gallery's rows are deleted: the other workers
    must not serve the retired key meanwhile (the shared tombstone comes first)."""
    from cipherface.agents import cloud_rotate
    from cipherface.protocol import GalleryExport

    (ocipher, _, _), (ncipher, _, _) = keys
    site = f"s{secrets.token_hex(3)}"
    w1, w2 = (
        CloudAgent(broker=BrokerConfig(url="mqtt://127.0.0.1:1"), data_dir=tmp_path / w,
                   store=pg_url)
        for w in ("w1", "w2")
    )  # fmt: skip

    def death(*_: object, **__: object) -> bool:
        raise SystemExit("killed")  # the process dies here: nothing after runs

    try:
        for w in (w1, w2):
            _publish(w, site, ocipher)
        _publish(w1, site, ncipher)
        monkeypatch.setattr(cloud_rotate, "destroy_gallery", death)
        with pytest.raises(SystemExit):
            cloud_rotate.retire_key(
                w1.keys, KeyRetire(site=site, gw="gw", kid=ocipher.key_id, successor=ncipher.key_id)
            )
        export = GalleryExport(site=site, gw="gw", kid=ocipher.key_id, first=0, count=1)
        assert _code(_ask(w2, export)) == "key_retired"  # before: served until the retry
    finally:
        w1.keys.close()
        w2.keys.close()


def test_postgres_commit_history_is_bounded(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cipherface.store import postgres

    monkeypatch.setattr(postgres, "COMMIT_HISTORY", 3)
    name = f"t-{secrets.token_hex(6)}"
    st = open_store(f"{pg_url}#{name}", meta=META)
    for s in range(10):
        st.commit(slots=[(s, f"p{s}")])
    rows = st.engine._run(  # type: ignore[attr-defined]
        lambda c: c.execute("SELECT seq FROM cf_commits WHERE gid = %s ORDER BY seq",
                            (st.engine.gid,)).fetchall(),  # type: ignore[attr-defined]
        "reading",
    )  # fmt: skip
    st.close()
    assert [r[0] for r in rows] == [8, 9, 10]


def test_sqlite_directory_restored_then_committed_past_by_a_bare_tool_is_refused(
    tmp_path: Path,
) -> None:
    """The gallery directory put back from a backup, then a tool given the bare directory
    (no ``;anchor=``) commits past the key directory's anchor: before, the cloud then
    opened it, the deleted ``b`` back; now its anchor is checked against the commit
    history in the database."""
    import shutil

    keys = tmp_path / "site" / "keys" / "k"
    gdir = keys / "gallery"
    loc = f"sqlite:{gdir}#site/k;anchor={keys}"
    _filled(loc)
    shutil.copytree(gdir, tmp_path / "backup")
    st = open_store(loc, meta=META)
    st.commit(slots=[(1, "")])  # b erased, acknowledged
    st.close()
    shutil.rmtree(gdir)
    shutil.copytree(tmp_path / "backup", gdir)
    bare = open_store(f"sqlite:{gdir}#site/k", meta=META)  # e.g. gallery compact --location
    bare.commit(slots=[(0, "a")])
    bare.commit(slots=[(0, "a")])
    bare.close()
    with pytest.raises(StorageCorruptError, match="rolled back"):
        open_store(loc, meta=META)
