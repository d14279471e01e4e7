"""Embed, score and measure: checkpoints x trial lists -> scores.txt and metrics.json.

    python evaluate_asv.py --ckpt_dir exp/demo/best
    python evaluate_asv.py --ckpt_dir exp/demo/step-* --trials test my_list.txt
    accelerate launch evaluate_asv.py --ckpt_dir exp/vox1/step-20000   # several GPUs
    python evaluate_asv.py --ckpt_dir exp/demo/best --extract wavs.txt --out emb.npz   # or a folder; or emb.ark
    python evaluate_asv.py --ckpt_dir exp/demo/best --export model.pt2                 # or model.onnx

Each unique utterance of all requested trial lists is embedded once, at full length,
in length-sorted batches. A frozen upstream runs once per batch and every checkpoint's
featurizer and downstream are applied to the same hidden states, so evaluating ten
checkpoints costs little more than one. Under several processes every process embeds
its share and the embeddings are gathered (`gather_for_metrics`).

Writes, per checkpoint and trial list: <ckpt_dir>/eval/<list>/scores.txt
(`enroll test score label`) and metrics.json (EER %, minDCF at 0.01 and 0.05).
--extract writes the embeddings that scoring uses (batched the same way) for any list of files;
--export writes the embedding extractor as one file for use without this repository (models/export.py).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

import metrics
from config import ConfigError, help_text, load_config
from data import (AUDIO_EXTENSIONS, AudioError, UtteranceDataset, collate_padded, header_frames, length_batches,
                  progress, read_manifest, read_trials, trial_lists)
from models import (asnorm_scores, build_encoder, build_upstream, cohort_stats, cosine_scores, load_model_file,
                    min_input_samples, run_chunked)


def model_meta(cfg) -> dict:
    """What a checkpoint must agree with to be loaded under a config (see models.load_model_file)."""
    return {"upstream": cfg.upstream.name, "downstream": cfg.downstream.name, "embed_dim": cfg.downstream.embed_dim}


def utterance_durations(paths: list[str], manifest_durations: dict[str, float]) -> list[float]:
    """Durations from the manifest, or from the file header for files outside it."""
    out = []
    for p in paths:
        if p not in manifest_durations:
            try:
                frames, rate = header_frames(p)
            except Exception as e:
                raise ValueError(f"{p}: unreadable audio ({' '.join(str(e).split())})") from None
            manifest_durations[p] = frames / rate
        out.append(manifest_durations[p])
    return out


def make_eval_loader(paths, durations, cfg, min_samples: int):
    batches = length_batches(durations, cfg.data.eval_batch_secs)
    return torch.utils.data.DataLoader(UtteranceDataset(paths, cfg.data.sample_rate, min_samples),
                                       batch_sampler=batches, collate_fn=collate_padded,
                                       num_workers=cfg.num_workers)


@torch.no_grad()
def embed(accelerator, upstream, encoders, loader, num_utts: int, max_batches: int = -1, chunk_samples: int = 0):
    """Embed every utterance of a (prepared) loader with each encoder.

    Returns (list of (U, E) float32 arrays, one per encoder; (U,) bool, True where embedded).
    Utterances are placed by their index, so the padding duplicates that even batches add
    under several processes are harmless, and each utterance counts once.
    """
    was_training = [e.training for e in encoders]
    for e in encoders:
        e.eval()
    upstream_was_training = upstream.training
    upstream.eval()
    tables = [np.zeros((num_utts, accelerator.unwrap_model(e).downstream.embed_dim), np.float32) for e in encoders]
    done = np.zeros(num_utts, dtype=bool)
    total = len(loader) if max_batches < 0 else min(len(loader), max_batches)
    bar = progress(loader, total=total, desc="embedding", unit="batch", enabled=accelerator.is_main_process)
    for n, (wavs, lengths, index) in enumerate(bar):
        if n == max_batches:
            break
        with accelerator.autocast():
            hidden, frames = run_chunked(upstream, wavs, lengths, chunk_samples)
            embs = [e(hidden, frames).float() for e in encoders]
        # batches differ in size between processes: pad to a common size, gather, drop the pads
        index = accelerator.gather_for_metrics(accelerator.pad_across_processes(index, pad_index=-1)).cpu().numpy()
        real = index >= 0
        for table, emb in zip(tables, embs):
            table[index[real]] = accelerator.gather_for_metrics(accelerator.pad_across_processes(emb)).cpu().numpy()[real]
        done[index[real]] = True
    for e, mode in zip(encoders, was_training):
        e.train(mode)
    upstream.train(upstream_was_training)
    return tables, done


def trial_rows(row: dict[str, int], trials) -> tuple[np.ndarray, np.ndarray]:
    """A trial list's enroll and test sides as rows of the embedding table: (N,), (N,)."""
    _, enroll, test = trials
    a = np.fromiter((row[p] for p in enroll), dtype=np.int64, count=len(enroll))
    b = np.fromiter((row[p] for p in test), dtype=np.int64, count=len(test))
    return a, b


