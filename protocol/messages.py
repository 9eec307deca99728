"""Protocol messages: one frozen dataclass per message type, validated on construction.

Every message shares the envelope header (:class:`Envelope`: ``id``, ``corr``,
``site``, ``gw``, ``kid``, ``ts``, ``exp``); the schema version and the type
string are class constants (:data:`SCHEMA_VERSION`, ``TYPE``). A message object
that exists is valid: ``__post_init__`` checks every field, so neither a local
caller nor the decoder can produce an invalid one. Ciphertexts are opaque
``bytes`` here (their formats belong to docs/crypto.md).

Constructing an invalid message raises :class:`~cipherface.errors.InvalidArgumentError`;
the codec turns the same failures into the remote errors (malformed / invalid_field /
too_large) when the bytes came from a peer.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, Literal, cast

from cipherface.errors import CipherFaceError, InvalidArgumentError
from cipherface.protocol.topics import OP_FOR_TYPE, RESERVED_SITES, is_valid_id

SCHEMA_VERSION: Final = 1
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
MAX_PAYLOAD_BYTES: Final = 60 * 1024 * 1024
#: Longest id list in any message: enroll/delete requests, one page of ``ids.get``.
MAX_IDS: Final = 100_000
#: Most score slots one result may announce (``Result.count`` with ``scores``), and
#: the largest gallery (``Result.total``) an id list may be paged from.
MAX_SLOTS: Final = 1 << 24
#: Most packs one ``gallery.export`` page may ask for (a CKKS pack is ~70 KB: the cloud
#: sends fewer when the page would exceed its reply size).
MAX_EXPORT_PACKS: Final = 1024
MAX_IDENTITY_CHARS: Final = 128
MAX_TEXT_CHARS: Final = 1024
MAX_VERSION_CHARS: Final = 64
MAX_INT: Final = 2**63 - 1
MAX_LATENCY_MS: Final = 1e9
HEX_ID_PATTERN: Final = r"^[0-9a-f]{32}$"
CODE_PATTERN: Final = r"^[a-z][a-z0-9_.-]{0,63}$"

_HEX_ID_RE: Final = re.compile(HEX_ID_PATTERN)
_CODE_RE: Final = re.compile(CODE_PATTERN)

#: Error codes after which the same operation may succeed if tried again later.
RETRYABLE_CODES: Final = frozenset(
    {
        "error",
        "expired",
        "timeout",
        "broker_unreachable",
        "storage_error",
        "storage_full",
        "storage_busy",
    }
)

HEADER_FIELDS: Final = ("id", "corr", "site", "gw", "kid", "ts", "exp")


# ------------------------------------------------------------------ field errors
class _FieldError(InvalidArgumentError):
    """A field fails its check; ``kind`` tells the codec which remote error it is."""

    kind: ClassVar[Literal["type", "value", "size"]] = "value"


class _FieldTypeError(_FieldError):
    kind = "type"


class _FieldSizeError(_FieldError):
    kind = "size"


# ----------------------------------------------------------------------- helpers
def new_message_id() -> str:
    """Return a fresh message id: 32 lowercase hex chars from the CSPRNG."""
    return secrets.token_hex(16)


def now_ms() -> int:
    """Return the wall clock in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def is_hex_id(value: object) -> bool:
    """Tell whether ``value`` is a message or key id (32 lowercase hex chars)."""
    return isinstance(value, str) and _HEX_ID_RE.fullmatch(value) is not None


def is_valid_identity(value: object) -> bool:
    """Tell whether ``value`` is a valid identity name.

    An identity is 1..128 printable characters (any script, spaces inside but
    not at either end). Identities never become topic levels, so ``/`` is allowed.
    """
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_IDENTITY_CHARS
        and value.isprintable()
        and value == value.strip()
    )


def validate_identity(value: object) -> str:
    """Check an identity name (see :func:`is_valid_identity`).

    Args:
        value: the candidate name.

    Returns:
        ``value``, unchanged.

    Raises:
        InvalidArgumentError: not a valid identity name.
    """
    if not is_valid_identity(value):
        raise InvalidArgumentError(
            f"bad identity {value!r:.160}: 1..{MAX_IDENTITY_CHARS} printable chars, "
            "no leading/trailing space"
        )
    assert isinstance(value, str)
    return value


