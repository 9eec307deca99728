"""PostgreSQL locks a worker takes when it (re)connects (issue 11 fleet faults).

A worker connecting to the shared database used to run its schema DDL every time,
``ALTER TABLE cf_blocks ... SET STORAGE`` included: that waits for every open reader
of ``cf_blocks`` -- a ``pg_dump`` holds one for the whole backup -- and every other
worker's block read then queues behind it. One worker restarting during a backup
froze the fleet until the backup ended. Real PostgreSQL (``storekit.pg_url``).
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import numpy as np
import pytest
import storekit

from cipherface.store import open_store
from cipherface.store.postgres import PostgresEngine

pg_url = storekit.pg_url
META = {"scheme": "t", "key_id": "k", "dim": 1, "packing": {"slots": 4}}


def test_a_worker_connecting_during_a_backup_stalls_nobody(pg_url: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    st = open_store(f"{pg_url}#lock-{secrets.token_hex(4)}", meta=META)  # type: ignore[arg-type]
    block = np.arange(192, dtype=np.uint8).reshape(3, 64)
    st.commit(blocks=[st.stage_block("phe-000000", block)], slots=[(0, "a")])
    with psycopg.connect(pg_url) as backup:  # what pg_dump holds while it runs
        backup.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        backup.execute("SELECT count(*) FROM cf_blocks")
        # Another worker process starts now: its own connection (another URL spelling).
        late = threading.Thread(
            target=PostgresEngine, args=(f"{pg_url}?application_name=late",),
            kwargs={"name": "late"}, daemon=True,
        )  # fmt: skip
        late.start()
        time.sleep(0.5)
        got: list[np.ndarray] = []
        reader = threading.Thread(target=lambda: got.append(st.load_block("phe-000000")),
                                  daemon=True)  # fmt: skip
        t0 = time.monotonic()
        reader.start()
        reader.join(10)
        assert got and (got[0] == block).all(), "the first worker's read is stuck"
        assert time.monotonic() - t0 < 5
        late.join(10)
        assert not late.is_alive(), "the new worker could not connect during the backup"
        backup.rollback()
    st.close()


@pytest.mark.slow
def test_a_database_host_cut_off_is_a_storage_error_not_a_hang(tmp_path: Any) -> None:
    """The database host loses its network (no FIN, no RST) while a worker holds a
    connection: its next statement fails with ``storage_error`` within half a minute
    (TCP keepalives and a user timeout on the connection) instead of waiting for the
    kernel's retransmissions (15 minutes), every gallery of the worker with it; once
    the host is back, the worker reconnects by itself."""
    from cipherface.errors import StorageError
    from cipherface.testing.netns import Lan, PrivatePostgres, unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    with Lan() as lan:
        db = lan.host("db")
        lan.attach_here()
        with PrivatePostgres(db) as pg:
            loc = f"{pg.url()}#cut-{secrets.token_hex(4)}"
            st = open_store(loc, meta=META)  # type: ignore[arg-type]
            st.commit(slots=[(0, "a")])
            db.cut()
            outcome: list[BaseException | bool] = []

            def ask() -> None:
                try:
                    outcome.append(st.stale())
                except BaseException as exc:
                    outcome.append(exc)

            asking = threading.Thread(target=ask, daemon=True)
            t0 = time.monotonic()
            asking.start()
            asking.join(60)
            assert outcome, "the worker still waits on the lost database after 60 s"
            assert isinstance(outcome[0], StorageError), outcome
            assert time.monotonic() - t0 < 45
            db.plug()
            deadline = time.monotonic() + 30
            while True:  # reconnects by itself
                try:
                    assert st.stale() is False
                    break
                except StorageError:
                    assert time.monotonic() < deadline
                    time.sleep(1)
            st.close()
