"""Verify compute and identify probe re-randomisation in worker processes: same
answers, nothing lost.

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
from cipherface.crypto import ckks, sites
from cipherface.crypto.ckks import PackJob, finish_many_verify, rerandomise_many
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


def _identify_cts(g: CkksGallery, probe: bytes) -> list[Any]:
    return list(ckks.decode(probe, g.pub, "probe-identify", DecodeError)["cts"])


def _with_cts(probe: bytes, cts: list[Any]) -> bytes:
    obj = msgpack.unpackb(probe)
    obj["cts"] = cts
    return msgpack.packb(obj, use_bin_type=True)


def _best(cipher: EdgeCipher, result: bytes, count: int, live: int) -> tuple[int, np.ndarray]:
    """The best of the ``live`` enrolled slots (the other slots decrypt to noise)."""
    scores = cipher.decrypt_scores(result, op="identify", count=count)[:live]
    return int(np.argmax(scores)), scores


def test_identify_probe_rerandomised_in_workers_like_in_process(
    tmp_path: Path, cipher: EdgeCipher, pool: ComputePool
) -> None:
    """An identify whose probe is re-randomised in the workers scores like one done in
    process, costs the caller's thread a fraction of the SEAL time, and a probe SEAL
    refuses fails with the same error as in process: the first bad ciphertext's."""
    rng = np.random.default_rng(5)
    people = unit(rng, 40)
    g = sites.open_gallery(tmp_path / "g", cipher.public_key_bytes())
    assert isinstance(g, CkksGallery)
    try:
        g.enroll([f"p{i}" for i in range(40)], cipher.encrypt_templates(people))
        probe = cipher.encrypt_probe(near(people[11], rng), op="identify")
        here, count = g.identify(probe)
        before = dict(pool.stats)
        there, count2 = g.identify(probe, rerandomise=pool.rerandomise)
        assert count2 == count and here != there  # fresh randomness in each
        (i1, s1), (i2, s2) = _best(cipher, here, count, 40), _best(cipher, there, count, 40)
        assert i1 == i2 == 11
        assert np.abs(s1 - s2).max() < 1e-4
        assert pool.stats["ciphertexts"] == before["ciphertexts"] + DIM
        assert pool.stats["ciphertexts_local"] == 0

        # The caller's thread: ~all of the SEAL work in process, little through workers.
        cts, what = _identify_cts(g, probe), "probe-identify"
        t = time.thread_time()
        rerandomise_many(g.pub, cts, what)
        here_cpu = time.thread_time() - t
        t = time.thread_time()
        got = pool.rerandomise(g.pub, cts, what)
        there_cpu = time.thread_time() - t
        assert got.shape == (DIM, 2, 2, 4096) and got.dtype == np.uint32
        assert there_cpu < here_cpu / 3, (here_cpu, there_cpu)

        # Bad ciphertexts in two chunks: the first one's error, as in process.
        bad = list(cts)
        bad[21] = bad[21][:40] + b"\x00" * 64
        bad[100] = 7
        junk = _with_cts(probe, bad)
        with pytest.raises(DecodeError) as in_process:
            g.identify(junk)
        with pytest.raises(DecodeError) as in_workers:
            g.identify(junk, rerandomise=pool.rerandomise)
        assert str(in_workers.value) == str(in_process.value)
        assert "probe-identify" in str(in_process.value)
        later = _with_cts(probe, [*cts[:100], 7, *cts[101:]])
        with pytest.raises(DecodeError) as in_process:
            g.identify(later)
        with pytest.raises(DecodeError) as in_workers:
            g.identify(later, rerandomise=pool.rerandomise)
        assert str(in_workers.value) == str(in_process.value)
        assert pool.stats["ciphertexts_local"] == 0 and pool.stats["restarts"] == 0
        # The workers still answer after the errors.
        again, _ = g.identify(probe, rerandomise=pool.rerandomise)
        assert _best(cipher, again, count, 40)[0] == 11
    finally:
        g.close()


def test_workers_make_no_zeros_ahead_while_an_identify_holds_them(
    tmp_path: Path, cipher: EdgeCipher, pool: ComputePool
) -> None:
    """After an identify's probe took encryptions of zero from the workers, they make
    new ones only once the agent stops holding them (its 1:N kernel wants the cores):
    the workers' CPU stays flat while held and rises after."""
    g = sites.open_gallery(tmp_path / "g", cipher.public_key_bytes())
    assert isinstance(g, CkksGallery)
    try:
        v = unit(np.random.default_rng(7), 1)
        g.enroll(["x"], cipher.encrypt_templates(v))
        cts = _identify_cts(g, cipher.encrypt_probe(v[0], op="identify"))
        with pool.holding():
            pool.rerandomise(g.pub, cts, "probe-identify")
            pool.rerandomise(g.pub, cts, "probe-identify")  # every worker's pool below full
            before = _cpu(pool.pids())
            time.sleep(1.0)
            held = _cpu(pool.pids()) - before
        before = _cpu(pool.pids())
        time.sleep(1.5)
        free = _cpu(pool.pids()) - before
        assert held < 0.03 and free > held + 0.05, (held, free)
    finally:
        g.close()


def _cpu(pids: list[int]) -> float:
    """User + system CPU seconds of processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def test_a_worker_killed_during_identify_loses_nothing(tmp_path: Path, cipher: EdgeCipher) -> None:
    """SIGKILL of the only worker while identifies re-randomise their probes in it:
    every identify still answers right (the chunks it held, and those sent while no
    worker ran, are done in the caller's process), the worker is replaced, and later
    identifies use the new worker again."""
    rng = np.random.default_rng(6)
    people = unit(rng, 20)
    g = sites.open_gallery(tmp_path / "g", cipher.public_key_bytes())
    assert isinstance(g, CkksGallery)
    try:
        g.enroll([f"p{i}" for i in range(20)], cipher.encrypt_templates(people))
        probe = cipher.encrypt_probe(near(people[4], rng), op="identify")
        with ComputePool(1) as one:
            [victim] = one.pids()
            best: list[int] = []
            failures: list[BaseException] = []
            stop = threading.Event()

            def identify_loop() -> None:
                while not stop.is_set():
                    try:
                        result, count = g.identify(probe, rerandomise=one.rerandomise)
                        best.append(_best(cipher, result, count, 20)[0])
                    except BaseException as exc:  # the test fails below
                        failures.append(exc)
                        return

            runner = threading.Thread(target=identify_loop)
            runner.start()
            deadline = time.monotonic() + 60
            while not best and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # inside an identify: each takes 0.1 s or more
            os.kill(victim, signal.SIGKILL)
            assert one.wait_workers(1, 60)
            done = len(best)
            while len(best) < done + 2 and time.monotonic() < deadline and not failures:
                time.sleep(0.05)
            stop.set()
            runner.join(60)
            assert not failures, failures
            assert len(best) >= done + 2 and set(best) == {4}, best
            assert one.stats["restarts"] == 1 and one.pids() != [victim]
            assert 0 < one.stats["ciphertexts_local"] < one.stats["ciphertexts"]
            local = one.stats["ciphertexts_local"]
            result, count = g.identify(probe, rerandomise=one.rerandomise)
            assert _best(cipher, result, count, 20)[0] == 4
            assert one.stats["ciphertexts_local"] == local  # the new worker did it all
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
            # Identify: the probe re-randomised in the workers, the 1:N kernel here.
            assert admin.identify(vector=people[5]).identity == "p5"
            assert agent.pool.stats["ciphertexts"] >= DIM
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
