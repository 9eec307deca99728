"""msgpack codec: ``encode(msg) -> bytes`` and a defensive ``decode(bytes) -> Message``.

The decoder walks the msgpack stream itself (msgpack's ``Unpacker`` with its
``max_*_len`` limits, one value at a time) instead of calling ``unpackb`` on the
whole buffer, because a container header makes msgpack pre-allocate the length
it announces: 3 KB of nested ``array 16`` headers would otherwise reserve
gigabytes. The walk allows three levels of containers (envelope map, body map,
id list), bounds the total number of items, refuses duplicate map keys (two
decoders must never read two different messages from the same bytes), then
every field is validated by the message's constructor.

Failures raise the remote errors of :mod:`cipherface.errors`; once the top-level
map is read, the error carries the readable part of the header (see
:func:`error_header`) so the receiver can answer on the sender's error topic.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Any, Final, NoReturn, cast

import msgpack

from cipherface.errors import (
    CipherFaceError,
    DecodeError,
    ExpiredError,
    InvalidArgumentError,
    PayloadTooLargeError,
    RemoteError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
    ValidationError,
)
from cipherface.protocol.messages import (
    HEADER_FIELDS,
    MAX_IDS,
    MAX_INT,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Envelope,
    Header,
    Message,
    Request,
    _FieldError,
    is_hex_id,
)
from cipherface.protocol.topics import (
    RESERVED_SITES,
    RequestTopic,
    is_valid_id,
    parse_request_topic,
)

#: Longest str the decoder reads (UTF-8 bytes); longer -> too_large.
MAX_STR_BYTES: Final = 4096
_MAX_MAP_LEN: Final = 32
_MAX_EXT_LEN: Final = 64
_MAX_DEPTH: Final = 3  # envelope map > body map > ids array
_MAX_ITEMS: Final = MAX_IDS + 256
ENVELOPE_KEYS: Final = frozenset({"v", "t", "b", *HEADER_FIELDS})

_MAPS: Final = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_ARRAYS: Final = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


class _ExtNotAllowed(Exception):
    """Raised by the ext hook: the protocol uses no msgpack extension types."""


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise _ExtNotAllowed(f"msgpack extension type {code} is not allowed")


# ------------------------------------------------------------------- encoding
def encode(msg: Message) -> bytes:
    """Serialise a message to its wire bytes.

    Args:
        msg: a message object (already validated by its constructor).

    Returns:
        The msgpack bytes of the envelope.

    Raises:
        InvalidArgumentError: not a protocol message, or larger than
            :data:`MAX_MESSAGE_BYTES` once encoded.
    """
    if not isinstance(msg, Envelope) or MESSAGE_TYPES.get(msg.TYPE) is not type(msg):
        raise InvalidArgumentError(f"not a protocol message: {type(msg).__name__}")
    wire: dict[str, Any] = {"v": SCHEMA_VERSION, "t": msg.TYPE}
    for name in HEADER_FIELDS:
        wire[name] = getattr(msg, name)
    wire["b"] = msg.body()
    data: bytes = msgpack.packb(wire, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidArgumentError(
            f"{msg.TYPE} message is {len(data)} bytes, above the {MAX_MESSAGE_BYTES} limit"
        )
    return data


# ------------------------------------------------------------------- decoding
class _Reader:
    """One bounded pass over a msgpack buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.items = 0
        self.unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
            ext_hook=_no_ext,
            max_buffer_size=max(len(data), 1),
            max_str_len=MAX_STR_BYTES,
            max_bin_len=MAX_PAYLOAD_BYTES,
            max_array_len=MAX_IDS,
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=_MAX_EXT_LEN,
        )
        self.unpacker.feed(data)

    def read(self, depth: int = 0) -> Any:
        self.items += 1
        if self.items > _MAX_ITEMS:
            raise PayloadTooLargeError(f"more than {_MAX_ITEMS} msgpack items")
        pos = self.unpacker.tell()
        if pos >= len(self.data):
            raise DecodeError("truncated msgpack data")
        head = self.data[pos]
        if head in _MAPS or head in _ARRAYS:
            if depth >= _MAX_DEPTH:
                raise DecodeError(f"msgpack containers nested deeper than {_MAX_DEPTH}")
            if head in _MAPS:
                return self._map(depth)
            n = self.unpacker.read_array_header()
            if n > MAX_IDS:
                raise PayloadTooLargeError(f"array of {n} items, at most {MAX_IDS}")
            return [self.read(depth + 1) for _ in range(n)]
        return self.unpacker.unpack()

    def _map(self, depth: int) -> dict[str, Any]:
        n = self.unpacker.read_map_header()
        if n > _MAX_MAP_LEN:
            raise DecodeError(f"map of {n} entries, at most {_MAX_MAP_LEN}")
        out: dict[str, Any] = {}
        for _ in range(n):
            key = self.read(depth + 1)
            if not isinstance(key, str):
                raise DecodeError(f"map key of type {type(key).__name__}, expected str")
            if key in out:
                raise DecodeError(f"duplicate map key {key!r:.40}")
            out[key] = self.read(depth + 1)
        return out

    def read_all(self) -> Any:
        try:
            value = self.read()
        except CipherFaceError:
            raise
        except ValueError as exc:
            # msgpack reports every length limit as "N exceeds max_xxx_len(M)".
            if "exceeds max_" in str(exc):
                raise PayloadTooLargeError(f"msgpack field too large: {exc}") from None
            raise DecodeError(f"not msgpack: {exc}") from None
        except Exception as exc:  # OutOfData, FormatError, StackError, the ext hook...
            raise DecodeError(f"not msgpack: {type(exc).__name__}: {exc}") from None
        if self.unpacker.tell() != len(self.data):
            raise DecodeError("extra bytes after the message")
        return value


