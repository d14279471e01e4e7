"""Training-loader throughput: crops per second per CPU core, beside what a GPU consumes.

    python benchmarks/bench_loader.py                  # 40 files, 200 examples per recipe and path
    python benchmarks/bench_loader.py --quick          # 8 files, 20 examples (a smoke run)

Files: the LibriSpeech FLACs of ../shared/data/real-mini longer than 8.5 s (16 kHz, PCM16; --files of
them). Their SUPERB effects are computed once (asv.data.trim_once, effects.tsv in --work), as
prepare_voxceleb.py does for a data folder. Each recipe draws its examples with the project's own
TrainBatchSampler and TrainDataset (one process, one thread, CPU time: per core):
- whole file: today's chain before effects.tsv, the whole file decoded, gained and trimmed per example;
- span: TrainDataset with the trims, decoding only the span of the file the crop needs;
- span from shards: the same, each file's bytes read from a shard store of the files (prepare_voxceleb.py
  --shards: wids, 64 MB tar shards in --work), decoded from memory;
beside the decode-only rate of 8 s spans of the same files (soundfile, float32), the floor of any loader.
All paths must give the same samples: every timed example is compared (np.array_equal).
Augmentation reads synthetic MUSAN-style noise (noise/ music/ speech/, 60 s files) and RIR (0.5 s)
folders written in --work, at strong.yaml's probabilities (0.6 each); the share of its time spent
reading noise/RIR files is printed. GPU consumption is an estimate from FLOPs: WavLM Base+ at
~14 GFLOP per audio second (a frozen forward), ECAPA-TDNN on 80-dim fbank counted here with
torch's FlopCounterMode (forward x 3 for a training step), at 40% of an H200's 989 TFLOP/s dense bf16.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from common import REAL_MINI, ROOT

import asv.augment as augment_module
from asv.augment import Augmenter, fast_fft_size
from asv.config import AugmentConfig
from asv.data import EFFECTS_FILE, ShardStore, TrainBatchSampler, TrainDataset, read_manifest, trim_once, write_shards

SR = 16000
H200_BF16 = 989e12  # dense bf16 FLOP/s of an H200 SXM (NVIDIA's datasheet: 1,979 T with sparsity)
UTILISATION = 0.4
WAVLM_FLOP_PER_SEC = 14e9  # frozen WavLM Base+ forward per audio second (README's figure)
RECIPES = [  # name, crop, effects, min_secs, max_secs, augmented (base.yaml: superb/superb 2-8 s; strong.yaml: fixed 2-3 s)
    ("SUPERB: effects + 8 s crops", "superb", "superb", 2.0, 8.0, False),
    ("SUPERB + noise/RIR", "superb", "superb", 2.0, 8.0, True),
    ("fixed 2-3 s crops, no effects", "fixed", "none", 2.0, 3.0, False),
    ("fixed 2-3 s crops + noise/RIR", "fixed", "none", 2.0, 3.0, True),
]


def synthetic_augmentation(root: Path) -> tuple[str, str]:
    """MUSAN-shaped noise/ music/ speech/ folders (60 s 16 kHz FLAC, as MUSAN's long files) and 0.5 s RIRs."""
    rng = np.random.default_rng(0)
    t = np.arange(60 * SR) / SR
    for category, count in (("noise", 4), ("music", 4), ("speech", 8)):
        for k in range(count):
            path = root / "musan" / category / f"{k}.flac"
            if path.is_file():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            x = rng.normal(0, 0.1, len(t))
            if category == "music":
                x = 0.3 * np.sin(2 * np.pi * (220 + 40 * k) * t) + 0.05 * x
            elif category == "speech":
                x = x * (1 + np.sin(2 * np.pi * 3 * t))
            sf.write(path, np.clip(x, -1, 1), SR, subtype="PCM_16")
    for k in range(8):
        path = root / "rirs" / f"{k}.wav"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            rir = rng.normal(0, 1, SR // 2) * np.exp(-np.arange(SR // 2) / (400 + 100 * k))
            rir[:20], rir[20] = 0.0, 4.0
            sf.write(path, rir / np.abs(rir).max(), SR, subtype="FLOAT")
    return str(root / "musan"), str(root / "rirs")


class ReadTimer:
    """CPU seconds spent in the augmenter's file reads (asv.augment.load_audio)."""

    def __init__(self):
        self.seconds, self.real = 0.0, augment_module.load_audio

    def __call__(self, *args, **kwargs):
        start = time.process_time()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds += time.process_time() - start

    def __enter__(self):
        augment_module.load_audio = self
        return self

    def __exit__(self, *exc):
        augment_module.load_audio = self.real


class TimedAugmenter:
    """An Augmenter whose __call__ (reverberation + noise, their reads included) is timed in CPU seconds."""

    def __init__(self, augmenter):
        self.augmenter, self.seconds = augmenter, 0.0

    def __getattr__(self, name):  # speed_factor, speed: as they are
        return getattr(self.augmenter, name)

    def __call__(self, wav, rng):
        start = time.process_time()
        try:
            return self.augmenter(wav, rng)
        finally:
            self.seconds += time.process_time() - start


def interleaved(paths: dict, items, block: int = 10) -> tuple[dict, dict]:
    """CPU seconds of each path (item -> waveform) over `items`, run in alternating blocks of `block` items so
    that a busy neighbour or a clock change weighs on every path alike; and each path's outputs."""
    seconds, outputs = dict.fromkeys(paths, 0.0), {name: [] for name in paths}
    for i in range(0, len(items), block):
        for name, run in paths.items():
            start = time.process_time()
            out = [run(item) for item in items[i:i + block]]
            seconds[name] += time.process_time() - start
            outputs[name] += out
    return seconds, outputs


def decode_8s(utt_frames: dict):
    """item -> an 8 s span of its file at an offset drawn from its seed (soundfile, float32): decoding alone."""
    def run(item):
        path, frames = utt_frames[item[0]]
        offset = int(np.random.default_rng(item[2]).integers(0, frames - 8 * SR + 1))
        return sf.read(path, start=offset, frames=8 * SR, dtype="float32")[0]
    return run


def ecapa_train_flop(channels: int, secs: float) -> float:
    """FLOPs of one ECAPA-TDNN training step on one crop of 80-dim fbank (100 frames/s): forward x 3."""
    from torch.utils.flop_counter import FlopCounterMode

    from asv.models.ecapa import ECAPA
    model = ECAPA(80, ECAPA.Options(channels=channels)).eval()
    frames = int(secs * 100)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(2, frames, 80), torch.tensor([frames, frames]))
    return 3 * counter.get_total_flops() / 2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--files", type=int, default=40, help="real-mini FLACs longer than 8.5 s")
    parser.add_argument("--examples", type=int, default=200, help="examples per recipe and path")
    parser.add_argument("--work", type=Path, help="folder for the data folder, its shards and the augmentation "
                                                  "files (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="8 files, 20 examples (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.files, args.examples = 8, 20
    return args


def data_folder(work: Path, files: int):
    """A data folder of the long real-mini files (utterances.csv naming them where they are), its effects.tsv
    (the pass timed: ms of CPU per file) and its shard store (prepare_voxceleb.py --shards, 64 MB shards)."""
    long_files = [p for p in sorted(REAL_MINI.glob("*/*/*.flac")) if sf.info(p).duration > 8.5][:files]
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "utterances.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["id", "path", "speaker", "duration", "sample_rate", "split"])
        rows.writerows([k, p, "spk", f"{sf.info(p).duration:.4f}", SR, "train"] for k, p in enumerate(long_files))
    utts = read_manifest(data)
    (data / EFFECTS_FILE).unlink(missing_ok=True)  # the pass is timed, so it runs
    start = time.process_time()
    trims = trim_once(data, utts, SR, workers=0, show_progress=False)
    pass_ms = (time.process_time() - start) / len(utts) * 1e3
    write_shards(data, work / "shards", shard_mb=64, show_progress=False)
    return utts, trims, pass_ms, ShardStore(str(work / "shards"), data)


def print_header(args, utts, pass_ms: float):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# bench_loader.py {'--quick ' if args.quick else ''}--files {len(utts)} --examples {args.examples}")
    print(f"{datetime.date.today()}, commit {commit.strip()}, {cpu}, {os.cpu_count()} cores; one thread, CPU time")
    print(f"{len(utts)} files, mean {np.mean([u.duration for u in utts]):.1f} s; "
          f"effects pass (once per data folder): {pass_ms:.1f} ms CPU per file\n")


def print_reverberation():
    """Reverberation, the bulk of an augmented example: torchaudio's fftconvolve (an FFT at the convolution's own
    length) beside Augmenter.reverberate's (a 5-smooth length), one 8 s crop and a 0.5 s RIR."""
    crop, rir = torch.randn(8 * SR), torch.randn(SR // 2)
    size = fast_fft_size(crop.numel() + rir.numel() - 1)
    ms = {}
    for name, conv in (("fftconvolve", lambda: AF.fftconvolve(crop, rir)),
                       ("5-smooth", lambda: torch.fft.irfft(torch.fft.rfft(crop, size) * torch.fft.rfft(rir, size), size))):
        conv()
        start = time.process_time()
        for _ in range(10):
            conv()
        ms[name] = (time.process_time() - start) / 10 * 1e3
    print(f"reverberating an 8 s crop with a 0.5 s RIR: torchaudio fftconvolve {ms['fftconvolve']:.1f} ms, "
          f"at FFT length {size} (as Augmenter.reverberate) {ms['5-smooth']:.1f} ms\n")


def recipe_row(recipe, utts, trims, store, frames: dict, examples: int, aug_dirs: tuple[str, str]) -> float:
    """One row of the loader table: the recipe's examples through every path, checked equal; returns the span
    path's crops/s."""
    name, crop, effects, min_secs, max_secs, augmented = recipe
    durations = trims.kept / SR if effects == "superb" else [u.duration for u in utts]
    sampler = TrainBatchSampler(durations, 4, crop, min_secs, max_secs, seed=0)
    items = [item for batch in itertools_take(sampler, examples) for item in batch][:examples]
    augmenter = Augmenter(AugmentConfig(noise_dir=aug_dirs[0], noise_prob=0.6, rir_dir=aug_dirs[1], rir_prob=0.6),
                          SR) if augmented else None
    labels, used = [0] * len(utts), trims if effects == "superb" else None
    whole = TrainDataset(utts, labels, SR, crop, effects, augmenter)
    timed_aug = TimedAugmenter(augmenter) if augmented else None
    span = TrainDataset(utts, labels, SR, crop, effects, timed_aug, used)
    sharded = TrainDataset(utts, labels, SR, crop, effects, augmenter, used, store)
    paths = {"whole": lambda item: whole[item][0], "span": lambda item: span[item][0],
             "shards": lambda item: sharded[item][0], "decode": decode_8s(frames)}
    for run in paths.values():  # warm-up: first opens, lazy imports, the augmenter's header cache
        [run(item) for item in items[:3]]
    if timed_aug:
        timed_aug.seconds = 0.0
    with ReadTimer() as reads:
        seconds, out = interleaved(paths, items)
    for other in ("span", "shards"):
        if not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(out["whole"], out[other])):
            raise SystemExit(f"{name}: the {other} path gave other samples than the whole-file chain")
    w, s, h, d = (len(items) / seconds[k] for k in ("whole", "span", "shards", "decode"))
    # the three loader paths make the same augmentation reads (the same draws): a third of the total is span's
    aug = f"{timed_aug.seconds / seconds['span']:.0%} ({reads.seconds / 3 / seconds['span']:.0%})" if augmented else "-"
    print(f"| {name} | {w:.0f} | {s:.0f} | {h:.0f} | {d:.0f} | {s / w:.2f}x | {s / d:.2f}x | {h / s:.2f}x | {aug} |")
    return s


def print_loader_table(args, utts, trims, store, aug_dirs) -> dict:
    frames = {k: (u.path, sf.info(u.path).frames) for k, u in enumerate(utts)}
    print("## crops/s per CPU core\n")
    print("| recipe | whole file | span | span from shards | decode only, 8 s | span / whole | span / decode only | "
          "shards / span | augmentation (its file reads) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rates = {recipe[0]: recipe_row(recipe, utts, trims, store, frames, args.examples, aug_dirs) for recipe in RECIPES}
    print("\nfixed crops without effects: whole file and span are the same code (the crop alone was already read); "
          "span from shards: the same TrainDataset reading each file's bytes from a local shard store (wids, 64 MB "
          "shards); every timed example of the two paths was equal (np.array_equal), and so was every one from "
          "shards. augmentation: the share of the span path's time in reverberation + noise, and in their noise/RIR "
          "file reads")
    return rates


def print_gpu_table(rates: dict):
    print("\n## what a GPU consumes (estimates from FLOPs, 40% of an H200's dense bf16 peak)\n")
    print("| consumer | GFLOP per crop | crops/s per GPU | loader cores per GPU (span path) |")
    print("| --- | ---: | ---: | ---: |")
    budget = UTILISATION * H200_BF16
    wavlm = WAVLM_FLOP_PER_SEC * 8.0
    superb = rates["SUPERB: effects + 8 s crops"]
    print(f"| WavLM Base+ frozen forward, 8 s crops (SUPERB recipe) | {wavlm / 1e9:.0f} | {budget / wavlm:,.0f} | "
          f"{budget / wavlm / superb:.1f} |")
    fixed = rates["fixed 2-3 s crops, no effects"]
    for channels in (512, 1024):
        flop = ecapa_train_flop(channels, 2.5)
        print(f"| ECAPA-TDNN C={channels} on fbank, training step, 2.5 s crops (fixed recipe) | {flop / 1e9:.1f} | "
              f"{budget / flop:,.0f} | {budget / flop / fixed:.1f} |")


def main():
    args = parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    utts, trims, pass_ms, store = data_folder(work, args.files)
    aug_dirs = synthetic_augmentation(work)
    print_header(args, utts, pass_ms)
    print_reverberation()
    rates = print_loader_table(args, utts, trims, store, aug_dirs)
    print_gpu_table(rates)


def itertools_take(sampler, n):
    """The sampler's batches (epoch after epoch) until n examples."""
    got = 0
    for batch in sampler:
        yield batch
        got += len(batch)
        if got >= n:
            return


if __name__ == "__main__":
    main()
