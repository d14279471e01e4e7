"""Checkpoints x trial lists -> <ckpt>/eval/<list>/{scores.txt, metrics.json} (+ AS-norm), as a set.

Used by evaluate_asv.py and by train_asv.py at the end of training. Each unique utterance of all
requested lists is embedded once, at full length, in length-sorted batches (asv/embedding.py).
A checkpoint with validation scores also gets scores_calibrated.txt (`enroll test llr label`) and
actDCF / Cllr in metrics.json, through its calibration (asv/calibration.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import metrics
from .calibration import VALID_SCORES, calibration_line, calibration_metrics, ensure_calibration, has_validation_scores
from .data import Trials, read_manifest, read_trials, trial_lists
from .feature_cache import FeatureCache
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


def checkpoint_calibrations(accelerator, ckpts: list[Path]) -> dict:
    """{ckpt: its calibration (fit on its validation scores once, then read back), or None without
    validation scores (SUPERB protocol: nothing to fit on; min Cllr needs no calibration)}."""
    cals = {c: ensure_calibration(c) if has_validation_scores(c) else None for c in ckpts}
    missing = [c for c, cal in cals.items() if cal is None]
    if missing:
        accelerator.print(f"note: {len(missing)} checkpoint(s) without validation scores ({missing[0] / VALID_SCORES}"
                          f"{', ...' if len(missing) > 1 else ''}): no calibrated scores, min Cllr only")
    return cals


@dataclass
class Inputs:
    """Everything an evaluation reads, checked before any model is built."""
    lists: dict[str, tuple[TrialList, Trials, dict[str, str]]]  # key -> (list, its trials, entry -> audio file)
    cohort: list[str]                                            # AS-norm cohort files ([] without AS-norm)
    paths: list[str]                                             # every file to embed, once
    durations: list[float]


def read_inputs(cfg, lists: list[TrialList], trials_root: str | None = None) -> Inputs:
    """Read every list, resolve every entry to a file and every file's duration (a missing or unreadable file
    is a one-line error naming it) before any model work."""
    if not lists:
        raise ValueError(f"no test trial lists in {cfg.data.dir}/trials")
    utts = read_manifest(cfg.data.dir)
    by_id = {u.id: u for u in utts}
    loaded = {}
    for spec in lists:
        trials = read_trials(spec.path)
        loaded[spec.name if not spec.user_file else str(spec.path)] = (spec, trials, trial_audio(
            trials, spec.path, by_id, trials_root))
    cohort = cohort_paths(utts, cfg.score.cohort_size) if cfg.score.asnorm else []
    if cfg.score.asnorm and not cohort:
        raise ValueError(f"score.asnorm needs training utterances in {cfg.data.dir} for its cohort")
    paths = sorted({p for _, _, audio in loaded.values() for p in audio.values()} | set(cohort))
    return Inputs(loaded, cohort, paths, audio_durations(paths, {u.path: u.duration for u in utts}))


def evaluate_checkpoints(accelerator, ex: Extractors, lists, trials_root: str | None = None,
                         cache: FeatureCache | None = None) -> dict:
    """Evaluate one run's checkpoints on trial lists; returns {ckpt: {eval folder name: metrics}} (main process).

    `lists`: TrialLists, or the Inputs that read_inputs made of them before the models were built."""
    inputs = lists if isinstance(lists, Inputs) else read_inputs(ex.cfg, lists, trials_root)
    cfg, cohort, paths = ex.cfg, inputs.cohort, inputs.paths
    if cohort and len(cohort) < cfg.score.cohort_size:
        accelerator.print(f"note: score.cohort_size={cfg.score.cohort_size}, but {cfg.data.dir} has "
                          f"{len(cohort)} training utterances: the cohort holds them all")
    cals = checkpoint_calibrations(accelerator, ex.ckpts) if accelerator.is_main_process else {}
    row = {p: i for i, p in enumerate(paths)}
    tables, done = embed_files(accelerator, ex, paths, inputs.durations, cache)
    if done.sum() < len(paths):
        accelerator.print(f"note: eval_batch={cfg.eval_batch} embedded {done.sum()} of {len(paths)} utterances; "
                          "trials with the others are left out")
    rows = {key: trial_rows(row, trials, audio) for key, (_, trials, audio) in inputs.lists.items()}
    out = {}
    for ckpt, table in zip(ex.ckpts, tables):
        out[str(ckpt)] = {}
        for key, (spec, trials, _) in inputs.lists.items():
            a, b = rows[key]
            scores, keep = score_trials(table, done, a, b)
            if not accelerator.is_main_process:
                continue
            labels, cal = trials.labels[keep], cals.get(ckpt)
            m = {**metrics.compute_metrics(scores, labels), **calibration_metrics(scores, labels, cal)}
            files = {"scores.txt": scores_text(trials, keep, scores)}
            if cal is not None:
                files["scores_calibrated.txt"] = scores_text(trials, keep, cal.llr(scores))
            line = metrics_line(ckpt, spec.name, m) + calibration_line(m)
            if cohort:
                normed, used = asnorm(table, done, [row[p] for p in cohort], cfg.score.top_k, a[keep], b[keep], scores)
                m["asnorm"] = {**metrics.compute_metrics(normed, labels), **used}
                files["scores_asnorm.txt"] = scores_text(trials, keep, normed)
                files["metrics_asnorm.json"] = metrics_json(m["asnorm"])
                line += f" | AS-norm EER {m['asnorm']['eer']:.2f}% minDCF0.01 {m['asnorm']['min_dcf_0.01']:.4f}"
            files["metrics.json"] = metrics_json(m)
            folder = eval_folder(ckpt, spec.name, spec.path if spec.user_file else None)
            write_eval_set(folder, files)
            out[str(ckpt)][folder.name] = m
            accelerator.print(line + (f" | {folder}" if spec.user_file else ""))
    accelerator.wait_for_everyone()
    return out
