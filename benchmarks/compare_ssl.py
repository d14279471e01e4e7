"""Side by side with the real s3prl 0.4.18 where SUPERB spends its time: a frozen WavLM Base+ upstream.

    python benchmarks/compare_ssl.py --work /tmp/ssl_cmp --corpus demo --eval-utts 40 --threads 1 --bf16

One checkpoint file for both toolkits: a random-weight WavLM Base+ in microsoft/unilm's format
(benchmarks/make_ssl_checkpoint.py, ~380 MB, written into --work), read by s3prl's `wavlm_local` upstream
(--build_upstream.path_or_url) and by ours (upstream.ckpt). One data folder: our prepare_voxceleb.py
output (every non-test speaker trains, as in SUPERB), and the s3prl peer runner's view of it
(../shared/peers/s3prl-run, common.peer_view). The evaluation list: every pair of --eval-utts
test utterances, taken round-robin over the test speakers.

Measured in one run, each stage a subprocess (wall time and the peak PSS of its process tree):
  (a) training, SUPERB's recipe (configs/base.yaml: 10 crops x 5 accumulated, AdamW, fp32), --steps
      steps, a checkpoint after each: seconds per step in the steady state (steps 2..N), saving
      excluded (from the newest file of checkpoint k-1 to the oldest of checkpoint k, the same rule for both);
  (b) evaluation of the N checkpoints on the list: s3prl's stage 3 (the upstream again for every
      checkpoint, batch 1) against evaluate_asv.py --ckpt-dir step-* (one upstream pass for all);
  (c) ours only: evaluation with --feature-cache (first run writes it, second reads it), and with
      featurizer.layer_selections 0..--truncate (a short run trained on those layers) against all layers;
  the upstream's parity on this file (every layer, batch of 1: max |ours - s3prl|), and a breakdown of
  one training step of each toolkit (data, upstream, downstream, optimizer; no loader workers);
  --bf16: one more training run of ours under train.mixed_precision=bf16 (an extra row, not the recipe).
Prints a Markdown table (also WORK/table.md) with the command that made it and the machine's load.
--threads applies to both toolkits alike: on a CPU that other jobs share, torch's default (a thread per core)
makes every parallel region wait for a busy core, which slowed batch-1 WavLM 5x in our measurements.
About 20 minutes on 2 CPU cores with the demo corpus (real-mini, whose crops are 8 s: longer, not measured).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, SHARED, peer_stages, peer_view, run_measured

PEER = SHARED / "peers" / "s3prl-run"
PEER_ENV = {"PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# The peer's side of the parity row and of the step breakdown: s3prl's own public classes, run in its venv.
PEER_PARITY = """
import sys, numpy as np, torch
from s3prl.nn.upstream import S3PRLUpstream
ckpt, wav, out = sys.argv[1:4]
model = S3PRLUpstream("wavlm_local", path_or_url=ckpt).eval()
x = torch.from_numpy(np.load(wav))[None]
with torch.no_grad():
    hs, _ = model(x, torch.tensor([x.shape[1]]))
np.save(out, np.stack([h[0].numpy() for h in hs]))
"""
PEER_BREAKDOWN = """
import json, sys, time, torch
from s3prl.dataio.dataset import LoadAudio
from s3prl.nn.speaker_loss import amsoftmax
from s3prl.nn.speaker_model import SuperbXvector
from s3prl.nn.upstream import Featurizer, S3PRLUpstream
from s3prl.problem.asv.superb_asv import EFFECTS
a = json.loads(sys.argv[1])
torch.manual_seed(0)
tic = time.perf_counter()
audio = LoadAudio(a["paths"], sox_effects=EFFECTS, max_secs=a["max_secs"])  # librosa + SoX, as its training reads
items = [audio[i]["wav"] for i in range(len(a["paths"]))]
data = time.perf_counter() - tic
upstream = S3PRLUpstream("wavlm_local", path_or_url=a["ckpt"]).eval()
featurizer = Featurizer(upstream)
xvector = SuperbXvector(featurizer.output_size)
loss_fn = amsoftmax(xvector.output_size, a["speakers"], margin=0.4, scale=30)
params = [*featurizer.parameters(), *xvector.parameters(), *loss_fn.parameters()]
optimizer = torch.optim.AdamW(params, lr=1e-4)
with torch.no_grad():
    upstream(torch.zeros(1, 16000), torch.tensor([16000]))  # warm-up
