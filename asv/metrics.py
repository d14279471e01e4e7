"""Speaker-verification metrics: EER and minDCF (NIST SRE definitions), numpy only.

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
"""
import numpy as np


def _check(scores, labels):
    """Return (scores as float64, labels as bool), or raise a one-line ValueError."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}")
    if len(scores) != len(labels):
        raise ValueError(f"scores and labels differ in length: {len(scores)} vs {len(labels)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores contain {np.count_nonzero(~np.isfinite(scores))} NaN/inf value(s)")
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
    threshold = lo + a * (hi - lo) if np.isfinite(hi) else lo
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
