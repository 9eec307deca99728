"""Compute workers that fail the way processes do (issue 11): killed, stopped, slow,
or answering garbage, a frame cut short, or the wrong number of results.

Real worker processes (``spawn``) running :mod:`faultyworkers` -- the real worker
loop, with its first reply spoiled -- real CKKS galleries, and for the agent tests a
real Mosquitto. Verdicts: every job gets its own result (each probe is different, so
a result that went to the wrong job decrypts to the wrong score), the worker is
replaced, nothing is lost and the agent keeps serving.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faultyworkers
import numpy as np
import pytest
from vectors import unit

from cipherface.agents import compute
from cipherface.agents.cloud import CloudAgent
from cipherface.agents.compute import ComputePool
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.quota import QuotaPolicy
from cipherface.crypto import sites
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import PeerReportedError

MODES = ["garbage-items", "odd-error", "one-more", "not-msgpack", "die-mid-reply", "sigstop",
         "slow"]  # fmt: skip
JOB_TIMEOUT = 3.0


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], None]:
    """Make the next compute workers :func:`faultyworkers.main` in ``mode``."""

    def use(mode: str) -> None:
        monkeypatch.setenv("CF_FAULTY_WORKER", mode)
        monkeypatch.setenv("CF_FAULTY_ONCE", str(tmp_path / f"spoiled-{secrets.token_hex(4)}"))
        monkeypatch.setenv("CF_FAULTY_DELAY", str(JOB_TIMEOUT + 2))
        monkeypatch.setattr(compute, "worker_main", faultyworkers.main)

    return use


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("mode", MODES)
def test_a_faulty_worker_costs_time_never_a_wrong_or_lost_result(
    tmp_path: Path, cipher: EdgeCipher, faulty: Callable[[str], None], mode: str
) -> None:
    faulty(mode)
    rng = np.random.default_rng(17)
    v = unit(rng, 1)[0]
    g = sites.open_gallery(tmp_path / "g", cipher.public_key_bytes())
    assert isinstance(g, CkksGallery)
    try:
        g.enroll(["x"], cipher.encrypt_templates(v[None, :]))
        # Six probes at six different similarities: each result names its own probe.
        probes = [v * c + np.sqrt(1 - c * c) * unit(rng, 1)[0] for c in (0.9, 0.7, 0.5, 0.3)]
        probes = [p / np.linalg.norm(p) for p in probes]
        want = [float(p @ v) for p in probes]
        jobs = [g.prepare_verify("x", cipher.encrypt_probe(p, op="verify")) for p in probes]
        with ComputePool(1, job_timeout=JOB_TIMEOUT) as pool:
            [first] = pool.pids()
            got = pool.verify(g.pub, jobs)
            assert len(got) == len(jobs) and all(isinstance(r, bytes) for r in got), got
            scores = [float(cipher.decrypt_scores(r, op="verify", count=1)[0]) for r in got]
            assert scores == pytest.approx(want, abs=1e-4)
            assert pool.stats["restarts"] == 1 and pool.stats["local"] == len(jobs)
            assert pool.wait_workers(1, 60) and first not in pool.pids()
            deadline = time.monotonic() + 10
            while not _gone(first) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _gone(first)  # stopped or hung: killed, not left behind
            again = pool.verify(g.pub, jobs[::-1])  # the successor computes, right
            scores = [float(cipher.decrypt_scores(r, op="verify", count=1)[0]) for r in again]
            assert scores == pytest.approx(want[::-1], abs=1e-4)
            assert pool.stats["local"] == len(jobs)
    finally:
        g.close()


def test_a_worker_stopped_while_idle_does_not_hold_its_next_batch(
    tmp_path: Path, cipher: EdgeCipher
) -> None:
    """SIGSTOP from outside while the worker waits for work: the next batch (larger
    than the pipe's buffer) cannot even be sent. The sender gives up after the job
    timeout, the worker is killed and replaced, and the batch is computed here."""
    import signal

    v = unit(np.random.default_rng(21), 1)[0]
    g = sites.open_gallery(tmp_path / "g", cipher.public_key_bytes())
    assert isinstance(g, CkksGallery)
    try:
        g.enroll(["x"], cipher.encrypt_templates(v[None, :]))
        jobs = [g.prepare_verify("x", cipher.encrypt_probe(v, op="verify"))] * 16
        with ComputePool(1, job_timeout=JOB_TIMEOUT) as pool:
            [pid] = pool.pids()
            os.kill(pid, signal.SIGSTOP)
            got: list[Any] = []
            runner = threading.Thread(target=lambda: got.extend(pool.verify(g.pub, jobs)))
            runner.start()
            runner.join(60)
            assert not runner.is_alive(), "the batch is stuck on a stopped worker"
            assert len(got) == 16 and all(isinstance(r, bytes) for r in got)
            assert pool.stats["restarts"] == 1 and pool.stats["local"] == 16
            assert pool.wait_workers(1, 60) and pid not in pool.pids()
    finally:
        g.close()


@pytest.fixture
def agent_with(
    broker: Any, tmp_path: Path, cipher: EdgeCipher
) -> Iterator[Callable[[], tuple[CloudAgent, str]]]:
    made: list[CloudAgent] = []

    def start() -> tuple[CloudAgent, str]:
        site = f"c{secrets.token_hex(4)}"
        agent = CloudAgent(
            broker=BrokerConfig(url=broker.url),
            data_dir=tmp_path / f"cloud-{site}",
            agent_id=f"cloud-{secrets.token_hex(4)}",
            sites=[site],
            share_group=f"g{secrets.token_hex(4)}",
            workers=1,
            quotas=QuotaPolicy(identify_per_hour=0, verify_per_identity_per_hour=0),
        )
        agent.pool = ComputePool(1, job_timeout=JOB_TIMEOUT)  # start() keeps this one
        agent.start()
        made.append(agent)
        return agent, site

    yield start
    for agent in made:
        agent.stop(retire=True)


@pytest.mark.parametrize("mode", ["garbage-items", "odd-error", "sigstop"])
def test_the_agent_answers_every_verify_through_a_faulty_worker(
    broker: Any,
    cipher: EdgeCipher,
    faulty: Callable[[str], None],
    agent_with: Callable[[], tuple[CloudAgent, str]],
    mode: str,
) -> None:
    """Through Mosquitto: gateways verify while the worker spoils a batch. Every verify
    is answered, and right; nothing is left in progress or unacknowledged."""
    faulty(mode)
    agent, site = agent_with()
    people = unit(np.random.default_rng(18), 6)
    cfg = BrokerConfig(url=broker.url)
    with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="admin") as admin:
        admin.publish_key()
        admin.enroll_bulk([f"p{i}" for i in range(6)], people, progress=False)
    failures: list[BaseException] = []
    answers: list[bool] = []

    def gateway(g: int) -> None:
        with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway=f"gw{g}", timeout=4.0,
                        retries=3) as edge:  # fmt: skip
            for n in range(6):
                who, genuine = (g + n) % 6, n % 2 == 0
                probe = people[who] if genuine else people[(who + 1) % 6]
                try:
                    answers.append(edge.verify(f"p{who}", vector=probe).match == genuine)
                except Exception as exc:
                    failures.append(exc)

    threads = [threading.Thread(target=gateway, args=(g,)) for g in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    assert len(answers) == 12 and all(answers)
    assert agent.pool is not None and agent.pool.stats["restarts"] == 1
    assert agent.wait_idle(10) and agent.load()["queue_depth"] == 0


def test_a_verify_batch_that_fails_whole_is_answered_not_wedged(
    broker: Any,
    cipher: EdgeCipher,
    agent_with: Callable[[], tuple[CloudAgent, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine's batch call raises once (whatever the cause): its verifies get an
    error reply at once, and the same gateways' next verifies are answered."""
    agent, site = agent_with()
    people = unit(np.random.default_rng(19), 3)
    cfg = BrokerConfig(url=broker.url)
    with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="admin") as admin:
        admin.publish_key()
        admin.enroll_bulk(["a", "b", "c"], people, progress=False)
    honest = CkksGallery.verify_many
    calls = [0]

    def once(self: CkksGallery, *args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("engine failure")
        return honest(self, *args, **kw)

    monkeypatch.setattr(CkksGallery, "verify_many", once)
    with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="gw", timeout=4.0,
                    retries=1) as edge:  # fmt: skip
        with pytest.raises(PeerReportedError) as info:
            edge.verify("a", vector=people[0])
        assert info.value.remote_code == "error" and "engine failure" not in str(info.value)
        assert edge.verify("a", vector=people[0]).match
    assert agent.wait_idle(10)


