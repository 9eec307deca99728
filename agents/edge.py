"""The edge agent: encrypt on premises, ask the cloud, decrypt, decide, publish decisions.

:class:`EdgeClient` is a request/response client over MQTT. Each request is one
protocol message published with QoS 1 on ``cipherface/v1/<site>/req/<gateway>/<op>``;
its reply comes back on the gateway's ``res`` or ``err`` topic and is matched by the
envelope's ``corr`` (MQTT 5 also gets ResponseTopic, CorrelationData and
MessageExpiryInterval). A request that gets no answer in ``timeout`` seconds is
published again with the *same* id and bytes, so the cloud answers it from its
dedup cache instead of running it twice; after ``retries`` tries it raises
:class:`~cipherface.errors.RequestTimeoutError`. An ``error`` reply raises
:class:`~cipherface.errors.PeerReportedError` (its ``remote_code`` is the cloud's code).

Every result is checked before it is decrypted (``cipher.decrypt_scores`` refuses
anything but ``count`` scores for this key and operation), and only *decisions* ever
leave the edge (``cipherface/v1/<site>/events/<gateway>``): never a score or a
distance, because decrypted CKKS values can leak the secret key (IND-CPA-D).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as paho

from cipherface import __version__
from cipherface.agents.mqtt import (
    BrokerConfig,
    Connection,
    message_property,
    publish_properties,
    wait_published,
)
from cipherface.crypto import thresholds
from cipherface.crypto.engine import EdgeCipher, normalise_embeddings
from cipherface.crypto.guard import Guard
from cipherface.crypto.judge import identify_best, verify_decision
from cipherface.errors import (
    BrokerConnectionError,
    CipherFaceError,
    FaceError,
    InvalidArgumentError,
    LocalError,
    NoCloudError,
    PeerReportedError,
    PublishDeniedError,
    RemoteError,
    RequestTimeoutError,
    ResultForgedError,
    ResultRejectedError,
)
from cipherface.protocol import (
    CLOUD_STATUS_FILTER,
    MAX_IDS,
    Decision,
    Delete,
    Enroll,
    Error,
    Identify,
    IdsGet,
    KeyPublish,
    Matched,
    PendingRequests,
    Request,
    Result,
    Status,
    Verify,
    decode,
    edge_reply_filters,
    encode,
    events_topic,
    expiry_interval_s,
    is_hex_id,
    is_valid_identity,
    now_ms,
    request_topic,
    result_topic,
    status_topic,
    validate_id,
    validate_identity,
)

if TYPE_CHECKING:
    from cipherface.faces import Face

log = logging.getLogger(__name__)

PHOTO_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
#: Added to the total wait of a request (attempts x timeout) to make its envelope
#: ``exp``: a request the edge gave up on is not run later, yet a cloud clock a few
#: seconds ahead does not refuse fresh requests.
EXPIRY_GRACE_S: Final = 5.0
#: How many times :meth:`EdgeClient.ids` starts a listing over when the gallery changes
#: between two of its pages.
IDS_RESTARTS: Final = 3

FloatArray = npt.NDArray[np.float64]


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    reply: Result | Error | None = None


def decision_json(decision: Decision) -> dict[str, Any]:
    """A decision as a JSON-ready dict (what ``--json`` prints and the events carry)."""
    return {
        "op": decision.op,
        "identity": decision.identity,
        "match": decision.match,
        "latency_ms": round(decision.latency_ms, 3),
        "photo": decision.photo,
        "site": decision.site,
        "gateway": decision.gw,
        "id": decision.id,
        "ts": decision.ts,
    }


def _as_matrix(vectors: npt.ArrayLike, dim: int, what: str) -> FloatArray:
    """Unit rows of finite real numbers (huge entries scaled first: ``normalise_embeddings``).

    Raises:
        InvalidArgumentError: wrong shape, not real, NaN/inf, or a zero row.
    """
    try:
        return normalise_embeddings(vectors, dim)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{what}: {exc}") from None


class EdgeClient:
    """Edge side over MQTT: one site's key, one gateway.

    Use as a context manager (or :meth:`start` / :meth:`close`). Thread-safe: several
    threads may issue requests at once.

    Args:
        broker: broker settings.
        cipher: the site's edge cipher (:func:`cipherface.crypto.sites.load_edge_cipher`).
        site: site id.
        gateway: gateway id.
        timeout: seconds to wait for each attempt's reply.
        retries: extra attempts after a timeout (same message id: the cloud dedups).
        embedder: turns photos into embeddings (default: the key's face model, created
            on the first photo).
        client_id: MQTT client id (default ``<site>.<gateway>-<random>``; brokers with
            ``use_username_as_clientid`` use the username instead).
        publish_decisions: publish each decision on the events topic.
        announce: keep a retained online/offline status (with a last will): daemons.
        persistent: keep an MQTT persistent session (a stable ``client_id`` is then
            needed), so results published while reconnecting are queued: daemons.
        guard: the key's :class:`~cipherface.crypto.guard.Guard`
            (:func:`~cipherface.crypto.guard.load_guard`): names travel as opaque
            labels, every enrollment carries canaries, every result is checked against
            them before a decision, decisions are budgeted. None for a key directory
            made before trust secrets existed (unguarded: see docs/security.md).
        on_forged: called with the error when a result is refused as forged (alerts).

    Raises:
        InvalidArgumentError: a bad site or gateway id, or bad timeouts.
    """

    def __init__(
        self,
        *,
        broker: BrokerConfig,
        cipher: EdgeCipher,
        site: str,
        gateway: str,
        timeout: float = 15.0,
        retries: int = 2,
        embedder: Any | None = None,
        client_id: str | None = None,
        publish_decisions: bool = True,
        announce: bool = False,
        persistent: bool = False,
        guard: Guard | None = None,
        on_forged: Callable[[ResultForgedError], None] | None = None,
    ) -> None:
        self.site = validate_id(site, what="site")
        self.gateway = validate_id(gateway, what="gateway")
        if not timeout > 0 or retries < 0:
            raise InvalidArgumentError("timeout must be > 0 and retries >= 0")
        self.broker = broker
        self.cipher = cipher
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.model: str = cipher.model
        self.metric: str = cipher.metric
        self.publish_decisions = publish_decisions
        self.announce = announce
        self.persistent = persistent
        self.guard = guard
        self.on_forged = on_forged
        #: Results refused as forged by this client (the key's total is in trust.state).
        self.forged = 0
        self._embedder = embedder
        self._client_id = client_id or f"{self.site}.{self.gateway}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._pending = PendingRequests()
        #: Replies that answered nothing pending (duplicates, late ones), for monitoring.
        self.unmatched = 0
        #: Cloud agents' retained statuses seen on the broker: agent id -> state.
        self.clouds: dict[str, str] = {}
        #: Called after each request with (type, outcome, seconds): ``result``, the
        #: error code, ``timeout``, ``no_cloud`` or ``publish_denied`` (metrics, logs).
        self.on_request: Callable[[str, str, float], None] | None = None
        self._ids_cache: tuple[int, tuple[str | None, ...]] | None = None
        self._key_published = False
        self._subscribed = threading.Event()
        self._precomputing = threading.Event()
        self._conn: Connection | None = None
        self._unconfirmed: list[paho.MQTTMessageInfo] = []
        self._status_topic = status_topic(self.site, self.gateway)
        self._events_topic = events_topic(self.site, self.gateway)

    # ---------------------------------------------------------------- lifecycle
    def _status(self, state: Literal["online", "offline"]) -> bytes:
        return encode(
            Status(site=self.site, gw=self.gateway, state=state, role="edge", version=__version__)
        )

    def _on_connected(self, conn: Connection, session_present: bool) -> None:
        self._subscribed.clear()
        filters = [*edge_reply_filters(self.site, self.gateway), CLOUD_STATUS_FILTER]
        conn.subscribe([(t, 1) for t in filters])
        if self.announce:
            conn.publish(self._status_topic, self._status("online"), qos=1, retain=True)

    def _on_subscribe(self, *args: Any) -> None:
        self._subscribed.set()

    @property
    def in_flight(self) -> int:
        """Requests sent and still waiting for their reply (for metrics and health)."""
        return len(self._pending)

    def start(self) -> None:
        """Connect and subscribe to the gateway's result and error topics.

        Raises:
            BrokerConnectionError: the broker cannot be reached or refuses us.
        """
        if self._conn is not None:
            return
        conn = Connection(
            config=self.broker,
            client_id=self._client_id,
            persistent=self.persistent,
            will=(self._status_topic, self._status("offline")) if self.announce else None,
            on_message=self._on_message,
            on_connected=self._on_connected,
        )
        conn.client.on_subscribe = self._on_subscribe
        conn.start()
        self._prepare_randomness()
        # A reply published before our SUBACK would be lost: wait for it.
        if not self._subscribed.wait(self.broker.connect_timeout):
            conn.stop()
            raise BrokerConnectionError(f"no SUBACK from {self.broker.url}")
        self._conn = conn

    def close(self) -> None:
        """Wait (briefly) for queued decisions, then disconnect."""
        conn = self._conn
        if conn is None:
            return
        with self._lock:
            infos, self._unconfirmed = self._unconfirmed, []
        for info in infos:
            wait_published(info, 5.0)
        conn.stop(farewell=(self._status_topic, self._status("offline")) if self.announce else None)
        self._conn = None

    def __enter__(self) -> EdgeClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- transport
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        # Network thread: decoding a reply is bounded and fast; matching is a dict lookup.
        try:
            reply = decode(bytes(msg.payload))
        except RemoteError as exc:
            log.warning("undecodable message on %s: %s", msg.topic, exc)
            return
        if isinstance(reply, Status) and reply.site == "cloud":
            self.clouds[reply.gw] = reply.state  # retained: read before any request
            return
        if not isinstance(reply, Result | Error):
            log.warning("unexpected %s message on %s", reply.TYPE, msg.topic)
            return
        if isinstance(reply, Error) and reply.corr is None:
            # The cloud could not read the envelope (e.g. too large), but MQTT 5 echoed
            # our CorrelationData: enough to fail the request now instead of timing out.
            cd = message_property(msg, "CorrelationData")
            if isinstance(cd, bytes) and is_hex_id(cd.decode("ascii", "replace")):
                reply = replace(reply, corr=cd.decode("ascii"))
        with self._lock:
            found = self._pending.match(reply)
        if isinstance(found, Matched):
            waiter = found.pending.context
            waiter.reply = reply
            waiter.event.set()
        else:
            self.unmatched += 1
            log.info("reply %s matched no pending request (%s)", reply.corr, found.reason)

    @property
    def connection(self) -> Connection | None:
        """The broker connection while started (to publish health), else None."""
        return self._conn

    def _connection(self) -> Connection:
        if self._conn is None:
            raise LocalError("the edge client is not started (use it as a context manager)")
        return self._conn

    def request(self, msg: Request, *, timeout: float | None = None) -> Result:
        """Send one request and wait for its result.

        Args:
            msg: the request (its ``exp`` should cover every attempt).
            timeout: seconds per attempt (default: the client's).

        Returns:
            The :class:`~cipherface.protocol.Result`.

        Raises:
            PeerReportedError: the cloud answered with an error.
            RequestTimeoutError: no answer after every attempt.
            LocalError: the client is not started.
        """
        t0 = time.perf_counter()
        outcome = "error"
        try:
            reply = self._request(msg, timeout)
            outcome = "result" if isinstance(reply, Result) else reply.code
        except CipherFaceError as exc:
            outcome = exc.code
            raise
        finally:
            if self.on_request is not None:
                self.on_request(msg.TYPE, outcome, time.perf_counter() - t0)
        if isinstance(reply, Error):
            raise PeerReportedError(reply.code, reply.message, retry=reply.retry)
        return reply

    def _online_clouds(self) -> list[str]:
        return sorted(a for a, state in list(self.clouds.items()) if state == "online")

    def _request(self, msg: Request, timeout: float | None) -> Result | Error:
        conn = self._connection()
        per_try = self.timeout if timeout is None else timeout
        data = encode(msg)
        topic = request_topic(msg.site, msg.gw, msg.TYPE)
        waiter = _Waiter()
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            with self._lock:
                self._pending.register(
                    msg, deadline=time.monotonic() + per_try, attempt=attempt, context=waiter
                )
            try:
                props = publish_properties(
                    response_topic=result_topic(msg.site, msg.gw),
                    correlation=msg.id.encode("ascii"),
                    expiry_s=expiry_interval_s(msg.exp, now_ms()),
                )
                info = conn.publish(topic, data, qos=1, properties=props)
                # Big payloads take a while to send: the reply clock starts at the PUBACK.
                if wait_published(info, per_try):
                    denied = conn.refused(info)
                    if denied is not None:  # MQTT 5 PUBACK reason: waiting cannot help
                        raise PublishDeniedError(
                            f"the broker refused the {msg.TYPE} request on {topic}: {denied} "
                            f"(does account {self.broker.username or 'anonymous'}'s ACL "
                            "allow it?)"
                        )
                    t0 = time.monotonic()
                    # The retained cloud statuses arrived with our SUBACK: say at once
                    # that nobody is there, rather than after a silent attempt.
                    if (
                        attempt == 1
                        and not waiter.event.wait(min(0.5, per_try))
                        and not self._online_clouds()
                    ):
                        log.warning(
                            "%s: no cloud agent is online on %s (%s); waiting up to %g s for one",
                            msg.TYPE,
                            self.broker.url,
                            _cloud_states(self.clouds),
                            per_try * attempts,
                        )
                    waiter.event.wait(max(0.0, per_try - (time.monotonic() - t0)))
                else:
                    waiter.event.wait(max(0.0, per_try / 2))
            finally:
                with self._lock:
                    self._pending.cancel(msg.id)
            if waiter.event.is_set():
                break
            if not self._online_clouds():
                log.warning(
                    "%s: no reply, and no cloud agent is online on %s (%s); attempt %d/%d%s",
                    msg.TYPE,
                    self.broker.url,
                    _cloud_states(self.clouds),
                    attempt,
                    attempts,
                    f", trying again for {per_try:g} s" if attempt < attempts else "",
                )
            else:
                log.info("%s %s: no reply (attempt %d/%d)", msg.TYPE, msg.id, attempt, attempts)
        reply = waiter.reply
        if reply is None:
            if not self._online_clouds():
                raise NoCloudError(
                    f"no reply to {msg.TYPE}: no cloud agent is online on {self.broker.url} "
                    f"({_cloud_states(self.clouds)}); the request stays queued at the broker "
                    "until it expires, for a cloud agent that starts in time"
                )
            v311 = (
                " (on MQTT 3.1.1 a publish the broker's ACL denies is dropped silently: "
                "check the account's ACL)"
                if self.broker.mqtt_version != "5"
                else ""
            )
            raise RequestTimeoutError(
                f"no reply to {msg.TYPE} {msg.id} after {attempts} attempt(s) of {per_try:g} s, "
                f"though cloud agent(s) {', '.join(self._online_clouds())} are online{v311}"
            )
        return reply

    def _ask(self, make: Callable[[], Request]) -> Result:
        """Send ``make()``; after a ``key_mismatch`` (the cloud lost or never got our
        key) publish the key and send a new request once (docs/protocol.md section 10)."""
        try:
            return self.request(make())
        except PeerReportedError as exc:
            if exc.remote_code != "key_mismatch":
                raise
            log.info("cloud does not know key %s: publishing it again", self.cipher.key_id)
        self.publish_key()
        return self.request(make())

    def _expiry(self, timeout: float | None = None) -> int:
        per_try = self.timeout if timeout is None else timeout
        return now_ms() + int(1000 * (per_try * (self.retries + 1) + EXPIRY_GRACE_S))

    def _header(self, *, kid: str | Literal[False] | None = False) -> dict[str, Any]:
        return {
            "site": self.site,
            "gw": self.gateway,
            "kid": self.cipher.key_id if kid is False else kid,
            "exp": self._expiry(),
        }

    # -------------------------------------------------------------- operations
    def publish_key(self) -> Result:
        """Register the site's public key with the cloud (idempotent).

        Raises:
            PeerReportedError / RequestTimeoutError: see :meth:`request`.
        """
        result = self.request(
            KeyPublish(
                **self._header(),
                scheme=self.cipher.scheme,
                public_key=self.cipher.public_key_bytes(),
            )
        )
        self._key_published = True
        return result

    def ensure_key(self) -> None:
        """Publish the key once per client (every enrollment path calls this)."""
        if not self._key_published:
            self.publish_key()

    @property
    def embedder(self) -> Any:
        """The face embedder (created on first use, for the key's face model)."""
        if self._embedder is None:
            from cipherface.faces import Embedder

            self._embedder = Embedder(model_name=self.model)
        return self._embedder

    def embed(self, photo: Any, *, label: str | None = None) -> FloatArray:
        """The L2-normalised embedding of the one face in ``photo``.

        Raises:
            FaceError: no face, several faces, unreadable image.
            MissingWeightsError: the face model's weights are not installed.
        """
        vec = self.embedder.represent(photo, name=label)
        return _as_matrix(vec, self.cipher.dim, "embedding")[0]

    def embed_face(self, photo: Any, *, label: str | None = None) -> Face:
        """The one face in ``photo``: the :meth:`embed` vector and the face's box.

        The box is ``(x, y, width, height)`` in pixels of ``photo`` as given; it is None
        only for a custom embedder without ``represent_face`` (vector only).

        Raises:
            FaceError: no face, several faces, unreadable image.
            MissingWeightsError: the face model's weights are not installed.
        """
        from cipherface.faces import Face

        represent_face = getattr(self.embedder, "represent_face", None)
        if represent_face is None:
            return Face(vector=self.embed(photo, label=label), box=None)
        face = represent_face(photo, name=label)
        vec = _as_matrix(face.vector, self.cipher.dim, "embedding")[0]
        return Face(vector=vec, box=face.box, confidence=face.confidence)

    def _probe_vector(
        self, photo: Any, vector: npt.ArrayLike | None, label: str | None
    ) -> FloatArray:
        if (photo is None) == (vector is None):
            raise InvalidArgumentError("give exactly one of a photo or a vector")
        if vector is not None:
            return _as_matrix(vector, self.cipher.dim, "probe vector")[0]
        return self.embed(photo, label=label)

    def enroll(
        self,
        identity: str,
        photos: Iterable[Any] = (),
        *,
        embeddings: npt.ArrayLike | None = None,
    ) -> Result:
        """Enroll (or replace) one identity from photos or embeddings.

        Several photos or embeddings are averaged into one template (the mean of the
        unit vectors, renormalised), which is steadier than any single photo.

        Args:
            identity: the name.
            photos: photo files (or bytes/arrays) of this person.
            embeddings: instead of photos, one ``(dim,)`` or several ``(k, dim)`` vectors.

        Returns:
            The cloud's result (``enrolled`` = 1).

        Raises:
            InvalidArgumentError: no photo and no embedding, or both.
            FaceError: a photo without exactly one face.
            PeerReportedError / RequestTimeoutError: see :meth:`request`.
        """
        validate_identity(identity)
        photos = list(photos)
        if bool(photos) == (embeddings is not None):
            raise InvalidArgumentError("give photos or embeddings (exactly one of them)")
        if embeddings is not None:
            vecs = _as_matrix(embeddings, self.cipher.dim, "embeddings")
        else:
            vecs = np.stack([self.embed(p) for p in photos])
        template = vecs.mean(axis=0)
        self.ensure_key()
        labels, payload = self._enroll_payload([identity], template[None, :])
        self._prepare_randomness()
        result = self._ask(lambda: Enroll(**self._header(), ids=labels, payload=payload))
        return replace(result, enrolled=1) if result.enrolled == len(labels) else result

    def _enroll_payload(
        self, names: Sequence[str], vectors: FloatArray
    ) -> tuple[tuple[str, ...], bytes]:
        """The labels the cloud sees and the payload (canaries mixed in when guarded)."""
        if self.guard is None:
            return tuple(names), self.cipher.encrypt_templates(vectors)
        labels, rows = self.guard.with_canaries(names, vectors)
        return tuple(labels), self.cipher.encrypt_templates(rows)

    def _label(self, name: str) -> str:
        return name if self.guard is None else self.guard.seal(name)

    def _prepare_randomness(self) -> None:
        """Paillier family: precompute encryptions of zero in idle time (a daemon thread),
        so that the next enrollment costs one multiplication per ciphertext instead of a
        full exponentiation (≈1.5 ms instead of ≈80 ms for a 128-d template at 2048 bits).
        CKKS needs nothing: its encryption is already a few milliseconds."""
        precompute = getattr(self.cipher, "precompute", None)
        if precompute is None or self._precomputing.is_set():
            return
        self._precomputing.set()

        def work() -> None:
            try:
                want = 2 * self.cipher.dim  # enough for two single enrollments
                have = precompute(0)  # 0 = just report the pool size
                if have < want:
                    precompute(want - have)
            finally:
                self._precomputing.clear()

        threading.Thread(target=work, name="edge-precompute", daemon=True).start()

    def embed_folder(
        self, folder: str | os.PathLike[str], *, progress: bool = True
    ) -> tuple[list[str], FloatArray, dict[str, str]]:
        """Embed a folder of enrollment photos, one template per identity.

        Layout: ``DIR/<identity>/*.jpg`` (a person's photos are averaged) and/or loose
        ``DIR/<identity>.jpg`` files. Photos without exactly one face are skipped and
        reported, so one bad photo never stops a bulk enrollment.

        Returns:
            ``(ids, vectors, failures)``: enrolled-to-be identities, their ``(n, dim)``
            templates, and ``{photo path: error message}`` for the photos skipped.

        Raises:
            InvalidArgumentError: not a folder, or no photo in it.
        """
        root = Path(folder)
        if not root.is_dir():
            raise InvalidArgumentError(f"{root} is not a folder of photos")
        people: dict[str, list[Path]] = {}
        for entry in sorted(root.iterdir()):
            if entry.is_dir():
                photos = sorted(p for p in entry.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
                if photos:
                    people.setdefault(entry.name, []).extend(photos)
            elif entry.suffix.lower() in PHOTO_SUFFIXES:
                people.setdefault(entry.stem, []).append(entry)
        if not people:
            raise InvalidArgumentError(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {root}")
        ids, matrix, skipped = self.embed_people(people, progress=progress)
        failures = {
            str(photo) if photo is not None else str(people[who][0].parent / who): why
            for (who, photo), why in skipped.items()
        }
        return ids, matrix, failures

    def embed_people(
        self, people: Mapping[str, Sequence[Path]], *, progress: bool = True
    ) -> tuple[list[str], FloatArray, dict[tuple[str, Path | None], str]]:
        """Embed each person's photos into one template (their L2-normalised mean).

        Photos without exactly one face, and names that are not valid identities, are
        skipped and reported, never fatal.

        Returns:
            ``(ids, vectors, skipped)``: identities, their ``(n, dim)`` templates, and
            ``{(identity, photo or None for the name itself): error message}``.
        """
        from tqdm import tqdm

        ids: list[str] = []
        rows: list[FloatArray] = []
        skipped: dict[tuple[str, Path | None], str] = {}
        total = sum(len(v) for v in people.values())
        with tqdm(total=total, unit="photo", desc="embed", disable=not progress) as bar:
            for identity, photos in people.items():
                vecs = []
                for photo in photos:
                    try:
                        vecs.append(self.embed(photo, label=photo.name))
                    except FaceError as exc:
                        skipped[identity, photo] = str(exc)
                    bar.update(1)
                if vecs and is_valid_identity(identity):
                    ids.append(identity)
                    mean = np.mean(vecs, axis=0)
                    rows.append(mean / np.linalg.norm(mean))
                elif vecs:
                    skipped[identity, None] = "not a valid identity name"
        matrix = np.stack(rows) if rows else np.zeros((0, self.cipher.dim))
        return ids, matrix, skipped

    def enroll_bulk(
        self,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        *,
        progress: bool = True,
        chunk: int | None = None,
        on_chunk: Callable[[Sequence[str], int], None] | None = None,
    ) -> int:
        """Enroll many identities from embeddings, a payload per chunk, with a progress bar.

        The next chunk is encrypted while the cloud stores the previous one.

        Args:
            ids: unique names, one per row of ``vectors``.
            vectors: ``(n, dim)`` embeddings.
            progress: show a tqdm progress bar (on stderr).
            chunk: templates per payload (default and maximum:
                ``cipher.max_templates_per_payload``).
            on_chunk: called with each chunk's ids and stored count once the cloud
                confirmed it (so an interrupted caller can say what was committed).

        Returns:
            The number of templates the cloud stored.

        Raises:
            InvalidArgumentError: shapes differ, ids repeat or are invalid.
            PeerReportedError / RequestTimeoutError: see :meth:`request`.
        """
        from tqdm import tqdm

        names = [validate_identity(i) for i in ids]
        if len(set(names)) != len(names):
            raise InvalidArgumentError("ids must be unique")
        vecs = _as_matrix(vectors, self.cipher.dim, "embeddings")
        if vecs.shape[0] != len(names):
            raise InvalidArgumentError(f"{len(names)} ids for {vecs.shape[0]} embeddings")
        limit = self.cipher.max_templates_per_payload
        if self.guard is not None:
            limit = self.guard.payload_names(limit)
        size = min(limit, chunk or limit)
        if size < 1:
            raise InvalidArgumentError("chunk must be >= 1")
        self.ensure_key()
        spans = [(s, min(len(names), s + size)) for s in range(0, len(names), size)]
        stored = 0
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="encrypt") as pool,
            tqdm(total=len(names), unit="face", desc="enroll", disable=not progress) as bar,
        ):
            nxt: Future[tuple[tuple[str, ...], bytes]] | None = None
            if spans:
                lo, hi = spans[0]
                nxt = pool.submit(self._enroll_payload, names[lo:hi], vecs[lo:hi])
            for i, (lo, hi) in enumerate(spans):
                assert nxt is not None
                chunk_ids, payload = nxt.result()
                if i + 1 < len(spans):
                    a, b = spans[i + 1]
                    nxt = pool.submit(self._enroll_payload, names[a:b], vecs[a:b])
                result = self._ask(
                    lambda: Enroll(**self._header(), ids=chunk_ids, payload=payload)  # noqa: B023
                )
                done = result.enrolled or 0
                real = hi - lo if done == len(chunk_ids) else done  # canaries not counted
                stored += real
                if on_chunk is not None:
                    on_chunk(names[lo:hi], real)
                bar.update(hi - lo)
        return stored

    def delete(self, ids: str | Sequence[str], *, all_keys: bool = False) -> int:
        """Erase identities from the site's gallery.

        Args:
            ids: one name or several.
            all_keys: erase them from the galleries of every key of the site (not
                just this key's).

        Returns:
            How many were enrolled (and are now erased).

        Raises:
            PeerReportedError / RequestTimeoutError: see :meth:`request`.
        """
        names = tuple(self._label(i) for i in ((ids,) if isinstance(ids, str) else ids))
        kid: str | None = None if all_keys else self.cipher.key_id
        result = self._ask(lambda: Delete(**self._header(kid=kid), ids=names))
        return result.deleted or 0

    def ids(self, *, page_size: int = MAX_IDS) -> list[str | None]:
        """The gallery's slot -> identity list (None for free slots); refreshes the cache.

        The list is fetched in pages of ``page_size`` (``ids.get``). Every page must come
        from the same gallery version: if the gallery changes while paging, the listing
        starts over (at most :data:`IDS_RESTARTS` times).

        Args:
            page_size: ids per page, 1..100000.

        Returns:
            One entry per slot, in score order.

        Raises:
            InvalidArgumentError: a bad page size.
            ResultRejectedError: inconsistent pages, or the gallery kept changing.
            PeerReportedError / RequestTimeoutError: see :meth:`request`.
        """
        if not 1 <= page_size <= MAX_IDS:
            raise InvalidArgumentError(f"page_size must be in 1..{MAX_IDS}")
        for _ in range(IDS_RESTARTS + 1):
            listed = self._list_ids(page_size)
            if listed is not None:
                version, slots = listed
                with self._lock:
                    self._ids_cache = (version, slots)
                return self._names(slots)
            log.info("the gallery changed while its id list was paged: starting over")
        raise ResultRejectedError(
            f"the gallery changed during {IDS_RESTARTS + 1} listings of its ids; try again"
        )

    def _names(self, labels: Sequence[str | None]) -> list[str | None]:
        """User names of a listing: labels opened, canaries shown as free slots."""
        if self.guard is None:
            return list(labels)
        try:
            opened = self.guard.open_slots(labels)
        except ResultForgedError as exc:
            self._forged(exc)
            raise
        return [x if isinstance(x, str) else None for x in opened]

    def _pack_of(
        self, label: str, version: int
    ) -> tuple[tuple[str | None, ...] | None, int | None]:
        """The labels of ``label``'s pack and its place there (guarded CKKS verify), from
        the id list of gallery ``version`` (fetched when the cache is older)."""
        per_pack = getattr(self.cipher, "per_pack", None)
        if self.guard is None or per_pack is None:
            return None, None
        with self._lock:
            cache = self._ids_cache
        if cache is None or cache[0] != version:
            self.ids()
            with self._lock:
                cache = self._ids_cache
        if cache is None or cache[0] != version:
            raise ResultRejectedError("the gallery changed under verify; try again")
        try:
            slot = cache[1].index(label)
        except ValueError:
            exc = self.guard.forged("verify answered for an identity the id list lacks")
            self._forged(exc)
            raise exc from None
        start = slot - slot % per_pack
        pack = cache[1][start : start + per_pack]
        return pack + (None,) * (per_pack - len(pack)), slot - start

    def _forged(self, exc: ResultForgedError) -> None:
        self.forged += 1
        if self.on_forged is not None:
            try:
                self.on_forged(exc)
            except Exception:  # an alert hook must not change the outcome
                log.exception("on_forged hook failed")

    def _list_ids(self, page_size: int) -> tuple[int, tuple[str | None, ...]] | None:
        """All pages of one gallery version, or None when the version moved meanwhile."""
        slots: list[str | None] = []
        version: int | None = None
        total: int | None = None
        while True:
            offset = len(slots)
            res = self._ask(lambda: IdsGet(**self._header(), offset=offset, limit=page_size))  # noqa: B023
            if version is None:
                version, total = res.ids_version, res.total
            elif res.ids_version != version:
                return None
            page = res.ids if res.ids is not None else ()
            if res.total != total or res.offset != offset or len(page) > page_size:
                # Same version, different list: the cloud is inconsistent, not us.
                raise ResultRejectedError(
                    f"ids.get page at {offset} of version {version} does not fit the listing "
                    f"(offset {res.offset}, {len(page)} ids, total {res.total} vs {total})"
                )
            slots.extend(page)
            assert total is not None  # a validated ids.get result always has it
            if len(slots) >= total:  # the codec rules out empty pages before the end
                return version, tuple(slots)

    def _decide(
        self,
        op: Literal["verify", "identify"],
        identity: str | None,
        match: bool,
        t0: float,
        label: str | None,
    ) -> Decision:
        decision = Decision(
            site=self.site,
            gw=self.gateway,
            op=op,
            identity=identity,
            match=match,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            photo=label,
        )
        if self.publish_decisions and self._conn is not None:
            info = self._conn.publish(self._events_topic, encode(decision), qos=1)
            with self._lock:
                self._unconfirmed = [i for i in self._unconfirmed if not i.is_published()]
                self._unconfirmed.append(info)
        return decision

    def verify(
        self,
        identity: str,
        photo: Any = None,
        *,
        vector: npt.ArrayLike | None = None,
        label: str | None = None,
    ) -> Decision:
        """1:1: is the person in ``photo`` (or ``vector``) ``identity``?

        Args:
            identity: the claimed identity.
            photo: a photo (path, bytes or array), or None with ``vector``.
            vector: an embedding instead of a photo.
            label: how to name the probe in the decision (default: the file name).

        Returns:
            The :class:`~cipherface.protocol.Decision` (also published as an event).

        Raises:
            PeerReportedError: e.g. ``unknown_identity``.
            ResultRejectedError: the cloud's result fails the checks.
            FaceError / RequestTimeoutError: see :meth:`embed`, :meth:`request`.
        """
        t0 = time.perf_counter()
        validate_identity(identity)
        if self.guard is not None:
            self.guard.admit()
        label = label or _label(photo)
        vec = self._probe_vector(photo, vector, label)
        if self.guard is not None:
            vec = self.guard.jitter(vec)
        probe = self.cipher.encrypt_probe(vec, op="verify")
        sealed = self._label(identity)
        result = self._ask(lambda: Verify(**self._header(), identity=sealed, probe=probe))
        if result.scores is None or result.count != 1:
            raise ResultRejectedError(f"a verify result must carry 1 score, got {result.count}")
        pack, target = self._pack_of(sealed, result.ids_version)
        try:
            match = verify_decision(
                self.cipher,
                self.guard,
                scores_blob=result.scores,
                probe=vec,
                pack=pack,
                target=target,
            )
        except ResultForgedError as exc:
            self._forged(exc)
            raise
        if self.guard is not None:
            self.guard.decided()
        return self._decide("verify", identity, match, t0, label)

    def identify(
        self,
        photo: Any = None,
        *,
        vector: npt.ArrayLike | None = None,
        label: str | None = None,
    ) -> Decision:
        """1:N: who, among the enrolled, is the person in ``photo`` (or ``vector``)?

        The decision names the best-scoring identity when it is within the model's
        threshold, and nobody otherwise.

        Args:
            photo: a photo (path, bytes or array), or None with ``vector``.
            vector: an embedding instead of a photo.
            label: how to name the probe in the decision (default: the file name).

        Returns:
            The :class:`~cipherface.protocol.Decision` (also published as an event).

        Raises:
            ResultRejectedError: the cloud's result fails the checks.
            FaceError / PeerReportedError / RequestTimeoutError: see :meth:`verify`.
        """
        t0 = time.perf_counter()
        label = label or _label(photo)
        vec = self._probe_vector(photo, vector, label)
        best, similarity = self.best_match(vec)
        match = similarity is not None and thresholds.is_match(similarity, self.model, self.metric)
        return self._decide("identify", best if match else None, match, t0, label)

    def best_match(
        self,
        vector: npt.ArrayLike,
        *,
        probe: bytes | None = None,
        decide: bool = True,
        slots_out: list[Sequence[str | None]] | None = None,
    ) -> tuple[str | None, float | None]:
        """The gallery's best-scoring identity for an embedding, and its similarity.

        The similarity is a decrypted score: it is for this process only (camera
        gateways apply their own thresholds to it) and must never be published. With a
        guard, the result's canaries are checked first and the call counts as a decision
        against the key's budget.

        Args:
            vector: the probe embedding.
            probe: its identify encryption, made once for several galleries (shards);
                ``vector`` must then be exactly what was encrypted (the canaries are
                checked against it), and no jitter is added.
            decide: with a guard, check the halt and the budget first and count the call
                as one decision; False leaves both to a caller that gathers several
                galleries into one decision (:class:`~cipherface.agents.shards.ShardedEdge`).
            slots_out: gets the labels of the slots that were scored, once checked (a
                caller gathering several galleries compares them).

        Returns:
            ``(identity, similarity)``, or ``(None, None)`` for an empty gallery.

        Raises:
            ResultForgedError: the result's canaries are off (see docs/security.md).
            GatewayHaltedError / DecisionBudgetError: the guard refuses to decide.
            ResultRejectedError / PeerReportedError / RequestTimeoutError: see :meth:`identify`.
        """
        if self.guard is not None and decide:
            self.guard.admit()
        vec = _as_matrix(vector, self.cipher.dim, "probe vector")[0]
        if probe is None:
            if self.guard is not None:
                vec = self.guard.jitter(vec)  # a replayed or pre-aimed result misses its canaries
            probe = self.cipher.encrypt_probe(vec, op="identify")
        for _ in range(2):
            with self._lock:
                cache = self._ids_cache
            version = cache[0] if cache is not None else None
            result = self._ask(
                lambda: Identify(**self._header(), probe=probe, ids_version=version)  # noqa: B023
            )
            slots = self._result_slots(result)
            if slots is not None:
                break
        else:
            raise ResultRejectedError("the gallery keeps changing under identify; try again")
        try:
            best = identify_best(
                self.cipher,
                self.guard,
                labels=slots if result.count else (),
                scores_blob=result.scores,
                probe=vec,
            )
        except ResultForgedError as exc:
            self._forged(exc)
            raise
        if result.ids is not None:  # checked: now the list this version's results use
            with self._lock:
                self._ids_cache = (result.ids_version, result.ids)
        if self.guard is not None and decide:
            self.guard.decided()
        if slots_out is not None:
            slots_out.append(slots if result.count else ())
        return best

    def _result_slots(self, result: Result) -> tuple[str | None, ...] | None:
        """The slot list the scores of ``result`` refer to, or None if it cannot be known.

        A list that came with the result is cached only once the result checked out
        (:meth:`best_match`): a malformed result must not leave its list behind for
        the next, honest results of that version to be refused against.
        """
        if result.ids is not None:
            return result.ids
        listed = 0
        for attempt in range(2):
            with self._lock:
                cache = self._ids_cache
            if attempt or cache is None or cache[0] != result.ids_version:
                self.ids()  # a large gallery's list comes apart (or our copy is off): page it
                with self._lock:
                    cache = self._ids_cache
            if cache is None or cache[0] != result.ids_version:
                return None
            if len(cache[1]) == result.count:
                return cache[1]
            listed = len(cache[1])
        raise ResultRejectedError(
            f"identify result has {result.count} scores for {listed} listed slots"
        )


def _cloud_states(clouds: dict[str, str]) -> str:
    if not clouds:
        return "none has announced itself"
    shown = sorted(clouds.items())[:5]
    more = f", +{len(clouds) - 5} more" if len(clouds) > 5 else ""
    return ", ".join(f"{a} {s}" for a, s in shown) + more


def _label(photo: Any) -> str | None:
    if isinstance(photo, str | os.PathLike):
        return Path(photo).name
    return None


__all__ = [
    "IDS_RESTARTS",
    "PHOTO_SUFFIXES",
    "EdgeClient",
    "decision_json",
]
