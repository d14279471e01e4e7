"""Markdown report of one or more training runs, from their metrics files only (never loads a model).

    python report.py exp/<run> [exp/<run2> ...] [--out FILE]

Reads exp/<run>/step-<N>/eval/<list>/metrics.json (and metrics_asnorm.json when present).
The list named "valid" holds validation speakers; every other list is a test list.
The headline numbers come from the checkpoint chosen on validation: the `best` symlink,
else the step with the best validation metric. The best step *on test* is shown for
reference only: picking it would tune on the test set.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import yaml

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


def read_config(run):
    """(valid_metric, valid_higher_better) from config.yaml; defaults when absent."""
    path = run / "config.yaml"
    if not path.exists():
        return "eer", False
    try:
        train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
        return train.get("valid_metric", "eer"), bool(train.get("valid_higher_better", False))
    except (OSError, yaml.YAMLError, AttributeError) as e:
        warn(f"cannot read {path}, using valid_metric=eer: {e}")
        return "eer", False


def step_number(name):
    match = re.fullmatch(r"step-(\d+)", name)
    return int(match.group(1)) if match else None


def collect(run):
    """{step: {list: metrics}}, AS-norm numbers folded in under "asnorm_<key>"."""
    evals = {}
    for eval_dir in sorted(run.glob("step-*/eval/*")):
        step = step_number(eval_dir.parent.parent.name)
        if step is None or not eval_dir.is_dir():
            continue
        metrics = load_json(eval_dir / "metrics.json")
        if metrics is None:
            continue
        if (eval_dir / "metrics_asnorm.json").exists():
            asnorm = load_json(eval_dir / "metrics_asnorm.json") or {}
            metrics.update({"asnorm_" + key: value for key, value in asnorm.items()})
        evals.setdefault(step, {})[eval_dir.name] = metrics
    return dict(sorted(evals.items()))


def choose_step(run, evals):
    """(step, how it was chosen); step is None when nothing tells us."""
    best = run / "best"
    if best.is_symlink() or best.exists():
        step = step_number(best.resolve().name)
        if step is not None:
            return step, "`best` symlink" + ("" if step in evals else "; that step has no metrics.json")
        warn(f"{best} does not point to a step-<N> directory, ignored")
    metric, higher_better = read_config(run)
    scored = {s: lists[VALID][metric] for s, lists in evals.items()
              if isinstance(lists.get(VALID, {}).get(metric), (int, float))}
    if not scored:
        return None, f"no `best` symlink and no {VALID} list with '{metric}'"
    pick = max if higher_better else min  # ties go to the earliest step
    return pick(scored, key=scored.get), f"{'highest' if higher_better else 'lowest'} {VALID} {metric}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def list_names(evals):
    """The test lists: every evaluated list except the validation one."""
    return sorted({name for lists in evals.values() for name in lists if name != VALID})


def run_section(run, evals, chosen, how, plot_path):
    """Markdown lines for one run: how the step was chosen, then every checkpoint per test list."""
    lines = [f"## {run}", "", f"Chosen checkpoint: step {chosen} ({how})." if chosen is not None
             else f"No checkpoint chosen: {how}.", ""]
    if plot_path:
        lines += [f"Plot: {plot_path}", ""]
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


def plot(run, evals, chosen):
    """Save exp/<run>/eer_vs_step.png; return its path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
    path = run / "eer_vs_step.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, e.g. exp/<run>")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write; None means exp/<run>/report.md for one run, "
                             "report.md in the current directory for several")
    parser.add_argument("--no-plots", action="store_true", help="skip exp/<run>/eer_vs_step.png")
    args = parser.parse_args(argv)

    summary, sections, missing_matplotlib = [], [], False
    for run in args.runs:
        evals = collect(run) if run.is_dir() else {}
        if not evals:
            print(f"{run}: no evaluated checkpoints (no step-<N>/eval/<list>/metrics.json), skipped",
                  file=sys.stderr)
            continue
        chosen, how = choose_step(run, evals)
        plot_path = None if args.no_plots else plot(run, evals, chosen)
        missing_matplotlib |= not args.no_plots and plot_path is None
        sections += run_section(run, evals, chosen, how, plot_path)
        picked = evals.get(chosen, {})
        summary += [(run, name, chosen, picked.get(VALID, {}), picked.get(name, {}))
                    for name in list_names(evals)]
    if not sections:
        print("error: no run had any evaluated checkpoint", file=sys.stderr)
        return 1

    # AS-norm columns only when some chosen checkpoint has AS-norm numbers.
    columns = COLUMNS + [c for c in ASNORM_COLUMNS if any(c[0] in row[-1] for row in summary)]
    rows = [[run, name, "none" if chosen is None else chosen, fmt("eer", valid.get("eer"))]
            + [fmt(key, test.get(key)) for key, _ in columns] for run, name, chosen, valid, test in summary]
    header = ["run", "list", "chosen step", f"{VALID} EER %"] + [h for _, h in columns]
    lines = ["# ASV report", "", "## Summary: checkpoint chosen on validation", ""]
    lines += (table(header, rows) if rows else ["No test lists evaluated."]) + [""] + sections
    text = "\n".join(lines)
    out = args.out or (args.runs[0] / "report.md" if len(args.runs) == 1 else Path("report.md"))
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    if missing_matplotlib:
        print("(install matplotlib for plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
