"""Markdown report of one or more training runs, from their files only (never loads a model).

    python report.py exp/<run> [exp/<run2> ...] [--out FILE] [--format png pdf svg]

Reads exp/<run>/step-<N>/eval/<list>/metrics.json (and metrics_asnorm.json when present) and the
validation history exp/<run>/valid_history.jsonl, which outlives pruned checkpoints.
The list named "valid" holds validation speakers; every other list is a test list.
The headline numbers come from the checkpoint chosen on validation: the `best` symlink,
else the step with the best validation metric. The best step *on test* is shown for
reference only: picking it would tune on the test set.

The summary gives each test list's EER with a bootstrap confidence interval over speakers
(from the chosen checkpoint's scores.txt; speakers from the data folder's utterances.csv, matched by
utterance id or path: never guessed from a path; at least asv.metrics.MIN_BOOTSTRAP_SPEAKERS = 10
speakers, else the report says why there is none), minDCF, and
actDCF / Cllr / min Cllr when evaluation wrote them. Several runs also get a table of the
config keys that differ between them.

Plots (when matplotlib is importable), in each --format, under exp/<run>/: eer_vs_step (validation
history and test EER of every evaluated checkpoint), det_<list> (DET curve of the chosen
checkpoint, raw and AS-norm, EER and minDCF points marked), scores_<list> (target vs non-target
histogram), and, when the upstream has several layers, layer_weights (the chosen checkpoint's) and
layer_weights_vs_step (every checkpoint on disk). Several runs add, beside the --out file,
<out>_det_<list> (every run's DET curve on one plot) and <out>_eer_vs_step.
"""
import argparse
import csv
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from asv import metrics, plots
from asv.run import write_text
from asv.run import CHOICE_FILE, best_entry, best_step, best_target, read_history, step_of
from asv.plots import VALID
COLUMNS = [("eer", "EER %"), ("min_dcf_0.01", "minDCF 0.01"), ("min_dcf_0.05", "minDCF 0.05")]
# Written by evaluation when the checkpoint has a calibration (min Cllr always): shown when present.
CALIBRATION_COLUMNS = [("act_dcf_0.01", "actDCF 0.01"), ("act_dcf_0.05", "actDCF 0.05"), ("cllr", "Cllr"),
                       ("min_cllr", "min Cllr")]
ASNORM_COLUMNS = [("asnorm_" + key, "AS-norm " + header) for key, header in COLUMNS]
CI_SEED = 0
# Config keys that name where a run lies, not how it was trained: never a difference worth a row.
LOCATION_KEYS = ("exp_dir",)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def fmt(key, value):
    if not is_number(value):
        return "-"
    if key.endswith("eer"):
        return f"{value:.2f}"
    return f"{value:.3f}" if key.endswith("cllr") else f"{value:.4f}"


def read_mapping(path, parse, what: str, missing: str):
    """The dict `parse` makes of the file's text, or None with a one-line warning naming the file."""
    if not path.is_file():
        warn(f"missing {path}{missing}")
        return None
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        warn(f"cannot read {path}, skipped: {' '.join(str(e).split())}")
        return None
    if not isinstance(data, dict):
        warn(f"{path} does not hold {what}, skipped")
        return None
    return data


def load_json(path):
    return read_mapping(path, json.loads, "a JSON object", ", skipped")


def read_config(run):
    """exp/<run>/config.yaml as a dict, or None (the report goes on without it)."""
    return read_mapping(run / "config.yaml", yaml.safe_load, "a mapping of sections",
                        ": validation metric eer assumed, config not compared")


def section(config, name):
    value = (config or {}).get(name)
    return value if isinstance(value, dict) else {}


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
        for key, _ in COLUMNS:  # a hand-edited or foreign file: say which value the table shows as "-"
            if key in metrics and not is_number(metrics[key]):
                warn(f"{eval_dir / 'metrics.json'}: {key} is {metrics[key]!r}, not a finite number: shown as -")
        if (eval_dir / "metrics_asnorm.json").exists():
            asnorm = load_json(eval_dir / "metrics_asnorm.json") or {}
            metrics.update({"asnorm_" + key: value for key, value in asnorm.items()})
        evals.setdefault(step, {})[eval_dir.name] = metrics

    def bad_line(path, number, line):
        warn(f"{path}:{number} is not a JSON validation record, skipped: {line[:60]!r}")

    for entry in read_history(run, on_bad=bad_line):  # pruned checkpoints keep their validation line
        evals.setdefault(entry["step"], {})[VALID] = entry
    target = best_target(run)  # the averaged fallback `best` may point at: keyed by its folder name, listed last
    if target and step_of(target) is None:
        for eval_dir in sorted((run / target / "eval").glob("*")):
            if eval_dir.is_dir() and (metrics := load_json(eval_dir / "metrics.json")) is not None:
                evals.setdefault(target, {})[eval_dir.name] = metrics
    return dict(sorted(evals.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(12))))


