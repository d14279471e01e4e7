"""Markdown report of one or more training runs, from their metrics files only (never loads a model).

    python report.py exp/<run> [exp/<run2> ...] [--out FILE]

Reads exp/<run>/step-<N>/eval/<list>/metrics.json (and metrics_asnorm.json when present).
The list named "valid" holds validation speakers; every other list is a test list.
The headline numbers come from the checkpoint chosen on validation: the `best` symlink,
else the step with the best validation metric. The best step *on test* is shown for
reference only: picking it would tune on the test set.

For the chosen checkpoint it also reads step-<N>/eval/<list>/scores.txt (and scores_asnorm.txt)
and step-<N>/layer_weights.json, and, when matplotlib is importable, saves under exp/<run>/:
eer_vs_step.png (every checkpoint), det_<list>.png (DET curve, raw and AS-norm, EER marked),
scores_<list>.png (target vs non-target score histogram, EER threshold marked) and, when the
upstream has several layers, layer_weights.png. The layer weights are also printed as a line.
"""
import argparse
import json
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import yaml

from asv import metrics
from asv.checkpoints import best_entry, best_step, read_history, step_of

VALID = "valid"
COLUMNS = [("eer", "EER %"), ("min_dcf_0.01", "minDCF 0.01"), ("min_dcf_0.05", "minDCF 0.05")]
ASNORM_COLUMNS = [("asnorm_" + key, "AS-norm " + header) for key, header in COLUMNS]


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def fmt(key, value):
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.2f}" if key.endswith("eer") else f"{value:.4f}"


def load_json(path):
    """The dict in `path`, or None with a one-line warning naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        warn(f"missing {path}, skipped")
        return None
    except (OSError, ValueError) as e:
        warn(f"cannot read {path}, skipped: {e}")
        return None
    if not isinstance(data, dict):
        warn(f"{path} does not hold a JSON object, skipped")
        return None
    return data


def valid_metric(run):
    """train.valid_metric from config.yaml; eer when absent."""
    path = run / "config.yaml"
    if not path.exists():
        return "eer"
    try:
        return ((yaml.safe_load(path.read_text()) or {}).get("train") or {}).get("valid_metric", "eer")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        warn(f"cannot read {path}, using valid_metric=eer: {e}")
        return "eer"


def collect(run):
    """{step: {list: metrics}}, AS-norm numbers folded in under "asnorm_<key>"; validation from the run's history."""
    evals = {}
    for eval_dir in sorted(run.glob("step-*/eval/*")):
        step = step_of(eval_dir.parent.parent)
        if step is None or not eval_dir.is_dir() or eval_dir.name.endswith((".tmp", ".old")):
            continue
        metrics = load_json(eval_dir / "metrics.json")
        if metrics is None:
            continue
        if (eval_dir / "metrics_asnorm.json").exists():
            asnorm = load_json(eval_dir / "metrics_asnorm.json") or {}
            metrics.update({"asnorm_" + key: value for key, value in asnorm.items()})
        evals.setdefault(step, {})[eval_dir.name] = metrics
    for entry in read_history(run):  # pruned checkpoints keep their validation line
        evals.setdefault(entry["step"], {})[VALID] = entry
    return dict(sorted(evals.items()))


def choose_step(run, evals, protocol="valid"):
    """(step, how it was chosen); step is None when nothing tells us."""
    if protocol == "superb":
        return None, "SUPERB protocol: every checkpoint is tested, the best on each test list is reported"
    step = best_step(run)
    if step is not None:
        return step, "`best` link, ranked on validation" + ("" if step in evals else "; that step has no metrics.json")
    metric = valid_metric(run)
    best = best_entry([{"step": s, **lists[VALID]} for s, lists in evals.items() if VALID in lists], metric)
    if best is None:
        return None, f"no `best` link and no {VALID} results with '{metric}'"
    return best["step"], f"lowest {VALID} {metric}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def list_names(evals):
    """The test lists: every evaluated list except the validation one."""
    return sorted({name for lists in evals.values() for name in lists if name != VALID})


