"""The cloud's side of key rotation: export pages of a gallery, retire a key.

``cipherface rotate-key`` (edge, :mod:`cipherface.agents.rotate`) moves a site to a new
key pair without re-capturing a face. The cloud takes part with two requests, both
served in the cloud agent's slow lane like the other writes:

* ``gallery.export`` (:func:`export_page`): one page of the packed ciphertexts of the
  gallery of ``kid`` with their slot labels, exactly as
  :func:`cipherface.crypto.rekey.export_packs` makes them. The cloud learns nothing
  new: the ciphertexts are the ones it stores, readable only with the site's secret key
  -- a key holder who can already read its gallery with crafted probes
  (docs/security.md) gets it in fewer requests. Each page is logged (an audit trail).
* ``key.retire`` (:func:`retire_key`): once the edge has moved every identity and
  switched to its new key, the old key's public key, gallery and directory are
  destroyed (:mod:`cipherface.store.erase`) and a tombstone ``DIR/<site>/retired/<kid>``
  makes sure it never comes back: a gateway still holding the old key gets
  ``key_retired`` instead of a fresh empty gallery when it republishes it. Refused
  (``key_in_use``) unless the successor is registered and is the site's current key.
  Idempotent: retiring a key that is gone already succeeds with ``deleted = 0``.

Requests arrive on the requesting gateway's own topic, which the broker's ACL ties to
its site (docs/deployment.md section 3): a gateway can export or retire only its own
site's galleries, exactly like enroll or delete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from cipherface.crypto import rekey
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.engine import Gallery
from cipherface.crypto.keyfile import write_atomic
from cipherface.crypto.store import Reply
from cipherface.errors import (
    GalleryError,
    InvalidArgumentError,
    KeyInUseError,
    KeyRetiredError,
    PayloadTooLargeError,
    StorageError,
)
from cipherface.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_SLOTS,
    GalleryExport,
    KeyRetire,
    Result,
    encode,
    result_for,
)
from cipherface.store import PG_SCHEMES, gallery_location
from cipherface.store.erase import destroy_gallery, shred_tree

log = logging.getLogger(__name__)

RETIRED_DIR = "retired"


class KeyRegistry(Protocol):
    """What the handlers need of the cloud agent's key registry (``SiteKeys``)."""

    root: Path
    store: str

    def key_dir(self, site: str, kid: str) -> Path: ...

    def gallery(self, site: str, kid: str) -> Gallery: ...

    def current(self, site: str) -> str | None: ...

    def kids(self, site: str) -> list[str]: ...

    def unregister(self, site: str, kid: str) -> bool: ...

    def answer(self, site: str, kid: str | None, reply: Reply) -> None: ...


def retired_path(root: str | os.PathLike[str], site: str, kid: str) -> Path:
    """The tombstone of a retired key: ``DIR/<site>/retired/<kid>``."""
    return Path(root) / site / RETIRED_DIR / kid


def is_retired(root: str | os.PathLike[str], site: str, kid: str, *, store: str = "") -> bool:
    """Whether ``kid`` was retired: a tombstone in ``root`` or, with a PostgreSQL
    ``store``, one recorded in the database by any worker."""
    if retired_path(root, site, kid).exists():
        return True
    if store.startswith(PG_SCHEMES):
        from cipherface.store.postgres import is_retired as retired_in_db

        return retired_in_db(store.partition("#")[0], f"{site}/{kid}")
    return False


def refuse_retired(root: str | os.PathLike[str], site: str, kid: str, *, store: str = "") -> None:
    """Refuse to register or serve a key that the site retired.

    Args:
        root: the data directory (its tombstones).
        site: the site.
        kid: the key.
        store: the cloud's ``--store``: with PostgreSQL the tombstones every worker
            recorded in the database count too (each worker has its own data directory).

    Raises:
        KeyRetiredError: ``kid`` was retired (its gallery is destroyed).
    """
    if is_retired(root, site, kid, store=store):
        raise KeyRetiredError(
            f"key {kid} of site {site!r} was retired by rotate-key: load the site's new "
            "key directory on this gateway (and restart it)"
        )


def _encoded_size(msg: Result) -> int:
    try:
        return len(encode(msg))
    except InvalidArgumentError:  # encode() refuses anything over MAX_MESSAGE_BYTES
        return MAX_MESSAGE_BYTES + 1