def folder_of(run, step):
    """A checkpoint's folder: step-N for a step, the folder itself for a name (the averaged fallback)."""
    return run / (step if isinstance(step, str) else f"step-{step}")


def choose_step(run, evals, protocol, metric):
    """(step, how it was chosen); step is None when nothing tells us."""
    if protocol == "superb":
        return None, "SUPERB protocol: every checkpoint is tested, the best on each test list is reported"
    step = best_step(run)
    target = best_target(run)
    if step is None and target is not None and (run / target).is_dir():
        try:
            why = json.loads((run / CHOICE_FILE).read_text())["line"]
        except (OSError, ValueError, KeyError, TypeError):
            why = "`best` link"
        return target, why + ("" if target in evals else f"; {target} has no metrics.json")
    if step is not None:
        return step, "`best` link, ranked on validation" + ("" if step in evals else "; that step has no metrics.json")
    best = best_entry([{"step": s, **lists[VALID]} for s, lists in evals.items() if VALID in lists], metric)
    if best is None:
        return None, f"no `best` link and no {VALID} results with '{metric}'"
    return best["step"], f"lowest {VALID} {metric}"


def best_on_test(evals, name):
    """The step with the lowest EER on test list `name` (SUPERB's stage 4; not a fair selection)."""
    scored = [s for s in evals if isinstance(s, int) and isinstance(evals[s].get(name, {}).get("eer"), (int, float))]
    return min(scored, key=lambda s: (evals[s][name]["eer"], -s)) if scored else None


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


list_names = plots.test_lists


def columns_for(results):
    """COLUMNS, then the calibration and AS-norm columns that some of `results` (metrics dicts) hold."""
    return COLUMNS + [c for c in CALIBRATION_COLUMNS + ASNORM_COLUMNS if any(c[0] in r for r in results)]


# ---------------------------------------------------------------------------- one run's files

@dataclass
class Run:
    """What the report knows of one run folder."""
    path: Path
    label: str                  # the shortest name that tells it from the other runs (legends, column heads)
    color: str                  # its colour on every comparison plot
    config: dict | None
    evals: dict                 # {step: {list: metrics}}
    chosen: int | None
    how: str
    picks: dict                 # {test list: the step the summary reports}
    curves: dict = field(default_factory=dict)   # {test list: raw / AS-norm scores at picks[list]}
    weights: dict = field(default_factory=dict)  # {step: layer weights} of the checkpoints on disk
    ci: dict = field(default_factory=dict)       # {test list: (low, high) EER fractions}
    ci_sources: set = field(default_factory=set)  # where the speakers of the bootstrap came from
    plots: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def load_run(path, label, color, protocol, read_scores_files):
    """A Run, or None (said on stderr) when the folder has no evaluated checkpoint."""
    evals = collect(path) if path.is_dir() else {}
    if not evals:
        print(f"{path}: no evaluated checkpoints (no step-<N>/eval/<list>/metrics.json), skipped", file=sys.stderr)
        return None
    config = read_config(path)
    chosen, how = choose_step(path, evals, protocol, section(config, "train").get("valid_metric", "eer"))
    picks = {name: chosen if protocol == "valid" else best_on_test(evals, name) for name in list_names(evals)}
    run = Run(path, label, color, config, evals, chosen, how, picks, weights=layer_weight_history(path))
    if read_scores_files:
        run.curves = {name: chosen_curves(path, step, name, evals.get(step, {}))
                      for name, step in picks.items() if step is not None}
    return run


def short_names(paths):
    """The fewest trailing path components that tell the runs apart (run1, or exp1/run1 beside exp2/run1)."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(map(len, parts), default=0) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def read_layer_weights(run, step):
    """The featurizer's layer weights saved with `step` (a list of floats), or None when absent or unreadable."""
    if step is None or not (path := folder_of(run, step) / "layer_weights.json").exists():
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