def run_section(run, evals, chosen, how, plots=(), weights=None, notes=()):
    """Markdown lines for one run: how the step was chosen, its layer weights and plots,
    then every checkpoint per test list."""
    lines = [f"## {run}", "", f"Chosen checkpoint: step {chosen} ({how})." if chosen is not None
             else f"No checkpoint chosen: {how}.", ""]
    weights_line = layer_weights_line(weights)
    if weights_line:
        lines += [weights_line, ""]
    if plots:
        lines += ["Plots:", ""] + [f"- {path}" for path in plots] + [""]
    for note in notes:
        lines += [note, ""]
    for name in list_names(evals):
        steps = [s for s in evals if name in evals[s]]
        columns = COLUMNS + [c for c in ASNORM_COLUMNS if any(c[0] in evals[s][name] for s in steps)]
        rows = [[f"**{s}** (chosen)" if s == chosen else s, fmt("eer", evals[s].get(VALID, {}).get("eer"))]
                + [fmt(key, evals[s][name].get(key)) for key, _ in columns] for s in steps]
        lines += [f"### {name}", ""] + table(["step", f"{VALID} EER %"] + [h for _, h in columns], rows)
        on_test = [s for s in steps if isinstance(evals[s][name].get("eer"), (int, float))]
        if on_test:
            s = min(on_test, key=lambda s: evals[s][name]["eer"])
            lines += ["", f"best on test (for reference only, not a fair selection): "
                          f"step {s}, EER {evals[s][name]['eer']:.2f}%"]
        lines.append("")
    return lines


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(plt, fig, path):
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(plt, run, evals, chosen):
    """Save exp/<run>/eer_vs_step.png and return its path."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in [VALID] + list_names(evals):
        points = [(s, lists[name]["eer"]) for s, lists in evals.items()
                  if isinstance(lists.get(name, {}).get("eer"), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o", linestyle="--" if name == VALID else "-", label=name)
    if chosen is not None:
        ax.axvline(chosen, color="gray", linestyle=":", label=f"chosen (step {chosen})")
    ax.set(xlabel="step", ylabel="EER %", title=str(run))
    ax.grid(alpha=0.3)
    ax.legend()
    return save(plt, fig, run / "eer_vs_step.png")


def read_layer_weights(run, step):
    """The featurizer's layer weights saved with `step` (a list of floats), or None when absent or unreadable."""
    if step is None or not (path := run / f"step-{step}" / "layer_weights.json").exists():
        return None
    try:
        weights = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warn(f"cannot read {path}, skipped: {e}")
        return None
    if (not isinstance(weights, list) or not weights
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) for w in weights)):
        warn(f"{path} does not hold a list of finite numbers, skipped")
        return None
    return [float(w) for w in weights]


def layer_weights_line(weights):
    """One Markdown line of the learned layer weights; None for a single-layer upstream (nothing learned)."""
    if not weights or len(weights) < 2:
        return None
    top = int(np.argmax(weights))
    return (f"Layer weights of the chosen checkpoint ({len(weights)} layers; 0 = the upstream's CNN "
            f"features/transformer input): " + ", ".join(f"{i}: {w:.2f}" for i, w in enumerate(weights))
            + f". Highest: layer {top} ({weights[top]:.2f}); uniform would be {1 / len(weights):.2f}.")


def read_scores(path):
    """(scores float64, labels int8) from `enroll test score label` lines, or None with a warning.

    np.loadtxt (C parser since numpy 1.23) reads the 580k VoxCeleb1-E trials in ~0.4 s,
    faster than splitting the text in Python.
    """
    try:
        data = np.loadtxt(path, usecols=(2, 3), dtype=np.float64, ndmin=2, comments=None)
    except (OSError, ValueError) as e:
        warn(f"cannot read {path}, skipped: {e}")
        return None
    scores, labels = data[:, 0], data[:, 1]
    if not ((labels == 0) | (labels == 1)).all() or not labels.any() or labels.all():
        warn(f"{path} needs both target (1) and non-target (0) labels and no others, skipped")
        return None
    if not np.isfinite(scores).all():
        warn(f"{path} has NaN/inf scores, skipped")
        return None
    return scores, labels.astype(np.int8)


