"""A broker for a test: ``MQTT_URL``, else a ``mosquitto`` we start, else a container.

:func:`open_broker` follows :func:`cipherface.agents.broker.find_broker`'s order and
hands back something with ``.url``, ``.host`` and ``.port``:

* ``MQTT_URL`` set: an :class:`~cipherface.agents.broker.ExternalBroker` (not ours:
  never restarted or stopped);
* ``mosquitto`` installed: a :class:`~cipherface.agents.broker.LocalBroker` on free
  loopback ports, rendered from the project's ``mosquitto.conf`` (``dev`` profile:
  anonymous, loopback only; a wheel install uses the copy packaged here), restartable;
* a Docker engine answers: :class:`cipherface.testing.containers.MosquittoContainer`
  (the same configuration, on a port Docker picks);
* none of them: :class:`~cipherface.agents.broker.BrokerUnavailableError`, whose
  message says how to get a broker (the fixtures turn it into a skip).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Protocol

from cipherface.agents.broker import PROJECT_CONFIG, ExternalBroker, LocalBroker, find_broker

#: The copy of the project's mosquitto.conf installed with this package (a link to it
#: in a checkout), for installs without the source tree.
PACKAGED_CONFIG: Final = Path(__file__).resolve().parent / "mosquitto.conf"


def config_template() -> Path:
    """The project's ``mosquitto.conf``: the checkout's, else the packaged copy."""
    return PROJECT_CONFIG if PROJECT_CONFIG.is_file() else PACKAGED_CONFIG


class Broker(Protocol):
    """What every broker fixture yields."""

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""

    @property
    def host(self) -> str:
        """Host name or address."""

    @property
    def port(self) -> int:
        """TCP port."""


@contextmanager
def open_broker(
    *, env: Mapping[str, str] | None = None, use_docker: bool = True
) -> Iterator[Broker]:
    """Start (or point at) a dev-profile broker for the duration of the block.

    Args:
        env: where to read ``MQTT_URL`` (default ``os.environ``; ``{}`` insists on a
            broker of our own).
        use_docker: fall back to a Mosquitto container when there is no binary.

    Yields:
        The running broker (``.url``, ``.host``, ``.port``).

    Raises:
        BrokerUnavailableError: no broker here; the message says how to get one.
        InvalidArgumentError: ``MQTT_URL`` is malformed.
    """
    source = find_broker(env=env, use_docker=use_docker)
    if source.kind == "url":
        assert source.url is not None
        yield ExternalBroker(url=source.url)
    elif source.kind == "binary":
        with LocalBroker(
            profile="dev", backend="binary", binary=source.binary, template=config_template()
        ) as local:
            yield local
    else:
        from cipherface.testing.containers import MosquittoContainer

        with MosquittoContainer() as container:
            yield container


__all__ = ["PACKAGED_CONFIG", "Broker", "config_template", "open_broker"]
