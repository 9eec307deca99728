"""Home Assistant MQTT discovery: entities appear by themselves in Home Assistant.

Retained discovery configs (``<prefix>/<component>/<node_id>/<object_id>/config``, node
``cipherface_<site>_<gateway>``), re-published on every connection and whenever Home
Assistant's birth message (``<prefix>/status`` = ``online``) arrives:

* an ``event`` entity per camera, state topic = the camera's integrator topic, with
  ``event_types`` ``match`` / ``unknown`` / ``stale`` / ``error`` (the JSON's other
  fields become the event's attributes);
* per person, a ``binary_sensor`` (``device_class: presence``) that turns on with a
  match and back off ``presence_s`` later (``off_delay``), and a ``sensor`` naming the
  camera that last saw them, which becomes unavailable after ``presence_s``
  (``expire_after``).

All of them share one device and the gateway's availability topic (the MQTT will):
``online`` / ``offline``. Events and states are never retained.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

from cipherface import __version__

from ..capture import Bus, Capture
from ..events import (
    EVENT_TYPES,
    OFFLINE,
    ONLINE,
    IntegratorEvent,
    availability_topic,
    camera_topic,
    person_topic,
    slug,
)


class HomeAssistantOutput:
    """Publish Home Assistant discovery configs.

    Args:
        site / gateway: whose entities these are.
        cameras: cameras announced up front (others are announced on their first event).
        people: identities announced up front (others on their first match).
        discovery_prefix: Home Assistant's discovery prefix.
        presence_s: how long a person counts as present after a match.
    """

    name = "homeassistant"

    def __init__(
        self,
        *,
        site: str,
        gateway: str,
        cameras: Iterable[str] = (),
        people: Iterable[str] = (),
        discovery_prefix: str = "homeassistant",
        presence_s: int = 60,
    ) -> None:
        if presence_s < 1:
            raise ValueError("presence_s must be >= 1")
        self.site, self.gateway = site, gateway
        self.prefix = discovery_prefix.rstrip("/")
        self.presence_s = int(presence_s)
        self.node = f"cipherface_{site}_{gateway}".replace("-", "_")
        self._cameras: set[str] = set(cameras)
        self._people: set[str] = set(people)
        self._lock = threading.Lock()
        self._bus: Bus | None = None

    # ---------------------------------------------------------------- payloads
    def device(self) -> dict[str, Any]:
        """The device block shared by every entity."""
        return {
            "identifiers": [self.node],
            "name": f"CipherFace {self.site}/{self.gateway}",
            "manufacturer": "CipherFace",
            "model": "camera gateway",
            "sw_version": __version__,
        }

    def _common(self, unique_id: str, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "unique_id": unique_id,
            "availability_topic": availability_topic(self.site, self.gateway),
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
            "qos": 1,
            "device": self.device(),
            "origin": {"name": "cipherface", "sw_version": __version__},
        }

    def camera_config(self, camera: str) -> tuple[str, dict[str, Any]]:
        """``(topic, config)`` of the camera's ``event`` entity."""
        oid = f"{camera}_face"
        return f"{self.prefix}/event/{self.node}/{oid}/config", {
            **self._common(f"{self.node}_{oid}", f"{camera} face"),
            "state_topic": camera_topic(self.site, self.gateway, camera),
            "event_types": list(EVENT_TYPES),
            "icon": "mdi:face-recognition",
        }

    def person_configs(self, identity: str) -> list[tuple[str, dict[str, Any]]]:
        """``[(topic, config)]`` of the person's presence and last-camera entities."""
        who = slug(identity)
        state = person_topic(self.site, self.gateway, identity)
        presence = {
            **self._common(f"{self.node}_{who}_presence", f"{identity} present"),
            "state_topic": state,
            "device_class": "presence",
            "value_template": "{{ 'ON' if value_json.match else 'OFF' }}",
            "payload_on": "ON",
            "payload_off": "OFF",
            "off_delay": self.presence_s,
            "json_attributes_topic": state,
        }
        last_camera = {
            **self._common(f"{self.node}_{who}_camera", f"{identity} last camera"),
            "state_topic": state,
            "value_template": "{{ value_json.camera }}",
            "expire_after": self.presence_s,
            "icon": "mdi:cctv",
        }
        return [
            (f"{self.prefix}/binary_sensor/{self.node}/{who}_presence/config", presence),
            (f"{self.prefix}/sensor/{self.node}/{who}_camera/config", last_camera),
        ]

    def configs(self) -> list[tuple[str, dict[str, Any]]]:
        """Every discovery config this gateway announces now."""
        with self._lock:
            cameras, people = sorted(self._cameras), sorted(self._people)
        out = [self.camera_config(c) for c in cameras]
        for p in people:
            out += self.person_configs(p)
        return out

    # ---------------------------------------------------------------- output
    def start(self, bus: Bus) -> None:
        self._bus = bus
        bus.subscribe(f"{self.prefix}/status", self._on_birth)
        bus.on_connect(self.announce)

    def announce(self) -> None:
        """Publish every discovery config (retained)."""
        for topic, config in self.configs():
            self._send(topic, config)

    def _send(self, topic: str, config: dict[str, Any]) -> None:
        if self._bus is not None:
            self._bus.publish(topic, json.dumps(config).encode(), retain=True)

    def _on_birth(self, msg: Any) -> None:
        if bytes(msg.payload).strip().lower() == ONLINE.encode():
            self.announce()

    def publish(self, event: IntegratorEvent, capture: Capture) -> None:
        # The state itself is the integrator JSON (the json output publishes it); here
        # only entities that appear for the first time are announced.
        with self._lock:
            new_camera = event.camera not in self._cameras
            self._cameras.add(event.camera)
            new_person = event.identity is not None and event.identity not in self._people
            if event.identity is not None:
                self._people.add(event.identity)
        if new_camera:
            self._send(*self.camera_config(event.camera))
        if new_person and event.identity is not None:
            for topic, config in self.person_configs(event.identity):
                self._send(topic, config)

    def close(self) -> None:
        self._bus = None


__all__ = ["HomeAssistantOutput"]
