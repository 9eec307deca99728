"""Replies of writes stay exactly-once across workers and crashes (issue 11).

The reply of an enroll or delete is stored in the gallery store, in the transaction of
the change it answers: a write retried with the same id on another worker, redelivered
after a worker died between its commit and its reply, or received by two workers at
once is answered with the same bytes and changes the gallery once.

Real Mosquitto (conftest ``broker``), real PostgreSQL (a database per test), real CKKS.
Two in-process workers use two PostgreSQL connections (two URLs), as two processes do.
"""

from __future__ import annotations

import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
import storekit
from paho.mqtt.enums import CallbackAPIVersion
from vectors import unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import sites
from cipherface.crypto.engine import EdgeCipher
from cipherface.protocol import (
    Delete,
    Enroll,
    Result,
    decode,
    encode,
    error_topic,
    request_topic,
    result_topic,
)
from cipherface.store import gallery_location

GW = "door"
NAMES = ["ann", "bob", "cid"]


@pytest.fixture
def site() -> str:
    return f"r{secrets.token_hex(4)}"


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped after."""
    name = f"cf_replies_{os.getpid()}_{secrets.token_hex(4)}"
    with storekit._admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{storekit.PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    finally:
        from cipherface.store.postgres import _Shared

        _Shared.close_all()
        with storekit._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _conn_of(url: str, worker: str) -> str:
    """The same database under another URL: another connection, as another process."""
    return f"{url}?application_name=cf_{worker}"


class Sniffer:
    """A plain MQTT client: publishes raw requests, collects the replies of one gateway."""

    def __init__(self, url: str, site: str) -> None:
        cfg = BrokerConfig(url=url)
        self.got: queue.Queue[bytes] = queue.Queue()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"sniff-{secrets.token_hex(4)}",
            protocol=paho.MQTTv5,
        )
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.got.put(bytes(m.payload))
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(cfg.host, cfg.port)
        self.client.loop_start()
        self.client.subscribe([(result_topic(site, GW), 1), (error_topic(site, GW), 1)])
        assert subscribed.wait(5), "no SUBACK"

    def send(self, msg: Enroll | Delete) -> None:
        topic = request_topic(msg.site, msg.gw, msg.TYPE)
        self.client.publish(topic, encode(msg), qos=1).wait_for_publish(5)

    def replies(self, corr: str, n: int = 1, timeout: float = 30.0) -> list[bytes]:
        """The next ``n`` replies (results or errors) to request ``corr``."""
        deadline, out = time.monotonic() + timeout, []
        while len(out) < n:
            data = self.got.get(timeout=max(0.01, deadline - time.monotonic()))
            if getattr(decode(data), "corr", None) == corr:
                out.append(data)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sniffer(broker: Any, site: str) -> Iterator[Sniffer]:
    s = Sniffer(broker.url, site)
    yield s
    s.close()


def _replica(data: Path, cipher: EdgeCipher, site: str) -> None:
    """A worker's data directory: the site's registered key."""
    kd = data / site / "keys" / cipher.key_id
    kd.mkdir(parents=True)
    (kd / sites.PUBLIC_NAME).write_bytes(cipher.public_key_bytes())
    (data / site / "current").write_text(cipher.key_id)


def _seed(where: str, cipher: EdgeCipher, people: np.ndarray) -> None:
    g = sites.open_gallery(where, cipher.public_key_bytes())
    try:
        g.enroll(NAMES, cipher.encrypt_templates(people[: len(NAMES)]))
    finally:
        g.close()


def _state(where: str, cipher: EdgeCipher) -> tuple[list[str | None], int, int]:
    """The committed gallery: its slots, ``ids_version`` and commit ``seq``."""
    g = sites.open_gallery(where, cipher.public_key_bytes())
    try:
        store = g.store  # type: ignore[attr-defined]
        return g.ids(), g.ids_version, store.seq
    finally:
        g.close()


def _write(op: str, site: str, cipher: EdgeCipher, people: np.ndarray) -> Enroll | Delete:
    """An enroll of a new identity, or a delete of two enrolled ones."""
    if op == "enroll":
        payload = cipher.encrypt_templates(people[3:4])
        return Enroll(site=site, gw=GW, kid=cipher.key_id, ids=("dan",), payload=payload)
    return Delete(site=site, gw=GW, kid=cipher.key_id, ids=("ann", "bob", "nobody"))


def _check_reply(data: bytes, op: str) -> Result:
    reply = decode(data)
    assert isinstance(reply, Result), reply
    if op == "enroll":
        assert reply.enrolled == 1
    else:
        assert reply.deleted == 2
    return reply


def _agent(broker: Any, data: Path, site: str, store: str, **kw: Any) -> CloudAgent:
    return kw.pop("cls", CloudAgent)(
        broker=BrokerConfig(url=broker.url),
        data_dir=data,
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        store=store,
        **kw,
    )


# ------------------------------------------------ (1) a retry lands on another worker
@pytest.mark.parametrize("op", ["enroll", "delete"])
def test_a_write_retried_on_another_worker_is_answered_from_the_store(
    op: str,
    broker: Any,
    tmp_path: Path,
    cipher: EdgeCipher,
    site: str,
    pg_db: str,
    sniffer: Sniffer,
) -> None:
    """Worker A answers a write and stops; the edge's retry (same id) reaches worker B
    of the same share group: B answers A's reply byte for byte and changes nothing."""
    people = unit(np.random.default_rng(3), 4)
    where = gallery_location(pg_db, site, cipher.key_id, tmp_path / "probe")
    _seed(where, cipher, people)
    group = f"g{secrets.token_hex(4)}"
    for w in ("a", "b"):
        _replica(tmp_path / w, cipher, site)
    msg = _write(op, site, cipher, people)

    a = _agent(broker, tmp_path / "a", site, _conn_of(pg_db, "a"), share_group=group)
    a.start()
    try:
        sniffer.send(msg)
        [first] = sniffer.replies(msg.id)
    finally:
        a.stop(retire=True)
    reply = _check_reply(first, op)
    answered = _state(where, cipher)
    assert answered[1] == reply.ids_version

    b = _agent(broker, tmp_path / "b", site, _conn_of(pg_db, "b"), share_group=group)
    b.start()
    try:
        sniffer.send(msg)  # the edge's retry after its timeout: the same message id
        [second] = sniffer.replies(msg.id)
    finally:
        b.stop(retire=True)
    assert second == first
    assert _state(where, cipher) == answered  # not run again: no slot, no commit
    assert b.stats["duplicates"] == 1


