"""Does the GPU work as it should? Training speed fp32 vs bf16, GPU utilisation, the data loader's share of a
step, evaluation throughput against batch 1, fp16 with skipped non-finite steps, peak memory. About 3 minutes
on one GPU (8 at most).

    python benchmarks/gpu_check.py              # CUDA; without a GPU it prints one line and exits 0
    python benchmarks/gpu_check.py --cpu-smoke  # every part at tiny sizes on the CPU, in seconds

Audio: a small synthetic corpus (asv.demo voices, --speakers x 12 files of 2-4 s) written to a temporary
folder and prepared with prepare_voxceleb.py, so the check needs no data set and no network. Weights: random
(upstream.random_init). One line per measurement:
  train <model> <precision>: optimizer steps/s on synthetic batches already on the device (model only), peak
      memory, GPU utilisation; WavLM Base+ (frozen) + SUPERB x-vector at configs/base.yaml's 10 x 5 crops of
      8 s, and ECAPA (configs/strong.yaml's sizes) on log-mel at 64 crops of 3 s; bf16 is autocast, as
      train.mixed_precision=bf16 runs it;
  loader: the real loader (SUPERB's SoX effects, configs/base.yaml's workers) feeding the WavLM step: the
      share of the step spent waiting for batches;
  eval: audio seconds per second of asv.embed.embed on length-sorted batches and one file at a time;
  fp16: train_asv.py with train.mixed_precision=fp16 on a corpus with one speaker's files poisoned (samples of
      ~1e30: the loss overflows): the number of skipped steps, and whether the saved weights are all finite.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from asv.models import MarginSoftmax, min_input_samples
from common import ROOT, GpuUtilisation

from asv.config import load_config
from asv.data import TrainBatchSampler, TrainDataset, collate_padded, read_manifest, trim_once
from asv.demo import make_demo_speaker
from asv.embed import build_models, embed, eval_loader
from asv.train import make_optimizer

# Sizes: the recipes' own on a GPU; tiny ones for --cpu-smoke (the same code paths).
FULL = dict(speakers=12, wavlm={}, xvector=[], ecapa=[], crop=8.0, batch=10, accumulate=5, ecapa_batch=64,
            ecapa_crop=3.0, steps=5, warmup=2, eval_batch_secs=600.0, fp16_steps=20)
TINY_WAVLM = {"encoder_num_layers": 2, "encoder_embed_dim": 32, "encoder_num_heads": 2,
              "encoder_ff_interm_features": 64, "encoder_pos_conv_kernel": 8, "encoder_pos_conv_groups": 2,
              "extractor_conv_layer_config": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2}
SMOKE = dict(speakers=4, wavlm=TINY_WAVLM, xvector=["downstream.hidden_size=32", "downstream.aggregation_size=48",
                                                    "downstream.embed_dim=16"],
             ecapa=["downstream.channels=32", "downstream.embed_dim=16", "downstream.attention_dim=16"], crop=1.0,
             batch=2, accumulate=2, ecapa_batch=4, ecapa_crop=1.0, steps=2, warmup=1, eval_batch_secs=60.0,
             fp16_steps=4)


# ---------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> str:
    return f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "peak n/a (CPU)"


# ---------------------------------------------------------------------------- models and data

def recipe(name: str, sizes: dict, data: Path):
    """(label, config) of the two models: SUPERB's WavLM Base+ x-vector, and ECAPA on log-mel."""
    if name == "wavlm":
        cfg = load_config(str(ROOT / "configs" / "base.yaml"), ["upstream.random_init=true", f"data.dir={data}",
                                                                *sizes["xvector"]])
        cfg.upstream.arch = dict(sizes["wavlm"])
        return "wavlm_base_plus+superb_xvector", cfg
    cfg = load_config(str(ROOT / "configs" / "strong.yaml"), ["upstream.name=logmel", f"data.dir={data}",
                                                              *sizes["ecapa"]])
    return "logmel+ecapa", cfg


def train_parts(cfg, speakers: int, device):
    """Frozen upstream, encoder, head, optimizer, trained parameters: as train_asv.py builds them."""
    upstream, encoder = build_models(cfg)
    upstream, encoder = upstream.to(device), encoder.to(device).train()
    head = MarginSoftmax(cfg.downstream.embed_dim, speakers, cfg.loss.name, cfg.loss.margin, cfg.loss.scale,
                         cfg.loss.sub_centers).to(device).train()
    params = [*encoder.parameters(), *head.parameters()]
    return upstream, encoder, head, make_optimizer(cfg.optim, params), params


