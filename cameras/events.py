"""The integrator event: one flat JSON object per outcome, and the topics it goes to.

Integrators (Home Assistant, Node-RED, ESPHome, ``mosquitto_sub``) cannot read the msgpack
envelopes of the edge/cloud protocol; they get these instead (docs/integrations.md):

* ``cipherface/v1/<site>/json/<gateway>/events/<camera>`` -- every outcome of a camera
  (``event_type`` ``match`` / ``unknown`` / ``stale`` / ``error``).
* ``cipherface/v1/<site>/json/<gateway>/people/<person>`` -- a match of one person.
* ``cipherface/v1/<site>/json/<gateway>/availability`` -- ``online`` / ``offline``
  (retained, the MQTT will).

Events are QoS 1 and never retained: a retained "alice is at the door" would be replayed
to every new subscriber (and a lock automation) long after it was true. Nothing here
carries a score: see :mod:`cipherface.cameras.decide` for what ``confidence`` is.
``face_box`` says where the decided face was in the frame the gateway examined.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

from cipherface.errors import InvalidArgumentError
from cipherface.protocol import validate_id
from cipherface.protocol.topics import PREFIX

EventType = Literal["match", "unknown", "stale", "error"]
#: A face's box: ``(x, y, width, height)`` in pixels of the frame as the gateway got it.
Box: TypeAlias = tuple[int, int, int, int]
EVENT_TYPES: Final[tuple[EventType, ...]] = ("match", "unknown", "stale", "error")
#: Camera names: Frigate's own rule (letters, digits, ``_``, ``-``), one topic level.
CAMERA_PATTERN: Final = r"^[A-Za-z0-9_-]{1,63}$"
_CAMERA_RE: Final = re.compile(CAMERA_PATTERN)
_SLUG_RE: Final = re.compile(r"[^a-z0-9_-]+")
ONLINE: Final = "online"
OFFLINE: Final = "offline"


def validate_camera(name: object) -> str:
    """Check a camera name (a single topic level, Frigate's alphabet).

    Raises:
        InvalidArgumentError: not 1..63 characters of ``[A-Za-z0-9_-]``.
    """
    if not isinstance(name, str) or not _CAMERA_RE.match(name):
        raise InvalidArgumentError(f"bad camera name {name!r}: must match {CAMERA_PATTERN}")
    return name


def slug(identity: str) -> str:
    """A topic level (and Home Assistant object id) for an identity.

    Identities may hold any printable character (``/``, ``+``, ``#`` included), which a
    topic level cannot. Lower-case ``[a-z0-9_-]`` names map to themselves; any other gets
    the unsafe runs replaced by ``_`` and a short hash of the original appended, so two
    different identities never share a topic.
    """
    lowered = identity.lower()
    cleaned = _SLUG_RE.sub("_", lowered).strip("_") or "x"
    if cleaned == identity:
        return identity
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:6]
    return f"{cleaned[:48]}-{digest}"


def iso(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds (``2026-11-29T14:20:01.123Z``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_base(site: str, gateway: str) -> str:
    """``cipherface/v1/<site>/json/<gateway>``: the root of a gateway's integrator topics."""
    return f"{PREFIX}/{validate_id(site, what='site')}/json/{validate_id(gateway, what='gateway')}"


def camera_topic(site: str, gateway: str, camera: str) -> str:
    """Topic of every outcome of one camera."""
    return f"{json_base(site, gateway)}/events/{validate_camera(camera)}"


def person_topic(site: str, gateway: str, identity: str) -> str:
    """Topic of the matches of one person (the level is :func:`slug` of the identity)."""
    return f"{json_base(site, gateway)}/people/{slug(identity)}"


def availability_topic(site: str, gateway: str) -> str:
    """Retained ``online`` / ``offline`` of the gateway (its MQTT will)."""
    return f"{json_base(site, gateway)}/availability"


def events_filter(site: str | None = None) -> str:
    """Filter of every camera outcome of a site (or of all sites)."""
    return f"{PREFIX}/{validate_id(site, what='site') if site else '+'}/json/+/events/+"


@dataclass(frozen=True, kw_only=True)
class IntegratorEvent:
    """One outcome, as integrators see it (every field a JSON scalar but ``face_box``).

    Args:
        event_type: ``match``, ``unknown`` (a face, nobody enrolled), ``stale`` (the
            capture was older than the camera's ``max_age_s``: dropped, not decided) or
            ``error`` (no usable face, unreadable image, cloud error, rejected result).
        site: site id.
        gateway: gateway id.
        camera: camera name.
        event_id: the capture's id (Frigate's event id for Frigate captures).
        source: the kind of source (``frigate``, ``mqtt``, ``opencv``, ``folder``).
        op: always ``identify`` (1:N) for cameras.
        identity: who matched, or None.
        match: True exactly for ``match``.
        confidence: the consensus share (0..1, 2 decimals) of a match, else None.
        captured_at: when the frame was taken (ISO 8601 UTC).
        decided_at: when the outcome was reached.
        expires_at: after this instant the outcome must not be acted upon.
        latency_ms: from the capture's arrival at the gateway to the outcome.
        frames: frames examined.
        face_box: ``(x, y, width, height)`` of the decided face (for a match, the last
            frame that voted for the person; for unknown, the last frame with a face) in
            pixels of that frame as the gateway received it; None for stale and error
            outcomes. A ``[x, y, width, height]`` array in the JSON.
        error: a stable error code (``stale``, ``no_face``, ``timeout``...), or None.
        message: a short human-readable reason for an error (no paths), or None.
    """

    event_type: EventType
    site: str
    gateway: str
    camera: str
    event_id: str
    source: str
    op: Literal["identify"] = "identify"
    identity: str | None
    match: bool
    confidence: float | None
    captured_at: str
    decided_at: str
    expires_at: str
    latency_ms: float
    frames: int
    face_box: Box | None = None
    error: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (keys in a fixed order)."""
        out = asdict(self)
        if self.face_box is not None:
            out["face_box"] = list(self.face_box)
        return out

    def to_json(self) -> bytes:
        """The UTF-8 JSON payload published on the topics."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> IntegratorEvent:
        """Parse a payload published by :meth:`to_json` (for ``cipherface events``).

        Raises:
            InvalidArgumentError: not an integrator event.
        """
        try:
            obj = json.loads(data)
            if obj.get("event_type") not in EVENT_TYPES:
                raise ValueError("no event_type")
            box = obj.get("face_box")
            if box is not None:
                if not (
                    isinstance(box, list)
                    and len(box) == 4
                    and all(type(v) is int and v >= 0 for v in box)
                ):
                    raise ValueError("face_box is not [x, y, width, height]")
                obj["face_box"] = tuple(box)
            return cls(**obj)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidArgumentError(f"not an integrator event: {exc}") from exc

    def describe(self) -> str:
        """One human-readable line (``cipherface events`` without ``--json``)."""
        when = self.decided_at[11:23]
        where = f"{self.gateway}/{self.camera}"
        if self.event_type == "match":
            what = f"MATCH {self.identity} (confidence {self.confidence})"
        elif self.event_type == "unknown":
            what = "unknown face"
        elif self.event_type == "stale":
            what = f"stale capture dropped (taken {self.captured_at[11:23]})"
        else:
            what = f"error [{self.error}] {self.message or ''}".rstrip()
        return f"{when} {where:<24} {what}  [{self.latency_ms:.0f} ms, {self.frames} frame(s)]"


__all__ = [
    "CAMERA_PATTERN",
    "EVENT_TYPES",
    "OFFLINE",
    "ONLINE",
    "Box",
    "EventType",
    "IntegratorEvent",
    "availability_topic",
    "camera_topic",
    "events_filter",
    "iso",
    "json_base",
    "person_topic",
    "slug",
    "validate_camera",
]