def _need(name: str, value: object, typ: type | tuple[type, ...], what: str) -> None:
    # bool is an int subclass: never let True pass for a count.
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise _FieldTypeError(f"{name}: expected {what}, got {type(value).__name__}")


def _int(name: str, value: object, *, lo: int = 0, hi: int = MAX_INT) -> int:
    _need(name, value, int, "int")
    assert isinstance(value, int)
    if not lo <= value <= hi:
        raise _FieldError(f"{name}: {value} outside [{lo}, {hi}]")
    return value


def _hex_id(name: str, value: object) -> str:
    _need(name, value, str, "str")
    if not is_hex_id(value):
        raise _FieldError(f"{name}: {value!r:.80} is not 32 lowercase hex chars")
    assert isinstance(value, str)
    return value


def _topic_id(name: str, value: object) -> str:
    _need(name, value, str, "str")
    if not is_valid_id(value):
        raise _FieldError(f"{name}: {value!r:.80} must match ^[a-z0-9][a-z0-9_-]{{0,62}}$")
    assert isinstance(value, str)
    return value


def _identity(name: str, value: object) -> str:
    _need(name, value, str, "str")
    if not is_valid_identity(value):
        raise _FieldError(
            f"{name}: {value!r:.160} is not 1..{MAX_IDENTITY_CHARS} printable chars "
            "without leading/trailing space"
        )
    assert isinstance(value, str)
    return value


def _identities(
    name: str, value: object, *, unique: bool, allow_none: bool = False
) -> tuple[str | None, ...]:
    # Lists are accepted for convenience and stored as tuples (hashable, immutable).
    if isinstance(value, list):
        value = tuple(value)
    _need(name, value, tuple, "list of str")
    assert isinstance(value, tuple)
    if len(value) > MAX_IDS:
        raise _FieldSizeError(f"{name}: {len(value)} ids, at most {MAX_IDS}")
    for i, item in enumerate(value):
        # nil marks a free slot in a result's slot list; a request never names one.
        if not (allow_none and item is None):
            _identity(f"{name}[{i}]", item)
    if unique:
        named = [item for item in value if item is not None]
        if len(set(named)) != len(named):
            raise _FieldError(f"{name}: ids must be unique")
    return value


def _request_ids(name: str, value: object) -> tuple[str, ...]:
    """1..MAX_IDS unique identities (enroll, delete): no nil, no repeat, not empty."""
    ids = _identities(name, value, unique=True)
    if not ids:
        raise _FieldError(f"{name}: at least one id")
    return cast(tuple[str, ...], ids)  # allow_none was off: every item is a str


def _blob(name: str, value: object) -> bytes:
    _need(name, value, bytes, "bytes")
    assert isinstance(value, bytes)
    if not value:
        raise _FieldError(f"{name}: must not be empty")
    if len(value) > MAX_PAYLOAD_BYTES:
        raise _FieldSizeError(f"{name}: {len(value)} bytes, at most {MAX_PAYLOAD_BYTES}")
    return value


def _text(name: str, value: object, *, max_chars: int, multiline: bool = False) -> str:
    _need(name, value, str, "str")
    assert isinstance(value, str)
    if len(value) > max_chars:
        raise _FieldError(f"{name}: {len(value)} chars, at most {max_chars}")
    ok = all(c.isprintable() or c in "\n\t" for c in value) if multiline else value.isprintable()
    if not ok:
        raise _FieldError(f"{name}: control or unencodable characters")
    return value


def _token(name: str, value: object) -> str:
    _need(name, value, str, "str")
    assert isinstance(value, str)
    if _CODE_RE.fullmatch(value) is None:
        raise _FieldError(f"{name}: {value!r:.80} must match {CODE_PATTERN}")
    return value


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    _need(name, value, str, "str")
    if value not in choices:
        raise _FieldError(f"{name}: {value!r:.80} not one of {tuple(choices)}")
    assert isinstance(value, str)
    return value


def _optional(name: str, value: object, check: Any, **kw: Any) -> Any:
    return None if value is None else check(name, value, **kw)


