"""CAM++ (Wang et al., Interspeech 2023), as 3D-Speaker sizes it (`speakerlab/models/campplus/DTDNN.py`):
frames (B, T, F) + lengths -> embedding (B, E).

    front-end (FCM): 2D ResNet on the filterbank image       (B, 1, F, T) -> (B, 32, F/8, T)
        3x3 conv; 2 x 2 BasicBlocks (the first of each halving F); 3x3 conv halving F
    TDNN k=5, stride 2 in time                              32 * F/8 -> 128, T -> T/2
    3 dense TDNN blocks of CAM layers (12, 24, 16 layers, growth 32, dilation 1/2/2),
        each followed by a transit 1x1 conv halving the channels
    BN-ReLU, statistics pooling, 1x1 "dense" layer + BN without affine   -> E (512)
A CAM layer: BN-ReLU -> 1x1 conv (4 x growth) -> BN-ReLU -> k=3 conv (growth), gated by a
sigmoid of the utterance mean plus its 100-frame segment means (context-aware masking).
With F = 80 and E = 512 this has 3D-Speaker's 7.18M parameters (tests/test_resnet_campp.py).

Padding invariance: the time axis is only mixed by the front-end's 3x3 convs, the TDNN and the
CAM layers' k=3 convs, and by the CAM context. Each of those convs reads a masked input (zero
beyond the valid length, as a lone utterance's conv padding); the stride-2 TDNN (kernel 5,
padding 2) maps frames [0, n) to [0, ceil(n/2)), so the valid region stays aligned. The CAM
context takes its utterance mean and its segment means over valid frames only (a segment
that the utterance ends inside averages its valid frames, as the lone utterance's last, short
segment does). Everything else (BN in eval mode, ReLU, 1x1 convs) is per frame. Pooling sees
valid frames only (models/pooling.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .options import key
from .pooling import POOLINGS, frame_mask
from .resnet import BasicBlock, halve

SEGMENT = 100  # frames per CAM segment (3D-Speaker: seg_len 100)


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(channels), nn.ReLU())


class FrontEnd(nn.Module):
    """FCM: a small 2D ResNet whose strides halve frequency only; time keeps its resolution."""

    def __init__(self, input_dim: int, m: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, m, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        self.blocks = nn.ModuleList([BasicBlock(m, m, (2, 1)), BasicBlock(m, m, 1),
                                     BasicBlock(m, m, (2, 1)), BasicBlock(m, m, 1)])
        self.conv2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m)
        freq = input_dim
        for _ in range(3):
            freq = (freq + 1) // 2
        self.out_dim = m * freq

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, F, T) zero on padding, mask (B, 1, T) -> (B, m * F/8, T) zero on padding."""
        mask2d = mask.unsqueeze(1)  # (B, 1, 1, T)
        x = F.relu(self.bn1(self.conv1(x.unsqueeze(1)))) * mask2d
        for block in self.blocks:
            x = block(x, mask2d)
        x = F.relu(self.bn2(self.conv2(x))) * mask2d
        return x.flatten(1, 2)