def ppf(p):
    """Inverse standard normal CDF (probit), elementwise; stdlib NormalDist, so no scipy.

    Probabilities are clipped to [1e-9, 1 - 1e-9]: the DET sweep's end points (rates of 0 and 1)
    land at about -/+6, far outside the plotted axes, instead of at -/+inf.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])(p)


DET_TICKS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99]


def det_limits(curves):
    """(low, high) rate shown on both DET axes: down to about one error in the smaller class, at least 0.01%."""
    smallest = min(1 / min(np.count_nonzero(c["labels"]), np.count_nonzero(c["labels"] == 0)) for c in curves)
    low = max(t for t in DET_TICKS if t <= max(smallest, DET_TICKS[0]))
    high = 0.5 if max(c["eer"] for c in curves) < 0.3 else 0.99
    return low, high


def tick_label(rate):
    return f"{100 * rate:g}"


def plot_det(plt, path, title, curves):
    """DET curve(s) on probit axes with their EER points; `curves` as from chosen_curves."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for c, color in zip(curves, ["C0", "C1"]):
        fpr, fnr = metrics.det_curve_points(c["scores"], c["labels"])
        ax.plot(ppf(fpr), ppf(fnr), color=color, label=f"{c['kind']} (EER {100 * c['eer']:.2f}%)")
        ax.plot(ppf(c["eer"]), ppf(c["eer"]), "o", color=color, markersize=6)
    low, high = det_limits(curves)
    # Below 0.1% the 2-5 ticks crowd together on a probit axis: keep the decades only.
    ticks = [t for t in DET_TICKS if low <= t <= high and (low >= 1e-3 or t >= 0.01 or t in (1e-4, 1e-3))]
    ax.plot(ppf([low, high]), ppf([low, high]), color="gray", linestyle=":", linewidth=1, label="miss = false alarm")
    ax.set(xlim=ppf([low, high]), ylim=ppf([low, high]), xticks=ppf(ticks), yticks=ppf(ticks),
           xticklabels=[tick_label(t) for t in ticks], yticklabels=[tick_label(t) for t in ticks],
           xlabel="false alarm rate (%)", ylabel="miss rate (%)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return save(plt, fig, path)


def plot_histograms(plt, path, title, curves):
    """Target vs non-target score histograms, one panel per score kind, EER threshold marked."""
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, c in zip(axes[0], curves):
        target = c["labels"] == 1
        bins = np.linspace(c["scores"].min(), c["scores"].max(), 81)
        ax.hist(c["scores"][~target], bins, density=True, histtype="stepfilled", alpha=0.5, color="C3",
                label=f"non-target ({np.count_nonzero(~target):,})")
        ax.hist(c["scores"][target], bins, density=True, histtype="stepfilled", alpha=0.5, color="C2",
                label=f"target ({np.count_nonzero(target):,})")
        ax.axvline(c["threshold"], color="black", linestyle="--",
                   label=f"EER threshold {c['threshold']:.3f} (EER {100 * c['eer']:.2f}%)")
        ax.set(xlabel=f"{c['kind']} score", ylabel="density", title=f"{c['kind']} scores")
        ax.margins(y=0.4)  # headroom above the bars for the legend
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return save(plt, fig, path)


def chosen_curves(run, step, name, lists):
    """The raw and AS-norm scores of list `name` at `step` that exist and read, with their EER and threshold.

    EER and threshold come from metrics(_asnorm).json (as in the tables), else from the scores.
    """
    curves = []
    for kind, suffix, prefix in [("raw", "", ""), ("AS-norm", "_asnorm", "asnorm_")]:
        path = run / f"step-{step}" / "eval" / name / f"scores{suffix}.txt"
        read = read_scores(path) if path.exists() else None
        if read is None:
            continue
        scores, labels = read
        eer, threshold = (lists.get(name, {}).get(prefix + key) for key in ("eer", "eer_threshold"))
        if isinstance(eer, (int, float)) and isinstance(threshold, (int, float)):
            eer = eer / 100
        else:
            eer, threshold = metrics.compute_eer(scores, labels)
        curves.append({"kind": kind, "scores": scores, "labels": labels, "eer": eer, "threshold": threshold})
    return curves


def plot_chosen(plt, run, evals, chosen, weights):
    """DET and score-histogram plots per test list of the chosen step, and the layer-weight bars.

    Returns (paths written, Markdown notes about test lists without scores).
    """
    paths, missing = [], []
    lists = evals.get(chosen, {})
    label = run.resolve().name or str(run)
    for name in sorted(n for n in lists if n != VALID):
        curves = chosen_curves(run, chosen, name, lists)
        if not curves:
            missing.append(name)
            continue
        title = f"{label}: {name}, step {chosen}"
        paths.append(plot_det(plt, run / f"det_{name}.png", "DET " + title, curves))
        paths.append(plot_histograms(plt, run / f"scores_{name}.png", "Scores " + title, curves))
    if weights and len(weights) > 1:
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(weights) + 2), 3.5))
        ax.bar(range(len(weights)), weights, color="C0")
        ax.axhline(1 / len(weights), color="gray", linestyle="--", label=f"uniform (1/{len(weights)})")
        ax.set(xlabel="upstream layer (0 = CNN features / transformer input)", ylabel="softmax weight",
               title=f"Layer weights {label}, step {chosen}")
        if len(weights) <= 40:
            ax.set_xticks(range(len(weights)))
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
        paths.append(save(plt, fig, run / "layer_weights.png"))
    notes = [f"No readable scores.txt at step {chosen} for {', '.join(missing)}: "
             "no DET curve or score histogram."] if missing else []
    return paths, notes


