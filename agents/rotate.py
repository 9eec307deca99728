"""``cipherface rotate-key``: move a site to a new key pair without re-capturing a face.

The edge streams its gallery back from the cloud, decrypts it and enrolls it again
under a new key (ISO/IEC 24745 renewability and unlinkability: new key, new trust
secret, so new labels and new canaries). Steps, each resumable after a crash
(``kill -9`` included: rerun the same command):

1. **stage**: a new key pair and ``trust.key`` in ``DIR.rotating/`` (same scheme, model,
   metric, security level), with a progress file (:mod:`cipherface.agents.keyswap`);
2. **publish** the new key (``key.publish``): the cloud opens an empty gallery for it
   and makes it the site's current key. The old gallery keeps serving every request
   that names the old key (gateways still running on it) the whole time;
3. **copy**, page by page (``gallery.export`` of the old key): each page is decrypted
   and its canaries checked (:func:`cipherface.crypto.rekey.open_export`: a forged page
   is refused, counted by the old key's guard, and aborts the rotation with
   ``result_forged``, nothing switched), and its live identities are enrolled under the
   new key with fresh canaries; the progress file moves (fsync) only after the cloud
   acknowledged the enroll, so a rerun never loses a page, and a page replayed after a
   crash replaces its identities instead of duplicating them;
4. **switch**: ``DIR`` and ``DIR.rotating`` are exchanged atomically: every edge command
   started from now on uses the new key (restart running daemons);
5. **retire** the old key at the cloud (``key.retire``): its gallery and public key are
   destroyed and it can never be published again;
6. **destroy** the old key directory (private key, trust secret, state: each file
   overwritten with zeros, then unlinked), only after the retire is acknowledged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from cipherface.agents.edge import EdgeClient
from cipherface.agents.keyswap import (
    PROGRESS_NAME,
    Progress,
    RotationPaths,
    exclusive,
    fsync_dir,
    key_id_of,
    read_progress,
    recover_switch,
    switch,
)
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import sites
from cipherface.crypto.ckks import CkksEdgeCipher
from cipherface.crypto.guard import Guard, load_guard
from cipherface.crypto.keyfile import write_atomic
from cipherface.crypto.rekey import rekey
from cipherface.errors import (
    InvalidArgumentError,
    KeyFileError,
    PeerReportedError,
    ResultRejectedError,
)
from cipherface.protocol import (
    MAX_EXPORT_PACKS,
    Enroll,
    GalleryExport,
    KeyRetire,
    Request,
    Result,
    now_ms,
    validate_id,
)
from cipherface.store.erase import shred_tree

log = logging.getLogger(__name__)

#: Packs per export page: 32 packs of 32 slots (canaries included: 28 people each with
#: four canaries a pack) are ~2.3 MB of export and one ~5 MB enroll payload under the
#: new key.
DEFAULT_PAGE_PACKS: Final = 32
_EXPIRY_GRACE_MS: Final = 5000


@dataclass(frozen=True)
class RotationStatus:
    """What a rotation reports as it goes (the CLI prints it).

    Args:
        phase: ``copy`` (after each page), ``switched``, ``retired`` or ``done``.
        old: the old key id.
        new: the new key id.
        packs_done: packs of the old gallery moved.
        packs_total: packs in the old gallery (0 until the first page came back).
        page_packs: packs per page.
        moved: identities enrolled under the new key so far.
    """

    phase: str
    old: str
    new: str
    packs_done: int
    packs_total: int
    page_packs: int
    moved: int

    @property
    def pages(self) -> tuple[int, int]:
        """``(pages done, pages in all)``."""
        p = self.page_packs
        return -(-self.packs_done // p), -(-self.packs_total // p)


@dataclass(frozen=True)
class RotationReport:
    """The outcome of :func:`rotate_key`.

    Args:
        old: the retired key id.
        new: the site's key id now (in ``DIR``).
        moved: identities enrolled under the new key.
        resumed: whether this run continued an interrupted one.
    """

    old: str
    new: str
    moved: int
    resumed: bool


class _Rotation:
    """One run of :func:`rotate_key` (the arguments, and a client per phase)."""

    def __init__(
        self,
        *,
        paths: RotationPaths,
        broker: BrokerConfig,
        site: str,
        gateway: str,
        page_packs: int,
        timeout: float,
        retries: int,
        allow_insecure_permissions: bool,
        on_progress: Callable[[RotationStatus], None] | None,
    ) -> None:
        self.paths = paths
        self.broker = broker
        self.site = validate_id(site, what="site")
        self.gateway = validate_id(gateway, what="gateway")
        self.page_packs = page_packs
        self.timeout = timeout
        self.retries = retries
        self.insecure = allow_insecure_permissions
        self.on_progress = on_progress

    # ---------------------------------------------------------------- helpers
    def load(self, directory: Any) -> tuple[CkksEdgeCipher, Guard]:
        """The cipher and guard of a key directory.

        Raises:
            InvalidArgumentError: not a CKKS key, or no trust.key (nothing to check an
                export page against).
            KeyFileError: the key does not load.
        """
        cipher = sites.load_edge_cipher(directory, allow_insecure_permissions=self.insecure)
        if not isinstance(cipher, CkksEdgeCipher):
            raise InvalidArgumentError(
                f"rotate-key moves CKKS galleries; {directory} holds a {cipher.scheme} key: "
                "make a new one with keygen and enroll again"
            )
        guard = load_guard(directory, cipher)
        if guard is None:
            raise InvalidArgumentError(
                f"{directory} has no trust.key (made before cipherface 0.2): its gallery "
                "has no canaries to check an export against; make a new key with keygen "
                "and enroll again"
            )
        return cipher, guard

    def client(self, cipher: CkksEdgeCipher, guard: Guard) -> EdgeClient:
        """An edge client of ``cipher`` on the rotation's gateway (no decision events)."""
        return EdgeClient(
            broker=self.broker,
            cipher=cipher,
            guard=guard,
            site=self.site,
            gateway=self.gateway,
            timeout=self.timeout,
            retries=self.retries,
            publish_decisions=False,
        )

    def header(self, kid: str) -> dict[str, Any]:
        """Envelope fields of a request for key ``kid`` (``exp`` covers every attempt)."""
        budget = int(1000 * self.timeout * (self.retries + 1)) + _EXPIRY_GRACE_MS
        return {"site": self.site, "gw": self.gateway, "kid": kid, "exp": now_ms() + budget}

    def report(self, phase: str, progress: Progress, total: int, moved: int) -> None:
        """Tell ``on_progress`` (if any) where the rotation is."""
        if self.on_progress is not None:
            self.on_progress(
                RotationStatus(
                    phase=phase,
                    old=progress.old,
                    new=progress.new,
                    packs_done=progress.next if phase == "copy" else total,
                    packs_total=total,
                    page_packs=self.page_packs,
                    moved=moved,
                )
            )

    # ----------------------------------------------------------------- phases
    def stage(self, old: CkksEdgeCipher) -> Progress:
        """A new key pair in ``DIR.rotating`` with its progress file (steps 1)."""
        shred_tree(self.paths.partial)  # a key generation a crash interrupted
        new_kid = sites.generate_key_dir(
            self.paths.partial,
            dim=old.dim,
            model=old.model,
            metric=old.metric,
            security_level=old.params.security,
        )
        fresh = Progress(old=old.key_id, new=new_kid, next=0, moved=0)
        _write_progress(self.paths.partial, fresh)
        self.paths.partial.rename(self.paths.stage)
        fsync_dir(self.paths.stage.parent)
        log.info("rotate-key: new key %s staged in %s", new_kid, self.paths.stage)
        return fresh

    def copy(self, progress: Progress) -> int:
        """Publish the new key and move every page of the old gallery (steps 2-3)."""
        ocipher, oguard = self.load(self.paths.keys)
        ncipher, nguard = self.load(self.paths.stage)
        if (ocipher.key_id, ncipher.key_id) != (progress.old, progress.new):
            raise KeyFileError(
                f"{self.paths.stage} belongs to a rotation from key {progress.old} to "
                f"{progress.new}, but {self.paths.keys} holds key {ocipher.key_id}: "
                f"remove {self.paths.stage} to start over"
            )
        moved = progress.moved
        with self.client(ncipher, nguard) as edge:
            edge.publish_key()

            def source(first: int, count: int) -> bytes:
                res = edge.request(
                    GalleryExport(**self.header(progress.old), first=first, count=count)
                )
                if res.op != "gallery.export" or res.scores is None or res.offset != first:
                    raise ResultRejectedError(f"gallery.export: not the page at pack {first}")
                return res.scores

            def enroll(labels: list[str], payload: bytes) -> None:
                nonlocal moved
                ids = tuple(labels)
                res = _ask(
                    edge, lambda: Enroll(**self.header(ncipher.key_id), ids=ids, payload=payload)
                )
                if res.enrolled != len(ids):
                    raise ResultRejectedError(
                        f"enroll under the new key stored {res.enrolled} of {len(ids)} templates"
                    )
                moved += sum(isinstance(x, str) for x in nguard.open_slots(ids))

            def on_page(done: int, packs: int) -> None:
                step = Progress(old=progress.old, new=progress.new, next=done, moved=moved)
                self.report("copy", step, packs, moved)

            return rekey(
                source=source,
                old=(ocipher, oguard),
                new=(ncipher, nguard),
                enroll=enroll,
                progress=self.paths.stage / PROGRESS_NAME,
                page_packs=self.page_packs,
                on_page=on_page,
            )

    def retire(self, progress: Progress) -> None:
        """Retire the old key at the cloud, then destroy its directory (steps 5-6)."""
        ncipher, nguard = self.load(self.paths.keys)
        if ncipher.key_id != progress.new:
            raise KeyFileError(
                f"{self.paths.keys / PROGRESS_NAME} is a rotation to key {progress.new}, but "
                f"{self.paths.keys} holds key {ncipher.key_id}"
            )
        staged = key_id_of(self.paths.stage) if self.paths.stage.is_dir() else None
        if staged not in (None, progress.old):
            raise KeyFileError(
                f"{self.paths.stage} holds key {staged}, not the old key {progress.old}: "
                "refusing to destroy it"
            )
        with self.client(ncipher, nguard) as edge:
            edge.publish_key()  # the successor must be registered and current
            edge.request(KeyRetire(**self.header(progress.old), successor=progress.new))
        self.report("retired", progress, 0, progress.moved)
        shred_tree(self.paths.stage)
        (self.paths.keys / PROGRESS_NAME).unlink(missing_ok=True)
        fsync_dir(self.paths.keys)


