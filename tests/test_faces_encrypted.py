"""Real photos (fetched through pip by .ci/setup_data.sh), Dlib offline, through encryption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cipherface import CipherFace
from cipherface.errors import MissingWeightsError, NoFaceError

pytestmark = pytest.mark.faces


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    pytest.importorskip("deepface")
    pytest.importorskip("dlib")
    from cipherface.errors import LocalError
    from cipherface.faces import find_photos

    try:
        return find_photos(["obama", "obama2", "obama3", "biden"])
    except LocalError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_readme_flow_with_real_faces(photos: dict[str, Path], tmp_path: Path, metric: str) -> None:
    onprem = CipherFace(model_name="Dlib", distance_metric=metric)
    onprem.export_private_key(tmp_path / "private.txt")
    onprem.export_public_key(tmp_path / "public.txt")
    source = onprem.securely_embed(str(photos["obama"]))
    assert isinstance(source, list) and len(source) == 1
    cloud = CipherFace(
        model_name="Dlib", distance_metric=metric, cryptosystem=tmp_path / "public.txt"
    )
    onprem = CipherFace(
        model_name="Dlib", distance_metric=metric, cryptosystem=tmp_path / "private.txt"
    )
    decisions = {}
    for name in ("obama2", "obama3", "biden"):
        target = cloud.securely_embed(str(photos[name]))[0]
        distance = onprem.restore(cloud.encrypted_compare(target, source[0]))
        # Same decision as on the plaintext embeddings.
        a = np.array(onprem.represent(str(photos["obama"]))[0])
        b = np.array(onprem.represent(str(photos[name]))[0])
        plain = 1 - a @ b if metric == "cosine" else float(np.sum((a - b) ** 2))
        assert abs(distance - plain) < 1e-4
        decisions[name] = onprem.verify(distance)
    assert decisions == {"obama2": True, "obama3": True, "biden": False}


def test_no_face_and_missing_weights_through_the_api(
    photos: dict[str, Path], tmp_path: Path
) -> None:
    cf = CipherFace(model_name="Dlib")
    gray = np.full((240, 320, 3), 127, dtype=np.uint8)
    with pytest.raises(NoFaceError, match="no face"):
        cf.securely_embed(gray)
    vgg = CipherFace(model_name="VGG-Face")  # keys only: no model is loaded yet
    with pytest.raises(MissingWeightsError, match=r"vgg_face_weights") as err:
        vgg.represent(str(photos["obama"]))
    assert "weights" in str(err.value)


def test_lite_readme_flow_with_real_faces(photos: dict[str, Path], tmp_path: Path) -> None:
    """cipherface 0.0.2 README's PHE flow as written (Dlib instead of Facenet: offline)."""
    from cipherface import CipherFaceLite

    # build a cryptosystem
    onprem = CipherFaceLite(model_name="Dlib", algorithm_name="Paillier")
    # export keys of built cryptosystem
    onprem.export_private_key(str(tmp_path / "private.txt"))
    onprem.export_public_key(str(tmp_path / "public.txt"))
    # create vector embedding for 1st image and encrypt in one shot
    source_embedding_encrypted = onprem.securely_embed(img_path=str(photos["obama"]))[0]

    # cloud loads cryptosystem with public key
    cloud = CipherFaceLite(
        model_name="Dlib", algorithm_name="Paillier", cryptosystem=str(tmp_path / "public.txt")
    )
    verdicts = {}
    for name in ("obama2", "biden"):
        target_embedding = cloud.represent(img_path=str(photos[name]))[0]
        encrypted_similarity = cloud.encrypted_compare(source_embedding_encrypted, target_embedding)
        # on prem loads cryptosystem with private key
        onprem = CipherFaceLite(
            model_name="Dlib", algorithm_name="Paillier", cryptosystem=str(tmp_path / "private.txt")
        )
        decrypted_similarity = onprem.restore(encrypted_similarity)
        verdicts[name] = onprem.verify(decrypted_similarity)
    assert verdicts == {"obama2": True, "biden": False}
