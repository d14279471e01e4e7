"""Evaluation's float32 linear layers through oneDNN on x86-64 CPUs (models/onednn.py): that evaluation runs them
there, that the outputs are the float32 product's within its rounding bound, and that nothing else is touched."""
import contextlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile

from asv.embed import embed_files, load_extractors
from asv.models.onednn import OneDNNLinear, available, onednn_linear
from tests.conftest import REPO
from tests.test_models import short_alone_and_beside_a_long_one
from tests.test_ssl_speed import SECS, make_run, write_wav

pytestmark = pytest.mark.skipif(not available(), reason="oneDNN's linear needs an x86-64 CPU and a torch with oneDNN")
ONEDNN_OP = "mkldnn::_linear_pointwise"


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_a_linear_in_the_mode_is_onednns_within_float32_rounding():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(768, 300), torch.randn(2, 70, 768)
    with torch.no_grad(), OneDNNLinear():
        ops = ops_run(lambda: layer(x))
        y = layer(x)
        y_functional = F.linear(x, layer.weight)  # the call torchaudio's attention makes, here without a bias
    assert ONEDNN_OP in ops
    assert y.shape == (2, 70, 300) and y.is_contiguous()
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    # tolerance: the worst-case float32 error of a K-term dot product plus its bias, (K + 1) u sum |x_i w_i| + ...,
    # u = 2^-24 (Higham, Accuracy and Stability, 3.1); the summation order is oneDNN's, the bound any order's
    bound = (768 + 2) * 2.0 ** -24 * (x.double().abs() @ layer.weight.double().abs().T + layer.bias.double().abs())
    assert ((y.double() - exact).abs() <= bound).all()
    exact_nobias = F.linear(x.double(), layer.weight.double())
    assert ((y_functional.double() - exact_nobias).abs() <= bound).all()


def test_training_autocast_other_dtypes_and_other_ops_run_as_before():
    layer, x = torch.nn.Linear(16, 8), torch.randn(4, 16)
    with OneDNNLinear():
        assert ONEDNN_OP not in ops_run(lambda: layer(x).sum().backward())  # autograd: torch's own linear
        assert layer.weight.grad is not None
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert ONEDNN_OP not in ops_run(lambda: layer(x))
                assert layer(x).dtype == torch.bfloat16  # autocast still casts
            assert ONEDNN_OP not in ops_run(lambda: layer.double()(x.double()))
            assert ONEDNN_OP not in ops_run(lambda: torch.matmul(x, x.T))
    assert isinstance(onednn_linear("cpu"), OneDNNLinear)
    assert not isinstance(onednn_linear("meta"), OneDNNLinear)  # only CPUs


@pytest.mark.parametrize("name", ["wavlm_base_plus", "hubert_base", "wavlm_large"])
def test_an_embedding_through_onednn_is_the_same_alone_and_beside_a_much_longer_utterance(name):
    # tolerance as in test_models: float32 rounding gives 1 - cosine ~1e-12, padding leaks 1e-2 and more
    with OneDNNLinear():
        assert short_alone_and_beside_a_long_one(name, "superb_xvector") >= 0.99999


def test_evaluation_embeds_through_onednn_and_agrees_with_torchs_linear(tmp_path, monkeypatch):
    wavs = [write_wav(tmp_path / "wav" / f"u{i}.wav", s, i) for i, s in enumerate(SECS)]
    ckpts = make_run(tmp_path / "run", steps=(1,))
    ex = load_extractors(ckpts)
    ops = ops_run(lambda: embed_files(Accelerator(cpu=True), ex, wavs))
    assert ONEDNN_OP in ops
    (ours,), done = embed_files(Accelerator(cpu=True), ex, wavs)
    assert done.all()
    # the same models and files with the mode a no-op: torch's own F.linear (MKL)
    monkeypatch.setattr("asv.embed.onednn_linear", lambda device: contextlib.nullcontext())
    (theirs,), _ = embed_files(Accelerator(cpu=True), ex, wavs)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    # tolerance: two float32 summation orders through the tiny model, ~1e-6 relative per value: 1 - cosine ~1e-12
    assert cosine.min() >= 0.99999


def test_linear_kernels_benchmark_prints_both_kernels_side_by_side():
    out = subprocess.run([sys.executable, "benchmarks/linear_kernels.py", "--threads", "1", "--repeats", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 150") or
            line.startswith("| 400")]
    assert len(rows) == 8
    for row in rows:
        mkl, onednn, ratio, diff = float(row[2]), float(row[3]), row[4].strip(), float(row[5])
        assert mkl > 0 and onednn > 0 and ratio.endswith("x")
        assert diff < 768 * 2.0 ** -24  # the float32 rounding bound of the longest dot product, relative to its scale
