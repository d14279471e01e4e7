"""Checks of report.py on a fake exp/ tree: the headline numbers come from the checkpoint chosen on validation."""
import json
import re
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import yaml

import report
from conftest import REPO

# step: {list: (eer %, minDCF 0.01, minDCF 0.05)}. Step 200 is best on "valid", step 300 best on both test lists.
FAKE = {
    100: {"valid": (3.00, 0.3000, 0.2000), "vox1_o": (2.50, 0.2500, 0.1500), "vox1_h": (4.00, 0.4000, 0.3000)},
    200: {"valid": (2.00, 0.2500, 0.1800), "vox1_o": (2.10, 0.2100, 0.1100), "vox1_h": (3.60, 0.3600, 0.2600)},
    300: {"valid": (2.50, 0.2000, 0.1600), "vox1_o": (1.90, 0.1900, 0.0900), "vox1_h": (3.30, 0.3300, 0.2300)},
}


# Layer weights saved with each step (13 = a base SSL model's CNN features + 12 transformer layers);
# each step's differ, so the report line tells which step was read.
WEIGHTS = {step: [round(w, 4) for w in np.exp(np.sin(np.arange(13) * (1 + step / 100))) / 13] for step in FAKE}


def write_scores(path, num_trials=300, seed=0, shift=0.0):
    """`enroll test score label` lines, as evaluate_asv.py writes them: a third targets, well separated."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_trials) % 3 == 0).astype(int)
    scores = np.where(labels == 1, rng.normal(0.6, 0.12, num_trials), rng.normal(0.1, 0.1, num_trials)) + shift
    path.write_text("".join(f"id{i % 17:05d}/a/{i:05d}.wav id{i % 13:05d}/b/{i:05d}.wav {s:.6f} {y}\n"
                            for i, (s, y) in enumerate(zip(scores, labels))))


def make_run(path, best="step-200", config=None, data=FAKE, scores=False, weights=None):
    """A fake run; `scores`: scores.txt for every test list (and a data folder whose utterances.csv names
    their speakers, which the EER interval needs), `weights`: {step: layer weights}."""
    for step, lists in data.items():
        for name, (eer, dcf1, dcf5) in lists.items():
            d = path / f"step-{step}" / "eval" / name
            d.mkdir(parents=True)
            metrics = {"eer": eer, "eer_threshold": 0.5, "min_dcf_0.01": dcf1, "min_dcf_0.05": dcf5,
                       "num_trials": 1000, "num_targets": 100}
            (d / "metrics.json").write_text(json.dumps(metrics))
            if scores and name != "valid":
                write_scores(d / "scores.txt", seed=step)
        if weights and step in weights:
            (path / f"step-{step}" / "layer_weights.json").write_text(json.dumps(weights[step]))
    if config is None:
        config = "train:\n  valid_metric: eer\n"
        if scores:
            data_dir = path.with_name(path.name + "_data")
            ids = {f"id{i % k:05d}/{side}/{i:05d}.wav" for i in range(300) for k, side in ((17, "a"), (13, "b"))}
            write_manifest(data_dir, {u: u.split("/")[0] for u in ids})
            config += f"data:\n  dir: {data_dir}\n"
    (path / "config.yaml").write_text(config)
    if best:
        (path / "best").symlink_to(best)  # relative, as training writes it
    return path


def run_report(*args, cwd=REPO, plots=False):
    """report.py as a command; --no-plots unless `plots`, as importing matplotlib costs ~1 s per call."""
    command = [sys.executable, str(REPO / "report.py"), *map(str, args)] + ([] if plots else ["--no-plots"])
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def summary_row(run, name, step, ci=False):
    """The summary's row; ci: as a regex, the EER followed by its confidence interval `[low, high]`."""
    eer, dcf1, dcf5 = FAKE[step][name]
    head = f"| {run} | {name} | {step} | {FAKE[step]['valid'][0]:.2f} | {eer:.2f}"
    tail = f" | {dcf1:.4f} | {dcf5:.4f} |"
    return re.escape(head) + r" \[\d+\.\d\d, \d+\.\d\d\]" + re.escape(tail) if ci else head + tail


def test_summary_uses_the_checkpoint_chosen_on_validation(tmp_path):
    run = make_run(tmp_path / "exp" / "run1")
    result = run_report(run)
    assert result.returncode == 0, result.stderr
    text = (run / "report.md").read_text()
    assert result.stdout.startswith(text)  # printed as well as written
    for name in ("vox1_o", "vox1_h"):
        assert summary_row(run, name, 200) in text
        assert summary_row(run, name, 300) not in text
    assert "Chosen checkpoint: step 200 (`best` link, ranked on validation)." in text
    assert "| **200** (chosen) | 2.00 | 2.10 | 0.2100 | 0.1100 |" in text
    # Every evaluated checkpoint is listed, in numeric step order.
    vox1_o = text[text.index("### vox1_o"):]
    assert vox1_o.index("| 100 | 3.00 | 2.50 |") < vox1_o.index("| **200** (chosen)") < vox1_o.index("| 300 | 2.50 |")
    assert "best on test (for reference only, not a fair selection): step 300, EER 1.90%" in text
    assert "best on test (for reference only, not a fair selection): step 300, EER 3.30%" in text
    assert "AS-norm" not in text  # no metrics_asnorm.json anywhere