# --------------------------------------- (2) killed between its commit and its reply
_KILLED_AFTER_COMMIT = """
import os, signal, sys
from cipherface.store import base

_commit = base.GalleryStore.commit

def commit(self, *args, **kw):
    _commit(self, *args, **kw)
    os.kill(os.getpid(), signal.SIGKILL)  # committed; no reply ever goes out

base.GalleryStore.commit = commit
from cipherface.agents.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _worker(
    script: str, url: str, data: Path, agent_id: str, site: str, group: str, store: str, log: Path
) -> subprocess.Popen[bytes]:
    """A ``cipherface cloud`` process (``script`` runs the CLI, maybe with a fault)."""
    cmd = [sys.executable, "-c", script, "cloud", "--broker", url, "--data", str(data)]
    cmd += ["--agent-id", agent_id, "--sites", site, "--share-group", group, "--store", store]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 60
    while b"serving" not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    return proc


_CLI = "import sys\nfrom cipherface.agents.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
@pytest.mark.parametrize("op", ["enroll", "delete"])
def test_a_worker_killed_after_its_commit_answers_the_redelivery_from_the_store(
    op: str,
    engine: str,
    broker: Any,
    tmp_path: Path,
    cipher: EdgeCipher,
    site: str,
    sniffer: Sniffer,
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL right after the gallery commit, before the reply is published: the
    request is unacknowledged, so the broker redelivers it to the restarted worker,
    which answers it from the store -- the gallery changed once."""
    store = request.getfixturevalue("pg_db") if engine == "postgresql" else "sqlite:"
    people = unit(np.random.default_rng(5), 4)
    data = tmp_path / "w"
    _replica(data, cipher, site)
    where = gallery_location(store, site, cipher.key_id, data)
    _seed(where, cipher, people)
    seeded = _state(where, cipher)
    agent_id, group = f"cloud-{secrets.token_hex(4)}", f"g{secrets.token_hex(4)}"
    args = (broker.url, data, agent_id, site, group, store)

    doomed = _worker(_KILLED_AFTER_COMMIT, *args, tmp_path / "killed.log")
    msg = _write(op, site, cipher, people)
    sniffer.send(msg)
    assert doomed.wait(30) == -9
    committed = _state(where, cipher)
    assert committed[2] == seeded[2] + 1  # the change is durable, its reply never left
    assert sniffer.got.empty()

    worker = _worker(_CLI, *args, tmp_path / "restarted.log")
    try:
        [data_] = sniffer.replies(msg.id)
    finally:
        worker.terminate()
        worker.wait(30)
    reply = _check_reply(data_, op)
    assert reply.ids_version == committed[1]
    assert _state(where, cipher) == committed  # answered, not run again
    if engine == "postgresql":
        import psycopg

        with psycopg.connect(store) as conn:
            row = conn.execute(
                "SELECT reply FROM cf_replies WHERE site = %s AND gw = %s AND rid = %s",
                (site, GW, msg.id),
            ).fetchone()
        assert row is not None and bytes(row[0]) == data_  # the stored reply, as stored


# -------------------------------------------- (3) two workers get one id at once
class _Gated(CloudAgent):
    """Holds each write after its duplicate check until the other worker has done its
    own: both find no reply, both run the write, both try to commit."""

    barrier: threading.Barrier | None = None

    def _admit(self, topic: str, payload: bytes, *, correlation: bytes | None = None) -> Any:
        got = super()._admit(topic, payload, correlation=correlation)
        if self.barrier is not None and topic.endswith(("/enroll", "/delete")):
            self.barrier.wait(30)
        return got


