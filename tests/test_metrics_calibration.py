"""actDCF, Cllr, min Cllr (PAV) and the speaker-bootstrap EER interval of asv/metrics.py: by hand and
against independent computations (a numerical integral, repeated trials)."""
import math
from statistics import NormalDist

import numpy as np
import pytest

from asv import metrics


def bits(x):
    """log2(1 + e^x), written out."""
    return math.log2(1 + math.exp(x))


def gaussian_llrs(mu, n):
    """Perfectly calibrated LLRs, as evenly spread quantiles (no sampling noise): for a Gaussian
    target llr ~ N(mu, 2 mu) the non-target one is N(-mu, 2 mu), which is what makes them LLRs."""
    q = [NormalDist(0, math.sqrt(2 * mu)).inv_cdf((i + 0.5) / n) for i in range(n)]
    tar, non = mu + np.array(q), -mu + np.array(q)
    return np.r_[tar, non], np.r_[np.ones(n), np.zeros(n)]


# ---------------------------------------------------------------------------- Cllr

def test_cllr_by_hand():
    llrs, labels = [2.0, 0.0, -1.0], [1, 1, 0]
    expected = 0.5 * ((bits(-2) + bits(0)) / 2 + bits(-1))
    # tolerance: float64 log2 of three terms: ~1e-15
    assert metrics.compute_cllr(llrs, labels) == pytest.approx(expected, rel=1e-12)


def test_cllr_of_zero_llrs_is_one_bit():
    assert metrics.compute_cllr(np.zeros(7), [1, 0, 0, 1, 0, 0, 0]) == pytest.approx(1.0)


def test_cllr_of_calibrated_gaussian_llrs_matches_the_integral():
    mu = 2.0
    llrs, labels = gaussian_llrs(mu, 20000)
    # the target term, integrated on a fine grid; the non-target term is the same by symmetry
    sigma = math.sqrt(2 * mu)
    x = np.linspace(mu - 12 * sigma, mu + 12 * sigma, 200001)
    pdf = np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    integral = np.trapezoid(np.logaddexp(0, -x) / math.log(2) * pdf, x)
    # tolerance: the trapezoid rule on the integration grid vs the sample mean of a large sample (~1e-4)
    assert metrics.compute_cllr(llrs, labels) == pytest.approx(integral, abs=1e-4)
    # a calibrated system: PAV can improve on it only by the sampling of the grid
    # tolerance: PAV can only improve on a calibrated system by the sampling of the finite sample (~5e-3)
    assert metrics.compute_min_cllr(llrs, labels) == pytest.approx(integral, abs=5e-3)


def test_cllr_with_infinite_llrs():
    assert metrics.compute_cllr([np.inf, -np.inf], [1, 0]) == 0.0  # certain and right: free
    assert metrics.compute_cllr([-np.inf, -np.inf], [1, 0]) == np.inf  # certain and wrong: unbounded
    assert metrics.compute_cllr([1e6, -1e6], [1, 0]) == 0.0  # no overflow
    with pytest.raises(ValueError, match="NaN"):
        metrics.compute_cllr([np.nan, 0.0], [1, 0])


# ---------------------------------------------------------------------------- min Cllr (PAV)

def test_pav_llrs_by_hand():
    # sorted labels 0 1 0 1: PAV pools the middle pair -> posteriors 0, 1/2, 1/2, 1 at prior 1/2
    llrs = metrics.pav_llrs([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1])
    assert llrs.tolist() == [-np.inf, 0.0, 0.0, np.inf]
    # targets: one llr 0 (1 bit), one +inf (0); non-targets: -inf (0), 0 (1 bit)
    assert metrics.compute_min_cllr([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1]) == pytest.approx(0.5)
    # the list's own target proportion is taken out: 1 target in 3 trials, tied scores pooled
    llrs = metrics.pav_llrs([0.0, 0.0, 0.0], [1, 0, 0])
    assert llrs == pytest.approx([0.0, 0.0, 0.0])