def test_without_best_symlink_selects_on_valid_metric(tmp_path):
    run = make_run(tmp_path / "run", best=None)
    assert run_report(run).returncode == 0
    text = (run / "report.md").read_text()
    assert summary_row(run, "vox1_o", 200) in text
    assert "step 200 (lowest valid eer)" in text


def test_valid_metric_from_config_is_used(tmp_path):
    # Selecting on validation minDCF 0.01 picks step 300, which has the lowest one.
    run = make_run(tmp_path / "run", best=None, config="train:\n  valid_metric: min_dcf_0.01\n")
    assert run_report(run).returncode == 0
    text = (run / "report.md").read_text()
    assert summary_row(run, "vox1_o", 300) in text
    assert "step 300 (lowest valid min_dcf_0.01)" in text


def test_no_selection_possible_is_said(tmp_path):
    data = {s: {k: v for k, v in lists.items() if k != "valid"} for s, lists in FAKE.items()}
    run = make_run(tmp_path / "run", best=None, data=data)
    assert run_report(run).returncode == 0
    text = (run / "report.md").read_text()
    assert "No checkpoint chosen: no `best` link and no valid results with 'eer'." in text
    assert f"| {run} | vox1_o | none | - | - | - | - |" in text


def test_validation_history_outlives_pruned_checkpoints(tmp_path):
    """valid_history.jsonl keeps the validation of pruned checkpoints; half-replaced eval folders are not lists."""
    run = make_run(tmp_path / "run", best=None, data={300: FAKE[300]})
    history = [{"step": s, "eer": FAKE[s]["valid"][0], "min_dcf_0.01": FAKE[s]["valid"][1],
                "min_dcf_0.05": FAKE[s]["valid"][2]} for s in (100, 200)]
    (run / "valid_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history) + '{"step": 4')
    (run / "step-300" / "eval" / "vox1_o.tmp").mkdir()  # an interrupted write_eval_set
    (run / "step-300" / "eval" / "vox1_o.tmp" / "metrics.json").write_text(json.dumps({"eer": 99.0}))
    result = run_report(run)
    assert result.returncode == 0, result.stderr
    text = (run / "report.md").read_text()
    assert "step 200 (lowest valid eer)" in text  # chosen from the history: its folder is gone
    assert f"| {run} | vox1_o | 200 | 2.00 | - | - | - |" in text
    assert "vox1_o.tmp" not in text and "| 100 | 3.00 | - |" not in text  # no test results at 100


def test_superb_protocol_reports_the_best_on_test_and_says_so(tmp_path):
    run = make_run(tmp_path / "run")
    assert run_report(run, "--protocol", "superb").returncode == 0
    text = (run / "report.md").read_text()
    assert "## Summary: BEST ON TEST (SUPERB protocol" in text
    assert summary_row(run, "vox1_o", 300) in text and summary_row(run, "vox1_h", 300) in text
    assert "No checkpoint chosen: SUPERB protocol" in text


def test_two_runs_in_one_report(tmp_path):
    run1 = make_run(tmp_path / "exp" / "run1")
    run2 = make_run(tmp_path / "exp" / "run2", best="step-100")
    result = run_report(run1, run2, cwd=tmp_path)  # several runs: report.md in the current directory
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "report.md").read_text()
    assert summary_row(run1, "vox1_o", 200) in text
    assert summary_row(run2, "vox1_o", 100) in text
    assert f"## {run1}" in text and f"## {run2}" in text
    assert not (run1 / "report.md").exists()

    out = tmp_path / "custom.md"
    assert run_report(run1, run2, "--out", out).returncode == 0
    assert out.read_text() == text


def test_asnorm_columns_when_present(tmp_path):
    run = make_run(tmp_path / "run")
    asnorm = {"eer": 1.75, "eer_threshold": 0.1, "min_dcf_0.01": 0.1750, "min_dcf_0.05": 0.0750}
    (run / "step-200" / "eval" / "vox1_o" / "metrics_asnorm.json").write_text(json.dumps(asnorm))
    assert run_report(run).returncode == 0
    text = (run / "report.md").read_text()
    assert "| AS-norm EER % | AS-norm minDCF 0.01 | AS-norm minDCF 0.05 |" in text
    assert summary_row(run, "vox1_o", 200)+ " 1.75 | 0.1750 | 0.0750 |" in text
    assert summary_row(run, "vox1_h", 200)+ " - | - | - |" in text


def test_plot_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path / "run")
    result = run_report(run, plots=True)
    assert (run / "eer_vs_step.png").stat().st_size > 0
    assert "install matplotlib" not in result.stdout
    assert run_report(run, "--no-plots").returncode == 0


def test_without_matplotlib_tables_still_come_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    run = make_run(tmp_path / "run", scores=True, weights=WEIGHTS)
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("(install matplotlib for plots)") == 1
    text = (run / "report.md").read_text()
    assert re.search(summary_row(run, "vox1_o", 200, ci=True), text)  # the interval needs no matplotlib
    assert weights_line(WEIGHTS[200]) in text
    assert "Plots:" not in text and not list(run.glob("*.png"))


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000  # a drawn figure, not an empty file


def weights_line(weights):
    return ", ".join(f"{i}: {w:.2f}" for i, w in enumerate(weights))


