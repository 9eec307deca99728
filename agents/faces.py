"""Face photo -> one L2-normalised embedding, offline by default.

The edge agent turns a photo into the vector it encrypts. We use deepface (0.0.103, on
onnxruntime) with its ``Dlib`` model and ``dlib`` detector by default because their
weights come from PyPI (``face-recognition-models``) and so work with no network:
:func:`ensure_dlib_weights` links them into deepface's weights folder.

Rules this module keeps:

* Nothing heavy at import or construction: deepface (and OpenCV) are imported, and the
  model is built, on the first :meth:`Embedder.represent` (or :meth:`Embedder.warmup`).
* deepface keeps its weights in ``$DEEPFACE_HOME/.deepface/weights``; we point
  ``DEEPFACE_HOME`` at a folder the project owns (see :func:`deepface_home`) before
  importing it, never at the user's home.
* Never a download at run time: a missing weight file raises :class:`MissingWeightsError`
  naming the file and the folder, before deepface is asked to build the model.
* Large photos are downscaled (longest side ``max_side``) before detection: dlib's HOG
  detector cost grows with the pixel count (deepface also pads the image to twice its
  size to align faces near the border).

Images: a path (``str`` / ``os.PathLike``), encoded bytes (JPEG, PNG, ... anything OpenCV
decodes), or a ``uint8`` numpy array of shape HxWx3 in **BGR** order (OpenCV's and
deepface's convention; pass ``color="rgb"`` for RGB arrays such as PIL/skimage output).
HxW (grey) and HxWx4 (alpha dropped) arrays are accepted too.

Example:
    >>> from cipherface.agents.faces import Embedder, find_photos
    >>> photos = find_photos(["obama", "obama2"])
    >>> emb = Embedder()                      # Dlib model + dlib detector
    >>> a = emb.represent(photos["obama"])    # (128,) float64, unit norm
    >>> b = emb.represent(photos["obama2"])
    >>> float(a @ b) > 0.93                   # cosine distance below Dlib's 0.07
    True
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import numpy as np

from cipherface.crypto import thresholds
from cipherface.errors import (
    FaceError,
    ImageReadError,
    InvalidArgumentError,
    LocalError,
    MissingWeightsError,
    MultipleFacesError,
    NoFaceError,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = [
    "DEFAULT_MAX_SIDE",
    "DETECTORS",
    "DLIB_WEIGHT_FILES",
    "MODELS",
    "Embedder",
    "ImageInput",
    "cache_home",
    "deepface_engine",
    "deepface_home",
    "ensure_dlib_weights",
    "find_photos",
    "photo_dir",
    "read_image",
    "weights_dir",
]

log = logging.getLogger(__name__)

#: What :meth:`Embedder.represent` accepts: a path, encoded bytes, or a decoded array.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | NDArray[Any]"

ENV_HOME: Final = "CIPHERFACE_HOME"
ENV_DEEPFACE_HOME: Final = "CIPHERFACE_DEEPFACE_HOME"
SETUP_HINT: Final = "run .ci/setup_data.sh"

#: Longest image side fed to the detector (keeps 1280x720 -> embedding well under 300 ms).
DEFAULT_MAX_SIDE: Final = 640
#: Refuse to read image files or buffers larger than this (a photo is a few MB).
MAX_IMAGE_BYTES: Final = 64 * 1024 * 1024

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


# ------------------------------------------------------------------------- folders
def cache_home() -> Path:
    """Return the project's cache root: ``$CIPHERFACE_HOME`` or ``~/.cache/cipherface``.

    Returns:
      Path: the folder (not created).
    """
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cipherface"


def deepface_home() -> Path:
    """Return the folder we give deepface as ``DEEPFACE_HOME``.

    ``$CIPHERFACE_DEEPFACE_HOME`` if set, else ``<cache_home()>/deepface``. deepface keeps
    its weights in ``<this>/.deepface/weights``.

    Returns:
      Path: the folder (not created).
    """
    env = os.environ.get(ENV_DEEPFACE_HOME)
    return Path(env).expanduser() if env else cache_home() / "deepface"


def weights_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """Return deepface's weights folder for a deepface home.

    Args:
      home (str | PathLike | None): a deepface home; None means :func:`deepface_home`.

    Returns:
      Path: ``<home>/.deepface/weights`` (not created).
    """
    base = Path(home).expanduser() if home is not None else deepface_home()
    return base / ".deepface" / "weights"


def photo_dir() -> Path:
    """Return the folder of face photos fetched by ``.ci/setup_data.sh``.

    Returns:
      Path: ``<cache_home()>/photos``.

    Raises:
      LocalError: if the folder does not exist or holds no photo; the message says to
        run ``.ci/setup_data.sh``.
    """
    folder = cache_home() / "photos"
    if not folder.is_dir() or not any(_photo_files(folder)):
        raise LocalError(
            f"no face photos in {folder}: {SETUP_HINT} (it fetches them from PyPI into "
            f"${ENV_HOME}/photos, default ~/.cache/cipherface/photos)"
        )
    return folder


def _photo_files(folder: Path) -> Iterable[Path]:
    return (p for p in sorted(folder.iterdir()) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def find_photos(names: Iterable[str] | None = None) -> dict[str, Path]:
    """Locate the fetched face photos.

    Args:
      names (Iterable[str] | None): photo names to require, with or without extension
        (e.g. ``["obama", "biden.jpg"]``); None returns every photo.

    Returns:
      dict[str, Path]: photo stem (``"obama2"``) -> path.

    Raises:
      LocalError: if the photo folder is missing or a requested photo is not in it; the
        message says to run ``.ci/setup_data.sh``.
    """
    folder = photo_dir()
    found = {p.stem: p for p in _photo_files(folder)}
    if names is None:
        return found
    wanted = [Path(n).stem for n in names]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise LocalError(
            f"photo(s) {', '.join(missing)} not in {folder} (have: {', '.join(found)}): "
            f"{SETUP_HINT}"
        )
    return {n: found[n] for n in wanted}


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


# ------------------------------------------------------------------------ images
def _image_name(img: object, name: str | None) -> str:
    if name:
        return name
    if isinstance(img, (str, os.PathLike)):
        return os.fspath(img)
    if isinstance(img, (bytes, bytearray, memoryview)):
        return f"<{len(img)} bytes>"
    if isinstance(img, np.ndarray):
        return f"<array {'x'.join(map(str, img.shape))} {img.dtype}>"
    return f"<{type(img).__name__}>"


def read_image(
    img: ImageInput, *, color: Literal["bgr", "rgb"] = "bgr", name: str | None = None
) -> NDArray[np.uint8]:
    """Decode or check an image and return it as a contiguous BGR ``uint8`` HxWx3 array.

    Args:
      img (str | PathLike | bytes | numpy.ndarray): a file path, encoded image bytes, or a
        ``uint8`` array (HxW grey, HxWx3, or HxWx4 whose alpha is dropped).
      color (str): channel order of an array input, "bgr" (default) or "rgb". Ignored for
        files and bytes, which are always decoded to BGR.
      name (str | None): how to call the image in error messages (default: its path).

    Returns:
      numpy.ndarray: the image, BGR, ``uint8``, shape (H, W, 3).

    Raises:
      ImageReadError: if the file cannot be read or the bytes cannot be decoded.
      InvalidArgumentError: if the input has an unsupported type, shape or dtype.
    """
    import cv2

    label = _image_name(img, name)
    if color not in ("bgr", "rgb"):
        raise InvalidArgumentError(f"color must be 'bgr' or 'rgb', got {color!r}")
    if isinstance(img, (str, os.PathLike)):
        path = Path(img)
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise ImageReadError(f"{label}: {size} bytes is over {MAX_IMAGE_BYTES}")
            data = path.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"cannot read image {label}: {exc.strerror or exc}") from exc
        return _decode(data, label, cv2)
    if isinstance(img, (bytes, bytearray, memoryview)):
        if len(img) > MAX_IMAGE_BYTES:
            raise ImageReadError(f"{label}: over {MAX_IMAGE_BYTES} bytes")
        return _decode(bytes(img), label, cv2)
    if isinstance(img, np.ndarray):
        return _from_array(img, label, color, cv2)
    raise InvalidArgumentError(
        f"image must be a path, bytes or a numpy array, got {type(img).__name__}"
    )


def _decode(data: bytes, label: str, cv2: Any) -> NDArray[np.uint8]:
    if not data:
        raise ImageReadError(f"cannot decode image {label}: it is empty")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        # IMREAD_COLOR: always 3-channel BGR 8-bit, whatever the file's depth or alpha.
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageReadError(f"cannot decode image {label}: {exc}") from exc
    if decoded is None or decoded.size == 0:
        raise ImageReadError(f"cannot decode image {label}: not an image format OpenCV reads")
    return np.ascontiguousarray(decoded)


def _from_array(arr: NDArray[Any], label: str, color: str, cv2: Any) -> NDArray[np.uint8]:
    if arr.dtype != np.uint8:
        raise InvalidArgumentError(f"image array {label} must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        out = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        out = arr[:, :, :3]
        if color == "rgb":
            out = out[:, :, ::-1]
    else:
        raise InvalidArgumentError(
            f"image array {label} must be HxW, HxWx3 or HxWx4, got shape {arr.shape}"
        )
    if out.shape[0] < 1 or out.shape[1] < 1:
        raise InvalidArgumentError(f"image array {label} is empty")
    return np.ascontiguousarray(out)


def _downscale(img: NDArray[np.uint8], max_side: int | None, cv2: Any) -> NDArray[np.uint8]:
    height, width = img.shape[:2]
    longest = max(height, width)
    if max_side is None or longest <= max_side:
        return img
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # INTER_AREA: the right filter for shrinking (no aliasing on HOG gradients).
    return np.asarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


# ---------------------------------------------------------------------- deepface
_LOAD_LOCK = threading.Lock()


def _import_deepface(home: Path) -> Any:
    """Import deepface with our DEEPFACE_HOME, quiet logs, and its side effects contained."""
    os.environ["DEEPFACE_HOME"] = str(home)
    # deepface logs INFO lines to stdout; 30 = logging.WARNING.
    os.environ.setdefault("DEEPFACE_LOG_LEVEL", "30")
    try:
        # deepface calls warnings.filterwarnings("ignore") at import: keep our filters.
        with warnings.catch_warnings():
            from deepface import DeepFace
    except ImportError as exc:
        raise LocalError(
            f"deepface cannot be imported ({exc}); install the edge extra: "
            "pip install 'cipherface-mqtt[edge]'"
        ) from exc
    except ValueError as exc:  # deepface picks its engine at import and raises if none fits
        raise LocalError(f"deepface cannot start: {exc}") from exc
    return DeepFace


def _pipeline_modules() -> tuple[Any | None, Any | None]:
    """deepface's detection/preprocessing modules if they have the stages we call, else None.

    They are internal to deepface (pinned at 0.0.103); if a future version changes them we
    fall back to the slower public ``DeepFace.represent``.
    """
    try:
        from deepface.modules import detection, preprocessing
    except ImportError:
        return None, None
    if callable(getattr(detection, "extract_face", None)) and callable(
        getattr(preprocessing, "resize_image", None)
    ):
        return detection, preprocessing
    log.warning("deepface internals changed: using DeepFace.represent (slower detection)")
    return None, None


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


@dataclass(frozen=True, kw_only=True)
class _Loaded:
    """deepface's pieces, built once: the public module and the stages we drive ourselves."""

    deepface: Any
    model: Any  # deepface FacialRecognition: input_shape, forward()
    detector: Any | None  # deepface Detector: detect_faces(); None for "skip"
    detection: Any | None  # deepface.modules.detection (extract_face), None -> public API
    preprocessing: Any | None  # deepface.modules.preprocessing (resize_image)


