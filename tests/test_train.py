"""The pieces of train_asv.py's loop (asv/train.py): schedules, optimizer, train state, the non-finite guard,
the log meter, trackers, the label encoder and one-line errors. No training runs here."""
import functools
import math

import pytest
import torch
import torch.nn as nn

from asv.config import ConfigError, load_config
from asv.train import (NonFiniteGuard, StepMeter, TrainState, label_encoder, lr_at, make_optimizer, margin_at,
                          one_line, trackers)


@functools.lru_cache
def schedule(*overrides):
    cfg = load_config(None, ["optim.lr=1e-3", "train.total_steps=1000", *overrides])
    return cfg.optim.lr, cfg.scheduler, cfg.train.total_steps


def lr_of(step, *overrides):
    """lr_at as train_asv.py calls it (asv.train.set_schedules)."""
    peak, scheduler, total_steps = schedule(*overrides)
    return lr_at(step, peak, scheduler, total_steps)


# ---------------------------------------------------------------- learning rate and margin

def test_constant_is_the_default_and_removed_keys_name_their_replacement():
    assert {lr_of(s) for s in (0, 50, 999)} == {1e-3}  # scheduler.name=constant, no warm-up: SUPERB's
    for key in ("train.use_scheduler=false", "train.valid_higher_better=false"):
        with pytest.raises(ConfigError, match=f"'{key.split('=')[0]}' was removed: .*; delete it"):
            load_config(None, [key])


def test_warmup_is_linear_in_optimizer_steps():
    lr = [lr_of(s, "scheduler.name=constant", "scheduler.warmup_steps=100") for s in (0, 49, 99, 500)]
    assert lr == pytest.approx([1e-5, 5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize("name, halfway", [("linear", 0.505e-3), ("cosine", 0.505e-3), ("exponential", 1e-4)])
def test_decays_reach_the_final_ratio(name, halfway):
    o = (f"scheduler.name={name}", "scheduler.warmup_steps=0", "scheduler.final_lr_ratio=0.01")
    assert lr_of(0, *o) == pytest.approx(1e-3)
    assert lr_of(500, *o) == pytest.approx(halfway)
    assert lr_of(1000, *o) == pytest.approx(1e-5)
    lrs = [lr_of(s, *o) for s in range(1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warm-up
    assert lr_of(5000, *o) == pytest.approx(1e-5)  # past total_steps: stays at the end


def test_cosine_after_warmup():
    o = ("scheduler.name=cosine", "scheduler.warmup_steps=200", "scheduler.final_lr_ratio=0.0")
    assert lr_of(200, *o) == pytest.approx(1e-3)
    assert lr_of(600, *o) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_margin_warmup_is_a_function_of_the_step():
    loss = load_config(None, ["loss.margin=0.2", "loss.margin_warmup_start=100", "loss.margin_warmup_steps=200"]).loss
    assert [margin_at(s, loss) for s in (0, 100, 200, 300, 1000)] == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2])
    assert margin_at(0, load_config(None, ["loss.margin=0.3"]).loss) == 0.3  # no warm-up: full margin at once


# ---------------------------------------------------------------- optimizer and state

@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_make_optimizer(name, cls):
    overrides = [f"optim.name={name}", "optim.lr=0.05", "optim.weight_decay=0.001"]
    optim = load_config(None, overrides + (["optim.momentum=0.5"] if name == "sgd" else [])).optim
    opt = make_optimizer(optim, nn.Linear(3, 2).parameters())
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.05, 0.001)
    if name == "sgd":
        assert (group["momentum"], group["nesterov"]) == (0.5, True)


def test_superb_optimizer_is_adamw_with_torch_defaults():
    opt = make_optimizer(load_config().optim, nn.Linear(3, 2).parameters())
    assert type(opt) is torch.optim.AdamW
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (1e-4, 0.01)


def test_train_state_round_trips_as_ints():
    state = TrainState(step=7, micro_batches=35, skipped_steps=1)
    other = TrainState()
    other.load_state_dict({k: torch.tensor(v) for k, v in state.state_dict().items()})  # as a checkpoint may hold them
    assert other == state and all(type(v) is int for v in other.state_dict().values())


# ---------------------------------------------------------------- non-finite steps

def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))


