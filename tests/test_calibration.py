"""asv/scores.py: the score -> LLR fit, scores.json, the named thresholds on validation
scores, and evaluate_asv.py --pair --threshold on a tiny trained run."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asv import metrics
from asv.metrics import Calibration

ROOT = Path(__file__).resolve().parents[1]

# Gaussian cosines with a common spread: the true LLR is affine, scale (mt - mn) / s^2 = 50 and
# offset -(mt^2 - mn^2) / (2 s^2) = -17.5
MT, MN, SD = 0.6, 0.1, 0.1


def gaussian_scores(num_targets, num_nontargets, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(MT, SD, num_targets), rng.normal(MN, SD, num_nontargets)]
    return scores, np.r_[np.ones(num_targets, int), np.zeros(num_nontargets, int)]


def checkpoint_with_validation(folder: Path, scores, labels) -> Path:
    """A checkpoint folder holding only what thresholds read: eval/valid/scores.txt."""
    lines = [f"e{i} t{i} {s:.6f} {y}\n" for i, (s, y) in enumerate(zip(scores, labels))]
    (folder / "eval" / "valid").mkdir(parents=True)
    (folder / "eval" / "valid" / "scores.txt").write_text("".join(lines))
    return folder


def rates(scores, labels, threshold):
    """(FAR, FRR) of accepting score >= threshold."""
    target = np.asarray(labels) == 1
    return np.mean(scores[~target] >= threshold), np.mean(scores[target] < threshold)


# ---------------------------------------------------------------------------- fit, save, load

@pytest.mark.parametrize("prior", [0.5, 0.1])
def test_fit_recovers_the_true_llr_whatever_the_target_share(prior):
    scores, labels = gaussian_scores(5000, 45000)  # 1 target in 10
    cal = metrics.fit_calibration(scores, labels, prior=prior)
    # tolerance: logistic-regression estimates from 50,000 Gaussian scores (sampling error ~few %)
    assert cal.scale == pytest.approx(50, rel=0.1) and cal.offset == pytest.approx(-17.5, rel=0.1)
    assert (cal.num_trials, cal.num_targets, cal.prior) == (50000, 5000, prior)
    assert metrics.compute_cllr(cal.llr(scores), labels) < 0.5 * metrics.compute_cllr(scores, labels)


def test_fit_improves_cllr_of_raw_scores_on_held_out_trials():
    cal = metrics.fit_calibration(*gaussian_scores(300, 3000, seed=1))
    scores, labels = gaussian_scores(1000, 1000, seed=2)
    calibrated = metrics.compute_cllr(cal.llr(scores), labels)
    assert metrics.compute_min_cllr(scores, labels) <= calibrated < metrics.compute_cllr(scores, labels)
    assert calibrated < 1  # better than knowing nothing, which raw cosines used as LLRs are not much better than


def shifted_test_scores():
    """Test trials broader than validation's (another channel): what a small validation set overstates."""
    rng = np.random.default_rng(9)
    return np.r_[rng.normal(0.55, 0.15, 1000), rng.normal(0.15, 0.15, 4000)], np.r_[np.ones(1000, int), np.zeros(4000, int)]


@pytest.mark.parametrize("targets, nontargets, why", [(40, 150, "fewer than 50"),  # 4 speakers x 5 utterances
                                                      (60, 600, "perfectly separated")])
def test_separated_or_small_validation_is_refused_and_never_worse_than_raw(targets, nontargets, why):
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(MT, 0.05, targets), rng.normal(MN, 0.05, nontargets)]  # 10 sd apart: separated
    labels = np.r_[np.ones(targets, int), np.zeros(nontargets, int)]
    cal = metrics.fit_calibration(scores, labels)
    assert why in cal.refused and "\n" not in cal.refused and not cal.fitted
    test, test_labels = shifted_test_scores()
    # the refused calibration is the identity: what the user gets is the raw score, never worse than it
    assert metrics.compute_cllr(cal.llr(test), test_labels) <= metrics.compute_cllr(test, test_labels)
    m = metrics.calibration_metrics(test, test_labels, cal)
    assert m["calibration"] == {"refused": cal.refused} and "cllr" not in m  # nothing calibrated is claimed
    with pytest.raises(ValueError, match="no calibration"):
        cal.score_at(0.0)  # no Bayes threshold from a refused calibration