def export_page(keys: KeyRegistry, req: GalleryExport, max_reply_bytes: int) -> Result:
    """Answer a ``gallery.export``: packs ``first ..`` of the gallery of ``req.kid``.

    The page holds ``min(count, total - first)`` packs (``first`` past the end gives the
    empty last page at ``offset = total``), fewer when the result would exceed
    ``max_reply_bytes``.

    Args:
        keys: the cloud's key registry.
        req: the request (its ``kid`` names the gallery).
        max_reply_bytes: the largest reply the agent publishes.

    Returns:
        The result: ``scores`` = the export page, ``count`` = its packs, ``offset`` =
        its first pack, ``total`` = the gallery's packs.

    Raises:
        KeyMismatchError: the site has no such key.
        GalleryError: not a CKKS gallery (other schemes rotate by re-enrolling).
        PayloadTooLargeError: not even one pack fits in a reply.
    """
    assert req.kid is not None  # the codec requires it
    gallery = keys.gallery(req.site, req.kid)
    if not isinstance(gallery, CkksGallery):
        raise GalleryError(
            "gallery.export: only CKKS galleries can be exported; rotate a "
            f"{type(gallery).__name__} key by re-enrolling"
        )
    total = rekey.pack_count(gallery)
    if total > MAX_SLOTS:
        raise PayloadTooLargeError(f"the gallery has {total} packs, more than {MAX_SLOTS}")
    first = min(req.first, total)
    count = min(req.count, total - first)
    while True:
        page = rekey.export_packs(gallery, first, count)
        result = result_for(
            req,
            ids_version=gallery.ids_version,
            scores=page,
            count=count,
            offset=first,
            total=total,
        )
        if _encoded_size(result) <= max_reply_bytes:
            # An export hands the key holder its gallery: make its start stand out.
            log.log(
                logging.WARNING if first == 0 else logging.INFO,
                "site %s/%s: exported packs %d..%d of %d of key %s",
                req.site,
                req.gw,
                first,
                first + count,
                total,
                req.kid,
            )
            return result
        if count <= 1:
            raise PayloadTooLargeError(
                f"one pack of the gallery does not fit in a reply of {max_reply_bytes} bytes"
            )
        count //= 2


def retire_key(keys: KeyRegistry, req: KeyRetire, *, reply: Reply | None = None) -> Result:
    """Answer a ``key.retire``: destroy the gallery, public key and directory of ``req.kid``.

    Order (each step idempotent, so a retry after a crash finishes the job): the
    tombstone, the public key (nothing can reopen the gallery after it), the gallery
    (:func:`cipherface.store.erase.destroy_gallery`), the key directory; then ``reply``
    is stored in the successor's gallery store (the work is done by then, so a retry
    answered from the store has nothing left to finish; a crash just before it makes
    the retry finish the job and answer ``deleted = 0``).

    Args:
        keys: the cloud's key registry.
        req: the request: ``kid`` the key to retire, ``successor`` the site's new key.
        reply: the request's reply to store (``count``: ``deleted``), or None.

    Returns:
        The result: ``deleted`` 1 when this request destroyed the key, 0 when it was
        gone already; ``ids_version`` of the successor's gallery.

    Raises:
        KeyInUseError: the successor is not registered or not the site's current key
            (a ``kid`` that is the current key always ends here).
        StorageCorruptError: the successor's gallery does not open (nothing destroyed).
        StorageError: destroying the gallery failed (a retry finishes it).
        AlreadyAnsweredError: another worker retired it at the same time and stored its
            reply first.
    """
    site, old, new = req.site, req.kid, req.successor
    assert old is not None  # the codec requires it
    if keys.current(site) != new or new not in keys.kids(site):
        raise KeyInUseError(
            f"key.retire of {old}: successor {new} must be published (key.publish) and be "
            f"site {site!r}'s current key (current: {keys.current(site)})"
        )
    successor = keys.gallery(site, new)  # never retire into a gallery that does not open
    write_atomic(retired_path(keys.root, site, old), f"{new}\n".encode("ascii"), mode=0o644)
    if keys.store.startswith(PG_SCHEMES):  # every worker's tombstone, before any step
        from cipherface.store.postgres import mark_retired

        mark_retired(keys.store.partition("#")[0], f"{site}/{old}", new)
    existed = keys.unregister(site, old)
    gone = destroy_gallery(gallery_location(keys.store, site, old, keys.root), retired_by=new)
    try:
        shred_tree(keys.key_dir(site, old))
    except OSError as exc:
        log.error("site %s: removing the directory of retired key %s failed: %s", site, old, exc)
        raise StorageError(f"retiring key {old}: its directory could not be removed") from None
    log.warning(
        "site %s: key %s retired by %s (successor %s)%s",
        site,
        old,
        req.gw,
        new,
        "; its gallery was destroyed" if existed or gone else " (gone already)",
    )
    deleted = int(existed or gone)
    if reply is not None:
        reply.count = deleted
        keys.answer(site, new, reply)
    return result_for(req, ids_version=successor.ids_version, deleted=deleted)


__all__ = [
    "RETIRED_DIR",
    "KeyRegistry",
    "export_page",
    "is_retired",
    "refuse_retired",
    "retire_key",
    "retired_path",
]
