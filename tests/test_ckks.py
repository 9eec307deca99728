"""CKKS engine and cipherface-compatible API against a plain numpy reference."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
from vectors import unit

from cipherface import CipherFace
from cipherface.crypto import ckks, seal, sites, thresholds
from cipherface.crypto.ckks import CkksEdgeCipher, CkksGallery, CkksKeys
from cipherface.errors import (
    DecodeError,
    InsecureParametersError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    PublicKeyOnlyError,
    ResultRejectedError,
    StorageCorruptError,
    UnknownIdentityError,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def keys128() -> CkksKeys:
    return CkksKeys.generate(dim=128)


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize("level", [128, 192, 256])
def test_presets_meet_he_standard_and_seal(level: int) -> None:
    import tenseal.sealapi as sealapi

    p = seal.preset(level)
    seal.check_security(p)
    sec = {
        128: sealapi.SEC_LEVEL_TYPE.TC128,
        192: sealapi.SEC_LEVEL_TYPE.TC192,
        256: sealapi.SEC_LEVEL_TYPE.TC256,
    }[level]
    bits = sum(q.bit_length() for q in p.primes)
    # SEAL's own table agrees with ours, and SEAL accepts the parameter set at that level.
    assert (
        bits <= sealapi.CoeffModulus.MaxBitCount(p.n, sec) == seal.HE_STANDARD_MAX_BITS[level][p.n]
    )
    assert seal.context_for(p).parameters_set()


def test_insecure_parameters_refused() -> None:
    p = seal.preset(128)
    with pytest.raises(InsecureParametersError, match="below 256-bit"):
        seal.check_security(seal.Params(n=4096, primes=p.primes, security=256))
    with pytest.raises(InsecureParametersError):
        seal.check_security(seal.Params(n=2048, primes=p.primes, security=128))
    with pytest.raises(InsecureParametersError, match="preset"):
        seal.Params.from_dict({**p.to_dict(), "delta_bits": 25})


def test_randomness_does_not_come_from_random_module(
    monkeypatch: pytest.MonkeyPatch, keys128: CkksKeys
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the random module must not be used for key or encryption material")

    for name in ("random", "randint", "getrandbits", "randbytes", "choice"):
        monkeypatch.setattr(random, name, boom)
    monkeypatch.setattr(np.random, "default_rng", boom)
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    a = edge.encrypt_probe(np.ones(128), op="verify")
    b = edge.encrypt_probe(np.ones(128), op="verify")
    assert a != b  # fresh randomness each time, even for equal plaintexts


# -------------------------------------------------------------- compat 1:1 API
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("model", "dim"), [("Dlib", 128), ("Facenet512", 512), ("VGG-Face", 4096)])
def test_compat_matches_numpy(metric: str, model: str, dim: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(dim)
    onprem = CipherFace(model_name=model, distance_metric=metric)
    onprem.export_private_key(tmp_path / "private.txt")
    onprem.export_public_key(tmp_path / "public.txt")
    cloud = CipherFace(
        model_name=model, distance_metric=metric, cryptosystem=tmp_path / "public.txt"
    )
    onprem2 = CipherFace(
        model_name=model, distance_metric=metric, cryptosystem=tmp_path / "private.txt"
    )
    thr = thresholds.threshold(model, metric)
    for _ in range(3):
        x = rng.normal(size=dim)  # signed, unnormalised: the API normalises
        y = x + rng.normal(size=dim) * rng.uniform(0.05, 1.5)
        enc_x = onprem.encrypt(x)
        enc_y = cloud.encrypt(y)  # public-key encryption in the cloud, as in 0.0.2's flow
        got = onprem2.restore(cloud.encrypted_compare(enc_y, enc_x))
        xn, yn = x / np.linalg.norm(x), y / np.linalg.norm(y)
        # euclidean: squared distance, as 0.0.2's restore returns
        ref = 1 - xn @ yn if metric == "cosine" else np.sum((xn - yn) ** 2)
        assert abs(got - ref) <= TOL
        if metric == "euclidean":
            thr = thr * thr
        if abs(ref - thr) > TOL:
            assert onprem2.verify(got) == (ref < thr)


def test_compat_identical_vectors_distance_zero() -> None:
    cf = CipherFace(distance_metric="euclidean")
    v = np.random.default_rng(5).normal(size=128)
    assert cf.restore(cf.encrypted_compare(cf.encrypt(v), cf.encrypt(v))) <= TOL


def test_compat_key_files_and_errors(tmp_path: Path) -> None:
    onprem = CipherFace()
    onprem.export_private_key(tmp_path / "private.txt")
    onprem.export_public_key(tmp_path / "public.txt")
    assert stat.S_IMODE(os.stat(tmp_path / "private.txt").st_mode) == 0o600
    pub_size = os.path.getsize(tmp_path / "public.txt")
    assert pub_size < 256 * 1024  # cipherface 0.0.2 wrote 35-47 MB
    public = CipherFace(cryptosystem=tmp_path / "public.txt")
    assert not public.keys.has_secret
    enc = public.encrypt(np.arange(128.0) - 60)
    dist = public.encrypted_compare(enc, enc)
    with pytest.raises(PublicKeyOnlyError, match="private key"):
        public.restore(dist)
    with pytest.raises(PublicKeyOnlyError):
        public.export_private_key(tmp_path / "nope.txt")
    # A stranger's ciphertext is refused, not decrypted into garbage.
    other = CipherFace()
    with pytest.raises(KeyMismatchError, match="made for key"):
        public.encrypted_compare(other.encrypt(np.ones(128)), enc)
    with pytest.raises(ResultRejectedError):
        other.restore(dist)
    # Not a key file / missing file / tampered file.
    (tmp_path / "junk.txt").write_bytes(b"\x80\x04pickle-would-run-here")
    with pytest.raises(KeyFileError, match="not a cipherface key file"):
        CipherFace(cryptosystem=tmp_path / "junk.txt")
    with pytest.raises(KeyFileError, match="not found"):
        CipherFace(cryptosystem=tmp_path / "missing.txt")
    with pytest.raises(InvalidArgumentError, match="custom n/q/g"):
        CipherFace(n=8192, q=[60, 40, 60], g=2**40)
    with pytest.raises(InvalidArgumentError):
        CipherFace(cryptosystem=tmp_path / "public.txt", model_name="Facenet512")


def test_compat_readme_flow_three_steps(tmp_path: Path) -> None:
    """cipherface 0.0.2 README's FHE flow, keys through files (embeddings given directly)."""
    rng = np.random.default_rng(7)
    img1, target = unit(rng, 2, 128)
    target = img1 + 0.05 * target
    # On prem
    onprem = CipherFace(model_name="Dlib", distance_metric="euclidean")
    onprem.export_private_key(str(tmp_path / "private.txt"))
    onprem.export_public_key(str(tmp_path / "public.txt"))
    source_embedding_encrypted = onprem.encrypt(img1)
    # Cloud
    cloud = CipherFace(
        model_name="Dlib", distance_metric="euclidean", cryptosystem=str(tmp_path / "public.txt")
    )
    target_embedding_encrypted = cloud.encrypt(target)
    encrypted_distance = cloud.encrypted_compare(
        target_embedding_encrypted, source_embedding_encrypted
    )
    # On prem
    onprem = CipherFace(
        model_name="Dlib", distance_metric="euclidean", cryptosystem=str(tmp_path / "private.txt")
    )
    decrypted_distance = onprem.restore(encrypted_distance)
    assert onprem.verify(decrypted_distance) is True


