"""Per-camera accuracy controls and the vote over several frames (sans-IO).

For each frame the edge decrypts the best score of the gallery (in this process only)
and classifies it with the camera's thresholds, expressed as distances like deepface's:

* distance <= ``match_distance``: a vote for the best-scoring identity;
* distance > ``unknown_distance``: a vote for "nobody enrolled";
* in between: uncertain (no vote; another frame may settle it).

A capture is a ``match`` once one identity has ``consensus`` votes (the gateway stops
fetching frames then: early stop), ``unknown`` when its frames are used up without that,
and ``error`` when no frame had a usable face.

``confidence``. Decrypted CKKS values must never leave the edge (IND-CPA-D: an observer
holding ciphertexts and their decryptions can recover the secret key), and even a
rounded score or margin would give a reaction attacker several bits per decision instead
of one. So ``confidence`` is built from the per-frame *decisions* only: the share of the
frames with a face that voted for the named person (``votes / faces``, 2 decimals), and
None for anything but a match. It carries no digit of any score; it says how consistently
the frames agreed, which is what an automation can use. The leak per capture is the
per-frame match/no-match bits, the same kind as the decision itself (docs/integrations.md).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from cipherface.crypto import thresholds
from cipherface.errors import InvalidArgumentError

from .events import Box, EventType

#: Attempts per capture that any camera may ask for (each is a fetch + embed + identify).
MAX_ATTEMPTS: Final = 10


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Accuracy and freshness controls of one camera.

    Args:
        match_distance: a frame votes for a person at or below this distance (default:
            the face model's deepface threshold, e.g. 0.07 cosine for Dlib).
        unknown_distance: a frame votes "unknown" above this distance (default: the
            same as ``match_distance``, so every frame votes).
        min_face_area: faces smaller than this many pixels (width x height of the box
            the detector found, in pixels of the frame as received) are refused with
            ``face_too_small`` before they are identified, whatever the source; a box
            the source reports (Frigate's face attribute) is checked first, before the
            frame is even embedded.
        consensus: votes one person needs before a match (1 = the first match wins).
        attempts: frames to examine per capture at most (1..10).
        attempt_interval_s: pause between two fetches of the same capture.
        max_age_s: a capture older than this when it would be decided is dropped with a
            ``stale`` event instead.
        ttl_s: an outcome expires this many seconds after it is decided (``expires_at``).
        report_no_face: publish ``error`` events for captures without a face (periodic
            sources such as RTSP set it False: an empty hallway is not an error).

    Raises:
        InvalidArgumentError: out-of-range values.
    """

    match_distance: float | None = None
    unknown_distance: float | None = None
    min_face_area: int = 0
    consensus: int = 1
    attempts: int = 3
    attempt_interval_s: float = 0.2
    max_age_s: float = 5.0
    ttl_s: float = 10.0
    report_no_face: bool = True

    def __post_init__(self) -> None:
        for name in ("match_distance", "unknown_distance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InvalidArgumentError(f"{name} must be a distance >= 0, got {value}")
        if not 1 <= self.attempts <= MAX_ATTEMPTS:
            raise InvalidArgumentError(f"attempts must be in 1..{MAX_ATTEMPTS}")
        if not 1 <= self.consensus <= self.attempts:
            raise InvalidArgumentError("consensus must be in 1..attempts")
        if self.min_face_area < 0 or self.attempt_interval_s < 0:
            raise InvalidArgumentError("min_face_area and attempt_interval_s must be >= 0")
        if not (self.max_age_s > 0 and self.ttl_s > 0):
            raise InvalidArgumentError("max_age_s and ttl_s must be > 0")

    def limits(self, model: str, metric: str) -> tuple[float, float]:
        """``(match_distance, unknown_distance)`` with the model's defaults filled in.

        Raises:
            InvalidArgumentError: unknown model or metric, or unknown < match.
        """
        default = thresholds.threshold(model, metric)
        match = default if self.match_distance is None else self.match_distance
        unknown = match if self.unknown_distance is None else self.unknown_distance
        if unknown < match:
            raise InvalidArgumentError(
                f"unknown_distance ({unknown}) must be >= match_distance ({match})"
            )
        return match, unknown


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """What a capture came to (before freshness and publishing)."""

    event_type: EventType
    identity: str | None = None
    confidence: float | None = None
    box: Box | None = None
    error: str | None = None
    message: str | None = None


@dataclass
class Tally:
    """Votes of one capture's frames.

    Args:
        match_distance / unknown_distance: from :meth:`Policy.limits`.
        consensus: votes needed for a match.
        metric: ``cosine`` or ``euclidean`` (how a similarity becomes a distance).
    """

    match_distance: float
    unknown_distance: float
    consensus: int
    metric: str
    votes: Counter[str] = field(default_factory=Counter)
    faces: int = 0
    unknown: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: The face box of the last frame that voted for each identity, and of the last face.
    boxes: dict[str, Box] = field(default_factory=dict)
    last_box: Box | None = None

    def add_face(
        self, identity: str | None, similarity: float | None, box: Box | None = None
    ) -> None:
        """Count one frame with a face: the gallery's best identity and its similarity
        (None for both when the gallery is empty), and where the face was (if known)."""
        self.faces += 1
        if box is not None:
            self.last_box = box
        if identity is None or similarity is None:
            self.unknown += 1
            return
        distance = thresholds.distance_from_similarity(similarity, self.metric)
        if distance <= self.match_distance:
            self.votes[identity] += 1
            if box is not None:
                self.boxes[identity] = box
        elif distance > self.unknown_distance:
            self.unknown += 1

    def add_failure(self, code: str, message: str) -> None:
        """Count one frame that gave nothing (no face, unreadable, too small...)."""
        self.failures.append((code, message))

    def winner(self) -> tuple[str, int] | None:
        """The identity with ``consensus`` votes (the most voted), if any."""
        if not self.votes:
            return None
        identity, count = self.votes.most_common(1)[0]
        return (identity, count) if count >= self.consensus else None

    @property
    def settled(self) -> bool:
        """True once more frames cannot change a match (early stop)."""
        return self.winner() is not None

    def verdict(self) -> Verdict:
        """The capture's outcome from the frames counted so far."""
        won = self.winner()
        if won is not None:
            identity, count = won
            return Verdict(
                event_type="match",
                identity=identity,
                confidence=round(count / self.faces, 2),
                box=self.boxes.get(identity),
            )
        if self.faces:
            return Verdict(event_type="unknown", box=self.last_box)
        code, message = self.failures[-1] if self.failures else ("no_frame", "no frame")
        return Verdict(event_type="error", error=code, message=message)


__all__ = ["MAX_ATTEMPTS", "Policy", "Tally", "Verdict"]
