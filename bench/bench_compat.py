"""The cipherface-compatible API, scheme by scheme, beside the published 0.0.2 (one run).

    python bench/bench_compat.py            # + 0.0.2's Paillier (2048-bit encrypt: ~25 s)
    python bench/bench_compat.py --no-peer-phe

For each scheme at 128-d: encrypt / encrypted_compare / restore medians, and the sizes of
the public and private key files, an encrypted embedding and an encrypted result, as the
API returns them (base64 text, like 0.0.2) and as raw bytes. JSON goes to
bench/results/compat.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_engine import RESULTS, peer  # type: ignore[import-not-found]


def median_ms(fn: Any, repeat: int) -> tuple[Any, float]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return out, statistics.median(times)


def measure(make: Any, repeat: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 128))
    with tempfile.TemporaryDirectory() as td:
        t = time.perf_counter()
        onprem = make(None)
        keygen = (time.perf_counter() - t) * 1e3
        onprem.export_private_key(f"{td}/private.txt")
        onprem.export_public_key(f"{td}/public.txt")
        cloud = make(f"{td}/public.txt")
        edge = make(f"{td}/private.txt")
        enc, enc_ms = median_ms(lambda: onprem.encrypt(a), repeat)
        if type(onprem).__name__ == "CipherFace":
            other = cloud.encrypt(b)  # public-key encryption in the cloud (0.0.2's FHE flow)
            res, cmp_ms = median_ms(lambda: cloud.encrypted_compare(other, enc), repeat)
        else:
            res, cmp_ms = median_ms(lambda: cloud.encrypted_compare(enc, b.tolist()), repeat)
        _, dec_ms = median_ms(lambda: edge.restore(res), repeat)
        return {
            "keygen_ms": keygen,
            "encrypt_ms": enc_ms,
            "compare_ms": cmp_ms,
            "decrypt_ms": dec_ms,
            "public_key_bytes": os.path.getsize(f"{td}/public.txt"),
            "private_key_bytes": os.path.getsize(f"{td}/private.txt"),
            "embedding_b64_chars": len(enc),
            "embedding_bytes": len(base64.b64decode(enc)),
            "result_b64_chars": len(res),
            "result_bytes": len(base64.b64decode(res)),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-peer-phe", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=RESULTS / "compat.json")
    args = ap.parse_args()
    from cipherface import CipherFace, CipherFaceLite

    rows: dict[str, dict[str, float]] = {}
    rows["CipherFace CKKS-128 (this)"] = measure(
        lambda c: CipherFace(model_name="Dlib", distance_metric="cosine", cryptosystem=c),
        args.repeat,
    )
    for algo, level in (
        ("Paillier", 112),
        ("Paillier", 128),
        ("Damgard-Jurik", 112),
        ("Okamoto-Uchiyama", 112),
    ):
        rows[f"CipherFaceLite {algo}-{level} (this)"] = measure(
            lambda c, a=algo, s=level: CipherFaceLite(
                model_name="Dlib", algorithm_name=a, security_level=s, cryptosystem=c
            ),
            args.repeat,
        )
    p = peer(phe=not args.no_peer_phe)
    rows["cipherface 0.0.2 CKKS (peer)"] = {
        "encrypt_ms": p["ckks_encrypt_ms"],
        "compare_ms": p["ckks_compare_ms"],
        "decrypt_ms": p["ckks_decrypt_ms"],
        "public_key_bytes": p["ckks_public_key_bytes"],
        "embedding_bytes": p["ckks_ciphertext_bytes"],
        "result_bytes": p["ckks_result_bytes"],
    }
    if "paillier2048_encrypt_ms" in p:
        rows["cipherface 0.0.2 Paillier-2048 (peer)"] = {
            "encrypt_ms": p["paillier2048_encrypt_ms"],
            "compare_ms": p["paillier2048_compare_ms"],
            "decrypt_ms": p["paillier2048_decrypt_ms"],
        }
    cols = [
        "encrypt_ms",
        "compare_ms",
        "decrypt_ms",
        "public_key_bytes",
        "private_key_bytes",
        "embedding_bytes",
        "result_bytes",
    ]
    print(f"{'128-d, median':40}" + "".join(f"{c:>18}" for c in cols))
    for name, r in rows.items():
        cells = "".join(f"{'-' if c not in r else format(r[c], ',.4g'):>18}" for c in cols)
        print(f"{name:40}{cells}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
