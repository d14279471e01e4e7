"""What a run folder's record guarantees: evaluations with overrides never replace the run's recorded results,
evaluation checks the data it runs on against the data the run was trained on, a resume from another run is
refused or recorded, and the logs say what happened (a resume, another process count, an average).

One tiny run (2 steps, validated, one checkpoint) per module; a test that changes it works on a copy.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from test_faults import STEPS, assert_one_line_error, copy_run, evaluate, prepare, run, train, trained_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = trained_run(tmp_path_factory.mktemp("records").resolve())
    result = run("evaluate_asv.py", "--ckpt_dir", root / "exp" / "step-2")
    assert (root / "exp" / "step-2" / "eval" / "test" / "metrics.json").is_file(), result.stdout
    return root


@pytest.fixture
def exp(trained, tmp_path) -> Path:
    return copy_run(trained, tmp_path / "exp")


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 3. overrides go to their own result set

def test_an_overridden_evaluation_writes_its_own_named_set(exp):
    ckpt = exp / "step-2"
    recorded = snapshot(ckpt / "eval")
    result = evaluate(ckpt, "eval_batch=1")
    assert result.returncode == 0, result.stderr
    sets = [p for p in (ckpt / "eval").iterdir() if p.name.startswith("test@")]
    assert len(sets) == 1 and str(sets[0]) in result.stdout
    assert json.loads((sets[0] / "metrics.json").read_text())["overrides"] == {"eval_batch": 1}
    assert {k: v for k, v in snapshot(ckpt / "eval").items() if not str(k).startswith("test@")} == recorded


def test_an_override_that_changes_no_score_writes_the_recorded_set(exp):
    ckpt = exp / "step-2"
    before = json.loads((ckpt / "eval" / "test" / "metrics.json").read_text())
    result = evaluate(ckpt, "num_workers=0", "data.eval_batch_secs=3")
    assert result.returncode == 0, result.stderr
    assert not [p for p in (ckpt / "eval").iterdir() if "@" in p.name]
    after = json.loads((ckpt / "eval" / "test" / "metrics.json").read_text())
    # other batches pad each file differently: float32 sums over the frames round differently (~1e-7 relative
    # each, over a few hundred frames), nothing more
    keys = ("num_trials", "eer", "min_dcf_0.01", "min_dcf_0.05")
    assert [after[k] for k in keys] == pytest.approx([before[k] for k in keys], abs=1e-5)
    assert "overrides" not in after


def test_validation_scores_and_calibration_stay_the_runs(exp):
    """--trials valid under an override must not move --pair's thresholds (eval/valid/scores.txt) away from the
    calibration.json fitted on them."""
    ckpt = exp / "step-2"
    valid, calibration = ckpt / "eval" / "valid" / "scores.txt", ckpt / "calibration.json"
    before = valid.read_bytes(), calibration.read_bytes()
    result = evaluate(ckpt, "--trials", "valid", "data.sample_rate=8000")
    assert result.returncode == 0, result.stderr
    assert (valid.read_bytes(), calibration.read_bytes()) == before


@pytest.mark.parametrize("override", ["optim.lr=1", "train.total_steps=9", "augment.noise_prob=0.5",
                                      "downstream.channels=64"])
def test_training_keys_are_refused_by_evaluation(exp, override):
    before = snapshot(exp)
    assert_one_line_error(evaluate(exp / "step-2", override), override.split("=")[0], "training key")
    assert snapshot(exp) == before


def test_pair_refuses_overrides_that_change_the_scores(trained, exp):
    wavs = sorted((trained / "corpus").rglob("*.wav"))[:2]
    result = evaluate(exp / "step-2", "--pair", *wavs, "data.sample_rate=8000")
    assert_one_line_error(result, "--pair with data.sample_rate=8000", "calibration.json")


# ---------------------------------------------------------------- 4. the data the run was trained on

def speakers(data: Path, *splits) -> set:
    import csv
    with open(data / "utterances.csv", newline="") as f:
        return {r["speaker"] for r in csv.DictReader(f) if r["split"] in splits}


def test_evaluation_on_a_preparation_that_holds_training_speakers_is_refused(trained, exp, tmp_path):
    """prepare again with another seed: other test speakers, some of which the run trained on."""
    import prepare_voxceleb
    again = tmp_path / "again"
    prepare_voxceleb.main(["--corpus", str(trained / "corpus"), "--out", str(again), "--test-speakers", "2",
                           "--valid-speakers", "2", "--seed", "3"])
    overlap = speakers(again, "test") & speakers(trained / "data", "train")
    assert overlap  # seed 3 puts a training speaker of seed 0 among the test speakers
    before = snapshot(exp)
    result = evaluate(exp / "step-2", f"data.dir={again}")
    assert_one_line_error(result, f"{again}/trials/test.txt", "training speakers of", "not the data it was trained on")
    assert snapshot(exp) == before


def test_evaluation_on_other_data_of_held_out_speakers_is_labelled(trained, exp, tmp_path):
    held_out = sorted(speakers(trained / "data", "test", "valid"))
    for s in held_out:
        shutil.copytree(trained / "corpus" / s, tmp_path / "corpus" / s)
    other = prepare(tmp_path / "corpus", tmp_path / "other", test_speakers=2, valid_speakers=0)
    recorded = snapshot(exp / "step-2" / "eval")
    result = evaluate(exp / "step-2", f"data.dir={other}")
    assert result.returncode == 0, result.stderr
    (labelled,) = [p for p in (exp / "step-2" / "eval").iterdir() if p.name.startswith("test@")]
    assert "data_fingerprint" in json.loads((labelled / "metrics.json").read_text())["overrides"]
    assert {k: v for k, v in snapshot(exp / "step-2" / "eval").items() if not str(k).startswith("test@")} == recorded


# ---------------------------------------------------------------- 9. the logs say what happened

def test_train_log_marks_the_resume_point(trained, exp):
    result = train(trained / "data", exp, "train.total_steps=4", *STEPS)
    log = (exp / "train.log").read_text()
    marker = log.index(f"--- resumed from {exp / 'step-2'} at step 2")
    assert log.index("step 2 | loss") < marker < log.index("step 4 | loss")
    assert "resumed from" in result.stdout


def test_a_resume_under_another_process_count_is_recorded(trained, exp):
    """A checkpoint saved by 2 processes, resumed by 1: the global batch halves, and the records say so."""
    state_file = exp / "step-2" / "train_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    train(trained / "data", exp, "train.total_steps=4", *STEPS)
    entry = [json.loads(line) for line in (exp / "config_history.jsonl").read_text().splitlines()][-1]
    assert entry["at_step"] == 2 and entry["changes"] == {"processes": [2, 1], "global_batch": [16, 8]}
    assert json.loads((exp / "run.json").read_text())["processes"] == 1
    assert "global batch changes from 16 to 8" in (exp / "train.log").read_text()


def test_num_workers_minus_one_is_resolved_in_the_start_line_and_run_json(trained, tmp_path):
    """On 2 CPUs (the child's affinity, as taskset -c 0,1 gives) num_workers=-1 starts 1 loader worker, and
    the run says so; config.yaml keeps -1, so an evaluation elsewhere fits its own machine."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a CPU affinity of at least 2 CPUs to narrow")
    two = set(sorted(os.sched_getaffinity(0))[:2])
    exp = tmp_path / "exp"
    result = train(trained / "data", exp, "train.total_steps=1", "train.test_after_train=false", "num_workers=-1",
                   preexec_fn=lambda: os.sched_setaffinity(0, two))
    assert "1 loader workers each" in result.stdout, result.stdout
    assert json.loads((exp / "run.json").read_text())["num_workers"] == 1
    assert "num_workers: -1" in (exp / "config.yaml").read_text()


