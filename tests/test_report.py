"""Checks of report.py on a fake exp/ tree: the headline numbers come from the checkpoint chosen on validation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # noqa: E402

# step: {list: (eer %, minDCF 0.01, minDCF 0.05)}. Step 200 is best on "valid", step 300 best on both test lists.
FAKE = {
    100: {"valid": (3.00, 0.3000, 0.2000), "vox1_o": (2.50, 0.2500, 0.1500), "vox1_h": (4.00, 0.4000, 0.3000)},
    200: {"valid": (2.00, 0.2500, 0.1800), "vox1_o": (2.10, 0.2100, 0.1100), "vox1_h": (3.60, 0.3600, 0.2600)},
    300: {"valid": (2.50, 0.2000, 0.1600), "vox1_o": (1.90, 0.1900, 0.0900), "vox1_h": (3.30, 0.3300, 0.2300)},
}


def make_run(path, best="step-200", config=None, data=FAKE):
    for step, lists in data.items():
        for name, (eer, dcf1, dcf5) in lists.items():
            d = path / f"step-{step}" / "eval" / name
            d.mkdir(parents=True)
            metrics = {"eer": eer, "eer_threshold": 0.5, "min_dcf_0.01": dcf1, "min_dcf_0.05": dcf5,
                       "num_trials": 1000, "num_targets": 100}
            (d / "metrics.json").write_text(json.dumps(metrics))
    (path / "config.yaml").write_text(config or "train:\n  valid_metric: eer\n  valid_higher_better: false\n")
    if best:
        (path / "best").symlink_to(best)  # relative, as training writes it
    return path


def run_report(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "report.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True)


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
    assert "Chosen checkpoint: step 200 (`best` symlink)." in text
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
    assert "No checkpoint chosen: no `best` symlink and no valid list with 'eer'." in text
    assert f"| {run} | vox1_o | none | - | - | - | - |" in text


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
    result = run_report(run)
    assert (run / "eer_vs_step.png").stat().st_size > 0
    assert "install matplotlib" not in result.stdout
    assert run_report(run, "--no-plots").returncode == 0


def test_without_matplotlib_tables_still_come_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    run = make_run(tmp_path / "run")
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("(install matplotlib for plots)") == 1
    assert summary_row(run, "vox1_o", 200) in (run / "report.md").read_text()
    assert not (run / "eer_vs_step.png").exists()


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