# ---------------------------------------------------------------------- header
@dataclass(frozen=True, kw_only=True)
class Header:
    """The envelope header, as far as it is known.

    A decoded message's :attr:`Envelope.header` has every field set. The header
    attached to a decoding error (see :func:`cipherface.protocol.codec.error_header`)
    holds only the fields that were readable *and* valid, the others are None:
    enough to address an error reply (``site``, ``gw``, ``id``) when possible.

    Args:
        version: schema version ``v``.
        type: message type ``t``.
        id: message id.
        corr: correlation id (the request id, on replies).
        site: site id.
        gw: gateway id.
        kid: key id.
        ts: send time, ms since the epoch.
        exp: expiry time, ms since the epoch.
    """

    version: int | None = None
    type: str | None = None
    id: str | None = None
    corr: str | None = None
    site: str | None = None
    gw: str | None = None
    kid: str | None = None
    ts: int | None = None
    exp: int | None = None


# -------------------------------------------------------------------- envelope
@dataclass(frozen=True, kw_only=True)
class Envelope:
    """Fields common to every message (the wire envelope's header).

    Args:
        site: site id (topic-level syntax; ``cloud`` only in cloud status messages).
        gw: gateway id (the agent id in cloud status messages).
        id: message id, 32 hex chars; a fresh CSPRNG id by default.
        corr: the request's id on replies, else None.
        kid: key id (32 hex chars) the message is tied to, or None.
        ts: send time in ms since the epoch; now by default.
        exp: expiry in ms since the epoch (>= ``ts``), or None for no expiry.

    Raises:
        InvalidArgumentError: a field fails its check.
    """

    TYPE: ClassVar[str] = ""
    #: requests carry no ``corr``; replies must carry one.
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "optional"
    KID_REQUIRED: ClassVar[bool] = False

    site: str
    gw: str
    id: str = field(default_factory=new_message_id)
    corr: str | None = None
    kid: str | None = None
    ts: int = field(default_factory=now_ms)
    exp: int | None = None

    def __post_init__(self) -> None:
        self._check_header()
        self._check_body()

    def _check_header(self) -> None:
        _hex_id("id", self.id)
        _optional("corr", self.corr, _hex_id)
        if self.CORR == "forbidden" and self.corr is not None:
            raise _FieldError(f"corr: must be nil in a {self.TYPE} message")
        if self.CORR == "required" and self.corr is None:
            raise _FieldError(f"corr: required in a {self.TYPE} message")
        _topic_id("site", self.site)
        _topic_id("gw", self.gw)
        if self.site in RESERVED_SITES and not isinstance(self, Status):
            raise _FieldError(f"site: {self.site!r} is reserved")
        _optional("kid", self.kid, _hex_id)
        if self.KID_REQUIRED and self.kid is None:
            raise _FieldError(f"kid: required in a {self.TYPE} message")
        _int("ts", self.ts)
        _optional("exp", self.exp, _int)
        if self.exp is not None and self.exp < self.ts:
            raise _FieldError(f"exp: {self.exp} is before ts {self.ts}")

    def _check_body(self) -> None:
        """Check the body fields; overridden by each message type."""

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: normalise during __post_init__ only

    @property
    def header(self) -> Header:
        """The envelope header of this message, every field set."""
        return Header(
            version=SCHEMA_VERSION,
            type=self.TYPE,
            id=self.id,
            corr=self.corr,
            site=self.site,
            gw=self.gw,
            kid=self.kid,
            ts=self.ts,
            exp=self.exp,
        )

    @classmethod
    def body_fields(cls) -> tuple[str, ...]:
        """Names of the body (``b``) keys of this message type, in declaration order."""
        return tuple(f.name for f in fields(cls) if f.name not in HEADER_FIELDS)

    def body(self) -> dict[str, Any]:
        """The body as plain msgpack-ready values (tuples become lists)."""
        out: dict[str, Any] = {}
        for name in self.body_fields():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


