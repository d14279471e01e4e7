"""asv/run.py: one process per run folder (RunLock), and a run folder whose config.yaml stays the truth
(open_run refuses changes that alter the weights unless amended, records every accepted change)."""
import json
import multiprocessing
import os
import shutil
import signal

import pytest

from asv.config import load_config
from asv.run import atomic_write, recover_dir, replace_dir, write_json, write_text
from asv.run import RunLock, data_fingerprint, open_run, run_config

MANIFEST = """id,path,speaker,duration,sample_rate,split
spk1/a/00001,wav/spk1/a/00001.wav,spk1,4.5,16000,train
spk2/b/00001,wav/spk2/b/00001.wav,spk2,6.25,16000,train
spk3/c/00001,wav/spk3/c/00001.wav,spk3,3.0,16000,valid
spk3/c/00002,wav/spk3/c/00002.wav,spk3,5.0,16000,valid
"""


def make_data(folder, manifest=MANIFEST, valid="1 spk3/c/00001 spk3/c/00002\n"):
    (folder / "trials").mkdir(parents=True)
    (folder / "utterances.csv").write_text(manifest)
    (folder / "trials" / "valid.txt").write_text(valid)
    return folder


@pytest.fixture
def run(tmp_path):
    """(exp folder, data folder, cfg(*overrides)): a run over a small data folder."""
    data = make_data(tmp_path / "data")
    exp = tmp_path / "exp"

    def cfg(*overrides, data_dir=data):
        return load_config(None, [f"exp_dir={exp}", f"data.dir={data_dir}", "optim.lr=1e-4", *overrides])

    return exp, data, cfg


def snapshot(exp):
    """Every file of the run folder but the checkpoints, byte for byte."""
    return {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file()}


def history(exp):
    path = exp / "config_history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoint(exp, step):
    (exp / f"step-{step}").mkdir(parents=True)


# ---------------------------------------------------------------- the lock

def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = RunLock(tmp_path / "exp")
    with pytest.raises(ValueError) as e:
        RunLock(tmp_path / "exp")
    msg = str(e.value)
    assert str(tmp_path / "exp") in msg and f"process {os.getpid()}" in msg
    first.release()
    RunLock(tmp_path / "exp").release()  # free again
    first.release()  # twice is harmless


def hold_lock(exp, ready):
    lock = RunLock(exp)  # noqa: F841 (held while the object lives)
    ready.set()
    signal.pause()  # until killed


def test_a_killed_holder_holds_nothing(tmp_path):
    exp = tmp_path / "exp"
    ctx = multiprocessing.get_context("fork")  # no second import of torch
    ready = ctx.Event()
    child = ctx.Process(target=hold_lock, args=(exp, ready), daemon=True)
    child.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ValueError, match=f"process {child.pid} "):
            RunLock(exp)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the flock
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    lock = RunLock(exp)
    assert f"process {os.getpid()} " in (exp / ".lock").read_text()
    lock.release()


# ---------------------------------------------------------------- a new run

def test_a_new_run_writes_its_config_and_data_fingerprint(run):
    exp, data, cfg = run
    assert open_run(exp, cfg(), amend=False) == []
    assert run_config(exp) == cfg()
    info = json.loads((exp / "run.json").read_text())
    assert info["data_fingerprint"] == data_fingerprint(str(data)) and "created" in info
    assert history(exp) == []


def test_the_same_config_again_changes_nothing(run):
    exp, _, cfg = run
    open_run(exp, cfg(), amend=False)
    before = snapshot(exp)
    checkpoint(exp, 100)
    assert [p.name for p in open_run(exp, cfg(), amend=False)] == ["step-100"]
    assert snapshot(exp) == before


def test_checkpoints_without_a_config_are_not_a_run_folder(run):
    exp, _, cfg = run
    checkpoint(exp, 100)
    with pytest.raises(ValueError, match="no config.yaml"):
        open_run(exp, cfg(), amend=False)
    assert not (exp / "config.yaml").exists()


# ---------------------------------------------------------------- changes

