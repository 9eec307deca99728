"""pytest plugin: a real broker, cloud agent, keys and edge for integrators' tests.

Installed with the package (entry point ``pytest11``: ``cipherface``) and inert until
a test names one of its fixtures: importing it loads nothing heavier than pytest,
it defines no hook and no autouse fixture. ``-p no:cipherface`` turns it off.

Fixtures (docs/testing.md has the full story):

=============================  ========  =================================================
fixture                        scope     what it gives
=============================  ========  =================================================
``cipherface_broker_session``  session   a broker (``.url .host .port``): ``MQTT_URL``,
                                         else ``mosquitto``, else a Mosquitto container,
                                         else the test is skipped with how to get one
``cipherface_broker``          function  a broker of the test's own (same order)
``cipherface_keys_session``    session   a site's key pair (:class:`SiteKeys`), CKKS/Dlib
``cipherface_keys``            function  a fresh key pair in ``tmp_path``
``cipherface_site``            function  a fresh site id (a topic level)
``cipherface_cloud_session``   session   a cloud agent on the session broker, every site
``cipherface_cloud``           function  a cloud agent on ``cipherface_broker`` serving
                                         ``cipherface_site``, store in ``tmp_path``
``cipherface_edge``            function  a started ``EdgeClient`` (gateway ``gw1``, the
                                         session keys) whose key that cloud holds
``cipherface_faces``           function  :class:`Faces`: enroll synthetic or real faces,
                                         write synthetic captures
``cipherface_gateway``         function  :class:`Gateway`: the camera gateway on a folder
                                         (JSON events, Home Assistant discovery)
``cipherface_events``          function  :class:`Recorder` on the site's integrator topics
                                         (JSON events, HA discovery, msgpack decisions)
``cipherface_recorder``        function  ``recorder(filters)``: more recorders
=============================  ========  =================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cipherface.agents.cloud import CloudAgent
    from cipherface.agents.edge import EdgeClient
    from cipherface.testing.brokers import Broker
    from cipherface.testing.recorder import Recorder
    from cipherface.testing.services import Faces, Gateway, SiteKeys


def _broker(stack: ExitStack) -> Broker:
    from cipherface.agents.broker import BrokerUnavailableError
    from cipherface.testing.brokers import open_broker

    try:
        return stack.enter_context(open_broker())
    except BrokerUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def cipherface_broker_session() -> Iterator[Broker]:
    """A running broker shared by the whole session (``.url``, ``.host``, ``.port``)."""
    with ExitStack() as stack:
        yield _broker(stack)


@pytest.fixture
def cipherface_broker() -> Iterator[Broker]:
    """A running broker of this test's own (``MQTT_URL``, when set, is shared)."""
    with ExitStack() as stack:
        yield _broker(stack)


@pytest.fixture(scope="session")
def cipherface_keys_session(tmp_path_factory: pytest.TempPathFactory) -> SiteKeys:
    """A site's CKKS key pair for the Dlib model, generated once per session."""
    from cipherface.testing.services import make_keys

    return make_keys(tmp_path_factory.mktemp("cipherface-keys") / "site")


@pytest.fixture
def cipherface_keys(tmp_path: Path) -> SiteKeys:
    """A fresh CKKS key pair for the Dlib model, in ``tmp_path/keys``."""
    from cipherface.testing.services import make_keys

    return make_keys(tmp_path / "keys")


@pytest.fixture
def cipherface_site() -> str:
    """A fresh site id: tests sharing a broker never see each other's topics."""
    from cipherface.testing.services import new_site_id

    return new_site_id()


@pytest.fixture(scope="session")
def cipherface_cloud_session(
    cipherface_broker_session: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CloudAgent]:
    """A cloud agent on the session broker serving every site, on a temporary store."""
    from cipherface.testing.services import open_cloud

    with open_cloud(
        broker_url=cipherface_broker_session.url,
        data_dir=tmp_path_factory.mktemp("cipherface-cloud"),
    ) as agent:
        yield agent


@pytest.fixture
def cipherface_cloud(
    cipherface_broker: Broker, cipherface_site: str, tmp_path: Path
) -> Iterator[CloudAgent]:
    """A cloud agent on ``cipherface_broker`` serving ``cipherface_site``
    (store: ``tmp_path/cloud``)."""
    from cipherface.testing.services import open_cloud

    with open_cloud(
        broker_url=cipherface_broker.url,
        data_dir=tmp_path / "cloud",
        sites=[cipherface_site],
    ) as agent:
        yield agent


@pytest.fixture
def cipherface_edge(
    cipherface_broker: Broker,
    cipherface_cloud: CloudAgent,
    cipherface_keys_session: SiteKeys,
    cipherface_site: str,
) -> Iterator[EdgeClient]:
    """A started edge client for ``cipherface_site`` / ``gw1``; the cloud has its key."""
    from cipherface.testing.services import open_edge

    with open_edge(
        broker_url=cipherface_broker.url,
        keys=cipherface_keys_session,
        site=cipherface_site,
    ) as edge:
        yield edge


@pytest.fixture
def cipherface_faces(cipherface_edge: EdgeClient, tmp_path: Path) -> Faces:
    """Enroll synthetic (``faces.enroll("alice")``) or real faces, write captures."""
    from cipherface.testing.services import Faces

    return Faces(edge=cipherface_edge, folder=tmp_path / "captures")


@pytest.fixture
def cipherface_gateway(cipherface_edge: EdgeClient, tmp_path: Path) -> Iterator[Gateway]:
    """The camera gateway on ``tmp_path/inbox`` (camera ``door``): ``drop()`` a photo,
    then ``wait()`` for its integrator event."""
    from cipherface.testing.services import Gateway

    gateway = Gateway(edge=cipherface_edge, inbox=tmp_path / "inbox")
    try:
        yield gateway
    finally:
        gateway.close()


@pytest.fixture
def cipherface_recorder(
    cipherface_broker: Broker,
) -> Iterator[Callable[..., Recorder]]:
    """``recorder(filters, url=None)``: a started :class:`Recorder` (closed afterwards)."""
    from cipherface.testing.recorder import Recorder

    made: list[Recorder] = []

    def factory(filters: Sequence[str], *, url: str | None = None) -> Recorder:
        rec = Recorder(url=url or cipherface_broker.url, filters=filters)
        made.append(rec)
        return rec

    try:
        yield factory
    finally:
        for rec in made:
            rec.close()


@pytest.fixture
def cipherface_events(
    cipherface_recorder: Callable[..., Recorder], cipherface_site: str
) -> Recorder:
    """Every message on ``cipherface_site``'s integrator topics, from before the test
    body on: ``.wait_for_event()``, ``.wait_for_discovery()``, ``.wait_for_decision()``,
    ``.messages``."""
    from cipherface.testing.recorder import integrator_filters

    return cipherface_recorder(integrator_filters(cipherface_site))
