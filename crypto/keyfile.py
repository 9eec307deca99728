"""Key files: a small self-describing container, written atomically.

A key file is ``MAGIC`` followed by one msgpack map::

    {"kind": "private" | "public", "scheme": str, "key_id": str,
     "params": {...}, "material": {name: bytes | int | str ...}}

No pickle, no eval: msgpack decodes only plain data. Private files are created
with mode 0600 (never widened by the umask); loading a private file that group or
others can read is refused (:class:`InsecurePermissionsError`) unless the caller
overrides it explicitly (``allow_insecure_permissions=True``, CLI
``--allow-insecure-key-permissions``), and then it warns.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack

from cipherface.crypto.wire import unpack_bounded
from cipherface.errors import InsecurePermissionsError, KeyFileError

MAGIC = b"CFKEY1\n"
MAX_KEY_FILE_BYTES = 64 * 1024 * 1024

KeyKind = Literal["private", "public"]


class InsecurePermissionsWarning(UserWarning):
    """A secret file is readable or writable by users other than its owner."""


@dataclass(frozen=True, kw_only=True)
class KeyFile:
    """The decoded contents of a key file.

    Args:
        kind: ``"private"`` (holds a secret key) or ``"public"``.
        scheme: ``"ckks"``, ``"paillier"``, ``"damgard-jurik"`` or ``"okamoto-uchiyama"``.
        key_id: fingerprint of the public key (see :func:`fingerprint`).
        params: scheme parameters, plain msgpack types.
        material: the key material, plain msgpack types (bytes, ints as strings...);
            never in ``repr`` (a private key file's material is the secret key).
    """

    kind: KeyKind
    scheme: str
    key_id: str
    params: dict[str, Any] = field(default_factory=dict)
    material: dict[str, Any] = field(default_factory=dict, repr=False)


def fingerprint(*parts: bytes) -> str:
    """Return a short stable id for public key material (hex SHA-256, 32 chars)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:32]


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename), with ``mode``.

    Args:
        path: destination file.
        data: the bytes to write.
        mode: permission bits of the new file; 0600 by default.

    Raises:
        KeyFileError: the directory is not writable.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            os.fchmod(fd, mode)  # mkstemp creates 0600; set exactly what was asked
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise KeyFileError(f"cannot write {target}: {exc}") from exc


def save_key_file(path: str | os.PathLike[str], key: KeyFile) -> None:
    """Save a key file; private ones 0600, public ones 0644.

    Args:
        path: destination.
        key: what to write.

    Raises:
        KeyFileError: the file cannot be written.
    """
    write_atomic(path, key_file_bytes(key), mode=0o600 if key.kind == "private" else 0o644)


def check_private_permissions(
    path: str | os.PathLike[str], *, allow_insecure_permissions: bool = False
) -> None:
    """Refuse a secret file that group or others can access.

    Args:
        path: the file.
        allow_insecure_permissions: only warn (:class:`InsecurePermissionsWarning`).

    Raises:
        InsecurePermissionsError: group/others have any access and no override was given.
    """
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        msg = (
            f"secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"run 'chmod 600 {path}' (only its owner may read a secret key)"
        )
        if not allow_insecure_permissions:
            raise InsecurePermissionsError(
                msg + "; or pass --allow-insecure-key-permissions to load it anyway"
            )
        warnings.warn(msg, InsecurePermissionsWarning, stacklevel=3)


def parse_key_bytes(data: bytes, *, source: str = "key bytes") -> KeyFile:
    """Decode key-file bytes (from disk or from a ``key.publish`` message), checking every field.

    Args:
        data: the bytes, starting with :data:`MAGIC`.
        source: how to name the origin in error messages.

    Returns:
        The decoded :class:`KeyFile` (its key material is not interpreted here).

    Raises:
        KeyFileError: not a key file, too large, or corrupt.
    """
    if not isinstance(data, bytes | bytearray) or not bytes(data).startswith(MAGIC):
        raise KeyFileError(
            f"{source} is not a cipherface key file (no {MAGIC!r} header); "
            "create keys with 'cipherface keygen' or export_private_key/export_public_key"
        )
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{source} is {len(data)} bytes: too large to be a key file")
    try:
        # A key file is 3 maps (file, params, material) and at most one short list.
        obj = unpack_bounded(
            bytes(data)[len(MAGIC) :], max_containers=8, max_array_len=16, max_str_len=4096
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise KeyFileError(f"{source} is corrupt: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("kind") not in ("private", "public"):
        raise KeyFileError(f"{source} is corrupt: no valid 'kind'")
    for name, typ in (("scheme", str), ("key_id", str), ("params", dict), ("material", dict)):
        if not isinstance(obj.get(name), typ):
            raise KeyFileError(f"{source} is corrupt: field {name!r} missing or of the wrong type")
    return KeyFile(
        kind=obj["kind"],
        scheme=obj["scheme"],
        key_id=obj["key_id"],
        params=obj["params"],
        material=obj["material"],
    )


def key_file_bytes(key: KeyFile) -> bytes:
    """The bytes :func:`save_key_file` writes (also what ``key.publish`` carries)."""
    body = msgpack.packb(
        {
            "kind": key.kind,
            "scheme": key.scheme,
            "key_id": key.key_id,
            "params": key.params,
            "material": key.material,
        },
        use_bin_type=True,
    )
    return MAGIC + body


def load_key_file(
    path: str | os.PathLike[str],
    *,
    expect_scheme: str | None = None,
    expect_kind: KeyKind | None = None,
    allow_insecure_permissions: bool = False,
) -> KeyFile:
    """Load and check a key file written by :func:`save_key_file`.

    Args:
        path: the file.
        expect_scheme: if given, the scheme the file must hold.
        expect_kind: if given, the kind (``"private"`` / ``"public"``) it must be.
        allow_insecure_permissions: load a private file that group/others can read
            (with a warning) instead of refusing it.

    Returns:
        The decoded :class:`KeyFile`.

    Raises:
        KeyFileError: missing, unreadable, not a key file, or of the wrong scheme/kind.
        InsecurePermissionsError: a private file readable by group/others, no override.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise KeyFileError(f"key file not found: {p}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc}") from exc
    if size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{p} is {size} bytes: too large to be a key file")
    key = parse_key_bytes(p.read_bytes(), source=str(p))
    if expect_scheme is not None and key.scheme != expect_scheme:
        raise KeyFileError(f"{p} holds a {key.scheme} key, not {expect_scheme}")
    if expect_kind is not None and key.kind != expect_kind:
        raise KeyFileError(f"{p} holds a {key.kind} key, a {expect_kind} one is needed")
    if key.kind == "private":
        check_private_permissions(p, allow_insecure_permissions=allow_insecure_permissions)
    return key