def test_chosen_checkpoint_plots_and_layer_weights(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path / "run", scores=True, weights=WEIGHTS)
    write_scores(run / "step-200" / "eval" / "vox1_o" / "scores_asnorm.txt", seed=7, shift=2.0)
    read = []  # every scores file the report opens
    real_read_scores = report.read_scores
    monkeypatch.setattr(report, "read_scores", lambda path: read.append(path) or real_read_scores(path))
    assert report.main([str(run)]) == 0

    evals = run / "step-200" / "eval"
    assert sorted(read) == sorted([evals / "vox1_h" / "scores.txt", evals / "vox1_o" / "scores.txt",
                                   evals / "vox1_o" / "scores_asnorm.txt"])  # the chosen step only
    pngs = ["eer_vs_step.png", "det_vox1_h.png", "scores_vox1_h.png", "det_vox1_o.png", "scores_vox1_o.png",
            "layer_weights.png", "layer_weights_vs_step.png"]
    assert sorted(p.name for p in run.glob("*.png")) == sorted(pngs)
    text = (run / "report.md").read_text()
    for name in pngs:
        assert is_png(run / name), name
        assert f"![{Path(name).stem}]({name})" in text  # embedded, relative to report.md beside the plots
    line = next(line for line in text.splitlines() if line.startswith("Layer weights of the chosen checkpoint"))
    assert weights_line(WEIGHTS[200]) in line and weights_line(WEIGHTS[100]) not in text
    top = int(np.argmax(WEIGHTS[200]))
    assert f"Highest: layer {top} ({WEIGHTS[200][top]:.2f})" in line
    assert "No readable scores.txt" not in text


def test_single_layer_upstream_gives_no_layer_plot(tmp_path):
    pytest.importorskip("matplotlib")
    data = {200: {"valid": FAKE[200]["valid"], "vox1_o": FAKE[200]["vox1_o"]}}
    run = make_run(tmp_path / "run", data=data, scores=True, weights={200: [1.0]})  # a filterbank upstream
    assert report.main([str(run)]) == 0
    assert sorted(p.name for p in run.glob("*.png")) == ["det_vox1_o.png", "eer_vs_step.png", "scores_vox1_o.png"]
    text = (run / "report.md").read_text()
    assert "layer weights" not in text.lower()


def test_no_plots_still_gives_the_weights_line(tmp_path, capsys):
    run = make_run(tmp_path / "run", scores=True, weights=WEIGHTS)
    assert report.main([str(run), "--no-plots"]) == 0
    assert "install matplotlib" not in capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert weights_line(WEIGHTS[200]) in text
    assert "Plots:" not in text and not list(run.glob("*.png"))


def test_unreadable_scores_and_weights_are_named_and_skipped(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path / "run", data={200: FAKE[200]}, scores=True)
    bad_scores = run / "step-200" / "eval" / "vox1_h" / "scores.txt"
    bad_scores.write_text("a b 0.5 1\na b 0.25\n")  # a line cut short
    bad_weights = run / "step-200" / "layer_weights.json"
    bad_weights.write_text('{"layer": 1}')
    assert report.main([str(run)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert any(str(bad_scores) in w for w in warnings) and any(str(bad_weights) in w for w in warnings)
    text = (run / "report.md").read_text()
    assert "No readable scores.txt at step 200 for vox1_h: no DET curve or score histogram." in text
    assert (run / "det_vox1_o.png").exists() and not (run / "det_vox1_h.png").exists()
    assert "layer weights" not in text.lower()


def test_read_scores_and_probit(tmp_path):
    path = tmp_path / "scores.txt"
    path.write_text("id1/a.wav id2/b.wav 0.750000 1\nid1/a.wav id3/c.wav -0.125000 0\n")
    scores, labels = report.read_scores(path)
    assert scores.tolist() == [0.75, -0.125] and labels.tolist() == [1, 0]
    # tolerance: the reference values are given to 6 decimals
    assert np.allclose(report.plots.ppf([0.5, 0.975, 0.001]), [0.0, 1.959964, -3.090232], atol=1e-6)
    assert np.isfinite(report.plots.ppf([0.0, 1.0])).all()  # the DET sweep's end points stay plottable


def test_corrupt_metrics_json_is_named_and_skipped(tmp_path):
    run = make_run(tmp_path / "run")
    bad = run / "step-300" / "eval" / "vox1_h" / "metrics.json"
    bad.write_text("{not json")
    result = run_report(run)
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(bad) in warnings[0]
    text = (run / "report.md").read_text()
    assert summary_row(run, "vox1_h", 200) in text
    assert "step 300, EER 3.30%" not in text  # the skipped file is not used
    assert "step 300, EER 1.90%" in text  # the other list at step 300 still is


def test_runs_without_evaluations(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_report(empty, tmp_path / "does_not_exist")
    assert result.returncode != 0
    assert f"{empty}: no evaluated checkpoints" in result.stderr
    assert "no run had any evaluated checkpoint" in result.stderr

    good = make_run(tmp_path / "good")  # one good run is enough to succeed
    result = run_report(good, empty, "--out", tmp_path / "r.md")
    assert result.returncode == 0
    assert f"{empty}: no evaluated checkpoints" in result.stderr


def test_help_lists_options_with_defaults():
    result = run_report("--help")
    assert result.returncode == 0
    assert "--out" in result.stdout and "--no-plots" in result.stdout and "default" in result.stdout


# ---------------------------------------------------------------------------- comparing runs (issue 14)
# Runs whose metrics.json agree with their scores.txt (computed from them), VoxCeleb-layout ids
# (speaker/video/utterance), a validation history longer than the checkpoints kept (step 100 pruned).

STEPS = (100, 200, 300)
PRUNED = 100


def speaker_trials(seed, shift, num_speakers=24, per_speaker=4):
    """(enroll ids, test ids, scores, labels): every same-speaker pair, three times as many other pairs;
    each speaker shifts its scores a little, so trials of one speaker are not independent."""
    rng = np.random.default_rng(seed)
    utts = [f"id{s:05d}/v{u % 2}/{u:05d}.wav" for s in range(num_speakers) for u in range(per_speaker)]
    pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:] if a[:7] == b[:7]]
    targets = len(pairs)
    while len(pairs) < 4 * targets:
        a, b = rng.choice(len(utts), 2, replace=False)
        if utts[a][:7] != utts[b][:7]:
            pairs.append((utts[a], utts[b]))
    labels = np.r_[np.ones(targets, int), np.zeros(len(pairs) - targets, int)]
    offset = rng.normal(0, 0.08, num_speakers)
    scores = (np.where(labels == 1, rng.normal(0.5 + shift, 0.15, len(labels)), rng.normal(0.1, 0.15, len(labels)))
              + offset[[int(a[2:7]) for a, _ in pairs]])
    return [a for a, _ in pairs], [b for _, b in pairs], scores, labels


def write_trials(folder, enroll, test, scores, labels, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scores.txt").write_text("".join(f"{a} {b} {s:.6f} {y}\n" for a, b, s, y in zip(enroll, test, scores,
                                                                                             labels)))
    m = report.metrics.compute_metrics(scores, labels)
    (folder / "metrics.json").write_text(json.dumps({**m, **(extra or {})}))
    return m


