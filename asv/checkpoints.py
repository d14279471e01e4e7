"""Checkpoints of a run folder: names, the validation history, the `best` link and pruning. One place,
used by training, evaluation and the report.

    exp/<run>/step-N/           Accelerate state + model.pt (+ eval/valid/metrics.json when validated at N)
    exp/<run>/valid_history.jsonl  one line per validation: {"step": N, "eer": ..., ...}, kept after pruning
    exp/<run>/best -> step-K    the checkpoint that ranks first on validation

A checkpoint is written as step-N.tmp and renamed when complete, so every step-N folder is whole.
`settle` derives everything else from the checkpoints' own records: it rebuilds the history's
missing lines from step-*/eval/valid/metrics.json, points `best` at the best checkpoint that exists,
and prunes. It runs after every save and when a run starts, so a kill at any instant (between the
rename and the link, say) is repaired by the next run and `best` never names a deleted folder.

Ranking (`rank_key`): the validation metric (train.valid_metric), then minDCF at 0.01 and 0.05,
then the larger margin between the mean target and mean non-target score (continuous, so it
still separates checkpoints whose error counts tie), then the later step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .fileio import write_text

STEP_NAME = re.compile(r"step-(\d+)")
HISTORY = "valid_history.jsonl"


def step_of(path) -> int | None:
    """step-1200 -> 1200; anything else (best, step-1200.tmp) -> None."""
    match = STEP_NAME.fullmatch(Path(path).name)
    return int(match[1]) if match else None


def complete_checkpoints(exp) -> list[Path]:
    """step-N folders, oldest first (half-written step-N.tmp folders never count)."""
    found = [p for p in Path(exp).glob("step-*") if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=step_of)


def read_history(exp) -> list[dict]:
    """The validation history, oldest first; a torn last line (a kill mid-write) is ignored."""
    path = Path(exp) / HISTORY
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return sorted({e["step"]: e for e in entries}.values(), key=lambda e: e["step"])


def write_history(exp, entries: list[dict]):
    write_text(Path(exp) / HISTORY, "".join(json.dumps(e) + "\n" for e in sorted(entries, key=lambda e: e["step"])))


def record_validation(exp, step: int, result: dict):
    """Add (or replace) the history line of `step`."""
    write_history(exp, [e for e in read_history(exp) if e["step"] != step] + [{"step": step, **result}])


def truncate_history(exp, step: int):
    """A run resumed at `step` redoes what came after it: the history must not claim it already happened."""
    entries = read_history(exp)
    if any(e["step"] > step for e in entries):
        write_history(exp, [e for e in entries if e["step"] <= step])


def rank_key(entry: dict, metric: str) -> tuple:
    """Smaller is better; see the module docstring."""
    return (entry[metric], entry.get("min_dcf_0.01", 0.0), entry.get("min_dcf_0.05", 0.0),
            -entry.get("score_margin", 0.0), -entry["step"])


def best_entry(entries: list[dict], metric: str) -> dict | None:
    ranked = [e for e in entries if isinstance(e.get(metric), (int, float))]
    return min(ranked, key=lambda e: rank_key(e, metric)) if ranked else None


def point_best(exp, step: int | None):
    """exp/best -> step-N, replaced atomically (or removed when nothing is validated)."""
    link = Path(exp) / "best"
    if step is None:
        link.unlink(missing_ok=True)
        return
    if link.is_symlink() and os.readlink(link) == f"step-{step}":
        return
    tmp = Path(exp) / "best.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"step-{step}")
    os.replace(tmp, link)


def best_step(exp) -> int | None:
    link = Path(exp) / "best"
    return step_of(os.readlink(link)) if link.is_symlink() else None


def settle(exp, metric: str, keep: int) -> int | None:
    """Make history, `best` and pruning agree with the checkpoints on disk; returns the best step."""
    exp = Path(exp)
    checkpoints = complete_checkpoints(exp)
    history = {e["step"]: e for e in read_history(exp)}
    missing = {}
    for ckpt in checkpoints:
        valid = ckpt / "eval" / "valid" / "metrics.json"
        if step_of(ckpt) not in history and valid.is_file():
            missing[step_of(ckpt)] = {"step": step_of(ckpt), **json.loads(valid.read_text())}
    if missing:
        write_history(exp, [*history.values(), *missing.values()])
        history.update(missing)
    on_disk = {step_of(c) for c in checkpoints}
    best = best_entry([e for s, e in history.items() if s in on_disk], metric)
    point_best(exp, best["step"] if best else None)
    if keep > 0:  # the newest `keep`, and always the best
        for old in checkpoints[:-keep]:
            if best is None or step_of(old) != best["step"]:
                shutil.rmtree(old)
    return best["step"] if best else None


def clear_partial_saves(exp):
    """step-N.tmp folders are saves a kill interrupted: never resumed from."""
    for tmp in Path(exp).glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