@pytest.mark.parametrize("op", ["enroll", "delete"])
def test_one_write_received_by_two_workers_at_once_has_one_effect_and_one_reply(
    op: str,
    broker: Any,
    tmp_path: Path,
    cipher: EdgeCipher,
    site: str,
    pg_db: str,
    sniffer: Sniffer,
) -> None:
    """Two workers both receive the same write (as when the edge's retry reaches a second
    worker while the first is still at it): one commit wins, the other finds the winner's
    reply in the store under the gallery row's lock and sends those bytes."""
    people = unit(np.random.default_rng(7), 4)
    where = gallery_location(pg_db, site, cipher.key_id, tmp_path / "probe")
    _seed(where, cipher, people)
    before = _state(where, cipher)
    barrier = threading.Barrier(2)
    workers = []
    for w in ("a", "b"):
        _replica(tmp_path / w, cipher, site)
        # A share group each: both receive every request (and start() returns once its
        # subscriptions deliver: the share self-test).
        group = f"g{secrets.token_hex(4)}"
        agent = _agent(
            broker, tmp_path / w, site, _conn_of(pg_db, w), share_group=group, cls=_Gated
        )
        agent.barrier = barrier
        workers.append(agent)
    msg = _write(op, site, cipher, people)
    try:
        for agent in workers:
            agent.start()
        sniffer.send(msg)
        first, second = sniffer.replies(msg.id, n=2)
    finally:
        for agent in workers:
            agent.stop(retire=True)
    assert not barrier.broken
    assert second == first
    reply = _check_reply(first, op)
    slots, version, seq = _state(where, cipher)
    assert version == reply.ids_version == before[1] + 1 and seq == before[2] + 1
    if op == "enroll":
        assert slots.count("dan") == 1
    assert sum(w.stats["duplicates"] for w in workers) == 1


# ------------------------------------------------------------- one host (SQLite)
def _handle(agent: CloudAgent, msg: Any) -> bytes:
    [out] = agent.handle(request_topic(msg.site, msg.gw, msg.TYPE), encode(msg))
    return out.payload


def _fresh(data: Path, site: str) -> CloudAgent:
    """A cloud agent on ``data`` (not connected: :meth:`CloudAgent.handle` only)."""
    return CloudAgent(broker=BrokerConfig(), data_dir=data, sites=[site])


def test_replies_outlive_a_restart_on_sqlite(tmp_path: Path, cipher: EdgeCipher, site: str) -> None:
    """A delete that found nothing (its reply stored alone), a delete on a site that has
    no key yet (no gallery: a file), and an enroll: each answered the same by the next
    incarnation, which runs none of them again."""
    people = unit(np.random.default_rng(9), 4)
    nokey = Delete(site=site, gw=GW, ids=("ann",))
    first = _fresh(tmp_path, site)
    sent = {nokey.id: _handle(first, nokey)}
    _replica(tmp_path, cipher, site)
    _seed(gallery_location("sqlite:", site, cipher.key_id, tmp_path), cipher, people)
    writes = [
        Delete(site=site, gw=GW, kid=cipher.key_id, ids=("nobody",)),
        _write("enroll", site, cipher, people),
    ]
    for msg in writes:
        sent[msg.id] = _handle(first, msg)
    first.keys.close()
    where = gallery_location("sqlite:", site, cipher.key_id, tmp_path)
    before = _state(where, cipher)
    second = _fresh(tmp_path, site)
    try:
        for msg in [nokey, *writes]:
            assert _handle(second, msg) == sent[msg.id]
        assert second.stats["duplicates"] == 3
    finally:
        second.keys.close()
    assert _state(where, cipher) == before
    assert decode(sent[nokey.id]).deleted == 0  # type: ignore[union-attr]


def test_a_reply_kept_in_a_file_by_an_earlier_version_still_answers(
    tmp_path: Path, cipher: EdgeCipher, site: str
) -> None:
    """Upgrade: replies that earlier versions kept in ``<data>/<site>/replies/`` answer
    their redeliveries until they expire, then are pruned."""
    people = unit(np.random.default_rng(4), 4)
    _replica(tmp_path, cipher, site)
    where = gallery_location("sqlite:", site, cipher.key_id, tmp_path)
    _seed(where, cipher, people)
    msg = _write("enroll", site, cipher, people)
    kept = encode(Result(site=site, gw=GW, corr=msg.id, kid=cipher.key_id, op="enroll",
                         ids_version=7, enrolled=1))  # fmt: skip
    path = tmp_path / site / "replies" / f"{GW}.{msg.id}"
    path.parent.mkdir(parents=True)
    path.write_bytes(kept)
    agent = _fresh(tmp_path, site)
    try:
        assert _handle(agent, msg) == kept
        assert "dan" not in agent.keys.gallery(site, cipher.key_id).ids()
        old = time.time() - 2 * 24 * 3600
        os.utime(path, (old, old))
        agent._prune_replies()
        assert not path.exists()
    finally:
        agent.keys.close()
