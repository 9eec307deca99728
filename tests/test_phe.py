"""Paillier family: schemes, fixed-point packing, the PHE gallery engine and CipherFaceLite.

2048-bit keys throughout (the 112-bit minimum) to stay fast; a test checks that smaller
keys are refused. Scores are compared with numpy on the same float embeddings.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import random
import secrets
import signal
import stat
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gmpy2
import msgpack
import numpy as np
import pytest
from gmpy2 import mpz

from cipherface.compat_lite import CipherFaceLite
from cipherface.crypto import phe, phe_gallery
from cipherface.crypto.engine import EdgeCipher, Gallery
from cipherface.crypto.keyfile import load_key_file
from cipherface.errors import (
    DecodeError,
    InsecureParametersError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    PublicKeyOnlyError,
    RemoteError,
    ResultRejectedError,
    UnknownIdentityError,
)

BITS = 2048
TOL = 1e-4

_KEYS: dict[tuple[str, int], phe.PhePrivateKey] = {}


def key_for(scheme: str, dim: int = 128) -> phe.PhePrivateKey:
    """One 2048-bit key per (scheme, dim) for the whole session (keygen ~0.2 s)."""
    if (scheme, dim) not in _KEYS:
        _KEYS[scheme, dim] = phe.generate_private_key(scheme, bits=BITS, dim=dim)
    return _KEYS[scheme, dim]


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hard_rows(d: int) -> np.ndarray:
    """Signed extremes: one-hot +1 and -1, a mostly-zero vector, alternating signs."""
    rows = np.zeros((4, d))
    rows[0, 0] = 1.0
    rows[1, d - 1] = -1.0
    rows[2, :3] = [0.6, -0.8, 0.0]
    rows[3] = np.where(np.arange(d) % 2, -1.0, 1.0) / math.sqrt(d)
    return rows


@pytest.fixture
def edge_and_pub() -> tuple[phe_gallery.PheEdgeCipher, phe.PhePublicKey]:
    edge = phe_gallery.PheEdgeCipher(key=key_for(phe.PAILLIER))
    return edge, phe.public_key_from_bytes(edge.public_key_bytes())


# ------------------------------------------------------------------------- schemes
def test_small_keys_and_levels_are_refused() -> None:
    with pytest.raises(InsecureParametersError):
        phe.generate_private_key(phe.PAILLIER, bits=1024, dim=128)
    with pytest.raises(InsecureParametersError):
        phe.generate_private_key(phe.OKAMOTO_UCHIYAMA, bits=2047, dim=128)
    with pytest.raises(InsecureParametersError):
        phe.bits_for_security(80)  # cipherface 0.0.2's default
    with pytest.raises(InsecureParametersError):
        CipherFaceLite(security_level=80)
    assert phe.bits_for_security(128) == 3072
    assert phe.bits_for_security(112) == 2048


@pytest.mark.parametrize("scheme", phe.SCHEMES)
def test_exact_size_roundtrip_and_homomorphism(scheme: str) -> None:
    key = key_for(scheme)
    pub = key.public
    assert int(pub.n).bit_length() == BITS
    top = 1 << pub.plaintext_bits
    for _ in range(4):
        a, b = secrets.randbelow(top // 2), secrets.randbelow(top // 2)
        ca, cb = key.encrypt(a), pub.encrypt(b)  # secret-key CRT path and textbook path
        assert key.decrypt(ca) == a and key.decrypt(cb) == b
        assert key.decrypt(ca * cb % pub.modulus) == a + b
        k = secrets.randbelow(1 << 20)
        assert key.decrypt(gmpy2.powmod(ca, k, pub.modulus)) == a * k % (
            key.p if scheme == phe.OKAMOTO_UCHIYAMA else mpz(pub.n) ** pub.s
        )
    # negatives wrap in the plaintext ring and come back out by addition
    assert key.decrypt(key.encrypt(-7) * key.encrypt(10) % pub.modulus) == 3
    assert key.decrypt_many([key.encrypt(i) for i in range(10)]) == list(range(10))


def test_damgard_jurik_log_and_large_plaintexts() -> None:
    p = gmpy2.next_prime(mpz(secrets.randbits(160)))
    for s in (1, 2, 3):
        pows = [p**j for j in range(s + 2)]
        inv = [
            [mpz(0), mpz(0)] + [gmpy2.invert(math.factorial(k), pows[j]) for k in range(2, j + 1)]
            for j in range(s + 1)
        ]
        for _ in range(10):
            i = mpz(secrets.randbelow(int(pows[s])))
            assert phe._dj_log(gmpy2.powmod(1 + p, i, pows[s + 1]), p, s, pows, inv) == i
    key = key_for(phe.DAMGARD_JURIK)
    assert key.public.s == 2
    m = mpz(secrets.randbits(2 * BITS - 10))  # far above n: only a real DJ holds it
    assert m > key.public.n
    assert key.decrypt(key.encrypt(m)) == m


@pytest.mark.parametrize("scheme", phe.SCHEMES)
def test_lightphe_cross_check(scheme: str) -> None:
    """LightPHE decrypts our ciphertexts under the same key, and we decrypt its ones."""
    from lightphe.cryptosystems.DamgardJurik import DamgardJurik
    from lightphe.cryptosystems.OkamotoUchiyama import OkamotoUchiyama
    from lightphe.cryptosystems.Paillier import Paillier

    key = key_for(scheme)
    pub = key.public
    n = int(pub.n)
    lp: Any
    if scheme == phe.PAILLIER:
        phi = int((key.p - 1) * (key.q - 1))
        lp = Paillier(keys={"public_key": {"n": n, "g": n + 1}, "private_key": {"phi": phi}})
    elif scheme == phe.DAMGARD_JURIK:
        phi = int((key.p - 1) * (key.q - 1))
        keys = {"public_key": {"n": n, "g": n + 1, "s": pub.s}, "private_key": {"phi": phi}}
        lp = DamgardJurik(s=pub.s, keys=keys)
    else:
        lp = OkamotoUchiyama(
            keys={
                "public_key": {"n": n, "g": int(pub.g), "h": int(pub.h)},
                "private_key": {"p": int(key.p), "q": int(key.q)},
            }
        )
    for _ in range(3):
        m = secrets.randbelow(1 << 600)
        assert lp.decrypt(int(key.encrypt(m))) == m
        if scheme != phe.DAMGARD_JURIK:  # LightPHE's DJ uses r^n: not a valid s=2 ciphertext
            assert key.decrypt(mpz(lp.encrypt(m))) == m


def test_randomness_comes_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("the random module must not be used")

    for name in ("random", "randint", "randrange", "getrandbits", "choice", "sample", "seed"):
        monkeypatch.setattr(random, name, boom)
    rs = random.Random
    monkeypatch.setattr(random, "Random", boom)
    try:
        key = phe.generate_private_key(phe.PAILLIER, bits=BITS, dim=8)
        edge = phe_gallery.PheEdgeCipher(key=key)
        payload = edge.encrypt_templates(np.eye(8)[:3])
        assert key.decrypt(key.encrypt(5)) == 5
        assert payload
    finally:
        monkeypatch.setattr(random, "Random", rs)


def test_zeros_and_equal_values_encrypt_differently() -> None:
    key = key_for(phe.PAILLIER)
    edge = phe_gallery.PheEdgeCipher(key=key)
    one_hot = np.zeros(128)
    one_hot[3] = 1.0  # 127 zero features
    payloads = [edge.encrypt_templates(one_hot) for _ in range(2)]
    cts = []
    for p in payloads:
        (_slots, raw), *_ = msgpack.unpackb(p)["chunks"]
        w = key.public.ct_bytes
        cts += [raw[i : i + w] for i in range(0, len(raw), w)]
    assert len(cts) == 256
    assert len(set(cts)) == 256, "two ciphertexts are equal: zeros leak"
    # an encrypted embedding (CipherFaceLite) likewise
    enc = phe_gallery.encrypt_embedding(edge, one_hot)
    raw = msgpack.unpackb(enc)["cts"]
    assert len({raw[i : i + w] for i in range(0, len(raw), w)}) == 128


def test_precision_bound() -> None:
    assert [phe.default_precision(d) for d in (128, 512, 4096)] == [17, 18, 20]
    for d in (128, 512, 4096):
        f = phe.default_precision(d)
        assert math.sqrt(d) * 2.0**-f < TOL


# ------------------------------------------------------------------------ key files
@pytest.mark.parametrize("scheme", phe.SCHEMES)
def test_key_files(tmp_path: Path, scheme: str) -> None:
    key = key_for(scheme)
    priv, pubf = tmp_path / "private.key", tmp_path / "public.key"
    key.save(priv)
    key.public.save(pubf)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    kf = load_key_file(pubf)
    allowed = {"n", "g", "h"} if scheme == phe.OKAMOTO_UCHIYAMA else {"n"}
    assert set(kf.material) == allowed
    assert all(isinstance(v, str) for v in kf.material.values())  # hex strings, no eval
    loaded = phe.load_key(priv)
    assert isinstance(loaded, phe.PhePrivateKey)
    assert loaded.key_id == key.key_id
    c = key.encrypt(123456)
    assert loaded.decrypt(c) == 123456
    assert loaded.decrypt(loaded.encrypt(42)) == 42  # factors reloaded: fast path works
    pub = phe.load_key(pubf)
    assert isinstance(pub, phe.PhePublicKey) and pub.key_id == key.key_id
    assert phe.public_key_from_bytes(key.public.to_bytes()).key_id == key.key_id


def test_tampered_and_insecure_key_files(tmp_path: Path) -> None:
    key = key_for(phe.PAILLIER)
    kf = key.public.key_file()
    bad_n = dict(kf.material, n=format(int(key.public.n) + 2, "x"))
    from cipherface.crypto.keyfile import KeyFile, save_key_file

    save_key_file(tmp_path / "a.key", KeyFile(**{**kf.__dict__, "material": bad_n}))
    with pytest.raises(KeyFileError, match="key id"):
        phe.load_key(tmp_path / "a.key")
    small = gmpy2.next_prime(mpz(secrets.randbits(512)) | (mpz(1) << 511)) * gmpy2.next_prime(
        mpz(secrets.randbits(512)) | (mpz(1) << 511)
    )
    params = dict(kf.params, bits=int(small).bit_length())
    save_key_file(
        tmp_path / "b.key",
        KeyFile(**{**kf.__dict__, "params": params, "material": {"n": format(int(small), "x")}}),
    )
    with pytest.raises(InsecureParametersError):
        phe.load_key(tmp_path / "b.key")
    save_key_file(
        tmp_path / "c.key", KeyFile(**{**kf.__dict__, "material": {"n": "__import__('os')"}})
    )
    with pytest.raises(KeyFileError, match="hex"):
        phe.load_key(tmp_path / "c.key")
    with pytest.raises(KeyMismatchError):
        phe.public_key_from_bytes(b"not a key")


# ------------------------------------------------------------------ packed scoring
@pytest.mark.parametrize("dim", [128, 512, 4096])
def test_scores_match_numpy(tmp_path: Path, dim: int) -> None:
    rng = np.random.default_rng(dim)
    key = key_for(phe.PAILLIER, dim)
    edge = phe_gallery.PheEdgeCipher(key=key)
    k = edge.packing.slots
    x = np.vstack([hard_rows(dim), unit_rows(rng, k - 4, dim)])  # one full block
    gal = phe_gallery.PheGallery(path=tmp_path, public=key.public, workers=0)
    gal.enroll([f"t{i}" for i in range(k)], edge.encrypt_templates(x))
    worst = 0.0
    for q in (unit_rows(rng, 1, dim)[0], hard_rows(dim)[1], x[5] * 0.9 + 0.1 * x[6]):
        res, count = gal.identify(edge.encrypt_probe(q, op="identify"))
        got = edge.decrypt_scores(res, op="identify", count=count)
        ids = gal.ids()
        ref = x @ (q / np.linalg.norm(q))
        for i, s in zip(ids, got):
            assert i is not None
            worst = max(worst, abs(s - ref[int(i[1:])]))
    assert worst <= TOL
    gal.close()


@pytest.mark.parametrize("scheme", phe.SCHEMES)
def test_gallery_multi_block_identify_delete_reload(tmp_path: Path, scheme: str) -> None:
    rng = np.random.default_rng(7)
    key = key_for(scheme)
    edge = phe_gallery.PheEdgeCipher(key=key)
    assert isinstance(edge, EdgeCipher)
    pub = phe.public_key_from_bytes(edge.public_key_bytes())
    k = edge.packing.slots
    n = 2 * k + 3 if k < 40 else k + 3  # several blocks, a partial one
    x = unit_rows(rng, n, 128)
    names = [f"p{i}" for i in range(n)]
    gal = phe_gallery.PheGallery(path=tmp_path, public=pub, workers=0)
    assert isinstance(gal, Gallery)
    gal.enroll(names[:-2], edge.encrypt_templates(x[:-2]))
    for i in (n - 2, n - 1):  # single enrollments land in free slots
        gal.enroll([names[i]], edge.encrypt_templates(x[i]))
    assert gal.count == n
    q = x[n - 1] + 0.05 * rng.standard_normal(128)
    q /= np.linalg.norm(q)

    def scores(g: phe_gallery.PheGallery) -> dict[str, float]:
        res, count = g.identify(edge.encrypt_probe(q, op="identify"))
        assert count == len(g.ids()) and count % k == 0 and count >= n
        got = edge.decrypt_scores(res, op="identify", count=count)
        ids = g.ids()
        assert all(math.isnan(s) for i, s in zip(ids, got) if i is None)  # free: masked
        return {i: float(s) for i, s in zip(ids, got) if i is not None}

    ref = dict(zip(names, x @ q))
    got = scores(gal)
    assert set(got) == set(names)
    assert max(abs(got[i] - ref[i]) for i in names) <= TOL
    assert max(got, key=got.__getitem__) == max(ref, key=ref.__getitem__) == names[-1]

    assert gal.delete([names[-1], "nobody"]) == 1
    got = scores(gal)
    assert names[-1] not in got and names[-1] not in gal.ids()
    del ref[names[-1]]
    assert max(abs(got[i] - ref[i]) for i in ref) <= TOL
    version = gal.ids_version
    gal.close()

    again = phe_gallery.PheGallery(path=tmp_path, public=pub, workers=0)
    assert again.ids() == gal.ids() and again.ids_version == version
    assert again.count == n - 1
    got2 = scores(again)
    assert set(got2) == set(got) and max(abs(got2[i] - got[i]) for i in got) <= 2 * TOL
    # re-enrolling an id replaces it (old slot dies, new template scores)
    again.enroll([names[0]], edge.encrypt_templates(q))
    assert abs(scores(again)[names[0]] - 1.0) <= TOL
    again.close()


def test_verify_reveals_only_one_score(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    key = key_for(phe.PAILLIER)
    edge = phe_gallery.PheEdgeCipher(key=key)
    k = edge.packing.slots
    x = unit_rows(rng, k, 128)
    gal = phe_gallery.PheGallery(path=tmp_path, public=key.public, workers=0)
    gal.enroll([f"v{i}" for i in range(k)], edge.encrypt_templates(x))
    q = unit_rows(rng, 1, 128)[0]
    probe = edge.encrypt_probe(q, op="verify")
    raws = []
    for _ in range(2):
        res = gal.verify("v4", probe)
        assert abs(edge.decrypt_scores(res, op="verify", count=1)[0] - x[4] @ q) <= TOL
        obj = msgpack.unpackb(res)
        t = obj["slot"]
        slots = edge.packing.unpack(int(key.decrypt(mpz.from_bytes(obj["cts"], "big"))))
        assert not math.isnan(edge.packing.decode(slots[t]))
        others = [edge.packing.decode(v) for s, v in enumerate(slots) if s != t]
        assert all(math.isnan(v) for v in others), "another identity's score is readable"
        raws.append([v for s, v in enumerate(slots) if s != t])
    assert all(a != b for a, b in zip(*raws))  # fresh masks every time
    with pytest.raises(UnknownIdentityError):
        gal.verify("nobody", probe)
    gal.close()


def test_identify_with_worker_processes(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    key = key_for(phe.OKAMOTO_UCHIYAMA)  # 8 slots: 16 blocks are cheap to enrol
    edge = phe_gallery.PheEdgeCipher(key=key)
    k = edge.packing.slots
    n = 16 * k
    x = unit_rows(rng, n, 128)
    gal = phe_gallery.PheGallery(path=tmp_path, public=key.public, workers=2)
    gal.enroll([f"w{i}" for i in range(n)], edge.encrypt_templates(x))
    q = unit_rows(rng, 1, 128)[0]
    res, count = gal.identify(edge.encrypt_probe(q, op="identify"))
    assert gal._pool is not None  # the blocks went to the processes
    got = edge.decrypt_scores(res, op="identify", count=count)
    ref = x @ q
    assert max(abs(got[int(i[1:])] - ref[int(i[1:])]) for i in gal.ids() if i) <= TOL
    gal.close()


# -------------------------------------------------------------- rejected messages
def test_results_and_payloads_are_validated(
    tmp_path: Path, edge_and_pub: tuple[phe_gallery.PheEdgeCipher, phe.PhePublicKey]
) -> None:
    edge, pub = edge_and_pub
    rng = np.random.default_rng(5)
    x = unit_rows(rng, 3, 128)
    gal = phe_gallery.PheGallery(path=tmp_path, public=pub, workers=0)
    payload = edge.encrypt_templates(x)
    with pytest.raises(InvalidArgumentError):
        gal.enroll(["a", "b"], payload)  # count mismatch
    gal.enroll(["a", "b", "c"], payload)
    probe = edge.encrypt_probe(x[0], op="verify")
    res = gal.verify("a", probe)

    other = phe_gallery.PheEdgeCipher(key=key_for(phe.DAMGARD_JURIK))
    with pytest.raises(ResultRejectedError, match=r"scheme|key"):
        other.decrypt_scores(res, op="verify", count=1)
    with pytest.raises(KeyMismatchError):
        gal.enroll(["z"], other.encrypt_templates(x[0]))
    with pytest.raises(ResultRejectedError, match="asked"):
        edge.decrypt_scores(res, op="identify", count=1)
    ires, icount = gal.identify(edge.encrypt_probe(x[0], op="identify"))
    with pytest.raises(ResultRejectedError, match="expected"):
        edge.decrypt_scores(ires, op="identify", count=icount + 1)
    with pytest.raises(ResultRejectedError):
        edge.decrypt_scores(b"\x00garbage", op="verify", count=1)
    with pytest.raises(DecodeError):
        gal.verify("a", edge.encrypt_probe(x[0], op="identify"))  # op mismatch
    with pytest.raises(DecodeError):
        gal.enroll(["q"], payload[:-7])

    # a tampered result: flipped ciphertext byte -> rejected, never a wrong score
    obj = msgpack.unpackb(res)
    cts = bytearray(obj["cts"])
    cts[100] ^= 0x40
    obj["cts"] = bytes(cts)
    with pytest.raises(ResultRejectedError):
        edge.decrypt_scores(msgpack.packb(obj), op="verify", count=1)
    # a cloud replying with a raw encryption of the template-sized value is refused
    obj["cts"] = pub.encrypt(1 << (edge.packing.slots * edge.packing.slot_bits)).to_bytes(
        pub.ct_bytes, "big"
    )
    with pytest.raises(ResultRejectedError, match="outside"):
        edge.decrypt_scores(msgpack.packb(obj), op="verify", count=1)

    # a probe that is not a rounded unit vector is refused by the cloud
    pobj = msgpack.unpackb(probe)
    pobj["probe"] = (np.full(128, 1 << 16, dtype=">i4")).tobytes()
    with pytest.raises(DecodeError, match="unit vector"):
        gal.verify("a", msgpack.packb(pobj))
    # a ciphertext that is not a unit mod n^2 is refused at enrollment
    tobj = msgpack.unpackb(payload)
    raw = bytearray(tobj["chunks"][0][1])
    raw[: pub.ct_bytes] = bytes(pub.ct_bytes)
    tobj["chunks"][0][1] = bytes(raw)
    with pytest.raises(DecodeError, match="ciphertext"):
        gal.enroll(["a", "b", "c"], msgpack.packb(tobj))
    with pytest.raises(InvalidArgumentError):
        edge.encrypt_templates(np.zeros((1, 128)))
    with pytest.raises(InvalidArgumentError):
        edge.encrypt_probe(np.ones(64), op="verify")
    gal.close()


# ----------------------------------------------------------- the 0.0.2 README flow
@pytest.mark.parametrize("algorithm", list(phe.ALGORITHM_NAMES))
def test_cipherface_lite_readme_flow(tmp_path: Path, algorithm: str) -> None:
    """On-prem encrypts, the cloud compares with a plain target (public key only),
    on-prem restores and verifies; keys pass through files."""
    rng = np.random.default_rng(1)
    source = unit_rows(rng, 1, 128)[0]
    same = source + 0.02 * rng.standard_normal(128)  # cosine ~0.98 > 1 - 0.07
    other = unit_rows(rng, 1, 128)[0]

    onprem = CipherFaceLite(model_name="Dlib", algorithm_name=algorithm, security_level=112)
    onprem.export_private_key(tmp_path / "private.txt")
    onprem.export_public_key(tmp_path / "public.txt")
    source_encrypted = onprem.encrypt(source.tolist())
    assert isinstance(source_encrypted, str)
    msg = msgpack.unpackb(base64.b64decode(source_encrypted))  # msgpack, not pickle
    assert msg["kind"] == "embedding"

    cloud = CipherFaceLite(
        model_name="Dlib", algorithm_name=algorithm, cryptosystem=tmp_path / "public.txt"
    )
    enc_same = cloud.encrypted_compare(source_encrypted, same.tolist())
    enc_other = cloud.encrypted_compare(source_encrypted, other)
    with pytest.raises(PublicKeyOnlyError):
        cloud.restore(enc_same)
    with pytest.raises(PublicKeyOnlyError):
        cloud.export_private_key(tmp_path / "x.txt")

    onprem2 = CipherFaceLite(
        model_name="Dlib", algorithm_name=algorithm, cryptosystem=tmp_path / "private.txt"
    )
    sim_same = onprem2.restore(enc_same)
    sim_other = onprem2.restore(enc_other)
    unit = same / np.linalg.norm(same)
    assert abs(sim_same - float(source @ unit)) <= TOL
    assert abs(sim_other - float(source @ other)) <= TOL
    assert onprem2.verify(sim_same) is True
    assert onprem2.verify(sim_other) is False
    if algorithm != "Damgard-Jurik":  # textbook DJ encryption is 75 ms a feature: skip
        # the cloud can also encrypt (public key, textbook path) and the edge reads it
        back = onprem2.restore(cloud.encrypted_compare(cloud.encrypt(other), other))
        assert abs(back - 1) <= TOL

    with pytest.raises(KeyFileError):
        CipherFaceLite(model_name="Facenet512", cryptosystem=tmp_path / "private.txt")
    wrong = CipherFaceLite(
        model_name="Dlib",
        algorithm_name=algorithm,
        cryptosystem=tmp_path / "private.txt",
    )
    assert wrong.public_key.key_id == onprem.public_key.key_id
    with pytest.raises(KeyMismatchError):
        CipherFaceLite(algorithm_name=algorithm, security_level=112).encrypted_compare(
            source_encrypted, same
        )


def test_empty_gallery_and_dropped_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    key = key_for(phe.OKAMOTO_UCHIYAMA)
    edge = phe_gallery.PheEdgeCipher(key=key)
    k = edge.packing.slots
    gal = phe_gallery.PheGallery(path=tmp_path, public=key.public, workers=0)
    q = unit_rows(rng, 1, 128)[0]
    res, count = gal.identify(edge.encrypt_probe(q, op="identify"))
    assert count == 0 and gal.ids() == []
    assert edge.decrypt_scores(res, op="identify", count=0).shape == (0,)

    x = unit_rows(rng, 3 * k, 128)
    names = [f"d{i}" for i in range(3 * k)]
    gal.enroll(names, edge.encrypt_templates(x))
    assert len(gal.store.blocks) == 3
    assert gal.delete(names[k : 2 * k]) == k  # the middle block empties: dropped
    assert len(gal.store.blocks) == 2
    res, count = gal.identify(edge.encrypt_probe(q, op="identify"))
    got = edge.decrypt_scores(res, op="identify", count=count)
    assert count == 3 * k and np.isnan(got[k : 2 * k]).all()
    ref = x @ q
    live = [i for i in range(3 * k) if not k <= i < 2 * k]
    assert np.abs(got[live] - ref[live]).max() <= TOL
    gal.enroll(["new"], edge.encrypt_templates(q))  # reuses the dropped block's place
    assert gal.ids().index("new") // k == 1
    gal.close()


# ------------------------------------------------------- hostile peers (review fixes)
def _peak_bytes(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """Peak Python-heap growth while ``fn`` runs (and what it raised)."""
    err: BaseException | None = None
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            fn()
        except Exception as exc:
            err = exc
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, err


def _map_bomb(depth: int) -> dict[str, Any]:
    """Maps of 16 maps, ``depth`` levels (16^depth leaves): ~3 bytes a map on the wire."""
    node: dict[str, Any] = {}
    for _ in range(depth):
        node = {f"{i:x}": node for i in range(16)}
    return node


def test_decoding_bombs_are_refused_without_large_allocations(
    tmp_path: Path, edge_and_pub: tuple[phe_gallery.PheEdgeCipher, phe.PhePublicKey]
) -> None:
    """1 MB of empty maps cost ~76 MB of dicts before the limits (70x)."""
    edge, pub = edge_and_pub
    gal = phe_gallery.PheGallery(path=tmp_path, public=pub, workers=0)
    empties = [{}] * (1 << 20)
    probe = msgpack.unpackb(edge.encrypt_probe(np.eye(128)[0], op="identify"))
    templates = msgpack.unpackb(edge.encrypt_templates(np.eye(128)[:2]))
    scores, _ = gal.identify(edge.encrypt_probe(np.eye(128)[0], op="identify"))
    bombs: list[tuple[str, Callable[[bytes], object], bytes]] = [
        ("probe+array", gal.identify, msgpack.packb({**probe, "x": empties})),
        ("probe+maps", gal.identify, msgpack.packb({**probe, "x": _map_bomb(5)})),
        (
            "templates+slots",
            lambda b: gal.enroll(["a", "b"], b),
            msgpack.packb({**templates, "chunks": [[empties, b""]]}),
        ),
        (
            "templates+chunks",
            lambda b: gal.enroll(["a", "b"], b),
            msgpack.packb({**templates, "chunks": [[[0], b""]] * (1 << 18)}),
        ),
        (
            "scores+maps",
            lambda b: edge.decrypt_scores(b, op="identify", count=0),
            msgpack.packb({**msgpack.unpackb(scores), "x": _map_bomb(5)}),
        ),
    ]
    for name, call, data in bombs:
        assert len(data) > 500_000, name
        peak, err = _peak_bytes(functools.partial(call, data))
        assert peak < 8 * len(data), f"{name}: {peak / 1e6:.1f} MB for {len(data) / 1e6:.1f} MB"
        assert isinstance(err, RemoteError), (name, err)
    # a declared 16M-element array with no elements behind it
    header = msgpack.packb({**probe, "x": None})[:-1] + b"\xdd" + (1 << 24).to_bytes(4, "big")
    peak, err = _peak_bytes(lambda: gal.identify(header))
    assert isinstance(err, RemoteError) and peak < 1 << 20
    gal.close()


def test_public_key_bombs_are_refused(
    edge_and_pub: tuple[phe_gallery.PheEdgeCipher, phe.PhePublicKey],
) -> None:
    from cipherface.crypto.keyfile import MAGIC

    _, pub = edge_and_pub
    body = msgpack.unpackb(pub.to_bytes()[len(MAGIC) :])
    for extra in ([{}] * 60_000, _map_bomb(3)):
        data = MAGIC + msgpack.packb({**body, "material": {**body["material"], "x": extra}})
        assert 10_000 < len(data) < 64_000
        peak, err = _peak_bytes(functools.partial(phe.public_key_from_bytes, data))
        assert peak < 4 * len(data), f"{peak} bytes for a {len(data)}-byte key"
        assert isinstance(err, KeyMismatchError), err
    big = MAGIC + msgpack.packb({**body, "x": [{}] * (1 << 20)})
    peak, err = _peak_bytes(lambda: phe.public_key_from_bytes(big))
    assert isinstance(err, RemoteError) and peak < 4 * len(big)


def _fake_public(scheme: str, bits: int, s: int = 1) -> bytes:
    """Public key bytes with a consistent key id for any size (n random, odd, exact size)."""
    n = mpz(secrets.randbits(bits)) | (mpz(1) << (bits - 1)) | 1
    return phe.PhePublicKey(scheme=scheme, n=n, bits=bits, s=s, dim=128, precision=17).to_bytes()


def test_received_key_sizes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's key sizes the cloud's tables: only the four levels, DJ s <= 4, s*bits capped."""
    built: list[int] = []
    real_init = phe.FixedBase.__init__

    def spy(self: phe.FixedBase, *a: Any, **k: Any) -> None:
        built.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(phe.FixedBase, "__init__", spy)
    for scheme, bits, s in [
        (phe.DAMGARD_JURIK, 16384, 8),
        (phe.PAILLIER, 16384, 1),
        (phe.PAILLIER, 4096, 1),
        (phe.DAMGARD_JURIK, 2048, 5),
        (phe.DAMGARD_JURIK, 7680, 3),
        (phe.DAMGARD_JURIK, 15360, 2),
    ]:
        with pytest.raises(KeyMismatchError, match=r"key size| s|max_str_len"):
            phe_gallery.public_from_bytes(_fake_public(scheme, bits, s))
    assert built == []
    with pytest.raises(InvalidArgumentError):
        phe.generate_private_key(phe.PAILLIER, bits=4096, dim=128)
    with pytest.raises(InvalidArgumentError):
        phe.generate_private_key(phe.DAMGARD_JURIK, bits=2048, s=5, dim=128)
    # the largest accepted parameters still parse
    assert phe.public_key_from_bytes(_fake_public(phe.DAMGARD_JURIK, 7680, 2)).s == 2
    assert phe.public_key_from_bytes(_fake_public(phe.PAILLIER, 15360)).bits == 15360


