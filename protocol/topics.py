"""MQTT topic tree: builders, subscription filters and a strict parser.

Every topic is ``cipherface/v1/<site>/<kind>/<gateway>[/<op>]`` (lowercase,
general to specific, no leading slash) except the cloud agents' status,
``cipherface/v1/cloud/status/<agent_id>``. Ids that become topic levels must
match :data:`ID_PATTERN`, so they can never hold ``+``, ``#``, ``/`` or ``$``:
a gateway cannot reach another's topics by choosing a clever name. The site
name ``cloud`` is reserved for the cloud's status topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, cast

from cipherface.errors import InvalidArgumentError, ValidationError

PREFIX: Final = "cipherface/v1"
ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ID_RE: Final = re.compile(ID_PATTERN)
RESERVED_SITES: Final = frozenset({"cloud"})

#: Topic ``<op>`` levels of requests, in the order of the spec.
OPS: Final = ("key", "enroll", "delete", "verify", "identify", "ids", "export", "retire")
#: Request message type (envelope ``t``) -> topic ``<op>``.
OP_FOR_TYPE: Final = {
    "key.publish": "key",
    "enroll": "enroll",
    "delete": "delete",
    "verify": "verify",
    "identify": "identify",
    "ids.get": "ids",
    "gallery.export": "export",
    "key.retire": "retire",
}
#: Topic ``<op>`` -> request message type.
TYPE_FOR_OP: Final = {op: t for t, op in OP_FOR_TYPE.items()}

CLOUD_SHARE_GROUP: Final = "cipherface-cloud"
#: Every request of every site and gateway (non-shared form).
REQUEST_FILTER: Final = f"{PREFIX}/+/req/+/+"

TopicKind = Literal["req", "res", "err", "events", "status", "cloud_status"]
_SITE_KINDS: Final = frozenset({"req", "res", "err", "events", "status"})


def is_valid_id(value: object) -> bool:
    """Tell whether ``value`` is a usable site, gateway or agent id.

    Args:
        value: anything.

    Returns:
        True for a ``str`` matching :data:`ID_PATTERN`.
    """
    # fullmatch: "$" alone would accept a trailing newline.
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object, *, what: str = "id") -> str:
    """Check a site, gateway or agent id (a single topic level).

    Args:
        value: the candidate id.
        what: what it names, for the error message (``"site"``, ``"gateway"``...).
            ``"site"`` also refuses the reserved names (``cloud``).

    Returns:
        ``value``, unchanged.

    Raises:
        InvalidArgumentError: not a str, or not 1..63 chars of ``[a-z0-9_-]``
            starting with ``[a-z0-9]``, or a reserved site name.
    """
    if not is_valid_id(value):
        raise InvalidArgumentError(f"bad {what} {value!r}: must match {ID_PATTERN}")
    assert isinstance(value, str)
    if what == "site" and value in RESERVED_SITES:
        raise InvalidArgumentError(f"site name {value!r} is reserved")
    return value


def _site_topic(kind: str, site: str, gateway: str) -> str:
    validate_id(site, what="site")
    validate_id(gateway, what="gateway")
    return f"{PREFIX}/{site}/{kind}/{gateway}"


def request_topic(site: str, gateway: str, op: str) -> str:
    """Topic an edge gateway publishes a request on.

    Args:
        site: the site id.
        gateway: the gateway id.
        op: one of :data:`OPS`, or a request message type (``"key.publish"``...).

    Returns:
        ``cipherface/v1/<site>/req/<gateway>/<op>``.

    Raises:
        InvalidArgumentError: a bad id or an unknown op.
    """
    op = OP_FOR_TYPE.get(op, op)
    if op not in OPS:
        raise InvalidArgumentError(f"unknown request op {op!r}; expected one of {OPS}")
    return f"{_site_topic('req', site, gateway)}/{op}"


def result_topic(site: str, gateway: str) -> str:
    """Topic the cloud publishes results for this gateway on (MQTT5 ResponseTopic).

    Raises:
        InvalidArgumentError: a bad id.
    """
    return _site_topic("res", site, gateway)


def error_topic(site: str, gateway: str) -> str:
    """Topic the cloud publishes error messages for this gateway on.

    Raises:
        InvalidArgumentError: a bad id.
    """
    return _site_topic("err", site, gateway)


def events_topic(site: str, gateway: str) -> str:
    """Topic the edge publishes its decisions on (for the site's integrators).

    Raises:
        InvalidArgumentError: a bad id.
    """
    return _site_topic("events", site, gateway)


def status_topic(site: str, gateway: str) -> str:
    """Retained online/offline topic of an edge gateway (its last will).

    Raises:
        InvalidArgumentError: a bad id.
    """
    return _site_topic("status", site, gateway)


def cloud_status_topic(agent_id: str) -> str:
    """Retained online/offline topic of a cloud agent (its last will).

    Raises:
        InvalidArgumentError: a bad id.
    """
    validate_id(agent_id, what="agent id")
    return f"{PREFIX}/cloud/status/{agent_id}"


def cloud_request_filter(group: str = CLOUD_SHARE_GROUP) -> str:
    """Shared-subscription filter the cloud workers subscribe to (QoS 1).

    Args:
        group: the share group; workers in one group split the requests.

    Returns:
        ``$share/<group>/cipherface/v1/+/req/+/+``.

    Raises:
        InvalidArgumentError: a bad group name.
    """
    validate_id(group, what="share group")
    return f"$share/{group}/{REQUEST_FILTER}"


def edge_reply_filters(site: str, gateway: str) -> tuple[str, str]:
    """The two topics an edge gateway subscribes to: its results and its errors.

    Raises:
        InvalidArgumentError: a bad id.
    """
    return result_topic(site, gateway), error_topic(site, gateway)


def events_filter(site: str | None = None) -> str:
    """Filter for the decisions of one site (or of every site when ``site`` is None).

    Raises:
        InvalidArgumentError: a bad id.
    """
    level = "+" if site is None else validate_id(site, what="site")
    return f"{PREFIX}/{level}/events/+"


def status_filter(site: str | None = None) -> str:
    """Filter for the edge statuses of one site (or of every site).

    Raises:
        InvalidArgumentError: a bad id.
    """
    level = "+" if site is None else validate_id(site, what="site")
    return f"{PREFIX}/{level}/status/+"


CLOUD_STATUS_FILTER: Final = f"{PREFIX}/cloud/status/+"


@dataclass(frozen=True, kw_only=True)
class Topic:
    """A parsed topic of the tree.

    Args:
        kind: ``req``, ``res``, ``err``, ``events``, ``status`` or ``cloud_status``.
        site: the site id (``"cloud"`` for ``cloud_status``).
        gateway: the gateway id (the agent id for ``cloud_status``).
        op: the request op (``req`` only), else None.
    """

    kind: TopicKind
    site: str
    gateway: str
    op: str | None = None


@dataclass(frozen=True, kw_only=True)
class RequestTopic:
    """A parsed request topic.

    Args:
        site: the site id.
        gateway: the gateway id.
        op: one of :data:`OPS`.
    """

    site: str
    gateway: str
    op: str

    @property
    def message_type(self) -> str:
        """The message type (envelope ``t``) this op carries."""
        return TYPE_FOR_OP[self.op]


def parse_topic(topic: str) -> Topic:
    """Parse any topic of the tree, refusing everything else.

    Args:
        topic: a topic name as the broker delivered it (no wildcards).

    Returns:
        The parsed :class:`Topic`.

    Raises:
        ValidationError: not a str, not in the tree, a bad id or an unknown op.
    """
    if not isinstance(topic, str) or len(topic) > 512:
        raise ValidationError(f"not a cipherface topic: {topic!r:.80}")
    levels = topic.split("/")
    if len(levels) < 5 or "/".join(levels[:2]) != PREFIX:
        raise ValidationError(f"not a cipherface/v1 topic: {topic!r}")
    site, kind, gateway, rest = levels[2], levels[3], levels[4], levels[5:]
    if not is_valid_id(site) or not is_valid_id(gateway):
        raise ValidationError(f"bad site or gateway id in topic {topic!r}")
    if site == "cloud":
        if kind != "status" or rest:
            raise ValidationError(f"unknown cloud topic {topic!r}")
        return Topic(kind="cloud_status", site=site, gateway=gateway)
    if kind not in _SITE_KINDS:
        raise ValidationError(f"unknown topic kind {kind!r} in {topic!r}")
    if kind == "req":
        if len(rest) != 1 or rest[0] not in OPS:
            raise ValidationError(f"bad request op in topic {topic!r}; expected one of {OPS}")
        return Topic(kind="req", site=site, gateway=gateway, op=rest[0])
    if rest:
        raise ValidationError(f"too many levels in topic {topic!r}")
    return Topic(kind=cast(TopicKind, kind), site=site, gateway=gateway)


def parse_request_topic(topic: str) -> RequestTopic:
    """Parse a request topic ``cipherface/v1/<site>/req/<gateway>/<op>``.

    Args:
        topic: the topic the request arrived on.

    Returns:
        ``RequestTopic(site, gateway, op)``.

    Raises:
        ValidationError: anything but a well-formed request topic.
    """
    parsed = parse_topic(topic)
    if parsed.kind != "req" or parsed.op is None:
        raise ValidationError(f"not a request topic: {topic!r}")
    return RequestTopic(site=parsed.site, gateway=parsed.gateway, op=parsed.op)


__all__ = [
    "CLOUD_SHARE_GROUP",
    "CLOUD_STATUS_FILTER",
    "ID_PATTERN",
    "OPS",
    "OP_FOR_TYPE",
    "PREFIX",
    "REQUEST_FILTER",
    "RESERVED_SITES",
    "TYPE_FOR_OP",
    "RequestTopic",
    "Topic",
    "TopicKind",
    "cloud_request_filter",
    "cloud_status_topic",
    "edge_reply_filters",
    "error_topic",
    "events_filter",
    "events_topic",
    "is_valid_id",
    "parse_request_topic",
    "parse_topic",
    "request_topic",
    "result_topic",
    "status_filter",
    "status_topic",
    "validate_id",
]
