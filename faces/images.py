"""Photo input: a path, encoded bytes or an array, decoded and checked into a BGR
``uint8`` HxWx3 array (large photos downscaled before detection)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import numpy as np

from cipherface.errors import (
    ImageReadError,
    InvalidArgumentError,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

log = logging.getLogger(__name__)


#: Longest image side fed to the detector (keeps 1280x720 -> embedding well under 300 ms).
DEFAULT_MAX_SIDE: Final = 640
#: Refuse to read image files or buffers larger than this (a photo is a few MB).
MAX_IMAGE_BYTES: Final = 64 * 1024 * 1024


#: What :meth:`Embedder.represent` accepts: a path, encoded bytes, or a decoded array.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | NDArray[Any]"


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


def _box_in_original(
    box: tuple[float, float, float, float],
    detected_on: tuple[int, ...],
    original: tuple[int, ...],
) -> tuple[int, int, int, int]:
    """Map an ``(x, y, w, h)`` box found on a downscaled copy back to the original's pixels.

    ``detected_on`` and ``original`` are the two images' shapes. Each axis has its own
    factor (:func:`_downscale` rounds each side), and the box is clipped to the image.
    """
    fx = original[1] / detected_on[1]
    fy = original[0] / detected_on[0]
    x, y, w, h = box
    left = min(original[1], max(0, round(x * fx)))
    top = min(original[0], max(0, round(y * fy)))
    right = min(original[1], max(left, round((x + w) * fx)))
    bottom = min(original[0], max(top, round((y + h) * fy)))
    return (left, top, right - left, bottom - top)