# ------------------------------------------------------------------- requests
@dataclass(frozen=True, kw_only=True)
class KeyPublish(Envelope):
    """edge -> cloud: the site's public key material (``kid`` = its key id).

    Args:
        scheme: HE scheme token (``ckks``, ``paillier``, ``damgard-jurik``, ``okamoto-uchiyama``).
        public_key: the public key file bytes (format: docs/crypto.md).
    """

    TYPE: ClassVar[str] = "key.publish"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"
    KID_REQUIRED: ClassVar[bool] = True

    scheme: str
    public_key: bytes

    def _check_body(self) -> None:
        _token("scheme", self.scheme)
        _blob("public_key", self.public_key)


@dataclass(frozen=True, kw_only=True)
class Enroll(Envelope):
    """edge -> cloud: add (or replace) encrypted templates.

    Args:
        ids: 1..100000 unique identity names, in the order of ``payload``'s templates.
        payload: the encrypted templates (format: docs/crypto.md).
    """

    TYPE: ClassVar[str] = "enroll"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"
    KID_REQUIRED: ClassVar[bool] = True

    ids: tuple[str, ...]
    payload: bytes

    def _check_body(self) -> None:
        self._set("ids", _request_ids("ids", self.ids))
        _blob("payload", self.payload)


@dataclass(frozen=True, kw_only=True)
class Delete(Envelope):
    """edge -> cloud: erase identities (``kid`` None = from every gallery of the site).

    Args:
        ids: 1..100000 unique identity names.
    """

    TYPE: ClassVar[str] = "delete"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"

    ids: tuple[str, ...]

    def _check_body(self) -> None:
        self._set("ids", _request_ids("ids", self.ids))


@dataclass(frozen=True, kw_only=True)
class Verify(Envelope):
    """edge -> cloud: 1:1, score ``probe`` against the templates of ``identity``.

    Args:
        identity: the claimed identity.
        probe: the encrypted probe (format: docs/crypto.md).
    """

    TYPE: ClassVar[str] = "verify"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"
    KID_REQUIRED: ClassVar[bool] = True

    identity: str
    probe: bytes

    def _check_body(self) -> None:
        _identity("identity", self.identity)
        _blob("probe", self.probe)


@dataclass(frozen=True, kw_only=True)
class Identify(Envelope):
    """edge -> cloud: 1:N, score ``probe`` against the whole gallery.

    Args:
        probe: the encrypted probe (format: docs/crypto.md).
        ids_version: the gallery version of the edge's cached id list, or None;
            the result omits ``ids`` when it equals the cloud's current version.
    """

    TYPE: ClassVar[str] = "identify"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"
    KID_REQUIRED: ClassVar[bool] = True

    probe: bytes
    ids_version: int | None = None

    def _check_body(self) -> None:
        _blob("probe", self.probe)
        _optional("ids_version", self.ids_version, _int)


@dataclass(frozen=True, kw_only=True)
class IdsGet(Envelope):
    """edge -> cloud: fetch one page of the gallery's slot list (``kid`` None = the
    site's current key).

    Args:
        offset: the first slot of the page (0..16777216).
        limit: the most ids in the page (1..100000); None asks for 100000.
    """

    TYPE: ClassVar[str] = "ids.get"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"

    offset: int = 0
    limit: int | None = None

    def _check_body(self) -> None:
        _int("offset", self.offset, hi=MAX_SLOTS)
        _optional("limit", self.limit, _int, lo=1, hi=MAX_IDS)


@dataclass(frozen=True, kw_only=True)
class GalleryExport(Envelope):
    """edge -> cloud: one page of the packed ciphertexts of the gallery of ``kid``
    (key rotation: the edge decrypts them and enrolls the live templates under its
    new key; docs/protocol.md 6.11).

    Args:
        first: the first pack of the page (0..16777216).
        count: the most packs in the page (1..1024).
    """

    TYPE: ClassVar[str] = "gallery.export"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"
    KID_REQUIRED: ClassVar[bool] = True

    first: int = 0
    count: int = 1

    def _check_body(self) -> None:
        _int("first", self.first, hi=MAX_SLOTS)
        _int("count", self.count, lo=1, hi=MAX_EXPORT_PACKS)


