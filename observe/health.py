"""Health: the retained JSON status for integrators, and the ``cipherface health`` probe.

Besides the protocol's msgpack status (docs/protocol.md 2.4, with the last will),
each agent run by the CLI keeps a **retained JSON health message** that any site
integrator may read (broker ACL, docs/deployment.md):

* cloud: ``cipherface/v1/cloud/health/<agent_id>``
* edge:  ``cipherface/v1/<site>/health/<gateway>``

``{"state": "online"|"offline", "role", "agent", "version", "ts" (ms), "interval_s",
"uptime_s", "load": {...}}``; ``load`` holds levels of
:mod:`cipherface.observe.metrics`: for the cloud only this process's load
(``queue_depth``, ``in_progress``, ``broker_connected``, ``broker_reconnects``), since
every site's integrator reads it; counts of templates and galleries summed over all
sites stay on the local ``/metrics`` and ``/healthz``. It is republished every
``interval_s`` seconds: a ``ts`` older than about twice that means the agent died
without saying so (the MQTT last will, one per connection, is the msgpack status's).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Final

from cipherface.errors import LocalError

log = logging.getLogger(__name__)

PREFIX: Final = "cipherface/v1"
DEFAULT_INTERVAL_S: Final = 30.0


def cloud_health_topic(agent_id: str) -> str:
    """Retained JSON health topic of a cloud agent."""
    return f"{PREFIX}/cloud/health/{agent_id}"


def edge_health_topic(site: str, gateway: str) -> str:
    """Retained JSON health topic of an edge gateway."""
    return f"{PREFIX}/{site}/health/{gateway}"


class HealthError(LocalError):
    """The health probe found the agent unhealthy or unreachable."""

    code = "unhealthy"


Publish = Callable[[str, bytes], Any]


class HealthPublisher:
    """Publish the retained JSON health message now and every ``interval`` seconds.

    Args:
        topic: where (see the module docstring).
        role: ``cloud`` or ``edge``.
        agent: the agent id or ``<site>/<gateway>``.
        version: the software version.
        load: returns the current levels.
        publish: ``publish(topic, payload)`` retained at QoS 1 on the agent's own
            connection (brokers tie one connection to each account).
        interval: seconds between messages.
    """

    def __init__(
        self,
        *,
        topic: str,
        role: str,
        agent: str,
        version: str,
        load: Callable[[], Mapping[str, Any]],
        publish: Publish,
        interval: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.topic = topic
        self.role = role
        self.agent = agent
        self.version = version
        self.load = load
        self.publish = publish
        self.interval = interval
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)

    def message(self, state: str = "online") -> bytes:
        """The JSON health message."""
        try:
            load = dict(self.load()) if state == "online" else {}
        except Exception as exc:  # health must still go out
            load = {"error": type(exc).__name__}
        return json.dumps(
            {
                "state": state,
                "role": self.role,
                "agent": self.agent,
                "version": self.version,
                "ts": int(time.time() * 1000),
                "interval_s": self.interval,
                "uptime_s": round(time.monotonic() - self._started, 1),
                "load": load,
            },
            sort_keys=True,
        ).encode()

    def _send(self, state: str) -> None:
        try:
            self.publish(self.topic, self.message(state))
        except Exception as exc:  # not connected right now: the next tick retries
            log.debug("health not published: %s", exc)

    def _run(self) -> None:
        while True:
            self._send("online")
            if self._stop.wait(self.interval):
                return

    def start(self) -> HealthPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the ticks and publish ``offline`` (call before the agent disconnects)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._send("offline")


def probe(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """GET an agent's ``/healthz`` and return its JSON when healthy.

    Args:
        url: e.g. ``http://127.0.0.1:9464/healthz`` (a bare ``host:port`` works too).
        timeout: seconds.

    Returns:
        The health document.

    Raises:
        HealthError: unreachable, not JSON, or ``status`` is not ``ok``.
    """
    if "://" not in url:
        url = f"http://{url}"
    if url.count("/") < 3:
        url += "/healthz"
    if not url.startswith(("http://", "https://")):
        raise HealthError(f"health URL {url!r}: expected http://host:port/healthz")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            body = resp.read(65536)
    except urllib.error.HTTPError as exc:
        body = exc.read(65536)
        if exc.code != 503:
            raise HealthError(f"{url}: HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HealthError(f"{url} unreachable: {reason}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise HealthError(f"{url} did not answer JSON") from None
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        raise HealthError(f"{url}: {json.dumps(doc)[:300]}")
    return doc


__all__ = [
    "DEFAULT_INTERVAL_S",
    "HealthError",
    "HealthPublisher",
    "cloud_health_topic",
    "edge_health_topic",
    "probe",
]