def best_on_test(evals, name):
    """The step with the lowest EER on test list `name` (SUPERB's stage 4; not a fair selection)."""
    scored = [s for s in evals if isinstance(evals[s].get(name, {}).get("eer"), (int, float))]
    return min(scored, key=lambda s: (evals[s][name]["eer"], -s)) if scored else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, e.g. exp/<run>")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write; None means exp/<run>/report.md for one run, "
                             "report.md in the current directory for several")
    parser.add_argument("--protocol", choices=("valid", "superb"), default="valid",
                        help="valid: the checkpoint chosen on validation speakers (honest); superb: SUPERB's stage 3+4, "
                             "every checkpoint tested and the best one ON THE TEST LIST reported, labelled so")
    parser.add_argument("--no-plots", action="store_true",
                        help="write no PNG (eer_vs_step, det_<list>, scores_<list>, layer_weights); "
                             "tables and the layer-weight line still come out")
    args = parser.parse_args(argv)

    plt = None if args.no_plots else pyplot()
    summary, sections = [], []
    for run in args.runs:
        evals = collect(run) if run.is_dir() else {}
        if not evals:
            print(f"{run}: no evaluated checkpoints (no step-<N>/eval/<list>/metrics.json), skipped",
                  file=sys.stderr)
            continue
        chosen, how = choose_step(run, evals, args.protocol)
        weights = read_layer_weights(run, chosen)
        plots, notes = [], []
        if plt is not None:
            plots.append(plot(plt, run, evals, chosen))
            if chosen is not None:
                chosen_plots, notes = plot_chosen(plt, run, evals, chosen, weights)
                plots += chosen_plots
        sections += run_section(run, evals, chosen, how, plots, weights, notes)
        for name in list_names(evals):
            step = chosen if args.protocol == "valid" else best_on_test(evals, name)
            picked = evals.get(step, {})
            summary.append((run, name, step, picked.get(VALID, {}), picked.get(name, {})))
    if not sections:
        print("error: no run had any evaluated checkpoint", file=sys.stderr)
        return 1

    # AS-norm columns only when some chosen checkpoint has AS-norm numbers.
    columns = COLUMNS + [c for c in ASNORM_COLUMNS if any(c[0] in row[-1] for row in summary)]
    rows = [[run, name, "none" if chosen is None else chosen, fmt("eer", valid.get("eer"))]
            + [fmt(key, test.get(key)) for key, _ in columns] for run, name, chosen, valid, test in summary]
    header = ["run", "list", "chosen step", f"{VALID} EER %"] + [h for _, h in columns]
    title = ("checkpoint chosen on validation" if args.protocol == "valid" else
             "BEST ON TEST (SUPERB protocol: each list's best checkpoint, chosen on the test trials themselves)")
    lines = ["# ASV report", "", f"## Summary: {title}", ""]
    lines += (table(header, rows) if rows else ["No test lists evaluated."]) + [""] + sections
    text = "\n".join(lines)
    out = args.out or (args.runs[0] / "report.md" if len(args.runs) == 1 else Path("report.md"))
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    if plt is None and not args.no_plots:
        print("(install matplotlib for plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
