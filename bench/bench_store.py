"""Gallery stores side by side in one run: the old journal store, SQLite, PostgreSQL.

    python bench/bench_store.py                   # 1 M x 128-d CKKS templates per store
    python bench/bench_store.py --size 100000     # smaller
    python bench/bench_store.py --pg postgresql://postgres@127.0.0.1:5432/postgres

For each store: bulk enroll rate (through ``CkksGallery.enroll``, one encrypted block of
4,096 templates reused for every block, so edge encryption is not measured), identify
latency (cloud time, median of 3 after a warm-up, the stores interleaved), reload after
a restart (a new process: open with its checks, then the first identify; the page cache
is warm), disk bytes per template, and the time to drop one fully deleted block (delete
its ids) and to run ``compact``. PostgreSQL runs in a database of its own, dropped
afterwards. Writes bench/results/store.json (with the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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


@contextmanager
def old_store() -> Iterator[None]:
    """CkksGallery on the old journal store (kept in tests/ for the migration tests)."""
    import legacy_store

    orig = ckks_gallery.GalleryStore
    ckks_gallery.GalleryStore = legacy_store.GalleryStore  # type: ignore[assignment]
    try:
        yield
    finally:
        ckks_gallery.GalleryStore = orig  # type: ignore[assignment]


class Store:
    """One store under test: where its gallery lives, how big it is on disk, compaction."""

    def __init__(
        self,
        name: str,
        location: str,
        size_of: Callable[[], int],
        compact: Callable[[], float] | None,
        legacy: bool = False,
    ) -> None:
        self.name, self.location, self.size_of = name, location, size_of
        self.compact, self.legacy = compact, legacy
        self.row: dict[str, Any] = {"store": name}

    def open(self, edge: CkksEdgeCipher) -> CkksGallery:
        with old_store() if self.legacy else nullcontext():
            return CkksGallery(path=self.location, public=edge.pub)

    def restart(self, scratch: Path) -> dict[str, float]:
        """Reload in a new process, as after a restart: ``open_s``, ``first_identify_s``
        (inside it) and ``process_s`` (from its start, imports included)."""
        cmd = [sys.executable, __file__, "--reload-child", self.location, "--dir", str(scratch)]
        if self.legacy:
            cmd.append("--legacy")
        t = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        got: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        got["process_s"] = time.perf_counter() - t
        return got


def reload_child(location: str, scratch: Path, legacy: bool) -> None:
    """The restarted cloud: key and probe from ``scratch``, open, first identify."""
    pub = CkksKeys.from_public_bytes((scratch / "public.key").read_bytes()).public
    probe = (scratch / "probe.bin").read_bytes()
    with old_store() if legacy else nullcontext():
        t = time.perf_counter()
        gal = CkksGallery(path=location, public=pub)
    open_s = time.perf_counter() - t
    first = _identify(gal, probe)
    gal.close()
    print(json.dumps({"open_s": open_s, "first_identify_s": first}))


def run(
    stores: list[Store],
    edge: CkksEdgeCipher,
    payload: bytes,
    probe: bytes,
    size: int,
    scratch: Path,
) -> None:
    """Enroll each store in turn, then measure identify interleaved (so a busy machine
    slows every store alike), then reload (new process), drop and compact each in turn."""
    N = edge.pub.params.n
    nblocks = -(-size // N)
    gals = {}
    for st in stores:
        gal = st.open(edge)
        t = time.perf_counter()
        for b in range(nblocks):
            gal.enroll([f"b{b}-{i}" for i in range(N)], payload)
        enroll_s = time.perf_counter() - t
        st.row.update(templates=nblocks * N, enroll_per_s=round(nblocks * N / enroll_s))
        st.row["enroll_s"] = round(enroll_s, 1)
        gal.identify(probe)  # warm: every column block in memory
        gals[st.name] = gal
    times: dict[str, list[float]] = {st.name: [] for st in stores}
    for _ in range(3):
        for st in stores:
            times[st.name].append(_identify(gals[st.name], probe))
    for st in stores:
        st.row["identify_s"] = round(statistics.median(times[st.name]), 3)
        gals[st.name].close()
    for st in stores:
        got = st.restart(scratch)
        st.row.update(
            reload_open_s=round(got["open_s"], 2),
            reload_first_identify_s=round(got["first_identify_s"], 2),
            reload_total_s=round(got["open_s"] + got["first_identify_s"], 2),
            restart_process_s=round(got["process_s"], 2),
            disk_bytes_per_template=round(st.size_of() / (nblocks * N)),
        )
        gal = st.open(edge)
        t = time.perf_counter()
        gal.delete([f"b0-{i}" for i in range(N)])  # block 0 dies whole and is dropped
        st.row["drop_block_s"] = round(time.perf_counter() - t, 3)
        gal.close()
        st.row["compact_s"] = round(st.compact(), 2) if st.compact else None
        print(json.dumps(st.row), flush=True)


def _timed_compact(loc: str) -> Callable[[], float]:
    def go() -> float:
        from cipherface.store.tools import compact

        t = time.perf_counter()
        compact(loc)
        return time.perf_counter() - t

    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--stores", default="legacy,sqlite,postgresql")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", default=str(HERE / "results" / "store.json"))
    ap.add_argument("--reload-child", metavar="LOCATION", help=argparse.SUPPRESS)
    ap.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reload_child:
        reload_child(args.reload_child, Path(args.dir), args.legacy)
        return
    load_before = os.getloadavg()
    keys = CkksKeys.generate(dim=128)
    edge = CkksEdgeCipher(keys=keys)
    N = keys.public.params.n
    rng = np.random.default_rng(0)
    v = rng.normal(size=(N, 128))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    payload = edge.encrypt_templates(v)
    probe = edge.encrypt_probe(v[5], op="identify")
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-store-"))
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "public.key").write_bytes(keys.public_key_bytes())
    (scratch / "probe.bin").write_bytes(probe)
    wanted = args.stores.split(",")
    stores: list[Store] = []
    pg_db = None
    try:
        if "legacy" in wanted:
            d_old = scratch / "legacy"
            stores.append(Store("old journal store", str(d_old), lambda: _du(d_old), None, True))
        if "sqlite" in wanted:
            d_sql = scratch / "sqlite"
            loc_sql = f"sqlite:{d_sql}#bench/k"
            stores.append(Store("SQLite", loc_sql, lambda: _du(d_sql), _timed_compact(loc_sql)))
        if "postgresql" in wanted:
            import psycopg

            pg_db = f"cf_bench_{secrets.token_hex(4)}"
            with psycopg.connect(args.pg, autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{pg_db}"')
            url = args.pg.rsplit("/", 1)[0] + "/" + pg_db

            def pg_size() -> int:
                with psycopg.connect(url) as c:
                    row = c.execute("SELECT pg_database_size(current_database())").fetchone()
                    return int(row[0]) if row else 0

            loc_pg = f"{url}#bench/k"
            stores.append(Store("PostgreSQL", loc_pg, pg_size, _timed_compact(loc_pg)))
        run(stores, edge, payload, probe, args.size, scratch)
    finally:
        if pg_db is not None:
            import psycopg

            from cipherface.store.postgres import _Shared

            _Shared.close_all()
            with psycopg.connect(args.pg, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = [st.row for st in stores]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = {"before": load_before, "after": os.getloadavg()}
    out.write_text(json.dumps({"size": args.size, "load": load, "rows": rows}, indent=2) + "\n")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load['after']}")
    keys_ = list(rows[0]) if rows else []
    print("| " + " | ".join(keys_) + " |")
    print("|" + "---|" * len(keys_))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys_) + " |")
    os.sync()


if __name__ == "__main__":
    main()