def train_step(parts, micro_batches, precision: str, device, clip: float):
    """One optimizer step over the micro-batches; the frozen upstream under the same autocast as the rest."""
    upstream, encoder, head, optimizer, params = parts
    for wavs, lengths, labels in micro_batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                hidden, frames = upstream(wavs, lengths)
            loss, _ = head(encoder(hidden, frames), labels)
        (loss / len(micro_batches)).backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad()


def make_corpus(folder: Path, speakers: int) -> Path:
    """Synthetic voices written as a VoxCeleb-layout tree, prepared (2 test speakers, no validation)."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: make_demo_speaker(folder / "corpus", 0, s), range(speakers)))
    data = folder / "data"
    subprocess.run([sys.executable, str(ROOT / "prepare_voxceleb.py"), "--corpus", str(folder / "corpus"),
                    "--out", str(data), "--test-speakers", "2", "--valid-speakers", "0"], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT)
    return data


# ---------------------------------------------------------------------------- the checks

def check_training(name: str, sizes: dict, data: Path, device):
    """Model-only optimizer steps/s in fp32 and bf16 on synthetic batches already on the device."""
    label, cfg = recipe(name, sizes, data)
    batch, crop = (sizes["batch"], sizes["crop"]) if name == "wavlm" else (sizes["ecapa_batch"], sizes["ecapa_crop"])
    accumulate = sizes["accumulate"] if name == "wavlm" else 1  # strong.yaml: no accumulation
    gen = torch.Generator().manual_seed(0)
    micro = [((0.1 * torch.randn(batch, int(crop * 16000), generator=gen)).to(device),
              torch.full((batch,), int(crop * 16000), device=device),
              torch.randint(0, 100, (batch,), generator=gen).to(device)) for _ in range(accumulate)]
    rates = {}
    for precision in ("fp32", "bf16"):
        parts = train_parts(cfg, 100, device)
        for _ in range(sizes["warmup"]):
            train_step(parts, micro, precision, device, cfg.train.gradient_clipping)
        sync(device)
        reset_peak(device)
        with GpuUtilisation(device) as util:
            tic = time.perf_counter()
            for _ in range(sizes["steps"]):
                train_step(parts, micro, precision, device, cfg.train.gradient_clipping)
            sync(device)
            rates[precision] = sizes["steps"] / (time.perf_counter() - tic)
        speed_up = f", {rates['bf16'] / rates['fp32']:.2f}x fp32" if precision == "bf16" else ""
        print(f"train {label} {precision}: {rates[precision]:.2f} steps/s{speed_up} ({batch} crops of {crop:g} s x "
              f"{accumulate} accumulated, model only), {peak_memory(device)}, {util.text()}", flush=True)
        del parts


def check_loader(sizes: dict, data: Path, device):
    """The real training loader feeding the WavLM fp32 step: the share of the step spent waiting for batches."""
    _, cfg = recipe("wavlm", sizes, data)
    d = cfg.data
    utts = [u for u in read_manifest(str(data)) if u.split == "train"]
    speakers = sorted({u.speaker for u in utts})
    workers = min(cfg.num_workers, os.cpu_count() or 1)
    # as train_asv.py: the effects once per data folder (effects.tsv), each example a span of its file
    trims = trim_once(str(data), utts, d.sample_rate, workers, False) if d.effects == "superb" else None
    durations = [u.duration for u in utts] if trims is None else trims.kept / d.sample_rate
    sampler = TrainBatchSampler(durations, sizes["batch"], d.crop, d.min_secs, sizes["crop"],
                                cfg.train.seed, multiple=sizes["accumulate"])
    dataset = TrainDataset(utts, [speakers.index(u.speaker) for u in utts], d.sample_rate, d.crop, d.effects, None,
                           trims)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_padded, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    parts, it, waited = train_parts(cfg, len(speakers), device), iter(loader), 0.0

    def step():
        nonlocal waited
        micro = []
        for _ in range(sizes["accumulate"]):
            tic = time.perf_counter()
            wavs, lengths, labels = next(it)
            waited += time.perf_counter() - tic
            micro.append((wavs.to(device, non_blocking=True), lengths.to(device), labels.to(device)))
        train_step(parts, micro, "fp32", device, cfg.train.gradient_clipping)
        sync(device)  # train_asv.py syncs once a step (the finite-gradient check)

    step()  # warm-up: worker start-up
    waited = 0.0
    with GpuUtilisation(device) as util:
        tic = time.perf_counter()
        for _ in range(sizes["steps"]):
            step()
        total = time.perf_counter() - tic
    print(f"loader wavlm_base_plus fp32: waiting for batches {100 * waited / total:.0f}% of the step "
          f"({waited / sizes['steps']:.2f} s of {total / sizes['steps']:.2f} s; {workers} workers, SoX effects), "
          f"{util.text()}", flush=True)


def check_eval(sizes: dict, data: Path, device):
    """asv.embed.embed on every file: length-sorted batches against one file at a time."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    _, cfg = recipe("wavlm", sizes, data)
    utts = read_manifest(str(data))
    paths, secs = [u.path for u in utts], [u.duration for u in utts]
    upstream, encoder = build_models(cfg)
    upstream, encoder = upstream.to(accelerator.device), encoder.to(accelerator.device)
    rates, memory = {}, {}
    for label, batch_secs in (("length-sorted batches", sizes["eval_batch_secs"]), ("batch 1", 1e-9)):
        cfg.data.eval_batch_secs = batch_secs  # 1e-9: every batch holds a single file
        need = min_input_samples(upstream, encoder)
        loader = accelerator.prepare(eval_loader(paths, secs, cfg, need, accelerator.device))
        embed(accelerator, [upstream], [encoder], loader, len(paths), max_batches=2)  # warm-up
        sync(device)
        reset_peak(device)
        tic = time.perf_counter()
        _, done = embed(accelerator, [upstream], [encoder], loader, len(paths))
        sync(device)
        rates[label] = sum(secs) / (time.perf_counter() - tic)
        memory[label] = peak_memory(device)
    print(f"eval wavlm_base_plus fp32: {rates['length-sorted batches']:.0f} audio s/s in length-sorted batches "
          f"({sizes['eval_batch_secs']:g} s each) vs {rates['batch 1']:.0f} at batch 1 "
          f"({rates['length-sorted batches'] / rates['batch 1']:.1f}x; {int(done.sum())} files), "
          f"{memory['length-sorted batches']} in batches",
          flush=True)