class CAMLayer(nn.Module):
    """One dense-TDNN layer: BN-ReLU, 1x1 bottleneck, BN-ReLU, k=3 conv gated by the utterance context."""

    def __init__(self, in_ch: int, growth: int, bottleneck: int, dilation: int, reduction: int = 2):
        super().__init__()
        self.pre = bn_relu(in_ch)
        self.bottleneck = nn.Conv1d(in_ch, bottleneck, 1, bias=False)
        self.mid = bn_relu(bottleneck)
        self.local = nn.Conv1d(bottleneck, growth, 3, padding=dilation, dilation=dilation, bias=False)
        self.gate = nn.Sequential(nn.Conv1d(bottleneck, bottleneck // reduction, 1), nn.ReLU(),
                                  nn.Conv1d(bottleneck // reduction, growth, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """x (B, C, T), mask (B, 1, T) float, seg (B, 1, S) valid frames per segment -> (B, growth, T)."""
        h = self.mid(self.bottleneck(self.pre(x))) * mask  # zeroed before the k=3 conv and the context
        n = mask.sum(-1, keepdim=True)  # (B, 1, 1) valid frames
        B, C, T = h.shape
        S = seg.shape[-1]
        seg_sum = F.pad(h, (0, S * SEGMENT - T)).view(B, C, S, SEGMENT).sum(-1)  # (B, C, S)
        seg_mean = (seg_sum / seg.clamp(min=1)).repeat_interleave(SEGMENT, dim=-1)[..., :T]  # (B, C, T)
        context = h.sum(-1, keepdim=True) / n + seg_mean  # utterance mean + its segment's mean
        return self.local(h) * self.gate(context) * mask


class CAMBlock(nn.Module):
    """Dense connectivity: each layer's output is appended to the channels the next layers read."""

    def __init__(self, layers: int, in_ch: int, growth: int, bottleneck: int, dilation: int):
        super().__init__()
        self.layers = nn.ModuleList(CAMLayer(in_ch + i * growth, growth, bottleneck, dilation) for i in range(layers))

    def forward(self, x, mask, seg):
        for layer in self.layers:
            x = torch.cat([x, layer(x, mask, seg)], dim=1)
        return x


class CAMPPlus(nn.Module):
    @dataclass
    class Options:
        name: str = "campplus"
        embed_dim: int = key(512, "speaker embedding size (3D-Speaker's VoxCeleb recipe: 512)")
        init_channels: int = key(128, "the TDNN's output, before the dense blocks")
        growth: int = key(32, "channels each CAM layer adds")
        pooling: str = key("stats", "stats (3D-Speaker's) | attentive (models.pooling.POOLINGS)")

    def __init__(self, input_dim: int, opts: Options):
        super().__init__()
        if opts.pooling not in POOLINGS:
            raise ValueError(f"downstream.pooling must be one of {', '.join(POOLINGS)}, got {opts.pooling!r}")
        self.front = FrontEnd(input_dim)
        self.tdnn = nn.Conv1d(self.front.out_dim, opts.init_channels, 5, stride=2, padding=2, bias=False)
        self.tdnn_act = bn_relu(opts.init_channels)
        blocks, transits, c = [], [], opts.init_channels
        for layers, dilation in zip((12, 24, 16), (1, 2, 2)):
            blocks.append(CAMBlock(layers, c, opts.growth, 4 * opts.growth, dilation))
            c += layers * opts.growth
            transits.append(nn.Sequential(bn_relu(c), nn.Conv1d(c, c // 2, 1, bias=False)))
            c //= 2
        self.blocks, self.transits = nn.ModuleList(blocks), nn.ModuleList(transits)
        self.out_act = bn_relu(c)
        self.pool = POOLINGS[opts.pooling](c)
        self.embedding = nn.Linear(self.pool.out_dim, opts.embed_dim, bias=False)
        self.embed_bn = nn.BatchNorm1d(opts.embed_dim, affine=False)
        for m in self.modules():  # 3D-Speaker's initialisation of the 1D convs and linears
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.context = 0  # "same" convs: no frames lost (models.min_input_samples reads this)
        self.embed_dim = opts.embed_dim

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, T, F), lengths (B,) valid frames -> (B, embed_dim)."""
        lengths = lengths.clamp(min=1, max=feats.shape[1])
        mask = frame_mask(lengths, feats.shape[1]).unsqueeze(1).to(feats.dtype)  # (B, 1, T)
        x = self.front(feats.transpose(1, 2) * mask, mask)  # (B, 32 F/8, T)
        lengths = halve(lengths)  # the stride-2 TDNN: ceil(n / 2) frames
        T = (x.shape[-1] + 1) // 2
        mask = frame_mask(lengths, T).unsqueeze(1).to(x.dtype)
        x = self.tdnn_act(self.tdnn(x))  # the TDNN read zero padding: its input was masked
        segments = -(-T // SEGMENT)
        starts = torch.arange(segments, device=x.device) * SEGMENT
        seg = (lengths.view(-1, 1) - starts).clamp(0, SEGMENT).view(-1, 1, segments).to(x.dtype)  # (B, 1, S)
        for block, transit in zip(self.blocks, self.transits):
            x = transit(block(x, mask, seg))  # per frame after the block: no re-mask needed
        return self.embed_bn(self.embedding(self.pool(self.out_act(x), lengths)))  # (B, E)
