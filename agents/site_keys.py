"""The keys and galleries a cloud agent serves, and the stored replies of its writes.

:class:`SiteKeys` opens each site's galleries on first use (at most ``max_open`` at
once), registers published keys (shared through PostgreSQL's ``cf_keys`` when the
store is PostgreSQL, so every worker on any host serves them) and finds or stores
the replies of writes (in the gallery store: docs/storage.md "Replies").
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cipherface.agents.cloud_rotate import is_retired, refuse_retired
from cipherface.crypto import sites
from cipherface.crypto.engine import Gallery
from cipherface.crypto.keyfile import write_atomic
from cipherface.crypto.store import Reply
from cipherface.errors import (
    AlreadyAnsweredError,
    CipherFaceError,
    KeyMismatchError,
    StorageCorruptError,
)
from cipherface.store import PG_SCHEMES, gallery_location, store_exists
from cipherface.store.base import Engine, GalleryStore
from cipherface.store.replies import ReplyKey

log = logging.getLogger(__name__)


class SiteKeys:
    """The galleries of one data directory, opened on first use.

    With a PostgreSQL store the site keys are shared too: a ``key.publish`` is
    recorded in the database (``cf_keys``), so every worker -- on any host, each with
    its own data directory -- serves a key published through any one of them, and
    agrees on which key is the site's current one (the last published).
    """

    def __init__(self, root: Path, *, max_open: int = 64, store: str = "sqlite:") -> None:
        self.root = root
        self.store = store  # "sqlite:[ROOT]" or a postgresql:// URL (docs/storage.md)
        self.shared = store.startswith(PG_SCHEMES)  # other workers may write the galleries
        self._replies: Engine | None = None  # PostgreSQL: every worker's replies, one table
        # Most recently used last; the least recently used gallery is closed beyond
        # max_open, so keys published over time (or by a misbehaving gateway) cannot
        # pin an unbounded number of galleries in memory.
        self._open: dict[tuple[str, str], Gallery] = {}
        self.max_open = max_open
        self._lock = threading.RLock()  # both lanes open galleries

    def key_dir(self, site: str, kid: str) -> Path:
        return self.root / site / "keys" / kid

    def register(self, site: str, kid: str, public_key: bytes) -> Gallery:
        with self._lock:
            return self._register(site, kid, public_key)

    def _register(self, site: str, kid: str, public_key: bytes) -> Gallery:
        d = self.key_dir(site, kid)
        path = d / sites.PUBLIC_NAME
        # Registered before (key and gallery made): a gallery missing now was lost, and
        # an edge republishing its key must not start it again empty.
        again = path.is_file() and path.read_bytes() == public_key and self.current(site) == kid
        if not again:
            write_atomic(path, public_key, mode=0o644)
        gallery = self._gallery(site, kid, create=not again)
        write_atomic(self.root / site / "current", kid.encode("ascii"), mode=0o644)
        if self.shared:  # after the gallery exists: the other workers may open it now
            from cipherface.store.postgres import publish_key

            publish_key(self._dsn, site, kid, public_key)
        return gallery

    @property
    def _dsn(self) -> str:
        return self.store.partition("#")[0]

    def _shared_key(self, site: str, kid: str, path: Path) -> None:
        """Fetch a key published through another worker into our key directory."""
        from cipherface.store.postgres import published_key

        public_key = published_key(self._dsn, site, kid) if self.shared else None
        if public_key is None:
            return
        if sites.open_public(public_key).key_id != kid:  # the database's word is not enough
            raise StorageCorruptError(f"the database's public key of {site}/{kid} is another key")
        write_atomic(path, public_key, mode=0o644)
        log.info("site %s: key %s loaded from the shared store", site, kid)

    def gallery(self, site: str, kid: str) -> Gallery:
        with self._lock:
            return self._gallery(site, kid)

    def _gallery(self, site: str, kid: str, *, create: bool = False) -> Gallery:
        found = self._open.pop((site, kid), None)
        if found is not None and self.shared and _store_of(found).stale():
            found.close()  # another worker committed: reload its state
            found = None
        if found is not None:
            self._open[(site, kid)] = found  # now the most recently used
            return found
        # A retire cut short by a crash (tombstone written, public key or gallery not
        # yet gone), or retired through another PostgreSQL worker: never served again.
        refuse_retired(self.root, site, kid, store=self.store)
        path = self.key_dir(site, kid) / sites.PUBLIC_NAME
        if not path.is_file():
            self._shared_key(site, kid, path)
        if not path.is_file():
            raise KeyMismatchError(
                f"site {site!r} has no key {kid}: the edge must publish it first (key.publish)"
            )
        where = gallery_location(self.store, site, kid, self.root)
        if not create and not store_exists(where):
            # Its key is registered, so it existed: never start it again empty.
            raise StorageCorruptError(f"gallery {site}/{kid} is missing")
        gallery = sites.open_gallery(where, path.read_bytes())
        if gallery.key_id != kid:
            gallery.close()
            raise KeyMismatchError(f"stored key of site {site!r} is not {kid}")
        while len(self._open) >= self.max_open:
            self._open.pop(next(iter(self._open))).close()
        self._open[(site, kid)] = gallery
        return gallery

    def unregister(self, site: str, kid: str) -> bool:
        """Forget a key (key.retire): its public key goes first, so nothing reopens its
        gallery, then its open gallery is closed. Returns whether it was registered."""
        with self._lock:
            path = self.key_dir(site, kid) / sites.PUBLIC_NAME
            existed = path.is_file()
            path.unlink(missing_ok=True)
            gallery = self._open.pop((site, kid), None)
        if gallery is not None:
            gallery.close()
        return existed

    def current(self, site: str) -> str | None:
        if self.shared:
            from cipherface.store.postgres import published_kids

            published = published_kids(self._dsn, site)
            if published:
                return published[-1]
        try:
            kid = (self.root / site / "current").read_text(encoding="ascii").strip()
        except OSError:
            return None
        return kid or None

    def kids(self, site: str) -> list[str]:
        base = self.root / site / "keys"
        found = set()
        if base.is_dir():
            found = {p.name for p in base.iterdir() if (p / sites.PUBLIC_NAME).is_file()}
        if self.shared:
            from cipherface.store.postgres import published_kids

            found.update(published_kids(self._dsn, site))
        return sorted(k for k in found if not is_retired(self.root, site, k, store=self.store))

    # ------------------------------------------------------------------ replies
    def _shared_replies(self) -> Engine:
        if self._replies is None:
            from cipherface.store.postgres import replies

            self._replies = replies(self.store.partition("#")[0])
        return self._replies

    def find_reply(self, site: str, kid: str | None, key: ReplyKey) -> bytes | None:
        """The reply stored with the write ``key`` (answered by gallery ``site/kid``).

        With PostgreSQL every worker's replies are in one table (no gallery opens);
        with SQLite they are in the gallery's database.

        Raises:
            StorageError: the store cannot be read.
            KeyMismatchError / StorageCorruptError: the gallery does not open.
        """
        if self.shared:
            return self._shared_replies().find_reply(key)
        if kid is None:
            return None
        return _store_of(self.gallery(site, kid)).find_reply(key)

    def answer(self, site: str, kid: str | None, reply: Reply) -> None:
        """Store the reply of a write that changed nothing in gallery ``site/kid``
        (``kid`` None: no gallery answers it: the shared table, or a file on SQLite).

        Raises:
            AlreadyAnsweredError: a reply is stored under ``reply.key`` already.
        """
        if kid is not None:
            _store_of(self.gallery(site, kid)).commit(reply=reply)
            return
        data = reply.render(0)
        if self.shared:
            earlier = self._shared_replies().put_reply(reply.key, data)
            if earlier is not None:
                raise AlreadyAnsweredError("answered before", reply=earlier)
        else:
            _site, gw, rid = reply.key
            try:
                write_atomic(reply_file(self.root, site, gw, rid), data, mode=0o600)
            except CipherFaceError as exc:  # nothing changed: a retry just runs again
                log.warning("could not keep the reply to %s: %s", rid, exc)
        reply.data = data

    def prune_replies(self, max_age_s: float) -> int:
        """Drop the stored replies older than ``max_age_s``: the shared table, or those
        of the open SQLite galleries (commits prune theirs too). Returns how many."""
        if self.shared:
            return self._shared_replies().prune_replies(max_age_s)
        with self._lock:  # no gallery is closed under us meanwhile
            return sum(_store_of(g).prune_replies(max_age_s) for g in self._open.values())

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for gallery in self._open.values():
            try:
                gallery.close()
            except Exception:  # closing is best effort on shutdown
                log.exception("closing a gallery failed")
        self._open.clear()


def reply_file(root: Path, site: str, gw: str, rid: str) -> Path:
    """``DIR/<site>/replies/<gw>.<id>``: a write's reply kept beside the galleries."""
    return root / site / "replies" / f"{gw}.{rid}"


def _store_of(gallery: Gallery) -> GalleryStore:
    store = getattr(gallery, "store", None)
    if not isinstance(store, GalleryStore):  # pragma: no cover - every engine has one
        raise TypeError(f"{type(gallery).__name__} has no gallery store")
    return store


__all__ = ["SiteKeys", "reply_file"]
