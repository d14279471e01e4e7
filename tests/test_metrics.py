"""Checks of metrics.py: hand-worked cases, an independent computation, bad input.

No timing here; speed belongs in benchmark scripts.
"""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from asv.metrics import compute_eer, compute_metrics, compute_min_dcf, det_curve_points, error_rates


# ---------------------------------------------------------------- hand-worked cases

def test_perfect_separation_gives_zero_errors():
    scores = [0.1, 0.2, 0.3, 0.8, 0.9]
    labels = [0, 0, 0, 1, 1]
    eer, threshold = compute_eer(scores, labels)
    assert eer == 0.0
    assert 0.3 < threshold <= 0.8  # accepting score >= threshold gets every trial right
    assert compute_min_dcf(scores, labels, 0.01)[0] == 0.0
    assert compute_min_dcf(scores, labels, 0.5)[0] == 0.0


def test_inverted_scores_give_eer_100_percent():
    scores = [0.1, 0.2, 0.8, 0.9, 0.95]
    labels = [1, 1, 0, 0, 0]
    assert compute_eer(scores, labels)[0] == 1.0
    # Nothing beats a trivial system (accept all or reject all), so the normalised cost is 1.
    assert compute_min_dcf(scores, labels, 0.01)[0] == pytest.approx(1.0)


def test_all_scores_equal_gives_eer_50_percent():
    # One distinct score: the sweep has just (fnr, fpr) = (0, 1) and (1, 0); the line meets fnr = fpr at 0.5.
    eer, threshold = compute_eer([0.7] * 6, [1, 0, 1, 0, 0, 0])
    assert eer == pytest.approx(0.5)
    assert threshold == 0.7


TINY_SCORES = [0.9, 0.5, 0.7, 0.3, 0.1]
TINY_LABELS = [1, 1, 0, 0, 0]
# Targets 0.9, 0.5; non-targets 0.7, 0.3, 0.1. Accept when score >= t:
#
#   t      fnr   fpr   d = fnr - fpr
#   0.1    0     1     -1
#   0.3    0     2/3   -2/3
#   0.5    0     1/3   -1/3
#   0.7    1/2   1/3   +1/6    <- first d >= 0, bracketed by t = 0.5 and t = 0.7
#   0.9    1/2   0     +1/2
#   inf    1     0     +1
#
# a = (-1/3) / (-1/3 - 1/6) = 2/3,  EER = 0 + 2/3 * (1/2 - 0) = 1/3 (and 1/3 + 2/3 * 0 = 1/3 on fpr),
# threshold = 0.5 + 2/3 * (0.7 - 0.5) = 0.6333...
#
# minDCF, C_miss = C_fa = 1:
#   P = 0.5:  DCF / 0.5  = fnr + fpr   = 1, 2/3, 1/3, 5/6, 1/2, 1     -> 1/3 at t = 0.5
#   P = 0.25: DCF / 0.25 = fnr + 3 fpr = 3, 2,   1,   3/2, 1/2, 1     -> 1/2 at t = 0.9
# P = 0.5, C_fa = 0.1: DCF = 0.5 fnr + 0.05 fpr, / 0.05 = 10 fnr + fpr
#                      = 1, 2/3, 1/3, 16/3, 5, 10                     -> 1/3 at t = 0.5


def test_tiny_case_worked_by_hand():
    fnr, fpr, thresholds = error_rates(TINY_SCORES, TINY_LABELS)
    np.testing.assert_allclose(fnr, [0, 0, 0, 1 / 2, 1 / 2, 1])
    np.testing.assert_allclose(fpr, [1, 2 / 3, 1 / 3, 1 / 3, 0, 0])
    np.testing.assert_array_equal(thresholds, [0.1, 0.3, 0.5, 0.7, 0.9, np.inf])

    eer, threshold = compute_eer(TINY_SCORES, TINY_LABELS)
    assert eer == pytest.approx(1 / 3)
    assert threshold == pytest.approx(0.5 + 2 / 3 * 0.2)

    assert compute_min_dcf(TINY_SCORES, TINY_LABELS, 0.5) == pytest.approx((1 / 3, 0.5))
    assert compute_min_dcf(TINY_SCORES, TINY_LABELS, 0.25) == pytest.approx((1 / 2, 0.9))
    assert compute_min_dcf(TINY_SCORES, TINY_LABELS, 0.5, c_fa=0.1) == pytest.approx((1 / 3, 0.5))


