"""Margin softmax heads over the training speakers (training only; evaluation never needs them).

AM-softmax (CosFace, SUPERB):    logit_y = s * (cos(theta_y) - m)
AAM-softmax (ArcFace):           logit_y = s * cos(theta_y + m)
Both return the loss and the margin-free cosine logits, so accuracy is measured without
the margin (what the model would predict).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MarginSoftmax(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, kind: str = "amsoftmax", margin: float = 0.4,
                 scale: float = 30.0):
        super().__init__()
        if kind not in ("amsoftmax", "aamsoftmax"):
            raise ValueError(f"unknown loss '{kind}' (choose amsoftmax or aamsoftmax)")
        self.kind, self.margin, self.scale = kind, margin, scale
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_normal_(self.weight)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor):
        """emb (B, E), labels (B,) -> (loss, cosine logits (B, num_classes))."""
        cosine = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))  # (B, N)
        target = cosine.gather(1, labels[:, None])  # (B, 1)
        if self.kind == "amsoftmax":
            target_m = target - self.margin
        else:
            theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
            # past pi - m, cos(theta + m) would rise again; keep the penalty monotonic there (ArcFace)
            target_m = torch.where(theta + self.margin < math.pi, torch.cos(theta + self.margin),
                                   target - self.margin * math.sin(self.margin))
        logits = cosine.scatter(1, labels[:, None], target_m)
        return F.cross_entropy(self.scale * logits, labels), cosine
