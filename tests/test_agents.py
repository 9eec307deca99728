"""Cloud and edge agents end to end on a real Mosquitto (conftest ``broker`` fixtures).

Every test has its own site (the topic level) and its own cloud agent ids and share
group, and retires the agents' persistent sessions at the end, so tests never see
each other's requests. Embeddings are synthetic 128-d vectors (no face model).
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from vectors import near, unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import IDS_RESTARTS, EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import sites
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import (
    InvalidArgumentError,
    PeerReportedError,
    RequestTimeoutError,
    ResultRejectedError,
)
from cipherface.protocol import (
    MAX_IDS,
    Decision,
    Enroll,
    Error,
    IdsGet,
    KeyPublish,
    Result,
    Status,
    Verify,
    cloud_status_topic,
    decode,
    encode,
    error_topic,
    events_topic,
    now_ms,
    request_topic,
    result_topic,
)

DIM = 128
GW = "gw1"


# ------------------------------------------------------------------- helpers
class Sniffer:
    """A plain paho client: publishes raw bytes, records what arrives on its filters."""

    def __init__(self, url: str, filters: list[str], *, version: str = "5") -> None:
        cfg = BrokerConfig(url=url)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"sniffer-{secrets.token_hex(4)}",
            protocol=paho.MQTTv5 if version == "5" else paho.MQTTv311,
        )
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(cfg.host, cfg.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def next(self, timeout: float = 10.0, *, topic: str | None = None) -> paho.MQTTMessage:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if topic is None or msg.topic == topic:
                return msg

    def reply_to(self, request_id: str, timeout: float = 10.0) -> paho.MQTTMessage:
        """The next result or error whose ``corr`` is ``request_id``."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if getattr(decode(msg.payload), "corr", None) == request_id:
                return msg

    def drain(self, wait: float = 0.3) -> list[paho.MQTTMessage]:
        time.sleep(wait)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def other_cipher(tmp_path_factory: pytest.TempPathFactory) -> EdgeCipher:
    keys = tmp_path_factory.mktemp("keys") / "other"
    sites.generate_key_dir(keys, dim=DIM)
    return sites.load_edge_cipher(keys)


@pytest.fixture
def site() -> str:
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(32))


CloudFactory = Callable[..., CloudAgent]


@pytest.fixture
def make_cloud(broker: Any, tmp_path: Path, site: str) -> Iterator[CloudFactory]:
    """Cloud agents for this test: own agent id, share group and site; retired afterwards."""
    group = f"g{secrets.token_hex(4)}"
    agent_id = f"cloud-{secrets.token_hex(4)}"
    made: list[CloudAgent] = []

    def factory(*, version: str = "5", start: bool = True, **kw: Any) -> CloudAgent:
        kw.setdefault("sites", [site])
        kw.setdefault("data_dir", tmp_path / "cloud")
        kw.setdefault("agent_id", agent_id)
        agent = CloudAgent(
            broker=BrokerConfig(url=broker.url, mqtt_version=version),
            share_group=group,
            **kw,
        )
        made.append(agent)
        if start:
            agent.start()
        return agent

    yield factory
    for agent in made:
        agent.stop()
    # End the persistent session: a retired member of a share group would keep
    # getting its turn of every later request on the shared broker.
    _wipe_session(broker.url, agent_id)


def _wipe_session(url: str, client_id: str) -> None:
    """Connect once with a clean session under ``client_id`` (discards its session)."""
    cfg = BrokerConfig(url=url)
    done = threading.Event()
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    client.on_connect = lambda *a: done.set()
    client.connect(cfg.host, cfg.port)
    client.loop_start()
    done.wait(5)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def make_edge(broker: Any, cipher: EdgeCipher, site: str) -> Iterator[Callable[..., EdgeClient]]:
    made: list[EdgeClient] = []

    def factory(*, version: str = "5", **kw: Any) -> EdgeClient:
        kw.setdefault("cipher", cipher)
        kw.setdefault("site", site)
        kw.setdefault("gateway", GW)
        kw.setdefault("timeout", 10.0)
        edge = EdgeClient(
            broker=BrokerConfig(url=broker.url, mqtt_version=version),
            **kw,
        )
        edge.start()
        made.append(edge)
        return edge

    yield factory
    for edge in made:
        edge.close()


