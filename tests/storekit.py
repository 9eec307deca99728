"""Shared helpers of the storage tests: a throw-away PostgreSQL database, gallery
locations for both engines, and the cloud's request plumbing without a broker."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_ADMIN = os.environ.get("CIPHERFACE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> Any:
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 not installed (extra 'postgres')")
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN} ({type(exc).__name__}); set CIPHERFACE_TEST_PG")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of this test session's own on the PostgreSQL server, dropped after."""
    name = f"cf_test_{os.getpid()}_{secrets.token_hex(4)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        from cipherface.store.postgres import _Shared

        _Shared.close_all()
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh gallery location on each engine."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'g'}#site-a/k1"
    url = request.getfixturevalue("pg_url")
    return f"{url}#t-{secrets.token_hex(6)}"


def corrupt_sql(location: str, sql: str, *args: Any) -> None:
    """Change a gallery's rows behind the store's back (as damage or an attacker would)."""
    from cipherface.store import split_location

    engine, where, label = split_location(location)
    if engine == "sqlite":
        import sqlite3

        db = sqlite3.connect(Path(where) / "gallery.sqlite3", isolation_level=None)
        try:
            db.execute(sql.replace("%s", "?"), args)
        finally:
            db.close()
        return
    import psycopg

    sql = sql.replace("FROM slots", "FROM cf_slots").replace("UPDATE slots", "UPDATE cf_slots")
    sql = sql.replace("FROM blocks", "FROM cf_blocks").replace("UPDATE blocks", "UPDATE cf_blocks")
    sql = sql.replace("UPDATE gallery", "UPDATE cf_galleries")
    where_gid = "gid = (SELECT gid FROM cf_galleries WHERE name = %s)"
    sql += (" AND " if " WHERE " in sql else " WHERE ") + where_gid
    with psycopg.connect(where, autocommit=True) as conn:
        conn.execute(sql, (*args, label))
