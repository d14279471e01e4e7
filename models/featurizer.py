"""Weighted sum of upstream layers (SUPERB's featurizer): softmax(w) over L hidden states.

As s3prl's Featurizer: weights start equal (zeros before the softmax), `normalize` applies a
layer norm without learned scale to every layer first, and a single layer passes through.
Which layers come in is the upstream's business (featurizer.layer_selections): the upstream
stops at the deepest selected layer and hands over the selected ones only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightedSum(nn.Module):
    """[(B, T, D)] * L -> (B, T, D). One layer passes through untouched (no parameters)."""

    def __init__(self, num_layers: int, hidden_size: int, normalize: bool = False):
        super().__init__()
        self.num_layers, self.hidden_size, self.normalize = num_layers, hidden_size, normalize
        if num_layers > 1:
            self.weights = nn.Parameter(torch.zeros(num_layers))  # equal weights at the start

    def forward(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        if len(hidden) != self.num_layers:
            raise ValueError(f"featurizer expects {self.num_layers} layers, got {len(hidden)}")
        if self.num_layers == 1:
            return hidden[0]
        stacked = torch.stack(hidden, dim=0)  # (L, B, T, D)
        if self.normalize:  # per frame, so padding frames cannot affect valid ones
            stacked = F.layer_norm(stacked, (self.hidden_size,))
        w = F.softmax(self.weights, dim=0).to(stacked.dtype)
        return torch.einsum("l,lbtd->btd", w, stacked)

    def layer_weights(self) -> list[float]:
        """The learned softmax weights, for reports and logs (which layers carry speaker identity)."""
        if self.num_layers == 1:
            return [1.0]
        return F.softmax(self.weights.detach().float(), dim=0).tolist()
