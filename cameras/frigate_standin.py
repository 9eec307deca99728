"""A small stand-in for Frigate, for tests, benchmarks and trying the gateway without an NVR.

It serves the HTTP paths the gateway uses, the way Frigate documents them, and publishes
``frigate/events`` messages in Frigate's format on a real broker:

* ``GET /api/events/<id>/snapshot.jpg?crop=1&h=<h>`` -- the event's snapshot (resized to
  height ``h`` as Frigate does; 404 for an unknown event);
* ``GET /api/<camera>/latest.jpg?h=<h>`` -- the camera's current picture;
* ``POST /api/events/<id>/sub_label`` with ``{"subLabel", "subLabelScore", "camera"}`` --
  recorded in :attr:`FrigateStandin.sub_labels`; answers ``{"success": true, ...}``.

It is not Frigate: no detection, no recordings; every request is recorded in
:attr:`FrigateStandin.requests`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cipherface.agents.mqtt import BrokerConfig


def _resized(jpeg: bytes, height: int | None) -> bytes:
    if not height:
        return jpeg
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.shape[0] <= height:
        return jpeg
    width = max(1, round(img.shape[1] * height / img.shape[0]))
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA))
    return bytes(buf) if ok else jpeg


class FrigateStandin:
    """Frigate's HTTP API and event topic, served from photos.

    Args:
        broker_url: the broker Frigate would publish on.
        topic_prefix: Frigate's MQTT ``topic_prefix``.
    """

    def __init__(self, *, broker_url: str, topic_prefix: str = "frigate") -> None:
        self.topic_prefix = topic_prefix
        self.snapshots: dict[str, bytes] = {}
        self.latest: dict[str, bytes] = {}
        self.sub_labels: list[tuple[str, dict[str, Any]]] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                height = int(query["h"][0]) if "h" in query else None
                parts = url.path.strip("/").split("/")
                with standin._lock:
                    standin.requests.append(self.path)
                    if (
                        len(parts) == 4
                        and parts[:2] == ["api", "events"]
                        and parts[3] == ("snapshot.jpg")
                    ):
                        data = standin.snapshots.get(urllib.parse.unquote(parts[2]))
                    elif len(parts) == 3 and parts[0] == "api" and parts[2] == "latest.jpg":
                        data = standin.latest.get(parts[1])
                    else:
                        data = None
                if data is None:
                    self._send(404, b'{"success": false, "message": "not found"}', "text/json")
                else:
                    self._send(200, _resized(data, height), "image/jpeg")

            def do_POST(self) -> None:
                parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 65536))
                with standin._lock:
                    standin.requests.append(f"POST {self.path}")
                    known = (
                        len(parts) == 4
                        and parts[:2] == ["api", "events"]
                        and (
                            parts[3] == "sub_label"
                            and urllib.parse.unquote(parts[2]) in standin.snapshots
                        )
                    )
                    if known:
                        standin.sub_labels.append(
                            (urllib.parse.unquote(parts[2]), json.loads(body or b"{}"))
                        )
                if known:
                    self._send(200, b'{"success": true, "message": "set sub label"}', "text/json")
                else:
                    self._send(404, b'{"success": false, "message": "not found"}', "text/json")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        cfg = BrokerConfig(url=broker_url)
        self._mqtt = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"frigate-standin-{secrets.token_hex(4)}",
            protocol=paho.MQTTv5,
        )
        self._mqtt.connect(cfg.host, cfg.port)

    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:<port>``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FrigateStandin:
        self._thread.start()
        self._mqtt.loop_start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def person_event(
        self,
        camera: str,
        snapshot: bytes,
        *,
        event_id: str | None = None,
        frame_time: float | None = None,
        kind: str = "new",
        face_box: tuple[int, int, int, int] | None = (50, 40, 150, 160),
    ) -> str:
        """Register a snapshot and publish a ``person`` event for it; returns its id."""
        now = time.time()
        seen = now if frame_time is None else frame_time
        event_id = event_id or f"{seen:.6f}-{secrets.token_hex(3)}"
        with self._lock:
            self.snapshots[event_id] = snapshot
        attrs = [{"label": "face", "box": list(face_box), "score": 0.9}] if face_box else []
        after = {
            "id": event_id,
            "camera": camera,
            "frame_time": seen,
            "snapshot": {
                "frame_time": seen,
                "box": [0, 0, 400, 600],
                "area": 240000,
                "score": 0.85,
            },
            "label": "person",
            "sub_label": None,
            "top_score": 0.85,
            "false_positive": False,
            "start_time": seen - 0.3,
            "end_time": None,
            "score": 0.85,
            "box": [0, 0, 400, 600],
            "area": 240000,
            "ratio": 0.67,
            "region": [0, 0, 640, 640],
            "current_zones": [],
            "entered_zones": [],
            "thumbnail": None,
            "has_snapshot": True,
            "has_clip": False,
            "stationary": False,
            "motionless_count": 0,
            "position_changes": 0,
            "attributes": {"face": 0.9} if face_box else {},
            "current_attributes": attrs,
        }
        payload = {"type": kind, "before": {**after, "sub_label": None}, "after": after}
        info = self._mqtt.publish(f"{self.topic_prefix}/events", json.dumps(payload), qos=1)
        info.wait_for_publish(5)
        return event_id


__all__ = ["FrigateStandin"]