def test_regularised_fit_on_nearly_separated_validation_lowers_test_cllr():
    scores, labels = gaussian_scores(300, 3000, seed=2)  # 5 sd apart: a handful of trials overlap
    assert metrics.compute_eer(scores, labels)[0] < 0.01
    cal = metrics.fit_calibration(scores, labels)
    assert cal.fitted
    test, test_labels = shifted_test_scores()
    calibrated, raw = metrics.compute_cllr(cal.llr(test), test_labels), metrics.compute_cllr(test, test_labels)
    assert metrics.compute_min_cllr(test, test_labels) <= calibrated < raw
    assert calibrated < 0.5  # the unregularised fit (C = 1e6) gives 0.59 here: its scale (58) trusts the few overlaps


def test_refusal_is_saved_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    ckpt = checkpoint_with_validation(tmp_path, np.r_[rng.normal(MT, 0.05, 40), rng.normal(MN, 0.05, 150)],
                                      np.r_[np.ones(40, int), np.zeros(150, int)])
    cal = metrics.ensure_calibration(ckpt)
    saved = json.loads((ckpt / "calibration.json").read_text())
    assert saved["refused"] == cal.refused != "" and metrics.load_calibration(ckpt) == cal
    with pytest.raises(ValueError, match="no calibration"):
        metrics.resolve_threshold(ckpt, "bayes:0.01")


def test_save_load_round_trip(tmp_path):
    assert metrics.load_calibration(tmp_path) is None
    cal = Calibration(scale=12.5, offset=-3.25, prior=0.5, num_trials=1128, num_targets=264)
    metrics.save_calibration(tmp_path, cal)
    assert metrics.load_calibration(tmp_path) == cal
    assert json.loads((tmp_path / "calibration.json").read_text())["scale"] == 12.5
    for broken in ("{", '{"scale": 1}', '{"scale": "x", "offset": 0, "prior": 0.5, "num_trials": 1, "num_targets": 1, '
                   '"refused": ""}', '{"scale": 1, "offset": 0, "prior": 0.5, "num_trials": 1, "num_targets": 1, "refused": 3}'):
        (tmp_path / "calibration.json").write_text(broken)
        with pytest.raises(ValueError, match="calibration.json") as e:
            metrics.load_calibration(tmp_path)
        assert "\n" not in str(e.value)


def test_ensure_calibration_fits_once_and_reads_back(tmp_path):
    ckpt = checkpoint_with_validation(tmp_path, *gaussian_scores(200, 800))
    cal = metrics.ensure_calibration(ckpt)
    assert (ckpt / "calibration.json").is_file() and cal.num_trials == 1000
    metrics.save_calibration(ckpt, Calibration(1.0, 0.0, 0.5, 1, 1))
    assert metrics.ensure_calibration(ckpt).scale == 1.0  # read, not refit


def test_calibration_metrics_with_and_without_a_calibration():
    scores, labels = gaussian_scores(300, 700)
    assert set(metrics.calibration_metrics(scores, labels, None)) == {"min_cllr"}
    cal = metrics.fit_calibration(scores, labels)
    m = metrics.calibration_metrics(scores, labels, cal)
    assert set(m) == {"min_cllr", "act_dcf_0.01", "act_dcf_0.05", "cllr", "calibration"}
    assert m["min_cllr"] <= m["cllr"] and m["act_dcf_0.01"] >= metrics.compute_min_dcf(scores, labels, 0.01)[0]
    assert m["calibration"] == {"scale": cal.scale, "offset": cal.offset}


# ---------------------------------------------------------------------------- named thresholds

