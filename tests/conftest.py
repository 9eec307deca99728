"""Shared pytest fixtures.

The project's pytest plugin (:mod:`cipherface.testing.plugin`, docs/testing.md) is
loaded here too, so its ``cipherface_*`` fixtures are exercised on every run.

Brokers (real Mosquitto 2; tests that need one skip, saying how to get one, when
there is none -- see :func:`cipherface.agents.broker.find_broker`):

* ``broker``            session, dev profile: loopback, plain MQTT, anonymous, no ACL
                        (the plugin's ``cipherface_broker_session``).
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

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipherface.agents.broker import (
    BrokerSource,
    BrokerUnavailableError,
    LocalBroker,
    find_broker,
)
from cipherface.agents.deploy import Deployment
from cipherface.crypto import sites
from cipherface.crypto.engine import EdgeCipher
from cipherface.testing.brokers import Broker

# The package's pytest11 entry point has loaded the plugin already, unless this
# install predates it or PYTEST_DISABLE_PLUGIN_AUTOLOAD is set: then load it here
# (loading it twice is an error).
pytest_plugins = [] if "cipherface.testing.plugin" in sys.modules else ["cipherface.testing.plugin"]
# A downstream project of its own, run through pytester by test_plugin.py.
collect_ignore = ["downstream"]


def _local_source() -> BrokerSource:
    """A broker we can start ourselves (binary or Docker), ignoring MQTT_URL."""
    try:
        return find_broker(env={})
    except BrokerUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def broker(cipherface_broker_session: Broker) -> Broker:
    """A running dev-profile broker (anonymous, loopback): ``.url``, ``.host``, ``.port``."""
    return cipherface_broker_session


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


@pytest.fixture(scope="module")
def cipher(tmp_path_factory: pytest.TempPathFactory) -> EdgeCipher:
    """A fresh CKKS site key (128-d, guarded), one per test module."""
    keys = tmp_path_factory.mktemp("keys") / "site"
    sites.generate_key_dir(keys, dim=128)
    return sites.load_edge_cipher(keys)
