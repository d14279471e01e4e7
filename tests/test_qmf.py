"""QMF calibration (asv/metrics.py fit_qmf, score.calibration=qmf): the durations of the enrolment and the test
audio added to the logistic regression, fit on validation trials, reported beside the plain calibration."""
import json
import subprocess
import sys

import numpy as np
import pytest

from asv import metrics
from tests.conftest import REPO


def duration_dependent_trials(n, seed):
    """Cosine scores whose reliability depends on the duration: the shorter side's duration d (log-uniform in
    0.5-30 s) sets the score's spread (0.4 / sqrt(d)) and pulls targets' scores down (0.7 - 0.3 / d), as short
    audio does to real embeddings. One affine map cannot be right for both 1 s and 30 s trials."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    enroll, test = (np.exp(rng.uniform(np.log(0.5), np.log(30), n)) for _ in range(2))
    d = np.minimum(enroll, test)
    scores = np.where(labels, 0.7 - 0.3 / d, 0.1) + rng.normal(0, 1, n) * 0.4 / np.sqrt(d)
    return scores, labels.astype(int), enroll, test


def test_qmf_lowers_cllr_against_the_plain_calibration_when_reliability_depends_on_duration():
    valid, test = duration_dependent_trials(4000, seed=0), duration_dependent_trials(20000, seed=1)
    plain = metrics.fit_calibration(*valid[:2])
    qmf = metrics.fit_qmf(*valid)  # fit on the validation trials only
    scores, labels, enroll, test_secs = test
    cllr_plain = metrics.compute_cllr(plain.llr(scores), labels)
    cllr_qmf = metrics.compute_cllr(qmf.llr(scores, enroll, test_secs), labels)
    # 20000 held-out trials: Cllr's sampling spread is ~0.01; the gap asked for is several times that
    assert cllr_qmf < cllr_plain - 0.05, (cllr_qmf, cllr_plain)
    # and below what ANY monotonic map of the score alone reaches (PAV): the durations carry information
    assert cllr_qmf < metrics.compute_min_cllr(scores, labels) - 0.02
    assert qmf.weights[3] > 0  # the score counts for more the longer the shorter side is


def test_qmf_with_equal_durations_is_the_plain_calibration():
    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.3).astype(int)
    scores = np.where(labels, 0.6, 0.1) + rng.normal(0, 0.1, 5000)
    # no spread in duration: the duration columns cannot be told from the offset; the LLRs are the plain ones
    secs = np.full(5000, 4.0)
    qmf, plain = metrics.fit_qmf(scores, labels, secs, secs), metrics.fit_calibration(scores, labels)
    assert qmf.llr(scores, secs, secs) == pytest.approx(plain.llr(scores), abs=1e-3 * np.ptp(plain.llr(scores)))


def test_qmf_file_round_trip_and_bad_file(tmp_path):
    cal = metrics.fit_qmf(*duration_dependent_trials(2000, seed=3))
    metrics.save_qmf(tmp_path, cal)
    assert metrics.load_qmf(tmp_path) == cal
    (tmp_path / metrics.QMF_FILE).write_text('{"weights": [1]}')
    with pytest.raises(ValueError, match="calibration_qmf.json: unreadable"):
        metrics.load_qmf(tmp_path)


def test_evaluation_reports_qmf_beside_the_plain_calibration(tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", str(data)], cwd=REPO, check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}",
                             f"exp_dir={exp}", "train.total_steps=30", "num_workers=0", "train.log_with=none",
                             "score.calibration=qmf"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())
    assert {"cllr", "act_dcf_0.01"} <= set(test) and {"cllr", "act_dcf_0.01", "act_dcf_0.05"} <= set(test["qmf"])
    assert np.isfinite(test["qmf"]["cllr"]) and "QMF Cllr" in result.stdout
    # fit on the validation trials only: as many as the validation scores file has lines
    fitted = json.loads((exp / "best" / metrics.QMF_FILE).read_text())
    valid_lines = (exp / "best" / "eval" / "valid" / "scores.txt").read_text().count("\n")
    assert fitted["num_trials"] == valid_lines
    assert len((exp / "best" / "eval" / "test" / "scores_qmf.txt").read_text().splitlines()) == len(
        (exp / "best" / "eval" / "test" / "scores.txt").read_text().splitlines())
    print(f"demo test trials: Cllr plain {test['cllr']:.4f}, QMF {test['qmf']['cllr']:.4f}; "
          f"actDCF0.01 plain {test['act_dcf_0.01']:.4f}, QMF {test['qmf']['act_dcf_0.01']:.4f}")
