"""What flows through a gateway: captures in, outcomes out, and the two interfaces.

A :class:`Source` turns a camera (or Frigate, a folder, a topic) into :class:`Capture`
objects; an :class:`Output` turns each outcome (an
:class:`~cipherface.cameras.events.IntegratorEvent` plus the capture it came from) into
whatever its consumer reads. Adding a camera type or an output is one new module that
implements one of them (see :mod:`cipherface.cameras.sources` and
:mod:`cipherface.cameras.outputs`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .events import IntegratorEvent

#: A frame's pixels: encoded bytes (JPEG/PNG), a file path, or a BGR ``uint8`` array.
Image = bytes | os.PathLike[str] | npt.NDArray[np.uint8]


@dataclass(frozen=True, kw_only=True)
class Frame:
    """One image of a capture.

    Args:
        image: encoded bytes, a path, or a BGR array.
        label: how to name it in messages (never a server path in a published event).
        face_area: the face's area in pixels when the source knows it (Frigate's face
            attribute), else None. Checked against ``min_face_area`` before the frame is
            embedded; the box the detector finds is checked after, for every source.
    """

    image: Image
    label: str
    face_area: int | None = None


@dataclass(frozen=True, kw_only=True)
class Miss:
    """A frame a source could not get (fetch failed, camera offline).

    Args:
        code: stable error code (``fetch_failed``, ``camera_offline``...).
        message: short reason (no server paths).
    """

    code: str
    message: str


@dataclass(kw_only=True)
class Capture:
    """One sighting to decide: a camera, when, and its frames (fetched lazily).

    Args:
        camera: camera name (a topic level).
        event_id: the sighting's id (Frigate's event id, or a random one).
        source: kind of source (``frigate``, ``mqtt``, ``opencv``, ``folder``).
        captured_at: epoch seconds when the scene was seen (freshness is judged on it).
        frames: yields up to ``attempts`` frames on demand: the gateway stops pulling
            at the first settled outcome, so later fetches never happen.
        received_at: epoch seconds when the gateway got it (latency starts here).
        extra: source details outputs may use (e.g. ``frigate_camera``).
        done: called with the outcome once it is published (a folder moves the file),
            or with None when it was not decided (see ``retry_later``) or not published.
        retry_later: the source can offer the capture again (a file stays in its folder):
            when the cloud cannot be reached, nothing is published and ``done(None)``.
        periodic: captured on a timer, not because something was seen (RTSP, HTTP):
            an empty scene is then not an error.
    """

    camera: str
    event_id: str
    source: str
    captured_at: float
    frames: Callable[[], Iterator[Frame | Miss]]
    received_at: float = field(default_factory=time.time)
    extra: Mapping[str, Any] = field(default_factory=dict)
    done: Callable[[IntegratorEvent | None], None] | None = None
    retry_later: bool = False
    periodic: bool = False


class Bus(Protocol):
    """The integration broker as sources and outputs see it (see :mod:`.bus`)."""

    def subscribe(self, topic_filter: str, handler: Callable[[Any], None]) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (network thread)."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1."""

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after every (re)connection."""


@dataclass(frozen=True, kw_only=True)
class SourceContext:
    """What a source gets when it starts.

    Args:
        emit: hand a capture to the gateway (thread-safe; may block when it is busy).
        bus: the integration broker.
        stop: set when the gateway stops.
    """

    emit: Callable[[Capture], None]
    bus: Bus
    stop: threading.Event


class Source(Protocol):
    """A producer of captures. ``start`` must return at once (threads or
    subscriptions do the work); ``close`` stops them."""

    name: str

    def start(self, ctx: SourceContext) -> None: ...

    def close(self) -> None: ...


class Output(Protocol):
    """A consumer of outcomes. ``start`` may announce itself on the bus (Home Assistant
    discovery); ``publish`` must not block for long (the gateway calls it in order)."""

    name: str

    def start(self, bus: Bus) -> None: ...

    def publish(self, event: IntegratorEvent, capture: Capture) -> None: ...

    def close(self) -> None: ...


__all__ = ["Bus", "Capture", "Frame", "Image", "Miss", "Output", "Source", "SourceContext"]