def test_tied_target_and_nontarget_stay_on_the_same_side():
    # Targets 1, 1; non-targets 1, 0. Sweep: t=0 (0, 1), t=1 (0, 1/2), t=inf (1, 0).
    # a = (-1/2) / (-1/2 - 1) = 1/3, EER = 0 + 1/3 * 1 = 1/3. Splitting the tie at score 1
    # would add a point such as (1/2, 1/2) and give EER 1/2 instead.
    fnr, fpr, _ = error_rates([1.0, 1.0, 1.0, 0.0], [1, 1, 0, 0])
    np.testing.assert_allclose(fnr, [0, 0, 1])
    np.testing.assert_allclose(fpr, [1, 1 / 2, 0])
    assert compute_eer([1.0, 1.0, 1.0, 0.0], [1, 1, 0, 0]) == pytest.approx((1 / 3, 1.0))


def test_compute_metrics_keys_units_and_json():
    m = compute_metrics(TINY_SCORES, TINY_LABELS)
    assert set(m) == {"eer", "eer_threshold", "min_dcf_0.01", "min_dcf_0.05", "num_trials", "num_targets"}
    assert m["eer"] == pytest.approx(100 / 3)  # percent
    assert m["eer_threshold"] == pytest.approx(0.5 + 2 / 3 * 0.2)
    # P = 0.01: fnr + 99 fpr = 99, 66, 33, 33.5, 0.5, 1 -> 0.5;  P = 0.05: fnr + 19 fpr -> 0.5
    assert m["min_dcf_0.01"] == pytest.approx(0.5)
    assert m["min_dcf_0.05"] == pytest.approx(0.5)
    assert (m["num_trials"], m["num_targets"]) == (5, 2)
    json.dumps(m)  # plain Python numbers, ready for metrics.json


def test_bool_and_int_labels_agree():
    assert compute_metrics(TINY_SCORES, np.array(TINY_LABELS, dtype=bool)) == compute_metrics(TINY_SCORES, TINY_LABELS)


# ---------------------------------------------------------------- independent computation

def brute_force_min_dcf(scores, labels, p_target):
    """minDCF by counting errors directly at every distinct score and at +inf (no sweep, no sort)."""
    tar, non = scores[labels == 1], scores[labels == 0]
    best = np.inf
    candidates = np.append(np.unique(scores), np.inf)
    for chunk in np.array_split(candidates, 20):  # 20 chunks keeps memory to ~ 10k x 500 booleans
        p_miss = (tar[None, :] < chunk[:, None]).mean(axis=1)
        p_fa = (non[None, :] >= chunk[:, None]).mean(axis=1)
        best = min(best, (p_target * p_miss + (1 - p_target) * p_fa).min())
    return best / min(p_target, 1 - p_target)


def brute_force_eer(fnr, fpr):
    """Walk the curve point by point (ascending threshold) and intersect the crossing segment with fnr = fpr."""
    for i in range(1, len(fnr)):
        if fnr[i] >= fpr[i]:
            # Segment from (fpr[i-1], fnr[i-1]) to (fpr[i], fnr[i]); on it fnr - fpr goes linearly
            # from a negative value to a non-negative one; find where it is zero.
            gap_before, gap_after = fpr[i - 1] - fnr[i - 1], fnr[i] - fpr[i]
            w = gap_before / (gap_before + gap_after)
            return (1 - w) * fnr[i - 1] + w * fnr[i]
    raise AssertionError("fnr never reached fpr")


