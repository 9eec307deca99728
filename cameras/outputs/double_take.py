"""Double Take-compatible topics, so automations written for Double Take keep working.

* ``double-take/matches/<name>`` on a match, ``double-take/matches/unknown`` on an
  unknown face: ``{id, duration, timestamp, attempts, camera, zones, match: {name,
  confidence, match, box, type, duration, detector, filename}}``;
* ``double-take/cameras/<camera>`` after each capture: ``{id, duration, timestamp,
  attempts, camera, zones, matches: [...], misses: [], unknowns: [...], counts: {person,
  match, miss, unknown}}``.

Not retained. ``confidence`` is our coarse confidence x 100 (Double Take's 0-100 scale);
``box`` is Double Take's ``{top, left, width, height}``: the detected face, in pixels of
the frame the gateway examined (Double Take's was of the image it sent its detector), from
the event's ``face_box`` (zeros only if the embedder reported no box); ``detector`` is
``cipherface``. Stale and error outcomes publish nothing here (Double Take had none).
"""

from __future__ import annotations

import json
from typing import Any

from ..capture import Bus, Capture
from ..events import IntegratorEvent, slug


class DoubleTakeOutput:
    """Publish Double Take's topics.

    Args:
        topic_prefix: Double Take's ``mqtt.topics.matches`` root (default ``double-take``).
    """

    name = "double-take"

    def __init__(self, *, topic_prefix: str = "double-take") -> None:
        self.prefix = topic_prefix.rstrip("/")
        self._bus: Bus | None = None

    def start(self, bus: Bus) -> None:
        self._bus = bus

    def payloads(
        self, event: IntegratorEvent, capture: Capture
    ) -> list[tuple[str, dict[str, Any]]]:
        """``[(topic, payload)]`` for one outcome (empty for stale and error)."""
        if event.event_type not in ("match", "unknown"):
            return []
        seconds = round(event.latency_ms / 1000.0, 2)
        name = event.identity if event.identity is not None else "unknown"
        x, y, width, height = event.face_box or (0, 0, 0, 0)
        result = {
            "name": name,
            "confidence": round((event.confidence or 0.0) * 100, 2),
            "match": event.match,
            "box": {"top": y, "left": x, "width": width, "height": height},
            "type": capture.source,
            "duration": seconds,
            "detector": "cipherface",
            "filename": None,
        }
        common = {
            "id": event.event_id,
            "duration": seconds,
            "timestamp": event.decided_at,
            "attempts": event.frames,
            "camera": event.camera,
            "zones": list(capture.extra.get("zones", [])),
        }
        match_topic = f"{self.prefix}/matches/{slug(name) if event.match else 'unknown'}"
        matched = event.event_type == "match"
        camera = {
            **common,
            "matches": [result] if matched else [],
            "misses": [],
            "unknowns": [] if matched else [result],
            "counts": {"person": 1, "match": int(matched), "miss": 0, "unknown": int(not matched)},
        }
        return [
            (match_topic, {**common, "match": result}),
            (f"{self.prefix}/cameras/{event.camera}", camera),
        ]

    def publish(self, event: IntegratorEvent, capture: Capture) -> None:
        assert self._bus is not None, "start() first"
        for topic, payload in self.payloads(event, capture):
            self._bus.publish(topic, json.dumps(payload).encode())

    def close(self) -> None:
        self._bus = None


__all__ = ["DoubleTakeOutput"]
