"""Operating the agents: Prometheus metrics, health, logs.

* :mod:`cipherface.observe.metrics` -- the metrics of the cloud and edge agents and
  the HTTP endpoint (``--metrics-port``) that serves ``/metrics`` and ``/healthz``.
* :mod:`cipherface.observe.health` -- the retained JSON health status (load and
  version) for integrators, and the ``cipherface health`` probe.
* :mod:`cipherface.observe.logs` -- logging setup: text or JSON lines, one line per
  request at ``-v``, repeated warnings rate-limited.

Nothing here imports the agents: they hand in callables and hooks (arrows only run
downwards, docs/operations.md).
"""