def encode_request(req: Any) -> bytes:
    from cipherface.protocol import encode

    return encode(req)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _burst(
    broker: Any, cipher: EdgeCipher, site: str, requests: list[Any], deadline_s: float
) -> tuple[dict[str, Any], float]:
    """Publish every request at once (QoS 1) from one raw client; the replies by corr,
    and the agent process's largest RSS growth (MB) meanwhile."""
    import paho.mqtt.client as paho

    from cipherface.protocol import decode, encode, request_topic, result_topic

    got: dict[str, Any] = {}
    done = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        reply = decode(bytes(msg.payload))
        got[str(reply.corr)] = reply
        if len(got) == len(requests):
            done.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                         client_id=f"burst-{secrets.token_hex(4)}")  # fmt: skip
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    gw = requests[0].gw
    client.subscribe([(result_topic(site, gw), 1), (f"cipherface/v1/{site}/err/{gw}", 1)])
    time.sleep(0.5)
    base, peak = _rss_mb(), 0.0
    for req in requests:
        client.publish(request_topic(site, gw, req.TYPE), encode(req), qos=1)
    end = time.monotonic() + deadline_s
    while not done.wait(0.2) and time.monotonic() < end:
        peak = max(peak, _rss_mb() - base)
    client.loop_stop()
    client.disconnect()
    return got, peak


