"""How fast one gateway adds stored replies with deletes of absent ids, and their size.

    python bench/bench_reply_flood.py                  # SQLite, 1,000 deletes
    python bench/bench_reply_flood.py --store postgresql://postgres@127.0.0.1:5432/DB

Each delete stores a reply for a day (docs/storage.md "Replies"); quotas are off here,
so the figure is what the writes quota (``--quota-writes``) bounds.
"""

from __future__ import annotations

import argparse
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.quota import QuotaPolicy
from cipherface.crypto import sites
from cipherface.protocol import Delete, KeyPublish, encode, request_topic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", default="sqlite:")
    ap.add_argument("-n", type=int, default=1000)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    sites.generate_key_dir(d / "key", dim=128)
    cipher = sites.load_edge_cipher(d / "key")
    site = f"fl{secrets.token_hex(3)}"
    off = QuotaPolicy(identify_per_hour=0, verify_per_identity_per_hour=0, writes_per_hour=0)
    agent = CloudAgent(
        broker=BrokerConfig(), data_dir=d / "data", sites=[site], store=args.store, quotas=off
    )

    def ask(m: Any) -> bytes:
        [out] = agent.handle(request_topic(m.site, m.gw, m.TYPE), encode(m))
        return out.payload

    ask(KeyPublish(site=site, gw="door", kid=cipher.key_id, scheme="ckks",
                   public_key=cipher.public_key_bytes()))  # fmt: skip
    t = time.perf_counter()
    for _ in range(args.n):
        reply = ask(Delete(site=site, gw="door", kid=cipher.key_id, ids=("nobody",)))
    dt = time.perf_counter() - t
    if args.store.startswith("sqlite"):
        path = next((d / "data").rglob("gallery.sqlite3"))
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT count(*) FROM replies").fetchone()[0]
        size = path.stat().st_size
    else:
        import psycopg

        with psycopg.connect(args.store) as conn:
            rows, size = conn.execute(
                "SELECT count(*), pg_total_relation_size('cf_replies') FROM cf_replies "
                "WHERE site = %s",
                (site,),
            ).fetchone()
    agent.keys.close()
    print(
        f"{args.n} deletes of absent ids in {dt:.2f} s = {args.n / dt:.0f}/s; "
        f"reply {len(reply)} B; {rows} rows stored, {size} bytes on disk "
        f"({size / max(1, rows):.0f} B a row: the table's whole size, PostgreSQL's every site)"
    )


if __name__ == "__main__":
    main()
