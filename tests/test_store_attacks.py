"""Attacks on the gallery store (issue 9 follow-up): a database file rolled back to an
older copy, a WAL deleted or put back stale, a database deleted outright. Each was a
silent resurrection of deleted identities (or a silently new empty gallery) before the
store kept a commit anchor beside the database."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import numpy as np
import pytest
import storekit
from test_store_faults import _ask, _people, _setup_site, _verify

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import StorageCorruptError
from cipherface.protocol import Error, KeyPublish
from cipherface.store import open_store
from cipherface.store.base import GalleryStore
from cipherface.store.sqlite import SqliteEngine

pg_url = storekit.pg_url
META = {"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}}


def _loc(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'g'}#site-a/k1"


def _db(tmp_path: Path) -> Path:
    return tmp_path / "g" / "gallery.sqlite3"


def _filled(tmp_path: Path) -> GalleryStore:
    st = open_store(_loc(tmp_path), meta=META)
    block = np.random.default_rng(1).integers(0, 255, (3, 64), dtype=np.uint8)
    st.commit(blocks=[st.stage_block("phe-000000", block)], slots=list(enumerate("abcd")))
    return st


def _reopen_slots(tmp_path: Path) -> list[str | None]:
    st = open_store(_loc(tmp_path), meta=META)
    try:
        return list(st.slots)
    finally:
        st.close()


def _assert_refused_with_evidence(tmp_path: Path) -> None:
    with pytest.raises(StorageCorruptError) as err:
        _reopen_slots(tmp_path)
    assert err.value.code == "storage_corrupt"
    assert "site-a/k1" in str(err.value) and str(tmp_path) not in str(err.value)
    assert list((tmp_path / "g").glob("damaged-*/gallery.sqlite3")), "evidence not kept"


def test_older_backup_of_the_database_is_refused(tmp_path: Path) -> None:
    st = _filled(tmp_path)
    st.close()
    shutil.copy2(_db(tmp_path), tmp_path / "backup.sqlite3")  # the nightly backup
    st = open_store(_loc(tmp_path), meta=META)
    st.commit(slots=[(1, "")])  # b erased, acknowledged
    st.close()
    shutil.copy2(tmp_path / "backup.sqlite3", _db(tmp_path))  # "restored" by an operator
    _assert_refused_with_evidence(tmp_path)  # before: b was back (resurrection)


def _crash_after_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b deleted and committed, the process killed before the WAL checkpoint: copies
    of the database and WAL files as kill -9 leaves them."""
    st = _filled(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(SqliteEngine, "after_commit", lambda self: None)
        st.commit(slots=[(1, "")])
        shutil.copy2(_db(tmp_path), tmp_path / "crash.db")
        shutil.copy2(f"{_db(tmp_path)}-wal", tmp_path / "crash.wal")
    st.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{_db(tmp_path)}{suffix}").unlink(missing_ok=True)
    shutil.copy2(tmp_path / "crash.db", _db(tmp_path))
    shutil.copy2(tmp_path / "crash.wal", f"{_db(tmp_path)}-wal")


def test_deleted_wal_after_a_crash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _crash_after_commit(tmp_path, monkeypatch)
    Path(f"{_db(tmp_path)}-wal").unlink()  # a "cleanup" of the log file
    _assert_refused_with_evidence(tmp_path)  # before: the committed delete of b undone


def test_stale_wal_put_back_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crash_after_commit(tmp_path, monkeypatch)
    assert _reopen_slots(tmp_path) == ["a", "", "c", "d"]  # the crash is recovered
    st = open_store(_loc(tmp_path), meta=META)
    st.commit(slots=[(2, "")])  # c erased, acknowledged
    st.close()
    shutil.copy2(tmp_path / "crash.wal", f"{_db(tmp_path)}-wal")  # an old log restored
    Path(f"{_db(tmp_path)}-shm").unlink(missing_ok=True)
    _assert_refused_with_evidence(tmp_path)  # before: c was back (resurrection)


def test_deleted_database_is_not_recreated_empty(tmp_path: Path) -> None:
    st = _filled(tmp_path)
    st.close()
    _db(tmp_path).unlink()  # no WAL either (emptied after every commit)
    with pytest.raises(StorageCorruptError) as err:  # before: a new, empty gallery
        _reopen_slots(tmp_path)
    assert "site-a/k1" in str(err.value) and str(tmp_path) not in str(err.value)
    assert not _db(tmp_path).exists()


def test_import_restores_over_a_lost_database(tmp_path: Path) -> None:
    """The deliberate way back after a loss (an export) still works."""
    from cipherface.store.tools import export_gallery, import_gallery

    st = _filled(tmp_path)
    st.close()
    export_gallery(_loc(tmp_path), tmp_path / "g.cfgallery")
    _db(tmp_path).unlink()
    import_gallery(tmp_path / "g.cfgallery", _loc(tmp_path))
    assert _reopen_slots(tmp_path) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_lost_gallery_is_not_recreated_when_the_edge_republishes_its_key(
    tmp_path: Path, cipher: EdgeCipher, engine: str, request: pytest.FixtureRequest
) -> None:
    """The gallery vanishes, the cloud restarts, the edge restarts and publishes its key
    again (every edge process does, before its first enrollment): before, key.publish
    created a new empty gallery and every enrolled person became unknown_identity."""
    store = "sqlite:" if engine == "sqlite" else request.getfixturevalue("pg_url")
    site = f"s{secrets.token_hex(3)}"
    agent = CloudAgent(broker=BrokerConfig(), data_dir=tmp_path / "c", store=store)
    people = _people(3)
    _setup_site(agent, cipher, site, people)
    agent.keys.close()
    if engine == "sqlite":
        (tmp_path / "c" / site / "keys" / cipher.key_id / "gallery" / "gallery.sqlite3").unlink()
    else:
        from cipherface.store.postgres import drop_gallery

        assert drop_gallery(store, f"{site}/{cipher.key_id}")
    reply = _ask(agent, KeyPublish(site=site, gw="g", kid=cipher.key_id, scheme="ckks",
                                   public_key=cipher.public_key_bytes()))  # fmt: skip
    got = _verify(agent, cipher, site, f"{site}-p1", people[1])
    for r in (reply, got):
        assert isinstance(r, Error) and r.code == "storage_corrupt", r
        assert str(tmp_path) not in r.message
    agent.keys.close()


def test_flipped_bit_in_the_schema_is_corrupt_not_retryable(tmp_path: Path) -> None:
    """One bit flipped in a column name of the stored schema (found by flipping random
    bits of a gallery file): before, SQLite's "no such column" came out as the
    retryable storage_error, so gateways retried a dead gallery and nothing was kept."""
    st = _filled(tmp_path)
    st.close()
    raw = bytearray(_db(tmp_path).read_bytes())
    raw[raw.index(b"slot_sum")] ^= 0x10  # -> clot_sum
    _db(tmp_path).write_bytes(bytes(raw))
    _assert_refused_with_evidence(tmp_path)


_COMPACT = """
import sys
from cipherface.store.tools import compact
compact(sys.argv[1], vacuum=True)
"""


def test_kill_9_during_compaction(tmp_path: Path) -> None:
    """kill -9 at random points of `gallery compact --vacuum` (drops + VACUUM): every
    live identity and block survives byte for byte; deleted ones never come back."""
    import random
    import subprocess
    import sys
    import time

    st = open_store(_loc(tmp_path), meta=META)
    rng = np.random.default_rng(2)
    for b in range(24):  # 24 blocks of 4 slots, 256 KiB each
        ids = [(b * 4 + i, f"p{b}-{i}") for i in range(4)]
        st.commit(blocks=[st.stage_block(f"phe-{b:06d}", rng.integers(0, 255, (4, 1 << 16)))],
                  slots=ids)  # fmt: skip
    st.commit(slots=[(s, "") for s in range(0, 96) if (s // 4) % 2 == 0])  # even blocks die
    want_slots = list(st.slots)
    want = {n: st.load_block(n).tobytes() for n in st.blocks if int(n[-6:]) % 2}
    st.close()
    r = random.Random(7)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _COMPACT, _loc(tmp_path)])
        time.sleep(r.uniform(0.05, 1.0))
        proc.kill()
        proc.wait()
        st = open_store(_loc(tmp_path), meta=META)
        try:
            live = {s: i for s, i in enumerate(st.slots) if i}
            assert live == {s: i for s, i in enumerate(want_slots) if i}
            for n, data in want.items():
                assert st.load_block(n).tobytes() == data
        finally:
            st.close()


def test_database_replaced_under_a_running_store_refuses_writes(tmp_path: Path) -> None:
    """An older copy renamed over the database while the cloud runs: before, writes
    went on into the unlinked file and were acknowledged, then lost at the next open."""
    st = _filled(tmp_path)
    shutil.copy2(_db(tmp_path), tmp_path / "backup.sqlite3")
    st.commit(slots=[(1, "")])
    shutil.copy2(tmp_path / "backup.sqlite3", tmp_path / "g" / "restored")
    (tmp_path / "g" / "restored").replace(_db(tmp_path))
    with pytest.raises(StorageCorruptError):
        st.commit(slots=[(2, "")])  # never acknowledged into a file nobody will open
    assert st.slots == ["a", "", "c", "d"]
    st.close()
    _assert_refused_with_evidence(tmp_path)  # the restored copy is older than the anchor


def test_bit_flip_in_the_wal_after_a_crash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite drops a WAL frame that fails its checksum, and every frame after it, as
    a torn tail: the committed delete of b was silently undone (issue 9's torn last
    record, again). The anchor knows that commit was made."""
    _crash_after_commit(tmp_path, monkeypatch)
    wal = Path(f"{_db(tmp_path)}-wal")
    raw = bytearray(wal.read_bytes())
    raw[len(raw) - 100] ^= 0x04  # inside the last frame's page
    wal.unlink()
    wal.write_bytes(bytes(raw))
    _assert_refused_with_evidence(tmp_path)