def _partial_header(obj: dict[str, Any]) -> Header:
    """The header fields of a raw envelope that are individually valid."""

    def ms(value: Any) -> int | None:
        return value if type(value) is int and 0 <= value <= MAX_INT else None

    def topic_id(value: Any) -> str | None:
        return value if is_valid_id(value) and value not in RESERVED_SITES else None

    v, t = obj.get("v"), obj.get("t")
    return Header(
        version=v if type(v) is int else None,
        type=t if isinstance(t, str) and t in MESSAGE_TYPES else None,
        id=obj.get("id") if is_hex_id(obj.get("id")) else None,
        corr=obj.get("corr") if is_hex_id(obj.get("corr")) else None,
        site=topic_id(obj.get("site")),
        gw=topic_id(obj.get("gw")),
        kid=obj.get("kid") if is_hex_id(obj.get("kid")) else None,
        ts=ms(obj.get("ts")),
        exp=ms(obj.get("exp")),
    )


#: How much of an unparsable payload :func:`_salvage_header` looks at: the envelope's
#: scalar fields come before its body in every encoder we know of.
_SALVAGE_BYTES: Final = 64 * 1024
_SALVAGE_ENTRIES: Final = 64


def _salvage_header(data: bytes) -> Header | None:
    """The ``id`` and ``kid`` of a payload that failed to parse, when they can be read.

    A payload that is not valid msgpack *as a whole* (a duplicate key, a map over 32
    entries, too many items, trailing bytes, oversize) may still start with a
    readable envelope map: scan its first entries leniently and keep a well-formed
    ``id``/``kid`` seen exactly once with one value, so the error reply can carry
    ``corr`` and the requester can match it (on MQTT 3.1.1 the envelope is all it has).

    Returns:
        A header with the fields found, or None.
    """
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        max_buffer_size=_SALVAGE_BYTES,
        max_str_len=MAX_STR_BYTES,
        max_bin_len=_SALVAGE_BYTES,
        max_array_len=1024,
        max_map_len=1024,
        max_ext_len=_SALVAGE_BYTES,
    )
    unpacker.feed(data[:_SALVAGE_BYTES])
    seen: dict[str, set[Any]] = {"id": set(), "kid": set()}
    # Best effort: a fault ends the scan, keeping what was read before it.
    with contextlib.suppress(Exception):
        n = unpacker.read_map_header()
        for _ in range(min(n, _SALVAGE_ENTRIES)):
            key = unpacker.unpack()
            if isinstance(key, str) and key in seen:
                seen[key].add(unpacker.unpack())
            else:
                unpacker.skip()

    def single(name: str) -> str | None:
        values = seen[name]
        value = next(iter(values)) if len(values) == 1 else None
        return value if is_hex_id(value) else None

    msg_id, kid = single("id"), single("kid")
    if msg_id is None and kid is None:
        return None
    return Header(id=msg_id, kid=kid)


