"""SEAL beneath the CKKS engine: bit-exactness, interop, re-randomisation, smudging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import numpy as np
import pytest
import tenseal.sealapi as sealapi
from vectors import unit

from cipherface import CipherFace
from cipherface.crypto import ckks, seal
from cipherface.crypto.ckks import CkksEdgeCipher, CkksKeys
from cipherface.crypto.ckks_gallery import CkksGallery, mac

TOL = 1e-4


def _parse(pub: ckks.CkksPublic, ct: object, size: int, level: tuple[int, ...]) -> np.ndarray:
    k = 2 if level == pub.data_level else 1
    q = ckks.ring_of(pub.params).q[:k]
    data = seal.save_bytes(ct)
    return seal.parse_ciphertext(
        data, what="test", parms_id=level, size=size, n=pub.params.n, q=q
    ).data


# -------------------------------------------------------------- bit-exactness
@pytest.mark.parametrize("level", [128, 192, 256])
def test_kernel_is_bit_exact_with_seal_evaluator(level: int) -> None:
    """numba multiply-accumulate + our add_plain/rescale == SEAL's Evaluator, bit for bit."""
    keys = CkksKeys.generate(dim=128, security_level=level)
    pub, p = keys.public, keys.public.params
    ctx = seal.context_for(p)
    ev = sealapi.Evaluator(ctx)
    enc, _ = keys.require_secret()
    ring = ckks.ring_of(p)
    rng = np.random.default_rng(level)
    d = 6
    cts_g, cts_p = [], []
    for _ in range(d):
        for dest in (cts_g, cts_p):
            m = rng.integers(-(2**29), 2**29, size=p.n)
            pt = seal.load_into(
                sealapi.Plaintext(),
                seal.plaintext_bytes(
                    ring.ntt(ring.to_rns(m)), parms_id=pub.data_level, scale=p.delta
                ),
                ctx,
            )
            ct = sealapi.Ciphertext()
            enc.encrypt_symmetric(pt, ct)
            dest.append(ct)
    # SEAL: multiply (no relinearisation), add, add_plain, rescale_to_next.
    acc = None
    for a, b in zip(cts_g, cts_p, strict=True):
        prod = sealapi.Ciphertext()
        ev.multiply(a, b, prod)
        if acc is None:
            acc = prod
        else:
            ev.add_inplace(acc, prod)
    assert acc is not None and acc.size() == 3
    small = rng.random(p.n) < 0.5
    f0, f1 = ckks.flood(p, small)
    f_coeff = np.stack([f0, f1])
    flood_pt = seal.load_into(
        sealapi.Plaintext(),
        seal.plaintext_bytes(
            np.stack([ring.ntt(f_coeff[:1])[0], ring.ntt(f_coeff[1:], first=1)[0]]),
            parms_id=pub.data_level,
            scale=acc.scale,
        ),
        ctx,
    )
    ev.add_plain_inplace(acc, flood_pt)
    ev.rescale_to_next_inplace(acc)
    want = _parse(pub, acc, 3, pub.result_level)
    # Ours, on the same SEAL data.
    g = np.stack([_parse(pub, c, 2, pub.data_level) for c in cts_g]).astype(np.uint32)
    pr = np.stack([_parse(pub, c, 2, pub.data_level) for c in cts_p]).astype(np.uint32)
    got = ring.rescale_ntt(mac(g, pr, ring.q), (f0, f1))
    np.testing.assert_array_equal(got, want)
    assert acc.scale == p.result_scale
    # The 1:1 product path too (one pair, no flood).
    prod = sealapi.Ciphertext()
    ev.multiply(cts_g[0], cts_p[0], prod)
    np.testing.assert_array_equal(
        ckks.product(ring, g[0].astype(np.uint64), pr[0].astype(np.uint64)),
        _parse(pub, prod, 3, pub.data_level),
    )
    # A verify's fused multiply + flood + rescale, against SEAL on that pair.
    ev.add_plain_inplace(prod, flood_pt)
    ev.rescale_to_next_inplace(prod)
    x, y = g[0].astype(np.uint64), pr[0].astype(np.uint64)
    np.testing.assert_array_equal(
        ring.mul_rescale_ntt(x, y, (f0, f1)), _parse(pub, prod, 3, pub.result_level)
    )
    # Worst-case residues (all q - 1) in the fused kernel, against the numpy steps.
    top = np.broadcast_to(ring.qcol - 1, (2, 2, p.n)).astype(np.uint64)
    np.testing.assert_array_equal(
        ring.mul_rescale_ntt(top, top, (f0, f1)),
        ring.rescale_ntt(ckks.product(ring, top, top), (f0, f1)),
    )
    # SEAL loads what we write and decrypts it to the same message.
    mine = seal.ciphertext_bytes(got, parms_id=pub.result_level, scale=p.result_scale)
    edge = CkksEdgeCipher(keys=keys)
    theirs = seal.save_bytes(acc)
    np.testing.assert_array_equal(edge._decrypt_coeffs(mine), edge._decrypt_coeffs(theirs))