def test_rerandomizer_tables_fit_the_memory_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables narrow their window to fit TABLE_BYTES; zeros stay valid encryptions of 0."""
    key = key_for(phe.PAILLIER)
    wide = phe.Rerandomizer(key.public, table=True)
    assert wide._table is not None and wide._table.window == 8
    monkeypatch.setattr(phe, "TABLE_BYTES", 1 << 20)
    rr = phe.Rerandomizer(key.public, table=True)
    assert rr._table is not None and rr._table.window < 8
    assert rr._table.nbytes() <= 1 << 20 < wide._table.nbytes()
    zs = [rr.zero() for _ in range(4)]
    assert len(set(zs)) == 4 and key.decrypt_many(zs) == [0] * 4
    assert key.decrypt(key.encrypt(7) * zs[0] % key.public.modulus) == 7
    monkeypatch.undo()
    # a real 7680-bit worker scorer: 240 MB of table with byte windows, now under the cap
    pub = phe.public_key_from_bytes(_fake_public(phe.PAILLIER, 7680))
    scorer = phe_gallery._Scorer(pub, table=True)
    table = scorer.rr._table
    assert table is not None
    held = sum(sys.getsizeof(v) for row in table.rows for v in row)
    assert held <= 64 << 20, f"{held / 2**20:.0f} MiB of table"
    x = mpz(secrets.randbits(3840))
    assert table.pow(x) == gmpy2.powmod(table.rows[0][1], x, pub.modulus)


def test_short_received_key_is_a_key_mismatch(tmp_path: Path) -> None:
    """A peer's 1024-bit key is the peer's fault (RemoteError), not a local misuse."""
    data = _fake_public(phe.PAILLIER, 1024)
    with pytest.raises(KeyMismatchError, match="2048") as info:
        phe.public_key_from_bytes(data)
    assert not isinstance(info.value, InsecureParametersError)
    (tmp_path / "short.key").write_bytes(data)  # the same file on disk is a local error
    with pytest.raises(InsecureParametersError):
        phe.load_key(tmp_path / "short.key")


def test_broken_worker_pool_is_replaced(tmp_path: Path) -> None:
    """A worker killed (e.g. by the OOM killer) breaks the pool: the next identify replaces
    it and succeeds."""
    rng = np.random.default_rng(13)
    key = key_for(phe.OKAMOTO_UCHIYAMA)
    edge = phe_gallery.PheEdgeCipher(key=key)
    n = 16 * edge.packing.slots
    x = unit_rows(rng, n, 128)
    gal = phe_gallery.PheGallery(path=tmp_path, public=key.public, workers=2)
    gal.enroll([f"k{i}" for i in range(n)], edge.encrypt_templates(x))
    q = unit_rows(rng, 1, 128)[0]
    gal.identify(edge.encrypt_probe(q, op="identify"))
    pool = gal._pool
    assert pool is not None
    os.kill(next(iter(pool._processes)), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not pool._broken and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool._broken  # the executor noticed: without the fix, every identify now fails
    res, count = gal.identify(edge.encrypt_probe(q, op="identify"))
    assert gal._pool is not None and gal._pool is not pool
    got = edge.decrypt_scores(res, op="identify", count=count)
    ref = x @ q
    assert max(abs(got[int(i[1:])] - ref[int(i[1:])]) for i in gal.ids() if i) <= TOL
    gal.close()


def test_rwlock_waiting_writer_blocks_new_readers() -> None:
    """Steady reads (identify) cannot starve a writer (enroll/delete)."""
    lock = phe_gallery._RWLock()
    order: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def first_reader() -> None:
        with lock.read():
            inside.set()
            release.wait(10)
            order.append("r1")

    def writer() -> None:
        with lock.write():
            order.append("w")

    def late_reader() -> None:
        with lock.read():
            order.append("r2")

    def until(cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.005)

    threads = [threading.Thread(target=f, daemon=True) for f in (first_reader, writer)]
    threads[0].start()
    assert inside.wait(10)
    with lock.read():  # no writer waiting yet: readers share the lock
        pass
    threads[1].start()
    until(lambda: getattr(lock, "_writers_waiting", 1) == 1)
    threads.append(threading.Thread(target=late_reader, daemon=True))
    threads[2].start()
    time.sleep(0.2)
    assert order == []  # the late reader queues behind the waiting writer
    release.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert order == ["r1", "w", "r2"]


def test_edge_client_precomputes_paillier_randomness(tmp_path: Path) -> None:
    """The edge agent fills the zero-encryption pool in idle time, bounded to 2 * dim."""
    import time as _time

    from cipherface.agents.edge import EdgeClient
    from cipherface.agents.mqtt import BrokerConfig
    from cipherface.crypto import sites

    sites.generate_key_dir(tmp_path / "k", scheme="paillier", dim=128, security_level=112)
    cipher = sites.load_edge_cipher(tmp_path / "k")
    edge = EdgeClient(
        broker=BrokerConfig(url="mqtt://127.0.0.1:1"), cipher=cipher, site="s1", gateway="g1"
    )
    for _ in range(3):  # repeated triggers do not grow the pool past its bound
        edge._prepare_randomness()
        deadline = _time.monotonic() + 20
        while edge._precomputing.is_set() and _time.monotonic() < deadline:
            _time.sleep(0.05)
    assert cipher.precompute(0) == 2 * 128  # type: ignore[attr-defined]
    cipher.encrypt_templates(np.ones((1, 128)))
    # The enrollment drew its randomness from the pool (one multiplication each).
    assert cipher.precompute(0) < 2 * 128  # type: ignore[attr-defined]
