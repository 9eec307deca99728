"""Frigate in: ``person`` events from ``frigate/events``, frames from Frigate's HTTP API.

Events of ``type`` ``new`` or ``update`` (``end`` is skipped) are deduplicated by
``after.id`` (see ``captures_per_event``). A capture's frames are fetched lazily, in
order: the event's cropped snapshot ``GET /api/events/<id>/snapshot.jpg?crop=1&h=<h>``
(when ``has_snapshot``), then the camera's latest frame
``GET /api/<camera>/latest.jpg?h=<h>``, until the gateway has what it needs (the camera's
``attempts``, with an early stop at the first settled match). Events that already carry
a ``sub_label`` (named by someone else) or are false positives are left alone. Field
names follow Frigate's documented MQTT API.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Final

from ..capture import Capture, Frame, Miss, SourceContext
from ..decide import MAX_ATTEMPTS
from ..events import IntegratorEvent, validate_camera

log = logging.getLogger(__name__)

#: Event ids remembered for deduplication.
SEEN_IDS: Final = 4096
#: Frigate's event ids (``1607123955.475377-mxklsc``): anything else is refused, so an id
#: from the broker can never walk Frigate's API (``../``) in the URLs built from it.
EVENT_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Largest image accepted from Frigate (a 4K JPEG is a few MB).
MAX_IMAGE_BYTES: Final = 16 * 1024 * 1024


def http_get(url: str, timeout: float) -> bytes:
    """GET ``url`` (http/https only) and return at most :data:`MAX_IMAGE_BYTES`.

    Raises:
        OSError: the request failed (urllib's errors are OSErrors), or a bad scheme.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise OSError(f"not an http(s) URL: {url}")
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked)
        data: bytes = resp.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise OSError(f"image larger than {MAX_IMAGE_BYTES} bytes")
    return data


def face_area(after: Mapping[str, Any]) -> int | None:
    """The largest face attribute box Frigate reports for the object, in pixels."""
    best: int | None = None
    for attr in after.get("current_attributes") or ():
        if not isinstance(attr, Mapping) or attr.get("label") != "face":
            continue
        box = attr.get("box")
        if isinstance(box, list | tuple) and len(box) == 4:
            try:
                x1, y1, x2, y2 = (float(v) for v in box)
            except (TypeError, ValueError):
                continue
            area = int(max(0.0, x2 - x1) * max(0.0, y2 - y1))
            best = area if best is None else max(best, area)
    return best


