"""Where the time goes: training, evaluation, metrics and the small vectorised pieces, side by side.

    python benchmarks/benchmark.py            # a few minutes on 2 CPU cores
    python benchmarks/benchmark.py --quick    # tiny settings, well under a minute

Runs on CUDA when present, else on the CPU, and prints Markdown tables:

1. training throughput (crops/s, optimizer steps/s) of (a) the log-mel x-vector (configs/xvector_bn.yaml)
   and (b) a real-size WavLM Base+ (random weights, frozen; configs/base.yaml, SUPERB's SoX effects),
   each measured three ways: the data pipeline alone (asv.data's TrainBatchSampler + TrainDataset +
   collate_padded on real-mini files),
   the model alone (synthetic batches already on the device) and both together; the slower of the
   first two is named as the bottleneck.
2. evaluation throughput (audio seconds per second) on VoxCeleb1-test lengths: our length-sorted
   batches (asv.embed.embed) vs the simple way (one utterance at a time at full length), with
   peak memory.
3. EER + both minDCFs on 1M trials: metrics.compute_metrics vs the way s3prl computes them (sklearn
   roc_curve, scipy brentq on an interpolated ROC, a Python loop over thresholds for minDCF).
4. statistics pooling (per-sample Python loop vs models.pooling.StatsPool) and cosine scoring
   (Python loop vs models.cosine_scores).
5. CUDA only: WavLM Base+ step time in fp32 vs bf16 through Accelerate, and GPU utilisation.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from asv import metrics
from asv.audio import load_audio
from asv.config import load_config
from asv.data import length_batches, loader_workers, read_manifest, train_loader, trim_once
from asv.embed import build_models, embed, eval_batch_secs, eval_loader
from asv.models import cosine_scores, min_input_samples
from asv.models.pooling import StatsPool
from asv.train import build_parts, make_accelerator, prepare
from asv.train import train_step as asv_train_step
from common import REAL_MINI, ROOT, VOX1_META, GpuUtilisation

WAVLM = ["upstream.name=wavlm_base_plus", "upstream.random_init=true", "upstream.trainable=false"]


# ---------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """Current resident memory of this process (Linux /proc; else the lifetime peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on CUDA; on CPU this process's RSS,
    sampled every 5 ms in a thread (getrusage only knows the lifetime peak, which cannot be reset)."""

    def __init__(self, device):
        self.device, self.mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak, self.stop = rss_bytes(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.mb = max(self.peak, rss_bytes()) / 2**20


def median_time(fn, runs: int) -> tuple[float, object]:
    """Median wall seconds of `runs` calls, and the last result."""
    times, out = [], None
    for _ in range(runs):
        tic = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), out


def table(title: str, header: list[str], rows: list[list]):
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------- 1. training

def train_parts(cfg, num_speakers: int):
    """train_asv.py's accelerator, parts (asv.train.build_parts) and `prepare`: the step timed below is
    asv.train.train_step, the one the training loop runs (accumulation, clipping, the non-finite check)."""
    accelerator = make_accelerator(cfg)
    parts = build_parts(cfg, num_speakers)
    prepare(accelerator, parts)
    for m in parts.trained:
        m.train()
    return accelerator, parts


def make_train_loader(cfg, train_utts, labels, num_workers: int):
    """train_asv.py's loader (asv.data.train_loader; data.effects=superb: the data folder's effects.tsv, made
    here if absent), without augmentation."""
    d = cfg.data
    trims = trim_once(d.dir, train_utts, d.sample_rate, num_workers, False) if d.effects == "superb" else None
    durations = [u.duration for u in train_utts] if trims is None else list(trims.kept / d.sample_rate)
    return train_loader(cfg, train_utts, labels, durations, num_workers=num_workers, trims=trims)


def time_loader(cfg, train_utts, labels, num_workers: int, batches: int) -> tuple[float, float]:
    """(first batch s: worker start-up included, steady batches/s over the next `batches`)."""
    it = iter(make_train_loader(cfg, train_utts, labels, num_workers))
    tic = time.perf_counter()
    next(it)
    first = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches / (time.perf_counter() - tic)
    del it  # shuts the workers down
    return first, rate


def bench_training(name, cfg, data_dir, device, steps: int, loader_batches: int, gpu_rows: list):
    utts = [u for u in read_manifest(str(data_dir)) if u.split == "train"]
    if cfg.data.crop == "superb":  # train_asv.py leaves out what SUPERB drops (here by raw length: no SoX pass)
        utts = [u for u in utts if u.duration > cfg.data.min_secs]
    speakers = sorted({u.speaker for u in utts})
    labels = [speakers.index(u.speaker) for u in utts]
    b, secs = cfg.data.batch_size, cfg.data.min_secs
    rows = []

    # data pipeline alone, at the config's num_workers and in the main process
    data_rate = {}
    for workers in sorted({cfg.num_workers, 0}, reverse=True):
        first, rate = time_loader(cfg, utts, labels, workers, loader_batches)
        data_rate[workers] = rate
        rows.append([name, f"data only ({workers} workers)", f"{rate * b:.1f}", f"{rate:.2f}",
                     f"first batch {first:.2f} s (worker start-up)"])

    # model alone: synthetic in-memory batches of the same shape
    accelerator, parts = train_parts(cfg, len(speakers))
    clip = cfg.train.gradient_clipping

    def train_step(w, n, y):
        asv_train_step(accelerator, parts, w, n, y, clip)

    gen = torch.Generator().manual_seed(0)
    wavs = (0.1 * torch.randn(b, int(secs * cfg.data.sample_rate), generator=gen)).to(device)
    lengths = torch.full((b,), wavs.shape[1], device=device)
    ys = torch.randint(0, len(speakers), (b,), generator=gen).to(device)
    train_step(wavs, lengths, ys)  # warm-up
    sync(device)
    with PeakMemory(device) as mem:
        tic = time.perf_counter()
        for _ in range(steps):
            train_step(wavs, lengths, ys)
        sync(device)
        model_rate = steps / (time.perf_counter() - tic)
    rows.append([name, "model only (synthetic batches)", f"{model_rate * b:.1f}", f"{model_rate:.2f}",
                 f"peak {'allocated' if device.type == 'cuda' else 'RSS'} {mem.mb:.0f} MB"])

    # both: real batches from the loader at the config's num_workers, through the same step
    it = iter(make_train_loader(cfg, utts, labels, cfg.num_workers))

    def real_step():
        w, n, y = next(it)
        train_step(w.to(device), n.to(device), y.to(device))

    real_step()  # warm-up: worker start-up
    sync(device)
    with GpuUtilisation(device) as util:
        tic = time.perf_counter()
        for _ in range(steps):
            real_step()
        sync(device)
        both_rate = steps / (time.perf_counter() - tic)
    del it
    if device.type == "cuda":
        gpu_rows.append([name, "train (data + model)", util.text()])
    data_default = data_rate[cfg.num_workers]
    bottleneck = "data pipeline" if data_default < model_rate else "model"
    rows.append([name, f"both ({cfg.num_workers} workers)", f"{both_rate * b:.1f}", f"{both_rate:.2f}",
                 f"bottleneck: **{bottleneck}** (data {data_default:.2f} vs model {model_rate:.2f} batches/s)"])
    del parts
    return rows


# ---------------------------------------------------------------------------- 2. evaluation

def tone_in_noise(utt: str, num_samples: int) -> np.ndarray:
    """Cheap deterministic audio (int16) for timing: a per-speaker tone in noise, seeded by the utterance id."""
    rng = np.random.default_rng(zlib.crc32(utt.encode()))
    f0 = 100 + zlib.crc32(utt.split("/")[0].encode()) % 200
    t = np.arange(num_samples, dtype=np.float32) / 16000
    x = 0.2 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(num_samples, dtype=np.float32)
    return (x * 32767).astype(np.int16)


def write_eval_files(folder: Path, count: int, seed: int, max_secs: float = 0.0) -> tuple[list[str], list[float]]:
    """`count` utterances with lengths drawn from the real VoxCeleb1 test set, as 16 kHz PCM16 files
    (cut to max_secs when > 0: --quick only)."""
    import gzip
    with gzip.open(VOX1_META / "vox1_test_duration.txt.gz", "rt") as f:
        rows = [line.split() for line in f]
    pick = np.random.default_rng(seed).choice(len(rows), count, replace=False)
    paths, secs = [], []
    for i in pick:
        utt, d = rows[i][0], float(rows[i][1])
        n = round((min(d, max_secs) if max_secs > 0 else d) * 16000)
        path = folder / f"{utt.replace('/', '_')}.wav"
        sf.write(str(path), tone_in_noise(utt, n), 16000, subtype="PCM_16")
        paths.append(str(path))
        secs.append(n / 16000)
    return paths, secs


def gflop_per_audio_second(upstream, encoder, sample_rate: int, device) -> float:
    """Arithmetic per audio second (torch.utils.flop_counter on 10 s), so throughputs read as GFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    ten = torch.zeros(1, 10 * sample_rate, device=device)
    with FlopCounterMode(display=False) as counter:
        encoder(*upstream(ten, torch.tensor([ten.shape[1]], device=device)))
    return counter.get_total_flops() / 1e9 / 10


