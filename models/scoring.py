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


def cohort_stats(emb: np.ndarray, cohort: np.ndarray, top_k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each embedding's top_k cosine scores against a cohort: (U,), (U,)."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    c = cohort / np.linalg.norm(cohort, axis=1, keepdims=True).clip(min=1e-12)
    k = min(top_k, len(c))
    mean, std = np.empty(len(unit), np.float32), np.empty(len(unit), np.float32)
    for i in range(0, len(unit), chunk):
        s = unit[i:i + chunk] @ c.T  # (chunk, K)
        top = np.partition(s, len(c) - k, axis=1)[:, len(c) - k:]  # the k closest cohort members
        mean[i:i + chunk], std[i:i + chunk] = top.mean(1), top.std(1)
    return mean, std


def asnorm_scores(raw: np.ndarray, enroll: np.ndarray, test: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Adaptive symmetric score normalisation (Matejka et al., 2017):
    0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t), each side's statistics over its top-k cohort scores."""
    sd = std.clip(min=1e-6)
    return 0.5 * ((raw - mean[enroll]) / sd[enroll] + (raw - mean[test]) / sd[test])
