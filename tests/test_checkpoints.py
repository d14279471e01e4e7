"""asv/run.py: checkpoint names, the validation history, ranking, the `best` link, pruning, and `settle`
repairing what a kill at any point of a save leaves behind."""
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest

from asv.run import (HISTORY, best_entry, best_step, clear_partial_saves, complete_checkpoints, point_best,
                             rank_key, read_history, record_validation, settle, step_of, truncate_history)


def metrics(eer, dcf01=0.5, dcf05=0.3, margin=0.2):
    return {"eer": eer, "min_dcf_0.01": dcf01, "min_dcf_0.05": dcf05, "score_margin": margin}


def save(exp, step, result=None, record=True):
    """What a complete save leaves: step-N/ (with its validation when given) and the history line."""
    ckpt = exp / f"step-{step}"
    (ckpt / "eval" / "valid").mkdir(parents=True)
    (ckpt / "model.pt").write_bytes(b"weights")
    if result is not None:
        (ckpt / "eval" / "valid" / "metrics.json").write_text(json.dumps(result))
        if record:
            record_validation(exp, step, result)
    return ckpt


def steps(exp):
    return [step_of(p) for p in complete_checkpoints(exp)]


def history_steps(exp):
    return [e["step"] for e in read_history(exp)]


# ---------------------------------------------------------------- names

def test_step_of():
    assert step_of("exp/run/step-1200") == 1200
    assert step_of("step-0") == 0
    for name in ("best", "step-1200.tmp", "step-x", "step-", "xstep-3", "step-3.old"):
        assert step_of(name) is None, name