def score_list(table: np.ndarray, done: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine-score the trials (rows a, b) whose two sides were embedded -> (scores, kept-trial mask)."""
    keep = done[a] & done[b]
    return cosine_scores(table, a[keep], b[keep]), keep


def write_results(out_dir: Path, trials, scores, keep, suffix: str = "") -> dict:
    """scores<suffix>.txt (`enroll test score label`) and metrics<suffix>.json, each written atomically."""
    labels, enroll, test = trials
    labels = labels[keep]
    result = metrics.compute_metrics(scores, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = np.flatnonzero(keep)
    tmp = out_dir / f"scores{suffix}.txt.tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{enroll[i]} {test[i]} {s:.6f} {y}\n" for i, s, y in zip(kept, scores, labels))
    os.replace(tmp, out_dir / f"scores{suffix}.txt")
    tmp = out_dir / f"metrics{suffix}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / f"metrics{suffix}.json")
    return result


def cohort_paths(utts, size: int) -> list[str]:
    """Up to `size` training utterances for AS-norm, taken round-robin over speakers (every speaker counts)."""
    by_speaker: dict[str, list[str]] = {}
    for u in sorted(utts, key=lambda u: u.id):
        if u.split == "train":
            by_speaker.setdefault(u.speaker, []).append(u.path)
    rounds = [[paths[i] for paths in by_speaker.values() if i < len(paths)]
              for i in range(max(map(len, by_speaker.values()), default=0))]
    return [p for r in rounds for p in r][:size]


def resolve_trials(data_dir: str, names_or_files: list[str]) -> dict[str, Path]:
    """Trial list names (from data_dir/trials) or files -> {name: path}; default: every test list."""
    known = trial_lists(data_dir)
    if not names_or_files:
        return {k: v for k, v in known.items() if k != "valid"}
    out = {}
    for item in names_or_files:
        if item in known:
            out[item] = known[item]
        elif Path(item).is_file():
            out[Path(item).stem] = Path(item)
        else:
            raise ValueError(f"trial list '{item}' is neither a file nor one of {', '.join(known) or '(none)'} "
                             f"in {data_dir}/trials")
    return out


def load_trials(lists: dict[str, Path], known_paths: dict[str, float]):
    """Read trial lists; every file they name must be in the manifest or on disk."""
    trials = {name: read_trials(str(path)) for name, path in lists.items()}
    unique = sorted({p for _, enroll, test in trials.values() for p in (*enroll, *test)})
    for name, (_, enroll, test) in trials.items():
        for p in {*enroll, *test}:
            if p not in known_paths and not os.path.isfile(p):
                raise ValueError(f"{lists[name]}: names a missing audio file {p}")
    return trials, unique


def evaluate_checkpoints(accelerator, cfg, ckpt_dirs: list[Path], list_names: list[str] = ()) -> dict:
    """Evaluate checkpoints of one run (one config) on trial lists; returns {ckpt: {list: metrics}}."""
    sr = cfg.data.sample_rate
    utts = read_manifest(cfg.data.dir)
    manifest = {u.path: u.duration for u in utts}
    lists = resolve_trials(cfg.data.dir, list(list_names))
    if not lists:
        raise ValueError(f"no test trial lists in {cfg.data.dir}/trials")
    trials, paths = load_trials(lists, manifest)
    cohort = cohort_paths(utts, cfg.score.cohort_size) if cfg.score.asnorm else []
    if cfg.score.asnorm and not cohort:
        raise ValueError(f"score.asnorm needs training utterances in {cfg.data.dir} for its cohort")
    paths = sorted({*paths, *cohort})
    row = {p: i for i, p in enumerate(paths)}

    upstream = build_upstream(cfg.upstream, sr)
    encoders, upstreams = [], []
    for ckpt in ckpt_dirs:
        encoder = build_encoder(cfg, upstream)
        own_upstream = build_upstream(cfg.upstream, sr) if cfg.upstream.trainable else upstream
        load_model_file(str(ckpt / "model.pt"), encoder, own_upstream, model_meta(cfg))
        encoders.append(encoder)
        upstreams.append(own_upstream)
    loader = make_eval_loader(paths, utterance_durations(paths, manifest), cfg, min_input_samples(upstream, encoders[0]))
    loader = accelerator.prepare(loader)
    chunk = int(cfg.data.eval_chunk_secs * sr)
    if cfg.upstream.trainable:  # each checkpoint has its own upstream: one pass each
        results = [embed(accelerator, u.to(accelerator.device), [e.to(accelerator.device)], loader, len(paths),
                         cfg.eval_batch, chunk) for u, e in zip(upstreams, encoders)]
        tables = [r[0][0] for r in results]
        done = results[0][1]
    else:
        tables, done = embed(accelerator, upstream.to(accelerator.device),
                             [e.to(accelerator.device) for e in encoders], loader, len(paths), cfg.eval_batch, chunk)
    if done.sum() < len(paths):
        accelerator.print(f"note: eval_batch={cfg.eval_batch} embedded {done.sum()} of {len(paths)} utterances; "
                          "trials with the others are left out")
    rows = {name: trial_rows(row, t) for name, t in trials.items()}  # once, shared by every checkpoint
    out = {}
    for ckpt, table in zip(ckpt_dirs, tables):
        out[str(ckpt)] = {}
        if cohort:
            members = [row[p] for p in cohort if done[row[p]]]
            mean, std = cohort_stats(table, table[members], cfg.score.top_k)
        for name, t in trials.items():
            a, b = rows[name]
            scores, keep = score_list(table, done, a, b)
            if not accelerator.is_main_process:
                continue
            m = write_results(ckpt / "eval" / name, t, scores, keep)
            line = (f"{ckpt} | {name} | EER {m['eer']:.2f}% | minDCF0.01 {m['min_dcf_0.01']:.4f} "
                    f"| minDCF0.05 {m['min_dcf_0.05']:.4f} | {m['num_trials']} trials")
            if cohort:
                normed = asnorm_scores(scores, a[keep], b[keep], mean, std)
                m["asnorm"] = write_results(ckpt / "eval" / name, t, normed, keep, "_asnorm")
                line += f" | AS-norm EER {m['asnorm']['eer']:.2f}% minDCF0.01 {m['asnorm']['min_dcf_0.01']:.4f}"
            out[str(ckpt)][name] = m
            accelerator.print(line)
    accelerator.wait_for_everyone()
    return out


@torch.no_grad()
def score_pair(cfg, ckpt: Path, a: str, b: str):
    """Quick check for a person: cosine score of two files and the decision at the validation EER threshold."""
    upstream = build_upstream(cfg.upstream, cfg.data.sample_rate)
    encoder = build_encoder(cfg, upstream).eval()
    load_model_file(str(ckpt / "model.pt"), encoder, upstream, model_meta(cfg))
    upstream.eval()
    files = UtteranceDataset([a, b], cfg.data.sample_rate, min_input_samples(upstream, encoder))
    embs = []
    for wav, _ in (files[0], files[1]):  # one at a time: no padding at all
        hidden, frames = upstream(wav[None], torch.tensor([wav.numel()]))
        embs.append(encoder(hidden, frames).numpy())
    score = float(cosine_scores(np.concatenate(embs), np.array([0]), np.array([1]))[0])
    valid = ckpt / "eval" / "valid" / "metrics.json"
    if not valid.is_file():
        print(f"score {score:.4f} (no validation threshold: {valid} is missing)")
        return score
    threshold = json.loads(valid.read_text())["eer_threshold"]
    decision = "same speaker" if score >= threshold else "different speakers"
    print(f"score {score:.4f} | threshold {threshold:.4f} (EER threshold on validation speakers) | {decision}")
    return score


# ---------------------------------------------------------------------------- --extract: embeddings out

def read_audio_list(source: str) -> tuple[list[str], list[str]]:
    """--extract's input -> (ids, paths), checked before any model work.

    A folder: every wav/flac/m4a under it, id = the path relative to the folder (spk/session/utt.wav).
    A text file: one `path` or `utt_id path` per line, relative paths from the current directory;
    default id = the path relative to the folder all the files share (VoxCeleb style).
    """
    src = Path(source)
    if src.is_dir():
        paths = sorted(str(p) for p in src.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        if not paths:
            raise ValueError(f"{source}: no {', '.join(AUDIO_EXTENSIONS)} files under this folder")
        return [os.path.relpath(p, src) for p in paths], paths
    if not src.is_file():
        raise ValueError(f"{source}: no such list file or folder")
    given, paths = [], []
    with open(src) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2:
                raise ValueError(f"{source}:{n}: expected 'path' or 'utt_id path', got {line.strip()!r}")
            given.append(parts[0] if len(parts) == 2 else None)
            paths.append(parts[-1])
    if not paths:
        raise ValueError(f"{source}: empty list")
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"{source}: names a missing audio file {p}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    ids = [i or os.path.relpath(os.path.abspath(p), root) for i, p in zip(given, paths)]
    if len(set(ids)) < len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{source}: utterance id {dup} appears more than once")
    return ids, paths


def import_kaldiio():
    try:
        import kaldiio
    except ImportError:
        raise ValueError("--out .ark needs kaldiio: pip install kaldiio") from None
    return kaldiio


def write_embeddings(out: Path, ids: list[str], emb: np.ndarray):
    """emb (N, E) float32 -> out.npz (ids, embeddings) or out.ark + out.scp (Kaldi vectors), atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".npz":
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, ids=np.array(ids, dtype=str), embeddings=emb, l2_normalized=np.array(False),
                     note=np.array("embeddings as evaluate_asv.py scores them, not L2-normalised: "
                                   "the score is their cosine similarity"))
        os.replace(tmp, out)
        return
    kaldiio = import_kaldiio()
    scp = io.StringIO()
    with open(tmp, "wb") as f:
        kaldiio.save_ark(f, dict(zip(ids, emb)), scp=scp)
    os.replace(tmp, out)
    # kaldiio writes the ark's own (temporary) name into the scp: point it at the final one
    scp_out = out.with_suffix(".scp")
    scp_tmp = scp_out.with_name(scp_out.name + ".tmp")
    scp_tmp.write_text(scp.getvalue().replace(f" {tmp}:", f" {out}:"))
    os.replace(scp_tmp, scp_out)


