"""Faults a long training run meets: bad audio, a full disk, a kill mid-save, pruning, odd data.

Each test runs the real commands on a tiny synthetic corpus (tones + noise, 1.5 s files) and
checks that the run either carries on or stops with one clear line, and that no checkpoint
is lost or half-written.
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
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402
from evaluate_asv import model_meta  # noqa: E402
from models import build_encoder, build_upstream, load_model_file  # noqa: E402

SR = 16000
# tiny, quick settings on top of configs/demo.yaml
QUICK = ["num_workers=0", "data.batch_size=8", "train.log_step=5", "train.eval_step=1000", "train.save_step=1000",
         "train.keep_num_ckpts=0", "train.test_after_train=false"]


def run(*args, check=True, preexec_fn=None):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, preexec_fn=preexec_fn)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def train(data, exp, *overrides, **kwargs):
    return run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}", *QUICK,
               *overrides, **kwargs)


def assert_one_line_error(result, *fragments):
    """Exit code != 0 and stderr is exactly one `error: ...` line holding every fragment."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def make_corpus(root: Path, speakers: int = 12, single: str | None = None) -> Path:
    """speakers x 2 sessions x 3 files of 1.5 s (a speaker-specific tone plus noise), prepared with
    2 test and 2 validation speakers. `single`: a speaker with one file only (always a training speaker)."""
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
    data = root / "data"
    run("prepare_voxceleb.py", "--corpus", root / "corpus", "--out", data, "--test-speakers", "2",
        "--valid-speakers", "2")
    return data


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
    """A complete checkpoint of `step` whose model.pt loads as evaluate_asv.py loads it (the run's config)."""
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == step
    cfg = load_config(str(ckpt.parent / "config.yaml"))
    upstream = build_upstream(cfg.upstream, cfg.data.sample_rate)
    load_model_file(str(ckpt / "model.pt"), build_encoder(cfg, upstream), upstream, model_meta(cfg))


# ---------------------------------------------------------------- 1. non-finite loss

def test_nan_loss_steps_are_skipped_and_validation_stays_finite(tmp_path):
    data = make_corpus(tmp_path)
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


def test_nan_loss_in_a_row_stops_with_the_last_good_checkpoint(tmp_path):
    data = make_corpus(tmp_path)
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

def test_full_disk_at_a_checkpoint_is_one_line_and_loses_nothing(tmp_path):
    data = make_corpus(tmp_path)
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

def test_half_written_checkpoint_is_never_resumed_and_is_removed(tmp_path):
    data = make_corpus(tmp_path)
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


# ---------------------------------------------------------------- 4. keep_num_ckpts

def kept_checkpoints_are_newest_and_best(exp: Path, newest: int):
    """Only step-<newest> and the best checkpoint remain; `best` resolves to the lowest valid EER so far."""
    log = (exp / "train.log").read_text()
    eers = {int(s): float(e) for s, e in re.findall(r"^step (\d+) \| valid EER ([\d.]+)%", log, re.M)}
    best = min(eers, key=lambda s: (eers[s], s))  # the first of equal values stays the best
    assert os.readlink(exp / "best") == f"step-{best}"
    assert (exp / "best" / "model.pt").is_file()  # resolves to a complete checkpoint
    assert set(steps(exp)) == {f"step-{newest}", f"step-{best}"}
    return best


def test_keep_num_ckpts_keeps_the_newest_and_the_best(tmp_path):
    data = make_corpus(tmp_path)
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


# ---------------------------------------------------------------- 6. NaN samples in a file

def test_nan_audio_file_ends_the_run_naming_the_file(tmp_path):
    data = make_corpus(tmp_path)
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
def test_fp16_skips_nan_steps(tmp_path):
    """Under fp16 the grad scaler must see every step (its update()), skipped ones included: else the
    next step's unscale_() fails ("already been called on this optimizer since the last update()")."""
    data = make_corpus(tmp_path)
    poison(data, speakers_of(data, "train")[:1], "huge")
    out = train(data, tmp_path / "exp", "train.total_steps=20", "train.mixed_precision=fp16").stdout
    assert "skipped" in out and 20 in log_lines(out)