def make_scored_run(path, config, seed=0, shift=0.0, layers=13, calibration=None):
    """A run folder as training and evaluation leave it: config.yaml, run.json, valid_history.jsonl (three
    validations), step-200 and step-300 (step-100 pruned) with eval/{valid,vox1_o}, layer_weights.json, best."""
    history = []
    for step in STEPS:
        valid = {"step": step, "eer": 4.0 - step / 200 + seed, "min_dcf_0.01": 0.5, "min_dcf_0.05": 0.3}
        history.append(valid)
        if step == PRUNED:
            continue
        d = path / f"step-{step}"
        (d / "eval" / "valid").mkdir(parents=True)
        (d / "eval" / "valid" / "metrics.json").write_text(json.dumps({k: v for k, v in valid.items() if k != "step"}))
        write_trials(d / "eval" / "vox1_o", *speaker_trials(seed * 1000 + step, shift + step / 1000), extra=calibration)
        logits = np.sin(np.arange(layers) * (1 + step / 100 + seed)) if layers > 1 else np.zeros(1)
        (d / "layer_weights.json").write_text(json.dumps((np.exp(logits) / np.exp(logits).sum()).tolist()))
    (path / "valid_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (path / "run.json").write_text(json.dumps({"created": "2024-01-01 00:00:00", "data_fingerprint": "abc123"}))
    (path / "best").symlink_to("step-300")
    return path


def base_config(path, data_dir):
    return {"exp_dir": str(path), "num_workers": 2,
            "data": {"dir": str(data_dir), "batch_size": 10},
            "upstream": {"name": "wavlm_base_plus", "arch": {}},
            "optim": {"name": "adamw", "lr": 1e-4},
            "train": {"seed": 0, "valid_metric": "eer", "init_from": f"{path}/step-100/model.pt"}}


def write_manifest(data_dir, speaker_of):
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{u},{u},{spk},3.0,16000,test\n" for u, spk in speaker_of.items())
    (data_dir / "utterances.csv").write_text("id,path,speaker,duration,sample_rate,split\n" + rows)


def three_runs(root):
    """lr3e-4, seed1 and fbank: each differs from base_config in its own key(s) (fbank: upstream.name, and
    n_mels only it has).
    data.dir is written two ways for the same folder (same data fingerprint); exp_dir and init_from follow
    each run's folder. Only fbank is single-layer; seed1's checkpoints carry calibration numbers."""
    data = root / "data"
    enroll, test, _, _ = speaker_trials(0, 0.0)
    write_manifest(data, {u: u.split("/")[0] for u in set(enroll) | set(test)})
    (root / "data_link").symlink_to(data)
    runs = {}
    for name, seed, shift, change in [("lr3e-4", 0, 0.1, {"optim": {"lr": 3e-4}}),
                                      ("seed1", 1, -0.1, {"train": {"seed": 1}}),
                                      ("fbank", 0, -0.2, {"upstream": {"name": "fbank", "n_mels": 80}})]:
        path = root / "exp" / name
        config = base_config(path, data if name != "seed1" else root / "data_link")
        for section_name, values in change.items():
            config[section_name] = {**config[section_name], **values}
        calibration = {"act_dcf_0.01": 0.61, "act_dcf_0.05": 0.42, "cllr": 0.377, "min_cllr": 0.25} \
            if name == "seed1" else None
        runs[name] = make_scored_run(path, config, seed, shift, layers=1 if name == "fbank" else 13,
                                     calibration=calibration)
    return runs


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One report of three_runs in svg (text stays text: run names can be searched), each figure kept for
    inspection: {file stem: Figure} (the last run's where runs share a stem)."""
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("compare")
    runs = three_runs(root)
    figures, real_save = {}, report.plots.save

    def keep(fig, stem, formats=("png",)):
        figures[Path(stem).name] = fig
        return real_save(fig, stem, formats)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report.plots, "save", keep)
        assert report.main([str(runs[n]) for n in ("lr3e-4", "seed1", "fbank")]
                           + ["--out", str(root / "cmp.md"), "--format", "svg"]) == 0
    return {"root": root, "runs": runs, "figures": figures, "text": (root / "cmp.md").read_text()}


def test_eer_vs_step_legends_of_long_run_names_stay_in_the_figure_and_off_the_other_panels():
    """Three runs with long names on two test lists: each panel's legend (beside it) lies inside the figure
    and over no other panel. With fixed margins the first legend lay under the second panel, names cut off."""
    plt = report.plots.pyplot() or pytest.skip("matplotlib not installed")
    names = ["wavlm_base_plus_ecapa_lr3e-4_seed1_a_long_run_name", "wavlm_large_superb_xvector_margin0.2_seed2",
             "fbank_xvector_bn_adamw_cosine_warmup_seed3_run"]
    panels = [{"title": name, "chosen": {f"C{i}": 200 for i in range(3)},
               "series": [{"label": f"{run} {shown}", "points": [(100, 12.0 + i), (200, 10.0 + i), (300, 11.0)],
                           "color": f"C{i}"} for i, run in enumerate(names) for shown in ("valid", name)]}
              for name in ("vox1_o", "vox1_e")]
    fig = report.plots.eer_vs_step_figure(plt, panels, "EER vs step")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_legend().get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
        assert not any(other.get_window_extent(renderer).overlaps(box) for other in fig.axes if other is not ax)
        assert ax.get_window_extent(renderer).width > 4 * fig.dpi  # the legends did not squeeze the axes away
    plt.close(fig)


def test_three_runs_share_one_det_plot_per_list(compared):
    root, figures = compared["root"], compared["figures"]
    assert sorted(p.name for p in root.glob("cmp_*")) == ["cmp_det_vox1_o.svg", "cmp_eer_vs_step.svg"]
    ax = figures["cmp_det_vox1_o"].axes[0]
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 10]
    assert len(curves) == 3  # one per run, and nothing else that long
    for name in ("lr3e-4", "seed1", "fbank"):
        label = next(line.get_label() for line in curves if line.get_label().startswith(name))
        eer = json.loads((compared["runs"][name] / "step-300" / "eval" / "vox1_o" / "metrics.json").read_text())["eer"]
        assert label == f"{name}, step 300 (EER {eer:.2f}%)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "EER" in legend and "minDCF, P_target=0.01" in legend and "minDCF, P_target=0.05" in legend
    svg = (root / "cmp_det_vox1_o.svg").read_text()
    assert all(name in svg for name in ("lr3e-4, step 300", "seed1, step 300", "fbank, step 300"))
    assert "## Comparison plots" in compared["text"] and "![cmp_det_vox1_o](cmp_det_vox1_o.svg)" in compared["text"]
    assert not list(root.rglob("*.png"))  # only the formats asked for


