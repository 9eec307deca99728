"""The cloud agent: holds each site's encrypted gallery and answers the edges' requests.

It never sees a face, an embedding, a score or a secret key: requests carry
ciphertexts, results carry encrypted scores that only the site's edge can decrypt.

Message flow (docs/agents.md):

1. paho's network thread receives a request (QoS 1, shared subscription, persistent
   session) and only puts it on its lane's queue (:mod:`cipherface.agents.dispatch`):
   verify and ids.get in the fast lane, identify and the writes in the slow lane, so a
   slow identify never starves keepalive nor holds a verify back.
2. A lane's worker decodes and validates it (:func:`cipherface.protocol.decode_request`),
   answers a duplicate from the :class:`~cipherface.protocol.ReplyCache`, otherwise runs
   the gallery engine (the fast lane batches the verifies waiting for one gallery) and
   encodes a ``result`` -- or an ``error`` carrying the exception's stable ``code``:
   one bad message never stops the agent.
3. It publishes the reply (QoS 1) on the requester's ``res`` / ``err`` topic, derived
   from the request *topic* (which the broker's ACL vouches for), never from a
   ResponseTopic the sender chose, and moves on; the ack thread waits for the PUBACK.
4. Only then does it acknowledge the request (``manual_ack``): a crash before that
   makes the broker redeliver it, and the reply cache makes the redelivery harmless.
   The reply of a write (enroll, delete, key.retire) is stored in the gallery store in
   the transaction of its change (:mod:`cipherface.store.replies`): a write redelivered
   after a crash, or retried on another worker sharing a PostgreSQL store, is answered
   with those bytes and never runs twice.

Data directory (``--data DIR``)::

    DIR/.lock                          one agent per directory
    DIR/<site>/current                 key id of the site's latest key.publish
    DIR/<site>/keys/<kid>/public.key   the site's public key (from key.publish)
    DIR/<site>/keys/<kid>/gallery/     its encrypted gallery (gallery.sqlite3, docs/storage.md);
                                       with --store postgresql://... it lives in that database
    DIR/<site>/replies/<gw>.<id>       a write's reply when no gallery holds it (a delete on
                                       a site without a key, SQLite), and replies written
                                       by earlier versions: read until they expire
    DIR/<site>/retired/<kid>           tombstone of a key retired by rotate-key (never again)

Key rotation's requests (``gallery.export``, ``key.retire``) are served by
:mod:`cipherface.agents.cloud_rotate`.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import paho.mqtt.client as paho

from cipherface import __version__
from cipherface.agents.cloud_rotate import export_page, refuse_retired, retire_key
from cipherface.agents.compute import ComputePool
from cipherface.agents.dispatch import (
    DEFAULT_MAX_BATCH,
    AckQueue,
    Lane,
    LockedCache,
    Pending,
    drain,
    group_by,
    lane_for,
)
from cipherface.agents.mqtt import (
    BrokerConfig,
    Connection,
    message_property,
    publish_properties,
    wait_published,
)
from cipherface.agents.owner import IdWatch
from cipherface.agents.quota import UNKNOWN_SCOPE, QuotaPolicy, Quotas
from cipherface.agents.site_keys import SiteKeys, reply_file
from cipherface.crypto import sites
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.engine import Gallery
from cipherface.crypto.store import Reply
from cipherface.errors import (
    AlreadyAnsweredError,
    CipherFaceError,
    DecodeError,
    ExpiredError,
    GalleryError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    LocalError,
    PayloadTooLargeError,
    RateLimitedError,
    RemoteError,
    StorageCorruptError,
    ValidationError,
)
from cipherface.protocol import (
    CLOUD_SHARE_GROUP,
    MAX_IDS,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_SLOTS,
    REQUEST_FILTER,
    Delete,
    Enroll,
    GalleryExport,
    Identify,
    IdsGet,
    KeyPublish,
    KeyRetire,
    ReplyCache,
    Request,
    Result,
    Status,
    Verify,
    cloud_request_filter,
    cloud_status_topic,
    correlation_data,
    decode_request,
    dedup_key,
    encode,
    error_for,
    error_header,
    error_topic,
    now_ms,
    parse_request_topic,
    result_for,
    result_topic,
    validate_id,
)
from cipherface.store.replies import REPLY_TTL_S

log = logging.getLogger(__name__)

DEFAULT_AGENT_ID: Final = "cloud-local"
#: Replies of writes kept this long, for redeliveries and retries (in the gallery store).
PERSISTED_REPLY_TTL_S: Final = REPLY_TTL_S
PRUNE_EVERY_S: Final = 3600.0  # how often a running agent drops expired stored replies
#: A write sent (``ts``) longer ago is refused as ``expired``: its stored reply may be
#: pruned, and running it again could undo a later write (an enroll after its delete
#: brings the identity back). An hour under the TTL, for clocks that disagree.
WRITE_MAX_AGE_S: Final = PERSISTED_REPLY_TTL_S - 3600.0
_MUTATING: Final = (Enroll, Delete, KeyRetire)
# Reply-cache entries are tagged with the topic they go to (results vs errors).
_RESULT_TAG: Final = b"R"
_ERROR_TAG: Final = b"E"


def _as_remote(exc: BaseException) -> BaseException:
    """Engine errors about a peer's payload are gallery errors on the wire.

    The envelope was valid by then: a payload or probe the engine cannot parse or
    use "does not fit the gallery" (docs/protocol.md 6.4, 8.1), whatever the engine
    called it.
    """
    if type(exc) in (InvalidArgumentError, DecodeError):
        return GalleryError(str(exc))
    return exc


#: Verifies per engine call with worker processes (measured: 4-8 beat 32 on 2 cores).
WORKERS_MAX_BATCH: Final = 8
#: Unacknowledged requests the broker may have in flight to the agent (MQTT 5): enough
#: for a batch of verifies from many gateways while the previous batch is acknowledged.
CLOUD_RECEIVE_MAXIMUM: Final = 100
#: Request bytes the agent holds, received and not yet taken by a lane, before paho's
#: network thread waits for the lanes (the broker then keeps the rest). The broker's
#: flow control does not bound them: Mosquitto 2.0 honours ReceiveMaximum (and
#: ``max_inflight_bytes``) only until the first acknowledgement, then sends everything
#: queued (measured: 297 of 300 requests in the agent at once with ReceiveMaximum 100),
#: so 100 enrollments of 64 MiB could otherwise all sit in memory.
MAX_QUEUED_BYTES: Final = 256 * 1024 * 1024
#: The longest the network thread waits for room (keepalive and PUBACKs wait with it).
QUEUE_WAIT_S: Final = 5.0


@dataclass(frozen=True, kw_only=True)
class _Job:
    """A decoded request that is not a duplicate: the engine still has to run it."""

    req: Request
    key: object
    echo: bytes | None


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """A message the agent publishes.

    Args:
        topic: where.
        payload: the encoded message.
        correlation: MQTT 5 CorrelationData to echo, or None.
        kind: ``result`` or ``error`` (for logs and tests).
    """

    topic: str
    payload: bytes
    correlation: bytes | None = None
    kind: str = "result"
    #: Acknowledge the request *before* publishing this reply (a write refused with a
    #: retryable error: nothing changed). Were the agent to die between the two, the
    #: broker would redeliver a write the gateway was told had failed, and it could run
    #: after the gateway moved on (deleted the identity, say). Lost instead, the reply
    #: is a timeout at the gateway, which retries with the same id or gives up.
    settle_first: bool = False


def ids_page(
    slots: Sequence[str | None], offset: int, limit: int | None
) -> tuple[int, list[str | None]]:
    """One page of a slot list, as ``ids.get`` serves it (docs/protocol.md 6.6).

    Args:
        slots: the gallery's slot -> identity list (None for a free slot).
        offset: the first slot asked for; past the end gives the empty last page.
        limit: the most ids in the page (None: :data:`MAX_IDS`).

    Returns:
        ``(offset, ids)``: the page's first slot (``offset`` clamped to the list's
        length) and its ``min(limit, total - offset)`` ids.
    """
    start = min(offset, len(slots))
    size = MAX_IDS if limit is None else limit
    return start, list(slots[start : start + size])


def _check_slots(n: int) -> None:
    if n > MAX_SLOTS:
        raise PayloadTooLargeError(
            f"the gallery has {n} slots; a protocol v1 result describes at most {MAX_SLOTS}"
        )


def _encoded_size(msg: Result) -> int:
    try:
        return len(encode(msg))
    except InvalidArgumentError:  # encode() refuses anything over MAX_MESSAGE_BYTES
        return MAX_MESSAGE_BYTES + 1


class CloudAgent:
    """Serve the edges' requests for the galleries under ``data_dir``.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :meth:`handle` is the
    whole request -> reply logic without any I/O (the tests drive it directly too).

    Args:
        broker: broker settings.
        data_dir: where keys, galleries and persisted replies live (created).
        agent_id: the agent's id: MQTT client id (its persistent session) and status
            topic level. Deployments use the broker username (``cloud-<name>``).
        sites: serve only these sites (one subscription each, as the broker ACL of a
            ``cloud-<name>`` account requires); None serves every site.
        share_group: MQTT shared-subscription group; None subscribes without sharing.
            At start the agent checks that the broker delivers shared subscriptions
            (its own ``online`` status through a ``$share`` subscription); a broker
            without them (NATS, RabbitMQ) gets plain subscriptions and a warning
            instead of requests that silently never arrive.
        share_check_s: seconds to wait for that self-test message.
        max_message_bytes: refuse (``too_large``) requests longer than this.
        max_reply_bytes: the largest reply to publish (at most the protocol's 64 MiB;
            lower it to the broker's ``message_size_limit``): an identify result that
            would exceed it with the slot list goes without it (the edge pages the list
            with ids.get), and without it is refused with ``too_large``.
        publish_timeout: seconds to wait for the broker to acknowledge a reply before
            giving up on acknowledging the request (it will then be redelivered).
        reply_cache: the dedup cache (default: 10k entries, 256 MB, 15 min).
        max_batch: the most verifies scored in one engine call (1: no batching).
            Default 32, or 8 with workers: smaller batches keep the workers busy
            while the agent publishes the previous ones.
        fast_threads: fast-lane threads: while one waits for the engine (its kernels
            release the GIL, worker processes run without it), another decodes and
            publishes. Default: 2, or ``workers + 2`` with workers.
        workers: compute processes for verifies and for re-randomising identify
            probes (:mod:`cipherface.agents.compute`): SEAL holds the GIL, so one
            process uses one core for them. 0 computes in the agent's own process.
        serial: the agent as it was before lanes and batches (benchmarks): one
            worker thread for every request, each reply's PUBACK awaited inline.
        receive_maximum: MQTT 5 ReceiveMaximum: requests the broker may have in flight
            to this agent before it acknowledges any.
        store: gallery store: ``sqlite:`` (one SQLite file per gallery under
            ``data_dir``), ``sqlite:ROOT``, or a ``postgresql://`` URL shared by workers.
        quotas: what each gateway may ask an hour (:mod:`cipherface.agents.quota`;
            default :class:`QuotaPolicy`; ``QuotaPolicy(identify_per_hour=0,
            verify_per_identity_per_hour=0)`` turns them off, e.g. for load tests).
        max_queued_bytes: request bytes held waiting for the lanes before the agent
            stops reading from the broker for a while (:data:`MAX_QUEUED_BYTES`).

    Raises:
        InvalidArgumentError: a bad agent id, site or share group.
        LocalError: another agent holds ``data_dir``.
    """

    def __init__(
        self,
        *,
        broker: BrokerConfig,
        data_dir: str | os.PathLike[str],
        agent_id: str = DEFAULT_AGENT_ID,
        sites: Sequence[str] | None = None,
        share_group: str | None = CLOUD_SHARE_GROUP,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_reply_bytes: int = MAX_MESSAGE_BYTES,
        publish_timeout: float = 30.0,
        reply_cache: ReplyCache | None = None,
        max_batch: int | None = None,
        fast_threads: int | None = None,
        workers: int = 0,
        serial: bool = False,
        receive_maximum: int = CLOUD_RECEIVE_MAXIMUM,
        share_check_s: float = 3.0,
        store: str = "sqlite:",
        quotas: QuotaPolicy | None = None,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        if max_batch is None:
            max_batch = WORKERS_MAX_BATCH if workers else DEFAULT_MAX_BATCH
        if max_batch < 1 or not 1 <= receive_maximum <= 65535 or workers < 0:
            raise InvalidArgumentError(
                "max_batch must be >= 1, receive_maximum in 1..65535, workers >= 0"
            )
        self.max_batch = max_batch
        self.workers = workers
        #: The compute processes while started with ``workers`` > 0.
        self.pool: ComputePool | None = None
        #: Counters of the pools of earlier starts (metrics counters never go back).
        self._pool_counts: collections.Counter[str] = collections.Counter()
        self._pool_lock = threading.Lock()  # a scrape sees a pool's counts once
        if fast_threads is None:
            fast_threads = workers + 2 if workers else 2
        self.fast_threads = max(1, fast_threads)
        self.serial = serial
        self.receive_maximum = receive_maximum
        self.agent_id = validate_id(agent_id, what="agent id")
        self.sites = None if sites is None else tuple(validate_id(s, what="site") for s in sites)
        if share_group is not None:
            validate_id(share_group, what="share group")
        self.share_group = share_group
        self._group = share_group  # as configured (share_group is None after a fallback)
        self.share_check_s = share_check_s
        #: True once the start-up self-test found that the broker drops ``$share``
        #: subscriptions and the agent fell back to plain ones.
        self.share_fallback = False
        self._share_probe: str | None = None
        self._share_seen = threading.Event()
        self.broker = broker
        self.data_dir = Path(data_dir)
        self.max_message_bytes = max_message_bytes
        if not 0 < max_reply_bytes <= MAX_MESSAGE_BYTES:
            raise InvalidArgumentError(f"max_reply_bytes must be in 1..{MAX_MESSAGE_BYTES}")
        self.max_reply_bytes = max_reply_bytes
        self.publish_timeout = publish_timeout
        self.cache = reply_cache if reply_cache is not None else ReplyCache()
        self.quotas = Quotas(policy=quotas)
        self._cache = LockedCache(self.cache)
        self.keys = SiteKeys(self.data_dir, store=store)
        self.status_topic = cloud_status_topic(self.agent_id)
        #: Counters: ``requests``, ``results``, ``errors``, ``duplicates``.
        self.stats: dict[str, int] = {
            "requests": 0,
            "results": 0,
            "errors": 0,
            "duplicates": 0,
            "dropped_qos0": 0,
            "dropped_retained": 0,
            "replies_refused": 0,
            "batches": 0,
        }
        self._lanes: dict[Lane, queue.Queue[paho.MQTTMessage | None]] = {
            "fast": queue.Queue(),
            "slow": queue.Queue(),
        }
        self._workers: list[threading.Thread] = []
        self._worker_lanes: list[Lane] = []
        self._acks: AckQueue | None = None
        self._lock_fd: int | None = None
        self._conn: Connection | None = None
        self._idle = threading.Condition()
        self._busy = 0
        #: Set once another process took this agent id over while this one was away
        #: (agents/owner.py): it stood down and no longer reconnects; stop it.
        self.taken_over = threading.Event()
        #: Called (MQTT network thread) when that happens: the CLI stops and exits 4.
        self.on_taken_over: Callable[[], None] | None = None
        self._owner = IdWatch(announce=self._announce)
        self.max_queued_bytes = max_queued_bytes
        #: Bytes of the requests in the lanes' queues (``max_queued_bytes`` bounds it).
        self.queued_bytes = 0
        #: Called after each request with (topic, replies, seconds): metrics and the
        #: per-request log line (cipherface.observe, wired by the CLI).
        self.on_request: Callable[[str, list[Outgoing], float], None] | None = None

    @property
    def connection(self) -> Connection | None:
        """The broker connection while started (to publish health), else None."""
        return self._conn

    def load(self) -> dict[str, Any]:
        """Levels for metrics and health: requests queued and in progress, galleries
        open, live templates in them, broker reconnections, the compute pool
        (:meth:`compute_levels`)."""
        queued = sum(q.qsize() for q in self._lanes.values())
        with self.keys._lock:
            galleries = list(self.keys._open.values())
        # Each gallery keeps its live count: no id list (a million entries) per scrape.
        templates = sum(gallery.count for gallery in galleries)
        conn = self._conn
        return {
            "queue_depth": queued,
            "queued_bytes": self.queued_bytes,
            "in_progress": max(0, self._busy - queued),
            "galleries_open": len(galleries),
            "templates": templates,
            "duplicates": self.stats["duplicates"],
            "replies_refused": self.stats["replies_refused"],
            "broker_connected": int(conn is not None and conn.connected),
            "broker_reconnects": conn.reconnects if conn is not None else 0,
            **self.compute_levels(),
        }

    def compute_levels(self) -> dict[str, Any]:
        """The compute pool's levels: workers configured and running, workers
        replaced, and jobs by kind (``verify``: verifies; ``identify``: identify probe
        ciphertexts re-randomised), all and those done in this process because a
        worker failed or none was running."""
        with self._pool_lock:
            pool = self.pool
            counts = collections.Counter(self._pool_counts)
            alive = 0
            if pool is not None:
                levels = pool.levels()
                alive = levels.pop("alive")
                counts.update(levels)
        return {
            "compute_workers": self.workers,
            "compute_workers_alive": alive,
            "compute_worker_restarts": counts["restarts"],
            "compute_jobs": {"verify": counts["jobs"], "identify": counts["ciphertexts"]},
            "compute_local_jobs": {
                "verify": counts["local"],
                "identify": counts["ciphertexts_local"],
            },
        }

    # ---------------------------------------------------------------- lifecycle
    def _status(self, state: Literal["online", "offline"]) -> bytes:
        return self._owner.mine(
            Status(site="cloud", gw=self.agent_id, state=state, role="cloud", version=__version__)
        )

    def filters(self) -> list[str]:
        """The subscription filters this agent uses."""
        return self._filters(self.share_group)

    def _filters(self, group: str | None) -> list[str]:
        if self.sites is None:
            bases = [REQUEST_FILTER]
        else:
            bases = [REQUEST_FILTER.replace("/+/req/", f"/{s}/req/", 1) for s in self.sites]
        if group is None:
            return bases
        if self.sites is None:
            return [cloud_request_filter(group)]
        return [f"$share/{group}/{b}" for b in bases]

    def _on_connected(self, conn: Connection, session_present: bool) -> None:
        conn.subscribe([(f, 1) for f in self.filters()], no_retained=True)
        # A persistent session keeps the subscriptions of earlier runs: one made in the
        # other mode (plain after --no-share or a fallback, or shared) would deal this
        # worker every request, or a share of them, on top of what it asks for now.
        other = None if self.share_group is not None else (self._group or CLOUD_SHARE_GROUP)
        stale = [f for f in self._filters(other) if f not in self.filters()]
        if stale:
            conn.unsubscribe(stale)
        if self._owner.watching:
            # Back after a loss: the retained status says whether another process
            # took our id meanwhile; announce only if not (agents/owner.py).
            conn.subscribe([(self.status_topic, 1)])
            self._owner.reconnected()
            return
        # First connection: a session kept from an earlier run may hold a plain
        # subscription to our status; the self-test must hear only the shared one.
        conn.unsubscribe([self.status_topic])
        if self._share_probe is not None and not self._share_seen.is_set():
            # Self-test: our own status, published next, must come back through a
            # shared subscription; brokers without $share accept the subscription
            # and never deliver on it.
            conn.subscribe([(self._share_probe, 1)], no_retained=True)
        self._announce()

    def _announce(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.publish(self.status_topic, self._status("online"), qos=1, retain=True)

    def _watch_id(self, conn: Connection) -> None:
        """Subscribe to our own status topic, after the self-test (agents/owner.py),
        and wait (briefly) for our status to come back: the watch is then armed."""
        self._owner.watch()
        conn.subscribe([(self.status_topic, 1)])
        if not self._owner.armed.wait(self._owner.check_s):
            log.warning(
                "cloud agent %s: its retained status did not come back from %s within %g s: "
                "it will not notice another process taking its agent id over",
                self.agent_id,
                self.broker.url,
                self._owner.check_s,
            )

    def _on_lost(self, conn: Connection) -> None:
        # MQTT network thread, before paho reconnects.
        if not self._owner.lost():
            return
        # Another process used our id while we were away and has just taken it back:
        # the session is its own now (agents/owner.py).
        self.taken_over.set()
        log.error(
            "cloud agent %s: another process serves under this agent id (a worker "
            "replaced elsewhere, or two started with one id) and took it back: standing "
            "down, not reconnecting; requests in hand go back to the broker",
            self.agent_id,
        )
        conn.stand_down()
        if self.on_taken_over is not None:
            self.on_taken_over()

    def _check_share(self, conn: Connection) -> None:
        """Wait for the self-test message; without it, fall back to plain subscriptions."""
        probe = self._share_probe
        if probe is None:
            return
        seen = self._share_seen.wait(self.share_check_s)
        conn.unsubscribe([probe])
        self._share_probe = None
        if seen:
            return
        shared = self.filters()
        self.share_group = None
        self.share_fallback = True
        conn.subscribe([(f, 1) for f in self.filters()], no_retained=True)
        conn.unsubscribe(shared)
        log.warning(
            "the broker at %s did not deliver a shared subscription ($share) within %g s: "
            "serving on plain subscriptions %s instead. Run ONE cloud agent per site on "
            "this broker (or pass --no-share to skip this check); to run several workers, "
            "use a broker with shared subscriptions (Mosquitto, EMQX, HiveMQ, VerneMQ; "
            "see docs/deployment.md)",
            self.broker.url,
            self.share_check_s,
            self.filters(),
        )

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        # Network thread: hand off and return.
        if msg.topic == self.status_topic:
            self._conn_ack(msg)
            if self._owner.message(bytes(msg.payload), retained=msg.retain):
                self._share_seen.set()  # our status came back: the $share self-test passed
            return
        if msg.qos == 0:
            # Requests are QoS 1: QoS 0 has no flow control (the broker's in-flight cap
            # would not bound our queue) and no delivery guarantee to honour.
            self.stats["dropped_qos0"] += 1
            return
        if msg.retain:
            # A retained request would be replayed on every subscribe, e.g. re-enrolling
            # an erased identity long after the dedup window: never act on one.
            self.stats["dropped_retained"] += 1
            log.warning(
                "ignored a retained message on %s (clear it with an empty retained publish)",
                msg.topic[:200],
            )
            self._conn_ack(msg)
            return
        size = len(msg.payload)
        with self._idle:
            # Back pressure: wait (bounded) for the lanes to take what we hold; meanwhile
            # nothing is read from the socket and the broker keeps the requests.
            deadline = time.monotonic() + QUEUE_WAIT_S
            while self.queued_bytes and self.queued_bytes + size > self.max_queued_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            self.queued_bytes += size
            self._busy += 1
        self._lanes["slow" if self.serial else lane_for(msg.topic)].put(msg)

    def _taken(self, batch: list[paho.MQTTMessage]) -> None:
        """A lane took ``batch`` from its queue: room for more (see :meth:`_on_message`)."""
        with self._idle:
            self.queued_bytes = max(0, self.queued_bytes - sum(len(m.payload) for m in batch))
            self._idle.notify_all()

    def _conn_ack(self, msg: paho.MQTTMessage) -> None:
        conn = self._conn
        if conn is not None:
            conn.ack(msg.mid, msg.qos)

    def _take_lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LocalError(f"another cloud agent is using {self.data_dir}") from None
        self._lock_fd = fd

    def start(self) -> None:
        """Lock the data directory, connect, subscribe and start serving.

        Raises:
            LocalError: the data directory is in use.
            BrokerConnectionError: the broker cannot be reached or refuses us.
        """
        if self._conn is not None:
            return
        self._take_lock()
        self._prune_replies()
        if self.workers and self.pool is None:
            try:
                self.pool = ComputePool(self.workers)
            except BaseException:
                self._release_lock()
                raise
        self._start_workers()
        if self.share_group is not None and self.share_check_s > 0:
            self._share_probe = f"$share/{self.share_group}-selftest/{self.status_topic}"
        conn = Connection(
            config=self.broker,
            client_id=self.agent_id,
            persistent=True,
            manual_ack=True,
            will=(self.status_topic, self._status("offline")),
            on_message=self._on_message,
            on_connected=self._on_connected,
            receive_maximum=self.receive_maximum,
            on_lost=self._on_lost,
        )
        self._conn = conn
        try:
            conn.start()
        except BaseException:
            self._conn = None
            self._stop_worker()
            self._close_pool()
            self._release_lock()
            raise
        self._check_share(conn)
        self._watch_id(conn)
        log.info("cloud agent %s serving %s from %s", self.agent_id, self.filters(), self.data_dir)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every received request has been answered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, *, graceful: bool = True, retire: bool = False) -> None:
        """Stop serving. The persistent session stays on the broker, so requests sent
        meanwhile are queued for the next start.

        Args:
            graceful: finish the queued requests and publish the retained ``offline``
                status; False drops the connection like a crash (the broker then
                publishes the last will, and unacknowledged requests are redelivered).
            retire: also end the persistent session: this agent id will not come
                back, so the broker must stop queueing its share of the requests
                (Mosquitto keeps giving an absent member of a share group its turn).
                Ignored once :attr:`taken_over`: the session is another process's.
        """
        conn = self._conn
        if conn is None:
            return
        self._owner.close()
        # Taken over: no connection to finish on, and the session is not ours to end
        # (requests in hand go unacknowledged: the broker gives them to the new owner).
        if graceful and not self.taken_over.is_set():
            self.wait_idle(self.publish_timeout)
            conn.stop(farewell=(self.status_topic, self._status("offline")), expire_session=retire)
        else:
            # Close the socket without DISCONNECT: the broker sees a dead client.
            sock = conn.client.socket()
            conn.client.loop_stop()
            if sock is not None:
                sock.close()
        self._conn = None
        if self._stop_worker():
            self.keys.close()
        else:
            log.warning("worker still busy at shutdown: galleries left for the OS to close")
        self._close_pool()
        self._release_lock()
        log.info("cloud agent %s stopped", self.agent_id)

    def _start_workers(self) -> None:
        self._acks = AckQueue(
            name=f"{self.agent_id}-acks",
            publish_timeout=self.publish_timeout,
            current=lambda: self._conn,
            done=self._done,
            refused=self._reply_refused,
        )
        lanes: list[Lane] = ["slow"]
        if not self.serial:
            lanes[:0] = ("fast" for _ in range(self.fast_threads))
        self._worker_lanes = lanes
        self._workers = [
            threading.Thread(target=self._work, args=(lane,), name=f"{self.agent_id}-{lane}{i}")
            for i, lane in enumerate(lanes)
        ]
        for worker in self._workers:
            worker.daemon = True
            worker.start()

    def _stop_worker(self) -> bool:
        """Stop the workers; False if one is still running (then galleries stay open)."""
        alive = False
        for lane in self._worker_lanes:  # one stop marker per thread of its lane
            self._lanes[lane].put(None)
        for worker in self._workers:
            worker.join(timeout=self.publish_timeout + 5)
            alive = alive or worker.is_alive()
        self._workers = []
        if self._acks is not None:
            alive = not self._acks.stop(self.publish_timeout + 5) or alive
            self._acks = None
        # Requests not yet handled stay unacknowledged: the broker redelivers them.
        for inbox in self._lanes.values():
            while not inbox.empty():
                inbox.get_nowait()
        with self._idle:
            self._busy = 0
            self.queued_bytes = 0
            self._idle.notify_all()
        return not alive

    def _close_pool(self) -> None:
        with self._pool_lock:
            pool, self.pool = self.pool, None
            if pool is not None:
                levels = pool.levels()
                del levels["alive"]
                self._pool_counts.update(levels)
        if pool is not None:
            pool.close()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def run_forever(self, stop: threading.Event) -> None:
        """Start, serve until ``stop`` is set, then stop gracefully."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    def __enter__(self) -> CloudAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------- worker
    def _done(self) -> None:
        with self._idle:
            self._busy = max(0, self._busy - 1)
            self._idle.notify_all()

    def _reply_refused(self, topic: str, reason: str) -> None:
        self.stats["replies_refused"] += 1
        log.error("the broker refused the reply on %s (%s)", topic, reason)

    def _work(self, lane: Lane) -> None:
        inbox = self._lanes[lane]
        limit = self.max_batch if lane == "fast" else 1
        last_prune = time.monotonic()
        while True:
            try:
                msg = inbox.get(timeout=60.0)
            except queue.Empty:
                if lane == "slow" and time.monotonic() - last_prune > PRUNE_EVERY_S:
                    self._prune_replies()  # stored replies expire while we run, too
                    last_prune = time.monotonic()
                continue
            if msg is None:
                return
            batch, stop = drain(inbox, msg, limit)
            self._taken(batch)
            try:
                self._serve(batch)
            except Exception:  # never let one batch end the worker
                log.exception("unexpected failure serving %s", [m.topic for m in batch])
                for _ in batch:
                    self._done()
            if stop:
                return

    def _serve(self, batch: list[paho.MQTTMessage]) -> None:
        """Answer a batch of requests: run them, publish the replies, queue the acks."""
        conn, acks = self._conn, self._acks
        if conn is None or acks is None:
            for _ in batch:
                self._done()
            return
        t0 = time.perf_counter()
        replies = self.handle_many(
            [(m.topic, bytes(m.payload), message_property(m, "CorrelationData")) for m in batch]
        )
        if self.on_request is not None:
            spent = time.perf_counter() - t0
            for m, outgoing in zip(batch, replies, strict=True):
                self.on_request(m.topic, outgoing, spent)
        for msg, outgoing in zip(batch, replies, strict=True):
            first = any(out.settle_first for out in outgoing)
            if first:
                conn.ack(msg.mid, msg.qos)
            pending = Pending(msg=msg, conn=conn)
            for out in outgoing:
                info = conn.publish(
                    out.topic,
                    out.payload,
                    qos=1,
                    properties=publish_properties(correlation=out.correlation),
                )
                pending.infos.append(info)
                pending.topics.append(out.topic)
            if first:
                self._done()  # acknowledged above: nothing for the ack queue
                continue
            acks.put(pending)
            if self.serial:
                for info in pending.infos:
                    wait_published(info, self.publish_timeout)

    # ------------------------------------------------------------ request logic
    def handle(
        self, topic: str, payload: bytes, *, correlation: bytes | None = None
    ) -> list[Outgoing]:
        """Turn one received request into the replies to publish (no I/O but the gallery's).

        Args:
            topic: the topic it arrived on.
            payload: the MQTT payload.
            correlation: the MQTT 5 CorrelationData it carried, if any (echoed back).

        Returns:
            Zero or one :class:`Outgoing` (zero: the topic is not a request topic, so
            there is nobody to answer).
        """
        return self.handle_many([(topic, payload, correlation)])[0]

    def handle_many(
        self, requests: Sequence[tuple[str, bytes, bytes | None]]
    ) -> list[list[Outgoing]]:
        """:meth:`handle` for several requests, verifies of one gallery in one engine call.

        Args:
            requests: ``(topic, payload, correlation)`` of each request.

        Returns:
            The replies of each request, in order.
        """
        admitted = [self._admit(t, p, correlation=c) for t, p, c in requests]
        jobs = [(i, a) for i, a in enumerate(admitted) if isinstance(a, _Job)]
        out: list[list[Outgoing]] = [a if isinstance(a, list) else [] for a in admitted]
        verifies = [(i, j) for i, j in jobs if isinstance(j.req, Verify) and j.req.kid]
        for i, job in jobs:
            if not (isinstance(job.req, Verify) and job.req.kid):
                out[i] = self._run(job, None)
        groups = group_by(verifies, lambda ij: (ij[1].req.site, ij[1].req.kid))
        for (site, kid), members in groups.items():
            computed = self._verify_batch(site, kid, [verifies[m][1] for m in members])
            for m, done in zip(members, computed, strict=True):
                i, job = verifies[m]
                out[i] = self._run(job, done)
        return out

    def _verify_batch(
        self, site: str, kid: str | None, jobs: list[_Job]
    ) -> list[bytes | Exception]:
        """Scores of verify jobs against one gallery (the engine's batch call if it has one).

        Never raises: a failure of the whole call becomes every job's error, so each
        request is still answered and its reply-cache claim settled (an exception here
        used to leave the batch unanswered, unacknowledged and claimed for 15 minutes).
        """
        self.stats["batches"] += 1
        try:
            found = self._verify_batch_of(site, kid, jobs)
            if len(found) != len(jobs):
                raise RuntimeError(f"{len(found)} verify results for {len(jobs)} jobs")
            return found
        except Exception as exc:  # every job of the batch gets the same error
            return [exc] * len(jobs)

    def _verify_batch_of(
        self, site: str, kid: str | None, jobs: list[_Job]
    ) -> list[bytes | Exception]:
        assert kid is not None
        gallery = self.keys.gallery(site, kid)
        items = []
        for job in jobs:
            assert isinstance(job.req, Verify)
            items.append((job.req.identity, job.req.probe))
        many = getattr(gallery, "verify_many", None)
        pool = self.pool
        if pool is not None and isinstance(gallery, CkksGallery):
            return list(gallery.verify_many(items, compute=pool.verify))
        if len(items) > 1 and many is not None:
            return list(many(items))
        found: list[bytes | Exception] = []
        for identity, probe in items:
            try:
                found.append(gallery.verify(identity, probe))
            except Exception as exc:
                found.append(exc)
        return found

    def _admit(
        self, topic: str, payload: bytes, *, correlation: bytes | None = None
    ) -> list[Outgoing] | _Job:
        """Decode a request; the reply when there is nothing to compute, else a job."""
        self.stats["requests"] += 1
        try:
            rt = parse_request_topic(topic)
        except ValidationError as exc:
            log.warning("dropped a message on %r: %s", topic[:200], exc)
            self.stats["errors"] += 1
            return []
        try:
            req = decode_request(rt, payload, max_size=self.max_message_bytes, now_ms=now_ms())
        except RemoteError as exc:
            header = error_header(exc)
            corr = header.id if header is not None else None
            kid = header.kid if header is not None else None
            log.info("refused a request from %s/%s: %s", rt.site, rt.gateway, exc)
            return [self._error_retry(exc, rt.site, rt.gateway, corr, kid, correlation)[0]]
        echo = correlation if correlation is not None else correlation_data(req.id)
        if isinstance(req, _MUTATING) and now_ms() - req.ts > WRITE_MAX_AGE_S * 1000:
            old = ExpiredError(
                f"{req.TYPE} {req.id} was sent {(now_ms() - req.ts) // 1000} s ago; writes "
                f"older than {WRITE_MAX_AGE_S:.0f} s are refused: send it as a new request"
            )
            return [self._error_retry(old, req.site, req.gw, req.id, req.kid, echo)[0]]
        key = dedup_key(req)
        now = time.monotonic()
        claim = self._cache.claim(key, now=now)
        if claim.state == "done":
            assert claim.reply is not None
            self.stats["duplicates"] += 1
            return [self._cached(req, claim.reply, echo)]
        if claim.state == "in_progress":
            self.stats["duplicates"] += 1
            return []  # the first copy is being served and will be answered
        try:
            stored = self._stored_reply(req) if isinstance(req, _MUTATING) else None
        except StorageCorruptError as exc:  # never run a write whose stored reply is damaged
            log.error("%s from %s/%s: %s", req.TYPE, req.site, req.gw, exc)
            self._cache.release(key)
            return [self._error_retry(exc, req.site, req.gw, req.id, req.kid, echo)[0]]
        if stored is not None:
            self.stats["duplicates"] += 1
            self._cache.put(key, _RESULT_TAG + stored, now=time.monotonic())
            return [
                Outgoing(topic=result_topic(req.site, req.gw), payload=stored, correlation=echo)
            ]
        try:
            # After dedup: a retried copy costs nothing.
            self.quotas.charge(req, scope=self._quota_scope(req))
        except RateLimitedError as exc:
            log.warning("%s", exc)
            self._cache.release(key)
            return [self._error_retry(exc, req.site, req.gw, req.id, req.kid, echo)[0]]
        return _Job(req=req, key=key, echo=echo)

    def _quota_scope(self, req: Request) -> str | None:
        """What a verify reveals, for its quota bucket: the gallery's ``quota_scope``."""
        if not isinstance(req, Verify) or not self.quotas.policy.verify_per_identity_per_hour:
            return None
        try:
            scope = getattr(self.keys.gallery(req.site, req.kid or ""), "quota_scope", None)
            return None if scope is None else str(scope(req.identity))
        except Exception:  # no such gallery: the request fails anyway; one shared bucket
            return UNKNOWN_SCOPE

    def _run(self, job: _Job, computed: bytes | Exception | None) -> list[Outgoing]:
        """Run a job (or finish one whose verify scores ``computed`` came from a batch)."""
        req, key, echo = job.req, job.key, job.echo
        try:
            if isinstance(computed, Exception):
                raise computed
            if isinstance(req, _MUTATING):
                reply = self._write(req)
            elif computed is not None:
                assert isinstance(req, Verify)
                gallery = self.keys.gallery(req.site, req.kid or "")
                result = result_for(req, ids_version=gallery.ids_version, scores=computed, count=1)
                reply = encode(result)
            else:
                reply = encode(self._execute(req))
        except AlreadyAnsweredError as exc:
            # Carried out before (a redelivery after a crash, a retry on another worker,
            # another worker at the same moment): its stored reply; nothing changed now.
            self.stats["duplicates"] += 1
            self._cache.put(key, _RESULT_TAG + exc.reply, now=time.monotonic())
            return [
                Outgoing(topic=result_topic(req.site, req.gw), payload=exc.reply, correlation=echo)
            ]
        except Exception as exc:
            if not isinstance(exc, CipherFaceError):
                log.exception("internal error on %s from %s/%s", req.TYPE, req.site, req.gw)
            else:
                log.info("%s from %s/%s failed: %s", req.TYPE, req.site, req.gw, exc)
            out, retry = self._error_retry(_as_remote(exc), req.site, req.gw, req.id, req.kid, echo)
            if not retry:
                # Final: a duplicate gets the same answer (docs/protocol.md section 10).
                self._cache.put(key, _ERROR_TAG + out.payload, now=time.monotonic())
            else:
                self._cache.release(key)  # transient: a later copy runs afresh
                if isinstance(req, _MUTATING):
                    out = dataclasses.replace(out, settle_first=True)
            return [out]
        self._cache.put(key, _RESULT_TAG + reply, now=time.monotonic())
        self.stats["results"] += 1
        return [Outgoing(topic=result_topic(req.site, req.gw), payload=reply, correlation=echo)]

    def _cached(self, req: Request, tagged: bytes, echo: bytes | None) -> Outgoing:
        payload = tagged[1:]
        if tagged[:1] == _ERROR_TAG:
            return Outgoing(
                topic=error_topic(req.site, req.gw), payload=payload, correlation=echo, kind="error"
            )
        return Outgoing(topic=result_topic(req.site, req.gw), payload=payload, correlation=echo)

    def _error_retry(
        self,
        exc: BaseException,
        site: str,
        gw: str,
        corr: str | None,
        kid: str | None,
        correlation: bytes | None,
    ) -> tuple[Outgoing, bool]:
        self.stats["errors"] += 1
        err = error_for(exc, site=site, gw=gw, corr=corr, kid=kid)
        out = Outgoing(
            topic=error_topic(site, gw), payload=encode(err), correlation=correlation, kind="error"
        )
        return out, err.retry

    def _execute(self, req: Request) -> Result:
        """Answer a request that is not a write (:meth:`_write` carries those out)."""
        if isinstance(req, KeyPublish):
            return self._key_publish(req)
        if isinstance(req, IdsGet):
            kid = req.kid or self.keys.current(req.site)
            if kid is None:
                raise KeyMismatchError(f"site {req.site!r} has no key yet")
            gallery = self.keys.gallery(req.site, kid)
            slots = gallery.ids()
            _check_slots(len(slots))
            offset, page = ids_page(slots, req.offset, req.limit)
            while True:
                result = result_for(
                    req,
                    ids_version=gallery.ids_version,
                    ids=page,
                    count=len(page),
                    offset=offset,
                    total=len(slots),
                )
                if len(page) <= 1 or _encoded_size(result) <= self.max_reply_bytes:
                    return result
                # Long names under a lowered reply limit: a shorter page still progresses.
                page = page[: len(page) // 2]
        if isinstance(req, GalleryExport):
            return export_page(self.keys, req, self.max_reply_bytes)
        assert req.kid is not None  # the codec requires kid on the other requests
        gallery = self.keys.gallery(req.site, req.kid)
        if isinstance(req, Verify):
            scores = gallery.verify(req.identity, req.probe)
            return result_for(req, ids_version=gallery.ids_version, scores=scores, count=1)
        if isinstance(req, Identify):
            return self._identify(req, gallery)
        raise ValidationError(f"unsupported request type {req.TYPE}")  # pragma: no cover

    def _identify(self, req: Identify, gallery: Gallery) -> Result:
        # One worker thread per agent and a single writer per gallery: the slot list,
        # the version and the scores below all describe the same gallery state.
        slots = gallery.ids()
        version = gallery.ids_version
        stale = req.ids_version != version
        if not slots:
            # Nothing enrolled yet: nobody to score (and no probe to decrypt).
            return result_for(req, ids_version=version, ids=[] if stale else None, count=0)
        _check_slots(len(slots))  # refuse before spending the compute
        pool = self.pool
        if pool is not None and isinstance(gallery, CkksGallery):
            # The probe's 128 SEAL re-randomisations in the workers, off this GIL; their
            # encryptions of zero are not refilled while the kernel runs here.
            with pool.holding():
                scores, count = gallery.identify(req.probe, rerandomise=pool.rerandomise)
        else:
            scores, count = gallery.identify(req.probe)
        if count != len(slots):
            raise RuntimeError(f"gallery returned {count} scores for {len(slots)} slots")
        if len(scores) > MAX_PAYLOAD_BYTES:
            raise PayloadTooLargeError(
                f"the scores of {count} slots take {len(scores)} bytes, more than a result "
                f"carries ({MAX_PAYLOAD_BYTES})"
            )
        # The slot list rides along only when the edge's copy is stale and the whole
        # list fits in one message; otherwise the edge pages it with ids.get.
        if stale and count <= MAX_IDS:
            with_ids = result_for(req, ids_version=version, scores=scores, count=count, ids=slots)
            if _encoded_size(with_ids) <= self.max_reply_bytes:
                return with_ids
        result = result_for(req, ids_version=version, scores=scores, count=count)
        if _encoded_size(result) > self.max_reply_bytes:
            raise PayloadTooLargeError(
                f"the identify result over {count} slots is larger than "
                f"{self.max_reply_bytes} bytes"
            )
        return result

    def _key_publish(self, req: KeyPublish) -> Result:
        assert req.kid is not None
        if req.scheme not in sites.SCHEMES:
            raise ValidationError(
                f"scheme: {req.scheme!r} is not one of {', '.join(sites.SCHEMES)}"
            )
        try:
            pub = sites.open_public(req.public_key)
        except (KeyMismatchError, KeyFileError, GalleryError, DecodeError, ValueError) as exc:
            # The bytes are not a loadable public key: key_file, as the spec says.
            raise KeyFileError(f"the published public key does not load: {exc}") from None
        if pub.key_id != req.kid or pub.scheme != req.scheme:
            raise KeyMismatchError(
                f"key.publish says {req.scheme}/{req.kid} but the key is {pub.scheme}/{pub.key_id}"
            )
        refuse_retired(self.data_dir, req.site, req.kid, store=self.keys.store)
        gallery = self.keys.register(req.site, req.kid, req.public_key)
        log.info("site %s: key %s (%s) registered", req.site, req.kid, req.scheme)
        return result_for(req, ids_version=gallery.ids_version)

    # ------------------------------------------------------------------ writes
    def _write(self, req: Request) -> bytes:
        """Carry out a write; its reply is stored with its change (exactly once).

        Returns:
            The reply bytes, as stored.

        Raises:
            AlreadyAnsweredError: the write was carried out before: its stored reply.
        """
        key = dedup_key(req)
        if isinstance(req, Delete):
            reply = self._delete(req)
        elif isinstance(req, Enroll):
            assert req.kid is not None  # the codec requires it
            reply = Reply(key, lambda n, v: encode(result_for(req, ids_version=v, enrolled=n)))
            self.keys.gallery(req.site, req.kid).enroll(req.ids, req.payload, reply=reply)
        else:
            assert isinstance(req, KeyRetire)
            reply = Reply(key, lambda n, v: encode(result_for(req, ids_version=v, deleted=n)))
            retire_key(self.keys, req, reply=reply)
        if reply.data is None:  # pragma: no cover - every gallery stores it
            raise RuntimeError(f"{req.TYPE}: the gallery did not store the reply")
        return reply.data

    def _answering_kid(self, req: Request) -> str | None:
        """The key whose gallery stores a write's reply (its ``ids_version`` is in it)."""
        if isinstance(req, KeyRetire):
            return req.successor
        if isinstance(req, Delete) and req.kid is None:
            return self.keys.current(req.site)
        return req.kid

    def _delete(self, req: Delete) -> Reply:
        """Delete in the request's gallery, or every gallery of the site; the current
        key's gallery commits last, with the reply (deleted in all, its ids_version)."""
        answering = self._answering_kid(req)
        kids = [req.kid] if req.kid is not None else self.keys.kids(req.site)
        if answering not in kids:
            answering = None
        earlier = 0
        for kid in kids:
            if kid != answering:
                earlier += self.keys.gallery(req.site, kid).delete(req.ids)
        reply = Reply(
            dedup_key(req),
            lambda n, v: encode(result_for(req, ids_version=v, deleted=min(earlier + n, MAX_IDS))),
        )
        if answering is None:
            self.keys.answer(req.site, None, reply)
        else:
            self.keys.gallery(req.site, answering).delete(req.ids, reply=reply)
        return reply

    # --------------------------------------------------------- stored replies
    def _stored_reply(self, req: Request) -> bytes | None:
        """The reply of a write carried out before (by any worker sharing the store, or
        this one before a restart), or None.

        Raises:
            StorageCorruptError: the stored reply, or the gallery holding it, is damaged.
        """
        try:
            return reply_file(self.data_dir, req.site, req.gw, req.id).read_bytes()
        except OSError:
            pass
        try:
            return self.keys.find_reply(req.site, self._answering_kid(req), dedup_key(req))
        except StorageCorruptError:
            raise  # a damaged reply (or gallery): answered as such, nothing runs
        except Exception as exc:
            # The gallery does not open or the store does not answer: running the request
            # reports it (and its commit finds a stored reply in any case).
            log.debug("no stored reply for %s from %s/%s: %s", req.TYPE, req.site, req.gw, exc)
            return None

    def _prune_replies(self) -> None:
        """Drop stored replies older than :data:`PERSISTED_REPLY_TTL_S` (store and files)."""
        try:
            self.keys.prune_replies(PERSISTED_REPLY_TTL_S)
        except Exception as exc:  # never stop serving for upkeep; next time
            log.warning("pruning stored replies failed: %s", exc)
        cutoff = time.time() - PERSISTED_REPLY_TTL_S
        for folder in self.data_dir.glob("*/replies"):
            for path in folder.iterdir():
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                except OSError:
                    continue


__all__ = ["DEFAULT_AGENT_ID", "CloudAgent", "Outgoing", "ids_page"]
