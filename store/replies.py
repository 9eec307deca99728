"""Replies of the writes a commit carries out, stored in the commit's own transaction.

The cloud answers an enroll or a delete with a reply that says what the change did
(templates enrolled, identities deleted) and the gallery's ``ids_version`` after it.
The store writes those reply bytes in the transaction of the change, keyed by
``(site, gateway, request id)``: the change and its reply are durable together or not
at all. A request redelivered after a crash, or retried on another worker sharing the
PostgreSQL database, is then answered with the stored bytes instead of running again,
and a commit whose key is taken changes nothing and raises
:class:`~cipherface.errors.AlreadyAnsweredError` carrying the stored reply (two workers
that ran the same request at once: the second one sends the first one's bytes).

Tables: ``replies`` in each SQLite gallery database, ``cf_replies`` in PostgreSQL
(every gallery, every worker); see docs/storage.md. Every row carries a 63-bit BLAKE2b
check of its key, its gallery and its bytes (:func:`reply_check`): a damaged reply is
``storage_corrupt``, never sent to a gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from cipherface.errors import StorageCorruptError
from cipherface.store.rows import row_check

#: ``(site, gateway, request id)``: the request's dedup key (protocol ``dedup_key``).
ReplyKey = tuple[str, str, str]
#: Stored replies are kept at least this long (redeliveries, retries after a restart).
REPLY_TTL_S: Final = 24 * 3600.0
#: Rows deleted per pruning statement: each is a short transaction of its own.
PRUNE_BATCH: Final = 1000
#: Expired rows a SQLite commit that stores a reply also deletes (bounded upkeep).
PRUNE_PER_COMMIT: Final = 64


def reply_check(key: ReplyKey, gid: int | None, data: bytes) -> int:
    """The row check of a stored reply: its key, its gallery (PostgreSQL ``gid``; None
    on SQLite and for a reply no gallery holds) and its bytes."""
    return row_check("reply", *key, gid, data)


def checked_reply(label: str, key: ReplyKey, gid: int | None, data: object, chk: object) -> bytes:
    """A stored reply's bytes, once its row passed its check.

    Raises:
        StorageCorruptError: the row fails its check (a flipped byte, a lost check):
            the bytes are never sent.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or not isinstance(chk, int):
        raise StorageCorruptError(f"gallery {label}: a stored reply cannot be read")
    out = bytes(data)
    if reply_check(key, gid, out) != chk:
        raise StorageCorruptError(f"gallery {label}: a stored reply fails its check")
    return out


class Reply:
    """The reply to the request a commit carries out (one object per request).

    Args:
        key: the request's ``(site, gateway, request id)``.
        build: ``(count, ids_version) -> reply bytes``; the store calls it inside the
            commit, with the gallery's ``ids_version`` after the change.

    Attributes:
        count: what the change did (templates enrolled, identities deleted): the
            gallery sets it before its commit.
        data: the reply bytes as stored, once the commit returned (None before).
    """

    def __init__(self, key: ReplyKey, build: Callable[[int, int], bytes]) -> None:
        self.key = key
        self._build = build
        self.count = 0
        self.data: bytes | None = None

    def render(self, ids_version: int) -> bytes:
        """The reply bytes for the gallery at ``ids_version``."""
        return self._build(self.count, ids_version)

    def __repr__(self) -> str:
        return f"Reply({self.key!r}, count={self.count})"


__all__ = [
    "PRUNE_BATCH",
    "PRUNE_PER_COMMIT",
    "REPLY_TTL_S",
    "Reply",
    "ReplyKey",
    "checked_reply",
    "reply_check",
]
