"""The four commands end to end, as a user runs them: prepare -> train (kill, resume) -> evaluate -> report."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import metrics  # noqa: E402

REAL_MINI = ROOT.parent / "shared" / "data" / "real-mini"
# small, quick settings on top of configs/demo.yaml
QUICK = ["train.log_step=5", "train.eval_step=10", "train.save_step=10", "train.keep_num_ckpts=0",
         "num_workers=0", "data.batch_size=16"]


def run(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def losses(stdout: str) -> dict[int, str]:
    """step -> the loss/acc part of a training log line (speed differs from run to run)."""
    return {int(m[1]): m[2] for m in re.finditer(r"^step (\d+) \| (loss \S+ \| acc \S+ \| lr \S+)", stdout, re.M)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    run("prepare_voxceleb.py", "--demo", "--out", out)
    return out


def test_train_kill_resume_evaluate_report(demo, tmp_path):
    def train_cmd(exp):
        return ["train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", f"exp_dir={exp}", *QUICK,
                "train.total_steps=30", "train.test_after_train=false"]

    # an uninterrupted reference run
    ref = run(*train_cmd(tmp_path / "ref"))
    ref_losses = losses(ref.stdout)
    assert sorted(ref_losses) == [5, 10, 15, 20, 25, 30]

    # the same run killed (SIGKILL) once its step-10 checkpoint exists, then re-run with the same command
    exp = tmp_path / "exp"
    train = train_cmd(exp)
    proc = subprocess.Popen([sys.executable, *map(str, train)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (exp / "step-10" / "model.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(*train)
    assert "resumed from" in resumed.stdout
    after = losses(resumed.stdout)
    assert min(after) > 10  # nothing before the checkpoint is redone
    for step, line in after.items():  # the same batches, crops and optimizer state as the uninterrupted run
        assert line == ref_losses[step], (step, line, ref_losses[step])

    # run folder: resolved config, label encoder, checkpoints, best chosen on validation
    assert (exp / "config.yaml").is_file() and (exp / "speakers.txt").is_file()
    steps = sorted(int(p.name[5:]) for p in exp.glob("step-*"))
    assert steps[-1] == 30 and not list(exp.glob("*.tmp"))
    best = os.readlink(exp / "best")
    valid = {s: json.loads((exp / f"step-{s}" / "eval" / "valid" / "metrics.json").read_text())["eer"]
             for s in (10, 20, 30)}
    assert best == f"step-{min(valid, key=lambda s: (valid[s], s))}"
    log = (exp / "train.log").read_text()
    assert re.search(r"^step 30 \| loss [\d.]+ \| acc [\d.]+ \| lr [\d.e+-]+ \| \d+ crops/s$", log, re.M)

    # evaluate two checkpoints in one pass; each equals evaluating it alone
    run("evaluate_asv.py", "--ckpt_dir", exp / "step-20", exp / "step-30")
    together = (exp / "step-20" / "eval" / "test" / "scores.txt").read_text()
    metrics = json.loads((exp / "step-30" / "eval" / "test" / "metrics.json").read_text())
    assert {"eer", "min_dcf_0.01", "min_dcf_0.05", "num_trials"} <= set(metrics)
    assert metrics["num_trials"] == len((demo / "trials" / "test.txt").read_text().splitlines())
    run("evaluate_asv.py", "--ckpt_dir", exp / "step-20")
    alone = (exp / "step-20" / "eval" / "test" / "scores.txt").read_text()
    assert together == alone
    first = together.splitlines()[0].split()
    assert len(first) == 4 and first[3] in ("0", "1") and Path(first[0]).is_file()

    # quick check for a person: two files, a score and a decision at the validation EER threshold
    label, a, b = (demo / "trials" / "test.txt").read_text().splitlines()[0].split()
    pair = run("evaluate_asv.py", "--ckpt_dir", exp / "best", "--pair", a, b).stdout
    assert re.fullmatch(r"score -?[\d.]+ \| threshold -?[\d.]+ \(EER threshold on validation speakers\) \| "
                        r"(same speaker|different speakers)\n", pair), pair

    # report: never loads a model, names the checkpoint chosen on validation
    run("report.py", exp)
    report = (exp / "report.md").read_text()
    assert f"**{best[5:]}** (chosen)" in report and "best on test" in report


def test_demo_learns(demo, tmp_path):
    """The demo's promise: a model learns the synthetic speakers and beats chance by far."""
    exp = tmp_path / "exp"
    out = run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", f"exp_dir={exp}",
              "train.total_steps=150", "train.eval_step=50", "train.save_step=50", "train.log_step=50").stdout
    eer = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())["eer"]
    assert eer < 25.0, out