def test_thresholds_keep_their_promise_on_the_validation_scores(tmp_path):
    scores, labels = gaussian_scores(400, 1600)
    scores = np.round(scores, 6)  # as scores.txt holds them
    ckpt = checkpoint_with_validation(tmp_path, scores, labels)
    below = lambda t: scores[scores < t].max()  # noqa: E731 -- the next lower threshold of the sweep

    t, text = metrics.resolve_threshold(ckpt, "far:0.01")
    far, frr = rates(scores, labels, t)
    assert far <= 0.01 < rates(scores, labels, below(t))[0]  # the lowest threshold within the target
    assert "FAR target 0.01" in text and f"FAR {far:.2%}, FRR {frr:.2%} of 2000 trials" in text

    t, _ = metrics.resolve_threshold(ckpt, "frr:0.05")
    frr = rates(scores, labels, t)[1]
    assert frr <= 0.05 < rates(scores, labels, np.nextafter(t, np.inf))[1]  # the highest within the target

    t, text = metrics.resolve_threshold(ckpt, "eer")
    far, frr = rates(scores, labels, t)
    eer = metrics.compute_eer(scores, labels)[0]
    assert abs(far - eer) < 0.005 and abs(frr - eer) < 0.005 and text.startswith("EER threshold on validation")

    t, _ = metrics.resolve_threshold(ckpt, "min_dcf:0.01")
    far, frr = rates(scores, labels, t)
    assert (0.01 * frr + 0.99 * far) / 0.01 == pytest.approx(metrics.compute_min_dcf(scores, labels, 0.01)[0])

    t, text = metrics.resolve_threshold(ckpt, "bayes:0.01")
    cal = metrics.load_calibration(ckpt)  # fit and saved on the way
    assert float(cal.llr(t)) == pytest.approx(-math.log(0.01 / 0.99)) and "calibrated LLR >= 4.595" in text


def test_threshold_beyond_every_score_stays_finite():
    scores, labels = np.array([0.1, 0.2, 0.3, 0.9]), np.array([1, 0, 1, 0])  # a non-target on top
    t, _ = metrics.threshold_on(scores, labels, "min_dcf:0.001")  # rejecting everything is cheapest
    assert 0.9 < t < 0.9 + 1e-9 and rates(scores, labels, t) == (0, 1)


@pytest.mark.parametrize("name", ["", "far", "far:", "far:1.5", "far:0", "far:abc", "min_dcf:nan", "eer:0.1",
                                  "dcf:0.01", "FAR:0.01"])
def test_bad_threshold_names_are_one_line_errors(name, tmp_path):
    with pytest.raises(ValueError) as e:
        metrics.resolve_threshold(tmp_path, name)  # before the (missing) validation file is looked for
    assert "\n" not in str(e.value) and "eer, min_dcf:<p>, far:<rate>, frr:<rate> or bayes:<p>" in str(e.value)


def test_missing_validation_scores_say_how_to_get_them(tmp_path):
    with pytest.raises(ValueError) as e:
        metrics.resolve_threshold(tmp_path, "eer")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "eval" / "valid" / "scores.txt") in message
    assert "--trials valid" in message and "--valid-speakers 0" in message


def test_bayes_threshold_needs_an_increasing_calibration(tmp_path):
    scores, labels = gaussian_scores(200, 800)
    ckpt = checkpoint_with_validation(tmp_path, -scores, labels)  # targets score lower
    with pytest.raises(ValueError, match="scale") as e:
        metrics.resolve_threshold(ckpt, "bayes:0.5")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- the CLI, on a tiny run

def run(*args, check=True):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_pair_with_a_named_threshold(tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    run("prepare_voxceleb.py", "--demo", "--out", data)
    run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}",
        "train.total_steps=10", "num_workers=0")
    test = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())
    assert {"act_dcf_0.01", "cllr", "min_cllr", "calibration"} <= set(test)
    assert (exp / "best" / "eval" / "test" / "scores_calibrated.txt").is_file()

    _, a, b = (data / "trials" / "test.txt").read_text().splitlines()[0].split()
    a, b = data / "corpus" / a, data / "corpus" / b  # utterance ids -> files
    out = run("evaluate_asv.py", "--ckpt_dir", exp / "best", "--pair", a, b, "--threshold", "far:0.01").stdout
    assert re.search(r"^cosine score -?[\d.]+ \| calibrated LLR -?[\d.]+ \| threshold -?[\d.]+ \(FAR target 0.01 "
                     r"on validation speakers: FAR [\d.]+%, FRR [\d.]+% of \d+ trials\) \| "
                     r"(same speaker|different speakers)$", out, re.M), out

    bad = run("evaluate_asv.py", "--ckpt_dir", exp / "best", "--pair", a, b, "--threshold", "far:2", check=False)
    assert bad.returncode != 0 and bad.stderr.startswith("error: threshold 'far:2': expected eer")
    assert len(bad.stderr.strip().splitlines()) == 1 and "embedding" not in bad.stdout  # before any model work
