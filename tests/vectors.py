"""Synthetic embeddings for tests: random unit templates and probes of the same person."""

from __future__ import annotations

import numpy as np

DIM = 128


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    """``n`` random unit vectors of dimension ``d`` (one per row)."""
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(v: np.ndarray, rng: np.random.Generator, eps: float = 0.02) -> np.ndarray:
    """A probe of the same person: a small perturbation (cosine distance << 0.07)."""
    w = v + eps * rng.normal(size=v.shape) / np.sqrt(DIM)
    return w / np.linalg.norm(w)