@pytest.mark.parametrize("level", [128, 192, 256])
def test_kernel_worst_case_residues_do_not_overflow(level: int) -> None:
    """The kernel reduces lazily (folds, one ``%`` at the end): residues all ``q - 1``
    (largest products) and random ones give the exact sums, against Python integers."""
    p = seal.preset(level)
    ring = ckks.ring_of(p)
    d, n = 128, p.n
    rng = np.random.default_rng(level)
    for fill in ("max", "random"):
        if fill == "max":
            g = np.broadcast_to((ring.q - 1)[None, None, :, None], (d, 2, 2, n)).astype(np.uint32)
        else:
            g = (rng.integers(0, 1 << 62, (d, 2, 2, n), dtype=np.uint64) % ring.qcol).astype(
                np.uint32
            )
        pr = g[::-1].copy()
        got = mac(g, pr, ring.q)
        cols = rng.choice(n, 8, replace=False)
        for r in range(2):
            q = int(ring.q[r])
            for s in cols:
                a = [[int(x) for x in g[j, :, r, s]] for j in range(d)]
                b = [[int(x) for x in pr[j, :, r, s]] for j in range(d)]
                want = [
                    sum(x[0] * y[0] for x, y in zip(a, b)) % q,
                    sum(x[0] * y[1] + x[1] * y[0] for x, y in zip(a, b)) % q,
                    sum(x[1] * y[1] for x, y in zip(a, b)) % q,
                ]
                assert [int(got[c, r, s]) for c in range(3)] == want


def test_zero_pool_hands_each_encryption_out_once_and_waits_for_requests() -> None:
    """Pooled encryptions of zero are fresh SEAL ciphertexts, never handed out twice,
    and the filler makes none while a request holds the pool busy."""
    import time

    pub = CkksKeys.generate(dim=128).public
    pool = ckks.ZeroPool(pub.encrypt_zero_ct, size=6)
    try:
        with pool.busy():
            first = pool.take()  # starts the filler, which must wait for the request
            time.sleep(0.5)
            assert len(pool._items) == 0
        deadline = time.monotonic() + 30
        while len(pool._items) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pool._items) == 6
        got = [first] + [pool.take() for _ in range(10)]  # 6 pooled, the rest on the spot
        assert len({id(z) for z in got}) == len(got)
        c1 = {pub.residues(z, "zero")[1].tobytes() for z in got}
        assert len(c1) == len(got)  # fresh randomness each time
        assert all(z.scale == pub.params.delta for z in got)
    finally:
        pool.stop()


# ------------------------------------------------------------------- interop
PLAIN_SEAL_CLIENT = textwrap.dedent(
    '''
    """A SEAL client that knows only docs/seal-interop.md: tenseal.sealapi, msgpack, numpy."""
    import base64, json, os, sys
    import msgpack, numpy as np
    import tenseal.sealapi as s

    vec = msgpack.unpackb(open(sys.argv[1], "rb").read())
    fd = os.memfd_create("client")
    path = f"/proc/self/fd/{fd}"
    def load(obj, data, ctx=None):
        os.ftruncate(fd, 0); os.pwrite(fd, data, 0)
        obj.load(path) if ctx is None else obj.load(ctx, path)
        return obj
    key = vec["private_key"]
    assert key[:7] == b"CFKEY1\\n"
    kf = msgpack.unpackb(key[7:])
    assert kf["params"]["format"] == "cf-ckks/2"
    parms = load(s.EncryptionParameters(s.SCHEME_TYPE.CKKS), kf["material"]["seal_params"])
    ctx = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
    sk = load(s.SecretKey(), kf["material"]["secret_key"], ctx)
    pk = load(s.PublicKey(), kf["material"]["public_key"], ctx)
    dec, ev, ecd = s.Decryptor(ctx, sk), s.Evaluator(ctx), s.CKKSEncoder(ctx)
    def decode(ct):
        pt = s.Plaintext(); dec.decrypt(ct, pt)
        return np.array(ecd.decode_double(pt))
    out = {}
    # An identify probe: d constant ciphertexts; every slot decodes to the feature.
    probe = msgpack.unpackb(vec["probe_identify"])
    cts = [load(s.Ciphertext(), c, ctx) for c in probe["cts"]]
    out["features"] = [float(decode(c).mean()) for c in cts]
    # Evaluate: feature0 * feature1 + feature2 * feature2 (no relinearisation), rescale.
    a, b = s.Ciphertext(), s.Ciphertext()
    ev.multiply(cts[0], cts[1], a); ev.multiply(cts[2], cts[2], b); ev.add_inplace(a, b)
    ev.rescale_to_next_inplace(a)
    out["evaluated"] = float(decode(a).mean())
    # A cloud result (compat comparison): coefficient 0 is the similarity; the mean of
    # the real parts of the slots of a real polynomial is its coefficient 0.
    res = msgpack.unpackb(vec["result"])
    ct = load(s.Ciphertext(), res["ct"], ctx)
    assert ct.size() == 3
    out["similarity"] = float(decode(ct).mean())
    # Encrypt with the public key: our engine must decrypt it (checked by the test).
    z = s.Ciphertext(); s.Encryptor(ctx, pk).encrypt_zero(z)
    z.save(path); out["zero"] = base64.b64encode(os.pread(fd, os.fstat(fd).st_size, 0)).decode()
    print(json.dumps(out))
    '''
)


