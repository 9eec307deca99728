"""Cloud throughput: closed-loop verifies from 1, 10 and 50 gateways, old agent beside new.

Starts its own Mosquitto (the project's mosquitto.conf, dev profile) and, for each
agent under test, a ``cipherface cloud`` process on one CKKS gallery; then drives
``--gateways`` closed-loop verify streams (bench/loadgen.py: one connection, probes
encrypted up front, every 25th result decrypted and checked) for ``--seconds`` each.

The baseline is this tree's ``cloud --serial``: one worker thread for every
request, each reply's PUBACK awaited before the next request (the agent before
issue 11), so every row uses the same engine and runs on the same machine in the
same minutes. ``--workers 2`` adds the agent with two compute processes (one per
core here). Every row also says where the CPU went during the measured seconds,
in ms per answered verify: the cloud agent, its compute workers, the broker, and this
process (the load generator: 50 gateways' MQTT and every 25th decryption), all on
the same cores. ``--baseline COMMIT`` adds the agent of an older commit, exported to a
temp dir; it must read this tree's gallery and probe formats (the CKKS engine
changed after 9b3ca41, so that commit no longer can).

    python bench/bench_fleet.py                         # 1, 10, 50 gateways, 20 s each
    python bench/bench_fleet.py --gateways 50 --seconds 60 --json out.json
    python bench/bench_fleet.py --baseline 9b3ca41      # + an old commit's agent
    python bench/bench_fleet.py --workers 1,2 --no-lanes  # compute workers only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import VerifyLoad

from cipherface.agents.broker import LocalBroker
from cipherface.crypto import sites

ROOT = Path(__file__).resolve().parents[1]
SITE = "bench"
DIM = 128


def build(data: Path, keys: Path, n: int) -> tuple[Any, list[str], np.ndarray]:
    kid = sites.generate_key_dir(keys, dim=DIM)
    cipher = sites.load_edge_cipher(keys)
    kd = data / SITE / "keys" / kid
    kd.mkdir(parents=True)
    (kd / sites.PUBLIC_NAME).write_bytes(cipher.public_key_bytes())
    (data / SITE / "current").write_text(kid)
    g = sites.open_gallery(kd / "gallery", cipher.public_key_bytes())
    rng = np.random.default_rng(1)
    v = rng.normal(size=(n, DIM))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(n)]
    for lo in range(0, n, 1024):
        g.enroll(ids[lo : lo + 1024], cipher.encrypt_templates(v[lo : lo + 1024]))
    g.close()
    return cipher, ids, v


def export_tree(commit: str, dest: Path) -> Path:
    """The project at ``commit``, importable as ``cipherface`` (rooms linked in)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for room in ("crypto", "protocol", "agents", "faces", "cameras", "store", "testing", "observe"):
        link = dest / "cipherface" / room
        if (dest / room).is_dir() and not link.exists():
            link.symlink_to(Path("..") / room)
    return dest


def start_cloud(tree: Path, url: str, data: Path, extra: list[str], log: Path) -> Any:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-c", "from cipherface.agents.cli import main; main()", "cloud"]
    cmd += ["--broker", url, "--data", str(data), "--agent-id", "bench-cloud", *extra]
    # cwd: ``python -c`` puts the working directory first on sys.path, ahead of
    # PYTHONPATH; run from this checkout, a baseline would import this tree's code.
    proc = subprocess.Popen(
        cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=open(log, "wb")
    )
    deadline = time.monotonic() + 30
    while b"serving" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cloud did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return kids


def cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds of processes, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class CpuMeter:
    """CPU spent between the load's ``start`` and ``end`` marks, per process group."""

    def __init__(self, cloud: int, broker: int | None) -> None:
        self.cloud, self.broker = cloud, broker
        self.spent: dict[str, float] = {}
        self._at: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        t = os.times()
        now = {
            "cloud": cpu_seconds(self.cloud),
            "workers": cpu_seconds(*children(self.cloud)),
            "loadgen": t.user + t.system,
        }
        if self.broker is not None:
            now["broker"] = cpu_seconds(self.broker)
        return now

    def __call__(self, mark: str) -> None:
        if mark == "start":
            self._at = self._now()
        else:
            self.spent = {k: v - self._at[k] for k, v in self._now().items()}


def stop_cloud(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gateways", default="1,10,50")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--templates", type=int, default=1000)
    ap.add_argument("--baseline", metavar="COMMIT", help="also run this commit's agent")
    ap.add_argument(
        "--workers",
        default="2",
        metavar="N[,N]",
        help="also run the agent with N compute processes (default 2; 0 or '' for none)",
    )
    ap.add_argument(
        "--no-lanes",
        action="store_true",
        help="skip the in-process rows (--serial, one and two fast threads)",
    )
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cf-bench-fleet-"))
    rows: list[dict[str, Any]] = []
    try:
        cipher, ids, vectors = build(work / "data", work / "keys", args.templates)
        agents: list[tuple[str, Path, list[str]]] = []
        if args.baseline:
            old = export_tree(args.baseline, work / "old")
            agents.append((f"baseline {args.baseline} (1 thread)", old, []))
        # Quotas off: a load test asks for the same identities far beyond what one
        # gateway may ask an hour (120 verifies of one identity by default).
        this = ["--quota-verify", "0"]
        if not args.no_lanes:
            agents.append(("--serial (one thread, inline PUBACK: as before)", ROOT,
                           [*this, "--serial"]))  # fmt: skip
            agents.append(("lanes, --fast-threads 1", ROOT, [*this, "--fast-threads", "1"]))
            agents.append(("lanes, 2 fast threads, batches of 32", ROOT, this))
        for n in [int(x) for x in args.workers.split(",") if x.strip() and int(x)]:
            agents.append((f"lanes + --workers {n}", ROOT, [*this, "--workers", str(n)]))
        with LocalBroker(profile="dev") as broker:
            for label, tree, extra in agents:
                for g in [int(x) for x in args.gateways.split(",")]:
                    proc = start_cloud(tree, broker.url, work / "data", extra, work / "cloud.log")
                    meter = CpuMeter(proc.pid, getattr(broker, "_proc", None) and broker._proc.pid)
                    try:
                        load = VerifyLoad(
                            host=broker.host,
                            port=broker.port,
                            site=SITE,
                            cipher=cipher,
                            identities=ids,
                            vectors=vectors,
                            gateways=g,
                        )
                        rep = load.run(args.seconds, mark=meter)
                    finally:
                        stop_cloud(proc)
                    row = {"agent": label, **rep.row()}
                    done = max(1, rep.answered - rep.errors)
                    for part, secs in meter.spent.items():
                        row[f"{part}_ms_per_verify"] = round(1e3 * secs / done, 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{platform.node()}: {os.cpu_count()} cores, shared machine; {args.seconds:g} s each;")
    print(f"load average at the end {load} (1/5/15 min); CPU in ms per answered verify")
    print(
        "| agent | gateways | verifies/s | p50 ms | p99 ms | lost | errors | wrong (checked) "
        "| CPU agent / workers / broker / loadgen |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = " / ".join(
            str(r.get(f"{k}_ms_per_verify", "-")) for k in ("cloud", "workers", "broker", "loadgen")
        )
        print(
            f"| {r['agent']} | {r['gateways']} | {r['verifies_per_s']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['resent']} | {r['errors']} | {r['wrong']} ({r['checked']}) "
            f"| {cpu} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