up = down = 0.0
for b in range(0, len(items), a["batch"]):
    wavs = torch.nn.utils.rnn.pad_sequence(items[b:b + a["batch"]], batch_first=True)
    lens = torch.tensor([len(w) for w in items[b:b + a["batch"]]])
    tic = time.perf_counter()
    with torch.no_grad():
        hs, hs_len = upstream(wavs, lens)
    up += time.perf_counter() - tic
    tic = time.perf_counter()
    loss, _ = loss_fn(xvector(*featurizer(hs, hs_len)), torch.tensor(a["labels"][b:b + a["batch"]]))
    (loss / a["accumulate"]).backward()
    down += time.perf_counter() - tic
tic = time.perf_counter()
torch.nn.utils.clip_grad_norm_(params, 1000.0)
optimizer.step()
optimizer.zero_grad()
print("BREAKDOWN " + json.dumps({"data": data, "upstream": up, "downstream": down,
                                 "optimizer": time.perf_counter() - tic}))
"""


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    ap.add_argument("--work", type=Path, default=Path("/tmp/ssl_cmp"), help="working folder (outside the repo)")
    ap.add_argument("--corpus", choices=["real-mini", "demo"], default="real-mini",
                    help="real-mini: ../shared/data/real-mini (speech, 2-23 s: SUPERB's 8 s crops); demo: the "
                         "synthetic 2-4 s corpus of prepare_voxceleb.py --demo (cheaper)")
    ap.add_argument("--ckpt", type=Path, help="WavLM checkpoint in unilm's format (default: WORK/wavlm_base_plus_"
                    "random.pt, made with make_ssl_checkpoint.py when missing; tests/fixtures/tiny_wavlm.pt: smoke)")
    ap.add_argument("--steps", type=int, default=5, help="training steps, one checkpoint after each")
    ap.add_argument("--eval-utts", type=int, default=40, help="test utterances of the evaluation list (all pairs)")
    ap.add_argument("--max-secs", type=float, default=8.0, help="training crop, both toolkits (SUPERB: 8)")
    ap.add_argument("--workers", type=int, default=-1,
                    help="our loader workers, training and evaluation (configs/base.yaml's -1: fit the machine)")
    ap.add_argument("--peer-workers", type=int, default=0,
                    help="s3prl's loader workers (the peer runner's default: its fastest on 2 CPUs)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads of every stage of both toolkits (OMP_NUM_THREADS; 0: torch's default, one "
                         "per core). On a machine others share, 1 avoids threads waiting for a busy core")
    ap.add_argument("--truncate", type=int, default=4, help="layer-truncation rows: layers 0..N (WavLM Base+: 0-12)")
    ap.add_argument("--parity-secs", type=float, default=4.0, help="audio seconds of the parity row")
    ap.add_argument("--bf16", action="store_true", help="an extra training run of ours under bf16 autocast")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-part breakdown of a training step")
    ap.add_argument("--eval-only", action="store_true",
                    help="re-time only (b), on what a full run left in --work: ours, s3prl's stage 3 (the command its "
                         "runner recorded), ours again; wall and CPU seconds, so a shared machine's load shows")
    ap.add_argument("--peer-venv", type=Path, default=Path("/tmp/s3prl-peer-venv"), help="s3prl 0.4.18's venv")
    ap.add_argument("--breakdown-child", help=argparse.SUPPRESS)  # internal: ours' side of the breakdown
    return ap.parse_args()


# ---------------------------------------------------------------------------- inputs

def threads_env(args) -> dict:
    return {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}


def checkpoint_file(args) -> Path:
    ckpt = (args.ckpt or args.work / "wavlm_base_plus_random.pt").resolve()
    if not ckpt.is_file():
        if args.ckpt:
            sys.exit(f"--ckpt {ckpt}: no such file")
        subprocess.run([sys.executable, ROOT / "benchmarks" / "make_ssl_checkpoint.py", "--kind", "wavlm",
                        "--out", ckpt], check=True)
    return ckpt


def prepare(corpus: str, work: Path) -> Path:
    """Our data folder (every non-test speaker trains, as in SUPERB)."""
    data = work / corpus / "data"
    real_mini = SHARED / "data" / "real-mini"
    if corpus == "real-mini" and not real_mini.is_dir():
        sys.exit(f"{real_mini} not found: the shared data sits in ../shared/data")
    source = ["--demo"] if corpus == "demo" else ["--corpus", real_mini, "--test-speakers", "5"]
    subprocess.run([sys.executable, ROOT / "prepare_voxceleb.py", *source, "--out", data, "--valid-speakers", "0",
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return data


def manifest(data: Path) -> list[dict]:
    with open(data / "utterances.csv", newline="") as f:
        return list(csv.DictReader(f))


def eval_list(data: Path, count: int, out: Path) -> tuple[Path, list[dict]]:
    """Every pair of `count` test utterances, taken round-robin over the test speakers (id order within one)."""
    by_speaker: dict[str, list[dict]] = {}
    for u in sorted((u for u in manifest(data) if u["split"] == "test"), key=lambda u: u["id"]):
        by_speaker.setdefault(u["speaker"], []).append(u)
    longest = max(map(len, by_speaker.values()))
    rounds = [[utts[i] for utts in by_speaker.values() if i < len(utts)] for i in range(longest)]
    chosen = [u for r in rounds for u in r][:count]
    if count < 2 * len(by_speaker):  # a left-out test speaker would train in s3prl; one alone has no target trial
        sys.exit(f"--eval-utts {count}: give at least 2 per test speaker ({2 * len(by_speaker)})")
    out.write_text("".join(f"{int(a['speaker'] == b['speaker'])} {a['id']} {b['id']}\n"
                           for i, a in enumerate(chosen) for b in chosen[i + 1:]))
    return out, chosen


# ---------------------------------------------------------------------------- measurements

def step_seconds(folders: list[Path]) -> list[float]:
    """Seconds of training steps 2..N, saving excluded: from the newest file of checkpoint k-1 to the oldest file
    of checkpoint k (files under eval/, written by later evaluations, do not count)."""
    spans = []
    for folder in folders:
        files = [p for p in folder.rglob("*") if p.is_file() and "eval" not in p.relative_to(folder).parts]
        times = [p.stat().st_mtime for p in files]
        spans.append((min(times), max(times)))
    return [spans[k][0] - spans[k - 1][1] for k in range(1, len(spans))]


def parity(args, ckpt: Path, wav_file: str) -> dict:
    """Max |ours - s3prl| over every layer's hidden states of one utterance (batch of 1), on the frames both make."""
    import torch
    from asv.models.onednn import onednn_linear
    from asv.models.upstream import SSLUpstream

    from asv.audio import load_audio

    wav = load_audio(wav_file, 16000)[: int(args.parity_secs * 16000)].numpy()
    np.save(args.work / "parity_wav.npy", wav)
    subprocess.run([args.peer_venv / "bin" / "python", "-c", PEER_PARITY, ckpt, args.work / "parity_wav.npy",
                    args.work / "parity_s3prl.npy"], check=True, env={**os.environ, **PEER_ENV})
    theirs = np.load(args.work / "parity_s3prl.npy")  # (L, T + 1, D): s3prl repeats the last frame once
    upstream = SSLUpstream("wavlm_base_plus", ckpt=str(ckpt)).eval()
    with torch.no_grad(), onednn_linear("cpu"):  # as evaluation runs it
        hidden, frames = upstream(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    ours = np.stack([h[0].numpy() for h in hidden])
    n = int(frames[0])
    diff = np.abs(ours[:, :n] - theirs[:, :n]).max(axis=(1, 2))
    return {"layers": len(diff), "frames": n, "secs": len(wav) / 16000, "max": float(diff.max()),
            "worst_layer": int(diff.argmax()), "scale": float(np.abs(theirs[:, :n]).max())}


def run_s3prl(args, view: Path, trials: Path, ckpt: Path) -> dict:
    """The peer runner: stage 1, stage 2 (training, a checkpoint every step), stage 3-4 (every checkpoint tested)."""
    out = args.work / "s3prl"
    env = {"FORCE": "1", "TRIALS": str(trials), "UPSTREAM": "wavlm_local", "SAVE_STEP": "1", "LOG_STEP": "1",
           "TEST_STEPS": "all", "NUM_WORKERS": str(args.peer_workers), "VENV": str(args.peer_venv),
           **({"TORCH_THREADS": str(args.threads)} if args.threads else {})}
    cmd = ["bash", PEER / "run_s3prl_asv.sh", view, out, args.steps, "--build_upstream.path_or_url", ckpt,
           "--build_dataset.train.max_secs", args.max_secs]
    r = run_measured("s3prl", cmd, args.work / "logs", env, cwd=ROOT, tag="compare_ssl")
    stages = peer_stages(out / "summary.txt")
    steps = step_seconds([out / "exp" / "train" / f"step_{k}" for k in range(1, args.steps + 1)])
    return {"cmd": " ".join(f"{k}={v}" for k, v in env.items()) + " " + r["cmd"], "steps": steps,
            "train": stages["s3prl_stage2_train"], "test": stages["s3prl_stage3-4_test"]}


def train_ours(args, name: str, data: Path, ckpt: Path, steps: int, overrides=()) -> dict:
    """train_asv.py on configs/base.yaml with this checkpoint, a checkpoint every step; step times from them."""
    exp = args.work / name
    shutil.rmtree(exp, ignore_errors=True)  # a fresh run: train_asv.py would otherwise resume
    cmd = [sys.executable, "train_asv.py", "--config", "configs/base.yaml", "upstream.name=wavlm_base_plus",
           f"upstream.ckpt={ckpt}", f"data.dir={data}", f"exp_dir={exp}", f"data.max_secs={args.max_secs}",
           f"train.total_steps={steps}", "train.save_step=1", "train.log_step=1", "train.test_after_train=false",
           "train.log_with=none", f"num_workers={args.workers}", *overrides]
    r = run_measured(name, cmd, args.work / "logs", threads_env(args), cwd=ROOT, tag="compare_ssl")
    ckpts = [exp / f"step-{k}" for k in range(1, steps + 1)]
    return {**r, "ckpts": ckpts, "steps": step_seconds(ckpts)}


def eval_ours(args, name: str, ckpts: list[Path], trials: Path, extra=()) -> dict:
    cmd = [sys.executable, "evaluate_asv.py", "--ckpt-dir", *ckpts, "--trials", trials, f"num_workers={args.workers}",
           *extra]
    return run_measured(name, cmd, args.work / "logs", threads_env(args), cwd=ROOT, tag="compare_ssl")


# ---------------------------------------------------------------------------- one training step, part by part

def breakdown_spec(args, data: Path, view: Path, ckpt: Path) -> dict:
    """The first batch x accumulate training utterances longer than SUPERB's 2 s: ours read from the manifest's
    files, s3prl's from its view (WAV), both with the same labels."""
    batch, accumulate = 10, 5  # configs/base.yaml's data.batch_size and train.gradient_accumulate
    train = [u for u in manifest(data) if u["split"] == "train" and float(u["duration"]) > 2.0][:batch * accumulate]
    speakers = sorted({u["speaker"] for u in manifest(data) if u["split"] == "train"})
    return {"ckpt": str(ckpt), "data": str(data), "ids": [u["id"] for u in train], "max_secs": args.max_secs,
            "peer_paths": [str(view / "wav" / Path(u["id"]).with_suffix(".wav")) for u in train],
            "labels": [speakers.index(u["speaker"]) for u in train], "speakers": len(speakers), "batch": batch,
            "accumulate": accumulate}


def breakdown_child(spec: dict):
    """Ours' side: asv's TrainDataset, then train_asv.py's parts (asv.train.build_parts) and its step
    (asv.train.train_step) over batch x accumulate utterances = one optimizer step; the upstream's share
    is its forward timed alone on the same batches. Prints JSON."""
    import torch

    from asv.config import load_config
    from asv.data import TrainDataset, collate_padded, read_manifest
    from asv.train import build_parts, make_accelerator, prepare, train_step

    cfg = load_config(str(ROOT / "configs" / "base.yaml"), [f"upstream.ckpt={spec['ckpt']}",
                                                            f"train.gradient_accumulate={spec['accumulate']}"])
    torch.manual_seed(0)
    by_id = {u.id: u for u in read_manifest(spec["data"])}
    dataset = TrainDataset([by_id[i] for i in spec["ids"]], spec["labels"], 16000, "superb", "superb")
    tic = time.perf_counter()
    items = [dataset[(i, spec["max_secs"], i)] for i in range(len(spec["ids"]))]  # decode, SoX port, crop
    out = {"data": time.perf_counter() - tic}
    accelerator = make_accelerator(cfg)
    parts = build_parts(cfg, spec["speakers"])
    prepare(accelerator, parts)
    with torch.no_grad():
        parts.upstream(torch.zeros(1, 16000), torch.tensor([16000]))  # warm-up
    out.update(upstream=0.0, step=0.0, valid=0, padded=0)
    for b in range(0, len(items), spec["batch"]):
        wavs, lengths, labels = collate_padded(items[b:b + spec["batch"]])
        out["valid"], out["padded"] = out["valid"] + int(lengths.sum()), out["padded"] + wavs.numel()
        tic = time.perf_counter()
        with torch.no_grad():
            parts.upstream(wavs, lengths)
        out["upstream"] += time.perf_counter() - tic
        tic = time.perf_counter()
        train_step(accelerator, parts, wavs, lengths, labels, cfg.train.gradient_clipping)
        out["step"] += time.perf_counter() - tic
    # the step ran the upstream too: the rest of it is featurizer + x-vector + head, backward and the update
    out["downstream"] = out["step"] - out["upstream"]
    print("BREAKDOWN " + json.dumps(out), flush=True)


def breakdown(args, spec: dict) -> dict:
    """{"s3prl": parts, "ours": parts}: each toolkit's own classes on the same utterances, in a subprocess."""
    runs = {"s3prl": ([args.peer_venv / "bin" / "python", "-c", PEER_BREAKDOWN,
                       json.dumps({**spec, "paths": spec["peer_paths"]})], PEER_ENV),
            "ours": ([sys.executable, Path(__file__).resolve(), "--breakdown-child", json.dumps(spec)], {})}
    out = {}
    for name, (cmd, env) in runs.items():
        print(f"[compare_ssl] breakdown of a training step: {name}", flush=True)
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, **env, **threads_env(args)})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BREAKDOWN ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"[compare_ssl] {name} breakdown failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        out[name] = json.loads(line.split(" ", 1)[1])
    return out


