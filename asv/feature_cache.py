"""A frozen upstream's hidden states on disk, so that evaluating new checkpoints of a run skips the audio
decoding and the upstream entirely (evaluate_asv.py --feature-cache DIR; asv.embedding.embed_files).

Not part of the recipe, and not a config key: a cache changes no result beyond float16 rounding (about
1e-3 relative on the embeddings), so a run folder's config stays the same with or without it.

What is kept: per utterance, the hidden states of the layers the featurizer reads (featurizer.layer_selections,
every layer by default), float16, as DIR/<identity>/<2 hex>/<key>.npy of shape (layers, frames, dim).
- identity: a hash of what decides the upstream's output: the upstream.* config (name, ckpt, arch, ...) with the
  ckpt file's size and mtime (random weights: a hash of the weights), the layers, data.sample_rate,
  data.eval_chunk_secs, train.mixed_precision (the upstream runs under its autocast) and FORMAT below.
  DIR/<identity>/identity.json says which upstream a folder belongs to.
- key: a hash of the audio file's absolute path, size and mtime: a file rewritten in place is computed again.
Entries are written atomically (asv.fileio) and never evicted: delete the folder to reclaim the space.

Size: layers x dim x 2 bytes per frame. WavLM Base+ (13 layers x 768, 50 frames/s): about 1 MB per audio
second, so VoxCeleb1-O's 4,715 test files (10.9 h) take ~40 GB with every layer, ~15 GB with layers 0-4.
Each evaluation prints what it wrote and the folder's size.

Hidden states are those of the evaluation batch that first computed them: for Base models, whose first
convolution normalises over the padded batch, other batch mates would give slightly different ones; the
same utterances in the same length-sorted batches give the same ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write

FORMAT = 1  # bump when the upstream code changes what it returns: old entries are then never read


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_stamps(path: str) -> list:
    """[absolute path, size, mtime ns] of a file, or of each file in a folder (a Hugging Face checkpoint)."""
    p = Path(path).resolve()
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def upstream_identity(cfg, upstream: torch.nn.Module) -> dict:
    """Everything that decides the hidden states a frozen upstream gives an audio file at evaluation."""
    u = cfg.upstream
    identity = {"format": FORMAT, "upstream": dataclasses.asdict(u), "layers": list(getattr(upstream, "layers", [0])),
                "sample_rate": cfg.data.sample_rate, "eval_chunk_secs": cfg.data.eval_chunk_secs,
                "mixed_precision": cfg.train.mixed_precision}
    if u.ckpt:
        identity["ckpt_files"] = file_stamps(u.ckpt)
    elif u.random_init:  # built afresh in every process: only the weights themselves say which
        identity["weights_sha256"] = weights_digest(upstream)
    return identity


class FeatureCache:
    """Hidden states per audio file for one upstream identity (see the module docstring)."""

    def __init__(self, folder, cfg, upstream: torch.nn.Module):
        if cfg.upstream.trainable:
            raise ValueError("--feature-cache: upstream.trainable=true gives every checkpoint its own upstream; "
                             "there is nothing to share between evaluations")
        identity = upstream_identity(cfg, upstream)
        self.dir = Path(folder) / _digest(json.dumps(identity, sort_keys=True))[:16]
        with atomic_write(self.dir / "identity.json", shared=True) as f:
            f.write(json.dumps(identity, indent=2) + "\n")
        self.found = self.written = self.bytes_written = 0

    def entry(self, path: str) -> Path:
        st = os.stat(path)
        key = _digest(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}")
        return self.dir / key[:2] / f"{key}.npy"

    def has(self, path: str) -> bool:
        return self.entry(path).is_file()

    def store(self, path: str, hidden: np.ndarray):
        """hidden (layers, frames, dim) float16 -> the entry of `path`, unless another process wrote it already."""
        entry = self.entry(path)
        if entry.is_file():
            return
        with atomic_write(entry, "wb", shared=True) as f:  # a file object: np.save would append .npy to a path
            np.save(f, hidden)
        self.written += 1
        self.bytes_written += entry.stat().st_size

    def writer(self, paths: list[str]):
        """A callback for embed(): stores each row's valid frames of every layer; `index` indexes `paths`."""
        def store(index: torch.Tensor, hidden: list[torch.Tensor], frames: torch.Tensor):
            for row, (i, n) in enumerate(zip(index.tolist(), frames.tolist())):
                self.store(paths[i], torch.stack([h[row, :n] for h in hidden]).to(torch.float16).cpu().numpy())
        return store

    def folder_mb(self) -> float:
        return sum(f.stat().st_size for f in self.dir.glob("*/*.npy")) / 2**20

    def summary(self, total: int) -> str:
        return (f"feature cache {self.dir}: {self.found} of {total} files found; wrote {self.written} "
                f"({self.bytes_written / 2**20:.1f} MB); the folder holds {self.folder_mb():.1f} MB")


class StoredHidden(torch.utils.data.Dataset):
    """Cache entries: index -> (hidden (layers, frames, dim) float16, index)."""

    def __init__(self, entries: list[Path]):
        self.entries = entries

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        return torch.from_numpy(np.load(self.entries[index])), index


def collate_hidden(items):
    """[((L, T_i, D), index)] -> ([(B, T, D) float32] * L zero-padded, frames (B,), indices (B,)): what an
    upstream returns, in the place of (wavs, lengths, indices)."""
    frames = torch.tensor([h.shape[1] for h, _ in items], dtype=torch.long)
    layers, _, dim = items[0][0].shape
    padded = torch.zeros(layers, len(items), int(frames.max()), dim)
    for row, (h, _) in enumerate(items):
        padded[:, row, : h.shape[1]] = h.float()
    return list(padded.unbind(0)), frames, torch.tensor([i for _, i in items], dtype=torch.long)


class PassThrough(torch.nn.Module):
    """Stands in for the upstream when the loader yields stored hidden states: returns them as they come."""

    def forward(self, hidden: list[torch.Tensor], frames: torch.Tensor):
        return hidden, frames
