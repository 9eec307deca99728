"""Logging for the agents: text or JSON lines, rate-limited repeats.

``setup_logging(verbosity, fmt)`` configures the root logger on stderr:

* ``-v`` (INFO) shows one line per request (:data:`REQUEST_LOGGER`): op, site,
  gateway, outcome and milliseconds; ``-vv`` is DEBUG.
* ``fmt="json"`` writes one JSON object per line (``ts``, ``level``, ``logger``,
  ``msg``, plus the request fields when present) for log shippers.
* A :class:`RateLimit` filter lets at most ``burst`` records of one (logger, message
  template) through per ``period`` seconds and reports how many it dropped: a
  gateway flooding an invalid topic cannot grow the cloud's log at its own rate.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Final, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")
#: The logger of the per-request lines (INFO).
REQUEST_LOGGER: Final = "cipherface.requests"
#: Fields a request line carries (``extra=``), copied into JSON output.
REQUEST_FIELDS: Final = ("op", "site", "gateway", "outcome", "ms", "role")
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (no newlines inside, exceptions as one string)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RateLimit(logging.Filter):
    """At most ``burst`` records per (logger, template) per ``period`` seconds.

    Only WARNING and above are limited: INFO request lines are opted into with ``-v``.

    Args:
        burst: records let through per window.
        period: window length in seconds.
    """

    def __init__(self, *, burst: int = 5, period: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list[float]] = {}  # start, count, dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.period:
                dropped = int(window[2]) if window is not None else 0
                if len(self._windows) > 1000:  # bounded: forget old templates
                    self._windows.clear()
                self._windows[key] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} similar message(s) suppressed]"
                return True
            window[1] += 1
            if window[1] <= self.burst:
                return True
            window[2] += 1
            return False


def setup_logging(verbosity: int = 0, fmt: LogFormat = "text") -> None:
    """Configure the root logger on stderr for a CLI run.

    Args:
        verbosity: 0 WARNING, 1 INFO (one line per request), 2+ DEBUG.
        fmt: ``text`` or ``json``.
    """
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if verbosity < 2:
        logging.getLogger("cipherface.agents.paho").setLevel(logging.WARNING)


def log_request(
    *, role: str, op: str, site: str | None, gateway: str | None, outcome: str, seconds: float
) -> None:
    """Write the INFO line of one request (see the module docstring)."""
    logger = logging.getLogger(REQUEST_LOGGER)
    if not logger.isEnabledFor(logging.INFO):
        return
    ms = round(seconds * 1000.0, 1)
    logger.info(
        "%s %s site=%s gateway=%s outcome=%s %.1f ms",
        role,
        op,
        site,
        gateway,
        outcome,
        ms,
        extra={
            "role": role,
            "op": op,
            "site": site,
            "gateway": gateway,
            "outcome": outcome,
            "ms": ms,
        },
    )


__all__ = [
    "LOG_FORMATS",
    "REQUEST_LOGGER",
    "JsonFormatter",
    "LogFormat",
    "RateLimit",
    "log_request",
    "setup_logging",
]