def test_min_cllr_of_separable_scores_is_zero():
    assert metrics.compute_min_cllr([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.0


def test_min_cllr_bounds_cllr_and_is_reached_by_pav():
    rng = np.random.default_rng(0)
    labels = rng.random(3000) < 0.2
    scores = np.where(labels, rng.normal(0.5, 0.2, 3000), rng.normal(0.1, 0.15, 3000))
    min_cllr = metrics.compute_min_cllr(scores, labels)
    for llrs in (scores, 20 * scores - 5, 100 * scores, np.exp(3 * scores) - 2, 15 * np.tanh(10 * scores - 3)):
        assert min_cllr <= metrics.compute_cllr(llrs, labels)
        # tolerance: float64, the same ordering: exact up to rounding
        assert metrics.compute_min_cllr(llrs, labels) == pytest.approx(min_cllr, abs=1e-12)  # order only
    assert metrics.compute_cllr(metrics.pav_llrs(scores, labels), labels) == min_cllr


# ---------------------------------------------------------------------------- actual DCF

def test_act_dcf_by_hand():
    llrs, labels = [5.0, -1.0, -5.0, 0.0], [1, 1, 0, 0]
    # P_target 0.01: threshold log(99) = 4.6: the target at -1 is missed, no false alarm
    assert metrics.compute_act_dcf(llrs, labels, 0.01) == pytest.approx(0.01 * 0.5 / 0.01)
    # P_target 0.5: threshold 0, accepted at equality: one miss and one false alarm of two each
    assert metrics.compute_act_dcf(llrs, labels, 0.5) == pytest.approx((0.5 * 0.5 + 0.5 * 0.5) / 0.5)
    # costs move the threshold: C_fa = 10 at 0.5 -> log(10) = 2.3
    assert metrics.compute_act_dcf(llrs, labels, 0.5, c_fa=10.0) == pytest.approx(0.5 * 0.5 / 0.5)
    with pytest.raises(ValueError, match="p_target"):
        metrics.compute_act_dcf(llrs, labels, 1.0)


def test_act_dcf_is_at_least_min_dcf():
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < 0.3
    scores = np.where(labels, rng.normal(1, 1, 2000), rng.normal(-1, 1, 2000))
    for llrs in (scores, 3 * scores + 2, 0.2 * scores - 1, np.sign(scores) * scores ** 2):
        for p in (0.01, 0.05, 0.5):
            assert metrics.compute_act_dcf(llrs, labels, p) >= metrics.compute_min_dcf(llrs, labels, p)[0] - 1e-12


def test_act_dcf_of_calibrated_llrs_reaches_min_dcf():
    # Bayes' threshold is the best one for true LLRs, so with a large sample the two nearly meet
    llrs, labels = gaussian_llrs(3.0, 50000)
    for p in (0.01, 0.05, 0.5):
        act, (best, _) = metrics.compute_act_dcf(llrs, labels, p), metrics.compute_min_dcf(llrs, labels, p)
        assert best <= act <= best + 0.005, p
    # a shifted (miscalibrated) copy pays for it
    assert metrics.compute_act_dcf(llrs + 3, labels, 0.01) > metrics.compute_min_dcf(llrs, labels, 0.01)[0] + 0.1


# ---------------------------------------------------------------------------- weighted EER and its bootstrap

def test_weighted_eer_equals_repeated_trials():
    rng = np.random.default_rng(2)
    labels = rng.random(500) < 0.4
    scores = np.round(np.where(labels, rng.normal(1, 1, 500), rng.normal(0, 1, 500)), 1)  # ties too
    weights = rng.integers(0, 4, 500)
    repeated = metrics.compute_eer(np.repeat(scores, weights), np.repeat(labels, weights))[0]
    # tolerance: float64, weights vs repeated rows: exact up to rounding
    assert metrics.compute_weighted_eer(scores, labels, weights) == pytest.approx(repeated, abs=1e-12)
    assert metrics.compute_weighted_eer(scores, labels, np.ones(500)) == pytest.approx(
        metrics.compute_eer(scores, labels)[0], abs=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.compute_weighted_eer(scores, labels, -weights)


def speaker_trials(num_speakers, rng):
    """Target and non-target trials among speakers whose scores shift with the speaker (so speakers,
    not trials, are the units that vary): (scores, labels, enroll speakers, test speakers)."""
    shift = rng.normal(0, 0.5, num_speakers)
    enroll, test = [], []
    for a in range(num_speakers):
        enroll += [a] * 6 + [a] * 6
        test += [a] * 6 + list(rng.choice([b for b in range(num_speakers) if b != a], 6))
    enroll, test = np.array(enroll), np.array(test)
    labels = enroll == test
    scores = np.where(labels, 1.5, 0.0) + shift[enroll] + rng.normal(0, 1, len(enroll))
    return scores, labels, enroll.astype(str), test.astype(str)


def test_eer_interval_covers_the_eer_and_narrows_with_speakers():
    rng = np.random.default_rng(3)
    widths = []
    for num_speakers in (20, 320):
        scores, labels, enroll, test = speaker_trials(num_speakers, rng)
        eer = metrics.compute_eer(scores, labels)[0]
        low, high = metrics.eer_confidence_interval(scores, labels, enroll, test, n=300)
        assert low <= eer <= high
        widths.append(high - low)
        # seeded: the same call, the same interval; a lower level, a narrower one inside it
        assert metrics.eer_confidence_interval(scores, labels, enroll, test, n=300) == (low, high)
        low50, high50 = metrics.eer_confidence_interval(scores, labels, enroll, test, level=0.5, n=300)
        assert low <= low50 <= high50 <= high
    assert widths[1] < widths[0] / 2  # 16 times the speakers: about a quarter of the width


def test_eer_interval_errors():
    scores, labels = np.array([0.9, 0.1, 0.8, 0.2]), np.array([1, 0, 1, 0])
    # targets of speaker a, non-targets b-c: a draw of 3 speakers holds all three 2 times in 9
    with pytest.raises(ValueError, match="too few"):
        metrics.eer_confidence_interval(scores, labels, ["a", "b", "a", "b"], ["a", "c", "a", "c"], n=200)
    # 9 speakers: fewer than MIN_BOOTSTRAP_SPEAKERS, refused before any resample
    spk = [f"s{i % 9}" for i in range(18)]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="9 speakers, fewer than 10"):
        metrics.eer_confidence_interval(rng.normal(size=18), np.arange(18) % 2, spk, spk[::-1])
    with pytest.raises(ValueError, match="one speaker per trial"):
        metrics.eer_confidence_interval(scores, labels, ["a"], ["b"])
    with pytest.raises(ValueError, match="level"):
        metrics.eer_confidence_interval(scores, labels, list("abab"), list("baba"), level=95)
