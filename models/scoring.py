"""Cosine scoring of trials from a table of embeddings."""
from __future__ import annotations

import numpy as np


def cosine_scores(emb: np.ndarray, enroll: np.ndarray, test: np.ndarray, chunk: int = 1_000_000) -> np.ndarray:
    """emb (U, E) embeddings; enroll/test (N,) row indices -> (N,) cosine similarities.

    Vectorised in chunks so a million trials never build a (N, E) pair of copies at once.
    """
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    out = np.empty(len(enroll), dtype=np.float32)
    for i in range(0, len(enroll), chunk):
        a, b = unit[enroll[i:i + chunk]], unit[test[i:i + chunk]]
        out[i:i + chunk] = np.einsum("ne,ne->n", a, b)
    return out
