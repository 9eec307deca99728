"""Reload after a restart of one large CKKS gallery, without enrolling it first.

    python bench/bench_reload.py build --size 1000000 --location sqlite:/tmp/g#b/k --dir /tmp/gk
    python bench/bench_reload.py reload --location sqlite:/tmp/g#b/k --dir /tmp/gk --runs 3

``build`` enrolls one real block of 4,096 encrypted templates through ``CkksGallery``
and commits copies of its column and pack blocks (with slot rows) through the store
until ``--size`` templates: minutes instead of bench_store.py's full enrollment, and
the same rows and block sizes. ``reload`` starts a new process per run (page cache
warm) that opens the gallery (every check) and answers its first identify, and prints
one JSON line per run. Run ``reload`` from two source trees on one gallery for an A/B.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cipherface.crypto.ckks import CkksEdgeCipher, CkksGallery, CkksKeys


def build(location: str, keys_dir: Path, size: int) -> None:
    """Make a gallery of ``size`` templates at ``location``; key and probe in ``keys_dir``."""
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    n = keys.public.params.n
    v = np.random.default_rng(0).normal(size=(n, 128))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    keys_dir.mkdir(parents=True, exist_ok=True)
    (keys_dir / "public.key").write_bytes(keys.public_key_bytes())
    (keys_dir / "probe.bin").write_bytes(edge.encrypt_probe(v[5], op="identify"))
    gal = CkksGallery(path=location, public=edge.pub)
    gal.enroll([f"b0-{i}" for i in range(n)], edge.encrypt_templates(v))
    st = gal.store
    col, pack = st.load_block("col-000000"), st.load_block("pack-000000")
    t = time.perf_counter()
    for b in range(1, -(-size // n)):
        st.commit(
            blocks=[st.stage_block(f"col-{b:06d}", col), st.stage_block(f"pack-{b:06d}", pack)],
            slots=[(b * n + i, f"b{b}-{i}") for i in range(n)],
        )
    gal.close()
    print(json.dumps({"templates": -(-size // n) * n, "fill_s": round(time.perf_counter() - t)}))


def child(location: str, keys_dir: Path) -> None:
    """One restarted cloud: open, first identify, a second (warm) identify."""
    pub = CkksKeys.from_public_bytes((keys_dir / "public.key").read_bytes()).public
    probe = (keys_dir / "probe.bin").read_bytes()
    t = time.perf_counter()
    gal = CkksGallery(path=location, public=pub)
    opened = time.perf_counter()
    gal.identify(probe)
    first = time.perf_counter()
    gal.identify(probe)
    warm = time.perf_counter()
    gal.close()
    row = {"open_s": opened - t, "first_identify_s": first - opened}
    row["warm_identify_s"] = warm - first
    print(json.dumps({k: round(x, 2) for k, x in row.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["build", "reload", "child"])
    ap.add_argument("--location", required=True)
    ap.add_argument("--dir", required=True, help="where the public key and probe live")
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    keys_dir = Path(args.dir)
    if args.what == "build":
        build(args.location, keys_dir, args.size)
    elif args.what == "child":
        child(args.location, keys_dir)
    else:
        cmd = [sys.executable, __file__, "child", "--location", args.location, "--dir", args.dir]
        for _ in range(args.runs):
            load = os.getloadavg()[0]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["reload_s"] = round(row["open_s"] + row["first_identify_s"], 2)
            print(json.dumps({**row, "load_1min": round(load, 2)}), flush=True)


if __name__ == "__main__":
    main()
