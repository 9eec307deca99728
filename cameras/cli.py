"""``cipherface edge`` (the camera gateway) and ``cipherface events`` (the live stream).

Called by :mod:`cipherface.agents.cli`, which owns the argument parser and the exit
codes; this module only runs things.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

import paho.mqtt.client as paho

from cipherface.agents.mqtt import BrokerConfig, Connection
from cipherface.errors import InvalidArgumentError

from .bus import MqttBus
from .capture import Bus, Capture, Output, Source
from .decide import Policy
from .events import IntegratorEvent, availability_topic, events_filter, slug

log = logging.getLogger(__name__)

#: ``cipherface edge --watch``: photos older than this (mtime) are dropped as stale.
WATCH_MAX_AGE_S: Final = 60.0


class PrintOutput:
    """Print each outcome as one JSON line (the daemon's stdout), and count them."""

    name = "print"

    def __init__(self, *, limit: int | None = None, stop: threading.Event | None = None) -> None:
        self.limit = limit
        self.stop = stop
        self.count = 0
        self._lock = threading.Lock()

    def start(self, bus: Bus) -> None:
        return None

    def publish(self, event: IntegratorEvent, capture: Capture) -> None:
        with self._lock:
            print(json.dumps(event.to_dict(), ensure_ascii=False), flush=True)
            self.count += 1
            if self.limit is not None and self.count >= self.limit and self.stop is not None:
                self.stop.set()

    def close(self) -> None:
        return None


def run_gateway(
    *,
    edge: Any,
    mqtt: BrokerConfig,
    sources: list[Source],
    outputs: list[Output],
    policies: dict[str, Policy],
    default_policy: Policy,
    stop: threading.Event,
    unknown_faces: Any = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Run a gateway until ``stop`` is set; returns its outcome counts.

    Raises:
        BrokerConnectionError: the integration broker cannot be reached.
    """
    from .gateway import Gateway

    bus = MqttBus(broker=mqtt, availability_topic=availability_topic(edge.site, edge.gateway))
    bus.start()
    gw = Gateway(
        edge=edge,
        bus=bus,
        sources=sources,
        outputs=outputs,
        policies=policies,
        default_policy=default_policy,
        unknown_faces=unknown_faces,
    )
    try:
        gw.start()
        if announce is not None:
            announce(", ".join(s.name for s in sources) or "no source")
        stop.wait()
    finally:
        gw.close()
        bus.close()
    return gw.counts


def watch_setup(
    folder: str, *, poll: float, max_photos: int | None, stop: threading.Event
) -> tuple[list[Source], list[Output], Policy]:
    """Sources, outputs and policy of the legacy ``cipherface edge --watch DIR``."""
    from .outputs.integrator import JsonEventsOutput
    from .sources.folder import FolderSource

    sources: list[Source] = [FolderSource(path=folder, camera="folder", poll=poll)]
    outputs: list[Output] = [JsonEventsOutput(), PrintOutput(limit=max_photos, stop=stop)]
    return sources, outputs, Policy(attempts=1, max_age_s=WATCH_MAX_AGE_S)


def stream_events(
    *,
    broker: BrokerConfig,
    site: str | None,
    person: str | None,
    as_json: bool,
    count: int | None,
    stop: threading.Event,
    out: Any = None,
) -> int:
    """Print the integrator events of a site (or every site) until ``stop`` or ``count``.

    Returns:
        How many events were printed.

    Raises:
        BrokerConnectionError: the broker cannot be reached.
    """
    out = out or sys.stdout
    topic = events_filter(site)
    printed = 0
    lock = threading.Lock()
    want = slug(person) if person else None

    def on_message(msg: paho.MQTTMessage) -> None:
        nonlocal printed
        try:
            event = IntegratorEvent.from_json(bytes(msg.payload))
        except InvalidArgumentError as exc:
            log.warning("%s: %s", msg.topic, exc)
            return
        if want is not None and (event.identity is None or slug(event.identity) != want):
            return
        with lock:
            if count is not None and printed >= count:
                return
            line = json.dumps(event.to_dict(), ensure_ascii=False) if as_json else event.describe()
            print(line, file=out, flush=True)
            printed += 1
            if count is not None and printed >= count:
                stop.set()

    conn = Connection(
        config=broker,
        client_id=f"cipherface-events-{secrets.token_hex(4)}",
        on_message=on_message,
        on_connected=lambda c, present: c.subscribe([(topic, 1)]),
    )
    conn.start()
    try:
        stop.wait()
    finally:
        conn.stop()
    return printed


__all__ = ["WATCH_MAX_AGE_S", "PrintOutput", "run_gateway", "stream_events", "watch_setup"]
