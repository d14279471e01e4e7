"""Training-loop pieces that are pure functions: the learning-rate schedule and checkpoint discovery."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import load_config  # noqa: E402
from train_asv import complete_checkpoints, lr_at  # noqa: E402


def cfg_with(*overrides):
    return load_config(None, ["optim.lr=1e-3", "train.total_steps=1000", "train.use_scheduler=true", *overrides])


def test_constant_without_scheduler():
    cfg = load_config(None, ["optim.lr=1e-3", "train.use_scheduler=false", "scheduler.warmup_steps=100"])
    assert {lr_at(s, cfg) for s in (0, 50, 999)} == {1e-3}


def test_warmup_is_linear_in_optimizer_steps():
    cfg = cfg_with("scheduler.name=constant", "scheduler.warmup_steps=100")
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(49, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(500, cfg) == pytest.approx(1e-3)


@pytest.mark.parametrize("name, halfway", [("linear", 0.505e-3), ("cosine", 0.505e-3), ("exponential", 1e-4)])
def test_decays_reach_the_final_ratio(name, halfway):
    cfg = cfg_with(f"scheduler.name={name}", "scheduler.warmup_steps=0", "scheduler.final_lr_ratio=0.01")
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(500, cfg) == pytest.approx(halfway)
    assert lr_at(1000, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warm-up


def test_cosine_after_warmup():
    cfg = cfg_with("scheduler.name=cosine", "scheduler.warmup_steps=200", "scheduler.final_lr_ratio=0.0")
    assert lr_at(200, cfg) == pytest.approx(1e-3)
    assert lr_at(600, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_only_complete_checkpoints_count(tmp_path):
    for name in ("step-100", "step-20", "step-300.tmp", "step-400", "stepx"):
        (tmp_path / name).mkdir()
    for name in ("step-100", "step-20", "step-300.tmp"):
        (tmp_path / name / "model.pt").write_bytes(b"x")
    # step-400 has no model.pt yet (killed mid-save before the rename would not even name it so)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-20", "step-100"]


def test_margin_warmup_is_a_function_of_the_step():
    from train_asv import margin_at
    cfg = load_config(None, ["loss.margin=0.2", "loss.margin_warmup_start=100", "loss.margin_warmup_steps=200"])
    assert [margin_at(s, cfg) for s in (0, 100, 200, 300, 1000)] == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2])
    assert margin_at(0, load_config(None, ["loss.margin=0.3"])) == 0.3  # no warm-up: full margin at once
