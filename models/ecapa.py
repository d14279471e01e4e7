"""ECAPA-TDNN (Desplanques et al., Interspeech 2020): frames (B, T, D) + lengths -> embedding (B, E).

    Conv1d k=5 + ReLU + BN                                   D -> C
    3 x SE-Res2Block (k=3, dilation 2/3/4, Res2Net scale 8)  C -> C, residual
    multi-layer feature aggregation: concat the 3 blocks, 1x1 conv  3C -> M (M = 3C: 1536 for C=512)
    attentive statistics pooling with global context         M x T -> 2M (models/pooling.py)
    BN -> Linear -> BN                                       2M -> E

Padding invariance: every convolution is "same"-padded, so a frame near the end of the
valid region reads its neighbours beyond it. For a lone utterance those are the conv's own
zero padding; in a padded batch they are whatever sits there (upstream output, BN bias).
So the input and every conv block's output are multiplied by the frame mask: beyond the
valid length everything is zero, exactly like the conv padding of the lone utterance, and
(in eval mode) the batch and the lone pass give the same embedding. The SE squeeze, the
global context and the attention only look at valid frames. In training mode BatchNorm's
batch statistics still see the zeroed padding frames (as the x-vector's BN sees its padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .options import key
from .pooling import POOLINGS, frame_mask


class TDNNBlock(nn.Module):
    """Conv1d ("same" padding) -> ReLU -> BN, then zero the padded frames (BN's shift made them non-zero)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        self.bn = nn.BatchNorm1d(out_ch)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x))) * mask  # (B, out_ch, T); mask (B, 1, T)


class SERes2Block(nn.Module):
    """1x1 TDNN -> Res2Net dilated k=3 convs -> 1x1 TDNN -> squeeze-excitation, plus the input (residual)."""

    def __init__(self, channels: int, kernel: int, dilation: int, scale: int, se_dim: int = 128):
        super().__init__()
        if channels % scale:
            raise ValueError(f"ECAPA channels ({channels}) must be divisible by the Res2Net scale ({scale})")
        self.scale, width = scale, channels // scale
        self.pre = TDNNBlock(channels, channels)
        # Res2Net: scale - 1 small convs; the first chunk passes through (hierarchical receptive fields)
        self.res2 = nn.ModuleList(TDNNBlock(width, width, kernel, dilation) for _ in range(scale - 1))
        self.post = TDNNBlock(channels, channels)
        self.se = nn.Sequential(nn.Linear(channels, se_dim), nn.ReLU(), nn.Linear(se_dim, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) with zero padding, mask (B, 1, T), n (B, 1) valid frame counts -> (B, C, T)."""
        chunks = torch.chunk(self.pre(x, mask), self.scale, dim=1)  # scale x (B, C/scale, T)
        out, y = [chunks[0]], None
        for conv, chunk in zip(self.res2, chunks[1:]):
            y = conv(chunk if y is None else chunk + y, mask)  # each chunk also sees the previous one's output
            out.append(y)
        h = self.post(torch.cat(out, dim=1), mask)  # (B, C, T), zero on padding
        s = self.se(h.sum(-1, dtype=torch.float32) / n)  # squeeze: mean over valid frames only -> channel gates (B, C)
        return x + h * s.unsqueeze(-1)  # both terms are zero on padding


class ECAPA(nn.Module):
    @dataclass
    class Options:
        name: str = "ecapa"
        channels: int = key(512, "C: 512 (small) or 1024 (large)")
        embed_dim: int = key(192, "speaker embedding size")
        scale: int = key(8, "Res2Net scale: the channels split into this many groups")
        attention_dim: int = key(128, "attentive pooling's hidden size")
        pooling: str = key("attentive", "attentive | stats (models.pooling.POOLINGS)")

    def __init__(self, input_dim: int, opts: Options):
        super().__init__()
        if opts.pooling not in POOLINGS:
            raise ValueError(f"downstream.pooling must be one of {', '.join(POOLINGS)}, got {opts.pooling!r}")
        c = opts.channels
        self.layer1 = TDNNBlock(input_dim, c, kernel=5)
        self.blocks = nn.ModuleList(SERes2Block(c, 3, d, opts.scale) for d in (2, 3, 4))
        self.mfa = TDNNBlock(3 * c, 3 * c)  # aggregate all three blocks' outputs
        pool_args = {"attention_dim": opts.attention_dim} if opts.pooling == "attentive" else {}
        self.pool = POOLINGS[opts.pooling](3 * c, **pool_args)
        self.pool_bn = nn.BatchNorm1d(self.pool.out_dim)
        self.embedding = nn.Linear(self.pool.out_dim, opts.embed_dim)
        self.embed_bn = nn.BatchNorm1d(opts.embed_dim)
        self.context = 0  # "same" convs: no frames lost (models.min_input_samples reads this)
        self.embed_dim = opts.embed_dim

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, T, D), lengths (B,) valid frames -> (B, embed_dim)."""
        lengths = lengths.clamp(min=1, max=feats.shape[1])
        mask = frame_mask(lengths, feats.shape[1]).unsqueeze(1)  # (B, 1, T) bool
        n = lengths.view(-1, 1).float()  # (B, 1) counts in float32: bf16 would make 2999 frames 2992
        x = self.layer1(feats.transpose(1, 2) * mask, mask)  # (B, C, T); the input's padding zeroed first
        outs = []
        for block in self.blocks:
            x = block(x, mask, n)
            outs.append(x)
        h = self.mfa(torch.cat(outs, dim=1), mask)  # (B, 3C, T), zero on padding
        return self.embed_bn(self.embedding(self.pool_bn(self.pool(h, lengths))))  # (B, E)