def print_agreement(name: str, tables: dict):
    """How far the faster paths' embeddings are from the default's: `tables` {False: default fp32, True: bf16,
    batch seconds: that fixed batching} -> (utterances, dim) arrays, one row per utterance in the same order."""
    base = torch.from_numpy(tables[False])
    for key, table in tables.items():
        if key is False:
            continue
        cos = torch.nn.functional.cosine_similarity(base, torch.from_numpy(table)).min().item()
        if key is True:  # what bf16 costs
            print(f"{name}: bf16 vs fp32 embeddings, lowest cosine over {len(base)} utterances: {cos:.5f}")
        else:  # batching changes speed, not embeddings
            print(f"{name}: default batching vs {key:g} s batches, lowest cosine over {len(base)} "
                  f"utterances: {cos:.7f}")


@torch.no_grad()
def bench_eval(name, cfg, paths, secs, accelerator):
    device = accelerator.device
    upstream, encoder = build_models(cfg)
    upstream, encoder = upstream.to(device).eval(), encoder.to(device).eval()
    need = min_input_samples(upstream, encoder)
    encoder(*upstream(torch.zeros(1, need, device=device), torch.tensor([need], device=device)))  # warm-up
    total = sum(secs)

    def simple():  # one utterance at a time, at full length, batch size 1
        for p in paths:
            wav = load_audio(p, cfg.data.sample_rate)
            if wav.numel() < need:
                wav = wav.repeat(need // wav.numel() + 1)[:need]
            encoder(*upstream(wav[None].to(device), torch.tensor([wav.numel()], device=device)))
        sync(device)

    tables = {}

    def ours(bf16=False, workers=None, batch_secs=None):
        saved = cfg.num_workers, cfg.data.eval_batch_secs
        cfg.num_workers = cfg.num_workers if workers is None else workers
        cfg.data.eval_batch_secs = cfg.data.eval_batch_secs if batch_secs is None else batch_secs
        try:
            loader = accelerator.prepare(eval_loader(paths, secs, cfg, need, device))
        finally:
            cfg.num_workers, cfg.data.eval_batch_secs = saved
        # evaluate_asv.py gets this from train.mixed_precision=bf16 (Accelerate's autocast); the
        # benchmark's Accelerator is fp32, so the same autocast is opened around it
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            key = bf16 if batch_secs is None else batch_secs
            (tables[key],), _ = embed(accelerator, [upstream], [encoder], loader, len(paths), -1,
                                      int(cfg.data.eval_chunk_secs * cfg.data.sample_rate))
        sync(device)

    # the default batching (data.eval_batch_secs 0: the device's own) against one utterance per batch (1e-9 s:
    # every batch holds one file) and fixed padded batches, the same embed() path
    default_secs = eval_batch_secs(cfg, device)
    runs = [("simple (batch 1, full length)", simple),
            (f"ours, default on {device.type}: {default_secs:g} s batches ({cfg.num_workers} workers)", ours)]
    batch_secs = {runs[1][0]: default_secs}
    for fixed in (s for s in (1e-9, 60.0, 600.0) if s != default_secs):
        what = "1 utterance per batch" if fixed < 1 else f"data.eval_batch_secs={fixed:g}"
        label = f"ours, {what} ({cfg.num_workers} workers)"
        runs.append((label, lambda fixed=fixed: ours(batch_secs=fixed)))
        batch_secs[label] = fixed
    if cfg.num_workers > 0:  # the same, decoding files in the main process
        runs.append(("ours, default batching, 0 workers", lambda: ours(workers=0)))
        batch_secs[runs[-1][0]] = default_secs
    # bf16 pays only where the hardware has bf16 arithmetic (CUDA; CPUs with AVX512-BF16 or AMX)
    bf16_ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.cpu._is_avx512_bf16_supported()
    if bf16_ok:
        runs.append((f"ours, bf16 (train.mixed_precision=bf16, {cfg.num_workers} workers)", lambda: ours(True)))
    out = {}
    for label, fn in runs:
        with PeakMemory(device) as mem:
            tic = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - tic
        out[label] = (total / elapsed, mem.mb)
    s_rate = out["simple (batch 1, full length)"][0]

    def padding(label):
        """audio the model actually runs over (padding included) per second of real audio: few utterances
        of spread-out lengths pad much more than a whole test set, whose sorted neighbours are close"""
        batches = length_batches(secs, batch_secs.get(label, default_secs))
        return f"{sum(len(b) * max(secs[i] for i in b) for b in batches) / total:.2f} ({len(batches)} batches)"

    # a simple way already near the hardware's peak leaves batching nothing to win
    gflop = gflop_per_audio_second(upstream, encoder, cfg.data.sample_rate, device)
    print(f"{name}: {gflop:.2f} GFLOP per audio second (torch.utils.flop_counter); achieved: "
          + ", ".join(f"{label}: {gflop * rate:.0f} GFLOP/s" for label, (rate, _) in out.items()))
    print_agreement(name, tables)
    return [[name, label, f"{rate:.1f}", f"{mem:.0f}", f"{rate / s_rate:.2f}x",
             "1.00" if label.startswith("simple") else padding(label)]
            for label, (rate, mem) in out.items()]


# ---------------------------------------------------------------------------- 3. metrics

def s3prl_style_metrics(scores, labels, p_targets=(0.01, 0.05)) -> dict:
    """EER and minDCF the way s3prl computes them (written from its description, not copied):
    EER by root finding on the linearly interpolated ROC; minDCF per p_target from a fresh
    roc_curve and a Python loop over its thresholds."""
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    try:
        from scipy.interpolate import interp1d
        from scipy.optimize import brentq
        eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    except ImportError:  # no scipy: where 1 - fpr - tpr (falling along the ROC) crosses zero
        gap = 1.0 - fpr - tpr
        eer = float(np.interp(0.0, gap[::-1], fpr[::-1]))
    out = {"eer": 100.0 * float(eer)}
    for p in p_targets:
        fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
        fnr = 1.0 - tpr
        best = float("inf")
        for i in range(len(fnr)):
            cost = fnr[i] * p + fpr[i] * (1 - p)
            if cost < best:
                best = cost
        out[f"min_dcf_{p:g}"] = best / min(p, 1 - p)
    return out


def bench_metrics(num_trials: int, runs: int):
    rng = np.random.default_rng(0)
    labels = (rng.random(num_trials) < 0.5).astype(np.int8)
    scores = (rng.standard_normal(num_trials) + 2.0 * labels).astype(np.float32)  # EER ~16%
    rows, results = [], {}
    for label, fn in (("ours: metrics.compute_metrics", lambda: metrics.compute_metrics(scores, labels)),
                      ("s3prl way: roc_curve + brentq + Python minDCF loop",
                       lambda: s3prl_style_metrics(scores, labels))):
        secs, res = median_time(fn, runs)
        tracemalloc.start()  # a separate run: tracing slows Python loops down
        fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        results[label] = (secs, res)
        rows.append([label, f"{secs * 1000:.0f}", f"{peak:.0f}", f"{res['eer']:.4f}", f"{res['min_dcf_0.01']:.4f}",
                     f"{res['min_dcf_0.05']:.4f}"])
    (ours_s, _), (simple_s, _) = results.values()
    rows.append(["ratio (s3prl way / ours)", f"{simple_s / ours_s:.1f}x", "", "", "", ""])
    return rows


# ---------------------------------------------------------------------------- 4. small pieces

def loop_stats_pool(x, lengths):
    """Per utterance, in Python: mean and std over its valid frames (what stats_pool vectorises)."""
    out = []
    for b in range(x.shape[0]):
        v = x[b, :, : int(lengths[b])]
        mean = v.mean(-1)
        std = torch.sqrt(((v - mean[:, None]) ** 2).mean(-1).clamp(min=1e-6))
        out.append(torch.cat([mean, std]))
    return torch.stack(out)


def bench_small(device, quick: bool):
    rows = []
    b, c, t = (8, 1500, 100) if quick else (64, 1500, 400)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, t, generator=gen).to(device)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen).to(device)
    pool = StatsPool(c)  # zeroes x's padded frames in place (its input is the caller's temporary)
    assert torch.allclose(loop_stats_pool(x, lengths), pool(x.clone(), lengths), atol=1e-4)

    def run(fn):
        def go():
            fn(x, lengths)
            sync(device)
        return go

    loop_s, _ = median_time(run(loop_stats_pool), 5)
    vec_s, _ = median_time(run(pool), 5)
    rows.append([f"stats pooling, ({b}, {c}, {t}) on {device.type}", "per-sample Python loop", f"{loop_s * 1e3:.2f}",
                 "models.pooling.StatsPool", f"{vec_s * 1e3:.2f}", f"{loop_s / vec_s:.1f}x"])

    n, u, e = (10_000 if quick else 100_000), 4874, 512
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((u, e)).astype(np.float32)
    a, bb = rng.integers(0, u, n), rng.integers(0, u, n)

    def loop():
        return np.array([np.dot(emb[i], emb[j]) / (np.linalg.norm(emb[i]) * np.linalg.norm(emb[j]))
                         for i, j in zip(a, bb)], dtype=np.float32)

    loop_s, ref = median_time(loop, 1 if not quick else 3)
    vec_s, got = median_time(lambda: cosine_scores(emb, a, bb), 5)
    assert np.allclose(ref, got, atol=1e-5)
    rows.append([f"cosine scoring, {n} trials, {u} x {e} table", "Python loop over trials", f"{loop_s * 1e3:.1f}",
                 "models.cosine_scores", f"{vec_s * 1e3:.2f}", f"{loop_s / vec_s:.0f}x"])
    return rows


