"""Scheme-independent entry points: key directories, edge ciphers and cloud galleries.

A *key directory* holds ``private.key`` (0600, edge only) and ``public.key`` (what
the cloud receives). Every caller above ``crypto/`` -- the agents, the CLI, the
compat API -- goes through these functions, so adding a scheme touches only here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from cipherface.crypto.engine import EdgeCipher, Gallery
from cipherface.crypto.keyfile import KeyFile, load_key_file, parse_key_bytes
from cipherface.errors import InvalidArgumentError, KeyFileError, KeyMismatchError

CKKS = "ckks"
PHE_SCHEMES = ("paillier", "damgard-jurik", "okamoto-uchiyama")
SCHEMES = (CKKS, *PHE_SCHEMES)
PRIVATE_NAME = "private.key"
MAX_PUBLIC_KEY_BYTES = 1024 * 1024  # CKKS (SEAL) N=8192: ~220 KB; Paillier 15360-bit: < 8 KB
PUBLIC_NAME = "public.key"


def generate_key_dir(
    directory: str | os.PathLike[str],
    *,
    scheme: str = CKKS,
    dim: int,
    model: str = "Dlib",
    metric: str = "cosine",
    security_level: int = 128,
) -> str:
    """Create a key pair in ``directory`` (private.key 0600, public.key 0644, and the
    trust secret trust.key 0600: see :mod:`cipherface.crypto.trust`).

    Args:
        directory: where to write (created if missing).
        scheme: one of :data:`SCHEMES`.
        dim: embedding dimension of ``model``.
        model: face model name.
        metric: ``"cosine"`` or ``"euclidean"``.
        security_level: 128 (default), 192 or 256; the Paillier family accepts 112 too.

    Returns:
        The key id.

    Raises:
        InvalidArgumentError: unknown scheme or bad parameters.
        KeyFileError: a private key already exists there (never overwritten).
    """
    d = Path(directory)
    if (d / PRIVATE_NAME).exists():
        raise KeyFileError(f"{d / PRIVATE_NAME} exists already: refusing to overwrite a key")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    from cipherface.crypto.trust import create_trust_key, trust_path

    if not trust_path(d).exists():
        create_trust_key(d)  # labels and canaries (crypto/trust.py); never leaves the edge
    if scheme == CKKS:
        from cipherface.crypto.ckks import CkksKeys

        keys = CkksKeys.generate(dim=dim, model=model, metric=metric, security_level=security_level)
        keys.save_private(d / PRIVATE_NAME)
        keys.save_public(d / PUBLIC_NAME)
        return keys.key_id
    if scheme in PHE_SCHEMES:
        from cipherface.crypto import phe_gallery

        return cast(
            str,
            phe_gallery.generate_key_dir(
                d,
                scheme=scheme,
                dim=dim,
                model=model,
                metric=metric,
                security_level=security_level,
            ),
        )
    raise InvalidArgumentError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _private_path(keys: str | os.PathLike[str]) -> Path:
    p = Path(keys)
    return p / PRIVATE_NAME if p.is_dir() else p


def load_edge_cipher(
    keys: str | os.PathLike[str], *, allow_insecure_permissions: bool = False
) -> EdgeCipher:
    """Load the edge side from a key directory (or a private key file).

    Args:
        keys: key directory or private key file.
        allow_insecure_permissions: load a private key that group/others can read
            (warns) instead of refusing it.

    Raises:
        KeyFileError: missing/malformed key, or a public-only key.
        InsecurePermissionsError: the private key is readable by group/others.
    """
    path = _private_path(keys)
    kf = load_key_file(
        path, expect_kind="private", allow_insecure_permissions=allow_insecure_permissions
    )
    return edge_cipher_from_key_file(kf, source=str(path))


def edge_cipher_from_key_file(kf: KeyFile, *, source: str) -> EdgeCipher:
    if kf.scheme == CKKS:
        from cipherface.crypto.ckks import CkksEdgeCipher, CkksKeys

        return CkksEdgeCipher(keys=CkksKeys.from_key_file(kf, source=source))
    if kf.scheme in PHE_SCHEMES:
        from cipherface.crypto import phe_gallery

        return cast(EdgeCipher, phe_gallery.edge_cipher_from_key_file(kf, source=source))
    raise KeyFileError(f"{source}: unknown scheme {kf.scheme!r}")


class _Public:
    def __init__(self, scheme: str, key_id: str, obj: Any) -> None:
        self.scheme, self.key_id, self.obj = scheme, key_id, obj


def open_public(public_key: bytes) -> _Public:
    """Parse public key bytes (from ``key.publish``) for any scheme.

    Raises:
        KeyMismatchError: malformed or not a public key.
    """
    if len(public_key) > MAX_PUBLIC_KEY_BYTES:
        raise KeyMismatchError(
            f"public key bytes are {len(public_key)} bytes, at most {MAX_PUBLIC_KEY_BYTES}"
        )
    try:
        scheme = parse_key_bytes(public_key, source="received public key").scheme
    except KeyFileError as exc:
        raise KeyMismatchError(str(exc)) from exc
    if scheme == CKKS:
        from cipherface.crypto.ckks import CkksKeys

        keys = CkksKeys.from_public_bytes(public_key)
        return _Public(CKKS, keys.key_id, keys.public)
    if scheme in PHE_SCHEMES:
        from cipherface.crypto import phe_gallery

        pub = phe_gallery.public_from_bytes(public_key)
        return _Public(scheme, pub.key_id, pub)
    raise KeyMismatchError(f"unknown scheme {scheme!r} in public key")


def open_gallery(path: str | os.PathLike[str], public_key: bytes) -> Gallery:
    """Open (or create) a site's gallery for the given public key bytes.

    Raises:
        KeyMismatchError: bad public key.
        GalleryError: the directory holds a gallery for another key.
        StorageCorruptError: corrupted gallery files.
    """
    pub = open_public(public_key)
    if pub.scheme == CKKS:
        from cipherface.crypto.ckks_gallery import CkksGallery

        return CkksGallery(path=path, public=pub.obj)
    from cipherface.crypto import phe_gallery

    return cast(Gallery, phe_gallery.open_gallery(path, pub.obj))
