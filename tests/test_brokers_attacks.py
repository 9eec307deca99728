"""Brokers without shared subscriptions, and the share self-test, under attack
(issue 11): workers on plain subscriptions answering every request twice, a broker
restarted mid-stream, and a worker whose session remembers a fallback.

Real NATS (its MQTT gateway, started here: ``agents/brokers.py``), real Mosquitto,
real CKKS galleries on SQLite and PostgreSQL.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import storekit
from vectors import unit

from cipherface.agents.broker import BrokerUnavailableError
from cipherface.agents.brokers import NatsBroker
from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.quota import QuotaPolicy
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import PeerReportedError
from cipherface.protocol import IdsGet

pg_url = storekit.pg_url
OFF = QuotaPolicy(identify_per_hour=0, verify_per_identity_per_hour=0)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsBroker]:
    try:
        broker = NatsBroker(workdir=tmp_path / "nats")
    except BrokerUnavailableError as exc:
        pytest.skip(str(exc))
    with broker:
        yield broker


def _agent(url: str, data: Path, site: str, *, version: str = "3.1.1", **kw: Any) -> CloudAgent:
    agent = CloudAgent(broker=BrokerConfig(url=url, mqtt_version=version),  # type: ignore[arg-type]
                       data_dir=data, agent_id=kw.pop("agent_id", f"cloud-{secrets.token_hex(4)}"),
                       sites=[site], quotas=OFF, **kw)  # fmt: skip
    agent.start()
    return agent


def test_a_session_that_remembers_a_fallback_does_not_double_the_work(
    broker: Any, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """A worker ran on plain subscriptions once (``--no-share``, or its self-test
    timed out on a loaded broker); restarted under its id in the share group, its
    persistent session must not keep the plain subscription too: each request is
    served once in the group, not once more by that worker."""
    site, group = f"m{secrets.token_hex(4)}", f"g{secrets.token_hex(4)}"
    a_id = f"cloud-{secrets.token_hex(4)}"
    first = _agent(broker.url, tmp_path / "a", site, version="5", agent_id=a_id,
                   share_group=None)  # fmt: skip
    first.stop()  # the session (and what it subscribed) stays on the broker
    a = _agent(broker.url, tmp_path / "a", site, version="5", agent_id=a_id, share_group=group)
    b = _agent(broker.url, tmp_path / "b", site, version="5", share_group=group)
    try:
        assert not a.share_fallback and not b.share_fallback
        with EdgeClient(broker=BrokerConfig(url=broker.url), cipher=cipher, site=site,
                        gateway="gw", timeout=5.0, retries=0) as edge:  # fmt: skip
            for _ in range(20):
                with pytest.raises(PeerReportedError):  # no key yet: key_mismatch, fine
                    edge.request(IdsGet(site=site, gw="gw", kid=None, offset=0, limit=10))
        time.sleep(1.0)
        served = a.stats["requests"] + b.stats["requests"]
        assert served == 20, (a.stats["requests"], b.stats["requests"])
    finally:
        a.stop(retire=True)
        b.stop(retire=True)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_two_workers_without_share_answer_twice_and_write_once(
    nats: NatsBroker,
    tmp_path: Path,
    cipher: EdgeCipher,
    engine: str,
    request: pytest.FixtureRequest,
) -> None:
    """Two workers with ``--no-share`` on NATS (no $share): every request reaches both
    and is answered twice; the edge takes the first answer. Writes are not harmed: on
    one PostgreSQL database each enroll or delete is done once (the second worker
    sends the first one's reply); on SQLite each worker's own gallery receives every
    write, in order, and both stay the same."""
    store = request.getfixturevalue("pg_url") if engine == "postgresql" else "sqlite:"
    site = f"n{secrets.token_hex(4)}"
    workers = [_agent(nats.url, tmp_path / w, site, share_group=None, store=store)
               for w in ("w1", "w2")]  # fmt: skip
    rng = np.random.default_rng(61)
    people = unit(rng, 8)
    names = [f"q{i}" for i in range(8)]
    try:
        cfg = BrokerConfig(url=nats.url, mqtt_version="3.1.1")
        with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="gw", timeout=10.0) as edge:
            sent: list[str] = []
            edge.on_request = lambda op, outcome, s: sent.append(op)
            edge.publish_key()
            assert edge.enroll_bulk(names[:6], people[:6], progress=False) == 6
            assert edge.delete(["q1", "q2"]) == 2  # the first answer: deleted once
            edge.enroll("q1", embeddings=people[6])  # q1 again, another face
            edge.enroll("q7", embeddings=people[7])
            assert edge.verify("q1", vector=people[6]).match
            assert not edge.verify("q1", vector=people[1]).match
            assert edge.identify(vector=people[3]).identity == "q3"
            with pytest.raises(PeerReportedError):
                edge.verify("q2", vector=people[2])
            time.sleep(1.0)
            asked = len(sent)
            assert edge.unmatched == asked, (edge.unmatched, sent)  # each answered twice
        want = {"q0", "q1", "q3", "q4", "q5", "q7"}
        for w in workers:
            w.wait_idle(10)
            g = w.keys.gallery(site, cipher.key_id)
            live = [i for i in g.ids() if i is not None]
            assert sorted(live) == sorted(want), (engine, live)  # each once, none back
        assert all(w.stats["requests"] >= asked for w in workers)
    finally:
        for w in workers:
            w.stop(retire=True)


def test_a_nats_restart_mid_stream_loses_no_verify(
    nats: NatsBroker, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """NATS restarted (same store) while a gateway verifies in a loop: the agent
    reconnects on its plain subscriptions (no $share again) and every verify is
    answered, right, after the edge's retries."""
    site = f"r{secrets.token_hex(4)}"
    agent = _agent(nats.url, tmp_path / "cloud", site, share_check_s=2.0)
    people = unit(np.random.default_rng(62), 4)
    answers: list[bool] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    cfg = BrokerConfig(url=nats.url, mqtt_version="3.1.1")
    try:
        assert agent.share_fallback
        with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="admin",
                        timeout=10.0) as admin:  # fmt: skip
            admin.publish_key()
            admin.enroll_bulk([f"p{i}" for i in range(4)], people, progress=False)

        def gateway() -> None:
            with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="gw", timeout=4.0,
                            retries=5) as edge:  # fmt: skip
                n = 0
                while not stop.is_set():
                    who, genuine = n % 4, n % 3 != 0
                    probe = people[who] if genuine else people[(who + 1) % 4]
                    try:
                        answers.append(edge.verify(f"p{who}", vector=probe).match == genuine)
                    except Exception as exc:
                        failures.append(exc)
                        return
                    n += 1

        t = threading.Thread(target=gateway)
        t.start()
        deadline = time.monotonic() + 30
        while len(answers) < 5 and time.monotonic() < deadline and not failures:
            time.sleep(0.1)
        before = len(answers)
        nats.stop()
        time.sleep(2.0)
        nats.start()
        deadline = time.monotonic() + 60
        while len(answers) < before + 10 and time.monotonic() < deadline and not failures:
            time.sleep(0.1)
        stop.set()
        t.join(60)
        assert not failures, failures[:3]
        assert len(answers) >= before + 10 and all(answers)
        assert all(not f.startswith("$share/") for f in agent.filters())
        assert agent.load()["broker_reconnects"] >= 1
    finally:
        stop.set()
        agent.stop(retire=True)
