"""Cloud throughput and scale-out (issue 11): lanes, batched verifies, several workers.

Real Mosquitto (conftest ``broker``), real CKKS galleries, synthetic 128-d vectors.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.dispatch import lane_for
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import sites
from cipherface.crypto.engine import EdgeCipher, Gallery
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

DIM = 128


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def cipher(tmp_path_factory: pytest.TempPathFactory) -> EdgeCipher:
    keys = tmp_path_factory.mktemp("keys") / "site"
    sites.generate_key_dir(keys, dim=DIM)
    return sites.load_edge_cipher(keys)


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
            assert isinstance(reply, Error) and reply.code == "malformed"
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
