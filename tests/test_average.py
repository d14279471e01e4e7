"""Checkpoint averaging (asv/run.py average_checkpoints, evaluate_asv.py --average): the mean tensor by
tensor (BatchNorm statistics included, counters from the newest), one checkpoint given back exactly, the averaged
folder evaluated like any checkpoint, and one-line refusals of checkpoints that cannot be averaged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from asv.models import save_model_file

import asv
from asv.config import load_config
from asv.embed import build_models, meta_of
from asv.run import average_checkpoints, save_config

ROOT = Path(__file__).resolve().parents[1]
META = {"upstream": "wavlm_base", "layers": [0, 1, 2], "downstream": {"name": "xvector_bn", "channels": 4}}


def model_file(folder: Path, seed: int, meta=META) -> dict:
    """A hand-made model.pt as train_asv.py lays it out: layer weights, a BatchNorm, a head."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder": {"featurizer.weights": torch.randn(3, generator=g),
                         "bn.weight": torch.randn(4, generator=g), "bn.running_mean": torch.randn(4, generator=g),
                         "bn.running_var": torch.rand(4, generator=g), "bn.num_batches_tracked": torch.tensor(seed)},
             "head": {"weight": torch.randn(5, 4, generator=g)}, "meta": meta}
    folder.mkdir(parents=True)
    torch.save(state, folder / "model.pt")
    return state


def test_the_mean_tensor_by_tensor(tmp_path):
    run = tmp_path / "run"
    states = {step: model_file(run / f"step-{step}", step) for step in (20, 100)}
    out = average_checkpoints([run / "step-100", run / "step-20"], run / "avg")  # a glob's order: newest first
    mean = torch.load(out / "model.pt", weights_only=True)
    for part in ("encoder", "head"):
        assert mean[part].keys() == states[20][part].keys()
        for name, tensor in mean[part].items():
            a, b = states[20][part][name], states[100][part][name]
            if name.endswith("num_batches_tracked"):
                assert tensor.item() == 100  # a counter: the newest checkpoint's
            else:
                assert tensor.dtype == a.dtype
                # tolerance: (a + b) / 2 in float32 in another order: 1 ulp of O(1) weights (1.2e-7)
                torch.testing.assert_close(tensor, (a + b) / 2, rtol=0, atol=1e-7)
    assert mean["meta"] == META
    weights = json.loads((out / "layer_weights.json").read_text())
    assert weights == pytest.approx(torch.softmax(mean["encoder"]["featurizer.weights"], 0).tolist())
    assert json.loads((out / "averaged.json").read_text()) == {"checkpoints": ["step-20", "step-100"],
                                                               "steps": [20, 100]}
    assert sorted(p.name for p in run.iterdir()) == ["avg", "step-100", "step-20"]  # nothing temporary left


def test_one_checkpoint_comes_back_exactly(tmp_path):
    run = tmp_path / "run"
    state = model_file(run / "step-7", 7)
    os.symlink("step-7", run / "best")
    mean = torch.load(average_checkpoints([run / "best"], run / "avg-best") / "model.pt", weights_only=True)
    for part in ("encoder", "head"):
        for name, tensor in state[part].items():
            assert torch.equal(mean[part][name], tensor), name


def test_refusals_are_one_line(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    for step in (1, 2):
        model_file(run / f"step-{step}", step)
    model_file(other / "step-1", 1)
    model_file(run / "step-3", 3, {**META, "downstream": {"name": "xvector_bn", "channels": 8}})
    os.symlink("step-2", run / "best")
    (run / "empty").mkdir()
    cases = [
        ([run / "step-1", other / "step-1"], run / "avg", "checkpoints of 2 runs"),
        ([run / "step-1", run / "step-3"], run / "avg", "step-3: another architecture than"),
        ([run / "step-2", run / "best"], run / "avg", "a checkpoint is named twice"),
        ([run / "step-1"], tmp_path / "avg", "must sit in the run folder"),
        ([run / "step-1"], run / "step-5", "training owns that name"),
        ([run / "step-1"], run / "best", "training owns that name"),
        ([run / "step-1", run / "empty"], run / "avg", "empty: not a checkpoint folder"),
        ([], run / "avg", "no checkpoints to average"),
    ]
    for ckpts, out, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            average_checkpoints(ckpts, out)
        assert "\n" not in str(error.value)
    assert not (run / "avg").exists() and not (tmp_path / "avg").exists()


@pytest.mark.parametrize("name", ["logs", "speakers.txt", "config.yaml", "notes", "eval-like"])
def test_out_that_is_a_run_file_is_refused_and_left_alone(tmp_path, name):
    """--average OUT names a run file or folder that is not an earlier average: refused before anything moves."""
    run = tmp_path / "run"
    model_file(run / "step-1", 1)
    (run / "config.yaml").write_text("exp_dir: run\n")
    (run / "speakers.txt").write_text("spk00\n")
    (run / "logs").mkdir()
    (run / "logs" / "events.out").write_text("tensorboard")
    (run / "notes").mkdir()
    (run / "notes" / "mine.txt").write_text("mine")
    (run / "eval-like").mkdir()
    (run / "eval-like" / "metrics.json").write_text("{}")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"{run / name}: is a .*, not a previous average; refused") as error:
        average_checkpoints([run / "step-1"], run / name)
    assert "\n" not in str(error.value)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not list(run.glob("*.old")) and not list(run.glob("*.tmp"))


def test_an_earlier_average_is_replaced(tmp_path):
    run = tmp_path / "run"
    model_file(run / "step-1", 1)
    model_file(run / "step-2", 2)
    average_checkpoints([run / "step-1"], run / "avg")
    average_checkpoints([run / "step-1", run / "step-2"], run / "avg")
    assert json.loads((run / "avg" / "averaged.json").read_text())["steps"] == [1, 2]


@pytest.fixture(scope="module")
def run_of_two(tmp_path_factory):
    """The demo data and a run of two (untrained, different) demo-config checkpoints, BatchNorm statistics moved."""
    base = tmp_path_factory.mktemp("average")
    subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", base / "data"], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [f"data.dir={base / 'data'}", "num_workers=0"])
    run = base / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    for step in (10, 20):
        torch.manual_seed(step)
        upstream, encoder = build_models(cfg)
        for name, buffer in encoder.named_buffers():
            buffer.copy_(torch.full_like(buffer, step) if name.endswith("num_batches_tracked")
                         else buffer + torch.rand_like(buffer))
        (run / f"step-{step}").mkdir()
        save_model_file(str(run / f"step-{step}" / "model.pt"), encoder, upstream, False, meta_of(cfg, upstream))
    return run


def test_the_averaged_checkpoint_is_validated_and_evaluated(run_of_two):
    run = run_of_two
    result = subprocess.run([sys.executable, "evaluate_asv.py", "--ckpt_dir", run / "step-20", run / "step-10",
                             "--average", run / "avg-last2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = run / "avg-last2"
    for name in ("valid", "test"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert isinstance(metrics["eer"], float) and (out / "eval" / name / "scores.txt").is_file()
    assert (out / "calibration.json").is_file()  # fit on its own validation scores
    model = asv.load(out)  # the API loads it like any checkpoint
    assert model.embed(run.parent / "data" / "corpus" / "spk00" / "sess0").shape == (4, model.embed_dim)

    refused = subprocess.run([sys.executable, "evaluate_asv.py", "--ckpt_dir", run / "step-10", "--average",
                              run.parent / "elsewhere"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1
    assert "must sit in the run folder" in refused.stderr
