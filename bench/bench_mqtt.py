"""End-to-end latency through the broker: 1:1 verify and 1:N identify.

Each timed call is what a gateway pays for one probe embedding (no face model):
encrypt -> publish (QoS 1) -> Mosquitto -> cloud agent (a separate process by
default) -> gallery engine -> reply -> decrypt -> decision (also published as an
event). Galleries are built directly in the cloud's data directory with
``crypto.sites.open_gallery`` and bulk payloads, to save broker time on setup.

    python bench/bench_mqtt.py                      # verify x200, identify over 98,304
    python bench/bench_mqtt.py --identify-sizes 98304,1000000   # the 1M case (~3 min setup)
    python bench/bench_mqtt.py --identify-sizes 1000000 --engine  # + the engine alone
    python bench/bench_mqtt.py --broker mqtt://host:1883 --json out.json

A gallery of more than 100,000 slots (the 1M gallery: 1,003,520 CKKS slots) gets
its scores in one result without the id list; the edge pages the list with
``ids.get`` on its first identify (``first_ms``, and ``ids_ms`` for a listing
alone). ``--engine`` also times encrypt -> gallery.identify -> decrypt without the
broker, to show what the transport adds.
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

from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import sites
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import PeerReportedError

DIM = 128
GW = "bench"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build_gallery(data: Path, site: str, cipher: EdgeCipher, n: int, seed: int) -> np.ndarray:
    """Write an n-template gallery where the cloud agent will find it; returns the vectors."""
    key_dir = data / site / "keys" / cipher.key_id
    key_dir.mkdir(parents=True, exist_ok=True)
    pub = cipher.public_key_bytes()
    (key_dir / sites.PUBLIC_NAME).write_bytes(pub)
    (data / site / "current").write_text(cipher.key_id)
    gallery = sites.open_gallery(key_dir / "gallery", pub)
    rng = np.random.default_rng(seed)
    chunk = int(getattr(cipher, "max_templates_per_payload", 4096))
    vectors = np.empty((n, DIM))
    t0 = time.perf_counter()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        v = unit(rng, hi - lo)
        vectors[lo:hi] = v
        gallery.enroll([f"id{i}" for i in range(lo, hi)], cipher.encrypt_templates(v))
        print(
            f"\r  building {site}: {hi}/{n} ({time.perf_counter() - t0:.0f} s)",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    gallery.close()
    return vectors


def stats_ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return {
        "n": len(s),
        "median_ms": statistics.median(s),
        "p99_ms": p99,
        "min_ms": s[0],
        "mean_ms": statistics.fmean(s),
    }


def near(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = v + 0.002 * rng.normal(size=v.shape)
    return w / np.linalg.norm(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", help="use this broker (default: start a local Mosquitto)")
    parser.add_argument("--verify-n", type=int, default=200)
    parser.add_argument("--verify-gallery", type=int, default=1000)
    parser.add_argument("--identify-sizes", default="98304", help="comma-separated gallery sizes")
    parser.add_argument("--identify-n", type=int, default=10)
    parser.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5")
    parser.add_argument("--in-process", action="store_true", help="run the cloud agent in-process")
    parser.add_argument(
        "--engine", action="store_true", help="also time 1:N in the engine alone (no broker)"
    )
    parser.add_argument("--json", default="bench/results/bench_mqtt.json", help="write results")
    parser.add_argument("--keep", action="store_true", help="keep the keys and galleries built")
    args = parser.parse_args()
    # A 1M gallery takes 4 GB on disk: remove it unless asked to keep it.
    work = Path(tempfile.mkdtemp(prefix="cipherface-bench-"))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Build the galleries under ``work``, measure, print and write the results."""
    sizes = [int(s) for s in args.identify_sizes.split(",") if s.strip()]
    data = work / "cloud"
    sites.generate_key_dir(work / "keys", dim=DIM)
    cipher = sites.load_edge_cipher(work / "keys")
    rng = np.random.default_rng(1)

    print("setup: galleries", file=sys.stderr)
    verify_vecs = build_gallery(data, "bench-verify", cipher, args.verify_gallery, 2)
    identify_vecs = {n: build_gallery(data, f"bench-n{n}", cipher, n, 3) for n in sizes}

    broker_ctx: Any = None
    url = args.broker
    if url is None:
        from cipherface.agents.broker import LocalBroker

        broker_ctx = LocalBroker(profile="dev")
        broker_ctx.start()
        url = broker_ctx.url
    config = BrokerConfig(url=url, mqtt_version=args.mqtt_version)
    cloud_proc: subprocess.Popen[str] | None = None
    cloud_agent: Any = None
    if args.in_process:
        from cipherface.agents.cloud import CloudAgent
        from cipherface.agents.quota import QuotaPolicy

        cloud_agent = CloudAgent(
            broker=config,
            data_dir=data,
            agent_id="bench-cloud",
            quotas=QuotaPolicy(identify_per_hour=0, verify_per_identity_per_hour=0),
        )
        cloud_agent.start()
    else:
        cloud_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cipherface.agents.cli",
                "cloud",
                "--broker",
                url,
                "--data",
                str(data),
                "--agent-id",
                "bench-cloud",
                "--quota-identify",  # a latency bench, not a gateway's traffic
                "0",
                "--quota-verify",
                "0",
                "--mqtt-version",
                args.mqtt_version,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert cloud_proc.stderr is not None
        cloud_proc.stderr.readline()  # "serving ..." once subscribed

    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "broker": url,
        "mqtt_version": args.mqtt_version,
        "cloud": "in-process" if args.in_process else "separate process",
    }
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        # ------------------------------------------------------------- 1:1
        with EdgeClient(
            broker=config, cipher=cipher, site="bench-verify", gateway=GW, timeout=30
        ) as edge:
            for _ in range(10):  # warm up (JIT caches, TCP windows, gallery cache)
                edge.verify("id1", vector=verify_vecs[1])
            lat, matches = [], 0
            for i in range(args.verify_n):
                who = i % args.verify_gallery
                t = time.perf_counter()
                d = edge.verify(f"id{who}", vector=near(verify_vecs[who], rng))
                lat.append((time.perf_counter() - t) * 1000)
                matches += d.match
            enc = []
            for _ in range(50):
                t = time.perf_counter()
                cipher.encrypt_probe(verify_vecs[0], op="verify")
                enc.append((time.perf_counter() - t) * 1000)
        v = stats_ms(lat)
        v["matches"] = matches
        v["encrypt_median_ms"] = statistics.median(enc)
        v["gallery"] = args.verify_gallery
        results["verify"] = v
        rows.append(
            (
                "verify 1:1",
                f"{args.verify_gallery}",
                f"{v['median_ms']:.2f}",
                f"{v['p99_ms']:.2f}",
                f"{matches}/{args.verify_n} match",
            )
        )

        # ------------------------------------------------------------- 1:N
        results["identify"] = []
        for n in sizes:
            vecs = identify_vecs[n]
            entry: dict[str, Any] = {"gallery": n}
            with EdgeClient(
                broker=config, cipher=cipher, site=f"bench-n{n}", gateway=GW, timeout=120, retries=0
            ) as edge:
                try:
                    t = time.perf_counter()
                    edge.identify(vector=vecs[0])  # first call also fetches the id list
                    entry["first_ms"] = (time.perf_counter() - t) * 1000
                    t = time.perf_counter()
                    slots = edge.ids()  # the listing alone (paged beyond 100,000 slots)
                    entry["ids_ms"] = (time.perf_counter() - t) * 1000
                    entry["slots"] = len(slots)
                    lat, hits = [], 0
                    for _ in range(args.identify_n):
                        who = int(rng.integers(n))
                        t = time.perf_counter()
                        d = edge.identify(vector=near(vecs[who], rng))
                        lat.append((time.perf_counter() - t) * 1000)
                        hits += d.identity == f"id{who}"
                    entry.update(stats_ms(lat))
                    entry["correct"] = hits
                    entry["path"] = "mqtt"
                    rows.append(
                        (
                            "identify 1:N",
                            f"{n}",
                            f"{entry['median_ms']:.0f}",
                            f"{entry['p99_ms']:.0f}",
                            f"{hits}/{args.identify_n} correct, {len(slots)} slots, first "
                            f"{entry['first_ms']:.0f} ms (id list alone {entry['ids_ms']:.0f} ms)",
                        )
                    )
                except PeerReportedError as exc:
                    entry["mqtt_error"] = exc.remote_code
                    rows.append(("identify 1:N", f"{n}", "-", "-", f"MQTT: {exc.remote_code}"))
            results["identify"].append(entry)
    finally:
        if cloud_proc is not None:
            cloud_proc.terminate()
            cloud_proc.wait(timeout=30)
        if cloud_agent is not None:
            cloud_agent.stop()
        if broker_ctx is not None:
            broker_ctx.close()

    # The engine alone, once the cloud agent has let go of the galleries (one writer each).
    for entry in results.get("identify", []) if args.engine else []:
        n = entry["gallery"]
        alone = engine_only(data, f"bench-n{n}", cipher, identify_vecs[n], rng, args.identify_n)
        entry["engine_only"] = alone
        rows.append(
            (
                "identify 1:N, engine only (no broker)",
                f"{n}",
                f"{alone['median_ms']:.0f}",
                f"{alone['p99_ms']:.0f}",
                f"{alone['correct']}/{args.identify_n} correct",
            )
        )

    head = ("operation", "templates", "median ms", "p99 ms", "notes")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {out}")


def engine_only(
    data: Path,
    site: str,
    cipher: EdgeCipher,
    vecs: np.ndarray,
    rng: np.random.Generator,
    runs: int,
) -> dict[str, Any]:
    """1:N without the broker: encrypt, gallery.identify, decrypt, argmax."""
    key_dir = data / site / "keys" / cipher.key_id
    gallery = sites.open_gallery(key_dir / "gallery", (key_dir / sites.PUBLIC_NAME).read_bytes())
    lat, hits = [], 0
    try:
        for _ in range(runs):
            who = int(rng.integers(len(vecs)))
            t = time.perf_counter()
            probe = cipher.encrypt_probe(near(vecs[who], rng), op="identify")
            blob, count = gallery.identify(probe)
            scores = cipher.decrypt_scores(blob, op="identify", count=count)
            best = int(np.argmax(scores[: len(vecs)]))
            lat.append((time.perf_counter() - t) * 1000)
            hits += best == who
    finally:
        gallery.close()
    return {**stats_ms(lat), "correct": hits, "path": "engine only (no broker)"}


if __name__ == "__main__":
    main()
