"""Figures of report.py: DET curves, score histograms, EER vs step, layer weights. Files only.

matplotlib is imported on first use (`pyplot`), not with this module: report.py imports it to
write tables even where matplotlib is absent. Every builder returns the Figure unsaved, so
tests can inspect what is drawn; `save` writes it in each asked format and closes it.

DET axes are probit (inverse normal CDF) scaled, as NIST draws them. Their tick labels are
chosen so that they never collide at the figure size (`det_ticks`): the 1-2-5 ticks crowd
together where the probit scale is dense, so ticks are picked in order of preference and one
that would sit closer than a label's width to a taken one is dropped.
"""
from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np

from . import metrics

FORMATS = ("png", "pdf", "svg")
VALID = "valid"  # the validation list (data folders' trials/valid.txt); every other list is a test list
P_TARGETS = (0.01, 0.05)  # the minDCF operating points marked on DET curves (the tables' minDCF columns)
MARKERS = {"eer": "o", 0.01: "s", 0.05: "^"}

DET_SIZE = 6.0  # inches, square
DET_AXIS_INCHES = 0.77 * DET_SIZE  # the square axes take ~77% of the figure (matplotlib's default margins)
TICK_LABEL_INCHES = 0.36  # the widest label ("0.05" at 10 pt is ~0.31 in) plus a gap
# Candidate ticks (rates), most preferred first: decades and 50%, their mirrors 90%/99%, then the 5s, then the 2s.
DET_TICK_PREFERENCE = [1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.99, 0.05, 0.2, 0.8, 0.95, 5e-3, 5e-4,
                       0.02, 0.4, 0.6, 2e-3, 2e-4]
DET_TICKS = sorted(DET_TICK_PREFERENCE)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, stem, formats=("png",)) -> list[Path]:
    """Write `fig` as stem.<format> for each format, close it, return the paths.

    svg keeps its text as text and pdf embeds TrueType fonts (not Type 3): both stay editable and
    searchable, which papers' submission checks ask for.
    """
    import matplotlib

    paths = []
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        for fmt in formats:
            path = Path(f"{stem}.{fmt}")  # not with_suffix: a list name may hold a dot
            path.parent.mkdir(parents=True, exist_ok=True)  # report.py --out new/folder/cmp.md
            fig.savefig(path, dpi=100, bbox_inches="tight")
            paths.append(path)
    matplotlib.pyplot.close(fig)
    return paths


# ---------------------------------------------------------------------------- DET

