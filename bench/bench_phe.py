"""Benchmark of the Paillier-family engine: encryption, 1:N throughput, decryption, sizes.

Usage::

    python bench/bench_phe.py                      # Paillier, 2048 and 3072 bits, 100k templates
    python bench/bench_phe.py --schemes paillier damgard-jurik okamoto-uchiyama --bits 2048
    python bench/bench_phe.py --templates 20000    # quicker

The gallery is synthesised quickly: ``--distinct`` full blocks are encrypted with the
secret-key CRT fast path, and the enrollment payloads repeat those chunks (distinct ids)
until ``--templates`` templates are enrolled through the real ``enroll`` path. Scoring
cost does not depend on the values, so throughput is that of a real gallery.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import msgpack
import numpy as np

from cipherface.crypto import phe, phe_gallery


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ms(t: float) -> str:
    return f"{t * 1e3:8.1f} ms"


def bench(
    scheme: str, bits: int, templates: int, distinct: int, workers: int, dim: int
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    key = phe.generate_private_key(scheme, bits=bits, dim=dim)
    keygen = time.perf_counter() - t0
    edge = phe_gallery.PheEdgeCipher(key=key)
    pub = key.public
    k = edge.packing.slots
    print(f"\n== {scheme}, {bits}-bit n, d={dim}: {k} templates per block ==")
    print(f"keygen                         {_ms(keygen)}")
    with tempfile.TemporaryDirectory() as td:
        key.save(os.path.join(td, "private.key"))
        pub.save(os.path.join(td, "public.key"))
        priv_size = os.path.getsize(os.path.join(td, "private.key"))
        pub_size = os.path.getsize(os.path.join(td, "public.key"))
    print(f"key files                      private {priv_size} B, public {pub_size} B")
    print(
        f"ciphertext                     {pub.ct_bytes} B "
        f"(block of {k}: {(dim + 1) * pub.ct_bytes} B)"
    )

    # ----------------------------------------------------------- encryption at the edge
    one = _unit(rng, 1, dim)
    edge.encrypt_templates(one)  # builds the fixed-base tables once
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        payload1 = edge.encrypt_templates(one)
    single = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    edge.precompute(dim * reps)
    pre = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        edge.encrypt_templates(one)
    pooled = (time.perf_counter() - t0) / reps
    batch = _unit(rng, k, dim)
    t0 = time.perf_counter()
    payload_k = edge.encrypt_templates(batch)
    full = time.perf_counter() - t0
    print(f"encrypt 1 template             {_ms(single)}  ({dim} ciphertexts, CRT fast path)")
    print(f"  with precomputed zeros       {_ms(pooled)}  (precompute cost {_ms(pre)} idle time)")
    print(f"  batch of {k:3d}, per template  {_ms(full / k)}  (block {_ms(full)})")
    print(
        f"enrollment payload             1 template {len(payload1)} B, "
        f"{k} templates {len(payload_k)} B"
    )
    probe = edge.encrypt_probe(one[0], op="identify")
    print(f"probe                          {len(probe)} B (plaintext fixed-point)")

    # ------------------------------------------------------------- synthesise the gallery
    chunks = []
    for _ in range(distinct):
        x = _unit(rng, k, dim)
        chunks.append([list(range(k)), edge.encrypt_columns(edge.packing.quantise(x), range(k))])
    nblocks = -(-templates // k)
    with tempfile.TemporaryDirectory() as gdir:
        gal = phe_gallery.PheGallery(path=gdir, public=pub, workers=workers)
        t0 = time.perf_counter()
        per_payload = 256
        done = 0
        while done < nblocks:
            m = min(per_payload, nblocks - done)
            body: dict[str, Any] = {
                **msgpack.unpackb(payload_k),
                "count": m * k,
                "chunks": [chunks[(done + i) % distinct] for i in range(m)],
            }
            ids = [f"id{(done + i) * k + s}" for i in range(m) for s in range(k)]
            gal.enroll(ids, msgpack.packb(body, use_bin_type=True))
            done += m
        print(
            f"enroll {gal.count} templates       "
            f"{time.perf_counter() - t0:8.1f} s ({nblocks} blocks)"
        )

        # ------------------------------------------------------------------ 1:N scoring
        t0 = time.perf_counter()
        gal.warmup()
        print(f"worker warm-up ({workers} processes)   {_ms(time.perf_counter() - t0)}")
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            result, count = gal.identify(probe)
            dt = time.perf_counter() - t0
            best = max(best, count / dt)
        print(
            f"1:N {workers} processes            {best:8.0f} comparisons/s "
            f"({count} slots in {dt:.2f} s; best of 2)"
        )
        print(f"identify result                {len(result)} B")
        t0 = time.perf_counter()
        scores = edge.decrypt_scores(result, op="identify", count=count)
        dec = time.perf_counter() - t0
        nct = -(-count // k)
        print(
            f"decrypt identify result        {dec:8.2f} s "
            f"({nct} ciphertexts, {_ms(dec / nct)} each)"
        )
        assert np.isfinite(scores[: gal.count]).all()  # every enrolled slot decodes
        vres = gal.verify("id0", edge.encrypt_probe(one[0], op="verify"))
        t0 = time.perf_counter()
        for _ in range(reps):
            vres = gal.verify("id0", edge.encrypt_probe(one[0], op="verify"))
        ver = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            edge.decrypt_scores(vres, op="verify", count=1)
        vdec = (time.perf_counter() - t0) / reps
        print(f"verify (cloud)                 {_ms(ver)}")
        print(f"decrypt one score (edge)       {_ms(vdec)}")
        gal.close()  # one process per gallery: the one-core measurement reopens it
        sub = min(nblocks, 200)
        sub_gal = phe_gallery.PheGallery(path=gdir, public=pub, workers=0)
        sub_gal._local_scorer()
        plan = phe_gallery._probe_plan(edge.packing.quantise(one)[0], edge.packing)
        jobs = [
            (str(sub_gal.store.load_block(sub_gal._name(b)).filename), sub_gal._offsets)
            for b in range(sub)
        ]
        t0 = time.perf_counter()
        sub_gal._run_local(plan, jobs)
        one_core = sub * k / (time.perf_counter() - t0)
        print(f"1:N one core                   {one_core:8.0f} comparisons/s ({sub * k} measured)")
        sub_gal.store.close()
    return {
        "scheme": scheme,
        "bits": bits,
        "templates": float(count),
        "encrypt_ms": single * 1e3,
        "encrypt_precomputed_ms": pooled * 1e3,
        "encrypt_batched_ms_per_template": full / k * 1e3,
        "comparisons_per_s": best,
        "comparisons_per_s_one_core": one_core,
        "decrypt_identify_s": dec,
        "verify_ms": ver * 1e3,
        "decrypt_one_ms": vdec * 1e3,
        "public_key_bytes": float(pub_size),
        "ciphertext_bytes": float(pub.ct_bytes),
    }


def measure(size: int, scheme: str = phe.PAILLIER, bits: int = 2048) -> dict[str, float]:
    """One scheme at one key size, for bench/bench_engine.py's table."""
    return bench(scheme, bits, size, 8, os.cpu_count() or 1, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=[phe.PAILLIER], choices=phe.SCHEMES)
    ap.add_argument("--bits", nargs="+", type=int, default=[2048, 3072])
    ap.add_argument("--templates", type=int, default=100_000)
    ap.add_argument("--distinct", type=int, default=8, help="distinct encrypted blocks")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dim", type=int, default=128)
    a = ap.parse_args()
    print(f"cpu count {os.cpu_count()}; numbers are wall-clock on a shared machine")
    for scheme in a.schemes:
        for bits in a.bits:
            bench(scheme, bits, a.templates, a.distinct, a.workers, a.dim)


if __name__ == "__main__":
    main()
