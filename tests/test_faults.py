"""Faults a long training run meets: bad audio, a full disk, a kill mid-save, pruning, odd data, and the run
folder's guards (a config fixed at creation, one training at a time, a kill between two writes repaired).

Each test runs the real commands on a tiny synthetic corpus (tones + noise, 1.5 s files) and
checks that the run either carries on or stops with one clear line, and that no checkpoint
is lost or half-written. One corpus is prepared per module; a test that damages audio works on a copy.
"""
import csv
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import prepare_voxceleb
import train_asv
from asv.embed import load_extractors
from conftest import REPO as ROOT

SR = 16000
# tiny, quick settings on top of configs/demo.yaml
QUICK = ["num_workers=0", "data.batch_size=8", "train.log_step=5", "train.eval_step=1000", "train.save_step=1000",
         "train.keep_num_ckpts=0", "train.test_after_train=false", "train.log_with=none"]


def run(*args, check=True, preexec_fn=None):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, preexec_fn=preexec_fn)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def train_cmd(data, exp, *overrides, amend=False):
    return ["train_asv.py", "--config", "configs/demo.yaml", *(["--amend"] if amend else []), f"data.dir={data}",
            f"exp_dir={exp}", *QUICK, *overrides]


def train(data, exp, *overrides, amend=False, **kwargs):
    return run(*train_cmd(data, exp, *overrides, amend=amend), **kwargs)


def assert_one_line_error(result, *fragments):
    """Exit code != 0 and stderr is exactly one `error: ...` line holding every fragment."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def make_corpus(root: Path, speakers: int = 12, single: str | None = None, **prepare_args) -> Path:
    """speakers x 2 sessions x 3 files of 1.5 s (a speaker-specific tone plus noise) in root/corpus, prepared
    into root/data with 2 test and 2 validation speakers. `single`: a speaker with one file only (always a
    training speaker)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * SR)) / SR
    for s in range(speakers):
        f0 = 100 + 25 * s
        for session in range(2):
            folder = root / "corpus" / f"spk{s:02d}" / f"sess{session}"
            folder.mkdir(parents=True)
            for u in range(3):
                if f"spk{s:02d}" == single and (session, u) != (0, 0):
                    continue
                x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(2 * np.pi * 2.7 * f0 * t)
                sf.write(folder / f"u{u}.wav", x + 0.05 * rng.standard_normal(t.size), SR, subtype="PCM_16")
    return prepare(root / "corpus", root / "data", **prepare_args)


def prepare(corpus: Path, data: Path, test_speakers=2, valid_speakers=2) -> Path:
    with redirect_stdout(StringIO()):
        prepare_voxceleb.main(["--corpus", str(corpus), "--out", str(data), "--test-speakers", str(test_speakers),
                               "--valid-speakers", str(valid_speakers)])
    return data


STEPS = ["train.save_step=2", "train.eval_step=2"]  # on top of QUICK: a validated checkpoint every 2 steps


def trained_run(root: Path) -> Path:
    """make_corpus in root, and a 2-step run of it in root/exp: one validated checkpoint, step-2 (test_hostile.py
    and test_records.py damage copies of it, copy_run)."""
    make_corpus(root)
    train(root / "data", root / "exp", "train.total_steps=2", *STEPS)
    return root


def copy_run(root: Path, dest: Path) -> Path:
    """A copy of root/exp at dest (its config names root's data folder, which stays untouched)."""
    shutil.copytree(root / "exp", dest, symlinks=True)
    return dest


