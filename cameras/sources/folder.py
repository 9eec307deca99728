"""Photos dropped in a folder: each becomes a capture, then moves to ``done/`` or
``failed/`` (a capture the cloud could not serve stays for the next scan).

Writers should write to a dot-file and rename it into place; files are also only picked
up once unchanged for ``settle`` seconds. ``captured_at`` is the file's mtime, so a photo
left over from before a restart is dropped as ``stale``, not decided late.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

from cipherface.agents.edge import PHOTO_SUFFIXES

from ..capture import Capture, Frame, SourceContext
from ..events import IntegratorEvent, validate_camera

log = logging.getLogger(__name__)


class FolderSource:
    """Watch a folder for photos.

    Args:
        path: the folder (created, with ``done/`` and ``failed/`` in it).
        camera: the camera name its captures carry.
        poll: seconds between scans.
        settle: minimum age (mtime) of a file before it is read.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        camera: str = "folder",
        poll: float = 0.5,
        settle: float = 0.3,
    ) -> None:
        self.name = f"folder:{camera}"
        self.camera = validate_camera(camera)
        self.base = Path(path)
        self.done_dir, self.failed_dir = self.base / "done", self.base / "failed"
        self.poll, self.settle = poll, settle
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, ctx: SourceContext) -> None:
        for d in (self.base, self.done_dir, self.failed_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, args=(ctx,), name=self.name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def scan(self, ctx: SourceContext) -> int:
        """Emit every ready photo not already in flight; returns how many."""
        now = time.time()
        emitted = 0
        for path in sorted(self.base.iterdir()):
            if self._stop.is_set() or ctx.stop.is_set():
                break
            try:
                st = path.stat()
            except OSError:
                continue
            if (
                not path.is_file()
                or path.name.startswith(".")
                or path.suffix.lower() not in PHOTO_SUFFIXES
                or now - st.st_mtime < self.settle
            ):
                continue
            with self._lock:
                if path.name in self._busy:
                    continue
                self._busy.add(path.name)
            ctx.emit(self._capture(path, st.st_mtime))
            emitted += 1
        return emitted

    def _run(self, ctx: SourceContext) -> None:
        while not (self._stop.is_set() or ctx.stop.is_set()):
            try:
                self.scan(ctx)
            except OSError as exc:
                log.warning("cannot scan %s: %s", self.base, exc)
            self._stop.wait(self.poll)

    def _capture(self, path: Path, mtime: float) -> Capture:
        def frames() -> list[Frame]:
            return [Frame(image=path, label=path.name)]

        def done(event: IntegratorEvent | None) -> None:
            try:
                if event is not None:
                    ok = event.event_type in ("match", "unknown")
                    _move(path, self.done_dir if ok else self.failed_dir)
            finally:
                with self._lock:
                    self._busy.discard(path.name)

        return Capture(
            camera=self.camera,
            event_id=path.name,
            source="folder",
            captured_at=mtime,
            frames=lambda: iter(frames()),
            done=done,
            retry_later=True,
        )


def _move(path: Path, folder: Path) -> str | None:
    target = folder / path.name
    if target.exists():
        target = folder / f"{path.stem}-{secrets.token_hex(3)}{path.suffix}"
    try:
        os.replace(path, target)
    except OSError as exc:
        log.warning("cannot move %s to %s: %s", path, folder, exc)
        return None
    return str(target)


__all__ = ["PHOTO_SUFFIXES", "FolderSource"]