def test_config_difference_table_lists_exactly_the_differing_keys(compared):
    text = compared["text"]
    block = text[text.index("## Config differences"):].split("\n\n")[1].splitlines()
    assert block[0] == "| key | lr3e-4 | seed1 | fbank |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in block[2:]}
    assert sorted(rows) == ["optim.lr", "train.seed", "upstream.n_mels", "upstream.name"]
    assert rows["upstream.n_mels"] == "| upstream.n_mels | (absent) | (absent) | 80 |"
    assert rows["optim.lr"] == "| optim.lr | 0.0003 | 0.0001 | 0.0001 |"
    assert "Left out: exp_dir (where each run lies); data.dir (the same data in another place" in text


def test_eer_confidence_interval_over_speakers(compared):
    text, runs = compared["text"], compared["runs"]
    for name in ("lr3e-4", "seed1", "fbank"):
        eer = json.loads((runs[name] / "step-300" / "eval" / "vox1_o" / "metrics.json").read_text())["eer"]
        row = re.search(re.escape(f"| {runs[name]} | vox1_o | 300 |")
                        + r" [\d.]+ \| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|", text)
        assert row and row[1] == f"{eer:.2f}"
        low, high = float(row[2]), float(row[3])
        assert low <= eer <= high and high - low > 0.1
    assert text.count("bootstrap over speakers") == 1
    assert "95% confidence interval from a bootstrap over speakers (1000 resamples" in text
    assert f"{Path(str(compared['root'] / 'data')) / 'utterances.csv'}" in text  # the manifest, preferred
    # the same seed, the same interval; the numbers are the library's
    again = compared["root"] / "again.md"
    assert report.main([str(runs["seed1"]), "--out", str(again), "--no-plots"]) == 0
    row = re.search(r"\| vox1_o \| 300 \| [\d.]+ \| [\d.]+ \[[\d., ]+\]", again.read_text())[0]
    assert row in text
    scores, labels = report.read_scores(runs["seed1"] / "step-300" / "eval" / "vox1_o" / "scores.txt")
    ids = np.loadtxt(runs["seed1"] / "step-300" / "eval" / "vox1_o" / "scores.txt", usecols=(0, 1), dtype=str)
    spk = np.char.partition(ids, "/")[..., 0]
    low, high = report.metrics.eer_confidence_interval(scores, labels, spk[:, 0], spk[:, 1])
    assert f"[{100 * low:.2f}, {100 * high:.2f}]" in row


