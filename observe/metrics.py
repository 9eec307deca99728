"""Prometheus metrics of the agents and the HTTP endpoint that serves them.

Each agent process gets an :class:`AgentMetrics` (its own registry, so several agents
in one process do not collide). The agents report what happens as it happens
(:meth:`AgentMetrics.request`) and hand in a ``state`` callable read at scrape time
for levels and counters they keep themselves (queue depth, galleries, duplicates,
broker reconnects). ``--metrics-port`` serves:

* ``/metrics`` -- Prometheus text format;
* ``/healthz`` -- JSON ``{"status": "ok"|"unhealthy", ...}`` with HTTP 200 or 503
  (``cipherface health --url`` and the compose healthchecks probe it).

Metric names (every one also carries ``role`` = ``cloud`` or ``edge``):

============================================  =========  ===============================
``cipherface_requests_total{op,outcome}``     counter    outcome ``result``, ``error``,
                                                         ``dropped`` (no reply: invalid
                                                         topic, duplicate in progress)
``cipherface_errors_total{code}``             counter    error replies / failures by code
``cipherface_request_seconds{op}``            histogram  time to serve (cloud) or to get
                                                         the reply (edge)
``cipherface_queue_depth``                    gauge      requests waiting (cloud)
``cipherface_queued_bytes``                   gauge      their bytes (cloud; bounded by
                                                         ``max_queued_bytes``)
``cipherface_in_progress``                    gauge      requests being served
``cipherface_galleries_open``                 gauge      galleries held open (cloud)
``cipherface_templates``                      gauge      live templates in them (cloud)
``cipherface_duplicates_total``               counter    duplicates answered from cache
``cipherface_rejected_results_total``         counter    results the edge refused
``cipherface_unmatched_replies_total``        counter    replies matching no request (edge)
``cipherface_replies_refused_total``          counter    replies the broker refused (cloud)
``cipherface_broker_connected``               gauge      1 while connected
``cipherface_broker_reconnects_total``        counter    connections regained after a loss
``cipherface_compute_workers``                gauge      compute processes configured
``cipherface_compute_workers_alive``          gauge      compute processes running
``cipherface_compute_worker_restarts_total``  counter    compute processes replaced
``cipherface_compute_jobs_total{kind}``       counter    ``verify``: verifies; ``identify``:
                                                         identify probe ciphertexts
``cipherface_compute_local_jobs_total{kind}`` counter    of those, done in the agent's
                                                         process (a worker failed)
``cipherface_info{version,agent}``            gauge      1
============================================  =========  ===============================
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Latency buckets (seconds): a warm verify is milliseconds, a 1M identify seconds.
BUCKETS: Final = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Keys of the ``state()`` mapping that are counters (the others are gauges).
COUNTER_KEYS: Final = frozenset(
    {
        "duplicates",
        "rejected_results",
        "unmatched_replies",
        "replies_refused",
        "broker_reconnects",
        "forged_results",
        "compute_worker_restarts",
    }
)
#: Keys of the ``state()`` mapping whose value maps a ``kind`` label to a counter.
KIND_COUNTER_KEYS: Final = frozenset({"compute_jobs", "compute_local_jobs"})
GAUGE_KEYS: Final = frozenset(
    {
        "queue_depth",
        "queued_bytes",
        "in_progress",
        "galleries_open",
        "templates",
        "broker_connected",
        "gateway_halted",
        "compute_workers",
        "compute_workers_alive",
    }
)

State = Callable[[], Mapping[str, Any]]


class _StateCollector(Collector):
    def __init__(self, role: str, state: State) -> None:
        self.role = role
        self.state = state

    def collect(self) -> Iterator[Any]:
        try:
            values = dict(self.state())
        except Exception:  # a scrape must not fail because one level is unreadable
            log.exception("metrics state unavailable")
            return
        for key in sorted(values):
            name = f"cipherface_{key}"
            if key in KIND_COUNTER_KEYS:
                kinds = CounterMetricFamily(name, key.replace("_", " "), labels=["role", "kind"])
                for kind, value in sorted(dict(values[key]).items()):
                    kinds.add_metric([self.role, str(kind)], float(value))
                yield kinds
                continue
            if key in COUNTER_KEYS:
                family: Any = CounterMetricFamily(name, key.replace("_", " "), labels=["role"])
            elif key in GAUGE_KEYS:
                family = GaugeMetricFamily(name, key.replace("_", " "), labels=["role"])
            else:
                continue
            family.add_metric([self.role], float(values[key]))
            yield family


class AgentMetrics:
    """The metrics of one agent.

    Args:
        role: ``cloud`` or ``edge``.
        agent: the agent id (cloud) or ``<site>/<gateway>`` (edge), for ``cipherface_info``.
        version: the software version.
        state: returns the scrape-time values (keys of :data:`COUNTER_KEYS`,
            :data:`GAUGE_KEYS` and :data:`KIND_COUNTER_KEYS`; others are ignored).
    """

    def __init__(self, *, role: str, agent: str, version: str, state: State) -> None:
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cipherface_requests",
            "requests by operation and outcome",
            ["role", "op", "outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "cipherface_errors", "failures by error code", ["role", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "cipherface_request_seconds",
            "request latency",
            ["role", "op"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        info = GaugeMetricFamily("cipherface_info", "agent", labels=["role", "version", "agent"])
        info.add_metric([role, version, agent], 1.0)
        self.registry.register(_Static(info))
        self.registry.register(_StateCollector(role, state))

    def request(self, *, op: str, outcome: str, code: str | None, seconds: float | None) -> None:
        """Count one request (``code``: the error code when ``outcome == "error"``)."""
        self.requests.labels(self.role, op, outcome).inc()
        if code is not None:
            self.errors.labels(self.role, code).inc()
        if seconds is not None:
            self.latency.labels(self.role, op).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _Static(Collector):
    def __init__(self, family: Any) -> None:
        self.family = family

    def collect(self) -> Iterator[Any]:
        yield self.family


Health = Callable[[], Mapping[str, Any]]


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP, in a daemon thread.

    Args:
        metrics: what ``/metrics`` serves.
        health: returns the ``/healthz`` body; ``status == "ok"`` gives HTTP 200,
            anything else 503.
        port: TCP port (0: any free port, see :attr:`port`).
        host: address to bind (default loopback; ``0.0.0.0`` for a remote Prometheus).
    """

    def __init__(
        self, *, metrics: AgentMetrics, health: Health, port: int, host: str = "127.0.0.1"
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, code, ctype = outer.metrics.exposition(), 200, "text/plain; version=0.0.4"
                elif path in ("/healthz", "/health"):
                    state = dict(outer.health())
                    code = 200 if state.get("status") == "ok" else 503
                    body, ctype = json.dumps(state).encode(), "application/json"
                else:
                    body, code, ctype = b"not found: /metrics or /healthz\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics http: " + format, *args)

        self.metrics = metrics
        self.health = health
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self._server.server_address[:2])
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


__all__ = ["BUCKETS", "AgentMetrics", "MetricsServer"]