def make_vector(path: Path) -> dict[str, object]:
    """A test vector: a private key file, an identify probe, a compat comparison result."""
    rng = np.random.default_rng(2026)
    x, y = unit(rng, 2, 128)
    cf = CipherFace(distance_metric="cosine")
    cf.export_private_key(path.parent / "vector.key")
    probe = msgpack.unpackb(CkksEdgeCipher(keys=cf.keys).encrypt_probe(x, op="identify"))
    probe["cts"] = probe["cts"][:4]  # keep the vector small: four features are plenty
    import base64

    result = base64.b64decode(cf.encrypted_compare(cf.encrypt(x), cf.encrypt(y)))
    vec = {
        "private_key": (path.parent / "vector.key").read_bytes(),
        "probe_identify": msgpack.packb(probe, use_bin_type=True),
        "result": result,
        "x": x.tolist(),
        "similarity": float(x @ y),
    }
    path.write_bytes(msgpack.packb(vec, use_bin_type=True))
    return vec


def test_plain_seal_program_reads_our_keys_and_ciphertexts(tmp_path: Path) -> None:
    vec = make_vector(tmp_path / "vector.msgpack")
    script = tmp_path / "client.py"
    script.write_text(PLAIN_SEAL_CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path / "vector.msgpack")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout)
    x = np.array(vec["x"])
    assert "cipherface" not in out.stderr
    np.testing.assert_allclose(got["features"], x[:4], atol=1e-6)
    assert abs(got["evaluated"] - (x[0] * x[1] + x[2] * x[2])) <= 1e-5
    assert abs(got["similarity"] - vec["similarity"]) <= TOL
    # And the other way: a ciphertext the plain SEAL client made, decrypted by us.
    import base64

    keys = CkksKeys.load(tmp_path / "vector.key")
    edge = CkksEdgeCipher(keys=keys)
    noise = edge._decrypt_coeffs(
        base64.b64decode(got["zero"]), size=2, level=keys.public.data_level
    )
    assert np.abs(noise).max() < 1 << 20


VECTOR = Path(__file__).parent / "data" / "seal_vector.msgpack"


def test_committed_vector_still_decrypts() -> None:
    """tests/data/seal_vector.msgpack (cf-ckks/2, written once) keeps decrypting."""
    vec = msgpack.unpackb(VECTOR.read_bytes())
    kf = VECTOR.parent / "vector.key"
    kf.write_bytes(vec["private_key"])
    os.chmod(kf, 0o600)
    try:
        keys = CkksKeys.load(kf)
    finally:
        kf.unlink()
    edge = CkksEdgeCipher(keys=keys)
    assert keys.key_id == msgpack.unpackb(vec["result"])["kid"]
    s = edge.decrypt_scores(vec["result"], op="verify", count=1)[0]
    assert abs(s - vec["similarity"]) <= TOL
    obj = msgpack.unpackb(vec["probe_identify"])
    lvl, delta = keys.public.data_level, keys.public.params.delta
    full = [  # seeded: SEAL expands them as it loads (and adds an encryption of zero)
        seal.ciphertext_bytes(keys.public.rerandomise(c, "probe"), parms_id=lvl, scale=delta)
        for c in obj["cts"]
    ]
    feats = [edge._decrypt_coeffs(c, size=2, level=lvl)[0] for c in full]
    np.testing.assert_allclose(np.array(feats) / 2**29, vec["x"][:4], atol=1e-6)