def _write_progress(directory: Path, progress: Progress) -> None:
    """The progress file as :func:`cipherface.crypto.rekey.rekey` writes it (0600, fsync)."""
    write_atomic(directory / PROGRESS_NAME, json.dumps(asdict(progress)).encode(), mode=0o600)


def _ask(edge: EdgeClient, make: Callable[[], Request]) -> Result:
    """``edge.request(make())``; after ``key_mismatch`` publish the new key, ask once more."""
    try:
        return edge.request(make())
    except PeerReportedError as exc:
        if exc.remote_code != "key_mismatch":
            raise
    edge.publish_key()
    return edge.request(make())


def max_page_packs(cipher: CkksEdgeCipher) -> int:
    """The most packs a page may have: its people must fit in one enroll payload."""
    return max(1, min(MAX_EXPORT_PACKS, cipher.max_templates_per_payload // cipher.per_pack))


def rotate_key(
    *,
    broker: BrokerConfig,
    keys: Any,
    site: str,
    gateway: str,
    page_packs: int = DEFAULT_PAGE_PACKS,
    timeout: float = 15.0,
    retries: int = 2,
    allow_insecure_permissions: bool = False,
    on_progress: Callable[[RotationStatus], None] | None = None,
) -> RotationReport:
    """Rotate the site key in ``keys`` (see the module docstring); resumes a crashed run.

    Args:
        broker: broker settings.
        keys: the active key directory (``--keys``).
        site: the site id.
        gateway: the gateway id the requests go out under.
        page_packs: packs per export page (1 .. :func:`max_page_packs`).
        timeout: seconds per request attempt.
        retries: extra attempts per request.
        allow_insecure_permissions: load private keys that group/others can read.
        on_progress: called after each page and each later step.

    Returns:
        The old and new key ids and the identities moved.

    Raises:
        InvalidArgumentError: not a CKKS key directory with a trust.key, bad ids or page size.
        KeyFileError: a key or progress file does not load, or belongs to another rotation.
        LocalError: another rotate-key of the same directory is running.
        ResultForgedError: an export page failed its canary check (nothing switched).
        PeerReportedError: the cloud refused a request (e.g. ``key_in_use``).
        RequestTimeoutError / BrokerConnectionError: the cloud or broker did not answer.
    """
    paths = RotationPaths.of(keys)
    with exclusive(paths):
        recover_switch(paths)
        if not paths.keys.is_dir():
            raise InvalidArgumentError(f"--keys {keys}: not a key directory")
        run = _Rotation(
            paths=paths,
            broker=broker,
            site=site,
            gateway=gateway,
            page_packs=page_packs,
            timeout=timeout,
            retries=retries,
            allow_insecure_permissions=allow_insecure_permissions,
            on_progress=on_progress,
        )
        progress = read_progress(paths.keys)
        resumed = progress is not None
        if progress is None:  # not switched yet
            old, _ = run.load(paths.keys)
            if not 1 <= page_packs <= max_page_packs(old):
                raise InvalidArgumentError(f"page size must be 1..{max_page_packs(old)} packs")
            progress = read_progress(paths.stage) if paths.stage.is_dir() else None
            if progress is None:
                if paths.stage.exists():
                    raise KeyFileError(
                        f"{paths.stage} exists without a rotation in progress: move it away"
                    )
                progress = run.stage(old)
            else:
                resumed = True
            moved = run.copy(progress)
            switch(paths)
            progress = Progress(old=progress.old, new=progress.new, next=0, moved=moved)
            run.report("switched", progress, 0, moved)
        run.retire(progress)
        run.report("done", progress, 0, progress.moved)
        return RotationReport(
            old=progress.old, new=progress.new, moved=progress.moved, resumed=resumed
        )


__all__ = [
    "DEFAULT_PAGE_PACKS",
    "RotationReport",
    "RotationStatus",
    "max_page_packs",
    "rotate_key",
]