# ---------------------------------------------------------------- one line instead of a traceback

def test_out_naming_a_folder_is_refused_before_the_work(trained, exp, tmp_path):
    listing = tmp_path / "wavs.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((trained / "corpus").rglob("*.wav"))[:2]))
    (tmp_path / "emb.npz").mkdir()
    assert_one_line_error(evaluate(exp / "step-2", "--extract", listing, "--out", tmp_path / "emb.npz"),
                          "emb.npz: is a folder")
    (tmp_path / "model.pt2").mkdir()
    assert_one_line_error(evaluate(exp / "step-2", "--export", tmp_path / "model.pt2"), "model.pt2: is a folder")


def test_a_second_evaluation_of_a_checkpoint_is_refused_naming_the_first(exp):
    from asv.run import RunLock
    lock = RunLock(exp / "step-2")  # as a running evaluate_asv.py holds it
    try:
        before = snapshot(exp / "step-2" / "eval")
        assert_one_line_error(evaluate(exp / "step-2"), f"{exp / 'step-2'} is in use by process {os.getpid()}")
        assert snapshot(exp / "step-2" / "eval") == before
    finally:
        lock.release()


def test_the_test_evaluation_after_training_takes_the_checkpoints_lock(trained, exp):
    """A re-run of the finished run goes straight to its test evaluation of best (step-2), which an evaluate_asv.py
    of step-2 holds: refused naming the holder, step-2's results untouched."""
    from asv.run import RunLock
    lock = RunLock(exp / "step-2")
    try:
        before = snapshot(exp / "step-2" / "eval")
        result = train(trained / "data", exp, "train.total_steps=2", *STEPS, "train.test_after_train=true", check=False)
        assert_one_line_error(result, f"{exp / 'step-2'} is in use by process {os.getpid()}", "training is complete",
                              f"evaluate_asv.py --ckpt-dir {exp / 'best'}")
        assert snapshot(exp / "step-2" / "eval") == before
    finally:
        lock.release()
    train(trained / "data", exp, "train.total_steps=2", *STEPS, "train.test_after_train=true")  # free: it evaluates
    RunLock(exp / "step-2").release()  # and let its lock go


