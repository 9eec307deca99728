"""Gallery storage: crash safety, compaction, locking, and hostile inputs to the CKKS engine."""

from __future__ import annotations

import resource
from pathlib import Path

import msgpack
import numpy as np
import pytest

from cipherface.crypto import ckks, ntt, seal, store
from cipherface.crypto.ckks import CkksEdgeCipher, CkksGallery, CkksKeys
from cipherface.crypto.keyfile import KeyFile, key_file_bytes, parse_key_bytes
from cipherface.errors import (
    CipherFaceError,
    DecodeError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    StorageCorruptError,
    StorageError,
)


def _store(path: Path) -> store.GalleryStore:
    return store.GalleryStore(path, meta={"scheme": "t", "key_id": "k", "dim": 1})


def test_checkpoint_empties_the_journal_and_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "CHECKPOINT_EVERY", 3)
    st = _store(tmp_path)
    for i in range(7):
        st.commit(slots=[(i, f"secret-name-{i}")])
    st.commit(slots=[(0, None)])  # delete the first identity
    st.close()
    journal = (tmp_path / "journal.log").read_bytes()
    # Deleted labels do not linger in old journal records after a checkpoint.
    assert b"secret-name-0" not in journal
    st2 = _store(tmp_path)
    assert st2.slots == [None] + [f"secret-name-{i}" for i in range(1, 7)]
    assert st2.seq == 8
    st2.close()


def test_lost_record_is_detected(tmp_path: Path) -> None:
    st = _store(tmp_path)
    for i in range(3):
        st.commit(slots=[(i, f"id{i}")])
    st.close()
    # Drop the middle record: the sequence has a hole.
    data = (tmp_path / "journal.log").read_bytes()
    recs, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "little")
        recs.append(data[pos : pos + 8 + n])
        pos += 8 + n
    (tmp_path / "journal.log").write_bytes(recs[0] + recs[2])
    with pytest.raises(StorageCorruptError, match="records lost"):
        _store(tmp_path)


def test_torn_tail_is_dropped_not_fatal(tmp_path: Path) -> None:
    st = _store(tmp_path)
    st.commit(slots=[(0, "a")])
    st.commit(slots=[(1, "b")])
    st.close()
    data = (tmp_path / "journal.log").read_bytes()
    (tmp_path / "journal.log").write_bytes(data[:-3])  # crash while appending "b"
    st2 = _store(tmp_path)
    assert st2.slots == ["a"]
    st2.close()


def test_one_process_per_gallery(tmp_path: Path) -> None:
    import subprocess
    import sys

    st = _store(tmp_path)
    code = (
        "import sys; from cipherface.crypto import store\n"
        "try:\n    store.GalleryStore(sys.argv[1])\nexcept store.StorageError as e:\n"
        "    print(type(e).__name__, e); sys.exit(3)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 3 and "open in another process" in out.stdout
    st.close()
    assert issubclass(StorageCorruptError, StorageError)


def test_checkpoint_failure_does_not_lose_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing checkpoint after a durable commit must not leave stale caches behind."""
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    gal = CkksGallery(path=tmp_path, public=keys.public)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 128))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    monkeypatch.setattr(store, "CHECKPOINT_EVERY", 1)

    def boom(*a: object, **k: object) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(gal.store, "_checkpoint", boom)
    for i in range(3):
        gal.enroll([f"p{i}"], edge.encrypt_templates(g[i]))
    gal.close()
    gal = CkksGallery(path=tmp_path, public=keys.public)
    for i in range(3):
        s = edge.decrypt_scores(
            gal.verify(f"p{i}", edge.encrypt_probe(g[i], op="verify")), op="verify", count=1
        )[0]
        assert abs(s - 1.0) < 1e-4
    gal.close()


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
