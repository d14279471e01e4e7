"""Embed, score and measure: checkpoints x trial lists -> scores.txt and metrics.json.

    python evaluate_asv.py --ckpt-dir exp/demo/best
    python evaluate_asv.py --ckpt-dir exp/demo/step-* --trials test my_list.txt
    accelerate launch evaluate_asv.py --ckpt-dir exp/vox1/step-20000   # several GPUs
    python evaluate_asv.py --ckpt-dir exp/demo/best --pair a.wav b.wav --threshold far:0.01
    python evaluate_asv.py --ckpt-dir exp/demo/best --extract wavs.txt --out emb.npz   # or a folder; or emb.ark
    python evaluate_asv.py --ckpt-dir exp/demo/best --export model.pt2                 # or model.onnx
    python evaluate_asv.py --ckpt-dir exp/demo/step-* --average exp/demo/avg-last3     # mean weights, evaluated

Each unique utterance of all requested trial lists is embedded once, at full length, in
length-sorted batches; a frozen upstream runs once per batch for all the checkpoints given.
Writes, per checkpoint and trial list, as one set: <ckpt_dir>/eval/<list>/scores.txt
(`enroll test score label`) and metrics.json (EER %, minDCF at 0.01 and 0.05). A list given as
a file goes to eval/<name>-<hash of its path>/, so it never overwrites the run's own results.
A checkpoint with validation scores (eval/valid/scores.txt) is calibrated on them once
(calibration.json): each list also gets scores_calibrated.txt (`enroll test llr label`), and
metrics.json actDCF and Cllr (asv/metrics.py). Validation with fewer than 50 target or non-target trials, or
perfectly separated, gets no calibration: calibration.json and metrics.json say why (docs/evaluation.md).
Trial entries are utterance ids of the run's manifest (as in VoxCeleb's official lists), paths
under --trials-root, or file paths.
--average writes the mean of the checkpoints' weights as a new checkpoint folder of the run
(asv/run.py), scores it on the validation list as training scores a checkpoint (so it has
thresholds and a calibration), then evaluates it like any checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env

from asv.api import Model
from asv.config import help_text
from asv.metrics import THRESHOLD_FORMS, VALID_SCORES, has_validation_scores, resolve_threshold
from asv.run import average_checkpoints
from asv.data import read_audio_list, trial_lists
from asv.embed import audio_durations, embed_files, import_kaldiio, load_extractors, write_embeddings
from asv.embed import check_data, evaluate_checkpoints, read_inputs, resolve_lists
from asv.embed import FeatureCache
from asv.run import atomic_write
from asv.models.export import check_export_path, export_program, save_program
from asv.run import RunLock, eval_overrides, resolve_checkpoint, run_config
from asv.train import check_launch, one_line


def pair_threshold(ckpt: str, name: str) -> str | None:
    """--pair's threshold name, checked before any model work (a bad name, missing validation scores).
    None for the default `eer` on a checkpoint without validation scores: the score, no decision."""
    if name == "eer" and not has_validation_scores(ckpt):
        return None
    resolve_threshold(ckpt, name)
    return name


def score_pair(accelerator, ex, a: str, b: str, threshold: str | None = None) -> float:
    """Quick check for a person: the API's compare (asv/api.py) of two files, embedded as evaluation
    embeds, printed: the cosine score, its calibrated LLR when the checkpoint has a calibration, and
    the decision at the named `threshold` (pair_threshold). With score.asnorm on, the AS-norm score is
    printed too, not decided on: thresholds and calibration are on raw cosine scores, the scale
    validation measures."""
    result = Model(ex, accelerator=accelerator).compare(a, b, threshold)
    parts = [f"cosine score {result.score:.4f}"]
    if result.llr is not None:
        parts.append(f"calibrated LLR {result.llr:.3f}")
    if result.asnorm is not None:
        parts.append(f"AS-norm score {result.asnorm:.4f} (not thresholded)")
    if result.accept is None:
        parts.append(f"no decision: {ex.ckpts[0] / VALID_SCORES} is missing")
    else:
        parts += [f"threshold {result.threshold:.4f} ({result.description})",
                  "same speaker" if result.accept else "different speakers"]
    accelerator.print(" | ".join(parts))
    return result.score


def extract_inputs(source: str, out: Path) -> tuple[list[str], list[str], list[float]]:
    """--extract's (ids, files, durations), every file checked before any model work."""
    if out.suffix not in (".npz", ".ark"):
        raise ValueError(f"--out {out}: must end in .npz (NumPy) or .ark (Kaldi ark + scp)")
    try:
        ids, paths = read_audio_list(source)
    except UnicodeDecodeError as e:  # a path in another encoding (e.g. Latin-1 file names)
        line = Path(source).read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{source}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); write the list in "
                         "UTF-8, or give the files by a folder") from None
    if out.suffix == ".ark":
        import_kaldiio()
        for i in ids:
            if len(i.split()) != 1:
                raise ValueError(f"{source}: id {i!r} holds whitespace, which Kaldi keys cannot; give ids in the list")
    try:
        return ids, paths, audio_durations(paths, {})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def extract(accelerator, ex, inputs: tuple, out: Path) -> int:
    """Embed every file of a list or folder with one checkpoint, batched as evaluation is; main process writes."""
    ids, paths, durations = inputs
    (table,), done = embed_files(accelerator, ex, paths, durations)
    if accelerator.is_main_process:
        if not done.all():
            accelerator.print(f"note: eval_batch={ex.cfg.eval_batch} embedded {done.sum()} of {len(paths)} files")
        write_embeddings(out, [i for i, d in zip(ids, done) if d], table[done])
        accelerator.print(f"{out}: {int(done.sum())} embeddings of dimension {table.shape[1]}")
    accelerator.wait_for_everyone()
    return int(done.sum())


