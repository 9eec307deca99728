"""Quotas the cloud enforces on each gateway: what one key holder may ask, per hour.

A gateway holds its site's secret key, so every score the cloud returns to it is
readable: a key holder that crafts probes reads templates (docs/security.md, "What a
key holder can learn"). The cloud cannot tell a crafted probe from a face, but it can
bound how many it answers, per gateway (the broker's ACL ties a gateway's requests to
its own account, so the gateway in the topic is authenticated):

* **identify** per ``(site, gateway)``: every identify result carries one linear
  function of every template of the gallery (``d`` = 128 of them determine it: no
  quota an honest camera can live with stops that; it bounds how often);
* **verify** per ``(site, gateway, scope)``, the scope being what one result reveals:
  the asked identity's *pack* in a CKKS gallery (a verify result carries the score of
  every live template of the pack, so ``d`` verifies of the pack's identities, any of
  them, read the whole pack), the identity in a Paillier-family one. A bucket per
  identity let a key holder spread those ``d`` verifies over the pack's 28 people and
  read it within the bursts (tests/test_trust_review.py). Verifies of identities that
  are not enrolled share one bucket per gateway, so made-up names cannot fill the book;
* **writes** (enroll, delete, key.retire) per ``(site, gateway)``: each one's reply is
  stored for a day (:mod:`cipherface.store.replies`), a delete of absent ids included,
  so without a bound one gateway's small deletes fill the store (measured with
  ``bench/bench_reply_flood.py``: 260-2,200 a second through one worker, ~400-565
  bytes each on disk, 9-75 GB a day). Retries answered from the store are not counted.

Each quota is a token bucket (``per_hour`` tokens an hour, at most ``burst`` saved),
counted by the process that answers (a fleet of ``W`` workers sharing a ``$share``
group allows up to ``W`` times the rate). A refused request gets the error code
``rate_limited`` (not retryable: the gateway reports it, it does not hammer).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cipherface.errors import InvalidArgumentError, RateLimitedError
from cipherface.protocol.messages import Delete, Enroll, Identify, KeyRetire, Request, Verify

#: Defaults: a camera that identifies once a second around the clock, a door that
#: verifies one person of a pack every 30 s for an hour (bursts: 5 min of identify, a
#: morning rush of two verifies for each of a pack's 28 people).
IDENTIFY_PER_HOUR: Final = 3600
VERIFY_PER_IDENTITY_PER_HOUR: Final = 120
VERIFY_BURST: Final = 60
#: Writes a gateway may make an hour (a stored reply each, kept a day), and at once:
#: enrolls carry thousands of templates and deletes lists of ids, so an honest site
#: needs few requests; the bound is ~87,000 stored replies a gateway and worker a day.
WRITES_PER_HOUR: Final = 3600
WRITES_BURST: Final = 600
#: The verify scope of identities a gallery does not hold (one bucket per gateway).
UNKNOWN_SCOPE: Final = "?"
#: Buckets kept; beyond that, full buckets (no state worth keeping) are dropped first.
MAX_BUCKETS: Final = 200_000


@dataclass(frozen=True, kw_only=True)
class QuotaPolicy:
    """Per-hour limits; 0 turns a limit off.

    Args:
        identify_per_hour: identify requests per (site, gateway) an hour.
        identify_burst: identify requests a gateway may make at once.
        verify_per_identity_per_hour: verifies of one scope (a CKKS pack, a Paillier
            identity: see the module docstring) per (site, gateway) an hour.
        verify_burst: verifies of one scope a gateway may make at once.
        writes_per_hour: enroll, delete and key.retire requests per (site, gateway) an
            hour (each stores its reply for a day).
        writes_burst: writes a gateway may make at once.

    Raises:
        InvalidArgumentError: a negative limit, or a burst below 1 for a limit in force.
    """

    identify_per_hour: int = IDENTIFY_PER_HOUR
    identify_burst: int = 300
    verify_per_identity_per_hour: int = VERIFY_PER_IDENTITY_PER_HOUR
    verify_burst: int = VERIFY_BURST
    writes_per_hour: int = WRITES_PER_HOUR
    writes_burst: int = WRITES_BURST

    def __post_init__(self) -> None:
        for rate, burst in (
            (self.identify_per_hour, self.identify_burst),
            (self.verify_per_identity_per_hour, self.verify_burst),
            (self.writes_per_hour, self.writes_burst),
        ):
            if rate < 0 or (rate and burst < 1):
                raise InvalidArgumentError("quota rates must be >= 0 and bursts >= 1")


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class Quotas:
    """The cloud's quota book (thread-safe).

    Args:
        policy: the limits.
        clock: monotonic seconds (tests pass their own).
        max_buckets: buckets kept before the oldest full ones are dropped.
    """

    def __init__(
        self,
        *,
        policy: QuotaPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self.policy = policy or QuotaPolicy()
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[tuple[str, ...], _Bucket] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def __repr__(self) -> str:
        return f"Quotas({self.policy!r}, buckets={len(self._buckets)})"

    def charge(self, req: Request, *, scope: str | None = None) -> None:
        """Count one request against its gateway's quota.

        Args:
            req: a decoded request (identify, verify and the writes are counted).
            scope: for a verify, what its result reveals (the gallery's
                ``quota_scope(identity)``: a pack, an identity, or one shared scope for
                identities not enrolled); None: the identity.

        Raises:
            RateLimitedError: the quota is spent; says when the next request fits.
        """
        p = self.policy
        if isinstance(req, Identify) and p.identify_per_hour:
            key: tuple[str, ...] = ("identify", req.site, req.gw)
            rate, burst, what = p.identify_per_hour, p.identify_burst, "identify requests"
        elif isinstance(req, Verify) and p.verify_per_identity_per_hour:
            key = ("verify", req.site, req.gw, req.identity if scope is None else scope)
            rate, burst = p.verify_per_identity_per_hour, p.verify_burst
            what = "verifies reading one pack (or identity)"
        elif isinstance(req, Enroll | Delete | KeyRetire) and p.writes_per_hour:
            key = ("writes", req.site, req.gw)
            rate, burst, what = p.writes_per_hour, p.writes_burst, "writes"
        else:
            return
        per_s = rate / 3600.0
        with self._lock:
            now = self._clock()
            b = self._buckets.pop(key, None)
            if b is None:
                b = _Bucket(float(burst), now)
            b.tokens = min(float(burst), b.tokens + (now - b.at) * per_s)
            b.at = now
            self._buckets[key] = b  # most recently used last
            if b.tokens < 1.0:
                self.refused += 1
                wait = (1.0 - b.tokens) / per_s
                raise RateLimitedError(
                    f"gateway {req.gw!r} of site {req.site!r} is over its quota of {rate} "
                    f"{what} an hour (burst {burst}); the next fits in {wait:.0f} s"
                )
            b.tokens -= 1.0
            if len(self._buckets) > self._max:
                self._trim(now)

    def _trim(self, now: float) -> None:
        """Drop buckets that have refilled (nothing lost), then the oldest if need be."""
        p = self.policy
        for key in list(self._buckets):
            if len(self._buckets) <= self._max * 0.9:
                return
            b = self._buckets[key]
            rate, burst = {
                "identify": (p.identify_per_hour, p.identify_burst),
                "writes": (p.writes_per_hour, p.writes_burst),
            }.get(key[0], (p.verify_per_identity_per_hour, p.verify_burst))
            if b.tokens + (now - b.at) * rate / 3600.0 >= burst:
                del self._buckets[key]
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)


__all__ = [
    "IDENTIFY_PER_HOUR",
    "UNKNOWN_SCOPE",
    "VERIFY_BURST",
    "VERIFY_PER_IDENTITY_PER_HOUR",
    "WRITES_BURST",
    "WRITES_PER_HOUR",
    "QuotaPolicy",
    "Quotas",
]
