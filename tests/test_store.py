"""Gallery storage (cipherface.store) on SQLite and PostgreSQL: commits, integrity,
erasure, migration of the old layout; and hostile inputs to the CKKS engine."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import legacy_store
import msgpack
import numpy as np
import pytest
import storekit
from storekit import corrupt_sql

from cipherface.crypto import ckks, ckks_gallery, ntt, seal
from cipherface.crypto.ckks import CkksEdgeCipher, CkksGallery, CkksKeys
from cipherface.crypto.keyfile import KeyFile, key_file_bytes, parse_key_bytes
from cipherface.errors import (
    CipherFaceError,
    DecodeError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    StorageConflictError,
    StorageCorruptError,
    StorageError,
    StorageFullError,
)
from cipherface.protocol.messages import RETRYABLE_CODES
from cipherface.store import open_store, split_location
from cipherface.store.base import GalleryStore

location = storekit.location  # fixtures
pg_url = storekit.pg_url
META = {"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}}


def _open(loc: str, **kw: object) -> GalleryStore:
    return open_store(loc, meta=META, **kw)  # type: ignore[arg-type]


def _fill(st: GalleryStore) -> None:
    """Two blocks of four slots: a..d in phe-000000, e in phe-000001."""
    rng = np.random.default_rng(1)
    st.commit(
        blocks=[st.stage_block("phe-000000", rng.integers(0, 255, (3, 64), dtype=np.uint8))],
        slots=[(0, "a"), (1, "b"), (2, "c"), (3, "d")],
    )
    st.commit(
        blocks=[st.stage_block("phe-000001", rng.integers(0, 255, (3, 64), dtype=np.uint8))],
        slots=[(4, "e")],
    )


def _state(st: GalleryStore) -> tuple[object, ...]:
    return (list(st.slots), dict(st.blocks), st.ids_version, st.dead_slots())


def test_commit_reopen_and_dead_slot_accounting(location: str) -> None:
    st = _open(location)
    _fill(st)
    st.commit(slots=[(1, ""), (4, "")])  # b and e deleted: their ciphertext is still there
    assert st.live_count() == 3 and st.dead_slots() == 2
    st.commit(drop_blocks=["phe-000001"], slots=[(4, None)])  # e's block goes whole
    assert st.dead_slots() == 1
    before = _state(st)
    block = np.array(st.load_block("phe-000000"))
    st.close()
    st = _open(location)
    assert _state(st) == before and st.ids_version == 4
    assert np.array_equal(st.load_block("phe-000000"), block)
    assert not st.load_block("phe-000000").flags.writeable
    st.close()


def test_failed_write_changes_nothing(location: str) -> None:
    """A write the database refuses leaves memory and disk as they were; the next works."""
    st = _open(location)
    _fill(st)
    before = _state(st)
    engine, _, _ = split_location(location)
    if engine == "sqlite":
        st.engine._conn().execute("PRAGMA query_only = ON")  # type: ignore[attr-defined]
    else:
        from cipherface.store.postgres import _Shared

        conn, _ = _Shared.get(st.engine.dsn)  # type: ignore[attr-defined]
        conn.execute("SET default_transaction_read_only = on")
    staged = st.stage_block("phe-000000", np.zeros((3, 64), dtype=np.uint8))
    with pytest.raises(StorageError) as err:
        st.commit(blocks=[staged], slots=[(0, None), (5, "f")])
    assert "/" not in str(err.value).replace("site-a/k1", "")  # names the gallery, no path
    assert _state(st) == before
    if engine == "sqlite":
        st.engine._conn().execute("PRAGMA query_only = OFF")  # type: ignore[attr-defined]
    else:
        conn.execute("SET default_transaction_read_only = off")
    st.close()
    st = _open(location)
    assert _state(st) == before
    st.commit(slots=[(5, "f")])
    assert st.slots[5] == "f"
    st.close()


@pytest.mark.parametrize(
    "damage",
    [
        ("UPDATE slots SET ident = %s WHERE slot = 2", "b"),  # a wrong name
        ("UPDATE slots SET ident = NULL WHERE slot = 0",),  # a silent delete
        ("DELETE FROM slots WHERE slot = 3",),  # a lost row
        ("UPDATE slots SET dead = NOT dead WHERE slot = 1",),
        ("UPDATE gallery SET ids_version = 1",),
        ("UPDATE gallery SET nslots = 0, slot_sum = 0",),  # "empty" gallery
        ("DELETE FROM blocks WHERE name = %s", "phe-000001"),
        ("UPDATE blocks SET version = 7 WHERE name = %s", "phe-000000"),
        ("UPDATE blocks SET data = %s WHERE name = %s", b"\x93NUMPY" + bytes(10), "phe-000000"),
    ],
    ids=[
        "name",
        "silent-delete",
        "lost-row",
        "dead-flag",
        "version",
        "emptied",
        "lost-block",
        "block-version",
        "block-bytes",
    ],
)
def test_damaged_rows_are_loud_at_open(location: str, damage: tuple[object, ...]) -> None:
    st = _open(location)
    _fill(st)
    st.close()
    sql, *args = damage
    if "dead" in str(sql) and split_location(location)[0] == "sqlite":
        sql = "UPDATE slots SET dead = 1 - dead WHERE slot = 1"
    corrupt_sql(location, str(sql), *args)
    with pytest.raises(StorageCorruptError) as err:
        _open(location)
    msg = str(err.value)
    label = split_location(location)[2]
    assert msg.startswith(f"gallery {label}") and "/tmp" not in msg and "postgresql:" not in msg


def test_block_damage_under_a_running_store_is_loud(location: str) -> None:
    st = _open(location)
    _fill(st)
    st.load_block("phe-000000")
    corrupt_sql(
        location,
        "UPDATE blocks SET data = %s WHERE name = %s",
        b"\x93NUMPY" + bytes(60),
        "phe-000001",
    )
    with pytest.raises(StorageCorruptError, match="phe-000001"):
        st.load_block("phe-000001")
    corrupt_sql(location, "DELETE FROM blocks WHERE name = %s", "phe-000000")
    with pytest.raises(StorageCorruptError, match="missing"):
        st.load_block("phe-000000")
    st.close()


def test_pg_workers_never_overwrite_each_other(pg_url: str) -> None:
    loc = f"{pg_url}#shared-site/k1"
    a, b = _open(loc), _open(loc)
    a.commit(slots=[(0, "alice")])
    assert b.stale() and not a.stale()
    with pytest.raises(StorageConflictError):
        b.commit(slots=[(0, "mallory")])
    assert b.slots == []  # nothing applied
    b.close()
    b = _open(loc)
    assert b.slots == ["alice"] and not b.stale()
    b.commit(slots=[(1, "bob")])
    assert a.stale()
    a.close()
    b.close()


def test_sqlite_erases_replaced_and_dropped_blocks(tmp_path: Path) -> None:
    """Old block versions leave the database file and its WAL at commit (secure_delete +
    TRUNCATE checkpoint): the bytes of a replaced template are nowhere in the files."""
    loc = f"sqlite:{tmp_path}#s/k"
    st = _open(loc)
    rng = np.random.default_rng(7)
    old = rng.integers(0, 255, (3, 4096), dtype=np.uint8)
    gone = rng.integers(0, 255, (3, 4096), dtype=np.uint8)
    st.commit(blocks=[st.stage_block("phe-000000", old)], slots=[(0, "a")])
    st.commit(blocks=[st.stage_block("phe-000001", gone)], slots=[(4, "e")])
    st.commit(blocks=[st.stage_block("phe-000000", np.zeros_like(old))], slots=[(0, "a")])
    st.commit(drop_blocks=["phe-000001"], slots=[(4, None)])
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for arr in (old, gone):
        assert arr[1, 1000:1064].tobytes() not in files
    st.close()


def test_missing_database_beside_its_log_is_corrupt_not_new(tmp_path: Path) -> None:
    st = _open(f"sqlite:{tmp_path}#s/k")
    _fill(st)
    shutil.copy(tmp_path / "gallery.sqlite3", tmp_path / "gallery.sqlite3-wal")  # a stray log
    st.close()
    (tmp_path / "gallery.sqlite3").unlink()
    (tmp_path / "gallery.sqlite3-wal").write_bytes(b"x" * 100)
    with pytest.raises(StorageCorruptError, match="missing"):
        _open(f"sqlite:{tmp_path}#s/k")


def test_one_process_per_sqlite_gallery(tmp_path: Path) -> None:
    st = _open(str(tmp_path))
    code = (
        "import sys; from cipherface.store import open_store\n"
        "from cipherface.errors import StorageError\n"
        "try:\n    open_store(sys.argv[1])\nexcept StorageError as e:\n"
        "    print(type(e).__name__, e); sys.exit(3)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 3 and "open in another process" in out.stdout
    st.close()


def test_storage_codes_are_retryable_where_a_retry_can_work() -> None:
    assert StorageFullError.code in RETRYABLE_CODES
    assert StorageConflictError.code in RETRYABLE_CODES
    assert StorageCorruptError.code not in RETRYABLE_CODES
    assert issubclass(StorageFullError, StorageError)


def test_nightly_resync_of_the_same_staff_does_not_grow(tmp_path: Path) -> None:
    """Re-enrolling the same 4,096 ids (in chunks, as enroll_bulk sends them) three times:
    each old block dies whole and is dropped, so the gallery stays within two blocks."""
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    gal = CkksGallery(path=f"sqlite:{tmp_path}#s/k", public=keys.public)
    N = gal.params.n
    rng = np.random.default_rng(2)
    g = rng.normal(size=(N, 128))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    ids = [f"staff{i:05d}" for i in range(N)]
    payloads = [edge.encrypt_templates(g[i : i + 512]) for i in range(0, N, 512)]
    for night in range(3):
        for c, i in enumerate(range(0, N, 512)):
            gal.enroll(ids[i : i + 512], payloads[c])
            assert len(gal.store.blocks) <= 4  # col + pack of at most two blocks
        assert gal.count == N and len(gal.ids()) == N, night
        assert gal.store.dead_slots() == 0
    assert abs(_score(edge, gal, "staff00007", g[7]) - 1.0) < 1e-3
    gal.close()


# ------------------------------------------------------------------ tools
def test_export_import_roundtrip_and_tampered_exports(location: str, tmp_path: Path) -> None:
    from cipherface.store.tools import export_gallery, import_gallery

    st = _open(location)
    _fill(st)
    st.commit(slots=[(1, "")])
    before = _state(st)
    st.close()
    out = tmp_path / "backup.cfg"
    export_gallery(location, out)
    assert out.stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidArgumentError, match="exists"):
        import_gallery(out, location)  # never over a live gallery
    engine, where, _ = split_location(location)
    target = (
        f"sqlite:{tmp_path / 'restored'}#site-a/k1" if engine == "sqlite" else f"{where}#restored"
    )
    data = out.read_bytes()
    for bad in (data[:-40], data[:200] + bytes([data[200] ^ 1]) + data[201:]):
        (tmp_path / "bad").write_bytes(bad)
        with pytest.raises(StorageCorruptError):
            import_gallery(tmp_path / "bad", target)
        assert not storekit_exists(target)  # nothing half-made
    got = import_gallery(out, target)
    assert got["live"] == 4 and got["dead_slots"] == 1
    st = _open(target)
    slots, blocks, version, dead = _state(st)
    assert (slots, dead) == (before[0], before[3]) and version > before[2]
    assert {n: r.digest for n, r in blocks.items()} == {  # type: ignore[attr-defined]
        n: r.digest
        for n, r in before[1].items()  # type: ignore[attr-defined]
    }
    st.close()


def storekit_exists(loc: str) -> bool:
    from cipherface.store import store_exists

    return store_exists(loc)


def test_gallery_cli_check_stats_compact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from cipherface.agents.cli import main

    loc = f"sqlite:{tmp_path / 'g'}#s/k"
    st = _open(loc)
    _fill(st)
    st.commit(slots=[(4, "")])  # e deleted: block 1 holds no live template
    st.close()
    assert main(["gallery", "stats", "--location", loc, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["live"], got["dead_slots"], got["blocks"]) == (4, 1, 2)
    assert main(["gallery", "compact", "--location", loc, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["dropped_blocks"], got["dead_slots"], got["blocks"], got["live"]) == (1, 0, 1, 4)
    assert main(["gallery", "check", "--location", loc, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    corrupt_sql(loc, "UPDATE blocks SET data = %s", b"\x93NUMPY" + bytes(8))
    assert main(["gallery", "check", "--location", loc, "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["ok"] is False and "s/k" in got["problems"][0]


# ------------------------------------------------------------------ migration
def _legacy_ckks(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CkksEdgeCipher, np.ndarray]:
    """A CKKS gallery written by today's gallery code on the old store."""
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    rng = np.random.default_rng(5)
    g = rng.normal(size=(8, 128))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    with monkeypatch.context() as m:
        m.setattr(ckks_gallery, "GalleryStore", legacy_store.GalleryStore)
        gal = CkksGallery(path=path, public=keys.public)
        gal.enroll([f"p{i}" for i in range(5)], edge.encrypt_templates(g[:5]))
        gal.enroll(["p5"], edge.encrypt_templates(g[5]))
        gal.delete(["p1"])
        gal.enroll(["p2"], edge.encrypt_templates(g[6]))  # replaced
        assert isinstance(gal.store, legacy_store.GalleryStore)
        gal.close()
    return edge, g