# ------------------------------------------------------------ re-randomisation
def test_crafted_c1_no_longer_returns_the_clouds_template() -> None:
    """The review's attack: alpha = (0, q1) made the cloud return beta itself."""
    import base64

    rng = np.random.default_rng(9)
    cf = CipherFace(distance_metric="cosine")
    pub, p = cf.keys.public, cf.keys.public.params
    ring = ckks.ring_of(p)
    x = unit(rng, 1, 128)[0]
    beta = cf.encrypt(x)  # the "cloud's own" template
    q0, q1 = p.data_primes
    crafted = np.zeros((2, 2, p.n), dtype=np.uint64)
    crafted[1, 0, :] = q1 % q0  # c1 = the constant q1, NTT of a constant is the constant
    crafted_ct = seal.ciphertext_bytes(crafted, parms_id=pub.data_level, scale=p.delta)
    alpha = base64.b64encode(
        msgpack.packb({**ckks.header(pub, "embedding"), "cts": [crafted_ct, crafted_ct]})
    ).decode()
    res = msgpack.unpackb(base64.b64decode(cf.encrypted_compare(alpha, beta)))
    out = seal.parse_ciphertext(
        res["ct"], what="r", parms_id=pub.result_level, size=3, n=p.n, q=ring.q[:1]
    ).data
    # Without re-randomisation out = (0, beta0, beta1): (c1, c2) would decrypt to x.
    edge = CkksEdgeCipher(keys=cf.keys)
    as_ct = seal.ciphertext_bytes(
        np.stack([out[1], out[2]]), parms_id=pub.result_level, scale=p.delta
    )
    m = edge._decrypt_coeffs(as_ct, size=2) / 2**29
    # The template sits in coefficients 0..127 (forward layout); nothing of it comes back.
    corr = abs(float(np.corrcoef(m[:128], x)[0, 1]))
    assert corr < 0.35
    assert np.abs(m[:128] - x).max() > 0.5
    # test_leak_without_rerandomisation_is_real shows the same input leaks without it.


def test_leak_without_rerandomisation_is_real() -> None:
    """Control: with the crafted c1 multiplied directly, (c1, c2) decrypt to the template."""
    import base64

    rng = np.random.default_rng(10)
    cf = CipherFace(distance_metric="cosine")
    pub, p = cf.keys.public, cf.keys.public.params
    ring = ckks.ring_of(p)
    x = unit(rng, 1, 128)[0]
    beta = msgpack.unpackb(base64.b64decode(cf.encrypt(x)))["cts"][0]
    t = pub.rerandomise(beta, "beta")  # a stored template, as the cloud holds it
    q0, q1 = p.data_primes
    crafted = np.zeros((2, 2, p.n), dtype=np.uint64)
    crafted[1, 0, :] = q1 % q0
    prod = ckks.product(ring, t, crafted)
    out = ring.rescale_ntt(prod)
    edge = CkksEdgeCipher(keys=cf.keys)
    as_ct = seal.ciphertext_bytes(
        np.stack([out[1], out[2]]), parms_id=pub.result_level, scale=p.delta
    )
    m = edge._decrypt_coeffs(as_ct, size=2) / 2**29
    assert np.abs(m[:128] - x).max() < 1e-3


def test_every_received_ciphertext_is_rerandomised(tmp_path: Path) -> None:
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    probe = msgpack.unpackb(edge.encrypt_probe(np.ones(128), op="verify"))["ct"]
    a = keys.public.rerandomise(probe, "p")
    b = keys.public.rerandomise(probe, "p")
    assert not np.array_equal(a[1], b[1])  # fresh c1 each time
    # ... and both still decrypt to the probe.
    lvl = keys.public.data_level
    da = edge._decrypt_coeffs(
        seal.ciphertext_bytes(a, parms_id=lvl, scale=keys.public.params.delta), size=2, level=lvl
    )
    db = edge._decrypt_coeffs(
        seal.ciphertext_bytes(b, parms_id=lvl, scale=keys.public.params.delta), size=2, level=lvl
    )
    assert np.abs(da - db).max() < 1 << 8


