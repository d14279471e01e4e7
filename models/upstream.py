"""Upstreams: waveform (B, T) + lengths -> hidden states [(B, T', D)] * L + frame lengths (B,).

- `fbank`, `mfcc`: s3prl's baseline features, computed as s3prl computes them, one utterance at
  a time: Kaldi filterbank (80 bands) or MFCC (13) from torchaudio.compliance.kaldi, first and
  second deltas, then mean and variance normalisation over the utterance.
- `logmel`: log mel filterbank in torch, batched, mean-normalised per utterance (cheaper; what
  the fast recipes use).
- the self-supervised models: torchaudio's wav2vec 2.0 / HuBERT / WavLM implementations, loaded
  from the torchaudio bundle (downloaded once into the torch hub cache), from weights already on
  disk (`upstream.ckpt`, see ssl_weights.py), or built with random weights (`upstream.random_init`).
Every upstream exposes `num_layers` (the layers it returns), `hidden_size`, `hop` (input samples
per frame) and `min_samples`, so what follows sizes itself from it.

Padding invariance: frames are cut without centring, so frame t only sees samples
[t*hop, t*hop + win), and every normalisation runs over an utterance's valid frames. That includes
the group norm of the Base SSL models' first convolution (wav2vec 2.0 / HuBERT / WavLM Base and
Base+), which torchaudio and s3prl compute over the whole padded length: here its statistics come
from each utterance's own frames, so an embedding is the same alone and in any batch.
`padded_group_norm=True` keeps s3prl's padded statistics (for parity with s3prl's training batches).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torchaudio
import torchaudio.compliance.kaldi as kaldi
from torch.utils.checkpoint import checkpoint

from .pooling import frame_mask


def masked_group_norm(x: torch.Tensor, frames: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """nn.GroupNorm over the first `frames[b]` frames of each row of x (B, C, T), as if each row were alone.

    Statistics in float32 (as autocast runs group norm), mean first then the centred variance (biased, as
    GroupNorm's); the masked sums are matrix products with the frame mask, so the only full-size temporaries
    are the centred copy (normalised in place when no gradient is kept) and one product. No host sync: mask and counts stay on the
    device. Frames past `frames[b]` are normalised with the row's statistics too; nothing valid depends on
    them (the convolutions after it have no padding).
    """
    b, c, t = x.shape
    g = norm.num_groups
    mask = frame_mask(frames, t).float()  # (B, T)
    xf = x.float().view(b, g, c // g, t)
    count = (frames.clamp(min=1).float() * (c // g)).view(b, 1)  # (B, 1) values per group
    mean = torch.einsum("bgct,bt->bg", xf, mask) / count  # (B, G)
    centred = xf - mean.view(b, g, 1, 1)
    var = torch.einsum("bgct,bgct,bt->bg", centred, centred, mask) / count
    scale = torch.rsqrt(var + norm.eps).view(b, g, 1, 1)
    if torch.is_grad_enabled():  # autograd keeps `centred` for the variance's gradient: no in-place steps
        y = (centred * scale).view(b, c, t)
        return (y * norm.weight.view(1, c, 1) + norm.bias.view(1, c, 1) if norm.affine else y).to(x.dtype)
    y = centred.mul_(scale).view(b, c, t)
    if norm.affine:
        y = y.mul_(norm.weight.float().view(1, c, 1)).add_(norm.bias.float().view(1, c, 1))
    return y.to(x.dtype)
from .ssl_weights import SSL_BUNDLES, build_architecture, load_checkpoint

FEATURES = ("fbank", "mfcc", "logmel")  # computed in torch from the waveform: one layer, no weights
UPSTREAMS = (*FEATURES, *SSL_BUNDLES)


class KaldiUpstream(nn.Module):
    """s3prl's `fbank` / `mfcc`: Kaldi features + deltas + CMVN, per utterance (25 ms windows, 10 ms hop)."""

    def __init__(self, kind: str, sample_rate: int, n_mels: int = 80, n_mfcc: int = 13):
        super().__init__()
        self.kind, self.sample_rate, self.n_mels, self.n_mfcc = kind, sample_rate, n_mels, n_mfcc
        self.win, self.hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
        self.deltas = torchaudio.transforms.ComputeDeltas(win_length=5)
        self.hidden_size = 3 * (n_mels if kind == "fbank" else n_mfcc)
        self.num_layers, self.min_samples = 1, self.win

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """(T,) -> (frames, 3F): static, delta, delta-delta, normalised over the utterance."""
        common = dict(sample_frequency=self.sample_rate, frame_length=25.0, frame_shift=10.0)
        if self.kind == "fbank":
            x = kaldi.fbank(wav.view(1, -1), num_mel_bins=self.n_mels, use_log_fbank=True, **common)
        else:
            x = kaldi.mfcc(wav.view(1, -1), num_ceps=self.n_mfcc, **common)
        d1 = self.deltas(x.T).T  # ComputeDeltas works along the last axis: time
        d2 = self.deltas(d1.T).T
        x = torch.cat([x, d1, d2], dim=-1)
        return (x - x.mean(0, keepdim=True)) / (1e-10 + x.std(0, keepdim=True))

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor):
        with torch.autocast(wavs.device.type, enabled=False):  # features in fp32 even under mixed precision
            feats = [self.features(w[:n].float()) for w, n in zip(wavs, lengths.tolist())]
        frames = torch.tensor([len(f) for f in feats], device=wavs.device)
        return [nn.utils.rnn.pad_sequence(feats, batch_first=True)], frames  # [(B, T', 3F)], (B,)