# ---------------------------------------------------------------------------- report

def mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def row(label: str, s3prl, ours, note: str = "") -> str:
    """One table row; the last column is s3prl / ours when both are numbers (time: a speed-up), else the note."""
    def cell(v):
        return "-" if v is None else f"{v:.1f}"

    ratio = f"{s3prl / ours:.2f}x" if s3prl is not None and ours else ""
    return f"| {label} | {cell(s3prl)} | {cell(ours)} | {' '.join(x for x in (ratio, note) if x)} |"


def main_rows(args, r: dict, trials: int) -> list[str]:
    s, o, n = r["s3prl"], r["ours_train"], args.steps
    layers = f"layers 0-{args.truncate}"
    rows = [row(f"training, s per step (steady state: steps 2-{n}; 10 x 5 crops of <= {args.max_secs:g} s, fp32)",
                mean(s["steps"]), mean(o["steps"]), "speed-up per step"),
            row("training stage (incl. start-up, SoX length pass, saves): wall s", s["train"][0], o["wall"]),
            row("training stage: peak PSS MB", float(s["train"][1]), o["pss"], "memory ratio"),
            row(f"evaluation of {n} checkpoints, {args.eval_utts} utterances ({trials} trials): wall s",
                s["test"][0], r["ours_eval"]["wall"], "speed-up"),
            row("evaluation: peak PSS MB", float(s["test"][1]), r["ours_eval"]["pss"], "memory ratio"),
            row(f"evaluation of {n} checkpoints, --feature-cache, first run (writes {r['cache_mb']:.0f} MB): wall s",
                None, r["cache_cold"]["wall"], f"{r['cache_cold']['wall'] / r['ours_eval']['wall']:.2f}x the time "
                "without cache"),
            row(f"evaluation of {n} checkpoints, --feature-cache, second run: wall s", s["test"][0],
                r["cache_warm"]["wall"], f"speed-up; {r['ours_eval']['wall'] / r['cache_warm']['wall']:.2f}x "
                "faster than without cache"),
            row(f"evaluation of 1 checkpoint, all {r['parity']['layers']} layers: wall s", None, r["eval_all"]["wall"]),
            row(f"evaluation of 1 checkpoint, featurizer.layer_selections {layers}: wall s", None,
                r["eval_trunc"]["wall"], f"{r['eval_all']['wall'] / r['eval_trunc']['wall']:.2f}x faster than all"),
            row(f"training, s per step, {layers} (steady state)", None, mean(r["trunc"]["steps"]),
                f"{mean(o['steps']) / mean(r['trunc']['steps']):.2f}x faster than all layers")]
    if "bf16" in r:
        rows.append(row("extra, not the recipe: training, s per step, train.mixed_precision=bf16", mean(s["steps"]),
                        mean(r["bf16"]["steps"]), "speed-up per step"))
    p = r["parity"]
    rows.append(f"| upstream parity: max abs difference of the hidden states, all {p['layers']} layers, batch of 1, "
                f"{p['secs']:.1f} s ({p['frames']} frames) | | {p['max']:.2e} | worst layer {p['worst_layer']}; "
                f"largest value {p['scale']:.1f} |")
    return ["| | s3prl 0.4.18 | ours | ours vs s3prl |", "|---|---|---|---|", *rows]