def _score(edge: CkksEdgeCipher, gal: CkksGallery, ident: str, v: np.ndarray) -> float:
    res = gal.verify(ident, edge.encrypt_probe(v, op="verify"))
    return float(edge.decrypt_scores(res, op="verify", count=1)[0])


def test_old_galleries_migrate_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edge, g = _legacy_ckks(tmp_path, monkeypatch)
    gal = CkksGallery(path=tmp_path, public=edge.pub)
    assert not (tmp_path / "journal.log").exists() and not (tmp_path / "blocks").exists()
    assert (tmp_path / "gallery.sqlite3").exists()
    assert gal.ids_version == 5  # four changes before, +1 so edges refresh their list
    ids = gal.ids()
    assert [i for i in ids if i] == ["p0", "p3", "p4", "p5", "p2"]
    assert ids.index("p2") == 6  # slot numbers kept
    for ident, v in (("p0", g[0]), ("p2", g[6]), ("p5", g[5])):
        assert abs(_score(edge, gal, ident, v) - 1.0) < 1e-3
    with pytest.raises(KeyError):
        gal.verify("p1", edge.encrypt_probe(g[1], op="verify"))
    assert gal.store.dead_slots() >= 2  # p1 and the old p2 still sit in block 0
    gal.close()


@pytest.mark.parametrize("damage", ["flip-last-delete", "torn-tail", "no-journal"])
def test_damaged_old_galleries_are_refused_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    edge, _ = _legacy_ckks(tmp_path, monkeypatch)
    j = tmp_path / "journal.log"
    data = j.read_bytes()
    if damage == "flip-last-delete":  # the old store dropped this silently: p1 came back
        with monkeypatch.context() as m:
            m.setattr(ckks_gallery, "GalleryStore", legacy_store.GalleryStore)
            gal = CkksGallery(path=tmp_path, public=edge.pub)
            gal.delete(["p3"])
            gal.close()
        data = bytearray(j.read_bytes())
        data[-3] ^= 0x04
        j.write_bytes(bytes(data))
    elif damage == "torn-tail":
        j.write_bytes(data[:-5])
    else:
        j.write_bytes(b"")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(StorageCorruptError) as err:
        CkksGallery(path=f"sqlite:{tmp_path}#site-a/k1", public=edge.pub)
    assert str(err.value).startswith("gallery site-a/k1: ")  # the site, never a path
    after = {
        p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "sqlite" not in p.name
    }
    assert after == {p: b for p, b in before.items() if "sqlite" not in p.name}  # evidence kept
    assert not (tmp_path / "gallery.sqlite3").exists()