def test_every_step_folder_counts_but_partial_saves(tmp_path):
    for name in ("step-100", "step-20", "step-300.tmp", "step-400", "stepx", "step-5000"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-7").write_text("a file, not a checkpoint")
    # a step-N folder is complete: it is renamed from step-N.tmp only once written
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-20", "step-100", "step-400", "step-5000"]
    assert complete_checkpoints(tmp_path / "nothing_here") == []


def test_clear_partial_saves(tmp_path):
    for name in ("step-100", "step-200.tmp", "step-300.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-200.tmp" / "model.pt").write_bytes(b"half")
    clear_partial_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-100"]


# ---------------------------------------------------------------- history

def test_record_read_and_replace(tmp_path):
    record_validation(tmp_path, 200, metrics(3.0))
    record_validation(tmp_path, 100, metrics(4.0))
    record_validation(tmp_path, 200, metrics(2.5))  # validated again at the same step: replaced
    assert read_history(tmp_path) == [{"step": 100, **metrics(4.0)}, {"step": 200, **metrics(2.5)}]
    assert not (tmp_path / (HISTORY + ".tmp")).exists()


def test_a_torn_last_line_is_ignored(tmp_path):
    record_validation(tmp_path, 100, metrics(4.0))
    record_validation(tmp_path, 200, metrics(3.0))
    path = tmp_path / HISTORY
    path.write_text(path.read_text() + '{"step": 300, "eer": 2.')  # killed mid-write
    assert history_steps(tmp_path) == [100, 200]
    record_validation(tmp_path, 300, metrics(2.0))  # the next write repairs the file
    assert history_steps(tmp_path) == [100, 200, 300]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_no_history(tmp_path):
    assert read_history(tmp_path) == []


def test_truncate_history(tmp_path):
    for s in (100, 200, 300, 400):
        record_validation(tmp_path, s, metrics(5.0 - s / 100))
    truncate_history(tmp_path, 250)  # resumed at step 250: 300 and 400 will be redone
    assert history_steps(tmp_path) == [100, 200]
    truncate_history(tmp_path, 200)
    assert history_steps(tmp_path) == [100, 200]
    truncate_history(tmp_path, 0)
    assert history_steps(tmp_path) == []


# ---------------------------------------------------------------- ranking

def test_rank_tie_break_order():
    """Equal EER -> lower minDCF 0.01 -> lower minDCF 0.05 -> larger score margin -> later step."""
    base = {"step": 100, **metrics(2.0)}
    better = [
        {**base, "eer": 1.9, "min_dcf_0.01": 0.9},  # the metric first, whatever follows
        {**base, "min_dcf_0.01": 0.4, "min_dcf_0.05": 0.9},
        {**base, "min_dcf_0.05": 0.2, "score_margin": 0.0},
        {**base, "score_margin": 0.3, "step": 50},
        {**base, "step": 200},
    ]
    for entry in better:
        assert rank_key(entry, "eer") < rank_key(base, "eer"), entry
        assert best_entry([base, entry], "eer") is entry
        assert best_entry([entry, base], "eer") is entry


def test_ranking_on_another_metric():
    a = {"step": 1, **metrics(1.0, dcf01=0.5)}
    b = {"step": 2, **metrics(3.0, dcf01=0.4)}
    assert best_entry([a, b], "eer") is a
    assert best_entry([a, b], "min_dcf_0.01") is b


def test_best_entry_skips_entries_without_the_metric():
    assert best_entry([], "eer") is None
    assert best_entry([{"step": 1}], "eer") is None
    assert best_entry([{"step": 1}, {"step": 2, "eer": 9.0}], "eer")["step"] == 2


# ---------------------------------------------------------------- the best link

def test_point_best(tmp_path):
    (tmp_path / "step-100").mkdir()
    (tmp_path / "step-200").mkdir()
    point_best(tmp_path, 100)
    assert os.readlink(tmp_path / "best") == "step-100" and best_step(tmp_path) == 100  # relative: the run can move
    point_best(tmp_path, 200)
    assert best_step(tmp_path) == 200 and not (tmp_path / "best.tmp").exists()
    point_best(tmp_path, None)
    assert not (tmp_path / "best").is_symlink() and best_step(tmp_path) is None


# ---------------------------------------------------------------- settle

def test_settle_points_best_and_prunes_keeping_the_newest_and_the_best(tmp_path):
    for s, eer in ((100, 5.0), (200, 2.0), (300, 4.0), (400, 3.0), (500, 3.5)):
        save(tmp_path, s, metrics(eer))
    assert settle(tmp_path, "eer", keep=2) == 200
    assert steps(tmp_path) == [200, 400, 500]  # the newest two, and the best although it is older
    assert best_step(tmp_path) == 200 and (tmp_path / "best" / "model.pt").is_file()
    assert history_steps(tmp_path) == [100, 200, 300, 400, 500]  # the history survives pruning


def test_settle_with_keep_zero_keeps_everything(tmp_path):
    for s, eer in ((100, 3.0), (200, 3.5), (300, 4.0)):
        save(tmp_path, s, metrics(eer))
    assert settle(tmp_path, "eer", keep=0) == 100
    assert steps(tmp_path) == [100, 200, 300]


def real_model(ckpt: Path, value: float):
    """A model.pt that averaging can read: one tensor holding `value`."""
    import torch
    torch.save({"encoder": {"w": torch.full((2,), float(value))}, "meta": {"upstream": "fbank"}}, ckpt / "model.pt")


def test_validation_that_cannot_separate_falls_back_to_the_average_of_the_last(tmp_path):
    """Every checkpoint at EER 0 and minDCF 0 (a small validation set): no score margin decides; `best` is the
    mean of the newest three, said in one line in train.log and choice.json."""
    import torch
    from asv.run import CHOICE_FILE, FALLBACK_NAME, best_target
    for s, margin in ((100, 0.3), (200, 0.1), (300, 0.5), (400, 0.2)):
        real_model(save(tmp_path, s, metrics(0.0, 0.0, 0.0, margin)), s)
    assert settle(tmp_path, "eer", keep=0) == 300  # the ranking's first (largest margin), still returned
    assert best_target(tmp_path) == FALLBACK_NAME and best_step(tmp_path) is None
    mean = torch.load(tmp_path / "best" / "model.pt", weights_only=True)["encoder"]["w"]
    assert mean.tolist() == [300.0, 300.0]  # (200 + 300 + 400) / 3
    line = json.loads((tmp_path / CHOICE_FILE).read_text())["line"]
    assert line.startswith("checkpoint choice: validation cannot separate steps 100, 200, 300, 400 (eer 0")
    assert f"best is {FALLBACK_NAME}, the average of the last 3 checkpoints (steps 200, 300, 400)" in line
    assert (tmp_path / "train.log").read_text() == line + "\n"
    settle(tmp_path, "eer", keep=0)
    assert (tmp_path / "train.log").read_text() == line + "\n"  # said once, not at every save
    # a checkpoint that validation ranks first on its own (a lower minDCF): best is that step again
    real_model(save(tmp_path, 500, metrics(0.0, 0.0, 0.0, 0.0)), 500)
    for s in (100, 200, 300, 400):
        record_validation(tmp_path, s, metrics(0.0, 0.01, 0.0, 0.5))
    assert settle(tmp_path, "eer", keep=0) == 500 and best_target(tmp_path) == "step-500"
    assert json.loads((tmp_path / CHOICE_FILE).read_text())["line"] == "checkpoint choice: step 500, first on validation eer"


def test_best_is_never_pruned_even_as_the_oldest(tmp_path):
    save(tmp_path, 100, metrics(1.0))
    for s in range(200, 1100, 100):
        save(tmp_path, s, metrics(2.0 + s / 1000))
        settle(tmp_path, "eer", keep=1)
        assert steps(tmp_path) == [100, s] and best_step(tmp_path) == 100


def test_settle_without_validation(tmp_path):
    for s in (100, 200, 300):
        save(tmp_path, s)
    (tmp_path / "best").symlink_to("step-100")  # a link from an earlier life
    assert settle(tmp_path, "eer", keep=2) is None
    assert steps(tmp_path) == [200, 300]
    assert not os.path.lexists(tmp_path / "best")


def test_kill_after_the_rename_before_the_history_line(tmp_path):
    """step-300 is complete and holds its validation, but the kill came before valid_history.jsonl was written."""
    save(tmp_path, 100, metrics(4.0))
    save(tmp_path, 200, metrics(3.0))
    settle(tmp_path, "eer", keep=0)
    save(tmp_path, 300, metrics(1.0), record=False)
    assert best_step(tmp_path) == 200
    assert settle(tmp_path, "eer", keep=0) == 300
    assert best_step(tmp_path) == 300
    assert read_history(tmp_path)[-1] == {"step": 300, **metrics(1.0)}  # rebuilt from step-300/eval/valid


def test_kill_after_the_history_line_before_the_link(tmp_path):
    save(tmp_path, 100, metrics(4.0))
    settle(tmp_path, "eer", keep=0)
    save(tmp_path, 200, metrics(2.0))  # recorded, but best still -> step-100
    assert best_step(tmp_path) == 100
    assert settle(tmp_path, "eer", keep=0) == 200
    assert best_step(tmp_path) == 200


def test_link_to_a_deleted_folder(tmp_path):
    """The history's best is gone (deleted by hand, or a prune the link did not follow): best moves to the best
    checkpoint that exists, and the history keeps the line."""
    save(tmp_path, 100, metrics(3.0))
    save(tmp_path, 200, metrics(1.0))
    save(tmp_path, 300, metrics(2.0))
    settle(tmp_path, "eer", keep=0)
    assert best_step(tmp_path) == 200
    shutil.rmtree(tmp_path / "step-200")
    assert not (tmp_path / "best").exists()  # dangling
    assert settle(tmp_path, "eer", keep=0) == 300
    assert (tmp_path / "best" / "model.pt").is_file()
    assert 200 in history_steps(tmp_path)


def test_a_partial_save_is_never_best(tmp_path):
    save(tmp_path, 100, metrics(3.0))
    tmp = save(tmp_path, 200, metrics(0.5), record=False)
    tmp.rename(tmp_path / "step-200.tmp")  # killed before the rename
    assert settle(tmp_path, "eer", keep=1) == 100
    assert best_step(tmp_path) == 100 and history_steps(tmp_path) == [100]
    clear_partial_saves(tmp_path)
    assert not (tmp_path / "step-200.tmp").exists()


def test_settle_after_a_kill_mid_prune(tmp_path):
    """Pruning deletes folders one by one: a kill between two leaves extra old folders; the next settle finishes."""
    for s, eer in ((100, 2.0), (200, 3.0), (300, 4.0), (400, 5.0)):
        save(tmp_path, s, metrics(eer))
    settle(tmp_path, "eer", keep=0)
    assert settle(tmp_path, "eer", keep=1) == 100
    assert steps(tmp_path) == [100, 400]


def test_a_half_deleted_checkpoint_never_counts(tmp_path):
    """A kill inside rmtree leaves part of a folder: pruning renames it to step-N.del first, so what is left of it
    is never taken for a checkpoint, and the next run's clear_partial_saves removes it."""
    for s, eer in ((100, 2.0), (200, 1.0), (300, 4.0)):
        save(tmp_path, s, metrics(eer))
    def killed_midway(path, *args, **kwargs):
        (Path(path) / "model.pt").unlink()  # part of the folder is gone, then the process dies
        raise KeyboardInterrupt

    with mock.patch("shutil.rmtree", killed_midway), pytest.raises(KeyboardInterrupt):
        settle(tmp_path, "eer", keep=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-200", "step-300"]
    clear_partial_saves(tmp_path)
    assert not list(tmp_path.glob("*.del"))


def test_settle_is_idempotent(tmp_path):
    for s, eer in ((100, 2.0), (200, 1.0), (300, 4.0)):
        save(tmp_path, s, metrics(eer))
    first = settle(tmp_path, "eer", keep=1)
    state = (steps(tmp_path), read_history(tmp_path), os.readlink(tmp_path / "best"))
    assert settle(tmp_path, "eer", keep=1) == first == 200
    assert (steps(tmp_path), read_history(tmp_path), os.readlink(tmp_path / "best")) == state


@pytest.mark.parametrize("metric, best", [("eer", 100), ("min_dcf_0.01", 200)])
def test_settle_follows_the_valid_metric(tmp_path, metric, best):
    save(tmp_path, 100, metrics(1.0, dcf01=0.6))
    save(tmp_path, 200, metrics(2.0, dcf01=0.3))
    assert settle(tmp_path, metric, keep=0) == best
