"""RTSP streams, HTTP snapshot URLs and video files, through OpenCV.

* ``rtsp://`` (and video files): a reader thread grabs frames continuously and keeps
  only the newest, so a capture never gets a frame that sat in a buffer; RTSP runs over
  TCP with FFmpeg's low-delay flags (``OPENCV_FFMPEG_CAPTURE_OPTIONS``, set unless the
  user set it); a lost stream is reopened with a backoff.
* ``http(s)://`` snapshot URLs: one GET per frame.

Every ``interval_s`` a capture is emitted (not while the previous one of the camera is
still waiting or being decided: no backlog); its frames are the newest frame at the time
each is pulled (a fresh one per attempt). An empty scene is not an error: these captures
do not report ``no_face``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

from ..capture import Capture, Frame, Miss, SourceContext
from ..decide import MAX_ATTEMPTS
from ..events import validate_camera
from .frigate import http_get

log = logging.getLogger(__name__)

FFMPEG_OPTIONS: Final = "rtsp_transport;tcp|fflags;nobuffer|flags;low_delay"
#: A frame older than this is not handed out (the stream stalled).
FRESH_S: Final = 2.0


class OpenCVSource:
    """One camera read through OpenCV.

    Args:
        camera: camera name.
        url: ``rtsp://...``, ``http(s)://...`` (a JPEG snapshot URL) or a video file path.
        interval_s: seconds between captures.
        reconnect_s: first backoff after a lost stream (doubles up to 30 s).
        loop: restart a video file at its end (tests, demos).
    """

    def __init__(
        self,
        *,
        camera: str,
        url: str,
        interval_s: float = 1.0,
        reconnect_s: float = 1.0,
        loop: bool = False,
    ) -> None:
        self.name = f"opencv:{camera}"
        self.camera = validate_camera(camera)
        self.url = url
        self.http = url.startswith(("http://", "https://"))
        self.interval_s = interval_s
        self.reconnect_s = reconnect_s
        self.loop = loop
        self._latest: tuple[float, int, Any] | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Times the stream was (re)opened: for monitoring and tests.
        self.opened = 0

    def start(self, ctx: SourceContext) -> None:
        if not self.http:
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", FFMPEG_OPTIONS)
            self._spawn(self._reader, f"{self.name}-reader")
        self._spawn(lambda: self._ticker(ctx), f"{self.name}-tick")

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(5)

    # ------------------------------------------------------------------ stream
    def _reader(self) -> None:
        import cv2

        backoff = self.reconnect_s
        seq = 0
        while not self._stop.is_set():
            # Bounded open and read: a dead RTSP peer must not hang the reader forever.
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]
            cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
            if not cap.isOpened():
                log.warning("%s: cannot open the stream; retrying in %.0f s", self.camera, backoff)
                cap.release()
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            self.opened += 1
            backoff = self.reconnect_s
            fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
            pace = 1.0 / fps if (not self.url.startswith("rtsp") and 0 < fps < 240) else 0.0
            while not self._stop.is_set():
                ok, frame = cap.read()  # reading all the time keeps the buffer empty
                if not ok or frame is None:
                    break
                seq += 1
                with self._cond:
                    self._latest = (time.time(), seq, frame)
                    self._cond.notify_all()
                if pace:
                    time.sleep(pace)  # a file plays at its own rate, like a camera
            cap.release()
            if self._stop.is_set():
                break
            if not self.loop:
                log.warning("%s: stream lost; reconnecting", self.camera)
            self._stop.wait(0 if self.loop else backoff)

    def newest(self, after_seq: int = 0, timeout: float = 2.0) -> tuple[int, Any] | None:
        """The newest frame later than ``after_seq`` (waits up to ``timeout``), or None
        when there is none younger than :data:`FRESH_S`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                latest = self._latest
                if (
                    latest is not None
                    and latest[1] > after_seq
                    and time.time() - latest[0] < FRESH_S
                ):
                    return latest[1], latest[2]
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(left)

    # ---------------------------------------------------------------- captures
    def _ticker(self, ctx: SourceContext) -> None:
        idle = threading.Event()  # no capture of this camera waiting or being decided
        idle.set()
        while not (self._stop.wait(self.interval_s) or ctx.stop.is_set()):
            if not idle.is_set():
                continue  # a slow gateway gets the next capture, not a backlog of old ones
            idle.clear()
            ctx.emit(
                Capture(
                    camera=self.camera,
                    event_id=secrets.token_hex(6),
                    source="opencv",
                    captured_at=time.time(),
                    frames=self._frames,
                    periodic=True,
                    done=lambda event: idle.set(),
                )
            )

    def _frames(self) -> Iterator[Frame | Miss]:
        seq = 0
        for _ in range(MAX_ATTEMPTS):
            if self.http:
                try:
                    yield Frame(image=http_get(self.url, 3.0), label=f"{self.camera}/snapshot")
                except OSError as exc:
                    yield Miss(code="camera_offline", message=f"{self.camera}: {str(exc)[:120]}")
                continue
            got = self.newest(seq)
            if got is None:
                yield Miss(code="camera_offline", message=f"{self.camera}: no fresh frame")
                continue
            seq, frame = got
            yield Frame(image=frame, label=f"{self.camera}/frame{seq}")


__all__ = ["FFMPEG_OPTIONS", "OpenCVSource"]
