"""The embedding extractor as one self-contained file, loadable without this repository.

    wav (B, T) float32 at the run's sample rate, zero-padded + lengths (B,) int64 -> embeddings (B, E) float32

`.pt2` is a torch.export ExportedProgram (`torch.export.load(path).module()(wav, lengths)`), `.onnx`
the same graph through torch.onnx's dynamo exporter (run it with onnxruntime). Batch size and
length are dynamic. The embeddings are the raw ones evaluate_asv.py scores: cosine scoring
L2-normalises them itself. Each file carries its sample rate, embedding size and `min_samples`
(the shortest input it takes): `asv.json` in the .pt2 (torch.export.load(path, extra_files=...)),
metadata_props in the .onnx.

Not included, being plain Python around the model: `data.eval_chunk_secs` windowing
(models.run_chunked) and repeating too-short files up to the minimum (data.UtteranceDataset).

No TorchScript: torch.jit is deprecated (torch.jit.script and trace warn so). Scripting fails on this plain
Python code (optional attributes, dicts of keyword arguments), and tracing silently freezes
data-dependent branches such as the SSL upstream's padding mask, so a traced file could give
wrong embeddings with no error; an ExportedProgram refuses such branches at export time instead.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn


class Extractor(nn.Module):
    """Upstream + SpeakerEncoder (featurizer + downstream) behind one forward, through their own forwards."""

    def __init__(self, upstream: nn.Module, encoder: nn.Module):
        super().__init__()
        self.upstream, self.encoder = upstream, encoder

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden, frames = self.upstream(wav, lengths)  # [(B, T', D)] * L, (B,)
        return self.encoder(hidden, frames)  # (B, E)


def shortest_input(upstream: nn.Module, encoder: nn.Module) -> int:
    """Fewest samples the exported file accepts: two pooled frames, one more than eager needs
    (models.min_input_samples), because torch.export treats a size of 1 as a constant."""
    frames = encoder.downstream.context + 2
    return upstream.min_samples + (frames - 1) * upstream.hop


def check_export_path(path: str) -> str:
    """The file's kind ('.pt2' or '.onnx'), with the optional packages it needs; call before any model work."""
    suffix = os.path.splitext(path)[1]
    if suffix not in (".pt2", ".onnx"):
        raise ValueError(f"{path}: --export writes .pt2 (torch.export) or .onnx files")
    if suffix == ".onnx":
        try:  # torch.onnx's dynamo exporter needs both
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError("--export .onnx needs onnx and onnxscript: pip install onnx onnxscript") from None
    return suffix


def export_extractor(upstream: nn.Module, encoder: nn.Module, paths: list[str], meta: dict) -> dict:
    """Write each of `paths` (.pt2 and/or .onnx, one export for all) atomically; `meta` (sample rate,
    names) is stored in the files. Returns the stored metadata. CPU, float32, whatever the training precision.
    """
    for path in paths:
        check_export_path(path)
    # an inference file: no weight needs a gradient (a trainable upstream's would break torch.onnx's decomposition)
    model = Extractor(upstream, encoder).cpu().float().eval().requires_grad_(False)
    min_samples = shortest_input(upstream, encoder)
    meta = {**meta, "embed_dim": encoder.downstream.embed_dim, "min_samples": min_samples,
            "inputs": "wav (B, T) float32 zero-padded, lengths (B,) int64", "outputs": "embeddings (B, E) float32",
            "l2_normalized": False}
    # Dim.DYNAMIC rather than a named Dim: the featurizer's einsum makes export guard on a tautology about
    # the frame count that its solver cannot prove, which only a named Dim turns into an error
    batch, samples = torch.export.Dim("batch", min=1), torch.export.Dim.DYNAMIC(min=min_samples)
    example = (torch.randn(2, 2 * min_samples), torch.tensor([2 * min_samples, min_samples]))  # one row padded
    program = torch.export.export(model, example, dynamic_shapes=({0: batch, 1: samples}, {0: batch}))
    with torch.no_grad():  # export may raise the minimum silently; the file promises min_samples: check it runs
        program.module()(torch.zeros(1, min_samples), torch.tensor([min_samples]))
    for path in paths:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        if path.endswith(".pt2"):
            with open(tmp, "wb") as f, warnings.catch_warnings():
                # torch's archive writer warns about weights "not on CPU"; all of ours are
                warnings.filterwarnings("ignore", message="No complete tensor found")
                torch.export.save(program, f, extra_files={"asv.json": json.dumps(meta)})
        else:
            onnx_program = torch.onnx.export(program, input_names=["wav", "lengths"], output_names=["embeddings"],
                                             verbose=False)
            wav = onnx_program.model.graph.inputs[0]
            onnx_program.rename_axes({wav.shape[0]: "batch", wav.shape[1]: "samples"})
            onnx_program.model.metadata_props.update({k: str(v) for k, v in meta.items()})
            onnx_program.save(tmp, external_data=False)  # one file, the weights inside (fine below 2 GB)
        os.replace(tmp, path)
    return meta
