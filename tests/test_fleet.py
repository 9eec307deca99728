"""Cloud throughput and scale-out (issue 11): lanes, batched verifies, several workers.

Real Mosquitto (conftest ``broker``), real CKKS galleries, synthetic 128-d vectors.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import storekit
from vectors import unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.dispatch import lane_for
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.shards import ShardedEdge, owner, shard_sites
from cipherface.crypto import sites
from cipherface.crypto.engine import EdgeCipher, Gallery
from cipherface.errors import PartialResultError
from cipherface.protocol import (
    Enroll,
    Error,
    KeyPublish,
    Result,
    Verify,
    decode,
    encode,
    request_topic,
)
from cipherface.store import gallery_location, store_exists

DIM = 128
pg_url = storekit.pg_url  # fixture: a PostgreSQL database of this session's own


@pytest.fixture
def site() -> str:
    return f"f{secrets.token_hex(4)}"


def _request(agent: CloudAgent, msg: Any) -> Result:
    [out] = agent.handle(request_topic(msg.site, msg.gw, msg.TYPE), encode(msg))
    reply = decode(out.payload)
    assert isinstance(reply, Result), reply
    return reply


def test_lanes_by_topic() -> None:
    assert lane_for("cipherface/v1/s/req/gw/verify") == "fast"
    assert lane_for("cipherface/v1/s/req/gw/ids") == "fast"
    for op in ("identify", "enroll", "delete", "key", "junk"):
        assert lane_for(f"cipherface/v1/s/req/gw/{op}") == "slow"


def test_batched_verifies_answer_like_single_ones(
    tmp_path: Path, cipher: EdgeCipher, site: str
) -> None:
    """One engine call for a batch of verifies from many gateways; each answer is the
    one a lone verify would get, and one bad request in the batch fails alone."""
    agent = CloudAgent(broker=BrokerConfig(), data_dir=tmp_path / "cloud", sites=[site])
    rng = np.random.default_rng(5)
    people = unit(rng, 40)
    names = [f"p{i}" for i in range(40)]
    kid = cipher.key_id
    _request(agent, KeyPublish(site=site, gw="gw0", kid=kid, scheme="ckks",
                               public_key=cipher.public_key_bytes()))  # fmt: skip
    _request(agent, Enroll(site=site, gw="gw0", kid=kid, ids=tuple(names),
                           payload=cipher.encrypt_templates(people)))  # fmt: skip
    probes = unit(rng, 12)
    reqs = []
    for i in range(12):
        claimed = names[i] if i != 7 else "nobody"
        probe = cipher.encrypt_probe(probes[i], op="verify") if i != 9 else b"\x00junk"
        msg = Verify(site=site, gw=f"gw{i}", kid=kid, identity=claimed, probe=probe)
        reqs.append((request_topic(site, f"gw{i}", "verify"), encode(msg), None))
    reqs.append(reqs[3])  # a duplicate inside the batch
    before = agent.stats["batches"]
    replies = agent.handle_many(reqs)
    assert agent.stats["batches"] - before == 1
    assert [len(r) for r in replies] == [1] * 12 + [0]  # the copy: in progress, not rerun
    for i, [out] in enumerate(replies[:12]):
        reply = decode(out.payload)
        if i == 7:
            assert isinstance(reply, Error) and reply.code == "unknown_identity"
            continue
        if i == 9:
            assert isinstance(reply, Error) and reply.code == "gallery_error"
            continue
        assert isinstance(reply, Result) and reply.scores is not None
        assert out.topic.endswith(f"/res/gw{i}")
        score = cipher.decrypt_scores(reply.scores, op="verify", count=1)[0]
        assert score == pytest.approx(float(probes[i] @ people[i]), abs=1e-4)
    # Later copies are answered from the reply cache, byte for byte.
    [again] = agent.handle(*reqs[3][:2])
    assert again.payload == replies[3][0].payload


class _SlowIdentifyCloud(CloudAgent):
    """Identify blocks until ``gate`` opens: the slow lane is busy for as long as we like."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _identify(self, req: Any, gallery: Gallery) -> Any:
        self.entered.set()
        self.gate.wait(20)
        return super()._identify(req, gallery)


@pytest.fixture
def edges(broker: Any, cipher: EdgeCipher, site: str) -> Iterator[Callable[..., EdgeClient]]:
    made: list[EdgeClient] = []

    def factory(gateway: str, **kw: Any) -> EdgeClient:
        kw.setdefault("timeout", 10.0)
        edge = EdgeClient(
            broker=BrokerConfig(url=broker.url), cipher=cipher, site=site, gateway=gateway, **kw
        )
        edge.start()
        made.append(edge)
        return edge

    yield factory
    for edge in made:
        edge.close()


