"""The command line's input files, read with errors that name the problem.

Every file a user hands the CLI (``.npy`` embeddings, ``.npz`` bulk files) is read
here, and every failure becomes an
:class:`~cipherface.errors.InvalidArgumentError` with a one-line message: which
file, what is wrong, what was expected. numpy's own messages are not passed on
(one of them advises loading the file "unsafely using allow_pickle"; we never
unpickle anything).

:func:`describe_failure` turns any exception that still reaches the CLI's top
level into the one line it prints (``error [code]: message``).
"""

from __future__ import annotations

import zipfile
from typing import Any, Final

import numpy as np

from cipherface.errors import CipherFaceError, InvalidArgumentError, PeerReportedError

#: The longest message line the CLI prints (a peer's message can be long).
MAX_LINE: Final = 600


def _open_failure(path: str, exc: OSError) -> InvalidArgumentError:
    return InvalidArgumentError(f"cannot read {path}: {exc.strerror or exc}")


def load_npy(path: str, *, what: str = "embedding file") -> np.ndarray[Any, Any]:
    """Read a numeric array saved with ``numpy.save`` (never a pickle).

    Args:
        path: the ``.npy`` file.
        what: how messages call the file.

    Returns:
        The array, as float64.

    Raises:
        InvalidArgumentError: missing, unreadable, not ``.npy``, pickled objects,
            or not numbers.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise _open_failure(path, exc) from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidArgumentError(_numpy_problem(path, what, exc, ".npy")) from None
    if not isinstance(arr, np.ndarray):  # an .npz archive given where a .npy is expected
        raise InvalidArgumentError(f"{what} {path} is an .npz archive; expected a .npy array")
    return _numbers(arr, f"{what} {path}")


def load_npz(path: str) -> tuple[list[str], np.ndarray[Any, Any]]:
    """Read a bulk enrollment file: arrays ``ids`` (n strings), ``embeddings`` (n x d).

    Args:
        path: the ``.npz`` file (``numpy.savez``).

    Returns:
        ``(ids, embeddings)``; the shapes are checked by the edge against the key.

    Raises:
        InvalidArgumentError: missing, unreadable, not ``.npz``, pickled objects,
            missing arrays, non-string ids or non-numeric embeddings.
    """
    expected = "arrays 'ids' and 'embeddings' saved with numpy.savez"
    try:
        data = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise _open_failure(path, exc) from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidArgumentError(_numpy_problem(path, "bulk file", exc, ".npz")) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InvalidArgumentError(f"bulk file {path} is a single .npy array; expected {expected}")
    with data:
        missing = [k for k in ("ids", "embeddings") if k not in data.files]
        if missing:
            raise InvalidArgumentError(
                f"bulk file {path} has no {' or '.join(repr(m) for m in missing)} "
                f"(it has {sorted(data.files)[:10]}); expected {expected}"
            )
        try:
            raw_ids, raw_vectors = data["ids"], data["embeddings"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise InvalidArgumentError(_numpy_problem(path, "bulk file", exc, ".npz")) from None
    if not isinstance(raw_ids, np.ndarray) or not isinstance(raw_vectors, np.ndarray):
        raise InvalidArgumentError(f"bulk file {path} holds members that are not numpy arrays")
    if raw_ids.ndim != 1 or raw_ids.dtype.kind not in "UST":
        raise InvalidArgumentError(
            f"bulk file {path}: 'ids' must be a 1-d array of strings, got {raw_ids.dtype} "
            f"of shape {raw_ids.shape}"
        )
    ids = [i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i) for i in raw_ids]
    return ids, _numbers(raw_vectors, f"bulk file {path}: 'embeddings'")


def _numbers(arr: np.ndarray[Any, Any], what: str) -> np.ndarray[Any, Any]:
    if arr.dtype.kind not in "biuf":
        raise InvalidArgumentError(f"{what} holds {arr.dtype} values; expected numbers")
    if arr.size == 0:
        raise InvalidArgumentError(f"{what} is empty")
    return np.asarray(arr, dtype=np.float64)


def _numpy_problem(path: str, what: str, exc: BaseException, kind: str) -> str:
    text = str(exc)
    if isinstance(exc, zipfile.BadZipFile):
        why = "is not a valid .npz (zip) archive"
    elif "Object arrays" in text or ("pickle" in text and _starts_like_pickle(path)):
        why = "holds pickled Python objects, which are never loaded"
    elif "pickle" in text:  # numpy's guess for any file without its magic: random bytes
        why = "is not a numpy file"
    elif isinstance(exc, EOFError) or "EOF" in text or "truncated" in text.lower():
        why = "is empty or truncated"
    else:
        why = "is not a numpy file"
    return (
        f"{what} {path} {why}; expected {kind} written by numpy.save{'z' if kind == '.npz' else ''}"
    )


def _starts_like_pickle(path: str) -> bool:
    # Pickle protocols 2+ open with PROTO (0x80); numpy calls any unknown file "pickled".
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == b"\x80"
    except OSError:
        return False


def one_line(text: str) -> str:
    """``text`` on one line, at most :data:`MAX_LINE` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_LINE else flat[: MAX_LINE - 1] + "…"


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """The ``(code, message)`` the CLI prints for a failure that reached its top level.

    Args:
        exc: the exception.

    Returns:
        A stable code (the project error's, ``io_error`` for an operating-system
        error, ``internal`` for anything else: a bug, reported without a traceback
        unless ``-vv``) and a one-line message.
    """
    if isinstance(exc, PeerReportedError):
        return exc.remote_code, one_line(f"from the cloud: {exc.message}")
    if isinstance(exc, CipherFaceError):
        return exc.code, one_line(str(exc) or exc.code)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return "io_error", one_line(f"{where}{exc.strerror or exc}")
    text = str(exc).replace("allow_pickle", "pickle")
    return "internal", one_line(f"{type(exc).__name__}: {text} (run with -vv for details)")


__all__ = ["MAX_LINE", "describe_failure", "load_npy", "load_npz", "one_line"]
