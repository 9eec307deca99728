"""Verification thresholds of the deepface face models, and the score -> decision rule.

The numbers are deepface's own (``deepface/config/threshold.py``, as in deepface 0.0.103),
so a decision taken here agrees with ``DeepFace.verify`` for the same embeddings.

Our two metric names map onto deepface's columns like this:

* ``"cosine"`` -- cosine distance ``1 - cos(a, b)``; deepface's ``cosine`` column.
* ``"euclidean"`` -- the Euclidean distance *between L2-normalised embeddings*. Every
  embedding in this project is L2-normalised before it is encrypted (the encrypted score
  is then a plain dot product), so this uses deepface's ``euclidean_l2`` column, never its
  raw ``euclidean`` one (which is for un-normalised vectors and has other units).

Both distances are functions of the similarity ``s = <a, b>`` of unit vectors, which is what
the encrypted dot product yields: cosine ``1 - s`` and euclidean ``sqrt(2 - 2 s)``. A pair is
a match when its distance is at or below the threshold (deepface's rule is ``<=``).

Example:
    >>> from cipherface.crypto import thresholds
    >>> thresholds.threshold("Dlib", "cosine")
    0.07
    >>> thresholds.is_match(0.95, "Dlib", "cosine")
    True
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Final

from cipherface.errors import InvalidArgumentError

__all__ = [
    "DEEPFACE_THRESHOLDS",
    "DIMS",
    "METRICS",
    "MODELS",
    "dim",
    "distance_from_similarity",
    "is_match",
    "threshold",
]

#: deepface's table, keyed by model then by *deepface's* metric name.
DEEPFACE_THRESHOLDS: Final = MappingProxyType(
    {
        "VGG-Face": MappingProxyType({"cosine": 0.68, "euclidean": 1.17, "euclidean_l2": 1.17}),
        "Facenet": MappingProxyType({"cosine": 0.40, "euclidean": 10.0, "euclidean_l2": 0.80}),
        "Facenet512": MappingProxyType({"cosine": 0.30, "euclidean": 23.56, "euclidean_l2": 1.04}),
        "Dlib": MappingProxyType({"cosine": 0.07, "euclidean": 0.6, "euclidean_l2": 0.4}),
        "ArcFace": MappingProxyType({"cosine": 0.68, "euclidean": 4.15, "euclidean_l2": 1.13}),
        "SFace": MappingProxyType({"cosine": 0.593, "euclidean": 10.734, "euclidean_l2": 1.055}),
    }
)

#: Embedding dimension of each model.
DIMS: Final = MappingProxyType(
    {"VGG-Face": 4096, "Facenet": 128, "Facenet512": 512, "Dlib": 128, "ArcFace": 512, "SFace": 128}
)

#: Model names we know, in deepface's spelling.
MODELS: Final = tuple(DEEPFACE_THRESHOLDS)

# Our metric name -> deepface's column. "euclidean" is on unit vectors, hence euclidean_l2.
_COLUMN: Final = MappingProxyType({"cosine": "cosine", "euclidean": "euclidean_l2"})

#: Our metric names.
METRICS: Final = tuple(_COLUMN)


def _check_model(model: str) -> str:
    if model not in DEEPFACE_THRESHOLDS:
        raise InvalidArgumentError(
            f"unknown face model {model!r}; expected one of {', '.join(MODELS)}"
        )
    return model


def _check_metric(metric: str) -> str:
    if metric not in _COLUMN:
        raise InvalidArgumentError(
            f"unknown metric {metric!r}; expected one of {', '.join(METRICS)} "
            "('euclidean' is the distance between L2-normalised embeddings)"
        )
    return metric


def threshold(model: str, metric: str = "cosine") -> float:
    """Return the distance threshold of a model for one of our metrics.

    Args:
      model (str): deepface model name: VGG-Face, Facenet, Facenet512, Dlib, ArcFace or SFace.
      metric (str): "cosine", or "euclidean" (on L2-normalised embeddings: deepface's
        ``euclidean_l2`` column).

    Returns:
      float: the largest distance that still counts as the same person.

    Raises:
      InvalidArgumentError: if the model or the metric is unknown.
    """
    column = _COLUMN[_check_metric(metric)]
    return DEEPFACE_THRESHOLDS[_check_model(model)][column]


def dim(model: str) -> int:
    """Return the embedding dimension of a model.

    Args:
      model (str): deepface model name.

    Returns:
      int: the number of features of one embedding.

    Raises:
      InvalidArgumentError: if the model is unknown.
    """
    return DIMS[_check_model(model)]


def distance_from_similarity(similarity: float, metric: str = "cosine") -> float:
    """Turn the dot product of two unit embeddings into a distance.

    Args:
      similarity (float): ``<a, b>`` for L2-normalised ``a`` and ``b`` (in [-1, 1] up to
        rounding and HE noise; values slightly outside are tolerated).
      metric (str): "cosine" (returns ``1 - s``) or "euclidean" (returns
        ``sqrt(max(0, 2 - 2 s))``, the distance between the unit vectors).

    Returns:
      float: the distance under that metric.

    Raises:
      InvalidArgumentError: if the metric is unknown or the similarity is not a finite number.
    """
    _check_metric(metric)
    try:
        s = float(similarity)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"similarity must be a number, got {similarity!r}") from exc
    if not math.isfinite(s):
        raise InvalidArgumentError(f"similarity must be finite, got {s!r}")
    if metric == "cosine":
        return 1.0 - s
    # HE noise can push s a hair above 1; clamp so the root stays real.
    return math.sqrt(max(0.0, 2.0 - 2.0 * s))


def is_match(similarity: float, model: str, metric: str = "cosine") -> bool:
    """Decide whether a similarity score means "same person".

    Args:
      similarity (float): dot product of two L2-normalised embeddings.
      model (str): deepface model that produced the embeddings.
      metric (str): "cosine" or "euclidean" (see :func:`threshold`).

    Returns:
      bool: True when the distance is at or below the model's threshold (deepface's rule).

    Raises:
      InvalidArgumentError: if the model or the metric is unknown, or the similarity is not
        a finite number.
    """
    limit = threshold(model, metric)
    return distance_from_similarity(similarity, metric) <= limit
