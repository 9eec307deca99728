"""Verify compute in worker processes (issue 11 item 3): same answers, nothing lost.

Real worker processes (``spawn``), real CKKS galleries, real Mosquitto for the agent
tests; a worker is killed with SIGKILL while it holds jobs.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import storekit
from vectors import near, unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.compute import ComputePool
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.quota import QuotaPolicy
from cipherface.crypto import sites
from cipherface.crypto.ckks import PackJob, finish_many_verify
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import DecodeError, UnknownIdentityError
from cipherface.protocol import Error, Result, Verify, decode, encode, request_topic

DIM = 128
pg_url = storekit.pg_url  # fixture: a PostgreSQL database of this session's own


@pytest.fixture(scope="module")
def pool() -> Iterator[ComputePool]:
    with ComputePool(2) as p:
        yield p


def _score(cipher: EdgeCipher, result: bytes) -> float:
    return float(cipher.decrypt_scores(result, op="verify", count=1)[0])


def _junk_ct_probe(cipher: EdgeCipher, v: np.ndarray) -> bytes:
    """A probe whose envelope is right but whose ciphertext SEAL must refuse."""
    obj = msgpack.unpackb(cipher.encrypt_probe(v, op="verify"))
    obj["ct"] = obj["ct"][:40] + b"\x00" * 64
    return msgpack.packb(obj, use_bin_type=True)


def test_workers_answer_like_the_agent_and_fail_alike(
    tmp_path: Path, cipher: EdgeCipher, pool: ComputePool
) -> None:
    """Results computed in worker processes decrypt to the scores computed here; a
    probe SEAL refuses fails alone, with the same error class as in process."""
    rng = np.random.default_rng(3)
    people = unit(rng, 40)
    g = sites.open_gallery(tmp_path / "g", cipher.public_key_bytes())
    assert isinstance(g, CkksGallery)
    g.enroll([f"p{i}" for i in range(40)], cipher.encrypt_templates(people))
    probes = [near(people[i], rng) for i in range(9)]
    items = [(f"p{i}", cipher.encrypt_probe(probes[i], op="verify")) for i in range(9)]
    items[4] = ("nobody", items[4][1])
    items[6] = ("p6", _junk_ct_probe(cipher, probes[6]))
    here = g.verify_many(items)
    there = g.verify_many(items, compute=pool.verify)
    for i, (a, b) in enumerate(zip(here, there, strict=True)):
        if i == 4:
            assert isinstance(a, UnknownIdentityError) and isinstance(b, UnknownIdentityError)
        elif i == 6:
            assert type(a) is DecodeError and type(b) is DecodeError
            assert str(a) == str(b)
        else:
            assert isinstance(a, bytes) and isinstance(b, bytes)
            assert a != b  # fresh randomness in each
            want = float(probes[i] @ people[i])
            assert _score(cipher, a) == pytest.approx(want, abs=1e-4)
            assert _score(cipher, b) == pytest.approx(want, abs=1e-4)
    assert pool.stats["local"] == 0
    g.close()


def test_a_worker_killed_holding_jobs_loses_none(tmp_path: Path, cipher: EdgeCipher) -> None:
    """SIGKILL of the worker computing a batch: the batch is finished in the caller's
    process, the worker is replaced, and later batches run in workers again."""
    v = unit(np.random.default_rng(4), 1)[0]
    g = sites.open_gallery(tmp_path / "g", cipher.public_key_bytes())
    assert isinstance(g, CkksGallery)
    pub = g.pub
    try:
        g.enroll(["x"], cipher.encrypt_templates(v[None, :]))
        jobs = [g.prepare_verify("x", cipher.encrypt_probe(v, op="verify"))] * 48
        with ComputePool(1) as one:  # 48 jobs: 0.1 s of work or more for one worker
            [victim] = one.pids()
            got: list[Any] = []
            runner = threading.Thread(target=lambda: got.extend(one.verify(pub, jobs)))
            runner.start()
            time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            runner.join(60)
            assert len(got) == 48 and all(isinstance(r, bytes) for r in got)
            assert all(_score(cipher, r) == pytest.approx(1.0, abs=1e-4) for r in got[::12])
            assert one.stats["restarts"] == 1 and one.stats["local"] == 48
            assert one.wait_workers(1, 60) and one.pids() != [victim]
            again = one.verify(pub, jobs[:4])
            assert all(isinstance(r, bytes) for r in again) and one.stats["local"] == 48
    finally:
        g.close()


def test_in_process_jobs_still_fail_alone(cipher: EdgeCipher) -> None:
    pub = sites.open_public(cipher.public_key_bytes()).obj
    bad = PackJob(template=np.zeros((2, 2, 4096), np.uint32), probe=b"junk", pos=0, live=(True,))
    [err] = finish_many_verify(pub, [bad])
    assert isinstance(err, DecodeError)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_agent_with_workers_loses_nothing_when_one_is_killed(
    broker: Any,
    tmp_path: Path,
    cipher: EdgeCipher,
    engine: str,
    request: pytest.FixtureRequest,
) -> None:
    """``CloudAgent(workers=2)`` through a real broker: gateways verify while a compute
    worker is killed (-9); every verify is answered, and answered right, and a retried
    request id is answered from the reply cache, byte for byte."""
    store = request.getfixturevalue("pg_url") if engine == "postgresql" else "sqlite:"
    site = f"c{secrets.token_hex(4)}"
    rng = np.random.default_rng(8)
    people = unit(rng, 12)
    agent = CloudAgent(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp_path / "cloud",
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",
        store=store,
        workers=2,
    )
    agent.start()
    results: list[bool] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def gateway(g: int) -> None:
        with EdgeClient(broker=BrokerConfig(url=broker.url), cipher=cipher, site=site,
                        gateway=f"gw{g}", timeout=5.0, retries=3) as edge:  # fmt: skip
            n = 0
            while not stop.is_set():
                who = (g * 5 + n) % len(people)
                genuine = n % 3 != 0
                probe = people[who] if genuine else people[(who + 1) % len(people)]
                try:
                    d = edge.verify(f"p{who}", vector=probe)
                except Exception as exc:  # lost: the test fails below
                    failures.append(exc)
                    return
                results.append(d.match == genuine)
                n += 1

    try:
        assert agent.pool is not None and len(agent.pool.pids()) == 2
        with EdgeClient(broker=BrokerConfig(url=broker.url), cipher=cipher, site=site,
                        gateway="admin", timeout=10.0) as admin:  # fmt: skip
            admin.publish_key()
            admin.enroll_bulk([f"p{i}" for i in range(12)], people, progress=False)
        with ThreadPoolExecutor(4) as threads:
            running = [threads.submit(gateway, g) for g in range(4)]
            deadline = time.monotonic() + 60
            while len(results) < 20 and time.monotonic() < deadline and not failures:
                time.sleep(0.05)
            before = len(results)
            os.kill(agent.pool.pids()[0], signal.SIGKILL)
            assert agent.pool.wait_workers(2, 60)
            while len(results) < before + 20 and time.monotonic() < deadline and not failures:
                time.sleep(0.05)
            stop.set()
            for f in running:
                f.result(60)
        assert agent.pool.stats["restarts"] == 1
        # A retried request id: the cached reply, byte for byte, whoever computed it.
        msg = Verify(site=site, gw="gw9", kid=cipher.key_id, identity="p1",
                     probe=cipher.encrypt_probe(people[1], op="verify"))  # fmt: skip
        topic = request_topic(site, "gw9", "verify")
        [first] = agent.handle(topic, encode(msg))
        [again] = agent.handle(topic, encode(msg))
        assert again.payload == first.payload
        reply = decode(first.payload)
        assert isinstance(reply, Result) and not isinstance(reply, Error)
    finally:
        stop.set()
        agent.stop(retire=True)
    assert not failures, failures[:3]
    assert len(results) >= before + 20 and all(results), "a lost or wrong verify"
    assert agent.pool is None  # closed with the agent


@pytest.mark.slow
def test_fifty_gateways_closed_loop_through_workers(
    broker: Any, tmp_path: Path, cipher: EdgeCipher
) -> None:
    """The bench's load (bench/loadgen.py: 50 gateways, one verify outstanding each)
    for a few seconds against ``workers=2``: nothing lost, nothing wrong."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from loadgen import VerifyLoad

    site = f"l{secrets.token_hex(4)}"
    people = unit(np.random.default_rng(12), 64)
    names = [f"p{i}" for i in range(64)]
    data = tmp_path / "cloud"
    kd = data / site / "keys" / cipher.key_id
    kd.mkdir(parents=True)
    (kd / sites.PUBLIC_NAME).write_bytes(cipher.public_key_bytes())
    (data / site / "current").write_text(cipher.key_id)
    g = sites.open_gallery(kd / "gallery", cipher.public_key_bytes())
    g.enroll(names, cipher.encrypt_templates(people))
    g.close()
    agent = CloudAgent(
        broker=BrokerConfig(url=broker.url),
        data_dir=data,
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",
        workers=2,
        # A load generator, not one gateway's traffic: the per-pack verify quota would
        # answer most of it with rate_limited.
        quotas=QuotaPolicy(identify_per_hour=0, verify_per_identity_per_hour=0),
    )
    agent.start()
    try:
        load = VerifyLoad(host=broker.host, port=broker.port, site=site, cipher=cipher,
                          identities=names, vectors=people, gateways=50, check_every=5)  # fmt: skip
        rep = load.run(5.0)
    finally:
        agent.stop(retire=True)
    assert rep.answered > 50 and rep.errors == 0, rep.row()
    assert rep.wrong == 0 and rep.checked > 0, rep.row()
    assert rep.resent == 0, rep.row()