def _mutate(data: bytes, **changes: Any) -> bytes:
    """Re-encode a message with envelope (or ``b.``-prefixed body) fields changed."""
    obj = msgpack.unpackb(data, raw=False)
    for key, value in changes.items():
        if key.startswith("b_"):
            obj["b"][key[2:]] = value
        else:
            obj[key] = value
    return msgpack.packb(obj, use_bin_type=True)


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("cloud_version", "edge_version"),
    [("5", "5"), ("3.1.1", "3.1.1"), ("5", "3.1.1"), ("3.1.1", "5")],
)
def test_enroll_verify_identify_delete(
    broker: Any,
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    site: str,
    rng: np.random.Generator,
    cloud_version: str,
    edge_version: str,
) -> None:
    cloud = make_cloud(version=cloud_version)
    events = Sniffer(broker.url, [events_topic(site, GW)])
    edge = make_edge(version=edge_version)
    people = unit(rng, 6)
    names = [f"person {i}" for i in range(6)]
    try:
        edge.publish_key()
        empty = edge.identify(vector=people[0])  # nothing enrolled yet
        assert not empty.match and empty.identity is None
        assert edge.enroll_bulk(names[:5], people[:5], progress=False) == 5
        assert edge.enroll(names[5], embeddings=np.stack([people[5], near(people[5], rng)]))
        assert sorted(i for i in edge.ids() if i is not None) == sorted(names)

        same = edge.verify("person 2", vector=near(people[2], rng))
        other = edge.verify("person 2", vector=people[3])
        assert same.match and same.identity == "person 2" and same.latency_ms > 0
        assert not other.match and other.identity == "person 2"

        who = edge.identify(vector=near(people[4], rng))
        nobody = edge.identify(vector=unit(rng, 1)[0])
        assert who.match and who.identity == "person 4"
        assert not nobody.match and nobody.identity is None

        assert edge.delete(["person 4", "never enrolled"]) == 1
        gone = edge.identify(vector=near(people[4], rng))
        assert not gone.match and gone.identity is None
        with pytest.raises(PeerReportedError) as info:
            edge.verify("person 4", vector=people[4])
        assert info.value.remote_code == "unknown_identity"

        # Every decision went out as an event, and an event carries no score.
        seen = [decode(events.next(timeout=5).payload) for _ in range(6)]
        assert all(isinstance(d, Decision) for d in seen)
        assert [d.match for d in seen] == [False, True, False, True, False, False]
        assert set(seen[1].body()) == {"op", "identity", "match", "latency_ms", "photo"}
        assert cloud.stats["errors"] == 1  # the unknown identity
    finally:
        events.close()


@pytest.mark.parametrize("scheme", ["paillier", "damgard-jurik", "okamoto-uchiyama"])
def test_paillier_family_through_the_agents(
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    tmp_path: Path,
    rng: np.random.Generator,
    scheme: str,
) -> None:
    """The agents only use crypto.sites: the Paillier-family engines work unchanged."""
    sites.generate_key_dir(tmp_path / "keys", dim=DIM, scheme=scheme)
    make_cloud()
    edge = make_edge(cipher=sites.load_edge_cipher(tmp_path / "keys"), timeout=60.0)
    people = unit(rng, 4)
    assert edge.enroll_bulk(["a", "b", "c", "d"], people, progress=False) == 4
    assert edge.verify("b", vector=near(people[1], rng)).match
    assert not edge.verify("b", vector=people[2]).match
    assert edge.identify(vector=near(people[3], rng)).identity == "d"
    assert edge.delete("d") == 1
    assert edge.identify(vector=near(people[3], rng)).identity is None


