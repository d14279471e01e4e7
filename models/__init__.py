"""The model, in pieces (see DESIGN.md):

    waveform -> Upstream -> hidden states -> SpeakerEncoder(WeightedSum -> XVector | ECAPA) -> embedding
                                                                  training only: -> MarginSoftmax

The upstream is kept apart from the trained part: a frozen upstream is never wrapped
for distributed training, never given to the optimizer and never saved in checkpoints.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .featurizer import WeightedSum
from .heads import MarginSoftmax
from .scoring import asnorm_scores, cohort_stats, cosine_scores
from .upstream import UPSTREAMS, build_upstream, run_chunked
from .ecapa import ECAPA
from .xvector import XVector


class SpeakerEncoder(nn.Module):
    """Upstream hidden states [(B, T, D)] * L + frame lengths (B,) -> embeddings (B, E)."""

    def __init__(self, featurizer: WeightedSum, downstream: nn.Module):
        super().__init__()
        self.featurizer, self.downstream = featurizer, downstream
        self.feature_augment = None  # training only: e.g. SpecAugment, (B, T, D), lengths -> (B, T, D)

    def forward(self, hidden: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        feats = self.featurizer(hidden)  # (B, T, D)
        if self.training and self.feature_augment is not None:
            feats = self.feature_augment(feats, lengths)
        return self.downstream(feats, lengths)


def build_encoder(cfg, upstream: nn.Module) -> SpeakerEncoder:
    """cfg: config.Config. Sizes itself from the upstream's num_layers and hidden_size."""
    d = cfg.downstream
    featurizer = WeightedSum(upstream.num_layers, upstream.hidden_size, cfg.featurizer.layer_norm)
    if d.name == "ecapa":
        downstream = ECAPA(upstream.hidden_size, d.channels, d.embed_dim)
    else:
        downstream = XVector(upstream.hidden_size, d.proj_dim, d.channels, d.stats_dim, d.embed_dim)
    return SpeakerEncoder(featurizer, downstream)


def min_input_samples(upstream: nn.Module, encoder: SpeakerEncoder) -> int:
    """Shortest waveform that yields at least one pooled frame (shorter inputs are repeated)."""
    frames = encoder.downstream.context + 1
    return upstream.min_samples + (frames - 1) * upstream.hop


def save_model_file(path: str, encoder: nn.Module, upstream: nn.Module, trainable_upstream: bool, meta: dict,
                    head: nn.Module | None = None):
    """The file evaluation loads: the trained parts only (a frozen upstream is rebuilt from its source).
    The head rides along for fine-tuning (train.init_from); evaluation ignores it."""
    state = {"encoder": encoder.state_dict(), "meta": meta}
    if head is not None:
        state["head"] = head.state_dict()
    if trainable_upstream:
        state["upstream"] = upstream.state_dict()
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_model_file(path: str, encoder: nn.Module, upstream: nn.Module, meta: dict, head: nn.Module | None = None):
    """Load weights saved by save_model_file; a checkpoint from another config fails with one clear line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "encoder" not in state:
        raise ValueError(f"{path}: not a model file written by train_asv.py (no encoder weights)")
    saved = state.get("meta", {})
    for key in ("upstream", "downstream", "embed_dim"):
        if saved.get(key) != meta.get(key):
            raise ValueError(f"{path}: checkpoint has {key}={saved.get(key)!r} but the config has {meta.get(key)!r}")
    try:
        encoder.load_state_dict(state["encoder"])
        if "upstream" in state:
            upstream.load_state_dict(state["upstream"])
        if head is not None:
            if "head" not in state:
                raise RuntimeError("it holds no speaker head")
            head.load_state_dict(state["head"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: checkpoint does not match the config ({detail})") from None
    return saved
