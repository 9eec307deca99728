"""The scheme-independent contract of the encrypted gallery engine.

Two roles, one per party:

* :class:`EdgeCipher` lives on the edge and holds the secret key. It encrypts
  templates (enrollment) and probes (verify / identify), and decrypts the cloud's
  results after checking they are exactly what was asked for.
* :class:`Gallery` lives in the cloud, one per site, with the public key only.
  It stores encrypted templates, deletes them, and computes encrypted scores.

Scores are *similarities* (dot products of L2-normalised embeddings, i.e. cosine
similarity in [-1, 1]); the edge turns them into distances and decisions
(:mod:`cipherface.crypto.thresholds`). Payloads and results are opaque bytes whose
formats are specified in docs/crypto.md, so the protocol layer can carry them
without knowing the scheme.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cipherface.errors import InvalidArgumentError

if TYPE_CHECKING:
    from cipherface.store.replies import Reply

ProbeOp = Literal["verify", "identify"]
FloatArray = npt.NDArray[np.float64]


def normalise_embeddings(vectors: npt.ArrayLike, dim: int) -> FloatArray:
    """Check and L2-normalise embeddings: rows of ``dim`` finite real numbers.

    Each row is divided by its largest magnitude before its norm is taken, so huge
    entries (1e155: the plain norm overflows to inf) keep their direction instead of
    collapsing to zero.

    Args:
        vectors: one vector ``(dim,)`` or rows ``(n, dim)``.
        dim: the embedding dimension of the key.

    Returns:
        ``(n, dim)`` float64, unit rows.

    Raises:
        InvalidArgumentError: not real numbers (complex, strings, ragged), wrong shape,
            NaN/inf, or a row whose norm is zero or not representable.
    """
    try:
        raw = np.asarray(vectors)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"embeddings must be numeric arrays: {exc}") from exc
    if raw.dtype.kind not in "iuf":  # complex would silently lose its imaginary part
        raise InvalidArgumentError(f"embeddings must be real numbers, not {raw.dtype}")
    x = raw.astype(np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] < 1:
        raise InvalidArgumentError(f"expected embeddings of shape (n, {dim}), got {raw.shape}")
    if not np.isfinite(x).all():
        raise InvalidArgumentError("embeddings contain NaN or infinite values")
    peak = np.max(np.abs(x), axis=1, keepdims=True)
    if (peak < np.finfo(np.float64).tiny).any():
        raise InvalidArgumentError("an embedding is all zeros (or subnormal): it has no direction")
    x = x / peak
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # in [1, sqrt(dim)]: representable
    return np.asarray(x / norms, dtype=np.float64)


@runtime_checkable
class EdgeCipher(Protocol):
    """Edge side of one scheme: encrypt with the secret key, validate and decrypt results."""

    scheme: str
    key_id: str
    dim: int
    model: str  # face model the key was made for (decides the thresholds)
    metric: str  # "cosine" or "euclidean"
    max_templates_per_payload: int  # enrollment payloads stay inside one MQTT message

    def public_key_bytes(self) -> bytes:
        """Return the public key file (what the cloud needs, nothing more)."""
        ...

    def encrypt_templates(self, vectors: npt.ArrayLike) -> bytes:
        """Encrypt ``n`` L2-normalised templates (shape ``(n, dim)``) as one enrollment payload."""
        ...

    def encrypt_probe(self, vector: npt.ArrayLike, *, op: ProbeOp) -> bytes:
        """Encrypt (Paillier family: encode) one probe for ``verify`` or ``identify``."""
        ...

    def decrypt_scores(self, result: bytes, *, op: ProbeOp, count: int) -> FloatArray:
        """Check that ``result`` answers ``op`` with ``count`` scores under this key, then decrypt.

        Raises:
            ResultRejectedError: wrong scheme, key id, parameters or count.
        """
        ...


@runtime_checkable
class Gallery(Protocol):
    """Cloud side: one site's encrypted gallery (public key only)."""

    scheme: str
    key_id: str
    dim: int

    @property
    def count(self) -> int:
        """Number of live (not deleted) templates."""
        ...

    @property
    def ids_version(self) -> int:
        """Increases whenever the slot -> identity mapping changes."""
        ...

    def ids(self) -> list[str | None]:
        """Identity of every slot in score order; ``None`` for free or deleted slots."""
        ...

    def enroll(self, ids: Sequence[str], payload: bytes, *, reply: Reply | None = None) -> int:
        """Add templates for ``ids`` from an :meth:`EdgeCipher.encrypt_templates` payload.

        An id already enrolled is replaced (its old slot is deleted). Returns the number
        added. Durable on return. ``reply``: the request's reply, stored in the same
        commit (its ``count`` set to the number added; ``reply.data`` on return).

        Raises:
            AlreadyAnsweredError: a reply is stored under ``reply.key`` already
                (nothing changed).
        """
        ...

    def delete(self, ids: Sequence[str], *, reply: Reply | None = None) -> int:
        """Erase the given identities; returns how many existed. Durable on return.

        ``reply`` as in :meth:`enroll` (``count``: how many existed); stored even when
        nothing existed.
        """
        ...

    def verify(self, identity: str, probe: bytes) -> bytes:
        """Encrypted similarity of ``probe`` against one identity (a result of count 1)."""
        ...

    def identify(self, probe: bytes) -> tuple[bytes, int]:
        """Encrypted similarities of ``probe`` against every slot; returns (result, count)."""
        ...

    def close(self) -> None:
        """Release files and worker resources."""
        ...