def test_mqtt5_properties(
    broker: Any, make_cloud: CloudFactory, make_edge: Callable[..., EdgeClient], site: str
) -> None:
    """MQTT 5 requests carry ResponseTopic/CorrelationData/expiry; replies echo the correlation."""
    make_cloud(version="5")
    sniff = Sniffer(broker.url, [f"cipherface/v1/{site}/#"])
    edge = make_edge(version="5")
    try:
        edge.publish_key()
        req = sniff.next(topic=request_topic(site, GW, "key"))
        res = sniff.next(topic=result_topic(site, GW))
        sent = decode(req.payload)
        got = decode(res.payload)
        assert isinstance(sent, KeyPublish) and isinstance(got, Result)
        assert got.corr == sent.id
        rprops: Any = req.properties
        sprops: Any = res.properties
        assert rprops.ResponseTopic == result_topic(site, GW)
        assert rprops.CorrelationData == sent.id.encode()
        assert 0 < rprops.MessageExpiryInterval <= 200
        assert sprops.CorrelationData == sent.id.encode()
    finally:
        sniff.close()


def test_status_retained_and_last_will(broker: Any, make_cloud: CloudFactory) -> None:
    cloud = make_cloud()
    topic = cloud_status_topic(cloud.agent_id)
    sniff = Sniffer(broker.url, [topic])  # subscribes after: gets the retained message
    try:
        online = decode(sniff.next(timeout=5).payload)
        assert isinstance(online, Status) and online.state == "online" and online.role == "cloud"
        cloud.stop(graceful=False)  # like a crash: the broker publishes the will
        will = decode(sniff.next(timeout=10).payload)
        assert isinstance(will, Status) and will.state == "offline"
        again = make_cloud()
        assert decode(sniff.next(timeout=5).payload).state == "online"
        again.stop()
        assert decode(sniff.next(timeout=5).payload).state == "offline"
    finally:
        sniff.close()


def test_request_sent_while_cloud_is_down_is_served_on_start(
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    rng: np.random.Generator,
) -> None:
    cloud = make_cloud()
    edge = make_edge(timeout=30.0, retries=0)
    people = unit(rng, 2)
    edge.enroll("alice", embeddings=people[0])
    cloud.stop()  # graceful: the persistent session stays on the broker

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(edge.verify, "alice", vector=near(people[0], rng))
        enroll = pool.submit(edge.enroll, "bob", embeddings=people[1])
        time.sleep(1.0)
        assert not pending.done()  # nobody is serving
        assert edge.in_flight == 1  # the verify waits (the enroll is queued behind it)
        make_cloud()  # same agent id, same data: the queued requests are delivered
        decision = pending.result(timeout=30)
        assert enroll.result(timeout=30).enrolled == 1
    assert decision.match and decision.identity == "alice"
    assert edge.identify(vector=near(people[1], rng)).identity == "bob"
    assert edge.in_flight == 0


class _StallingCloud(CloudAgent):
    """A cloud agent whose worker stalls on the first request until ``gate`` opens."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def handle_many(self, requests: Any) -> Any:
        self.entered.set()
        self.gate.wait(10)
        return super().handle_many(requests)


def test_request_accepted_by_a_crashing_cloud_is_not_lost(
    broker: Any,
    tmp_path: Path,
    site: str,
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    rng: np.random.Generator,
) -> None:
    """manual_ack: a request is acknowledged only after its reply is out, so one that a
    crashing agent had received is redelivered to the agent's next incarnation."""
    first = make_cloud()
    edge = make_edge(timeout=30.0, retries=0)
    frank = unit(rng, 1)[0]
    edge.enroll("frank", embeddings=frank)
    first.stop()
    stalling = _StallingCloud(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp_path / "cloud",
        agent_id=first.agent_id,
        sites=[site],
        share_group=first.share_group,
        publish_timeout=1.0,
    )
    stalling.start()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(edge.verify, "frank", vector=near(frank, rng))
        assert stalling.entered.wait(10)
        # Crash while the request is in hand (received, not yet answered or acked).
        threading.Timer(2.0, stalling.gate.set).start()  # after the crash below
        stalling.stop(graceful=False)
        assert not pending.done()
        make_cloud()  # the next incarnation gets the unacknowledged request again
        decision = pending.result(timeout=30)
    assert decision.match and decision.identity == "frank"