class LogMelUpstream(nn.Module):
    """Log mel filterbank, batched, 25 ms windows every 10 ms, mean-normalised per utterance."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80):
        super().__init__()
        self.win, self.hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=self.win, win_length=self.win, hop_length=self.hop, n_mels=n_mels, center=False,
            window_fn=torch.hamming_window, f_min=20.0)
        self.hidden_size, self.num_layers, self.min_samples = n_mels, 1, self.win

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor):
        with torch.autocast(wavs.device.type, enabled=False):  # spectra in fp32 even under mixed precision
            feats = torch.log(self.transform(wavs.float()) + 1e-6).transpose(1, 2)  # (B, T', F)
            frames = (torch.div(lengths - self.win, self.hop, rounding_mode="floor") + 1).clamp(0, feats.shape[1])
            mask = frame_mask(frames, feats.shape[1]).unsqueeze(-1)  # (B, T', 1)
            mean = (feats * mask).sum(1, keepdim=True) / frames.clamp(min=1).view(-1, 1, 1)  # valid frames only
            feats = (feats - mean) * mask
        return [feats], frames


class SSLUpstream(nn.Module):
    """A torchaudio wav2vec 2.0 / HuBERT / WavLM model returning the transformer input (layer 0,
    as s3prl counts it) and each transformer layer's output, or only the `layers` asked for: it
    then stops after the deepest of them, so the layers above cost nothing."""

    def __init__(self, name: str, ckpt: str = "", random_init: bool = False, arch: dict | None = None,
                 layers: list[int] | None = None, padded_group_norm: bool = False):
        super().__init__()
        bundle = SSL_BUNDLES[name]
        normalize = None  # None: the bundle's setting
        if ckpt:
            self.model, normalize = load_checkpoint(ckpt, name, arch or {})
        elif random_init:
            self.model = build_architecture(name, {**bundle._params, **(arch or {})})
        else:
            try:
                self.model = bundle.get_model()
            except Exception as e:  # no network, no cache: say how to proceed
                reason = " ".join(str(e).split())[:160]
                raise ValueError(f"cannot download the {name} weights ({type(e).__name__}: {reason}); "
                                 "set upstream.ckpt to a local weights file or upstream.random_init=true") from None
        self.is_wavlm = name.startswith("wavlm")
        self.random_init, self.lora_rank = random_init and not ckpt, 0
        # fine-tuning: keep each transformer layer's input only and recompute the layer in backward (the
        # RNG state is kept, so dropout draws the same masks and the gradients are the same)
        self.grad_checkpointing = False
        # large LV60K / XLS-R / WavLM Large expect zero-mean unit-variance input; a checkpoint's own setting wins
        self.normalize_waveform = bundle._normalize_waveform if normalize is None else normalize
        # sizes from the model itself: a checkpoint's own config may be larger than the bundle upstream.name names
        convs = [layer.conv for layer in self.model.feature_extractor.conv_layers]
        total = len(self.model.encoder.transformer.layers) + 1
        self.layers = sorted(set(layers)) if layers else list(range(total))
        if self.layers[-1] >= total:
            raise ValueError(f"featurizer.layer_selections names layer {self.layers[-1]}, but {name} has layers "
                             f"0-{total - 1}")
        self.num_layers = len(self.layers)
        self.hidden_size = self.model.encoder.feature_projection.projection.out_features
        self.hop = math.prod(conv.stride[0] for conv in convs)
        receptive = 1
        for conv in reversed(convs):
            receptive = (receptive - 1) * conv.stride[0] + conv.kernel_size[0]
        self.min_samples = receptive
        # Base models' first conv block normalises with a GroupNorm over time; Large ones have per-frame layer norms
        first = self.model.feature_extractor.conv_layers[0].layer_norm
        self.masked_group_norm = isinstance(first, nn.GroupNorm) and not padded_group_norm

    def conv_features(self, wavs: torch.Tensor, lengths: torch.Tensor):
        """torchaudio's FeatureExtractor, its first group norm over each utterance's own frames: (B, T', C), (B,).

        The first conv (one input channel) is one matrix product over the unfolded waveform: the same sums
        as conv1d, whose one-channel case is slow on CPU (3 s of audio, one thread: 22 ms against 3 ms)."""
        x, frames = wavs.unsqueeze(1), lengths
        for i, block in enumerate(self.model.feature_extractor.conv_layers):
            if i == 0:
                conv = block.conv
                x = conv.weight.view(conv.out_channels, -1) @ x.unfold(-1, conv.kernel_size[0], conv.stride[0])[:, 0].transpose(1, 2)
                if conv.bias is not None:
                    x = x + conv.bias.view(1, -1, 1)
                frames = (torch.div(lengths - block.kernel_size, block.stride, rounding_mode="floor") + 1).clamp(min=0)
                if self.masked_group_norm:
                    x = masked_group_norm(x, frames, block.layer_norm)
                elif block.layer_norm is not None:
                    x = block.layer_norm(x)
                x = nn.functional.gelu(x)
            else:
                x, frames = block(x, frames)
        return x.transpose(1, 2), frames

    def freeze_unused(self):
        """Fine-tuning: what never learns gets no gradient. The CNN feature extractor stays frozen (as every
        peer keeps it); the transformer layers above the deepest selected one are never run, and neither is
        the final layer norm where torchaudio applies it after the last layer (`layer_norm_first` False:
        its _preprocess applies it only when True). Frozen, they are outside the optimizer and outside
        DDP's reducer, which otherwise waits for their gradients and fails at the next synced step."""
        transformer = self.model.encoder.transformer
        self.model.feature_extractor.requires_grad_(False)
        transformer.layers[self.layers[-1]:].requires_grad_(False)
        if not transformer.layer_norm_first:
            transformer.layer_norm.requires_grad_(False)

    def add_lora(self, rank: int, alpha: float):
        """LoRA adapters (peft) on the transformer layers that run; everything else in the model is frozen.
        wav2vec 2.0 / HuBERT: the attention's q, k, v and output projections. WavLM: torchaudio reads its
        fused q/k/v weight directly (F.linear on in_proj_weight), where no adapter can sit, so its attention
        output projection and the feed-forward's two linears carry them."""
        from peft import LoraConfig, inject_adapter_in_model  # here: only LoRA runs need peft

        if self.layers[-1] == 0:
            raise ValueError("upstream.lora_rank: featurizer.layer_selections runs no transformer layer to adapt")
        used = "|".join(str(i) for i in range(self.layers[-1]))
        modules = (r"attention\.attention\.out_proj|feed_forward\.(intermediate_dense|output_dense)" if self.is_wavlm
                   else r"attention\.(q_proj|k_proj|v_proj|out_proj)")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                           target_modules=rf"layers\.({used})\.({modules})"), self.model.encoder.transformer)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        self.lora_rank = rank

    def merge_lora(self):
        """Fold the adapters into plain weights (evaluation, export): the same module tree as without LoRA."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent, child = name.rsplit(".", 1)
                setattr(self.model.get_submodule(parent), child, module.get_base_layer())
        self.lora_rank = 0

    def trained_state(self) -> dict:
        """What a fine-tuned model file holds of the upstream: the whole of it, or, with LoRA on weights
        that can be rebuilt from their source (upstream.ckpt or the bundle), the adapters alone. A
        random-weight upstream has no source, so it is stored whole."""
        state = self.state_dict()
        if self.lora_rank and not self.random_init:
            return {k: v for k, v in state.items() if "lora_" in k}
        return state

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The parameters that learn, bottom to top: [0] what makes the transformer input (feature
        projection, positional conv, a leading layer norm), [i] transformer layer i (1..deepest selected).
        train.build_parts gives each its learning rate (optim.layer_decay)."""
        transformer = self.model.encoder.transformer
        below = [self.model.encoder.feature_projection, transformer.pos_conv_embed, transformer.layer_norm]
        groups = [[p for m in below for p in m.parameters()]]
        groups += [list(layer.parameters()) for layer in transformer.layers[:self.layers[-1]]]
        return [[p for p in g if p.requires_grad] for g in groups]

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor):
        if self.normalize_waveform:
            mask = frame_mask(lengths, wavs.shape[1])
            n = lengths.view(-1, 1).to(wavs.dtype)
            mean = (wavs * mask).sum(1, keepdim=True) / n
            var = (((wavs - mean) * mask) ** 2).sum(1, keepdim=True) / n
            wavs = (wavs - mean) / torch.sqrt(var + 1e-7) * mask
        # torchaudio's extract_features returns only the transformer layers and, for WavLM,
        # fails on padded batches; we also want the transformer input (SUPERB's layer 0),
        # so the same steps are run here with the padding mask each model family expects.
        x, frames = self.conv_features(wavs, lengths)  # (B, T', C)
        x = self.model.encoder.feature_projection(x)  # (B, T', D)
        padding = ~frame_mask(frames, x.shape[1])  # (B, T') True on padded frames
        x = x.masked_fill(padding.unsqueeze(-1), 0.0)
        masks = {}
        # additive masks, as torchaudio builds them. torch.export cannot branch on data, so an exported
        # graph always masks (a mask of zeros adds nothing); eager runs are unchanged.
        if torch.compiler.is_exporting() or padding.any():
            additive = -10000.0 * padding.to(x.dtype)  # (B, T')
            if self.is_wavlm:
                masks["key_padding_mask"] = additive
            else:
                b, t = padding.shape
                masks["attention_mask"] = additive[:, None, None, :].expand(b, 1, t, t)
        transformer = self.model.encoder.transformer
        x = transformer._preprocess(x)
        hidden, position_bias = [x], None
        for layer in transformer.layers[:self.layers[-1]]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():  # recomputed in backward
                x, position_bias = checkpoint(layer, x, position_bias=position_bias, use_reentrant=False, **masks)
            else:
                x, position_bias = layer(x, position_bias=position_bias, **masks)
            hidden.append(x)
        return [hidden[i] for i in self.layers], frames


