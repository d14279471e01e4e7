"""Margin softmax heads over the training speakers (training only; evaluation never needs them).

AM-softmax (CosFace, SUPERB):    logit_y = s * (cos(theta_y) - m)
AAM-softmax (ArcFace):           logit_y = s * cos(theta_y + m)
Both return the loss and the margin-free cosine logits, so accuracy is measured without
the margin (what the model would predict).

A new margin loss is one subclass with its own `target_logit` plus one row in models.LOSSES;
`loss.name` then accepts it and its keys (margin, scale, sub_centers) are the shared ones.

Sub-centers (Deng et al., 2020, sub-center ArcFace): each class has K centres and its
cosine is the largest over them, so a noisy or multi-modal speaker need not pull all its
utterances onto one centre. K = 1 is the plain head.

`margin` is a plain attribute read at every call, so the training loop may change it
between steps (a margin schedule) without rebuilding the head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MarginSoftmax(nn.Module):
    """Normalised class centres, sub-centres and the cross-entropy; subclasses put the margin on the target."""

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.4, scale: float = 30.0,
                 sub_centers: int = 1):
        super().__init__()
        if sub_centers < 1:
            raise ValueError(f"sub_centers must be >= 1, got {sub_centers}")
        self.margin, self.scale = margin, scale
        self.num_classes, self.sub_centers = num_classes, sub_centers
        # row c * K + k is sub-center k of class c (K = 1: one row per class)
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, embed_dim))
        nn.init.xavier_normal_(self.weight)

    def target_logit(self, target: torch.Tensor, m: float) -> torch.Tensor:
        """cos(theta_y) (B, 1) -> the target's logit with the margin m, before the scale."""
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, labels: torch.Tensor):
        """emb (B, E), labels (B,) -> (loss, cosine logits (B, num_classes)), always in float32.

        Autocast is switched off here: under CUDA's autocast `acos` runs in fp32 while `F.linear`
        gives bf16 cosines, which `scatter` refuses to mix, and bf16 cosines (8 bits of mantissa)
        blur a margin of 0.2 at a scale of 30."""
        with torch.autocast(emb.device.type, enabled=False):
            cosine = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))  # (B, N * K)
            if self.sub_centers > 1:  # a class is as close as its closest sub-center
                cosine = cosine.view(-1, self.num_classes, self.sub_centers).amax(-1)  # (B, N)
            target = cosine.gather(1, labels[:, None])  # (B, 1)
            m = float(self.margin)  # read now: the training loop may have changed it since the last step
            logits = cosine.scatter(1, labels[:, None], self.target_logit(target, m))
            return F.cross_entropy(self.scale * logits, labels), cosine


class AMSoftmax(MarginSoftmax):
    """Additive margin on the cosine (CosFace): SUPERB's head."""

    def target_logit(self, target, m):
        return target - m


class AAMSoftmax(MarginSoftmax):
    """Additive angular margin (ArcFace)."""

    def target_logit(self, target, m):
        theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
        # past pi - m, cos(theta + m) would rise again; keep the penalty monotonic there (ArcFace)
        return torch.where(theta + m < math.pi, torch.cos(theta + m), target - m * math.sin(m))
