"""Re-encrypt a CKKS gallery's live templates: key rotation and compaction.

The cloud alone can neither move a gallery to a new key nor erase one template from a
summed block (a block is a sum of ciphertexts; see docs/security.md, "Deletion"). The
edge can: it decrypts the gallery's *packed* ciphertexts (every template, 32 to a pack
at d=128), drops canaries and dead slots, and encrypts the live templates again, with
fresh canaries, for a new gallery:

* **rotation**: old key -> new key pair and new ``trust.key`` (new labels, new
  canaries: the two galleries cannot be linked);
* **compaction**: same key -> a fresh dense gallery without the dead slots, whose
  ciphertexts are then gone with the old directory.

Three steps, each usable on its own (the transport is the caller's):

* :func:`export_packs` (cloud side, public key only): packs ``first .. first+count-1``
  of a gallery as SEAL ciphertexts, with their slot labels;
* :func:`open_export` (edge side): decrypt them, check each pack's canary template
  (a cloud that sends anything else is caught: ``result_forged``), return the live
  ``(name, template)`` pairs;
* :func:`rekey` ties them together in process, page by page, resumable through a
  progress file (the page is re-enrolled before the progress moves; a replayed page
  replaces its identities, never duplicates them), each page's people in a fresh
  random order.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, cast

import msgpack
import numpy as np
import numpy.typing as npt

from cipherface.crypto import seal
from cipherface.crypto.ckks import CkksEdgeCipher, decode, header
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.guard import Guard
from cipherface.crypto.keyfile import write_atomic
from cipherface.crypto.trust import Canary
from cipherface.errors import DecodeError, ResultRejectedError

KIND: Final = "templates-export"
#: Largest difference allowed between a decrypted canary template and the real one
#: (fresh-encryption noise is ~1e-7 per coordinate; a forged pack is off by ~0.1).
CANARY_TOLERANCE: Final = 1e-3
FloatArray = npt.NDArray[np.float64]


def pack_count(gallery: CkksGallery) -> int:
    """The number of packs :func:`export_packs` pages through (dropped blocks included)."""
    with gallery._lock:
        return -(-len(gallery.store.slots) // gallery.per_pack)


def export_packs(gallery: CkksGallery, first: int, count: int) -> bytes:
    """Packs ``first .. first+count-1`` (gallery order) with their labels; cloud side.

    A pack in a dropped (all-dead) block, or past the end, comes back as None.
    """
    N, P, npack = gallery.params.n, gallery.per_pack, gallery.npack
    packs: list[bytes | None] = []
    labels: list[str | None] = []
    with gallery._lock:
        slots = list(gallery.store.slots)
        for p in range(first, first + count):
            b, j = divmod(p, npack)
            names = slots[b * N + j * P : b * N + (j + 1) * P]
            labels += names + [None] * (P - len(names))
            if f"pack-{b:06d}" not in gallery.store.blocks or not any(names):
                packs.append(None)
                continue
            ct = np.asarray(gallery._block("pack", b)[j], dtype=np.uint64)
            packs.append(
                seal.ciphertext_bytes(
                    ct,
                    parms_id=gallery.pub.data_level,
                    scale=gallery.params.delta,
                    compress=True,
                )
            )
        total = -(-len(slots) // P)
    body = {
        **header(gallery.pub, KIND),
        "first": first,
        "total": total,
        "packs": packs,
        # bytes: the CKKS envelope bounds strings to 64 characters, labels have 128.
        "labels": [None if x is None else x.encode("utf-8") for x in labels],
    }
    return cast(bytes, msgpack.packb(body, use_bin_type=True))


def open_export(
    cipher: CkksEdgeCipher, guard: Guard, data: bytes
) -> tuple[int, int, list[tuple[str, FloatArray]]]:
    """Decrypt an export page; edge side.

    Returns:
        ``(first, total, live)``: the page's first pack, the gallery's pack count, and
        the ``(name, unit template)`` of every live person in the page.

    Raises:
        ResultRejectedError: not an export for this key.
        ResultForgedError: a pack's canary is missing or not the template the edge
            enrolled, or a label this site never sealed (recorded by the guard).
    """
    obj = decode(data, cipher.pub, KIND, ResultRejectedError)
    P, d = cipher.per_pack, cipher.dim
    packs, labels = obj.get("packs"), obj.get("labels")
    first, total = obj.get("first"), obj.get("total")
    if (
        not isinstance(packs, list)
        or not isinstance(labels, list)
        or len(labels) != P * len(packs)
        or not isinstance(first, int)
        or not isinstance(total, int)
    ):
        raise ResultRejectedError(f"{KIND}: malformed page")
    if not all(x is None or isinstance(x, bytes) for x in labels):
        raise ResultRejectedError(f"{KIND}: malformed labels")
    opened = guard.open_slots([None if x is None else x.decode("utf-8", "replace") for x in labels])
    live: list[tuple[str, FloatArray]] = []
    for i, ct in enumerate(packs):
        names = opened[i * P : (i + 1) * P]
        if ct is None:
            if any(isinstance(x, str) for x in names):
                raise guard.forged(f"export pack {first + i} holds people but no ciphertext")
            continue
        try:
            m = cipher._decrypt_coeffs(ct, size=2, level=cipher.pub.data_level)
        except DecodeError as exc:
            raise ResultRejectedError(f"{KIND}: {exc}") from exc
        rows = (m[: P * d].reshape(P, d) / cipher.params.delta).astype(np.float64)
        canaries = [j for j, x in enumerate(names) if isinstance(x, Canary)]
        people = [j for j, x in enumerate(names) if isinstance(x, str)]
        if people and len(canaries) < guard.canaries:
            raise guard.forged(f"export pack {first + i} lost canaries")
        for j in canaries:
            want = guard.canary_vector(cast(Canary, names[j]))
            if float(np.abs(rows[j] - want).max()) > CANARY_TOLERANCE:
                raise guard.forged(f"export pack {first + i}: canary template is not ours")
        for j in people:
            norm = float(np.linalg.norm(rows[j]))
            if not 0.99 < norm < 1.01:
                raise guard.forged(f"export pack {first + i}: template {j} is not a unit vector")
            live.append((cast(str, names[j]), rows[j] / norm))
    return first, total, live


def rekey(
    *,
    source: Callable[[int, int], bytes],
    old: tuple[CkksEdgeCipher, Guard],
    new: tuple[CkksEdgeCipher, Guard],
    enroll: Callable[[list[str], bytes], Any],
    progress: str | os.PathLike[str],
    page_packs: int = 8,
    on_page: Callable[[int, int], None] | None = None,
) -> int:
    """Move every live template to ``new``, page by page, resumable.

    Args:
        source: ``(first_pack, count) -> export bytes`` (:func:`export_packs`, in
            process or through the cloud).
        old: the old key's cipher and guard.
        new: the new key's cipher and guard (the same ones to compact).
        enroll: ``(labels, payload)`` -> stores one payload in the new gallery (a page
            takes one, or more when the new key's canaries need more packs).
        progress: the progress file (JSON ``{"old", "new", "next", "moved"}``, 0600);
            it is read on start, so a crashed run resumes at its last finished page.
        page_packs: packs per page.
        on_page: called with ``(packs done, packs total)`` after each page.

    Returns:
        The number of people in the new gallery (this run and the runs before it).
    """
    ocipher, oguard = old
    ncipher, nguard = new
    path = Path(progress)
    nxt, moved = 0, 0
    if path.exists():
        saved = json.loads(path.read_text())
        if (saved.get("old"), saved.get("new")) == (ocipher.key_id, ncipher.key_id):
            nxt, moved = int(saved["next"]), int(saved["moved"])
    while True:
        first, total, live = open_export(ocipher, oguard, source(nxt, page_packs))
        if first != nxt:
            raise oguard.forged(f"export page starts at pack {first}, {nxt} asked")
        if live:
            # A fresh order (CSPRNG): the new slots do not mirror the old ones, so a
            # cloud that watches the rotation links a person only to a page of people.
            secrets.SystemRandom().shuffle(live)
            # The new key may hold more canaries a pack than the old one: a page's people
            # then need more packs, so they go in as many payloads as that takes.
            step = nguard.payload_names(ncipher.max_templates_per_payload)
            for lo in range(0, len(live), step):
                part = live[lo : lo + step]
                labels, rows = nguard.with_canaries(
                    [n for n, _ in part], np.stack([v for _, v in part])
                )
                enroll(labels, ncipher.encrypt_templates(rows))
        nxt, moved = min(total, first + page_packs), moved + len(live)
        state = {"old": ocipher.key_id, "new": ncipher.key_id, "next": nxt, "moved": moved}
        write_atomic(path, json.dumps(state).encode(), mode=0o600)
        if on_page is not None:
            on_page(nxt, total)
        if nxt >= total:
            return moved


__all__ = ["CANARY_TOLERANCE", "KIND", "export_packs", "open_export", "pack_count", "rekey"]
