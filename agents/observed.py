"""Wire the agents to :mod:`cipherface.observe`: metrics, per-request logs, health.

The CLI calls :func:`observe_cloud` / :func:`observe_edge` after building an agent;
the agents themselves only expose hooks (``on_request``) and levels (``load()``,
counters), so they stay usable as libraries without any of this.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Counter

from cipherface import __version__, errors
from cipherface.agents.cloud import CloudAgent, Outgoing
from cipherface.agents.edge import EdgeClient
from cipherface.observe.health import (
    DEFAULT_INTERVAL_S,
    HealthPublisher,
    cloud_health_topic,
    edge_health_topic,
)
from cipherface.observe.logs import log_request
from cipherface.observe.metrics import AgentMetrics, MetricsServer
from cipherface.protocol import decode, parse_request_topic

log = logging.getLogger(__name__)


def _all_codes() -> frozenset[str]:
    seen: set[str] = set()
    stack: list[type[errors.CipherFaceError]] = [errors.CipherFaceError]
    while stack:
        cls = stack.pop()
        seen.add(cls.code)
        stack.extend(cls.__subclasses__())
    return frozenset(seen)


#: Error codes used as metric labels. A code outside the project's own (a peer can
#: send any string matching the code syntax) is counted as ``other``: label
#: cardinality, and so the metrics' memory, stays bounded whatever a cloud sends.
KNOWN_CODES: frozenset[str] = _all_codes() | {"result", "error", "dropped", "internal"}


def label_code(code: str) -> str:
    """``code`` if it is one of :data:`KNOWN_CODES`, else ``other``."""
    return code if code in KNOWN_CODES else "other"


@dataclass
class Observed:
    """What observes one agent: its metrics, their HTTP server and its health messages."""

    metrics: AgentMetrics
    server: MetricsServer | None = None
    health: HealthPublisher | None = None
    counts: dict[str, int] = field(default_factory=dict)
    load: Any = None  # () -> the levels of the health message

    def start_health(self, publisher: HealthPublisher) -> None:
        self.health = publisher.start()

    def stop(self) -> None:
        """Publish the offline health message and stop serving metrics."""
        if self.health is not None:
            self.health.stop()
        if self.server is not None:
            self.server.stop()


def _retained(conn_of: Any) -> Any:
    def publish(topic: str, payload: bytes) -> Any:
        conn = conn_of()
        if conn is None or not conn.connected:
            raise ConnectionError("not connected")
        return conn.publish(topic, payload, qos=1, retain=True)

    return publish


def _error_code(out: Outgoing) -> str:
    try:
        return str(getattr(decode(out.payload), "code", "error"))
    except Exception:  # our own reply: never expected to fail, but metrics must not raise
        return "error"


def observe_cloud(
    agent: CloudAgent,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    interval: float = DEFAULT_INTERVAL_S,
) -> Observed:
    """Count and log every request of ``agent``; serve metrics when ``port`` is set.

    Call before ``agent.start()``; call :meth:`Observed.start_health` after it (see
    :func:`cloud_health`).
    """
    metrics = AgentMetrics(
        role="cloud", agent=agent.agent_id, version=__version__, state=agent.load
    )

    def on_request(topic: str, outgoing: list[Outgoing], seconds: float) -> None:
        try:
            rt = parse_request_topic(topic)
            op, site, gw = rt.message_type, rt.site, rt.gateway
        except Exception:
            op, site, gw = "invalid_topic", None, None
        if not outgoing:
            outcome, code = "dropped", None
        elif any(o.kind == "error" for o in outgoing):
            outcome, code = "error", _error_code(next(o for o in outgoing if o.kind == "error"))
        else:
            outcome, code = "result", None
        metrics.request(op=op, outcome=outcome, code=code, seconds=seconds)
        log_request(
            role="cloud", op=op, site=site, gateway=gw, outcome=code or outcome, seconds=seconds
        )

    agent.on_request = on_request
    server = None
    if port is not None:
        server = MetricsServer(
            metrics=metrics,
            health=lambda: _health("cloud", agent.agent_id, agent.load()),
            port=port,
            host=host,
        ).start()
    return Observed(metrics=metrics, server=server)


#: The cloud levels its retained health may carry. Every site's integrator reads that
#: message, so it holds this process's load only: template, gallery and duplicate counts
#: summed over all the sites the cloud serves stay on the local /metrics and /healthz.
PUBLIC_CLOUD_LOAD: Final = ("queue_depth", "in_progress", "broker_connected", "broker_reconnects")


def public_cloud_load(load: Mapping[str, Any]) -> dict[str, Any]:
    """The levels of ``load`` that every site's integrator may read."""
    return {k: load[k] for k in PUBLIC_CLOUD_LOAD if k in load}


