"""Identify over a sharded gallery: 1, 2 and 4 shard workers, end to end through MQTT.

A gallery of ``--total`` templates is split into 4 shard sites (``bench-s0..s3``)
and served by 1 worker (all four shards), 2 workers (two each) or 4 workers (one
each), every worker a ``cipherface cloud`` process with ``NUMBA_NUM_THREADS``
threads (default 1: one worker = one core, so per-shard cost is per-core cost). The
edge is :class:`~cipherface.agents.shards.ShardedEdge`: one identify = a probe to
every shard, partial scores gathered and decrypted at the edge.

Building: template payloads are encrypted once per distinct block and enrolled
repeatedly under new ids (encryption is edge work, not what this measures), so
best scores tie across copies; the check is that the best similarity is that of
the probe's own template.

    python bench/bench_shards.py --total 2000000          # ~4 min build, ~8 GB disk
    python bench/bench_shards.py --total 65536 --runs 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cipherface.agents.broker import LocalBroker
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.shards import ShardedEdge
from cipherface.crypto import sites

ROOT = Path(__file__).resolve().parents[1]
DIM = 128
SHARDS = [f"bench-s{k}" for k in range(4)]
BLOCK = 4096


def build(built: Path, cipher: Any, per_shard: int, distinct: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(distinct * BLOCK, DIM))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    payloads = [
        cipher.encrypt_templates(vecs[b * BLOCK : (b + 1) * BLOCK]) for b in range(distinct)
    ]
    pub = cipher.public_key_bytes()
    t0 = time.perf_counter()
    for k, shard in enumerate(SHARDS):
        kd = built / shard / "keys" / cipher.key_id
        kd.mkdir(parents=True)
        (kd / sites.PUBLIC_NAME).write_bytes(pub)
        (built / shard / "current").write_text(cipher.key_id)
        g = sites.open_gallery(kd / "gallery", pub)
        for b in range(per_shard // BLOCK):
            g.enroll([f"k{k}-{b}-{i}" for i in range(BLOCK)], payloads[b % distinct])
            print(f"\r  {shard}: {(b + 1) * BLOCK} ({time.perf_counter() - t0:.0f} s)",
                  end="", file=sys.stderr, flush=True)  # fmt: skip
        g.close()
    print(file=sys.stderr)
    return vecs


def start_workers(
    url: str, built: Path, work: Path, layout: list[list[str]], threads: int
) -> list[Any]:
    procs = []
    for w, shards in enumerate(layout):
        data = work / f"w{len(layout)}-{w}"
        data.mkdir()
        for shard in shards:
            (data / shard).symlink_to(built / shard)
        log = work / f"w{len(layout)}-{w}.log"
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-c", "from cipherface.agents.cli import main; main()", "cloud"]
        cmd += ["--broker", url, "--data", str(data), "--agent-id", f"shard-w{len(layout)}-{w}"]
        cmd += ["--sites", ",".join(shards), "--share-group", f"l{len(layout)}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(log, "wb")))  # fmt: skip
        while b"serving" not in log.read_bytes():
            if procs[-1].poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.1)
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--total", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=3, help="timed identifies per layout")
    ap.add_argument("--threads", type=int, default=1, help="NUMBA_NUM_THREADS per worker")
    ap.add_argument("--distinct", type=int, default=4, help="distinct encrypted blocks")
    ap.add_argument("--workdir", help="where to build (default: a temp dir; ~4 KB/template)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    per_shard = -(-args.total // (4 * BLOCK)) * BLOCK
    work = Path(tempfile.mkdtemp(prefix="cf-shards-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    try:
        keys = work / "keys"
        sites.generate_key_dir(keys, dim=DIM)
        cipher = sites.load_edge_cipher(keys)
        t0 = time.perf_counter()
        vecs = build(work / "built", cipher, per_shard, args.distinct)
        build_s = time.perf_counter() - t0
        probe = vecs[5]
        with LocalBroker(profile="dev") as broker:
            cfg = BrokerConfig(url=broker.url)
            for n in (1, 2, 4):
                layout = [SHARDS[w::n] for w in range(n)]
                procs = start_workers(broker.url, work / "built", work, layout, args.threads)
                try:
                    with ShardedEdge(broker=cfg, cipher=cipher, shards=SHARDS, gateway="bench",
                                     timeout=600, retries=0) as edge:  # fmt: skip
                        t = time.perf_counter()
                        first = edge.identify(probe)  # pages each shard's id list too
                        first_s = time.perf_counter() - t
                        times = []
                        for _ in range(args.runs):
                            t = time.perf_counter()
                            got = edge.identify(probe)
                            times.append(time.perf_counter() - t)
                        ok = got.similarity is not None and abs(got.similarity - 1.0) < 1e-3
                finally:
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.wait(60)
                med = statistics.median(times)
                row = {
                    "workers": n,
                    "templates": per_shard * 4,
                    "first_s": round(first_s, 2),
                    "identify_s": round(med, 2),
                    "runs_s": [round(x, 2) for x in times],
                    "top1_ok": ok and first.similarity is not None,
                    "templates_per_s": round(per_shard * 4 / med),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["identify_s"]
    print(f"\n{platform.node()}: {os.cpu_count()} cores (shared), build {build_s:.0f} s, "
          f"NUMBA_NUM_THREADS={args.threads} per worker")  # fmt: skip
    print("| shard workers | templates | identify s (median) | first s | speed-up | efficiency |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        sp = base / r["identify_s"]
        print(f"| {r['workers']} | {r['templates']:,} | {r['identify_s']} | {r['first_s']} | "
              f"{sp:.2f} | {sp / r['workers']:.0%} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