def test_tampered_key_file_detected(tmp_path: Path) -> None:
    keys = CkksKeys.generate(dim=128)
    keys.save_public(tmp_path / "pub.key")
    data = bytearray((tmp_path / "pub.key").read_bytes())
    data[-100] ^= 0x01
    (tmp_path / "pub.key").write_bytes(bytes(data))
    with pytest.raises(KeyFileError):
        CkksKeys.load(tmp_path / "pub.key")


def test_private_key_readable_by_others_refused(tmp_path: Path) -> None:
    from cipherface.crypto.keyfile import InsecurePermissionsWarning
    from cipherface.errors import InsecurePermissionsError

    sites.generate_key_dir(tmp_path / "k", dim=128)
    for mode in (0o644, 0o640, 0o604):
        os.chmod(tmp_path / "k" / "private.key", mode)
        with pytest.raises(InsecurePermissionsError, match="chmod 600") as err:
            sites.load_edge_cipher(tmp_path / "k")
        assert err.value.code == "insecure_permissions"
        with pytest.raises(InsecurePermissionsError):
            CkksKeys.load(tmp_path / "k" / "private.key")
    # An explicit override loads it, with a warning.
    with pytest.warns(InsecurePermissionsWarning, match="chmod 600"):
        edge = sites.load_edge_cipher(tmp_path / "k", allow_insecure_permissions=True)
    assert edge.key_id
    os.chmod(tmp_path / "k" / "private.key", 0o600)
    assert sites.load_edge_cipher(tmp_path / "k").key_id == edge.key_id