def test_non_finite_guard_restores_batchnorm_buffers():
    model = bn_model().train()
    bn = model[1]
    guard = NonFiniteGuard([model])
    model(torch.randn(8, 4))
    guard.commit()  # a good step: these statistics are the good ones
    good = {k: v.clone() for k, v in bn.state_dict().items() if "running" in k or "num_batches" in k}
    model(torch.full((8, 4), float("nan")))  # a NaN batch poisons the running statistics...
    assert torch.isnan(bn.running_mean).all()
    guard.rollback(step=2, last_checkpoint="exp/step-0")  # ...and the guard puts the good ones back
    for k, v in good.items():
        assert torch.equal(bn.state_dict()[k], v), k
    model(torch.randn(8, 4))
    guard.commit()
    assert int(bn.num_batches_tracked) == 2 and torch.isfinite(bn.running_var).all()


def test_non_finite_guard_raises_after_max_in_row():
    model = bn_model().train()
    guard = NonFiniteGuard([model], max_in_row=3)
    guard.rollback(1, "none")
    guard.rollback(2, "none")
    guard.commit()  # a good step in between: the count starts again
    guard.rollback(4, "none")
    guard.rollback(5, "none")
    with pytest.raises(ValueError) as e:
        guard.rollback(6, "exp/run/step-100")
    msg = str(e.value)
    assert "3 optimizer steps in a row" in msg and "step 6" in msg and "exp/run/step-100" in msg


def test_non_finite_guard_of_modules_without_buffers():
    guard = NonFiniteGuard([nn.Linear(2, 2)])
    guard.commit()
    guard.rollback(1, "none")  # nothing to restore, nothing fails


class OneProcess:
    """What StepMeter.read needs of an Accelerator, for one process."""
    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction):
        return tensor.clone()


def step(meter, loss, predicted, labels):
    logits = nn.functional.one_hot(torch.tensor(predicted), 5).float()
    meter.add(torch.tensor(loss), logits, torch.tensor(labels))


def test_step_meter_ignores_dropped_steps():
    meter = StepMeter("cpu")
    step(meter, 1.0, [0, 1], [0, 1])  # a kept step of two micro-batches
    step(meter, 3.0, [0, 0], [0, 1])
    meter.commit()
    step(meter, float("nan"), [2, 2], [2, 2])  # a skipped step: never shows
    meter.drop()
    step(meter, 2.0, [4, 4], [4, 0])
    meter.commit()
    loss, acc = meter.read(OneProcess())
    assert loss == pytest.approx(2.0)  # (1 + 3 + 2) / 3 micro-batches
    assert acc == pytest.approx(4 / 6)  # correct crops / crops of the kept steps
    loss, acc = meter.read(OneProcess())  # reset after reading
    assert math.isnan(loss) and math.isnan(acc)


def test_step_meter_after_only_dropped_steps():
    meter = StepMeter("cpu")
    step(meter, float("inf"), [0], [0])
    meter.drop()
    loss, acc = meter.read(OneProcess())
    assert math.isnan(loss) and math.isnan(acc)


# ---------------------------------------------------------------- trackers, labels, errors

def test_trackers():
    assert trackers("none") is None and trackers("") is None
    assert trackers("tensorboard") == ["tensorboard"]
    assert trackers("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert trackers("all") == "all"
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        trackers("tensorbord")


def test_label_encoder_is_kept_and_checked(tmp_path):
    labels = label_encoder(tmp_path, ["id2", "id1", "id2", "id3"])
    assert labels == {"id1": 0, "id2": 1, "id3": 2}
    assert (tmp_path / "speakers.txt").read_text() == "id1\nid2\nid3\n"
    assert label_encoder(tmp_path, ["id3", "id1", "id2"]) == labels  # a resumed run: the same labels
    with pytest.raises(ValueError, match="speakers.txt"):
        label_encoder(tmp_path, ["id1", "id2", "id4"])


def test_one_line_keeps_a_worker_error_last_line():
    worker = ("Caught AudioError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1\nasv.audio.AudioError: /data/a.wav: no such file')
    assert one_line(ValueError(worker)) == "/data/a.wav: no such file"
    assert one_line(ValueError("two\n  lines ")) == "two lines"