def ppf(p):
    """Inverse standard normal CDF (probit), elementwise; stdlib NormalDist, so no scipy.

    Probabilities are clipped to [1e-9, 1 - 1e-9]: the DET sweep's end points (rates of 0 and 1)
    land at about -/+6, far outside the plotted axes, instead of at -/+inf.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])(p)


def det_limits(curves, marks=()):
    """(low, high) rate shown on both DET axes: down to about one error in the smaller class, at least 0.01%;
    up to 50%, or 99% when an EER or a marked point (`marks`: (false alarm, miss) rates) lies above ~40%.
    Rates of exactly 0 or 1 (all accepted / all rejected) cannot be drawn on probit axes and are not counted."""
    smallest = min(1 / min(np.count_nonzero(c["labels"]), np.count_nonzero(c["labels"] == 0)) for c in curves)
    low = max(t for t in DET_TICKS if t <= max(smallest, DET_TICKS[0]))
    rates = [c["eer"] for c in curves] + [r for point in marks for r in point if 0 < r < 1]
    high = 0.5 if max(rates) < 0.4 else 0.99
    return low, high


def det_min_gap(low, high):
    """The least distance (probit units) between two tick positions whose labels must not touch."""
    return TICK_LABEL_INCHES * float(ppf(high) - ppf(low)) / DET_AXIS_INCHES


def det_ticks(low, high):
    """Tick rates in [low, high], ascending, at least det_min_gap apart on the probit axis."""
    gap, taken = det_min_gap(low, high), []
    for rate in DET_TICK_PREFERENCE:
        position = float(ppf(rate))
        if low <= rate <= high and all(abs(position - other) >= gap for other in ppf(taken)):
            taken.append(rate)
    return sorted(taken)


def tick_label(rate):
    return f"{100 * rate:g}"


def operating_point(scores, labels, threshold):
    """(false alarm rate, miss rate) when accepting score >= threshold."""
    target = np.asarray(labels) == 1
    return float(np.mean(scores[~target] >= threshold)), float(np.mean(scores[target] < threshold))


def det_axes(ax, low, high):
    """Square probit axes from `low` to `high` (rates) on both sides, ticks from det_ticks, labels in %."""
    ticks = det_ticks(low, high)
    ax.set(xlim=ppf([low, high]), ylim=ppf([low, high]), xticks=ppf(ticks), yticks=ppf(ticks),
           xticklabels=[tick_label(t) for t in ticks], yticklabels=[tick_label(t) for t in ticks],
           xlabel="false alarm rate (%)", ylabel="miss rate (%)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def det_figure(plt, curves, title):
    """DET curves on probit axes, each with its EER point and its minDCF operating points (P_target 0.01
    and 0.05: where the threshold reaching minDCF lies). `curves`: dicts of scores, labels, eer (fraction),
    label, and optionally color and linestyle."""
    fig, ax = plt.subplots(figsize=(DET_SIZE, DET_SIZE))
    marks = []  # (false alarm rate, miss rate, P_target, colour)
    for i, c in enumerate(curves):
        color, style = c.get("color", f"C{i}"), c.get("linestyle", "-")
        fpr, fnr = metrics.det_curve_points(c["scores"], c["labels"])
        ax.plot(ppf(fpr), ppf(fnr), color=color, linestyle=style, label=f"{c['label']} (EER {100 * c['eer']:.2f}%)")
        ax.plot(ppf(c["eer"]), ppf(c["eer"]), MARKERS["eer"], color=color, markersize=6)
        for p in P_TARGETS:
            threshold = metrics.compute_min_dcf(c["scores"], c["labels"], p)[1]
            marks.append((*operating_point(c["scores"], c["labels"], threshold), p, color))
    low, high = det_limits(curves, [m[:2] for m in marks])
    for fa, miss, p, color in marks:
        # A rate of 0 (no false alarm at a strict threshold: common at P_target 0.01 on small lists) lies at
        # -inf on a probit axis: the point is put on the axis edge, where its curve leaves the plot.
        ax.plot(*np.clip(ppf([fa, miss]), *ppf([low, high])), MARKERS[p], color=color, markersize=7,
                markerfacecolor="none", clip_on=False)
    ax.plot(ppf([low, high]), ppf([low, high]), color="gray", linestyle=":", linewidth=1, label="miss = false alarm")
    # marker keys, drawn once in black: the points themselves carry their curve's colour
    ax.plot([], [], MARKERS["eer"], color="black", label="EER")
    for p in P_TARGETS:
        ax.plot([], [], MARKERS[p], color="black", markerfacecolor="none", label=f"minDCF, P_target={p:g}")
    det_axes(ax, low, high)
    ax.set_title(title)
    # below the axes: inside, the legend would hide the curves of a weak system wherever it sat
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small")
    return fig


def histogram_figure(plt, curves, title):
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
        ax.set(xlabel=f"{c['label']} score", ylabel="density", title=f"{c['label']} scores")
        ax.margins(y=0.4)  # headroom above the bars for the legend
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------- over training

def eer_vs_step_figure(plt, panels, title):
    """EER % vs step, one axes per panel: {"title", "series": [{label, points [(step, eer %)], color?,
    linestyle?, marker?}], "chosen": {color: step} or {}}. A chosen step is a vertical dotted line."""
    # constrained layout makes room for each legend beside its axes: with fixed margins the legend of a
    # panel lay under its right-hand neighbour (long run names cut off), the last one past the figure's edge
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        for s in panel["series"]:
            if s["points"]:
                ax.plot(*zip(*s["points"]), marker=s.get("marker", "o"), linestyle=s.get("linestyle", "-"),
                        color=s.get("color"), label=s["label"])
        for color, step in panel.get("chosen", {}).items():
            ax.axvline(step, color=color, linestyle=":", label=f"chosen (step {step})")
        ax.set(xlabel="step", ylabel="EER %", title=panel["title"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the lines stay visible
    fig.suptitle(title)
    # as wide as 5 in of axes plus the widest legend per panel, so long run names do not squeeze the axes
    widest = max(ax.get_legend().get_window_extent(fig.canvas.get_renderer()).width for ax in axes[0]) / fig.dpi
    fig.set_figwidth(len(panels) * (5.5 + widest))
    return fig


def layer_bars_figure(plt, weights, title):
    """The learned softmax weight of each upstream layer, uniform marked."""
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(weights) + 2), 3.5))
    ax.bar(range(len(weights)), weights, color="C0")
    ax.axhline(1 / len(weights), color="gray", linestyle="--", label=f"uniform (1/{len(weights)})")
    ax.set(xlabel="upstream layer (0 = CNN features / transformer input)", ylabel="softmax weight", title=title)
    if len(weights) <= 40:
        ax.set_xticks(range(len(weights)))
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return fig


def layer_weights_vs_step_figure(plt, history, title):
    """Each layer's weight vs step, `history` {step: [weight per layer]}; layers coloured from shallow
    (dark) to deep (light), which a colour bar keys better than a 25-entry legend would."""
    import matplotlib

    steps = sorted(history)
    table = np.array([history[s] for s in steps])  # (steps, layers)
    layers = table.shape[1]
    cmap = matplotlib.colormaps["viridis"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in range(layers):
        ax.plot(steps, table[:, layer], marker="o", markersize=3, color=cmap(layer / max(layers - 1, 1)),
                label=f"layer {layer}")
    ax.axhline(1 / layers, color="gray", linestyle="--", linewidth=1, label=f"uniform (1/{layers})")
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, layers - 1), cmap), ax=ax)
    bar.set_label("upstream layer (0 = CNN features / transformer input)")
    ax.set(xlabel="step", ylabel="softmax weight", title=title)
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------- report.py's figures
# A `run` here is report.py's Run: path, label, color, evals {step: {list: metrics}}, chosen, picks
# {test list: reported step}, curves {test list: [scores dicts]}, weights {step: layer weights}.

def test_lists(evals):
    """The test lists: every evaluated list except the validation one."""
    return sorted({name for lists in evals.values() for name in lists if name != VALID})


def eer_series(run, name, color=None, prefix=""):
    """One EER-vs-step line: validation (dashed, from the history) or test list `name` (evaluated checkpoints)."""
    points = [(s, lists[name]["eer"]) for s, lists in run.evals.items()  # steps only: an averaged `best` has none
              if isinstance(s, int) and isinstance(lists.get(name, {}).get("eer"), (int, float))]
    return {"label": prefix + name, "points": points, "color": color,
            "linestyle": "--" if name == VALID else "-", "marker": "." if name == VALID else "o"}


def multi_layer_history(weights):
    """{step: weights} of the checkpoints with several layers, all of the most common layer count; {} if none."""
    sizes = [len(w) for w in weights.values() if len(w) > 1]
    if not sizes:
        return {}
    size = max(set(sizes), key=sizes.count)
    return {step: w for step, w in weights.items() if len(w) == size}


def run_plots(plt, run, formats):
    """Every plot of one run, under its folder; returns the paths and notes about lists without scores."""
    panel = {"title": "", "series": [eer_series(run, name) for name in [VALID] + test_lists(run.evals)],
             "chosen": {"gray": run.chosen} if isinstance(run.chosen, int) else {}}
    paths = save(eer_vs_step_figure(plt, [panel], str(run.path)), run.path / "eer_vs_step", formats)
    missing, name = [], run.path.resolve().name or str(run.path)
    if run.chosen is not None:
        for list_name in sorted(n for n in run.evals.get(run.chosen, {}) if n != VALID):
            curves = run.curves.get(list_name)
            if not curves:
                missing.append(list_name)
                continue
            title = f"{name}: {list_name}, " + (f"step {run.chosen}" if isinstance(run.chosen, int) else run.chosen)
            paths += save(det_figure(plt, curves, "DET " + title), run.path / f"det_{list_name}", formats)
            paths += save(histogram_figure(plt, curves, "Scores " + title), run.path / f"scores_{list_name}", formats)
    chosen_weights = run.weights.get(run.chosen)
    if chosen_weights and len(chosen_weights) > 1:
        fig = layer_bars_figure(plt, chosen_weights, f"Layer weights {name}, step {run.chosen}")
        paths += save(fig, run.path / "layer_weights", formats)
    history = multi_layer_history(run.weights)
    if history:
        fig = layer_weights_vs_step_figure(plt, history, f"Layer weights over training: {name}")
        paths += save(fig, run.path / "layer_weights_vs_step", formats)
    notes = [f"No readable scores.txt at step {run.chosen} for {', '.join(missing)}: "
             "no DET curve or score histogram."] if missing else []
    return paths, notes


def comparison_plots(plt, runs, stem, formats, protocol):
    """stem_det_<list>: every run's DET curve (raw solid, AS-norm dashed, one colour per run) per test list;
    stem_eer_vs_step: validation and test EER vs step, a panel per list. Returns (paths, notes)."""
    which = "chosen on validation" if protocol == "valid" else "BEST ON TEST (SUPERB protocol)"
    paths, notes = [], []
    names = sorted({name for run in runs for name in run.picks})
    for name in names:
        curves = [{**c, "label": f"{run.label}" + ("" if c["kind"] == "raw" else " AS-norm") + f", step {c['step']}",
                   "color": run.color, "linestyle": "-" if c["kind"] == "raw" else "--"}
                  for run in runs for c in run.curves.get(name, [])]
        absent = [run.label for run in runs if not run.curves.get(name)]
        if absent:
            notes.append(f"{name}: no readable scores.txt for {', '.join(absent)}, not on its DET plot.")
        if curves:
            paths += save(det_figure(plt, curves, f"DET {name}, checkpoints {which}"), f"{stem}_det_{name}", formats)
    panels = [{"title": name, "chosen": {run.color: run.picks[name] for run in runs
                                         if isinstance(run.picks.get(name), int)},
               "series": [eer_series(run, shown, run.color, f"{run.label} ") for run in runs
                          for shown in dict.fromkeys([VALID, name])]}
              for name in names or [VALID]]
    paths += save(eer_vs_step_figure(plt, panels, "EER vs step (dashed: validation)"), f"{stem}_eer_vs_step", formats)
    return paths, notes