def poison(data: Path, speaker: str) -> int:
    """Rewrite one training speaker's files with samples of ~1e30 (finite, so they load; the loss overflows)."""
    paths = [u.path for u in read_manifest(str(data)) if u.speaker == speaker]
    for path in paths:
        x, sr = sf.read(path, dtype="float32")
        sf.write(path, x * np.float32(1e30), sr, subtype="FLOAT")
    return len(paths)


def check_fp16(sizes: dict, data: Path, work: Path, device):
    """train_asv.py under train.mixed_precision=fp16 with some non-finite steps: skipped, weights stay finite."""
    speaker = next(u.speaker for u in read_manifest(str(data)) if u.split == "train")
    files = poison(data, speaker)
    steps, exp = sizes["fp16_steps"], work / "exp_fp16"
    cmd = [sys.executable, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}",
           "train.mixed_precision=fp16", f"train.total_steps={steps}", f"train.save_step={steps}", "train.log_step=1",
           "train.test_after_train=false", "data.batch_size=4", "num_workers=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(f"fp16 train_asv.py: FAILED (rc {out.returncode}): {(out.stderr.strip().splitlines() or [''])[-1]}")
        return
    skipped = len(re.findall(r"warning: step \d+ skipped", out.stdout + out.stderr))
    state = torch.load(exp / f"step-{steps}" / "model.pt", map_location="cpu", weights_only=True)
    finite = all(torch.isfinite(t).all() for part in ("encoder", "head") for t in state[part].values()
                 if t.is_floating_point())
    scaler = "grad scaler" if device.type == "cuda" else "no grad scaler on the CPU: train_asv.py's own guard"
    print(f"fp16 train_asv.py: {steps} steps, {skipped} skipped as non-finite ({files} files of speaker {speaker} "
          f"poisoned; {scaler}), weights finite: {'yes' if finite else 'NO'}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at tiny sizes on the CPU (seconds)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check; "
              "--cpu-smoke runs every part at tiny sizes on the CPU")
        return
    device, sizes = (torch.device("cpu"), SMOKE) if args.cpu_smoke else (torch.device("cuda"), FULL)
    name = "CPU (smoke sizes)" if args.cpu_smoke else (
        f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        data = make_corpus(Path(tmp), sizes["speakers"])
        for model in ("wavlm", "ecapa"):
            check_training(model, sizes, data, device)
        check_loader(sizes, data, device)
        check_eval(sizes, data, device)
        check_fp16(sizes, data, Path(tmp), device)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
