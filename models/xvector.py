"""SUPERB-compatible x-vector TDNN: frames (B, T, D) + lengths -> speaker embedding (B, E).

projector D -> 512, five TDNN layers (contexts 5/3/3/1/1, dilations 1/2/3/1/1; the last
one 1500-d), statistics pooling (mean and standard deviation over valid frames only),
then a linear layer to the 512-d embedding. The TDNN layers are unpadded dilated
convolutions, so every output frame is computed from valid input frames only and
padding never changes an embedding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .upstream import frame_mask

CONTEXTS = (5, 3, 3, 1, 1)
DILATIONS = (1, 2, 3, 1, 1)


def stats_pool(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, C, T) + valid lengths (B,) -> (B, 2C): mean and std over valid frames, vectorised.

    Padded frames of `x` are zeroed IN PLACE (x is the caller's temporary): a masked copy of
    (B, C, T), or x * x, is a fresh allocation that costs more than the arithmetic on CPU. Sums of
    squares come from vector_norm, which makes no temporary (benchmarks/benchmark.py times it).
    """
    x.mul_(frame_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype))  # (B, 1, T) mask
    n = lengths.clamp(min=1).view(-1, 1).to(x.dtype)
    mean = x.sum(-1) / n  # (B, C)
    var = torch.linalg.vector_norm(x, dim=-1).square() / n - mean * mean
    return torch.cat([mean, torch.sqrt(var.clamp(min=1e-6))], dim=1)


class XVector(nn.Module):
    def __init__(self, input_dim: int, proj_dim: int = 512, channels: int = 512, stats_dim: int = 1500,
                 embed_dim: int = 512):
        super().__init__()
        self.projector = nn.Linear(input_dim, proj_dim)
        dims = [proj_dim] + [channels] * 4 + [stats_dim]
        self.tdnn = nn.Sequential(*[
            nn.Sequential(nn.Conv1d(dims[i], dims[i + 1], k, dilation=d), nn.ReLU(), nn.BatchNorm1d(dims[i + 1]))
            for i, (k, d) in enumerate(zip(CONTEXTS, DILATIONS))
        ])
        self.context = sum((k - 1) * d for k, d in zip(CONTEXTS, DILATIONS))  # frames lost to unpadded convs: 14
        self.embedding = nn.Linear(2 * stats_dim, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if feats.shape[1] <= self.context:
            raise ValueError(f"input of {feats.shape[1]} frames is shorter than the x-vector context "
                             f"({self.context + 1} frames)")
        x = self.tdnn(self.projector(feats).transpose(1, 2))  # (B, stats_dim, T - context)
        return self.embedding(stats_pool(x, lengths - self.context))  # (B, E)
