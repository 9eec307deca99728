"""Identify with its probe re-randomised in worker processes, beside the agent doing it.

Starts its own Mosquitto and builds one CKKS gallery per ``--sizes`` entry (one
encrypted block of 4,096 templates enrolled again and again), then runs, for each
agent -- ``cipherface cloud`` in process and ``cipherface cloud --workers N`` --
one after the other in the same run, on the same galleries:

``--baseline COMMIT`` adds that commit's agent with ``--workers N`` (e.g. the commit
before identify probes went to the workers).

1. **identify alone**: ``--identifies`` sequential identifies per gallery (a probe
   encrypted up front, a raw MQTT client, no decryption): latency at the client, the
   cloud's own time per identify (its ``/metrics`` histogram) and the CPU the agent
   process and its workers spent per identify (from /proc);
2. **verify alone**: ``--gateways`` closed-loop verify streams (bench/loadgen.py)
   against the largest gallery for ``--seconds``: p50 / p99;
3. **verify while identifies run**: the same verify load while another process sends
   one identify every ``--identify-every`` seconds (or back to back when one takes
   longer) to one gallery, each size in turn: verify p50 / p99, and the identifies'
   latency meanwhile.

    python bench/identify_workers.py                       # 65,536 and 262,144 templates
    python bench/identify_workers.py --sizes 65536 --seconds 5 --identifies 3
    python bench/identify_workers.py --baseline a89f43f      # + main before this change
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import children, cpu_seconds, export_tree, start_cloud, stop_cloud
from loadgen import VerifyLoad

from cipherface.agents.broker import LocalBroker, free_port
from cipherface.agents.mqtt import tcp_nodelay
from cipherface.crypto import sites
from cipherface.protocol import (
    Identify,
    Result,
    decode,
    encode,
    error_topic,
    request_topic,
    result_topic,
)

ROOT = Path(__file__).resolve().parents[1]
DIM = 128
BLOCK = 4096


def block_vectors() -> np.ndarray:
    """The templates of every block (unit vectors, fixed seed)."""
    v = np.random.default_rng(0).normal(size=(BLOCK, DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build(data: Path, keys: Path, sizes: list[int]) -> tuple[Any, dict[int, str], np.ndarray]:
    """A site per size (``id<size>``); block ``b`` holds ids ``b<b>-<i>`` = vectors[i]."""
    kid = sites.generate_key_dir(keys, dim=DIM)
    cipher = sites.load_edge_cipher(keys)
    v = block_vectors()
    payload = cipher.encrypt_templates(v)
    names = {}
    for size in sizes:
        site = f"id{size}"
        kd = data / site / "keys" / kid
        kd.mkdir(parents=True)
        (kd / sites.PUBLIC_NAME).write_bytes(cipher.public_key_bytes())
        (data / site / "current").write_text(kid)
        g = sites.open_gallery(kd / "gallery", cipher.public_key_bytes())
        for b in range(-(-size // BLOCK)):
            g.enroll([f"b{b}-{i}" for i in range(BLOCK)], payload)
        g.close()
        names[size] = site
    return cipher, names, v


def identify_loop(
    host: str,
    port: int,
    site: str,
    kid: str,
    probe: bytes,
    *,
    count: int,
    seconds: float,
    version: int | None = None,
    every: float = 0.0,
) -> dict[str, Any]:
    """Sequential identifies, one started every ``every`` s at most; stops after
    ``count`` or ``seconds``, whichever comes first. Without the gallery's
    ``version`` the first one is untimed (it fetches it; its result carries the ids)."""
    got: dict[str, Any] = {}
    arrived = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"idw-{os.getpid()}", protocol=5)
    c.on_socket_open = lambda cl, ud, sock: tcp_nodelay(sock)

    def on_message(_c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        got["msg"] = decode(bytes(m.payload))
        got["at"] = time.perf_counter()
        arrived.set()

    c.on_message = on_message
    c.connect(host, port, 60)
    c.loop_start()
    c.subscribe([(result_topic(site, "idw"), 1), (error_topic(site, "idw"), 1)])
    time.sleep(0.3)
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    want = count if version is not None else count + 1
    try:
        while len(latencies) < want and time.perf_counter() < end:
            msg = Identify(site=site, gw="idw", kid=kid, probe=probe, ids_version=version)
            arrived.clear()
            t0 = time.perf_counter()
            c.publish(request_topic(site, "idw", "identify"), encode(msg), qos=1)
            if not arrived.wait(120):
                raise RuntimeError("identify: no reply in 120 s")
            reply = got["msg"]
            if not isinstance(reply, Result) or reply.corr != msg.id:
                raise RuntimeError(f"identify: unexpected reply {reply!r:.200}")
            if version is not None:
                latencies.append((got["at"] - t0) * 1e3)
            version = reply.ids_version
            time.sleep(max(0.0, t0 + every - time.perf_counter()))
    finally:
        c.disconnect()
        c.loop_stop()
    return {"latencies_ms": latencies, "count": reply.count, "version": version}


def scrape_identify(port: int) -> tuple[float, float]:
    """``(seconds, count)`` of the cloud's identify latency histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if 'op="identify"' in line and line.startswith("cipherface_request_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
        if 'op="identify"' in line and line.startswith("cipherface_request_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def _ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run_agent(
    label: str,
    tree: Path,
    extra: list[str],
    args: argparse.Namespace,
    broker: Any,
    work: Path,
    cipher: Any,
    site_of: dict[int, str],
    vectors: np.ndarray,
    probe_file: Path,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    mport = free_port()
    flags = ["--quota-verify", "0", "--quota-identify", "0", "--metrics-port", str(mport)]
    proc = start_cloud(tree, broker.url, work / "data", [*flags, *extra], work / "cloud.log")
    probe = probe_file.read_bytes()
    kid = cipher.key_id
    try:
        # Warm-up, not measured: galleries opened, kernels loaded in the agent and workers.
        versions = {
            site: identify_loop(broker.host, broker.port, site, kid, probe, count=1, seconds=600)[
                "version"
            ]
            for site in site_of.values()
        }
        VerifyLoad(host=broker.host, port=broker.port, site=site_of[max(site_of)], cipher=cipher,
                   identities=[f"b0-{i}" for i in range(BLOCK)], vectors=vectors,
                   gateways=args.gateways).run(1.0, warmup=3.0)  # fmt: skip
        # 1. identify alone
        for site in site_of.values():
            s0, n0 = scrape_identify(mport)
            cpu0 = (cpu_seconds(proc.pid), cpu_seconds(*children(proc.pid)))
            out = identify_loop(
                broker.host,
                broker.port,
                site,
                kid,
                probe,
                count=args.identifies,
                seconds=600,
                version=versions[site],
            )
            s1, n1 = scrape_identify(mport)
            cpu1 = (cpu_seconds(proc.pid), cpu_seconds(*children(proc.pid)))
            lat = out["latencies_ms"]
            n = max(1, len(lat))
            rows.append({
                "agent": label, "phase": "identify alone", "templates": out["count"],
                "identify_median_ms": round(statistics.median(lat), 1),
                "identify_min_ms": round(min(lat), 1),
                "cloud_ms": round(1e3 * (s1 - s0) / max(1.0, n1 - n0), 1),
                "agent_cpu_ms": round(1e3 * (cpu1[0] - cpu0[0]) / n, 1),
                "workers_cpu_ms": round(1e3 * (cpu1[1] - cpu0[1]) / n, 1),
                "load": load_avg(),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        if args.no_verify:
            return rows
        big = site_of[max(site_of)]
        ids = [f"b0-{i}" for i in range(BLOCK)]

        def verify_load() -> VerifyLoad:
            return VerifyLoad(host=broker.host, port=broker.port, site=big, cipher=cipher,
                              identities=ids, vectors=vectors, gateways=args.gateways)  # fmt: skip

        # 2. verify alone
        rep = verify_load().run(args.seconds)
        rows.append({"agent": label, "phase": "verify alone", **rep.row(), "load": load_avg()})
        print(json.dumps(rows[-1]), flush=True)
        # 3. verify while identifies run back to back (another process sends them)
        for size, site in site_of.items():
            driver = subprocess.Popen(
                [sys.executable, __file__, "--drive", json.dumps([broker.host, broker.port,
                 site, kid, str(probe_file), args.seconds + 4, versions[site],
                 args.identify_every])],
                stdout=subprocess.PIPE, env=dict(os.environ),
            )  # fmt: skip
            rep = verify_load().run(args.seconds)
            drive_out, _ = driver.communicate(timeout=600)
            lat = json.loads(drive_out)["latencies_ms"]
            rows.append({
                "agent": label, "phase": f"verify while identifying {size:,}", **rep.row(),
                "identifies": len(lat),
                "identify_median_ms": round(statistics.median(lat), 1) if lat else None,
                "identify_p90_ms": round(_ms(lat, 90), 1) if lat else None,
                "load": load_avg(),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_cloud(proc)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="65536,262144", help="templates per gallery")
    ap.add_argument("--workers", type=int, default=2, help="compute processes of the 2nd agent")
    ap.add_argument("--identifies", type=int, default=5, help="timed identifies per gallery")
    ap.add_argument("--gateways", type=int, default=10, help="closed-loop verify streams")
    ap.add_argument("--seconds", type=float, default=10.0, help="per verify phase")
    ap.add_argument("--identify-every", type=float, default=1.0, metavar="S",
                    help="phase 3: an identify every S seconds (0: back to back)")  # fmt: skip
    ap.add_argument("--no-verify", action="store_true", help="phase 1 only (identify alone)")
    ap.add_argument("--rounds", type=int, default=1, help="run every agent this many times")
    ap.add_argument("--baseline", metavar="COMMIT", help="also run this commit's --workers agent")
    ap.add_argument("--work", metavar="DIR", help="keep the galleries here (reused when built)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--drive", help=argparse.SUPPRESS)  # the identify process of phase 3
    args = ap.parse_args()
    if args.drive:
        host, port, site, kid, probe_file, seconds, version, every = json.loads(args.drive)
        probe = Path(probe_file).read_bytes()
        out = identify_loop(host, port, site, kid, probe, count=10**6, seconds=seconds,
                            version=version, every=every)  # fmt: skip
        print(json.dumps(out))
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="cf-identify-workers-"))
    rows: list[dict[str, Any]] = []
    try:
        t = time.perf_counter()
        if args.work and (work / "keys").exists():  # built by an earlier run
            cipher, vectors = sites.load_edge_cipher(work / "keys"), block_vectors()
            site_of = {size: f"id{size}" for size in sizes}
        else:
            print(f"building {sizes} (load average {load_avg()})", flush=True)
            cipher, site_of, vectors = build(work / "data", work / "keys", sizes)
        print(f"galleries ready in {time.perf_counter() - t:.0f} s", flush=True)
        shutil.rmtree(work / "old", ignore_errors=True)
        probe_file = work / "probe.bin"
        probe_file.write_bytes(cipher.encrypt_probe(vectors[5], op="identify"))
        with LocalBroker(profile="dev") as broker:
            print(f"load average before the agents {load_avg()}", flush=True)
            workers = ["--workers", str(args.workers)]
            agents: list[tuple[str, Path, list[str]]] = [("in process", ROOT, [])]
            if args.baseline:
                old = export_tree(args.baseline, work / "old")
                agents.append((f"--workers {args.workers} at {args.baseline}", old, workers))
            agents.append((f"--workers {args.workers}", ROOT, workers))
            for label, tree, extra in agents * args.rounds:
                rows += run_agent(
                    label, tree, extra, args, broker, work, cipher, site_of, vectors, probe_file
                )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{os.cpu_count()} cores, shared machine; load average at the end {load_avg()}")
    print("| agent | templates | identify median ms (min) | cloud ms | CPU ms agent / workers |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["phase"] == "identify alone":
            print(f"| {r['agent']} | {r['templates']:,} | {r['identify_median_ms']} "
                  f"({r['identify_min_ms']}) | {r['cloud_ms']} | {r['agent_cpu_ms']} / "
                  f"{r['workers_cpu_ms']} |")  # fmt: skip
    print("\n| agent | phase | verifies/s | verify p50 ms | verify p99 ms | errors | wrong "
          "(checked) | identifies | identify median ms | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["phase"] != "identify alone":
            print(f"| {r['agent']} | {r['phase']} | {r['verifies_per_s']} | {r['p50_ms']} | "
                  f"{r['p99_ms']} | {r['errors']} | {r['wrong']} ({r['checked']}) | "
                  f"{r.get('identifies', '-')} | {r.get('identify_median_ms', '-')} | "
                  f"{r['load']} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