def test_a_burst_behind_a_stopped_worker_is_held_by_the_broker_and_all_answered(
    broker: Any,
    cipher: EdgeCipher,
    agent_with: Callable[[], tuple[CloudAgent, str]],
) -> None:
    """300 verifies at once while the only worker is stopped (SIGSTOP from outside).
    The broker does not hold them back (Mosquitto 2.0 ignores ReceiveMaximum after the
    first acknowledgement): the agent holds at most ``max_queued_bytes`` of them and
    stops reading until its lanes take some. The stopped worker is replaced after its
    timeout and every request is answered, each with its own score."""
    import signal

    from cipherface.protocol import Result, Verify

    agent, site = agent_with()
    people = unit(np.random.default_rng(20), 4)
    cfg = BrokerConfig(url=broker.url)
    with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="admin") as admin:
        admin.publish_key()
        admin.enroll_bulk([f"p{i}" for i in range(4)], people, progress=False)
    probes = [cipher.encrypt_probe(people[i % 4], op="verify") for i in range(4)]
    wrong = cipher.encrypt_probe(people[1], op="verify")  # p0 against p1's face
    requests = [
        Verify(site=site, gw="burst", kid=cipher.key_id, identity=f"p{i % 4}",
               probe=wrong if i % 8 == 0 else probes[i % 4])
        for i in range(300)
    ]  # fmt: skip
    size = len(encode_request(requests[0]))
    agent.max_queued_bytes = 20 * size
    assert agent.pool is not None
    [pid] = agent.pool.pids()
    os.kill(pid, signal.SIGSTOP)
    held = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            held[0] = max(held[0], agent.queued_bytes)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got, _ = _burst(broker, cipher, site, requests, 120)
    finally:
        stop.set()
        watcher.join()
    missing = [i for i, r in enumerate(requests) if r.id not in got]
    assert not missing, (missing, agent.stats, agent.load(), agent.pool.stats)
    assert held[0] <= agent.max_queued_bytes + 2 * size, (held[0], agent.max_queued_bytes)
    assert agent.pool.stats["restarts"] == 1
    for i, req in enumerate(requests):
        reply = got[req.id]
        assert isinstance(reply, Result), reply
        if i % 4 == 0:
            score = float(cipher.decrypt_scores(reply.scores or b"", op="verify", count=1)[0])
            assert (score > 0.9) == (i % 8 != 0), (i, score)
