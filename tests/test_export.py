"""evaluate_asv.py --export: the embedding extractor as one .pt2 / .onnx file, run without this repository,
gives the eager model's embeddings on batches of other sizes and lengths than it was exported with."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from asv.models import min_input_samples
from asv.models.export import check_export_path, export_program, save_program
from conftest import REPO as ROOT
from test_extract import load_checkpoint, make_checkpoint, run

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))

SMALL_WAVLM = dict(encoder_num_layers=2, encoder_embed_dim=32, encoder_num_heads=2, encoder_ff_interm_features=64,
                   encoder_pos_conv_kernel=8, encoder_pos_conv_groups=2,
                   # the real convolution geometry (hop 320, receptive field 400 samples) with 32 channels
                   extractor_conv_layer_config=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2)
MODELS = {  # name: (overrides, upstream.arch, config file; None: every key at its default, then the overrides)
    "logmel_xvector_bn": ([], None, "configs/demo.yaml"),
    # a downstream section belongs to its architecture: ECAPA starts from the defaults, not demo.yaml's x-vector keys
    "logmel_ecapa": (["upstream.name=logmel", "upstream.n_mels=40", "downstream.name=ecapa", "downstream.channels=64",
                      "downstream.embed_dim=64"], None, None),
    # a trainable upstream, so model.pt carries its (random) weights and every load gets the same model
    "wavlm_xvector_bn": (["upstream.name=wavlm_base_plus", "upstream.n_mels=80", "upstream.random_init=true",
                          "upstream.trainable=true"], SMALL_WAVLM, "configs/demo.yaml"),
    "logmel_superb_xvector": (["upstream.name=logmel", "downstream.hidden_size=32", "downstream.aggregation_size=48",
                               "downstream.embed_dim=16"], None, None),  # base.yaml's downstream
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


def export_in_process(ckpt, files) -> dict:
    """What --export does, through the library: one program, saved as each file."""
    cfg, upstream, encoder = load_checkpoint(ckpt)
    program, meta = export_program(upstream, encoder, {"sample_rate": cfg.data.sample_rate})
    for path in files:
        with open(path, "wb") as f:
            save_program(program, f, check_export_path(str(path)), meta)
    return meta


@pytest.mark.parametrize("name", MODELS)
def test_exported_files_match_the_eager_model(name, tmp_path):
    overrides, arch, config = MODELS[name]
    ckpt = make_checkpoint(tmp_path / "run", overrides, arch, config)
    cfg, upstream, encoder = load_checkpoint(ckpt)
    min_samples = min_input_samples(upstream, encoder) + upstream.hop  # export asks for one frame more than eager
    files = [tmp_path / "model.pt2"] + ([tmp_path / "model.onnx"] if HAVE_ONNX else [])
    if name == "logmel_xvector_bn":  # one model through the command line, as a user runs it; the others in-process
        printed = run("evaluate_asv.py", "--ckpt_dir", ckpt, "--export", *files).stdout
        assert f"at least {min_samples} samples, + lengths (B,) -> embeddings (B, 128)" in printed
    else:
        export_in_process(ckpt, files)
    assert sorted(tmp_path.glob("model.*")) == sorted(files)  # one file each, nothing temporary left
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
    # tolerance: the exported graph decomposes ops (other float32 order): ~1e-6 on O(1) values, 1e-4 is 100x
    np.testing.assert_allclose(out["emb"], eager, atol=1e-4, rtol=1e-4)
    # tolerance: the exported graph decomposes ops (other float32 order): ~1e-6 on O(1) values, 1e-4 is 100x
    np.testing.assert_allclose(out["lone"], alone, atol=1e-4, rtol=1e-4)

    if not HAVE_ONNX:
        pytest.skip("onnx, onnxscript or onnxruntime is not installed (requirements-extra.txt)")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["wav", "lengths"]
    assert session.get_modelmeta().custom_metadata_map["sample_rate"] == "16000"
    out = session.run(None, {"wav": wav.numpy(), "lengths": lengths.numpy()})[0]
    # tolerance: ONNX Runtime's own kernels (other order, fusions): ~1e-6 on O(1) values, 1e-4 is margin
    np.testing.assert_allclose(out, eager, atol=1e-4, rtol=1e-4)
    one = session.run(None, {"wav": wav[1:2, :lengths[1]].numpy(), "lengths": lengths[1:2].numpy()})[0]
    # tolerance: ONNX Runtime's own kernels (other order, fusions): ~1e-6 on O(1) values, 1e-4 is margin
    np.testing.assert_allclose(one, alone, atol=1e-4, rtol=1e-4)


def test_export_refuses_other_file_kinds_before_any_work(tmp_path):
    run_dir = tmp_path / "run"  # a checkpoint that cannot load: the file name must be refused first
    (run_dir / "step-0").mkdir(parents=True)
    (run_dir / "step-0" / "model.pt").write_bytes(b"not a checkpoint")
    (run_dir / "config.yaml").write_text("upstream:\n  name: logmel\n")
    result = run("evaluate_asv.py", "--ckpt_dir", run_dir / "step-0", "--export", tmp_path / "model.pt2",
                 tmp_path / "model.pt", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {tmp_path / 'model.pt'}: --export writes .pt2 (torch.export) or .onnx files"
    assert not list(tmp_path.glob("model.*"))