def test_verify_is_not_held_behind_an_identify(
    broker: Any, tmp_path: Path, site: str, edges: Callable[..., EdgeClient]
) -> None:
    agent_id = f"cloud-{secrets.token_hex(4)}"
    cloud = _SlowIdentifyCloud(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp_path / "cloud",
        agent_id=agent_id,
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",
    )
    cloud.start()
    try:
        rng = np.random.default_rng(9)
        people = unit(rng, 3)
        door, lobby = edges("door"), edges("lobby")
        door.publish_key()
        door.enroll_bulk(["a", "b", "c"], people, progress=False)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(lobby.identify, vector=people[1])
            assert cloud.entered.wait(10)
            t0 = time.monotonic()
            decision = door.verify("b", vector=people[1])
            waited = time.monotonic() - t0
            assert decision.match and waited < 5.0
            assert not slow.done()  # the identify is still being served
            cloud.gate.set()
            assert slow.result(20).identity == "b"
    finally:
        cloud.gate.set()
        cloud.stop(retire=True)


# ------------------------------------------------------------------ the fleet
def _worker(
    url: str, data: Path, agent_id: str, site: str, group: str, log: Path, store: str | None
) -> Any:
    """A ``cipherface cloud`` worker process (as users start them)."""
    cmd = [sys.executable, "-c", "from cipherface.agents.cli import main; main()", "cloud"]
    cmd += ["--broker", url, "--data", str(data), "--agent-id", agent_id, "--sites", site]
    cmd += ["--share-group", group, *(["--store", store] if store else [])]
    cmd += ["--quota-verify", "0", "--quota-identify", "0"]  # load, not one gateway's traffic
    out = open(log, "ab")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
    out.close()
    deadline = time.monotonic() + 60
    while b"serving" not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    return proc


def _replica(
    data: Path, cipher: EdgeCipher, site: str, people: np.ndarray, store: str | None
) -> None:
    """A worker's data directory: the site's key and, on SQLite, its own copy of the
    gallery (one writer per file); on PostgreSQL every worker shares one gallery."""
    kd = data / site / "keys" / cipher.key_id
    kd.mkdir(parents=True)
    (kd / sites.PUBLIC_NAME).write_bytes(cipher.public_key_bytes())
    (data / site / "current").write_text(cipher.key_id)
    where = gallery_location(store or "sqlite:", site, cipher.key_id, data)
    if store is not None and store_exists(where):
        return
    g = sites.open_gallery(where, cipher.public_key_bytes())
    g.enroll([f"p{i}" for i in range(len(people))], cipher.encrypt_templates(people))
    g.close()


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "engine"), [(2, "sqlite"), (3, "sqlite"), (3, "postgresql")])
def test_a_worker_killed_mid_stream_loses_nothing(
    broker: Any,
    tmp_path: Path,
    cipher: EdgeCipher,
    site: str,
    workers: int,
    engine: str,
    request: pytest.FixtureRequest,
) -> None:
    """Workers share the site's requests; one is killed (-9) mid-stream and restarted
    under its id a second later (as a supervisor does). Every verify of every gateway is
    answered, and answered right: requests the dead worker held are retried by the
    edge with the same id (another worker answers) and redelivered to its successor.
    On PostgreSQL the workers share one gallery: an identity enrolled through one of
    them afterwards is verified by all."""
    store = request.getfixturevalue("pg_url") if engine == "postgresql" else None
    rng = np.random.default_rng(11)
    people = unit(rng, 20)
    group = f"g{secrets.token_hex(4)}"
    ids = [f"w{i}-{secrets.token_hex(3)}" for i in range(workers)]
    for wid in ids:
        _replica(tmp_path / wid, cipher, site, people, store)

    def start(wid: str, log: str) -> Any:
        return _worker(broker.url, tmp_path / wid, wid, site, group, tmp_path / log, store)

    procs = {wid: start(wid, f"{wid}.log") for wid in ids}
    stop = threading.Event()
    results: list[tuple[int, bool]] = []
    failures: list[BaseException] = []

    def gateway(g: int) -> None:
        cfg = BrokerConfig(url=broker.url)
        with EdgeClient(
            broker=cfg, cipher=cipher, site=site, gateway=f"gw{g}", timeout=4.0, retries=4
        ) as edge:
            n = 0
            while not stop.is_set():
                who = (g * 7 + n) % len(people)
                genuine = n % 3 != 0
                probe = people[who] if genuine else people[(who + 1) % len(people)]
                try:
                    d = edge.verify(f"p{who}", vector=probe)
                except Exception as exc:  # lost: the test fails below
                    failures.append(exc)
                    return
                results.append((g, d.match == genuine))
                n += 1

    victim = ids[1]
    try:
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(gateway, g) for g in range(6)]
            deadline = time.monotonic() + 60
            while len(results) < 30 and time.monotonic() < deadline and not failures:
                time.sleep(0.1)
            before = len(results)
            procs[victim].kill()  # SIGKILL: no DISCONNECT, nothing acknowledged after
            procs[victim].wait()
            time.sleep(1.0)
            procs[victim] = start(victim, "restart.log")
            time.sleep(3.0)
            stop.set()
            for f in running:
                f.result(60)
            if store is not None:
                late = unit(rng, 1)[0]
                cfg = BrokerConfig(url=broker.url)
                with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="late",
                                timeout=4.0, retries=4) as edge:  # fmt: skip
                    edge.enroll("late", embeddings=late[None, :])
                    # Round robin: these land on every worker, each must see it.
                    assert all(edge.verify("late", vector=late).match for _ in range(2 * workers))
    finally:
        stop.set()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    assert not failures, failures[:3]
    assert before > 0 and len(results) > before + 10
    assert all(ok for _, ok in results), "a wrong decision"
    assert {g for g, _ in results} == set(range(6))