def validation_inputs(cfg, trials: list[str], trials_root: str | None):
    """--average's validation list, read before any model work (None when the data has none, or --trials names
    it): a new checkpoint has no validation scores, so it is scored on it first and its test lists get calibrated."""
    if "valid" not in trial_lists(cfg.data.dir) or "valid" in trials:
        return None
    return read_inputs(cfg, resolve_lists(cfg.data.dir, ["valid"]), trials_root)


def average(ckpts: list[str], out: str) -> str:
    """--average: the main process writes the mean of the checkpoints; the others wait for it."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it later
    if state.is_main_process:
        average_checkpoints(ckpts, out)
        print(f"{out}: the mean of {len(ckpts)} checkpoints' weights")
    state.wait_for_everyone()
    return out


def export(ex, outs: list[str]) -> dict:
    """The checkpoint's embedding extractor as .pt2 and/or .onnx files (models/export.py)."""
    cfg = ex.cfg
    meta = {"upstream": cfg.upstream.name, "downstream": cfg.downstream.name, "sample_rate": cfg.data.sample_rate,
            "checkpoint": str(ex.ckpts[0])}
    program, meta = export_program(ex.upstreams[0].eval(), ex.encoders[0].eval(), meta)
    for out in outs:
        with atomic_write(out, "wb") as f:
            save_program(program, f, Path(out).suffix, meta)
    print(f"{', '.join(outs)}: wav (B, T) at {meta['sample_rate']} Hz, at least {meta['min_samples']} samples, "
          f"+ lengths (B,) -> embeddings (B, {meta['embed_dim']})")
    return meta


