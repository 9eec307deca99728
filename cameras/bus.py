"""The integration broker: where Frigate, Home Assistant and integrators live.

Often a different broker from the one the cloud is reached through (Frigate's and Home
Assistant's Mosquitto on the LAN); the same one by default. One MQTT connection, with
the gateway's availability as its last will, topic routing for sources and outputs,
and hooks re-run on every reconnection (subscriptions, Home Assistant discovery).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from cipherface.agents.mqtt import BrokerConfig, Connection

from .events import OFFLINE, ONLINE

log = logging.getLogger(__name__)


class MqttBus:
    """One connection to the integration broker.

    Args:
        broker: broker settings.
        availability_topic: retained ``online`` on connect, ``offline`` as the will and
            on a clean stop.
        client_id: MQTT client id (default: random).
    """

    def __init__(
        self, *, broker: BrokerConfig, availability_topic: str, client_id: str | None = None
    ) -> None:
        self.availability_topic = availability_topic
        self._routes: list[tuple[str, Callable[[Any], None]]] = []
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._acks: dict[int, threading.Event] = {}
        self._conn = Connection(
            config=broker,
            client_id=client_id or f"cipherface-cameras-{secrets.token_hex(4)}",
            will=(availability_topic, OFFLINE.encode()),
            on_message=self._dispatch,
            on_connected=self._connected,
        )
        self._conn.client.on_subscribe = self._suback

    def subscribe(self, topic_filter: str, handler: Callable[[Any], None]) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (network thread: it
        must only queue work). Survives reconnections."""
        with self._lock:
            self._routes.append((topic_filter, handler))
        if self._conn.connected:
            # Wait for the SUBACK: a message published right after we return must arrive.
            rc, mid = self._conn.client.subscribe(topic_filter, qos=1)
            if rc != paho.MQTT_ERR_SUCCESS or mid is None:
                log.warning("subscribe %s failed: %s", topic_filter, paho.error_string(rc))
                return
            with self._lock:
                done = self._acks.setdefault(mid, threading.Event())
            if not done.wait(self._conn.config.connect_timeout):
                log.warning("no SUBACK for %s", topic_filter)
            with self._lock:
                self._acks.pop(mid, None)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after every (re)connection (and now, if connected)."""
        with self._lock:
            self._hooks.append(hook)
        if self._conn.connected:
            hook()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1 (queued by paho while disconnected)."""
        self._conn.publish(topic, payload, qos=1, retain=retain)

    def start(self) -> None:
        """Connect (raises BrokerConnectionError if the broker cannot be reached)."""
        self._conn.start()

    def close(self) -> None:
        """Say ``offline`` (retained) and disconnect."""
        self._conn.stop(farewell=(self.availability_topic, OFFLINE.encode()))

    def _connected(self, conn: Connection, session_present: bool) -> None:
        with self._lock:
            filters = [f for f, _ in self._routes]
            hooks = list(self._hooks)
        conn.publish(self.availability_topic, ONLINE.encode(), qos=1, retain=True)
        if filters:
            conn.subscribe([(f, 1) for f in dict.fromkeys(filters)])
        for hook in hooks:
            try:
                hook()
            except Exception:  # a hook must not take the connection down
                log.exception("on-connect hook failed")

    def _suback(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        # A SUBACK may beat subscribe()'s bookkeeping: remember it either way.
        with self._lock:
            if len(self._acks) > 64:  # SUBACKs of reconnections nobody waits for
                self._acks.clear()
            event = self._acks.setdefault(mid, threading.Event())
        event.set()

    def _dispatch(self, msg: paho.MQTTMessage) -> None:
        with self._lock:
            routes = list(self._routes)
        for topic_filter, handler in routes:
            if paho.topic_matches_sub(topic_filter, msg.topic):
                try:
                    handler(msg)
                except Exception:  # one bad message never stops the gateway
                    log.exception("handler for %s failed on %s", topic_filter, msg.topic)


__all__ = ["MqttBus"]