def test_duplicate_request_is_answered_once(
    broker: Any,
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    site: str,
    cipher: EdgeCipher,
    rng: np.random.Generator,
) -> None:
    cloud = make_cloud()
    edge = make_edge()
    edge.publish_key()
    sniff = Sniffer(broker.url, [result_topic(site, GW), error_topic(site, GW)])
    try:
        msg = Enroll(
            site=site,
            gw=GW,
            kid=cipher.key_id,
            ids=("carol",),
            payload=cipher.encrypt_templates(unit(rng, 1)),
        )
        data = encode(msg)
        topic = request_topic(site, GW, "enroll")
        sniff.publish(topic, data)
        sniff.publish(topic, data)  # the same message id: a QoS 1 redelivery or a retry
        first, second = sniff.reply_to(msg.id), sniff.reply_to(msg.id)
        assert first.payload == second.payload  # same reply bytes
        reply = decode(first.payload)
        assert isinstance(reply, Result) and reply.corr == msg.id and reply.enrolled == 1
        assert cloud.stats["duplicates"] == 1
        assert [i for i in edge.ids() if i is not None] == ["carol"]

        # After a restart (empty memory cache) the persisted reply answers it again.
        cloud.stop()
        restarted = make_cloud()
        sniff.publish(topic, data)
        third = sniff.reply_to(msg.id)
        assert third.payload == first.payload
        assert restarted.stats["duplicates"] == 1
        slots = edge.ids()
        assert [i for i in slots if i is not None] == ["carol"]
        ids_version = decode(third.payload).ids_version
        assert edge.request(IdsGet(site=site, gw=GW, kid=cipher.key_id)).ids_version == ids_version
    finally:
        sniff.close()


def test_duplicate_of_a_failed_request_gets_the_same_error(
    broker: Any,
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    site: str,
    cipher: EdgeCipher,
    rng: np.random.Generator,
) -> None:
    make_cloud()
    edge = make_edge()
    edge.publish_key()
    dan = unit(rng, 1)[0]
    sniff = Sniffer(broker.url, [error_topic(site, GW), result_topic(site, GW)])
    try:
        msg = Verify(
            site=site,
            gw=GW,
            kid=cipher.key_id,
            identity="dan",
            probe=cipher.encrypt_probe(dan, op="verify"),
        )
        sniff.publish(request_topic(site, GW, "verify"), encode(msg))
        first = sniff.reply_to(msg.id)
        assert first.topic == error_topic(site, GW)
        edge.enroll("dan", embeddings=dan)
        # The same request id again: answered from the cache, not re-run.
        sniff.publish(request_topic(site, GW, "verify"), encode(msg))
        again = sniff.reply_to(msg.id)
        assert (again.topic, again.payload) == (first.topic, first.payload)
        err = decode(again.payload)
        assert isinstance(err, Error) and err.code == "unknown_identity" and not err.retry
        assert edge.verify("dan", vector=dan).match  # a new request does see the enrollment
    finally:
        sniff.close()


def test_edge_republishes_its_key_after_key_mismatch(
    make_cloud: CloudFactory, make_edge: Callable[..., EdgeClient], rng: np.random.Generator
) -> None:
    cloud = make_cloud()
    edge = make_edge()
    eve = unit(rng, 1)[0]
    # The cloud has never seen this key: identify gets key_mismatch, the edge publishes
    # its key and asks again.
    decision = edge.identify(vector=eve)
    assert not decision.match
    assert cloud.stats["errors"] == 1 and cloud.stats["results"] == 2
    edge.enroll("eve", embeddings=eve)
    assert edge.identify(vector=eve).identity == "eve"


