"""Sharded galleries: one logical gallery split over shard sites, gathered at the edge.

A gallery too large for one cloud worker is split into *shards*. Each shard is an
ordinary site in topic space (``<site>-s0``, ``<site>-s1``, ...) with its own
gallery under the same site key, served by its own worker(s): ``cipherface cloud
--sites campus-s0``. Nothing in the protocol or the cloud changes.

**Why the edge gathers (not a cloud coordinator).** Every shard's scores are
encrypted under the edge's key: a coordinator could not pick the best match, only
forward ciphertexts, so it would add a hop, a process to run and a single point of
failure, and it would still have to tell the edge which shard answered. The edge
decrypts anyway; it already knows the shard list, so it also knows exactly which
shard is missing. The price is one probe upload per shard (4 MB for a 128-d CKKS
identify probe); docs/deployment.md gives the numbers.

* **Placement** is rendezvous hashing (highest random weight) of the identity over
  the shard names: adding a shard moves only the identities it now wins (about
  ``1/(S+1)``), removing one moves only its own.
* **Identify** asks every shard concurrently and takes the best decrypted score. A
  shard that does not answer (timeout, an error reply, a malformed result) makes the
  result *partial*: :meth:`ShardedEdge.identify` raises
  :class:`~cipherface.errors.PartialResultError` naming it -- access control fails
  closed -- unless ``allow_partial=True``, which returns a :class:`ShardedMatch` with
  ``missing`` set. A partial result is never reported as "no match". A *forged* result
  (the guard's canaries are off) is not a missing shard: it fails the whole identify
  with :class:`~cipherface.errors.ResultForgedError`, as on one gallery.
* **Trust**: with the key's guard (``guard=``) every shard is checked exactly as one
  gallery is (sealed labels, canaries in every pack, jitter, decision noise); one
  identify jitters and encrypts the probe once, counts as one decision and is refused
  when the gateway is halted or out of budget.
* **Rebalancing** (:meth:`ShardedEdge.rebalance`) enrolls the moved identities on
  their new shards first, identifies over the old and new shards meanwhile, and
  deletes from the old shards last, so every identity stays answerable throughout. A
  rebalance cut short (the edge killed) leaves copies on two shards: running it again
  finishes it, and meanwhile :meth:`ShardedEdge.delete` erases an identity from
  *every* shard and :meth:`ShardedEdge.enroll_bulk` from every shard but its own, so a
  leftover copy can never bring back a deleted identity or an old template.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cipherface.agents.edge import EdgeClient, _as_matrix
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import thresholds
from cipherface.crypto.engine import EdgeCipher
from cipherface.crypto.guard import Guard
from cipherface.crypto.trust import Canary
from cipherface.errors import (
    BrokerConnectionError,
    InvalidArgumentError,
    PartialResultError,
    PeerReportedError,
    PublishDeniedError,
    RequestTimeoutError,
    ResultForgedError,
    ResultRejectedError,
)
from cipherface.protocol import Decision, validate_id

log = logging.getLogger(__name__)

#: What makes a shard *missing* from an identify: it did not answer, answered with an
#: error, or its result was malformed (never decrypted). Anything else -- a forged
#: result, a halted gateway, a spent budget, a bug -- fails the whole identify.
_MISSING = (
    RequestTimeoutError,
    PeerReportedError,
    BrokerConnectionError,
    PublishDeniedError,
    ResultRejectedError,
)


#: Labels of each shard's result compared with the other shards' (see :func:`_replayed`).
REPLAY_SAMPLE = 64


def _replayed(guard: Guard, labels: Mapping[str, Sequence[str | None]]) -> str | None:
    """Why one shard's result looks like another's, or None.

    Every enrollment payload mints canaries of its own, so no canary is ever listed by
    two shards; a shard answering with another shard's result (which passes the
    canaries: one probe serves every shard) shows the same labels in the same order.
    The first :data:`REPLAY_SAMPLE` labels of each result are compared; a label two
    shards share is only a replay if it is a canary (a person is on two shards while
    a rebalance moves it).
    """
    seen: dict[str, str] = {}
    for shard, slots in labels.items():
        sample = [x for x in slots[: 4 * REPLAY_SAMPLE] if x is not None][:REPLAY_SAMPLE]
        for label in dict.fromkeys(sample):
            first = seen.setdefault(label, shard)
            if first != shard and isinstance(guard.trust.open(label), Canary):
                return f"shards {first} and {shard} list one canary: one answered for the other"
    return None


def shard_sites(site: str, count: int) -> list[str]:
    """The shard site ids of a logical site: ``<site>-s0`` ... ``<site>-s<count-1>``."""
    if count < 1:
        raise InvalidArgumentError("a sharded gallery needs at least one shard")
    return [validate_id(f"{site}-s{k}", what="shard site") for k in range(count)]


def owner(identity: str, shards: Sequence[str]) -> str:
    """The shard holding ``identity`` (rendezvous hashing over the shard names)."""
    if not shards:
        raise InvalidArgumentError("no shards")

    def weight(shard: str) -> bytes:
        return hashlib.blake2b(f"{shard}\x00{identity}".encode(), digest_size=8).digest()

    return max(shards, key=weight)


@dataclass(frozen=True, kw_only=True)
class ShardedMatch:
    """The gathered answer of an identify over a sharded gallery.

    Args:
        identity: the best-scoring identity among the shards that answered (None:
            nothing enrolled there).
        similarity: its decrypted score (edge-local: never publish it).
        match: whether it is within the model's threshold.
        answered: shards that answered.
        missing: shards that did not (timeout or error): a non-match is then unknown.
    """

    identity: str | None
    similarity: float | None
    match: bool
    answered: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def partial(self) -> bool:
        return bool(self.missing)


class ShardedEdge:
    """An edge gateway over a sharded gallery: one :class:`EdgeClient` per shard site.

    Use as a context manager.

    Args:
        broker: broker settings.
        cipher: the site's edge cipher (one key for every shard).
        shards: the shard site ids (see :func:`shard_sites`).
        gateway: this gateway's id (the same on every shard).
        timeout: seconds per attempt, per shard.
        retries: extra attempts per shard.
        allow_partial: let :meth:`identify` return a partial answer instead of
            raising :class:`~cipherface.errors.PartialResultError`.
        guard: the key's :class:`~cipherface.crypto.guard.Guard`, shared by every
            shard (:func:`~cipherface.crypto.guard.load_guard`); None only for a key
            made before trust secrets existed (unguarded: see docs/security.md).
        on_forged: called with the error when a shard's result is refused as forged.

    Raises:
        InvalidArgumentError: no shards, a repeated or bad shard id.
    """

    def __init__(
        self,
        *,
        broker: BrokerConfig,
        cipher: EdgeCipher,
        shards: Sequence[str],
        gateway: str,
        timeout: float = 15.0,
        retries: int = 2,
        allow_partial: bool = False,
        guard: Guard | None = None,
        on_forged: Callable[[ResultForgedError], None] | None = None,
    ) -> None:
        if not shards or len(set(shards)) != len(shards):
            raise InvalidArgumentError("shards must be a non-empty list of distinct site ids")
        self.broker = broker
        self.cipher = cipher
        self.gateway = gateway
        self.timeout = timeout
        self.retries = retries
        self.allow_partial = allow_partial
        self.guard = guard
        self.on_forged = on_forged
        self.shards: tuple[str, ...] = tuple(validate_id(s, what="shard site") for s in shards)
        #: Shards still consulted by identify while a rebalance drains them.
        self._draining: tuple[str, ...] = ()
        self._clients: dict[str, EdgeClient] = {}
        self._lock = threading.Lock()
        self._started = False

    # ---------------------------------------------------------------- lifecycle
    def _client(self, shard: str) -> EdgeClient:
        with self._lock:
            found = self._clients.get(shard)
            if found is None:
                found = EdgeClient(
                    broker=self.broker,
                    cipher=self.cipher,
                    site=shard,
                    gateway=self.gateway,
                    timeout=self.timeout,
                    retries=self.retries,
                    publish_decisions=False,  # decrypted-score decisions stay with the caller
                    guard=self.guard,
                    on_forged=self.on_forged,
                )
                found.start()
                self._clients[shard] = found
            return found

    def start(self) -> None:
        """Connect one client per shard."""
        for shard in self.shards:
            self._client(shard)
        self._started = True

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> ShardedEdge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- gallery ops
    def owner(self, identity: str) -> str:
        """The shard that holds ``identity``."""
        return owner(identity, self.shards)

    def publish_key(self) -> None:
        """Publish the site key to every shard."""
        for shard in self.shards:
            self._client(shard).publish_key()

    def _by_owner(self, ids: Sequence[str], shards: Sequence[str]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, ident in enumerate(ids):
            groups.setdefault(owner(ident, shards), []).append(i)
        return groups

    def _everywhere(self) -> tuple[str, ...]:
        """Every shard in use: the current list, then any still draining."""
        return tuple(dict.fromkeys(self.shards + self._draining))

    def enroll_bulk(self, ids: Sequence[str], vectors: npt.ArrayLike) -> int:
        """Enroll each identity on its shard; returns how many were enrolled.

        Afterwards the identities are erased from every other shard, so a copy a
        rebalance cut short left behind cannot keep answering with an old template.
        """
        vecs = np.asarray(vectors, dtype=np.float64)
        total = 0
        for shard, rows in self._by_owner(ids, self.shards).items():
            total += self._client(shard).enroll_bulk(
                [ids[i] for i in rows], vecs[rows], progress=False
            )
        for shard, rows in self._by_owner(ids, self.shards).items():
            for other in self._everywhere():
                if other != shard:
                    self._client(other).delete([ids[i] for i in rows])
        return total

    def delete(self, ids: Sequence[str]) -> int:
        """Erase identities from every shard (their own, and any copy a rebalance cut
        short left elsewhere); returns how many copies existed."""
        names = list(ids)
        if not names:
            return 0
        return sum(self._client(shard).delete(names) for shard in self._everywhere())

    def verify(self, identity: str, *, vector: npt.ArrayLike) -> Decision:
        """1:1 against the identity's own shard (one request, one shard)."""
        return self._client(self.owner(identity)).verify(identity, vector=vector)

    def identify_all(self, vector: npt.ArrayLike) -> ShardedMatch:
        """Ask every shard; the best decrypted score and the shards that did not answer.

        Raises:
            ResultForgedError: a shard's result failed the guard's checks (never decided
                on; the other shards' answers are dropped too).
            GatewayHaltedError / DecisionBudgetError: the guard refuses to decide.
        """
        shards = self._everywhere()
        found: dict[str, tuple[str | None, float | None]] = {}
        missing: list[str] = []
        fatal: list[BaseException] = []

        guard = self.guard
        if guard is not None:
            guard.admit()
        vec = _as_matrix(vector, self.cipher.dim, "probe vector")[0]
        if guard is not None:
            vec = guard.jitter(vec)  # once for every shard: its canaries are checked on it
        probe = self.cipher.encrypt_probe(vec, op="identify")  # once, for every shard

        labels: dict[str, list[Sequence[str | None]]] = {s: [] for s in shards}

        def ask(shard: str) -> tuple[str | None, float | None]:
            return self._client(shard).best_match(
                vec, probe=probe, decide=False, slots_out=labels[shard]
            )

        with ThreadPoolExecutor(len(shards)) as pool:
            futures = {shard: pool.submit(ask, shard) for shard in shards}
            for shard, fut in futures.items():
                try:
                    found[shard] = fut.result()
                except ResultForgedError as exc:
                    fatal.insert(0, exc)  # a forged result is reported before anything else
                except _MISSING as exc:
                    log.warning("shard %s did not answer identify: %s", shard, exc)
                    missing.append(shard)
                except BaseException as exc:  # halted, budget, a bug: nothing is decided
                    fatal.append(exc)
        if not fatal and guard is not None:
            replayed = _replayed(guard, {s: labels[s][0] for s in found if labels[s]})
            if replayed is not None:
                refused = guard.forged(replayed)
                if self.on_forged is not None:
                    try:
                        self.on_forged(refused)
                    except Exception:  # an alert hook must not change the outcome
                        log.exception("on_forged hook failed")
                fatal.append(refused)
        if fatal:
            raise fatal[0]
        if guard is not None and found:
            guard.decided()  # one identify, one decision, however many shards
        best: tuple[str | None, float | None] = (None, None)
        for ident, sim in found.values():
            if sim is not None and (best[1] is None or sim > best[1]):
                best = (ident, sim)
        sim = best[1]
        model, metric = self.cipher.model, self.cipher.metric
        match = sim is not None and thresholds.is_match(sim, model, metric)
        return ShardedMatch(
            identity=best[0],
            similarity=sim,
            match=match,
            answered=tuple(found),
            missing=tuple(missing),
        )

    def identify(self, vector: npt.ArrayLike) -> ShardedMatch:
        """1:N over every shard.

        Raises:
            PartialResultError: a shard did not answer and ``allow_partial`` is off
                (fails closed: a missing shard may hold the person).
        """
        got = self.identify_all(vector)
        if got.partial and not self.allow_partial:
            raise PartialResultError(
                f"identify is partial: shard(s) {', '.join(got.missing)} did not answer; "
                f"{len(got.answered)} of {len(got.answered) + len(got.missing)} answered",
                missing=got.missing,
            )
        return got

    def rebalance(self, shards: Sequence[str], templates: Mapping[str, Any]) -> int:
        """Move to a new shard list, keeping every identity answerable throughout.

        The cloud cannot move a template between shards by itself (no protocol op
        does), so the edge re-enrolls each moved identity from its template: first
        on the new shard, then deletes it from the old one; identify consults both
        shard lists until the move is done.

        Safe to run again after it was cut short (the edge killed midway), from an
        edge holding the old or the new list: it looks at every shard of both, and
        any identity found on a shard that does not own it is enrolled on its owner
        (unless the owner has it already) and then erased from the other shard.

        Args:
            shards: the new shard site ids.
            templates: the L2-normalised template of every identity enrolled now
                (identity -> vector).

        Returns:
            How many identities moved.

        Raises:
            InvalidArgumentError: a shard holds identities missing from ``templates``
                (they could not be moved: nothing is changed).
        """
        new = tuple(validate_id(s, what="shard site") for s in shards)
        if not new or len(set(new)) != len(new):
            raise InvalidArgumentError("shards must be a non-empty list of distinct site ids")
        old = self.shards
        every = tuple(dict.fromkeys(old + new))
        held = {s: {i for i in self._client(s).ids() if i is not None} for s in every}
        unknown = sorted({i for ids in held.values() for i in ids} - set(templates))
        if unknown:
            raise InvalidArgumentError(
                f"{len(unknown)} enrolled identities have no template to move "
                f"(first: {unknown[0]!r}); nothing was changed"
            )
        strays = [  # (identity, the shard holding a copy it should not)
            (ident, src) for src, ids in held.items() for ident in ids if owner(ident, new) != src
        ]
        for shard in new:
            if shard not in old:
                self._client(shard).publish_key()
        self._draining = every  # identify asks old and new shards from here on
        self.shards = new
        by_dst: dict[str, list[str]] = {}
        for ident in dict.fromkeys(i for i, _ in strays):
            dst = owner(ident, new)
            if ident not in held[dst]:
                by_dst.setdefault(dst, []).append(ident)
        for dst, ids in by_dst.items():
            self._client(dst).enroll_bulk(
                ids, np.stack([templates[i] for i in ids]), progress=False
            )
        by_src: dict[str, list[str]] = {}
        for ident, src in strays:
            by_src.setdefault(src, []).append(ident)
        for src, ids in by_src.items():
            self._client(src).delete(ids)
        self._draining = ()
        return len({i for i, _ in strays})


__all__ = ["ShardedEdge", "ShardedMatch", "owner", "shard_sites"]