def layer_weight_history(run):
    """{step: layer weights} of every step-N folder on disk that holds a readable layer_weights.json."""
    found = {}
    for folder in run.glob("step-*"):
        step = step_of(folder)
        if step is not None and folder.is_dir() and (weights := read_layer_weights(run, step)) is not None:
            found[step] = weights
    return dict(sorted(found.items()))


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


def chosen_curves(run, step, name, lists):
    """The raw and AS-norm scores of list `name` at `step` that exist and read, with their EER and threshold.

    EER and threshold come from metrics(_asnorm).json (as in the tables), else from the scores.
    """
    curves = []
    for kind, suffix, prefix in [("raw", "", ""), ("AS-norm", "_asnorm", "asnorm_")]:
        path = folder_of(run, step) / "eval" / name / f"scores{suffix}.txt"
        read = read_scores(path) if path.exists() else None
        if read is None:
            continue
        scores, labels = read
        eer, threshold = (lists.get(name, {}).get(prefix + key) for key in ("eer", "eer_threshold"))
        if isinstance(eer, (int, float)) and isinstance(threshold, (int, float)):
            eer = eer / 100
        else:
            eer, threshold = metrics.compute_eer(scores, labels)
        curves.append({"kind": kind, "label": kind, "path": path, "step": step, "scores": scores,
                       "labels": labels, "eer": eer, "threshold": threshold})
    return curves


# ---------------------------------------------------------------------------- EER confidence interval

@functools.lru_cache(maxsize=8)
def manifest_speakers(data_dir):
    """{utterance id or path: speaker} from data_dir/utterances.csv (paths as written there and as absolute
    paths, so a trial list of file paths finds its speakers), or None when it cannot be read."""
    path = Path(data_dir) / "utterances.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        speakers = {}
        for row in rows:
            audio = row["path"]
            absolute = str(Path(audio) if Path(audio).is_absolute() else (Path(data_dir) / audio).resolve())
            speakers.update({audio: row["speaker"], absolute: row["speaker"]})
        speakers.update({row["id"]: row["speaker"] for row in rows})  # ids win over a path that looks alike
        return speakers
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return None


def trial_speakers(path, config):
    """(enroll speakers, test speakers, where they came from) of a scores file's trials, or (None, why) when
    the speakers cannot be known. Only the manifest (utterances.csv of the config's data.dir) says who speaks:
    each trial side must be one of its ids or paths. A path component is no speaker label (a list of file
    paths would make every file's first folder, e.g. `data`, one speaker)."""
    try:
        ids = np.loadtxt(path, usecols=(0, 1), dtype=str, ndmin=2, comments=None)
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({' '.join(str(e).split())})"
    data_dir = section(config, "data").get("dir")
    if not isinstance(data_dir, str) or not data_dir:
        return None, "the run's config.yaml names no data.dir, whose utterances.csv says who speaks"
    manifest = manifest_speakers(str(data_dir))
    if manifest is None:
        return None, f"{Path(data_dir) / 'utterances.csv'} is not readable (it says who speaks)"
    unknown = [i for i in np.unique(ids) if i not in manifest and str(Path(i).resolve()) not in manifest]
    if unknown:
        return None, (f"{len(unknown)} utterance(s) of {path} (e.g. {unknown[0]}) are neither ids nor paths of "
                      f"{Path(data_dir) / 'utterances.csv'}, so their speakers are not known")
    lookup = np.vectorize(lambda i: manifest[i] if i in manifest else manifest[str(Path(i).resolve())], otypes=[object])
    speakers = lookup(ids)
    return speakers[:, 0], speakers[:, 1], f"{Path(data_dir) / 'utterances.csv'}"