def test_bad_messages_get_error_codes_and_agent_keeps_serving(
    broker: Any,
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    site: str,
    cipher: EdgeCipher,
    other_cipher: EdgeCipher,
    rng: np.random.Generator,
) -> None:
    make_cloud(max_message_bytes=5 * 1024 * 1024)
    edge = make_edge()
    alice = unit(rng, 1)[0]
    edge.enroll("alice", embeddings=alice)
    sniff = Sniffer(broker.url, [error_topic(site, GW)])
    verify_topic = request_topic(site, GW, "verify")
    probe = cipher.encrypt_probe(alice, op="verify")
    good = Verify(site=site, gw=GW, kid=cipher.key_id, identity="alice", probe=probe)
    good_bytes = encode(good)
    foreign = Verify(
        site=site,
        gw=GW,
        kid=other_cipher.key_id,
        identity="alice",
        probe=other_cipher.encrypt_probe(alice, op="verify"),
    )
    wrong_payload = Enroll(
        site=site,
        gw=GW,
        kid=cipher.key_id,
        ids=("mallory",),
        payload=other_cipher.encrypt_templates(alice[None, :]),
    )
    bad_key = KeyPublish(site=site, gw=GW, kid=cipher.key_id, scheme="ckks", public_key=b"junk")
    unknown = Verify(site=site, gw=GW, kid=cipher.key_id, identity="bob", probe=probe)
    nameless = Enroll(
        site=site,
        gw=GW,
        kid=cipher.key_id,
        ids=("mallory",),
        payload=cipher.encrypt_templates(alice[None, :]),
    )
    cases: list[tuple[str, str, bytes, str | None]] = [
        ("not msgpack", verify_topic, b"\xc1\x00garbage", None),
        ("not a map", verify_topic, msgpack.packb([1, 2, 3]), None),
        ("wrong version", verify_topic, _mutate(good_bytes, v=2), good.id),
        ("unknown type", verify_topic, _mutate(good_bytes, t="hello"), good.id),
        ("oversized field", verify_topic, _mutate(good_bytes, b_identity="x" * 5000), None),
        ("oversized message", verify_topic, b"\x00" * (6 * 1024 * 1024), None),
        ("expired", verify_topic, _mutate(good_bytes, ts=1000, exp=now_ms() - 1000), good.id),
        ("gw differs from topic", verify_topic, _mutate(good_bytes, gw="gw2"), good.id),
        ("type differs from topic", request_topic(site, GW, "delete"), good_bytes, good.id),
        ("unknown key", verify_topic, encode(foreign), foreign.id),
        (
            "payload of another key",
            request_topic(site, GW, "enroll"),
            encode(wrong_payload),
            wrong_payload.id,
        ),
        ("malformed public key", request_topic(site, GW, "key"), encode(bad_key), bad_key.id),
        (
            "nil identity",  # nil marks a free slot in results; a request never names one
            request_topic(site, GW, "enroll"),
            _mutate(encode(nameless), b_ids=[None]),
            nameless.id,
        ),
        ("unknown identity", verify_topic, encode(unknown), unknown.id),
    ]
    expected = {
        "not msgpack": "malformed",
        "not a map": "malformed",
        "wrong version": "unsupported_version",
        "unknown type": "unknown_type",
        "oversized field": "too_large",
        "oversized message": "too_large",
        "expired": "expired",
        "gw differs from topic": "invalid_field",
        "type differs from topic": "invalid_field",
        "unknown key": "key_mismatch",
        "payload of another key": "key_mismatch",
        "malformed public key": "key_file",  # docs/protocol.md 6.1, 8.1
        "nil identity": "malformed",
        "unknown identity": "unknown_identity",
    }
    try:
        for name, topic, payload, corr in cases:
            sniff.publish(topic, payload)
            err = decode(sniff.next(timeout=10).payload)
            assert isinstance(err, Error), name
            assert (name, err.code) == (name, expected[name])
            assert err.site == site and err.gw == GW
            if corr is not None:
                assert err.corr == corr, name
            assert err.retry == (err.code == "expired"), name
        # Still serving, and nothing of the garbage got enrolled.
        assert edge.verify("alice", vector=alice).match
        assert [i for i in edge.ids() if i is not None] == ["alice"]
    finally:
        sniff.close()


