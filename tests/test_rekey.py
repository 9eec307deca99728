"""Re-encryption of a gallery's live templates (crypto/rekey.py): key rotation with a
crash in the middle, compaction under the same key, forged export pages refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from cipherface.crypto.ckks import CkksEdgeCipher, CkksKeys
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.guard import Guard
from cipherface.crypto.judge import identify_decision
from cipherface.crypto.rekey import export_packs, open_export, rekey
from cipherface.crypto.trust import create_trust_key
from cipherface.errors import ResultForgedError

DIM = 128


def _key(tmp: Path) -> tuple[CkksKeys, CkksEdgeCipher, Guard]:
    keys = CkksKeys.generate(dim=DIM)
    cipher = CkksEdgeCipher(keys=keys)
    guard = Guard(
        trust=create_trust_key(tmp),
        key_id=cipher.key_id,
        dim=DIM,
        state_path=tmp / "trust.state",
        per_pack=cipher.per_pack,
        max_forged=10**6,
    )
    return keys, cipher, guard


class Crash(Exception):
    pass


@pytest.fixture
def old(tmp_path: Path) -> Any:
    keys, cipher, guard = _key(tmp_path / "old")
    gallery = CkksGallery(path=tmp_path / "old" / "gallery", public=keys.public)
    rng = np.random.default_rng(2)
    faces = rng.normal(size=(100, DIM))
    faces /= np.linalg.norm(faces, axis=1)[:, None]
    names = [f"p{i}" for i in range(100)]
    labels, rows = guard.with_canaries(names[:96], faces[:96])
    gallery.enroll(labels, cipher.encrypt_templates(rows))
    for i in range(96, 100):  # single enrollments: a pack each
        labels, rows = guard.with_canaries([names[i]], faces[i : i + 1])
        gallery.enroll(labels, cipher.encrypt_templates(rows))
    gallery.delete([guard.seal(f"p{i}") for i in range(0, 100, 7)])
    yield cipher, guard, gallery, dict(zip(names, faces, strict=True))
    gallery.close()


def test_rotation_resumes_after_a_crash_and_keeps_every_live_face(old: Any, tmp_path: Path) -> None:
    ocipher, oguard, ogallery, faces = old
    live = {n for n in faces if int(n[1:]) % 7}
    keys, ncipher, nguard = _key(tmp_path / "new")
    ngallery = CkksGallery(path=tmp_path / "new" / "gallery", public=keys.public)
    progress = tmp_path / "new" / "rotate.progress"
    pages: list[int] = []

    def crashing(first: int, count: int) -> bytes:
        if len(pages) == 2:
            raise Crash
        pages.append(first)
        return export_packs(ogallery, first, count)

    kw: dict[str, Any] = {
        "old": (ocipher, oguard),
        "new": (ncipher, nguard),
        "enroll": ngallery.enroll,
        "progress": progress,
        "page_packs": 2,
    }
    with pytest.raises(Crash):
        rekey(source=crashing, **kw)
    halfway = [x for x in nguard.open_slots(ngallery.ids()) if isinstance(x, str)]
    assert progress.exists() and 0 < len(halfway) < len(live)
    seen: list[tuple[int, int]] = []
    moved = rekey(
        source=lambda f, c: export_packs(ogallery, f, c),
        on_page=lambda done, total: seen.append((done, total)),
        **kw,
    )
    assert moved == len(live) and seen[-1][0] == seen[-1][1]
    opened = nguard.open_slots(ngallery.ids())
    assert sorted(x for x in opened if isinstance(x, str)) == sorted(live)
    # Denser: the 4 single enrollments no longer take a pack each (pages of 2 packs
    # here; each page starts a pack).
    assert len(ngallery.store.slots) < len(ogallery.store.slots)
    # The new gallery answers under the new key, canaries and all.
    who = sorted(live)[3]
    vec = nguard.jitter(faces[who])
    res, _ = ngallery.identify(ncipher.encrypt_probe(vec, op="identify"))
    match, name = identify_decision(
        ncipher, nguard, labels=ngallery.ids(), scores_blob=res, probe=vec
    )
    assert match and name == who
    # Unlinkable labels: no label survives the rotation.
    assert not set(ngallery.ids()) & set(ogallery.ids()) - {None}
    ngallery.close()


def test_compaction_under_the_same_key_erases_dead_slots(old: Any, tmp_path: Path) -> None:
    cipher, guard, ogallery, _ = old
    compact = CkksGallery(path=tmp_path / "compact", public=cipher.keys.public)
    rekey(
        source=lambda f, c: export_packs(ogallery, f, c),
        old=(cipher, guard),
        new=(cipher, guard),
        enroll=compact.enroll,
        progress=tmp_path / "compact.progress",
    )

    def people(g: CkksGallery) -> list[str]:
        return sorted(x for x in guard.open_slots(g.ids()) if isinstance(x, str))

    assert people(compact) == people(ogallery)
    assert len(compact.store.slots) < len(ogallery.store.slots)
    compact.close()


def test_forged_export_pages_are_refused(old: Any) -> None:
    cipher, guard, gallery, _ = old
    page = msgpack.unpackb(export_packs(gallery, 0, 2), raw=False)
    swapped = dict(page, packs=[page["packs"][1], page["packs"][0]])  # canaries misplaced
    assert page["packs"][0] is not None and page["packs"][1] is not None
    with pytest.raises(ResultForgedError):
        open_export(cipher, guard, msgpack.packb(swapped, use_bin_type=True))
    dropped = dict(page, packs=[None, page["packs"][1]])
    with pytest.raises(ResultForgedError):
        open_export(cipher, guard, msgpack.packb(dropped, use_bin_type=True))
    first, total, live = open_export(cipher, guard, export_packs(gallery, 0, 2))
    assert first == 0 and total > 2 and len(live) > 40