def add_confidence_intervals(run, level, resamples):
    """run.ci from the raw scores of each reported test list; a note where there is none."""
    for name, curves in run.curves.items():
        raw = next((c for c in curves if c["kind"] == "raw"), None)
        if raw is None:
            continue
        speakers = trial_speakers(raw["path"], run.config)
        if speakers[0] is None:
            run.notes.append(f"No EER confidence interval for {name}: {speakers[1]}.")
            continue
        if len(raw["scores"]) * resamples > 1e8:  # ~0.1 s a resample per 500k trials: say why we are waiting
            print(f"{run.label} {name}: bootstrapping the EER over speakers ({len(raw['scores']):,} trials, "
                  f"{resamples} resamples; --ci-resamples sets how many)...", file=sys.stderr)
        try:
            run.ci[name] = metrics.eer_confidence_interval(raw["scores"], raw["labels"], speakers[0], speakers[1],
                                                           level=level, n=resamples, seed=CI_SEED)
        except ValueError as e:
            run.notes.append(f"No EER confidence interval for {name}: {e}.")
            continue
        run.ci_sources.add(speakers[2])


# ---------------------------------------------------------------------------- tables

def summary_lines(runs, protocol, level, resamples):
    """The summary table (one row per run and test list) and what its EER interval is."""
    picked = [(run, name, step, run.evals.get(step, {})) for run in runs for name, step in run.picks.items()]
    columns = columns_for([lists.get(name, {}) for _, name, _, lists in picked])
    with_ci = any(run.ci for run in runs)
    rows = []
    for run, name, step, lists in picked:
        test = lists.get(name, {})
        eer = fmt("eer", test.get("eer"))
        if name in run.ci and eer != "-":
            low, high = run.ci[name]
            eer += f" [{100 * low:.2f}, {100 * high:.2f}]"
        rows.append([run.path, name, "none" if step is None else step, fmt("eer", lists.get(VALID, {}).get("eer")),
                     eer] + [fmt(key, test.get(key)) for key, _ in columns[1:]])
    header = ["run", "list", "chosen step", f"{VALID} EER %", "EER % [CI]" if with_ci else "EER %"]
    title = ("checkpoint chosen on validation" if protocol == "valid" else
             "BEST ON TEST (SUPERB protocol: each list's best checkpoint, chosen on the test trials themselves)")
    lines = [f"## Summary: {title}", ""]
    lines += (table(header + [h for _, h in columns[1:]], rows) if rows else ["No test lists evaluated."]) + [""]
    if with_ci:
        sources = {}
        for run in runs:
            for source in sorted(run.ci_sources):
                sources.setdefault(source, []).append(run.label)
        lines += [f"EER [low, high]: {100 * level:g}% confidence interval from a bootstrap over speakers "
                  f"({resamples} resamples of each list's speakers with all their trials, percentile interval, "
                  f"seed {CI_SEED}), on the reported checkpoint's scores.txt; speakers from "
                  + "; ".join(f"{src} ({', '.join(labels)})" for src, labels in sources.items()) + ".", ""]
    return lines


def embedded(paths, base) -> list[str]:
    """Plots as Markdown images (a pdf, which viewers do not inline, as a link), by paths relative to the
    folder of the .md (`base`), so the report shows them wherever it and its run folders are moved together."""
    lines = []
    for path in paths:
        rel = Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()
        lines.append(f"[{Path(path).name}]({rel})" if Path(path).suffix == ".pdf" else f"![{Path(path).stem}]({rel})")
    return lines


def run_section(run, base=Path(".")):
    """Markdown lines for one run: how the step was chosen, its layer weights and plots (embedded by paths
    relative to `base`, the folder of the .md), then every checkpoint per test list and the validation history."""
    chosen = f"step {run.chosen}" if isinstance(run.chosen, int) else run.chosen
    lines = [f"## {run.path}", "", f"Chosen checkpoint: {chosen} ({run.how})." if run.chosen is not None
             else f"No checkpoint chosen: {run.how}.", ""]
    weights_line = layer_weights_line(run.weights.get(run.chosen))
    if weights_line:
        lines += [weights_line, ""]
    if run.plots:
        lines += ["Plots:", ""] + embedded(run.plots, base) + [""]
    for note in run.notes + calibration_notes(run):
        lines += [note, ""]
    evals = run.evals
    for name in list_names(evals):
        steps = [s for s in evals if name in evals[s]]
        columns = columns_for([evals[s][name] for s in steps])
        rows = [[f"**{s}** (chosen)" if s == run.chosen else s, fmt("eer", evals[s].get(VALID, {}).get("eer"))]
                + [fmt(key, evals[s][name].get(key)) for key, _ in columns] for s in steps]
        lines += [f"### {name}", ""] + table(["step", f"{VALID} EER %"] + [h for _, h in columns], rows)
        on_test = [s for s in steps if isinstance(evals[s][name].get("eer"), (int, float))]
        if on_test:
            s = min(on_test, key=lambda s: evals[s][name]["eer"])
            lines += ["", f"best on test (for reference only, not a fair selection): "
                          f"step {s}, EER {evals[s][name]['eer']:.2f}%"]
        lines.append("")
    return lines + averaged_lines(run) + history_lines(run)


