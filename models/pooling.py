"""Pooling over time: frame features (B, C, T) + valid frame counts (B,) -> one vector per utterance.

Both poolings look at valid frames only, so padding never changes an embedding. A downstream
that takes a `pooling` option picks a row of POOLINGS; each class reports its `out_dim`.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def frame_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class StatsPool(nn.Module):
    """Mean and standard deviation over valid frames: (B, C, T) -> (B, 2C).

    `unbiased=True` divides the variance by n - 1, as torch.std does in s3prl's
    TemporalStatisticsPooling (a single frame then gives std 0 here where s3prl gives NaN).
    Without autograd, padded frames of `x` are zeroed IN PLACE (x is the caller's temporary): a
    masked copy of (B, C, T), or x * x, is a fresh allocation that costs more than the arithmetic on
    CPU. Sums of squares come from vector_norm, which makes no temporary (benchmarks/benchmark.py
    times it). In training the copy is made: the layer before may need its output for backward.
    Counts and sums are float32 whatever the activations' dtype: bf16 holds integers exactly only up
    to 256 (2999 frames would count as 2992) and rounds a sum to 8 bits.
    """

    def __init__(self, channels: int, unbiased: bool = False):
        super().__init__()
        self.unbiased, self.out_dim = unbiased, 2 * channels

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = frame_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype)  # (B, 1, T)
        x = x * mask if x.requires_grad else x.mul_(mask)
        n = lengths.clamp(min=1).view(-1, 1).float()
        mean = x.sum(-1, dtype=torch.float32) / n  # (B, C)
        square_sum = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()  # (B, C)
        if self.unbiased:
            var = (square_sum - n * mean * mean) / (n - 1).clamp(min=1)
            std = torch.sqrt(var.clamp(min=0))
        else:
            std = torch.sqrt((square_sum / n - mean * mean).clamp(min=1e-6))
        return torch.cat([mean, std], dim=1)

    def one(self, x: torch.Tensor) -> torch.Tensor:
        """One utterance without padding: (C, T) -> (2C,), in float32 (see the class)."""
        x = x.float()
        std = x.std(-1, unbiased=self.unbiased) if x.shape[-1] > 1 else torch.zeros_like(x[:, 0])
        return torch.cat([x.mean(-1), std if self.unbiased else std.clamp(min=1e-3)])


def masked_mean_std(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6):
    """x (B, C, T), weights w (B, 1|C, T) summing to 1 over time (0 on padding) -> mean, std (B, C), in
    float32 whatever x's dtype (bf16 would round 1/n and every sum to 8 bits)."""
    x, w = x.float(), w.float()
    mean = (x * w).sum(-1)
    var = (x * x * w).sum(-1) - mean * mean
    return mean, torch.sqrt(var.clamp(min=eps))  # clamp: rounding can make var slightly negative


class AttentiveStatsPool(nn.Module):
    """Channel- and context-dependent attentive statistics pooling (ECAPA-TDNN): (B, C, T) -> (B, 2C).

    Each frame is scored from [h_t, global mean, global std] (the global context), per channel;
    softmax over valid frames; the weighted mean and std are the output. The conv inside
    sees zeroed padding, and the softmax gives padding exactly zero weight.
    """

    def __init__(self, channels: int, attention_dim: int = 128):
        super().__init__()
        self.tdnn = nn.Conv1d(3 * channels, attention_dim, 1)
        self.bn = nn.BatchNorm1d(attention_dim)
        self.score = nn.Conv1d(attention_dim, channels, 1)
        self.out_dim = 2 * channels

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.clamp(min=1, max=x.shape[-1])  # an empty row would make the softmax NaN
        mask = frame_mask(lengths, x.shape[-1]).unsqueeze(1)  # (B, 1, T) bool
        n = lengths.view(-1, 1, 1).float()  # counts in float32: bf16 would make 2999 frames 2992
        mean, std = masked_mean_std(x, mask / n)  # global context over valid frames, (B, C)
        T = x.shape[-1]
        ctx = torch.cat([x, mean.unsqueeze(-1).expand(-1, -1, T), std.unsqueeze(-1).expand(-1, -1, T)], dim=1)
        h = self.bn(torch.relu(self.tdnn(ctx))) * mask  # (B, A, T)
        e = self.score(torch.tanh(h))  # (B, C, T) frame scores
        w = torch.softmax(e.float().masked_fill(~mask, float("-inf")), dim=-1)  # padding gets exactly 0; fp32 weights
        mean, std = masked_mean_std(x, w)
        return torch.cat([mean, std], dim=1)


POOLINGS = {"stats": StatsPool, "attentive": AttentiveStatsPool}
