"""From scores to decisions: calibrated LLRs and named thresholds, from a checkpoint's validation trials.

A raw cosine score says which trial is more alike, not how sure to be. Calibration maps it to a
log-likelihood ratio, llr = scale * cosine + offset, fit on the checkpoint's validation trials
(<ckpt>/eval/valid/scores.txt, written by train_asv.py; never the test trials) and kept in
<ckpt>/calibration.json. An LLR is a decision at any prior: accept when llr >= -logit(P_target).

Named thresholds on the RAW cosine score, all from the validation trials:

    eer          the EER threshold
    min_dcf:<p>  the threshold reaching minDCF at P_target = p
    far:<rate>   the lowest threshold whose false-accept rate is at most rate (fewest false rejects)
    frr:<rate>   the highest threshold whose false-reject rate is at most rate (fewest false accepts)
    bayes:<p>    the calibrated decision llr >= -logit(p), expressed on the raw score

Calibration and thresholds are for raw cosine scores: AS-normed scores live on another scale, and
validation has no AS-norm.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from . import metrics
from .fileio import write_json

VALID_SCORES = Path("eval") / "valid" / "scores.txt"
CALIBRATION_FILE = "calibration.json"
THRESHOLD_FORMS = "eer, min_dcf:<p>, far:<rate>, frr:<rate> or bayes:<p>, with p and rate in (0, 1) (e.g. far:0.01)"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """llr = scale * score + offset, and what it was fit on."""
    scale: float
    offset: float
    prior: float  # the effective target prior of the fit
    num_trials: int
    num_targets: int

    def llr(self, scores):
        return self.scale * np.asarray(scores, dtype=np.float64) + self.offset

    def score_at(self, llr: float) -> float:
        """The raw score whose LLR is `llr`: an LLR threshold as a raw-score threshold."""
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


def fit_calibration(scores, labels, prior: float = 0.5) -> Calibration:
    """Affine score -> LLR map by prior-weighted logistic regression (BOSARIS's linear calibration).

    Logistic regression learns posterior log-odds, which hold the training set's target proportion.
    Class weights prior / N_tar and (1 - prior) / N_non (times N, sklearn's usual scale) make that
    proportion `prior` whatever the list's own is, so the fit weighs targets and non-targets as
    a cost at that prior would; subtracting logit(prior) then leaves the LLR. C is large: the fit is
    plain maximum likelihood, as BOSARIS and WeSpeaker do it; a strong penalty would shrink the
    scale toward 0 and make every LLR timid.
    """
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    scores, labels = _scores_labels(scores, labels)
    from sklearn.linear_model import LogisticRegression  # here: a second to import, needed only to fit

    n, n_tar = len(labels), int(labels.sum())
    weights = {1: prior * n / n_tar, 0: (1 - prior) * n / (n - n_tar)}
    # tol far below sklearn's 1e-4, which stops lbfgs some percent short of the optimum scale here
    model = LogisticRegression(C=1e6, class_weight=weights, tol=1e-8, max_iter=1000).fit(scores[:, None], labels)
    return Calibration(scale=float(model.coef_[0, 0]), offset=float(model.intercept_[0] - _logit(prior)),
                       prior=prior, num_trials=n, num_targets=n_tar)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def save_calibration(folder, cal: Calibration):
    write_json(Path(folder) / CALIBRATION_FILE, dataclasses.asdict(cal))


def load_calibration(folder) -> Calibration | None:
    """<folder>/calibration.json, or None when there is none."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    names = [f.name for f in dataclasses.fields(Calibration)]
    if not isinstance(data, dict) or sorted(data) != sorted(names) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object of the numbers {', '.join(names)}")
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
                         f"saves them with each validated checkpoint, or run evaluate_asv.py --ckpt_dir {ckpt} "
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
    """metrics.json's decision figures for a list's raw cosine scores: min_cllr always (it needs no
    calibration); with a calibration, the actual DCFs and Cllr of its LLRs, and the calibration."""
    out = {"min_cllr": metrics.compute_min_cllr(scores, labels)}
    if cal is not None:
        llrs = cal.llr(scores)
        out.update({f"act_dcf_{p:g}": metrics.compute_act_dcf(llrs, labels, p) for p in (0.01, 0.05)})
        out["cllr"] = metrics.compute_cllr(llrs, labels)
        out["calibration"] = {"scale": cal.scale, "offset": cal.offset}
    return out


def calibration_line(m: dict) -> str:
    """The calibration_metrics part of a printed per-list line."""
    if "cllr" not in m:
        return f" | minCllr {m['min_cllr']:.3f}"
    return (f" | actDCF0.01 {m['act_dcf_0.01']:.4f} | actDCF0.05 {m['act_dcf_0.05']:.4f} "
            f"| Cllr {m['cllr']:.3f} (min {m['min_cllr']:.3f})")


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
        threshold, what = metrics.compute_eer(scores, labels)[1], "EER threshold"
    elif kind == "min_dcf":
        threshold, what = metrics.compute_min_dcf(scores, labels, value)[1], f"minDCF threshold at P_target={value:g}"
    elif kind in ("far", "frr"):
        fnr, fpr, thresholds = metrics.error_rates(scores, labels)
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
