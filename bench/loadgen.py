"""Closed-loop verify load from many gateways through one MQTT connection.

Each simulated gateway keeps exactly one verify request outstanding: when its
result arrives, it sends the next one (a new message id). Probes are encrypted once
up front (encrypting costs the edge, not the cloud) and replies are checked against
the request's correlation data; every ``check_every``-th result is decrypted and
compared with the plaintext score, so a wrong answer cannot pass as throughput.

Used by bench/bench_fleet.py and the fleet tests (a request is *lost* when it got
no answer within ``timeout`` s: it is then re-sent with the same id, as an edge does).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cipherface.agents.mqtt import tcp_nodelay
from cipherface.crypto.engine import EdgeCipher
from cipherface.protocol import (
    Result,
    Verify,
    decode,
    encode,
    new_message_id,
    now_ms,
    request_topic,
    result_topic,
)


@dataclass
class LoadReport:
    """What a load run measured."""

    gateways: int
    seconds: float
    answered: int = 0
    errors: int = 0
    wrong: int = 0
    checked: int = 0
    resent: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        """Verify results a second (error replies, e.g. ``rate_limited``, not counted)."""
        return (self.answered - self.errors) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        if len(self.latencies_ms) == 1:
            return self.latencies_ms[0]
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]

    def row(self) -> dict[str, Any]:
        return {
            "gateways": self.gateways,
            "verifies_per_s": round(self.per_s, 1),
            "p50_ms": round(self.pct(50), 1),
            "p99_ms": round(self.pct(99), 1),
            "answered": self.answered,
            "errors": self.errors,
            "wrong": self.wrong,
            "checked": self.checked,
            "resent": self.resent,
        }


@dataclass
class _Slot:
    msg_id: str = ""
    sent: float = 0.0
    first_sent: float = 0.0
    probe: int = 0
    payload: bytes = b""


class VerifyLoad:
    """Drive ``gateways`` closed-loop verify streams at one site.

    Args:
        host / port: the broker.
        site: the site id.
        cipher: the site's edge cipher (secret key: for the spot checks).
        identities: enrolled ids; probe ``i`` is scored against ``identities[i]``.
        vectors: their plaintext templates (same order), for the spot checks.
        gateways: concurrent gateways.
        timeout: seconds before a request is re-sent with the same id.
        check_every: decrypt and check every n-th result.
        prefix: gateway id prefix.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        site: str,
        cipher: EdgeCipher,
        identities: list[str],
        vectors: np.ndarray,
        gateways: int,
        timeout: float = 10.0,
        check_every: int = 25,
        prefix: str = "lg",
        probes: int = 16,
    ) -> None:
        self.site = site
        self.cipher = cipher
        self.identities = identities
        self.gateways = gateways
        self.timeout = timeout
        self.check_every = check_every
        rng = np.random.default_rng(7)
        self._probes: list[tuple[str, bytes, float]] = []
        for i in range(min(probes, len(identities))):
            v = vectors[i] + rng.normal(scale=0.02, size=vectors.shape[1])
            v /= np.linalg.norm(v)
            self._probes.append(
                (
                    identities[i],
                    cipher.encrypt_probe(v, op="verify"),
                    float(v @ vectors[i]),
                )
            )
        self._gws = [f"{prefix}{g:03d}" for g in range(gateways)]
        self._slots = {gw: _Slot() for gw in self._gws}
        self._lock = threading.Lock()
        self._running = False
        self._report = LoadReport(gateways=gateways, seconds=0.0)
        self._n = 0
        self._connected = threading.Event()
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{prefix}-{new_message_id()[:8]}",
            protocol=paho.MQTTv5,
        )
        c.max_inflight_messages_set(gateways + 10)
        c.max_queued_messages_set(0)
        c.on_socket_open = lambda cl, ud, sock: tcp_nodelay(sock)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self.client = c
        self.host, self.port = host, port

    def _on_connect(self, client: paho.Client, *a: Any) -> None:
        subs = [(result_topic(self.site, "x").rsplit("/", 1)[0] + "/+", 1)]
        subs.append((subs[0][0].replace("/res/", "/err/"), 1))
        client.subscribe(subs)
        self._connected.set()

    def _send(self, gw: str, *, resend: bool = False) -> None:
        slot = self._slots[gw]
        now = time.perf_counter()
        if not resend:
            slot.probe = (slot.probe + 1) % len(self._probes)
            ident, probe, _ = self._probes[slot.probe]
            msg = Verify(
                site=self.site,
                gw=gw,
                id=new_message_id(),
                kid=self.cipher.key_id,
                exp=now_ms() + 120_000,
                identity=ident,
                probe=probe,
            )
            slot.msg_id, slot.payload, slot.first_sent = msg.id, encode(msg), now
        slot.sent = now
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = result_topic(self.site, gw)
        props.CorrelationData = slot.msg_id.encode("ascii")
        self.client.publish(
            request_topic(self.site, gw, "verify"), slot.payload, qos=1, properties=props
        )

    def _on_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        gw = m.topic.rsplit("/", 1)[1]
        corr = getattr(m.properties, "CorrelationData", None)
        with self._lock:
            slot = self._slots.get(gw)
            if slot is None or corr is None or corr.decode("ascii", "replace") != slot.msg_id:
                return  # a late duplicate of an answered request
            now = time.perf_counter()
            rep = self._report
            if self._running:
                rep.answered += 1
                if "/err/" in m.topic:
                    rep.errors += 1  # an error is no verify: not in the rate nor latencies
                else:
                    rep.latencies_ms.append((now - slot.first_sent) * 1e3)
            self._n += 1
            check = "/res/" in m.topic and self._n % self.check_every == 0
            probe = slot.probe
            if self._running:
                self._send(gw)
        if check:
            self._check(bytes(m.payload), probe)

    def _check(self, payload: bytes, probe: int) -> None:
        msg = decode(payload)
        ok = isinstance(msg, Result) and msg.scores is not None
        if ok:
            assert isinstance(msg, Result) and msg.scores is not None
            score = float(self.cipher.decrypt_scores(msg.scores, op="verify", count=1)[0])
            ok = abs(score - self._probes[probe][2]) < 1e-3
        with self._lock:
            self._report.checked += 1
            self._report.wrong += 0 if ok else 1

    def run(
        self,
        seconds: float,
        *,
        warmup: float = 2.0,
        mark: Callable[[str], None] | None = None,
    ) -> LoadReport:
        """Run ``warmup`` + ``seconds``; the report covers the measured part only.

        ``mark("start")`` and ``mark("end")`` are called as the measured part starts and
        ends (the bench samples CPU counters there).
        """
        self.client.connect(self.host, self.port, 60)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise RuntimeError("load generator: no connection to the broker")
        time.sleep(0.3)  # let the SUBACK land
        self._running = True
        with self._lock:
            for gw in self._gws:
                self._send(gw)
        end_warm = time.perf_counter() + warmup
        while time.perf_counter() < end_warm:
            self._resend_late()
            time.sleep(0.1)
        with self._lock:
            self._report = LoadReport(gateways=self.gateways, seconds=0.0)
        if mark is not None:
            mark("start")
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self._resend_late()
            time.sleep(0.1)
        with self._lock:
            self._running = False
            report = self._report
            report.seconds = time.perf_counter() - t0
        if mark is not None:
            mark("end")
        time.sleep(0.5)
        self.client.disconnect()
        self.client.loop_stop()
        return report

    def _resend_late(self) -> None:
        now = time.perf_counter()
        with self._lock:
            for gw, slot in self._slots.items():
                if self._running and now - slot.sent > self.timeout:
                    self._report.resent += 1
                    self._send(gw, resend=True)
