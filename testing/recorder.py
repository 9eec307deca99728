"""Record every message on some topics, as an integrator's automation would see it.

A :class:`Recorder` is a plain MQTT 5 subscriber of its own. Each message is kept
as a :class:`Recorded`: its topic, raw payload, retain flag, ``data`` (the JSON value
when the payload is JSON, else the msgpack value, else None) and ``kind``, read from
the topic:

* ``"event"``     -- an integrator JSON event, ``cipherface/v1/<site>/json/<gw>/events/<camera>``
* ``"person"``    -- the same JSON for a match, on ``.../json/<gw>/people/<person>``
* ``"availability"`` -- a camera gateway's retained ``online`` / ``offline``
* ``"discovery"`` -- a Home Assistant discovery config, ``<prefix>/<component>/.../config``
* ``"decision"``  -- the protocol's msgpack decision, ``cipherface/v1/<site>/events/<gw>``
* ``"other"``     -- anything else.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cipherface.agents.mqtt import BrokerConfig
from cipherface.errors import BrokerConnectionError, RemoteError

Predicate = Callable[["Recorded"], bool]
JsonPredicate = Callable[[dict[str, Any]], bool]

_LEVEL = r"[^/]+"
_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("event", re.compile(rf"^cipherface/v1/{_LEVEL}/json/{_LEVEL}/events/{_LEVEL}$")),
    ("person", re.compile(rf"^cipherface/v1/{_LEVEL}/json/{_LEVEL}/people/{_LEVEL}$")),
    ("availability", re.compile(rf"^cipherface/v1/{_LEVEL}/json/{_LEVEL}/availability$")),
    ("decision", re.compile(rf"^cipherface/v1/{_LEVEL}/events/{_LEVEL}$")),
    ("discovery", re.compile(rf"^{_LEVEL}/{_LEVEL}/(?:{_LEVEL}/)?{_LEVEL}/config$")),
)


def topic_kind(topic: str) -> str:
    """What a topic carries: ``event``, ``person``, ``availability``, ``decision``,
    ``discovery`` or ``other`` (see the module's docstring)."""
    for kind, pattern in _KINDS:
        if pattern.match(topic):
            return kind
    return "other"


def integrator_filters(site: str, *, discovery_prefix: str = "homeassistant") -> list[str]:
    """The topics a site's integrators read: every gateway's JSON events, people and
    availability, the protocol's msgpack decisions, and Home Assistant discovery.

    Args:
        site: the site id.
        discovery_prefix: Home Assistant's discovery prefix.

    Returns:
        MQTT topic filters.

    Raises:
        InvalidArgumentError: a bad site id.
    """
    from cipherface.protocol.topics import PREFIX, validate_id

    base = f"{PREFIX}/{validate_id(site, what='site')}"
    return [f"{base}/json/#", f"{base}/events/+", f"{discovery_prefix}/#"]


@dataclass(frozen=True, kw_only=True)
class Recorded:
    """One message as it arrived.

    Args:
        topic: its topic.
        payload: its bytes.
        retain: whether the broker delivered it as a retained message.
        qos: its QoS.
        data: the decoded payload: JSON when it parses, else msgpack, else None.
        encoding: ``"json"``, ``"msgpack"``, ``"empty"`` or ``"bytes"`` (neither).
    """

    topic: str
    payload: bytes
    retain: bool
    qos: int
    data: Any
    encoding: str

    @property
    def kind(self) -> str:
        """What the topic carries (:func:`topic_kind`)."""
        return topic_kind(self.topic)

    @property
    def event(self) -> dict[str, Any] | None:
        """The integrator JSON event (``event_type``, ``identity``, ``match``...) of an
        ``event`` topic, or None."""
        if self.kind == "event" and self.encoding == "json" and isinstance(self.data, dict):
            return self.data
        return None

    @property
    def discovery(self) -> dict[str, Any] | None:
        """The Home Assistant discovery config of a ``discovery`` topic, or None (an
        empty retained payload deletes the entity)."""
        if self.kind == "discovery" and self.encoding == "json" and isinstance(self.data, dict):
            return self.data
        return None

    @property
    def decision(self) -> dict[str, Any] | None:
        """The protocol's msgpack decision of a ``decision`` topic as JSON (``op,
        identity, match, latency_ms, photo, site, gateway, id, ts``), or None."""
        if self.kind != "decision" or self.encoding != "msgpack":
            return None
        from cipherface.agents.edge import decision_json
        from cipherface.protocol import Decision, decode

        try:
            msg = decode(self.payload)
        except RemoteError:
            return None
        return decision_json(msg) if isinstance(msg, Decision) else None


def _decode(payload: bytes) -> tuple[Any, str]:
    if not payload:
        return None, "empty"
    try:
        return json.loads(payload), "json"
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False), "msgpack"
    except (ValueError, msgpack.UnpackException):
        return None, "bytes"


