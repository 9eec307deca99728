"""A guarded edge through a real Mosquitto: names in and out, opaque labels on the wire,
a cheating cloud refused and the gateway halted (crypto/guard.py in agents/edge.py)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import seal, sites
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.guard import load_guard
from cipherface.errors import GatewayHaltedError, ResultForgedError

DIM = 128


def _unit(rng: np.random.Generator, n: int) -> np.ndarray[Any, Any]:
    v = rng.normal(size=(n, DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def setup(broker: Any, tmp_path: Path) -> Iterator[tuple[EdgeClient, CloudAgent, list[Any]]]:
    site = f"t{secrets.token_hex(4)}"
    keys = tmp_path / "keys"
    sites.generate_key_dir(keys, dim=DIM)
    cipher = sites.load_edge_cipher(keys)
    guard = load_guard(keys, cipher)
    assert guard is not None
    alerts: list[Any] = []
    cloud = CloudAgent(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp_path / "cloud",
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",
    )
    cloud.start()
    edge = EdgeClient(
        broker=BrokerConfig(url=broker.url),
        cipher=cipher,
        site=site,
        gateway="gw1",
        timeout=10.0,
        guard=guard,
        on_forged=alerts.append,
    )
    edge.start()
    try:
        yield edge, cloud, alerts
    finally:
        edge.close()
        cloud.stop()


def test_guarded_edge_keeps_names_private_and_refuses_forged_results(
    setup: tuple[EdgeClient, CloudAgent, list[Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    edge, cloud, alerts = setup
    rng = np.random.default_rng(secrets.randbits(32))
    people = _unit(rng, 40)
    names = [f"Person Ñ{i}" for i in range(40)]
    assert edge.enroll_bulk(names[:39], people[:39], progress=False) == 39
    assert edge.enroll(names[39], embeddings=people[39]).enrolled == 1
    assert sorted(x for x in edge.ids() if x is not None) == sorted(names)  # names out
    hit = edge.identify(vector=people[7])
    assert hit.match and hit.identity == names[7]
    assert edge.verify(names[3], vector=people[3]).match
    assert not edge.verify(names[3], vector=people[4]).match
    assert edge.delete(names[5]) == 1
    assert names[5] not in edge.ids()

    # The cloud's disk holds no name and no name length: 128-character labels only.
    blob = b"".join(p.read_bytes() for p in (tmp_path / "cloud").rglob("*") if p.is_file())
    assert b"Person" not in blob
    stored = cloud.keys.gallery(edge.site, edge.cipher.key_id).ids()
    # Three packs (28 + 11 in bulk, 1 alone), each filled with canaries; one person deleted.
    assert len([x for x in stored if x is not None]) == 3 * 32 - 1
    assert all(x is None or len(x) == 128 for x in stored)

    # Now the cloud cheats: every identify result gets a key-dependent shift in c1.
    honest = CkksGallery.identify

    def crafted(self: CkksGallery, probe: bytes) -> tuple[bytes, int]:
        res, count = honest(self, probe)
        obj = msgpack.unpackb(res, raw=False)
        ring, pub = self.ring, self.pub
        ct = seal.parse_ciphertext(
            obj["blocks"][0],
            what="r",
            parms_id=pub.result_level,
            size=3,
            n=pub.params.n,
            q=ring.q[:1],
        )
        c = ring.intt(ct.data)
        c[1, 0, 3] = (c[1, 0, 3] + 2**18) % ring.q[0]  # c1 += 2^18 X^3: a key-dependent shift
        obj["blocks"][0] = seal.ciphertext_bytes(
            ring.ntt(c), parms_id=pub.result_level, scale=pub.params.result_scale
        )
        return bytes(msgpack.packb(obj, use_bin_type=True)), count

    # A verify result whose pack was shifted by one template (the neighbour's score).
    honest_verify = CkksGallery.verify

    def shifted(self: CkksGallery, identity: str, probe: bytes) -> bytes:
        obj = msgpack.unpackb(honest_verify(self, identity, probe), raw=False)
        obj["pos"] = (obj["pos"] + 1) % (self.params.n // self.dim)
        return bytes(msgpack.packb(obj, use_bin_type=True))

    monkeypatch.setattr(CkksGallery, "verify", shifted)
    with pytest.raises(ResultForgedError):
        edge.verify(names[3], vector=people[3])
    monkeypatch.setattr(CkksGallery, "verify", honest_verify)
    assert edge.guard is not None
    edge.guard.reset_halt()
    edge.forged = 0
    alerts.clear()

    monkeypatch.setattr(CkksGallery, "identify", crafted)
    for _ in range(3):
        with pytest.raises(ResultForgedError):
            edge.identify(vector=people[7])
    assert len(alerts) == 3 and edge.forged == 3
    with pytest.raises(GatewayHaltedError):  # halted: no request reaches the cloud
        edge.identify(vector=people[7])
    assert edge.guard is not None and edge.guard.status().halted
    from cipherface.agents.observed import observe_edge

    observed, _ = observe_edge(edge)  # health levels and metrics (cipherface_forged_results)
    levels = observed.load()
    assert levels["forged_results"] == 3 and levels["gateway_halted"] == 1
    assert b"cipherface_forged_results" in observed.metrics.exposition()
