"""The model, in pieces (see README's data flow):

    waveform -> Upstream -> hidden states -> SpeakerEncoder(WeightedSum -> downstream) -> embedding
                                                                 training only: -> MarginSoftmax

The upstream is kept apart from the trained part: a frozen upstream is never wrapped
for distributed training, never given to the optimizer and never saved in checkpoints.

Downstreams: DOWNSTREAMS maps `downstream.name` to a class. Each class declares its own config
keys as a nested `Options` dataclass and is built as `cls(input_dim, options)`; the config
refuses keys that are not its own. A new downstream is one file here plus one row below.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .campplus import CAMPPlus
from .ecapa import ECAPA
from .featurizer import WeightedSum
from .heads import AAMSoftmax, AMSoftmax, MarginSoftmax
from .pooling import POOLINGS
from .resnet import ResNet34
from .scoring import asnorm_scores, cohort_stats, cosine_scores
from .superb_xvector import SuperbXvector
from .upstream import UPSTREAMS, build_upstream, run_chunked
from .xvector_bn import XVectorBN

DOWNSTREAMS = {
    "superb_xvector": SuperbXvector,  # SUPERB's x-vector, exactly as s3prl builds it
    "xvector_bn": XVectorBN,          # the same TDNN with BatchNorm: learns fast from scratch
    "ecapa": ECAPA,                   # ECAPA-TDNN
    "resnet34": ResNet34,             # WeSpeaker's ResNet34 (32 base channels) on filterbanks
    "campplus": CAMPPlus,             # 3D-Speaker's CAM++ on filterbanks
}

LOSSES = {  # loss.name -> margin head (models/heads.py)
    "amsoftmax": AMSoftmax,    # cos - m (CosFace): SUPERB's
    "aamsoftmax": AAMSoftmax,  # cos(theta + m) (ArcFace)
}

__all__ = ["DOWNSTREAMS", "LOSSES", "POOLINGS", "UPSTREAMS", "Extractor", "MarginSoftmax", "SpeakerEncoder", "WeightedSum",
           "asnorm_scores", "build_encoder", "build_head", "build_upstream", "cohort_stats", "cosine_scores", "load_model_file",
           "min_input_samples", "model_meta", "run_chunked", "save_model_file"]


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


def build_head(embed_dim: int, num_classes: int, loss) -> MarginSoftmax:
    """The margin head that config section `loss` names: the one place a head is built."""
    return LOSSES[loss.name](embed_dim, num_classes, loss.margin, loss.scale, loss.sub_centers)


def build_encoder(upstream: nn.Module, downstream_options, normalize: bool = False) -> SpeakerEncoder:
    """Featurizer + downstream, sized from the upstream's num_layers and hidden_size."""
    featurizer = WeightedSum(upstream.num_layers, upstream.hidden_size, normalize)
    downstream = DOWNSTREAMS[downstream_options.name](upstream.hidden_size, downstream_options)
    return SpeakerEncoder(featurizer, downstream)


class Extractor(nn.Module):
    """Upstream + SpeakerEncoder behind one forward: wav (B, T) + lengths (B,) -> embeddings (B, E)."""

    def __init__(self, upstream: nn.Module, encoder: SpeakerEncoder):
        super().__init__()
        self.upstream, self.encoder = upstream, encoder

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden, frames = self.upstream(wav, lengths)  # [(B, T', D)] * L, (B,)
        return self.encoder(hidden, frames)  # (B, E)


def min_input_samples(upstream: nn.Module, encoder: SpeakerEncoder) -> int:
    """Shortest waveform that yields at least one pooled frame (shorter inputs are repeated)."""
    frames = encoder.downstream.context + 1
    return upstream.min_samples + (frames - 1) * upstream.hop


def model_meta(upstream_name: str, layers: list[int], downstream_options) -> dict:
    """What a model file records of its architecture, and what loading it checks against the config."""
    return {"upstream": upstream_name, "layers": list(layers), "downstream": dataclasses.asdict(downstream_options)}


def save_model_file(path: str, encoder: nn.Module, upstream: nn.Module, trainable_upstream: bool, meta: dict,
                    head: nn.Module | None = None):
    """The file evaluation loads: the trained parts only (a frozen upstream is rebuilt from its source).
    The head rides along for fine-tuning (train.init_from); evaluation ignores it. Written by the
    caller into a folder that is renamed once complete."""
    state = {"encoder": encoder.state_dict(), "meta": meta}
    if head is not None:
        state["head"] = head.state_dict()
    if trainable_upstream:  # LoRA on a rebuildable upstream: its adapters only (SSLUpstream.trained_state)
        state["upstream"] = upstream.trained_state() if hasattr(upstream, "trained_state") else upstream.state_dict()
    torch.save(state, path)


def load_model_file(path: str, encoder: nn.Module, upstream: nn.Module, meta: dict, head: nn.Module | None = None):
    """Load weights saved by save_model_file; a checkpoint from another config fails with one line naming the key."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such model file") from None
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "encoder" not in state:
        raise ValueError(f"{path}: not a model file written by train_asv.py (no encoder weights)")
    saved = state.get("meta", {})
    for key, value in _flat(meta).items():
        if _flat(saved).get(key) != value:
            raise ValueError(f"{path}: checkpoint has {key}={_flat(saved).get(key)!r} but the config has {value!r}")
    try:
        encoder.load_state_dict(state["encoder"])
        if "upstream" in state:
            saved = state["upstream"]
            adapters = {k for k in upstream.state_dict() if "lora_" in k}
            if saved and all("lora_" in k for k in saved):  # adapters only: the base came from its source
                if set(saved) != adapters:
                    raise ValueError(f"{path}: its LoRA adapters do not match the config's (upstream.lora_rank, "
                                     "featurizer.layer_selections)")
                upstream.load_state_dict(saved, strict=False)
            else:
                upstream.load_state_dict(saved)
        if head is not None:
            if "head" not in state:
                raise ValueError(f"{path}: holds no speaker head to start from")
            head.load_state_dict(state["head"])
    except RuntimeError as e:  # a shape the meta does not describe (e.g. another upstream.ckpt's hidden size)
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{path}: checkpoint does not match the config: {first}") from None
    return saved


def _flat(meta: dict) -> dict:
    """{'downstream.channels': 512, ...}: meta keys named as the config names them."""
    out = {k: v for k, v in meta.items() if k != "downstream"}
    out["upstream.name"] = out.pop("upstream", None)
    out["featurizer.layer_selections"] = out.pop("layers", None)
    out.update({f"downstream.{k}": v for k, v in meta.get("downstream", {}).items()})
    return out
