"""SUPERB's x-vector, exactly as s3prl 0.4.18 builds it (s3prl.nn.speaker_model.SuperbXvector).

    projector        Linear D -> hidden_size
    5 TDNN layers    context 5/3/3/1/1, dilation 1/2/3/1/1, each Linear over the stacked context
                     frames -> ReLU, no BatchNorm; 512 channels, the last one aggregation_size
    statistics       mean and torch.std (unbiased) over the valid frames
    embedding        Linear 2 x aggregation_size -> embed_dim -> ReLU
    training only    a second Linear embed_dim -> embed_dim -> ReLU, whose output the margin softmax sees

The parameter names and shapes are s3prl's (`tdnns.module.0.kernel.weight`, `affine.linear1.weight`,
...), so an s3prl state dict loads as it is; tests/test_superb_parity.py checks the outputs against
ones recorded from s3prl itself. One thing is computed differently and gives the same numbers: each
TDNN layer is s3prl's Linear applied through a dilated conv1d rather than over unfolded copies of
its input (no context-times-larger temporary).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pooling import StatsPool

CONTEXTS = (5, 3, 3, 1, 1)
DILATIONS = (1, 2, 3, 1, 1)
CHANNELS = 512  # fixed inside s3prl's XVectorBackbone


class TDNN(nn.Module):
    """y_t = ReLU(W [x_{t-c}, ..., x_{t+c}] + b): a Linear over `context` frames `dilation` apart."""

    def __init__(self, input_size: int, output_size: int, context: int, dilation: int):
        super().__init__()
        self.context, self.dilation = context, dilation
        # s3prl's layout: input index k * input_size + d is frame k of the context, feature d
        self.kernel = nn.Linear(input_size * context, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D, T) -> (B, out, T - (context - 1) * dilation)."""
        out, _ = self.kernel.weight.shape
        weight = self.kernel.weight.view(out, self.context, -1).transpose(1, 2)  # (out, D, context) for conv1d
        return torch.relu(F.conv1d(x, weight, self.kernel.bias, dilation=self.dilation))


class Backbone(nn.Module):
    """s3prl's XVectorBackbone without BatchNorm (SUPERB's batch_norm=False)."""

    def __init__(self, input_size: int, aggregation_size: int):
        super().__init__()
        sizes = [input_size] + [CHANNELS] * 4 + [aggregation_size]
        self.module = nn.Sequential(*[TDNN(sizes[i], sizes[i + 1], c, d)
                                      for i, (c, d) in enumerate(zip(CONTEXTS, DILATIONS))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class UtteranceExtractor(nn.Module):
    """Linear -> ReLU, and in training a second Linear -> ReLU (s3prl's _UtteranceExtractor)."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.linear1 = nn.Linear(input_size, output_size)
        self.linear2 = nn.Linear(output_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear1(x))
        return torch.relu(self.linear2(x)) if self.training else x


class SuperbXvector(nn.Module):
    @dataclass
    class Options:
        name: str = "superb_xvector"
        hidden_size: int = 512        # projector output (s3prl: hidden_size)
        aggregation_size: int = 1500  # last TDNN layer, before statistics pooling (s3prl: aggregation_size)
        embed_dim: int = 512          # speaker embedding (s3prl: output_size)

    def __init__(self, input_dim: int, opts: Options):
        super().__init__()
        self.projector = nn.Linear(input_dim, opts.hidden_size)
        self.tdnns = Backbone(opts.hidden_size, opts.aggregation_size)
        self.pooling = StatsPool(opts.aggregation_size, unbiased=True)
        self.affine = UtteranceExtractor(self.pooling.out_dim, opts.embed_dim)
        self.context = sum((c - 1) * d for c, d in zip(CONTEXTS, DILATIONS))  # frames lost to the TDNNs: 14
        self.embed_dim = opts.embed_dim

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, T, D), lengths (B,) valid frames -> (B, embed_dim)."""
        if feats.shape[1] <= self.context:
            raise ValueError(f"input of {feats.shape[1]} frames is shorter than the x-vector context "
                             f"({self.context + 1} frames)")
        x = self.tdnns(self.projector(feats).transpose(1, 2))  # (B, aggregation_size, T - 14)
        return self.affine(self.pooling(x, lengths - self.context))
