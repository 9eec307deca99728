"""What storing a write's reply with its commit costs (issue 11), SQLite and PostgreSQL.

    python bench/bench_replies.py                       # 300 commits each way, 20,000 to prune
    python bench/bench_replies.py --commits 1000 --prune 100000

Per engine: the median time of a one-slot commit without and with a reply (the two
interleaved, so load drifts hit both), the reply lookup a write does before it runs
(``find_reply``), and pruning ``--prune`` expired replies in batches of 1,000 (each its
own statement): the total and the mean time of one batch. PostgreSQL runs in a database of its own,
dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from cipherface.store import open_store
from cipherface.store.base import GalleryStore
from cipherface.store.replies import REPLY_TTL_S, Reply

META = {"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}}
REPLY = b"x" * 180  # an encoded enroll result is about this long


def _reply(rid: str) -> Reply:
    return Reply(("site", "gw", rid), lambda n, v: REPLY)


def commits(st: GalleryStore, n: int) -> dict[str, float]:
    plain, answered, lookups = [], [], []
    for i in range(n):
        slot = len(st.slots)
        t = time.perf_counter()
        st.commit(slots=[(slot, f"p{i}")])
        plain.append(time.perf_counter() - t)
        rid = secrets.token_hex(16)
        t = time.perf_counter()
        st.find_reply(("site", "gw", rid))
        lookups.append(time.perf_counter() - t)
        t = time.perf_counter()
        st.commit(slots=[(slot + 1, f"q{i}")], reply=_reply(rid))
        answered.append(time.perf_counter() - t)
    ms = 1000.0
    return {
        "commit_ms": statistics.median(plain) * ms,
        "commit_with_reply_ms": statistics.median(answered) * ms,
        "lookup_ms": statistics.median(lookups) * ms,
    }


def prune(st: GalleryStore, loc: str, n: int) -> dict[str, float]:
    """Insert ``n`` expired replies behind the store's back, then time the prune."""
    old = time.time() - 2 * REPLY_TTL_S
    rows = [("site", "old", f"{i:032x}", REPLY) for i in range(n)]
    if loc.startswith("sqlite:"):
        db = sqlite3.connect(Path(loc[len("sqlite:") :].partition("#")[0]) / "gallery.sqlite3")
        db.executemany(
            "INSERT INTO replies (site, gw, rid, reply, stored_at) VALUES (?,?,?,?,?)",
            [(*r, old) for r in rows],
        )
        db.commit()
        db.close()
    else:
        import psycopg

        with psycopg.connect(loc.partition("#")[0], autocommit=True) as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO cf_replies (site, gw, rid, reply, stored_at) "
                    "VALUES (%s,%s,%s,%s,now() - interval '2 days')",
                    rows,
                )
    t = time.perf_counter()
    done = st.prune_replies(REPLY_TTL_S)
    total = time.perf_counter() - t
    batches = max(1, -(-done // 1000))
    return {"pruned": done, "prune_s": total, "batch_ms": total / batches * 1000.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--prune", type=int, default=20_000)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        locations = {"sqlite": f"sqlite:{Path(tmp) / 'g'}#bench/k"}
        dbname = f"cf_bench_replies_{secrets.token_hex(4)}"
        import psycopg

        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{dbname}"')
        locations["postgresql"] = f"{args.pg.rsplit('/', 1)[0]}/{dbname}#bench/k"
        try:
            for name, loc in locations.items():
                st = open_store(loc, meta=META)
                try:
                    got = commits(st, args.commits) | prune(st, loc, args.prune)
                finally:
                    st.close()
                print(name, {k: round(v, 3) for k, v in got.items()})
        finally:
            from cipherface.store.postgres import _Shared

            _Shared.close_all()
            with psycopg.connect(args.pg, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
