"""Checks of report.py on a fake exp/ tree: the headline numbers come from the checkpoint chosen on validation."""
import json
import subprocess
import sys

import numpy as np
import pytest

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
    """A fake run; `scores`: scores.txt for every test list, `weights`: {step: layer weights}."""
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
    (path / "config.yaml").write_text(config or "train:\n  valid_metric: eer\n  valid_higher_better: false\n")
    if best:
        (path / "best").symlink_to(best)  # relative, as training writes it
    return path


def run_report(*args, cwd=REPO, plots=False):
    """report.py as a command; --no-plots unless `plots`, as importing matplotlib costs ~1 s per call."""
    command = [sys.executable, str(REPO / "report.py"), *map(str, args)] + ([] if plots else ["--no-plots"])
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def summary_row(run, name, step):
    eer, dcf1, dcf5 = FAKE[step][name]
    return f"| {run} | {name} | {step} | {FAKE[step]['valid'][0]:.2f} | {eer:.2f} | {dcf1:.4f} | {dcf5:.4f} |"


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
    assert summary_row(run, "vox1_o", 200) in text
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
            "layer_weights.png"]
    assert sorted(p.name for p in run.glob("*.png")) == sorted(pngs)
    text = (run / "report.md").read_text()
    for name in pngs:
        assert is_png(run / name), name
        assert f"- {run / name}" in text
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
    assert np.allclose(report.ppf([0.5, 0.975, 0.001]), [0.0, 1.959964, -3.090232], atol=1e-6)
    assert np.isfinite(report.ppf([0.0, 1.0])).all()  # the DET sweep's end points stay plottable


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