def build_upstream(cfg, sample_rate: int, layers: list[int] = ()) -> nn.Module:
    """cfg: the upstream config section; `layers`: featurizer.layer_selections ([]: all).
    Frozen upstreams are put in eval mode with no gradients."""
    if cfg.name not in UPSTREAMS:
        raise ValueError(f"unknown upstream.name '{cfg.name}' (choose from {', '.join(UPSTREAMS)})")
    if cfg.name in FEATURES:
        if any(layers):
            raise ValueError(f"featurizer.layer_selections: upstream {cfg.name} has a single layer, 0")
        if cfg.name == "logmel":
            upstream = LogMelUpstream(sample_rate, cfg.n_mels)
        else:
            upstream = KaldiUpstream(cfg.name, sample_rate, cfg.n_mels, cfg.n_mfcc)
    else:
        if sample_rate != 16000:
            raise ValueError(f"upstream {cfg.name} needs data.sample_rate 16000, got {sample_rate}")
        upstream = SSLUpstream(cfg.name, cfg.ckpt, cfg.random_init, cfg.arch, list(layers), cfg.padded_group_norm)
    if not cfg.trainable:
        upstream.eval().requires_grad_(False)
    elif isinstance(upstream, SSLUpstream):
        upstream.freeze_unused()
        if cfg.lora_rank:
            upstream.add_lora(cfg.lora_rank, cfg.lora_alpha)
        upstream.grad_checkpointing = cfg.grad_checkpointing
    return upstream