# -------------------------------------------------------------------- gallery
@pytest.fixture(scope="module")
def big_gallery(
    tmp_path_factory: pytest.TempPathFactory, keys128: CkksKeys
) -> tuple[CkksEdgeCipher, Path, np.ndarray, list[str]]:
    """Two blocks: one bulk block, a few singles and a partial bulk in the second."""
    rng = np.random.default_rng(3)
    n = 4096 + 700
    g = unit(rng, n, 128)
    ids = [f"id{i:05d}" for i in range(n)]
    edge = CkksEdgeCipher(keys=keys128)
    path = tmp_path_factory.mktemp("gallery")
    gal = CkksGallery(
        path=path, public=CkksKeys.from_public_bytes(keys128.public_key_bytes()).public
    )
    gal.enroll(ids[:4096], edge.encrypt_templates(g[:4096]))
    for i in range(4096, 4100):
        gal.enroll([ids[i]], edge.encrypt_templates(g[i]))
    gal.enroll(ids[4100:], edge.encrypt_templates(g[4100:]))
    gal.close()
    return edge, path, g, ids


def _identify(edge: CkksEdgeCipher, gal: CkksGallery, probe: np.ndarray) -> dict[str, float]:
    res, count = gal.identify(edge.encrypt_probe(probe, op="identify"))
    scores = edge.decrypt_scores(res, op="identify", count=count)
    return {ident: float(scores[i]) for i, ident in enumerate(gal.ids()) if ident is not None}


def test_gallery_identify_and_verify_match_numpy(big_gallery) -> None:  # type: ignore[no-untyped-def]
    edge, path, g, ids = big_gallery
    gal = CkksGallery(path=path, public=edge.pub)
    rng = np.random.default_rng(11)
    target = 4098  # a single enrollment in the second block
    probe = g[target] + 0.3 * unit(rng, 1, 128)[0]
    probe /= np.linalg.norm(probe)
    ref = g @ probe
    got = _identify(edge, gal, probe)
    assert len(got) == len(ids) == gal.count
    err = max(abs(got[ident] - ref[i]) for i, ident in enumerate(ids))
    assert err <= TOL
    assert max(got, key=got.__getitem__) == ids[int(np.argmax(ref))] == ids[target]
    for i in (0, 4095, 4096, 4099, 4100, len(ids) - 1):
        res = gal.verify(ids[i], edge.encrypt_probe(probe, op="verify"))
        assert len(res) <= 64 * 1024
        s = edge.decrypt_scores(res, op="verify", count=1)[0]
        assert abs(s - ref[i]) <= TOL
    gal.close()