# ---------------------------------------------------------------------------- 5. CUDA precision (child process)

def precision_child(args):
    """Time WavLM Base+ (frozen) training steps (asv.train.train_step) under one Accelerate precision;
    print one JSON line.

    A child process per precision because Accelerate's state is a process-wide singleton: one
    process cannot hold Accelerators of two mixed-precision settings."""
    cfg = load_config(str(ROOT / "configs" / "base.yaml"), [*WAVLM, f"train.mixed_precision={args.precision_child}",
                                                            "train.gradient_accumulate=1"])
    accelerator, parts = train_parts(cfg, 1000)
    device = accelerator.device
    gen = torch.Generator().manual_seed(0)
    wavs = (0.1 * torch.randn(args.child_batch, int(args.child_secs * 16000), generator=gen)).to(device)
    lengths = torch.full((args.child_batch,), wavs.shape[1], device=device)
    ys = torch.randint(0, 1000, (args.child_batch,), generator=gen).to(device)
    with torch.no_grad(), accelerator.autocast():
        dtype = str(parts.upstream(wavs[:1], lengths[:1])[0][-1].dtype).removeprefix("torch.")

    def step():
        asv_train_step(accelerator, parts, wavs, lengths, ys, cfg.train.gradient_clipping)

    for _ in range(2):
        step()
    sync(device)
    with PeakMemory(device) as mem:
        tic = time.perf_counter()
        for _ in range(args.child_steps):
            step()
        sync(device)
        secs = (time.perf_counter() - tic) / args.child_steps
    out = [{"precision": args.precision_child, "variant": "asv.train.train_step", "ms": 1000 * secs,
            "mem_mb": mem.mb, "upstream_dtype": dtype}]
    print("PRECISION_RESULT " + json.dumps(out), flush=True)


