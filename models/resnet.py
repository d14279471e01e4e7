"""ResNet34 on filterbanks, as WeSpeaker sizes it (`wespeaker/models/resnet.py`, ResNet34-TSTP-emb256):
frames (B, T, F) + lengths -> embedding (B, E).

    the filterbank as a one-channel image (B, 1, F, T)
    3x3 conv, BN, ReLU                                     1 -> m            (m = 32 base channels)
    4 stages of BasicBlocks (3, 4, 6, 3 blocks)            m, 2m, 4m, 8m channels; stages 2-4 halve F and T
    frequency folded into channels                         (B, 8m * F/8, T/8)
    statistics pooling over time (mean, std)               -> 2 * 8m * F/8  (5120 for F = 80)
    Linear                                                 -> E (256)
With F = 80, m = 32 and E = 256 this has WeSpeaker's 6.63M parameters (tests/test_resnet_campp.py).

Padding invariance: every 3x3 conv is zero-padded by one, so the last valid frame of an
utterance reads one frame past its end. Alone, that frame is the conv's own zero padding; in a
padded batch it is whatever the previous layer left there (BatchNorm's shift makes padding
non-zero). So every block's input and the tensor inside it are multiplied by the frame mask
of their own time resolution: beyond the valid length everything is zero, exactly as the lone
utterance's conv padding. A stride-2 conv (kernel 3, padding 1, or the 1x1 shortcut) maps
frames [0, n) to [0, ceil(n/2)), output j reading inputs 2j-1..2j+1, so the valid region of
the lone and of the batched utterance stay aligned at every stage. Pooling sees valid frames
only (models/pooling.py). Eval-mode BatchNorm is per element, so it cannot mix frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .options import key
from .pooling import POOLINGS, frame_mask

BLOCKS = (3, 4, 6, 3)  # ResNet34


def halve(lengths: torch.Tensor) -> torch.Tensor:
    """Valid frames after a stride-2 conv with kernel 3 / padding 1 (or 1x1): ceil(n / 2)."""
    return torch.div(lengths + 1, 2, rounding_mode="floor")


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the (projected) input, ReLU; zero on padding in and out."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, F, T) zero on padding; mask (B, 1, 1, T') at the output's resolution."""
        out = F.relu(self.bn1(self.conv1(x))) * mask  # zeroed before conv2 reads across the valid end
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) * mask


class ResNet34(nn.Module):
    @dataclass
    class Options:
        name: str = "resnet34"
        channels: int = key(32, "base channels m (WeSpeaker: 32); stages have m, 2m, 4m, 8m")
        embed_dim: int = key(256, "speaker embedding size (WeSpeaker: 256)")
        pooling: str = key("stats", "stats (WeSpeaker's TSTP) | attentive (models.pooling.POOLINGS)")

    def __init__(self, input_dim: int, opts: Options):
        super().__init__()
        if opts.pooling not in POOLINGS:
            raise ValueError(f"downstream.pooling must be one of {', '.join(POOLINGS)}, got {opts.pooling!r}")
        m = opts.channels
        self.conv1 = nn.Conv2d(1, m, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        stages, in_ch = [], m
        for i, n in enumerate(BLOCKS):
            out_ch, stride = m * 2 ** i, 1 if i == 0 else 2
            stages.append(nn.ModuleList(BasicBlock(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1)
                                        for j in range(n)))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        freq = input_dim
        for _ in BLOCKS[1:]:
            freq = (freq + 1) // 2  # each stride-2 stage halves the frequency axis too
        self.pool = POOLINGS[opts.pooling](in_ch * freq)
        self.embedding = nn.Linear(self.pool.out_dim, opts.embed_dim)
        self.context = 0  # "same" convs: no frames lost (models.min_input_samples reads this)
        self.embed_dim = opts.embed_dim

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, T, F), lengths (B,) valid frames -> (B, embed_dim)."""
        lengths = lengths.clamp(min=1, max=feats.shape[1])
        mask = frame_mask(lengths, feats.shape[1])[:, None, None, :].to(feats.dtype)  # (B, 1, 1, T)
        x = F.relu(self.bn1(self.conv1(feats.transpose(1, 2).unsqueeze(1) * mask))) * mask  # (B, m, F, T)
        for i, stage in enumerate(self.stages):
            if i > 0:  # the first block of stages 2-4 has stride 2
                lengths = halve(lengths)
                mask = frame_mask(lengths, (x.shape[-1] + 1) // 2)[:, None, None, :].to(x.dtype)
            for block in stage:
                x = block(x, mask)
        x = x.flatten(1, 2)  # (B, 8m * F/8, T/8): frequency folded into channels
        return self.embedding(self.pool(x, lengths))  # (B, E)
