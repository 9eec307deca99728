"""Shared paho-mqtt plumbing for the agents: broker settings, TLS, TCP_NODELAY, sessions.

Both agents talk to the broker through :class:`Connection`, a thin owner of one
paho 2.x client that

* speaks MQTT 5 (default) or MQTT 3.1.1 -- ``persistent=True`` means
  ``clean_start=False`` plus a session expiry on MQTT 5 and ``clean_session=False``
  on MQTT 3.1.1, so QoS 1 messages sent while the client is away are queued;
* sets ``TCP_NODELAY`` on its socket (Nagle + delayed ACK turn a 1 ms round trip
  into 40 ms; FACTS "MQTT");
* runs paho's network loop in its own thread and reconnects by itself; the
  ``on_connected`` hook (subscriptions, a retained status) runs after every CONNACK;
* refuses to start when the broker refuses us instead of retrying forever, with an
  error that names the cause (:func:`connect_error`): ``broker_auth`` (credentials),
  ``broker_tls`` (certificate verification, unreadable CA file), ``broker_dns``
  (unknown host), ``broker_refused`` (nothing listens), ``broker_unreachable`` (no
  answer in time);
* logs losing and regaining the connection at WARNING (the default level), and
  counts reconnections (``reconnects``) for the metrics;
* tells its owner when a live connection is lost (``on_lost``, before paho
  reconnects), and can :meth:`~Connection.stand_down` from any thread, paho's
  included: disconnect for good, no reconnection, the session left on the broker
  (the cloud agent does when another process has taken its client id over).

Nothing here knows the protocol: payloads are bytes.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cipherface.agents.broker import UrlParts, parse_broker_url
from cipherface.errors import (
    BrokerAuthError,
    BrokerConnectionError,
    BrokerDnsError,
    BrokerRefusedError,
    BrokerTlsError,
    InvalidArgumentError,
)

RECEIVE_MAXIMUM = 10  # QoS 1 requests in flight to one client (MQTT 5)
log = logging.getLogger(__name__)

MqttVersion = Literal["5", "3.1.1"]
MQTT_VERSIONS: Final = ("5", "3.1.1")
DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"
#: How long the broker keeps a persistent session (and its queued requests) after
#: the client goes away: a week, well past any planned maintenance.
DEFAULT_SESSION_EXPIRY_S: Final = 7 * 24 * 3600


class _QuietShutdown(logging.Filter):
    """Drop paho's ERROR "Client is not connected" logged by its loop thread after a
    clean ``disconnect()`` (a race inside paho 2.2: harmless, but alarming in a CLI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


PAHO_LOGGER: Final = logging.getLogger("cipherface.agents.paho")
PAHO_LOGGER.addFilter(_QuietShutdown())

MessageHandler = Callable[[paho.MQTTMessage], None]
ConnectedHook = Callable[["Connection", bool], None]


@dataclass(frozen=True, kw_only=True)
class BrokerConfig(UrlParts):
    """Where the broker is and how to log in.

    Args:
        url: ``mqtt://host[:port]`` (plain, default port 1883) or ``mqtts://host[:port]``
            (TLS, default 8883).
        username: broker account, or None for anonymous (development brokers only).
        password: its password.
        ca_file: CA certificate (PEM) that signed the broker's certificate; None with
            ``mqtts://`` uses the system's trust store.
        cert_file: client certificate (PEM) for mutual TLS.
        key_file: its private key (PEM).
        mqtt_version: ``"5"`` (default) or ``"3.1.1"``.
        keepalive: seconds between pings when idle.
        connect_timeout: seconds to wait for the first CONNACK.

    Raises:
        InvalidArgumentError: a malformed URL, an unknown MQTT version, a password
            without a username, or a certificate without its key.
    """

    url: str = DEFAULT_BROKER
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt_version: MqttVersion = "5"
    keepalive: int = 60
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        parse_broker_url(self.url)
        if self.mqtt_version not in MQTT_VERSIONS:
            raise InvalidArgumentError(
                f"MQTT version {self.mqtt_version!r}: expected one of {MQTT_VERSIONS}"
            )
        if self.password is not None and not self.username:
            raise InvalidArgumentError("a broker password needs a username")
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgumentError("a client certificate needs its key (and vice versa)")
        if not 5 <= self.keepalive <= 65535:
            raise InvalidArgumentError(f"keepalive {self.keepalive} outside [5, 65535] s")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> BrokerConfig:
        """Build a config from ``CIPHERFACE_BROKER`` / ``_USERNAME`` / ``_PASSWORD`` / ``_CA``.

        Args:
            env: the environment (default ``os.environ``).
            overrides: fields that win over the environment (None values are ignored).

        Returns:
            The config.

        Raises:
            InvalidArgumentError: see the class.
        """
        environ = os.environ if env is None else env
        fields: dict[str, Any] = {
            "url": environ.get("CIPHERFACE_BROKER") or DEFAULT_BROKER,
            "username": environ.get("CIPHERFACE_USERNAME") or None,
            "password": environ.get("CIPHERFACE_PASSWORD") or None,
            "ca_file": environ.get("CIPHERFACE_CA") or None,
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def with_version(self, mqtt_version: MqttVersion) -> BrokerConfig:
        """A copy speaking another MQTT version."""
        return replace(self, mqtt_version=mqtt_version)


#: CONNACK reason codes that mean "your credentials" (MQTT 5 134/135; paho maps the
#: MQTT 3.1.1 return codes 4 and 5 onto them).
_AUTH_REASONS: Final = frozenset({134, 135})
_CREDENTIALS_HINT: Final = (
    "check --username/--password (env CIPHERFACE_USERNAME / CIPHERFACE_PASSWORD)"
)


def connect_error(cfg: BrokerConfig, exc: BaseException) -> BrokerConnectionError:
    """The project error naming why a connection attempt to ``cfg`` failed.

    Args:
        cfg: the broker settings used.
        exc: what the socket, TLS or DNS layer raised.

    Returns:
        A :class:`~cipherface.errors.BrokerConnectionError` subclass with a one-line
        message that says what to check.
    """
    where = f"{cfg.host}:{cfg.port}"
    if isinstance(exc, socket.gaierror):
        return BrokerDnsError(
            f"cannot resolve the broker host {cfg.host!r} ({exc.strerror or exc}); "
            "check the host name in --broker (env CIPHERFACE_BROKER)"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = (
            "give the CA that signed it with --ca-file (env CIPHERFACE_CA)"
            if cfg.ca_file is None
            else f"is {cfg.ca_file} the CA that signed it, and is {cfg.host!r} in its names?"
        )
        why = exc.verify_message or exc.reason or "verification failed"
        return BrokerTlsError(
            f"TLS: the certificate of the broker at {where} does not verify ({why}); {hint}"
        )
    if isinstance(exc, ssl.SSLError):
        return BrokerTlsError(
            f"TLS handshake with {where} failed ({exc.reason or exc}); mqtts:// needs a TLS "
            "listener, mqtt:// a plain one"
        )
    if isinstance(exc, ConnectionResetError) and cfg.tls:
        return BrokerTlsError(
            f"{where} reset the connection during the TLS handshake: is it a TLS listener? "
            "(mqtts:// needs one, mqtt:// a plain one)"
        )
    if isinstance(exc, ConnectionRefusedError):
        return BrokerRefusedError(
            f"connection to {where} refused: no broker listens there "
            "(check --broker / CIPHERFACE_BROKER and that the broker runs)"
        )
    if isinstance(exc, TimeoutError):
        return BrokerConnectionError(
            f"no answer from {where} within {cfg.connect_timeout:g} s (firewall, wrong host?)"
        )
    return BrokerConnectionError(f"cannot connect to {where}: {exc}")


def tcp_nodelay(sock: Any) -> None:
    """Disable Nagle's algorithm on a (possibly TLS-wrapped) TCP socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # a unix or websocket transport: nothing to do
        log.debug("TCP_NODELAY not set: %s", exc)


def publish_properties(
    *,
    response_topic: str | None = None,
    correlation: bytes | None = None,
    expiry_s: int | None = None,
) -> Properties | None:
    """MQTT 5 PUBLISH properties (None when there is nothing to set).

    Args:
        response_topic: ResponseTopic.
        correlation: CorrelationData.
        expiry_s: MessageExpiryInterval in seconds.
    """
    if response_topic is None and correlation is None and expiry_s is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    if expiry_s is not None:
        props.MessageExpiryInterval = int(expiry_s)
    return props


def message_property(msg: paho.MQTTMessage, name: str) -> Any:
    """An MQTT 5 property of a received message, or None (MQTT 3.1.1 or unset)."""
    props = getattr(msg, "properties", None)
    return getattr(props, name, None) if props is not None else None


class Connection:
    """One paho client, connected, with its network loop in a background thread.

    Callbacks run on paho's network thread: ``on_message`` must only hand the
    message off (queue it) and return.

    Args:
        config: broker settings.
        client_id: MQTT client id (a persistent session is keyed by it). Brokers
            running ``use_username_as_clientid`` replace it with the username.
        persistent: keep the session (subscriptions, queued QoS 1) across disconnects.
        session_expiry_s: MQTT 5 session expiry of a persistent session.
        manual_ack: acknowledge QoS 1 messages only when :meth:`ack` is called.
        will: ``(topic, payload)`` of a retained QoS 1 last will, or None.
        on_message: called with each message (network thread).
        on_connected: called after each successful CONNACK with ``(connection,
            session_present)`` (network thread): subscribe and announce here.
        receive_maximum: MQTT 5 ReceiveMaximum (QoS 1 messages in flight to us).
        on_lost: called with the connection (network thread) when a live connection
            is lost, before paho reconnects: :meth:`stand_down` there prevents it.

    Raises:
        InvalidArgumentError: an empty client id.
    """

    def __init__(
        self,
        *,
        config: BrokerConfig,
        client_id: str,
        persistent: bool = False,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        manual_ack: bool = False,
        will: tuple[str, bytes] | None = None,
        on_message: MessageHandler | None = None,
        on_connected: ConnectedHook | None = None,
        receive_maximum: int = RECEIVE_MAXIMUM,
        on_lost: Callable[[Connection], None] | None = None,
    ) -> None:
        if not client_id:
            raise InvalidArgumentError("an MQTT client id is required")
        self.config = config
        self.client_id = client_id
        self.persistent = persistent
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._connack = threading.Event()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._auth_refused = False
        self._started = False
        self._ever_connected = False
        v5 = config.mqtt_version == "5"
        kwargs: dict[str, Any] = {}
        if not v5:
            kwargs["clean_session"] = not persistent
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=manual_ack,
            **kwargs,
        )
        client.enable_logger(PAHO_LOGGER)
        # Reconnect quickly: the agents have requests waiting.
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        if config.username:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            try:
                client.tls_set(
                    ca_certs=config.ca_file,
                    certfile=config.cert_file,
                    keyfile=config.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise BrokerTlsError(
                    f"cannot load the TLS files (CA {config.ca_file}, certificate "
                    f"{config.cert_file}): {getattr(exc, 'reason', None) or exc}"
                ) from None
        client.connect_timeout = config.connect_timeout
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_socket_open = self._socket_open
        client.on_connect_fail = self._connect_fail_cb
        client.on_connect = self._connect_cb
        client.on_disconnect = self._disconnect_cb
        client.on_message = self._message_cb
        client.on_publish = self._publish_cb
        self.client = client
        # PUBACKs with a failure reason code (MQTT 5: not authorised, too large, quota):
        # paho reports such a message as published, so we keep the refusals ourselves.
        self._refused_mids: dict[int, str] = {}
        #: Connections regained after a loss, and losses (for metrics and health).
        self.reconnects = 0
        self.disconnects = 0
        self._lost_at: float | None = None
        self._last_fail_log = 0.0

    # ----------------------------------------------------------------- callbacks
    def _publish_cb(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            if len(self._refused_mids) >= 1024:  # bounded: drop the oldest unclaimed one
                self._refused_mids.pop(next(iter(self._refused_mids)))
            self._refused_mids[mid] = str(reason)

    def refused(self, info: paho.MQTTMessageInfo) -> str | None:
        """The broker's failure reason for a published message, if it refused it."""
        return self._refused_mids.pop(info.mid, None)

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        tcp_nodelay(sock)

    def _connect_cb(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._auth_refused = getattr(reason_code, "value", None) in _AUTH_REASONS
            # Before the first connection start() raises it (one line from the CLI);
            # later, while reconnecting, nobody else reports it.
            log.log(
                logging.WARNING if self._ever_connected else logging.DEBUG,
                "%s: broker refused the connection: %s",
                self.client_id,
                reason_code,
            )
            self._connack.set()
            return
        self._refused = None
        if self._ever_connected:
            self.reconnects += 1
            away = time.monotonic() - self._lost_at if self._lost_at is not None else 0.0
            log.warning(
                "%s: connection to %s restored after %.1f s", self.client_id, self.config.url, away
            )
        self._lost_at = None
        self._ever_connected = True
        self._connected.set()
        session_present = bool(getattr(flags, "session_present", False))
        log.info("%s: connected (session present: %s)", self.client_id, session_present)
        if self._on_connected is not None:
            try:
                self._on_connected(self, session_present)
            except Exception:  # a failing hook must not kill paho's thread
                log.exception("%s: on_connected hook failed", self.client_id)
        self._connack.set()

    def _connect_fail_cb(self, client: paho.Client, userdata: Any) -> None:
        if not self._ever_connected:
            # First attempt: fail start() now rather than retry against a wrong address.
            self._refused = "connection failed (refused or unreachable)"
            self._connack.set()
        elif time.monotonic() - self._last_fail_log > 60.0:  # one line a minute, not a flood
            self._last_fail_log = time.monotonic()
            log.warning(
                "%s: reconnecting to %s failed; still retrying", self.client_id, self.config.url
            )

    def _disconnect_cb(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        # A refused CONNACK also ends in a disconnect: that is not a lost connection.
        if self._started and was_connected:
            self.disconnects += 1
            self._lost_at = time.monotonic()
            if self._on_lost is not None:
                try:
                    self._on_lost(self)
                except Exception:  # a failing hook must not kill paho's thread
                    log.exception("%s: on_lost hook failed", self.client_id)
            if not self._started:
                return  # the hook stood down
            log.warning(
                "%s: lost the connection to %s (%s); reconnecting",
                self.client_id,
                self.config.url,
                reason_code,
            )

    def _message_cb(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            try:
                self._on_message(msg)
            except Exception:
                log.exception("%s: message handler failed on %s", self.client_id, msg.topic)

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        """Whether the client holds a live connection now."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (or ``timeout`` seconds); returns whether connected."""
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Connect, start the network thread and wait for the first CONNACK.

        Raises:
            BrokerConnectionError: the broker refused us, or did not answer within
                ``config.connect_timeout`` seconds.
        """
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s if self.persistent else 0
            # Our own cap on unacknowledged QoS 1 deliveries, whatever the broker allows.
            props.ReceiveMaximum = self.receive_maximum
            kwargs = {"clean_start": not self.persistent, "properties": props}
        # The first attempt is synchronous so that its exception names the cause
        # (DNS, refused, TLS); paho's loop thread then reconnects by itself.
        try:
            self.client.connect(cfg.host, cfg.port, cfg.keepalive, **kwargs)
        except (OSError, ValueError) as exc:
            raise connect_error(cfg, exc) from None
        self._started = True
        self.client.loop_start()
        deadline = time.monotonic() + cfg.connect_timeout
        while not self._connected.is_set():
            if self._refused is not None:
                reason = self._refused
                self.stop()
                if self._auth_refused:
                    who = cfg.username or "anonymous clients"
                    raise BrokerAuthError(
                        f"broker {cfg.url} refused the login of {who}: {reason}; "
                        + _CREDENTIALS_HINT
                    )
                raise BrokerConnectionError(f"broker {cfg.url} refused {self.client_id}: {reason}")
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise BrokerConnectionError(
                    f"no answer from the broker at {cfg.url} within {cfg.connect_timeout:g} s"
                )
            self._connack.wait(min(left, 0.1))
            self._connack.clear()

    def stand_down(self) -> None:
        """Disconnect for good without reconnecting, from any thread (paho's too).

        The persistent session stays on the broker: it belongs to whoever took our
        client id over. :meth:`stop` still ends the network thread.
        """
        self._started = False  # also keeps the disconnect from being logged as a loss
        self.client.disconnect()  # paho's loop then ends instead of reconnecting

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        """Queue a message (thread-safe); see paho's ``MQTTMessageInfo`` to wait for it."""
        if self.config.mqtt_version != "5":
            properties = None
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def subscribe(self, topics: list[tuple[str, int]], *, no_retained: bool = False) -> None:
        """Subscribe to ``[(filter, qos), ...]`` (call from ``on_connected``).

        ``no_retained``: on MQTT 5, ask the broker not to send retained messages
        (retain handling 2); requests are never meant to be retained.
        """
        subs: list[Any] = list(topics)
        if no_retained and self.config.mqtt_version == "5":
            from paho.mqtt.subscribeoptions import SubscribeOptions

            subs = [(f, SubscribeOptions(qos=q, retainHandling=2)) for f, q in topics]
        result, _ = self.client.subscribe(subs)
        if result != paho.MQTT_ERR_SUCCESS:
            log.warning("%s: subscribe failed: %s", self.client_id, paho.error_string(result))

    def unsubscribe(self, filters: list[str]) -> None:
        """Drop subscriptions (thread-safe)."""
        result, _ = self.client.unsubscribe(filters)
        if result != paho.MQTT_ERR_SUCCESS:
            log.warning("%s: unsubscribe failed: %s", self.client_id, paho.error_string(result))

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message received with ``manual_ack`` (thread-safe)."""
        self.client.ack(mid, qos)

    def stop(
        self,
        *,
        farewell: tuple[str, bytes] | None = None,
        timeout: float = 5.0,
        expire_session: bool = False,
    ) -> None:
        """Disconnect cleanly (no last will) and stop the network thread.

        Args:
            farewell: a retained QoS 1 ``(topic, payload)`` to publish first (an
                "offline" status), or None.
            timeout: seconds to wait for the farewell to be acknowledged.
            expire_session: also end a persistent session on the broker (a client
                retired for good: Mosquitto would otherwise keep queueing its share
                of a shared subscription for it).
        """
        if not self._started:
            self.client.loop_stop()  # after stand_down(): the thread is ending by itself
            return
        if farewell is not None and self.connected:
            try:
                info = self.publish(farewell[0], farewell[1], qos=1, retain=True)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.debug("%s: farewell not sent: %s", self.client_id, exc)
        self._started = False
        v5 = self.config.mqtt_version == "5"
        if expire_session and v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self.client.disconnect(properties=props)
        else:
            self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        if expire_session and self.persistent and not v5:
            self._clean_session_v311()

    def _clean_session_v311(self) -> None:
        # MQTT 3.1.1 has no session expiry: connecting once with clean_session=True
        # under the same client id discards the stored session.
        done = threading.Event()
        wiper = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        wiper.on_connect = lambda *a: done.set()
        if self.config.username:
            wiper.username_pw_set(self.config.username, self.config.password)
        if self.config.tls:
            wiper.tls_set(
                ca_certs=self.config.ca_file,
                certfile=self.config.cert_file,
                keyfile=self.config.key_file,
            )
        try:
            wiper.connect(self.config.host, self.config.port, self.config.keepalive)
            wiper.loop_start()
            done.wait(self.config.connect_timeout)
            wiper.disconnect()
            wiper.loop_stop()
        except OSError as exc:
            log.warning("%s: could not discard the session: %s", self.client_id, exc)


def wait_published(info: paho.MQTTMessageInfo, timeout: float) -> bool:
    """Wait until a QoS >= 1 publish is acknowledged by the broker.

    Returns:
        True when acknowledged; False on timeout or when the client was not
        connected (paho then keeps QoS 1 messages and retries after a reconnect).
    """
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):
        return False
    return info.is_published()


__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_SESSION_EXPIRY_S",
    "MQTT_VERSIONS",
    "BrokerConfig",
    "Connection",
    "MqttVersion",
    "connect_error",
    "message_property",
    "publish_properties",
    "tcp_nodelay",
    "wait_published",
]