def bench_precision(batch: int, secs: float, steps: int, gpu_rows: list):
    rows = []
    for precision in ("no", "bf16"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--precision-child", precision,
               "--child-batch", str(batch), "--child-secs", str(secs), "--child-steps", str(steps)]
        with GpuUtilisation(torch.device("cuda")) as util:  # only run on a GPU machine
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
            rows.append([precision, "failed", why, "", "", ""])
            continue
        line = next(l for l in proc.stdout.splitlines() if l.startswith("PRECISION_RESULT "))
        for r in json.loads(line.split(" ", 1)[1]):
            rows.append(["fp32" if precision == "no" else precision, r["variant"], r["upstream_dtype"],
                         f"{r['ms']:.0f}", f"{1000 / r['ms']:.2f}", f"{r['mem_mb']:.0f}"])
        gpu_rows.append(["WavLM Base+", f"step timing, {precision} (child process, incl. start-up)", util.text()])
    return rows


# ---------------------------------------------------------------------------- main

XVECTOR = ("x-vector (BatchNorm) on log-mel", "xvector_bn.yaml", [])
WAVLM_BASE = ("WavLM Base+ (frozen)", "base.yaml", WAVLM)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test, not a measurement)")
    parser.add_argument("--corpus", type=Path, default=REAL_MINI, help="real audio for the data pipeline")
    parser.add_argument("--eval-utts", type=int, default=200, help="utterances (VoxCeleb1 test lengths) for eval")
    parser.add_argument("--eval-utts-ssl", type=int, default=None,
                        help="utterances for the WavLM eval (default: --eval-utts on CUDA, 8 on CPU: ~1.5 audio s/s)")
    parser.add_argument("--trials", type=int, default=1_000_000, help="trials for the metrics benchmark")
    parser.add_argument("--only", choices=("training", "evaluation", "metrics", "pieces"),
                        help="run one section (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--precision-child", choices=("no", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--child-secs", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.precision_child:
        for folder, what in ((args.corpus, "real speech folder (--corpus)"), (VOX1_META, "VoxCeleb1 metadata folder")):
            if not folder.is_dir():
                sys.exit(f"{folder}: {what} not found (the shared data sits in ../shared/data beside the checkout)")
    return args


def print_header(device, quick: bool):
    cuda = device.type == "cuda"
    print("# benchmark.py" + (" --quick (tiny settings: a smoke test, not a measurement)" if quick else ""))
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}, "
          f"cpu {cpu_model()}, python {platform.python_version()}")
    # other jobs on the same cores distort every figure (intra-op threads wait for each other): say so
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def training_section(args, tmp: Path, device, gpu_rows: list):
    """1. training throughput of both models on the --corpus audio, prepared as a user prepares it."""
    cuda = device.type == "cuda"
    data_dir = tmp / "data"
    subprocess.run([sys.executable, str(ROOT / "prepare_voxceleb.py"), "--corpus", str(args.corpus),
                    "--out", str(data_dir)], check=True, capture_output=True, cwd=ROOT)
    if args.quick:
        fb = dict(batch=4, secs=1.0, steps=1, loader=4)
        wl = dict(batch=1, secs=1.0, steps=1, loader=2)
    else:
        fb = dict(batch=32, secs=2.0, steps=8 if not cuda else 50, loader=20 if not cuda else 50)
        wl = dict(batch=4, secs=2.0, steps=3, loader=50) if not cuda else dict(batch=10, secs=5.0, steps=20, loader=30)
    rows = []
    for (name, base, extra), s in ((XVECTOR, fb), (WAVLM_BASE, wl)):
        cfg = load_config(str(ROOT / "configs" / base),
                          [f"data.dir={data_dir}", f"data.batch_size={s['batch']}", f"data.min_secs={s['secs']}",
                           f"data.max_secs={s['secs']}", "train.gradient_accumulate=1", *extra])  # a call = a step
        cfg.num_workers = loader_workers(cfg.num_workers)  # the count the labels name
        label = f"{name}, {s['batch']} x {s['secs']:g} s"
        print(f"[bench] training: {label}", file=sys.stderr, flush=True)
        rows += bench_training(label, cfg, data_dir, device, s["steps"], s["loader"], gpu_rows)
    table("training throughput" + (" (CPU: data workers and the model share the same cores)" if not cuda else ""),
          ["model", "measured", "crops/s", "batches/s (= optimizer steps/s at gradient_accumulate 1)", "note"], rows)