def test_calibration_columns_when_present(compared):
    text = compared["text"]
    summary = text[:text.index("## Config differences")]
    assert "| minDCF 0.05 | actDCF 0.01 | actDCF 0.05 | Cllr | min Cllr |" in summary
    seed1 = next(line for line in summary.splitlines() if "/seed1 |" in line)
    fbank = next(line for line in summary.splitlines() if "/fbank |" in line)
    assert seed1.endswith("| 0.6100 | 0.4200 | 0.377 | 0.250 |") and fbank.endswith("| - | - | - | - |")
    section = text[text.index(f"## {compared['runs']['seed1']}"):]
    assert "| Cllr | min Cllr |" in section.split("### vox1_o")[1].split("###")[0]


def test_history_shows_pruned_steps_with_test_points(compared):
    figures, runs = compared["figures"], compared["runs"]
    for fig in (figures["eer_vs_step"], figures["cmp_eer_vs_step"]):
        lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
        valid = next(line for label, line in lines.items() if label.endswith("valid"))
        test = next(line for label, line in lines.items() if label.endswith("vox1_o"))
        assert list(valid.get_xdata()) == list(STEPS)  # step 100 is pruned, its validation is still there
        assert list(test.get_xdata()) == [200, 300]
    section = compared["text"][compared["text"].index(f"## {runs['fbank']}"):]
    assert "### valid (validation history)" in section
    assert re.search(r"\| 100 \| [\d.]+ \| 0\.5000 \| 0\.3000 \| pruned \|", section)
    assert "| **300** (chosen) |" in section and "| on disk |" in section


def test_layer_weights_over_training_only_for_multi_layer_runs(compared):
    runs, figures = compared["runs"], compared["figures"]
    for name in ("lr3e-4", "seed1"):
        assert (runs[name] / "layer_weights_vs_step.svg").exists()
    assert not list(runs["fbank"].glob("layer_weights*"))
    ax = figures["layer_weights_vs_step"].axes[0]  # the last multi-layer run drawn: seed1
    layers = [line for line in ax.get_lines() if line.get_label().startswith("layer ")]
    assert len(layers) == 13
    assert all(list(line.get_xdata()) == [200, 300] for line in layers)  # the checkpoints on disk, nothing else
    saved = json.loads((runs["seed1"] / "step-300" / "layer_weights.json").read_text())
    assert np.allclose([line.get_ydata()[-1] for line in layers], saved)


def det_curve(seed, shift=0.0, label="run"):
    _, _, scores, labels = speaker_trials(seed, shift)
    return {"scores": scores, "labels": labels, "eer": report.metrics.compute_eer(scores, labels)[0], "label": label}


def test_det_plot_marks_the_min_dcf_operating_points():
    """Each minDCF marker sits where the threshold reaching minDCF puts the error rates (on the axis edge when
    a rate is 0, which a probit axis cannot show); the EER marker at (EER, EER)."""
    plt = report.plots.pyplot() or pytest.skip("matplotlib not installed")
    for curve in (det_curve(3), det_curve(4, -0.3)):
        fig = report.plots.det_figure(plt, [curve], "DET")
        ax = fig.axes[0]
        marks = {line.get_marker(): line for line in ax.get_lines() if len(line.get_xdata()) == 1}
        for p, marker in [(0.01, "s"), (0.05, "^")]:
            min_dcf, threshold = report.metrics.compute_min_dcf(curve["scores"], curve["labels"], p)
            fa, miss = report.plots.operating_point(curve["scores"], curve["labels"], threshold)
            assert (p * miss + (1 - p) * fa) / min(p, 1 - p) == pytest.approx(min_dcf)
            expected = np.clip(report.plots.ppf([fa, miss]), *ax.get_xlim())
            assert np.allclose(np.ravel(marks[marker].get_data()), expected)
        assert np.allclose(np.ravel(marks["o"].get_data()), report.plots.ppf([curve["eer"]] * 2))
        plt.close(fig)


def test_det_tick_labels_never_collide():
    """Tick positions at least a label's width apart on the probit axis, for every axis range the report
    draws, and, drawn at the report's figure size, no two tick labels overlapping on either axis."""
    plots = report.plots
    ranges = [(low, high) for low in plots.DET_TICKS if low <= 0.01 for high in (0.5, 0.99)]
    for low, high in ranges:
        ticks = plots.det_ticks(low, high)
        assert len(ticks) >= 4 and all(low <= t <= high for t in ticks)
        assert np.diff(plots.ppf(ticks)).min() >= plots.det_min_gap(low, high) - 1e-12
        assert plots.det_min_gap(low, high) > 0.1  # a real gap, not a zero that lets everything through
    plt = plots.pyplot() or pytest.skip("matplotlib not installed")
    fig = plots.det_figure(plt, [det_curve(1)], "DET")
    renderer = fig.canvas.get_renderer()
    for low, high in ranges:
        plots.det_axes(fig.axes[0], low, high)
        fig.canvas.draw()
        for labels in (fig.axes[0].get_xticklabels(), fig.axes[0].get_yticklabels()):
            boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
            assert len(boxes) >= 4
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), (low, high)
    plt.close(fig)


def test_every_format_asked_for_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    data = {200: {"valid": FAKE[200]["valid"], "vox1_o": FAKE[200]["vox1_o"]}}
    run = make_run(tmp_path / "run", data=data, scores=True)
    assert report.main([str(run), "--format", "pdf", "svg", "pdf"]) == 0  # each format once
    names = sorted(p.name for p in run.iterdir() if p.is_file() and p.suffix not in (".yaml", ".md"))
    assert names == sorted(f"{stem}.{fmt}" for stem in ("eer_vs_step", "det_vox1_o", "scores_vox1_o")
                           for fmt in ("pdf", "svg"))
    assert (run / "det_vox1_o.svg").read_text().lstrip().startswith("<?xml")
    assert (run / "det_vox1_o.pdf").read_bytes()[:5] == b"%PDF-"
    result = run_report(run, "--format", "eps")
    assert result.returncode != 0 and "invalid choice" in result.stderr


