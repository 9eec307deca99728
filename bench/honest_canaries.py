"""Honest results through the canary check: false rejections and the noise margin.

Builds one full CKKS block (3,968 users + 128 canaries), then for each run: a fresh
random face, fresh jitter, a fresh probe encryption, the cloud's identify, the edge's
check (crypto/judge.py). Prints runs, rejections, the largest canary deviation in
sigmas and the largest chi-square as a fraction of its limit.

    python bench/honest_canaries.py --runs 100000 --workers 16

Each worker is a process with one numba thread.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path


def _work(args: tuple[int, int, int]) -> tuple[int, int, float, float]:
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    import numpy as np

    from cipherface.crypto.ckks import CkksEdgeCipher, CkksGallery, CkksKeys
    from cipherface.crypto.guard import Guard, chi2_limit
    from cipherface.crypto.judge import identify_decision
    from cipherface.crypto.trust import Canary, create_trust_key
    from cipherface.errors import ResultForgedError

    runs, seed, dim = args
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        keys = CkksKeys.generate(dim=dim)
        cipher = CkksEdgeCipher(keys=keys)
        guard = Guard(
            trust=create_trust_key(tmp),
            key_id=cipher.key_id,
            dim=dim,
            state_path=Path(tmp) / "trust.state",
            per_pack=cipher.per_pack,
            max_forged=10**9,
        )
        n = keys.public.params.n
        names = [f"u{i}" for i in range(n - n // cipher.per_pack)]
        v = rng.normal(size=(len(names), dim))
        labels, rows = guard.with_canaries(names, v / np.linalg.norm(v, axis=1)[:, None])
        gallery = CkksGallery(path=Path(tmp) / "g", public=keys.public)
        gallery.enroll(labels, cipher.encrypt_templates(rows))
        ids = gallery.ids()
        canaries = [i for i, x in enumerate(guard.open_slots(ids)) if isinstance(x, Canary)]
        rejected, worst_z, worst_chi = 0, 0.0, 0.0
        for i in range(runs):
            if i and i % 50 == 0:  # progress, so that a cut-short run still reports
                print(
                    f"worker {seed}: {i} results, {rejected} rejected, max {worst_z:.2f} sigma, "
                    f"chi-square {worst_chi:.3f} of limit",
                    flush=True,
                )
            f = rng.normal(size=dim)
            vec = guard.jitter(f / np.linalg.norm(f))
            res, _ = gallery.identify(cipher.encrypt_probe(vec, op="identify"))
            try:
                identify_decision(cipher, guard, labels=ids, scores_blob=res, probe=vec)
            except ResultForgedError:
                rejected += 1
            s = cipher.decrypt_scores(res, op="identify", count=len(ids))[canaries]
            z = (s - rows[canaries] @ vec) / guard.sigma
            worst_z = max(worst_z, float(np.abs(z).max()))
            worst_chi = max(worst_chi, float((z * z).sum()) / chi2_limit(len(canaries)))
        gallery.close()
    return runs, rejected, worst_z, worst_chi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    a = ap.parse_args()
    per = -(-a.runs // a.workers)
    t0 = time.time()
    with mp.get_context("spawn").Pool(a.workers) as pool:
        out = pool.map(_work, [(per, 1000 + i, a.dim) for i in range(a.workers)])
    runs = sum(o[0] for o in out)
    print(
        f"{runs} honest results, {sum(o[1] for o in out)} rejected; largest canary "
        f"deviation {max(o[2] for o in out):.2f} sigma (limit 12); largest chi-square "
        f"{max(o[3] for o in out):.3f} of its limit; {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
