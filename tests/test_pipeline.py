"""The four commands end to end, as a user runs them: prepare -> train (kill, resume) -> evaluate -> report."""
import csv
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
import yaml

from asv import metrics
from conftest import REPO as ROOT

# small, quick settings on top of configs/demo.yaml
QUICK = ["train.log_step=5", "train.eval_step=10", "train.save_step=10", "train.keep_num_ckpts=0",
         "num_workers=0", "data.batch_size=16"]


def run(*args, check=True, timeout=600, cwd=ROOT):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def one_line_error(result, *fragments) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def losses(stdout: str) -> dict[int, str]:
    """step -> the loss/acc part of a training log line (speed differs from run to run)."""
    return {int(m[1]): m[2] for m in re.finditer(r"^step (\d+) \| (loss \S+ \| acc \S+ \| lr \S+)", stdout, re.M)}


def train_cmd(data, exp, *overrides):
    return ["train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}", *QUICK,
            "train.total_steps=30", "train.test_after_train=false", *overrides]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_ids(data: Path) -> dict[str, dict]:
    with open(data / "utterances.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def ref(demo, tmp_path_factory):
    """An uninterrupted 30-step run (checkpoints and validation every 10 steps, all kept): (run folder, stdout).
    The evaluation tests below write their results into its checkpoints."""
    exp = tmp_path_factory.mktemp("ref") / "exp"
    return exp, run(*train_cmd(demo, exp)).stdout


# ---------------------------------------------------------------- train, kill, resume, evaluate, report

def test_train_kill_resume_evaluate_report(demo, ref, tmp_path):
    ref_losses = losses(ref[1])
    assert sorted(ref_losses) == [5, 10, 15, 20, 25, 30]

    # the same run killed (SIGKILL) once its step-10 checkpoint exists, then re-run with the same command
    exp = tmp_path / "exp"
    train = train_cmd(demo, exp)
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
    assert steps == [10, 20, 30] and not list(exp.glob("*.tmp"))
    best = os.readlink(exp / "best")
    valid = {s: json.loads((exp / f"step-{s}" / "eval" / "valid" / "metrics.json").read_text())["eer"] for s in steps}
    assert valid[int(best[5:])] == min(valid.values())
    assert [json.loads(line)["step"] for line in (exp / "valid_history.jsonl").read_text().splitlines()] == steps
    log = (exp / "train.log").read_text()
    assert re.search(r"^step 30 \| loss [\d.]+ \| acc [\d.]+ \| lr [\d.e+-]+ \| (\d\.\d|\d\d+) crops/s$", log, re.M)

    # evaluate two checkpoints in one pass; each equals evaluating it alone
    run("evaluate_asv.py", "--ckpt_dir", exp / "step-20", exp / "step-30")
    together = (exp / "step-20" / "eval" / "test" / "scores.txt").read_text()
    test_metrics = json.loads((exp / "step-30" / "eval" / "test" / "metrics.json").read_text())
    assert {"eer", "min_dcf_0.01", "min_dcf_0.05", "num_trials"} <= set(test_metrics)
    assert test_metrics["num_trials"] == len((demo / "trials" / "test.txt").read_text().splitlines())
    run("evaluate_asv.py", "--ckpt_dir", exp / "step-20")
    alone = (exp / "step-20" / "eval" / "test" / "scores.txt").read_text()
    assert together == alone
    first = together.splitlines()[0].split()
    assert len(first) == 4 and first[3] in ("0", "1") and first[0] in manifest_ids(demo)  # trial entries: ids

    # quick check for a person: two files, a score and a decision at the validation EER threshold
    label, a, b = (demo / "trials" / "test.txt").read_text().splitlines()[0].split()
    pair = run("evaluate_asv.py", "--ckpt_dir", exp / "best", "--pair", demo / "corpus" / a, demo / "corpus" / b).stdout
    assert re.search(r"^cosine score -?[\d.]+ \| .*EER threshold.* \| (same speaker|different speakers)$", pair,
                     re.M), pair

    # report: never loads a model, names the checkpoint chosen on validation
    run("report.py", exp)
    report = (exp / "report.md").read_text()
    assert f"**{best[5:]}** (chosen)" in report and "best on test" in report


def test_demo_learns(demo, tmp_path):
    """The demo's promise: a model learns the synthetic speakers and beats chance by far (12% after 50 steps)."""
    exp = tmp_path / "exp"
    out = run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", f"exp_dir={exp}",
              "train.total_steps=50", "train.eval_step=25", "train.save_step=25", "train.log_step=25").stdout
    eer = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())["eer"]
    assert eer < 25.0, out


