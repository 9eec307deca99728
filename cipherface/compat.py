"""The published ``cipherface`` API (``CipherFace``), on this project's CKKS engine.

The constructor, method names and the three-step flow (on-prem encrypts, the cloud
compares with the public key only, on-prem restores and verifies) are those of
cipherface 0.0.2. What changed, and why:

* One CKKS path: ``encrypt`` / ``encrypted_compare`` run on the gallery engine's
  encoding and parameters (:mod:`cipherface.crypto.ckks`, Microsoft SEAL underneath),
  so a comparison costs a few milliseconds, an encrypted embedding is ~70 KB, a
  distance ~50 KB and the public key ~110 KB (0.0.2: 28 ms, 332 KB, 235 KB and 35-47 MB).
  The cloud re-randomises both inputs with SEAL before multiplying.
* Every ``security_level`` (128, 192, 256) is secure by the HE standard. 0.0.2's
  "defensive" 192/256 presets were not (N=8192 with 160/120-bit moduli exceed the
  152/118-bit bounds). ``mode`` is accepted for compatibility and changes nothing.
* Defaults work offline: model ``Dlib`` with the ``dlib`` detector; VGG-Face,
  Facenet and Facenet512 need their weight files (a clear error says where).
* Embeddings are always L2-normalised; ``euclidean`` is the distance between the
  normalised vectors (deepface's ``euclidean_l2`` thresholds). As in 0.0.2,
  :meth:`restore` returns the *squared* euclidean distance (``2 - 2 cos``), whose error
  stays linear in the score's (a square root would magnify it near 0), and
  :meth:`verify` compares it with the threshold squared.
* Strings are base64 of msgpack (no pickle); keys are key files (no pickle, no eval),
  private ones 0600. ``restore`` with a public-only key raises
  :class:`~cipherface.errors.PublicKeyOnlyError`.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import TYPE_CHECKING, Any, cast

import msgpack
import numpy as np
import numpy.typing as npt

from cipherface.crypto import ckks, thresholds
from cipherface.errors import DecodeError, InvalidArgumentError, PublicKeyOnlyError

if TYPE_CHECKING:
    from cipherface.faces import Embedder

_MODELS = ("Dlib", "VGG-Face", "Facenet", "Facenet512", "ArcFace", "SFace")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise DecodeError(f"{what} is not valid base64: {exc}") from exc


class _FaceMixin:
    """Lazy face model shared by CipherFace and CipherFaceLite: built on first use."""

    model_name: str
    face_detector: str
    _embedder: Embedder | None

    def _faces(self) -> Embedder:
        if self._embedder is None:
            from cipherface.faces import Embedder

            self._embedder = Embedder(model_name=self.model_name, detector=self.face_detector)
        return self._embedder

    def represent(self, img_path: Any) -> list[list[float]]:
        """Embed every face of a photo.

        Args:
            img_path: a path, encoded image bytes, or a numpy image (BGR).

        Returns:
            One L2-normalised embedding (list of float) per detected face.

        Raises:
            NoFaceError, ImageReadError, MissingWeightsError: see :mod:`cipherface.errors`.
        """
        return [v.tolist() for v in self._faces().represent_all(img_path)]

    def securely_embed(self, img_path: Any) -> list[str] | list[list[str]]:
        """Embed and encrypt every face of one photo (or of each photo of a list)."""
        encrypt = cast(Any, self).encrypt
        if isinstance(img_path, list):
            from tqdm import tqdm

            return [[encrypt(e) for e in self.represent(p)] for p in tqdm(img_path)]
        return [encrypt(e) for e in self.represent(img_path)]


class CipherFace(_FaceMixin):
    """CKKS face verification with the cipherface 0.0.2 API.

    Args:
        model_name: ``Dlib`` (default, offline), ``VGG-Face``, ``Facenet``, ``Facenet512``...
        face_detector: deepface detector backend; ``dlib`` by default (offline).
        distance_metric: ``euclidean`` (default, as 0.0.2) or ``cosine``.
        cryptosystem: a key file written by :meth:`export_private_key` (edge) or
            :meth:`export_public_key` (cloud); a new key pair when ``None``.
        security_level: 128 (default), 192 or 256 bits.
        mode: accepted for compatibility ("defensive"/"offensive"); no effect.
        n, q, g: 0.0.2's custom parameters; refused (use ``security_level``).

    Raises:
        InvalidArgumentError: unknown model, metric, level or custom parameters.
        KeyFileError: ``cryptosystem`` missing or not a CKKS key file.
    """

    def __init__(
        self,
        model_name: str = "Dlib",
        face_detector: str = "dlib",
        distance_metric: str = "euclidean",
        cryptosystem: str | os.PathLike[str] | None = None,
        security_level: int = 128,
        mode: str = "defensive",
        n: int | None = None,
        q: list[int] | None = None,
        g: int | None = None,
    ) -> None:
        if model_name not in _MODELS:
            raise InvalidArgumentError(f"unsupported model {model_name!r}; choose from {_MODELS}")
        if distance_metric not in ("euclidean", "cosine"):
            raise InvalidArgumentError(
                f"unsupported distance metric {distance_metric!r}: use euclidean or cosine"
            )
        if mode not in ("defensive", "offensive"):
            raise InvalidArgumentError(f"mode must be defensive or offensive, not {mode!r}")
        if n is not None or q is not None or g is not None:
            raise InvalidArgumentError(
                "custom n/q/g are not supported: every preset is checked against the HE "
                "standard; choose security_level=128, 192 or 256"
            )
        self.model_name = model_name
        self.face_detector = face_detector
        self.distance_metric = distance_metric
        self.mode = mode
        self._embedder = None
        if cryptosystem is None:
            self.keys = ckks.CkksKeys.generate(
                dim=thresholds.dim(model_name),
                model=model_name,
                metric=distance_metric,
                security_level=security_level,
            )
        else:
            self.keys = ckks.CkksKeys.load(cryptosystem)
            if self.keys.public.dim != thresholds.dim(model_name):
                raise InvalidArgumentError(
                    f"{cryptosystem} is for {self.keys.public.dim}-d embeddings "
                    f"({self.keys.public.model}), not {model_name}"
                )
        self._edge = ckks.CkksEdgeCipher(keys=self.keys)
        self._ring = ckks.ring_of(self.keys.public.params)

    # ------------------------------------------------------------------- keys
    def export_public_key(self, target_path: str | os.PathLike[str]) -> None:
        """Write the public key file (what the cloud needs: ~32 KB)."""
        self.keys.save_public(target_path)

    def export_private_key(self, target_path: str | os.PathLike[str]) -> None:
        """Write the private key file, mode 0600.

        Raises:
            PublicKeyOnlyError: this instance was loaded from a public key.
        """
        self.keys.save_private(target_path)

    # ---------------------------------------------------------------- encrypt
    def encrypt(self, embedding: npt.ArrayLike) -> str:
        """Encrypt an embedding (normalised first) in both layouts a comparison needs.

        With the private key the ciphertexts are SEAL symmetric encryptions (seeded,
        half size); with the public key only (the cloud in 0.0.2's flow) they are SEAL
        public-key encryptions.

        Returns:
            base64 text of the msgpack ciphertext pair.

        Raises:
            InvalidArgumentError: not a finite real vector of the model's dimension.
        """
        pub, r, params = self.keys.public, self._ring, self.keys.public.params
        fx = ckks._fixed(ckks._normalise(embedding, pub.dim), params)[0]
        m = r.ntt(
            r.to_rns(
                np.stack([ckks.encode_forward(fx, params.n), ckks.encode_reversed(fx, params.n)])
            )
        )
        body: dict[str, Any] = {**ckks.header(pub, "embedding")}
        if self.keys.has_secret:
            body["cts"] = self._edge.encrypt_ntt(m)
        else:
            body["cts"] = [pub.public_encrypt(x) for x in m]
        return _b64(cast(bytes, msgpack.packb(body, use_bin_type=True)))

    def _load_embedding(self, text: str, what: str, layout: int) -> Any:
        obj = ckks.decode(_unb64(text, what), self.keys.public, "embedding", DecodeError)
        cts = obj.get("cts")
        if not isinstance(cts, list) or len(cts) != 2:
            raise DecodeError(f"{what}: expected two ciphertexts")
        return cts[layout]

    # ---------------------------------------------------------------- compare
    def encrypted_compare(self, alpha: str, beta: str) -> str:
        """Encrypted similarity of two encrypted embeddings (public key suffices).

        Returns:
            base64 text of a one-score result; only :meth:`restore` can read it.

        Raises:
            DecodeError / KeyMismatchError: malformed input or another key's ciphertext.
        """
        pub = self.keys.public
        # Both operands are re-randomised by SEAL before the product: a crafted c1 cannot
        # pull the other operand out.
        a = pub.rerandomise(self._load_embedding(alpha, "alpha", 0), "alpha")
        b = self._load_embedding(beta, "beta", 1)
        live = [True] + [False] * (self._edge.per_pack - 1)  # only coefficient 0 survives
        return _b64(ckks.pack_result(pub, a, b, pos=0, live=live, what="beta"))

    # ---------------------------------------------------------------- decrypt
    def restore(self, encrypted_distance: str) -> float:
        """Decrypt a comparison: cosine distance, or squared euclidean distance (as 0.0.2).

        Keep the value local: decrypted CKKS values shared with others can leak the key.

        Raises:
            PublicKeyOnlyError: no private key in this instance.
            ResultRejectedError: not a comparison result for this key.
        """
        if not self.keys.has_secret:
            raise PublicKeyOnlyError(
                "restore needs the private key: build CipherFace(cryptosystem='private.txt') "
                "on-prem; the cloud only holds the public key"
            )
        sim = self._edge.decrypt_scores(
            _unb64(encrypted_distance, "encrypted distance"), op="verify", count=1
        )[0]
        if self.distance_metric == "euclidean":
            return max(0.0, 2.0 - 2.0 * float(sim))  # |a-b|^2 of unit vectors
        return thresholds.distance_from_similarity(float(sim), self.distance_metric)

    def verify(self, plain_distance: float) -> bool:
        """True when :meth:`restore`'s distance is below deepface's threshold (squared for
        euclidean, as 0.0.2 compares)."""
        thr = thresholds.threshold(self.model_name, self.distance_metric)
        if self.distance_metric == "euclidean":
            thr = thr * thr
        return float(plain_distance) < thr


def __getattr__(name: str) -> Any:
    # CipherFaceLite lives in its own module; keep 0.0.2's import path working.
    if name == "CipherFaceLite":
        from cipherface.compat_lite import CipherFaceLite

        return CipherFaceLite
    raise AttributeError(name)


__all__ = ["CipherFace"]