def _with_header(exc: RemoteError, header: Header | None) -> RemoteError:
    exc.header = header
    return exc


def error_header(exc: BaseException) -> Header | None:
    """The header attached to a decoding error, if any.

    Args:
        exc: an exception raised by :func:`decode` or :func:`decode_request`.

    Returns:
        A :class:`Header` whose fields are set where they were readable and
        valid (None where not), or None when not even the envelope map was read.
    """
    header = getattr(exc, "header", None)
    return header if isinstance(header, Header) else None


def _check_envelope(obj: Any) -> type[Envelope]:
    """Structure checks, in the order that gives the most useful error."""
    if not isinstance(obj, dict):
        raise DecodeError(f"message is a msgpack {type(obj).__name__}, expected a map")
    if "v" not in obj:
        raise DecodeError("missing field 'v'")
    v = obj["v"]
    if type(v) is not int:
        raise DecodeError(f"field 'v': expected int, got {type(v).__name__}")
    # The version first: another version may lay out everything else differently.
    if v != SCHEMA_VERSION:
        raise UnsupportedVersionError(f"schema version {v}; this peer speaks {SCHEMA_VERSION}")
    if "t" not in obj:
        raise DecodeError("missing field 't'")
    t = obj["t"]
    if not isinstance(t, str):
        raise DecodeError(f"field 't': expected str, got {type(t).__name__}")
    cls = MESSAGE_TYPES.get(t)
    if cls is None:
        raise UnknownMessageTypeError(f"unknown message type {t!r:.64}")
    _check_keys("envelope", obj, ENVELOPE_KEYS)
    body = obj["b"]
    if not isinstance(body, dict):
        raise DecodeError(f"field 'b': expected map, got {type(body).__name__}")
    _check_keys(f"{t} body", body, frozenset(cls.body_fields()))
    return cls


def _check_keys(what: str, obj: dict[str, Any], expected: frozenset[str]) -> None:
    missing = sorted(expected - obj.keys())
    if missing:
        raise DecodeError(f"{what}: missing field(s) {missing}")
    extra = sorted(obj.keys() - expected)
    if extra:
        # v1 is frozen: an unknown key means a peer speaking something else.
        raise DecodeError(f"{what}: unexpected field(s) {[k[:40] for k in extra]}")


def decode(
    data: bytes,
    *,
    max_size: int = MAX_MESSAGE_BYTES,
    now_ms: int | None = None,
) -> Message:
    """Parse and fully validate one message.

    Args:
        data: the MQTT payload.
        max_size: refuse payloads longer than this many bytes.
        now_ms: the receiver's clock (ms since the epoch); when given, a message
            whose ``exp`` is at or before it raises :class:`ExpiredError`.

    Returns:
        The message object (one of the classes of :mod:`~cipherface.protocol.messages`).

    Raises:
        InvalidArgumentError: ``data`` is not bytes.
        PayloadTooLargeError: the payload, a str, a bytes field or the id list is too large.
        DecodeError: not msgpack, not a map, a missing/unexpected key, a wrong type.
        UnsupportedVersionError: ``v`` is not :data:`SCHEMA_VERSION`.
        UnknownMessageTypeError: ``t`` is not a message type.
        ValidationError: a value is out of range or fails its pattern.
        ExpiredError: ``exp`` has passed.
    """
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidArgumentError(f"decode() needs bytes, got {type(data).__name__}")
    try:
        if len(data) > max_size:
            raise PayloadTooLargeError(f"message is {len(data)} bytes, at most {max_size}")
        obj = _Reader(data).read_all()
    except RemoteError as exc:
        raise _with_header(exc, _salvage_header(data)) from None
    header = _partial_header(obj) if isinstance(obj, dict) else None
    try:
        cls = _check_envelope(obj)
        fields = {name: obj[name] for name in HEADER_FIELDS}
        fields.update(obj["b"])
        try:
            msg = cast(Message, cls(**fields))
        except _FieldError as exc:
            raise _remote_field_error(exc) from None
        if now_ms is not None and msg.exp is not None and now_ms >= msg.exp:
            raise ExpiredError(f"{msg.TYPE} {msg.id} expired {now_ms - msg.exp} ms ago")
    except RemoteError as exc:
        raise _with_header(exc, header) from None
    return msg