def test_timeout_retries_with_the_same_message_id(
    broker: Any, make_cloud: CloudFactory, make_edge: Callable[..., EdgeClient], site: str
) -> None:
    make_cloud(sites=["somewhere-else"])  # nobody serves this test's site
    sniff = Sniffer(broker.url, [request_topic(site, GW, "key")])
    edge = make_edge(timeout=0.3, retries=2)
    try:
        with pytest.raises(RequestTimeoutError):
            edge.publish_key()
        sent = sniff.drain()
        assert len(sent) == 3
        assert len({m.payload for m in sent}) == 1  # byte-identical: the cloud can dedup
    finally:
        sniff.close()


def test_large_payloads_and_second_block(
    make_cloud: CloudFactory, make_edge: Callable[..., EdgeClient], rng: np.random.Generator
) -> None:
    """4097 templates: an 8 MB enrollment payload, then a second block; 4 MB probes."""
    make_cloud()
    edge = make_edge(timeout=30.0)
    n = 4097
    people = unit(rng, n)
    names = [f"p{i}" for i in range(n)]
    assert edge.enroll_bulk(names, people, progress=False) == n
    assert edge.identify(vector=near(people[4096], rng)).identity == "p4096"
    assert edge.identify(vector=near(people[17], rng)).identity == "p17"
    assert edge.verify("p4096", vector=near(people[4096], rng)).match


