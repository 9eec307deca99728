"""A private PostgreSQL server on loopback that a test may stop, kill (-9) and restart.

``initdb`` into a temporary directory as the ``postgres`` OS user, with the machine's
PostgreSQL binaries (:func:`cipherface.testing.netns.postgres_bin`), on a free port,
trust authentication for 127.0.0.1 only, ``fsync`` off (the machine never crashes in
these tests; a killed server still recovers from its WAL). The server runs in a
process group of its own, so :meth:`LoopbackPostgres.kill` takes every backend down
at once, like a crash. The machine's own PostgreSQL service is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from cipherface.agents.broker import free_port
from cipherface.testing.netns import as_user, initdb, log_tail, postgres_bin


class LoopbackPostgres:
    """See the module docstring; a context manager (``start`` on enter)."""

    def __init__(self, *, user: str = "postgres") -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin)")
        if os.geteuid() != 0:
            pytest.skip("a private PostgreSQL server runs as its OS user: needs root")
        self.user = user
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cf-pg-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._as_user = as_user(user)
        self.data = initdb(self.bin, self.dir, user)
        (self.data / "pg_hba.conf").write_text("host all postgres 127.0.0.1/32 trust\n")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (recovering from its WAL after a kill); returns once it
        accepts queries."""
        assert self.bin is not None
        log = (self.dir / "server.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                [*self._as_user, str(self.bin / "postgres"), "-D", str(self.data),
                 "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off",
                 "-c", "max_connections=100"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                cwd=self.dir,
            )  # fmt: skip
        finally:
            log.close()
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_tail()}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log_tail()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open transactions roll back, clients are cut."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self._killpg(proc)

    def kill(self) -> None:
        """SIGKILL to every process of the server at once (a crash)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._killpg(proc)

    def _killpg(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10  # backends gone too (they hold shared memory)
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def sql(self, query: str, *args: Any, database: str = "postgres") -> list[Any]:
        """Run one statement on the server (autocommit); its rows."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as c:
            cur = c.execute(query, args or None)
            return cur.fetchall() if cur.description else []

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.dir, lines)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LoopbackPostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