# ------------------------------------------------------------------ hostile inputs
def test_key_id_binds_dim_model_metric(tmp_path: Path) -> None:
    keys = CkksKeys.generate(dim=128)
    kf = parse_key_bytes(keys.public_key_bytes())
    for field, value in (("dim", 256), ("metric", "euclidean"), ("model", "Facenet")):
        forged = KeyFile(
            kind="public",
            scheme=kf.scheme,
            key_id=kf.key_id,
            params={**kf.params, field: value},
            material=kf.material,
        )
        with pytest.raises(KeyMismatchError, match="key id"):
            CkksKeys.from_public_bytes(key_file_bytes(forged))


@pytest.mark.parametrize(
    ("field", "value"),
    [("dim", 0), ("dim", 100), ("dim", 5000), ("dim", -3), ("primes", None), ("delta_bits", 20)],
)
def test_bad_public_parameters_refused(field: str, value: object) -> None:
    keys = CkksKeys.generate(dim=128)
    kf = parse_key_bytes(keys.public_key_bytes())
    params = dict(kf.params)
    if field == "primes":
        params["primes"] = [params["primes"][0]] * 2  # duplicate primes
    else:
        params[field] = value
    forged = KeyFile(
        kind="public", scheme="ckks", key_id=kf.key_id, params=params, material=kf.material
    )
    with pytest.raises(KeyMismatchError):
        CkksKeys.from_public_bytes(key_file_bytes(forged))