def test_a_worker_whose_id_is_taken_over_stands_down(broker: Any, tmp_path: Path) -> None:
    """Two processes under one agent id (a worker partitioned off, replaced on another
    host, then back): the one the broker disconnects with "session taken over" stops
    instead of taking the id back, so the two do not kick each other off forever."""
    agent_id, group = f"cloud-{secrets.token_hex(4)}", f"g{secrets.token_hex(4)}"
    cfg = BrokerConfig(url=broker.url)
    old = CloudAgent(broker=cfg, data_dir=tmp_path / "old", agent_id=agent_id,
                     share_group=group, sites=["s"])  # fmt: skip
    new = CloudAgent(broker=cfg, data_dir=tmp_path / "new", agent_id=agent_id,
                     share_group=group, sites=["s"])  # fmt: skip
    called = threading.Event()
    old.on_taken_over = called.set
    old.start()
    try:
        new.start()
        assert old.taken_over.wait(10) and called.wait(5)
        time.sleep(3.0)  # paho would have reconnected after 1 s
        assert not new.taken_over.is_set()
        assert new._conn is not None and new._conn.connected
        assert old._conn is not None and not old._conn.connected
        t0 = time.monotonic()
        old.stop(retire=True)  # quick (nothing to finish on), and the session is not ours
        assert time.monotonic() - t0 < 5
        assert not new.taken_over.is_set() and new._conn.connected
    finally:
        old.stop()
        new.stop(retire=True)


