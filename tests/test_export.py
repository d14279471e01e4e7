"""evaluate_asv.py --export: the embedding extractor as one .pt2 / .onnx file, run without this repository,
gives the eager model's embeddings on batches of other sizes and lengths than it was exported with."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from evaluate_asv import export_model  # noqa: E402
from models.export import shortest_input  # noqa: E402
from test_extract import load_checkpoint, make_checkpoint, run  # noqa: E402

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))

SMALL_WAVLM = dict(encoder_num_layers=2, encoder_embed_dim=32, encoder_num_heads=2, encoder_ff_interm_features=64,
                   encoder_pos_conv_kernel=8, encoder_pos_conv_groups=2,
                   # the real convolution geometry (hop 320, receptive field 400 samples) with 32 channels
                   extractor_conv_layer_config=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2)
MODELS = {
    "fbank_xvector": ([], None),
    "fbank_ecapa": (["downstream.name=ecapa", "downstream.channels=64", "downstream.embed_dim=64"], None),
    # a trainable upstream, so model.pt carries its (random) weights and every load gets the same model
    "wavlm_xvector": (["upstream.name=wavlm_base_plus", "upstream.random_init=true", "upstream.trainable=true"],
                      SMALL_WAVLM),
}
# run in a subprocess whose cwd is a temporary folder and whose sys.path holds no trace of the repository
LOAD_PT2 = """
import json, sys, numpy as np, torch
assert not any(p in ("", {repo!r}) for p in sys.path), sys.path  # the repo's modules are not importable
extra = {{"asv.json": ""}}
model = torch.export.load("model.pt2", extra_files=extra).module()
inputs = np.load("inputs.npz")
with torch.inference_mode():
    emb = model(torch.from_numpy(inputs["wav"]), torch.from_numpy(inputs["lengths"]))
    lone = model(torch.from_numpy(inputs["lone"]), torch.tensor([inputs["lone"].shape[1]]))
np.savez("out.npz", emb=emb.numpy(), lone=lone.numpy())
print(extra["asv.json"])
assert "models" not in sys.modules and "evaluate_asv" not in sys.modules
"""


def batch(min_samples: int):
    """Three rows of other lengths than the export example (one exactly the shortest allowed), zero-padded."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3 * min_samples + 123, min_samples, 2 * min_samples - 7])
    wav = torch.randn(3, int(lengths.max()), generator=g) * 0.1
    wav[torch.arange(wav.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return wav, lengths


@pytest.mark.parametrize("name", MODELS)
def test_exported_files_match_the_eager_model(name, tmp_path):
    overrides, arch = MODELS[name]
    ckpt = make_checkpoint(tmp_path / "run", overrides, arch)
    cfg, upstream, encoder = load_checkpoint(ckpt)
    files = [tmp_path / "model.pt2"] + ([tmp_path / "model.onnx"] if HAVE_ONNX else [])
    if name == "fbank_xvector":  # one model through the command line, as a user runs it; the others in-process
        printed = run("evaluate_asv.py", "--ckpt_dir", ckpt, "--export", *files).stdout
        assert "at least 2800 samples, + lengths (B,) -> embeddings (B, 128)" in printed
    else:
        export_model(cfg, ckpt, [str(f) for f in files])
    assert sorted(tmp_path.glob("model.*")) == sorted(files)  # one file each, nothing temporary left
    min_samples = shortest_input(upstream, encoder)
    wav, lengths = batch(min_samples)
    with torch.no_grad():
        eager = encoder(*upstream(wav, lengths)).numpy()  # (3, E)
        alone = encoder(*upstream(wav[1:2, :lengths[1]], lengths[1:2])).numpy()  # a lone row: no padding
    np.savez(tmp_path / "inputs.npz", wav=wav.numpy(), lengths=lengths.numpy(), lone=wav[1:2, :lengths[1]].numpy())
    result = subprocess.run([sys.executable, "-I", "-c", LOAD_PT2.format(repo=str(ROOT))], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    meta = json.loads(result.stdout)
    assert (meta["sample_rate"], meta["min_samples"], meta["embed_dim"]) == (16000, min_samples, eager.shape[1])
    # float32 arithmetic in another order (decomposed ops): differences of about 1e-6 seen
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["emb"], eager, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["lone"], alone, atol=1e-4, rtol=1e-4)

    if not HAVE_ONNX:
        pytest.skip("onnx, onnxscript or onnxruntime is not installed (requirements-extra.txt)")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["wav", "lengths"]
    assert session.get_modelmeta().custom_metadata_map["sample_rate"] == "16000"
    out = session.run(None, {"wav": wav.numpy(), "lengths": lengths.numpy()})[0]
    np.testing.assert_allclose(out, eager, atol=1e-4, rtol=1e-4)
    one = session.run(None, {"wav": wav[1:2, :lengths[1]].numpy(), "lengths": lengths[1:2].numpy()})[0]
    np.testing.assert_allclose(one, alone, atol=1e-4, rtol=1e-4)


def test_export_refuses_other_file_kinds_before_any_work(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    cfg, _, _ = load_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"model\.pt: --export writes \.pt2 \(torch\.export\) or \.onnx files"):
        export_model(cfg, ckpt, [str(tmp_path / "model.pt2"), str(tmp_path / "model.pt")])
    assert not list(tmp_path.glob("model.*"))
