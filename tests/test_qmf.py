"""QMF calibration (asv/metrics.py fit_qmf, score.calibration=qmf): the durations of the enrolment and the test
audio and each side's imposter mean (its top-k cohort scores, as AS-norm takes them) added to the logistic
regression, fit on validation trials, reported beside the plain calibration."""
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
    audio does to real embeddings. One affine map cannot be right for both 1 s and 30 s trials. The imposter
    means (the last two) say nothing here: zero."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    enroll, test = (np.exp(rng.uniform(np.log(0.5), np.log(30), n)) for _ in range(2))
    d = np.minimum(enroll, test)
    scores = np.where(labels, 0.7 - 0.3 / d, 0.1) + rng.normal(0, 1, n) * 0.4 / np.sqrt(d)
    return scores, labels.astype(int), enroll, test, np.zeros(n), np.zeros(n)


def imposter_dependent_trials(n, seed):
    """Cosine scores shifted by how close each side is to everyone (hubness): each side's imposter mean m
    (uniform in 0-0.3) adds to every score it takes part in, target or not, as an utterance near the centre of
    the embedding space scores high against all. Durations equal: they say nothing here."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    me, mt = rng.uniform(0, 0.3, n), rng.uniform(0, 0.3, n)
    scores = np.where(labels, 0.6, 0.2) + me + mt + rng.normal(0, 0.1, n)
    secs = np.full(n, 4.0)
    return scores, labels.astype(int), secs, secs, me, mt


def test_qmf_lowers_cllr_against_the_plain_calibration_when_reliability_depends_on_duration():
    valid, test = duration_dependent_trials(4000, seed=0), duration_dependent_trials(20000, seed=1)
    plain = metrics.fit_calibration(*valid[:2])
    qmf = metrics.fit_qmf(*valid)  # fit on the validation trials only
    scores, labels = test[:2]
    cllr_plain = metrics.compute_cllr(plain.llr(scores), labels)
    cllr_qmf = metrics.compute_cllr(qmf.llr(scores, *test[2:]), labels)
    # 20000 held-out trials: Cllr's sampling spread is ~0.01; the gap asked for is several times that
    assert cllr_qmf < cllr_plain - 0.05, (cllr_qmf, cllr_plain)
    # and below what ANY monotonic map of the score alone reaches (PAV): the durations carry information
    assert cllr_qmf < metrics.compute_min_cllr(scores, labels) - 0.02
    assert qmf.weights[3] > 0  # the score counts for more the longer the shorter side is


def test_qmf_takes_out_what_the_imposter_means_add():
    valid, test = imposter_dependent_trials(4000, seed=0), imposter_dependent_trials(20000, seed=1)
    plain, qmf = metrics.fit_calibration(*valid[:2]), metrics.fit_qmf(*valid)  # fit on the validation trials only
    scores, labels = test[:2]
    cllr_plain = metrics.compute_cllr(plain.llr(scores), labels)
    cllr_qmf = metrics.compute_cllr(qmf.llr(scores, *test[2:]), labels)
    # 20000 held-out trials: Cllr's sampling spread is ~0.01; the gaps asked for are several times that
    assert cllr_qmf < cllr_plain - 0.1, (cllr_qmf, cllr_plain)
    assert cllr_qmf < metrics.compute_min_cllr(scores, labels) - 0.05  # beyond any map of the score alone
    assert qmf.weights[4] < 0 and qmf.weights[5] < 0  # a side close to everyone: its score says less


def speaker_trials(n_speakers, per_speaker, seed, shift):
    """All trials among n_speakers x per_speaker utterances. Each speaker has an imposter mean m (uniform in
    0-0.3, the same for its utterances, as a speaker near the centre of the embedding space has) and each
    utterance a duration (2-20 s) that says nothing. shift=True: m adds to every score of the speaker's
    utterances (hubness, which carries over to any speaker); shift=False: m is unrelated to the scores, and each
    speaker's target scores have an offset of their own (0.1 sd) that a few speakers can pass off as m's."""
    rng = np.random.default_rng(seed)
    m, own = rng.uniform(0, 0.3, n_speakers), rng.normal(0, 0.1, n_speakers)
    spk = np.repeat(np.arange(n_speakers), per_speaker)
    secs = rng.uniform(2, 20, len(spk))
    a, b = np.triu_indices(len(spk), 1)
    labels = (spk[a] == spk[b]).astype(int)
    scores = np.where(labels, 0.6 + own[spk[a]], 0.2) + rng.normal(0, 0.1, len(a))
    if shift:
        scores = scores + m[spk[a]] + m[spk[b]]
    return scores, labels, secs[a], secs[b], m[spk[a]], m[spk[b]], list(zip(spk[a], spk[b]))


def test_qmf_keeps_a_measure_only_when_it_carries_over_to_held_out_speakers():
    # 4 validation speakers whose own target offsets line up with an imposter mean that means nothing (seed 3:
    # the full fit gives it a weight): the held-out-speaker Cllr picks a set without it
    *valid, speakers = speaker_trials(4, 12, seed=3, shift=False)
    qmf = metrics.fit_qmf(*valid, speakers=speakers)
    assert metrics.fit_qmf(*valid).weights[4:] != (0.0, 0.0)  # without speakers: fitted, on 4 speakers' quirks
    assert qmf.chosen != "durations+imposter" and qmf.weights[4:] == (0.0, 0.0), qmf
    assert qmf.chosen == min(qmf.held_out_cllr, key=qmf.held_out_cllr.get)
    # 30 speakers whose imposter mean does shift their scores: kept, and below the plain calibration on others
    *valid, speakers = speaker_trials(30, 6, seed=0, shift=True)
    qmf = metrics.fit_qmf(*valid, speakers=speakers)
    assert qmf.chosen == "durations+imposter" and qmf.weights[4] < 0 and qmf.weights[5] < 0, qmf
    scores, labels, *measures, _ = speaker_trials(30, 6, seed=1, shift=True)
    plain = metrics.fit_calibration(*valid[:2])
    # 16110 held-out trials (540 targets): Cllr's sampling spread is ~0.02; the gap asked for is several times it
    assert metrics.compute_cllr(qmf.llr(scores, *measures), labels) < metrics.compute_cllr(
        plain.llr(scores), labels) - 0.1


def test_qmf_with_equal_durations_is_the_plain_calibration():
    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.3).astype(int)
    scores = np.where(labels, 0.6, 0.1) + rng.normal(0, 0.1, 5000)
    # no spread in duration or imposter mean: those columns cannot be told from the offset; the LLRs are the plain ones
    secs, imposter = np.full(5000, 4.0), np.full(5000, 0.2)
    qmf = metrics.fit_qmf(scores, labels, secs, secs, imposter, imposter)
    plain = metrics.fit_calibration(scores, labels)
    assert qmf.llr(scores, secs, secs, imposter, imposter) == pytest.approx(plain.llr(scores), abs=1e-3 * np.ptp(plain.llr(scores)))


def test_qmf_file_round_trip_and_bad_file(tmp_path):
    cal = metrics.fit_qmf(*duration_dependent_trials(2000, seed=3))
    metrics.save_qmf(tmp_path, cal)
    assert metrics.load_qmf(tmp_path) == cal
    (tmp_path / metrics.QMF_FILE).write_text('{"weights": [1]}')
    with pytest.raises(ValueError, match="calibration_qmf.json: unreadable"):
        metrics.load_qmf(tmp_path)


def test_evaluation_reports_qmf_beside_the_plain_calibration(tmp_path):
    """A real evaluation of a short demo training. The demo has 4 validation speakers: too few to carry a quality
    measure over to the 8 test speakers (measured: the imposter means' weights change sign from one run length
    to another, and with them the test Cllr was 0.676 against 0.447 plain after 100 steps), so the held-out
    speaker choice is asserted, not that QMF beats the plain calibration on these trials (docs/recipes.md)."""
    data, exp = tmp_path / "data", tmp_path / "exp"
    subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", str(data)], cwd=REPO, check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}",
                             f"exp_dir={exp}", "train.total_steps=30", "num_workers=0", "train.log_with=none",
                             "score.calibration=qmf"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())
    assert {"cllr", "act_dcf_0.01"} <= set(test) and {"cllr", "act_dcf_0.01", "act_dcf_0.05"} <= set(test["qmf"])
    assert np.isfinite(test["qmf"]["cllr"])
    # fit on the validation trials only: as many as the validation scores file has lines
    fitted = json.loads((exp / "best" / metrics.QMF_FILE).read_text())
    valid_lines = (exp / "best" / "eval" / "valid" / "scores.txt").read_text().count("\n")
    assert fitted["num_trials"] == valid_lines
    assert fitted["measures"] == list(metrics.QMF_MEASURES) and "test_imposter_mean" in fitted["measures"]
    held = fitted["held_out_cllr"]  # every set measured on held-out validation speakers; the lowest one fitted
    assert set(held) == set(metrics.QMF_SETS) and fitted["chosen"] == min(held, key=held.get)
    unused = fitted["weights"][metrics.QMF_SETS[fitted["chosen"]]:]
    assert unused == [0.0] * len(unused) and f"QMF ({fitted['chosen']}) Cllr" in result.stdout
    assert len((exp / "best" / "eval" / "test" / "scores_qmf.txt").read_text().splitlines()) == len(
        (exp / "best" / "eval" / "test" / "scores.txt").read_text().splitlines())
    print(f"demo test trials: Cllr plain {test['cllr']:.4f}, QMF ({fitted['chosen']}) {test['qmf']['cllr']:.4f}; "
          f"actDCF0.01 plain {test['act_dcf_0.01']:.4f}, QMF {test['qmf']['act_dcf_0.01']:.4f}")