def extract_embeddings(accelerator, cfg, ckpt: Path, source: str, out: Path) -> int:
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
        durations = utterance_durations(paths, {})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    sr = cfg.data.sample_rate
    upstream = build_upstream(cfg.upstream, sr)
    encoder = build_encoder(cfg, upstream)
    load_model_file(str(ckpt / "model.pt"), encoder, upstream, model_meta(cfg))
    loader = accelerator.prepare(make_eval_loader(paths, durations, cfg, min_input_samples(upstream, encoder)))
    (table,), done = embed(accelerator, upstream.to(accelerator.device), [encoder.to(accelerator.device)], loader,
                           len(paths), cfg.eval_batch, int(cfg.data.eval_chunk_secs * sr))
    if accelerator.is_main_process:
        if not done.all():
            accelerator.print(f"note: eval_batch={cfg.eval_batch} embedded {done.sum()} of {len(paths)} files")
        write_embeddings(out, [i for i, d in zip(ids, done) if d], table[done])
        accelerator.print(f"{out}: {int(done.sum())} embeddings of dimension {table.shape[1]}")
    accelerator.wait_for_everyone()
    return int(done.sum())


def export_model(cfg, ckpt: Path, outs: list[str]) -> dict:
    """--export: the checkpoint's embedding extractor as .pt2 and/or .onnx files (see models/export.py)."""
    from models.export import check_export_path, export_extractor

    for out in outs:
        check_export_path(out)
    upstream = build_upstream(cfg.upstream, cfg.data.sample_rate)
    encoder = build_encoder(cfg, upstream).eval()
    load_model_file(str(ckpt / "model.pt"), encoder, upstream, model_meta(cfg))
    meta = export_extractor(upstream.eval(), encoder, outs, {**model_meta(cfg), "sample_rate": cfg.data.sample_rate,
                                                             "checkpoint": str(ckpt)})
    print(f"{', '.join(outs)}: wav (B, T) at {meta['sample_rate']} Hz, at least {meta['min_samples']} samples, "
          f"+ lengths (B,) -> embeddings (B, {meta['embed_dim']})")
    return meta