def averaged_lines(run):
    """Checkpoints evaluate_asv.py --average wrote (a folder with averaged.json): which steps, and their results."""
    rows = []
    for folder in sorted(p for p in run.path.iterdir() if (p / "averaged.json").is_file()):
        steps = (load_json(folder / "averaged.json") or {}).get("steps")
        for eval_dir in sorted((folder / "eval").glob("*")):
            metrics = load_json(eval_dir / "metrics.json") if eval_dir.is_dir() else None
            if metrics is not None and not eval_dir.name.endswith((".tmp", ".old")):
                rows.append([folder.name, ", ".join(map(str, steps or [])) or "?", eval_dir.name]
                            + [fmt(key, metrics.get(key)) for key, _ in COLUMNS])
    if not rows:
        return []
    return (["### Averaged checkpoints (evaluate_asv.py --average)", ""]
            + table(["checkpoint", "steps averaged", "list"] + [h for _, h in COLUMNS], rows) + [""])


def calibration_notes(run):
    """One line per chosen checkpoint whose calibration was refused (evaluation wrote the reason in metrics.json)."""
    steps = sorted({s for s in [run.chosen, *run.picks.values()] if s is not None}, key=str)
    reasons = {s: r for s in steps for m in run.evals.get(s, {}).values()
               if isinstance(m.get("calibration"), dict) and (r := m["calibration"].get("refused"))}
    return [f"No calibration for step {s}: {r}. Its scores stay raw cosines (no actDCF or Cllr; min Cllr only)."
            for s, r in reasons.items()]


def history_lines(run):
    """The validation history (valid_history.jsonl), pruned checkpoints included and marked."""
    steps = [s for s in run.evals if VALID in run.evals[s]]
    if not steps:
        return []
    rows = [[f"**{s}** (chosen)" if s == run.chosen else s]
            + [fmt(key, run.evals[s][VALID].get(key)) for key, _ in COLUMNS]
            + ["on disk" if folder_of(run.path, s).is_dir() else "pruned"] for s in steps]
    return [f"### {VALID} (validation history)", ""] + table(["step"] + [h for _, h in COLUMNS] + ["checkpoint"],
                                                             rows) + [""]