@dataclass(frozen=True, kw_only=True)
class KeyRetire(Envelope):
    """edge -> cloud: destroy the gallery and public key of ``kid``, for good, once the
    site has moved to ``successor`` (docs/protocol.md 6.12).

    Args:
        successor: the key that replaces ``kid``: it must differ from ``kid``, be
            registered (key.publish) and be the site's current key.
    """

    TYPE: ClassVar[str] = "key.retire"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"
    KID_REQUIRED: ClassVar[bool] = True

    successor: str

    def _check_body(self) -> None:
        _hex_id("successor", self.successor)
        if self.successor == self.kid:
            raise _FieldError("successor: must differ from kid (the key retired)")


# ---------------------------------------------------------------------- replies
@dataclass(frozen=True, kw_only=True)
class Result(Envelope):
    """cloud -> edge: the answer to any request (``corr`` = the request's id).

    Args:
        op: the request's message type (``enroll``, ``identify``...).
        ids_version: the gallery version after the operation.
        scores: encrypted scores (format: docs/crypto.md), or None.
        count: number of score slots when ``scores`` is set (1..16777216), else the
            number of ``ids`` (0 when neither is set).
        ids: identity of each slot, None for a free or deleted slot: all the slots
            (identify, when the edge's cache is stale and they fit in one list) or
            one page of them (ids.get); None otherwise.
        enrolled: number of templates stored (enroll), else None.
        deleted: number of identities erased (delete), else None.
        offset: the page's first slot (ids.get) or pack (gallery.export), else None.
        total: the number of slots (ids.get) or packs (gallery.export) in the
            gallery, else None.

    A ``gallery.export`` result carries the export page in ``scores`` (always set,
    docs/crypto.md "Export pages") and the number of packs in the page in ``count``
    (0 only for the empty page at ``offset == total``). A ``key.retire`` result has
    ``deleted`` 1 when it destroyed the key's gallery, 0 when it was gone already.
    """

    TYPE: ClassVar[str] = "result"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "required"

    op: str
    ids_version: int
    scores: bytes | None = None
    count: int = 0
    ids: tuple[str | None, ...] | None = None
    enrolled: int | None = None
    deleted: int | None = None
    offset: int | None = None
    total: int | None = None

    def _check_body(self) -> None:
        _choice("op", self.op, tuple(OP_FOR_TYPE))
        _int("ids_version", self.ids_version)
        _optional("scores", self.scores, _blob)
        _int("count", self.count, hi=MAX_SLOTS)
        if self.scores is not None and self.count == 0 and self.op != "gallery.export":
            raise _FieldError("count: at least 1 with scores")
        if self.ids is not None:
            self._set("ids", _identities("ids", self.ids, unique=False, allow_none=True))
            assert self.ids is not None
            if len(self.ids) != self.count:
                raise _FieldError(f"ids: {len(self.ids)} ids but count is {self.count}")
        elif self.scores is None and self.count != 0:
            raise _FieldError("count: must be 0 without scores or ids")
        _optional("enrolled", self.enrolled, _int, hi=MAX_IDS)
        _optional("deleted", self.deleted, _int, hi=MAX_IDS)
        _optional("offset", self.offset, _int, hi=MAX_SLOTS)
        _optional("total", self.total, _int, hi=MAX_SLOTS)
        self._check_page()

    def _check_page(self) -> None:
        """An ids.get result is exactly one page: ids, offset and total, no scores; a
        gallery.export result one page of packs: scores, offset and total, no ids."""
        paged = (self.offset, self.total)
        if self.op == "gallery.export":
            self._check_export_page()
            return
        if self.op != "ids.get":
            if paged != (None, None):
                raise _FieldError("offset, total: only in an ids.get or gallery.export result")
            return
        if self.ids is None or self.offset is None or self.total is None:
            raise _FieldError("ids, offset, total: required in an ids.get result")
        if self.scores is not None:
            raise _FieldError("scores: not in an ids.get result")
        if self.offset + len(self.ids) > self.total:
            raise _FieldError(
                f"ids: slots {self.offset}..{self.offset + len(self.ids)} past total {self.total}"
            )
        if not self.ids and self.offset != self.total:
            # An empty page before the end would leave a pager without progress.
            raise _FieldError(f"ids: empty page at offset {self.offset} of {self.total}")

    def _check_export_page(self) -> None:
        if self.scores is None or self.offset is None or self.total is None:
            raise _FieldError("scores, offset, total: required in a gallery.export result")
        if self.ids is not None:
            raise _FieldError("ids: not in a gallery.export result")
        if self.count > MAX_EXPORT_PACKS:
            raise _FieldError(f"count: {self.count} packs, at most {MAX_EXPORT_PACKS}")
        if self.offset + self.count > self.total:
            raise _FieldError(
                f"count: packs {self.offset}..{self.offset + self.count} past total {self.total}"
            )
        if self.count == 0 and self.offset != self.total:
            raise _FieldError(f"count: empty page at pack {self.offset} of {self.total}")


