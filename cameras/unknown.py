"""Unknown faces kept on the gateway for an operator to name (opt-in).

Off unless configured. Files stay on the gateway's disk only (never published, never
sent to the cloud), in a 0700 folder as 0600 files, and are deleted after
``retention_s`` or beyond ``max_files`` (oldest first). To enroll someone, move their
files into ``<enroll dir>/<name>/`` and run ``cipherface enroll --photo-dir``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class UnknownFaces:
    """A retention-limited local folder of unknown faces.

    Args:
        path: the folder (created 0700).
        retention_s: age after which a file is deleted.
        max_files: most files kept.
    """

    def __init__(
        self, *, path: str | os.PathLike[str], retention_s: float = 7 * 86400, max_files: int = 500
    ) -> None:
        if retention_s <= 0 or max_files < 1:
            raise ValueError("retention_s must be > 0 and max_files >= 1")
        self.path = Path(path)
        self.retention_s = retention_s
        self.max_files = max_files
        self._lock = threading.Lock()

    def keep(self, image: object, *, camera: str) -> Path | None:
        """Store one face image (bytes, path or BGR array); returns its file or None."""
        try:
            data = _jpeg_bytes(image)
        except (OSError, ValueError) as exc:
            log.warning("cannot keep an unknown face: %s", exc)
            return None
        with self._lock:
            self.path.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{camera}-{secrets.token_hex(3)}.jpg"
            target = self.path / name
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.prune()
        return target

    def prune(self, now: float | None = None) -> int:
        """Delete files past retention or beyond ``max_files``; returns how many."""
        now = time.time() if now is None else now
        files = sorted(
            (p for p in self.path.glob("*.jpg") if p.is_file()), key=lambda p: p.stat().st_mtime
        )
        doomed = [p for p in files if now - p.stat().st_mtime > self.retention_s]
        keep = [p for p in files if p not in doomed]
        doomed += keep[: max(0, len(keep) - self.max_files)]
        for p in doomed:
            p.unlink(missing_ok=True)
        return len(doomed)


def _jpeg_bytes(image: object) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        import cv2

        ok, buf = cv2.imencode(".jpg", image)
        if not ok:
            raise ValueError("cannot encode the frame")
        return bytes(buf)
    raise ValueError(f"unsupported image type {type(image).__name__}")


__all__ = ["UnknownFaces"]