def test_gallery_delete_reload_and_replace(big_gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    edge, path, g, ids = big_gallery
    import shutil

    work = tmp_path / "g"
    shutil.copytree(path, work)
    gal = CkksGallery(path=work, public=edge.pub)
    probe = g[10]
    slot = gal.ids().index(ids[10])
    assert gal.delete([ids[10], "nobody"]) == 1
    with pytest.raises(UnknownIdentityError, match="not enrolled"):
        gal.verify(ids[10], edge.encrypt_probe(probe, op="verify"))
    got = _identify(edge, gal, probe)
    assert ids[10] not in got and len(got) == len(ids) - 1
    # Erased slot: its result is randomised, not the old score of 1.
    res, count = gal.identify(edge.encrypt_probe(probe, op="identify"))
    raw = edge.decrypt_scores(res, op="identify", count=count)
    assert abs(raw[slot] - 1.0) > 1e-3
    # Re-enrolling an id replaces it (never two slots for one identity).
    gal.enroll([ids[20]], edge.encrypt_templates(g[30]))
    assert gal.ids().count(ids[20]) == 1
    s = edge.decrypt_scores(
        gal.verify(ids[20], edge.encrypt_probe(g[30], op="verify")), op="verify", count=1
    )[0]
    assert abs(s - 1.0) <= TOL
    version = gal.ids_version
    gal.close()
    # Reload from disk: same answers, same ids.
    gal2 = CkksGallery(path=work, public=edge.pub)
    assert gal2.ids_version == version and gal2.count == len(ids) - 1
    got2 = _identify(edge, gal2, probe)
    assert max(abs(got2[k] - got[k]) for k in got2 if k != ids[20]) <= TOL
    # Deleting every template of a full block destroys the block's ciphertexts.
    first_block = [x for x in gal2.ids()[: gal2.params.n] if x is not None]
    assert gal2.delete(first_block) == len(first_block)
    assert not list((work / "blocks").glob("col-000000.*")) and not list(
        (work / "blocks").glob("pack-000000.*")
    )
    got3 = _identify(edge, gal2, probe)
    assert set(got3) == {k for k in got2 if k not in first_block}
    assert max(abs(got3[k] - got2[k]) for k in got3) <= TOL
    gal2.close()


def test_gallery_detects_corruption(big_gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    edge, path, _, ids = big_gallery
    import shutil

    for how in ("flip", "truncate", "name"):
        work = tmp_path / how
        shutil.copytree(path, work)
        db = work / "gallery.sqlite3"
        data = bytearray(db.read_bytes())
        if how == "name":  # one flipped byte in a stored identity (a wrong-name risk)
            at = data.index(ids[3].encode())
            data[at] ^= 0x01
        elif how == "flip":
            data[len(data) // 2 + 1000] ^= 0x10
        else:
            data = data[: len(data) // 2]
        db.write_bytes(bytes(data))
        with pytest.raises(StorageCorruptError, match=r"corrupt|checksum|damaged|fails"):
            CkksGallery(path=work, public=edge.pub)


def test_gallery_refuses_other_key_and_garbage(big_gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    edge, path, g, _ids = big_gallery
    other = CkksEdgeCipher(keys=CkksKeys.generate(dim=128))
    with pytest.raises(Exception, match=r"key_id|re-enroll"):
        CkksGallery(path=path, public=other.pub)
    gal = CkksGallery(path=tmp_path / "fresh", public=edge.pub)
    with pytest.raises(KeyMismatchError):
        gal.enroll(["x"], other.encrypt_templates(g[0]))
    with pytest.raises(DecodeError):
        gal.enroll(["x"], b"\x93\x01\x02\x03")
    with pytest.raises(InvalidArgumentError, match="templates for 2 ids"):
        gal.enroll(["x", "y"], edge.encrypt_templates(g[0]))
    gal.enroll(["x"], edge.encrypt_templates(g[0]))
    res = gal.verify("x", edge.encrypt_probe(g[0], op="verify"))
    # The edge checks op and count before decrypting anything.
    with pytest.raises(ResultRejectedError):
        edge.decrypt_scores(res, op="identify", count=1)
    with pytest.raises(ResultRejectedError):
        other.decrypt_scores(res, op="verify", count=1)
    ires, count = gal.identify(edge.encrypt_probe(g[0], op="identify"))
    with pytest.raises(ResultRejectedError, match="scores"):
        edge.decrypt_scores(ires, op="identify", count=count + 1)
    gal.close()


def test_wire_sizes(keys128: CkksKeys) -> None:
    edge = CkksEdgeCipher(keys=keys128)
    v = np.ones(128)
    assert len(edge.encrypt_probe(v, op="verify")) <= 64 * 1024
    assert len(keys128.public_key_bytes()) <= 2 * 1024 * 1024
    assert len(keys128.public_key_bytes()) <= sites.MAX_PUBLIC_KEY_BYTES
    # Flooding costs at most 2e-5 of precision (scores are scaled by delta^2).
    assert 2.0 ** (ckks.FLOOD_BITS - 2 * keys128.public.params.delta_bits) <= 2e-5


def test_identify_on_an_empty_gallery(keys128: CkksKeys, tmp_path: Path) -> None:
    edge = CkksEdgeCipher(keys=keys128)
    gal = CkksGallery(path=tmp_path, public=keys128.public)
    res, count = gal.identify(edge.encrypt_probe(np.ones(128), op="identify"))
    assert count == 0 and gal.ids() == []
    assert edge.decrypt_scores(res, op="identify", count=0).shape == (0,)
    gal.close()