class Recorder:
    """Subscribe to ``filters`` and keep every message (thread-safe).

    Use as a context manager, or call :meth:`close`.

    Args:
        url: the broker (``mqtt://host:port``).
        filters: MQTT topic filters (``+`` / ``#`` allowed).
        username: broker account, if the broker wants one.
        password: its password.
        timeout: seconds to wait for the connection and the SUBACK.

    Raises:
        BrokerConnectionError: no connection or no SUBACK in time.
    """

    def __init__(
        self,
        *,
        url: str,
        filters: Sequence[str],
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.filters = tuple(filters)
        self.messages: list[Recorded] = []
        self._cond = threading.Condition()
        cfg = BrokerConfig(url=url)
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"cipherface-recorder-{secrets.token_hex(4)}",
            protocol=paho.MQTTv5,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        subscribed = threading.Event()
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in self.filters])
        try:
            self._client.connect(cfg.host, cfg.port)
        except OSError as exc:
            raise BrokerConnectionError(f"recorder cannot reach {url}: {exc}") from exc
        self._client.loop_start()
        if not subscribed.wait(timeout):
            self.close()
            raise BrokerConnectionError(f"recorder got no SUBACK from {url} in {timeout:g} s")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        data, encoding = _decode(payload)
        rec = Recorded(
            topic=msg.topic,
            payload=payload,
            retain=bool(msg.retain),
            qos=msg.qos,
            data=data,
            encoding=encoding,
        )
        with self._cond:
            self.messages.append(rec)
            self._cond.notify_all()

    def snapshot(self) -> list[Recorded]:
        """A copy of the messages so far."""
        with self._cond:
            return list(self.messages)

    def wait_for(
        self,
        predicate: Predicate | None = None,
        *,
        topic: str | None = None,
        timeout: float = 30.0,
    ) -> Recorded:
        """The first message (already recorded or still to come) that matches.

        Args:
            predicate: a test on the :class:`Recorded` (default: any).
            topic: also require this exact topic.
            timeout: seconds to wait.

        Returns:
            The message.

        Raises:
            TimeoutError: none in time (the message lists the topics seen).
        """

        def ok(rec: Recorded) -> bool:
            return (topic is None or rec.topic == topic) and (predicate is None or predicate(rec))

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self.messages:
                    if ok(rec):
                        return rec
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({r.topic for r in self.messages})
                    raise TimeoutError(
                        f"no matching message on {list(self.filters)} in {timeout:g} s "
                        f"(topics seen: {seen or 'none'})"
                    )
                self._cond.wait(left)

    def _wait_json(
        self, attr: str, predicate: JsonPredicate | None, timeout: float
    ) -> dict[str, Any]:
        def ok(rec: Recorded) -> bool:
            value = getattr(rec, attr)
            return value is not None and (predicate is None or bool(predicate(value)))

        found: dict[str, Any] = getattr(self.wait_for(ok, timeout=timeout), attr)
        return found

    def events(self) -> list[dict[str, Any]]:
        """Every integrator JSON event so far (camera topics), in arrival order."""
        return [e for e in (r.event for r in self.snapshot()) if e is not None]

    def wait_for_event(
        self, predicate: JsonPredicate | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first integrator JSON event that ``predicate`` accepts.

        Raises:
            TimeoutError: none in time.
        """
        return self._wait_json("event", predicate, timeout)

    def discovery(self) -> dict[str, dict[str, Any]]:
        """Home Assistant discovery configs so far: topic -> config (the latest)."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.snapshot():
            if rec.discovery is not None:
                out[rec.topic] = rec.discovery
        return out

    def wait_for_discovery(
        self, predicate: JsonPredicate | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first Home Assistant discovery config that ``predicate`` accepts.

        Raises:
            TimeoutError: none in time.
        """
        return self._wait_json("discovery", predicate, timeout)

    def decisions(self) -> list[dict[str, Any]]:
        """Every msgpack protocol decision so far, as JSON dicts, in arrival order."""
        return [d for d in (r.decision for r in self.snapshot()) if d is not None]

    def wait_for_decision(
        self, predicate: JsonPredicate | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first protocol decision (as JSON) that ``predicate`` accepts.

        Raises:
            TimeoutError: none in time.
        """
        return self._wait_json("decision", predicate, timeout)

    def clear(self) -> None:
        """Forget what was recorded so far."""
        with self._cond:
            self.messages.clear()

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Recorded", "Recorder", "integrator_filters", "topic_kind"]
