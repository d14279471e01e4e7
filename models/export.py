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

from . import Extractor, min_input_samples


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


def export_program(upstream: nn.Module, encoder: nn.Module, meta: dict):
    """The extractor as a torch.export ExportedProgram with dynamic batch and length, and the metadata
    the files carry (`meta`, e.g. the sample rate, plus embed_dim and min_samples). CPU, float32,
    whatever the training precision."""
    # an inference file: no weight needs a gradient (a trainable upstream's would break torch.onnx's decomposition)
    model = Extractor(upstream, encoder).cpu().float().eval().requires_grad_(False)
    # two pooled frames, one more than eager needs: torch.export treats a size of 1 as a constant
    min_samples = min_input_samples(upstream, encoder) + upstream.hop
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
    return program, meta


def save_program(program, f, suffix: str, meta: dict):
    """Write the program to the open binary file `f` as .pt2 or .onnx, `meta` inside."""
    if suffix == ".pt2":
        with warnings.catch_warnings():  # torch's archive writer warns about weights "not on CPU"; all of ours are
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(program, f, extra_files={"asv.json": json.dumps(meta)})
        return
    import onnx

    onnx_program = torch.onnx.export(program, input_names=["wav", "lengths"], output_names=["embeddings"],
                                     verbose=False)
    wav = onnx_program.model.graph.inputs[0]
    onnx_program.rename_axes({wav.shape[0]: "batch", wav.shape[1]: "samples"})
    onnx_program.model.metadata_props.update({k: str(v) for k, v in meta.items()})
    onnx.save_model(onnx_program.model_proto, f)  # one file, the weights inside (fine below 2 GB)
