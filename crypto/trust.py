"""The site's trust secret: opaque identity labels and secret canary templates.

A key directory made by ``cipherface keygen`` holds, beside ``private.key``, a
``trust.key`` (0600, never leaves the edge): 32 bytes from the OS CSPRNG. Two keys
are derived from it with HKDF-SHA256:

* a **label key** (AES-SIV, 512 bits): every identity name the cloud sees is
  ``base64url(AES-SIV(name padded to 80 bytes))``, always 128 characters. The cloud
  no longer learns names or their lengths, the same name gets unrelated labels at two
  sites (or under two keys of one site), and the edge detects a label the cloud made up
  (SIV authenticates). Deterministic on purpose: verify and delete name a label.
* a **canary key**: a canary is a label whose plaintext starts with a control byte (a
  user name is printable, so it can never be a canary) and 8 random bytes, and whose
  template is a unit vector expanded from SHAKE-256(canary key, those 8 bytes). The edge
  enrolls at least :data:`CANARIES_PER_PACK` canaries in every pack of every
  enrollment, at random positions, inside ordinary enroll batches; it knows each
  canary's template, so it knows the score every canary must get against any probe,
  and refuses a result whose canaries are off (:mod:`cipherface.crypto.guard`). To the
  cloud a canary is one more 128-character label and one more ciphertext.

Since format ``CFTRUST3`` a canary's label also **binds its pack**: the group id shared
by the canaries of one pack, the canary's place in the pack, the number of templates
the pack was filled with and how many of them are canaries. Every pack a payload opens
is filled to the last slot (the slots no person takes are canaries too), so the edge
can refuse a listing that puts a person where its pack holds none -- a free slot, whose
template is zero and whose score the cloud would then choose exactly
(tests/test_trust_review.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cipherface.crypto.keyfile import write_atomic
from cipherface.errors import InvalidArgumentError, KeyFileError

TRUST_NAME: Final = "trust.key"
MAGIC: Final = b"CFTRUST3\n"
#: The second format (four canaries a pack, not bound to it: packs may keep free
#: slots; still read, never written) and the first (one canary per pack).
MAGIC_V2: Final = b"CFTRUST2\n"
MAGIC_V1: Final = b"CFTRUST1\n"
#: Canaries in every pack of a key made now. A key-dependent shift leaves one given
#: canary exactly unmoved with probability 1/3 (ternary secret), so a result checked by
#: ``m`` canaries passes such a shift with probability ``3^-m``: 1 in 81 here, against
#: 1 in 3 with the first format's single canary (tests/test_trust_attacks.py).
CANARIES_PER_PACK: Final = 4
SEED_BYTES: Final = 32
#: Plaintext of every label: one length byte + up to 79 bytes of UTF-8, zero padded.
LABEL_PLAIN_BYTES: Final = 80
MAX_NAME_BYTES: Final = LABEL_PLAIN_BYTES - 1
#: 16-byte SIV + 80 bytes, base64url without padding: exactly 128 characters (the
#: protocol's identity limit).
LABEL_CHARS: Final = 128
_AD: Final = b"cipherface label/1"
_CANARY_TAG: Final = 0x00  # tag + cid (formats 1 and 2)
_BOUND_TAG: Final = 0x01  # tag + cid + group + offset, size, count (format 3)
CANARY_ID_BYTES: Final = 8
GROUP_ID_BYTES: Final = 8
_BOUND = struct.Struct(">HHH")


@dataclass(frozen=True)
class Canary:
    """A canary slot's identity (its template is :meth:`TrustKey.canary_vector`).

    Args:
        cid: the random id its template is derived from.
        group: id shared by the canaries of one pack (None: a canary of format 1 or 2,
            bound to nothing).
        offset: its place in the pack.
        size: templates the pack was filled with (persons and canaries).
        count: canaries among them.
    """

    cid: bytes
    group: bytes | None = None
    offset: int = -1
    size: int = 0
    count: int = 0


Opened = str | Canary | None  # a user's name, a canary, or a free/deleted slot


class TrustKey:
    """Label sealing and canary derivation for one site key.

    Args:
        seed: the 32-byte trust secret (:func:`load_trust_key` / :func:`create_trust_key`).
        canaries: canaries enrolled in every pack under this key, at least (1 for a
            first-format ``trust.key``).
        bound: canaries bind their pack and packs are filled (format 3; False for the
            earlier formats, whose galleries keep free slots the edge cannot tell apart).

    Raises:
        InvalidArgumentError: a seed of the wrong length or a canary count out of 1..16.
    """

    def __init__(
        self, *, seed: bytes, canaries: int = CANARIES_PER_PACK, bound: bool = True
    ) -> None:
        if len(seed) != SEED_BYTES:
            raise InvalidArgumentError(f"a trust seed has {SEED_BYTES} bytes")
        if not 1 <= canaries <= 16:
            raise InvalidArgumentError("canaries per pack must be in 1..16")
        self.canaries = int(canaries)
        self.bound = bool(bound)
        self._siv = AESSIV(_hkdf(seed, b"cipherface labels v1", 64))
        self._canary_key = _hkdf(seed, b"cipherface canaries v1", 32)
        self._fingerprint = hashlib.sha256(b"fp" + seed).hexdigest()[:8]

    def __repr__(self) -> str:  # never the seed or derived keys
        return f"TrustKey(fingerprint={self._fingerprint})"

    # ------------------------------------------------------------------ labels
    def seal(self, name: str) -> str:
        """The opaque label the cloud sees for ``name`` (128 characters).

        Raises:
            InvalidArgumentError: ``name`` is longer than 79 bytes in UTF-8.
        """
        raw = name.encode("utf-8")
        if len(raw) > MAX_NAME_BYTES:
            raise InvalidArgumentError(
                f"identity {name[:40]!r}... is {len(raw)} bytes in UTF-8: at most "
                f"{MAX_NAME_BYTES} (labels are encrypted to a fixed length)"
            )
        if raw[:1] in (bytes([_CANARY_TAG]), bytes([_BOUND_TAG])):
            raise InvalidArgumentError("an identity cannot start with a control character")
        return self._seal_bytes(raw)

    def _seal_bytes(self, raw: bytes) -> str:
        plain = bytes([len(raw)]) + raw + bytes(LABEL_PLAIN_BYTES - 1 - len(raw))
        ct = self._siv.encrypt(plain, [_AD])
        return base64.urlsafe_b64encode(ct).decode("ascii").rstrip("=")

    def open(self, label: str | None) -> Opened:
        """The name (or :class:`Canary`) behind a label; None stays None.

        Raises:
            ValueError: not a label sealed with this key (forged, or another key's).
        """
        if label is None:
            return None
        if len(label) != LABEL_CHARS:
            raise ValueError("not a sealed label")
        try:
            ct = base64.urlsafe_b64decode(label + "=" * (-len(label) % 4))
            plain = self._siv.decrypt(ct, [_AD])
        except (ValueError, InvalidTag) as exc:
            raise ValueError("label fails authentication") from exc
        n = plain[0]
        if n > MAX_NAME_BYTES or any(plain[1 + n :]):
            raise ValueError("label has a bad padding")
        raw = plain[1 : 1 + n]
        if len(raw) == 1 + CANARY_ID_BYTES and raw[0] == _CANARY_TAG:
            return Canary(raw[1:])
        if len(raw) == 1 + CANARY_ID_BYTES + GROUP_ID_BYTES + _BOUND.size and raw[0] == _BOUND_TAG:
            g = 1 + CANARY_ID_BYTES
            offset, size, count = _BOUND.unpack(raw[g + GROUP_ID_BYTES :])
            return Canary(raw[1:g], raw[g : g + GROUP_ID_BYTES], offset, size, count)
        return raw.decode("utf-8")

    # ---------------------------------------------------------------- canaries
    def new_canary(
        self, *, group: bytes | None = None, offset: int = 0, size: int = 0, count: int = 0
    ) -> tuple[str, Canary]:
        """A fresh canary: its sealed label and its identity (random, from ``secrets``).

        Args:
            group: the pack's group id (:data:`GROUP_ID_BYTES` bytes) to bind the canary
                to its pack (with ``offset``, ``size``, ``count``); None for an unbound one.

        Raises:
            InvalidArgumentError: a group id of the wrong length or fields out of range.
        """
        cid = secrets.token_bytes(CANARY_ID_BYTES)
        if group is None:
            return self._seal_bytes(bytes([_CANARY_TAG]) + cid), Canary(cid)
        if len(group) != GROUP_ID_BYTES or not 0 <= offset < size <= 0xFFFF or count > size:
            raise InvalidArgumentError("a bound canary needs an 8-byte group and its place")
        c = Canary(cid, group, offset, size, count)
        raw = bytes([_BOUND_TAG]) + cid + group + _BOUND.pack(offset, size, count)
        return self._seal_bytes(raw), c

    def canary_vector(self, canary: Canary, dim: int) -> npt.NDArray[np.float64]:
        """The canary's unit template: SHAKE-256 stream -> Gaussian (Box-Muller) -> L2 norm."""
        words = np.frombuffer(
            hashlib.shake_256(self._canary_key + canary.cid).digest(16 * dim), dtype="<u8"
        )
        u = (words.astype(np.float64) + 0.5) / 2.0**64  # in (0, 1)
        u1, u2 = u[:dim], u[dim:]
        g = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return np.asarray(g / np.linalg.norm(g), dtype=np.float64)


def _hkdf(seed: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(seed)


def trust_path(keys: str | os.PathLike[str]) -> Path:
    """Where the trust secret of a key directory lives."""
    return Path(keys) / TRUST_NAME


def create_trust_key(keys: str | os.PathLike[str]) -> TrustKey:
    """Write a new ``trust.key`` (0600) into a key directory and return it.

    Raises:
        KeyFileError: one exists already (never overwritten), or it cannot be written.
    """
    path = trust_path(keys)
    if path.exists():
        raise KeyFileError(f"{path} exists already: refusing to overwrite a trust secret")
    seed = secrets.token_bytes(SEED_BYTES)
    write_atomic(path, MAGIC + seed + bytes([CANARIES_PER_PACK]), mode=0o600)
    return TrustKey(seed=seed, canaries=CANARIES_PER_PACK, bound=True)


def load_trust_key(keys: str | os.PathLike[str]) -> TrustKey | None:
    """The trust secret of a key directory, or None for a directory made before it existed.

    Raises:
        KeyFileError: malformed, or readable by group or others.
    """
    path = trust_path(keys)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} is readable by group or others: chmod 600 it")
    data = path.read_bytes()
    if len(data) == len(MAGIC_V1) + SEED_BYTES and data.startswith(MAGIC_V1):
        return TrustKey(seed=data[len(MAGIC_V1) :], canaries=1, bound=False)
    magic = data[: len(MAGIC)]
    if len(data) != len(MAGIC) + SEED_BYTES + 1 or magic not in (MAGIC, MAGIC_V2):
        raise KeyFileError(f"{path} is not a cipherface trust secret")
    try:
        return TrustKey(seed=data[len(MAGIC) : -1], canaries=data[-1], bound=magic == MAGIC)
    except InvalidArgumentError:
        raise KeyFileError(f"{path} is not a cipherface trust secret") from None


__all__ = [
    "CANARIES_PER_PACK",
    "GROUP_ID_BYTES",
    "LABEL_CHARS",
    "MAX_NAME_BYTES",
    "TRUST_NAME",
    "Canary",
    "Opened",
    "TrustKey",
    "create_trust_key",
    "load_trust_key",
    "trust_path",
]
