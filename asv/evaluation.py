"""Checkpoints x trial lists -> <ckpt>/eval/<list>/{scores.txt, metrics.json} (+ AS-norm), as a set.

Used by evaluate_asv.py and by train_asv.py at the end of training. Each unique utterance of all
requested lists is embedded once, at full length, in length-sorted batches (asv/embedding.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import metrics
from .data import Trials, read_manifest, read_trials, trial_lists
from .embedding import (Extractors, asnorm, audio_durations, cohort_paths, embed_files, eval_folder, metrics_json,
                        metrics_line, score_trials, scores_text, trial_audio, trial_rows, write_eval_set)


@dataclass
class TrialList:
    name: str
    path: Path
    user_file: bool  # given as a file rather than one of the data folder's lists


def resolve_lists(data_dir: str, names_or_files: list[str]) -> list[TrialList]:
    """Trial list names (from data_dir/trials) or files; default: every test list of the data folder."""
    known = trial_lists(data_dir)
    if not names_or_files:
        return [TrialList(k, v, False) for k, v in known.items() if k != "valid"]
    out = []
    for item in names_or_files:
        if item in known:
            out.append(TrialList(item, known[item], False))
        elif Path(item).is_file():
            out.append(TrialList(Path(item).name.removesuffix(".gz").rsplit(".", 1)[0], Path(item), True))
        else:
            raise ValueError(f"trial list '{item}' is neither a file nor one of {', '.join(known) or '(none)'} "
                             f"in {data_dir}/trials")
    return out


def evaluate_checkpoints(accelerator, ex: Extractors, lists: list[TrialList], trials_root: str | None = None) -> dict:
    """Evaluate one run's checkpoints on trial lists; returns {ckpt: {list: metrics}} (main process)."""
    cfg = ex.cfg
    if not lists:
        raise ValueError(f"no test trial lists in {cfg.data.dir}/trials")
    utts = read_manifest(cfg.data.dir)
    by_id = {u.id: u for u in utts}
    loaded: dict[str, tuple[TrialList, Trials, dict]] = {}
    for spec in lists:  # every list is read and resolved before any model work
        trials = read_trials(spec.path)
        loaded[spec.name if not spec.user_file else str(spec.path)] = (spec, trials, trial_audio(
            trials, spec.path, by_id, trials_root))
    cohort = cohort_paths(utts, cfg.score.cohort_size) if cfg.score.asnorm else []
    if cfg.score.asnorm and not cohort:
        raise ValueError(f"score.asnorm needs training utterances in {cfg.data.dir} for its cohort")
    if cohort and len(cohort) < cfg.score.cohort_size:
        accelerator.print(f"note: score.cohort_size={cfg.score.cohort_size}, but {cfg.data.dir} has "
                          f"{len(cohort)} training utterances: the cohort holds them all")
    paths = sorted({p for _, _, audio in loaded.values() for p in audio.values()} | set(cohort))
    row = {p: i for i, p in enumerate(paths)}
    tables, done = embed_files(accelerator, ex, paths, audio_durations(paths, {u.path: u.duration for u in utts}))
    if done.sum() < len(paths):
        accelerator.print(f"note: eval_batch={cfg.eval_batch} embedded {done.sum()} of {len(paths)} utterances; "
                          "trials with the others are left out")
    rows = {key: trial_rows(row, trials, audio) for key, (_, trials, audio) in loaded.items()}
    out = {}
    for ckpt, table in zip(ex.ckpts, tables):
        out[str(ckpt)] = {}
        for key, (spec, trials, _) in loaded.items():
            a, b = rows[key]
            scores, keep = score_trials(table, done, a, b)
            if not accelerator.is_main_process:
                continue
            m = metrics.compute_metrics(scores, trials.labels[keep])
            files = {"scores.txt": scores_text(trials, keep, scores), "metrics.json": metrics_json(m)}
            line = metrics_line(ckpt, spec.name, m)
            if cohort:
                normed, used = asnorm(table, done, [row[p] for p in cohort], cfg.score.top_k, a[keep], b[keep], scores)
                m["asnorm"] = {**metrics.compute_metrics(normed, trials.labels[keep]), **used}
                files["scores_asnorm.txt"] = scores_text(trials, keep, normed)
                files["metrics_asnorm.json"] = metrics_json(m["asnorm"])
                line += f" | AS-norm EER {m['asnorm']['eer']:.2f}% minDCF0.01 {m['asnorm']['min_dcf_0.01']:.4f}"
            folder = eval_folder(ckpt, spec.name, spec.path if spec.user_file else None)
            write_eval_set(folder, files)
            out[str(ckpt)][spec.name] = m
            accelerator.print(line + (f" | {folder}" if spec.user_file else ""))
    accelerator.wait_for_everyone()
    return out