def test_real_speech_learns(tmp_path):
    """Real recorded speech (LibriSpeech + FSDD speakers): a brief filterbank run must be far better than chance."""
    data, exp = tmp_path / "data", tmp_path / "exp"
    run("prepare_voxceleb.py", "--corpus", REAL_MINI, "--out", data, "--test-speakers", "5", "--valid-speakers", "2")
    out = run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}",
              "train.total_steps=150", "train.eval_step=50", "train.save_step=50", "train.log_step=50").stdout
    eer = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())["eer"]
    assert eer < 35.0, out
    # Most target trials pair short 8 kHz digit clips (FSDD), the hard part; the 16 kHz read speech
    # (LibriSpeech) trials among them must be clearly separated.
    rows = [line.split() for line in (exp / "best" / "eval" / "test" / "scores.txt").read_text().splitlines()]
    libri = [(float(s), int(y)) for a, b, s, y in rows if a.endswith(".flac") and b.endswith(".flac")]
    assert len({y for _, y in libri}) == 2
    scores, labels = zip(*libri)
    assert metrics.compute_metrics(scores, labels)["eer"] < 10.0, out


LAUNCH_2_CPU = ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def two_process_run(demo, tmp_path_factory):
    """10 steps trained under 2 CPU processes (gloo), as `accelerate launch --num_processes 2` runs it."""
    exp = tmp_path_factory.mktemp("dist") / "exp"
    out = run(*LAUNCH_2_CPU, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", f"exp_dir={exp}",
              *QUICK, "train.total_steps=10", "train.test_after_train=false").stdout
    assert "step 10 | loss" in out
    return exp


def test_two_process_evaluation_equals_one(two_process_run):
    ckpt = two_process_run / "step-10"
    run(*LAUNCH_2_CPU, "evaluate_asv.py", "--ckpt_dir", ckpt)
    two = (ckpt / "eval" / "test" / "scores.txt").read_text()
    run("evaluate_asv.py", "--ckpt_dir", ckpt)
    one = (ckpt / "eval" / "test" / "scores.txt").read_text()
    assert two == one  # every trial scored once, with the same embeddings


def test_bad_config_and_checkpoint(demo, two_process_run):
    bad = run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", "train.totl_steps=3", check=False)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "error: unknown config key 'train.totl_steps' (did you mean 'train.total_steps'?)"

    exp = two_process_run
    # a checkpoint evaluated under a config with another model size: one clear line, results untouched
    mismatch = run("evaluate_asv.py", "--ckpt_dir", exp / "step-10", "downstream.embed_dim=64", check=False)
    assert mismatch.returncode != 0
    assert "step-10/model.pt" in mismatch.stderr and "embed_dim" in mismatch.stderr
    assert len(mismatch.stderr.strip().splitlines()) == 1
    assert (exp / "step-10" / "eval" / "valid" / "metrics.json").is_file()


def test_fine_tune_from_checkpoint(demo, two_process_run, tmp_path):
    """Large-margin fine-tuning: a new run starts from another run's weights (encoder and head)."""
    source = two_process_run / "step-10" / "model.pt"
    cmd = ["train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", f"exp_dir={tmp_path / 'lm'}", *QUICK,
           "train.total_steps=5", "train.test_after_train=false", "loss.margin=0.4", f"train.init_from={source}"]
    out = run(*cmd).stdout
    assert f"initialised from {source}" in out
    bad = run(*cmd[:-1], f"exp_dir={tmp_path / 'lm2'}", f"train.init_from={source}", "downstream.name=ecapa",
              check=False)
    assert bad.returncode != 0 and str(source) in bad.stderr and "downstream" in bad.stderr


def test_resume_is_exact_with_augmentation(demo, tmp_path):
    """SpecAugment and speed perturbation draw from (seed, position) too: a run resumed from step 10
    logs the same losses as the uninterrupted one (the global RNG, which DataLoader iterators also
    draw from, once made SpecAugment's masks differ after a resume)."""
    cmd = ["train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", f"exp_dir={tmp_path / 'exp'}",
           *QUICK, "train.total_steps=20", "train.test_after_train=false", "train.log_with=none",
           "augment.specaug_prob=1.0", "augment.speed_prob=0.5"]
    ref = losses(run(*cmd).stdout)
    assert sorted(ref) == [5, 10, 15, 20]
    for later in (tmp_path / "exp").glob("step-*"):  # back to the state a kill after step 10 leaves
        if later.name != "step-10":
            shutil.rmtree(later)
    (tmp_path / "exp" / "best").unlink()
    resumed = run(*cmd)
    assert "resumed from" in resumed.stdout
    after = losses(resumed.stdout)
    assert sorted(after) == [15, 20]
    for step, line in after.items():
        assert line == ref[step], (step, line, ref[step])
