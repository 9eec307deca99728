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
    >>> from cipherface.faces import Embedder, find_photos
    >>> photos = find_photos(["obama", "obama2"])
    >>> emb = Embedder()                      # Dlib model + dlib detector
    >>> a = emb.represent(photos["obama"])    # (128,) float64, unit norm
    >>> b = emb.represent(photos["obama2"])
    >>> float(a @ b) > 0.93                   # cosine distance below Dlib's 0.07
    True
    >>> face = emb.represent_face(photos["obama"])  # the same vector, and where the face is
    >>> x, y, w, h = face.box                 # pixels of the photo as given (not downscaled)
"""

from cipherface.faces.embedder import Box, Embedder, Face
from cipherface.faces.images import DEFAULT_MAX_SIDE, ImageInput, read_image
from cipherface.faces.paths import cache_home, deepface_home, find_photos, photo_dir, weights_dir
from cipherface.faces.weights import (
    DETECTORS,
    DLIB_WEIGHT_FILES,
    MODELS,
    deepface_engine,
    ensure_dlib_weights,
)

__all__ = [
    "DEFAULT_MAX_SIDE",
    "DETECTORS",
    "DLIB_WEIGHT_FILES",
    "MODELS",
    "Box",
    "Embedder",
    "Face",
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
