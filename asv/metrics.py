"""Scores: the NIST metrics (EER, minDCF, DET) and calibration (logistic fit on validation trials,
thresholds, Cllr). Imports no torch, so report.py stays light."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .run import write_json


def _check(scores, labels, allow_inf=False):
    """Return (scores as float64, labels as bool), or raise a one-line ValueError.

    allow_inf: LLRs may be -/+inf (a certain decision), which Cllr and actDCF handle exactly.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}")
    if len(scores) != len(labels):
        raise ValueError(f"scores and labels differ in length: {len(scores)} vs {len(labels)}")
    bad = np.isnan(scores) if allow_inf else ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"scores contain {np.count_nonzero(bad)} NaN{'' if allow_inf else '/inf'} value(s)")
    if labels.dtype != bool:
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError("labels must be 1 (target) or 0 (non-target)")
        labels = labels == 1
    num_targets = int(np.count_nonzero(labels))
    if num_targets == 0:
        raise ValueError(f"no target trials among {len(labels)} trials; EER/minDCF undefined")
    if num_targets == len(labels):
        raise ValueError(f"no non-target trials among {len(labels)} trials; EER/minDCF undefined")
    return scores, labels


def error_rates(scores, labels):
    """Sweep the threshold over every distinct score, plus +inf.

    Returns (fnr, fpr, thresholds), three float64 arrays of equal length:
    fnr rises from 0 to 1, fpr falls from 1 to 0, thresholds ascend and end in +inf.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(scores)  # float64 argsort: float32 is barely faster here and would merge close scores
    scores, labels = scores[order], labels[order]
    # A threshold equal to a score starts where that score first appears in sorted order.
    first = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    thresholds = np.r_[scores[first], np.inf]
    starts = np.r_[first, len(scores)]  # the +inf threshold rejects everything
    # Integer counts are exact; targets_below[k] = targets among the k lowest scores.
    targets_below = np.r_[0, np.cumsum(labels)]
    misses = targets_below[starts]
    num_targets = targets_below[-1]
    num_nontargets = len(scores) - num_targets
    false_alarms = num_nontargets - (starts - misses)  # non-targets at or above the threshold
    return misses / num_targets, false_alarms / num_nontargets, thresholds


def _eer(fnr, fpr, thresholds):
    d = fnr - fpr
    i = int(np.argmax(d >= 0))  # d[0] = -1 and d[-1] = +1, so 1 <= i <= len - 1
    a = d[i - 1] / (d[i - 1] - d[i])
    eer = fnr[i - 1] + a * (fnr[i] - fnr[i - 1])
    lo, hi = thresholds[i - 1], thresholds[i]
    # min: with a = 1 rounding can land one ulp above hi, which would reject the trials scoring hi
    threshold = min(lo + a * (hi - lo), hi) if np.isfinite(hi) else lo
    return float(eer), float(threshold)


def _min_dcf(fnr, fpr, thresholds, p_target, c_miss, c_fa):
    if not 0 < p_target < 1:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    dcf = c_miss * p_target * fnr + c_fa * (1 - p_target) * fpr
    i = int(np.argmin(dcf))
    # thresholds[i] may be +inf: rejecting every trial is then the cheapest choice.
    return float(dcf[i] / min(c_miss * p_target, c_fa * (1 - p_target))), float(thresholds[i])


def compute_eer(scores, labels):
    """Equal error rate as a fraction (0.0426 is 4.26%), and its threshold."""
    return _eer(*error_rates(scores, labels))


def compute_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0):
    """Normalised minimum detection cost (<= 1), and the threshold reaching it (may be +inf)."""
    return _min_dcf(*error_rates(scores, labels), p_target, c_miss, c_fa)


def compute_metrics(scores, labels, p_targets=(0.01, 0.05)):
    """All the numbers a json holds, from one sort.

    Returns {"eer": percent, "eer_threshold", "min_dcf_<p>" for each p (C_miss = C_fa = 1),
    "num_trials", "num_targets"}.
    """
    fnr, fpr, thresholds = error_rates(scores, labels)
    eer, eer_threshold = _eer(fnr, fpr, thresholds)
    metrics = {"eer": 100.0 * eer, "eer_threshold": eer_threshold}
    for p in p_targets:
        metrics[f"min_dcf_{p:g}"] = _min_dcf(fnr, fpr, thresholds, p, 1.0, 1.0)[0]
    metrics["num_trials"] = len(scores)
    metrics["num_targets"] = int(np.count_nonzero(np.asarray(labels)))
    return metrics


def det_curve_points(scores, labels, max_points=2000):
    """(fpr, fnr) along the sweep, for plotting a DET curve; at most ~max_points points.

    A DET plot stretches both tails (probit axes), so the kept points are spaced
    geometrically from each end of the sweep, not evenly. The end points (1, 0)
    and (0, 1) map to -/+inf on probit axes; clip them when plotting.
    """
    fnr, fpr, _ = error_rates(scores, labels)
    n = len(fnr)
    if n > max_points:
        from_ends = np.geomspace(1, n, max_points // 2).astype(np.int64) - 1
        keep = np.unique(np.r_[from_ends, n - 1 - from_ends])
        fnr, fpr = fnr[keep], fpr[keep]
    return fpr, fnr


# ---------------------------------------------------------------------------- calibrated scores (LLRs)

def compute_act_dcf(llrs, labels, p_target, c_miss=1.0, c_fa=1.0):
    """Normalised actual detection cost of LLRs: every trial decided at the Bayes threshold
    llr >= log(C_fa (1 - P_target) / (C_miss P_target)), no threshold search. Normalised like minDCF."""
    llrs, labels = _check(llrs, labels, allow_inf=True)
    if not 0 < p_target < 1:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    threshold = np.log(c_fa * (1 - p_target) / (c_miss * p_target))
    p_miss = np.mean(llrs[labels] < threshold)
    p_fa = np.mean(llrs[~labels] >= threshold)
    dcf = c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa
    return float(dcf / min(c_miss * p_target, c_fa * (1 - p_target)))


def compute_cllr(llrs, labels):
    """Cllr in bits: 0 is perfect, 1 is an llr of 0 for every trial.

    log2(1 + e^x) is logaddexp(0, x) / ln 2: no overflow for large |x|, and exact for -/+inf LLRs
    (0 on the right side of the decision, inf on the wrong one).
    """
    llrs, labels = _check(llrs, labels, allow_inf=True)
    on_targets = np.logaddexp(0.0, -llrs[labels]).mean()
    on_nontargets = np.logaddexp(0.0, llrs[~labels]).mean()
    return float((on_targets + on_nontargets) / (2 * np.log(2)))


def pav_llrs(scores, labels):
    """The LLRs of the best non-decreasing map of the scores: PAV, as BOSARIS's opt_loglr and pyllr.

    Isotonic regression of the 0/1 labels on the scores (sklearn's PAV; tied scores share one value)
    gives each trial the posterior P(target | score) of its block at the list's own target proportion
    pi; llr = logit(posterior) - logit(pi) takes that prior out. This one map minimises Cllr and the
    actual DCF at every prior together, so Cllr of these LLRs is min Cllr.

    The end blocks: a block of non-targets only has posterior 0 and llr -inf, a block of targets only
    has llr +inf. Posteriors are clipped to [0, 1] (block means can round a hair outside), and the
    infinite LLRs are kept, as BOSARIS's min_cllr keeps them (no Laplace pseudo-trials): PAV only gives
    them to trials on the right side, where Cllr charges exactly 0. Clipping the LLRs to a finite bound
    instead would add a cost that depends on the bound, not on the scores.
    """
    scores, labels = _check(scores, labels)
    from sklearn.isotonic import IsotonicRegression  # here, so the EER/minDCF functions need numpy only

    posterior = np.clip(IsotonicRegression().fit_transform(scores, labels.astype(np.float64)), 0.0, 1.0)
    prior = labels.mean()
    with np.errstate(divide="ignore"):  # log(0) = -inf on purpose, see above
        return np.log(posterior) - np.log1p(-posterior) - np.log(prior / (1 - prior))


def compute_min_cllr(scores, labels):
    """Cllr after the best monotonic recalibration (pav_llrs): what calibration could reach at best."""
    return compute_cllr(pav_llrs(scores, labels), labels)


# ---------------------------------------------------------------------------- weighted EER and its bootstrap

def _sorted_sweep(scores):
    """One sort for many weighted sweeps: (order, block starts, thresholds), as in error_rates."""
    order = np.argsort(scores)
    ordered = scores[order]
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return order, np.r_[first, len(ordered)], np.r_[ordered[first], np.inf]


def _weighted_eer(labels, starts, thresholds, weights):
    """EER of trials in score order with weights; None when no target or no non-target weight is left."""
    targets_below = np.r_[0, np.cumsum(np.where(labels, weights, 0))][starts]
    nontargets_below = np.r_[0, np.cumsum(np.where(labels, 0, weights))][starts]
    if targets_below[-1] <= 0 or nontargets_below[-1] <= 0:
        return None
    fnr = targets_below / targets_below[-1]
    fpr = 1 - nontargets_below / nontargets_below[-1]
    return _eer(fnr, fpr, thresholds)[0]


def compute_weighted_eer(scores, labels, weights):
    """EER (fraction) where trial i counts weights[i] times (>= 0; 0 leaves it out)."""
    scores, labels = _check(scores, labels)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != scores.shape or not (weights >= 0).all():
        raise ValueError(f"weights must be {len(scores)} non-negative numbers, one per trial")
    order, starts, thresholds = _sorted_sweep(scores)
    eer = _weighted_eer(labels[order], starts, thresholds, weights[order])
    if eer is None:
        raise ValueError("weights leave no target or no non-target trial; EER undefined")
    return eer


# Fewer speakers than this and there is no EER interval. A speaker bootstrap resamples speakers, not trials:
# k speakers have only C(2k - 1, k) distinct resamples (3 for 2 speakers, 126 for 5, 92,378 for 10), and
# cluster-bootstrap percentile intervals are known to undercover with fewer than about 10 clusters (Cameron,
# Gelbach & Miller 2008): with 2 test speakers the interval came out as 45.13 [45.13, 45.13] (issue 22).
MIN_BOOTSTRAP_SPEAKERS = 10


def eer_confidence_interval(scores, labels, enroll_speakers, test_speakers, level=0.95, n=1000, seed=0):
    """(low, high): a bootstrap confidence interval of the EER over speakers (fractions, as compute_eer).

    Trials of one speaker share that speaker's voice, so they are not independent: resampling trials
    would make the interval far too narrow. Resampling speakers does not assume it. Each of the n
    replicates draws as many speakers as the list has, with replacement, from the speakers of either
    side (enroll_speakers[i], test_speakers[i]: the speaker ids of trial i's two sides). A trial counts
    count(enroll speaker) * count(test speaker) times: 0 unless both sides were drawn, and a speaker
    drawn twice counts its trials with others twice and its same-speaker trials four times (every
    pair of its copies). A replicate left without target or non-target trials has no EER and is
    dropped. The interval is the percentile one: the (1 - level)/2 and (1 + level)/2 quantiles of
    the replicates' EERs. Fewer than MIN_BOOTSTRAP_SPEAKERS speakers, or replicates that all agree: a
    one-line ValueError (no interval), never a zero-width one. Seeded (numpy's default_rng(seed)): the same call gives the same interval.
    One sort, then O(N) per replicate.
    """
    scores, labels = _check(scores, labels)
    enroll_speakers, test_speakers = np.asarray(enroll_speakers), np.asarray(test_speakers)
    if enroll_speakers.shape != scores.shape or test_speakers.shape != scores.shape:
        raise ValueError(f"enroll_speakers and test_speakers must hold one speaker per trial ({len(scores)})")
    if not 0 < level < 1 or n < 1:
        raise ValueError(f"level must be in (0, 1) and n >= 1, got level={level}, n={n}")
    speakers, codes = np.unique(np.r_[enroll_speakers, test_speakers], return_inverse=True)
    if len(speakers) < MIN_BOOTSTRAP_SPEAKERS:
        raise ValueError(f"the trials hold {len(speakers)} speakers, fewer than {MIN_BOOTSTRAP_SPEAKERS}: too few "
                         "distinct speaker resamples for a bootstrap interval to mean anything")
    order, starts, thresholds = _sorted_sweep(scores)
    enroll_codes, test_codes = codes[:len(scores)][order], codes[len(scores):][order]
    labels = labels[order]
    rng = np.random.default_rng(seed)
    eers = []
    for _ in range(n):
        counts = np.bincount(rng.integers(0, len(speakers), len(speakers)), minlength=len(speakers))
        eer = _weighted_eer(labels, starts, thresholds, counts[enroll_codes] * counts[test_codes])
        if eer is not None:
            eers.append(eer)
    if len(eers) < n / 2:
        raise ValueError(f"only {len(eers)} of {n} speaker resamples hold both target and non-target trials: "
                         f"{len(speakers)} speakers are too few for a speaker bootstrap")
    low, high = np.quantile(eers, [(1 - level) / 2, (1 + level) / 2])
    if low == high:
        raise ValueError(f"every speaker resample of the {len(speakers)} speakers gives the same EER: no interval")
    return float(low), float(high)


VALID_SCORES = Path("eval") / "valid" / "scores.txt"
CALIBRATION_FILE = "calibration.json"
THRESHOLD_FORMS = "eer, min_dcf:<p>, far:<rate>, frr:<rate> or bayes:<p>, with p and rate in (0, 1) (e.g. far:0.01)"


# Fewer target (or non-target) validation trials than this and no calibration is fitted: with 4 speakers of
# 5 utterances (40 target trials) the fitted offset rests on the handful of trials near the threshold, and
# on 5,460 test trials such a fit gave Cllr 3.3, worse than the raw cosines (issue 22).
MIN_CALIBRATION_TRIALS = 50
# sklearn's inverse L2 strength for the fit on standardised scores, with weights summing to the effective trial
# count: a Gaussian prior of sd 2 on the scale. Measured on Gaussian cosines (tests/test_calibration.py): within
# 7% of the true scale at 50,000 trials; on 300 + 3,000 nearly separated validation trials and broader test
# trials, test Cllr 0.44 against 0.59 unregularised and 0.89 raw.
CALIBRATION_C = 4.0


@dataclasses.dataclass(frozen=True)
class Calibration:
    """llr = scale * score + offset, and what it was fit on; refused: why none was fitted ("" when fitted),
    and then llr() is the identity (the raw scores, as if there were no calibration)."""
    scale: float
    offset: float
    prior: float  # the effective target prior of the fit
    num_trials: int
    num_targets: int
    refused: str = ""  # why validation could not support a fit; "" for a fitted calibration

    @property
    def fitted(self) -> bool:
        return not self.refused

    def llr(self, scores):
        return self.scale * np.asarray(scores, dtype=np.float64) + self.offset

    def score_at(self, llr: float) -> float:
        """The raw score whose LLR is `llr`: an LLR threshold as a raw-score threshold."""
        if self.refused:
            raise ValueError(f"no calibration: {self.refused}")
        if self.scale <= 0:
            raise ValueError(f"the calibration's scale is {self.scale:.3g}: its validation scores rank non-targets "
                             "above targets, so no raw-score threshold gives its decisions")
        return (llr - self.offset) / self.scale


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D and alike, got shapes {scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all() or not np.isin(labels, (0, 1)).all() or labels.min() == labels.max():
        raise ValueError("calibration needs finite scores and both target (1) and non-target (0) labels")
    return scores, labels


def calibration_refusal(scores, labels) -> str:
    """Why these validation trials cannot support a calibration, or "" when they can.

    Too few of either class (MIN_CALIBRATION_TRIALS), or perfectly separated (every target at or above
    every non-target): maximum likelihood then sends the scale to infinity, and even a regularised fit
    only reflects the prior, not the scores, so its LLRs would be confident on nothing."""
    scores, labels = _scores_labels(scores, labels)
    n_tar = int(labels.sum())
    n_non = len(labels) - n_tar
    if min(n_tar, n_non) < MIN_CALIBRATION_TRIALS:
        return (f"validation holds {n_tar} target and {n_non} non-target trials, fewer than "
                f"{MIN_CALIBRATION_TRIALS} of each: too few to fit a score-to-LLR map")
    if scores[labels == 1].min() >= scores[labels == 0].max():
        return (f"validation's {n_tar} target and {n_non} non-target trials are perfectly separated: "
                "a fit would be confident beyond what the scores show")
    return ""


def fit_calibration(scores, labels, prior: float = 0.5) -> Calibration:
    """Affine score -> LLR map by prior-weighted, regularised logistic regression (BOSARIS's linear calibration),
    or a refused one (identity, with the reason) when calibration_refusal finds the trials unfit.

    Logistic regression learns posterior log-odds, which hold the training set's target proportion.
    Class weights prior / N_tar and (1 - prior) / N_non make that proportion `prior` whatever the list's
    own is; subtracting logit(prior) then leaves the LLR. The weights are scaled to sum to the effective
    trial count 1 / (prior^2 / N_tar + (1 - prior)^2 / N_non) (the Kish count of the weighted trials; it is
    set by the rarer class: 40 targets among 1,000 trials count as about 160 at prior 0.5), so the evidence
    the fit sees is as much as the trials hold. sklearn's L2 penalty on the scale of standardised scores
    (intercept unpenalised), C = CALIBRATION_C, is then a Gaussian prior of variance C on that scale:
    little against thousands of effective trials, it keeps the scale modest when a few trials near the
    threshold decide it (validation then overstates how well the scores separate test trials).
    """
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    scores, labels = _scores_labels(scores, labels)
    n, n_tar = len(labels), int(labels.sum())
    refused = calibration_refusal(scores, labels)
    if refused:
        return Calibration(scale=1.0, offset=0.0, prior=prior, num_trials=n, num_targets=n_tar, refused=refused)
    (scale,), offset = weighted_logistic(scores[:, None], labels, prior)
    return Calibration(scale=scale, offset=offset, prior=prior, num_trials=n, num_targets=n_tar)


def weighted_logistic(x, labels, prior: float) -> tuple[np.ndarray, float]:
    """(weights (D,), offset) of the LLR x @ weights + offset: the prior-weighted, L2-regularised logistic
    regression of fit_calibration on the columns of x (N, D), each standardised. A column that is constant,
    or a copy of an earlier one up to scale and shift, says nothing more and gets weight 0 (with the L2
    penalty, two copies would share a weight and be penalised less than one)."""
    from sklearn.linear_model import LogisticRegression  # here: a second to import, needed only to fit

    x = np.asarray(x, np.float64)
    n, n_tar = len(labels), int(labels.sum())
    effective = 1.0 / (prior ** 2 / n_tar + (1 - prior) ** 2 / (n - n_tar))
    weights = {1: effective * prior / n_tar, 0: effective * (1 - prior) / (n - n_tar)}
    mean, sd = x.mean(0), x.std(0)
    z = (x - mean) / np.where(sd > 0, sd, 1.0)
    keep = []
    for j in range(x.shape[1]):
        # float64 correlations of copies are 1 to ~1e-15; 1e-9 leaves any real difference in
        if sd[j] > 1e-12 * max(1.0, abs(mean[j])) and all(abs(z[:, j] @ z[:, k]) / n < 1 - 1e-9 for k in keep):
            keep.append(j)
    # tol far below sklearn's 1e-4, which stops lbfgs some percent short of the optimum scale here
    model = LogisticRegression(C=CALIBRATION_C, class_weight=weights, tol=1e-8, max_iter=5000).fit(z[:, keep], labels)
    w = np.zeros(x.shape[1])
    w[keep] = model.coef_[0] / sd[keep]
    return w, float(model.intercept_[0] - w[keep] @ mean[keep] - _logit(prior))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def read_json(path: Path):
    """The JSON in `path`, None when there is no such file; a one-line ValueError naming it when unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({' '.join(str(e).split())})") from None


def save_calibration(folder, cal: Calibration):
    write_json(Path(folder) / CALIBRATION_FILE, dataclasses.asdict(cal))


def load_calibration(folder) -> Calibration | None:
    """<folder>/calibration.json, or None when there is none (or it predates `refused`: it is then refit)."""
    path = Path(folder) / CALIBRATION_FILE
    data = read_json(path)
    if data is None:
        return None
    names = [f.name for f in dataclasses.fields(Calibration)]
    if isinstance(data, dict) and sorted(data) == sorted(n for n in names if n != "refused"):
        return None  # an unregularised fit of an earlier version, with no refusal: fit again
    numbers = [n for n in names if n != "refused"]
    if not isinstance(data, dict) or sorted(data) != sorted(names) or not isinstance(data["refused"], str) or not all(
            isinstance(data[k], (int, float)) and not isinstance(data[k], bool) and math.isfinite(data[k])
            for k in numbers):
        raise ValueError(f"{path}: expected a JSON object of the numbers {', '.join(numbers)} and the text refused")
    return Calibration(**data)


def read_scores(path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of a scores file of `enroll test score label` lines."""
    try:
        data = np.loadtxt(path, usecols=(2, 3), dtype=np.float64, ndmin=2, comments=None)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable scores ({' '.join(str(e).split())})") from None
    try:
        return _scores_labels(data[:, 0], data[:, 1])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def validation_scores(ckpt) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's validation (scores, labels), or a one-line error saying how to get them."""
    path = Path(ckpt) / VALID_SCORES
    if not path.is_file():
        raise ValueError(f"{path} is missing: thresholds and calibration come from validation scores (train_asv.py "
                         f"saves them with each validated checkpoint, or run evaluate_asv.py --ckpt-dir {ckpt} "
                         "--trials valid; a run prepared with --valid-speakers 0 has no validation speakers)")
    return read_scores(path)


def has_validation_scores(ckpt) -> bool:
    return (Path(ckpt) / VALID_SCORES).is_file()


def ensure_calibration(ckpt) -> Calibration:
    """The checkpoint's calibration.json; fit on its validation scores and saved first when absent."""
    cal = load_calibration(ckpt)
    if cal is None:
        cal = fit_calibration(*validation_scores(ckpt))
        save_calibration(ckpt, cal)
    return cal


def calibration_metrics(scores, labels, cal: Calibration | None) -> dict:
    """json's decision figures for a list's raw cosine scores: min_cllr always (it needs no
    calibration); with a calibration, the actual DCFs and Cllr of its LLRs, and the calibration; with a
    refused one, the reason (the raw scores stand: nothing calibrated to measure)."""
    out = {"min_cllr": compute_min_cllr(scores, labels)}
    if cal is not None and cal.refused:
        out["calibration"] = {"refused": cal.refused}
    elif cal is not None:
        llrs = cal.llr(scores)
        out.update({f"act_dcf_{p:g}": compute_act_dcf(llrs, labels, p) for p in (0.01, 0.05)})
        out["cllr"] = compute_cllr(llrs, labels)
        out["calibration"] = {"scale": cal.scale, "offset": cal.offset}
    return out


def calibration_line(m: dict) -> str:
    """The calibration_metrics part of a printed per-list line."""
    if "cllr" not in m:
        refused = m.get("calibration", {}).get("refused")
        return f" | minCllr {m['min_cllr']:.3f}" + (" | no calibration (refused on validation)" if refused else "")
    return (f" | actDCF0.01 {m['act_dcf_0.01']:.4f} | actDCF0.05 {m['act_dcf_0.05']:.4f} "
            f"| Cllr {m['cllr']:.3f} (min {m['min_cllr']:.3f})")


# ---------------------------------------------------------------------------- quality measures (QMF)

QMF_FILE = "calibration_qmf.json"
QMF_MEASURES = ("score", "log_enroll_secs", "log_test_secs", "score_x_log_min_secs", "enroll_imposter_mean",
                "test_imposter_mean")
OLD_QMF_MEASURES = ["score", "log_enroll_secs", "log_test_secs", "score_x_log_min_secs"]  # before imposter means
# the nested sets fit_qmf chooses from (the first columns of QMF_MEASURES): the score alone is the plain calibration
QMF_SETS = {"score": 1, "durations": 4, "durations+imposter": 6}


def quality_measures(scores, enroll_secs, test_secs, enroll_imposter, test_imposter) -> np.ndarray:
    """(N, 6): the score, the log durations of the enrolment and the test audio, the score times the log of
    the shorter one, and each side's imposter mean. The durations move where targets and non-targets score (an
    additive shift, WeSpeaker's QMF); the product lets the scale follow the duration too (short audio: less
    reliable scores, so a flatter LLR). The imposter mean of a side is the mean of its top-k cosine scores
    against the AS-norm cohort (training utterances, models.cohort_stats): an utterance close to many others
    scores high against everyone, and the regression can take that out (WeSpeaker's QMF takes both sides')."""
    s = np.asarray(scores, dtype=np.float64)
    e, t = (np.log(np.maximum(np.asarray(d, dtype=np.float64), 1e-3)) for d in (enroll_secs, test_secs))
    me, mt = (np.asarray(m, dtype=np.float64) for m in (enroll_imposter, test_imposter))
    if not (s.shape == e.shape == t.shape == me.shape == mt.shape) or s.ndim != 1:
        raise ValueError(f"scores, durations and imposter means must be 1-D and alike, got {s.shape}, {e.shape}, "
                         f"{t.shape}, {me.shape}, {mt.shape}")
    return np.stack([s, e, t, s * np.minimum(e, t), me, mt], axis=1)


@dataclasses.dataclass(frozen=True)
class QualityCalibration:
    """llr = weights . quality_measures(score, durations) + offset (QMF), and what it was fit on."""
    weights: tuple  # one per QMF_MEASURES (0 for those of a set not chosen)
    offset: float
    prior: float
    num_trials: int
    num_targets: int
    chosen: str = "durations+imposter"  # the QMF_SETS entry fitted: the lowest held-out-speaker Cllr on validation
    held_out_cllr: dict = dataclasses.field(default_factory=dict)  # QMF_SETS name -> leave-one-speaker-out Cllr

    def llr(self, scores, enroll_secs, test_secs, enroll_imposter, test_imposter):
        measures = quality_measures(scores, enroll_secs, test_secs, enroll_imposter, test_imposter)
        return measures @ np.asarray(self.weights) + self.offset


def fit_qmf(scores, labels, enroll_secs, test_secs, enroll_imposter, test_imposter, speakers=None,
            prior: float = 0.5) -> QualityCalibration:
    """fit_calibration's logistic regression (weighted_logistic: the same class weights, prior and
    regularisation) on the quality measures instead of the score alone: WeSpeaker's score_calibration.py
    QMF, with durations and imposter means. With measures that say nothing (all equal) it is the plain
    calibration.

    `speakers`: (enrolment speaker, test speaker) per trial. Then the set of measures (QMF_SETS) is the one
    with the lowest Cllr on held-out speakers: each validation speaker in turn, the fit on the trials without
    it, measured on the trials with it. A quality measure is mostly a property of the speaker (an imposter
    mean above all), so a few validation speakers give its weight the sign of their own quirks; this keeps a
    measure only when it carries over to speakers the fit has not seen. The final fit uses every trial."""
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    scores, labels = _scores_labels(scores, labels)
    n, n_tar = len(labels), int(labels.sum())
    measures = quality_measures(scores, enroll_secs, test_secs, enroll_imposter, test_imposter)
    held_out = held_out_cllr(measures, labels, speakers, prior) if speakers is not None else {}
    chosen = min(held_out, key=lambda k: (held_out[k], QMF_SETS[k])) if held_out else "durations+imposter"
    w, offset = np.zeros(measures.shape[1]), 0.0
    w[:QMF_SETS[chosen]], offset = weighted_logistic(measures[:, :QMF_SETS[chosen]], labels, prior)
    return QualityCalibration(weights=tuple(float(v) for v in w), offset=offset, prior=prior, num_trials=n,
                              num_targets=n_tar, chosen=chosen, held_out_cllr=held_out)


def held_out_cllr(measures, labels, speakers, prior: float) -> dict:
    """{QMF_SETS name: Cllr of its LLRs on held-out speakers}: for each speaker, the fit on the trials that do
    not involve it, the LLRs of those that do (a non-target trial is held out with either of its speakers).
    {} when no speaker can be held out (fewer than 3 speakers: what is left has no non-target trial)."""
    enroll, test = (np.asarray(side) for side in zip(*speakers)) if len(speakers) else (np.array([]),) * 2
    if len(enroll) != len(labels):
        raise ValueError(f"speakers: one (enrolment, test) pair per trial, got {len(enroll)} for {len(labels)}")
    out_llr = {name: [] for name in QMF_SETS}
    out_labels = []
    for spk in np.unique(np.concatenate([enroll, test])):
        out = (enroll == spk) | (test == spk)
        fit = ~out
        if labels[fit].all() or not labels[fit].any() or labels[out].all() or not labels[out].any():
            continue  # both kinds of trial on each side, or nothing to fit or measure
        for name, cols in QMF_SETS.items():
            w, offset = weighted_logistic(measures[fit, :cols], labels[fit], prior)
            out_llr[name].append(measures[out, :cols] @ w + offset)
        out_labels.append(labels[out])
    if not out_labels:
        return {}
    held = np.concatenate(out_labels)
    return {name: compute_cllr(np.concatenate(llrs), held) for name, llrs in out_llr.items()}


def save_qmf(folder, cal: QualityCalibration):
    write_json(Path(folder) / QMF_FILE, {**dataclasses.asdict(cal), "weights": list(cal.weights),
                                         "measures": list(QMF_MEASURES)})


def load_qmf(folder) -> QualityCalibration | None:
    """<folder>/calibration_qmf.json, or None when there is none (or it predates the imposter means: refit)."""
    path = Path(folder) / QMF_FILE
    data = read_json(path)
    if data is None or (isinstance(data, dict) and data.get("measures") == OLD_QMF_MEASURES):
        return None
    try:
        if data.pop("measures") != list(QMF_MEASURES) or len(data["weights"]) != len(QMF_MEASURES):
            raise ValueError("other quality measures than " + ", ".join(QMF_MEASURES))
        if data.get("chosen", "durations+imposter") not in QMF_SETS:
            raise ValueError(f"chosen: not one of {', '.join(QMF_SETS)}")
        return QualityCalibration(**{**data, "weights": tuple(float(w) for w in data["weights"])})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable ({' '.join(str(e).split())})") from None


def qmf_metrics(llrs, labels, cal: QualityCalibration) -> dict:
    """metrics.json's "qmf" entry: the actual DCFs and Cllr of the QMF LLRs, beside the plain calibration's."""
    return {**{f"act_dcf_{p:g}": compute_act_dcf(llrs, labels, p) for p in (0.01, 0.05)},
            "cllr": compute_cllr(llrs, labels), "calibration": dict(zip(QMF_MEASURES, cal.weights), offset=cal.offset),
            "chosen": cal.chosen, "held_out_cllr": cal.held_out_cllr}


# ---------------------------------------------------------------------------- named thresholds

def parse_threshold(name: str) -> tuple[str, float | None]:
    """'far:0.01' -> ('far', 0.01); 'eer' -> ('eer', None); anything else: a one-line error."""
    kind, colon, value = name.partition(":")
    if kind == "eer" and not colon:
        return kind, None
    if kind in ("min_dcf", "far", "frr", "bayes") and colon:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if 0 < number < 1:
            return kind, number
    raise ValueError(f"threshold {name!r}: expected {THRESHOLD_FORMS}")


def threshold_on(scores, labels, name: str, cal: Calibration | None = None) -> tuple[float, str]:
    """The named threshold on these (validation) raw scores, and a description with its error rates there."""
    kind, value = parse_threshold(name)
    scores, labels = _scores_labels(scores, labels)
    if kind == "eer":
        threshold, what = compute_eer(scores, labels)[1], "EER threshold"
    elif kind == "min_dcf":
        threshold, what = compute_min_dcf(scores, labels, value)[1], f"minDCF threshold at P_target={value:g}"
    elif kind in ("far", "frr"):
        fnr, fpr, thresholds = error_rates(scores, labels)
        # along the sweep fpr falls and fnr rises: the first threshold within the FAR target rejects
        # the fewest targets; the last within the FRR target accepts the fewest non-targets
        i = int(np.argmax(fpr <= value)) if kind == "far" else int(np.flatnonzero(fnr <= value)[-1])
        threshold, what = thresholds[i], f"{kind.upper()} target {value:g}"
    else:
        if cal is None:
            raise ValueError(f"threshold {name}: needs a calibration")
        threshold = cal.score_at(-_logit(value))
        what = f"Bayes decision at P_target={value:g}, calibrated LLR >= {-_logit(value):.3f},"
    if threshold == np.inf:  # the sweep's 'reject everything': just above every score, finite for print and JSON
        threshold = np.nextafter(scores.max(), np.inf)
    target = labels == 1
    far, frr = np.mean(scores[~target] >= threshold), np.mean(scores[target] < threshold)
    return float(threshold), f"{what} on validation speakers: FAR {far:.2%}, FRR {frr:.2%} of {len(scores)} trials"


def resolve_threshold(ckpt_folder, name: str) -> tuple[float, str]:
    """A named threshold (see the module doc) of a checkpoint, on the raw cosine score, and its description.

    Reads <ckpt>/eval/valid/scores.txt; bayes:<p> also the calibration (fit and saved when absent).
    """
    parse_threshold(name)  # a bad name is reported before any file is read
    scores, labels = validation_scores(ckpt_folder)
    cal = ensure_calibration(ckpt_folder) if name.startswith("bayes:") else None
    return threshold_on(scores, labels, name, cal)