def evaluation_section(args, tmp: Path, accelerator):
    """2. evaluation throughput of both models on VoxCeleb1 test lengths."""
    cuda = accelerator.device.type == "cuda"
    n_fb = 6 if args.quick else args.eval_utts
    n_ssl = 1 if args.quick else (args.eval_utts_ssl or (args.eval_utts if cuda else 8))
    (tmp / "eval").mkdir()
    paths, secs = write_eval_files(tmp / "eval", max(n_fb, n_ssl), seed=0, max_secs=2.0 if args.quick else 0.0)
    rows = []
    for (name, base, extra), n in ((XVECTOR, n_fb), (WAVLM_BASE, n_ssl)):
        cfg = load_config(str(ROOT / "configs" / base), extra)
        cfg.num_workers = loader_workers(cfg.num_workers)
        label = f"{name}, {n} utts ({sum(secs[:n]) / 60:.1f} min)"
        print(f"[bench] evaluation: {label}", file=sys.stderr, flush=True)
        rows += bench_eval(label, cfg, paths[:n], secs[:n], accelerator)
    mem_kind = "torch.cuda.max_memory_allocated" if cuda else "RSS of this process, sampled"
    table("evaluation throughput (VoxCeleb1 test lengths, audio seconds per second)",
          ["model", "path", "audio s / s", f"peak MB ({mem_kind})", "vs simple", "padded / real audio"], rows)


