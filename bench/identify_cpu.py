"""One shard's identify cost on one core: the fixed part and the part per template.

Builds a CKKS gallery of ``--blocks`` blocks of 4,096 templates (one encrypted block,
enrolled again and again: every enrollment re-randomises it) and measures, in CPU
time, the cloud's identify (best of 3) and the re-randomisation of the probe's 128
ciphertexts that every shard pays once per identify. Run it with one numba thread to
get the per-core figures the 100 M projection (docs/deployment.md 6d) uses:

    NUMBA_NUM_THREADS=1 python bench/identify_cpu.py --blocks 32

``--workers N`` then also times identify end to end in this process (no MQTT), its
probe re-randomised here and in a :class:`~cipherface.agents.compute.ComputePool` of
N workers (``cipherface cloud --workers N``), alternately, ``--rounds`` times each,
2 s apart (every pool of encryptions of zero full at the start of each): wall time,
this process's CPU (the agent's, GIL included) and the workers' CPU.

    python bench/identify_cpu.py --blocks 16 --workers 2 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import cpu_seconds

from cipherface.agents.compute import ComputePool
from cipherface.crypto import sites
from cipherface.crypto.ckks import decode
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.errors import DecodeError

SETTLE_S = 2.0  # --workers: pause between identifies (zero pools refill)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--blocks", type=int, default=32, help="blocks of 4,096 templates")
    ap.add_argument("--workers", type=int, default=0, help="also time identify with N workers")
    ap.add_argument("--rounds", type=int, default=5, help="identifies per way (--workers)")
    args = ap.parse_args()
    timed: dict[str, list[tuple[float, float, float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="cf-identify-cpu-"))
    try:
        sites.generate_key_dir(work / "keys", dim=128)
        cipher = sites.load_edge_cipher(work / "keys")
        g = sites.open_gallery(work / "g", cipher.public_key_bytes())
        assert isinstance(g, CkksGallery)
        rng = np.random.default_rng(0)
        v = rng.normal(size=(4096, 128))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        payload = cipher.encrypt_templates(v)
        for b in range(args.blocks):
            g.enroll([f"b{b}-{i}" for i in range(4096)], payload)
        probe = cipher.encrypt_probe(v[5], op="identify")
        g.identify(probe)  # blocks in memory, kernels compiled
        if args.workers:
            timed = both_ways(g, probe, args.workers, args.rounds)
        g.pub.zeros.stop()  # every encryption of zero on the spot, as under load
        cts = decode(probe, g.pub, "probe-identify", DecodeError)["cts"]
        t = time.process_time()
        g._receive(cts, g.dim, "probe-identify")
        fixed = time.process_time() - t
        runs = []
        for _ in range(3):
            t = time.process_time()
            _, count = g.identify(probe)
            runs.append(time.process_time() - t)
        total = min(runs)
        g.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per = (total - fixed) / count
    threads = os.environ.get("NUMBA_NUM_THREADS", "all")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{count:,} templates, NUMBA_NUM_THREADS={threads}, load average {load}")
    print(f"identify: {total:.3f} s CPU (best of 3)")
    print(f"  probe re-randomisation (once per shard): {fixed:.3f} s CPU")
    print(f"  the rest: {per * 1e6:.3f} us CPU per template ({1 / per:,.0f} templates/s)")
    for way, runs in timed.items():
        wall = [1e3 * r[0] for r in runs]
        print(
            f"identify, probe re-randomised {way}: wall median {statistics.median(wall):.0f} ms "
            f"(min {min(wall):.0f}); CPU ms this process "
            f"{1e3 * statistics.median(r[1] for r in runs):.0f}, workers "
            f"{1e3 * statistics.median(r[2] for r in runs):.0f} (medians of {len(runs)})"
        )


def both_ways(
    g: CkksGallery, probe: bytes, workers: int, rounds: int
) -> dict[str, list[tuple[float, float, float]]]:
    """Identify with the probe re-randomised here and in ``workers`` processes, taking
    turns: ``(wall s, this process's CPU s, the workers' CPU s)`` per identify. Each
    starts after a pause in which every pool of encryptions of zero refilled (a cloud
    with time between identifies): the same start for both ways."""
    out: dict[str, list[tuple[float, float, float]]] = {"here": [], f"in {workers} workers": []}
    with ComputePool(workers) as pool:
        g.identify(probe, rerandomise=pool.rerandomise)  # workers warm
        time.sleep(SETTLE_S)
        for _ in range(rounds):
            for way, fn in zip(out, (None, pool.rerandomise), strict=True):
                w0, c0, t0 = cpu_seconds(*pool.pids()), time.process_time(), time.perf_counter()
                with pool.holding() if fn else contextlib.nullcontext():  # as the agent does
                    g.identify(probe, rerandomise=fn)
                t1, c1, w1 = time.perf_counter(), time.process_time(), cpu_seconds(*pool.pids())
                out[way].append((t1 - t0, c1 - c0, w1 - w0))
                time.sleep(SETTLE_S)
    return out


if __name__ == "__main__":
    main()