@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, False), (3, True), (4, True)])
def test_agrees_with_sklearn_and_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    n = 10_000
    labels = (rng.random(n) < 0.2).astype(int)
    scores = rng.normal(size=n) + 1.5 * labels
    if ties:
        scores = np.round(scores, 1)  # many tied scores, targets and non-targets alike

    # roc_curve also accepts score >= threshold at every distinct score plus +inf, in descending order.
    skl_fpr, skl_tpr, skl_thr = roc_curve(labels, scores, drop_intermediate=False)
    skl_fnr, skl_fpr, skl_thr = (1 - skl_tpr)[::-1], skl_fpr[::-1], skl_thr[::-1]
    fnr, fpr, thresholds = error_rates(scores, labels)
    np.testing.assert_array_equal(thresholds, skl_thr)
    # tolerance: float64 counting of the same sorted scores: exact up to ~1e-16
    np.testing.assert_allclose(fnr, skl_fnr, atol=1e-12)
    # tolerance: float64 counting of the same sorted scores: exact up to ~1e-16
    np.testing.assert_allclose(fpr, skl_fpr, atol=1e-12)

    m = compute_metrics(scores, labels)
    # Same curve, same linear interpolation: only rounding differs, so 1e-9 percent-points.
    # tolerance: float64, the same EER by interpolation and by brute force: exact up to ~1e-15
    assert m["eer"] == pytest.approx(100 * brute_force_eer(skl_fnr, skl_fpr), abs=1e-9)
    # The usual sklearn recipe picks the curve point where |fnr - fpr| is smallest instead of
    # interpolating. One step of the sweep moves fnr or fpr by a multiple of 1/N, so the picked
    # point is within one step of ours; with ties a step spans all trials tied at one score.
    k = np.argmin(np.abs(skl_fnr - skl_fpr))
    largest_step = max(np.abs(np.diff(skl_fnr)).max(), np.abs(np.diff(skl_fpr)).max())
    assert abs(m["eer"] - 100 * (skl_fnr[k] + skl_fpr[k]) / 2) <= 100 * largest_step

    for p in (0.01, 0.05):
        # tolerance: float64, the same minDCF two ways: exact up to ~1e-15
        assert m[f"min_dcf_{p:g}"] == pytest.approx(brute_force_min_dcf(scores, labels, p), abs=1e-9)


def test_trial_order_does_not_matter():
    rng = np.random.default_rng(5)
    labels = rng.random(5000) < 0.3
    scores = np.round(rng.normal(size=5000) + labels, 2)  # ties make the order matter for a careless sweep
    perm = rng.permutation(5000)
    assert compute_metrics(scores[perm], labels[perm]) == compute_metrics(scores, labels)


def test_one_million_trials_gaussian_eer():
    # Target ~ N(2, 1), non-target ~ N(0, 1): the curves cross at score 1, EER = Phi(-1) = 15.87%.
    rng = np.random.default_rng(6)
    labels = rng.random(1_000_000) < 0.1
    scores = rng.normal(size=1_000_000) + 2.0 * labels
    m = compute_metrics(scores, labels)
    # tolerance: sampling error of an EER estimated from a few thousand Gaussian trials (~0.5 percentage points)
    assert m["eer"] == pytest.approx(15.87, abs=0.5)
    # tolerance: sampling error of the EER threshold from a few thousand trials
    assert m["eer_threshold"] == pytest.approx(1.0, abs=0.05)
    assert 0 < m["min_dcf_0.05"] <= m["min_dcf_0.01"] <= 1
    assert m["num_trials"] == 1_000_000


def test_det_curve_points():
    fpr, fnr = det_curve_points(TINY_SCORES, TINY_LABELS)  # small input: the whole sweep
    np.testing.assert_allclose(fnr, [0, 0, 0, 1 / 2, 1 / 2, 1])
    np.testing.assert_allclose(fpr, [1, 2 / 3, 1 / 3, 1 / 3, 0, 0])

    rng = np.random.default_rng(7)
    labels = rng.random(100_000) < 0.1
    fpr, fnr = det_curve_points(rng.normal(size=100_000) + labels, labels)
    assert len(fpr) == len(fnr) <= 2000
    assert (fpr[0], fnr[0], fpr[-1], fnr[-1]) == (1, 0, 0, 1)
    assert (np.diff(fpr) <= 0).all() and (np.diff(fnr) >= 0).all()
    # Both tails keep detail: several points below 1% error on each axis.
    assert (fpr[fpr > 0] < 0.01).sum() >= 10 and (fnr[fnr > 0] < 0.01).sum() >= 10


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("scores, labels, message", [
    ([0.1, 0.2], [0, 0], "no target"),
    ([0.1, 0.2], [1, 1], "no non-target"),
    ([], [], "no target"),
    ([0.1, 0.2, 0.3], [0, 1], "differ in length"),
    ([0.1, np.nan], [0, 1], "NaN/inf"),
    ([0.1, np.inf], [0, 1], "NaN/inf"),
    ([0.1, 0.2], [0, 2], "1 \\(target\\) or 0"),
])
def test_bad_input_raises_clear_error(scores, labels, message):
    for f in (compute_eer, error_rates, compute_metrics, lambda s, l: compute_min_dcf(s, l, 0.01)):
        with pytest.raises(ValueError, match=message):
            f(scores, labels)


def test_bad_p_target_raises():
    with pytest.raises(ValueError, match="p_target"):
        compute_min_dcf(TINY_SCORES, TINY_LABELS, 1.0)