def evaluate(*args):
    """evaluate_asv.py --ckpt_dir *args, whatever it returns."""
    return run("evaluate_asv.py", "--ckpt_dir", *args, check=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The module's corpus (base/corpus) and its preparation (base/data): read-only, copy_of() to change them."""
    root = tmp_path_factory.mktemp("base").resolve()
    make_corpus(root)
    return root


@pytest.fixture
def data(base) -> Path:
    return base / "data"


def copy_of(base: Path, dest: Path) -> Path:
    """A copy of corpus and data whose manifest points at the copied audio; returns the data folder."""
    shutil.copytree(base, dest)
    manifest = dest / "data" / "utterances.csv"
    manifest.write_text(manifest.read_text().replace(f"{base}/corpus/", f"{dest.resolve()}/corpus/"))
    return dest / "data"


def manifest(data: Path) -> list[dict]:
    with open(data / "utterances.csv", newline="") as f:
        return list(csv.DictReader(f))


def speakers_of(data: Path, split: str) -> list[str]:
    return sorted({r["speaker"] for r in manifest(data) if r["split"] == split})


def poison(data: Path, speakers, kind: str) -> list[str]:
    """Rewrite every file of `speakers` as a float WAV of the same length (the manifest stays right):
    'huge': samples of magnitude ~1e30 (finite, so they load; filterbank power overflows to inf -> NaN loss);
    'nan': one NaN sample."""
    paths = [r["path"] for r in manifest(data) if r["speaker"] in speakers]
    for path in paths:
        assert not str(path).startswith(str(ROOT.parent / "shared"))
        x, sr = sf.read(path, dtype="float32")
        if kind == "huge":
            x = x * np.float32(1e30)
        else:
            x[len(x) // 2] = np.nan
        sf.write(path, x, sr, subtype="FLOAT")
    return paths


def log_lines(stdout: str) -> dict[int, str]:
    """step -> its training log line."""
    return {int(m[1]): m[0] for m in re.finditer(r"^step (\d+) \| loss .*$", stdout, re.M)}


def steps(exp: Path) -> list[str]:
    return sorted((p.name for p in exp.glob("step-*")), key=lambda n: (len(n), n))


def intact(ckpt: Path, step: int):
    """A complete checkpoint of `step` (the registered train state says so) whose model.pt loads as
    evaluate_asv.py loads it."""
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == step
    load_extractors([ckpt])


def history(exp: Path) -> dict[int, dict]:
    lines = (exp / "valid_history.jsonl").read_text().splitlines()
    return {e["step"]: e for e in map(json.loads, lines)}


def best_of(entries: dict[int, dict], metric: str) -> int:
    """The documented ranking, written out: the metric, minDCF 0.01 and 0.05, the larger score margin, the later step."""
    return min(entries, key=lambda s: (entries[s][metric], entries[s]["min_dcf_0.01"], entries[s]["min_dcf_0.05"],
                                       -entries[s]["score_margin"], -s))


# ---------------------------------------------------------------- 1. non-finite loss

def test_nan_loss_steps_are_skipped_and_validation_stays_finite(base, tmp_path):
    data = copy_of(base, tmp_path / "copy")
    poison(data, speakers_of(data, "train")[:1], "huge")  # 6 of 48 training files: most batches hold one
    exp = tmp_path / "exp"
    out = train(data, exp, "train.total_steps=20", "train.eval_step=10").stdout
    assert re.search(r"^warning: step \d+ skipped: non-finite loss", out, re.M), out
    lines = log_lines(out)
    assert 20 in lines, out  # the run went on to its last step
    m = re.fullmatch(r"step 20 \| loss (\S+) \| acc (\S+) \| .* \| (\d+) steps skipped", lines[20])
    assert m and int(m[3]) > 0, lines[20]
    assert math.isfinite(float(m[1])), lines[20]  # skipped steps' NaN losses are left out of the average
    # the skipped forward passes left no NaN in the BatchNorm statistics: validation is still a number
    assert "validation skipped" not in out
    for step in (10, 20):
        assert re.search(rf"^step {step} \| valid EER [\d.]+%", out, re.M), out
    assert math.isfinite(json.loads((exp / "step-20" / "eval" / "valid" / "metrics.json").read_text())["eer"])
    assert (exp / "best" / "model.pt").is_file()


def test_nan_loss_in_a_row_stops_with_the_last_good_checkpoint(base, tmp_path):
    data = copy_of(base, tmp_path / "copy")
    exp = tmp_path / "exp"
    train(data, exp, "train.total_steps=5")
    poison(data, speakers_of(data, "train"), "huge")  # every training file: every step is NaN from now on
    # log_step=5 < 20: the count of bad steps in a row must survive the log lines
    result = train(data, exp, "train.total_steps=30", check=False)
    line = assert_one_line_error(result, "20 optimizer steps in a row", f"last good checkpoint: {exp / 'step-5'}")
    assert "step 25" in result.stdout and "step 26" not in result.stdout, line
    assert steps(exp) == ["step-5"]
    intact(exp / "step-5", 5)


# ---------------------------------------------------------------- 2. full disk

def test_full_disk_at_a_checkpoint_is_one_line_and_loses_nothing(data, tmp_path):
    exp = tmp_path / "exp"
    train(data, exp, "train.total_steps=5")
    sizes = {p.name: p.stat().st_size for p in (exp / "step-5").iterdir() if p.is_file()}
    limit = 100_000  # config.yaml, train.log fit; model.safetensors, optimizer.bin, model.pt do not
    assert (exp / "config.yaml").stat().st_size < limit < min(sizes["model.pt"], sizes["optimizer.bin"])

    def small_files():  # writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = train(data, exp, "train.total_steps=10", check=False, preexec_fn=small_files)
    assert "step 10 | loss" in result.stdout  # training went on until the save
    assert_one_line_error(result, f"cannot write checkpoint {exp / 'step-10'}", "File too large",
                          f"last complete checkpoint: {exp / 'step-5'}")
    assert steps(exp) == ["step-5"]  # no step-10, no half-written step-10.tmp
    intact(exp / "step-5", 5)

    resumed = train(data, exp, "train.total_steps=10")  # space freed: the same command goes on from step-5
    assert f"resumed from {exp / 'step-5'} at step 5" in resumed.stdout
    assert sorted(log_lines(resumed.stdout)) == [10]
    intact(exp / "step-10", 10)


# ---------------------------------------------------------------- 3. killed while saving

def test_half_written_checkpoint_is_never_resumed_and_is_removed(data, tmp_path):
    exp = tmp_path / "exp"
    train(data, exp, "train.total_steps=20", "train.save_step=10")
    half = exp / "step-30.tmp"  # what a kill during save(30) leaves: junk and a truncated model.pt
    half.mkdir()
    (half / "junk.bin").write_bytes(b"\0" * 100)
    (half / "model.pt").write_bytes((exp / "step-20" / "model.pt").read_bytes()[:1000])
    out = train(data, exp, "train.total_steps=30", "train.save_step=10").stdout
    assert f"resumed from {exp / 'step-20'} at step 20" in out
    assert steps(exp) == ["step-10", "step-20", "step-30"]
    assert not (exp / "step-30" / "junk.bin").exists()  # step-30 is a fresh save, not the leftover
    intact(exp / "step-30", 30)


def test_a_kill_between_the_rename_and_best_is_repaired_by_the_rerun(data, tmp_path):
    exp = tmp_path / "exp"
    cmd = ["train.total_steps=20", "train.save_step=10", "train.eval_step=10"]
    train(data, exp, *cmd)
    full = history(exp)
    assert sorted(full) == [10, 20]
    # step-20 was renamed into place, then the kill: its history line and the `best` link never came
    (exp / "valid_history.jsonl").write_text(json.dumps(full[10]) + "\n")
    (exp / "best").unlink()
    (exp / "best").symlink_to("step-999")  # and a link that names no folder at all
    out = train(data, exp, *cmd).stdout  # the same command
    assert f"resumed from {exp / 'step-20'} at step 20" in out
    assert history(exp) == full  # rebuilt from step-20/eval/valid/metrics.json
    assert os.readlink(exp / "best") == f"step-{best_of(full, 'eer')}" and (exp / "best" / "model.pt").is_file()


def test_min_dcf_metric_with_one_kept_checkpoint_never_leaves_best_dangling(data, tmp_path):
    exp = tmp_path / "exp"
    keep = ["train.keep_num_ckpts=1", "train.save_step=5", "train.eval_step=5", "train.valid_metric=min_dcf_0.01"]
    for total in (15, 25):  # a second session on the same run: pruning goes on across it
        train(data, exp, f"train.total_steps={total}", *keep)
        entries = history(exp)
        assert sorted(entries) == list(range(5, total + 1, 5))  # pruned checkpoints keep their history line
        best = best_of(entries, "min_dcf_0.01")
        assert os.readlink(exp / "best") == f"step-{best}"
        assert (exp / "best" / "model.pt").is_file()  # resolves to a complete checkpoint
        assert set(steps(exp)) == {f"step-{total}", f"step-{best}"}


# ---------------------------------------------------------------- 4. keep_num_ckpts

def kept_checkpoints_are_newest_and_best(exp: Path, newest: int):
    """Only step-<newest> and the best checkpoint remain; `best` resolves to the best validation so far."""
    best = best_of(history(exp), "eer")
    assert os.readlink(exp / "best") == f"step-{best}"
    assert (exp / "best" / "model.pt").is_file()  # resolves to a complete checkpoint
    assert set(steps(exp)) == {f"step-{newest}", f"step-{best}"}
    return best


def test_keep_num_ckpts_keeps_the_newest_and_the_best(base, tmp_path):
    data = copy_of(base, tmp_path / "copy")
    exp = tmp_path / "exp"
    keep = ["train.keep_num_ckpts=1", "train.save_step=5", "train.eval_step=5"]
    train(data, exp, "train.total_steps=10", *keep)
    first_best = kept_checkpoints_are_newest_and_best(exp, 10)

    # From now on every validation is NaN (a broken validation file): a warning, never the best, so the
    # best is an older checkpoint than the newest by design, and pruning must spare it.
    poison(data, speakers_of(data, "valid")[:1], "huge")
    out = train(data, exp, "train.total_steps=20", *keep).stdout
    for step in (15, 20):
        assert re.search(rf"^warning: step {step} validation skipped: \d+ of \d+ trial scores are NaN", out,
                         re.M), out
    assert kept_checkpoints_are_newest_and_best(exp, 20) == first_best
    assert first_best < 20 and len(steps(exp)) == 2


# ---------------------------------------------------------------- 5. odd training sets

def test_no_training_utterances_and_a_single_utterance_speaker(tmp_path):
    data = make_corpus(tmp_path, single="spk03")
    assert [r["split"] for r in manifest(data) if r["speaker"] == "spk03"] == ["train"]
    out = train(data, tmp_path / "exp", "train.total_steps=6").stdout
    assert 6 in log_lines(out)
    assert len((tmp_path / "exp" / "speakers.txt").read_text().split()) == len(speakers_of(data, "train"))

    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    rows = [r for r in manifest(data) if r["split"] != "train"]
    with open(empty / "utterances.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    result = train(empty, tmp_path / "exp2", "train.total_steps=6", check=False)
    assert_one_line_error(result, empty / "utterances.csv", "no training utterances")


def test_without_a_valid_list_every_checkpoint_is_tested(base, tmp_path):
    """Prepared with --valid-speakers 0 (SUPERB's protocol): no validation, no `best`, every checkpoint tested."""
    data = prepare(base / "corpus", tmp_path / "superb", valid_speakers=0)
    exp = tmp_path / "exp"
    out = train(data, exp, "train.total_steps=10", "train.save_step=5", "train.eval_step=5",
                "train.test_after_train=true").stdout
    assert "no validation and no `best`" in out and "valid EER" not in out
    assert not (exp / "best").exists() and not (exp / "valid_history.jsonl").exists()
    for step in (5, 10):
        assert not (exp / f"step-{step}" / "eval" / "valid").exists()
        assert json.loads((exp / f"step-{step}" / "eval" / "test" / "metrics.json").read_text())["num_trials"] > 0
    report = run("report.py", exp, "--protocol", "superb", "--no-plots").stdout
    assert "BEST ON TEST (SUPERB protocol" in report


# ---------------------------------------------------------------- 6. NaN samples in a file

def test_nan_audio_file_ends_the_run_naming_the_file(base, tmp_path):
    data = copy_of(base, tmp_path / "copy")
    exp = tmp_path / "exp"
    train(data, exp, "train.total_steps=5")
    bad = poison(data, speakers_of(data, "train")[:1], "nan")
    for workers in (0, 1):  # 1: the error is raised in a DataLoader worker and re-raised wrapped
        result = train(data, exp, "train.total_steps=30", f"num_workers={workers}", check=False)
        line = assert_one_line_error(result, "audio contains NaN or inf samples")
        assert re.fullmatch(r"error: (\S+): audio contains NaN or inf samples", line)[1] in bad, line
        assert steps(exp) == ["step-5"]
        intact(exp / "step-5", 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a GPU")
def test_fp16_skips_nan_steps(base, tmp_path):
    """Under fp16 the grad scaler must see every step (its update()), skipped ones included: else the
    next step's unscale_() fails ("already been called on this optimizer since the last update()")."""
    data = copy_of(base, tmp_path / "copy")
    poison(data, speakers_of(data, "train")[:1], "huge")
    out = train(data, tmp_path / "exp", "train.total_steps=20", "train.mixed_precision=fp16").stdout
    assert "skipped" in out and 20 in log_lines(out)


# ---------------------------------------------------------------- 7. the run folder's guards

def test_values_that_cannot_be_meant_are_one_line_errors(data, tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    for override, fragment in (("train.total_steps=0", "'train.total_steps' must be >= 1, got 0"),
                               ("data.batch_size=0", "'data.batch_size' must be >= 1, got 0"),
                               ("optim.lr=-1", "'optim.lr' must be > 0"),
                               ("train.valid_metric=auc", "'train.valid_metric' must be one of eer")):
        # main() in this process (the config is refused before anything starts): the exit message is the line
        monkeypatch.setattr(sys, "argv", train_cmd(data, exp, override))
        with pytest.raises(SystemExit) as exit_:
            train_asv.main()
        assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("error: ")
        assert fragment in exit_.value.code and "\n" not in exit_.value.code
    assert not exp.exists()  # refused before anything was written
    assert_one_line_error(train(data, exp, "train.total_steps=0", check=False), "'train.total_steps' must be >= 1")


def test_a_refused_rerun_leaves_the_run_untouched_and_amend_records_the_change(data, tmp_path):
    exp = tmp_path / "exp"
    train(data, exp, "train.total_steps=5")
    before = {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file() and p.name != ".lock"}
    refused = train(data, exp, "train.total_steps=10", "optim.lr=5e-4", check=False)
    assert_one_line_error(refused, f"{exp} was trained with another config", "optim.lr: 0.001 -> 0.0005", "--amend")
    assert {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert steps(exp) == ["step-5"]

    out = train(data, exp, "train.total_steps=10", "optim.lr=5e-4", amend=True).stdout
    assert f"resumed from {exp / 'step-5'} at step 5" in out and "lr 5.0e-04" in log_lines(out)[10]
    assert yaml.safe_load((exp / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    (entry,) = map(json.loads, (exp / "config_history.jsonl").read_text().splitlines())
    assert entry["at_step"] == 5 and entry["amended"] is True
    assert entry["changes"] == {"optim.lr": [0.001, 0.0005], "train.total_steps": [5, 10]}
    # a change that leaves the weights alone (more steps) needs no --amend, and is recorded too
    train(data, exp, "train.total_steps=15", "optim.lr=5e-4")
    last = json.loads((exp / "config_history.jsonl").read_text().splitlines()[-1])
    assert last["amended"] is False and last["changes"] == {"train.total_steps": [10, 15]}


def test_auto_resume_false_into_a_used_folder_is_refused(data, tmp_path):
    exp = tmp_path / "exp"
    train(data, exp, "train.total_steps=5")
    result = train(data, exp, "train.total_steps=5", "train.auto_resume=false", check=False)
    assert_one_line_error(result, f"{exp} holds checkpoints of an earlier run (up to step-5)", "auto_resume=false")
    assert steps(exp) == ["step-5"]
    intact(exp / "step-5", 5)


def test_a_second_training_on_the_same_folder_is_refused_while_the_first_runs(data, tmp_path):
    exp = tmp_path / "exp"
    first = subprocess.Popen([sys.executable, *train_cmd(data, exp, "train.total_steps=100000", "train.log_step=1")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not re.search(r"^step 1 \|", (exp / "train.log").read_text() if (exp / "train.log").exists() else "",
                            re.M):
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.2)
        second = train(data, exp, "train.total_steps=5", check=False)
        assert_one_line_error(second, f"{exp} is in use by process {first.pid}")
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # a dead process holds no lock: the folder is usable again at once
    assert "step 5 | loss" in train(data, exp, "train.total_steps=5").stdout