def parse_args():
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(), formatter_class=Formatter)
    parser.add_argument("--ckpt-dir", "--ckpt_dir", dest="ckpt_dir", nargs="+", required=True,  # both spellings work
                        help="one or more exp/<run>/step-N (or exp/<run>/best) folders of the same run")
    parser.add_argument("--trials", nargs="*", default=[],
                        help="trial list names in <data.dir>/trials or files of 'label enroll test' lines "
                             "([]: every test list of the run's data)")
    parser.add_argument("--trials-root", metavar="DIR",
                        help="folder that relative trial entries are found under when they are not utterance ids "
                             "of the run's manifest (e.g. VoxCeleb1's wav/ for the official lists)")
    task = parser.add_mutually_exclusive_group()
    task.add_argument("--pair", nargs=2, metavar=("A", "B"),
                      help="score two audio files with one checkpoint and print same/different at --threshold")
    task.add_argument("--extract", metavar="LIST",
                      help="embed the files of LIST (lines 'path' or 'utt_id path'), of a folder (every "
                           "audio file under it), or of a Kaldi wav.scp or data folder (ids from its wav.scp) "
                           "with one checkpoint; needs --out")
    task.add_argument("--export", nargs="+", metavar="FILE",
                      help="write one checkpoint's embedding extractor (wav, lengths -> embeddings) as FILE.pt2 "
                           "(torch.export) and/or FILE.onnx, loadable without this repository")
    task.add_argument("--average", metavar="OUT",
                      help="average the weights of the --ckpt-dir checkpoints (e.g. the last three) into the new "
                           "checkpoint folder OUT inside the run folder (e.g. exp/<run>/avg-last3), then validate "
                           "and evaluate it")
    parser.add_argument("--threshold", metavar="NAME", default="eer",
                        help=f"--pair's decision threshold on the cosine score, from the checkpoint's validation "
                             f"scores: {THRESHOLD_FORMS}")
    parser.add_argument("--out", metavar="FILE",
                        help="--extract output: FILE.npz (ids, embeddings) or FILE.ark (Kaldi ark + FILE.scp)")
    parser.add_argument("--feature-cache", metavar="DIR",
                        help="trial-list evaluation: keep the frozen upstream's hidden states of every file in DIR "
                             "(float16; WavLM Base+, all layers: ~1 MB per audio second), so that evaluating other "
                             "checkpoints of the run later skips the audio and the upstream (asv/embed.py)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="config overrides on top of the run's config.yaml, e.g. eval_batch=2 data.eval_batch_secs=60")
    args = parser.parse_args()
    if bool(args.extract) != bool(args.out):
        parser.error("--extract and --out go together")
    if args.threshold != "eer" and not args.pair:
        parser.error("--threshold goes with --pair")
    if args.feature_cache and (args.pair or args.extract or args.export):
        parser.error("--feature-cache is for trial-list evaluation, not --pair, --extract or --export")
    # `--ckpt-dir a b key=value` reads naturally; argparse would give key=value to --ckpt-dir (or --trials, --export)
    exports = args.export or []
    moved = [c for c in args.ckpt_dir + args.trials + exports if "=" in c and not Path(c).exists()]
    args.overrides += moved
    args.ckpt_dir = [c for c in args.ckpt_dir if c not in moved]
    args.trials = [t for t in args.trials if t not in moved]
    args.export = [e for e in exports if e not in moved]
    return args


def is_main() -> bool:
    """The main process, read from the launcher's RANK: asking Accelerate here would fix its process state
    before the Accelerator is made (a PartialState() without the CPU flag is one process per rank)."""
    return os.environ.get("RANK", "0") == "0"


def main():
    args = parse_args()
    try:
        single = "--pair" if args.pair else "--extract" if args.extract else "--export" if args.export else ""
        # a run folder stands for its best; a missing or pruned checkpoint is one line naming the cause
        args.ckpt_dir = [str(resolve_checkpoint(c)) for c in args.ckpt_dir]
        if single and len(args.ckpt_dir) != 1:
            raise ValueError(f"{single} takes exactly one --ckpt-dir")
        for out in [*args.export, *([args.out] if args.out else [])]:  # a folder is refused before any work
            if Path(out).is_dir():
                raise ValueError(f"{out}: is a folder; --export and --out name the file to write")
        for out in args.export:
            check_export_path(out)
        threshold = pair_threshold(args.ckpt_dir[0], args.threshold) if args.pair else None
        # the inputs are read and checked before any model is built: a missing file is one line, at once
        cfg, inputs = run_config(Path(args.ckpt_dir[0]), args.overrides), None
        if args.pair:
            changed = eval_overrides(Path(args.ckpt_dir[0]), cfg)
            if changed:  # thresholds and calibration are measured on validation scores under the run's config
                raise ValueError(f"--pair with {', '.join(f'{k}={v}' for k, v in changed.items())}: those overrides "
                                 f"change the scores, so {args.ckpt_dir[0]}'s thresholds and calibration.json (fit on "
                                 "its validation scores) do not apply; drop them")
            audio_durations(list(args.pair), {})
        elif args.extract:
            inputs = extract_inputs(args.extract, Path(args.out))
        elif not args.export:
            inputs = read_inputs(cfg, resolve_lists(cfg.data.dir, args.trials), args.trials_root)
            inputs = check_data(Path(args.ckpt_dir[0]), cfg, inputs)  # the data the run was trained on?
            valid = validation_inputs(cfg, args.trials, args.trials_root) if args.average else None
            valid = valid and check_data(Path(args.ckpt_dir[0]), cfg, valid)
        # one evaluation of a checkpoint at a time (they replace its eval/ sets): a second is refused naming the first
        writes = not single and is_main()
        locks = [RunLock(Path(c).resolve()) for c in args.ckpt_dir if Path(c).is_dir()] if writes else []
        if args.average:
            args.ckpt_dir = [average(args.ckpt_dir, args.average)]
        ex = load_extractors(args.ckpt_dir, args.overrides)
        if args.export:
            export(ex, args.export)
            return
        accelerator = Accelerator(mixed_precision=ex.cfg.train.mixed_precision)
        check_launch(accelerator)
        if args.pair:
            score_pair(accelerator, ex, *args.pair, threshold)
        elif args.extract:
            extract(accelerator, ex, inputs, Path(args.out))
        else:
            cache = FeatureCache(args.feature_cache, ex.cfg, ex.upstreams[0]) if args.feature_cache else None
            if valid is not None:  # --average's new checkpoint: validated first
                evaluate_checkpoints(accelerator, ex, valid, args.trials_root, cache)
            evaluate_checkpoints(accelerator, ex, inputs, args.trials_root, cache)
        for lock in locks:
            lock.release()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()