@dataclass(frozen=True, kw_only=True)
class Error(Envelope):
    """cloud -> edge: a request failed (``corr`` = its id, None if unreadable).

    Args:
        code: stable error code (a ``code`` of cipherface.errors).
        message: human-readable detail, at most 1024 chars.
        retry: True when the same operation may succeed if tried again later.
    """

    TYPE: ClassVar[str] = "error"

    code: str
    message: str
    retry: bool = False

    def _check_body(self) -> None:
        _token("code", self.code)
        _text("message", self.message, max_chars=MAX_TEXT_CHARS, multiline=True)
        _need("retry", self.retry, bool, "bool")


# -------------------------------------------------------------- status / events
@dataclass(frozen=True, kw_only=True)
class Status(Envelope):
    """Retained online/offline state of an agent (also its MQTT last will).

    A cloud agent's status has ``site="cloud"`` and ``gw=<agent_id>``; an edge's
    has its own site and gateway.

    Args:
        state: ``online`` or ``offline``.
        role: ``cloud`` or ``edge``.
        version: the agent's software version.
    """

    TYPE: ClassVar[str] = "status"
    CORR: ClassVar[Literal["forbidden", "optional", "required"]] = "forbidden"

    state: Literal["online", "offline"]
    role: Literal["cloud", "edge"]
    version: str

    def _check_body(self) -> None:
        _choice("state", self.state, ("online", "offline"))
        _choice("role", self.role, ("cloud", "edge"))
        if (self.role == "cloud") != (self.site in RESERVED_SITES):
            raise _FieldError('site: must be "cloud" exactly when role is "cloud"')
        _text("version", self.version, max_chars=MAX_VERSION_CHARS)
        if not self.version:
            raise _FieldError("version: must not be empty")


@dataclass(frozen=True, kw_only=True)
class Decision(Envelope):
    """edge -> events topic: the outcome of a verify or identify. Never a score.

    Args:
        op: ``verify`` or ``identify``.
        identity: the claimed identity (verify, always set); the matched identity
            (identify, set exactly when ``match`` is True).
        match: whether the face matched.
        latency_ms: end-to-end time of the operation.
        photo: a label of the probe (e.g. a file name), or None.
    """

    TYPE: ClassVar[str] = "decision"

    op: Literal["verify", "identify"]
    identity: str | None
    match: bool
    latency_ms: float
    photo: str | None = None

    def _check_body(self) -> None:
        _choice("op", self.op, ("verify", "identify"))
        _optional("identity", self.identity, _identity)
        _need("match", self.match, bool, "bool")
        if self.op == "verify" and self.identity is None:
            raise _FieldError("identity: required in a verify decision (the claimed identity)")
        if self.op == "identify" and (self.identity is not None) != self.match:
            # Naming the nearest non-match would leak more than the decision.
            raise _FieldError("identity: set exactly when an identify decision matches")
        _need("latency_ms", self.latency_ms, (int, float), "float")
        latency = float(self.latency_ms)  # other languages may send a whole number as int
        if not (math.isfinite(latency) and 0.0 <= latency <= MAX_LATENCY_MS):
            raise _FieldError(f"latency_ms: {latency} outside [0, {MAX_LATENCY_MS:g}]")
        self._set("latency_ms", latency)
        _optional("photo", self.photo, _text, max_chars=MAX_TEXT_CHARS)