# ------------------------------------------------------------------ smudging
def test_flooding_dominates_product_noise() -> None:
    """Measure the noise of an honest 128-d block product: the flood's standard deviation
    (2^FLOOD_BITS / sqrt 3) must be >= 4x it, and the flood cost < 2e-5 of a score."""
    rng = np.random.default_rng(4)
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    pub, p = keys.public, keys.public.params
    ring = ckks.ring_of(p)
    g = unit(rng, p.n, 128)
    x = unit(rng, 1, 128)[0]
    col = msgpack.unpackb(edge.encrypt_templates(g))["col"]
    probe = msgpack.unpackb(edge.encrypt_probe(x, op="identify"))["cts"]
    gc = np.stack([pub.rerandomise(c, "g") for c in col]).astype(np.uint32)
    pc = np.stack([pub.rerandomise(c, "p") for c in probe]).astype(np.uint32)
    prod = mac(gc, pc, ring.q)
    # Decrypt the size-3 product at (q0, q1) before rescaling: noise = m - exact.
    ct = seal.ciphertext_bytes(prod, parms_id=pub.data_level, scale=p.delta**2)
    _, dec = keys.require_secret()
    sct = seal.load_into(sealapi.Ciphertext(), ct, seal.context_for(p))
    pt = sealapi.Plaintext()
    dec.decrypt(sct, pt)
    m = seal.parse_plaintext(seal.save_bytes(pt), k=2, n=p.n)
    c = ring.intt(m)
    q0, q1 = p.data_primes
    # CRT to a signed integer (|m| < q0 q1 / 2).
    t = ((c[1].astype(object) - c[0].astype(object)) * pow(q0, -1, q1)) % q1
    full = c[0].astype(object) + q0 * t
    full = np.array([int(v) - q0 * q1 if v > q0 * q1 // 2 else int(v) for v in full], dtype=float)
    exact = np.rint(g * p.delta) @ np.rint(x * p.delta)
    noise_bits = float(np.log2(np.std(full - exact)))
    assert noise_bits + 2 <= ckks.FLOOD_BITS - np.log2(np.sqrt(3)), noise_bits
    assert 2.0 ** (ckks.FLOOD_BITS - 2 * p.delta_bits) < 2e-5


def test_verify_result_erases_everything_but_live_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    gal = CkksGallery(path=tmp_path, public=keys.public)
    g = unit(rng, 40, 128)
    ids = [f"p{i}" for i in range(40)]
    gal.enroll(ids, edge.encrypt_templates(g))
    gal.delete(["p3"])
    x = g[5]
    res = gal.verify("p5", edge.encrypt_probe(x, op="verify"))
    assert len(res) <= 64 * 1024
    scores, pos = edge.decrypt_pack_scores(res)
    assert pos == 5 and scores.shape == (32,)
    live = [i for i in range(32) if i != 3]
    np.testing.assert_allclose(scores[live], g[live] @ x, atol=TOL)
    assert abs(scores[3] - g[3] @ x) > 1e-2  # deleted: erased, not its old score
    assert abs(edge.decrypt_scores(res, op="verify", count=1)[0] - 1.0) <= TOL
    # Cross terms between scores are erased too: no coefficient carries a partial dot.
    m, _ = edge._verify_result(res)
    others = np.delete(m, np.arange(0, keys.public.params.n, 128)) / keys.public.params.result_scale
    # Uniform mod q0 spreads over about [-2, 2]; an honest partial dot is within [-1, 1].
    assert np.mean(np.abs(others) > 1.0) > 0.4
    # The second pack (templates 32..39, the rest free) is erased beyond its live slots.
    s2, pos2 = edge.decrypt_pack_scores(gal.verify("p33", edge.encrypt_probe(x, op="verify")))
    assert pos2 == 1
    np.testing.assert_allclose(s2[:8], g[32:40] @ x, atol=TOL)
    assert np.mean(np.abs(s2[8:]) > 1.0) > 0.2
    gal.close()


def test_untrusted_seal_bytes_are_checked_before_seal_sees_them() -> None:
    keys = CkksKeys.generate(dim=128)
    pub = keys.public
    good = msgpack.unpackb(CkksEdgeCipher(keys=keys).encrypt_probe(np.ones(128), op="verify"))
    raw = good["ct"]
    zlib_mode = raw[:5] + bytes([seal.COMPR_ZLIB]) + raw[6:]
    bomb = seal.wrap(bytes(10_000_000))  # compresses to a few hundred bytes
    for bad, why in (
        (zlib_mode, "compression"),
        (raw[:8] + (len(raw) + 1).to_bytes(8, "little") + raw[16:], "header"),
        (b"\xa1\x5e" + raw[2:], "header"),
        (bomb, "larger than expected"),
    ):
        with pytest.raises(seal.DecodeError, match=why):
            pub.rerandomise(bad, "probe")