def run_chunked(upstream: nn.Module, wavs: torch.Tensor, lengths: torch.Tensor, chunk_samples: int):
    """The upstream over consecutive windows of at most `chunk_samples`, hidden states joined in time.

    Bounds memory by the window, not the longest file (SSL attention grows with the square of
    the length). Each window sees only its own context, so embeddings are close to, not equal
    to, a full-length pass; `chunk_samples <= 0` or short batches run in one piece.
    """
    if chunk_samples <= 0 or wavs.shape[1] <= chunk_samples:
        return upstream(wavs, lengths)
    chunk = max(chunk_samples // upstream.hop, 1) * upstream.hop  # windows start on frame boundaries
    pieces, frames = [], torch.zeros_like(lengths)
    for start in range(0, wavs.shape[1], chunk):
        part = (lengths - start).clamp(0, chunk)
        if int(part.max()) < upstream.min_samples:
            break  # nothing left that makes a frame
        hidden, part_frames = upstream(wavs[:, start:start + chunk], part.clamp(min=1))
        # rows that ended earlier contribute no frames; their valid frames stay a contiguous prefix
        frames += torch.where(part >= upstream.min_samples, part_frames, torch.zeros_like(part_frames))
        pieces.append(hidden)
    hidden = [torch.cat(layer, dim=1) for layer in zip(*pieces)]  # [(B, T', D)] * L
    return hidden, frames