Request = KeyPublish | Enroll | Delete | Verify | Identify | IdsGet | GalleryExport | KeyRetire
Reply = Result | Error
Message = Request | Reply | Status | Decision

#: message type string -> class.
MESSAGE_TYPES: Final[dict[str, type[Envelope]]] = {
    cls.TYPE: cls
    for cls in (
        KeyPublish,
        Enroll,
        Delete,
        Verify,
        Identify,
        IdsGet,
        GalleryExport,
        KeyRetire,
        Result,
        Error,
        Status,
        Decision,
    )
}
REQUEST_TYPES: Final = frozenset(OP_FOR_TYPE)


# ------------------------------------------------------------- reply builders
def result_for(
    request: Request,
    *,
    ids_version: int,
    scores: bytes | None = None,
    count: int = 0,
    ids: Sequence[str | None] | None = None,
    enrolled: int | None = None,
    deleted: int | None = None,
    offset: int | None = None,
    total: int | None = None,
    exp: int | None = None,
) -> Result:
    """Build the result answering ``request`` (same site/gw/kid, ``corr`` = its id).

    Args:
        request: the request being answered.
        ids_version: the gallery version after the operation.
        scores: encrypted scores, or None.
        count: number of score slots, or of ``ids``.
        ids: identity of each slot (None: a free slot), or a page of them, or None.
        enrolled: templates stored (enroll).
        deleted: identities erased (delete).
        offset: first slot of the page (ids.get).
        total: number of slots of the gallery (ids.get).
        exp: expiry of the result, ms since the epoch.

    Returns:
        A validated :class:`Result`.

    Raises:
        InvalidArgumentError: a field fails its check.
    """
    return Result(
        site=request.site,
        gw=request.gw,
        corr=request.id,
        kid=request.kid,
        exp=exp,
        op=request.TYPE,
        ids_version=ids_version,
        scores=scores,
        count=count,
        ids=None if ids is None else tuple(ids),
        enrolled=enrolled,
        deleted=deleted,
        offset=offset,
        total=total,
    )


def error_for(
    exc: BaseException,
    *,
    site: str,
    gw: str,
    corr: str | None,
    kid: str | None = None,
    retry: bool | None = None,
) -> Error:
    """Build the error message reporting ``exc`` to a requester.

    Exceptions outside the project's hierarchy become code ``error`` with a
    generic message, so internals (paths, tracebacks) never reach the peer.

    Args:
        exc: the failure.
        site: the requester's site (from the request topic).
        gw: the requester's gateway (from the request topic).
        corr: the request's id, or None when it could not be read.
        kid: the request's key id, if known.
        retry: override of the retry flag; by default True for :data:`RETRYABLE_CODES`.

    Returns:
        A validated :class:`Error`.

    Raises:
        InvalidArgumentError: a bad site, gw, corr or kid.
    """
    if isinstance(exc, CipherFaceError):
        code = exc.code if _CODE_RE.fullmatch(exc.code) else "error"
        text = str(exc) or code
    else:
        code, text = "error", "internal error"
    text = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text[:MAX_TEXT_CHARS])
    return Error(
        site=site,
        gw=gw,
        corr=corr,
        kid=kid,
        code=code,
        message=text,
        retry=code in RETRYABLE_CODES if retry is None else retry,
    )


__all__ = [
    "CODE_PATTERN",
    "HEADER_FIELDS",
    "HEX_ID_PATTERN",
    "MAX_EXPORT_PACKS",
    "MAX_IDENTITY_CHARS",
    "MAX_IDS",
    "MAX_INT",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_SLOTS",
    "MAX_TEXT_CHARS",
    "MESSAGE_TYPES",
    "REQUEST_TYPES",
    "RETRYABLE_CODES",
    "SCHEMA_VERSION",
    "Decision",
    "Delete",
    "Enroll",
    "Envelope",
    "Error",
    "GalleryExport",
    "Header",
    "Identify",
    "IdsGet",
    "KeyPublish",
    "KeyRetire",
    "Message",
    "Reply",
    "Request",
    "Result",
    "Status",
    "Verify",
    "error_for",
    "is_hex_id",
    "is_valid_identity",
    "new_message_id",
    "now_ms",
    "result_for",
    "validate_identity",
]
