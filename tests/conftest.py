"""Shared pytest fixtures.

Brokers (real Mosquitto 2; tests that need one skip, saying how to get one, when
there is none -- see :func:`cipherface.agents.broker.find_broker`):

* ``broker``            session, dev profile: loopback, plain MQTT, anonymous, no ACL.
                        ``MQTT_URL`` replaces it with an external broker.
* ``restartable_broker`` per test, dev profile, a :class:`LocalBroker` of its own
                        (``.restart()`` keeps persistent sessions and queued messages).
* ``secure_deployment`` session: a credentials directory made by
                        :class:`cipherface.agents.deploy.Deployment` (accounts below).
* ``secure_broker``     session: the project's mosquitto.conf (no anonymous, password
                        file, ACL, TLS with the dev CA) on those credentials.

``secure_deployment`` accounts (password: ``secure_deployment.password(username)``;
the broker ties client id to username, so one connection per account at a time):

* gateways ``site-a.gw1``, ``site-a.gw2``, ``site-b.gw1``
* integrators ``site-a@integrator``, ``site-b@integrator``
* cloud workers ``cloud-main`` (serves site-a and site-b), ``cloud-b`` (site-b only)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cipherface.agents.broker import (
    BrokerSource,
    BrokerUnavailableError,
    ExternalBroker,
    LocalBroker,
    find_broker,
)
from cipherface.agents.deploy import Deployment


def _local_source() -> BrokerSource:
    """A broker we can start ourselves (binary or Docker), ignoring MQTT_URL."""
    try:
        return find_broker(env={})
    except BrokerUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker | ExternalBroker]:
    """A running dev-profile broker (anonymous, loopback): ``.url``, ``.host``, ``.port``."""
    try:
        source = find_broker()
    except BrokerUnavailableError as exc:
        pytest.skip(str(exc))
    if source.kind == "url":
        assert source.url is not None
        yield ExternalBroker(url=source.url)
        return
    with LocalBroker(profile="dev", backend=source.kind, binary=source.binary) as b:
        yield b


@pytest.fixture
def restartable_broker() -> Iterator[LocalBroker]:
    """A dev-profile broker of this test's own, which it may stop and restart."""
    source = _local_source()
    assert source.kind != "url"
    with LocalBroker(profile="dev", backend=source.kind, binary=source.binary) as b:
        yield b


@pytest.fixture(scope="session")
def secure_deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """Credentials for ``secure_broker``: CA, broker certificate, the accounts above."""
    directory: Path = tmp_path_factory.mktemp("creds")
    dep = Deployment.init(directory, hostnames=["mosquitto"])
    dep.add_site("site-a", gateways=["gw1", "gw2"], integrator="integrator")
    dep.add_site("site-b", gateways=["gw1"], integrator="integrator")
    dep.add_cloud("main", sites=["site-a", "site-b"])
    dep.add_cloud("b", sites=["site-b"])
    return dep


@pytest.fixture(scope="session")
def secure_broker(secure_deployment: Deployment) -> Iterator[LocalBroker]:
    """The project's mosquitto.conf, running: ``.port`` (plain loopback), ``.tls_port``."""
    source = _local_source()
    assert source.kind != "url"
    with LocalBroker(
        profile="secure",
        files=secure_deployment.broker_files,
        backend=source.kind,
        binary=source.binary,
    ) as b:
        yield b