def breakdown_rows(b: dict, steady: tuple[float, float]) -> list[str]:
    parts = [("data", "data: decode, SUPERB's SoX effects, crop (50 files)"),
             ("upstream", "upstream forward, 5 x 10 crops (frozen: no grad)"),
             ("downstream", "featurizer + x-vector + AM-softmax forward and backward, clipping, AdamW step")]
    s, o = dict(b["s3prl"]), b["ours"]
    s["downstream"] += s["optimizer"]  # ours is timed as the real step (asv.train.train_step) less its upstream
    rows = [row(label, s[key], o[key], "") for key, label in parts]
    total = [sum(x[key] for key, _ in parts) for x in (s, o)]
    rows.append(row("sum of the parts", *total, "speed-up"))
    rows.append(row("measured step in the training run (steady state)", *steady, "speed-up"))
    rows.append(f"| padding: samples through the upstream that are padding | | "
                f"{100 * (1 - o['valid'] / o['padded']):.0f}% | the same batches in both recipes |")
    return ["| one training step, part by part (s, no loader workers) | s3prl 0.4.18 | ours | |",
            "|---|---|---|---|", *rows]


def header(title: str, loads: list, setting: str) -> list[str]:
    """A table's title with the date, the command that made it, and the machine's load at each stage's start."""
    return [f"# {title}, {time.strftime('%Y-%m-%d %H:%M')}", "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`",
            "", f"{os.cpu_count()} CPUs; load average (1 min) at the stages' starts: "
            f"{', '.join(f'{name} {load:.1f}' for name, load in loads)}; {setting}", ""]