def test_dimension_must_divide_n() -> None:
    with pytest.raises(InvalidArgumentError, match="must divide"):
        CkksKeys.generate(dim=100)


def test_msgpack_bombs_are_refused_cheaply(tmp_path: Path) -> None:
    keys = CkksKeys.generate(dim=128)
    gal = CkksGallery(path=tmp_path, public=keys.public)
    bomb_maps = msgpack.packb([{}] * 2_000_000)
    nested = msgpack.packb({"f": ckks.FORMAT, "kind": "templates", "x": [[[]] * 100_000]})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for payload in (bomb_maps, nested, b"\xdd\xff\xff\xff\xff", b"\xc1", b""):
        with pytest.raises(CipherFaceError):
            gal.enroll(["x"], payload)
        with pytest.raises(CipherFaceError):
            gal.identify(payload)
        with pytest.raises(CipherFaceError):
            CkksKeys.from_public_bytes(b"CFKEY1\n" + payload)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 100_000  # < 100 MB, where unbounded decoding took ~70x the input
    gal.close()


def test_wrong_sizes_and_ranges_are_decode_errors(tmp_path: Path) -> None:
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    gal = CkksGallery(path=tmp_path, public=keys.public)
    good = msgpack.unpackb(edge.encrypt_probe(np.ones(128), op="verify"))
    gal.enroll(["a"], edge.encrypt_templates(np.ones(128)))
    p = keys.public.params
    level = keys.public.data_level
    high = np.full((2, 2, p.n), (1 << 32) - 1, dtype=np.uint64)  # residues >= q
    size3 = np.zeros((3, 2, p.n), dtype=np.uint64)
    for change in (
        {"ct": good["ct"][:-4]},
        {"ct": good["ct"][:16] + b"\x00" * (len(good["ct"]) - 16)},
        {"ct": b"short"},
        {"ct": seal.ciphertext_bytes(high, parms_id=level, scale=p.delta)},
        {"ct": seal.ciphertext_bytes(size3, parms_id=level, scale=p.delta)},
        {"ct": seal.ciphertext_bytes(high[:, :1] * 0, parms_id=level, scale=p.delta)},
        {"ct": seal.ciphertext_bytes(high * 0, parms_id=level, scale=2.0**40)},
        {"n": 8192},
    ):
        with pytest.raises((DecodeError, KeyMismatchError)):
            gal.verify("a", msgpack.packb({**good, **change}))
    gal.close()
    assert ntt.MAX_BLOCKS >= 245  # a 1 M gallery's result fits the decoder's limits


def test_key_file_errors_are_typed(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"CFKEY1\n" + msgpack.packb({"kind": "private"}))
    with pytest.raises(KeyFileError, match="corrupt"):
        CkksKeys.load(tmp_path / "k")