def test_identify_over_more_slots_than_an_id_list_holds(
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    cipher: EdgeCipher,
    site: str,
    rng: np.random.Generator,
) -> None:
    """102,400 enrolled templates + one: the scores of 106,496 slots come in one result
    (count above MAX_IDS, no id list), the edge pages the slot list with ids.get."""
    cloud = make_cloud()
    edge = make_edge(timeout=60.0)
    edge.publish_key()
    block = int(getattr(cipher, "max_templates_per_payload", 4096))
    blocks = -(-(MAX_IDS + 1) // block)  # 25 blocks of 4096
    # One encrypted payload of random faces, enrolled again and again under new names:
    # the build costs broker and storage time, not encryption time.
    filler = cipher.encrypt_templates(unit(rng, block))
    for b in range(blocks):
        ids = tuple(f"filler {b}-{i}" for i in range(block))
        msg = Enroll(site=site, gw=GW, kid=cipher.key_id, ids=ids, payload=filler)
        assert edge.request(msg).enrolled == block
    target = unit(rng, 1)[0]
    edge.enroll("target", embeddings=target)  # opens a block: its 4095 other slots are free
    assert edge.delete(["filler 3-7", "filler 24-4095"]) == 2

    who = edge.identify(vector=near(target, rng))
    assert who.match and who.identity == "target"
    slots = edge.ids()
    assert len(slots) == (blocks + 1) * block > MAX_IDS
    assert slots[blocks * block] == "target" and slots[-1] is None
    assert slots[3 * block + 7] is None and slots[3 * block + 8] == "filler 3-8"
    assert sum(s is not None for s in slots) == blocks * block - 1
    assert not edge.identify(vector=unit(rng, 1)[0]).match
    assert edge.delete("target") == 1
    assert edge.identify(vector=near(target, rng)).identity is None
    assert cloud.stats["errors"] == 0


class _InterleavedEdge(EdgeClient):
    """An edge client that runs ``between`` before asking for any page but the first."""

    def __init__(self, between: Callable[[], None], **kw: Any) -> None:
        super().__init__(**kw)
        self.between = between
        self.pages: list[int] = []

    def request(self, msg: Any, *, timeout: float | None = None) -> Result:
        if isinstance(msg, IdsGet):
            self.pages.append(msg.offset)
            if msg.offset > 0:
                self.between()
        return super().request(msg, timeout=timeout)


def test_id_list_paging_restarts_when_the_gallery_changes(
    broker: Any,
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    cipher: EdgeCipher,
    site: str,
    rng: np.random.Generator,
) -> None:
    make_cloud()
    other = make_edge(gateway="gw2")
    people = unit(rng, 10)
    assert other.enroll_bulk(["a", "b", "c", "d", "e"], people[:5], progress=False) == 5
    assert other.delete("b") == 1
    joined: list[str] = []

    def enroll_once() -> None:
        if not joined:
            joined.append("f")
            other.enroll("f", embeddings=people[5])

    edge = _InterleavedEdge(
        enroll_once, broker=BrokerConfig(url=broker.url), cipher=cipher, site=site, gateway=GW
    )
    with edge:
        slots = edge.ids(page_size=1024)  # a CKKS gallery lists whole 4096-slot blocks
        # Pages 0 and 1024 of the first version, then the whole list of the new version.
        assert edge.pages == [0, 1024, 0, 1024, 2048, 3072]
        live = [s for s in slots if s is not None]
        assert live == ["a", "c", "d", "e", "f"] and slots[1] is None  # b's slot stays free
        assert slots == other.ids()  # one page (the default size) gives the same list
        with pytest.raises(InvalidArgumentError):
            edge.ids(page_size=MAX_IDS + 1)

        # A gallery that changes between every two pages: bounded restarts, then an error.
        edge.between = lambda: other.enroll(f"x{len(edge.pages)}", embeddings=people[6])
        edge.pages.clear()
        with pytest.raises(ResultRejectedError, match="changed"):
            edge.ids(page_size=2048)
        assert edge.pages == [0, 2048] * (IDS_RESTARTS + 1)


def test_replies_fit_a_lowered_reply_limit(
    broker: Any,
    make_cloud: CloudFactory,
    cipher: EdgeCipher,
    site: str,
    rng: np.random.Generator,
) -> None:
    """Under a reply limit below the slot list's size, an identify result goes without
    the list and ids.get pages shrink to fit; the edge still names the right identity."""
    # One block's scores take about 49 KB; 600 names of 128 chars about 78 KB.
    cloud = make_cloud(max_reply_bytes=60_000)
    names = [f"{i:03d}" + "x" * 125 for i in range(600)]
    people = unit(rng, len(names))
    edge = _InterleavedEdge(
        lambda: None, broker=BrokerConfig(url=broker.url), cipher=cipher, site=site, gateway=GW
    )
    with edge:
        assert edge.enroll_bulk(names, people, progress=False) == len(names)
        assert edge.identify(vector=near(people[433], rng)).identity == names[433]
        assert len(edge.pages) > 1  # the list came in shrunken pages
        slots = edge.ids()
        assert slots[: len(names)] == names and set(slots[len(names) :]) == {None}
    assert cloud.stats["errors"] == 0


def test_oversized_request_fails_fast_over_mqtt5(
    make_cloud: CloudFactory, make_edge: Callable[..., EdgeClient], rng: np.random.Generator
) -> None:
    """The cloud cannot read a too-large envelope, but MQTT 5 CorrelationData still
    routes its error to the waiting request: no timeout."""
    make_cloud(max_message_bytes=1024 * 1024)
    edge = make_edge(timeout=20.0, retries=0)
    edge.publish_key()
    t0 = time.monotonic()
    with pytest.raises(PeerReportedError) as info:
        edge.enroll("big", embeddings=unit(rng, 1)[0])  # a 4 MB payload
    assert info.value.remote_code == "too_large"
    assert time.monotonic() - t0 < 10


def test_secure_broker_tls_acl(
    secure_broker: Any,
    secure_deployment: Any,
    cipher: EdgeCipher,
    tmp_path: Path,
    rng: np.random.Generator,
) -> None:
    """The shipped mosquitto.conf: TLS, passwords, ACL; the cloud subscribes per site."""
    ca = str(secure_deployment.ca_cert_path)
    url = secure_broker.tls_url

    def cfg(user: str) -> BrokerConfig:
        return BrokerConfig(
            url=url, username=user, password=secure_deployment.password(user), ca_file=ca
        )

    cloud = CloudAgent(
        broker=cfg("cloud-main"),
        data_dir=tmp_path / "cloud",
        agent_id="cloud-main",
        sites=["site-a", "site-b"],
    )
    cloud.start()
    try:
        with EdgeClient(broker=cfg("site-a.gw1"), cipher=cipher, site="site-a", gateway="gw1") as e:
            alice = unit(rng, 1)[0]
            e.enroll("alice", embeddings=alice)
            assert e.verify("alice", vector=near(alice, rng)).match
    finally:
        cloud.stop(retire=True)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_qos0_and_retained_requests_are_never_served(
    broker: Any,
    make_cloud: CloudFactory,
    make_edge: Callable[..., EdgeClient],
    site: str,
    cipher: EdgeCipher,
    rng: np.random.Generator,
    version: str,
) -> None:
    """QoS 0 has no flow control (an unbounded queue) and a retained request would be
    replayed on every subscribe (re-enrolling an erased identity): the cloud drops both."""
    edge = make_edge()
    sniff = Sniffer(broker.url, [result_topic(site, GW), error_topic(site, GW)])
    topic = request_topic(site, GW, "enroll")
    retained = Enroll(
        site=site,
        gw=GW,
        kid=cipher.key_id,
        ids=("ghost",),
        payload=cipher.encrypt_templates(unit(rng, 1)),
    )
    try:
        # Retained before the cloud exists: it would be delivered on subscribe.
        sniff.client.publish(topic, encode(retained), qos=1, retain=True).wait_for_publish(5)
        cloud = make_cloud(version=version)
        edge.publish_key()
        qos0 = Enroll(
            site=site,
            gw=GW,
            kid=cipher.key_id,
            ids=("fast",),
            payload=cipher.encrypt_templates(unit(rng, 1)),
        )
        sniff.client.publish(topic, encode(qos0), qos=0).wait_for_publish(5)
        # An ordinary request afterwards is served: the agent is alive.
        assert edge.enroll("real", embeddings=unit(rng, 1)[0]).enrolled == 1
        replies = [decode(m.payload) for m in sniff.drain(0.5)]
        assert all(getattr(r, "corr", None) not in (retained.id, qos0.id) for r in replies)
        assert set(edge.ids()) - {None} == {"real"}
        assert cloud.stats["dropped_qos0"] == 1
        # MQTT 5 asks the broker not to send retained messages at all; 3.1.1 drops it.
        assert cloud.stats["dropped_retained"] == (0 if version == "5" else 1)
    finally:
        sniff.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # clear it
        sniff.close()


def test_refused_publishes_are_remembered_not_counted_as_delivered(broker: Any) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from cipherface.agents.mqtt import Connection

    conn = Connection(config=BrokerConfig(url=broker.url), client_id=f"t-{secrets.token_hex(3)}")
    info = paho.MQTTMessageInfo(42)
    conn._publish_cb(conn.client, None, 42, ReasonCode(PacketTypes.PUBACK, "Not authorized"), None)
    conn._publish_cb(conn.client, None, 43, ReasonCode(PacketTypes.PUBACK, "Success"), None)
    assert conn.refused(info) == "Not authorized"
    assert conn.refused(info) is None  # claimed once
    assert conn.refused(paho.MQTTMessageInfo(43)) is None


def test_cloud_keeps_a_bounded_number_of_galleries_open(tmp_path: Path) -> None:
    from cipherface.agents.site_keys import SiteKeys

    keys = SiteKeys(tmp_path, max_open=2)
    made = []
    for i in range(3):
        d = tmp_path / f"k{i}"
        sites.generate_key_dir(d, dim=DIM)
        pub = (d / sites.PUBLIC_NAME).read_bytes()
        kid = sites.load_edge_cipher(d).key_id
        made.append((kid, keys.register("s1", kid, pub)))
    assert len(keys._open) == 2 and ("s1", made[0][0]) not in keys._open
    # A closed gallery reopens on demand (its lock was released when it was closed).
    assert keys.gallery("s1", made[0][0]).key_id == made[0][0]
    keys.close()