class Embedder:
    """Turn face photos into L2-normalised embeddings with deepface, offline by default.

    Construction is cheap: it checks the names and nothing else. The first call to
    :meth:`represent`, :meth:`represent_all` or :meth:`warmup` checks the weight files
    (raising :class:`MissingWeightsError` at once if one is missing), imports deepface
    and builds the model. An instance is safe to share between threads (calls are
    serialised).

    Args:
      model_name (str): deepface recognition model: "Dlib" (default, offline),
        "VGG-Face", "Facenet", "Facenet512", "ArcFace" or "SFace".
      detector (str): deepface detector: "dlib" (default, offline), "skip" (the whole
        image is the face), "opencv", "yunet" or "centerface".
      deepface_home (str | PathLike | None): folder given to deepface as DEEPFACE_HOME;
        None means :func:`deepface_home`.
      max_side (int | None): downscale photos whose longest side exceeds this many pixels
        before detection (default 640); None keeps the full size.
      align (bool): let deepface rotate each face so the eyes are level (default True).
      min_confidence (float): ignore detections whose confidence (deepface's, in [0, 1])
        is below this (default 0.3). dlib's HOG detector scores real frontal faces 0.5 to
        2 (clipped to 1) and its false positives 0 to 0.2: without a floor, a stray patch
        of texture turns a one-face photo into a :class:`MultipleFacesError`. 0 keeps
        every detection deepface would report.

    Raises:
      InvalidArgumentError: if the model or detector name is unknown, max_side < 64, or
        min_confidence is outside [0, 1].
    """

    def __init__(
        self,
        *,
        model_name: str = "Dlib",
        detector: str = "dlib",
        deepface_home: str | os.PathLike[str] | None = None,
        max_side: int | None = DEFAULT_MAX_SIDE,
        align: bool = True,
        min_confidence: float = 0.3,
    ) -> None:
        if model_name not in _MODEL_WEIGHTS:
            raise InvalidArgumentError(
                f"unknown face model {model_name!r}; expected one of {', '.join(MODELS)}"
            )
        if detector not in _DETECTOR_WEIGHTS:
            raise InvalidArgumentError(
                f"unknown face detector {detector!r}; expected one of {', '.join(DETECTORS)}"
            )
        if max_side is not None and (isinstance(max_side, bool) or max_side < 64):
            raise InvalidArgumentError(f"max_side must be an int >= 64 or None, got {max_side}")
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise InvalidArgumentError(f"min_confidence must be in [0, 1], got {min_confidence}")
        self._model_name = model_name
        self._detector = detector
        self._home = Path(deepface_home).expanduser() if deepface_home is not None else None
        self._max_side = max_side
        self._align = bool(align)
        self._min_confidence = float(min_confidence)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def __repr__(self) -> str:
        return (
            f"Embedder(model_name={self._model_name!r}, detector={self._detector!r}, "
            f"deepface_home={str(self.deepface_home)!r}, max_side={self._max_side})"
        )

    # ------------------------------------------------------------------ properties
    @property
    def model_name(self) -> str:
        """str: the deepface recognition model."""
        return self._model_name

    @property
    def detector(self) -> str:
        """str: the deepface face detector."""
        return self._detector

    @property
    def dim(self) -> int:
        """int: length of one embedding (128 for Dlib); known without loading the model."""
        return thresholds.dim(self._model_name)

    @property
    def deepface_home(self) -> Path:
        """Path: the DEEPFACE_HOME this embedder uses."""
        return self._home if self._home is not None else deepface_home()

    @property
    def weights_dir(self) -> Path:
        """Path: where deepface looks for this embedder's weight files."""
        return weights_dir(self.deepface_home)

    @property
    def loaded(self) -> bool:
        """bool: whether deepface has been imported and the model built."""
        return self._loaded is not None

    # -------------------------------------------------------------------- loading
    def check_weights(self) -> None:
        """Check that every weight file the model and detector need is on disk.

        For the Dlib model and dlib detector, first links the files from
        ``face_recognition_models`` when they are missing (see :func:`ensure_dlib_weights`).
        Does not import deepface.

        Raises:
          MissingWeightsError: naming the missing file(s), the folder to put them in and
            the URL deepface would use; raised at once, never after a download attempt.
          LocalError: if no deepface engine (tensorflow, torch, onnxruntime) is installed
            for a model that needs one.
        """
        folder = self.weights_dir
        uses_dlib = self._model_name == "Dlib" or self._detector == "dlib"
        if uses_dlib and not all((folder / n).is_file() for n in DLIB_WEIGHT_FILES):
            # Link both whatever is asked: cheap, and makes the folder complete.
            try:
                ensure_dlib_weights(self.deepface_home)
            except MissingWeightsError:
                pass  # reported below with the exact file this embedder needs
        if self._detector == "opencv":
            _ensure_opencv_cascades(folder)

        per_engine = _MODEL_WEIGHTS[self._model_name]
        engine: str | None = None
        if _ANY in per_engine:
            model_files = per_engine[_ANY]
        else:
            engine = deepface_engine()
            if engine is None:
                enforced = os.environ.get("DEEPFACE_BACKEND_ENGINE", "").strip()
                why = (
                    f"DEEPFACE_BACKEND_ENGINE={enforced} names an engine that is not installed"
                    if enforced
                    else "none of onnxruntime, torch, tensorflow is installed"
                )
                raise LocalError(
                    f"deepface has no engine to run {self._model_name} ({why}): install "
                    "onnxruntime (deepface's default) or unset DEEPFACE_BACKEND_ENGINE"
                )
            model_files = per_engine[engine]
        missing = [w for w in model_files if not (folder / w.name).is_file()]
        if missing:
            message = _missing_weights_message(self._model_name, missing, folder, engine)
            if engine is not None:
                alternatives = ", ".join(
                    f"{e}: {per_engine[e][0].name}" for e in _ENGINES if e != engine
                )
                message += (
                    f" deepface {self._model_name} files on other engines: {alternatives} "
                    "(cipherface 0.0.2 used the tensorflow .h5; this deepface runs on "
                    f"{engine}, which needs the .{_ENGINE_EXT[engine]} file)."
                )
            elif self._model_name == "Dlib":
                message += f" Or: pip install face-recognition-models==0.3.0 and {SETUP_HINT}."
            raise MissingWeightsError(message)

        det_missing = [w for w in _DETECTOR_WEIGHTS[self._detector] if not self._has_det(w)]
        if det_missing:
            message = _missing_weights_message(
                f"the {self._detector} face detector", det_missing, folder, None
            )
            if self._detector == "dlib":
                message += f" Or: pip install face-recognition-models==0.3.0 and {SETUP_HINT}."
            if self._detector == "opencv":
                message += " Debian's opencv-data package ships them (linked automatically)."
            raise MissingWeightsError(message)

    def _has_det(self, weight: _Weight) -> bool:
        if (self.weights_dir / weight.name).is_file():
            return True
        if self._detector == "opencv":
            # deepface looks in cv2's own data folder first.
            spec = importlib.util.find_spec("cv2")
            if spec is not None and spec.origin is not None:
                return (Path(spec.origin).parent / "data" / weight.name).is_file()
        return False

    def warmup(self) -> None:
        """Check the weights, import deepface and build the model and detector now.

        Call it at agent start-up to pay the load cost (and see a missing file) before
        the first photo arrives. Idempotent.

        Raises:
          MissingWeightsError: if a weight file is missing (see :meth:`check_weights`).
          LocalError: if deepface or its engine cannot be imported.
        """
        with self._lock:
            self._ensure_loaded()

    def _ensure_loaded(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        self.check_weights()
        with _LOAD_LOCK:
            deepface = _import_deepface(self.deepface_home)
            try:
                model = deepface.build_model(model_name=self._model_name, task="facial_recognition")
                detector = None
                if self._detector != "skip":
                    detector = deepface.build_model(model_name=self._detector, task="face_detector")
            except ValueError as exc:
                raise self._map_build_error(exc) from exc
            except ImportError as exc:
                raise LocalError(
                    f"deepface cannot build {self._model_name}/{self._detector}: {exc}"
                ) from exc
            detection, preprocessing = _pipeline_modules()
        self._loaded = _Loaded(
            deepface=deepface,
            model=model,
            detector=detector,
            detection=detection,
            preprocessing=preprocessing,
        )
        return self._loaded

    def _map_build_error(self, exc: ValueError) -> LocalError:
        text = str(exc)
        if "download" in text.lower():
            # Our pre-check missed a file deepface wanted: still never let it hang on one.
            return MissingWeightsError(
                f"{self._model_name}/{self._detector}: a weight file is missing from "
                f"{self.weights_dir} and we do not download at run time. deepface said: {text}"
            )
        return LocalError(f"deepface cannot build {self._model_name}/{self._detector}: {text}")

    # ------------------------------------------------------------------- inference
    def represent(
        self,
        img: ImageInput,
        *,
        color: Literal["bgr", "rgb"] = "bgr",
        name: str | None = None,
    ) -> NDArray[np.float64]:
        """Return the embedding of the one face in a photo.

        Args:
          img (str | PathLike | bytes | numpy.ndarray): a file path, encoded bytes, or a
            ``uint8`` HxWx3 array in BGR order (or RGB with ``color="rgb"``).
          color (str): channel order of an array input: "bgr" (default) or "rgb".
          name (str | None): how to call the image in error messages.

        Returns:
          numpy.ndarray: shape ``(dim,)``, float64, unit L2 norm.

        Raises:
          ImageReadError: if the image cannot be read or decoded.
          NoFaceError: if no face is found.
          MultipleFacesError: if more than one face is found.
          MissingWeightsError: if a weight file is missing (first call only).
          InvalidArgumentError: if the input has an unsupported type, shape or dtype.
        """
        label = _image_name(img, name)
        faces = self._embed(img, color=color, label=label)
        if len(faces) > 1:
            raise MultipleFacesError(
                f"{len(faces)} faces in {label}; exactly one is required "
                "(crop the photo, or use represent_all)"
            )
        return faces[0]

    def represent_all(
        self,
        img: ImageInput,
        *,
        color: Literal["bgr", "rgb"] = "bgr",
        name: str | None = None,
    ) -> list[NDArray[np.float64]]:
        """Return the embedding of every face in a photo, in detection order.

        Args:
          img (str | PathLike | bytes | numpy.ndarray): as for :meth:`represent`.
          color (str): channel order of an array input: "bgr" (default) or "rgb".
          name (str | None): how to call the image in error messages.

        Returns:
          list[numpy.ndarray]: one ``(dim,)`` float64 unit vector per face (at least one).

        Raises:
          ImageReadError: if the image cannot be read or decoded.
          NoFaceError: if no face is found.
          MissingWeightsError: if a weight file is missing (first call only).
          InvalidArgumentError: if the input has an unsupported type, shape or dtype.
        """
        return self._embed(img, color=color, label=_image_name(img, name))

    def _embed(
        self, img: ImageInput, *, color: Literal["bgr", "rgb"], label: str
    ) -> list[NDArray[np.float64]]:
        import cv2

        # Decode before loading anything: a bad file is reported without a model load.
        bgr = _downscale(read_image(img, color=color, name=label), self._max_side, cv2)
        with self._lock:
            loaded = self._ensure_loaded()
            try:
                if loaded.detection is not None and loaded.preprocessing is not None:
                    raw = self._embed_fast(loaded, bgr)
                else:
                    results = loaded.deepface.represent(
                        img_path=bgr,
                        model_name=self._model_name,
                        detector_backend=self._detector,
                        enforce_detection=True,
                        align=self._align,
                    )
                    raw = [
                        r["embedding"]
                        for r in results
                        if self._detector == "skip"
                        or float(r.get("face_confidence") or 0.0) >= self._min_confidence
                    ]
            except ValueError as exc:
                raise self._map_error(exc, label) from exc
        if not raw:
            raise NoFaceError(f"no face detected in {label}")
        return [self._normalise(vec, label) for vec in raw]

    def _embed_fast(self, loaded: _Loaded, bgr: NDArray[np.uint8]) -> list[Any]:
        """DeepFace.represent's steps, minus its whole-image padding.

        deepface pads the photo by half its size on every side before detection so that
        alignment never rotates a face out of the frame; that quadruples the pixels dlib's
        HOG detector scans (and it upsamples once more). Its ``extract_face`` already pads
        around each face when aligning, so we detect on the photo as is and feed the same
        crops, resized and scaled the same way, to the same model.
        """
        assert loaded.detection is not None and loaded.preprocessing is not None
        if loaded.detector is None:  # "skip": the whole photo is the face
            crops = [bgr]
        else:
            crops = []
            for area in loaded.detector.detect_faces(bgr):
                if float(area.confidence or 0.0) < self._min_confidence:
                    continue
                face = loaded.detection.extract_face(
                    facial_area=area,
                    img=bgr,
                    align=self._align,
                    expand_percentage=0,
                    width_border=0,
                    height_border=0,
                    detector_backend=self._detector,
                ).img
                if face.shape[0] > 0 and face.shape[1] > 0:
                    crops.append(face)
        if not crops:
            return []
        height, width = loaded.model.input_shape
        batch = []
        for face in crops:
            # deepface hands the model BGR pixels scaled to [0, 1] ("base" normalisation).
            scaled = face / 255.0 if face.max() > 1 else face
            batch.append(loaded.preprocessing.resize_image(img=scaled, target_size=(width, height)))
        out = loaded.model.forward(np.concatenate(batch, axis=0))
        vectors = np.asarray(out, dtype=np.float64)
        return list(vectors.reshape(len(crops), -1))

    def _map_error(self, exc: ValueError, label: str) -> FaceError | LocalError:
        kind = type(exc).__name__
        text = str(exc)
        # FaceNotDetected: nothing found; ImgNotFound here: faces found but every crop was
        # empty (a face cut by the border) -- both mean "no usable face" to the caller.
        if kind in ("FaceNotDetected", "ImgNotFound"):
            return NoFaceError(f"no face detected in {label}")
        if "download" in text.lower():
            return self._map_build_error(exc)
        return FaceError(f"deepface failed on {label}: {text}")

    def _normalise(self, embedding: object, label: str) -> NDArray[np.float64]:
        vec = np.asarray(embedding, dtype=np.float64).reshape(-1)
        if vec.shape != (self.dim,):
            raise FaceError(
                f"{self._model_name} gave a {vec.shape[0]}-d embedding for {label}, "
                f"expected {self.dim}"
            )
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0.0:
            raise FaceError(f"{self._model_name} gave a zero or non-finite embedding for {label}")
        out: NDArray[np.float64] = vec / norm
        return out


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m cipherface.agents.faces``: set up the offline weights, or embed photos.

    Args:
      argv (list[str] | None): arguments (default: ``sys.argv[1:]``).

    Returns:
      int: the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m cipherface.agents.faces")
    parser.add_argument(
        "--setup", action="store_true", help="link the Dlib weights into deepface's folder"
    )
    parser.add_argument("--where", action="store_true", help="print the folders in use")
    parser.add_argument("images", nargs="*", help="photos to embed (prints pairwise distances)")
    parser.add_argument("--model", default="Dlib", choices=MODELS)
    parser.add_argument("--detector", default="dlib", choices=DETECTORS)
    args = parser.parse_args(argv)
    try:
        if args.setup:
            folder = ensure_dlib_weights()
            print(f"Dlib weights ready in {folder}")
        if args.where:
            print(f"cache home:    {cache_home()}")
            print(f"deepface home: {deepface_home()}")
            print(f"weights:       {weights_dir()}")
            print(f"photos:        {cache_home() / 'photos'}")
        if args.images:
            emb = Embedder(model_name=args.model, detector=args.detector)
            vecs = [emb.represent(p) for p in args.images]
            limit = thresholds.threshold(args.model, "cosine")
            for i, a in enumerate(vecs):
                for j in range(i + 1, len(vecs)):
                    dist = thresholds.distance_from_similarity(float(a @ vecs[j]), "cosine")
                    verdict = "match" if dist <= limit else "no match"
                    print(f"{args.images[i]} ~ {args.images[j]}: cosine {dist:.4f} ({verdict})")
        if not (args.setup or args.where or args.images):
            parser.print_help()
    except LocalError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
