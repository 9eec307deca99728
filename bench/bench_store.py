"""Gallery stores side by side in one run: the old journal store, SQLite, PostgreSQL.

    python bench/bench_store.py                   # 1 M x 128-d CKKS templates per store
    python bench/bench_store.py --size 100000     # smaller
    python bench/bench_store.py --pg postgresql://postgres@127.0.0.1:5432/postgres

For each store: bulk enroll rate (through ``CkksGallery.enroll``, one encrypted block of
4,096 templates reused for every block, so edge encryption is not measured), identify
latency (cloud time, median of 3 after a warm-up), reload after a restart (open with
every block verified, then the first identify), disk bytes per template, and the time
to drop one fully deleted block (delete its ids) and to run ``compact``. PostgreSQL runs
in a database of its own, dropped afterwards. Writes bench/results/store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cipherface.crypto import ckks_gallery
from cipherface.crypto.ckks import CkksEdgeCipher, CkksGallery, CkksKeys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the old store, kept for the migration tests


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _identify(gal: CkksGallery, probe: bytes) -> float:
    t = time.perf_counter()
    gal.identify(probe)
    return time.perf_counter() - t


def run_one(
    name: str,
    location: str,
    size_of: Callable[[], int],
    edge: CkksEdgeCipher,
    payload: bytes,
    probe: bytes,
    size: int,
    compact: Callable[[], float] | None,
) -> dict[str, Any]:
    N = edge.pub.params.n
    gal = CkksGallery(path=location, public=edge.pub)
    nblocks = -(-size // N)
    t = time.perf_counter()
    for b in range(nblocks):
        gal.enroll([f"b{b}-{i}" for i in range(N)], payload)
    enroll_s = time.perf_counter() - t
    _identify(gal, probe)  # warm: every column block in memory
    ident = statistics.median(_identify(gal, probe) for _ in range(3))
    gal.close()
    t = time.perf_counter()
    gal = CkksGallery(path=location, public=edge.pub)
    open_s = time.perf_counter() - t
    first = _identify(gal, probe)
    reload_s = time.perf_counter() - t
    disk = size_of()
    t = time.perf_counter()
    gal.delete([f"b0-{i}" for i in range(N)])  # block 0 dies whole and is dropped
    drop_s = time.perf_counter() - t
    gal.close()
    row = {
        "store": name,
        "templates": nblocks * N,
        "enroll_per_s": round(nblocks * N / enroll_s),
        "enroll_s": round(enroll_s, 1),
        "identify_s": round(ident, 3),
        "reload_open_s": round(open_s, 2),
        "reload_first_identify_s": round(first, 2),
        "reload_total_s": round(reload_s, 2),
        "disk_bytes_per_template": round(disk / (nblocks * N)),
        "drop_block_s": round(drop_s, 3),
        "compact_s": round(compact(), 2) if compact else None,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--stores", default="legacy,sqlite,postgresql")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", default=str(HERE / "results" / "store.json"))
    args = ap.parse_args()
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    N = keys.public.params.n
    rng = np.random.default_rng(0)
    v = rng.normal(size=(N, 128))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    payload = edge.encrypt_templates(v)
    probe = edge.encrypt_probe(v[5], op="identify")
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-store-"))
    rows = []
    wanted = args.stores.split(",")
    try:
        if "legacy" in wanted:
            import legacy_store

            orig = ckks_gallery.GalleryStore
            ckks_gallery.GalleryStore = legacy_store.GalleryStore  # type: ignore[assignment]
            try:
                d = scratch / "legacy"
                rows.append(
                    run_one(
                        "old journal store",
                        str(d),
                        lambda: _du(d),
                        edge,
                        payload,
                        probe,
                        args.size,
                        None,
                    )
                )
            finally:
                ckks_gallery.GalleryStore = orig  # type: ignore[assignment]
            shutil.rmtree(d)
        if "sqlite" in wanted:
            from cipherface.store.tools import compact

            d = scratch / "sqlite"
            loc = f"sqlite:{d}#bench/k"

            def timed_compact(loc: str = loc) -> float:
                t = time.perf_counter()
                compact(loc)
                return time.perf_counter() - t

            rows.append(
                run_one(
                    "SQLite", loc, lambda: _du(d), edge, payload, probe, args.size, timed_compact
                )
            )
            shutil.rmtree(d)
        if "postgresql" in wanted:
            import psycopg

            from cipherface.store.postgres import _Shared
            from cipherface.store.tools import compact

            db = f"cf_bench_{secrets.token_hex(4)}"
            with psycopg.connect(args.pg, autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{db}"')
            url = args.pg.rsplit("/", 1)[0] + "/" + db
            loc = f"{url}#bench/k"

            def pg_size() -> int:
                with psycopg.connect(url) as c:
                    row = c.execute("SELECT pg_database_size(current_database())").fetchone()
                    return int(row[0]) if row else 0

            def pg_compact(loc: str = loc) -> float:
                t = time.perf_counter()
                compact(loc)
                return time.perf_counter() - t

            try:
                rows.append(
                    run_one("PostgreSQL", loc, pg_size, edge, payload, probe, args.size, pg_compact)
                )
            finally:
                _Shared.close_all()
                with psycopg.connect(args.pg, autocommit=True) as c:
                    c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": args.size, "rows": rows}, indent=2) + "\n")
    keys_ = list(rows[0]) if rows else []
    print("| " + " | ".join(keys_) + " |")
    print("|" + "---|" * len(keys_))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys_) + " |")
    os.sync()


if __name__ == "__main__":
    main()