def main():
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(), formatter_class=Formatter)
    parser.add_argument("--ckpt_dir", nargs="+", required=True,
                        help="one or more exp/<run>/step-N (or exp/<run>/best) folders of the same run")
    parser.add_argument("--trials", nargs="*", default=[],
                        help="trial list names in <data.dir>/trials or files of 'label enroll test' lines "
                             "([]: every test list of the run's data)")
    task = parser.add_mutually_exclusive_group()
    task.add_argument("--pair", nargs=2, metavar=("A", "B"),
                      help="score two audio files with one checkpoint and print same/different at the "
                           "validation EER threshold")
    task.add_argument("--extract", metavar="LIST",
                      help="embed the files of LIST (lines 'path' or 'utt_id path') or of a folder (every "
                           "wav/flac/m4a under it) with one checkpoint; needs --out")
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
    overrides = args.overrides + [c for c in args.ckpt_dir + args.trials + exports
                                  if "=" in c and not Path(c).exists()]
    args.trials = [t for t in args.trials if t not in overrides]
    args.export = [e for e in exports if e not in overrides]
    try:
        ckpts = [Path(c) for c in args.ckpt_dir if c not in overrides]
        for c in ckpts:
            if not (c / "model.pt").is_file():
                raise ValueError(f"{c}: not a checkpoint folder (no model.pt)")
        runs = {c.absolute().parent for c in ckpts}
        if len(runs) != 1:
            raise ValueError(f"--ckpt_dir folders come from {len(runs)} runs; evaluate one run at a time")
        run = runs.pop()
        cfg = load_config(str(run / "config.yaml"), overrides)
        single = "--pair" if args.pair else "--extract" if args.extract else "--export" if args.export else ""
        if single and len(ckpts) != 1:
            raise ValueError(f"{single} takes exactly one --ckpt_dir")
        if args.pair:
            score_pair(cfg, ckpts[0], *args.pair)
            return
        if args.export:
            export_model(cfg, ckpts[0], args.export)
            return
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        if args.extract:
            extract_embeddings(accelerator, cfg, ckpts[0], args.extract, Path(args.out))
        else:
            evaluate_checkpoints(accelerator, cfg, ckpts, args.trials)
    except (ConfigError, ValueError, FileNotFoundError, AudioError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