def _remote_field_error(exc: _FieldError) -> RemoteError:
    if exc.kind == "type":
        return DecodeError(str(exc))
    if exc.kind == "size":
        return PayloadTooLargeError(str(exc))
    return ValidationError(str(exc))


def _on_topic(header: Header | None, rt: RequestTopic) -> Header:
    """``header`` with the site and gateway replaced by the (ACL-checked) topic's."""
    return replace(header or Header(), site=rt.site, gw=rt.gateway)


def decode_request(
    topic: str | RequestTopic,
    data: bytes,
    *,
    max_size: int = MAX_MESSAGE_BYTES,
    now_ms: int | None = None,
) -> Request:
    """Decode a request received on ``topic`` and check it against the topic.

    The topic is what the broker's ACL vouches for, so the envelope's ``site``,
    ``gw`` and type must agree with it. Errors raised after the topic parsed carry
    a header whose ``site``/``gw`` come from the topic: an error reply can always
    be addressed, and never to a topic the sender chose in the envelope.

    Args:
        topic: the topic the request arrived on, or its parsed form.
        data: the MQTT payload.
        max_size: refuse payloads longer than this many bytes.
        now_ms: the receiver's clock, to check ``exp``.

    Returns:
        The request message.

    Raises:
        ValidationError: a malformed topic (no header attached), or an envelope
            whose site, gateway or type disagrees with the topic.
        RemoteError: every error of :func:`decode`.
    """
    rt = topic if isinstance(topic, RequestTopic) else parse_request_topic(topic)
    try:
        msg = decode(data, max_size=max_size, now_ms=now_ms)
    except RemoteError as exc:
        raise _with_header(exc, _on_topic(error_header(exc), rt)) from None
    problem = None
    if msg.TYPE != rt.message_type:
        problem = f"a {msg.TYPE} message on the {rt.op!r} request topic"
    elif msg.site != rt.site or msg.gw != rt.gateway:
        problem = (
            f"envelope site/gw {msg.site}/{msg.gw} differ from the topic's {rt.site}/{rt.gateway}"
        )
    if problem is not None:
        raise _with_header(ValidationError(problem), _on_topic(msg.header, rt))
    return cast(Request, msg)  # its type was checked against the topic's request type


# --------------------------------------------------------------- MQTT 5 helpers
def correlation_data(message_id: str) -> bytes:
    """The MQTT 5 CorrelationData for a request: the ASCII bytes of its id.

    Raises:
        InvalidArgumentError: not a message id.
    """
    if not is_hex_id(message_id):
        raise InvalidArgumentError(f"not a message id: {message_id!r:.80}")
    return message_id.encode("ascii")


def expiry_interval_s(exp_ms: int | None, now_ms: int) -> int | None:
    """The MQTT 5 MessageExpiryInterval matching an envelope ``exp``.

    Args:
        exp_ms: the envelope's ``exp``, or None.
        now_ms: the sender's clock at publish time.

    Returns:
        Whole seconds, rounded up and at least 1, or None (no expiry) when ``exp_ms`` is None.
    """
    if exp_ms is None:
        return None
    return max(1, math.ceil((exp_ms - now_ms) / 1000))


__all__ = [
    "ENVELOPE_KEYS",
    "MAX_IDS",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_STR_BYTES",
    "SCHEMA_VERSION",
    "correlation_data",
    "decode",
    "decode_request",
    "encode",
    "error_header",
    "expiry_interval_s",
]
