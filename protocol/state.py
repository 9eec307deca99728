"""Sans-IO correlation and deduplication state.

No sockets, threads or clocks: every method that needs the time takes ``now``
(seconds on any monotonic clock, e.g. ``time.monotonic()``), so the agents
drive these objects and the tests replay any timeline exactly. Not thread-safe:
call them from one thread (or hold a lock).

* :class:`ReplyCache` (cloud): request key -> encoded reply, so a redelivered
  request (QoS 1 duplicates, edge retries) gets the same bytes back and is
  never executed twice.
* :class:`PendingRequests` (edge): outstanding requests, matched to replies by
  ``corr``; expired ones come back for a retry or a timeout; a reply that
  matches nothing is reported, never silently dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from cipherface.errors import InvalidArgumentError
from cipherface.protocol.messages import Envelope, Reply, Request, Result

DedupKey = tuple[str, str, str]


def dedup_key(msg: Envelope) -> DedupKey:
    """The key a request is deduplicated under: ``(site, gw, id)``.

    Scoping the id by its sender means a gateway that learns (or guesses)
    another gateway's request id still cannot fetch that gateway's cached reply.
    """
    return (msg.site, msg.gw, msg.id)


# ---------------------------------------------------------------- reply cache
@dataclass(frozen=True, kw_only=True)
class Claim:
    """What :meth:`ReplyCache.claim` found.

    Args:
        state: ``new`` (first sight: process it, then :meth:`~ReplyCache.put`
            or :meth:`~ReplyCache.release`), ``in_progress`` (a copy is being
            processed: drop this one) or ``done`` (answer with ``reply``).
        reply: the cached reply bytes when ``state`` is ``done``.
    """

    state: Literal["new", "in_progress", "done"]
    reply: bytes | None = None


@dataclass
class _Entry:
    reply: bytes | None  # None while in progress
    stamp: float


class ReplyCache:
    """Bounded LRU + TTL map from a request key to its encoded reply.

    Bounded by entries *and* bytes: a result can be tens of MB, so an entry
    count alone would not bound memory. Replies larger than ``max_bytes`` are
    not cached (the duplicate is then processed again, which idempotent
    operations tolerate).

    Args:
        max_entries: most requests remembered (in progress or done).
        max_bytes: most reply bytes kept in total.
        ttl: seconds an entry lives after it was stored (or claimed).

    Raises:
        InvalidArgumentError: a non-positive bound.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
        ttl: float = 900.0,
    ) -> None:
        if max_entries <= 0 or max_bytes <= 0 or not ttl > 0:
            raise InvalidArgumentError("ReplyCache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Total size of the cached replies."""
        return self._bytes

    def _live(self, key: Hashable, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and now - entry.stamp >= self.ttl:
            self._drop(key)
            return None
        return entry

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.reply is not None:
            self._bytes -= len(entry.reply)

    def _trim(self) -> None:
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def get(self, key: Hashable, *, now: float) -> bytes | None:
        """The cached reply for ``key``, or None (also while it is in progress).

        Args:
            key: the request key (see :func:`dedup_key`).
            now: the current time.

        Returns:
            The reply bytes stored by :meth:`put`, or None.
        """
        entry = self._live(key, now)
        if entry is None or entry.reply is None:
            return None
        self._entries.move_to_end(key)
        return entry.reply

    def claim(self, key: Hashable, *, now: float) -> Claim:
        """Look ``key`` up and, when it is new, mark it in progress.

        Args:
            key: the request key (see :func:`dedup_key`).
            now: the current time.

        Returns:
            A :class:`Claim`: ``new``, ``in_progress`` or ``done`` (with the reply).
        """
        entry = self._live(key, now)
        if entry is None:
            self._entries[key] = _Entry(reply=None, stamp=now)
            self._trim()
            return Claim(state="new")
        self._entries.move_to_end(key)
        if entry.reply is None:
            return Claim(state="in_progress")
        return Claim(state="done", reply=entry.reply)

    def put(self, key: Hashable, reply: bytes, *, now: float) -> None:
        """Store the reply sent for ``key`` (ends its in-progress state).

        Args:
            key: the request key.
            reply: the encoded reply exactly as published.
            now: the current time (starts the TTL).
        """
        self._drop(key)
        if len(reply) > self.max_bytes:
            return
        self._entries[key] = _Entry(reply=bytes(reply), stamp=now)
        self._bytes += len(reply)
        self._trim()

    def release(self, key: Hashable) -> None:
        """Forget ``key`` (e.g. after a transient failure, so that a retry runs again)."""
        self._drop(key)

    def expire(self, *, now: float) -> int:
        """Drop every entry older than the TTL.

        Returns:
            How many entries were dropped.
        """
        stale = [k for k, e in self._entries.items() if now - e.stamp >= self.ttl]
        for key in stale:
            self._drop(key)
        return len(stale)


# ------------------------------------------------------------ pending requests
@dataclass(frozen=True, kw_only=True)
class Pending:
    """An outstanding request.

    Args:
        request: the request message as sent.
        deadline: when to stop waiting (same clock as ``now``).
        attempt: 1 for the first send, +1 per retry.
        context: anything the caller wants back with the reply.
    """

    request: Request
    deadline: float
    attempt: int = 1
    context: Any = field(default=None, compare=False)

    @property
    def request_id(self) -> str:
        """The request's message id (the ``corr`` its reply carries)."""
        return self.request.id


@dataclass(frozen=True, kw_only=True)
class Matched:
    """A reply answered an outstanding request (which is now finished).

    Args:
        pending: the request it answers.
        reply: the :class:`Result` or :class:`Error`.
    """

    pending: Pending
    reply: Reply


UnmatchedReason = Literal["no_corr", "unknown", "answered", "timed_out", "mismatch"]


@dataclass(frozen=True, kw_only=True)
class Unmatched:
    """A reply that answers no outstanding request.

    Args:
        reply: the reply.
        reason: ``no_corr`` (an error without corr), ``unknown`` (never sent, or
            forgotten), ``answered`` (a duplicate reply), ``timed_out`` (a late
            reply), ``mismatch`` (corr matches but site/gw/op do not: the request
            stays pending).
        pending: the outstanding request, for ``mismatch`` only.
    """

    reply: Reply
    reason: UnmatchedReason
    pending: Pending | None = None


class PendingRequests:
    """Edge-side table of requests waiting for a reply.

    Args:
        max_pending: most outstanding requests (a full table refuses more).
        history: how many finished request ids to remember, to tell a late or
            duplicate reply from an unknown one.

    Raises:
        InvalidArgumentError: a non-positive bound.
    """

    def __init__(self, *, max_pending: int = 10_000, history: int = 1024) -> None:
        if max_pending <= 0 or history < 0:
            raise InvalidArgumentError("PendingRequests bounds must be positive")
        self.max_pending = max_pending
        self.history = history
        self._pending: dict[str, Pending] = {}
        self._finished: OrderedDict[str, Literal["answered", "timed_out"]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._pending

    def get(self, request_id: str) -> Pending | None:
        """The outstanding request with this id, or None."""
        return self._pending.get(request_id)

    def register(
        self,
        request: Request,
        *,
        deadline: float,
        attempt: int = 1,
        context: Any = None,
    ) -> Pending:
        """Start waiting for the reply to ``request``.

        A retry re-registers the *same* request (same id, same bytes) with a
        new deadline and ``attempt + 1``, so the cloud's dedup recognises it.

        Args:
            request: the request just published.
            deadline: when to give up on this attempt.
            attempt: the attempt number.
            context: anything to get back with the reply.

        Returns:
            The :class:`Pending` entry.

        Raises:
            InvalidArgumentError: the id is already pending, or the table is full.
        """
        if request.id in self._pending:
            raise InvalidArgumentError(f"request {request.id} is already pending")
        if len(self._pending) >= self.max_pending:
            raise InvalidArgumentError(f"{self.max_pending} requests already pending")
        self._finished.pop(request.id, None)
        entry = Pending(request=request, deadline=deadline, attempt=attempt, context=context)
        self._pending[request.id] = entry
        return entry

    def _finish(self, request_id: str, how: Literal["answered", "timed_out"]) -> None:
        self._pending.pop(request_id, None)
        if self.history:
            self._finished[request_id] = how
            self._finished.move_to_end(request_id)
            while len(self._finished) > self.history:
                self._finished.popitem(last=False)

    def match(self, reply: Reply) -> Matched | Unmatched:
        """Pair a reply with its request by ``corr``.

        Args:
            reply: a decoded :class:`Result` or :class:`Error`.

        Returns:
            :class:`Matched` (the request is finished) or :class:`Unmatched`
            with the reason.
        """
        if reply.corr is None:
            return Unmatched(reply=reply, reason="no_corr")
        entry = self._pending.get(reply.corr)
        if entry is None:
            return Unmatched(reply=reply, reason=self._finished.get(reply.corr, "unknown"))
        req = entry.request
        wrong_op = isinstance(reply, Result) and reply.op != req.TYPE
        if reply.site != req.site or reply.gw != req.gw or wrong_op:
            # Not ours after all: keep waiting for the genuine reply.
            return Unmatched(reply=reply, reason="mismatch", pending=entry)
        self._finish(reply.corr, "answered")
        return Matched(pending=entry, reply=reply)

    def cancel(self, request_id: str) -> Pending | None:
        """Stop waiting for a request (its reply will then be reported ``unknown``)."""
        return self._pending.pop(request_id, None)

    def expired(self, *, now: float) -> list[Pending]:
        """Remove and return the requests whose deadline has passed.

        Args:
            now: the current time.

        Returns:
            The expired entries, earliest deadline first: re-send and
            :meth:`register` again to retry, or fail with a timeout.
        """
        gone = sorted(
            (p for p in self._pending.values() if p.deadline <= now), key=lambda p: p.deadline
        )
        for entry in gone:
            self._finish(entry.request_id, "timed_out")
        return gone

    def next_deadline(self) -> float | None:
        """The earliest deadline among outstanding requests (for a timer), or None."""
        return min((p.deadline for p in self._pending.values()), default=None)


__all__ = [
    "Claim",
    "DedupKey",
    "Matched",
    "Pending",
    "PendingRequests",
    "ReplyCache",
    "Unmatched",
    "UnmatchedReason",
    "dedup_key",
]