class FrigateSource:
    """Subscribe to Frigate's events and fetch its snapshots.

    Args:
        url: Frigate's base URL (``http://frigate:5000``).
        topic_prefix: Frigate's MQTT ``topic_prefix`` (default ``frigate``).
        cameras: only these Frigate cameras (default: all).
        labels: object labels to act on (default ``person``).
        snapshot_height: ``h=`` of the fetched images (Frigate resizes).
        crop: fetch the cropped event snapshot first.
        use_latest: then fetch the camera's latest frame for further attempts.
        http_timeout: seconds per HTTP request.
        captures_per_event: an ``update`` with a newer snapshot starts another capture of
            the same event when the previous one ended without a match, up to this many
            per event (1: strictly one capture per ``after.id``).
    """

    def __init__(
        self,
        *,
        url: str,
        topic_prefix: str = "frigate",
        cameras: list[str] | None = None,
        labels: tuple[str, ...] = ("person",),
        snapshot_height: int = 500,
        crop: bool = True,
        use_latest: bool = True,
        http_timeout: float = 3.0,
        captures_per_event: int = 2,
    ) -> None:
        self.name = "frigate"
        self.url = url.rstrip("/")
        self.topic_prefix = topic_prefix
        self.cameras = {validate_camera(c) for c in cameras} if cameras else None
        self.labels = labels
        self.height = int(snapshot_height)
        self.crop = crop
        self.use_latest = use_latest
        self.http_timeout = http_timeout
        self.captures_per_event = max(1, int(captures_per_event))
        # event id -> [captures started, busy, matched, last snapshot frame_time]
        self._seen: OrderedDict[str, list[Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._ctx: SourceContext | None = None

    def start(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        ctx.bus.subscribe(f"{self.topic_prefix}/events", self.on_message)

    def close(self) -> None:
        self._ctx = None

    def on_message(self, msg: Any) -> None:
        """Handle one ``frigate/events`` message (network thread: parse and queue)."""
        ctx = self._ctx
        if ctx is None or getattr(msg, "retain", False):
            return
        capture = self.parse(bytes(msg.payload))
        if capture is not None:
            ctx.emit(capture)

    def parse(self, payload: bytes) -> Capture | None:
        """The capture one Frigate event asks for, or None (skipped or a duplicate)."""
        try:
            event = json.loads(payload)
            kind = event["type"]
            after = event["after"]
            event_id = str(after["id"])
            camera = validate_camera(after["camera"])
            if not EVENT_ID_RE.match(event_id) or ".." in event_id:
                raise ValueError(f"bad event id {event_id[:80]!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("not a Frigate event: %s", str(exc)[:200])
            return None
        if kind not in ("new", "update") or after.get("label") not in self.labels:
            return None
        if self.cameras is not None and camera not in self.cameras:
            return None
        if after.get("sub_label") or after.get("false_positive"):
            return None
        snap = after.get("snapshot") if isinstance(after.get("snapshot"), Mapping) else {}
        seen_at = snap.get("frame_time") or after.get("frame_time") or after.get("start_time")
        try:
            captured_at = float(seen_at) if seen_at is not None else time.time()
        except (TypeError, ValueError):
            captured_at = time.time()
        with self._lock:
            state = self._seen.get(event_id)
            if state is not None:
                started, busy, matched, last_at = state
                if busy or matched or started >= self.captures_per_event:
                    return None
                if captured_at <= last_at:  # the same snapshot again
                    return None
                state[:] = [started + 1, True, False, captured_at]
            else:
                self._seen[event_id] = [1, True, False, captured_at]
                while len(self._seen) > SEEN_IDS:
                    self._seen.popitem(last=False)
        area = face_area(after)
        has_snapshot = bool(after.get("has_snapshot", True))
        return Capture(
            camera=camera,
            event_id=event_id,
            source="frigate",
            captured_at=captured_at,
            frames=lambda: self._frames(event_id, camera, has_snapshot, area),
            extra={"frigate_camera": camera, "zones": list(after.get("current_zones") or [])},
            done=lambda event: self._finished(event_id, event),
        )

    def _finished(self, event_id: str, event: IntegratorEvent | None) -> None:
        with self._lock:
            state = self._seen.get(event_id)
            if state is not None:
                state[1] = False
                state[2] = event is not None and event.event_type == "match"

    def _frames(
        self, event_id: str, camera: str, has_snapshot: bool, area: int | None
    ) -> Iterator[Frame | Miss]:
        def q(text: str) -> str:
            return urllib.parse.quote(text, safe="")

        urls: list[tuple[str, str]] = []
        if has_snapshot:
            crop = "crop=1&" if self.crop else ""
            urls.append(
                (
                    f"{self.url}/api/events/{q(event_id)}/snapshot.jpg?{crop}h={self.height}",
                    f"{camera}/{event_id}/snapshot",
                )
            )
        if self.use_latest:
            latest = f"{self.url}/api/{q(camera)}/latest.jpg?h={self.height}"
            urls += [(latest, f"{camera}/latest")] * MAX_ATTEMPTS
        for url, label in urls[:MAX_ATTEMPTS]:
            try:
                data = http_get(url, self.http_timeout)
            except OSError as exc:
                yield Miss(code="fetch_failed", message=f"Frigate {label}: {str(exc)[:120]}")
                continue
            # Frigate's face box is of the event's snapshot; a latest frame has none (the
            # gateway still checks the box its detector finds in either).
            yield Frame(image=data, label=label, face_area=area if "snapshot" in label else None)


__all__ = ["EVENT_ID_RE", "FrigateSource", "face_area", "http_get"]
