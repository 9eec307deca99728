"""The published ``cipherface`` PHE API (``CipherFaceLite``), on this project's schemes.

The constructor, method names and the three-step flow of cipherface 0.0.2's README are
kept: on-prem encrypts an embedding with the key pair, the cloud compares it with a
*plain* target embedding using the public key only, on-prem restores the similarity and
verifies. What changed, and why:

* Schemes are :mod:`cipherface.crypto.phe` (gmpy2, ``secrets``), not LightPHE: no
  ``random``-module keys, no ``eval``-loaded key files, exact key sizes, negatives and
  zeros encrypted like any value (0.0.2 stored signs in clear and encrypted every zero to
  one identical ciphertext, which showed where the zeros were).
* ``security_level`` 128 (default) means 3072-bit keys and 112 means 2048; 0.0.2's
  default 80 (1024-bit) is refused with :class:`~cipherface.errors.InsecureParametersError`.
* Defaults work offline: model ``Dlib`` with the ``dlib`` detector; the face model loads
  on first :meth:`represent` / :meth:`securely_embed`, so the cloud never needs one.
* Strings are base64 of msgpack (no pickle); keys are key files, private ones 0600.
  ``restore`` with a public-only key raises :class:`~cipherface.errors.PublicKeyOnlyError`.
* As in 0.0.2, the cloud sees the target embedding in clear: Paillier-family schemes
  cannot multiply two ciphertexts. Use ``CipherFace`` (CKKS) to hide both sides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cipherface.compat import _b64, _FaceMixin, _unb64
from cipherface.crypto import phe, phe_gallery, thresholds
from cipherface.errors import InvalidArgumentError, KeyFileError, PublicKeyOnlyError

_MODELS = ("Dlib", "VGG-Face", "Facenet", "Facenet512", "ArcFace", "SFace")


class CipherFaceLite(_FaceMixin):
    """Partially homomorphic face verification with the cipherface 0.0.2 API.

    Args:
        model_name: ``Dlib`` (default, offline), ``VGG-Face``, ``Facenet``, ``Facenet512``,
            ``ArcFace`` or ``SFace``.
        face_detector: deepface detector backend; ``dlib`` by default (offline).
        algorithm_name: ``Paillier`` (default), ``Damgard-Jurik`` or ``Okamoto-Uchiyama``.
        security_level: 128 (default, 3072-bit modulus), 112 (2048), 192 or 256.
        cryptosystem: a key file from :meth:`export_private_key` (on-prem) or
            :meth:`export_public_key` (cloud); a new key pair when ``None``.

    Raises:
        InvalidArgumentError: unknown model or algorithm.
        InsecureParametersError: a security level below 112 bits (0.0.2's 80 included).
        KeyFileError: ``cryptosystem`` missing, malformed or of another algorithm/model.
    """

    def __init__(
        self,
        model_name: str = "Dlib",
        face_detector: str = "dlib",
        algorithm_name: str = "Paillier",
        security_level: int = 128,
        cryptosystem: str | os.PathLike[str] | None = None,
    ) -> None:
        if model_name not in _MODELS:
            raise InvalidArgumentError(f"unsupported model {model_name!r}; choose from {_MODELS}")
        scheme = phe.ALGORITHM_NAMES.get(algorithm_name)
        if scheme is None:
            raise InvalidArgumentError(
                f"unsupported algorithm {algorithm_name!r}; "
                f"choose from {', '.join(phe.ALGORITHM_NAMES)}"
            )
        self.model_name = model_name
        self.face_detector = face_detector
        self.algorithm_name = algorithm_name
        self.security_level = security_level
        self._embedder = None
        self.private_key: phe.PhePrivateKey | None
        if cryptosystem is None:
            bits = phe.bits_for_security(security_level)
            self.private_key = phe.generate_private_key(
                scheme, bits=bits, dim=thresholds.dim(model_name), model=model_name
            )
            self.public_key = self.private_key.public
        else:
            key = phe.load_key(cryptosystem)
            if key.scheme != scheme:
                raise KeyFileError(f"{cryptosystem} holds a {key.scheme} key, not {scheme}")
            if isinstance(key, phe.PhePrivateKey):
                self.private_key, self.public_key = key, key.public
            else:
                self.private_key, self.public_key = None, key
            if self.public_key.dim != thresholds.dim(model_name):
                raise KeyFileError(
                    f"{cryptosystem} is for {self.public_key.dim}-d embeddings, "
                    f"not {model_name} ({thresholds.dim(model_name)}-d)"
                )
        self._edge = phe_gallery.PheEdgeCipher(key=self.private_key) if self.private_key else None

    # ------------------------------------------------------------------- keys
    def export_public_key(self, target_path: str | os.PathLike[str]) -> None:
        """Write the public key file (``n`` and parameters; what the cloud needs)."""
        self.public_key.save(Path(target_path))

    def export_private_key(self, target_path: str | os.PathLike[str]) -> None:
        """Write the private key file, mode 0600.

        Raises:
            PublicKeyOnlyError: this instance was loaded from a public key.
        """
        if self.private_key is None:
            raise PublicKeyOnlyError("this CipherFaceLite holds only the public key")
        self.private_key.save(Path(target_path))

    # ------------------------------------------------------------------ crypto
    def normalize_embedding(self, embedding: npt.ArrayLike) -> list[float]:
        """L2-normalise an embedding (the similarity of unit vectors is their cosine)."""
        x = phe.Packing.for_key(self.public_key).normalise(embedding)
        return [float(v) for v in x[0]]

    def encrypt(self, embedding: npt.ArrayLike) -> str:
        """Encrypt an embedding (normalised first): every feature in its own ciphertext.

        Returns:
            base64 text of the msgpack ``embedding`` message.

        Raises:
            InvalidArgumentError: wrong dimension or non-finite values.
        """
        source: Any = self._edge if self._edge is not None else self.public_key
        return _b64(phe_gallery.encrypt_embedding(source, embedding))

    def encrypted_compare(self, alpha: str, beta: npt.ArrayLike) -> str:
        """Encrypted cosine similarity of an encrypted embedding and a plain one (cloud side;
        the public key suffices).

        Args:
            alpha: an :meth:`encrypt` string.
            beta: the plain target embedding (normalised here).

        Returns:
            base64 text of a one-score result; only :meth:`restore` can read it.

        Raises:
            DecodeError / KeyMismatchError: malformed ``alpha`` or another key's.
        """
        data = _unb64(alpha, "alpha")
        return _b64(phe_gallery.compare_embedding(self.public_key, data, np.asarray(beta)))

    def restore(self, encrypted_similarity: str) -> float:
        """Decrypt a comparison into the cosine similarity (as 0.0.2).

        Raises:
            PublicKeyOnlyError: no private key in this instance.
            ResultRejectedError: not a comparison result for this key.
        """
        if self._edge is None:
            raise PublicKeyOnlyError(
                "restore needs the private key: build CipherFaceLite(cryptosystem="
                "'private.txt') on-prem; the cloud only holds the public key"
            )
        data = _unb64(encrypted_similarity, "encrypted similarity")
        return float(self._edge.decrypt_scores(data, op="verify", count=1)[0])

    def verify(self, plain_distance: float) -> bool:
        """True when the similarity exceeds ``1 - threshold`` (deepface's cosine threshold
        of the model), as 0.0.2 compares ``restore``'s output."""
        return float(plain_distance) > 1.0 - thresholds.threshold(self.model_name, "cosine")


__all__ = ["CipherFaceLite"]