def test_cloud_cli_exits_4_when_its_id_is_taken_over(broker: Any, tmp_path: Path) -> None:
    agent_id = f"cloud-{secrets.token_hex(4)}"
    log = tmp_path / "cloud.log"
    cmd = [sys.executable, "-c", "import sys; from cipherface.agents.cli import main; "
           "sys.exit(main())", "cloud", "--broker", broker.url, "--data", str(tmp_path / "d"),
           "--agent-id", agent_id, "--sites", "s"]  # fmt: skip
    cmd += ["--share-group", f"g{secrets.token_hex(4)}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while b"serving" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        other = CloudAgent(broker=BrokerConfig(url=broker.url), data_dir=tmp_path / "other",
                           agent_id=agent_id, sites=["s"], share_check_s=0)  # fmt: skip
        other.start()
        try:
            assert proc.wait(30) == 4, log.read_text()
        finally:
            other.stop(retire=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"error [session_taken_over]: another process connected as {agent_id}" in text
    assert text.count("standing down, not reconnecting") == 1, text


# ------------------------------------------------------------ sharded galleries
@pytest.fixture
def shard_clouds(broker: Any, tmp_path: Path) -> Iterator[Callable[[list[str]], CloudAgent]]:
    """One cloud agent per call, serving the given sites (own id, group and data)."""
    made: list[CloudAgent] = []

    def factory(sites_: list[str]) -> CloudAgent:
        tag = secrets.token_hex(4)
        agent = CloudAgent(
            broker=BrokerConfig(url=broker.url),
            data_dir=tmp_path / f"cloud-{tag}",
            agent_id=f"cloud-{tag}",
            sites=sites_,
            share_group=f"g{tag}",
        )
        agent.start()
        made.append(agent)
        return agent

    yield factory
    for agent in made:
        agent.stop(retire=True)


def test_three_shards_identify_like_one_gallery_and_rebalance(
    broker: Any,
    cipher: EdgeCipher,
    site: str,
    shard_clouds: Callable[[list[str]], CloudAgent],
) -> None:
    rng = np.random.default_rng(21)
    people = unit(rng, 30)
    names = [f"n{i:02d}" for i in range(30)]
    shards = shard_sites(site, 3)
    whole = f"{site}-all"
    shard_clouds([whole])
    for shard in shards:
        shard_clouds([shard])  # a worker per shard
    cfg = BrokerConfig(url=broker.url)
    with (
        EdgeClient(broker=cfg, cipher=cipher, site=whole, gateway="gw") as single,
        ShardedEdge(broker=cfg, cipher=cipher, shards=shards, gateway="gw") as sharded,
    ):
        single.publish_key()
        sharded.publish_key()
        single.enroll_bulk(names, people, progress=False)
        assert sharded.enroll_bulk(names, people) == 30
        spread = {s: sum(sharded.owner(n) == s for n in names) for s in shards}
        assert all(v > 0 for v in spread.values()), spread
        probes = [people[i] + 0.01 * rng.normal(size=DIM) for i in (0, 7, 19, 29)]
        probes.append(unit(rng, 1)[0])  # a stranger
        for probe in probes:
            probe = probe / np.linalg.norm(probe)
            want_id, want_sim = single.best_match(probe)
            got = sharded.identify(probe)
            assert not got.partial and got.identity == want_id
            assert got.similarity == pytest.approx(want_sim, abs=1e-4)
        assert sharded.verify("n07", vector=people[7]).match

        # Rebalance onto a 4th shard: only the identities it wins move, and every
        # identity is identified before and after.
        shards4 = [*shards, f"{site}-s3"]
        shard_clouds([shards4[3]])
        moved = sharded.rebalance(shards4, dict(zip(names, people, strict=True)))
        assert moved == sum(owner(n, shards4) != owner(n, shards) for n in names)
        assert 0 < moved < 30
        for i in (0, 7, 19, 29):
            assert sharded.identify(people[i]).identity == names[i]
        on_new = [n for n in names if owner(n, shards4) == shards4[3]]
        assert sorted(i for i in sharded._client(shards4[3]).ids() if i) == sorted(on_new)


def test_a_shard_down_gives_a_partial_result_never_a_silent_miss(
    broker: Any,
    cipher: EdgeCipher,
    site: str,
    shard_clouds: Callable[[list[str]], CloudAgent],
) -> None:
    rng = np.random.default_rng(22)
    people = unit(rng, 12)
    names = [f"m{i:02d}" for i in range(12)]
    shards = shard_sites(site, 3)
    workers = [shard_clouds([s]) for s in shards]
    cfg = BrokerConfig(url=broker.url)
    with ShardedEdge(broker=cfg, cipher=cipher, shards=shards, gateway="gw", timeout=10) as edge:
        edge.publish_key()
        edge.enroll_bulk(names, people)
    down = shards[1]
    victim = next(n for n in names if owner(n, shards) == down)
    workers[1].stop()  # its requests now wait in its session: no answer
    # (8 s: a live shard's identify re-randomises its 128-ciphertext probe with SEAL first)
    strict = ShardedEdge(broker=cfg, cipher=cipher, shards=shards, gateway="gw2", timeout=8.0,
                         retries=0)  # fmt: skip
    lenient = ShardedEdge(broker=cfg, cipher=cipher, shards=shards, gateway="gw3", timeout=8.0,
                          retries=0, allow_partial=True)  # fmt: skip
    with strict, lenient:
        with pytest.raises(PartialResultError) as info:
            strict.identify(people[names.index(victim)])
        assert info.value.missing == (down,) and down in str(info.value)
        assert info.value.code == "partial_result"
        got = lenient.identify(people[names.index(victim)])
        assert got.partial and got.missing == (down,) and not got.match
        other = next(n for n in names if owner(n, shards) != down)
        found = lenient.identify(people[names.index(other)])
        assert found.partial and found.match and found.identity == other
