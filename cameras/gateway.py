"""The camera gateway daemon: sources -> freshness -> embed -> encrypted identify -> outputs.

Sources hand captures to a bounded queue (never blocking the MQTT network thread); a
worker pulls the frames of each capture one at a time, embeds each, asks the cloud
through the :class:`~cipherface.agents.edge.EdgeClient` (encrypted), and feeds the
decrypted best score -- which stays in this process -- to the camera's
:class:`~.decide.Tally`. It stops at the first settled match. A face smaller than the
camera's ``min_face_area`` is refused (``face_too_small``): on the box the source reports
before embedding (Frigate's face attribute), and on the box the detector found before
identifying, whatever the source. A capture older than the
camera's ``max_age_s`` before or after the work is published as ``stale`` and never as a
decision. Every outcome goes to every output; match and unknown outcomes also leave as
the protocol's msgpack ``decision`` on ``cipherface/v1/<site>/events/<gateway>``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cipherface.errors import (
    BrokerConnectionError,
    CipherFaceError,
    FaceError,
    PeerReportedError,
    RequestTimeoutError,
)

from .capture import Bus, Capture, Frame, Miss, Output, Source, SourceContext
from .decide import Policy, Tally, Verdict
from .events import IntegratorEvent, iso
from .unknown import UnknownFaces

log = logging.getLogger(__name__)

#: Captures waiting for a worker; beyond it a capture is refused with ``overloaded``.
QUEUE_SIZE: Final = 64


class Gateway:
    """Ties sources, the edge client and outputs together.

    Args:
        edge: a started edge client (its key published).
        bus: the integration broker.
        sources: where captures come from.
        outputs: where outcomes go.
        policies: per-camera accuracy controls.
        default_policy: for cameras not in ``policies``.
        unknown_faces: keep unknown faces locally for an operator (opt-in), or None.
        workers: worker threads (embedding holds a lock: 1 is usually right).
    """

    def __init__(
        self,
        *,
        edge: Any,
        bus: Bus,
        sources: Sequence[Source] = (),
        outputs: Sequence[Output] = (),
        policies: Mapping[str, Policy] | None = None,
        default_policy: Policy | None = None,
        unknown_faces: UnknownFaces | None = None,
        workers: int = 1,
    ) -> None:
        self.edge = edge
        self.bus = bus
        self.sources = list(sources)
        self.outputs = list(outputs)
        self.policies = dict(policies or {})
        self.default_policy = default_policy or Policy()
        self.unknown_faces = unknown_faces
        self.workers = max(1, int(workers))
        self.stop_event = threading.Event()
        self._queue: queue.Queue[Capture] = queue.Queue(QUEUE_SIZE)
        self._threads: list[threading.Thread] = []
        #: Outcomes by event_type (monitoring, tests).
        self.counts: dict[str, int] = {}
        self._counts_lock = threading.Lock()

    def policy(self, camera: str) -> Policy:
        """The camera's policy (or the default)."""
        return self.policies.get(camera, self.default_policy)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the outputs, the workers, then the sources."""
        for out in self.outputs:
            out.start(self.bus)
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"gateway-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        ctx = SourceContext(emit=self.emit, bus=self.bus, stop=self.stop_event)
        for src in self.sources:
            src.start(ctx)

    def close(self) -> None:
        """Stop the sources, let the workers finish their capture, close the outputs."""
        self.stop_event.set()
        for src in self.sources:
            src.close()
        for t in self._threads:
            t.join(30)
        for out in self.outputs:
            out.close()

    def emit(self, capture: Capture) -> None:
        """Queue a capture (thread-safe, never blocks; refuses when the queue is full)."""
        try:
            self._queue.put_nowait(capture)
        except queue.Full:
            log.warning("%s: busy, capture %s refused", capture.camera, capture.event_id)
            v = Verdict(event_type="error", error="overloaded", message="gateway busy")
            self._publish(capture, self._event(capture, v, frames=0), None)

    def _work(self) -> None:
        while not (self.stop_event.is_set() and self._queue.empty()):
            try:
                capture = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if self.stop_event.is_set():  # stopping: hand it back undecided (a folder keeps it)
                if capture.done is not None:
                    capture.done(None)
                continue
            try:
                self.handle(capture)
            except Exception:  # one capture never takes the daemon down
                log.exception("capture %s of %s failed", capture.event_id, capture.camera)
                if capture.done is not None:
                    capture.done(None)

    # ----------------------------------------------------------------- the work
    def handle(self, capture: Capture) -> IntegratorEvent | None:
        """Decide one capture and publish its outcome (synchronously).

        Returns:
            The published event, or None when nothing was published (a periodic source
            with no face in view, or the cloud unreachable and the capture kept).
        """
        policy = self.policy(capture.camera)
        if self._stale(capture, policy):
            return self._publish(capture, self._stale_event(capture, frames=0), None)
        match_d, unknown_d = policy.limits(self.edge.model, self.edge.metric)
        tally = Tally(
            match_distance=match_d,
            unknown_distance=unknown_d,
            consensus=policy.consensus,
            metric=self.edge.metric,
        )
        frames = 0
        last_face: Frame | None = None
        verdict: Verdict | None = None
        iterator = capture.frames()
        try:
            for item in iterator:
                frames += 1
                if isinstance(item, Miss):
                    tally.add_failure(item.code, item.message)
                elif (
                    item.face_area is not None
                    and policy.min_face_area
                    and item.face_area < policy.min_face_area
                ):
                    tally.add_failure(
                        "face_too_small", f"face of {item.face_area} px < {policy.min_face_area}"
                    )
                elif self._one_frame(item, tally, policy):
                    last_face = item
                if tally.settled or frames >= policy.attempts or self._stale(capture, policy):
                    break
                if self.stop_event.wait(policy.attempt_interval_s):
                    break
        except (RequestTimeoutError, BrokerConnectionError) as exc:
            if capture.retry_later:
                log.warning("%s: %s; kept for a retry", capture.event_id, exc)
                if capture.done is not None:
                    capture.done(None)
                return None
            verdict = Verdict(event_type="error", error=exc.code, message="cloud unreachable")
        except PeerReportedError as exc:
            if exc.retry and capture.retry_later:
                if capture.done is not None:
                    capture.done(None)
                return None
            verdict = Verdict(event_type="error", error=exc.remote_code, message="cloud error")
        except CipherFaceError as exc:  # e.g. result_rejected: the cloud's answer failed checks
            log.warning("%s: %s", capture.event_id, exc)
            verdict = Verdict(event_type="error", error=exc.code, message=type(exc).__name__)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        if verdict is None:
            verdict = tally.verdict()
        if self._stale(capture, policy):  # never decided late
            return self._publish(capture, self._stale_event(capture, frames=frames), None)
        quiet = capture.periodic or not policy.report_no_face
        if quiet and verdict.event_type == "error" and not tally.faces:
            if capture.done is not None:
                capture.done(None)
            return None
        event = self._event(capture, verdict, frames=frames)
        if verdict.event_type in ("match", "unknown"):
            self._protocol_decision(event, capture)
        if verdict.event_type == "unknown" and self.unknown_faces is not None and last_face:
            self.unknown_faces.keep(last_face.image, camera=capture.camera)
        return self._publish(capture, event, capture.done)

    def _one_frame(self, frame: Frame, tally: Tally, policy: Policy) -> bool:
        """Embed, size-check and identify one frame; True when its face was counted."""
        try:
            face = self.edge.embed_face(frame.image, label=frame.label)
        except FaceError as exc:
            tally.add_failure(exc.code, _face_message(exc))
            return False
        area = face.area
        if area is not None and policy.min_face_area and area < policy.min_face_area:
            # Refused before identify: no encrypted request, no decision spent.
            tally.add_failure("face_too_small", f"face of {area} px < {policy.min_face_area}")
            return False
        identity, similarity = self.edge.best_match(face.vector)
        tally.add_face(identity, similarity, face.box)
        return True

    # ---------------------------------------------------------------- outcomes
    @staticmethod
    def _stale(capture: Capture, policy: Policy) -> bool:
        return time.time() - capture.captured_at > policy.max_age_s

    def _stale_event(self, capture: Capture, *, frames: int) -> IntegratorEvent:
        age = time.time() - capture.captured_at
        v = Verdict(event_type="stale", error="stale", message=f"capture {age:.1f} s old")
        return self._event(capture, v, frames=frames)

    def _event(self, capture: Capture, verdict: Verdict, *, frames: int) -> IntegratorEvent:
        now = time.time()
        ttl = self.policy(capture.camera).ttl_s
        return IntegratorEvent(
            event_type=verdict.event_type,
            site=self.edge.site,
            gateway=self.edge.gateway,
            camera=capture.camera,
            event_id=capture.event_id,
            source=capture.source,
            identity=verdict.identity,
            match=verdict.event_type == "match",
            confidence=verdict.confidence,
            captured_at=iso(capture.captured_at),
            decided_at=iso(now),
            expires_at=iso(now + ttl if verdict.event_type == "match" else now),
            latency_ms=round(max(0.0, now - capture.received_at) * 1000.0, 1),
            frames=frames,
            face_box=verdict.box,
            error=verdict.error,
            message=verdict.message,
        )

    def _protocol_decision(self, event: IntegratorEvent, capture: Capture) -> None:
        """The protocol's msgpack decision, for integrators of the edge/cloud topics."""
        if not getattr(self.edge, "publish_decisions", False):
            return
        t0 = time.perf_counter() - event.latency_ms / 1000.0
        try:
            self.edge._decide(
                "identify", event.identity, event.match, t0, f"{capture.camera}/{event.event_id}"
            )
        except CipherFaceError as exc:
            log.warning("cannot publish the protocol decision: %s", exc)

    def _publish(self, capture: Capture, event: IntegratorEvent, done: Any) -> IntegratorEvent:
        with self._counts_lock:
            self.counts[event.event_type] = self.counts.get(event.event_type, 0) + 1
        for out in self.outputs:
            try:
                out.publish(event, capture)
            except Exception:  # one output failing never stops the others
                log.exception("output %s failed on %s", out.name, event.event_id)
        if done is not None:
            done(event)
        elif capture.done is not None and event.event_type in ("stale", "error"):
            capture.done(event)
        return event


def _face_message(exc: FaceError) -> str:
    # FaceError messages name the frame's label; labels are ours (camera/...), but a
    # folder photo's label is its file name only, never a path.
    return str(exc)[:200]


__all__ = ["QUEUE_SIZE", "Gateway"]
