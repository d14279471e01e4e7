"""Embed, score and measure: checkpoints x trial lists -> scores.txt and metrics.json.

    python evaluate_asv.py --ckpt_dir exp/demo/best
    python evaluate_asv.py --ckpt_dir exp/demo/step-* --trials test my_list.txt
    accelerate launch evaluate_asv.py --ckpt_dir exp/vox1/step-20000   # several GPUs
    python evaluate_asv.py --ckpt_dir exp/demo/best --pair a.wav b.wav
    python evaluate_asv.py --ckpt_dir exp/demo/best --extract wavs.txt --out emb.npz   # or a folder; or emb.ark
    python evaluate_asv.py --ckpt_dir exp/demo/best --export model.pt2                 # or model.onnx

Each unique utterance of all requested trial lists is embedded once, at full length, in
length-sorted batches; a frozen upstream runs once per batch for all the checkpoints given.
Writes, per checkpoint and trial list, as one set: <ckpt_dir>/eval/<list>/scores.txt
(`enroll test score label`) and metrics.json (EER %, minDCF at 0.01 and 0.05). A list given as
a file goes to eval/<name>-<hash of its path>/, so it never overwrites the run's own results.
Trial entries are utterance ids of the run's manifest (as in VoxCeleb's official lists), paths
under --trials-root, or file paths.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from asv.config import help_text
from asv.data import read_audio_list
from asv.embedding import (asnorm, audio_durations, cohort_paths, embed_files, import_kaldiio, load_extractors,
                           write_embeddings)
from asv.data import read_manifest
from asv.evaluation import evaluate_checkpoints, resolve_lists
from asv.fileio import atomic_write
from asv.models import cosine_scores
from asv.models.export import check_export_path, export_program, save_program
from asv.training import check_launch, one_line


def score_pair(accelerator, ex, a: str, b: str) -> float:
    """Quick check for a person: the score of two files and the decision at the validation EER threshold.
    Embedded as evaluation embeds (eval_chunk_secs), AS-norm included when score.asnorm is on."""
    cfg = ex.cfg
    cohort = cohort_paths(read_manifest(cfg.data.dir), cfg.score.cohort_size) if cfg.score.asnorm else []
    paths = [a, b, *cohort]
    (table,), done = embed_files(accelerator, ex, paths)
    if not accelerator.is_main_process:
        return 0.0
    score = float(cosine_scores(table, np.array([0]), np.array([1]))[0])
    kind, metrics_file = "cosine", "metrics.json"
    if cohort:
        normed, used = asnorm(table, done, list(range(2, len(paths))), cfg.score.top_k, np.array([0]), np.array([1]),
                              np.array([score]))
        score, kind, metrics_file = float(normed[0]), f"AS-norm (cohort {used['cohort_size']}, top {used['top_k']})", \
            "metrics_asnorm.json"
    valid = ex.ckpts[0] / "eval" / "valid" / metrics_file
    if not valid.is_file():
        print(f"{kind} score {score:.4f} (no validation threshold: {valid} is missing)")
        return score
    threshold = json.loads(valid.read_text())["eer_threshold"]
    decision = "same speaker" if score >= threshold else "different speakers"
    print(f"{kind} score {score:.4f} | threshold {threshold:.4f} (EER threshold on validation speakers) | {decision}")
    return score


def extract(accelerator, ex, source: str, out: Path) -> int:
    """Embed every file of a list or folder with one checkpoint, batched as evaluation is; main process writes."""
    if out.suffix not in (".npz", ".ark"):
        raise ValueError(f"--out {out}: must end in .npz (NumPy) or .ark (Kaldi ark + scp)")
    ids, paths = read_audio_list(source)
    if out.suffix == ".ark":
        import_kaldiio()
        for i in ids:
            if len(i.split()) != 1:
                raise ValueError(f"{source}: id {i!r} holds whitespace, which Kaldi keys cannot; give ids in the list")
    try:
        durations = audio_durations(paths, {})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    (table,), done = embed_files(accelerator, ex, paths, durations)
    if accelerator.is_main_process:
        if not done.all():
            accelerator.print(f"note: eval_batch={ex.cfg.eval_batch} embedded {done.sum()} of {len(paths)} files")
        write_embeddings(out, [i for i, d in zip(ids, done) if d], table[done])
        accelerator.print(f"{out}: {int(done.sum())} embeddings of dimension {table.shape[1]}")
    accelerator.wait_for_everyone()
    return int(done.sum())


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
    parser.add_argument("--ckpt_dir", nargs="+", required=True,
                        help="one or more exp/<run>/step-N (or exp/<run>/best) folders of the same run")
    parser.add_argument("--trials", nargs="*", default=[],
                        help="trial list names in <data.dir>/trials or files of 'label enroll test' lines "
                             "([]: every test list of the run's data)")
    parser.add_argument("--trials-root", metavar="DIR",
                        help="folder that relative trial entries are found under when they are not utterance ids "
                             "of the run's manifest (e.g. VoxCeleb1's wav/ for the official lists)")
    task = parser.add_mutually_exclusive_group()
    task.add_argument("--pair", nargs=2, metavar=("A", "B"),
                      help="score two audio files with one checkpoint and print same/different at the "
                           "validation EER threshold")
    task.add_argument("--extract", metavar="LIST",
                      help="embed the files of LIST (lines 'path' or 'utt_id path') or of a folder (every "
                           "audio file under it) with one checkpoint; needs --out")
    task.add_argument("--export", nargs="+", metavar="FILE",
                      help="write one checkpoint's embedding extractor (wav, lengths -> embeddings) as FILE.pt2 "
                           "(torch.export) and/or FILE.onnx, loadable without this repository")
    parser.add_argument("--out", metavar="FILE",
                        help="--extract output: FILE.npz (ids, embeddings) or FILE.ark (Kaldi ark + FILE.scp)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="config overrides on top of the run's config.yaml, e.g. eval_batch=2 data.eval_batch_secs=60")
    args = parser.parse_args()
    if bool(args.extract) != bool(args.out):
        parser.error("--extract and --out go together")
    # `--ckpt_dir a b key=value` reads naturally; argparse would give key=value to --ckpt_dir (or --trials, --export)
    exports = args.export or []
    moved = [c for c in args.ckpt_dir + args.trials + exports if "=" in c and not Path(c).exists()]
    args.overrides += moved
    args.ckpt_dir = [c for c in args.ckpt_dir if c not in moved]
    args.trials = [t for t in args.trials if t not in moved]
    args.export = [e for e in exports if e not in moved]
    return args


def main():
    args = parse_args()
    try:
        single = "--pair" if args.pair else "--extract" if args.extract else "--export" if args.export else ""
        if single and len(args.ckpt_dir) != 1:
            raise ValueError(f"{single} takes exactly one --ckpt_dir")
        for out in args.export:
            check_export_path(out)
        ex = load_extractors(args.ckpt_dir, args.overrides)
        if args.export:
            export(ex, args.export)
            return
        accelerator = Accelerator(mixed_precision=ex.cfg.train.mixed_precision)
        check_launch(accelerator)
        if args.pair:
            score_pair(accelerator, ex, *args.pair)
        elif args.extract:
            extract(accelerator, ex, args.extract, Path(args.out))
        else:
            evaluate_checkpoints(accelerator, ex, resolve_lists(ex.cfg.data.dir, args.trials), args.trials_root)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()