def test_speakers_from_the_manifest_when_ids_name_no_speaker(tmp_path):
    """Kaldi-style ids (no speaker folder): the data folder's utterances.csv gives the speakers; without it
    there is no interval, and the report says why."""
    enroll, test, scores, labels = speaker_trials(5, 0.0)
    kaldi = {u: f"utt{i:04d}" for i, u in enumerate(sorted(set(enroll) | set(test)))}
    run = tmp_path / "run"
    write_trials(run / "step-10" / "eval" / "test", [kaldi[u] for u in enroll], [kaldi[u] for u in test],
                 scores, labels)
    data = tmp_path / "data"
    write_manifest(data, {k: u.split("/")[0] for u, k in kaldi.items()})
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dir": str(data)}}))
    (run / "best").symlink_to("step-10")
    assert report.main([str(run), "--no-plots"]) == 0
    text = (run / "report.md").read_text()
    assert re.search(r"\| test \| 10 \| - \| [\d.]+ \[[\d.]+, [\d.]+\] \|", text)
    assert f"speakers from {data / 'utterances.csv'} (run)." in text

    (data / "utterances.csv").unlink()
    report.manifest_speakers.cache_clear()
    assert report.main([str(run), "--no-plots"]) == 0
    text = (run / "report.md").read_text()
    assert f"No EER confidence interval for test: {data / 'utterances.csv'} is not readable" in text
    assert "bootstrap" not in text


def test_bad_inputs_warn_in_one_line_and_the_report_comes_out(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = three_runs(tmp_path)
    (runs["lr3e-4"] / "config.yaml").unlink()
    bad_scores = runs["seed1"] / "step-300" / "eval" / "vox1_o" / "scores.txt"
    bad_scores.write_text("a b not-a-number 1\n")
    history = runs["fbank"] / "valid_history.jsonl"
    history.write_text(history.read_text() + "this is not json\n")
    out = tmp_path / "r.md"
    args = [str(runs[n]) for n in ("lr3e-4", "seed1", "fbank")] + ["--out", str(out), "--format", "svg"]
    assert report.main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, warnings
    assert f"missing {runs['lr3e-4'] / 'config.yaml'}" in warnings[0]
    assert str(bad_scores) in warnings[1] and f"{history}:4 is not a JSON validation record" in warnings[2]
    text = out.read_text()
    assert "Not compared (no readable config.yaml): " + str(runs["lr3e-4"]) in text
    assert "| key | seed1 | fbank |" in text
    assert "vox1_o: no readable scores.txt for seed1, not on its DET plot." in text
    assert (tmp_path / "r_det_vox1_o.svg").exists()


def test_refused_calibration_is_said(tmp_path):
    run = make_run(tmp_path / "run")
    path = run / "step-200" / "eval" / "vox1_o" / "metrics.json"
    reason = "validation holds 40 target and 150 non-target trials, fewer than 50 of each: too few to fit"
    path.write_text(json.dumps({**json.loads(path.read_text()), "min_cllr": 0.2, "calibration": {"refused": reason}}))
    assert report.main([str(run), "--no-plots"]) == 0
    text = (run / "report.md").read_text()
    assert f"No calibration for step 200: {reason}. Its scores stay raw cosines" in text


def test_no_interval_with_too_few_speakers_or_speakers_from_paths(tmp_path):
    """Two speakers: every resample is one of 3, so no interval (not `45.13 [45.13, 45.13]`); a list of
    file paths outside the manifest: no speakers (not its first folder); paths that are in it: an interval."""
    run = tmp_path / "run"
    (run / "best").parent.mkdir(parents=True)
    (run / "best").symlink_to("step-10")
    data = tmp_path / "data"
    for num_speakers, expect in ((2, "2 speakers, fewer than 10"), (24, None)):
        enroll, test, scores, labels = speaker_trials(5, 0.0, num_speakers=num_speakers, per_speaker=6)
        write_trials(run / "step-10" / "eval" / "test", enroll, test, scores, labels)
        write_manifest(data, {u: u.split("/")[0] for u in set(enroll) | set(test)})
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dir": str(data)}}))
        report.manifest_speakers.cache_clear()
        assert report.main([str(run), "--no-plots"]) == 0
        text = (run / "report.md").read_text()
        if expect:
            assert f"No EER confidence interval for test: the trials hold {expect}" in text and "[CI]" not in text
        else:
            assert "EER % [CI]" in text
    # the same trials as file paths: absolute paths under data/, then paths the manifest does not know
    as_path = {u: str(data / "wav" / u) for u in set(enroll) | set(test)}
    write_trials(run / "step-10" / "eval" / "test", [as_path[u] for u in enroll], [as_path[u] for u in test],
                 scores, labels)
    write_manifest(data, {f"wav/{u}": u.split("/")[0] for u in as_path})  # ids = paths relative to data/
    report.manifest_speakers.cache_clear()
    assert report.main([str(run), "--no-plots"]) == 0
    assert "EER % [CI]" in (run / "report.md").read_text()  # found by path: absolute = data/ + wav/...
    write_manifest(data, {f"other/{u}": u.split("/")[0] for u in as_path})
    report.manifest_speakers.cache_clear()
    assert report.main([str(run), "--no-plots"]) == 0
    text = (run / "report.md").read_text()
    assert "No EER confidence interval for test:" in text and "are neither ids nor paths of" in text


def test_averaged_fallback_best_is_reported_with_its_reason(tmp_path):
    """`best` -> avg-last3 (validation tied, asv.run.settle): the summary reports that folder, and says why."""
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path / "run", best="avg-last3", scores=True)
    (run / "avg-last3" / "eval" / "vox1_o").mkdir(parents=True)
    (run / "avg-last3" / "eval" / "vox1_o" / "metrics.json").write_text(json.dumps(
        {"eer": 1.23, "eer_threshold": 0.5, "min_dcf_0.01": 0.12, "min_dcf_0.05": 0.05}))
    write_scores(run / "avg-last3" / "eval" / "vox1_o" / "scores.txt", seed=9)
    line = "checkpoint choice: validation cannot separate steps 100, 200 (eer 0, the same minDCFs): best is avg-last3"
    (run / "choice.json").write_text(json.dumps({"line": line}))
    assert report.main([str(run)]) == 0
    text = (run / "report.md").read_text()
    assert f"| {run} | vox1_o | avg-last3 | - | 1.23" in text
    assert f"Chosen checkpoint: avg-last3 ({line})." in text
    assert (run / "det_vox1_o.png").is_file()


