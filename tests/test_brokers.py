"""The end-to-end flow on brokers users cluster: NATS's and RabbitMQ's MQTT gateways.

Neither has shared subscriptions: a ``$share/...`` subscription is accepted and never
receives. The cloud notices at start (its own status through a ``$share``
subscription) and falls back to plain subscriptions instead of timing out every
request; on Mosquitto the same self-test passes and the agent stays shared.

RabbitMQ takes ~25 s to start a private node: its test is marked ``rabbitmq``
(``pytest -m rabbitmq tests/test_brokers.py``) and runs in the default suite too.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vectors import unit

from cipherface.agents.broker import BrokerUnavailableError
from cipherface.agents.brokers import NatsBroker, RabbitMqBroker
from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig, MqttVersion
from cipherface.crypto import sites
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import PeerReportedError

DIM = 128


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsBroker]:
    try:
        broker = NatsBroker()
    except BrokerUnavailableError as exc:
        pytest.skip(str(exc))
    with broker:
        yield broker


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMqBroker]:
    try:
        broker = RabbitMqBroker()
    except BrokerUnavailableError as exc:
        pytest.skip(str(exc))
    with broker:
        yield broker


def full_flow(
    url: str, version: MqttVersion, data: Path, cipher: EdgeCipher, *, expect_fallback: bool
) -> CloudAgent:
    """Key, bulk and single enrollment, verify, identify, id list, delete: all answered."""
    site = f"b{secrets.token_hex(4)}"
    cfg = BrokerConfig(url=url, mqtt_version=version)
    cloud = CloudAgent(
        broker=cfg,
        data_dir=data,
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",  # the default: shared, as users start it
        share_check_s=2.0,
    )
    cloud.start()
    try:
        assert cloud.share_fallback is expect_fallback
        assert all(f.startswith("$share/") != expect_fallback for f in cloud.filters())
        rng = np.random.default_rng(3)
        people = unit(rng, 5)
        names = [f"n{i}" for i in range(5)]
        with EdgeClient(broker=cfg, cipher=cipher, site=site, gateway="gw", timeout=10.0) as edge:
            edge.publish_key()
            assert edge.enroll_bulk(names[:4], people[:4], progress=False) == 4
            assert edge.enroll(names[4], embeddings=people[4:5])
            assert edge.verify("n2", vector=people[2]).match
            assert not edge.verify("n2", vector=people[3]).match
            who = edge.identify(vector=people[4])
            assert who.match and who.identity == "n4"
            assert sorted(i for i in edge.ids() if i is not None) == names
            assert edge.delete(["n4"]) == 1
            with pytest.raises(PeerReportedError) as info:
                edge.verify("n4", vector=people[4])
            assert info.value.remote_code == "unknown_identity"
        return cloud
    finally:
        cloud.stop(retire=True)


def test_mosquitto_passes_the_share_self_test(
    broker: Any, tmp_path: Path, cipher: EdgeCipher
) -> None:
    full_flow(broker.url, "5", tmp_path / "cloud", cipher, expect_fallback=False)


def test_nats_mqtt_gateway_full_flow(nats: NatsBroker, tmp_path: Path, cipher: EdgeCipher) -> None:
    """NATS: no $share -> the cloud falls back to plain subscriptions and says so."""
    full_flow(nats.url, "3.1.1", tmp_path / "cloud", cipher, expect_fallback=True)


def test_nats_without_the_self_test_never_answers(nats: NatsBroker, tmp_path: Path) -> None:
    """What the self-test saves users from: a $share subscription on NATS gets nothing."""
    cloud = CloudAgent(
        broker=BrokerConfig(url=nats.url, mqtt_version="3.1.1"),
        data_dir=tmp_path / "cloud",
        agent_id=f"cloud-{secrets.token_hex(4)}",
        share_group="plain-share",
        share_check_s=0,  # self-test off
    )
    keys = tmp_path / "k"
    sites.generate_key_dir(keys, dim=DIM)
    with cloud:
        assert not cloud.share_fallback
        edge = EdgeClient(
            broker=BrokerConfig(url=nats.url, mqtt_version="3.1.1"),
            cipher=sites.load_edge_cipher(keys),
            site=f"b{secrets.token_hex(4)}",
            gateway="gw",
            timeout=1.0,
            retries=0,
        )
        with edge, pytest.raises(Exception, match="no reply"):
            edge.publish_key()
        assert cloud.stats["requests"] == 0


@pytest.mark.rabbitmq
def test_rabbitmq_mqtt_plugin_full_flow(
    rabbitmq: RabbitMqBroker, tmp_path: Path, cipher: EdgeCipher
) -> None:
    full_flow(rabbitmq.url, "3.1.1", tmp_path / "cloud", cipher, expect_fallback=True)