def test_an_lr_change_is_refused_before_anything_is_written(run):
    exp, _, cfg = run
    open_run(exp, cfg(), amend=False)
    checkpoint(exp, 100)
    before = snapshot(exp)
    with pytest.raises(ValueError) as e:
        open_run(exp, cfg("optim.lr=3e-4"), amend=False)
    msg = str(e.value)
    assert "optim.lr: 0.0001 -> 0.0003" in msg and "--amend" in msg and str(exp) in msg
    assert snapshot(exp) == before  # config.yaml byte-identical, nothing recorded


def test_every_unsafe_change_is_listed(run):
    exp, _, cfg = run
    open_run(exp, cfg(), amend=False)
    checkpoint(exp, 100)  # trained with the first config: now it is the run's
    with pytest.raises(ValueError) as e:
        open_run(exp, cfg("optim.lr=3e-4", "train.seed=3", "downstream.embed_dim=256", "train.log_step=7"),
                 amend=False)
    msg = str(e.value)
    assert "optim.lr" in msg and "train.seed: 0 -> 3" in msg and "downstream.embed_dim: 512 -> 256" in msg
    assert "log_step" not in msg  # safe: not a reason to refuse


def test_amend_accepts_and_records_the_change(run):
    exp, _, cfg = run
    open_run(exp, cfg(), amend=False)
    checkpoint(exp, 100)
    checkpoint(exp, 200)
    open_run(exp, cfg("optim.lr=3e-4"), amend=True)
    assert run_config(exp).optim.lr == 3e-4
    (entry,) = history(exp)
    assert entry["changes"] == {"optim.lr": [1e-4, 3e-4]}
    assert (entry["at_step"], entry["amended"]) == (200, True) and "time" in entry
    open_run(exp, cfg("optim.lr=3e-4"), amend=False)  # the amended config is now the run's
    assert len(history(exp)) == 1


def test_a_safe_change_is_accepted_and_recorded(run):
    exp, _, cfg = run
    open_run(exp, cfg(), amend=False)
    checkpoint(exp, 100)
    open_run(exp, cfg("train.total_steps=300000", "train.log_step=50"), amend=False)
    assert run_config(exp).train.total_steps == 300000
    (entry,) = history(exp)
    assert entry["changes"] == {"train.log_step": [500, 50], "train.total_steps": [200000, 300000]}
    assert (entry["at_step"], entry["amended"]) == (100, False)


def test_total_steps_under_a_decaying_schedule_is_refused(run):
    exp, _, cfg = run
    sched = ("scheduler.name=cosine",)
    open_run(exp, cfg(*sched), amend=False)
    checkpoint(exp, 100)  # trained with the first config: now it is the run's
    with pytest.raises(ValueError, match="train.total_steps: 200000 -> 300000"):
        open_run(exp, cfg(*sched, "train.total_steps=300000"), amend=False)


def test_no_auto_resume_into_a_folder_with_checkpoints(run):
    exp, _, cfg = run
    open_run(exp, cfg(), amend=False)
    open_run(exp, cfg("train.auto_resume=false"), amend=False)  # no checkpoints yet: fine
    checkpoint(exp, 100)
    before = snapshot(exp)
    with pytest.raises(ValueError) as e:
        open_run(exp, cfg("train.auto_resume=false"), amend=False)
    assert "step-100" in str(e.value) and "auto_resume=false" in str(e.value)
    assert snapshot(exp) == before
    # naming the checkpoint to resume from is fine
    open_run(exp, cfg("train.auto_resume=false", f"train.resume_ckpt_dir={exp / 'step-100'}"), amend=False)


# ---------------------------------------------------------------- the data

def test_a_moved_data_folder_is_the_same_data(run, tmp_path):
    exp, data, cfg = run
    open_run(exp, cfg(), amend=False)
    moved = tmp_path / "elsewhere" / "data"
    shutil.move(str(data), str(moved))
    open_run(exp, cfg(data_dir=moved), amend=False)
    assert run_config(exp).data.dir == str(moved)
    assert history(exp)[-1]["changes"] == {"data.dir": [str(data), str(moved)]}


