"""Sans-IO decisions: from an encrypted result to match / no-match, checks first.

The edge agent calls these after the transport has matched a result to its request;
tests call them directly with results a malicious cloud crafted
(tests/test_guard.py), so the code that decides is the code under attack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from cipherface.crypto import thresholds
from cipherface.crypto.engine import EdgeCipher
from cipherface.crypto.guard import Guard
from cipherface.errors import ResultForgedError, ResultRejectedError

FloatArray = npt.NDArray[np.float64]
_T = TypeVar("_T")


def _decrypt(guard: Guard | None, decrypt: Callable[[], _T]) -> _T:
    """Run a decryption; a refusal made *after* decrypting (the plaintext is out of the
    honest range) is a bit about the plaintext: with a guard it counts as forged."""
    try:
        return decrypt()
    except ResultForgedError as exc:
        if guard is None:
            raise
        raise guard.forged(str(exc)) from None


def identify_best(
    cipher: EdgeCipher,
    guard: Guard | None,
    *,
    labels: Sequence[str | None],
    scores_blob: bytes | None,
    probe: FloatArray,
) -> tuple[str | None, float | None]:
    """Check and decrypt an identify result; the best live identity and its similarity.

    Args:
        cipher: the edge cipher.
        guard: the key's guard (None: unguarded key; no canary check, names in clear).
        labels: the label of every scored slot, as the cloud listed them.
        scores_blob: the result's encrypted scores (None only for an empty gallery).
        probe: the L2-normalised vector that was encrypted.

    Returns:
        ``(identity, similarity)`` of the best live slot; ``(None, None)`` when none.

    Raises:
        ResultRejectedError: malformed or wrong-shaped result; never decrypted.
        ResultForgedError: canaries off or labels forged (recorded by the guard).

    With a guard the similarity returned (and the choice of the best slot) carries the
    guard's secret decision noise (:meth:`~cipherface.crypto.guard.Guard.blur`).
    """
    if not labels:
        return None, None
    if scores_blob is None:
        raise ResultRejectedError("an identify result without scores")
    scores = _decrypt(
        guard, lambda: cipher.decrypt_scores(scores_blob, op="identify", count=len(labels))
    )
    if scores.shape != (len(labels),):
        raise ResultRejectedError(f"identify result decrypts to shape {scores.shape}")
    names: Sequence[str | None] = labels
    if guard is not None:
        opened = guard.open_slots(labels)
        guard.check(opened, scores, probe, packed=hasattr(cipher, "per_pack"))
        names = [x if isinstance(x, str) else None for x in opened]
        scores = guard.blur(scores)  # checked: now no threshold sees the exact value
    live = np.array([s is not None for s in names], dtype=bool)
    if not live.any():
        return None, None
    masked = np.where(live, scores, -np.inf)
    best = int(np.argmax(masked))
    if not np.isfinite(masked[best]):
        if guard is not None:  # a live slot out of the honest range: decrypted, so counted
            raise guard.forged("identify result decrypts to non-finite scores")
        raise ResultRejectedError("identify result decrypts to non-finite scores")
    return names[best], float(masked[best])


def identify_decision(
    cipher: EdgeCipher,
    guard: Guard | None,
    *,
    labels: Sequence[str | None],
    scores_blob: bytes | None,
    probe: FloatArray,
) -> tuple[bool, str | None]:
    """:func:`identify_best`, then the key's model threshold: ``(match, identity)``."""
    who, similarity = identify_best(
        cipher, guard, labels=labels, scores_blob=scores_blob, probe=probe
    )
    if similarity is None:
        return False, None
    match = thresholds.is_match(similarity, cipher.model, cipher.metric)
    return match, (who if match else None)


def verify_decision(
    cipher: EdgeCipher,
    guard: Guard | None,
    *,
    scores_blob: bytes,
    probe: FloatArray,
    pack: Sequence[str | None] | None = None,
    target: int | None = None,
) -> bool:
    """Check and decrypt a verify result, then decide.

    Args:
        cipher: the edge cipher.
        guard: the key's guard (None: unguarded).
        scores_blob: the result's encrypted scores.
        probe: the L2-normalised vector that was encrypted.
        pack: with a guard and a cipher that decrypts whole packs
            (``decrypt_pack_scores``): the labels of the target's pack, as listed.
        target: the target's place in ``pack``.

    Raises:
        ResultRejectedError: malformed or wrong-shaped result; never decrypted.
        ResultForgedError: the pack's canary is off or missing, or the cloud answered
            for another place in the pack (recorded by the guard).
    """
    decrypt_pack = getattr(cipher, "decrypt_pack_scores", None)
    if guard is not None and pack is not None and target is not None and decrypt_pack:
        scores, pos = _decrypt(guard, lambda: decrypt_pack(scores_blob))
        if pos != target:
            raise guard.forged(f"verify answered for place {pos} of the pack, not {target}")
        opened = guard.open_slots(pack)
        if not isinstance(opened[target], str):
            raise guard.forged("verify answered for a slot that is not the identity asked")
        guard.check(opened, np.asarray(scores)[: len(opened)], probe)
        score = float(guard.blur(scores[pos]))
    else:
        score = float(
            _decrypt(guard, lambda: cipher.decrypt_scores(scores_blob, op="verify", count=1))[0]
        )
        if guard is not None:
            score = float(guard.blur(score))
    if not np.isfinite(score):
        raise ResultRejectedError("verify result decrypts to a non-finite score")
    return thresholds.is_match(score, cipher.model, cipher.metric)


__all__ = ["identify_best", "identify_decision", "verify_decision"]