def test_averaged_checkpoints_appear_in_the_report(tmp_path):
    run = make_run(tmp_path / "exp" / "run1")
    avg = run / "avg-last2" / "eval" / "test"
    avg.mkdir(parents=True)
    (run / "avg-last2" / "averaged.json").write_text(json.dumps({"checkpoints": ["step-100", "step-200"],
                                                                 "steps": [100, 200]}))
    (avg / "metrics.json").write_text(json.dumps({"eer": 7.25, "min_dcf_0.01": 0.5, "min_dcf_0.05": 0.3}))
    result = run_report(run)
    assert result.returncode == 0, result.stderr
    text = (run / "report.md").read_text()
    assert "### Averaged checkpoints" in text
    assert "| avg-last2 | 100, 200 | test | 7.25 | 0.5000 | 0.3000 |" in text


def test_plots_are_embedded_relative_to_the_md_and_out_may_be_a_new_folder(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [make_run(tmp_path / "exp" / name, scores=True) for name in ("a", "b")]
    out = tmp_path / "new" / "deeper" / "cmp.md"  # a folder that does not exist yet
    assert report.main([str(r) for r in runs] + ["--out", str(out)]) == 0
    text = out.read_text()
    assert "![cmp_det_vox1_o](cmp_det_vox1_o.png)" in text and (out.parent / "cmp_det_vox1_o.png").is_file()
    assert "![det_vox1_o](../../exp/a/det_vox1_o.png)" in text
    for target in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (out.parent / target).is_file(), target  # every embedded image resolves from the .md's folder


def test_runs_on_different_corpora_are_not_compared_under_one_list_name(tmp_path):
    one, two = make_run(tmp_path / "exp" / "run1"), make_run(tmp_path / "exp" / "run2")
    (one / "run.json").write_text(json.dumps({"data_fingerprint": "aaaa"}))
    (two / "run.json").write_text(json.dumps({"data_fingerprint": "bbbb"}))
    result = run_report(one, two, "--out", tmp_path / "report.md")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained on different data" in lines[0] and "'vox1_h'" in lines[0], result.stderr
    assert not (tmp_path / "report.md").exists()
    (two / "run.json").write_text(json.dumps({"data_fingerprint": "aaaa"}))  # the same data: compared
    assert run_report(one, two, "--out", tmp_path / "report.md").returncode == 0


def test_non_numeric_metrics_are_warned_and_shown_as_dashes(tmp_path):
    run = make_run(tmp_path / "exp" / "run1")
    path = run / "step-300" / "eval" / "vox1_o" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eer": "12%", "min_dcf_0.01": float("inf")}))
    result = run_report(run)
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}: eer is '12%', not a finite number: shown as -" in result.stderr
    assert f"warning: {path}: min_dcf_0.01 is inf, not a finite number: shown as -" in result.stderr
    assert "inf" not in (run / "report.md").read_text()


def test_an_overridden_result_set_is_shown_under_its_own_name(tmp_path):
    """evaluate_asv.py's eval/<list>@<hash>/ (eval_batch=1: 105 trials) beside the run's own eval/<list>/: the run's
    row keeps the run's result; the override's set is a row and a section of its own name."""
    run = make_run(tmp_path / "exp" / "run1")
    overridden = run / "step-200" / "eval" / "vox1_o@1a2b3c4d"
    overridden.mkdir()
    (overridden / "metrics.json").write_text(json.dumps({"eer": 27.46, "eer_threshold": 0.5, "min_dcf_0.01": 0.9,
                                                         "min_dcf_0.05": 0.8, "num_trials": 105, "num_targets": 50,
                                                         "overrides": {"eval_batch": 1}}))
    result = run_report(run)
    assert result.returncode == 0, result.stderr
    text = (run / "report.md").read_text()
    assert summary_row(run, "vox1_o", 200) in text  # 2.10, not 27.46
    assert f"| {run} | vox1_o@1a2b3c4d | 200 | 2.00 | 27.46 | 0.9000 | 0.8000 |" in text
    assert "### vox1_o@1a2b3c4d" in text
