"""How the cloud agent moves requests: lanes, batches and acknowledgements.

paho's network thread only sorts each request into a *lane* (:func:`lane_for`):

* the **fast lane** carries ``verify`` and ``ids.get`` -- cheap reads, answered
  within milliseconds. Its worker drains up to ``max_batch`` waiting requests at a
  time, so verifies of many gateways against one gallery share one engine call
  (``Gallery.verify_many``: one inverse NTT over the batch instead of one each);
* the **slow lane** carries ``identify``, ``enroll``, ``delete`` and ``key.publish``:
  one request at a time, in order, on its own thread. A 1:N identify over a big
  gallery therefore never holds a verify back (the engine's parallel kernels still
  interleave per gallery block).

Neither worker waits for the broker: a worker publishes its replies and hands the
request to the :class:`AckQueue`, whose thread waits for each reply's PUBACK and
only then acknowledges the request (``manual_ack``): a crash in between makes the
broker redeliver it, and the reply cache answers the copy. Nothing here knows the
protocol beyond the topic's last level.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar

import paho.mqtt.client as paho

from cipherface.agents.mqtt import Connection, wait_published
from cipherface.protocol import ReplyCache
from cipherface.protocol.state import Claim

log = logging.getLogger(__name__)

Lane = Literal["fast", "slow"]
#: Topic ops served in the fast lane (reads); everything else goes to the slow lane.
FAST_OPS: Final = frozenset({"verify", "ids"})
DEFAULT_MAX_BATCH: Final = 32


def lane_for(topic: str) -> Lane:
    """The lane of a request by its topic's last level (``.../req/<gw>/<op>``)."""
    return "fast" if topic.rpartition("/")[2] in FAST_OPS else "slow"


def drain(
    inbox: queue.Queue[paho.MQTTMessage | None], first: paho.MQTTMessage, limit: int
) -> tuple[list[paho.MQTTMessage], bool]:
    """``first`` plus whatever else is already waiting, up to ``limit`` messages.

    Returns:
        ``(batch, stop)``: ``stop`` is True when the stop marker was taken (it ends
        the worker after this batch).
    """
    batch = [first]
    while len(batch) < limit:
        try:
            nxt = inbox.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
    return batch, False


class LockedCache:
    """A :class:`~cipherface.protocol.ReplyCache` shared by the lanes' threads."""

    def __init__(self, cache: ReplyCache) -> None:
        self.cache = cache
        self._lock = threading.Lock()

    def claim(self, key: Hashable, *, now: float) -> Claim:
        with self._lock:
            return self.cache.claim(key, now=now)

    def put(self, key: Hashable, reply: bytes, *, now: float) -> None:
        with self._lock:
            self.cache.put(key, reply, now=now)

    def release(self, key: Hashable) -> None:
        with self._lock:
            self.cache.release(key)


@dataclass
class Pending:
    """A request whose replies are published but not yet acknowledged by the broker."""

    msg: paho.MQTTMessage
    conn: Connection
    infos: list[paho.MQTTMessageInfo] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)


class AckQueue:
    """Acknowledge each request once the broker has acknowledged all of its replies.

    One thread, first in first out: PUBACKs come back in publish order, so waiting
    for the oldest first costs nothing.

    Args:
        name: thread name.
        publish_timeout: seconds per wait before looking at the connection again.
        current: returns the agent's live connection (None once it stopped).
        done: called once per request after it is acknowledged or given up.
        refused: called with ``(topic, reason)`` for a reply the broker refused.
    """

    def __init__(
        self,
        *,
        name: str,
        publish_timeout: float,
        current: Callable[[], Connection | None],
        done: Callable[[], None],
        refused: Callable[[str, str], None],
    ) -> None:
        self.publish_timeout = publish_timeout
        self._current = current
        self._done = done
        self._refused = refused
        self._queue: queue.Queue[Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Pending) -> None:
        """Queue a published request for acknowledgement."""
        self._queue.put(item)

    def stop(self, timeout: float) -> bool:
        """Finish the queued acknowledgements and end the thread; False if still busy."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._settle(item)
            except Exception:  # never let one request end the thread
                log.exception("acknowledging a request failed")
            finally:
                self._done()

    def _settle(self, item: Pending) -> None:
        conn = item.conn
        delivered = True
        for info, topic in zip(item.infos, item.topics, strict=True):
            ok = wait_published(info, self.publish_timeout)
            # Leaving a request unacked while still connected would use up one of the
            # broker's in-flight slots for good: wait as long as the connection lives
            # (if it drops, the broker redelivers the request to the next session).
            while not ok and conn.connected and self._current() is conn:
                ok = wait_published(info, 5.0)
            reason = conn.refused(info) if ok else None
            if reason is not None:
                # Waiting or redelivery cannot help (ACL, size): ack so the agent keeps
                # serving, and say loudly that this reply never reached the gateway.
                self._refused(topic, reason)
            delivered = ok and delivered
        if delivered:
            conn.ack(item.msg.mid, item.msg.qos)
        else:
            log.warning(
                "reply to %s not acknowledged by the broker; request left unacked",
                item.msg.topic,
            )


K = TypeVar("K")
T = TypeVar("T")


def group_by(items: Sequence[T], key: Callable[[T], K]) -> dict[K, list[int]]:
    """Indices of ``items`` grouped by ``key`` (first-seen order)."""
    groups: dict[K, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups


__all__ = [
    "DEFAULT_MAX_BATCH",
    "FAST_OPS",
    "AckQueue",
    "Lane",
    "LockedCache",
    "Pending",
    "drain",
    "group_by",
    "lane_for",
]
