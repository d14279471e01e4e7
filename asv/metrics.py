"""Speaker-verification metrics: EER, minDCF, actDCF, Cllr (NIST SRE / BOSARIS definitions).

numpy only, except min Cllr, which takes scikit-learn's isotonic regression (PAV).

Convention: a trial is *accepted* when ``score >= threshold``. ``labels`` are
1 (target: same speaker) or 0 (non-target); booleans are fine.

With N_tar target and N_non non-target trials, for a threshold t:

    P_miss(t) = #{targets with score < t}      / N_tar     (false negative rate, FNR)
    P_fa(t)   = #{non-targets with score >= t} / N_non     (false positive rate, FPR)

The sweep takes t = every distinct score (ascending) plus t = +inf, so all
trials with the same score always fall on the same side of a threshold. It
starts at (P_miss, P_fa) = (0, 1) (everything accepted) and ends at (1, 0)
(everything rejected).

EER: P_miss rises and P_fa falls along the sweep. Take the two neighbouring
points i-1, i with P_miss[i-1] < P_fa[i-1] and P_miss[i] >= P_fa[i], and
intersect the straight line between them with P_miss = P_fa:

    d = P_miss - P_fa,   a = d[i-1] / (d[i-1] - d[i])
    EER = P_miss[i-1] + a * (P_miss[i] - P_miss[i-1])

The EER threshold is interpolated the same way (when t[i] is +inf, t[i-1]).

Detection cost (NIST SRE), normalised by the cost of the best trivial system
(accept everything or reject everything), so a useless system scores 1:

    DCF(t)  = C_miss * P_target * P_miss(t) + C_fa * (1 - P_target) * P_fa(t)
    minDCF  = min_t DCF(t) / min(C_miss * P_target, C_fa * (1 - P_target))

The sweep uses one argsort and cumulative sums: O(N log N) time, O(N) memory.
``compute_metrics`` sorts once and shares the sweep between EER and minDCFs.

The next metrics read the scores as calibrated log-likelihood ratios, llr = log p(s|target) / p(s|non):

    actDCF  = DCF(t_Bayes) / min(C_miss * P_target, C_fa * (1 - P_target)),
              t_Bayes = log(C_fa * (1 - P_target) / (C_miss * P_target))   (= -logit(P_target) at unit costs)
    Cllr    = 1/2 * [ mean_targets log2(1 + e^-llr) + mean_non-targets log2(1 + e^llr) ]   (Brummer 2006)
    min Cllr = Cllr of the best monotonic recalibration of the scores (PAV, see ``pav_llrs``)

actDCF >= minDCF always (the Bayes threshold is one of the thresholds minDCF tries); the gap is the
cost of miscalibration at that prior. Cllr averages that cost over all priors: 0 is perfect, 1 is an
llr of 0 for every trial (no information), more is worse than saying nothing. min Cllr <= Cllr, and
Cllr - min Cllr is the calibration loss. min Cllr and EER depend only on the order of the scores.
"""
import numpy as np


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
    """All the numbers a metrics.json holds, from one sort.

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
    the replicates' EERs. Seeded (numpy's default_rng(seed)): the same call gives the same interval.
    One sort, then O(N) per replicate.
    """
    scores, labels = _check(scores, labels)
    enroll_speakers, test_speakers = np.asarray(enroll_speakers), np.asarray(test_speakers)
    if enroll_speakers.shape != scores.shape or test_speakers.shape != scores.shape:
        raise ValueError(f"enroll_speakers and test_speakers must hold one speaker per trial ({len(scores)})")
    if not 0 < level < 1 or n < 1:
        raise ValueError(f"level must be in (0, 1) and n >= 1, got level={level}, n={n}")
    speakers, codes = np.unique(np.r_[enroll_speakers, test_speakers], return_inverse=True)
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
    return float(low), float(high)