@pytest.mark.parametrize("change", ["duration", "speaker", "utterance", "valid"])
def test_other_data_is_refused(run, tmp_path, change):
    exp, data, cfg = run
    open_run(exp, cfg(), amend=False)
    checkpoint(exp, 100)  # trained with the first config: now it is the run's
    manifest, valid = MANIFEST, "1 spk3/c/00001 spk3/c/00002\n"
    if change == "duration":
        manifest = manifest.replace("6.25", "6.5")
    elif change == "speaker":
        manifest = manifest.replace("wav/spk2/b/00001.wav,spk2", "wav/spk2/b/00001.wav,spk9")
    elif change == "utterance":
        manifest += "spk1/a/00002,wav/spk1/a/00002.wav,spk1,7.0,16000,train\n"
    else:
        valid = "0 spk3/c/00001 spk1/a/00001\n"
    other = make_data(tmp_path / "other", manifest, valid)
    before = snapshot(exp)
    with pytest.raises(ValueError, match="data.dir"):
        open_run(exp, cfg(data_dir=other), amend=False)
    assert snapshot(exp) == before


def test_data_prepared_again_in_the_same_folder_is_refused(run):
    exp, data, cfg = run
    open_run(exp, cfg(), amend=False)
    checkpoint(exp, 100)  # trained with the first config: now it is the run's
    (data / "utterances.csv").write_text(MANIFEST.replace("6.25", "6.5"))
    before = snapshot(exp)
    with pytest.raises(ValueError, match="data fingerprint"):
        open_run(exp, cfg(), amend=False)
    assert snapshot(exp) == before
    open_run(exp, cfg(), amend=True)  # on purpose: recorded, and the new data is the run's
    assert "data fingerprint" in history(exp)[-1]["changes"] and history(exp)[-1]["amended"]
    assert json.loads((exp / "run.json").read_text())["data_fingerprint"] == data_fingerprint(str(data))
    open_run(exp, cfg(), amend=False)


def test_the_fingerprint_ignores_row_order(tmp_path):
    header, *rows = MANIFEST.splitlines()
    a = make_data(tmp_path / "a")
    b = make_data(tmp_path / "b", "\n".join([header, *reversed(rows)]) + "\n")
    assert data_fingerprint(str(a)) == data_fingerprint(str(b))


def test_run_config_of_a_checkpoint_reads_its_run(run):
    exp, _, cfg = run
    open_run(exp, cfg("train.seed=5"), amend=False)
    checkpoint(exp, 100)
    assert run_config(exp / "step-100").train.seed == 5
    assert run_config(exp / "step-100", ["eval_batch=2"]).eval_batch == 2
    with pytest.raises(ValueError, match="no config.yaml"):
        run_config(exp.parent / "data")


# ---------------------------------------------------------------- writing files (asv/run.py)

