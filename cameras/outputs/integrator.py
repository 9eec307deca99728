"""Integrator JSON: every outcome on the camera's topic, matches also on the person's.

QoS 1, never retained (docs/integrations.md).
"""

from __future__ import annotations

from ..capture import Bus, Capture
from ..events import IntegratorEvent, camera_topic, person_topic


class JsonEventsOutput:
    """Publish :class:`~..events.IntegratorEvent` JSON (always on in a gateway)."""

    name = "json"

    def __init__(self) -> None:
        self._bus: Bus | None = None

    def start(self, bus: Bus) -> None:
        self._bus = bus

    def publish(self, event: IntegratorEvent, capture: Capture) -> None:
        assert self._bus is not None, "start() first"
        data = event.to_json()
        self._bus.publish(camera_topic(event.site, event.gateway, event.camera), data)
        if event.event_type == "match" and event.identity is not None:
            self._bus.publish(person_topic(event.site, event.gateway, event.identity), data)

    def close(self) -> None:
        self._bus = None


__all__ = ["JsonEventsOutput"]
