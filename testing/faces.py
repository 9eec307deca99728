"""Faces for tests: synthetic ones (no face model needed) or real photos.

A *synthetic face* is a stable unit vector derived from a name. A *synthetic
capture* is a real, tiny PNG image whose ``tEXt`` chunk names the person; the
:class:`FaceEmbedder` turns it into that person's vector plus a little noise (a
new photo of the same person), and hands any other image to the real face model.
So a test can drop captures into a gateway's folder and exercise the whole edge
daemon -- watch, embed, encrypt, ask the cloud, decrypt, decide, publish -- without
deepface; and with the edge extra installed, real photos go through the same path.

TESTS ONLY: a synthetic capture claims its identity in plain text, so an edge running
:class:`FaceEmbedder` admits whoever writes that chunk into a PNG. Production edges
use :class:`cipherface.faces.Embedder` (the CLI never uses this one).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from cipherface.errors import NoFaceError

if TYPE_CHECKING:
    from cipherface.faces import Face

#: PNG ``tEXt`` keyword that marks a synthetic capture.
SYNTHETIC_KEY: Final = b"cipherface-synthetic-face"
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
#: Noise of a "new photo" of a synthetic face: cosine distance ~1e-4, far below
#: every model's threshold (Dlib: 0.07), while two different names are ~1.0 apart.
CAPTURE_NOISE: Final = 0.02

FloatArray = npt.NDArray[np.float64]


def synthetic_vector(name: str, dim: int) -> FloatArray:
    """The synthetic face of ``name``: a unit vector, the same in every run.

    Args:
        name: any string (an identity).
        dim: the embedding dimension (the key's model).

    Returns:
        A ``(dim,)`` unit vector.
    """
    seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    v = np.random.default_rng(seed).normal(size=dim)
    return np.asarray(v / np.linalg.norm(v), dtype=np.float64)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def synthetic_png(name: str, *, size: int = 8) -> bytes:
    """A small grey PNG that names ``name`` as the face it shows.

    Args:
        name: the person (any text without NUL).
        size: width and height in pixels.

    Returns:
        The PNG file's bytes.
    """
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)  # 8-bit greyscale
    # A random shade, so that two captures of one person are different files.
    rows = b"".join(b"\x00" + bytes([secrets.randbelow(256)]) * size for _ in range(size))
    text = SYNTHETIC_KEY + b"\x00" + name.encode("latin-1")
    return (
        _PNG_MAGIC
        + _chunk(b"IHDR", header)
        + _chunk(b"tEXt", text)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def synthetic_name(data: bytes) -> str | None:
    """The name a synthetic capture carries, or None for any other image."""
    if not data.startswith(_PNG_MAGIC):
        return None
    pos = len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            if key == SYNTHETIC_KEY:
                return value.decode("latin-1")
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _read(photo: Any) -> bytes | None:
    if isinstance(photo, bytes | bytearray):
        return bytes(photo)
    if isinstance(photo, str | os.PathLike):
        try:
            with open(photo, "rb") as fh:
                return fh.read(64 * 1024)
        except OSError:
            return None
    return None  # an array: only the real model knows what to do with it


class FaceEmbedder:
    """An edge embedder: synthetic captures map to their name's vector; anything
    else goes to the real face model (created on first use).

    Args:
        dim: embedding dimension.
        model: the face model for real photos (the key's, e.g. ``"Dlib"``).
        noise: relative size of a capture's noise.
    """

    def __init__(self, *, dim: int, model: str, noise: float = CAPTURE_NOISE) -> None:
        self.dim = dim
        self.model = model
        self.noise = noise
        self._real: Any = None

    def represent(self, photo: Any, *, name: str | None = None) -> FloatArray:
        """The embedding of the face in ``photo``.

        Raises:
            NoFaceError: a synthetic capture of nobody (an empty name).
            FaceError / MissingWeightsError: from the real model for real photos.
        """
        data = _read(photo)
        who = synthetic_name(data) if data is not None else None
        if who is None:
            return np.asarray(self.real.represent(photo, name=name), dtype=np.float64)
        if not who:
            raise NoFaceError(f"no face in {name or 'the capture'} (synthetic, empty)")
        v = synthetic_vector(who, self.dim)
        rng = np.random.default_rng(secrets.randbits(64))
        w = v + self.noise * rng.normal(size=self.dim) / np.sqrt(self.dim)
        return np.asarray(w / np.linalg.norm(w), dtype=np.float64)

    def represent_face(self, photo: Any, *, name: str | None = None) -> Face:
        """A :class:`cipherface.faces.Face`: a real photo's face has its detected box; a
        synthetic capture's has none (its pixels show no face, so there is nothing to
        size: a camera's ``min_face_area`` does not apply to it).

        Raises:
            as :meth:`represent`.
        """
        from cipherface.faces import Face

        data = _read(photo)
        if data is None or synthetic_name(data) is None:
            face: Face = self.real.represent_face(photo, name=name)
            return face
        return Face(vector=self.represent(photo, name=name), box=None)

    @property
    def real(self) -> Any:
        """The real embedder (needs the ``edge`` extra and the model's weights)."""
        if self._real is None:
            from cipherface.faces import Embedder

            self._real = Embedder(model_name=self.model)
        return self._real


def write_capture(folder: str | os.PathLike[str], name: str, *, filename: str) -> Path:
    """Write a synthetic capture of ``name`` atomically (dot-file, then rename).

    Args:
        folder: where (created).
        name: the person; ``""`` is a picture without a face.
        filename: the file's name (``.png``).

    Returns:
        Its path.
    """
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{filename}.{secrets.token_hex(3)}"
    tmp.write_bytes(synthetic_png(name))
    target = base / filename
    os.replace(tmp, target)
    return target


__all__ = [
    "CAPTURE_NOISE",
    "SYNTHETIC_KEY",
    "FaceEmbedder",
    "synthetic_name",
    "synthetic_png",
    "synthetic_vector",
    "write_capture",
]