def test_atomic_write_keeps_the_old_file_on_an_error(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json(path, {"eer": 1.0})
    assert json.loads(path.read_text()) == {"eer": 1.0}
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"eer": 2.')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"eer": 1.0}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no .tmp left
    write_text(path, "new\n")
    assert path.read_text() == "new\n"


def test_replace_dir_and_recover_dir(tmp_path):
    final, new = tmp_path / "eval", tmp_path / "eval.new"
    final.mkdir()
    (final / "scores.txt").write_text("old")
    new.mkdir()
    (new / "scores.txt").write_text("new")
    replace_dir(new, final)
    assert (final / "scores.txt").read_text() == "new" and not new.exists()
    assert not (tmp_path / "eval.old").exists()
    # a kill between the two renames leaves eval.old and no eval: recover_dir puts it back
    final.rename(tmp_path / "eval.old")
    recover_dir(final)
    assert (final / "scores.txt").read_text() == "new" and not (tmp_path / "eval.old").exists()
    # a kill after both renames leaves eval.old beside the new eval: the old one goes
    (tmp_path / "eval.old").mkdir()
    recover_dir(final)
    assert (final / "scores.txt").read_text() == "new" and not (tmp_path / "eval.old").exists()
    recover_dir(tmp_path / "never_written")  # nothing to do


# ---------------------------------------------------------------- train.resume_ckpt_dir

def other_run(tmp_path, cfg, *overrides, step=30):
    other = tmp_path / "other"
    open_run(other, cfg(f"exp_dir={other}", *overrides), amend=False)
    checkpoint(other, step)
    (other / f"step-{step}" / "model.pt").write_bytes(b"")
    return other / f"step-{step}"


def test_resuming_from_a_run_with_another_config_is_refused(run, tmp_path):
    exp, _, cfg = run
    source = other_run(tmp_path, cfg, "optim.lr=1e-3")
    with pytest.raises(ValueError) as e:
        open_run(exp, cfg(f"train.resume_ckpt_dir={source}"), amend=False)
    msg = str(e.value)
    assert str(source) in msg and "optim.lr: 0.001 -> 0.0001" in msg and "--amend" in msg and "\n" not in msg
    assert not exp.exists() or not (exp / "config.yaml").exists()


def test_resuming_from_another_run_amended_is_recorded_with_the_values(run, tmp_path):
    exp, _, cfg = run
    source = other_run(tmp_path, cfg, "optim.lr=1e-3")
    open_run(exp, cfg(f"train.resume_ckpt_dir={source}"), amend=True)
    (entry,) = history(exp)
    assert entry["resumed_from"] == str(source) and entry["at_step"] == 30
    assert entry["amended"] is True and entry["changes"] == {"optim.lr": [1e-3, 1e-4]}


def test_resuming_from_a_run_with_this_config_is_recorded_unamended(run, tmp_path):
    exp, _, cfg = run
    source = other_run(tmp_path, cfg)
    open_run(exp, cfg(f"train.resume_ckpt_dir={source}"), amend=False)
    (entry,) = history(exp)
    assert (entry["resumed_from"], entry["amended"]) == (str(source), False) and "changes" not in entry


def test_a_resume_that_would_delete_later_checkpoints_is_refused(run, tmp_path):
    exp, _, cfg = run
    source = other_run(tmp_path, cfg)
    open_run(exp, cfg(), amend=False)
    checkpoint(exp, 40)
    with pytest.raises(ValueError, match="deletes this run's later checkpoints step-40"):
        open_run(exp, cfg(f"train.resume_ckpt_dir={source}"), amend=False)
    assert (exp / "step-40").is_dir()
    open_run(exp, cfg(f"train.resume_ckpt_dir={source}"), amend=True)
    assert history(exp)[-1]["deleted"] == ["step-40"] and history(exp)[-1]["amended"] is True


def test_resume_ckpt_dir_is_used_once_then_the_newest(run, tmp_path):
    """A re-run of the same command after the run saved past the resume point goes on from its newest checkpoint,
    never back to train.resume_ckpt_dir (which would delete what was trained since)."""
    from asv.run import complete_checkpoints, resume_folder
    exp, _, cfg = run
    source = other_run(tmp_path, cfg)
    c = cfg(f"train.resume_ckpt_dir={source}")
    open_run(exp, c, amend=False)
    assert resume_folder(exp, c, complete_checkpoints(exp)) == source
    checkpoint(exp, 40)
    assert resume_folder(exp, c, complete_checkpoints(exp)) == exp / "step-40"
    open_run(exp, c, amend=False)  # the same command again: nothing to refuse, nothing new recorded
    assert len(history(exp)) == 1


def test_a_first_start_that_stopped_before_any_checkpoint_does_not_fix_the_config(run):
    """e.g. an offline weights download failed: the fix its message suggests (another upstream.ckpt) is accepted."""
    exp, _, cfg = run
    open_run(exp, cfg(), amend=False)
    (exp / "speakers.txt").write_text("spk1\nspk2\n")  # stage 1 ran, then the start failed
    open_run(exp, cfg("optim.lr=3e-4"), amend=False)
    assert run_config(exp).optim.lr == 3e-4 and not (exp / "speakers.txt").exists()
    (entry,) = history(exp)
    assert entry["before_any_checkpoint"] is True and entry["amended"] is False
    assert entry["changes"] == {"optim.lr": [1e-4, 3e-4]}