def report(args, r: dict, trials: int, loads: list) -> str:
    head = header("WavLM Base+ (frozen, random weights), s3prl 0.4.18 vs ours", loads,
                  f"corpus {args.corpus}, our loader workers {args.workers}, s3prl's {args.peer_workers}; "
                  f"intra-op threads {args.threads or 'torch default'}")
    text = head + main_rows(args, r, trials)
    if "breakdown" in r:
        text += ["", *breakdown_rows(r["breakdown"], (mean(r["s3prl"]["steps"]), mean(r["ours_train"]["steps"])))]
    text += ["", "Commands:", "", f"- s3prl: `{r['s3prl']['cmd']}`",
             *(f"- {k}: `{r[k]['cmd']}`" for k in ("ours_train", "ours_eval", "cache_warm", "trunc", "eval_trunc",
                                                   "bf16") if k in r)]
    return "\n".join(text) + "\n"


def eval_only(args):
    """--eval-only: the evaluation of a full run's checkpoints, both toolkits, ours timed before and after s3prl
    (the load of a shared machine drifts); CPU seconds (user + system, what other jobs barely change) beside wall."""
    trials, recorded = args.work / "eval_trials.txt", args.work / "s3prl" / "logs" / "s3prl_stage3-4_test.log.cmd"
    ckpts = sorted((args.work / "ours").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not (trials.is_file() and ckpts and recorded.is_file()):
        sys.exit(f"--eval-only needs a full run's {trials}, {args.work / 'ours'}/step-* and {recorded}")
    peer_cmd = recorded.read_text().split(": ", 1)[1].split()  # the runner's "[run] <stage>: <command>"
    loads, r = [], {}
    for name in ("ours_before", "s3prl", "ours_after"):
        loads.append((name, os.getloadavg()[0]))
        r[name] = (run_measured("s3prl_stage3_again", peer_cmd, args.work / "logs", {**PEER_ENV, **threads_env(args)},
                                cwd=ROOT, tag="compare_ssl") if name == "s3prl"
                   else eval_ours(args, f"eval_only_{name}", ckpts, trials))
    ours = {k: mean([r["ours_before"][k], r["ours_after"][k]]) for k in ("wall", "cpu", "pss")}
    head = header(f"Evaluation of {len(ckpts)} checkpoints, WavLM Base+, s3prl 0.4.18 vs ours", loads,
                  f"intra-op threads {args.threads or 'torch default'}")
    head += [f"| {sum(1 for _ in open(trials))} trials | s3prl 0.4.18 stage 3 | ours, before | ours, after | "
             "s3prl / mean of ours |", "|---|---|---|---|---|"]
    rows = [f"| {label} | {r['s3prl'][k]:.1f} | {r['ours_before'][k]:.1f} | {r['ours_after'][k]:.1f} | "
            f"{r['s3prl'][k] / ours[k]:.2f}x |" for k, label in (("wall", "wall s"), ("cpu", "CPU s (user + system)"),
                                                                 ("pss", "peak PSS MB"))]
    text = "\n".join(head + rows + ["", f"- s3prl: `{r['s3prl']['cmd']}`", f"- ours: `{r['ours_before']['cmd']}`"])
    (args.work / "eval_only.md").write_text(text + "\n")
    print(text)


def main():
    args = parse_args()
    if args.eval_only:
        eval_only(args)
        return
    if args.breakdown_child:
        breakdown_child(json.loads(args.breakdown_child))
        return
    if args.steps < 2:
        sys.exit("--steps must be at least 2: the steady state starts at step 2")
    if not PEER.is_dir() or not (args.peer_venv / "bin" / "python").is_file() or not Path("/usr/bin/time").is_file():
        sys.exit(f"needs the s3prl runner in {PEER}, its venv {args.peer_venv} and GNU time (apt-get install time)")
    args.work = args.work.resolve()
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    loads, r = [], {}

    def stage(name: str):  # the machine's load as each stage starts, for the report
        loads.append((name, os.getloadavg()[0]))

    stage("start")
    ckpt = checkpoint_file(args)
    data = prepare(args.corpus, args.work)
    trials, chosen = eval_list(data, args.eval_utts, args.work / "eval_trials.txt")
    view = args.work / "peer_corpus"
    r["parity"] = parity(args, ckpt, str(data / chosen[0]["path"]))
    stage("s3prl")
    r["s3prl"] = run_s3prl(args, view, peer_view(data, view, trials), ckpt)
    stage("ours")
    r["ours_train"] = train_ours(args, "ours", data, ckpt, args.steps)
    r["ours_eval"] = eval_ours(args, "ours_eval", r["ours_train"]["ckpts"], trials)
    cache = args.work / "feature_cache"
    shutil.rmtree(cache, ignore_errors=True)
    stage("cache")
    for name in ("cache_cold", "cache_warm"):
        r[name] = eval_ours(args, f"ours_eval_{name}", r["ours_train"]["ckpts"], trials, ["--feature-cache", cache])
    r["cache_mb"] = sum(f.stat().st_size for f in cache.rglob("*.npz")) / 2**20
    stage("layers")
    r["trunc"] = train_ours(args, "ours_layers", data, ckpt, min(args.steps, 3),
                            [f"featurizer.layer_selections={list(range(args.truncate + 1))}"])
    r["eval_all"] = eval_ours(args, "ours_eval_1ckpt_all_layers", r["ours_train"]["ckpts"][-1:], trials)
    r["eval_trunc"] = eval_ours(args, "ours_eval_1ckpt_truncated", r["trunc"]["ckpts"][-1:], trials)
    if args.bf16:
        stage("bf16")
        r["bf16"] = train_ours(args, "ours_bf16", data, ckpt, min(args.steps, 3), ["train.mixed_precision=bf16"])
    if not args.no_breakdown:
        stage("breakdown")
        r["breakdown"] = breakdown(args, breakdown_spec(args, data, view, ckpt))
    stage("end")
    text = report(args, r, sum(1 for _ in open(trials)), loads)
    (args.work / "table.md").write_text(text)
    (args.work / "results.json").write_text(json.dumps(r, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