def cloud_health(agent: CloudAgent, *, interval: float = DEFAULT_INTERVAL_S) -> HealthPublisher:
    """The retained JSON health publisher of a started cloud agent (process load only:
    see :data:`PUBLIC_CLOUD_LOAD`)."""
    return HealthPublisher(
        topic=cloud_health_topic(agent.agent_id),
        role="cloud",
        agent=agent.agent_id,
        version=__version__,
        load=lambda: public_cloud_load(agent.load()),
        publish=_retained(lambda: agent.connection),
        interval=interval,
    )


def _health(role: str, agent: str, load: dict[str, Any]) -> dict[str, Any]:
    ok = bool(load.get("broker_connected"))
    return {
        "status": "ok" if ok else "unhealthy",
        "role": role,
        "agent": agent,
        "version": __version__,
        **({} if ok else {"reason": "not connected to the broker"}),
        "load": load,
    }


def observe_edge(
    edge: EdgeClient,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
) -> tuple[Observed, Any]:
    """Count and log every request of ``edge``; serve metrics when ``port`` is set.

    Returns:
        ``(observed, output)``: add ``output`` to the gateway's outputs
        (cipherface.cameras): it counts the outcomes (``cipherface_outcomes_total``
        by event type, and rejected results).
    """
    counts = {"rejected_results": 0, "outcomes": 0}

    def load() -> dict[str, Any]:
        conn = edge.connection
        return {
            "in_progress": edge.in_flight,
            "unmatched_replies": edge.unmatched,
            "rejected_results": counts["rejected_results"],
            # The guard (docs/security.md "A cloud that cheats"): forged results refused
            # by this process, and whether the key's gateway halted.
            "forged_results": edge.forged,
            "gateway_halted": int(
                edge.guard is not None and edge.guard.status().halted is not None
            ),
            "broker_connected": int(conn is not None and conn.connected),
            "broker_reconnects": conn.reconnects if conn is not None else 0,
            "clouds_online": sum(1 for s in edge.clouds.values() if s == "online"),
        }

    agent = f"{edge.site}/{edge.gateway}"
    metrics = AgentMetrics(role="edge", agent=agent, version=__version__, state=load)

    def on_request(op: str, outcome: str, seconds: float) -> None:
        ok = outcome == "result"
        code = None if ok else label_code(outcome)
        metrics.request(op=op, outcome="result" if ok else "error", code=code, seconds=seconds)
        log_request(
            role="edge",
            op=op,
            site=edge.site,
            gateway=edge.gateway,
            outcome=code or "result",
            seconds=seconds,
        )

    edge.on_request = on_request
    server = None
    if port is not None:
        server = MetricsServer(
            metrics=metrics, health=lambda: _health("edge", agent, load()), port=port, host=host
        ).start()
    output = MetricsOutput(metrics, counts)
    return Observed(metrics=metrics, server=server, counts=counts, load=load), output


class MetricsOutput:
    """A gateway output (cipherface.cameras ``Output``) that counts the outcomes."""

    name = "metrics"

    def __init__(self, metrics: AgentMetrics, counts: dict[str, int]) -> None:
        self.counts = counts
        self.outcomes = Counter(
            "cipherface_outcomes",
            "gateway outcomes by event type (match, unknown, stale, error)",
            ["role", "event_type", "error"],
            registry=metrics.registry,
        )

    def start(self, bus: Any) -> None:
        return None

    def publish(self, event: Any, capture: Any) -> None:
        kind = str(getattr(event, "event_type", "unknown"))
        error = getattr(event, "error", None)
        self.outcomes.labels("edge", kind, label_code(error) if error else "").inc()
        self.counts["outcomes"] += 1
        if error == "result_rejected":
            self.counts["rejected_results"] += 1

    def close(self) -> None:
        return None


def edge_health(edge: EdgeClient, observed: Observed, *, interval: float) -> HealthPublisher:
    """The retained JSON health publisher of a started edge daemon."""
    return HealthPublisher(
        topic=edge_health_topic(edge.site, edge.gateway),
        role="edge",
        agent=f"{edge.site}/{edge.gateway}",
        version=__version__,
        load=lambda: {**observed.counts, **observed.load()},
        publish=_retained(lambda: edge.connection),
        interval=interval,
    )


__all__ = [
    "PUBLIC_CLOUD_LOAD",
    "MetricsOutput",
    "Observed",
    "cloud_health",
    "edge_health",
    "observe_cloud",
    "observe_edge",
    "public_cloud_load",
]