def test_real_speech_learns(real_mini, tmp_path):
    """Real recorded speech (LibriSpeech + FSDD speakers): a brief filterbank run must be far better than chance."""
    data, exp = tmp_path / "data", tmp_path / "exp"
    run("prepare_voxceleb.py", "--corpus", real_mini, "--out", data, "--test-speakers", "5", "--valid-speakers", "2")
    out = run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}",
              "train.total_steps=100", "train.eval_step=50", "train.save_step=50", "train.log_step=50").stdout
    eer = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())["eer"]
    assert eer < 35.0, out  # 22% with the step-50 checkpoint
    # Most target trials pair short 8 kHz digit clips (FSDD), the hard part; the 16 kHz read speech
    # (LibriSpeech) trials among them must be clearly separated.
    rows = [line.split() for line in (exp / "best" / "eval" / "test" / "scores.txt").read_text().splitlines()]
    libri = [(float(s), int(y)) for a, b, s, y in rows if a.endswith(".flac") and b.endswith(".flac")]
    assert len({y for _, y in libri}) == 2
    scores, labels = zip(*libri)
    assert metrics.compute_metrics(scores, labels)["eer"] < 10.0, out  # 6.8% with the step-50 checkpoint


def test_bad_config_and_checkpoint(demo, ref, tmp_path):
    bad = run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", "train.totl_steps=3", check=False)
    one_line_error(bad, "error: unknown config key 'train.totl_steps' (did you mean 'train.total_steps'?)")

    exp = ref[0]
    # another model size as an evaluation override: a training key, refused in one line, results untouched
    refused = run("evaluate_asv.py", "--ckpt_dir", exp / "step-10", "downstream.embed_dim=64", check=False)
    one_line_error(refused, "downstream.embed_dim is a training key")
    assert (exp / "step-10" / "eval" / "valid" / "metrics.json").is_file()
    # a checkpoint whose run config says another model size: one line naming the model file
    other = tmp_path / "exp"
    shutil.copytree(exp, other, ignore=lambda folder, names: [n for n in names if n in ("step-20", "step-30", "best")])
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["downstream"]["embed_dim"] = 64
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    mismatch = run("evaluate_asv.py", "--ckpt_dir", other / "step-10", check=False)
    one_line_error(mismatch, "step-10/model.pt", "embed_dim")


def test_fine_tune_from_checkpoint(demo, ref, tmp_path):
    """Large-margin fine-tuning: a new run starts from another run's weights (encoder and head)."""
    source = ref[0] / "step-10" / "model.pt"
    cmd = ["train_asv.py", "--config", "configs/demo.yaml", f"data.dir={demo}", f"exp_dir={tmp_path / 'lm'}", *QUICK,
           "train.total_steps=5", "train.test_after_train=false", "loss.margin=0.4", f"train.init_from={source}"]
    out = run(*cmd).stdout
    assert f"initialised from {source}" in out
    bad = run(*cmd[:-1], f"exp_dir={tmp_path / 'lm2'}", f"train.init_from={source}", "downstream.channels=64",
              check=False)
    one_line_error(bad, source, "downstream.channels")


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


