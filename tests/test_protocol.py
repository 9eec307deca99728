"""Tests of the sans-IO wire protocol (topics, messages, codec, dedup state)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cipherface.errors import (
    CipherFaceError,
    DecodeError,
    ExpiredError,
    InvalidArgumentError,
    KeyMismatchError,
    PayloadTooLargeError,
    RemoteError,
    UnknownIdentityError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
    ValidationError,
)
from cipherface.protocol import (
    CLOUD_SHARE_GROUP,
    MAX_IDS,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_SLOTS,
    MAX_STR_BYTES,
    MESSAGE_TYPES,
    OPS,
    SCHEMA_VERSION,
    Decision,
    Delete,
    Enroll,
    Envelope,
    Error,
    GalleryExport,
    Header,
    Identify,
    IdsGet,
    KeyPublish,
    KeyRetire,
    Matched,
    PendingRequests,
    ReplyCache,
    RequestTopic,
    Result,
    Status,
    Unmatched,
    Verify,
    cloud_request_filter,
    cloud_status_topic,
    correlation_data,
    decode,
    decode_request,
    dedup_key,
    edge_reply_filters,
    encode,
    error_for,
    error_header,
    error_topic,
    events_filter,
    events_topic,
    expiry_interval_s,
    new_message_id,
    now_ms,
    parse_request_topic,
    parse_topic,
    request_topic,
    result_for,
    result_topic,
    status_filter,
    status_topic,
    validate_id,
    validate_identity,
)

KID = "0123456789abcdef0123456789abcdef"
SITE, GW = "plant-7", "door_1"
T0 = 1_700_000_000_000


def _hdr(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"site": SITE, "gw": GW, "kid": KID, "ts": T0}
    base.update(kw)
    return base


def sample_messages() -> list[Envelope]:
    req = Verify(**_hdr(), identity="Ada Lovelace", probe=b"\x00\x01probe")
    return [
        KeyPublish(
            **_hdr(exp=T0 + 5000), scheme="ckks", public_key=b"CFKEY1\n" + bytes(range(256))
        ),
        Enroll(**_hdr(), ids=("alice", "bob", "Zoë/ünïcode"), payload=b"\xff" * 999),
        Delete(**_hdr(kid=None), ids=("alice",)),
        req,
        Identify(**_hdr(), probe=b"p" * 10, ids_version=None),
        Identify(**_hdr(), probe=b"p", ids_version=42),
        IdsGet(**_hdr(kid=None)),
        IdsGet(**_hdr(), offset=200_000, limit=1),
        GalleryExport(**_hdr(), first=64, count=32),
        KeyRetire(**_hdr(), successor="f" * 32),
        result_for(req, ids_version=7, scores=b"s" * 64, count=1),
        Result(
            **_hdr(corr=req.id), op="identify", ids_version=3, scores=b"x", count=2, ids=("a", "a")
        ),
        Result(
            **_hdr(corr=req.id),
            op="identify",
            ids_version=4,
            scores=b"x",
            count=3,
            ids=("a", None, "b"),
        ),
        Result(**_hdr(corr=req.id), op="identify", ids_version=5, scores=b"x", count=MAX_SLOTS),
        Result(
            **_hdr(corr=req.id),
            op="ids.get",
            ids_version=3,
            count=2,
            ids=("a", "b"),
            offset=0,
            total=2,
        ),
        Result(
            **_hdr(corr=req.id),
            op="ids.get",
            ids_version=3,
            count=2,
            ids=(None, "c"),
            offset=100_000,
            total=1_003_520,
        ),
        Result(**_hdr(corr=req.id), op="ids.get", ids_version=0, ids=(), offset=0, total=0),
        Result(**_hdr(corr=req.id), op="enroll", ids_version=9, enrolled=3),
        Result(**_hdr(corr=req.id), op="delete", ids_version=10, deleted=0),
        Result(
            **_hdr(corr=req.id),
            op="gallery.export",
            ids_version=2,
            scores=b"page",
            count=2,
            offset=4,
            total=7,
        ),
        Result(
            **_hdr(corr=req.id),
            op="gallery.export",
            ids_version=2,
            scores=b"empty page",
            count=0,
            offset=7,
            total=7,
        ),
        Result(**_hdr(corr=req.id), op="key.retire", ids_version=3, deleted=1),
        Error(
            **_hdr(corr=req.id), code="unknown_identity", message="no such\nidentity", retry=False
        ),
        Error(**_hdr(corr=None, kid=None), code="malformed", message="", retry=False),
        Status(site=SITE, gw=GW, state="online", role="edge", version="0.1.0"),
        Status(site="cloud", gw="worker-1", state="offline", role="cloud", version="0.1.0"),
        Decision(site=SITE, gw=GW, op="verify", identity="alice", match=False, latency_ms=12.5),
        Decision(
            site=SITE,
            gw=GW,
            op="identify",
            identity="bob",
            match=True,
            latency_ms=3.0,
            photo="a.jpg",
        ),
        Decision(site=SITE, gw=GW, op="identify", identity=None, match=False, latency_ms=0.0),
    ]


def wire_of(msg: Envelope) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def valid_wire() -> dict[str, Any]:
    return wire_of(Verify(**_hdr(), identity="alice", probe=b"probe"))


# ------------------------------------------------------------------- round trip
@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: Envelope) -> None:
    data = encode(msg)
    back = decode(data)
    assert back == msg
    assert type(back) is type(msg)
    assert encode(back) == data  # deterministic: the reply cache relies on byte equality
    raw = msgpack.unpackb(data, raw=False)
    assert raw["v"] == SCHEMA_VERSION and raw["t"] == msg.TYPE
    assert set(raw) == {"v", "t", "id", "corr", "site", "gw", "kid", "ts", "exp", "b"}
    assert set(raw["b"]) == set(type(msg).body_fields())


def test_every_message_type_is_covered() -> None:
    assert {m.TYPE for m in sample_messages()} == set(MESSAGE_TYPES)


def test_ciphertexts_travel_as_bin_not_str() -> None:
    data = encode(Verify(**_hdr(), identity="a", probe=b"\x00\xff"))
    # bin 8 header (0xc4) + length 2: raw bytes, no base64.
    assert b"\xc4\x02\x00\xff" in data


def test_defaults_fresh_id_and_now() -> None:
    before = now_ms()
    a = IdsGet(site=SITE, gw=GW)
    b = IdsGet(site=SITE, gw=GW)
    assert a.id != b.id and len(a.id) == 32 and int(a.id, 16) >= 0
    assert before <= a.ts <= now_ms()
    assert len({new_message_id() for _ in range(100)}) == 100


def test_header_property() -> None:
    msg = sample_messages()[0]
    h = msg.header
    assert h == Header(
        version=1,
        type="key.publish",
        id=msg.id,
        corr=None,
        site=SITE,
        gw=GW,
        kid=KID,
        ts=T0,
        exp=T0 + 5000,
    )


def test_ids_list_becomes_tuple() -> None:
    msg = Enroll(**_hdr(), ids=["a", "b"], payload=b"x")
    assert msg.ids == ("a", "b")
    hash(msg)  # frozen and hashable


def test_latency_int_is_accepted_as_float() -> None:
    wire = wire_of(Decision(site=SITE, gw=GW, op="verify", identity="a", match=True, latency_ms=1))
    wire["b"]["latency_ms"] = 5
    msg = decode(pack(wire))
    assert isinstance(msg, Decision) and msg.latency_ms == 5.0
    assert isinstance(msg.latency_ms, float)


# ---------------------------------------------------------- structural rejects
@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\xa2\xff\xfe", pack(1) + b"\x00", b"\xd4\x05\x00"],
    ids=["empty", "reserved-byte", "truncated", "bad-utf8", "extra-bytes", "ext"],
)
def test_not_msgpack(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize("obj", [[1, 2], "text", 3, None, b"bin"])
def test_not_a_map(obj: Any) -> None:
    with pytest.raises(DecodeError, match="expected a map") as info:
        decode(pack(obj))
    assert error_header(info.value) is None


@pytest.mark.parametrize("key", ["v", "t", "id", "corr", "site", "gw", "kid", "ts", "exp", "b"])
def test_missing_envelope_field(key: str) -> None:
    wire = valid_wire()
    del wire[key]
    with pytest.raises(DecodeError, match="missing"):
        decode(pack(wire))


@pytest.mark.parametrize("key", ["identity", "probe"])
def test_missing_body_field(key: str) -> None:
    wire = valid_wire()
    del wire["b"][key]
    with pytest.raises(DecodeError, match="missing") as info:
        decode(pack(wire))
    # The header was readable: the receiver can still answer the sender.
    h = error_header(info.value)
    assert h is not None and h.id == wire["id"] and (h.site, h.gw) == (SITE, GW)


def test_unexpected_field() -> None:
    wire = valid_wire()
    wire["b"]["extra"] = 1
    with pytest.raises(DecodeError, match="unexpected"):
        decode(pack(wire))
    wire = valid_wire()
    wire["x"] = 1
    with pytest.raises(DecodeError, match="unexpected"):
        decode(pack(wire))


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("env", "v", "1"),
        ("env", "t", 5),
        ("env", "id", 123),
        ("env", "ts", "now"),
        ("env", "ts", 1.5),
        ("env", "ts", True),
        ("env", "exp", "later"),
        ("env", "site", b"plant-7"),
        ("env", "b", [1]),
        ("body", "identity", 7),
        ("body", "probe", "probe as str"),
        ("body", "probe", None),
    ],
)
def test_wrong_types(where: str, key: str, value: Any) -> None:
    wire = valid_wire()
    (wire if where == "env" else wire["b"])[key] = value
    with pytest.raises(DecodeError):
        decode(pack(wire))


@pytest.mark.parametrize(
    ("msg", "key", "value"),
    [
        (Enroll(**_hdr(), ids=("a",), payload=b"x"), "ids", "a"),
        (Enroll(**_hdr(), ids=("a",), payload=b"x"), "ids", [1]),
        (Result(**_hdr(corr=KID), op="enroll", ids_version=1), "count", True),
        (Result(**_hdr(corr=KID), op="enroll", ids_version=1), "ids_version", 1.0),
        (Error(**_hdr(corr=None), code="x", message="m"), "retry", 1),
        (
            Decision(site=SITE, gw=GW, op="verify", identity="a", match=True, latency_ms=1),
            "match",
            1,
        ),
    ],
)
def test_wrong_body_types(msg: Envelope, key: str, value: Any) -> None:
    wire = wire_of(msg)
    wire["b"][key] = value
    with pytest.raises(DecodeError):
        decode(pack(wire))


def test_non_str_map_key() -> None:
    with pytest.raises(DecodeError):
        decode(b"\x81\x01\x02")  # {1: 2}
    with pytest.raises(DecodeError):
        decode(b"\x81\xc4\x01v\x01")  # {b"v": 1}


def test_duplicate_map_key_is_refused() -> None:
    # Two decoders must never see two different messages in one byte string.
    body = pack(valid_wire())
    assert body[0] == 0x8A  # fixmap of 10 entries
    dup = bytes([0x8B]) + body[1:] + pack("site") + pack("other")
    with pytest.raises(DecodeError, match="duplicate"):
        decode(dup)


def test_deep_nesting_does_not_allocate() -> None:
    # array16 headers announcing 100000 items each: unpackb would pre-allocate them all.
    bomb = b"\xdc\x86\xa0" * 1000 + b"\xc0"
    start = time.perf_counter()
    with pytest.raises(DecodeError, match="nested"):
        decode(bomb)
    assert time.perf_counter() - start < 0.5


def test_too_many_items() -> None:
    wire = valid_wire()
    wire["b"] = {"a": list(range(MAX_IDS)), "b": list(range(MAX_IDS))}
    with pytest.raises(PayloadTooLargeError):
        decode(pack(wire))


# ----------------------------------------------------- version / type / expiry
@pytest.mark.parametrize("v", [0, 2, 99])
def test_unknown_version(v: int) -> None:
    wire = valid_wire()
    wire["v"] = v
    wire["b"] = {"whatever": "v2 layout"}  # checked before anything else
    with pytest.raises(UnsupportedVersionError) as info:
        decode(pack(wire))
    h = error_header(info.value)
    assert h is not None and h.version == v and h.id == wire["id"]


@pytest.mark.parametrize("t", ["hello", "", "Verify", "result "])
def test_unknown_type(t: str) -> None:
    wire = valid_wire()
    wire["t"] = t
    with pytest.raises(UnknownMessageTypeError) as info:
        decode(pack(wire))
    h = error_header(info.value)
    assert h is not None and h.type is None and h.gw == GW


def test_expired() -> None:
    msg = Verify(**_hdr(exp=T0 + 1000), identity="a", probe=b"p")
    data = encode(msg)
    assert decode(data, now_ms=T0 + 999) == msg
    assert decode(data) == msg  # no clock given: no expiry check
    for late in (T0 + 1000, T0 + 10**6):
        with pytest.raises(ExpiredError) as info:
            decode(data, now_ms=late)
        h = error_header(info.value)
        assert h is not None and h.id == msg.id and h.exp == T0 + 1000
    never = Verify(**_hdr(exp=None), identity="a", probe=b"p")
    assert decode(encode(never), now_ms=T0 + 10**9) == never


def test_exp_before_ts_is_invalid() -> None:
    wire = valid_wire()
    wire["exp"] = T0 - 1
    with pytest.raises(ValidationError, match="exp"):
        decode(pack(wire))


# ------------------------------------------------------------------ size limits
def test_oversized_message() -> None:
    data = encode(Verify(**_hdr(), identity="a", probe=b"p" * 1000))
    with pytest.raises(PayloadTooLargeError):
        decode(data, max_size=len(data) - 1)
    assert decode(data, max_size=len(data)).id == msgpack.unpackb(data)["id"]
    with pytest.raises(PayloadTooLargeError):
        decode(b"\x00" * (MAX_MESSAGE_BYTES + 1))


def test_oversized_bytes_field() -> None:
    wire = valid_wire()
    wire["b"]["probe"] = bytes(MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(PayloadTooLargeError):
        decode(pack(wire))
    with pytest.raises(InvalidArgumentError):
        Verify(**_hdr(), identity="a", probe=bytes(MAX_PAYLOAD_BYTES + 1))


def test_largest_payload_is_accepted() -> None:
    msg = Verify(**_hdr(), identity="a", probe=bytes(MAX_PAYLOAD_BYTES))
    assert decode(encode(msg)) == msg


def test_oversized_str_field() -> None:
    wire = valid_wire()
    wire["b"]["identity"] = "a" * (MAX_STR_BYTES + 1)
    with pytest.raises(PayloadTooLargeError):
        decode(pack(wire))
    wire["b"]["identity"] = "a" * 129  # short enough to read, too long to be an identity
    with pytest.raises(ValidationError, match="identity"):
        decode(pack(wire))


def test_too_many_ids() -> None:
    wire = wire_of(Enroll(**_hdr(), ids=("a",), payload=b"x"))
    wire["b"]["ids"] = [f"{i}" for i in range(MAX_IDS + 1)]
    with pytest.raises(PayloadTooLargeError):
        decode(pack(wire))
    with pytest.raises(InvalidArgumentError):
        Delete(**_hdr(), ids=tuple(f"{i}" for i in range(MAX_IDS + 1)))


def test_max_ids_bulk_enroll_round_trip() -> None:
    ids = tuple(f"person-{i:06d}" for i in range(MAX_IDS))
    msg = Enroll(**_hdr(), ids=ids, payload=b"c" * 100)
    start = time.perf_counter()
    back = decode(encode(msg))
    assert back == msg
    assert time.perf_counter() - start < 5


def test_encode_refuses_a_message_above_the_limit() -> None:
    ids = tuple(f"{i:0100d}" for i in range(60_000))  # 6 MB of ids + 60 MiB payload
    msg = Enroll(**_hdr(), ids=ids, payload=bytes(MAX_PAYLOAD_BYTES))
    with pytest.raises(InvalidArgumentError, match="limit"):
        encode(msg)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(InvalidArgumentError):
        encode({"v": 1})


# ----------------------------------------------------------------- bad values
BAD_TOPIC_IDS = [
    "a+b",
    "a#",
    "a/b",
    "$sys",
    "A",
    "-a",
    "_a",
    "",
    "a" * 64,
    "a\n",
    "é",
    "a b",
    "a.b",
]


@pytest.mark.parametrize("bad", BAD_TOPIC_IDS)
@pytest.mark.parametrize("key", ["site", "gw"])
def test_bad_topic_ids_in_envelope(key: str, bad: str) -> None:
    wire = valid_wire()
    wire[key] = bad
    with pytest.raises(ValidationError, match=key) as info:
        decode(pack(wire))
    h = error_header(info.value)
    assert h is not None and getattr(h, key) is None  # never echo an unsafe id
    with pytest.raises(InvalidArgumentError):
        Verify(**_hdr(**{key: bad}), identity="a", probe=b"p")


@pytest.mark.parametrize("bad", ["", "a" * 129, " alice", "alice ", "a\nb", "a\x00", "\ud800"])
def test_bad_identity(bad: str) -> None:
    wire = valid_wire()
    wire["b"]["identity"] = bad
    try:
        data = pack(wire)
    except UnicodeEncodeError:  # a lone surrogate cannot even be sent
        data = None
    if data is not None:
        with pytest.raises(ValidationError):
            decode(data)
    with pytest.raises(InvalidArgumentError):
        validate_identity(bad)
    with pytest.raises(InvalidArgumentError):
        Verify(**_hdr(), identity=bad, probe=b"p")


def test_identity_edge_cases_accepted() -> None:
    for name in ("a" * 128, "Zoë Ünïcode", "x/y+z#w", "中文名"):
        assert validate_identity(name) == name
        assert decode(encode(Verify(**_hdr(), identity=name, probe=b"p"))).identity == name


@pytest.mark.parametrize("key", ["id", "kid", "corr"])
@pytest.mark.parametrize("bad", ["ABCDEF0123456789ABCDEF0123456789", "0" * 31, "0" * 33, "g" * 32])
def test_bad_hex_ids(key: str, bad: str) -> None:
    wire = valid_wire()
    wire[key] = bad
    with pytest.raises(ValidationError):
        decode(pack(wire))


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Enroll(**_hdr(), ids=(), payload=b"x"), "at least one"),
        (lambda: Enroll(**_hdr(), ids=("a", "a"), payload=b"x"), "unique"),
        (lambda: Enroll(**_hdr(), ids=("a",), payload=b""), "empty"),
        (lambda: Enroll(**_hdr(kid=None), ids=("a",), payload=b"x"), "kid"),
        (lambda: Verify(**_hdr(corr=KID), identity="a", probe=b"p"), "corr"),
        (lambda: Verify(**_hdr(ts=-1), identity="a", probe=b"p"), "ts"),
        (lambda: Verify(**_hdr(ts=2**63), identity="a", probe=b"p"), "ts"),
        (lambda: Verify(**_hdr(site="cloud"), identity="a", probe=b"p"), "reserved"),
        (lambda: Identify(**_hdr(), probe=b"p", ids_version=-1), "ids_version"),
        (lambda: KeyPublish(**_hdr(), scheme="CKKS", public_key=b"k"), "scheme"),
        (lambda: Result(**_hdr(), op="enroll", ids_version=1), "corr"),
        (lambda: Result(**_hdr(corr=KID), op="hello", ids_version=1), "op"),
        (lambda: Result(**_hdr(corr=KID), op="identify", ids_version=1, count=3), "count"),
        (
            lambda: Result(**_hdr(corr=KID), op="identify", ids_version=1, count=1, ids=("a", "b")),
            "count",
        ),
        (lambda: Result(**_hdr(corr=KID), op="identify", ids_version=1, scores=b""), "empty"),
        (lambda: Error(**_hdr(corr=None), code="Bad Code", message="m"), "code"),
        (lambda: Error(**_hdr(corr=None), code="x", message="m" * 1025), "message"),
        (lambda: Error(**_hdr(corr=None), code="x", message="\x07"), "message"),
        (lambda: Status(site="cloud", gw="w", state="online", role="edge", version="1"), "site"),
        (lambda: Status(site=SITE, gw=GW, state="online", role="cloud", version="1"), "site"),
        (lambda: Status(site=SITE, gw=GW, state="busy", role="edge", version="1"), "state"),
        (lambda: Status(site=SITE, gw=GW, state="online", role="edge", version=""), "version"),
        (
            lambda: Decision(
                site=SITE, gw=GW, op="verify", identity=None, match=False, latency_ms=1
            ),
            "identity",
        ),
        (
            lambda: Decision(
                site=SITE, gw=GW, op="identify", identity="a", match=False, latency_ms=1
            ),
            "identity",
        ),
        (
            lambda: Decision(
                site=SITE, gw=GW, op="verify", identity="a", match=True, latency_ms=-1
            ),
            "latency",
        ),
        (
            lambda: Decision(
                site=SITE, gw=GW, op="verify", identity="a", match=True, latency_ms=float("nan")
            ),
            "latency",
        ),
    ],
)
def test_invalid_values_refused_at_construction(factory: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        factory()


def test_invalid_value_on_the_wire_is_a_validation_error() -> None:
    wire = wire_of(Enroll(**_hdr(), ids=("a", "b"), payload=b"x"))
    wire["b"]["ids"] = ["a", "a"]
    with pytest.raises(ValidationError, match="unique"):
        decode(pack(wire))
    wire["b"]["ids"] = []
    with pytest.raises(ValidationError):
        decode(pack(wire))


# ------------------------------------------------- large galleries, id paging
def _page(**kw: Any) -> Result:
    fields: dict[str, Any] = {"op": "ids.get", "ids_version": 1, "ids": ("a",), "count": 1}
    fields.update(offset=0, total=1)
    fields.update(kw)
    return Result(**_hdr(corr=KID), **fields)


def test_ids_get_defaults_and_wire_keys() -> None:
    req = IdsGet(**_hdr())
    assert (req.offset, req.limit) == (0, None)
    assert wire_of(req)["b"] == {"offset": 0, "limit": None}
    page = _page(ids=("a", None), count=2, offset=5, total=9)
    body = wire_of(page)["b"]
    assert body["ids"] == ["a", None] and (body["offset"], body["total"]) == (5, 9)
    assert list(body) == list(Result.body_fields())  # declaration order = docs order
    assert list(Result.body_fields())[-2:] == ["offset", "total"]
    assert (
        wire_of(Result(**_hdr(corr=KID), op="enroll", ids_version=1, enrolled=1))["b"]["total"]
        is None
    )


def test_identify_result_counts_more_slots_than_an_id_list_holds() -> None:
    # 245 CKKS blocks of 4096 slots: 12 MB of scores, no id list (the edge pages it).
    res = Result(**_hdr(corr=KID), op="identify", ids_version=8, scores=b"s", count=1_003_520)
    assert decode(encode(res)) == res
    assert res.count > MAX_IDS and res.ids is None


def test_last_page_of_a_large_gallery_round_trips() -> None:
    slots: tuple[str | None, ...] = tuple(None if i % 7 == 0 else f"id{i}" for i in range(MAX_IDS))
    page = _page(ids=slots, count=MAX_IDS, offset=MAX_SLOTS - MAX_IDS, total=MAX_SLOTS)
    back = decode(encode(page))
    assert back == page and isinstance(back, Result) and back.ids is not None
    assert back.ids[0] is None and back.ids[1] == "id1"


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: IdsGet(**_hdr(), offset=-1), "offset"),
        (lambda: IdsGet(**_hdr(), offset=MAX_SLOTS + 1), "offset"),
        (lambda: IdsGet(**_hdr(), limit=0), "limit"),
        (lambda: IdsGet(**_hdr(), limit=MAX_IDS + 1), "limit"),
        (lambda: IdsGet(**_hdr(), offset=True), "offset"),
        (lambda: Enroll(**_hdr(), ids=("a", None), payload=b"x"), "ids"),
        (lambda: Delete(**_hdr(), ids=(None,)), "ids"),
        (
            lambda: Result(
                **_hdr(corr=KID), op="identify", ids_version=1, scores=b"s", count=MAX_SLOTS + 1
            ),
            "count",
        ),
        (lambda: Result(**_hdr(corr=KID), op="identify", ids_version=1, scores=b"s"), "count"),
        (lambda: Result(**_hdr(corr=KID), op="ids.get", ids_version=1, count=0), "required"),
        (lambda: _page(total=None), "required"),
        (lambda: _page(offset=None), "required"),
        (lambda: _page(ids=None, count=0), "required"),
        (lambda: _page(offset=1, total=1), "past total"),
        (lambda: _page(ids=("a", "b"), count=2, total=1), "past total"),
        (lambda: _page(ids=(), count=0, offset=0, total=3), "empty page"),
        (lambda: _page(offset=-1), "offset"),
        (lambda: _page(total=MAX_SLOTS + 1), "total"),
        (lambda: _page(scores=b"s"), "scores"),
        (
            lambda: Result(**_hdr(corr=KID), op="identify", ids_version=1, offset=0, total=0),
            "only in an ids.get or gallery.export",
        ),
        (
            lambda: Result(
                **_hdr(corr=KID),
                op="identify",
                ids_version=1,
                count=MAX_IDS + 1,
                ids=("a",) * (MAX_IDS + 1),
            ),
            "ids",
        ),
    ],
)
def test_paging_and_slot_values_refused(factory: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        factory()


@pytest.mark.parametrize(
    ("msg", "key", "value", "error"),
    [
        (IdsGet(**_hdr()), "offset", -1, ValidationError),
        (IdsGet(**_hdr()), "offset", None, DecodeError),
        (IdsGet(**_hdr()), "limit", MAX_IDS + 1, ValidationError),
        (IdsGet(**_hdr()), "limit", "all", DecodeError),
        (Enroll(**_hdr(), ids=("a", "b"), payload=b"x"), "ids", ["a", None], DecodeError),
        (Delete(**_hdr(), ids=("a",)), "ids", [None], DecodeError),
        (_page(), "offset", 1, ValidationError),
        (_page(), "total", 0, ValidationError),
        (_page(), "ids", [3], DecodeError),
        (
            Result(**_hdr(corr=KID), op="identify", ids_version=1, scores=b"s", count=1),
            "count",
            MAX_SLOTS + 1,
            ValidationError,
        ),
    ],
)
def test_paging_values_refused_on_the_wire(
    msg: Envelope, key: str, value: Any, error: type[Exception]
) -> None:
    wire = wire_of(msg)
    wire["b"][key] = value
    with pytest.raises(error):
        decode(pack(wire))


@pytest.mark.parametrize("key", ["offset", "limit"])
def test_ids_get_body_keys_are_required(key: str) -> None:
    wire = wire_of(IdsGet(**_hdr()))
    del wire["b"][key]
    with pytest.raises(DecodeError, match="missing"):
        decode(pack(wire))


def test_too_long_page_is_too_large() -> None:
    wire = wire_of(_page())
    wire["b"].update(ids=[None] * (MAX_IDS + 1), count=MAX_IDS + 1, total=MAX_SLOTS)
    with pytest.raises(PayloadTooLargeError):
        decode(pack(wire))


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(min_value=-2, max_value=MAX_SLOTS + 2),
    size=st.integers(min_value=0, max_value=5),
    total=st.integers(min_value=-2, max_value=MAX_SLOTS + 2),
    free=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_page_rules_match_the_spec(offset: int, size: int, total: int, free: list[bool]) -> None:
    """Exactly the pages docs/protocol.md 6.6 allows are accepted, and they round-trip."""
    ids = tuple(None if free[i] else f"p{i}" for i in range(size))
    valid = (
        0 <= offset <= MAX_SLOTS
        and 0 <= total <= MAX_SLOTS
        and offset + size <= total
        and (size > 0 or offset == total)
    )
    try:
        page = _page(ids=ids, count=size, offset=offset, total=total)
    except InvalidArgumentError:
        assert not valid
        return
    assert valid
    assert decode(encode(page)) == page


# ------------------------------------------------------------- decode_request
def test_decode_request_checks_topic() -> None:
    msg = Enroll(**_hdr(), ids=("a",), payload=b"x")
    topic = request_topic(SITE, GW, "enroll")
    assert decode_request(topic, encode(msg)) == msg
    assert decode_request(parse_request_topic(topic), encode(msg)) == msg

    # Another gateway's topic: the ACL vouches for the topic, not the envelope.
    other = request_topic(SITE, "door_2", "enroll")
    with pytest.raises(ValidationError, match="differ") as info:
        decode_request(other, encode(msg))
    h = error_header(info.value)
    assert h is not None and (h.site, h.gw, h.id) == (SITE, "door_2", msg.id)

    with pytest.raises(ValidationError, match="request topic"):
        decode_request(request_topic(SITE, GW, "verify"), encode(msg))
    with pytest.raises(ValidationError):
        decode_request(result_topic(SITE, GW), encode(msg))


def test_decode_request_header_comes_from_topic_even_for_garbage() -> None:
    with pytest.raises(DecodeError) as info:
        decode_request(request_topic(SITE, GW, "verify"), b"\xc1")
    h = error_header(info.value)
    assert h is not None and (h.site, h.gw, h.id) == (SITE, GW, None)


def test_decode_request_refuses_non_requests() -> None:
    status = Status(site=SITE, gw=GW, state="online", role="edge", version="1")
    with pytest.raises(ValidationError):
        decode_request(request_topic(SITE, GW, "key"), encode(status))


# -------------------------------------------------------------------- property
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decode_random_bytes_raises_only_project_errors(data: bytes) -> None:
    try:
        decode(data, now_ms=T0)
    except CipherFaceError:
        pass


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["v", "t", "b", "id", "site", "gw", "ids", "probe", 1, KID]),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_decode_random_structures_raises_only_project_errors(obj: Any) -> None:
    try:
        data = pack(obj)
    except (OverflowError, ValueError, TypeError):
        return
    try:
        decode(data, now_ms=T0)
    except CipherFaceError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([encode(m) for m in sample_messages()]),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_decode_mutated_messages_raises_only_project_errors(
    data: bytes, edits: list[tuple[int, int]]
) -> None:
    buf = bytearray(data)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    try:
        msg = decode(bytes(buf), now_ms=T0)
    except CipherFaceError:
        return
    assert decode(encode(msg)) == msg  # anything accepted is a valid message


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sample_messages()),
    st.sampled_from(["v", "t", "id", "corr", "site", "gw", "kid", "ts", "exp"]),
    _scalars,
)
def test_decode_with_any_header_value_raises_only_remote_errors(
    msg: Envelope, key: str, value: Any
) -> None:
    wire = wire_of(msg)
    wire[key] = value
    try:
        data = pack(wire)
    except (OverflowError, ValueError, TypeError):
        return
    try:
        decode(data)
    except RemoteError as exc:
        assert isinstance(exc.code, str)


# ----------------------------------------------------------------------- topics
def test_topic_builders() -> None:
    assert request_topic(SITE, GW, "enroll") == "cipherface/v1/plant-7/req/door_1/enroll"
    assert request_topic(SITE, GW, "key.publish") == "cipherface/v1/plant-7/req/door_1/key"
    assert request_topic(SITE, GW, "ids.get") == "cipherface/v1/plant-7/req/door_1/ids"
    assert result_topic(SITE, GW) == "cipherface/v1/plant-7/res/door_1"
    assert error_topic(SITE, GW) == "cipherface/v1/plant-7/err/door_1"
    assert events_topic(SITE, GW) == "cipherface/v1/plant-7/events/door_1"
    assert status_topic(SITE, GW) == "cipherface/v1/plant-7/status/door_1"
    assert cloud_status_topic("worker-1") == "cipherface/v1/cloud/status/worker-1"
    assert cloud_request_filter() == "$share/cipherface-cloud/cipherface/v1/+/req/+/+"
    assert CLOUD_SHARE_GROUP == "cipherface-cloud"
    assert edge_reply_filters(SITE, GW) == (result_topic(SITE, GW), error_topic(SITE, GW))
    assert events_filter() == "cipherface/v1/+/events/+"
    assert status_filter(SITE) == "cipherface/v1/plant-7/status/+"


@pytest.mark.parametrize("bad", BAD_TOPIC_IDS)
def test_topic_builders_refuse_bad_ids(bad: str) -> None:
    with pytest.raises(InvalidArgumentError):
        request_topic(bad, GW, "verify")
    with pytest.raises(InvalidArgumentError):
        result_topic(SITE, bad)
    with pytest.raises(InvalidArgumentError):
        cloud_status_topic(bad)
    with pytest.raises(InvalidArgumentError):
        validate_id(bad)


def test_reserved_site_and_unknown_op() -> None:
    with pytest.raises(InvalidArgumentError, match="reserved"):
        request_topic("cloud", GW, "verify")
    assert validate_id("cloud") == "cloud"  # fine as a gateway or agent id
    with pytest.raises(InvalidArgumentError, match="reserved"):
        validate_id("cloud", what="site")
    with pytest.raises(InvalidArgumentError):
        request_topic(SITE, GW, "result")


@pytest.mark.parametrize("op", OPS)
def test_parse_request_topic_round_trip(op: str) -> None:
    rt = parse_request_topic(request_topic(SITE, GW, op))
    assert rt == RequestTopic(site=SITE, gateway=GW, op=op)
    assert request_topic(rt.site, rt.gateway, rt.message_type) == request_topic(SITE, GW, op)


@pytest.mark.parametrize(
    "topic",
    [
        "cipherface/v1/plant-7/req/door_1",
        "cipherface/v1/plant-7/req/door_1/enroll/x",
        "cipherface/v1/plant-7/req/door_1/Enroll",
        "cipherface/v1/plant-7/req/door_1/+",
        "cipherface/v1/+/req/door_1/enroll",
        "cipherface/v1/plant-7/req/#",
        "cipherface/v1/plant-7/req//enroll",
        "cipherface/v1/PLANT/req/door_1/enroll",
        "/cipherface/v1/plant-7/req/door_1/enroll",
        "cipherface/v2/plant-7/req/door_1/enroll",
        "$share/g/cipherface/v1/plant-7/req/door_1/enroll",
        "cipherface/v1/cloud/req/door_1/enroll",
        "cipherface/v1/plant-7/res/door_1",
        "cipherface/v1/plant-7/req/" + "a" * 64 + "/enroll",
        "",
        "cipherface/v1/plant-7/req/door_1/enroll" + "/x" * 300,
    ],
)
def test_parse_request_topic_rejects(topic: str) -> None:
    with pytest.raises(ValidationError):
        parse_request_topic(topic)


def test_parse_topic_kinds() -> None:
    assert parse_topic(result_topic(SITE, GW)).kind == "res"
    assert parse_topic(error_topic(SITE, GW)).kind == "err"
    assert parse_topic(events_topic(SITE, GW)).kind == "events"
    assert parse_topic(status_topic(SITE, GW)).kind == "status"
    t = parse_topic(cloud_status_topic("w1"))
    assert (t.kind, t.site, t.gateway, t.op) == ("cloud_status", "cloud", "w1", None)
    for bad in ("cipherface/v1/plant-7/foo/door_1", "cipherface/v1/cloud/res/w1", "x/y"):
        with pytest.raises(ValidationError):
            parse_topic(bad)


# ---------------------------------------------------------------- reply helpers
def test_result_for_and_error_for() -> None:
    req = Identify(**_hdr(), probe=b"p", ids_version=1)
    res = result_for(req, ids_version=2, scores=b"s", count=2, ids=["a", "b"])
    assert (res.corr, res.site, res.gw, res.kid, res.op) == (req.id, SITE, GW, KID, "identify")
    assert res.ids == ("a", "b")

    err = error_for(UnknownIdentityError("bob"), site=SITE, gw=GW, corr=req.id)
    assert (err.code, err.message, err.retry, err.corr) == (
        "unknown_identity",
        "bob",
        False,
        req.id,
    )
    assert error_for(ExpiredError("late"), site=SITE, gw=GW, corr=None).retry is True
    assert error_for(KeyMismatchError("k"), site=SITE, gw=GW, corr=None).code == "key_mismatch"

    hidden = error_for(OSError("/secret/path leaked"), site=SITE, gw=GW, corr=None)
    assert (hidden.code, hidden.message, hidden.retry) == ("error", "internal error", True)

    long = error_for(DecodeError("\x00bad" * 1000), site=SITE, gw=GW, corr=None)
    assert len(long.message) == 1024 and "\x00" not in long.message
    assert decode(encode(long)) == long


def test_mqtt5_helpers() -> None:
    mid = new_message_id()
    assert correlation_data(mid) == mid.encode("ascii")
    with pytest.raises(InvalidArgumentError):
        correlation_data("nope")
    assert expiry_interval_s(None, T0) is None
    assert expiry_interval_s(T0 + 1001, T0) == 2
    assert expiry_interval_s(T0 + 1000, T0) == 1
    assert expiry_interval_s(T0 - 5000, T0) == 1


# ------------------------------------------------------------------ ReplyCache
def test_reply_cache_claim_put_get() -> None:
    cache = ReplyCache(max_entries=10, ttl=60)
    req = Enroll(**_hdr(), ids=("a",), payload=b"x")
    key = dedup_key(req)
    assert key == (SITE, GW, req.id)
    assert cache.claim(key, now=0).state == "new"
    assert cache.claim(key, now=1).state == "in_progress"  # a copy is being processed
    assert cache.get(key, now=1) is None
    reply = encode(result_for(req, ids_version=1, enrolled=1))
    cache.put(key, reply, now=2)
    again = cache.claim(key, now=3)
    assert again.state == "done" and again.reply == reply
    assert cache.get(key, now=3) == reply
    assert cache.nbytes == len(reply)
    # Scoped by sender: the same id from another gateway is another request.
    assert cache.claim((SITE, "door_2", req.id), now=3).state == "new"


def test_reply_cache_ttl() -> None:
    cache = ReplyCache(ttl=10)
    cache.put("k", b"reply", now=100)
    assert cache.get("k", now=109.9) == b"reply"
    assert cache.get("k", now=110) is None
    assert len(cache) == 0 and cache.nbytes == 0
    cache.put("a", b"1", now=0)
    cache.put("b", b"2", now=5)
    assert cache.expire(now=12) == 1
    assert cache.get("b", now=12) == b"2"
    # A stale in-progress claim (crashed handler) frees itself.
    assert cache.claim("c", now=0).state == "new"
    assert cache.claim("c", now=11).state == "new"


def test_reply_cache_lru_by_entries_and_bytes() -> None:
    cache = ReplyCache(max_entries=3, max_bytes=100, ttl=1000)
    for i in range(3):
        cache.put(i, bytes([i]) * 10, now=i)
    assert cache.get(0, now=4) is not None  # 0 becomes most recent
    cache.put(3, b"x" * 10, now=5)  # evicts 1, the least recently used
    assert cache.get(1, now=6) is None
    assert {k for k in range(4) if cache.get(k, now=6)} == {0, 2, 3}
    cache.put(4, b"y" * 90, now=7)  # bytes bound: evicts until <= 100
    assert cache.nbytes <= 100 and cache.get(4, now=8) == b"y" * 90
    cache.put(5, b"z" * 101, now=9)  # larger than the whole budget: not cached
    assert cache.get(5, now=9) is None and cache.nbytes <= 100


def test_reply_cache_release() -> None:
    cache = ReplyCache()
    assert cache.claim("k", now=0).state == "new"
    cache.release("k")  # transient failure: let the retry run again
    assert cache.claim("k", now=1).state == "new"
    with pytest.raises(InvalidArgumentError):
        ReplyCache(max_entries=0)


# ------------------------------------------------------------- PendingRequests
def _reply_to(req: Any, **kw: Any) -> Result:
    if isinstance(req, IdsGet):  # an ids.get result is always a page
        kw = {"ids": (), "offset": 0, "total": 0, **kw}
    return result_for(req, ids_version=1, **kw)


def test_pending_match_and_unknown() -> None:
    pending = PendingRequests()
    req = Verify(**_hdr(), identity="a", probe=b"p")
    entry = pending.register(req, deadline=10.0, context="ctx")
    assert req.id in pending and len(pending) == 1 and entry.request_id == req.id
    reply = _reply_to(req, scores=b"s", count=1)
    got = pending.match(reply)
    assert isinstance(got, Matched) and got.pending.context == "ctx" and got.reply is reply
    assert len(pending) == 0
    dup = pending.match(reply)  # the cloud answered a redelivered request again
    assert isinstance(dup, Unmatched) and dup.reason == "answered"
    stranger = Result(**_hdr(corr=new_message_id()), op="verify", ids_version=1)
    unk = pending.match(stranger)
    assert isinstance(unk, Unmatched) and unk.reason == "unknown" and unk.reply is stranger
    no_corr = pending.match(Error(**_hdr(corr=None), code="malformed", message="?"))
    assert isinstance(no_corr, Unmatched) and no_corr.reason == "no_corr"


def test_pending_mismatch_keeps_waiting() -> None:
    pending = PendingRequests()
    req = Verify(**_hdr(), identity="a", probe=b"p")
    pending.register(req, deadline=10.0)
    wrong_op = Result(**_hdr(corr=req.id), op="identify", ids_version=1)
    wrong_gw = Result(**_hdr(corr=req.id, gw="door_2"), op="verify", ids_version=1)
    for bad in (wrong_op, wrong_gw):
        got = pending.match(bad)
        assert isinstance(got, Unmatched) and got.reason == "mismatch"
        assert got.pending is not None and got.pending.request is req
    assert req.id in pending
    err = error_for(ExpiredError("late"), site=SITE, gw=GW, corr=req.id)
    assert isinstance(pending.match(err), Matched)


def test_pending_expiry_and_retry() -> None:
    pending = PendingRequests()
    a = IdsGet(**_hdr())
    b = IdsGet(**_hdr())
    c = IdsGet(**_hdr())
    pending.register(b, deadline=20.0)
    pending.register(a, deadline=10.0)
    pending.register(c, deadline=30.0)
    assert pending.next_deadline() == 10.0
    assert pending.expired(now=5.0) == []
    gone = pending.expired(now=20.0)
    assert [p.request for p in gone] == [a, b]
    assert pending.next_deadline() == 30.0
    late = pending.match(_reply_to(a))
    assert isinstance(late, Unmatched) and late.reason == "timed_out"
    # Retry: the same request (same id) registered again with the next attempt number.
    again = pending.register(gone[1].request, deadline=40.0, attempt=gone[1].attempt + 1)
    assert again.attempt == 2
    got = pending.match(_reply_to(b))
    assert isinstance(got, Matched) and got.pending.attempt == 2
    assert pending.cancel(c.id) is not None and pending.next_deadline() is None


def test_pending_limits() -> None:
    pending = PendingRequests(max_pending=1, history=2)
    req = IdsGet(**_hdr())
    pending.register(req, deadline=1.0)
    with pytest.raises(InvalidArgumentError, match="already pending"):
        pending.register(req, deadline=2.0)
    with pytest.raises(InvalidArgumentError, match="pending"):
        pending.register(IdsGet(**_hdr()), deadline=2.0)
    # History is bounded: old finished ids become "unknown".
    pending = PendingRequests(history=2)
    reqs = [IdsGet(**_hdr()) for _ in range(3)]
    for r in reqs:
        pending.register(r, deadline=1.0)
        pending.match(_reply_to(r))
    reasons = [pending.match(_reply_to(r)).reason for r in reqs]
    assert reasons == ["unknown", "answered", "answered"]


# ----------------------------------------------------------------- test vector
# The same bytes are printed in docs/protocol.md section 15.
VECTOR_HEX = (
    "8aa17601a174a6766572696679a26964d9203030313132323333343435353636373738383939"
    "616162626363646465656666a4636f7272c0a473697465a7706c616e742d37a26777a6646f6f"
    "725f31a36b6964d9203031323334353637383961626364656630313233343536373839616263"
    "646566a27473cf0000018bcfe56800a3657870cf0000018bcfe5dd30a16282a86964656e7469"
    "7479a5616c696365a570726f6265c403010203"
)


def test_documented_body_keys_match_the_messages() -> None:
    """docs/protocol.md section 6 lists every body key, in the encoder's order."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## 6 Messages") : doc.index("## 7 Decoding")]
    documented: dict[str, list[str]] = {}
    for part in section.split("\n### 6.")[1:]:
        heading, _, text = part.partition("\n")
        mtype = heading.split("`")[1]
        table = text[text.index("| Key | Type | Constraint |") :].split("\n\n")[0]
        documented[mtype] = [row.split("`")[1] for row in table.splitlines()[2:]]
    assert documented == {t: list(cls.body_fields()) for t, cls in MESSAGE_TYPES.items()}


def test_documented_vector() -> None:
    msg = Verify(
        site="plant-7",
        gw="door_1",
        id="00112233445566778899aabbccddeeff",
        kid="0123456789abcdef0123456789abcdef",
        ts=1_700_000_000_000,
        exp=1_700_000_030_000,
        identity="alice",
        probe=b"\x01\x02\x03",
    )
    assert encode(msg).hex() == VECTOR_HEX
    assert decode(bytes.fromhex(VECTOR_HEX)) == msg
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    assert VECTOR_HEX in "".join(doc.split())
