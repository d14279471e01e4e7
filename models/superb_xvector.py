"""SUPERB's x-vector, exactly as s3prl 0.4.18 builds it (s3prl.nn.speaker_model.SuperbXvector).

    projector        Linear D -> hidden_size
    5 TDNN layers    context 5/3/3/1/1, dilation 1/2/3/1/1, each Linear over the stacked context
                     frames -> ReLU, no BatchNorm; 512 channels, the last one aggregation_size
    statistics       mean and torch.std (unbiased) over the valid frames
    embedding        Linear 2 x aggregation_size -> embed_dim -> ReLU
    training only    a second Linear embed_dim -> embed_dim -> ReLU, whose output the margin softmax sees

The parameter names and shapes are s3prl's (`tdnns.module.0.kernel.weight`, `affine.linear1.weight`,
...), so an s3prl state dict loads as it is; tests/test_superb_parity.py checks the outputs against
ones recorded from s3prl itself. Two things are computed differently and give the same numbers:
- each TDNN layer is s3prl's Linear applied as one matrix product per context frame on shifted views
  of its input, rather than over unfolded copies of it (no context-times-larger temporary);
- a padded batch is packed first: the valid frames of every utterance one after another, run through
  the projector and the TDNNs as one sequence. The output frames whose context straddles two
  utterances are dropped, which are exactly the ones the padded computation drops (its last 14 per
  utterance), so no work is spent on padding: a quarter of a SUPERB training step on real-mini.
  A file exported with torch.export computes the padded batch instead (packing has data-dependent sizes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .options import key
from .pooling import StatsPool

CONTEXTS = (5, 3, 3, 1, 1)
DILATIONS = (1, 2, 3, 1, 1)
CHANNELS = 512  # fixed inside s3prl's XVectorBackbone


class TDNN(nn.Module):
    """y_t = ReLU(W [x_{t}, x_{t+d}, ..., x_{t+(c-1)d}] + b): a Linear over `context` frames `dilation` apart."""

    def __init__(self, input_size: int, output_size: int, context: int, dilation: int):
        super().__init__()
        self.context, self.dilation = context, dilation
        # s3prl's layout: input index k * input_size + d is frame k of the context, feature d
        self.kernel = nn.Linear(input_size * context, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (D, L) frames of one (packed) sequence, or (B, D, L) -> (..., out, L - (context - 1) * dilation).

        One matrix product per context frame, on shifted views of x: on CPU the backward of these
        products takes less than half the time of a dilated conv1d's, for the same numbers."""
        out = self.kernel.out_features
        weight = self.kernel.weight.view(out, self.context, -1)  # (out, context, D)
        n = x.shape[-1] - (self.context - 1) * self.dilation
        if x.dim() == 2:
            y = torch.addmm(self.kernel.bias[:, None], weight[:, 0], x[:, :n])
        else:
            y = self.kernel.bias[:, None] + weight[:, 0] @ x[..., :n]
        for k in range(1, self.context):
            y = y + weight[:, k] @ x[..., k * self.dilation:k * self.dilation + n]
        return torch.relu(y)


class Backbone(nn.Module):
    """s3prl's XVectorBackbone without BatchNorm (SUPERB's batch_norm=False)."""

    def __init__(self, input_size: int, aggregation_size: int):
        super().__init__()
        sizes = [input_size] + [CHANNELS] * 4 + [aggregation_size]
        self.module = nn.Sequential(*[TDNN(sizes[i], sizes[i + 1], c, d)
                                      for i, (c, d) in enumerate(zip(CONTEXTS, DILATIONS))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(D, L) -> (aggregation_size, L - 14)."""
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
        hidden_size: int = key(512, "projector output (s3prl: hidden_size)")
        aggregation_size: int = key(1500, "last TDNN layer, before statistics pooling (s3prl: aggregation_size)")
        embed_dim: int = key(512, "speaker embedding (s3prl: output_size)")

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
        lengths = lengths.clamp(max=feats.shape[1])
        if torch.compiler.is_exporting():  # packing has data-dependent sizes: the padded batch, same numbers
            x = self.tdnns(self.projector(feats).transpose(1, 2))  # (B, aggregation_size, T - 14)
            return self.affine(self.pooling(x, lengths - self.context))
        # packing has data-dependent sizes: the lengths are read on the host, once (the one wait for the
        # device in this forward), and the packed rows are picked by an index built from them there
        counts = lengths.tolist()
        if min(counts) <= self.context:
            raise ValueError(f"input of {min(counts)} frames is shorter than the x-vector context "
                             f"({self.context + 1} frames)")
        T = feats.shape[1]
        rows = torch.cat([torch.arange(n) + row * T for row, n in enumerate(counts)])
        if feats.is_cuda:
            rows = rows.pin_memory()
        # (L, D): every row's valid frames, in order (what feats[frame_mask(lengths, T)] gives, without its nonzero)
        packed = feats.reshape(-1, feats.shape[2]).index_select(0, rows.to(feats.device, non_blocking=True))
        x = self.tdnns(self.projector(packed).T)  # (aggregation_size, L - 14)
        valid = [n - self.context for n in counts]  # output frames of each row whose context lies inside it
        pieces = torch.split(x, [n for v in valid for n in (v, self.context)][:-1], dim=1)[::2]  # per row
        return self.affine(torch.stack([self.pooling.one(p) for p in pieces]))