def test_a_moved_data_folder_keeps_working_from_any_directory(demo, tmp_path):
    """The demo's manifest holds paths relative to the data folder: moved elsewhere, it trains and evaluates
    from another working directory; the run accepts the new place (the same data) without --amend."""
    shutil.copytree(demo, tmp_path / "a" / "data")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    short = ["train.log_step=5", "train.eval_step=5", "train.save_step=5", "num_workers=0", "data.batch_size=16",
             "train.test_after_train=false", "train.log_with=none"]
    train = [ROOT / "train_asv.py", "--config", ROOT / "configs" / "demo.yaml", "exp_dir=../exp", *short]
    run(*train, "data.dir=../a/data", "train.total_steps=5", cwd=elsewhere)  # relative paths, from elsewhere
    os.rename(tmp_path / "a", tmp_path / "b")  # the data folder moves
    out = run(*train, "data.dir=../b/data", "train.total_steps=10", cwd=elsewhere).stdout
    assert "resumed from" in out and "step 10 | valid EER" in out
    history = [json.loads(line) for line in (tmp_path / "exp" / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["data.dir"] == [str(tmp_path / "a" / "data"), str(tmp_path / "b" / "data")]
    run(ROOT / "evaluate_asv.py", "--ckpt_dir", "../exp/best", cwd=elsewhere)
    assert json.loads((tmp_path / "exp" / "best" / "eval" / "test" / "metrics.json").read_text())["num_trials"] > 0


# ---------------------------------------------------------------- evaluate: which lists, where results go

def test_user_lists_never_overwrite_the_runs_results(demo, ref, tmp_path):
    ckpt = ref[0] / "step-30"
    before = snapshot(ckpt / "eval" / "valid")
    lines = (demo / "trials" / "valid.txt").read_text().splitlines()
    x, y = tmp_path / "x" / "valid.txt", tmp_path / "y" / "valid.txt"  # named like the run's own list
    for path, part in ((x, lines[:300]), (y, lines[-200:])):
        path.parent.mkdir()
        path.write_text("\n".join(part) + "\n")
    out = run("evaluate_asv.py", "--ckpt_dir", ckpt, "--trials", x, y).stdout
    assert snapshot(ckpt / "eval" / "valid") == before  # training's validation results are untouched
    folders = sorted(p.name for p in (ckpt / "eval").iterdir() if p.name.startswith("valid-"))
    assert len(folders) == 2 and all(re.fullmatch(r"valid-[0-9a-f]{8}", f) for f in folders)
    found = {json.loads((ckpt / "eval" / f / "metrics.json").read_text())["num_trials"] for f in folders}
    assert found == {300, 200}  # two lists of one name, two result sets
    for folder in folders:
        assert str(ckpt / "eval" / folder) in out  # the printed line says where each set went
    again = run("evaluate_asv.py", "--ckpt_dir", ckpt, "--trials", x).stdout  # the same file: the same folder
    assert sorted(p.name for p in (ckpt / "eval").iterdir() if p.name.startswith("valid-")) == folders, again


def test_official_style_lists_of_ids_and_trials_root(demo, ref, tmp_path):
    ckpt = ref[0] / "step-30"
    ids = [i for i, r in manifest_ids(demo).items() if r["split"] == "test"]
    a, b, c = ids[0], ids[1], ids[-1]  # the first two share a speaker, the last does not
    official = tmp_path / "official.txt"
    official.write_text(f"1 {a} {b}\n0 {a} {c}\n")  # VoxCeleb style: relative utterance ids
    run("evaluate_asv.py", "--ckpt_dir", ckpt, "--trials", official)
    (folder,) = (ckpt / "eval").glob("official-*")
    assert [line.split()[:2] for line in (folder / "scores.txt").read_text().splitlines()] == [[a, b], [a, c]]

    # files outside the run's manifest, named relative to --trials-root
    guests = tmp_path / "guests"
    for name, source in (("g1/s/1.wav", a), ("g1/s/2.wav", b), ("g2/s/1.wav", c)):
        (guests / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / "corpus" / source, guests / name)
    outside = tmp_path / "outside.txt"
    outside.write_text("1 g1/s/1.wav g1/s/2.wav\n0 g1/s/1.wav g2/s/1.wav\n")
    refused = run("evaluate_asv.py", "--ckpt_dir", ckpt, "--trials", outside, check=False)
    one_line_error(refused, outside, "names g1/s/1.wav,", "neither an utterance id of the manifest")  # the first
    run("evaluate_asv.py", "--ckpt_dir", ckpt, "--trials", outside, "--trials-root", guests)
    (guest_folder,) = (ckpt / "eval").glob("outside-*")
    # the same audio under other names: the same scores
    scores = [line.split()[2] for line in (guest_folder / "scores.txt").read_text().splitlines()]
    assert scores == [line.split()[2] for line in (folder / "scores.txt").read_text().splitlines()]


def test_missing_files_are_one_line_errors_before_any_model_work(demo, ref, tmp_path):
    broken = tmp_path / "run"  # a checkpoint that cannot load: any model work would fail on it first
    (broken / "step-1").mkdir(parents=True)
    shutil.copy(ref[0] / "config.yaml", broken / "config.yaml")
    (broken / "step-1" / "model.pt").write_bytes(b"not a checkpoint")
    listing = tmp_path / "mine.txt"
    real = next(iter(manifest_ids(demo)))
    listing.write_text(f"1 {real} {real}\n0 {real} spk00/sess9/missing.wav\n")
    result = run("evaluate_asv.py", "--ckpt_dir", broken / "step-1", "--trials", listing, check=False)
    one_line_error(result, listing, "spk00/sess9/missing.wav")
    missing = tmp_path / "missing.wav"
    result = run("evaluate_asv.py", "--ckpt_dir", ref[0] / "best", "--pair", demo / "corpus" / real, missing,
                 check=False)
    one_line_error(result, f"{missing}: no such file")
    listing.write_text(f"1 {real} {real}\n0 {real} {real}\n")  # a good list: now the checkpoint is the problem
    one_line_error(run("evaluate_asv.py", "--ckpt_dir", broken / "step-1", "--trials", listing, check=False),
                   "model.pt: unreadable checkpoint")


def test_each_lists_results_are_replaced_as_a_set(ref):
    ckpt = ref[0] / "step-20"
    run("evaluate_asv.py", "--ckpt_dir", ckpt, "score.asnorm=true", "score.cohort_size=40", "score.top_k=500")
    test = ckpt / "eval" / "test"
    asnorm = json.loads((test / "metrics_asnorm.json").read_text())
    assert (asnorm["cohort_size"], asnorm["top_k"]) == (40, 40)  # what was used: top_k cannot exceed the cohort
    assert (test / "scores_asnorm.txt").is_file()
    stale = ckpt / "eval" / "test.tmp"  # a set a killed run had begun: must not join the next one
    stale.mkdir()
    (stale / "scores_old.txt").write_text("stale\n")
    run("evaluate_asv.py", "--ckpt_dir", ckpt)  # AS-norm off: its files from the earlier evaluation go
    names = sorted(p.name for p in test.iterdir())
    assert "scores.txt" in names and "metrics.json" in names
    assert not {"scores_asnorm.txt", "metrics_asnorm.json", "scores_old.txt"} & set(names), names
    assert not stale.exists()
