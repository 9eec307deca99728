"""Measure the published cipherface 0.0.2 on synthetic 128-d embeddings; print JSON.

Run by bench/bench_engine.py in a subprocess whose ``sys.path`` starts with a folder
holding ``pip install --no-deps --target DIR cipherface==0.0.2`` (its package name
collides with ours, so it never shares a process with this project). Its face-model
loading is stubbed: we measure the cryptography only.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time


def timed(fn, repeat):  # type: ignore[no-untyped-def]
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times) * 1e3


def main() -> None:
    peer_dir, phe = sys.argv[1], sys.argv[2] == "1"
    sys.path.insert(0, peer_dir)
    os.environ.setdefault("DEEPFACE_HOME", tempfile.mkdtemp(prefix="peer-deepface-"))
    import numpy as np
    from deepface import DeepFace

    DeepFace.build_model = lambda *a, **k: None  # the crypto is what we measure
    import cipherface  # the published 0.0.2, from peer_dir

    assert cipherface.__version__ == "0.0.2", cipherface.__file__
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 128))
    a, b = (a / np.linalg.norm(a)).tolist(), (b / np.linalg.norm(b)).tolist()
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as td:
        t = time.perf_counter()
        cf = cipherface.CipherFace(model_name="Facenet", distance_metric="cosine")
        res["ckks_keygen_ms"] = (time.perf_counter() - t) * 1e3
        cf.export_public_key(f"{td}/pub.txt")
        cf.export_private_key(f"{td}/priv.txt")
        res["ckks_public_key_bytes"] = os.path.getsize(f"{td}/pub.txt") * 3 / 4  # base64 file
        ea, res["ckks_encrypt_ms"] = timed(lambda: cf.encrypt(a), 5)
        eb = cf.encrypt(b)
        d, res["ckks_compare_ms"] = timed(lambda: cf.encrypted_compare(ea, eb), 10)
        sim, res["ckks_decrypt_ms"] = timed(lambda: cf.restore(d), 10)
        res["ckks_error"] = abs((1 - float(np.dot(a, b))) - sim)
        res["ckks_ciphertext_bytes"] = len(ea) * 3 / 4
        res["ckks_result_bytes"] = len(d) * 3 / 4
        res["ckks_1to1_ms"] = (
            res["ckks_encrypt_ms"] + res["ckks_compare_ms"] + res["ckks_decrypt_ms"]
        )
        res["ckks_comparisons_per_s"] = 1000.0 / res["ckks_compare_ms"]
        if phe:
            # 0.0.2's Lite refuses negative values (LightPHE's @): give it what its own
            # min-max normalisation would, non-negative unit vectors.
            a = (np.abs(a) / np.linalg.norm(a)).tolist()
            b = (np.abs(b) / np.linalg.norm(b)).tolist()
            lite = cipherface.CipherFaceLite(
                model_name="Facenet", algorithm_name="Paillier", security_level=128
            )
            ea2, res["paillier2048_encrypt_ms"] = timed(lambda: lite.encrypt(a), 1)
            d2, res["paillier2048_compare_ms"] = timed(lambda: lite.encrypted_compare(ea2, b), 1)
            _, res["paillier2048_decrypt_ms"] = timed(lambda: lite.restore(d2), 1)
            res["paillier2048_comparisons_per_s"] = 1000.0 / res["paillier2048_compare_ms"]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
