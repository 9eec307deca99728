"""The edge's guard against a cheating cloud: canary checks, a decision budget, a halt.

A malicious cloud cannot be stopped from *sending* crafted results (CKKS ciphertexts
are malleable: anyone with the public key can shift a score), but it must not be able
to *learn* from the edge's reaction to them. The reviewed attack (add ``t·X^j`` to
``c1``; the decrypted score moves by ``t·s_(k-j)``, a secret-key coefficient; a match
or no-match reveals its sign) recovered the whole key from a few thousand decisions.
:class:`Guard` answers it three ways:

* **canaries**: before a decision, every canary slot of the result (see
  :mod:`cipherface.crypto.trust`) must score what the edge computes in the clear from
  its own canary template and probe, within a tolerance derived from the measured
  honest noise (per canary, and a chi-square bound over all canaries of the result).
  A key-dependent shift moves every coefficient, canaries included, so it is caught;
  a result that fails is never decided on (:class:`~cipherface.errors.ResultForgedError`).
* **a halt**: each failure is counted in the key directory's ``trust.state``; after
  ``max_forged`` (default 3) the gateway refuses every decision
  (:class:`~cipherface.errors.GatewayHaltedError`) until an operator rotates the key
  (``cipherface rotate-key``) or clears the halt (``cipherface guard --reset``). The
  failure itself is one bit the cloud may observe, so the halt bounds that channel.
* **a decision budget**: at most ``budget`` decisions under one key
  (:class:`~cipherface.errors.DecisionBudgetError` afterwards, with rotation as the
  remedy). It bounds what any attack below the canaries' resolution can gather.

The state file is updated under an exclusive ``flock``, so several processes of one
gateway sharing a key directory count together.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from cipherface.crypto.engine import normalise_embeddings
from cipherface.crypto.trust import GROUP_ID_BYTES, Canary, Opened, TrustKey, load_trust_key
from cipherface.errors import (
    DecisionBudgetError,
    GatewayHaltedError,
    InvalidArgumentError,
    KeyFileError,
    ResultForgedError,
)

log = logging.getLogger(__name__)

STATE_NAME: Final = "trust.state"
#: Default number of decisions one key may make before rotation (a busy door makes a
#: few thousand a day: about a year).
DEFAULT_BUDGET: Final = 1_000_000
#: Default number of forged results before the gateway halts.
DEFAULT_MAX_FORGED: Final = 3
#: Honest per-score noise (standard deviation) when the cipher does not state its own:
#: measured 9.9e-6 on the SEAL engine, whose smudging noise (uniform, 2^42) dominates
#: (tests/test_guard.py re-measures it; the first engine had 4.8e-6).
DEFAULT_SIGMA: Final = 1.1e-5
#: A single canary may be off by at most this many sigmas (honest max over 10^7: < 6).
CANARY_MAX_SIGMAS: Final = 12.0
#: Norm of the secret random vector added to every probe before encryption: each score
#: moves by about JITTER/sqrt(d) (3.5e-4 at d=128, far inside any face threshold's
#: margin), so a cloud can neither replay an old result (its canaries no longer fit)
#: nor aim a score at the threshold more finely than that, i.e. not below the
#: canaries' resolution.
JITTER: Final = 4e-3
#: Half-width of the secret uniform noise added to every decrypted score after the
#: canary check and before any threshold (noise flooding of what a decision reveals).
#: A cloud that aims a score at the threshold and moves it by a key-dependent ``t``
#: (a few 1e-5 at most: the canaries catch more) changes the decision's probability by
#: only ``t / (2 u)`` (about 1 %), so each key coefficient costs it thousands of
#: decisions (tests/test_trust_review.py); honest decisions move by at most 2e-3.
DECISION_NOISE: Final = 2e-3
#: Canaries are spread one per this many slots when the scheme has no packs.
DEFAULT_SPACING: Final = 32

FloatArray = npt.NDArray[np.float64]


@dataclass
class GuardState:
    """What ``trust.state`` records (JSON).

    Args:
        key_id: the key these counts belong to.
        decisions: decisions made under the key.
        forged: results refused as forged.
        halted: why the gateway halted, or None.
    """

    key_id: str
    decisions: int = 0
    forged: int = 0
    halted: str | None = None


def chi2_limit(m: int) -> float:
    """Largest sum of squared canary deviations (in sigmas) an honest result may have.

    ``m`` degrees of freedom; ``m + 10·sqrt(2m) + 40`` is far in the tail (honest
    probability below 1e-12 for every ``m``), yet a shift of 2 sigmas on two thirds of
    128 canaries (what the key-recovery attack needs) exceeds it.
    """
    return m + 10.0 * math.sqrt(2.0 * m) + 40.0


class Guard:
    """One gateway's guard for one site key (see the module docstring).

    Args:
        trust: the site's trust secret.
        key_id: the key the state belongs to.
        dim: embedding dimension (canary templates).
        state_path: the ``trust.state`` file (created 0600).
        sigma: honest per-score noise standard deviation.
        per_pack: slots per pack (each holds ``trust.canaries`` canaries, at most half of
            it); :data:`DEFAULT_SPACING` when the scheme has no packs.
        budget: decisions allowed under this key.
        max_forged: forged results before the gateway halts.
        packed: the scheme keeps each payload's templates in place, pack by pack, and a
            result's slots follow them (CKKS); with a ``CFTRUST3`` key every pack a payload
            opens is then filled with canaries and bound to them (see :meth:`check`).
        decision_noise: :data:`DECISION_NOISE` (0 turns it off: measurements only).

    Raises:
        InvalidArgumentError: a bad budget, sigma or pack size.
    """

    def __init__(
        self,
        *,
        trust: TrustKey,
        key_id: str,
        dim: int,
        state_path: str | os.PathLike[str],
        sigma: float = DEFAULT_SIGMA,
        per_pack: int = DEFAULT_SPACING,
        budget: int = DEFAULT_BUDGET,
        max_forged: int = DEFAULT_MAX_FORGED,
        packed: bool = True,
        decision_noise: float = DECISION_NOISE,
    ) -> None:
        if budget < 1 or max_forged < 1 or not sigma > 0 or per_pack < 2:
            raise InvalidArgumentError("budget, max_forged >= 1, sigma > 0, per_pack >= 2")
        if not 0 <= decision_noise < 0.1:
            raise InvalidArgumentError("decision_noise must be in [0, 0.1)")
        self.decision_noise = float(decision_noise)
        self.trust = trust
        self.key_id = key_id
        self.dim = dim
        self.sigma = float(sigma)
        self.per_pack = int(per_pack)
        # Canaries per pack: what the trust key was made with, at most half a pack (a
        # 512-d model has 8 slots a pack: 4 canaries; a first-format key: 1).
        self.canaries = max(1, min(trust.canaries, self.per_pack // 2))
        # Full, bound packs: only where slots follow payloads (CKKS) and the key is CFTRUST3.
        self.bound = bool(packed and trust.bound)
        self.budget = int(budget)
        self.max_forged = int(max_forged)
        self.state_path = Path(state_path)
        self._lock = threading.Lock()
        self._vectors: dict[bytes, FloatArray] = {}

    def __repr__(self) -> str:
        return f"Guard(key_id={self.key_id}, budget={self.budget}, max_forged={self.max_forged})"

    # ------------------------------------------------------------------ state
    @contextmanager
    def _state(self, *, durable: bool = False) -> Iterator[GuardState]:
        """Read, let the caller change, and write back the state under an exclusive lock."""
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        with self._lock, open(lock_path, "a+b") as lock:
            os.chmod(lock_path, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            before = asdict(state)
            yield state
            if asdict(state) != before:
                self._write(state, durable=durable)

    def _read(self) -> GuardState:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return GuardState(key_id=self.key_id)
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"{self.state_path} is unreadable: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("key_id") != self.key_id:
            raise KeyFileError(f"{self.state_path} belongs to another key")
        try:
            return GuardState(
                key_id=self.key_id,
                decisions=int(raw["decisions"]),
                forged=int(raw["forged"]),
                halted=raw.get("halted") if isinstance(raw.get("halted"), str) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"{self.state_path} is malformed: {exc}") from exc

    def _write(self, state: GuardState, *, durable: bool) -> None:
        tmp = self.state_path.with_name(f".{self.state_path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(state), fh)
            if durable or state.decisions % 64 == 0:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    def status(self) -> GuardState:
        """The current counts (a copy)."""
        with self._state() as s:
            return GuardState(**asdict(s))

    def reset_halt(self) -> None:
        """Clear a halt and zero the forged count (each reset gives a cheating cloud
        ``max_forged`` more refusals to observe; the log keeps the record). Operators only."""
        with self._state(durable=True) as s:
            s.halted = None
            s.forged = 0

    # -------------------------------------------------------------- decisions
    def admit(self) -> None:
        """Refuse to start a decision when halted or out of budget.

        Raises:
            GatewayHaltedError: forged results were received; the gateway is halted.
            DecisionBudgetError: the key's decision budget is spent.
        """
        with self._state() as s:
            if s.halted is not None:
                raise GatewayHaltedError(
                    f"gateway halted after {s.forged} forged result(s) from the cloud "
                    f"({s.halted}); rotate the key (cipherface rotate-key) or, "
                    "after investigating, clear it with cipherface guard --reset"
                )
            if s.decisions >= self.budget:
                raise DecisionBudgetError(
                    f"key {self.key_id} has made its {self.budget} decisions: rotate it "
                    "(cipherface rotate-key, docs/deployment.md section 5) to go on"
                )

    def decided(self) -> int:
        """Count one decision; returns how many remain in the budget."""
        with self._state() as s:
            s.decisions += 1
            return self.budget - s.decisions

    def forged(self, reason: str) -> ResultForgedError:
        """Record a forged result; returns the error to raise (the halt is recorded too)."""
        with self._state(durable=True) as s:
            s.forged += 1
            if s.forged >= self.max_forged and s.halted is None:
                s.halted = reason[:200]
            halted = s.halted is not None
            count = s.forged
        log.error(
            "forged result from the cloud for key %s (%d so far%s): %s",
            self.key_id,
            count,
            "; gateway HALTED" if halted else "",
            reason,
        )
        return ResultForgedError(f"result refused, not decided on: {reason}")

    def jitter(self, probe: npt.ArrayLike) -> FloatArray:
        """``probe`` plus a fresh secret random vector of norm :data:`JITTER`, renormalised.

        Raises:
            InvalidArgumentError: not a finite, nonzero real vector of the key's dimension.
        """
        v = normalise_embeddings(probe, self.dim)[0]
        r = self.trust.canary_vector(self.trust.new_canary()[1], self.dim)
        out = v + JITTER * r
        return np.asarray(out / np.linalg.norm(out), dtype=np.float64)

    def blur(self, scores: npt.ArrayLike) -> FloatArray:
        """``scores`` plus fresh secret noise, uniform in ``±decision_noise`` (``secrets``).

        Applied after the canary check, before any threshold: a decision (or a similarity
        a gateway thresholds itself) never rests on the exact decrypted value, whose
        last digits a cheating cloud could make key-dependent.
        """
        x = np.asarray(scores, dtype=np.float64)
        if not self.decision_noise or x.size == 0:
            return x.copy()
        u = np.frombuffer(secrets.token_bytes(8 * x.size), dtype="<u8") >> np.uint64(11)
        unit = u.astype(np.float64).reshape(x.shape) / float(1 << 53)  # [0, 1)
        return np.asarray(x + self.decision_noise * (2.0 * unit - 1.0), dtype=np.float64)

    # ----------------------------------------------------------------- labels
    def seal(self, name: str) -> str:
        """The cloud-side label of ``name``."""
        return self.trust.seal(name)

    def open_slots(self, labels: Sequence[str | None]) -> list[Opened]:
        """Open every label of a listing.

        Raises:
            ResultForgedError: a label this site never sealed (recorded as forged).
        """
        out: list[Opened] = []
        for i, label in enumerate(labels):
            try:
                out.append(self.trust.open(label))
            except ValueError as exc:
                raise self.forged(f"slot {i} has a label this site never made ({exc})") from None
        return out

    def canary_vector(self, canary: Canary) -> FloatArray:
        v = self._vectors.get(canary.cid)
        if v is None:
            v = self._vectors[canary.cid] = self.trust.canary_vector(canary, self.dim)
        return v

    def with_canaries(
        self, names: Sequence[str], vectors: npt.ArrayLike
    ) -> tuple[list[str], FloatArray]:
        """Sealed labels and templates of one enrollment payload, with its canaries.

        Every ``per_pack - canaries`` names get ``canaries`` canaries at random positions
        among them, so each pack the payload fills (the cloud starts a multi-template
        payload on a pack boundary) holds that many. With a bound key (``CFTRUST3``, packed
        scheme) the last pack is filled too -- its unused slots are canaries, so no pack
        holding a person keeps a free slot -- and every canary's label records its group,
        place, the pack's size and canary count (a single name makes a full pack: 1
        person, ``per_pack - 1`` canaries; the pack was taken whole anyway).


        Raises:
            InvalidArgumentError: names and vectors disagree, or a vector is not finite.
        """
        v = normalise_embeddings(vectors, self.dim) if len(names) else np.zeros((0, self.dim))
        if v.shape[0] != len(names):
            raise InvalidArgumentError(f"{len(names)} names for {v.shape[0]} vectors")
        labels: list[str] = []
        rows: list[FloatArray] = []
        m = self.canaries
        group = self.per_pack - m
        for lo in range(0, len(names), group):
            hi = min(lo + group, len(names))
            ncan = self.per_pack - (hi - lo) if self.bound else m
            order: list[int] = list(range(lo, hi)) + [-1] * ncan  # -1: a canary
            # Fisher-Yates with the CSPRNG: the canaries' places are secret.
            for i in range(len(order) - 1, 0, -1):
                j = secrets.randbelow(i + 1)
                order[i], order[j] = order[j], order[i]
            gid = secrets.token_bytes(GROUP_ID_BYTES)
            for place, i in enumerate(order):
                if i < 0:
                    if self.bound:
                        label, canary = self.trust.new_canary(
                            group=gid, offset=place, size=len(order), count=ncan
                        )
                    else:
                        label, canary = self.trust.new_canary()
                    labels.append(label)
                    rows.append(self.canary_vector(canary))
                else:
                    labels.append(self.seal(names[i]))
                    rows.append(v[i])
        return labels, np.stack(rows) if rows else np.zeros((0, self.dim))

    def payload_names(self, max_templates: int) -> int:
        """How many user names fit in one payload of ``max_templates`` with their canaries."""
        packs = max(1, max_templates // self.per_pack)
        return packs * (self.per_pack - self.canaries)

    # ----------------------------------------------------------------- checks
    def check(
        self,
        slots: Sequence[Opened],
        scores: FloatArray,
        probe: FloatArray,
        *,
        first_slot: int = 0,
        packed: bool = True,
    ) -> None:
        """Refuse a result whose canaries do not score what they must.

        Args:
            slots: the opened label of every scored slot (same order as ``scores``).
            scores: the decrypted scores.
            probe: the L2-normalised probe the edge encrypted.
            first_slot: gallery slot number of ``slots[0]`` (pack alignment).
            packed: every pack holding a user's template must hold all its canaries (CKKS).

        Raises:
            ResultForgedError: a canary is missing or off (recorded; may halt).
        """
        if len(slots) != len(scores):
            raise self.forged(f"{len(scores)} scores for {len(slots)} slots")
        canaries = [i for i, s in enumerate(slots) if isinstance(s, Canary)]
        users = [i for i, s in enumerate(slots) if isinstance(s, str)]
        m = self.canaries
        if users and len(canaries) < m:
            raise self.forged(f"a result with {len(canaries)} canaries (at least {m})")
        if packed and self.bound:
            self._check_places(slots, canaries, users, first_slot)
        elif packed and users:
            # Every pack holding a person must show all its canaries: a cloud that lists
            # fewer (marks them free) would leave the shift fewer places to be caught.
            P = self.per_pack
            per: dict[int, int] = {}
            for i in canaries:
                per[(first_slot + i) // P] = per.get((first_slot + i) // P, 0) + 1
            bare = sorted(p for p in {(first_slot + i) // P for i in users} if per.get(p, 0) < m)
            if bare:
                raise self.forged(
                    f"{len(bare)} pack(s) with fewer than {m} canaries (first: {bare[0]})"
                )
        if not canaries:
            return
        expect = np.array([self.canary_vector(slots[i]).dot(probe) for i in canaries])  # type: ignore[arg-type]
        got = np.asarray(scores, dtype=np.float64)[canaries]
        if not np.isfinite(got).all():
            raise self.forged("a canary decrypts to a non-finite score")
        z = (got - expect) / self.sigma
        worst = float(np.abs(z).max())
        chi2 = float((z * z).sum())
        if worst > CANARY_MAX_SIGMAS or chi2 > chi2_limit(len(canaries)):
            raise self.forged(
                f"{len(canaries)} canaries off by up to {worst:.1f} sigma "
                f"(chi-square {chi2:.0f} > {chi2_limit(len(canaries)):.0f})"
            )

    def _check_places(
        self, slots: Sequence[Opened], canaries: list[int], users: list[int], first_slot: int
    ) -> None:
        """Bound packs: every person where its pack's group holds a person, every canary
        of that group listed, each at its own place.

        A free slot holds a zero template: a person listed there would be decided on a
        score the cloud writes exactly (and can then move by a key-dependent amount
        small enough to pass the canaries). Bound packs have no free slot, and a person
        can sit only at a place of the group that is not a canary.
        """
        P = self.per_pack
        groups: dict[int, list[Canary]] = {}
        for i in canaries:
            c = slots[i]
            assert isinstance(c, Canary)
            if c.group is None or (first_slot + i) % P != c.offset:
                raise self.forged(f"a canary listed at slot {i}, out of its place in the pack")
            groups.setdefault((first_slot + i) // P, []).append(c)
        for p in sorted({(first_slot + i) // P for i in users}):
            cans = groups.get(p, [])
            head = cans[0] if cans else None
            if (
                head is None
                or any(c.group != head.group for c in cans)
                or len(cans) != head.count
                or head.count < self.canaries
            ):
                raise self.forged(
                    f"pack {p} holds people but lists {len(cans)} canaries, fewer than "
                    "its group holds (or of several groups)"
                )
            taken = {c.offset for c in cans}
            for i in users:
                o = (first_slot + i) % P
                if (first_slot + i) // P == p and (o >= head.size or o in taken):
                    raise self.forged(
                        f"an identity listed at place {o} of pack {p}, where the pack holds "
                        "no person"
                    )


def state_path(keys: str | os.PathLike[str]) -> Path:
    """The ``trust.state`` file of a key directory."""
    p = Path(keys)
    return (p if p.is_dir() else p.parent) / STATE_NAME


def load_guard(
    keys: str | os.PathLike[str],
    cipher: Any,
    *,
    budget: int = DEFAULT_BUDGET,
    max_forged: int = DEFAULT_MAX_FORGED,
) -> Guard | None:
    """The guard of a key directory, or None when it has no ``trust.key`` (made before).

    Raises:
        KeyFileError: a malformed or exposed ``trust.key`` / ``trust.state``.
    """
    p = Path(keys)
    directory = p if p.is_dir() else p.parent
    trust = load_trust_key(directory)
    if trust is None:
        return None
    packed = hasattr(cipher, "per_pack")
    if packed and not trust.bound:
        log.warning(
            "%s/trust.key predates format CFTRUST3: its packs keep free slots that a "
            "cheating cloud can list a person on; rotate the key (docs/security.md)",
            directory,
        )
    return Guard(
        trust=trust,
        key_id=cipher.key_id,
        dim=cipher.dim,
        state_path=directory / STATE_NAME,
        sigma=float(getattr(cipher, "score_sigma", DEFAULT_SIGMA)),
        per_pack=int(getattr(cipher, "per_pack", DEFAULT_SPACING)),
        budget=budget,
        max_forged=max_forged,
        packed=packed,
    )


__all__ = [
    "DECISION_NOISE",
    "DEFAULT_BUDGET",
    "DEFAULT_MAX_FORGED",
    "DEFAULT_SIGMA",
    "STATE_NAME",
    "Guard",
    "GuardState",
    "chi2_limit",
    "load_guard",
    "state_path",
]