def main():
    args = parse_args()
    if args.precision_child:
        precision_child(args)
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    accelerator = make_accelerator(load_config(None))  # the toolkit's default precision (fp32)
    device, quick, gpu_rows = accelerator.device, args.quick, []
    print_header(device, quick)
    with tempfile.TemporaryDirectory(prefix="asv_bench_") as tmp:
        if args.only in (None, "training"):
            training_section(args, Path(tmp), device, gpu_rows)
        if args.only in (None, "evaluation"):
            evaluation_section(args, Path(tmp), accelerator)

    # ---- 3. metrics
    n_trials = 100_000 if quick else args.trials
    if args.only in (None, "metrics"):
        print(f"[bench] metrics on {n_trials} trials", file=sys.stderr, flush=True)
        table(f"metrics on {n_trials:,} trials (median of {3 if quick else 5} runs; peak from tracemalloc)",
              ["implementation", "ms", "peak MB", "EER %", "minDCF 0.01", "minDCF 0.05"],
              bench_metrics(n_trials, 3 if quick else 5))

    # ---- 4. small pieces
    if args.only in (None, "pieces"):
        table("vectorised pieces (median ms)", ["what", "simple way", "ms", "ours", "ms", "speed-up"],
              bench_small(device, quick))

    # ---- 5. CUDA only
    if device.type == "cuda" and args.only is None:
        table("WavLM Base+ frozen, training step through Accelerate (synthetic batch, 10 x 5 s)",
              ["precision", "variant", "upstream output dtype", "ms/step", "steps/s", "peak MB"],
              bench_precision(10, 5.0, 3 if quick else 20, gpu_rows))
        table("GPU utilisation (nvidia-smi, sampled every 0.2 s)", ["model", "phase", "utilization.gpu"], gpu_rows)
    print(f"\nprocess peak RSS (getrusage): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