def test_a_targets_only_list_is_named_before_any_embedding(trained, exp, tmp_path):
    targets = tmp_path / "targets.txt"
    targets.write_text("".join(line for line in (trained / "data" / "trials" / "test.txt").read_text().splitlines(True)
                               if line.startswith("1 ")))
    result = evaluate(exp / "step-2", "--trials", targets)
    assert_one_line_error(result, f"{targets}: holds only target trials")
    assert "embedding" not in result.stdout


def test_validation_that_scores_no_trial_is_one_warning_naming_the_list(trained, exp):
    """eval_batch=1 with one file per batch embeds one validation file: no trial has both sides. The step's
    validation is skipped in a line naming valid.txt (not numpy's zero-size error), and training goes on."""
    result = train(trained / "data", exp, "train.total_steps=4", *STEPS, "eval_batch=1", "data.eval_batch_secs=1.5")
    valid = trained / "data" / "trials" / "valid.txt"
    assert f"warning: step 4 validation skipped: {valid}: none of its" in result.stdout
    assert "eval_batch=1 embedded 1 of" in result.stdout and "Traceback" not in result.stderr
    assert (exp / "step-4").is_dir() and not (exp / "step-4" / "eval" / "valid").exists()


def test_an_evaluation_that_scores_no_trial_is_one_line_naming_the_list(trained, exp):
    before = snapshot(exp / "step-2" / "eval")
    result = evaluate(exp / "step-2", "eval_batch=1", "data.eval_batch_secs=1.5")
    assert_one_line_error(result, f"{trained / 'data' / 'trials' / 'test.txt'}: none of its", "eval_batch=1")
    assert snapshot(exp / "step-2" / "eval") == before  # no result set written, the run's own untouched


def test_a_targets_only_validation_list_is_named_before_training(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    valid = data / "trials" / "valid.txt"
    valid.write_text("".join(line for line in valid.read_text().splitlines(True) if line.startswith("1 ")))
    result = train(data, tmp_path / "exp", "train.total_steps=2", *STEPS, check=False)
    assert_one_line_error(result, f"{valid}: holds only target trials")
    assert "step 1 |" not in result.stdout and not list((tmp_path / "exp").glob("step-*"))


def loud_copy(trained, folder: Path) -> tuple[Path, np.ndarray]:
    """A training file scaled by 1e30, saved as float WAV (finite samples that overflow the features)."""
    source = sorted((trained / "corpus").rglob("*.wav"))[0]
    wav, rate = sf.read(source, dtype="float32")
    sf.write(folder / "loud.wav", wav * np.float32(1e30), rate, subtype="FLOAT")
    return folder / "loud.wav", wav


def test_a_waveform_that_gives_a_non_finite_embedding_is_named_by_the_api(trained, exp, tmp_path):
    import asv
    loud, wav = loud_copy(trained, tmp_path)
    model = asv.load(exp / "step-2")
    assert np.isfinite(model.embed(wav)).all()
    with pytest.raises(ValueError, match=r"^waveform 1 \(24000 samples\): its embedding is NaN or inf \(its samples "
                                         r"reach 6\.\de\+29, far outside \[-1, 1\]"):
        model.embed([wav, wav * np.float32(1e30)])
    with pytest.raises(ValueError, match=f"^{loud}: its embedding is NaN or inf"):
        model.compare(wav, str(loud))


def test_a_file_that_gives_a_non_finite_embedding_is_one_line_in_extract(trained, exp, tmp_path):
    loud, _ = loud_copy(trained, tmp_path)
    listing = tmp_path / "wavs.txt"
    listing.write_text(f"{sorted((trained / 'corpus').rglob('*.wav'))[1]}\n{loud}\n")
    result = evaluate(exp / "step-2", "--extract", listing, "--out", tmp_path / "emb.npz")
    assert_one_line_error(result, f"{loud}: its embedding is NaN or inf", "far outside [-1, 1]")
    assert not (tmp_path / "emb.npz").exists()


def test_ctrl_c_says_how_to_resume_in_one_line(trained, exp):
    from test_faults import ROOT, train_cmd
    proc = subprocess.Popen([sys.executable, *map(str, train_cmd(trained / "data", exp, "train.total_steps=100000",
                                                                 "train.save_step=100000"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as in a terminal: a shell's background job (`cmd &` without job control) inherits
                            # SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while "resumed from" not in ((exp / "train.log").read_text() if (exp / "train.log").exists() else ""):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    time.sleep(2)  # into the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert lines[-1] == f"interrupted: re-run the same command to resume from {exp / 'step-2'}", err


def test_a_non_utf8_path_in_an_extract_list_is_named(exp, tmp_path):
    listing = tmp_path / "wavs.txt"
    listing.write_bytes(b"a.wav\n/tmp/caf\xe9.wav\n")  # Latin-1
    result = evaluate(exp / "step-2", "--extract", listing, "--out", tmp_path / "emb.npz")
    assert_one_line_error(result, f"{listing}:2: not UTF-8 text")