def flatten(tree, prefix=""):
    """{"train": {"seed": 0}} -> {"train.seed": 0}; an empty mapping stays a value ({})."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


ABSENT = object()


def config_value(value, exp_dir):
    """A config value as a table cell; a path inside the run's own folder is written relative to it,
    so train.init_from=exp/a/step-100 and exp/b/step-100 compare equal (the same place in each run)."""
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, str):
        if isinstance(exp_dir, str) and exp_dir and value.startswith(exp_dir.rstrip("/") + "/"):
            value = "<exp_dir>" + value[len(exp_dir.rstrip("/")):]
        return value.replace("|", "\\|")
    return json.dumps(value).replace("|", "\\|")


def data_fingerprint(run):
    try:
        return json.loads((run.path / "run.json").read_text()).get("data_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def other_corpora(runs) -> str | None:
    """One line when two runs trained on different data (run.json's fingerprints) share a test list name: their
    `test` lists are not the same trials, so a side-by-side comparison would mislead. None when they may be compared."""
    for name in sorted({n for run in runs for n in list_names(run.evals)}):
        having = {}
        for run in runs:
            fingerprint = data_fingerprint(run)
            if fingerprint and name in list_names(run.evals):
                having.setdefault(fingerprint, run)
        if len(having) > 1:
            (a, ra), (b, rb) = list(having.items())[:2]
            return (f"{ra.path} and {rb.path} were trained on different data (data fingerprints {a}, {b}) and both "
                    f"have a list named '{name}': those are other trials; report them separately")
    return None


def config_lines(runs):
    """The config keys that differ between the runs (those with a readable config.yaml), one column per run."""
    compared = [run for run in runs if run.config is not None]
    if len(runs) < 2:
        return []
    lines = ["## Config differences", ""]
    if len(compared) < 2:
        return lines + ["Fewer than two runs have a readable config.yaml: nothing to compare.", ""]
    flats = [flatten(run.config) for run in compared]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    left_out = [f"{key} (where each run lies)" for key in LOCATION_KEYS if key in keys]
    fingerprints = {data_fingerprint(run) for run in compared}
    rows = []
    for key in keys:
        cells = [config_value(flat.get(key, ABSENT), run.config.get("exp_dir")) for flat, run in zip(flats, compared)]
        if key in LOCATION_KEYS or len(set(cells)) == 1:
            continue
        if key == "data.dir" and len(fingerprints) == 1 and None not in fingerprints:
            left_out.append("data.dir (the same data in another place: run.json's data fingerprints agree)")
            continue
        rows.append([key] + cells)
    lines += table(["key"] + [run.label for run in compared], rows) if rows else ["The runs' configs agree."]
    lines.append("")
    if left_out:
        lines += ["Left out: " + "; ".join(left_out) + ".", ""]
    missing = [str(run.path) for run in runs if run.config is None]
    if missing:
        lines += [f"Not compared (no readable config.yaml): {', '.join(missing)}.", ""]
    return lines


# ---------------------------------------------------------------------------- the verb

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, e.g. exp/<run>")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write; None means exp/<run>/report.md for one run, "
                             "report.md in the current directory for several (their comparison plots beside it)")
    parser.add_argument("--protocol", choices=("valid", "superb"), default="valid",
                        help="valid: the checkpoint chosen on validation speakers (honest); superb: SUPERB's stage 3+4, "
                             "every checkpoint tested and the best one ON THE TEST LIST reported, labelled so")
    parser.add_argument("--format", nargs="+", choices=plots.FORMATS, default=["png"],
                        help="file format(s) of every plot, e.g. --format pdf svg for a paper")
    parser.add_argument("--ci-level", type=float, default=0.95, help="level of the EER confidence interval")
    parser.add_argument("--ci-resamples", type=int, default=1000,
                        help="speaker bootstrap resamples of the EER confidence interval (0: no interval)")
    parser.add_argument("--no-plots", action="store_true",
                        help="write no plot files; tables and the layer-weight line still come out")
    args = parser.parse_args(argv)
    if not 0 < args.ci_level < 1 or args.ci_resamples < 0:
        parser.error("--ci-level must be in (0, 1) and --ci-resamples >= 0")
    args.format = list(dict.fromkeys(args.format))
    return args


def main(argv=None):
    args = parse_args(argv)
    plt = None if args.no_plots else plots.pyplot()
    found = [run for run in args.runs if run.is_dir()]
    labels = dict(zip(found, short_names(found)))
    runs = [load_run(path, labels.get(path, str(path)), f"C{i % 10}", args.protocol,
                     plt is not None or args.ci_resamples > 0) for i, path in enumerate(args.runs)]
    runs = [run for run in runs if run is not None]
    if not runs:
        print("error: no run had any evaluated checkpoint", file=sys.stderr)
        return 1
    problem = other_corpora(runs) if len(runs) > 1 else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    out = args.out or (args.runs[0] / "report.md" if len(args.runs) == 1 else Path("report.md"))
    if args.ci_resamples > 0:
        for run in runs:
            add_confidence_intervals(run, args.ci_level, args.ci_resamples)
    compared, compared_notes = [], []
    if plt is not None:
        for run in runs:
            run.plots, notes = plots.run_plots(plt, run, args.format)
            run.notes = notes + run.notes
        if len(runs) > 1:
            stem = out.parent / out.stem
            compared, compared_notes = plots.comparison_plots(plt, runs, stem, args.format, args.protocol)
    lines = ["# ASV report", ""] + summary_lines(runs, args.protocol, args.ci_level, args.ci_resamples)
    lines += config_lines(runs)
    if compared:
        lines += ["## Comparison plots", ""] + embedded(compared, out.parent) + [""]
        lines += [note for note in compared_notes for note in (note, "")]
    for run in runs:
        lines += run_section(run, out.parent)
    text = "\n".join(lines)
    write_text(out, text)  # atomic; makes --out's folder when it is new
    print(text)
    print(f"wrote {out}")
    if plt is None and not args.no_plots:
        print("(install matplotlib for plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
