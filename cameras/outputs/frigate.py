"""Frigate out: write the name back on Frigate's event.

``POST /api/events/<id>/sub_label`` with ``{"subLabel": name, "subLabelScore": confidence,
"camera": camera}`` for matches of Frigate captures, so Frigate's UI, its MQTT events and
every automation reading ``after.sub_label`` see the name (Frigate's own face recognition
then leaves the object alone). The score is our coarse confidence, never a similarity.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import urllib.request
from typing import Final

from ..capture import Bus, Capture
from ..events import IntegratorEvent

log = logging.getLogger(__name__)

#: Frigate refuses longer sub labels.
MAX_SUB_LABEL: Final = 100


def sub_label_request(base_url: str, event: IntegratorEvent) -> urllib.request.Request:
    """The POST request naming ``event``'s Frigate event."""
    body = {
        "subLabel": (event.identity or "")[:MAX_SUB_LABEL],
        "subLabelScore": event.confidence if event.confidence is not None else 1.0,
        "camera": event.camera,
    }
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise ValueError(f"Frigate URL must be http(s): {base_url}")
    url = (
        f"{base_url.rstrip('/')}/api/events/{urllib.parse.quote(event.event_id, safe='')}/sub_label"
    )
    return urllib.request.Request(  # noqa: S310 (scheme checked above)
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )


class FrigateSubLabelOutput:
    """Write matches back to Frigate.

    Args:
        url: Frigate's base URL (http/https).
        timeout: seconds per request.
    """

    name = "frigate"

    def __init__(self, *, url: str, timeout: float = 3.0) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"Frigate URL must be http(s): {url}")
        self.url = url
        self.timeout = timeout
        #: Successful write-backs (monitoring, tests).
        self.written = 0

    def start(self, bus: Bus) -> None:
        return None

    def publish(self, event: IntegratorEvent, capture: Capture) -> None:
        if event.event_type != "match" or capture.source != "frigate":
            return
        req = sub_label_request(self.url, event)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                resp.read(4096)
            self.written += 1
        except OSError as exc:
            log.warning("Frigate sub_label for %s failed: %s", event.event_id, exc)

    def close(self) -> None:
        return None


__all__ = ["MAX_SUB_LABEL", "FrigateSubLabelOutput", "sub_label_request"]
