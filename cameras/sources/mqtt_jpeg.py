"""Raw JPEG payloads on MQTT topics, e.g. Frigate's ``frigate/<camera>/person/snapshot``.

The camera name is a level of the topic (``camera_level``, 0-based) or fixed. Retained
messages are ignored: Frigate retains its snapshots, and a snapshot replayed on reconnect
is an old sighting, not a new one.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from ..capture import Capture, Frame, SourceContext
from ..events import validate_camera
from .frigate import MAX_IMAGE_BYTES

log = logging.getLogger(__name__)


class MqttJpegSource:
    """Subscribe to JPEG topics.

    Args:
        topic: topic filter (``+`` wildcards allowed).
        camera_level: which topic level names the camera (``frigate/<camera>/...``: 1).
        camera: a fixed camera name instead.
    """

    def __init__(self, *, topic: str, camera_level: int | None = 1, camera: str | None = None):
        if camera is None and camera_level is None:
            raise ValueError("give camera_level or camera")
        self.name = f"mqtt:{topic}"
        self.topic = topic
        self.camera_level = camera_level
        self.camera = validate_camera(camera) if camera else None
        self._ctx: SourceContext | None = None

    def start(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        ctx.bus.subscribe(self.topic, self.on_message)

    def close(self) -> None:
        self._ctx = None

    def on_message(self, msg: Any) -> None:
        ctx = self._ctx
        if ctx is None or msg.retain:
            return
        data = bytes(msg.payload)
        if not data or len(data) > MAX_IMAGE_BYTES:
            return
        camera = self.camera
        if camera is None:
            levels = msg.topic.split("/")
            assert self.camera_level is not None
            if self.camera_level >= len(levels):
                return
            camera = levels[self.camera_level]
        try:
            validate_camera(camera)
        except ValueError:
            log.warning("topic %s: %r is not a camera name", msg.topic, camera)
            return
        frame = Frame(image=data, label=f"{camera}/mqtt")
        ctx.emit(
            Capture(
                camera=camera,
                event_id=secrets.token_hex(6),
                source="mqtt",
                captured_at=time.time(),
                frames=lambda: iter([frame]),
            )
        )


__all__ = ["MqttJpegSource"]
